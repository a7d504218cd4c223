//! The first datapath programs under BPF_PROG_TEST_RUN: every frame is built
//! here, run through both hooks, and the verdict and counters are asserted.
//! Root only.

use etherparse::PacketBuilder;
use movarto_common::{counters::Counter, net::proto};
use movarto_tests::{Hook, assert_counter_delta, require_root, run_frame, run_frame_repeat};
use movarto_user::datapath::Datapath;

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

#[derive(Clone, Copy, Debug, PartialEq)]
enum Expect {
    Pass,
    Drop,
}

/// Runs `frame` through both hooks and checks the verdict and the counter changes.
fn check(frame: &[u8], expect: Expect, counters: &[(Counter, u64)]) {
    check_on(&[Hook::Uplink, Hook::VmFacing], frame, expect, counters);
}

/// For frames whose IP header is incomplete: the kernel's skb test-run
/// refuses to build such an skb (EINVAL), so only XDP can be driven with them.
/// The TC refusal is asserted so a kernel that starts accepting them is noticed.
fn check_l3_truncated(frame: &[u8]) {
    check_on(
        &[Hook::Uplink],
        frame,
        Expect::Drop,
        &[(Counter::DropTruncated, 1)],
    );
    let datapath = Datapath::load().expect("load datapath");
    let err = run_frame(&datapath, Hook::VmFacing, frame).expect_err("kernel refuses a short skb");
    assert!(format!("{err:#}").contains("os error 22"), "{err:#}");
}

fn check_on(hooks: &[Hook], frame: &[u8], expect: Expect, counters: &[(Counter, u64)]) {
    require_root();
    let datapath = Datapath::load().expect("load datapath");
    for &hook in hooks {
        let before = datapath.counters().expect("read counters");
        let ret = run_frame(&datapath, hook, frame).expect("test run");
        let after = datapath.counters().expect("read counters");
        let want = match (hook, expect) {
            (Hook::Uplink, Expect::Pass) => XDP_PASS,
            (Hook::Uplink, Expect::Drop) => XDP_DROP,
            (Hook::VmFacing, Expect::Pass) => TC_ACT_OK,
            (Hook::VmFacing, Expect::Drop) => TC_ACT_SHOT,
        };
        assert_eq!(
            ret, want,
            "{hook:?} returned {ret}, expected {expect:?} ({want})"
        );
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
        Expect::Pass,
        &[(Counter::PassIpv4, 1), (Counter::L4Tcp, 1)],
    );
}

#[test]
fn ipv4_udp_passes() {
    let frame = build(v4().udp(5353, 53), b"query");
    check(
        &frame,
        Expect::Pass,
        &[(Counter::PassIpv4, 1), (Counter::L4Udp, 1)],
    );
}

#[test]
fn ipv4_icmp_passes() {
    let frame = build(v4().icmpv4_echo_request(1, 1), b"ping");
    check(
        &frame,
        Expect::Pass,
        &[(Counter::PassIpv4, 1), (Counter::L4Icmp, 1)],
    );
}

#[test]
fn ipv6_tcp_passes() {
    check(
        &tcp6(b"hello"),
        Expect::Pass,
        &[(Counter::PassIpv6, 1), (Counter::L4Tcp, 1)],
    );
}

#[test]
fn ipv6_udp_passes() {
    check(
        &udp6(b"q"),
        Expect::Pass,
        &[(Counter::PassIpv6, 1), (Counter::L4Udp, 1)],
    );
}

#[test]
fn ipv6_icmp_passes() {
    let frame = build(v6().icmpv6_echo_request(1, 1), b"ping");
    check(
        &frame,
        Expect::Pass,
        &[(Counter::PassIpv6, 1), (Counter::L4Icmp, 1)],
    );
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
    check(&frame, Expect::Pass, &[(Counter::PassNonIp, 1)]);
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
    check(
        &frame,
        Expect::Pass,
        &[(Counter::PassIpv4, 1), (Counter::L4Tcp, 1)],
    );
}

#[test]
fn ethernet_padding_after_ip_packet_is_fine() {
    let mut frame = build(v4().udp(5353, 53), b"");
    frame.resize(60, 0);
    check(
        &frame,
        Expect::Pass,
        &[(Counter::PassIpv4, 1), (Counter::L4Udp, 1)],
    );
}

#[test]
fn ipv4_later_fragment_passes_without_l4() {
    let mut frame = tcp4(b"payload");
    // Fragment offset 185 (1480 bytes): what follows the IP header is not a TCP header.
    set_be16(&mut frame, IP4 + 6, 185);
    check(
        &frame,
        Expect::Pass,
        &[(Counter::PassIpv4, 1), (Counter::L4Fragment, 1)],
    );
}

#[test]
fn ipv4_first_fragment_is_parsed_as_tcp() {
    let mut frame = tcp4(b"payload");
    set_be16(&mut frame, IP4 + 6, 0x2000); // MF, offset 0
    check(
        &frame,
        Expect::Pass,
        &[(Counter::PassIpv4, 1), (Counter::L4Tcp, 1)],
    );
}

#[test]
fn ipv6_extension_headers_are_walked() {
    let frame = with_ipv6_ext(
        &tcp6(b"x"),
        &[proto::HOPOPTS, proto::DSTOPTS, proto::ROUTING],
        0,
    );
    check(
        &frame,
        Expect::Pass,
        &[(Counter::PassIpv6, 1), (Counter::L4Tcp, 1)],
    );
}

#[test]
fn ipv6_first_fragment_is_parsed_later_one_is_not() {
    let first = with_ipv6_ext(&udp6(b"abc"), &[proto::FRAGMENT], 0);
    check(
        &first,
        Expect::Pass,
        &[(Counter::PassIpv6, 1), (Counter::L4Udp, 1)],
    );
    let later = with_ipv6_ext(&udp6(b"abc"), &[proto::FRAGMENT], 100);
    check(
        &later,
        Expect::Pass,
        &[(Counter::PassIpv6, 1), (Counter::L4Fragment, 1)],
    );
}

#[test]
fn ipv6_other_transport_passes() {
    let mut frame = udp6(b"data");
    frame[IP6 + 6] = 132; // SCTP: no header the datapath reads
    check(
        &frame,
        Expect::Pass,
        &[(Counter::PassIpv6, 1), (Counter::L4Other, 1)],
    );
}

// ---- truncated and malformed frames are dropped and counted ----

#[test]
fn ethernet_only_ipv4_frame_is_truncated() {
    let frame = tcp4(b"")[..14].to_vec();
    check_l3_truncated(&frame);
}

#[test]
fn ipv4_header_cut_short_is_truncated() {
    let frame = tcp4(b"")[..IP4 + 12].to_vec();
    check_l3_truncated(&frame);
}

#[test]
fn ipv4_total_length_beyond_frame_is_truncated() {
    let mut frame = tcp4(b"abc");
    let claimed = frame.len() - IP4 + 100;
    set_be16(&mut frame, IP4 + 2, claimed);
    check(&frame, Expect::Drop, &[(Counter::DropTruncated, 1)]);
}

#[test]
fn ipv4_wrong_version_is_bad_header() {
    let mut frame = tcp4(b"abc");
    frame[IP4] = 0x65;
    check(&frame, Expect::Drop, &[(Counter::DropBadIpHeader, 1)]);
}

#[test]
fn ipv4_ihl_below_five_is_bad_header() {
    let mut frame = tcp4(b"abc");
    frame[IP4] = 0x44;
    check(&frame, Expect::Drop, &[(Counter::DropBadIpHeader, 1)]);
}

#[test]
fn ipv4_total_length_below_ihl_is_bad_header() {
    let mut frame = tcp4(b"abc");
    set_be16(&mut frame, IP4 + 2, 16);
    check(&frame, Expect::Drop, &[(Counter::DropBadIpHeader, 1)]);
}

#[test]
fn ipv4_ihl_beyond_total_length_is_bad_header() {
    let mut frame = tcp4(b"");
    frame[IP4] = 0x4f; // 60-byte header inside a 40-byte packet
    check(&frame, Expect::Drop, &[(Counter::DropBadIpHeader, 1)]);
}

#[test]
fn tcp_header_cut_short_is_truncated() {
    let mut frame = tcp4(b"")[..IP4 + 20 + 10].to_vec();
    set_be16(&mut frame, IP4 + 2, 30);
    check(&frame, Expect::Drop, &[(Counter::DropTruncated, 1)]);
}

#[test]
fn tcp_header_past_ip_length_is_truncated() {
    // The frame holds the whole TCP header, but the IP length ends inside it.
    let mut frame = tcp4(b"");
    set_be16(&mut frame, IP4 + 2, 30);
    check(&frame, Expect::Drop, &[(Counter::DropTruncated, 1)]);
}

#[test]
fn tcp_data_offset_below_five_is_bad_l4_header() {
    let mut frame = tcp4(b"abc");
    frame[IP4 + 20 + 12] = 0x40;
    check(&frame, Expect::Drop, &[(Counter::DropBadL4Header, 1)]);
}

#[test]
fn tcp_options_past_packet_end_are_truncated() {
    let mut frame = tcp4(b"");
    frame[IP4 + 20 + 12] = 0xf0; // claims 60 bytes of TCP header, 20 present
    check(&frame, Expect::Drop, &[(Counter::DropTruncated, 1)]);
}

#[test]
fn udp_header_cut_short_is_truncated() {
    let mut frame = build(v4().udp(5353, 53), b"")[..IP4 + 20 + 4].to_vec();
    set_be16(&mut frame, IP4 + 2, 24);
    check(&frame, Expect::Drop, &[(Counter::DropTruncated, 1)]);
}

#[test]
fn icmp_header_cut_short_is_truncated() {
    let mut frame = build(v4().icmpv4_echo_request(1, 1), b"")[..IP4 + 20 + 4].to_vec();
    set_be16(&mut frame, IP4 + 2, 24);
    check(&frame, Expect::Drop, &[(Counter::DropTruncated, 1)]);
}

#[test]
fn ipv6_header_cut_short_is_truncated() {
    let frame = tcp6(b"")[..IP6 + 30].to_vec();
    check_l3_truncated(&frame);
}

#[test]
fn ipv6_payload_length_beyond_frame_is_truncated() {
    let mut frame = tcp6(b"abc");
    set_be16(&mut frame, IP6 + 4, 1000);
    check(&frame, Expect::Drop, &[(Counter::DropTruncated, 1)]);
}

#[test]
fn ipv6_wrong_version_is_bad_header() {
    let mut frame = tcp6(b"abc");
    frame[IP6] = 0x40;
    check(&frame, Expect::Drop, &[(Counter::DropBadIpHeader, 1)]);
}

#[test]
fn ipv6_extension_header_past_payload_is_truncated() {
    let mut frame = with_ipv6_ext(&tcp6(b""), &[proto::HOPOPTS], 0);
    frame[IP6 + 40 + 1] = 200; // Hdr Ext Len: 1608 bytes
    check(&frame, Expect::Drop, &[(Counter::DropTruncated, 1)]);
}

#[test]
fn ipv6_too_many_extension_headers_is_counted() {
    let kinds = [
        proto::HOPOPTS,
        proto::DSTOPTS,
        proto::ROUTING,
        proto::DSTOPTS,
        proto::DSTOPTS,
    ];
    let frame = with_ipv6_ext(&tcp6(b"x"), &kinds, 0);
    check(&frame, Expect::Drop, &[(Counter::DropIpv6ExtChain, 1)]);
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
