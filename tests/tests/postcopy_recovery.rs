//! Post-copy that recovers by itself: the link between the sites is cut for 3 s while the
//! migration is `postcopy-active`, then mended. The agents resume the stream on a new
//! connection (`migrate-recover` at B, `migrate` with `resume` at A), the migration
//! completes at B and every connection is kept. Real QEMU, agents, BIND9 and TCP.

use std::{sync::atomic::Ordering, time::Duration};

use movarto_lab::{lab::*, netns::wait_until, workload::echo_once};
use movarto_tests::{migration::wait_for_source_migration, require_root};
use movarto_user::agent::api::Stage;

#[test]
fn a_wan_cut_in_postcopy_is_resumed_and_every_connection_is_kept() {
    require_root();
    let l = Lab::build().expect("the lab");
    let boot_id = l.boot_at_a().expect("the guest boots at A");
    let conns = Connections::open(&l).expect("the pre-move connections");
    let stats = conns.stats.clone();
    // The guest rewrites 128 MiB without pause, and post-copy is capped at 8 MiB/s: it
    // runs for about 16 s, so the cut falls inside it with pages still to move after.
    assert!(
        l.http_get(H, "/dirty/128").expect("GET").contains("dirty"),
        "dirtying started"
    );
    let mut migrate = l
        .migrate_command(&[
            "--postcopy",
            "after-first-pass",
            "--max-postcopy-bandwidth",
            "8",
            "--drain-grace",
            "1s",
            "--max-drain",
            "120s",
        ])
        .expect("the migrate command");
    let mut orchestrator = l.bind.client.spawn(&mut migrate).expect("migrate");
    wait_for_source_migration(&l, &mut orchestrator, "post-copy", |m| {
        m.progress.is_some_and(|p| p.status == "postcopy-active")
    });
    l.cut_site_b(Duration::from_secs(3)).expect("the cut");

    // QEMU completes at the source once post-copy has moved every page: A's record goes
    // on to `running` (B runs the VM) and the drain.
    let mut record = None;
    wait_until(
        Duration::from_secs(120),
        "the migration's completion",
        || {
            record = l
                .with_agents(async |a, _| a.migrations().await.ok())
                .expect("the agents")
                .and_then(|records| records.into_iter().next());
            record.as_ref().is_some_and(|r| {
                r.stage.is_final() || matches!(r.stage, Stage::Running | Stage::Draining)
            })
        },
    )
    .unwrap_or_else(|err| {
        panic!(
            "{err:#}\nA:\n{}\nB:\n{}",
            l.agent_log("a"),
            l.agent_log("b")
        )
    });
    let record = record.expect("A's record");
    assert!(
        matches!(record.stage, Stage::Running | Stage::Draining),
        "{}: {:?}\nA:\n{}\nB:\n{}",
        record.stage,
        record.error,
        l.agent_log("a"),
        l.agent_log("b")
    );
    stats
        .wait_for_more_traffic(IO_TIMEOUT, "traffic after the cut")
        .expect("traffic after the cut");
    let mut idle = conns.idle.try_clone().expect("the idle connection");
    assert_eq!(
        echo_once(&mut idle, "hello after").expect("echo"),
        "hello after"
    );
    assert_eq!(
        l.http_get(N, "/id").expect("GET"),
        boot_id,
        "the same guest answers at N"
    );
    let worst_stall = stats.worst_stall_ms.load(Ordering::Relaxed);
    let failures = conns.close();

    let (status, report) = l
        .finish_migrate(&mut orchestrator, Duration::from_secs(120), || {})
        .expect("migrate finished");
    assert!(status.success(), "migrate exited {status}: {report}");
    assert!(failures.is_empty(), "connections broke: {failures:?}");
    let qemu = &report["qemu"];
    assert!(qemu["postcopy_started_ms"].as_u64().is_some(), "{qemu}");
    let recoveries = qemu["postcopy_recoveries"].as_u64().unwrap_or_default();
    let paused_ms = qemu["postcopy_paused_ms"].as_u64().unwrap_or_default();
    assert!(recoveries >= 1, "post-copy was resumed: {qemu}");
    assert!(paused_ms > 0, "the report shows the pause: {qemu}");
    assert_eq!(
        report["flows_cut"].as_array().map(Vec::len),
        Some(0),
        "{report}"
    );
    println!(
        "post-copy cut for 3 s: {recoveries} recovery(ies), paused {paused_ms} ms in all; \
         worst stall of a connection {worst_stall} ms"
    );
}
