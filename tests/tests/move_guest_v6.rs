//! The IPv6 sibling of `move_guest.rs`: a "guest" namespace with an IPv6 home
//! address `H` and real TCP servers moves from site A to site B while a
//! client keeps several connections open; its veth moves, its sockets stay.
//! A forwards through the GUE tunnel (IPv4 outside, IPv6 inside), B unwraps
//! and NATs `N` <-> `H`. The guest must keep resolving its gateway at B
//! (neighbour discovery stays on the link, where B's anycast gateway answers),
//! also when its neighbour cache is flushed right after the move.
//!
//! ```text
//! client 2001:db8:c::7 -- wan -- 2001:db8:a::1 / TA 203.0.113.1 site A --vm0-- guest 2001:db8:1::10 (H)
//!                           \__ 2001:db8:b::1 / TB 203.0.113.129 site B   (vm0 moves here; N = 2001:db8:2::10)
//! ```

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, UdpSocket},
    sync::Mutex,
    thread,
    time::Duration,
};

use movarto_common::{
    config::Mode,
    counters::Counter,
    flow::{origin, state},
    ids::{MacAddr, SessionToken},
};
use movarto_lab::netns::{Netns, veth};
use movarto_tests::{
    require_root,
    site::{attach_in, mac, pass_through_xdp, sh},
    workload::{
        ECHO_PORT, IO_TIMEOUT, Workload, one_exchange, prime_next_hop, serve_guest, wait_for,
    },
};
use movarto_user::{
    agent::tap,
    datapath::{Pinned, SiteConfig},
};

const HOME: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 0x10);
const GATEWAY: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 1);
const NEW: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 0x10);
const CLIENT: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xc, 0, 0, 0, 0, 7);
const WAN_AT_A: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xa, 0, 0, 0, 0, 0xfe);
const TA: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
const TB: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 129);
const VM_MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x66];
const GW_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const TOKEN: u64 = 0x005e_ed0f_6d6f_7636;

/// One lab at a time: both tests build the same topology, and the machine is shared.
static ONE_LAB: Mutex<()> = Mutex::new(());

struct Lab {
    client: Netns,
    wan: Netns,
    a: Netns,
    b: Netns,
    guest: Netns,
    uplink_a: String,
    uplink_b: String,
}

/// Adds an IPv6 address without DAD, so it is usable at once.
fn addr6(ns: &Netns, cidr: &str, dev: &str) {
    sh(ns, &["-6", "addr", "add", cidr, "dev", dev, "nodad"]);
}

fn lab(run: u32) -> Lab {
    let tag = std::process::id() % 100_000 * 10 + run;
    let l = Lab {
        client: Netns::new("client6").expect("netns"),
        wan: Netns::new("wan6").expect("netns"),
        a: Netns::new("sitea6").expect("netns"),
        b: Netns::new("siteb6").expect("netns"),
        guest: Netns::new("guest6").expect("netns"),
        uplink_a: format!("ua{tag}"),
        uplink_b: format!("ub{tag}"),
    };
    for ns in [&l.wan, &l.a, &l.b] {
        for key in [
            "net.ipv4.conf.all.forwarding=1",
            "net.ipv6.conf.all.forwarding=1",
        ] {
            ns.run("sysctl", &["-qw", key]).expect("sysctl");
        }
    }
    veth(&l.client, "c0", &l.wan, "wc").expect("veth");
    veth(&l.wan, "wa", &l.a, &l.uplink_a).expect("veth");
    veth(&l.wan, "wb", &l.b, &l.uplink_b).expect("veth");
    veth(&l.guest, "eth0", &l.a, "vm0").expect("veth");
    addr6(&l.client, "2001:db8:c::7/64", "c0");
    sh(
        &l.client,
        &["-6", "route", "add", "default", "via", "2001:db8:c::1"],
    );
    addr6(&l.wan, "2001:db8:c::1/64", "wc");
    addr6(&l.wan, "2001:db8:a::fe/64", "wa");
    addr6(&l.wan, "2001:db8:b::fe/64", "wb");
    sh(&l.wan, &["addr", "add", "203.0.113.126/25", "dev", "wa"]);
    sh(&l.wan, &["addr", "add", "203.0.113.254/25", "dev", "wb"]);
    sh(
        &l.wan,
        &[
            "-6",
            "route",
            "add",
            "2001:db8:1::/64",
            "via",
            "2001:db8:a::1",
        ],
    );
    sh(
        &l.wan,
        &[
            "-6",
            "route",
            "add",
            "2001:db8:2::/64",
            "via",
            "2001:db8:b::1",
        ],
    );
    for (ns, uplink, v4, v6, gw4, gw6) in [
        (
            &l.a,
            &l.uplink_a,
            "203.0.113.1/25",
            "2001:db8:a::1/64",
            "203.0.113.126",
            "2001:db8:a::fe",
        ),
        (
            &l.b,
            &l.uplink_b,
            "203.0.113.129/25",
            "2001:db8:b::1/64",
            "203.0.113.254",
            "2001:db8:b::fe",
        ),
    ] {
        sh(ns, &["addr", "add", v4, "dev", uplink]);
        addr6(ns, v6, uplink);
        sh(ns, &["route", "add", "default", "via", gw4]);
        sh(ns, &["-6", "route", "add", "default", "via", gw6]);
    }
    sh(&l.a, &["link", "set", "vm0", "address", &mac(GW_MAC)]);
    addr6(&l.a, &format!("{GATEWAY}/64"), "vm0");
    sh(&l.guest, &["link", "set", "eth0", "address", &mac(VM_MAC)]);
    addr6(&l.guest, &format!("{HOME}/64"), "eth0");
    sh(
        &l.guest,
        &["-6", "route", "add", "default", "via", &GATEWAY.to_string()],
    );
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
    let mut site = SiteConfig::new(mode, IpAddr::V6(HOME));
    site.new_addr = Some(IpAddr::V6(NEW));
    site.local_tunnel_addr = local;
    site.peer_tunnel_addr = peer;
    site.token = SessionToken(TOKEN);
    site.tunnel_mtu = 1500;
    site.vm_mac = MacAddr(VM_MAC);
    site.gateway_mac = MacAddr(GW_MAC);
    site
}

/// Sets up the anycast gateway on `dev` of `ns` as the agent does on a tap:
/// the gateway MAC, the gateway's IPv6 address (without DAD), up.
fn anycast_gateway(ns: &Netns, dev: &str) {
    let _in = ns.enter().expect("enter");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime
        .block_on(tap::ensure_tap(dev, GW_MAC, IpAddr::V6(GATEWAY), 64))
        .unwrap_or_else(|e| panic!("gateway on {dev} in {}: {e:#}", ns.name()));
}

/// The move, with or without flushing the guest's neighbour cache right after it.
fn guest_moves_and_every_ipv6_connection_survives(flush_guest_neighbours: bool) {
    require_root();
    let _one = ONE_LAB.lock().unwrap_or_else(|e| e.into_inner());
    let l = lab(u32::from(flush_guest_neighbours));
    serve_guest(&l.guest).expect("servers");

    // The wan's veths and the guest's end of vm0 must deliver what XDP transmits.
    let _wan_xdp = pass_through_xdp(&l.wan, &["wa", "wb"]);
    let _guest_xdp = pass_through_xdp(&l.guest, &["eth0"]);

    // Before the move: A tracks.
    let site_a = attach_in(&l.a, &l.uplink_a, "vm0", site_config(Mode::Track, TA, TB));
    let w = Workload::start(&l.client, IpAddr::V6(HOME)).expect("workload");
    wait_for("traffic before the move", IO_TIMEOUT, || {
        let (down, chat) = w.progress();
        down > 200_000 && chat > 20
    })
    .expect("before the move");
    let mut pinned_a = Pinned::open(&site_a.0).expect("A's pins");
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

    // The move: the guest's link goes to B, with the same gateway (MAC and
    // address) set up as the agent does; B receives, A forwards.
    pinned_a.release_vm_iface().expect("release A's vm0");
    sh(&l.a, &["link", "set", "vm0", "netns", l.b.name()]);
    anycast_gateway(&l.b, "vm0");
    let site_b = attach_in(&l.b, &l.uplink_b, "vm0", site_config(Mode::Receive, TB, TA));
    // The next hops XDP uses must be resolved before it uses them.
    prime_next_hop(&l.a, IpAddr::V4(TB), "203.0.113.126".parse().expect("ip")).expect("A to TB");
    prime_next_hop(&l.a, IpAddr::V6(CLIENT), IpAddr::V6(WAN_AT_A)).expect("A to the client");
    prime_next_hop(&l.b, IpAddr::V4(TA), "203.0.113.254".parse().expect("ip")).expect("B to TA");
    pinned_a.set_mode(Mode::Forward).expect("flip A");
    if flush_guest_neighbours {
        // As after any longer pause: the guest must resolve its gateway at B.
        l.guest
            .run("ip", &["-6", "neigh", "flush", "dev", "eth0"])
            .expect("flush");
    }

    // The drain: the old connections keep going through the tunnel.
    let (down0, chat0) = w.progress();
    wait_for("traffic through the tunnel", IO_TIMEOUT, || {
        let (down, chat) = w.progress();
        down > down0 + 500_000 && chat > chat0 + 30
    })
    .expect("after the move");
    // New connections: to N through B's NAT, and to H at A (a stale-DNS client) through the tunnel.
    assert_eq!(
        one_exchange(&l.client, IpAddr::V6(NEW), ECHO_PORT, "new via N").expect("via N"),
        "new via N"
    );
    assert_eq!(
        one_exchange(&l.client, IpAddr::V6(HOME), ECHO_PORT, "stale DNS via H").expect("via H"),
        "stale DNS via H"
    );
    // B's kernel, which holds the gateway, resolves the VM: its solicitation
    // goes out of vm0, and the VM's advertisement (from H to the gateway's
    // address) must reach B's kernel, not the tunnel. A datagram to a socket
    // the guest holds triggers it without an answer.
    let _discard = {
        let _in = l.guest.enter().expect("enter");
        UdpSocket::bind((Ipv6Addr::UNSPECIFIED, 9)).expect("udp")
    };
    // Afresh: B may have learnt H's MAC from an earlier solicitation.
    sh(&l.b, &["-6", "neigh", "flush", "dev", "vm0"]);
    {
        let _in = l.b.enter().expect("enter");
        UdpSocket::bind((Ipv6Addr::UNSPECIFIED, 0))
            .and_then(|s| s.send_to(b"hello", (HOME, 9)))
            .expect("send to H");
    }
    wait_for("B to resolve the VM's MAC", IO_TIMEOUT, || {
        l.b.run(
            "ip",
            &["-6", "neigh", "show", &HOME.to_string(), "dev", "vm0"],
        )
        .is_ok_and(|out| out.contains(&mac(VM_MAC)) && out.contains("REACHABLE"))
    })
    .expect("B resolves H");

    let worst_gap_ms = w.worst_gap_ms.load(std::sync::atomic::Ordering::Relaxed);
    let report = w
        .finish()
        .unwrap_or_else(|e| panic!("after the move: {e:#}"));

    // The guest resolved its gateway at B, from B's kernel.
    let neighbours = l
        .guest
        .run(
            "ip",
            &["-6", "neigh", "show", &GATEWAY.to_string(), "dev", "eth0"],
        )
        .expect("neigh");
    assert!(
        neighbours.contains(&mac(GW_MAC)),
        "the guest knows its gateway: {neighbours:?}"
    );

    let a = site_a.counters().expect("counters");
    let bc = site_b.counters().expect("counters");
    eprintln!(
        "move_guest_v6 (flush {flush_guest_neighbours}): worst stall {worst_gap_ms} ms; {}; A: {:?}; B: {:?}",
        report.join("; "),
        a.nonzero(),
        bc.nonzero(),
    );
    assert!(a.get(Counter::TunnelOut) > 100 && a.get(Counter::TunnelIn) > 100);
    assert!(bc.get(Counter::TunnelIn) > 100 && bc.get(Counter::TunnelOut) > 100);
    assert!(bc.get(Counter::NatIn) > 0 && bc.get(Counter::NatOut) > 0);
    // Nothing B tunnelled was undeliverable at A: no ND, nothing link-local.
    for counter in [
        Counter::DropNoRoute,
        Counter::DropGueBadToken,
        Counter::PassGueForeignSource,
        Counter::DropGueMalformed,
        Counter::DropTooBig,
    ] {
        assert_eq!(a.get(counter) + bc.get(counter), 0, "{}", counter.name());
    }

    // Teardown: A detaches, B keeps serving N through NAT.
    drop(site_a);
    Pinned::open(&site_b.0)
        .expect("B")
        .set_mode(Mode::Nat)
        .expect("B to nat");
    assert_eq!(
        one_exchange(&l.client, IpAddr::V6(NEW), ECHO_PORT, "after teardown").expect("via N"),
        "after teardown"
    );
    drop(site_b);
    // Give the servers' threads a moment to see their connections close.
    thread::sleep(Duration::from_millis(50));
    drop(l);
}

#[test]
fn ipv6_guest_moves_from_a_to_b_and_every_connection_survives() {
    guest_moves_and_every_ipv6_connection_survives(false);
}

#[test]
fn ipv6_guest_with_its_neighbour_cache_flushed_after_the_move_keeps_every_connection() {
    guest_moves_and_every_ipv6_connection_survives(true);
}

/// The agent's gateway on a tap: an IPv6 address is usable at once (no DAD:
/// the other site holds the same address, and a tap without carrier would
/// keep it tentative, unable to answer the VM's neighbour solicitations).
#[test]
fn the_agents_ipv6_gateway_on_a_tap_is_usable_at_once() {
    require_root();
    let ns = Netns::new("tap6").expect("netns");
    anycast_gateway(&ns, "tap6");
    let addrs = ns
        .run("ip", &["-6", "addr", "show", "dev", "tap6"])
        .expect("ip");
    let line = addrs
        .lines()
        .find(|l| l.contains(&format!("{GATEWAY}/64")))
        .unwrap_or_else(|| panic!("no gateway address: {addrs}"));
    assert!(line.contains("nodad"), "{line}");
    assert!(!line.contains("tentative"), "{line}");
    let link = ns.run("ip", &["-o", "link", "show", "tap6"]).expect("ip");
    assert!(link.contains(&mac(GW_MAC)), "{link}");
    let _in = ns.enter().expect("enter");
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(tap::delete_tap("tap6"))
        .expect("delete the tap");
}
