//! Moving back before the drain ended, with real QEMU, agents and BIND9 (issue 16,
//! item 4): the guest moves A→B, and while A still tunnels the first move's pre-move
//! flows, `migrate web --to a` moves it back home (its address at A is `H` itself). The connections
//! opened before the first move, one opened to `N` while the guest ran at B, and new
//! ones to `H` all survive both moves; DNS points at `H` again; the second move's
//! teardown leaves A tracking `H` and B without the service.

use std::{
    io::{BufRead as _, BufReader},
    net::{IpAddr, SocketAddr},
    process::ChildStderr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use movarto_common::config::Mode;
use movarto_guest_server::ECHO_PORT;
use movarto_lab::{
    dns_server::SERVICE,
    lab::*,
    netns::{ChildGuard, in_netns},
    workload::{self, echo_once},
};
use movarto_tests::{
    inventory::{short_migrate_command, write_lab_inventory},
    require_root,
};

/// Follows a `migrate`'s progress on stderr; `draining` is set at its drain step.
fn follow(name: &'static str, stderr: ChildStderr) -> Arc<AtomicBool> {
    let draining = Arc::new(AtomicBool::new(false));
    let flag = draining.clone();
    thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("{name}: {line}");
            if line.contains("step  9/11 drain ...") {
                flag.store(true, Ordering::Relaxed);
            }
        }
    });
    draining
}

fn wait_for_drain(l: &Lab, what: &str, draining: &AtomicBool, orchestrator: &mut ChildGuard) {
    let deadline = Instant::now() + Duration::from_secs(180);
    while !draining.load(Ordering::Relaxed) {
        assert!(
            Instant::now() < deadline && orchestrator.try_wait().expect("wait").is_none(),
            "{what} did not reach its drain; agent logs:\nA:\n{}\nB:\n{}",
            l.agent_log("a"),
            l.agent_log("b")
        );
        thread::sleep(Duration::from_millis(100));
    }
}

/// The mode of `H`'s service at A and at B (`None`: no such service).
fn modes(l: &Lab) -> (Option<Mode>, Option<Mode>) {
    let home: IpAddr = H.parse().expect("H");
    let mode = |list: movarto_user::agent::api::ServiceList| {
        list.services
            .into_iter()
            .find(|s| s.home_addr == Some(home))
            .map(|s| s.mode)
    };
    let (a, b) = l
        .with_agents(async |a, b| (a.services().await, b.services().await))
        .expect("the agents");
    (
        mode(a.expect("A's services")),
        mode(b.expect("B's services")),
    )
}

#[test]
fn a_guest_moved_home_before_the_drain_ended_keeps_every_connection() {
    require_root();
    let l = Lab::build().expect("the lab");
    let boot_id = l.boot_at_a().expect("the guest boots at A");
    let mut conns = Connections::open(&l).expect("the pre-move connections");
    let stats = conns.stats.clone();

    // A→B, with a drain long enough to move back during it.
    let mut there = l
        .migrate_command(&["--drain-grace", "300s", "--max-drain", "600s"])
        .expect("the migrate command");
    let mut first = l.bind.client.spawn(&mut there).expect("migrate");
    let draining = follow(
        "migrate a→b",
        first.child_mut().stderr.take().expect("stderr"),
    );
    wait_for_drain(&l, "the move to B", &draining, &mut first);
    stats
        .wait_for_more_traffic(IO_TIMEOUT, "traffic through A's tunnel")
        .expect("traffic through A's tunnel");
    assert_eq!(l.bind.dig(SERVICE, "A").expect("dig"), [N]);
    // A client of N, while the guest runs at B.
    let n: IpAddr = N.parse().expect("N");
    let mut at_b = in_netns(&l.client, || {
        workload::connect(SocketAddr::new(n, ECHO_PORT))
    })
    .expect("netns")
    .expect("connect N");
    assert_eq!(
        echo_once(&mut at_b, "to N at B").expect("echo"),
        "to N at B"
    );

    // B→A before A's drain ended, in the short form an operator types: web's home
    // site is A, so its address there is H.
    let config = write_lab_inventory(&l, "").expect("the inventory");
    let mut back = short_migrate_command(
        &l,
        "a",
        &config,
        &["--drain-grace", "2s", "--max-drain", "120s"],
    )
    .expect("the migrate command");
    let mut second = l.bind.client.spawn(&mut back).expect("migrate");
    let draining_home = follow(
        "migrate b→a",
        second.child_mut().stderr.take().expect("stderr"),
    );
    wait_for_drain(&l, "the move home", &draining_home, &mut second);

    // Every kind of connection, after both moves.
    stats
        .wait_for_more_traffic(IO_TIMEOUT, "pre-move traffic at A again")
        .expect("pre-move traffic at A again");
    assert_eq!(
        echo_once(&mut conns.idle, "pre-move, home again").expect("echo"),
        "pre-move, home again"
    );
    assert_eq!(
        echo_once(&mut at_b, "to N, through B back to A").expect("echo"),
        "to N, through B back to A"
    );
    assert_eq!(
        l.http_get(H, "/id").expect("GET H"),
        boot_id,
        "a new connection to H"
    );
    assert_eq!(
        l.http_get(N, "/id").expect("GET N"),
        boot_id,
        "a stale-DNS client of N, through B"
    );
    assert_eq!(l.bind.dig(SERVICE, "A").expect("dig"), [H], "DNS back at H");
    assert_eq!(modes(&l), (Some(Mode::Return), Some(Mode::Forward)));
    // The first move ended when the second took its tunnel over.
    let deadline = Instant::now() + Duration::from_secs(30);
    let first_status = loop {
        if let Some(status) = first.try_wait().expect("wait") {
            break status;
        }
        assert!(Instant::now() < deadline, "the first migrate did not end");
        thread::sleep(Duration::from_millis(200));
    };
    eprintln!("the first migrate ended: {first_status}");

    let failures = conns.close();
    assert!(failures.is_empty(), "connections broke: {failures:?}");
    drop(at_b);
    let (status, report) = l
        .finish_migrate(&mut second, Duration::from_secs(180), || {})
        .expect("the move home finished");
    assert!(status.success(), "migrate exited {status}: {report}");
    assert_eq!(report["succeeded"], true);
    // Teardown: A tracks H again; B's service is gone.
    assert_eq!(modes(&l), (Some(Mode::Track), None), "B's service removed");
    assert_eq!(l.http_get(H, "/id").expect("GET H"), boot_id);
    drop(l);
}
