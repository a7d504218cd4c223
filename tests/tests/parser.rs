//! The parser under BPF_PROG_TEST_RUN: every frame is built here, run
//! through both hooks, and the verdict, counters and (for malformed frames)
//! the bytes that leave are asserted. Root only.

use std::net::{IpAddr, Ipv4Addr};

use etherparse::PacketBuilder;
use movarto_common::{
    config::Mode,
    counters::Counter,
    ids::{MacAddr, SessionToken},
    net::proto,
};
use movarto_tests::{
    Hook, assert_counter_delta, require_root, run_frame, run_frame_out, run_frame_repeat,
};
use movarto_user::datapath::{Datapath, SiteConfig};

const MAC_A: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0a];
const MAC_B: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0b];
const CLIENT4: [u8; 4] = [198, 51, 100, 7];
const SERVICE4: [u8; 4] = [192, 0, 2, 10];
const CLIENT6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7];
const SERVICE6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 10];

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;

/// Runs a well-formed `frame` through both hooks with no configuration: it
/// passes, unchanged, and `counters` (besides `packets`) change by what they say.
fn check(frame: &[u8], counters: &[(Counter, u64)]) {
    require_root();
    let datapath = Datapath::load().expect("load datapath");
    for hook in [Hook::Uplink, Hook::VmFacing] {
        let before = datapath.counters().expect("read counters");
        let (ret, out) = run_frame_out(&datapath, hook, frame).expect("test run");
        let after = datapath.counters().expect("read counters");
        let want = match hook {
            Hook::Uplink => XDP_PASS,
            Hook::VmFacing => TC_ACT_OK,
        };
        assert_eq!(
            ret, want,
            "{hook:?} returned {ret}, expected a pass ({want})"
        );
        assert_eq!(out, frame, "{hook:?} changed the frame");
        let mut all = vec![(Counter::Packets, 1)];
        all.extend_from_slice(counters);
        assert_counter_delta(&before, &after, &all);
    }
}

fn v4() -> etherparse::PacketBuilderStep<etherparse::IpHeaders> {
    PacketBuilder::ethernet2(MAC_A, MAC_B).ipv4(CLIENT4, SERVICE4, 64)
}

fn v6() -> etherparse::PacketBuilderStep<etherparse::IpHeaders> {
    PacketBuilder::ethernet2(MAC_A, MAC_B).ipv6(CLIENT6, SERVICE6, 64)
}

fn build<T>(builder: PacketBuilder_<T>, payload: &[u8]) -> Vec<u8>
where
    PacketBuilder_<T>: Writes,
{
    builder.write_all(payload)
}

// etherparse's final builder steps have different types; this trait lets one helper write them all.
type PacketBuilder_<T> = etherparse::PacketBuilderStep<T>;
trait Writes {
    fn write_all(self, payload: &[u8]) -> Vec<u8>;
}
macro_rules! impl_writes {
    ($($t:ty),*) => {$(
        impl Writes for etherparse::PacketBuilderStep<$t> {
            fn write_all(self, payload: &[u8]) -> Vec<u8> {
                let mut out = Vec::with_capacity(self.size(payload.len()));
                self.write(&mut out, payload).expect("build frame");
                out
            }
        }
    )*};
}
impl_writes!(
    etherparse::TcpHeader,
    etherparse::UdpHeader,
    etherparse::Icmpv4Header,
    etherparse::Icmpv6Header
);

fn tcp4(payload: &[u8]) -> Vec<u8> {
    build(v4().tcp(40000, 80, 1, 64240).syn(), payload)
}

fn tcp6(payload: &[u8]) -> Vec<u8> {
    build(v6().tcp(40000, 80, 1, 64240).syn(), payload)
}

fn udp6(payload: &[u8]) -> Vec<u8> {
    build(v6().udp(5353, 53), payload)
}

const IP4: usize = 14;
const IP6: usize = 14;

fn set_be16(frame: &mut [u8], at: usize, value: usize) {
    let v = u16::try_from(value).expect("fits u16");
    frame[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

/// Inserts IPv6 extension headers (each 8 bytes) between the fixed header and
/// the payload of a well-formed IPv6 frame, fixing the next-header chain and
/// the payload length. A fragment header gets `fragment_offset` (in 8-byte units).
fn with_ipv6_ext(frame: &[u8], kinds: &[u8], fragment_offset: u16) -> Vec<u8> {
    let upper = frame[IP6 + 6];
    let mut out = frame[..IP6 + 40].to_vec();
    out[IP6 + 6] = kinds.first().copied().unwrap_or(upper);
    for (i, kind) in kinds.iter().enumerate() {
        let next = kinds.get(i + 1).copied().unwrap_or(upper);
        if *kind == proto::FRAGMENT {
            let off = (fragment_offset << 3).to_be_bytes();
            out.extend_from_slice(&[next, 0, off[0], off[1], 0, 0, 0, 42]);
        } else {
            // Hdr Ext Len 0 (8 bytes), then a PadN option filling the rest.
            out.extend_from_slice(&[next, 0, 1, 4, 0, 0, 0, 0]);
        }
    }
    out.extend_from_slice(&frame[IP6 + 40..]);
    let payload_len = out.len() - IP6 - 40;
    set_be16(&mut out, IP6 + 4, payload_len);
    out
}

// ---- well-formed frames are passed and classified ----

#[test]
fn ipv4_tcp_passes() {
    check(
        &tcp4(b"hello"),
        &[(Counter::PassIpv4, 1), (Counter::L4Tcp, 1)],
    );
}

#[test]
fn ipv4_udp_passes() {
    let frame = build(v4().udp(5353, 53), b"query");
    check(&frame, &[(Counter::PassIpv4, 1), (Counter::L4Udp, 1)]);
}

#[test]
fn ipv4_icmp_passes() {
    let frame = build(v4().icmpv4_echo_request(1, 1), b"ping");
    check(&frame, &[(Counter::PassIpv4, 1), (Counter::L4Icmp, 1)]);
}

#[test]
fn ipv6_tcp_passes() {
    check(
        &tcp6(b"hello"),
        &[(Counter::PassIpv6, 1), (Counter::L4Tcp, 1)],
    );
}

#[test]
fn ipv6_udp_passes() {
    check(&udp6(b"q"), &[(Counter::PassIpv6, 1), (Counter::L4Udp, 1)]);
}

#[test]
fn ipv6_icmp_passes() {
    let frame = build(v6().icmpv6_echo_request(1, 1), b"ping");
    check(&frame, &[(Counter::PassIpv6, 1), (Counter::L4Icmp, 1)]);
}

#[test]
fn arp_is_passed_as_non_ip() {
    let mut frame = Vec::new();
    frame.extend_from_slice(&[0xff; 6]);
    frame.extend_from_slice(&MAC_A);
    frame.extend_from_slice(&[0x08, 0x06]);
    // Request: Ethernet/IPv4, who has 192.0.2.10 tell 198.51.100.7.
    frame.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    frame.extend_from_slice(&MAC_A);
    frame.extend_from_slice(&CLIENT4);
    frame.extend_from_slice(&[0; 6]);
    frame.extend_from_slice(&SERVICE4);
    check(&frame, &[(Counter::PassNonIp, 1)]);
}

#[test]
fn ipv4_with_options_is_parsed_past_them() {
    // IHL 6: one 4-byte option (NOP NOP NOP EOL) before TCP.
    let base = tcp4(b"x");
    let mut frame = base[..IP4 + 20].to_vec();
    frame.extend_from_slice(&[1, 1, 1, 0]);
    frame.extend_from_slice(&base[IP4 + 20..]);
    frame[IP4] = 0x46;
    let total = frame.len() - IP4;
    set_be16(&mut frame, IP4 + 2, total);
    check(&frame, &[(Counter::PassIpv4, 1), (Counter::L4Tcp, 1)]);
}

#[test]
fn ethernet_padding_after_ip_packet_is_fine() {
    let mut frame = build(v4().udp(5353, 53), b"");
    frame.resize(60, 0);
    check(&frame, &[(Counter::PassIpv4, 1), (Counter::L4Udp, 1)]);
}

#[test]
fn ipv4_later_fragment_passes_without_l4() {
    let mut frame = tcp4(b"payload");
    // Fragment offset 185 (1480 bytes): what follows the IP header is not a TCP header.
    set_be16(&mut frame, IP4 + 6, 185);
    check(&frame, &[(Counter::PassIpv4, 1), (Counter::L4Fragment, 1)]);
}

#[test]
fn ipv4_first_fragment_is_parsed_as_tcp() {
    let mut frame = tcp4(b"payload");
    set_be16(&mut frame, IP4 + 6, 0x2000); // MF, offset 0
    check(&frame, &[(Counter::PassIpv4, 1), (Counter::L4Tcp, 1)]);
}

#[test]
fn ipv6_extension_headers_are_walked() {
    let frame = with_ipv6_ext(
        &tcp6(b"x"),
        &[proto::HOPOPTS, proto::DSTOPTS, proto::ROUTING],
        0,
    );
    check(&frame, &[(Counter::PassIpv6, 1), (Counter::L4Tcp, 1)]);
}

#[test]
fn ipv6_first_fragment_is_parsed_later_one_is_not() {
    let first = with_ipv6_ext(&udp6(b"abc"), &[proto::FRAGMENT], 0);
    check(&first, &[(Counter::PassIpv6, 1), (Counter::L4Udp, 1)]);
    let later = with_ipv6_ext(&udp6(b"abc"), &[proto::FRAGMENT], 100);
    check(&later, &[(Counter::PassIpv6, 1), (Counter::L4Fragment, 1)]);
}

#[test]
fn ipv6_other_transport_passes() {
    let mut frame = udp6(b"data");
    frame[IP6 + 6] = 132; // SCTP: no header the datapath reads
    check(&frame, &[(Counter::PassIpv6, 1), (Counter::L4Other, 1)]);
}

// ---- malformed frames: the kernel's unless movarto acts on them ----
//
// Each shape is built between given addresses and run through both hooks:
// with no configuration and in every mode, to another host (passed untouched,
// `pass_malformed`), to `H` and `N` on the uplink and from `H` on the
// VM-facing hook (dropped with the reason's counter where the mode acts on
// them: see `acts_on` in the datapath's main.rs).

const OTHER4: [u8; 4] = [192, 0, 2, 50];
const NEW4: [u8; 4] = [198, 18, 0, 10];
const OTHER6: [u8; 16] = [
    0x20, 0x01, 0x0d, 0xb8, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x50,
];
const NEW6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 10];
const TA: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
const TB: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 2);
const TOKEN: u64 = 0x7061_7373_7468_7275;

/// A malformed frame from `src` to `dst`.
type Shape = fn(IpAddr, IpAddr) -> Vec<u8>;

/// Ethernet and an IP header from `src` to `dst`, the transport still to add.
fn ip_between(src: IpAddr, dst: IpAddr) -> etherparse::PacketBuilderStep<etherparse::IpHeaders> {
    let eth = PacketBuilder::ethernet2(MAC_A, MAC_B);
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => eth.ipv4(s.octets(), d.octets(), 64),
        (IpAddr::V6(s), IpAddr::V6(d)) => eth.ipv6(s.octets(), d.octets(), 64),
        _ => panic!("{src} and {dst} differ in family"),
    }
}

fn tcp_between(src: IpAddr, dst: IpAddr, payload: &[u8]) -> Vec<u8> {
    build(ip_between(src, dst).tcp(40000, 80, 1, 64240).syn(), payload)
}

fn udp_between(src: IpAddr, dst: IpAddr, payload: &[u8]) -> Vec<u8> {
    build(ip_between(src, dst).udp(5353, 53), payload)
}

/// Sets the IPv4 total length or the IPv6 payload length to cover `l4_len`
/// bytes after the fixed header.
fn set_ip_len(frame: &mut [u8], l4_len: usize) {
    if frame[12..14] == [0x86, 0xdd] {
        set_be16(frame, IP6 + 4, l4_len);
    } else {
        set_be16(frame, IP4 + 2, 20 + l4_len);
    }
}

/// The offset of the transport header of a frame built by [`ip_between`].
fn l4_at(frame: &[u8]) -> usize {
    if frame[12..14] == [0x86, 0xdd] {
        IP6 + 40
    } else {
        IP4 + 20
    }
}

struct Addrs {
    client: IpAddr,
    other: IpAddr,
    home: IpAddr,
    new: IpAddr,
}

fn addrs(v6: bool) -> Addrs {
    if v6 {
        Addrs {
            client: IpAddr::from(CLIENT6),
            other: IpAddr::from(OTHER6),
            home: IpAddr::from(SERVICE6),
            new: IpAddr::from(NEW6),
        }
    } else {
        Addrs {
            client: IpAddr::from(CLIENT4),
            other: IpAddr::from(OTHER4),
            home: IpAddr::from(SERVICE4),
            new: IpAddr::from(NEW4),
        }
    }
}

/// A site configuration in `mode` for the service `a.home`, with `N`, a
/// tunnel (peer and token) and the VM's MACs, as a real one has.
fn site(mode: Mode, a: &Addrs) -> SiteConfig {
    SiteConfig::new(mode, a.home)
        .with_new_addr(Some(a.new))
        .with_tunnel(TA, TB, SessionToken(TOKEN))
        .with_macs(MacAddr(MAC_B), MacAddr(MAC_A))
}

/// Runs `frame` through `hook` and asserts the verdict, the counters and, for
/// a pass, that the frame leaves exactly as it came.
fn run_malformed(dp: &Datapath, hook: Hook, frame: &[u8], drop: Option<Counter>, what: &str) {
    let before = dp.counters().expect("read counters");
    let (ret, out) = run_frame_out(dp, hook, frame).expect("test run");
    let after = dp.counters().expect("read counters");
    let (want, verdict) = match (hook, drop) {
        (Hook::Uplink, None) => (XDP_PASS, Counter::PassMalformed),
        (Hook::Uplink, Some(reason)) => (XDP_DROP, reason),
        (Hook::VmFacing, None) => (TC_ACT_OK, Counter::PassMalformed),
        (Hook::VmFacing, Some(reason)) => (TC_ACT_SHOT, reason),
    };
    assert_eq!(
        ret, want,
        "{what}: {hook:?} returned {ret}, expected {want}"
    );
    if drop.is_none() {
        assert_eq!(out, frame, "{what}: passed, but changed");
    }
    assert_counter_delta(&before, &after, &[(Counter::Packets, 1), (verdict, 1)]);
}

/// Checks `shape` with no configuration and in every mode. `reason` is the
/// drop counter where movarto acts on it; `None` for a frame whose IP header
/// can't be read (no addresses: it is never movarto's). `tc` is false for
/// frames the kernel's skb test-run refuses (an incomplete IP header).
fn check_malformed(shape: Shape, v6: bool, reason: Option<Counter>, tc: bool) {
    require_root();
    let a = addrs(v6);
    let mut dp = Datapath::load().expect("load datapath");
    let to_other = shape(a.client, a.other);
    let to_home = shape(a.client, a.home);
    let to_new = shape(a.client, a.new);
    let from_other = shape(a.other, a.client);
    let from_home = shape(a.home, a.client);
    let uplink = |dp: &Datapath, acts_on_home: bool, acts_on_new: bool, mode: &str| {
        run_malformed(
            dp,
            Hook::Uplink,
            &to_other,
            None,
            &format!("{mode}: to another host"),
        );
        let drop = |acts: bool| reason.filter(|_| acts);
        run_malformed(
            dp,
            Hook::Uplink,
            &to_home,
            drop(acts_on_home),
            &format!("{mode}: to H"),
        );
        run_malformed(
            dp,
            Hook::Uplink,
            &to_new,
            drop(acts_on_new),
            &format!("{mode}: to N"),
        );
    };
    let vm = |dp: &Datapath, acts_on_home: bool, mode: &str| {
        if !tc {
            let err =
                run_frame(dp, Hook::VmFacing, &from_home).expect_err("kernel refuses a short skb");
            assert!(format!("{err:#}").contains("os error 22"), "{err:#}");
            return;
        }
        run_malformed(
            dp,
            Hook::VmFacing,
            &from_other,
            None,
            &format!("{mode}: from another host"),
        );
        let drop = reason.filter(|_| acts_on_home);
        run_malformed(
            dp,
            Hook::VmFacing,
            &from_home,
            drop,
            &format!("{mode}: from H"),
        );
    };
    uplink(&dp, false, false, "no configuration");
    vm(&dp, false, "no configuration");
    for mode in Mode::ALL {
        dp.set_config(&site(mode, &a)).expect("config");
        let name = mode.name();
        uplink(
            &dp,
            matches!(mode, Mode::Forward | Mode::Receive | Mode::Nat),
            // `forward` tunnels traffic to `N` too (site B after a move back).
            matches!(mode, Mode::Forward | Mode::Receive | Mode::Nat),
            name,
        );
        // `forward` and `return` may tunnel the VM's packets (a move back).
        vm(
            &dp,
            matches!(
                mode,
                Mode::Receive | Mode::Nat | Mode::Return | Mode::Forward
            ),
            name,
        );
    }
    // Track mode records flows only of packets it accepts.
    assert!(dp.flows().expect("flows").is_empty());
}

fn check_malformed4(shape: Shape, reason: Counter) {
    check_malformed(shape, false, Some(reason), true);
}

fn check_malformed6(shape: Shape, reason: Counter) {
    check_malformed(shape, true, Some(reason), true);
}

#[test]
fn ethernet_only_ipv4_frame_is_passed() {
    check_malformed(
        |s, d| tcp_between(s, d, b"")[..14].to_vec(),
        false,
        None,
        false,
    );
}

#[test]
fn ipv4_header_cut_short_is_passed() {
    check_malformed(
        |s, d| tcp_between(s, d, b"")[..IP4 + 12].to_vec(),
        false,
        None,
        false,
    );
}

#[test]
fn ipv4_total_length_beyond_frame_is_truncated() {
    check_malformed4(
        |s, d| {
            let mut frame = tcp_between(s, d, b"abc");
            let claimed = frame.len() - IP4 + 100;
            set_be16(&mut frame, IP4 + 2, claimed);
            frame
        },
        Counter::DropTruncated,
    );
}

#[test]
fn ipv4_wrong_version_is_never_movartos() {
    // Version 6 in an IPv4 frame: no address can be trusted, so none is read.
    check_malformed(
        |s, d| {
            let mut frame = tcp_between(s, d, b"abc");
            frame[IP4] = 0x65;
            frame
        },
        false,
        None,
        true,
    );
}

#[test]
fn ipv4_ihl_below_five_is_bad_header() {
    check_malformed4(
        |s, d| {
            let mut frame = tcp_between(s, d, b"abc");
            frame[IP4] = 0x44;
            frame
        },
        Counter::DropBadIpHeader,
    );
}

#[test]
fn ipv4_total_length_below_ihl_is_bad_header() {
    check_malformed4(
        |s, d| {
            let mut frame = tcp_between(s, d, b"abc");
            set_be16(&mut frame, IP4 + 2, 16);
            frame
        },
        Counter::DropBadIpHeader,
    );
}

#[test]
fn ipv4_ihl_beyond_total_length_is_bad_header() {
    check_malformed4(
        |s, d| {
            let mut frame = tcp_between(s, d, b"");
            frame[IP4] = 0x4f; // 60-byte header inside a 40-byte packet
            frame
        },
        Counter::DropBadIpHeader,
    );
}

/// A first IPv4 fragment (MF, offset 0) carrying only 8 bytes of the TCP header.
fn tiny_first_fragment(s: IpAddr, d: IpAddr) -> Vec<u8> {
    let mut frame = tcp_between(s, d, b"")[..IP4 + 20 + 8].to_vec();
    set_ip_len(&mut frame, 8);
    set_be16(&mut frame, IP4 + 6, 0x2000);
    frame
}

#[test]
fn tiny_first_ipv4_fragment_is_truncated() {
    check_malformed4(tiny_first_fragment, Counter::DropTruncated);
}

#[test]
fn tcp_header_cut_short_is_truncated() {
    check_malformed4(
        |s, d| {
            let mut frame = tcp_between(s, d, b"")[..IP4 + 20 + 10].to_vec();
            set_ip_len(&mut frame, 10);
            frame
        },
        Counter::DropTruncated,
    );
}

#[test]
fn tcp_header_past_ip_length_is_truncated() {
    // The frame holds the whole TCP header, but the IP length ends inside it.
    check_malformed4(
        |s, d| {
            let mut frame = tcp_between(s, d, b"");
            set_ip_len(&mut frame, 10);
            frame
        },
        Counter::DropTruncated,
    );
}

/// TCP with data offset 2 (8 bytes): below the 20-byte minimum.
fn tcp_data_offset_2(s: IpAddr, d: IpAddr) -> Vec<u8> {
    let mut frame = tcp_between(s, d, b"abc");
    let at = l4_at(&frame) + 12;
    frame[at] = 0x20;
    frame
}

#[test]
fn tcp_data_offset_below_five_is_bad_l4_header() {
    check_malformed4(tcp_data_offset_2, Counter::DropBadL4Header);
}

#[test]
fn tcp_data_offset_below_five_over_ipv6_is_bad_l4_header() {
    check_malformed6(tcp_data_offset_2, Counter::DropBadL4Header);
}

#[test]
fn tcp_options_past_packet_end_are_truncated() {
    check_malformed4(
        |s, d| {
            let mut frame = tcp_between(s, d, b"");
            frame[IP4 + 20 + 12] = 0xf0; // claims 60 bytes of TCP header, 20 present
            frame
        },
        Counter::DropTruncated,
    );
}

/// UDP whose IP packet ends 4 bytes into the UDP header.
fn udp_header_cut_short(s: IpAddr, d: IpAddr) -> Vec<u8> {
    let frame = udp_between(s, d, b"");
    let mut frame = frame[..l4_at(&frame) + 4].to_vec();
    set_ip_len(&mut frame, 4);
    frame
}

#[test]
fn udp_header_cut_short_is_truncated() {
    check_malformed4(udp_header_cut_short, Counter::DropTruncated);
}

#[test]
fn udp_header_cut_short_over_ipv6_is_truncated() {
    check_malformed6(udp_header_cut_short, Counter::DropTruncated);
}

#[test]
fn icmp_header_cut_short_is_truncated() {
    check_malformed4(
        |s, d| {
            let (IpAddr::V4(s), IpAddr::V4(d)) = (s, d) else {
                panic!("IPv4 only");
            };
            let b = PacketBuilder::ethernet2(MAC_A, MAC_B)
                .ipv4(s.octets(), d.octets(), 64)
                .icmpv4_echo_request(1, 1);
            let mut frame = build(b, b"")[..IP4 + 20 + 4].to_vec();
            set_ip_len(&mut frame, 4);
            frame
        },
        Counter::DropTruncated,
    );
}

#[test]
fn ipv6_header_cut_short_is_passed() {
    check_malformed(
        |s, d| tcp_between(s, d, b"")[..IP6 + 30].to_vec(),
        true,
        None,
        false,
    );
}

#[test]
fn ipv6_payload_length_beyond_frame_is_truncated() {
    check_malformed6(
        |s, d| {
            let mut frame = tcp_between(s, d, b"abc");
            set_be16(&mut frame, IP6 + 4, 1000);
            frame
        },
        Counter::DropTruncated,
    );
}

#[test]
fn ipv6_wrong_version_is_never_movartos() {
    check_malformed(
        |s, d| {
            let mut frame = tcp_between(s, d, b"abc");
            frame[IP6] = 0x40;
            frame
        },
        true,
        None,
        true,
    );
}

#[test]
fn ipv6_extension_header_past_payload_is_truncated() {
    check_malformed6(
        |s, d| {
            let mut frame = with_ipv6_ext(&tcp_between(s, d, b""), &[proto::HOPOPTS], 0);
            frame[IP6 + 40 + 1] = 200; // Hdr Ext Len: 1608 bytes
            frame
        },
        Counter::DropTruncated,
    );
}

#[test]
fn ipv6_with_five_extension_headers_is_too_long_a_chain() {
    check_malformed6(
        |s, d| {
            let kinds = [
                proto::HOPOPTS,
                proto::DSTOPTS,
                proto::ROUTING,
                proto::DSTOPTS,
                proto::DSTOPTS,
            ];
            with_ipv6_ext(&tcp_between(s, d, b"x"), &kinds, 0)
        },
        Counter::DropIpv6ExtChain,
    );
}

#[test]
fn ipv6_with_eight_extension_headers_is_too_long_a_chain() {
    check_malformed6(
        |s, d| {
            let mut kinds = vec![proto::HOPOPTS, proto::ROUTING, proto::FRAGMENT];
            kinds.extend([proto::DSTOPTS; 5]);
            with_ipv6_ext(&udp_between(s, d, b"x"), &kinds, 0)
        },
        Counter::DropIpv6ExtChain,
    );
}

// ---- counters ----

#[test]
fn per_cpu_counters_sum_over_repeated_runs() {
    require_root();
    let datapath = Datapath::load().expect("load datapath");
    let frame = tcp4(b"repeat");
    let ret = run_frame_repeat(&datapath, Hook::Uplink, &frame, 1000).expect("test run");
    assert_eq!(ret, XDP_PASS);
    let counters = datapath.counters().expect("read counters");
    assert_eq!(counters.get(Counter::Packets), 1000);
    assert_eq!(counters.get(Counter::PassIpv4), 1000);
    assert_eq!(counters.get(Counter::L4Tcp), 1000);
    assert_eq!(counters.nonzero().len(), 3, "{:?}", counters.nonzero());
}
