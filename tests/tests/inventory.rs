//! The inventory: `migrate web --to b --config lab.toml` does in the lab what the long
//! form does (tests/migrate.rs), and `config check` names every problem of a bad file
//! with its line.

use std::{
    io::{BufRead as _, BufReader},
    os::unix::fs::PermissionsExt as _,
    path::Path,
    process::{Command, Output},
    thread,
    time::Duration,
};

use movarto_common::config::Mode;
use movarto_lab::{
    dns_server::SERVICE, lab::*, netns::wait_until, tempdir::TempDir, workload::echo_once,
};
use movarto_tests::{
    inventory::{run_with_inventory, short_migrate_command, write_lab_inventory},
    migration::{assert_rolled_back_to_a, wait_for_source_migration},
    require_root,
};
use movarto_user::datapath::pin_dir;

/// `movarto-user config check --config PATH` with `extra` flags.
fn config_check(path: &Path, extra: &[&str]) -> Output {
    Command::new(movarto_lab::movarto_user().expect("the binary"))
        .args(["config", "check", "--config"])
        .arg(path)
        .args(extra)
        .output()
        .expect("config check")
}

#[test]
fn the_short_form_with_the_lab_inventory_does_what_the_long_form_does() {
    require_root();
    let l = Lab::build().expect("the lab");
    let boot_id = l.boot_at_a().expect("the guest boots at A");
    let mut conns = Connections::open(&l).expect("the pre-move connections");
    let stats = conns.stats.clone();
    // The drain rules come from the inventory's [defaults], not from flags.
    let config =
        write_lab_inventory(&l, "drain_grace = \"2s\"\nmax_drain = \"60s\"").expect("lab.toml");
    let check = config_check(&config, &[]);
    assert!(
        check.status.success(),
        "lab.toml: {}",
        String::from_utf8_lossy(&check.stdout)
    );

    // No --from: the agents say the VM runs at A.
    let mut migrate = short_migrate_command(&l, "b", &config, &[]).expect("the command");
    let mut orchestrator = l.bind.client.spawn(&mut migrate).expect("migrate");
    let stderr = orchestrator.child_mut().stderr.take().expect("stderr");
    let progress = thread::spawn(move || {
        BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .inspect(|line| eprintln!("migrate: {line}"))
            .collect::<Vec<_>>()
    });

    // Through the tunnel after the switchover: bytes keep coming on the old connections.
    wait_until(Duration::from_secs(120), "A forwarding", || {
        l.with_agents(async |a, _b| {
            a.status()
                .await
                .is_ok_and(|s| s.datapath.is_some_and(|d| d.mode == Mode::Forward))
        })
        .unwrap_or(false)
    })
    .expect("the switchover");
    stats
        .wait_for_more_traffic(IO_TIMEOUT, "traffic through the tunnel")
        .expect("traffic through the tunnel");
    assert_eq!(
        echo_once(&mut conns.idle, "hello after").expect("echo"),
        "hello after"
    );
    assert_eq!(
        l.http_get(N, "/id").expect("GET"),
        boot_id,
        "the guest at N"
    );
    let failures = conns.close();

    let (status, report) = l
        .finish_migrate(&mut orchestrator, Duration::from_secs(90), || {})
        .expect("migrate finished");
    let lines = progress.join().expect("progress");
    assert!(status.success(), "migrate exited {status}: {report}");
    assert!(failures.is_empty(), "connections broke: {failures:?}");
    assert!(
        lines
            .iter()
            .any(|l| l.contains("the VM leaves site a (its agent runs the VM)")),
        "the source was found through the agents: {lines:?}"
    );

    // The same report the long form gives.
    assert_eq!(report["succeeded"], true);
    assert_eq!(report["vm"], "web");
    assert_eq!(
        report["flows_at_switchover"], 3,
        "stream, interactive, idle"
    );
    assert_eq!(report["flows_drained"], 3);
    assert_eq!(report["flows_cut"].as_array().map(Vec::len), Some(0));
    assert_eq!(report["qemu"]["status"], "completed");
    assert_eq!(report["qemu"]["destination_status"], "running");
    assert!(report["dns_switch_ms"].as_u64().is_some());
    assert!(
        report["tunnel"]["packets_to_b"]
            .as_u64()
            .is_some_and(|p| p > 0)
    );
    let steps = report["steps"].as_array().expect("steps");
    assert_eq!(steps.len(), 11, "{steps:?}");
    // The TTL wait was skipped by the inventory (the record's TTL is 300 s).
    assert!(
        report["steps"][0]["start_ms"].as_u64() < Some(1000),
        "no TTL wait"
    );

    // DNS points at N with the TTL restored; A is torn down, B serves N by NAT.
    assert_eq!(l.bind.dig(SERVICE, "A").expect("dig"), [N]);
    assert_eq!(l.bind.dig_ttls(SERVICE, "A").expect("dig"), [300]);
    assert!(!pin_dir(&l.uplink_a).exists(), "A is detached");
    let b_mode = l
        .with_agents(async |_a, b| b.status().await.map(|s| s.datapath))
        .expect("the agents")
        .expect("B status")
        .expect("B attached")
        .mode;
    assert_eq!(b_mode, Mode::Nat);
    assert_eq!(
        l.http_get(N, "/id").expect("GET"),
        boot_id,
        "N after teardown"
    );
}

/// `jobs` and `abort` without agent flags ask the inventory's sites: `abort web` finds
/// the agent that holds the source's half and rolls the move back.
#[test]
fn jobs_and_abort_take_their_agents_from_the_inventory() {
    require_root();
    let l = Lab::build().expect("the lab");
    let boot_id = l.boot_at_a().expect("the guest boots at A");
    let chat = Chat::start(&l).expect("the connection");
    let config = write_lab_inventory(&l, "").expect("lab.toml");
    // A flag over the inventory: 8 MiB/s for the guest's ~80 MiB, a copy of about 10 s.
    let mut migrate =
        short_migrate_command(&l, "b", &config, &["--max-bandwidth", "8"]).expect("command");
    let mut orchestrator = l.bind.client.spawn(&mut migrate).expect("migrate");
    wait_for_source_migration(&l, &mut orchestrator, "the RAM copy", |m| {
        m.progress.is_some_and(|p| p.transferred > 4 << 20)
    });

    let listed = run_with_inventory(&l, &config, &["jobs", "--json"]);
    assert!(listed.status.success(), "jobs");
    let listing: serde_json::Value = serde_json::from_slice(&listed.stdout).expect("JSON");
    let roles: Vec<&str> = listing["jobs"]
        .as_array()
        .expect("jobs")
        .iter()
        .filter(|j| j["vm"] == "web")
        .filter_map(|j| j["role"].as_str())
        .collect();
    assert_eq!(
        roles,
        ["source", "destination"],
        "both sites asked: {listing}"
    );

    let aborted = run_with_inventory(&l, &config, &["abort", "web", "--wait", "60s"]);
    let said = String::from_utf8_lossy(&aborted.stdout);
    assert!(aborted.status.success(), "abort: {said}");
    assert!(said.contains("of web rolled back"), "{said}");
    let (status, report) = l
        .finish_migrate(&mut orchestrator, Duration::from_secs(60), || {})
        .expect("migrate finished");
    assert!(!status.success(), "an aborted migrate fails");
    assert_rolled_back_to_a(&l, &report, &boot_id, chat);
}

/// A bad inventory: `config check` exits 1 and names every problem at its line, in text
/// and in JSON.
#[test]
fn config_check_names_each_problem_of_a_bad_file_with_its_line() {
    let dir = TempDir::new("movarto-config-check").expect("scratch");
    let path = dir.join("movarto.toml");
    std::fs::write(
        &path,
        r#"[sites.a]
agent = "http://203.0.113.1:7878"
token_file = "missing.token"
tunnel = "203.0.113.1"
gateway_mac = "02:00:00:00:00:zz"

[services.web]
home = "192.0.2.10"
home_site = "c"
colour = "blue"
"#,
    )
    .expect("the file");
    let out = config_check(&path, &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    for (line, key) in [
        (3, "sites.a.token_file"),
        (5, "sites.a.gateway_mac"),
        (9, "services.web.home_site"),
        (10, "services.web.colour"),
    ] {
        let wanted = format!("{}:{line}:", path.display());
        assert!(
            text.lines()
                .any(|l| l.starts_with(&wanted) && l.contains(key)),
            "no {key} at line {line}:\n{text}"
        );
    }
    assert!(text.contains("4 problem(s)"), "{text}");

    let out = config_check(&path, &["--json"]);
    assert_eq!(out.status.code(), Some(1));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(report["ok"], false);
    let lines: Vec<(u64, &str)> = report["problems"]
        .as_array()
        .expect("problems")
        .iter()
        .map(|p| {
            (
                p["line"].as_u64().unwrap_or(0),
                p["key"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        lines,
        [
            (3, "sites.a.token_file"),
            (5, "sites.a.gateway_mac"),
            (9, "services.web.home_site"),
            (10, "services.web.colour"),
        ]
    );

    // The same site, right: exit 0.
    let token = dir.join("a.token");
    std::fs::write(&token, "site-a-token-0123456789abcdef\n").expect("token");
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    std::fs::write(
        &path,
        "[sites.a]\nagent = \"http://203.0.113.1:7878\"\ntoken_file = \"a.token\"\ntunnel = \"203.0.113.1\"\n",
    )
    .expect("the file");
    let out = config_check(&path, &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.ends_with(": ok\n"), "{text}");
}
