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
    net::{IpAddr, Ipv4Addr},
    sync::atomic::Ordering,
    thread,
    time::{Duration, Instant},
};

use movarto_common::{
    config::Mode,
    counters::Counter,
    flow::{origin, state, timeout},
};
use movarto_lab::netns::{Netns, veth};
use movarto_tests::{
    require_root,
    site::{attach_in, mac, pass_through_xdp, sh},
    workload::{
        ECHO_PORT, IO_TIMEOUT, Workload, one_exchange, prime_next_hop, serve_guest, wait_for,
    },
};
use movarto_user::datapath::{Pinned, SiteConfig, flows::monotonic_ns};

const HOME: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const NEW: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 10);
const TA: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
const TB: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 129);
const VM_MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
const GW_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const TOKEN: u64 = 0x005e_ed0f_6d6f_7665;

struct Lab {
    client: Netns,
    wan: Netns,
    a: Netns,
    b: Netns,
    guest: Netns,
    uplink_a: String,
    uplink_b: String,
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

#[test]
fn guest_moves_from_a_to_b_and_every_connection_survives() {
    require_root();
    let l = lab();
    serve_guest(&l.guest).expect("the guest's servers");

    // The wan's veths and the guest's end of vm0 must deliver what XDP transmits.
    let _wan_xdp = pass_through_xdp(&l.wan, &["wa", "wb"]);
    let _guest_xdp = pass_through_xdp(&l.guest, &["eth0"]);

    // Before the move: A tracks.
    let site_a = attach_in(&l.a, &l.uplink_a, "vm0", site_config(Mode::Track, TA, TB));
    let w = Workload::start(&l.client, IpAddr::V4(HOME)).expect("the workload");
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
    })
    .expect("traffic before the move");
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
    let site_b = attach_in(&l.b, &l.uplink_b, "vm0", site_config(Mode::Receive, TB, TA));
    // The tunnel endpoints' next hops must be resolved before XDP uses them.
    for (ns, peer, next_hop) in [
        (&l.a, TB, [203, 0, 113, 126]),
        (&l.b, TA, [203, 0, 113, 254]),
    ] {
        prime_next_hop(ns, peer.into(), next_hop.into()).expect("the tunnel's next hop");
    }
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
    })
    .expect("traffic through the tunnel");
    // New connections: to N through B's NAT, and to H at A (a stale-DNS client) through the tunnel.
    assert_eq!(
        one_exchange(&l.client, IpAddr::V4(NEW), ECHO_PORT, "new via N").expect("new via N"),
        "new via N"
    );
    assert_eq!(
        one_exchange(&l.client, IpAddr::V4(HOME), ECHO_PORT, "stale DNS via H")
            .expect("stale DNS via H"),
        "stale DNS via H"
    );

    let worst_gap_ms = w.worst_gap_ms.load(Ordering::Relaxed);
    let report = w
        .finish()
        .unwrap_or_else(|e| panic!("a pre-move connection broke: {e:#}"));

    let a = pinned_a.counters().expect("counters");
    let b = Pinned::open(&site_b.0).expect("B's pins");
    let bc = b.counters().expect("counters");
    eprintln!(
        "move_guest: switch {switch_ms} ms, worst stall {} ms; {}; A: tunnel_out {} tunnel_in {}; B: tunnel_in {} tunnel_out {} nat_in {} nat_out {}; drops A {} B {}",
        worst_gap_ms,
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
    })
    .expect("the pre-move flows to close");
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
        one_exchange(&l.client, IpAddr::V4(NEW), ECHO_PORT, "after teardown")
            .expect("after teardown"),
        "after teardown"
    );
    drop(site_b);
    drop(l);
}
