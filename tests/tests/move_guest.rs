//! The datapath end to end, live, in network namespaces: a "guest" (a
//! namespace with a real TCP server) moves from site A to site B while a
//! client keeps several connections open. The guest keeps its sockets, as a
//! live-migrated VM would; only its veth moves. Then A forwards through the
//! GUE tunnel, B unwraps and NATs, and every byte must arrive, in order.
//!
//! ```text
//! client 198.51.100.7 -- wan -- 203.0.113.1 (TA) site A --vm0-- guest 192.0.2.10 (H)
//!                          \\__ 203.0.113.129 (TB) site B   (vm0 moves here; N = 198.18.0.10)
//! ```

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use aya::programs::XdpMode;
use movarto_common::{
    config::Mode,
    counters::Counter,
    flow::{origin, state, timeout},
};
use movarto_lab::netns::{Netns, veth};
use movarto_tests::require_root;
use movarto_user::datapath::{
    AttachOptions, Datapath, Pinned, SiteConfig, attach, detach, flows::monotonic_ns,
};

const HOME: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const NEW: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 10);
const TA: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
const TB: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 129);
const VM_MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
const GW_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const TOKEN: u64 = 0x005e_ed0f_6d6f_7665;
const IO_TIMEOUT: Duration = Duration::from_secs(10);

fn mac(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The byte at position `i` of every checked stream.
fn pattern(i: u64) -> u8 {
    (i.wrapping_mul(7).wrapping_add(3) % 251) as u8
}

/// Detaches a site's datapath on drop (also when the test fails).
struct Attached(String);

impl Drop for Attached {
    fn drop(&mut self) {
        let _ = detach(&self.0);
    }
}

struct Lab {
    client: Netns,
    wan: Netns,
    a: Netns,
    b: Netns,
    guest: Netns,
    uplink_a: String,
    uplink_b: String,
}

fn sh(ns: &Netns, args: &[&str]) {
    ns.ip(args)
        .unwrap_or_else(|e| panic!("ip {args:?} in {}: {e:#}", ns.name()));
}

fn lab() -> Lab {
    let tag = std::process::id() % 100_000;
    let uplink_a = format!("ua{tag}");
    let uplink_b = format!("ub{tag}");
    let l = Lab {
        client: Netns::new("client").expect("netns"),
        wan: Netns::new("wan").expect("netns"),
        a: Netns::new("sitea").expect("netns"),
        b: Netns::new("siteb").expect("netns"),
        guest: Netns::new("guest").expect("netns"),
        uplink_a,
        uplink_b,
    };
    for ns in [&l.wan, &l.a, &l.b] {
        ns.run("sysctl", &["-qw", "net.ipv4.conf.all.forwarding=1"])
            .expect("sysctl");
    }
    veth(&l.client, "c0", &l.wan, "wc").expect("veth");
    veth(&l.wan, "wa", &l.a, &l.uplink_a).expect("veth");
    veth(&l.wan, "wb", &l.b, &l.uplink_b).expect("veth");
    veth(&l.guest, "eth0", &l.a, "vm0").expect("veth");
    sh(&l.client, &["addr", "add", "198.51.100.7/24", "dev", "c0"]);
    sh(
        &l.client,
        &["route", "add", "default", "via", "198.51.100.1"],
    );
    sh(&l.wan, &["addr", "add", "198.51.100.1/24", "dev", "wc"]);
    sh(&l.wan, &["addr", "add", "203.0.113.126/25", "dev", "wa"]);
    sh(&l.wan, &["addr", "add", "203.0.113.254/25", "dev", "wb"]);
    sh(
        &l.wan,
        &["route", "add", "192.0.2.0/24", "via", "203.0.113.1"],
    );
    sh(
        &l.wan,
        &["route", "add", "198.18.0.0/15", "via", "203.0.113.129"],
    );
    sh(&l.a, &["addr", "add", "203.0.113.1/25", "dev", &l.uplink_a]);
    sh(&l.a, &["route", "add", "default", "via", "203.0.113.126"]);
    sh(
        &l.b,
        &["addr", "add", "203.0.113.129/25", "dev", &l.uplink_b],
    );
    sh(&l.b, &["route", "add", "default", "via", "203.0.113.254"]);
    sh(&l.a, &["link", "set", "vm0", "address", &mac(GW_MAC)]);
    sh(&l.a, &["addr", "add", "192.0.2.1/24", "dev", "vm0"]);
    sh(&l.guest, &["link", "set", "eth0", "address", &mac(VM_MAC)]);
    sh(&l.guest, &["addr", "add", "192.0.2.10/24", "dev", "eth0"]);
    sh(&l.guest, &["route", "add", "default", "via", "192.0.2.1"]);
    // Between veths an offloaded checksum stays unfinished (skb metadata), and
    // XDP forwarding turns the frame into bytes: the endpoints must checksum
    // in software, as a real NIC would have finished it on the wire.
    for (ns, dev) in [(&l.client, "c0"), (&l.guest, "eth0")] {
        ns.run("ethtool", &["-K", dev, "tx", "off"])
            .expect("ethtool");
    }
    l
}

fn site_config(mode: Mode, local: Ipv4Addr, peer: Ipv4Addr) -> SiteConfig {
    let mut site = SiteConfig::new(mode, IpAddr::V4(HOME));
    site.new_addr = Some(IpAddr::V4(NEW));
    site.local_tunnel_addr = local;
    site.peer_tunnel_addr = peer;
    site.token = movarto_common::ids::SessionToken(TOKEN);
    site.tunnel_mtu = 1500;
    site.vm_mac = movarto_common::ids::MacAddr(VM_MAC);
    site.gateway_mac = movarto_common::ids::MacAddr(GW_MAC);
    site
}

fn attach_in(ns: &Netns, uplink: &str, site: SiteConfig) -> Attached {
    let _in = ns.enter().expect("enter");
    attach(&AttachOptions {
        uplink: uplink.to_owned(),
        vm_iface: "vm0".to_owned(),
        xdp_mode: XdpMode::Default,
        site,
        pin_name: None,
    })
    .unwrap_or_else(|e| panic!("attach in {}: {e:#}", ns.name()));
    Attached(uplink.to_owned())
}

// ---- the guest's servers (threads, with sockets in the guest namespace) ----

fn listen(ns: &Netns, port: u16) -> TcpListener {
    let _in = ns.enter().expect("enter");
    TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)).expect("bind")
}

fn serve(listener: TcpListener, handle: fn(TcpStream)) -> JoinHandle<()> {
    thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let _ = conn.set_read_timeout(Some(IO_TIMEOUT));
            let _ = conn.set_write_timeout(Some(IO_TIMEOUT));
            thread::spawn(move || handle(conn));
        }
    })
}

/// Port 5001: streams the pattern until the client closes.
fn download_server(mut conn: TcpStream) {
    let mut at = 0u64;
    let mut buf = [0u8; 8192];
    loop {
        for b in buf.iter_mut() {
            *b = pattern(at);
            at += 1;
        }
        if conn.write_all(&buf).is_err() {
            return;
        }
        thread::sleep(Duration::from_millis(4));
    }
}

/// Port 5002: checks the uploaded pattern; answers "ok <n>" or "bad <offset>" at EOF.
fn upload_server(mut conn: TcpStream) {
    let mut at = 0u64;
    let mut buf = [0u8; 8192];
    loop {
        match conn.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                for b in &buf[..n] {
                    if *b != pattern(at) {
                        let _ = writeln!(conn, "bad {at}");
                        return;
                    }
                    at += 1;
                }
            }
            Err(_) => return,
        }
    }
    let _ = writeln!(conn, "ok {at}");
}

/// Port 5003 (and 5004 for the idle one): line echo.
fn echo_server(conn: TcpStream) {
    let Ok(mut out) = conn.try_clone() else {
        return;
    };
    for line in BufReader::new(conn).lines() {
        let Ok(line) = line else { return };
        if writeln!(out, "{line}").is_err() {
            return;
        }
    }
}

// ---- the client's connections ----

fn connect(ns: &Netns, to: Ipv4Addr, port: u16) -> TcpStream {
    let _in = ns.enter().expect("enter");
    let s = TcpStream::connect_timeout(&SocketAddr::from((to, port)), IO_TIMEOUT)
        .unwrap_or_else(|e| panic!("connect {to}:{port}: {e}"));
    s.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
    s.set_write_timeout(Some(IO_TIMEOUT)).expect("timeout");
    s
}

struct Workload {
    stop: Arc<AtomicBool>,
    downloaded: Arc<AtomicU64>,
    exchanges: Arc<AtomicU64>,
    worst_gap_ms: Arc<AtomicU64>,
    threads: Vec<JoinHandle<Result<String, String>>>,
    idle: TcpStream,
}

fn note_gap(worst: &AtomicU64, last: &mut Instant) {
    let gap = last.elapsed().as_millis() as u64;
    worst.fetch_max(gap, Ordering::Relaxed);
    *last = Instant::now();
}

fn start_workload(client: &Netns) -> Workload {
    let stop = Arc::new(AtomicBool::new(false));
    let downloaded = Arc::new(AtomicU64::new(0));
    let exchanges = Arc::new(AtomicU64::new(0));
    let worst_gap_ms = Arc::new(AtomicU64::new(0));
    let mut threads = Vec::new();

    let mut down = connect(client, HOME, 5001);
    let (s, d, w) = (stop.clone(), downloaded.clone(), worst_gap_ms.clone());
    threads.push(thread::spawn(move || {
        let mut buf = [0u8; 16384];
        let mut last = Instant::now();
        while !s.load(Ordering::Relaxed) {
            let n = down.read(&mut buf).map_err(|e| format!("download: {e}"))?;
            if n == 0 {
                return Err("download: server closed".into());
            }
            let at = d.load(Ordering::Relaxed);
            for (i, b) in buf[..n].iter().enumerate() {
                if *b != pattern(at + i as u64) {
                    return Err(format!("download: wrong byte at {}", at + i as u64));
                }
            }
            d.fetch_add(n as u64, Ordering::Relaxed);
            note_gap(&w, &mut last);
        }
        Ok(format!(
            "download: {} bytes in order",
            d.load(Ordering::Relaxed)
        ))
    }));

    let mut up = connect(client, HOME, 5002);
    let (s, w) = (stop.clone(), worst_gap_ms.clone());
    threads.push(thread::spawn(move || {
        let mut at = 0u64;
        let mut buf = [0u8; 4096];
        let mut last = Instant::now();
        while !s.load(Ordering::Relaxed) {
            for b in buf.iter_mut() {
                *b = pattern(at);
                at += 1;
            }
            up.write_all(&buf).map_err(|e| format!("upload: {e}"))?;
            note_gap(&w, &mut last);
            thread::sleep(Duration::from_millis(5));
        }
        up.shutdown(Shutdown::Write)
            .map_err(|e| format!("upload: {e}"))?;
        let mut answer = String::new();
        BufReader::new(&up)
            .read_line(&mut answer)
            .map_err(|e| format!("upload: {e}"))?;
        if answer.trim() != format!("ok {at}") {
            return Err(format!("upload: sent {at} bytes, server says {answer:?}"));
        }
        Ok(format!("upload: {at} bytes verified by the server"))
    }));

    let chat = connect(client, HOME, 5003);
    let (s, x, w) = (stop.clone(), exchanges.clone(), worst_gap_ms.clone());
    threads.push(thread::spawn(move || {
        let mut out = chat.try_clone().map_err(|e| e.to_string())?;
        let mut lines = BufReader::new(chat);
        let mut last = Instant::now();
        let mut n = 0u64;
        while !s.load(Ordering::Relaxed) {
            writeln!(out, "req {n}").map_err(|e| format!("interactive: {e}"))?;
            let mut line = String::new();
            lines
                .read_line(&mut line)
                .map_err(|e| format!("interactive: {e}"))?;
            if line.trim() != format!("req {n}") {
                return Err(format!("interactive: sent req {n}, got {line:?}"));
            }
            n += 1;
            x.fetch_add(1, Ordering::Relaxed);
            note_gap(&w, &mut last);
            thread::sleep(Duration::from_millis(10));
        }
        Ok(format!("interactive: {n} request/response exchanges"))
    }));

    let idle = connect(client, HOME, 5004);
    Workload {
        stop,
        downloaded,
        exchanges,
        worst_gap_ms,
        threads,
        idle,
    }
}

/// One request/response on a fresh connection to `to`.
fn one_exchange(client: &Netns, to: Ipv4Addr, port: u16, text: &str) -> String {
    let conn = connect(client, to, port);
    let mut out = conn.try_clone().expect("clone");
    writeln!(out, "{text}").expect("write");
    let mut line = String::new();
    BufReader::new(conn).read_line(&mut line).expect("read");
    line.trim().to_owned()
}

/// Makes the kernel resolve the next hop toward `peer` (XDP can't wait for
/// ARP): one datagram to the discard port, then wait for the neighbour entry.
fn prime_next_hop(ns: &Netns, peer: Ipv4Addr, gateway: &str) {
    {
        let _in = ns.enter().expect("enter");
        let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).expect("udp");
        socket.send_to(b"prime", (peer, 9)).expect("send");
    }
    wait_for("the tunnel next hop's MAC", IO_TIMEOUT, || {
        ns.run("ip", &["neigh", "show", gateway])
            .is_ok_and(|out| out.contains("lladdr"))
    });
}

fn wait_for(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn guest_moves_from_a_to_b_and_every_connection_survives() {
    require_root();
    let l = lab();
    for (port, handler) in [
        (5001, download_server as fn(TcpStream)),
        (5002, upload_server),
        (5003, echo_server),
        (5004, echo_server),
    ] {
        serve(listen(&l.guest, port), handler);
    }

    // A veth delivers what XDP on its peer transmits (XDP_TX, redirect) only
    // when it has NAPI: GRO alone was not enough here, an XDP program is.
    let _wan_xdp = {
        let _in = l.wan.enter().expect("enter");
        let mut pass = Datapath::load().expect("load");
        for dev in ["wa", "wb"] {
            pass.attach_xdp(dev, XdpMode::Default)
                .expect("pass-through XDP");
        }
        pass
    };
    // Likewise the guest's end of vm0, which site B's XDP redirects into.
    let _guest_xdp = {
        let _in = l.guest.enter().expect("enter");
        let mut pass = Datapath::load().expect("load");
        pass.attach_xdp("eth0", XdpMode::Default)
            .expect("pass-through XDP");
        pass
    };

    // Before the move: A tracks.
    let site_a = attach_in(&l.a, &l.uplink_a, site_config(Mode::Track, TA, TB));
    let w = start_workload(&l.client);
    thread::sleep(Duration::from_secs(2));
    eprintln!(
        "A counters: {:?}",
        Pinned::open(&site_a.0)
            .expect("pins")
            .counters()
            .expect("c")
            .nonzero()
    );
    eprintln!(
        "A flows: {:?}",
        Pinned::open(&site_a.0).expect("pins").flows().expect("c")
    );
    wait_for("traffic before the move", IO_TIMEOUT, || {
        w.downloaded.load(Ordering::Relaxed) > 200_000 && w.exchanges.load(Ordering::Relaxed) > 20
    });
    let pinned_a = Pinned::open(&site_a.0).expect("A's pins");
    let tracked = pinned_a.flows().expect("flows");
    assert_eq!(
        tracked.len(),
        4,
        "the four pre-move connections are tracked: {tracked:?}"
    );
    assert!(
        tracked
            .iter()
            .all(|(_, v)| v.origin == origin::TRACKED && v.state & state::SYN_SEEN != 0)
    );
    assert_eq!(
        pinned_a
            .counters()
            .expect("counters")
            .get(Counter::MssClamped),
        8,
        "SYN and SYN-ACK of each"
    );

    // The move: the guest's link goes to B, B receives, A forwards. The guest keeps its sockets.
    let moved_at = Instant::now();
    pinned_a.release_vm_iface().expect("release A's vm0");
    sh(&l.a, &["link", "set", "vm0", "netns", l.b.name()]);
    sh(&l.b, &["addr", "add", "192.0.2.1/24", "dev", "vm0"]);
    sh(&l.b, &["link", "set", "vm0", "up"]);
    let site_b = attach_in(&l.b, &l.uplink_b, site_config(Mode::Receive, TB, TA));
    // The tunnel endpoints' next hops must be resolved before XDP uses them.
    prime_next_hop(&l.a, TB, "203.0.113.126");
    prime_next_hop(&l.b, TA, "203.0.113.254");
    let mut pinned_a = pinned_a;
    pinned_a.set_mode(Mode::Forward).expect("flip A");
    let switch_ms = moved_at.elapsed().as_millis();

    // The drain: the old connections keep going through the tunnel.
    let (down0, chat0) = (
        w.downloaded.load(Ordering::Relaxed),
        w.exchanges.load(Ordering::Relaxed),
    );
    wait_for("traffic through the tunnel", IO_TIMEOUT, || {
        w.downloaded.load(Ordering::Relaxed) > down0 + 500_000
            && w.exchanges.load(Ordering::Relaxed) > chat0 + 30
    });
    // New connections: to N through B's NAT, and to H at A (a stale-DNS client) through the tunnel.
    assert_eq!(one_exchange(&l.client, NEW, 5003, "new via N"), "new via N");
    assert_eq!(
        one_exchange(&l.client, HOME, 5003, "stale DNS via H"),
        "stale DNS via H"
    );

    w.stop.store(true, Ordering::Relaxed);
    let mut report = Vec::new();
    for t in w.threads {
        report.push(
            t.join()
                .expect("thread")
                .unwrap_or_else(|e| panic!("connection broke: {e}")),
        );
    }
    let mut idle = w.idle;
    writeln!(idle, "still here").expect("idle write");
    let mut line = String::new();
    BufReader::new(&idle)
        .read_line(&mut line)
        .expect("idle read");
    assert_eq!(line.trim(), "still here", "the idle connection survived");
    drop(idle);

    let a = pinned_a.counters().expect("counters");
    let b = Pinned::open(&site_b.0).expect("B's pins");
    let bc = b.counters().expect("counters");
    eprintln!(
        "move_guest: switch {switch_ms} ms, worst stall {} ms; {}; A: tunnel_out {} tunnel_in {}; B: tunnel_in {} tunnel_out {} nat_in {} nat_out {}; drops A {} B {}",
        w.worst_gap_ms.load(Ordering::Relaxed),
        report.join("; "),
        a.get(Counter::TunnelOut),
        a.get(Counter::TunnelIn),
        bc.get(Counter::TunnelIn),
        bc.get(Counter::TunnelOut),
        bc.get(Counter::NatIn),
        bc.get(Counter::NatOut),
        a.iter()
            .filter(|(c, _)| c.is_drop())
            .map(|(_, v)| v)
            .sum::<u64>(),
        bc.iter()
            .filter(|(c, _)| c.is_drop())
            .map(|(_, v)| v)
            .sum::<u64>(),
    );
    assert!(a.get(Counter::TunnelOut) > 100 && a.get(Counter::TunnelIn) > 100);
    assert!(bc.get(Counter::TunnelIn) > 100 && bc.get(Counter::TunnelOut) > 100);
    assert!(bc.get(Counter::NatIn) > 0 && bc.get(Counter::NatOut) > 0);
    for counter in [
        Counter::DropGueBadToken,
        Counter::PassGueForeignSource,
        Counter::DropGueMalformed,
        Counter::DropTooBig,
    ] {
        assert_eq!(a.get(counter) + bc.get(counter), 0, "{}", counter.name());
    }

    // Closed connections drain: every pre-move flow at A is closing, and the sweep removes them.
    wait_for("the pre-move flows to close", IO_TIMEOUT, || {
        pinned_a
            .flows()
            .expect("flows")
            .iter()
            .all(|(_, v)| state::is_closing(v.state))
    });
    let later = monotonic_ns().expect("clock") + timeout::CLOSING_NS + 1;
    let swept = pinned_a
        .sweep(later, timeout::ESTABLISHED_IDLE_DEFAULT_NS)
        .expect("sweep");
    assert!(
        swept.len() >= 5,
        "the four pre-move flows and the stale-DNS one: {}",
        swept.len()
    );
    assert!(
        pinned_a.flows().expect("flows").is_empty(),
        "A's flow map is empty after the drain"
    );

    // Teardown: A detaches, B keeps serving N through NAT.
    drop(site_a);
    Pinned::open(&site_b.0)
        .expect("B")
        .set_mode(Mode::Nat)
        .expect("B to nat");
    assert_eq!(
        one_exchange(&l.client, NEW, 5003, "after teardown"),
        "after teardown"
    );
    drop(site_b);
    drop(l);
}
