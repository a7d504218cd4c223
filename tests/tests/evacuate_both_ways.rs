//! Evacuation with neighbours, both ways at once (issue 16's first test): site A runs
//! three VMs; two are evacuated to B with live connections while the third stays at A
//! and serves untouched, and at the same time a VM at home at B migrates to A, so both
//! nodes are the source of some migrations and the destination of another at once.
//! Root, namespaces, real QEMU, BIND9 and agents.

use std::{
    io::{BufRead as _, BufReader},
    net::IpAddr,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use movarto_common::{config::Mode, counters::Counter};
use movarto_lab::{
    dns_server::SERVICE,
    lab::{Connections, IO_TIMEOUT, Lab, N},
    movarto_user,
    netns::{ChildGuard, in_netns, wait_until},
    workload,
};
use movarto_tests::{
    extra_vm::{AT_B, ExtraVm, Traffic, WEB2, WEB3},
    inventory::write_lab_inventory_with,
    require_root,
};
use movarto_user::{
    agent::api::{Role, Stage},
    datapath::{CounterSnapshot, Pinned},
};

/// `movarto-user ARGS --json --config CONFIG` in the ops namespace, its stderr echoed
/// under `name`.
fn spawn(l: &Lab, name: &'static str, args: &[&str], config: &std::path::Path) -> ChildGuard {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net=/run/netns/{}", l.bind.client.name()))
        .arg(movarto_user().expect("movarto-user"))
        .args(args)
        .args(["--json", "--config"])
        .arg(config)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = l.bind.client.spawn(&mut cmd).expect(name);
    let stderr = child.child_mut().stderr.take().expect("stderr");
    thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("{name}: {line}");
        }
    });
    child
}

/// The live migrations at `site`'s agent: (VM, role, stage).
fn migrations_at(l: &Lab, site: &str) -> Vec<(String, Role, Stage)> {
    let all = l
        .with_agents(async |a, b| {
            let agent = if site == "a" { a } else { b };
            agent.migrations().await
        })
        .expect("the agents")
        .expect("migrations");
    all.into_iter()
        .filter(|r| !r.stage.is_final())
        .map(|r| (r.spec.vm.clone(), r.role, r.stage))
        .collect()
}

/// The counter row of `vm`'s service at A.
fn row_at_a(l: &Lab, vm: &ExtraVm) -> CounterSnapshot {
    let pinned = Pinned::open(&l.uplink_a).expect("A's pins");
    let service = pinned
        .services
        .get(vm.home.parse().expect("addr"))
        .expect("services")
        .expect("the service");
    pinned.services.counters(service.slot).expect("row")
}

fn dns_name(vm: &ExtraVm) -> String {
    format!("{}.example.test.", vm.name)
}

fn id_at(l: &Lab, addr: &str) -> String {
    let addr: IpAddr = addr.parse().expect("addr");
    in_netns(&l.client, || workload::http_get(addr, "/id", IO_TIMEOUT))
        .expect("netns")
        .unwrap_or_else(|e| panic!("GET {addr}/id: {e:#}"))
        .trim()
        .to_owned()
}

#[test]
fn two_vms_leave_a_while_a_third_stays_and_one_from_b_arrives_at_the_same_time() {
    require_root();
    let l = Lab::build().expect("the lab");
    let web_id = l.boot_at_a().expect("web boots at A");
    WEB2.boot_at_a(&l);
    WEB3.boot_at_a(&l);
    AT_B.boot_at_home(&l);
    let ids: Vec<String> = [WEB2, WEB3, AT_B]
        .iter()
        .map(|vm| id_at(&l, vm.home))
        .collect();
    for vm in [WEB2, AT_B] {
        let name = dns_name(&vm);
        l.bind
            .nsupdate(&format!(
                "update delete {name} A\nupdate add {name} 300 A {}\nsend\n",
                vm.home
            ))
            .expect("the VM's record");
    }
    let config = write_lab_inventory_with(&l, "", &[WEB2, WEB3, AT_B]).expect("inventory");
    let web = Connections::open(&l).expect("web's connections");
    let [web2, web3, far] = [WEB2, WEB3, AT_B].map(|vm| Traffic::start(&l, vm.home));
    for (t, vm) in [(&web2, WEB2), (&web3, WEB3), (&far, AT_B)] {
        wait_until(IO_TIMEOUT, &format!("{}'s traffic", vm.name), || {
            t.bytes() > 100_000
        })
        .expect("traffic flows");
    }
    let web3_before = row_at_a(&l, &WEB3);

    // Both ways at once: web and web2 leave A, far leaves B for A.
    let drain = ["--drain-grace", "1s", "--max-drain", "60s"];
    let mut evacuation = spawn(
        &l,
        "evacuate",
        &[
            &["evacuate", "--from", "a", "--destination", "b"][..],
            &["--vm", "web", "--vm", WEB2.name, "--bandwidth", "256"],
            &drain,
        ]
        .concat(),
        &config,
    );
    let mut arrival = spawn(
        &l,
        "migrate far",
        &[&["migrate", AT_B.name, "--to", "a"][..], &drain].concat(),
        &config,
    );

    // Every move reaches its drain, and then each node is a source and a destination.
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        let (at_a, at_b) = (migrations_at(&l, "a"), migrations_at(&l, "b"));
        let draining = |list: &[(String, Role, Stage)], vm: &str, role: Role| {
            list.iter().any(|(v, r, s)| {
                v == vm && *r == role && matches!(s, Stage::Draining | Stage::Running)
            })
        };
        // Each source drains, and each destination runs its VM: a node is both at once.
        let both_ways = draining(&at_a, "web", Role::Source)
            && draining(&at_a, WEB2.name, Role::Source)
            && draining(&at_a, AT_B.name, Role::Destination)
            && draining(&at_b, AT_B.name, Role::Source)
            && draining(&at_b, "web", Role::Destination)
            && draining(&at_b, WEB2.name, Role::Destination);
        if both_ways {
            eprintln!("both ways at once: A {at_a:?}, B {at_b:?}");
            break;
        }
        assert!(
            Instant::now() < deadline
                && evacuation.try_wait().expect("wait").is_none()
                && arrival.try_wait().expect("wait").is_none(),
            "not every move reached its drain: A {at_a:?}, B {at_b:?}; logs:\nA:\n{}\nB:\n{}",
            l.agent_log("a"),
            l.agent_log("b")
        );
        thread::sleep(Duration::from_millis(100));
    }

    // Through the tunnels, every byte checked; then the moved VMs' connections close.
    web.stats
        .wait_for_more_traffic(IO_TIMEOUT, "web's traffic through the tunnel")
        .expect("web's traffic through the tunnel");
    for (t, vm) in [(&web2, WEB2), (&far, AT_B), (&web3, WEB3)] {
        let before = t.bytes();
        wait_until(IO_TIMEOUT, &format!("{}'s traffic now", vm.name), || {
            t.bytes() > before + 50_000
        })
        .expect("traffic during the drains");
    }
    let failures = web.close();
    assert!(failures.is_empty(), "web's connections: {failures:?}");
    assert_eq!(web2.stop(), None, "web2's connections");
    assert_eq!(far.stop(), None, "far's connections");

    let (status, report) = l
        .finish_migrate(&mut evacuation, Duration::from_secs(300), || {})
        .expect("evacuate finishes");
    assert!(status.success(), "evacuate failed: {report:#}");
    assert_eq!(report["moved"], 2, "{report:#}");
    assert_eq!(report["connections_cut"], 0, "{report:#}");
    assert_eq!(report["dns_switches"], 2, "{report:#}");
    eprintln!(
        "{}",
        serde_json::to_string_pretty(&report).unwrap_or_default()
    );
    let (status, report) = l
        .finish_migrate(&mut arrival, Duration::from_secs(300), || {})
        .expect("far's migrate finishes");
    assert!(status.success(), "far's migrate failed: {report:#}");
    assert_eq!(report["succeeded"], true, "{report:#}");
    assert_eq!(
        report["flows_cut"].as_array().map(Vec::len),
        Some(0),
        "{report:#}"
    );

    // Each at its new place, the same guest; each name switched.
    assert_eq!(
        l.http_get(N, "/id").expect("web at N").trim(),
        web_id.trim()
    );
    assert_eq!(id_at(&l, WEB2.new_addr), ids[0]);
    assert_eq!(id_at(&l, AT_B.new_addr), ids[2]);
    assert_eq!(l.bind.dig(SERVICE, "A").expect("dig"), vec![N.to_owned()]);
    for vm in [WEB2, AT_B] {
        assert_eq!(
            l.bind.dig(&dns_name(&vm), "A").expect("dig"),
            vec![vm.new_addr.to_owned()],
            "{}",
            vm.name
        );
    }

    // The neighbour served throughout, every byte checked, and its service saw only
    // passes: no tunnel, NAT, ICMP or drop verdict.
    let before = web3.bytes();
    wait_until(IO_TIMEOUT, "web3's traffic after the moves", || {
        web3.bytes() > before + 50_000
    })
    .expect("web3's traffic after the moves");
    assert_eq!(web3.stop(), None, "web3's connections");
    assert_eq!(id_at(&l, WEB3.home), ids[1]);
    let row = row_at_a(&l, &WEB3);
    for counter in Counter::ALL {
        let not_its = counter.is_drop()
            || matches!(
                counter,
                Counter::TunnelOut
                    | Counter::TunnelIn
                    | Counter::NatIn
                    | Counter::NatOut
                    | Counter::IcmpTooBig
                    | Counter::IcmpTimeExceeded
            );
        if not_its {
            assert_eq!(
                row.get(counter),
                web3_before.get(counter),
                "{}: {:?}",
                counter.name(),
                row.nonzero()
            );
        }
    }
    assert!(
        row.get(Counter::PassIpv4) > web3_before.get(Counter::PassIpv4),
        "{:?}",
        row.nonzero()
    );
    // A: web3 still tracked, far arrived (nat); B: web and web2 in nat, far gone.
    let modes = |uplink: &str| -> Vec<(IpAddr, Option<Mode>)> {
        let pinned = Pinned::open(uplink).expect("pins");
        let mut all: Vec<_> = pinned
            .services
            .list()
            .expect("services")
            .iter()
            .map(|s| {
                (
                    movarto_common::net::addr::from_map(s.home_addr, s.service_family)
                        .expect("addr"),
                    s.mode(),
                )
            })
            .collect();
        all.sort_by_key(|(home, _)| *home);
        all
    };
    let ip = |s: &str| s.parse::<IpAddr>().expect("addr");
    assert_eq!(
        modes(&l.uplink_a),
        vec![
            (ip(WEB3.home), Some(Mode::Track)),
            (ip(AT_B.home), Some(Mode::Nat))
        ]
    );
    assert_eq!(
        modes(&l.uplink_b),
        vec![
            (ip("192.0.2.10"), Some(Mode::Nat)),
            (ip(WEB2.home), Some(Mode::Nat))
        ]
    );
}
