//! The switchover (issue 17): what happens between the source's stop and the VM running
//! at the destination. Real QEMU, both agents, BIND9 and `movarto-user migrate`.

use std::{
    collections::BTreeSet,
    fs,
    net::{SocketAddr, UdpSocket},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use movarto_guest_server::ECHO_PORT;
use movarto_lab::{
    dns_server::SERVICE,
    lab::*,
    netns::{ChildGuard, Netns, in_netns, wait_until},
};
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

/// `movarto-user migrate` A→B with `hook` run at switchover, the source stopped.
fn migrate_with_hook(l: &Lab, hook: &str, max_drain: &str) -> ChildGuard {
    let mut migrate = l
        .migrate_command(&[
            "--on-switch",
            hook,
            "--drain-grace",
            "2s",
            "--max-drain",
            max_drain,
        ])
        .expect("the migrate command");
    l.bind.client.spawn(&mut migrate).expect("migrate")
}

/// `migrate` A→B whose `--on-switch` hook stops B's QEMU (SIGSTOP), the source stopped
/// too: returns once the hook did and DNS answers `N`, with the orchestrator, B's QEMU
/// (SIGCONT on drop) and when the test saw it stopped.
fn move_with_destination_stopped(l: &Lab) -> (ChildGuard, Frozen, Instant) {
    let pid_file = l.scratch.join("destination-qemu.pid");
    let hook = format!(
        "while [ ! -s {p} ]; do sleep 0.01; done; kill -STOP \"$(cat {p})\"",
        p = pid_file.display()
    );
    let mut orchestrator = migrate_with_hook(l, &hook, "60s");

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
    (orchestrator, frozen, stopped_at)
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

    let (mut orchestrator, frozen, stopped_at) = move_with_destination_stopped(&l);
    let b_pid = frozen.0;
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
    // Both start at once (the second a log line later, which may cross a millisecond).
    assert!(
        dns["start_ms"].as_u64() < complete["end_ms"].as_u64()
            && dns["end_ms"].as_u64() <= complete["end_ms"].as_u64(),
        "the DNS step ran beside the completion and ended first: {steps:?}"
    );
    assert!(report["dns_switch_ms"].as_u64().is_some(), "{report}");
    assert_eq!(report["flows_cut"].as_array().map(Vec::len), Some(0));
}

/// The destination's QEMU dies after the switchover, with DNS already naming `N`: the
/// source's QEMU fails the migration and runs the VM again, the agents roll back, and
/// DNS comes back to `H` (owed in the record, so a later `--resume` finds it done). The
/// hook stops B's QEMU (SIGSTOP) so that the kill falls after the DNS switch for certain.
#[test]
fn a_rollback_after_the_dns_switch_switches_dns_back_once() {
    require_root();
    let l = Lab::build().expect("the lab");
    let boot_id = l.boot_at_a().expect("the guest boots at A");
    let chat = Chat::start(&l).expect("the connection");

    let (mut orchestrator, frozen, _) = move_with_destination_stopped(&l);
    let b_pid = frozen.0;
    // SAFETY: B's QEMU, started by the lab's agent, stopped by the hook: it never ran the
    // VM, so A's copy is the only one.
    assert_eq!(unsafe { libc::kill(b_pid as i32, libc::SIGKILL) }, 0);
    drop(frozen);

    let (status, report) = l
        .finish_migrate(&mut orchestrator, Duration::from_secs(120), || {})
        .expect("migrate finished");
    assert!(!status.success(), "migrate must fail: {report}");
    let rolled_back = report["rolled_back"].as_str().unwrap_or_default();
    assert!(
        rolled_back.contains("DNS switched back"),
        "the rollback switched DNS back: {report}"
    );
    // DNS names H with its TTL, the VM runs at A with its connection, B is empty.
    movarto_tests::migration::assert_rolled_back_to_a(&l, &report, &boot_id, chat);
    let record = l
        .with_agents(async |a, _| a.migrations().await.expect("A's records"))
        .expect("the agents")
        .into_iter()
        .next()
        .expect("A's record");
    assert!(
        !record.dns_owed.switch_back && !record.dns_owed.switch,
        "nothing owed: {:?}",
        record.dns_owed
    );

    // A second orchestrator, after the first: nothing is left to undo.
    let id = record.id().as_str().to_owned();
    let mut resume = l.resume_command(&id).expect("resume");
    let mut follower = l.bind.client.spawn(&mut resume).expect("resume");
    let (_, again) = l
        .finish_migrate(&mut follower, Duration::from_secs(60), || {})
        .expect("resume finished");
    let again_text = again.to_string();
    assert!(
        !again_text.contains("NOT switched back") && !again_text.contains("NOT undone"),
        "the resume redid nothing: {again}"
    );
    assert_eq!(l.bind.dig(SERVICE, "A").expect("dig"), [H]);
}

/// Datagrams to the guest's UDP echo at a steady rate, each numbered; the echoes say
/// which arrived (a lost echo counts as lost too: the test is stricter than the report).
struct UdpLoad {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    echoed: Arc<Mutex<BTreeSet<u64>>>,
    threads: Vec<JoinHandle<()>>,
}

/// One datagram every `UDP_INTERVAL`: about ten in a blackout of 20 ms.
const UDP_INTERVAL: Duration = Duration::from_millis(2);

impl UdpLoad {
    fn start(client: &Netns) -> Self {
        let to: SocketAddr = format!("{H}:{ECHO_PORT}").parse().expect("H");
        let socket = in_netns(client, || UdpSocket::bind("0.0.0.0:0"))
            .expect("the client's namespace")
            .expect("a UDP socket");
        socket.connect(to).expect("connect");
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .expect("timeout");
        let (stop, sent) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicU64::new(0)),
        );
        let echoed = Arc::new(Mutex::new(BTreeSet::new()));
        let sender = {
            let (socket, stop, sent) = (
                socket.try_clone().expect("clone"),
                stop.clone(),
                sent.clone(),
            );
            thread::spawn(move || {
                let mut next = Instant::now();
                while !stop.load(Ordering::Relaxed) {
                    let seq = sent.load(Ordering::Relaxed);
                    if socket.send(&seq.to_be_bytes()).is_ok() {
                        sent.store(seq + 1, Ordering::Relaxed);
                    }
                    next += UDP_INTERVAL;
                    thread::sleep(next.saturating_duration_since(Instant::now()));
                }
            })
        };
        let receiver = {
            let (stop, echoed) = (stop.clone(), echoed.clone());
            thread::spawn(move || {
                let mut buf = [0u8; 64];
                // Until the sender stopped and no echo came for a while.
                let mut quiet_since = None::<Instant>;
                loop {
                    if let Ok(8) = socket.recv(&mut buf) {
                        let seq = u64::from_be_bytes(buf[..8].try_into().expect("8 bytes"));
                        echoed.lock().expect("echoed").insert(seq);
                        quiet_since = None;
                    }
                    if stop.load(Ordering::Relaxed) {
                        let since = *quiet_since.get_or_insert_with(Instant::now);
                        if since.elapsed() > Duration::from_secs(2) {
                            return;
                        }
                    }
                }
            })
        };
        Self {
            stop,
            sent,
            echoed,
            threads: vec![sender, receiver],
        }
    }

    /// Stops sending, waits for the last echoes; returns the numbers that got none.
    fn stop(self) -> (u64, Vec<u64>) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads {
            thread.join().expect("a load thread");
        }
        let sent = self.sent.load(Ordering::Relaxed);
        let echoed = self.echoed.lock().expect("echoed");
        let missing = (0..sent).filter(|seq| !echoed.contains(seq)).collect();
        (sent, missing)
    }
}

/// Receives datagrams on `at` inside `ns` into `got` until `stop`.
fn collect_datagrams(
    ns: &Netns,
    at: SocketAddr,
    got: Arc<Mutex<BTreeSet<String>>>,
    stop: Arc<AtomicBool>,
) -> JoinHandle<()> {
    let socket = in_netns(ns, || UdpSocket::bind(at))
        .expect("the namespace")
        .expect("a UDP socket");
    socket
        .set_read_timeout(Some(Duration::from_millis(50)))
        .expect("timeout");
    thread::spawn(move || {
        let mut buf = [0u8; 256];
        while !stop.load(Ordering::Relaxed) {
            if let Ok((len, _)) = socket.recv_from(&mut buf) {
                let text = String::from_utf8_lossy(&buf[..len]).into_owned();
                got.lock().expect("got").insert(text);
            }
        }
    })
}

/// The client's address at the lab's client.
const CLIENT: &str = "198.51.100.7";

/// A UDP socket bound to `at`, an address of another host (IP_TRANSPARENT).
fn transparent_socket(at: SocketAddr) -> std::io::Result<UdpSocket> {
    use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
    // SAFETY: socket(2) returns a new descriptor or -1.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a descriptor just returned, owned by nothing else.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let on: libc::c_int = 1;
    // SAFETY: a socket descriptor and an int option of the size given.
    let set = unsafe {
        libc::setsockopt(
            owned.as_raw_fd(),
            libc::SOL_IP,
            libc::IP_TRANSPARENT,
            (&raw const on).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if set != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let socket = UdpSocket::from(owned);
    let addr = bind_to(&socket, at);
    addr.map(|()| socket)
}

/// bind(2) to `at` (std's `UdpSocket::bind` makes a new socket).
fn bind_to(socket: &UdpSocket, at: SocketAddr) -> std::io::Result<()> {
    use std::os::fd::AsRawFd as _;
    let SocketAddr::V4(v4) = at else {
        return Err(std::io::Error::other("IPv4 only"));
    };
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: v4.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*v4.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: a socket descriptor and a sockaddr_in of the size given.
    let bound = unsafe {
        libc::bind(
            socket.as_raw_fd(),
            (&raw const sin).cast(),
            size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if bound != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The blackout's packets, counted. A nat-mode move under a steady UDP load, in which
/// packets reach A's tap after the VM stopped there for certain: the `--on-switch` hook
/// (run while the source is stopped, after the flip) waits while the test sends
/// datagrams to `H` from inside A's namespace, which go straight into A's tap.
///
/// QEMU's tap backend reads one frame after the stop and holds it for the stopped device
/// (it dies with A's QEMU): the decoy the source's agent puts first in the queue at the
/// stop, or a datagram that came before it. A held datagram goes on to B from the
/// recording of A's tap; the rest wait in the tap's queue, where QEMU no longer reads,
/// and the agent carries them on too. At B the VM echoes each to the client. Nothing is
/// lost: the report's "lost at switchover" is 0, and so is the client's own count of
/// datagrams without an echo.
///
/// The only traffic to `H` is the test's own, so that the client's count can be
/// complete: a TCP segment QEMU held would be retransmitted, unseen by the test. The
/// TCP connections across a move are the migration tests' subject.
#[test]
fn a_nat_move_under_load_loses_nothing() {
    require_root();
    let l = Lab::build().expect("the lab");
    let boot_id = l.boot_at_a().expect("the guest boots at A");
    let load = UdpLoad::start(&l.client);
    // A's kernel sends the test's datagrams to the VM without asking for its MAC again.
    l.a.run(
        "ip",
        &[
            "neigh",
            "replace",
            H,
            "lladdr",
            GUEST_MAC,
            "dev",
            "tap0",
            "nud",
            "permanent",
        ],
    )
    .expect("a permanent neighbour entry for H at A");

    let (ready, sent_file) = (l.scratch.join("stopped"), l.scratch.join("sent"));
    let hook = format!(
        "touch {ready}; while [ ! -e {sent} ]; do sleep 0.01; done",
        ready = ready.display(),
        sent = sent_file.display()
    );
    let mut orchestrator = migrate_with_hook(&l, &hook, "15s");

    // The stranded datagrams are sent from inside A's namespace in the client's name
    // (IP_TRANSPARENT), so that the VM's echoes take the client's way back: from B
    // through the tunnel and out of A, to a socket at the client.
    let client_port: SocketAddr = format!("{CLIENT}:40007").parse().expect("the client");
    let stranding = in_netns(&l.a, || transparent_socket(client_port))
        .expect("A's namespace")
        .expect("a UDP socket at A in the client's name");
    let echoes = Arc::new(Mutex::new(BTreeSet::new()));
    let done = Arc::new(AtomicBool::new(false));
    let listener = collect_datagrams(&l.client, client_port, echoes.clone(), done.clone());

    wait_until(
        Duration::from_secs(120),
        "the source to stop at switchover",
        || ready.exists(),
    )
    .unwrap_or_else(|err| panic!("{err}\n{}", l.stall_report()));
    const STRANDED: usize = 8;
    let to_h: SocketAddr = format!("{H}:{ECHO_PORT}").parse().expect("H");
    let wanted: BTreeSet<String> = (0..STRANDED).map(|i| format!("stranded-{i}")).collect();
    for text in &wanted {
        stranding
            .send_to(text.as_bytes(), to_h)
            .expect("a datagram into A's tap");
    }
    fs::write(&sent_file, b"").expect("the hook's go");
    let echoed = wait_until(IO_TIMEOUT, "the stranded datagrams' echoes", || {
        echoes.lock().expect("echoes").len() >= wanted.len()
    });
    thread::sleep(Duration::from_secs(1));
    done.store(true, Ordering::Relaxed);
    listener.join().expect("the client's listener");
    let echoes = echoes.lock().expect("echoes").clone();

    let (sent, missing) = load.stop();
    assert!(sent > 100, "the load ran ({sent} datagrams)");

    let (status, report) = l
        .finish_migrate(&mut orchestrator, Duration::from_secs(120), || {})
        .expect("migrate finished");
    assert!(status.success(), "migrate exited {status}: {report}");
    assert_eq!(
        l.http_get(N, "/id").expect("GET"),
        boot_id,
        "the same guest answers at N"
    );
    echoed.unwrap_or_else(|err| {
        panic!(
            "{err}: the VM echoed {echoes:?}; report: {report}\n{}",
            l.stall_report()
        )
    });
    let stranded = &report["stranded_at_source"];
    assert_eq!(stranded["decoy_sent"], true, "{report}");
    let held = stranded["held_by_qemu"].as_u64().expect("held_by_qemu");
    assert!(
        (held == 1) != (stranded["held_decoy"] == true),
        "frames came after the stop, so QEMU holds one, the decoy or a datagram: {report}"
    );
    assert!(
        stranded["forwarded"].as_u64() >= Some(STRANDED as u64 - held),
        "the source carried the stranded datagrams on: {report}"
    );
    assert!(
        (held == 0) || stranded["held_carried"] == true,
        "QEMU's held datagram went on from the recording: {report}"
    );
    assert_eq!(
        report["lost_at_switchover"].as_u64(),
        Some(0),
        "nothing lost at switchover: {report}"
    );
    let client_lost = (missing.len() + wanted.difference(&echoes).count()) as u64;
    assert_eq!(
        client_lost,
        0,
        "the client's own count agrees with the report: load {missing:?} of {sent}, stranded \
         {:?}; report: {report}",
        wanted.difference(&echoes).collect::<Vec<_>>()
    );
    eprintln!(
        "UDP load: {sent} datagrams, {} lost; stranded at A: {stranded}; dropped at B's tap: {}",
        missing.len(),
        report["dropped_at_destination_tap"]
    );
}
