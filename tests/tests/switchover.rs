//! The switchover (issue 17): what happens between the source's stop and the VM running
//! at the destination. Real QEMU, both agents, BIND9 and `movarto-user migrate`.

use std::{
    fs, thread,
    time::{Duration, Instant},
};

use movarto_lab::{dns_server::SERVICE, lab::*, netns::wait_until};
use movarto_tests::require_root;

/// SIGCONT on drop: a failing test never leaves the destination's QEMU stopped.
struct Frozen(u32);

impl Frozen {
    fn thaw(&self) {
        // SAFETY: B's QEMU, started by the lab's agent; its PID is live while B's agent
        // holds the VM.
        unsafe { libc::kill(self.0 as i32, libc::SIGCONT) };
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        self.thaw();
    }
}

/// The process's state letter in `/proc/PID/stat` (`T`: stopped by a signal).
fn process_state(pid: u32) -> Option<char> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `pid (comm) S ...`: the command may hold spaces and parentheses.
    stat.rsplit_once(')')?.1.trim_start().chars().next()
}

/// DNS goes out at the switchover, beside the completion, not after it. To make the
/// order a fact rather than a race, the move's `--on-switch` hook (run while the source
/// is stopped, before `migrate-continue`) stops the destination's QEMU with SIGSTOP: the
/// VM cannot run at B until the test lets it. The authoritative answer must change
/// meanwhile. Before this issue the update went out only once B reported the VM
/// running, so it never changed while B's QEMU was stopped.
#[test]
fn the_dns_update_goes_out_at_the_switchover_before_the_vm_can_run_at_b() {
    require_root();
    let l = Lab::build().expect("the lab");
    let boot_id = l.boot_at_a().expect("the guest boots at A");
    let conns = Connections::open(&l).expect("the pre-move connections");

    let pid_file = l.scratch.join("destination-qemu.pid");
    let hook = format!(
        "while [ ! -s {p} ]; do sleep 0.01; done; kill -STOP \"$(cat {p})\"",
        p = pid_file.display()
    );
    let mut migrate = l
        .migrate_command(&[
            "--on-switch",
            &hook,
            "--drain-grace",
            "2s",
            "--max-drain",
            "60s",
        ])
        .expect("the migrate command");
    let mut orchestrator = l.bind.client.spawn(&mut migrate).expect("migrate");

    // B's QEMU, once B's agent has started it to listen.
    let deadline = Instant::now() + Duration::from_secs(60);
    let b_pid = loop {
        let pid = l
            .with_agents(async |_a, b| b.vm("web").await.ok().and_then(|vm| vm.pid))
            .expect("the agents");
        if let Some(pid) = pid {
            break pid;
        }
        assert!(
            Instant::now() < deadline,
            "B never started its QEMU\n{}",
            l.stall_report()
        );
        assert!(
            orchestrator.try_wait().expect("wait").is_none(),
            "migrate exited early\n{}",
            l.stall_report()
        );
        thread::sleep(Duration::from_millis(50));
    };
    let frozen = Frozen(b_pid);
    fs::write(&pid_file, b_pid.to_string()).expect("the PID file");

    wait_until(
        Duration::from_secs(120),
        "the hook to stop B's QEMU",
        || process_state(b_pid) == Some('T'),
    )
    .unwrap_or_else(|err| panic!("{err}\n{}", l.stall_report()));
    let stopped_at = Instant::now();
    wait_until(
        Duration::from_secs(20),
        "DNS to answer N while B's QEMU is stopped",
        || l.bind.dig(SERVICE, "A").is_ok_and(|a| a == [N]),
    )
    .unwrap_or_else(|err| panic!("{err}\n{}", l.stall_report()));
    assert_eq!(
        process_state(b_pid),
        Some('T'),
        "B's QEMU stayed stopped while DNS changed"
    );
    eprintln!(
        "DNS answered N {} ms after the test saw B's QEMU stopped",
        stopped_at.elapsed().as_millis()
    );
    frozen.thaw();

    // The connections carry on through the move, then close so that the drain ends.
    conns
        .stats
        .wait_for_more_traffic(IO_TIMEOUT, "traffic after the switchover")
        .expect("traffic after the switchover");
    assert_eq!(
        l.http_get(N, "/id").expect("GET"),
        boot_id,
        "the same guest answers at N"
    );
    let failures = conns.close();
    assert!(failures.is_empty(), "connections broke: {failures:?}");

    let (status, report) = l
        .finish_migrate(&mut orchestrator, Duration::from_secs(120), || {})
        .expect("migrate finished");
    assert!(status.success(), "migrate exited {status}: {report}");
    let steps = report["steps"].as_array().expect("steps");
    let (complete, dns) = (&steps[5], &steps[6]);
    assert_eq!(complete["name"], "complete", "{report}");
    assert_eq!(dns["name"], "DNS update", "{report}");
    assert_eq!(dns["outcome"], "ok", "{report}");
    assert!(
        dns["start_ms"].as_u64() <= complete["start_ms"].as_u64()
            && dns["end_ms"].as_u64() <= complete["end_ms"].as_u64(),
        "the DNS step ran beside the completion and ended first: {steps:?}"
    );
    assert!(report["dns_switch_ms"].as_u64().is_some(), "{report}");
    assert_eq!(report["flows_cut"].as_array().map(Vec::len), Some(0));
}
