//! The short variant of `cargo xtask demo`: the whole lab (client, wan with delay and rate,
//! BIND9, two sites with their agents, real QEMU), the full workload, `movarto-user migrate`,
//! the report, and the cleanup.

use std::{process::Command, time::Instant};

use movarto_lab::{
    demo::{self, Options},
    lab::N,
};
use movarto_tests::require_root;

#[test]
fn short_demo_keeps_every_connection_and_cleans_up() {
    require_root();

    // A namespace of the name this run would use is already there: a clear refusal, and
    // nothing of someone else's touched.
    let clash = format!("mvt-clash-{}-0", std::process::id());
    let made = Command::new("ip")
        .args(["netns", "add", &clash])
        .status()
        .expect("ip netns add");
    assert!(made.success());
    let refused = demo::run(&Options::short());
    let still_there = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    let _ = Command::new("ip").args(["netns", "del", &clash]).status();
    let err = format!("{:#}", refused.expect_err("the demo ran over a taken name"));
    assert!(
        err.contains(&clash) && err.contains("already exist"),
        "unclear message: {err}"
    );
    assert!(String::from_utf8_lossy(&still_there.stdout).contains(&clash));

    let started = Instant::now();
    let report = demo::run(&Options::short()).expect("the demo");
    eprintln!("{}", report.render());
    let json = serde_json::to_value(&report).expect("JSON");

    // The top-level figures are there.
    for key in [
        "connections_total",
        "connections_lost",
        "worst_stall_ms",
        "qemu_downtime_ms",
        "vm_paused_ms",
        "dns_switch_ms",
        "teardown_s",
    ] {
        assert!(
            json.get(key).is_some_and(|v| !v.is_null()),
            "{key} missing: {json}"
        );
    }
    assert!(report.migration_succeeded, "migrate failed");

    // Zero connections lost, and every long-lived one carried data after the switchover.
    assert_eq!(report.connections_lost, 0, "{:#?}", report.connections);
    for c in &report.connections {
        assert!(c.kept, "{} lost: {:?}", c.name, c.error);
        if c.kind != "idle" {
            assert!(
                c.bytes_after_switchover > 0,
                "{} moved nothing after the switchover",
                c.name
            );
        }
    }
    let kinds: Vec<&str> = report.connections.iter().map(|c| c.kind.as_str()).collect();
    for kind in ["stream", "upload", "interactive", "idle", "curl"] {
        assert!(kinds.contains(&kind), "no {kind} connection: {kinds:?}");
    }

    // The curl download arrived whole.
    let curl = report.curl.as_ref().expect("curl finished");
    assert!(curl.matches, "{curl:?}");
    assert_eq!(curl.bytes, curl.expected_bytes);

    // New connections: some landed at A before the move; all after the DNS switch at B.
    let n = &report.newcomers;
    assert_eq!(n.failed, 0, "{:#?}", n.list);
    assert!(n.at_a > 0, "no newcomer before the move: {n:?}");
    assert!(n.after_dns_switch > 0, "no newcomer after the DNS switch");
    assert_eq!(n.stale_dns_via_tunnel, 1, "the stale-DNS client via A");
    assert_eq!(n.after_dns_switch_at_b, n.after_dns_switch, "{:#?}", n.list);
    assert!(
        n.list
            .last()
            .is_some_and(|l| l.resolved.is_some_and(|a| a.to_string() == N)),
        "the last newcomer did not go to N"
    );

    // Teardown happened, B is left in NAT mode.
    assert!(report.teardown_done, "no teardown");
    assert!(report.teardown_s.is_some_and(|s| s > 0.0));
    assert_eq!(report.destination_mode.as_deref(), Some("nat"));
    assert!(report.qemu_downtime_ms.is_some_and(|d| d > 0));

    // The namespaces are gone.
    assert_eq!(report.namespaces.len(), 6);
    assert!(report.namespaces_removed);
    assert!(report.pins_removed, "pins left on bpffs");
    let listed = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    let listed = String::from_utf8_lossy(&listed.stdout);
    for ns in &report.namespaces {
        assert!(!listed.contains(ns.as_str()), "{ns} is still there");
    }
    eprintln!("short demo took {:?}", started.elapsed());
}
