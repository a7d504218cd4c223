//! The soak: one VM moved A→B→A… 20 times in move address mode (the home address itself
//! is re-routed each way), with a byte-checked stream and an interactive connection open
//! throughout. None may break, the agents' open file descriptors stay flat across the
//! moves, no pin is left after any move (move address mode detaches both sites), and
//! memory (printed beside them) may not double.
//! `cargo xtask test --full` runs it (about 3 minutes).

use std::{
    fs,
    sync::atomic::Ordering,
    thread,
    time::{Duration, Instant},
};

use movarto_lab::{lab::*, netns::wait_until};
use movarto_tests::require_root;

const MOVES: usize = 20;

/// An agent's open file descriptors and resident memory (KiB).
fn usage(pid: u32) -> (usize, u64) {
    let fds = fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count());
    let rss = fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0);
    (fds, rss)
}

/// Everything pinned under movarto's bpffs directory.
fn pins() -> usize {
    fn count(dir: &std::path::Path) -> usize {
        fs::read_dir(dir)
            .into_iter()
            .flatten()
            .flatten()
            .fold(0, |n, e| {
                let path = e.path();
                n + 1 + if path.is_dir() { count(&path) } else { 0 }
            })
    }
    count(std::path::Path::new("/sys/fs/bpf/movarto"))
}

#[test]
#[ignore = "the soak takes minutes: `cargo xtask test --full` runs it"]
fn twenty_moves_back_and_forth_lose_nothing_and_leak_nothing() {
    require_root();
    let l = Lab::build().expect("the lab");
    let boot_id = l.boot_at_a().expect("the guest boots at A");
    let conns = Connections::open(&l).expect("the connections");
    let stats = conns.stats.clone();
    let (a_pid, b_pid) = (
        l.agent_pid("a").expect("A's agent"),
        l.agent_pid("b").expect("B's agent"),
    );
    let mut figures = Vec::new();
    let started = Instant::now();
    for n in 0..MOVES {
        let (from, to) = if n % 2 == 0 { ("a", TB) } else { ("b", TA) };
        let hook = l.reroute_hook(to);
        let mut migrate = l
            .migrate_command_from(
                from,
                &[
                    "--address-mode",
                    "move",
                    "--on-switch",
                    &hook,
                    "--drain-grace",
                    "1s",
                    "--max-drain",
                    "60s",
                ],
            )
            .expect("the migrate command");
        let mut orchestrator = l.bind.client.spawn(&mut migrate).expect("migrate");
        let (status, report) = l
            .finish_migrate(&mut orchestrator, Duration::from_secs(120), || {})
            .expect("migrate finished");
        assert!(status.success(), "move {n} from {from}: {report}");
        let (streamed, exchanged) = (
            stats.streamed.load(Ordering::Relaxed),
            stats.exchanges.load(Ordering::Relaxed),
        );
        wait_until(IO_TIMEOUT, "traffic after the move", || {
            stats.streamed.load(Ordering::Relaxed) > streamed + 50_000
                && stats.exchanges.load(Ordering::Relaxed) > exchanged + 5
        })
        .unwrap_or_else(|err| panic!("move {n}: {err:#}; broke: {:?}", stats.failures()));
        assert_eq!(l.http_get(H, "/id").expect("GET"), boot_id, "move {n}");
        let (a, b) = (usage(a_pid), usage(b_pid));
        let row = (
            n + 1,
            a.0,
            a.1,
            b.0,
            b.1,
            pins(),
            report["qemu"]["downtime_ms"].clone(),
        );
        eprintln!(
            "move {:>2}: agent A {} fds {} KiB, agent B {} fds {} KiB, {} pins, downtime {} ms",
            row.0, row.1, row.2, row.3, row.4, row.5, row.6
        );
        figures.push(row);
        thread::sleep(Duration::from_millis(200));
    }
    let failures = conns.close();
    assert!(failures.is_empty(), "connections broke: {failures:?}");
    eprintln!(
        "{MOVES} moves in {:.0} s; {} bytes streamed, {} exchanges, worst stall {} ms",
        started.elapsed().as_secs_f64(),
        stats.streamed.load(Ordering::Relaxed),
        stats.exchanges.load(Ordering::Relaxed),
        stats.worst_stall_ms.load(Ordering::Relaxed)
    );
    // Flat after the first round trip (the first moves warm caches and pools).
    let settled = &figures[1];
    for row in &figures[2..] {
        assert!(
            row.1 <= settled.1 + 2 && row.3 <= settled.3 + 2,
            "agents' fds grow: {figures:?}"
        );
        assert!(
            row.2 < settled.2 * 2 && row.4 < settled.4 * 2,
            "memory: {figures:?}"
        );
    }
    // Move address mode leaves no datapath at either site once a move is over.
    assert!(
        figures.iter().all(|row| row.5 == 0),
        "pins left: {figures:?}"
    );
}
