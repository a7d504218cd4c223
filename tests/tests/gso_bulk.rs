//! A bulk transfer the VM sends with TSO/GSO on arrives intact through the
//! tunnel. The guest sits at site B (mode `receive`); its client reaches it
//! at H through site A (mode `forward`), so every reply is a GSO super-packet
//! that B's TC program encapsulates whole (`bpf_skb_adjust_room` with the
//! UDP-tunnel flags) and the kernel segments on the way out.
//!
//! ```text
//! client 198.51.100.7 -- wan -- 203.0.113.1 (TA) site A
//!                          \__ 203.0.113.129 (TB) site B --vm0-- guest 192.0.2.10 (H), TSO on
//! ```

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    thread,
    time::{Duration, Instant},
};

use aya::programs::XdpMode;
use movarto_common::{config::Mode, counters::Counter};
use movarto_lab::netns::{Netns, veth};
use movarto_tests::require_root;
use movarto_user::datapath::{AttachOptions, Datapath, Pinned, SiteConfig, attach, detach};

const HOME: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const TA: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
const TB: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 129);
const VM_MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x57];
const GW_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const TOKEN: u64 = 0x0b0b_0b0b_6d6f_7665;
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// The bulk transfer: 24 MiB.
const BULK: u64 = 24 << 20;

fn mac(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn pattern(i: u64) -> u8 {
    (i.wrapping_mul(13).wrapping_add(5) % 251) as u8
}

fn sh(ns: &Netns, args: &[&str]) {
    ns.ip(args)
        .unwrap_or_else(|e| panic!("ip {args:?} in {}: {e:#}", ns.name()));
}

/// Detaches a site's datapath on drop (also when the test fails).
struct Attached(String);

impl Drop for Attached {
    fn drop(&mut self) {
        let _ = detach(&self.0);
    }
}

fn attach_in(
    ns: &Netns,
    uplink: &str,
    vm_iface: &str,
    mode: Mode,
    local: Ipv4Addr,
    peer: Ipv4Addr,
) -> Attached {
    let mut site = SiteConfig::new(mode, IpAddr::V4(HOME));
    site.local_tunnel_addr = local;
    site.peer_tunnel_addr = peer;
    site.token = movarto_common::ids::SessionToken(TOKEN);
    site.tunnel_mtu = 1500;
    site.vm_mac = movarto_common::ids::MacAddr(VM_MAC);
    site.gateway_mac = movarto_common::ids::MacAddr(GW_MAC);
    let _in = ns.enter().expect("enter");
    attach(&AttachOptions {
        uplink: uplink.to_owned(),
        vm_iface: vm_iface.to_owned(),
        xdp_mode: XdpMode::Default,
        site,
        pin_name: None,
    })
    .unwrap_or_else(|e| panic!("attach in {}: {e:#}", ns.name()));
    Attached(uplink.to_owned())
}

/// Makes the kernel resolve the next hop toward `peer` (XDP can't wait for ARP).
fn prime_next_hop(ns: &Netns, peer: Ipv4Addr, gateway: &str) {
    {
        let _in = ns.enter().expect("enter");
        let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).expect("udp");
        socket.send_to(b"prime", (peer, 9)).expect("send");
    }
    let deadline = Instant::now() + IO_TIMEOUT;
    while !ns
        .run("ip", &["neigh", "show", gateway])
        .is_ok_and(|out| out.contains("lladdr"))
    {
        assert!(Instant::now() < deadline, "next hop {gateway} unresolved");
        thread::sleep(Duration::from_millis(20));
    }
}

fn offload(ns: &Netns, dev: &str, feature: &str) -> String {
    let out = ns.run("ethtool", &["-k", dev]).expect("ethtool -k");
    out.lines()
        .find(|l| l.starts_with(&format!("{feature}:")))
        .unwrap_or_else(|| panic!("{feature} not in ethtool -k {dev}"))
        .to_owned()
}

#[test]
fn bulk_sent_with_tso_arrives_intact_through_the_tunnel() {
    require_root();
    let tag = std::process::id() % 100_000;
    let (uplink_a, uplink_b) = (format!("ga{tag}"), format!("gb{tag}"));
    let client = Netns::new("gclient").expect("netns");
    let wan = Netns::new("gwan").expect("netns");
    let a = Netns::new("gsitea").expect("netns");
    let b = Netns::new("gsiteb").expect("netns");
    let guest = Netns::new("gguest").expect("netns");
    for ns in [&wan, &a, &b] {
        ns.run("sysctl", &["-qw", "net.ipv4.conf.all.forwarding=1"])
            .expect("sysctl");
    }
    veth(&client, "c0", &wan, "wc").expect("veth");
    veth(&wan, "wa", &a, &uplink_a).expect("veth");
    veth(&wan, "wb", &b, &uplink_b).expect("veth");
    veth(&guest, "eth0", &b, "vm0").expect("veth");
    // A has no VM; its TC program needs some interface.
    veth(&a, "vm0", &wan, "xa").expect("veth");
    sh(&client, &["addr", "add", "198.51.100.7/24", "dev", "c0"]);
    sh(&client, &["route", "add", "default", "via", "198.51.100.1"]);
    sh(&wan, &["addr", "add", "198.51.100.1/24", "dev", "wc"]);
    sh(&wan, &["addr", "add", "203.0.113.126/25", "dev", "wa"]);
    sh(&wan, &["addr", "add", "203.0.113.254/25", "dev", "wb"]);
    sh(
        &wan,
        &["route", "add", "192.0.2.0/24", "via", "203.0.113.1"],
    );
    sh(&a, &["addr", "add", "203.0.113.1/25", "dev", &uplink_a]);
    sh(&a, &["route", "add", "default", "via", "203.0.113.126"]);
    sh(&b, &["addr", "add", "203.0.113.129/25", "dev", &uplink_b]);
    sh(&b, &["route", "add", "default", "via", "203.0.113.254"]);
    sh(&b, &["link", "set", "vm0", "address", &mac(GW_MAC)]);
    sh(&b, &["addr", "add", "192.0.2.1/24", "dev", "vm0"]);
    sh(&guest, &["link", "set", "eth0", "address", &mac(VM_MAC)]);
    sh(&guest, &["addr", "add", "192.0.2.10/24", "dev", "eth0"]);
    sh(&guest, &["route", "add", "default", "via", "192.0.2.1"]);
    // The guest offloads: checksums, TSO and GSO on, as a virtio-net guest does.
    guest
        .run(
            "ethtool",
            &["-K", "eth0", "tx", "on", "tso", "on", "gso", "on"],
        )
        .expect("ethtool");
    assert!(offload(&guest, "eth0", "tcp-segmentation-offload").ends_with(": on"));
    assert!(offload(&guest, "eth0", "generic-segmentation-offload").ends_with(": on"));
    // The client checksums in software: A's XDP turns its replies' frames
    // into bytes (see docs/building.md).
    client
        .run("ethtool", &["-K", "c0", "tx", "off"])
        .expect("ethtool");
    // B's uplink stands for a NIC that finishes checksums on the wire: the
    // segments of the guest's super-packets leave it with the inner TCP
    // checksum done, not left to skb metadata that A's XDP would drop.
    b.run("ethtool", &["-K", &uplink_b, "tx", "off"])
        .expect("ethtool");

    // veths deliver what XDP on their peer transmits only to an XDP program.
    let _wan_xdp = {
        let _in = wan.enter().expect("enter");
        let mut pass = Datapath::load().expect("load");
        for dev in ["wa", "wb"] {
            pass.attach_xdp(dev, XdpMode::Default)
                .expect("pass-through XDP");
        }
        pass
    };
    let _guest_xdp = {
        let _in = guest.enter().expect("enter");
        let mut pass = Datapath::load().expect("load");
        pass.attach_xdp("eth0", XdpMode::Default)
            .expect("pass-through XDP");
        pass
    };

    let site_a = attach_in(&a, &uplink_a, "vm0", Mode::Forward, TA, TB);
    let site_b = attach_in(&b, &uplink_b, "vm0", Mode::Receive, TB, TA);
    prime_next_hop(&a, TB, "203.0.113.126");
    prime_next_hop(&b, TA, "203.0.113.254");

    // The guest's server: BULK bytes of the pattern in 64 KiB writes, then close.
    let listener = {
        let _in = guest.enter().expect("enter");
        TcpListener::bind((Ipv4Addr::UNSPECIFIED, 5001)).expect("bind")
    };
    let server = thread::spawn(move || {
        let (mut conn, _) = listener.accept().expect("accept");
        conn.set_write_timeout(Some(IO_TIMEOUT)).expect("timeout");
        let mut buf = vec![0u8; 64 << 10];
        let mut at = 0u64;
        while at < BULK {
            for b in buf.iter_mut() {
                *b = pattern(at);
                at += 1;
            }
            conn.write_all(&buf).expect("server write");
        }
    });

    let started = Instant::now();
    let mut conn = {
        let _in = client.enter().expect("enter");
        TcpStream::connect_timeout(&SocketAddr::from((HOME, 5001)), IO_TIMEOUT).expect("connect H")
    };
    conn.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
    let mut buf = vec![0u8; 256 << 10];
    let mut at = 0u64;
    loop {
        let n = conn.read(&mut buf).unwrap_or_else(|e| {
            let nonzero = |p: &Attached| {
                Pinned::open(&p.0)
                    .and_then(|p| p.counters())
                    .map(|c| c.nonzero())
            };
            panic!(
                "read after {at} bytes: {e}; A: {:?}; B: {:?}",
                nonzero(&site_a),
                nonzero(&site_b)
            )
        });
        if n == 0 {
            break;
        }
        for (i, b) in buf[..n].iter().enumerate() {
            assert_eq!(
                *b,
                pattern(at + i as u64),
                "wrong byte at {}",
                at + i as u64
            );
        }
        at += n as u64;
    }
    let took = started.elapsed();
    server.join().expect("server");
    assert_eq!(at, BULK, "every byte, in order");

    let ca = Pinned::open(&site_a.0)
        .expect("A")
        .counters()
        .expect("counters");
    let cb = Pinned::open(&site_b.0)
        .expect("B")
        .counters()
        .expect("counters");
    let drops = |c: &movarto_user::datapath::CounterSnapshot| {
        c.iter()
            .filter(|(k, v)| k.is_drop() && *v != 0)
            .map(|(k, v)| (k.name(), v))
            .collect::<Vec<_>>()
    };
    assert!(drops(&ca).is_empty(), "A dropped: {:?}", drops(&ca));
    assert!(drops(&cb).is_empty(), "B dropped: {:?}", drops(&cb));
    // The guest's data went into the tunnel as super-packets: fewer
    // encapsulations at B than the MTU-sized segments A unwrapped.
    let segments = BULK / 1448;
    eprintln!(
        "gso_bulk: {BULK} bytes in {took:?}; B tunnel_out {} (GSO super-packets and ACKs), A tunnel_in {} (segments), at least {segments} segments needed",
        cb.get(Counter::TunnelOut),
        ca.get(Counter::TunnelIn),
    );
    assert!(ca.get(Counter::TunnelIn) >= segments);
    assert!(
        cb.get(Counter::TunnelOut) < ca.get(Counter::TunnelIn),
        "B encapsulated GSO packets whole"
    );
}
