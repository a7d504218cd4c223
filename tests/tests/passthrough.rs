//! Other tenants' traffic through a node with movarto attached: a catalogue
//! of odd but legal and odd and illegal frames, none for a service, is sent
//! raw through site A to another host behind it, once with nothing attached
//! (the kernel's own behaviour) and then with movarto attached in every mode.
//! What arrives at the other host, byte for byte, must be the same each time,
//! and so must what A's own UDP socket on the GUE port receives from a
//! non-peer. Root only; namespaces are the test's own.
//!
//! ```text
//! sender 198.51.100.7 --uplink-- site A (TA 203.0.113.1) --o0-- other 192.0.2.50 (no service)
//!        2001:db8:1::7                 \--vm0-- guest 192.0.2.10 (H)      2001:db8:2::50
//! ```

use std::{
    collections::BTreeMap,
    io,
    mem::{size_of, zeroed},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, UdpSocket},
    os::fd::AsRawFd as _,
    time::{Duration, Instant},
};

use etherparse::PacketBuilder;
use movarto_common::{
    config::Mode,
    counters::Counter,
    ids::{MacAddr, SessionToken},
    net::proto,
};
use movarto_lab::netns::{Netns, in_netns, veth};
use movarto_tests::raw_socket::{ifindex, packet_socket, send_frame};
use movarto_tests::{
    require_root,
    site::{attach_in, mac, sh},
};
use movarto_user::datapath::{CounterSnapshot, Pinned, SiteConfig};

const SENDER4: [u8; 4] = [198, 51, 100, 7];
const OTHER4: [u8; 4] = [192, 0, 2, 50];
const SENDER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 7);
const OTHER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 0x50);
const HOME: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const NEW: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 10);
const TA: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
const TB: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 2);
const TOKEN: u64 = 0x7061_7373_2d74_6872;
const GUE_PORT: u16 = 6080;

const SENDER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x5e, 0x07];
const UPLINK_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x0a, 0x01];
const OTHER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x0e, 0x50];
const VM_MAC: [u8; 6] = [0x52, 0x54, 0, 0, 0, 0x10];
const GW_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];

/// Bound on one run: the end marker arrives in milliseconds.
const RUN_TIMEOUT: Duration = Duration::from_secs(10);
const END_MARKER: &[u8] = b"movarto passthrough: end of run";

struct Lab {
    sender: Netns,
    a: Netns,
    other: Netns,
    _guest: Netns,
    uplink: String,
}

fn lab() -> Lab {
    let uplink = format!("pt{}", std::process::id() % 100_000);
    let l = Lab {
        sender: Netns::new("ptsend").expect("netns"),
        a: Netns::new("ptsitea").expect("netns"),
        other: Netns::new("ptother").expect("netns"),
        _guest: Netns::new("ptguest").expect("netns"),
        uplink,
    };
    for key in [
        "net.ipv4.conf.all.forwarding=1",
        "net.ipv6.conf.all.forwarding=1",
    ] {
        l.a.run("sysctl", &["-qw", key]).expect("sysctl");
    }
    veth(&l.sender, "s0", &l.a, &l.uplink).expect("veth");
    veth(&l.a, "o0", &l.other, "eth0").expect("veth");
    veth(&l._guest, "eth0", &l.a, "vm0").expect("veth");

    sh(
        &l.sender,
        &["link", "set", "s0", "address", &mac(SENDER_MAC)],
    );
    sh(&l.sender, &["addr", "add", "198.51.100.7/24", "dev", "s0"]);
    sh(
        &l.sender,
        &["addr", "add", "2001:db8:1::7/64", "dev", "s0", "nodad"],
    );

    let up = l.uplink.as_str();
    sh(&l.a, &["link", "set", up, "address", &mac(UPLINK_MAC)]);
    sh(&l.a, &["addr", "add", "198.51.100.1/24", "dev", up]);
    sh(&l.a, &["addr", "add", &format!("{TA}/24"), "dev", up]);
    sh(
        &l.a,
        &["addr", "add", "2001:db8:1::1/64", "dev", up, "nodad"],
    );
    // XDP on a veth turns on its NAPI; without GRO it cannot merge frames,
    // so with and without movarto the kernel sees the same frames.
    l.a.run("ethtool", &["-K", up, "gro", "off"])
        .expect("ethtool");

    // The other host: no address (its kernel stays silent), a known MAC.
    sh(
        &l.other,
        &["link", "set", "eth0", "address", &mac(OTHER_MAC)],
    );
    l.other
        .run("sysctl", &["-qw", "net.ipv6.conf.eth0.disable_ipv6=1"])
        .expect("sysctl");
    sh(&l.a, &["addr", "add", "192.0.2.49/28", "dev", "o0"]);
    sh(
        &l.a,
        &["addr", "add", "2001:db8:2::1/64", "dev", "o0", "nodad"],
    );
    for addr in ["192.0.2.50", "2001:db8:2::50"] {
        sh(
            &l.a,
            &[
                "neigh",
                "replace",
                addr,
                "lladdr",
                &mac(OTHER_MAC),
                "dev",
                "o0",
                "nud",
                "permanent",
            ],
        );
    }

    // The service H, real, on its own veth.
    sh(&l.a, &["link", "set", "vm0", "address", &mac(GW_MAC)]);
    sh(&l.a, &["addr", "add", "192.0.2.1/28", "dev", "vm0"]);
    sh(&l._guest, &["link", "set", "eth0", "address", &mac(VM_MAC)]);
    sh(
        &l._guest,
        &["addr", "add", &format!("{HOME}/28"), "dev", "eth0"],
    );
    sh(&l._guest, &["route", "add", "default", "via", "192.0.2.1"]);
    l
}

/// A's configuration in `mode`, with everything a real one has: `H`, `N`, a
/// peer and a token.
fn site(mode: Mode) -> SiteConfig {
    SiteConfig::new(mode, IpAddr::V4(HOME))
        .with_new_addr(Some(IpAddr::V4(NEW)))
        .with_tunnel(TA, TB, SessionToken(TOKEN))
        .with_macs(MacAddr(VM_MAC), MacAddr(GW_MAC))
}

// ---- the catalogue ----

fn set_be16(frame: &mut [u8], at: usize, value: usize) {
    let v = u16::try_from(value).expect("fits u16");
    frame[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

/// Rewrites the IPv4 header checksum after an edit (over the header the IHL
/// names, or 20 bytes if it names less), so that A's kernel judges the edit
/// and not the checksum.
fn fix_ipv4_checksum(frame: &mut [u8]) {
    let ihl = (usize::from(frame[14] & 0x0f) * 4).max(20);
    let end = (14 + ihl).min(frame.len());
    frame[24..26].copy_from_slice(&[0, 0]);
    let mut sum = 0u32;
    for pair in frame[14..end].chunks(2) {
        let hi = u32::from(pair[0]) << 8;
        sum += hi | pair.get(1).copied().map_or(0, u32::from);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    let check = !(sum as u16);
    frame[24..26].copy_from_slice(&check.to_be_bytes());
}

fn v4() -> etherparse::PacketBuilderStep<etherparse::IpHeaders> {
    PacketBuilder::ethernet2(SENDER_MAC, UPLINK_MAC).ipv4(SENDER4, OTHER4, 64)
}

fn v6() -> etherparse::PacketBuilderStep<etherparse::IpHeaders> {
    PacketBuilder::ethernet2(SENDER_MAC, UPLINK_MAC).ipv6(SENDER6.octets(), OTHER6.octets(), 64)
}

fn tcp4(port: u16, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    v4().tcp(port, 80, 1, 64240)
        .syn()
        .write(&mut out, payload)
        .expect("build");
    out
}

fn udp4(port: u16, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    v4().udp(port, 53).write(&mut out, payload).expect("build");
    out
}

fn tcp6(port: u16, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    v6().tcp(port, 80, 1, 64240)
        .syn()
        .write(&mut out, payload)
        .expect("build");
    out
}

fn udp6(port: u16, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    v6().udp(port, 53).write(&mut out, payload).expect("build");
    out
}

/// An IPv4 frame edited by `edit`, its header checksum made right again.
fn edited4(mut frame: Vec<u8>, edit: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    edit(&mut frame);
    fix_ipv4_checksum(&mut frame);
    frame
}

/// Inserts 8-byte IPv6 extension headers of `kinds` after the fixed header
/// of a well-formed IPv6 frame; a fragment header gets `fragment` (offset in
/// 8-byte units and the M flag).
fn with_ipv6_ext(frame: &[u8], kinds: &[u8], fragment: (u16, bool)) -> Vec<u8> {
    let upper = frame[14 + 6];
    let mut out = frame[..14 + 40].to_vec();
    out[14 + 6] = kinds.first().copied().unwrap_or(upper);
    for (i, kind) in kinds.iter().enumerate() {
        let next = kinds.get(i + 1).copied().unwrap_or(upper);
        if *kind == proto::FRAGMENT {
            let off = ((fragment.0 << 3) | u16::from(fragment.1)).to_be_bytes();
            out.extend_from_slice(&[next, 0, off[0], off[1], 0, 0, 0, 42]);
        } else {
            // Hdr Ext Len 0 (8 bytes), then a PadN option filling the rest.
            out.extend_from_slice(&[next, 0, 1, 4, 0, 0, 0, 0]);
        }
    }
    out.extend_from_slice(&frame[14 + 40..]);
    let payload_len = out.len() - 14 - 40;
    set_be16(&mut out, 14 + 4, payload_len);
    out
}

/// Odd but legal and odd and illegal frames from the sender, none for a
/// service: all to the other host but the last, which is UDP to A's GUE
/// endpoint and port from a non-peer. Each has its own source port.
fn catalogue() -> Vec<(&'static str, Vec<u8>)> {
    let ext5 = [
        proto::HOPOPTS,
        proto::DSTOPTS,
        proto::ROUTING,
        proto::DSTOPTS,
        proto::DSTOPTS,
    ];
    let mut ext8 = vec![proto::HOPOPTS, proto::ROUTING];
    ext8.extend([proto::DSTOPTS; 6]);
    let gue_to_a = {
        let mut out = Vec::new();
        PacketBuilder::ethernet2(SENDER_MAC, UPLINK_MAC)
            .ipv4(SENDER4, TA.octets(), 64)
            .udp(41099, GUE_PORT)
            // GUE version 0, hlen 2, proto 4, a token, and not an IP packet.
            .write(&mut out, b"\x02\x04\x00\x00tokentokgue from a non-peer")
            .expect("build");
        out
    };
    vec![
        ("ipv4 tcp", tcp4(41000, b"plain")),
        (
            "ipv4 options",
            edited4(tcp4(41001, b"options"), |f| {
                // IHL 6: NOP NOP NOP EOL before TCP.
                let tcp = f.split_off(34);
                f.extend_from_slice(&[1, 1, 1, 0]);
                f.extend(tcp);
                f[14] = 0x46;
                let total = f.len() - 14;
                set_be16(f, 16, total);
            }),
        ),
        (
            "ipv4 tiny first fragment",
            edited4(tcp4(41002, b""), |f| {
                f.truncate(14 + 20 + 8);
                set_be16(f, 16, 28);
                set_be16(f, 20, 0x2000);
            }),
        ),
        (
            "ipv4 non-first fragment",
            edited4(udp4(41003, b"a later fragment"), |f| set_be16(f, 20, 185)),
        ),
        (
            "ipv4 middle fragment",
            edited4(udp4(41004, b"a middle fragment"), |f| {
                set_be16(f, 20, 0x2000 | 3)
            }),
        ),
        (
            "ipv4 unknown protocol",
            edited4(udp4(41005, b"not udp at all"), |f| f[23] = 253),
        ),
        (
            "ipv4 unknown protocol, no payload",
            edited4(udp4(41006, b""), |f| {
                f.truncate(14 + 20);
                f[23] = 253;
                set_be16(f, 16, 20);
            }),
        ),
        ("ipv4 udp, no payload", udp4(41007, b"")),
        (
            "ipv4 tcp data offset 2",
            edited4(tcp4(41008, b"abc"), |f| f[34 + 12] = 0x20),
        ),
        (
            "ipv4 tcp data offset 15",
            edited4(tcp4(41009, b""), |f| f[34 + 12] = 0xf0),
        ),
        (
            "ipv4 udp header cut short",
            edited4(udp4(41010, b""), |f| {
                f.truncate(14 + 20 + 4);
                set_be16(f, 16, 24);
            }),
        ),
        (
            "ipv4 udp length past the packet",
            edited4(udp4(41011, b"short"), |f| set_be16(f, 34 + 4, 200)),
        ),
        (
            "ipv4 icmp cut short",
            edited4(udp4(41012, b""), |f| {
                f.truncate(14 + 20 + 4);
                f[23] = proto::ICMP;
                f[34..38].copy_from_slice(&[8, 0, 0, 0]);
                set_be16(f, 16, 24);
            }),
        ),
        (
            "ipv4 total length past the frame",
            edited4(tcp4(41013, b"abc"), |f| {
                let claimed = f.len() - 14 + 100;
                set_be16(f, 16, claimed);
            }),
        ),
        ("ipv4 ihl 4", edited4(tcp4(41014, b"abc"), |f| f[14] = 0x44)),
        (
            "ipv4 version 6",
            edited4(tcp4(41015, b"abc"), |f| f[14] = 0x65),
        ),
        (
            "ipv4 with ethernet padding",
            edited4(udp4(41016, b""), |f| f.resize(60, 0)),
        ),
        (
            "ethernet only, ipv4 ethertype",
            tcp4(41017, b"")[..14].to_vec(),
        ),
        (
            "ipv4 header cut short",
            tcp4(41018, b"")[..14 + 12].to_vec(),
        ),
        ("ipv6 tcp", tcp6(41020, b"plain")),
        (
            "ipv6 five extension headers",
            with_ipv6_ext(&tcp6(41021, b"five"), &ext5, (0, false)),
        ),
        (
            "ipv6 eight extension headers",
            with_ipv6_ext(&udp6(41022, b"eight"), &ext8, (0, false)),
        ),
        (
            "ipv6 first fragment",
            with_ipv6_ext(&udp6(41023, b"first"), &[proto::FRAGMENT], (0, true)),
        ),
        (
            "ipv6 non-first fragment",
            with_ipv6_ext(&udp6(41024, b"later"), &[proto::FRAGMENT], (100, false)),
        ),
        (
            "ipv6 fragment after three headers",
            with_ipv6_ext(
                &udp6(41025, b"deep"),
                &[
                    proto::HOPOPTS,
                    proto::DSTOPTS,
                    proto::ROUTING,
                    proto::FRAGMENT,
                ],
                (0, true),
            ),
        ),
        ("ipv6 no next header", {
            let mut f = udp6(41026, b"")[..14 + 40].to_vec();
            f[14 + 6] = 59;
            set_be16(&mut f, 14 + 4, 0);
            f
        }),
        ("ipv6 unknown protocol", {
            let mut f = udp6(41027, b"not udp");
            f[14 + 6] = 253;
            f
        }),
        ("ipv6 tcp data offset 2", {
            let mut f = tcp6(41028, b"abc");
            f[54 + 12] = 0x20;
            f
        }),
        ("ipv6 udp header cut short", {
            let mut f = udp6(41029, b"")[..14 + 40 + 4].to_vec();
            set_be16(&mut f, 14 + 4, 4);
            f
        }),
        ("ipv6 payload length past the frame", {
            let mut f = tcp6(41030, b"abc");
            set_be16(&mut f, 14 + 4, 1000);
            f
        }),
        ("ipv6 version 4", {
            let mut f = tcp6(41031, b"abc");
            f[14] = 0x40;
            f
        }),
        ("ipv6 extension header past the payload", {
            let mut f = with_ipv6_ext(&tcp6(41032, b""), &[proto::HOPOPTS], (0, false));
            f[14 + 40 + 1] = 200;
            f
        }),
        ("udp to A's gue port from a non-peer", gue_to_a),
    ]
}

/// The frame that ends a run; the capture stops when it sees it.
fn end_marker() -> Vec<u8> {
    udp4(9, END_MARKER)
}

/// Keeps this thread on the CPU it runs on: frames sent from one CPU go
/// through one backlog queue, so they reach A, and the other host, in order.
fn pin_to_this_cpu() {
    // SAFETY: plain syscalls on this thread with a cpu_set_t we own.
    unsafe {
        let cpu = libc::sched_getcpu();
        assert!(cpu >= 0, "sched_getcpu: {}", io::Error::last_os_error());
        let mut set: libc::cpu_set_t = zeroed();
        libc::CPU_SET(cpu as usize, &mut set);
        let ret = libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set);
        assert_eq!(ret, 0, "sched_setaffinity: {}", io::Error::last_os_error());
    }
}

/// Whether a frame captured at the other host is one the sender sent.
fn from_sender(frame: &[u8]) -> bool {
    match frame.get(12..14) {
        Some([0x08, 0x00]) => frame.get(26..30) == Some(&SENDER4[..]),
        Some([0x86, 0xdd]) => frame.get(22..38) == Some(&SENDER6.octets()[..]),
        _ => false,
    }
}

fn is_end_marker(frame: &[u8]) -> bool {
    frame.ends_with(END_MARKER)
}

/// What one run delivered: the sender's frames at the other host (count by
/// bytes) and the datagrams A's socket on the GUE port received.
#[derive(Debug, PartialEq, Eq)]
struct Delivered {
    at_other: BTreeMap<Vec<u8>, usize>,
    at_a_gue_port: Vec<Vec<u8>>,
}

/// Sends the catalogue from the sender and collects what arrives.
fn run_catalogue(l: &Lab, gue_socket: &UdpSocket) -> Delivered {
    let capture = in_netns(&l.other, || packet_socket("eth0", libc::ETH_P_ALL as u16))
        .expect("capture socket");
    let (sender, s0) =
        in_netns(&l.sender, || (packet_socket("s0", 0), ifindex("s0"))).expect("sender socket");
    let frames = catalogue();
    std::thread::scope(|scope| {
        let sending = scope.spawn(|| {
            pin_to_this_cpu();
            for (_, frame) in &frames {
                send_frame(&sender, s0, frame);
            }
            send_frame(&sender, s0, &end_marker());
        });
        let mut at_other = BTreeMap::new();
        let deadline = Instant::now() + RUN_TIMEOUT;
        let mut buf = vec![0u8; 65536];
        loop {
            assert!(
                Instant::now() < deadline,
                "the end marker did not reach the other host within {RUN_TIMEOUT:?}"
            );
            // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
            let mut from: libc::sockaddr_ll = unsafe { zeroed() };
            let mut from_len = size_of::<libc::sockaddr_ll>() as u32;
            // SAFETY: the buffer and the address are valid for the lengths given.
            let n = unsafe {
                libc::recvfrom(
                    capture.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    0,
                    (&raw mut from).cast(),
                    &mut from_len,
                )
            };
            if n < 0 {
                let err = io::Error::last_os_error();
                assert!(
                    matches!(
                        err.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                    ),
                    "capture: {err}"
                );
                continue;
            }
            let frame = &buf[..n as usize];
            if from.sll_pkttype == libc::PACKET_OUTGOING || !from_sender(frame) {
                continue;
            }
            if is_end_marker(frame) {
                break;
            }
            *at_other.entry(frame.to_vec()).or_insert(0) += 1;
        }
        sending.join().expect("sender thread");
        // The datagram to A was sent before the end marker, on the same queue.
        let mut at_a_gue_port = Vec::new();
        let mut buf = [0u8; 2048];
        while let Ok(n) = gue_socket.recv(&mut buf) {
            at_a_gue_port.push(buf[..n].to_vec());
        }
        Delivered {
            at_other,
            at_a_gue_port,
        }
    })
}

/// The catalogue entry a frame captured at the other host was sent as: the
/// same bytes but for what a router changes (TTL and header checksum, hop limit).
fn name_of(frame: &[u8]) -> &'static str {
    catalogue()
        .into_iter()
        .find(|(_, sent)| {
            let routed: &[usize] = if sent[12..14] == [0x86, 0xdd] {
                &[21]
            } else {
                &[22, 24, 25]
            };
            sent.len() >= frame.len()
                && sent[..frame.len()]
                    .iter()
                    .zip(frame)
                    .enumerate()
                    .all(|(i, (a, b))| a == b || routed.contains(&i) || i < 12)
        })
        .map_or("(not in the catalogue)", |(name, _)| name)
}

fn names(frames: &BTreeMap<Vec<u8>, usize>) -> Vec<&'static str> {
    frames.keys().map(|f| name_of(f)).collect()
}

/// Asserts that `got` delivered exactly what `baseline` did, naming the
/// frames that differ.
fn assert_same(baseline: &Delivered, got: &Delivered, run: &str) {
    let differ = |a: &BTreeMap<Vec<u8>, usize>, b: &BTreeMap<Vec<u8>, usize>| {
        a.iter()
            .filter(|(frame, n)| b.get(*frame) != Some(*n))
            .map(|(frame, n)| format!("{} (x{n})", name_of(frame)))
            .collect::<Vec<_>>()
    };
    let missing = differ(&baseline.at_other, &got.at_other);
    let extra = differ(&got.at_other, &baseline.at_other);
    assert!(
        missing.is_empty() && extra.is_empty(),
        "{run}: at the other host, missing or fewer {missing:?}, unexpected or more {extra:?}"
    );
    assert_eq!(
        got.at_a_gue_port, baseline.at_a_gue_port,
        "{run}: datagrams at A's GUE port"
    );
}

fn drops(c: &CounterSnapshot) -> u64 {
    Counter::ALL
        .iter()
        .filter(|k| k.is_drop())
        .map(|k| c.get(*k))
        .sum()
}

#[test]
fn other_tenants_frames_arrive_as_without_movarto_in_every_mode() {
    require_root();
    let l = lab();
    let gue_socket = in_netns(&l.a, || {
        let s = UdpSocket::bind((TA, GUE_PORT)).expect("bind the GUE port at A");
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .expect("timeout");
        s
    })
    .expect("socket at A");

    let baseline = run_catalogue(&l, &gue_socket);
    eprintln!(
        "without movarto: {} of {} frames reach the other host, {} datagram(s) A's GUE port",
        baseline.at_other.values().sum::<usize>(),
        catalogue().len(),
        baseline.at_a_gue_port.len()
    );
    // Not vacuous: the kernel forwards shapes movarto's parser rejects.
    let forwarded = names(&baseline.at_other);
    eprintln!("forwarded by the kernel: {forwarded:?}");
    for name in [
        "ipv4 tiny first fragment",
        "ipv4 tcp data offset 2",
        "ipv4 tcp data offset 15",
        "ipv4 udp header cut short",
        "ipv6 five extension headers",
        "ipv6 eight extension headers",
        "ipv6 tcp data offset 2",
    ] {
        assert!(forwarded.contains(&name), "the kernel forwards {name}");
    }
    assert_eq!(baseline.at_a_gue_port.len(), 1, "{baseline:?}");

    let _attached = attach_in(&l.a, &l.uplink, "vm0", site(Mode::Idle));
    let mut pinned = Pinned::open(&l.uplink).expect("open pins");
    for mode in Mode::ALL {
        pinned.reconfigure(&site(mode)).expect("switch mode");
        let before = pinned.counters().expect("counters");
        let got = run_catalogue(&l, &gue_socket);
        let after = pinned.counters().expect("counters");
        let delta = |c: Counter| after.get(c) - before.get(c);
        assert_same(&baseline, &got, mode.name());
        assert!(
            delta(Counter::Packets) >= catalogue().len() as u64,
            "{mode}: movarto saw the frames"
        );
        assert!(delta(Counter::PassMalformed) > 0, "{mode}: pass_malformed");
        assert_eq!(
            drops(&after),
            drops(&before),
            "{mode}: movarto dropped nothing"
        );
        let foreign = delta(Counter::PassGueForeignSource);
        if mode.uses_tunnel() {
            assert_eq!(foreign, 1, "{mode}: pass_gue_foreign_source");
        } else {
            assert_eq!(foreign, 0, "{mode}: pass_gue_foreign_source");
        }
    }
    drop(_attached);

    // The kernel's behaviour did not drift while movarto was attached.
    assert_same(
        &baseline,
        &run_catalogue(&l, &gue_socket),
        "after detaching",
    );
}
