use std::{os::unix::fs::PermissionsExt as _, path::Path, time::Duration};

use super::*;
use crate::agent::api::RunState;

const EXAMPLE: &str = include_str!("../../../packaging/movarto.toml");

fn problems(text: &str) -> Vec<Problem> {
    Inventory::parse(text, Path::new("/nonexistent"), false).1
}

/// (line, key) of each problem, for asserting where they are.
fn places(text: &str) -> Vec<(usize, String)> {
    problems(text)
        .into_iter()
        .map(|p| (p.line, p.key))
        .collect()
}

#[test]
fn the_packaged_example_is_a_good_file() {
    let (inventory, found) = Inventory::parse(EXAMPLE, Path::new("/etc/movarto"), false);
    assert_eq!(found, [], "{found:?}");
    let inventory = inventory.expect("typed");
    assert_eq!(inventory.sites.len(), 2);
    let (name, web) = inventory.service("web").expect("web");
    assert_eq!(name, "web");
    assert_eq!(
        web.at["b"].new_addr,
        Some("198.18.0.10".parse().expect("ip"))
    );
    assert_eq!(inventory.defaults.max_bandwidth, Some(125 << 20));
    assert_eq!(inventory.defaults.max_drain, Some(Duration::from_secs(300)));
}

#[test]
fn a_syntax_error_is_named_with_its_line_and_column() {
    let found = problems("[sites.a]\nagent = \"http://x\"\ntunnel = 203.0.113.1\n");
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].line, 3, "{found:?}");
    assert!(found[0].column > 9, "{found:?}");
    assert!(found[0].message.starts_with("not TOML"), "{found:?}");
}

#[test]
fn every_bad_key_is_named_at_its_line_all_at_once() {
    let text = r#"[defaults]
max_drain = "5"
bogus = 1

[sites.a]
agent = "http://203.0.113.1:7878"
token_file = "a.token"
tunnel = "203.0.113.999"
gateway_mac = "02:00:00:00:00"
gateway_cidr = "192.0.2.1/99"
uplnk = "eth0"

[sites.b]
agent = "ftp://203.0.113.129"
token_file = "b.token"
tunnel = "203.0.113.1"
migration_port = "4444"

[services.web]
home = "192.0.2.10"
home_site = "c"
[services.web.at.b]
new_addr = "2001:db8::10"
[services.web.at.d]
new_addr = "198.18.0.11"

[services.api]
home = "198.18.0.11"

[services.db]
dns_name = "db.example.test"

[extra]
"#;
    let found = places(text);
    let want: Vec<(usize, &str)> = vec![
        (2, "defaults.max_drain"),
        (3, "defaults.bogus"),
        (8, "sites.a.tunnel"),
        (9, "sites.a.gateway_mac"),
        (10, "sites.a.gateway_cidr"),
        (11, "sites.a.uplnk"),
        (14, "sites.b.agent"),
        (17, "sites.b.migration_port"),
        (21, "services.web.home_site"),
        (23, "services.web.at.b.new_addr"),
        (24, "services.web.at.d"),
        (25, "services.web.at.d.new_addr"),
        (30, "services.db"),
        (31, "services.db.dns_name"),
        (33, "extra"),
    ];
    let found_ref: Vec<(usize, &str)> = found.iter().map(|(l, k)| (*l, k.as_str())).collect();
    assert_eq!(found_ref, want, "{:#?}", problems(text));
    // The messages say what is wrong.
    let all = problems(text);
    let message = |key: &str| {
        all.iter()
            .find(|p| p.key == key)
            .map(|p| p.message.clone())
            .unwrap_or_default()
    };
    assert!(message("defaults.max_drain").contains("has no unit"));
    assert!(message("defaults.bogus").contains("unknown field"));
    assert!(message("sites.a.gateway_cidr").contains("192.0.2.1/99"));
    assert!(message("services.web.home_site").contains("no site \"c\""));
    assert!(message("services.web.at.b.new_addr").contains("different families"));
    assert!(message("services.web.at.d.new_addr").contains("also services.api.home"));
    assert!(message("services.db").contains("missing `home`"));
    assert_eq!(
        all.iter()
            .find(|p| p.key == "sites.a.uplnk")
            .map(|p| p.column),
        Some(1)
    );
}

#[test]
fn move_mode_and_gateways_are_checked_across_entries() {
    let text = r#"[sites.a]
agent = "http://203.0.113.1:7878"
token_file = "a"
tunnel = "203.0.113.1"
gateway_mac = "02:00:00:00:00:01"

[sites.b]
agent = "http://203.0.113.129:7878"
token_file = "b"
tunnel = "203.0.113.1"
gateway_mac = "02:00:00:00:00:02"

[services.web]
home = "192.0.2.10"
home_site = "a"
address_mode = "move"
[services.web.at.b]
new_addr = "198.18.0.10"
"#;
    assert_eq!(
        places(text),
        [
            (10, "sites.b.tunnel".to_owned()),
            (11, "sites.b.gateway_mac".to_owned()),
            (16, "services.web.address_mode".to_owned()),
            (18, "services.web.at.b.new_addr".to_owned()),
        ],
        "{:#?}",
        problems(text)
    );
    assert!(
        problems(text)[0]
            .message
            .contains("also site a's tunnel endpoint")
    );
}

#[test]
fn config_check_opens_the_files_it_names() {
    let dir = std::env::temp_dir().join(format!("movarto-inventory-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let token = dir.join("a.token");
    std::fs::write(&token, "site-a-token-0123456789abcdef\n").expect("token");
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let text = "[sites.a]\nagent = \"http://203.0.113.1:7878\"\ntoken_file = \"a.token\"\n\
                tunnel = \"203.0.113.1\"\nca_cert = \"missing.pem\"\n\n\
                [defaults]\ndns_key_file = \"missing.key\"\n";
    std::fs::write(dir.join("movarto.toml"), text).expect("inventory");
    let found = check_file(&dir.join("movarto.toml")).expect("read");
    let keys: Vec<(usize, &str)> = found.iter().map(|p| (p.line, p.key.as_str())).collect();
    assert_eq!(
        keys,
        [
            (3, "sites.a.token_file"),
            (5, "sites.a.ca_cert"),
            (8, "defaults.dns_key_file")
        ],
        "{found:#?}"
    );
    assert!(found[0].message.contains("chmod 600"), "{found:?}");
    assert!(found[1].message.contains("missing.pem"), "{found:?}");
    // Readable and private: the token passes; `load` doesn't open files at all.
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let found = check_file(&dir.join("movarto.toml")).expect("read");
    assert_eq!(found.len(), 2, "{found:?}");
    assert!(Inventory::load(&dir.join("movarto.toml")).is_ok());
    let _ = std::fs::remove_dir_all(&dir);
}

fn example() -> Inventory {
    Inventory::load_text(EXAMPLE)
}

impl Inventory {
    fn load_text(text: &str) -> Inventory {
        let (inventory, found) = Inventory::parse(text, Path::new("/etc/movarto"), false);
        assert_eq!(found, []);
        inventory.expect("typed")
    }
}

fn short_form() -> MigrateFlags {
    MigrateFlags {
        name: Some("web".to_owned()),
        to: Some("b".to_owned()),
        ..Default::default()
    }
}

#[test]
fn the_inventory_completes_the_short_form() {
    let inventory = example();
    let o = short_form()
        .resolve(Some(&inventory), Some("a"))
        .expect("complete");
    assert_eq!(o.vm, "web");
    assert_eq!(o.source, "https://203.0.113.1:7878");
    assert_eq!(o.destination, "https://203.0.113.129:7878");
    assert_eq!(o.source_token_file, Path::new("/etc/movarto/a.token"));
    assert_eq!(o.destination_token_file, Path::new("/etc/movarto/b.token"));
    assert_eq!(
        o.destination_spec,
        Path::new("/etc/movarto/specs/b/web.toml")
    );
    assert_eq!(o.home.to_string(), "192.0.2.10");
    assert_eq!(
        o.new_addr.map(|n| n.to_string()).as_deref(),
        Some("198.18.0.10")
    );
    assert_eq!(o.source_tunnel.to_string(), "203.0.113.1");
    assert_eq!(o.destination_tunnel.to_string(), "203.0.113.129");
    assert_eq!(o.gateway_cidr, "192.0.2.1/24");
    assert_eq!(o.dns_server.as_deref(), Some("192.0.2.53"));
    assert_eq!(o.dns_name.as_deref(), Some("svc.example.test"));
    assert_eq!(o.ca_cert.as_deref(), Some(Path::new("/etc/movarto/ca.pem")));
    // [defaults] over the built-in values; the built-in ones where it says nothing.
    assert_eq!(o.max_bandwidth, 125 << 20);
    assert_eq!(o.max_drain, Duration::from_secs(300));
    assert_eq!(o.migration_port, builtin::MIGRATION_PORT);
    assert_eq!(o.vm_iface, "tap0");
    assert_eq!(o.tunnel_mtu, 1500);
}

#[test]
fn moving_home_takes_the_home_address_as_the_new_one() {
    let inventory = example();
    let flags = MigrateFlags {
        name: Some("web".to_owned()),
        to: Some("a".to_owned()),
        ..Default::default()
    };
    let o = flags
        .resolve(Some(&inventory), Some("b"))
        .expect("complete");
    assert_eq!(o.source_tunnel.to_string(), "203.0.113.129");
    assert_eq!(o.destination_tunnel.to_string(), "203.0.113.1");
    assert_eq!(
        o.new_addr.map(|n| n.to_string()).as_deref(),
        Some("192.0.2.10"),
        "web's home site is a: back there, N is H"
    );
}

#[test]
fn a_flag_wins_over_the_inventory_which_wins_over_the_default() {
    let inventory = example();
    let mut flags = short_form();
    flags.destination = Some("http://198.51.100.1:7878".to_owned());
    flags.new_addr = Some("198.18.0.99".parse().expect("ip"));
    flags.migration_port = Some(5555);
    flags.defaults.max_bandwidth = Some(8 << 20);
    flags.defaults.dns_server = Some("198.51.100.53".to_owned());
    flags.defaults.skip_ttl_wait = Some(true);
    let o = flags
        .resolve(Some(&inventory), Some("a"))
        .expect("complete");
    assert_eq!(o.destination, "http://198.51.100.1:7878");
    assert_eq!(
        o.new_addr.map(|n| n.to_string()).as_deref(),
        Some("198.18.0.99")
    );
    assert_eq!(o.migration_port, 5555);
    assert_eq!(o.max_bandwidth, 8 << 20);
    assert_eq!(o.dns_server.as_deref(), Some("198.51.100.53"));
    assert!(o.skip_ttl_wait);
    // Untouched by the flags: the inventory's.
    assert_eq!(o.source, "https://203.0.113.1:7878");
    assert_eq!(o.downtime_limit, Duration::from_millis(300));
    // A service's own key wins over [defaults].
    let text = EXAMPLE.replace(
        "dns_name = \"svc.example.test\"",
        "dns_name = \"svc.example.test\"\nzone = \"svc.example.test\"\nvm_iface = \"tapweb\"",
    );
    let o = short_form()
        .resolve(Some(&Inventory::load_text(&text)), Some("a"))
        .expect("complete");
    assert_eq!(o.zone.as_deref(), Some("svc.example.test"));
    assert_eq!(o.vm_iface, "tapweb");
}

#[test]
fn without_an_inventory_the_flags_alone_decide() {
    let flags = MigrateFlags {
        name: Some("web".to_owned()),
        source: Some("http://a".to_owned()),
        destination: Some("http://b".to_owned()),
        source_token_file: Some("a".into()),
        destination_token_file: Some("b".into()),
        destination_spec: Some("b.toml".into()),
        home: Some("192.0.2.10".parse().expect("ip")),
        new_addr: Some("198.51.100.10".parse().expect("ip")),
        source_tunnel: Some("203.0.113.1".parse().expect("ip")),
        destination_tunnel: Some("203.0.113.129".parse().expect("ip")),
        gateway_mac: Some("02:00:00:00:00:01".parse().expect("mac")),
        gateway_cidr: Some("192.0.2.1/24".to_owned()),
        ..Default::default()
    };
    let o = flags.resolve(None, None).expect("the long form");
    assert_eq!(o.max_bandwidth, builtin::MAX_BANDWIDTH);
    assert_eq!(o.agent_timeout, builtin::AGENT_TIMEOUT);
    assert_eq!(o.dns_server, None);
    let mut partial = flags.clone();
    partial.destination_spec = None;
    let err = partial
        .resolve(None, None)
        .expect_err("no spec")
        .to_string();
    assert!(err.contains("--destination-spec"), "{err}");
    let mut partial = flags;
    partial.to = Some("b".to_owned());
    let err = partial
        .resolve(None, None)
        .expect_err("no inventory")
        .to_string();
    assert!(err.contains("--to b") && err.contains("--config"), "{err}");
}

#[test]
fn a_value_nobody_gives_names_its_flag_and_its_key() {
    let text = EXAMPLE.replace("new_addr = \"198.18.0.10\"", "spec = \"web-b.toml\"");
    let err = short_form()
        .resolve(Some(&Inventory::load_text(&text)), Some("a"))
        .expect_err("no N");
    assert_eq!(
        err.to_string(),
        "no new address N: give --new-addr, or set `services.web.at.b.new_addr` in the inventory"
    );
    let err = MigrateFlags {
        to: Some("b".to_owned()),
        ..short_form()
    }
    .resolve(Some(&example()), None)
    .expect_err("no source");
    assert!(err.to_string().contains("sites.<from>.agent"), "{err}");
    let err = MigrateFlags {
        to: Some("z".to_owned()),
        ..short_form()
    }
    .resolve(Some(&example()), Some("a"))
    .expect_err("no site z");
    assert!(err.to_string().contains("no site \"z\""), "{err}");
}

fn seen(site: &str, state: Result<Option<RunState>, &str>) -> Sighting {
    Sighting {
        site: site.to_owned(),
        state: state.map_err(str::to_owned),
    }
}

#[test]
fn the_source_is_where_the_agents_say_the_vm_runs_else_its_home() {
    use RunState::*;
    let pick = |sightings: &[Sighting], home: Option<&str>| {
        source_from_sightings("web", "b", sightings, home)
    };
    let running_at_c = [
        seen("a", Ok(None)),
        seen("b", Ok(None)),
        seen("c", Ok(Some(Running))),
    ];
    assert_eq!(
        pick(&running_at_c, Some("a")),
        Ok(SourceSite::Agents("c".into()))
    );
    // A move from a is under way (a's QEMU is postmigrate, b's runs): follow it from a.
    let moving = [
        seen("a", Ok(Some(Postmigrate))),
        seen("b", Ok(Some(Running))),
    ];
    assert_eq!(pick(&moving, None), Ok(SourceSite::Agents("a".into())));
    // Nobody answers: the home site.
    let silent = [seen("a", Err("unreachable")), seen("b", Ok(None))];
    assert_eq!(
        pick(&silent, Some("a")),
        Ok(SourceSite::HomeSite("a".into()))
    );
    let err = pick(&silent, None).expect_err("nowhere");
    assert!(
        err.contains("--from") && err.contains("a: unreachable"),
        "{err}"
    );
    let twice = [seen("a", Ok(Some(Running))), seen("c", Ok(Some(Running)))];
    assert!(pick(&twice, Some("a")).is_err_and(|e| e.contains("a, c")));
    let there = [seen("a", Ok(None)), seen("b", Ok(Some(Running)))];
    assert!(pick(&there, Some("a")).is_err_and(|e| e.contains("already runs at site b")));
    // An incoming half elsewhere is not a source.
    let incoming = [seen("a", Ok(Some(Inmigrate))), seen("b", Ok(None))];
    assert_eq!(
        pick(&incoming, Some("c")),
        Ok(SourceSite::HomeSite("c".into()))
    );
}
