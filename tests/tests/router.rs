//! Site A forwards for `H` like the router it replaces, live, in network
//! namespaces: a sender that does not set DF still gets its data through a
//! tunnel smaller than its path (XDP cannot fragment, so A answers
//! frag-needed and the sender fragments at the source), and a packet whose
//! TTL expires at A gets time-exceeded from there.
//!
//! ```text
//! client 198.51.100.7 (MTU 1500) -- wan -- 203.0.113.1 (TA) site A, forward, tunnel MTU 1280
//!                                     \__ 203.0.113.129 (TB) site B, receive --vm0-- guest 192.0.2.10 (H)
//! ```

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    thread,
    time::Duration,
};

use movarto_common::{
    config::Mode,
    counters::Counter,
    ids::{MacAddr, SessionToken},
};
use movarto_lab::netns::Netns;
use movarto_tests::{
    require_root,
    site::{Attached, Triangle, attach_in},
    workload,
};
use movarto_user::datapath::SiteConfig;

const HOME: Ipv4Addr = Triangle::HOME;
const TA: Ipv4Addr = Triangle::TA;
const TB: Ipv4Addr = Triangle::TB;
const VM_MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x58];
const TOKEN: u64 = 0x7277_7277_6d6f_7665;
/// Smaller than the client's path (1500): what fits inside is 1240 bytes.
const TUNNEL_MTU: u16 = 1280;
const INNER_MTU: u32 = TUNNEL_MTU as u32 - 40;
const IO_TIMEOUT: Duration = Duration::from_secs(10);

fn pattern(i: u64) -> u8 {
    (i.wrapping_mul(11).wrapping_add(7) % 251) as u8
}

/// The hosts, A forwarding and B receiving from the start (the guest has
/// moved). Fields drop in order: the datapaths go before the namespaces.
struct Lab {
    site_a: Attached,
    site_b: Attached,
    hosts: Triangle,
}

fn attach_in_site(
    ns: &Netns,
    uplink: &str,
    mode: Mode,
    local: Ipv4Addr,
    peer: Ipv4Addr,
) -> Attached {
    let site = SiteConfig::new(mode, IpAddr::V4(HOME))
        .with_tunnel(local, peer, SessionToken(TOKEN))
        .with_tunnel_mtu(TUNNEL_MTU)
        .with_macs(MacAddr(VM_MAC), MacAddr(Triangle::GW_MAC));
    attach_in(ns, uplink, "vm0", site)
}

fn wait_for(what: &str, ok: impl FnMut() -> bool) {
    workload::wait_for(what, IO_TIMEOUT, ok).expect("condition");
}

/// `letter` keeps each test's uplink names, and so its bpffs pins, apart.
fn lab(letter: char) -> Lab {
    let hosts = Triangle::new(&format!("r{letter}"), VM_MAC).expect("triangle");
    // The endpoints checksum in software: A's XDP turns frames into bytes,
    // and an offloaded checksum left to skb metadata would be lost.
    for (ns, dev) in [(&hosts.client, "c0"), (&hosts.guest, "eth0")] {
        ns.run("ethtool", &["-K", dev, "tx", "off"])
            .expect("ethtool");
    }
    let site_a = attach_in_site(&hosts.a, &hosts.uplink_a, Mode::Forward, TA, TB);
    let site_b = attach_in_site(&hosts.b, &hosts.uplink_b, Mode::Receive, TB, TA);
    hosts.prime_tunnel().expect("prime the tunnel");
    Lab {
        site_a,
        site_b,
        hosts,
    }
}

/// Sets an integer IPPROTO_IP socket option.
fn set_ip_option(socket: &impl AsRawFd, name: libc::c_int, value: libc::c_int) {
    // SAFETY: setsockopt on an open socket with a c_int of the right size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            name,
            (&raw const value).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(
        rc,
        0,
        "setsockopt {name}: {}",
        std::io::Error::last_os_error()
    );
}

/// The path MTU the kernel knows for a connected socket (IP_MTU).
fn path_mtu(socket: &impl AsRawFd) -> u32 {
    let mut value: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt into a c_int of the announced size.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_MTU,
            (&raw mut value).cast(),
            &mut len,
        )
    };
    assert_eq!(rc, 0, "IP_MTU: {}", std::io::Error::last_os_error());
    value as u32
}

/// Nothing was dropped at either site.
fn assert_no_drops(lab: &Lab) {
    for (site, c) in [
        ("A", lab.site_a.counters().expect("counters")),
        ("B", lab.site_b.counters().expect("counters")),
    ] {
        let drops: Vec<_> = c
            .iter()
            .filter(|(k, v)| k.is_drop() && *v != 0)
            .map(|(k, v)| (k.name(), v))
            .collect();
        assert!(drops.is_empty(), "{site} dropped: {drops:?}");
    }
}

#[test]
fn a_tcp_sender_without_df_gets_every_byte_through_a_smaller_tunnel() {
    require_root();
    let lab = lab('t');
    // The guest checks the pattern and answers "ok <n>" at EOF.
    let listener = {
        let _in = lab.hosts.guest.enter().expect("enter");
        TcpListener::bind((Ipv4Addr::UNSPECIFIED, 5001)).expect("bind")
    };
    let server = thread::spawn(move || -> Result<u64, String> {
        let (mut conn, _) = listener.accept().map_err(|e| e.to_string())?;
        conn.set_read_timeout(Some(IO_TIMEOUT))
            .map_err(|e| e.to_string())?;
        let mut at = 0u64;
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = conn
                .read(&mut buf)
                .map_err(|e| format!("read at {at}: {e}"))?;
            if n == 0 {
                break;
            }
            for b in &buf[..n] {
                if *b != pattern(at) {
                    return Err(format!("wrong byte at {at}"));
                }
                at += 1;
            }
        }
        writeln!(conn, "ok {at}").map_err(|e| e.to_string())?;
        Ok(at)
    });

    let mut conn = {
        let _in = lab.hosts.client.enter().expect("enter");
        TcpStream::connect_timeout(&SocketAddr::from((HOME, 5001)), IO_TIMEOUT).expect("connect H")
    };
    conn.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
    conn.set_write_timeout(Some(IO_TIMEOUT)).expect("timeout");
    // DF clear. The guest announced MSS 1460 (nothing clamps the SYN-ACK on
    // this path), so full-sized segments are too big for the tunnel.
    set_ip_option(&conn, libc::IP_MTU_DISCOVER, libc::IP_PMTUDISC_DONT);
    assert_eq!(path_mtu(&conn), 1500, "the client's own path");

    const BYTES: u64 = 4 << 20;
    let mut buf = vec![0u8; 64 << 10];
    let mut at = 0u64;
    while at < BYTES {
        for b in buf.iter_mut() {
            *b = pattern(at);
            at += 1;
        }
        conn.write_all(&buf).expect("client write");
    }
    conn.shutdown(Shutdown::Write).expect("shutdown");
    let mut answer = String::new();
    BufReader::new(&conn)
        .read_line(&mut answer)
        .expect("the guest's answer");
    assert_eq!(answer.trim(), format!("ok {BYTES}"), "every byte, in order");
    assert_eq!(server.join().expect("server"), Ok(BYTES));

    let a = lab.site_a.counters().expect("counters");
    eprintln!("router tcp: A {:?}", a.nonzero());
    assert!(
        a.get(Counter::TooBigNoDf) > 0,
        "DF-clear segments too big for the tunnel reached A"
    );
    assert_eq!(a.get(Counter::IcmpTooBig), a.get(Counter::TooBigNoDf));
    assert_eq!(
        path_mtu(&conn),
        INNER_MTU,
        "the client learned the tunnel's MTU"
    );
    assert_no_drops(&lab);
}

#[test]
fn udp_datagrams_without_df_arrive_whole_after_the_first_frag_needed() {
    require_root();
    let lab = lab('u');
    const SIZE: usize = 1400;
    const COUNT: u64 = 20;
    let receiver = {
        let _in = lab.hosts.guest.enter().expect("enter");
        UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 5005)).expect("bind")
    };
    receiver
        .set_read_timeout(Some(IO_TIMEOUT))
        .expect("timeout");
    let sender = {
        let _in = lab.hosts.client.enter().expect("enter");
        let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).expect("bind");
        s.connect((HOME, 5005)).expect("connect");
        s
    };
    set_ip_option(&sender, libc::IP_MTU_DISCOVER, libc::IP_PMTUDISC_DONT);
    let datagram = |seq: u64| {
        let mut d = vec![0u8; SIZE];
        d[..8].copy_from_slice(&seq.to_be_bytes());
        for (i, b) in d[8..].iter_mut().enumerate() {
            *b = pattern(seq + i as u64);
        }
        d
    };

    // The first is one packet, too big for the tunnel: A answers
    // frag-needed, and the client lowers its path MTU for H.
    sender.send(&datagram(0)).expect("send");
    wait_for("the client to learn the tunnel's MTU", || {
        path_mtu(&sender) == INNER_MTU
    });
    let a = lab.site_a.counters().expect("counters");
    assert_eq!(a.get(Counter::TooBigNoDf), 1);
    assert_eq!(a.get(Counter::IcmpTooBig), 1);

    // From then on the client fragments; A tunnels each fragment, the guest reassembles.
    for seq in 1..=COUNT {
        sender.send(&datagram(seq)).expect("send");
        let mut buf = [0u8; 2048];
        let n = receiver
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("datagram {seq}: {e}"));
        assert_eq!(&buf[..n], &datagram(seq)[..], "datagram {seq}, whole");
    }
    let a = lab.site_a.counters().expect("counters");
    eprintln!("router udp: A {:?}", a.nonzero());
    assert_eq!(a.get(Counter::TooBigNoDf), 1, "only the first was too big");
    assert!(
        a.get(Counter::TunnelOut) >= 2 * COUNT,
        "two fragments a datagram"
    );
    assert_no_drops(&lab);
}

#[test]
fn a_packet_whose_ttl_expires_at_a_gets_time_exceeded_from_there() {
    require_root();
    let lab = lab('x');
    let socket = {
        let _in = lab.hosts.client.enter().expect("enter");
        let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).expect("bind");
        s.connect((HOME, 33434)).expect("connect");
        s
    };
    socket.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
    // The wan router takes one; A is the second hop. Without A's answer
    // the probe would reach the guest, whose closed port refuses it.
    socket.set_ttl(2).expect("ttl");
    set_ip_option(&socket, libc::IP_RECVERR, 1);
    socket.send(b"probe").expect("send");
    let err = socket
        .recv(&mut [0u8; 64])
        .expect_err("an ICMP error, not a reply");
    eprintln!(
        "router ttl: A {:?} B {:?}",
        lab.site_a.counters().expect("counters").nonzero(),
        lab.site_b.counters().expect("counters").nonzero()
    );
    assert_eq!(
        err.raw_os_error(),
        Some(libc::EHOSTUNREACH),
        "time exceeded (not port unreachable from the guest): {err}"
    );
    let a = lab.site_a.counters().expect("counters");
    assert_eq!(a.get(Counter::IcmpTimeExceeded), 1);
    assert_eq!(a.get(Counter::TunnelOut), 0, "nothing went into the tunnel");
}
