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
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    thread,
    time::{Duration, Instant},
};

use movarto_common::{
    config::Mode,
    counters::Counter,
    ids::{MacAddr, SessionToken},
};
use movarto_lab::netns::Netns;
use movarto_tests::{
    require_root,
    site::{Triangle, attach_in},
};
use movarto_user::datapath::SiteConfig;

const HOME: Ipv4Addr = Triangle::HOME;
const TA: Ipv4Addr = Triangle::TA;
const TB: Ipv4Addr = Triangle::TB;
const VM_MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x57];
const TOKEN: u64 = 0x0b0b_0b0b_6d6f_7665;
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// The bulk transfer: 24 MiB.
const BULK: u64 = 24 << 20;

fn pattern(i: u64) -> u8 {
    (i.wrapping_mul(13).wrapping_add(5) % 251) as u8
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
    let hosts = Triangle::new("g", VM_MAC).expect("triangle");
    let Triangle {
        client,
        a,
        b,
        guest,
        uplink_a,
        uplink_b,
        ..
    } = &hosts;
    // The guest offloads: checksums, TSO and GSO on, as a virtio-net guest does.
    guest
        .run(
            "ethtool",
            &["-K", "eth0", "tx", "on", "tso", "on", "gso", "on"],
        )
        .expect("ethtool");
    assert!(offload(guest, "eth0", "tcp-segmentation-offload").ends_with(": on"));
    assert!(offload(guest, "eth0", "generic-segmentation-offload").ends_with(": on"));
    // The client checksums in software: A's XDP turns its replies' frames
    // into bytes (see docs/building.md).
    client
        .run("ethtool", &["-K", "c0", "tx", "off"])
        .expect("ethtool");
    // B's uplink stands for a NIC that finishes checksums on the wire: the
    // segments of the guest's super-packets leave it with the inner TCP
    // checksum done, not left to skb metadata that A's XDP would drop.
    b.run("ethtool", &["-K", uplink_b, "tx", "off"])
        .expect("ethtool");

    let site = |mode, local, peer| {
        SiteConfig::new(mode, IpAddr::V4(HOME))
            .with_tunnel(local, peer, SessionToken(TOKEN))
            .with_macs(MacAddr(VM_MAC), MacAddr(Triangle::GW_MAC))
    };
    let site_a = attach_in(a, uplink_a, "vm0", site(Mode::Forward, TA, TB));
    let site_b = attach_in(b, uplink_b, "vm0", site(Mode::Receive, TB, TA));
    hosts.prime_tunnel().expect("prime the tunnel");

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
            panic!(
                "read after {at} bytes: {e}; A: {:?}; B: {:?}",
                site_a.counters().expect("counters").nonzero(),
                site_b.counters().expect("counters").nonzero()
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

    let (ca, cb) = (
        site_a.counters().expect("counters"),
        site_b.counters().expect("counters"),
    );
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
