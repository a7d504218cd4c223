//! Post-copy that recovers by itself: the link between the sites is cut for 3 s while the
//! migration is `postcopy-active`, then mended. The agents resume the stream on a new
//! connection (`migrate-recover` at B, `migrate` with `resume` at A), the migration
//! completes at B and every connection is kept. Real QEMU, agents, BIND9 and TCP.

use std::{
    sync::atomic::Ordering,
    thread,
    time::{Duration, Instant},
};

use movarto_lab::{lab::*, netns::wait_until, workload::echo_once};
use movarto_tests::{migration::wait_for_source_migration, require_root};
use movarto_user::agent::api::Stage;

#[test]
fn a_wan_cut_in_postcopy_is_resumed_and_every_connection_is_kept() {
    require_root();
    let mut l = Lab::build().expect("the lab");
    cut_in_postcopy(&mut l, |_| {});
}

/// The source's agent crashes in the cut and comes back before it ends: QEMU keeps
/// the source paused meanwhile, and the restarted agent follows QEMU's migration where
/// it is and resumes it. (A destination's agent restarted then may find its QEMU deaf:
/// a new QMP session must negotiate in the main thread, which may wait on a page;
/// docs/failures.md.)
#[test]
fn a_source_agent_that_crashes_while_postcopy_is_cut_resumes_it_when_back() {
    require_root();
    let mut l = Lab::build().expect("the lab");
    cut_in_postcopy(&mut l, |l| {
        l.crash_agent("a");
        l.start_agent("a").expect("A's agent restarts");
    });
}

/// The migration under load, the link to B cut for 3 s once post-copy runs (`in_cut`
/// runs right after the link went down), then the checks: completed at B, every
/// connection kept, the pause in the report.
fn cut_in_postcopy(l: &mut Lab, in_cut: impl FnOnce(&mut Lab)) {
    let boot_id = l.boot_at_a().expect("the guest boots at A");
    let conns = Connections::open(l).expect("the pre-move connections");
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
    wait_for_source_migration(l, &mut orchestrator, "post-copy", |m| {
        m.progress.is_some_and(|p| p.status == "postcopy-active")
    });
    // Cut once the source's agent knows the VM runs at B. Before that B loads the device
    // state, a break there is fatal to B's QEMU, and the source leaves the stall to TCP.
    wait_until(Duration::from_secs(60), "A to see the VM run at B", || {
        l.with_agents(async |a, _| a.migrations().await.ok())
            .expect("the agents")
            .and_then(|records| records.into_iter().next())
            .is_some_and(|r| r.figures.destination_status.as_deref() == Some("running"))
    })
    .expect("the VM runs at B in post-copy");
    let cut = Instant::now();
    l.set_site_b_link(false).expect("the cut");
    in_cut(l);
    thread::sleep(Duration::from_secs(3).saturating_sub(cut.elapsed()));
    l.set_site_b_link(true).expect("the link mended");

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
        .unwrap_or_else(|err| {
            panic!(
                "{err:#}\n{}\nA:\n{}\nB:\n{}",
                l.stall_report(),
                l.agent_log("a"),
                l.agent_log("b")
            )
        });
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
