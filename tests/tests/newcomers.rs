//! Newcomers to `N` right after the switch, live, in network namespaces: site B in
//! `receive` holds the pre-move flows the other site handed over (as after a
//! switchover's snapshot), and a client opens many connections to `N`, some from the
//! very client ports those pre-move flows used. Every one must connect and echo:
//! a packet to `N` makes its flow a NAT flow, whatever entry had its 5-tuple.
//!
//! ```text
//! client 198.51.100.7 -- wan -- 203.0.113.129 (TB) site B --vm0-- guest 192.0.2.10 (H)
//!                                 N = 198.18.0.10
//! ```

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    thread,
    time::Duration,
};

use movarto_common::{
    config::Mode,
    counters::Counter,
    flow::{FlowKey, FlowValue, origin, state},
    ids::{MacAddr, SessionToken},
    net::proto,
};
use movarto_lab::netns::{Netns, veth};
use movarto_tests::{
    require_root,
    site::{attach_in, mac, pass_through_xdp, sh},
};
use movarto_user::datapath::{SiteConfig, flows::monotonic_ns};

const HOME: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const NEW: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 10);
const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
const TA: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
const TB: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 129);
const VM_MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
const GW_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const PORT: u16 = 7;
/// Client ports the pre-move flows used, and as many fresh ones.
const REUSED: std::ops::Range<u16> = 41_000..41_040;
const FRESH: std::ops::Range<u16> = 42_000..42_040;
const IO_TIMEOUT: Duration = Duration::from_secs(5);

#[test]
fn every_newcomer_to_the_new_address_connects_also_on_a_pre_move_flows_port() {
    require_root();
    let uplink = format!("unc{}", std::process::id() % 100_000);
    let client = Netns::new("ncclient").expect("netns");
    let wan = Netns::new("ncwan").expect("netns");
    let b = Netns::new("ncsiteb").expect("netns");
    let guest = Netns::new("ncguest").expect("netns");
    for ns in [&wan, &b] {
        ns.run("sysctl", &["-qw", "net.ipv4.conf.all.forwarding=1"])
            .expect("sysctl");
    }
    veth(&client, "c0", &wan, "wc").expect("veth");
    veth(&wan, "wb", &b, &uplink).expect("veth");
    veth(&guest, "eth0", &b, "vm0").expect("veth");
    sh(&client, &["addr", "add", "198.51.100.7/24", "dev", "c0"]);
    sh(&client, &["route", "add", "default", "via", "198.51.100.1"]);
    sh(&wan, &["addr", "add", "198.51.100.1/24", "dev", "wc"]);
    sh(&wan, &["addr", "add", "203.0.113.254/25", "dev", "wb"]);
    sh(
        &wan,
        &["route", "add", "198.18.0.0/15", "via", "203.0.113.129"],
    );
    sh(&b, &["addr", "add", "203.0.113.129/25", "dev", &uplink]);
    sh(&b, &["route", "add", "default", "via", "203.0.113.254"]);
    sh(&b, &["link", "set", "vm0", "address", &mac(GW_MAC)]);
    sh(&b, &["addr", "add", "192.0.2.1/24", "dev", "vm0"]);
    sh(&guest, &["link", "set", "eth0", "address", &mac(VM_MAC)]);
    sh(&guest, &["addr", "add", "192.0.2.10/24", "dev", "eth0"]);
    sh(&guest, &["route", "add", "default", "via", "192.0.2.1"]);
    // XDP turns an offloaded, unfinished checksum into wire bytes: checksum in software.
    for (ns, dev) in [(&client, "c0"), (&guest, "eth0")] {
        ns.run("ethtool", &["-K", dev, "tx", "off"])
            .expect("ethtool");
    }

    // B's XDP redirects into vm0, whose guest end then needs NAPI.
    let _guest_xdp = pass_through_xdp(&guest, &["eth0"]);

    let site = SiteConfig::new(Mode::Receive, IpAddr::V4(HOME))
        .with_new_addr(Some(IpAddr::V4(NEW)))
        .with_tunnel(TB, TA, SessionToken(0x5eed))
        .with_macs(MacAddr(VM_MAC), MacAddr(GW_MAC));
    let site_b = attach_in(&b, &uplink, "vm0", site);

    // The handed-over pre-move flows: established, live, one per reused port.
    let now = monotonic_ns().expect("clock");
    let premove: Vec<(FlowKey, FlowValue)> = REUSED
        .map(|port| {
            let key = FlowKey::new(
                (IpAddr::V4(HOME), PORT),
                (IpAddr::V4(CLIENT), port),
                proto::TCP,
            )
            .expect("key");
            let value = FlowValue {
                first_seen_ns: now,
                last_seen_ns: now,
                state: state::SYN_SEEN
                    | state::ESTABLISHED
                    | state::SEEN_FROM_PEER
                    | state::SEEN_FROM_SERVICE,
                origin: origin::TUNNELLED,
                ..FlowValue::default()
            };
            (key, value)
        })
        .collect();
    site_b
        .pinned()
        .expect("pins")
        .insert_flows(&premove)
        .expect("hand over the pre-move flows");

    let listener = {
        let _in = guest.enter().expect("enter");
        TcpListener::bind((Ipv4Addr::UNSPECIFIED, PORT)).expect("bind")
    };
    thread::spawn(move || {
        for mut conn in listener.incoming().flatten() {
            thread::spawn(move || {
                let _ = conn.set_read_timeout(Some(IO_TIMEOUT));
                let mut buf = [0u8; 64];
                if let Ok(n) = conn.read(&mut buf) {
                    let _ = conn.write_all(&buf[..n]);
                }
            });
        }
    });

    // All at once, as newcomers arrive after a DNS switch; each from its own port.
    let attempts: Vec<_> = REUSED
        .chain(FRESH)
        .map(|port| {
            let sock = {
                let _in = client.enter().expect("enter");
                bound_socket(port)
            };
            thread::spawn(move || (port, echo(sock)))
        })
        .collect();
    let failed: Vec<(u16, String)> = attempts
        .into_iter()
        .map(|t| t.join().expect("client thread"))
        .filter_map(|(port, r)| r.err().map(|e| (port, e)))
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {} newcomers to N failed: {failed:?}",
        failed.len(),
        REUSED.len() + FRESH.len()
    );

    let pinned = site_b.pinned().expect("pins");
    let counters = pinned.counters().expect("counters");
    assert_eq!(
        counters.get(Counter::FlowReused),
        REUSED.len() as u64,
        "each reused 5-tuple became a NAT flow once"
    );
    assert_eq!(
        counters.get(Counter::TunnelOut),
        0,
        "no reply took the tunnel"
    );
    let flows = pinned.flows().expect("flows");
    for port in REUSED.chain(FRESH) {
        let (_, v) = flows
            .iter()
            .find(|(k, _)| k.peer().map(|p| p.1) == Some(port))
            .unwrap_or_else(|| panic!("no flow for port {port}"));
        assert_eq!(v.origin, origin::NAT, "port {port}");
    }
}

/// A TCP socket of the current network namespace, bound to the client's `port`.
fn bound_socket(port: u16) -> std::os::fd::OwnedFd {
    use std::os::fd::FromRawFd as _;
    // SAFETY: plain socket(2); the descriptor is owned from here on.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is a fresh socket nobody else owns.
    let owned = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(CLIENT).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: `addr` is a valid sockaddr_in of the size given.
    let ret = unsafe {
        libc::bind(
            fd,
            (&addr as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    assert_eq!(ret, 0, "bind {port}: {}", std::io::Error::last_os_error());
    owned
}

/// Connects the bound socket to `N`, sends a line and expects it back.
fn echo(sock: std::os::fd::OwnedFd) -> Result<(), String> {
    let fd = std::os::fd::AsRawFd::as_raw_fd(&sock);
    let to = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: PORT.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(NEW).to_be(),
        },
        sin_zero: [0; 8],
    };
    let timeout = libc::timeval {
        tv_sec: IO_TIMEOUT.as_secs() as libc::time_t,
        tv_usec: 0,
    };
    // SAFETY: valid socket, option and sizes; SO_SNDTIMEO bounds connect(2) too.
    unsafe {
        for opt in [libc::SO_SNDTIMEO, libc::SO_RCVTIMEO] {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                (&timeout as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            );
        }
    }
    // SAFETY: `to` is a valid sockaddr_in of the size given.
    let ret = unsafe {
        libc::connect(
            fd,
            (&to as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if ret != 0 {
        return Err(format!("connect: {}", std::io::Error::last_os_error()));
    }
    let mut stream = TcpStream::from(sock);
    let peer = stream.peer_addr().map_err(|e| e.to_string())?;
    if peer != SocketAddr::new(IpAddr::V4(NEW), PORT) {
        return Err(format!("connected to {peer}"));
    }
    stream
        .write_all(b"newcomer\n")
        .map_err(|e| format!("write: {e}"))?;
    let mut back = [0u8; 9];
    stream
        .read_exact(&mut back)
        .map_err(|e| format!("read: {e}"))?;
    if &back != b"newcomer\n" {
        return Err(format!("echoed {back:?}"));
    }
    Ok(())
}
