//! Modes `forward` (site A) and `receive` (site B) under BPF_PROG_TEST_RUN.
//! Every encapsulated output is compared byte for byte with movarto-common's
//! reference encoder, every decapsulated output with the original inner
//! packet. Routing uses the kernel FIB of a namespace the test builds.

use std::net::{IpAddr, Ipv4Addr};

use etherparse::PacketBuilder;
use movarto_common::{
    config::Mode,
    counters::Counter,
    flow::{FlowKey, gue_source_port, origin},
    gue::{OuterV4, encapsulate_v4},
    net::proto,
};
use movarto_tests::{
    Hook, assert_counter_delta, require_root, run_frame_out,
    uplink::{GW_MAC, Site, UPLINK_MAC, site},
};
use movarto_user::datapath::{Datapath, SiteConfig};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const XDP_REDIRECT: u32 = 4;

const TA: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
const TB: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 2);
const HOME4: [u8; 4] = [192, 0, 2, 10];
const PEER4: [u8; 4] = [198, 51, 100, 7];
const HOME6: [u8; 16] = [
    0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
];
const PEER6: [u8; 16] = [
    0x20, 0x01, 0x0d, 0xb8, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x07,
];
const TOKEN: u64 = 0x6d6f_7661_7274_6f21;

const TB_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xb1];
const VM_MAC: [u8; 6] = [0x52, 0x54, 0, 0, 0, 0x10];
const ANYCAST_GW_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const ANY_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x99];

fn site_a_config(s: &Site, mode: Mode, home: IpAddr) -> SiteConfig {
    let mut cfg = SiteConfig::new(mode, home);
    cfg.uplink_ifindex = s.uplink_ifindex;
    cfg.local_tunnel_addr = TA;
    cfg.peer_tunnel_addr = TB;
    cfg.token = movarto_common::ids::SessionToken(TOKEN);
    cfg.tunnel_mtu = 1500;
    cfg
}

fn site_b_config(home: IpAddr) -> SiteConfig {
    let mut cfg = SiteConfig::new(Mode::Receive, home);
    cfg.local_tunnel_addr = TB;
    cfg.peer_tunnel_addr = TA;
    cfg.token = movarto_common::ids::SessionToken(TOKEN);
    cfg.vm_ifindex = 7;
    cfg.vm_mac = movarto_common::ids::MacAddr(VM_MAC);
    cfg.gateway_mac = movarto_common::ids::MacAddr(ANYCAST_GW_MAC);
    cfg
}

fn load(cfg: &SiteConfig) -> Datapath {
    let mut dp = Datapath::load().expect("load datapath");
    dp.set_config(cfg).expect("config");
    dp
}

/// Client -> H, TCP with `payload`.
fn client_to_home4(payload: &[u8]) -> Vec<u8> {
    client_to_home4_ttl(payload, 64)
}

/// Client -> H, TCP with `payload` and TTL `ttl`.
fn client_to_home4_ttl(payload: &[u8], ttl: u8) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2(ANY_MAC, UPLINK_MAC)
        .ipv4(PEER4, HOME4, ttl)
        .tcp(40000, 80, 1, 64240)
        .ack(1)
        .write(&mut out, payload)
        .expect("build");
    out
}

/// H -> client, TCP with `payload` (the VM's reply), as an IP packet.
fn home_to_client4_ip(payload: &[u8]) -> Vec<u8> {
    home_to_client4_ip_ttl(payload, 64)
}

/// H -> client, TCP with `payload` and TTL `ttl`, as an IP packet.
fn home_to_client4_ip_ttl(payload: &[u8], ttl: u8) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ipv4(HOME4, PEER4, ttl)
        .tcp(80, 40000, 1, 64240)
        .ack(1)
        .write(&mut out, payload)
        .expect("build");
    out
}

fn ethernet(dst: [u8; 6], src: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

fn key4() -> FlowKey {
    FlowKey::new(
        (IpAddr::from(HOME4), 80),
        (IpAddr::from(PEER4), 40000),
        proto::TCP,
    )
    .expect("key")
}

/// What site `src` sends to site `dst` for `inner`, per the reference encoder.
fn reference_gue(src: Ipv4Addr, dst: Ipv4Addr, key: &FlowKey, token: u64, inner: &[u8]) -> Vec<u8> {
    let outer = OuterV4 {
        src,
        dst,
        src_port: gue_source_port(key),
        dst_port: 6080,
    };
    encapsulate_v4(&outer, token, inner)
}

fn run(dp: &Datapath, frame: &[u8]) -> (u32, Vec<u8>) {
    run_frame_out(dp, Hook::Uplink, frame).expect("test run")
}

/// The one's-complement sum of `parts` as big-endian 16-bit words (only the
/// last part may be odd; it is padded with a zero), folded to 16 bits.
fn ones_sum(parts: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    for part in parts {
        for w in part.chunks(2) {
            sum += u32::from(u16::from_be_bytes([w[0], w.get(1).copied().unwrap_or(0)]));
        }
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// Checks the IPv4 header at the start of `ip` from scratch: its words,
/// checksum included, sum to all ones.
fn assert_ipv4_checksum(ip: &[u8]) {
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    assert_eq!(ones_sum(&[&ip[..ihl]]), 0xffff, "IPv4 header checksum");
}

/// Recomputes the IPv4 header checksum of `ip` (after a test edited the header).
fn fix_ipv4_checksum(ip: &mut [u8]) {
    ip[10..12].copy_from_slice(&[0, 0]);
    let check = !ones_sum(&[&ip[..20]]);
    ip[10..12].copy_from_slice(&check.to_be_bytes());
}

// ---- site A, forward ----

#[test]
fn forward_encapsulates_traffic_for_home_exactly_like_the_reference() {
    require_root();
    let s = site(TA, TB, TB_MAC);
    let _in = s.ns.enter().expect("enter");
    let dp = load(&site_a_config(&s, Mode::Forward, IpAddr::from(HOME4)));
    let frame = client_to_home4(&[0x5a; 200]);
    let before = dp.counters().expect("counters");
    let (ret, out) = run(&dp, &frame);
    assert_eq!(ret, XDP_REDIRECT, "leaves by the uplink found in the FIB");
    // A routes H's packets: the inner packet is the client's, one hop older.
    let inner = client_to_home4_ttl(&[0x5a; 200], 63);
    let want = ethernet(
        TB_MAC,
        UPLINK_MAC,
        0x0800,
        &reference_gue(TA, TB, &key4(), TOKEN, &inner[14..]),
    );
    assert_eq!(out, want);
    assert_eq!(out[14 + 40 + 8], 63, "inner TTL");
    assert_ipv4_checksum(&out[14 + 40..]);
    let after = dp.counters().expect("counters");
    assert_counter_delta(
        &before,
        &after,
        &[
            (Counter::Packets, 1),
            (Counter::L4Tcp, 1),
            (Counter::TunnelOut, 1),
            (Counter::FlowCreated, 1),
        ],
    );
    let flows = dp.flows().expect("flows");
    assert_eq!(flows.len(), 1);
    assert_eq!(flows[0].0, key4());
    assert_eq!(
        flows[0].1.origin,
        origin::STALE_DNS,
        "first seen after switchover"
    );
}

#[test]
fn a_tracked_flow_keeps_its_origin_when_the_mode_flips_to_forward() {
    require_root();
    let s = site(TA, TB, TB_MAC);
    let _in = s.ns.enter().expect("enter");
    let mut dp = load(&site_a_config(&s, Mode::Track, IpAddr::from(HOME4)));
    let frame = client_to_home4(b"before");
    assert_eq!(run(&dp, &frame).0, XDP_PASS);
    dp.set_config(&site_a_config(&s, Mode::Forward, IpAddr::from(HOME4)))
        .expect("flip");
    assert_eq!(run(&dp, &client_to_home4(b"after")).0, XDP_REDIRECT);
    let flows = dp.flows().expect("flows");
    assert_eq!(flows.len(), 1);
    assert_eq!(flows[0].1.origin, origin::TRACKED);
    assert_eq!(flows[0].1.packets_from_peer, 2);
}

#[test]
fn forward_encapsulates_ipv6_inner_with_proto_41() {
    require_root();
    let s = site(TA, TB, TB_MAC);
    let _in = s.ns.enter().expect("enter");
    let dp = load(&site_a_config(&s, Mode::Forward, IpAddr::from(HOME6)));
    let mut frame = Vec::new();
    PacketBuilder::ethernet2(ANY_MAC, UPLINK_MAC)
        .ipv6(PEER6, HOME6, 64)
        .udp(5353, 53)
        .write(&mut frame, b"query")
        .expect("build");
    frame[14] = 0x6b; // traffic class 0xb8 (EF) spans the first two bytes
    frame[15] = 0x80;
    let (ret, out) = run(&dp, &frame);
    assert_eq!(ret, XDP_REDIRECT);
    let key = FlowKey::new(
        (IpAddr::from(HOME6), 53),
        (IpAddr::from(PEER6), 5353),
        proto::UDP,
    )
    .expect("key");
    let mut inner = frame[14..].to_vec();
    inner[7] = 63; // the hop limit, decremented by A as the router before H
    let want = ethernet(
        TB_MAC,
        UPLINK_MAC,
        0x0800,
        &reference_gue(TA, TB, &key, TOKEN, &inner),
    );
    assert_eq!(out, want);
    assert_eq!(out[14 + 1], 0xb8, "outer TOS copied from the traffic class");
    assert_eq!(out[14 + 29], 41);
}

#[test]
fn forward_leaves_other_traffic_alone() {
    require_root();
    let s = site(TA, TB, TB_MAC);
    let _in = s.ns.enter().expect("enter");
    let dp = load(&site_a_config(&s, Mode::Forward, IpAddr::from(HOME4)));
    let mut frame = client_to_home4(b"x");
    frame[14 + 19] = 11; // to 192.0.2.11, not H
    let (ret, out) = run(&dp, &frame);
    assert_eq!((ret, out), (XDP_PASS, frame));
}

#[test]
fn too_big_for_the_tunnel_is_answered_with_icmp_frag_needed() {
    require_root();
    let s = site(TA, TB, TB_MAC);
    let _in = s.ns.enter().expect("enter");
    let dp = load(&site_a_config(&s, Mode::Forward, IpAddr::from(HOME4)));
    let fits = client_to_home4(&vec![1; 1500 - 40 - 40]);
    assert_eq!(run(&dp, &fits).0, XDP_REDIRECT);
    let big = client_to_home4(&vec![1; 1500 - 40 - 40 + 1]);
    let before = dp.counters().expect("counters");
    let (ret, out) = run(&dp, &big);
    assert_eq!(ret, XDP_TX, "back where it came from");
    let after = dp.counters().expect("counters");
    assert_eq!(
        after.get(Counter::IcmpTooBig) - before.get(Counter::IcmpTooBig),
        1
    );
    assert_eq!(
        after.get(Counter::TunnelOut),
        before.get(Counter::TunnelOut)
    );
    assert_eq!(after.get(Counter::TooBigNoDf), 0, "DF is set");

    // Addressed back to the sender's MAC, from H to the client.
    assert_eq!(&out[..6], &big[6..12]);
    assert_eq!(&out[6..12], &big[..6]);
    let sliced = etherparse::SlicedPacket::from_ethernet(&out).expect("parse ICMP");
    let Some(etherparse::NetSlice::Ipv4(ip)) = &sliced.net else {
        panic!("not IPv4")
    };
    let h = ip.header().to_header();
    assert_eq!(
        h.header_checksum,
        h.calc_header_checksum(),
        "IPv4 header checksum"
    );
    assert_eq!((h.source, h.destination), (HOME4, PEER4));
    let Some(etherparse::TransportSlice::Icmpv4(icmp)) = sliced.transport else {
        panic!("not ICMP")
    };
    assert_eq!(
        icmp.icmp_type(),
        etherparse::Icmpv4Type::DestinationUnreachable(
            etherparse::icmpv4::DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 1460 }
        )
    );
    assert_eq!(
        icmp.checksum(),
        icmp.icmp_type().calc_checksum(icmp.payload()),
        "ICMP checksum"
    );
    // The quote: the offending packet's IP header and the first 64 bytes after it.
    assert_eq!(icmp.payload(), &big[14..14 + 20 + 64]);
}

/// Client -> H over IPv6, TCP with `payload`.
fn client_to_home6(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2(ANY_MAC, UPLINK_MAC)
        .ipv6(PEER6, HOME6, 64)
        .tcp(40000, 443, 1, 64240)
        .ack(1)
        .write(&mut out, payload)
        .expect("build");
    out
}

#[test]
fn ipv6_too_big_for_the_tunnel_is_answered_with_icmpv6_packet_too_big() {
    require_root();
    let s = site(TA, TB, TB_MAC);
    let _in = s.ns.enter().expect("enter");
    let dp = load(&site_a_config(&s, Mode::Forward, IpAddr::from(HOME6)));
    // 40 bytes of outer headers: an inner IPv6 packet of 1460 bytes fits 1500.
    let fits = client_to_home6(&vec![1; 1460 - 40 - 20]);
    assert_eq!(run(&dp, &fits).0, XDP_REDIRECT);
    let big = client_to_home6(&vec![2; 1460 - 40 - 20 + 1]);
    let before = dp.counters().expect("counters");
    let (ret, out) = run(&dp, &big);
    assert_eq!(ret, XDP_TX, "back where it came from");
    let after = dp.counters().expect("counters");
    assert_counter_delta(
        &before,
        &after,
        &[
            (Counter::Packets, 1),
            (Counter::L4Tcp, 1),
            (Counter::IcmpTooBig, 1),
        ],
    );
    assert_eq!(
        dp.flows().expect("flows")[0].1.packets_from_peer,
        2,
        "the too-big packet is still the flow's"
    );

    // Addressed back to the sender's MAC, from H to the client.
    assert_eq!(&out[..6], &big[6..12]);
    assert_eq!(&out[6..12], &big[..6]);
    assert_eq!(&out[12..14], &[0x86, 0xdd]);
    assert_eq!(out.len(), 14 + 40 + 8 + 40 + 64, "IPv6 + ICMPv6 + quote");
    let sliced = etherparse::SlicedPacket::from_ethernet(&out).expect("parse ICMPv6");
    let Some(etherparse::NetSlice::Ipv6(ip)) = &sliced.net else {
        panic!("not IPv6")
    };
    let h = ip.header().to_header();
    assert_eq!((h.source, h.destination), (HOME6, PEER6));
    assert_eq!(h.next_header, etherparse::IpNumber::IPV6_ICMP);
    assert_eq!(h.hop_limit, 64);
    assert_eq!(usize::from(h.payload_length), 8 + 40 + 64);
    assert_eq!((h.traffic_class, h.flow_label.value()), (0, 0));
    let Some(etherparse::TransportSlice::Icmpv6(icmp)) = sliced.transport else {
        panic!("not ICMPv6")
    };
    assert_eq!(
        icmp.icmp_type(),
        etherparse::Icmpv6Type::PacketTooBig { mtu: 1460 },
        "the tunnel MTU minus the 40 bytes of encapsulation"
    );
    assert_eq!(
        icmp.checksum(),
        icmp.icmp_type()
            .calc_checksum(HOME6, PEER6, icmp.payload())
            .expect("checksum"),
        "ICMPv6 checksum over the pseudo-header"
    );
    assert!(icmp.is_checksum_valid(HOME6, PEER6));
    // The quote: the offending packet's IPv6 header and the first 64 bytes after it.
    assert_eq!(icmp.payload(), &big[14..14 + 40 + 64]);

    // A smaller tunnel MTU is announced as such.
    let mut cfg = site_a_config(&s, Mode::Forward, IpAddr::from(HOME6));
    cfg.tunnel_mtu = 1400;
    let mut dp = dp;
    dp.set_config(&cfg).expect("config");
    let (ret, out) = run(&dp, &fits);
    assert_eq!(ret, XDP_TX);
    let sliced = etherparse::SlicedPacket::from_ethernet(&out).expect("parse ICMPv6");
    let Some(etherparse::TransportSlice::Icmpv6(icmp)) = sliced.transport else {
        panic!("not ICMPv6")
    };
    assert_eq!(
        icmp.icmp_type(),
        etherparse::Icmpv6Type::PacketTooBig { mtu: 1360 }
    );
    assert!(icmp.is_checksum_valid(HOME6, PEER6));
}

/// bpf_fib_lookup refuses (FWD_DISABLED) on a device that doesn't forward,
/// even for output lookups: a site must forward, and if it doesn't, nothing
/// leaves half-routed; both directions drop and say why.
#[test]
fn a_site_that_does_not_forward_fails_closed() {
    require_root();
    let s = site(TA, TB, TB_MAC);
    for key in [
        "net.ipv4.conf.all.forwarding=0",
        "net.ipv4.conf.up0.forwarding=0",
        "net.ipv4.conf.lo.forwarding=0",
    ] {
        s.ns.run("sysctl", &["-qw", key]).expect("sysctl");
    }
    let _in = s.ns.enter().expect("enter");
    let dp = load(&site_a_config(&s, Mode::Forward, IpAddr::from(HOME4)));
    assert_eq!(run(&dp, &client_to_home4(b"x")).0, XDP_DROP);
    let frame = ethernet(
        UPLINK_MAC,
        TB_MAC,
        0x0800,
        &reference_gue(TB, TA, &key4(), TOKEN, &home_to_client4_ip(b"r")),
    );
    assert_eq!(run(&dp, &frame).0, XDP_DROP);
    assert_eq!(
        dp.counters().expect("counters").get(Counter::DropNoRoute),
        2
    );
}

#[test]
fn forward_fails_closed_without_a_route_to_the_peer_site() {
    require_root();
    let s = site(TA, TB, TB_MAC);
    s.ns.ip(&["neigh", "del", &TB.to_string(), "dev", "up0"])
        .expect("forget TB");
    let _in = s.ns.enter().expect("enter");
    let dp = load(&site_a_config(&s, Mode::Forward, IpAddr::from(HOME4)));
    assert_eq!(run(&dp, &client_to_home4(b"x")).0, XDP_DROP);
    assert_eq!(
        dp.counters().expect("counters").get(Counter::DropNoRoute),
        1
    );
}

#[test]
fn replies_from_site_b_are_unwrapped_and_routed_to_the_client() {
    require_root();
    let s = site(TA, TB, TB_MAC);
    let _in = s.ns.enter().expect("enter");
    let dp = load(&site_a_config(&s, Mode::Forward, IpAddr::from(HOME4)));
    let inner = home_to_client4_ip(&[0x42; 300]);
    let frame = ethernet(
        UPLINK_MAC,
        TB_MAC,
        0x0800,
        &reference_gue(TB, TA, &key4(), TOKEN, &inner),
    );
    let (ret, out) = run(&dp, &frame);
    assert_eq!(ret, XDP_REDIRECT);
    assert_eq!(
        out,
        ethernet(
            GW_MAC,
            UPLINK_MAC,
            0x0800,
            &home_to_client4_ip_ttl(&[0x42; 300], 63)
        ),
        "the inner packet, one hop older, addressed to the gateway"
    );
    assert_eq!(out[14 + 8], 63, "TTL 64 leaves A as 63");
    assert_ipv4_checksum(&out[14..]);
    assert_eq!(dp.counters().expect("counters").get(Counter::TunnelIn), 1);
    let flows = dp.flows().expect("flows");
    assert_eq!(flows[0].1.packets_to_peer, 1);
}

/// A GUE frame from `src` to TA carrying a reply from H, mangled by `mangle`.
fn gue_frame(src: Ipv4Addr, token: u64, mangle: impl Fn(&mut Vec<u8>)) -> Vec<u8> {
    let inner = home_to_client4_ip(b"reply");
    let mut frame = ethernet(
        UPLINK_MAC,
        TB_MAC,
        0x0800,
        &reference_gue(src, TA, &key4(), token, &inner),
    );
    mangle(&mut frame);
    frame
}

fn assert_dropped(dp: &Datapath, frame: &[u8], reason: Counter) {
    let before = dp.counters().expect("counters");
    let (ret, _) = run(dp, frame);
    let after = dp.counters().expect("counters");
    assert_eq!(ret, XDP_DROP, "{}", reason.name());
    assert_eq!(
        after.get(reason) - before.get(reason),
        1,
        "{}",
        reason.name()
    );
    assert_eq!(after.get(Counter::TunnelIn), before.get(Counter::TunnelIn));
}

#[test]
fn gue_not_from_the_peer_is_passed_untouched_and_without_the_token_dropped() {
    require_root();
    let s = site(TA, TB, TB_MAC);
    let _in = s.ns.enter().expect("enter");
    let dp = load(&site_a_config(&s, Mode::Forward, IpAddr::from(HOME4)));
    let intruder = Ipv4Addr::new(203, 0, 113, 66);
    // Not from the peer: not this node's tunnel, so the kernel's, untouched.
    let foreign = gue_frame(intruder, TOKEN, |_| {});
    let before = dp.counters().expect("counters");
    let (ret, out) = run(&dp, &foreign);
    assert_eq!((ret, &out), (XDP_PASS, &foreign));
    let after = dp.counters().expect("counters");
    assert_eq!(
        after.get(Counter::PassGueForeignSource) - before.get(Counter::PassGueForeignSource),
        1
    );
    assert_dropped(
        &dp,
        &gue_frame(TB, TOKEN ^ 1, |_| {}),
        Counter::DropGueBadToken,
    );
    assert!(dp.flows().expect("flows").is_empty());
}

#[test]
fn malformed_gue_is_dropped_and_counted() {
    require_root();
    let s = site(TA, TB, TB_MAC);
    let _in = s.ns.enter().expect("enter");
    let dp = load(&site_a_config(&s, Mode::Forward, IpAddr::from(HOME4)));
    let gue = 14 + 28;
    // Version 1, control bit, hlen beyond our format, flags, unknown proto.
    for (at, value) in [
        (gue, 0x42),
        (gue, 0x22),
        (gue, 0x1f),
        (gue + 2, 0x80),
        (gue + 1, 17),
    ] {
        assert_dropped(
            &dp,
            &gue_frame(TB, TOKEN, |f| f[at] = value),
            Counter::DropGueMalformed,
        );
    }
    // Outer fragment (MF set).
    assert_dropped(
        &dp,
        &gue_frame(TB, TOKEN, |f| f[14 + 6] = 0x20),
        Counter::DropGueMalformed,
    );
    // Inner packet claims more bytes than were sent.
    assert_dropped(
        &dp,
        &gue_frame(TB, TOKEN, |f| f[14 + 40 + 3] = 0xff),
        Counter::DropGueMalformed,
    );
    // The inner source is not H: B may only send the service's packets, and the
    // packet is no service's that tunnels with B.
    assert_dropped(
        &dp,
        &gue_frame(TB, TOKEN, |f| f[14 + 40 + 15] = 11),
        Counter::DropGueWrongService,
    );
    // A GUE hlen that runs past the packet: truncated frame.
    let short = gue_frame(TB, TOKEN, |_| {});
    assert_eq!(run(&dp, &short[..14 + 28 + 6]).0, XDP_DROP);
}

// ---- site A, forward: A is the router before H ----

/// Checks `out` is the ICMP error `kind`/`code`/`rest` from H back to the
/// sender of `sent` (a client -> H frame): addresses, lengths, both checksums
/// (summed from scratch) and the quote, the first bytes of `sent`'s IP
/// packet as it arrived: 84, or a shorter packet whole down to a multiple
/// of 4 bytes. Returns the quote's length.
fn assert_icmp4_answer(sent: &[u8], out: &[u8], kind: u8, code: u8, rest: [u8; 4]) -> usize {
    let ip_len = usize::from(u16::from_be_bytes([sent[14 + 2], sent[14 + 3]]));
    let quote = if ip_len < 20 + 64 {
        ip_len & !3
    } else {
        20 + 64
    };
    assert_eq!(
        out.len(),
        14 + 20 + 8 + quote,
        "Ethernet + IPv4 + ICMP + quote"
    );
    assert_eq!(&out[..6], &sent[6..12], "back to the sender's MAC");
    assert_eq!(&out[6..12], &sent[..6]);
    assert_eq!(&out[12..14], &[0x08, 0x00]);
    let ip = &out[14..14 + 20];
    assert_eq!(ip[0], 0x45);
    assert_eq!(usize::from(u16::from_be_bytes([ip[2], ip[3]])), 28 + quote);
    assert_eq!((ip[8], ip[9]), (64, 1), "TTL 64, ICMP");
    assert_eq!(
        (&ip[12..16], &ip[16..20]),
        (&HOME4[..], &PEER4[..]),
        "from H to the client"
    );
    assert_ipv4_checksum(ip);
    let icmp = &out[14 + 20..];
    assert_eq!((icmp[0], icmp[1]), (kind, code), "ICMP type and code");
    assert_eq!(&icmp[4..8], &rest);
    assert_eq!(ones_sum(&[icmp]), 0xffff, "ICMP checksum");
    assert_eq!(&icmp[8..], &sent[14..14 + quote], "the quote");
    quote
}

/// [`assert_icmp4_answer`] for ICMPv6 (the checksum over the pseudo-header; 104 bytes of quote).
fn assert_icmp6_answer(sent: &[u8], out: &[u8], kind: u8, code: u8, rest: [u8; 4]) -> usize {
    let ip_len = 40 + usize::from(u16::from_be_bytes([sent[14 + 4], sent[14 + 5]]));
    let quote = if ip_len < 40 + 64 {
        ip_len & !3
    } else {
        40 + 64
    };
    assert_eq!(
        out.len(),
        14 + 40 + 8 + quote,
        "Ethernet + IPv6 + ICMPv6 + quote"
    );
    assert_eq!(&out[..6], &sent[6..12], "back to the sender's MAC");
    assert_eq!(&out[6..12], &sent[..6]);
    assert_eq!(&out[12..14], &[0x86, 0xdd]);
    let ip = &out[14..14 + 40];
    assert_eq!(&ip[..4], &[0x60, 0, 0, 0]);
    assert_eq!(usize::from(u16::from_be_bytes([ip[4], ip[5]])), 8 + quote);
    assert_eq!((ip[6], ip[7]), (58, 64), "ICMPv6, hop limit 64");
    assert_eq!(
        (&ip[8..24], &ip[24..40]),
        (&HOME6[..], &PEER6[..]),
        "from H to the client"
    );
    let icmp = &out[14 + 40..];
    assert_eq!((icmp[0], icmp[1]), (kind, code), "ICMPv6 type and code");
    assert_eq!(&icmp[4..8], &rest);
    let length = (icmp.len() as u32).to_be_bytes();
    assert_eq!(
        ones_sum(&[&ip[8..40], &length, &[0, 0, 0, 58], icmp]),
        0xffff,
        "ICMPv6 checksum over the pseudo-header"
    );
    assert_eq!(&icmp[8..], &sent[14..14 + quote], "the quote");
    quote
}

/// Runs `frame` through `dp`'s uplink program; asserts the verdict `ret`
/// and exactly the counter changes `delta`; returns the frame as it left.
fn run_expecting(dp: &Datapath, frame: &[u8], ret: u32, delta: &[(Counter, u64)]) -> Vec<u8> {
    let before = dp.counters().expect("counters");
    let (got, out) = run(dp, frame);
    assert_eq!(got, ret, "verdict");
    assert_counter_delta(&before, &dp.counters().expect("counters"), delta);
    out
}

/// Client -> H, UDP (a traceroute probe) with `payload` and TTL `ttl`.
fn probe4(payload: &[u8], ttl: u8) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2(ANY_MAC, UPLINK_MAC)
        .ipv4(PEER4, HOME4, ttl)
        .udp(40001, 33434)
        .write(&mut out, payload)
        .expect("build");
    out
}

/// The same over IPv6, with hop limit `hop_limit`.
fn probe6(payload: &[u8], hop_limit: u8) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ethernet2(ANY_MAC, UPLINK_MAC)
        .ipv6(PEER6, HOME6, hop_limit)
        .udp(40001, 33434)
        .write(&mut out, payload)
        .expect("build");
    out
}

#[test]
fn a_packet_for_home_whose_ttl_expires_at_a_is_answered_with_time_exceeded() {
    require_root();
    let s = site(TA, TB, TB_MAC);
    let _in = s.ns.enter().expect("enter");
    let dp = load(&site_a_config(&s, Mode::Forward, IpAddr::from(HOME4)));
    // A short probe (59 bytes, quoted down to whole words), a long segment
    // (84 bytes quoted), and TTL 0 in a frame with Ethernet padding (not quoted).
    let mut padded = probe4(b"hi", 0);
    padded.extend_from_slice(&[0xee; 16]);
    for (frame, class, quote) in [
        (probe4(&[0x61; 31], 1), Counter::L4Udp, 56),
        (client_to_home4_ttl(&[0x5a; 200], 1), Counter::L4Tcp, 84),
        (padded, Counter::L4Udp, 28),
    ] {
        let out = run_expecting(
            &dp,
            &frame,
            XDP_TX,
            &[
                (Counter::Packets, 1),
                (class, 1),
                (Counter::IcmpTimeExceeded, 1),
            ],
        );
        assert_eq!(assert_icmp4_answer(&frame, &out, 11, 0, [0; 4]), quote);
        let sliced = etherparse::SlicedPacket::from_ethernet(&out).expect("parse ICMP");
        let Some(etherparse::TransportSlice::Icmpv4(icmp)) = sliced.transport else {
            panic!("not ICMP")
        };
        assert_eq!(
            icmp.icmp_type(),
            etherparse::Icmpv4Type::TimeExceeded(
                etherparse::icmpv4::TimeExceededCode::TtlExceededInTransit
            )
        );
    }
    assert!(
        dp.flows().expect("flows").is_empty(),
        "expired packets never reached the VM: no flow"
    );
}

#[test]
fn ipv6_hop_limit_expiring_at_a_is_answered_with_time_exceeded() {
    require_root();
    let s = site(TA, TB, TB_MAC);
    let _in = s.ns.enter().expect("enter");
    let dp = load(&site_a_config(&s, Mode::Forward, IpAddr::from(HOME6)));
    let mut long = client_to_home6(&[0x5a; 200]);
    long[14 + 7] = 1;
    for (frame, class, quote) in [
        (probe6(&[0x61; 21], 1), Counter::L4Udp, 68),
        (long, Counter::L4Tcp, 104),
        (probe6(b"x", 0), Counter::L4Udp, 48),
    ] {
        let out = run_expecting(
            &dp,
            &frame,
            XDP_TX,
            &[
                (Counter::Packets, 1),
                (class, 1),
                (Counter::IcmpTimeExceeded, 1),
            ],
        );
        assert_eq!(assert_icmp6_answer(&frame, &out, 3, 0, [0; 4]), quote);
        let sliced = etherparse::SlicedPacket::from_ethernet(&out).expect("parse ICMPv6");
        let Some(etherparse::TransportSlice::Icmpv6(icmp)) = sliced.transport else {
            panic!("not ICMPv6")
        };
        assert_eq!(
            icmp.icmp_type(),
            etherparse::Icmpv6Type::TimeExceeded(
                etherparse::icmpv6::TimeExceededCode::HopLimitExceeded
            )
        );
        assert!(icmp.is_checksum_valid(HOME6, PEER6));
    }
    assert!(dp.flows().expect("flows").is_empty());
}

#[test]
fn no_time_exceeded_about_an_icmp_error_or_a_non_first_fragment() {
    require_root();
    let s = site(TA, TB, TB_MAC);
    let _in = s.ns.enter().expect("enter");
    let dp = load(&site_a_config(&s, Mode::Forward, IpAddr::from(HOME4)));
    let icmp4 = |icmp_type| {
        let mut out = Vec::new();
        PacketBuilder::ethernet2(ANY_MAC, UPLINK_MAC)
            .ipv4(PEER4, HOME4, 1)
            .icmpv4(icmp_type)
            .write(&mut out, &[0x45; 28])
            .expect("build");
        out
    };
    let unreachable = icmp4(etherparse::Icmpv4Type::DestinationUnreachable(
        etherparse::icmpv4::DestUnreachableHeader::Port,
    ));
    let mut fragment = probe4(&[0x61; 40], 1);
    fragment[14 + 6..14 + 8].copy_from_slice(&[0, 16]); // offset 128 bytes
    fix_ipv4_checksum(&mut fragment[14..]);
    for (frame, class) in [
        (unreachable, Counter::L4Icmp),
        (fragment, Counter::L4Fragment),
    ] {
        run_expecting(
            &dp,
            &frame,
            XDP_DROP,
            &[
                (Counter::Packets, 1),
                (class, 1),
                (Counter::DropTtlExceeded, 1),
            ],
        );
    }
    // An echo request is no error: it gets its time-exceeded (ping -t 1).
    let echo = icmp4(etherparse::Icmpv4Type::EchoRequest(
        etherparse::IcmpEchoHeader { id: 1, seq: 1 },
    ));
    let (ret, out) = run(&dp, &echo);
    assert_eq!(ret, XDP_TX);
    assert_icmp4_answer(&echo, &out, 11, 0, [0; 4]);

    // IPv6: not about an ICMPv6 error (types below 128) either.
    let dp6 = load(&site_a_config(&s, Mode::Forward, IpAddr::from(HOME6)));
    let mut too_big = Vec::new();
    PacketBuilder::ethernet2(ANY_MAC, UPLINK_MAC)
        .ipv6(PEER6, HOME6, 1)
        .icmpv6(etherparse::Icmpv6Type::PacketTooBig { mtu: 1280 })
        .write(&mut too_big, &[0x60; 48])
        .expect("build");
    run_expecting(
        &dp6,
        &too_big,
        XDP_DROP,
        &[
            (Counter::Packets, 1),
            (Counter::L4Icmp, 1),
            (Counter::DropTtlExceeded, 1),
        ],
    );
}

/// A GUE frame from TB carrying `inner`, a reply from H.
fn reply_frame(inner: &[u8], key: &FlowKey) -> Vec<u8> {
    ethernet(
        UPLINK_MAC,
        TB_MAC,
        0x0800,
        &reference_gue(TB, TA, key, TOKEN, inner),
    )
}

fn key6() -> FlowKey {
    FlowKey::new(
        (IpAddr::from(HOME6), 53),
        (IpAddr::from(PEER6), 5353),
        proto::UDP,
    )
    .expect("key")
}

/// H -> client over IPv6, UDP, as an IP packet.
fn home_to_client6_ip(payload: &[u8], hop_limit: u8) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ipv6(HOME6, PEER6, hop_limit)
        .udp(53, 5353)
        .write(&mut out, payload)
        .expect("build");
    out
}

#[test]
fn an_ipv6_reply_from_the_tunnel_leaves_with_its_hop_limit_decremented() {
    require_root();
    let s = site(TA, TB, TB_MAC);
    let _in = s.ns.enter().expect("enter");
    let dp = load(&site_a_config(&s, Mode::Forward, IpAddr::from(HOME6)));
    let frame = reply_frame(&home_to_client6_ip(b"answer", 64), &key6());
    let (ret, out) = run(&dp, &frame);
    assert_eq!(ret, XDP_REDIRECT);
    assert_eq!(
        out,
        ethernet(
            GW_MAC,
            UPLINK_MAC,
            0x86dd,
            &home_to_client6_ip(b"answer", 63)
        )
    );
}

#[test]
fn a_reply_whose_ttl_expires_at_a_is_dropped_not_answered_into_the_tunnel() {
    require_root();
    let s = site(TA, TB, TB_MAC);
    let _in = s.ns.enter().expect("enter");
    let dp = load(&site_a_config(&s, Mode::Forward, IpAddr::from(HOME4)));
    let dp6 = load(&site_a_config(&s, Mode::Forward, IpAddr::from(HOME6)));
    for (dp, frame) in [
        (&dp, reply_frame(&home_to_client4_ip_ttl(b"r", 1), &key4())),
        (&dp, reply_frame(&home_to_client4_ip_ttl(b"r", 0), &key4())),
        (&dp6, reply_frame(&home_to_client6_ip(b"r", 1), &key6())),
        (&dp6, reply_frame(&home_to_client6_ip(b"r", 0), &key6())),
    ] {
        run_expecting(
            dp,
            &frame,
            XDP_DROP,
            &[
                (Counter::Packets, 1),
                (Counter::L4Udp, 1),
                (Counter::DropTtlExceeded, 1),
            ],
        );
        assert!(dp.flows().expect("flows").is_empty());
    }
}

#[test]
fn too_big_without_df_is_answered_with_frag_needed_and_counted() {
    require_root();
    let s = site(TA, TB, TB_MAC);
    let _in = s.ns.enter().expect("enter");
    let dp = load(&site_a_config(&s, Mode::Forward, IpAddr::from(HOME4)));
    let mut big = client_to_home4(&vec![1; 1500 - 40 - 40 + 1]);
    big[14 + 6] &= !0x40; // DF clear
    fix_ipv4_checksum(&mut big[14..]);
    // XDP can't fragment: frag-needed, back to the sender.
    let out = run_expecting(
        &dp,
        &big,
        XDP_TX,
        &[
            (Counter::Packets, 1),
            (Counter::L4Tcp, 1),
            (Counter::FlowCreated, 1),
            (Counter::IcmpTooBig, 1),
            (Counter::TooBigNoDf, 1),
        ],
    );
    let mtu = 1460u16.to_be_bytes();
    // Quoted as it arrived: TTL 64, DF clear.
    assert_eq!(
        assert_icmp4_answer(&big, &out, 3, 4, [0, 0, mtu[0], mtu[1]]),
        84
    );
    assert_eq!((out[14 + 28 + 6], out[14 + 28 + 8]), (0, 64));
}

// ---- site B, receive ----

#[test]
fn receive_unwraps_tunnel_traffic_and_delivers_it_to_the_vm() {
    require_root();
    let s = site(TB, TA, UPLINK_MAC);
    let _in = s.ns.enter().expect("enter");
    let dp = load(&site_b_config(IpAddr::from(HOME4)));
    let original = client_to_home4(&[9; 500]);
    let inner = &original[14..];
    let frame = ethernet(
        UPLINK_MAC,
        TB_MAC,
        0x0800,
        &reference_gue(TA, TB, &key4(), TOKEN, inner),
    );
    let (ret, out) = run(&dp, &frame);
    assert_eq!(ret, XDP_REDIRECT, "redirected to the VM-facing interface");
    assert_eq!(out, ethernet(VM_MAC, ANYCAST_GW_MAC, 0x0800, inner));
    let flows = dp.flows().expect("flows");
    assert_eq!(flows.len(), 1);
    assert_eq!(flows[0].0, key4());
    assert_eq!(flows[0].1.origin, origin::TUNNELLED);
    assert_eq!(dp.counters().expect("counters").get(Counter::TunnelIn), 1);
}

#[test]
fn receive_refuses_gue_without_the_token_and_passes_other_traffic() {
    require_root();
    let s = site(TB, TA, UPLINK_MAC);
    let _in = s.ns.enter().expect("enter");
    let dp = load(&site_b_config(IpAddr::from(HOME4)));
    let inner = client_to_home4(b"x");
    let forged = ethernet(
        UPLINK_MAC,
        TB_MAC,
        0x0800,
        &reference_gue(TA, TB, &key4(), 0, &inner[14..]),
    );
    assert_dropped(&dp, &forged, Counter::DropGueBadToken);
    // Inner destination other than H: no service's packet, whatever the peer.
    let mut stray = inner.clone();
    stray[14 + 19] = 11;
    let stray = ethernet(
        UPLINK_MAC,
        TB_MAC,
        0x0800,
        &reference_gue(TA, TB, &key4(), TOKEN, &stray[14..]),
    );
    assert_dropped(&dp, &stray, Counter::DropGueWrongService);
    // Plain traffic for H did not come through the tunnel: nothing vouches for it.
    assert_dropped(&dp, &inner, Counter::DropNotTunnelled);
    // Plain traffic for anyone else is the kernel's.
    let mut other = inner.clone();
    other[14 + 19] = 11;
    let (ret, out) = run(&dp, &other);
    assert_eq!((ret, out), (XDP_PASS, other));
}

// ---- site B, receive: the VM's packets into the tunnel (TC) ----

const TC_ACT_OK: u32 = 0;
const TC_ACT_REDIRECT: u32 = 7;
const TA_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xa9];

fn site_b_with_uplink(s: &Site, home: IpAddr) -> SiteConfig {
    let mut cfg = site_b_config(home);
    cfg.uplink_ifindex = s.uplink_ifindex;
    cfg
}

fn run_tc(dp: &Datapath, frame: &[u8]) -> (u32, Vec<u8>) {
    run_frame_out(dp, Hook::VmFacing, frame).expect("test run")
}

#[test]
fn the_vms_replies_go_into_the_tunnel_exactly_like_the_reference() {
    require_root();
    let s = site(TB, TA, TA_MAC);
    let _in = s.ns.enter().expect("enter");
    let dp = load(&site_b_with_uplink(&s, IpAddr::from(HOME4)));
    let inner = home_to_client4_ip(&[0x33; 400]);
    let frame = ethernet(ANYCAST_GW_MAC, VM_MAC, 0x0800, &inner);
    let (ret, out) = run_tc(&dp, &frame);
    assert_eq!(ret, TC_ACT_REDIRECT, "out of the uplink");
    let want = ethernet(
        TA_MAC,
        UPLINK_MAC,
        0x0800,
        &reference_gue(TB, TA, &key4(), TOKEN, &inner),
    );
    assert_eq!(out, want);
    let counters = dp.counters().expect("counters");
    assert_eq!(counters.get(Counter::TunnelOut), 1);
    let flows = dp.flows().expect("flows");
    assert_eq!(flows[0].1.origin, origin::TUNNELLED);
    assert_eq!(flows[0].1.packets_to_peer, 1);
}

#[test]
fn ipv6_and_icmp_from_the_vm_default_to_the_tunnel() {
    require_root();
    let s = site(TB, TA, TA_MAC);
    let _in = s.ns.enter().expect("enter");
    let dp = load(&site_b_with_uplink(&s, IpAddr::from(HOME6)));
    let mut inner = Vec::new();
    PacketBuilder::ipv6(HOME6, PEER6, 64)
        .udp(53, 5353)
        .write(&mut inner, b"answer")
        .expect("build");
    let (ret, out) = run_tc(&dp, &ethernet(ANYCAST_GW_MAC, VM_MAC, 0x86dd, &inner));
    assert_eq!(ret, TC_ACT_REDIRECT);
    let key = FlowKey::new(
        (IpAddr::from(HOME6), 53),
        (IpAddr::from(PEER6), 5353),
        proto::UDP,
    )
    .expect("key");
    assert_eq!(
        out,
        ethernet(
            TA_MAC,
            UPLINK_MAC,
            0x0800,
            &reference_gue(TB, TA, &key, TOKEN, &inner)
        )
    );

    // An ICMP error from H has no ports and no flow entry: still the tunnel.
    let mut icmp = Vec::new();
    PacketBuilder::ipv6(HOME6, PEER6, 64)
        .icmpv6_echo_reply(1, 1)
        .write(&mut icmp, b"pong")
        .expect("build");
    let (ret, out) = run_tc(&dp, &ethernet(ANYCAST_GW_MAC, VM_MAC, 0x86dd, &icmp));
    assert_eq!(ret, TC_ACT_REDIRECT);
    assert_eq!(&out[14 + 40..], &icmp[..], "ICMP carried unchanged");
}

#[test]
fn the_vms_oversized_packets_are_answered_with_icmp_frag_needed() {
    require_root();
    let s = site(TB, TA, TA_MAC);
    let _in = s.ns.enter().expect("enter");
    let cfg = site_b_with_uplink(&s, IpAddr::from(HOME4));
    let dp = load(&cfg);
    let fits = home_to_client4_ip(&vec![1; 1500 - 40 - 40]);
    let (ret, _) = run_tc(&dp, &ethernet(ANYCAST_GW_MAC, VM_MAC, 0x0800, &fits));
    assert_eq!(ret, TC_ACT_REDIRECT, "fits: into the tunnel");
    let inner = home_to_client4_ip(&vec![1; 1500 - 40 - 40 + 1]);
    let big = ethernet(ANYCAST_GW_MAC, VM_MAC, 0x0800, &inner);
    let (ret, out) = run_tc(&dp, &big);
    assert_eq!(ret, TC_ACT_REDIRECT, "back out of the VM-facing interface");
    let counters = dp.counters().expect("counters");
    assert_eq!(counters.get(Counter::IcmpTooBig), 1);
    assert_eq!(
        counters.get(Counter::TunnelOut),
        1,
        "only the one that fits"
    );
    assert_eq!(counters.get(Counter::DropTooBig), 0);

    // To the VM, from its gateway; from the client to H.
    assert_eq!(&out[..6], &VM_MAC);
    assert_eq!(&out[6..12], &ANYCAST_GW_MAC);
    let sliced = etherparse::SlicedPacket::from_ethernet(&out).expect("parse ICMP");
    let Some(etherparse::NetSlice::Ipv4(ip)) = &sliced.net else {
        panic!("not IPv4")
    };
    let h = ip.header().to_header();
    assert_eq!(h.header_checksum, h.calc_header_checksum());
    assert_eq!((h.source, h.destination), (PEER4, HOME4));
    let Some(etherparse::TransportSlice::Icmpv4(icmp)) = sliced.transport else {
        panic!("not ICMP")
    };
    assert_eq!(
        icmp.icmp_type(),
        etherparse::Icmpv4Type::DestinationUnreachable(
            etherparse::icmpv4::DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 1460 }
        )
    );
    assert_eq!(
        icmp.checksum(),
        icmp.icmp_type().calc_checksum(icmp.payload())
    );
    assert_eq!(icmp.payload(), &inner[..20 + 64], "the quote");
    assert_eq!(out.len(), 14 + 20 + 8 + 20 + 64);

    // IPv6 the same way: packet-too-big to the VM.
    let dp6 = load(&site_b_with_uplink(&s, IpAddr::from(HOME6)));
    let mut inner6 = Vec::new();
    PacketBuilder::ipv6(HOME6, PEER6, 64)
        .udp(53, 5353)
        .write(&mut inner6, &vec![2; 1500 - 40 - 40 - 8 + 1])
        .expect("build");
    let (ret, out) = run_tc(&dp6, &ethernet(ANYCAST_GW_MAC, VM_MAC, 0x86dd, &inner6));
    assert_eq!(ret, TC_ACT_REDIRECT);
    assert_eq!(&out[..6], &VM_MAC);
    let sliced = etherparse::SlicedPacket::from_ethernet(&out).expect("parse ICMPv6");
    let Some(etherparse::NetSlice::Ipv6(ip6)) = &sliced.net else {
        panic!("not IPv6")
    };
    let h6 = ip6.header().to_header();
    assert_eq!((h6.source, h6.destination), (PEER6, HOME6));
    let Some(etherparse::TransportSlice::Icmpv6(icmp6)) = sliced.transport else {
        panic!("not ICMPv6")
    };
    assert_eq!(
        icmp6.icmp_type(),
        etherparse::Icmpv6Type::PacketTooBig { mtu: 1460 }
    );
    assert_eq!(
        icmp6.checksum(),
        icmp6
            .icmp_type()
            .calc_checksum(h6.source, h6.destination, icmp6.payload())
            .expect("checksum"),
        "ICMPv6 checksum over the pseudo-header"
    );
    assert_eq!(icmp6.payload(), &inner6[..40 + 64]);
    assert_eq!(
        dp6.counters().expect("counters").get(Counter::IcmpTooBig),
        1
    );

    // Other sources than H are not the datapath's business.
    let mut other = home_to_client4_ip(b"x");
    other[15] = 11;
    let frame = ethernet(ANYCAST_GW_MAC, VM_MAC, 0x0800, &other);
    assert_eq!(run_tc(&dp, &frame), (TC_ACT_OK, frame));
}

// ---- site B, direct (`move` address mode) ----

#[test]
fn direct_unwraps_the_tunnel_and_lets_everything_else_go_the_direct_way() {
    require_root();
    let s = site(TB, TA, TA_MAC);
    let _in = s.ns.enter().expect("enter");
    let mut cfg = site_b_with_uplink(&s, IpAddr::from(HOME4));
    cfg.mode = Mode::Direct;
    cfg.new_addr = None;
    let dp = load(&cfg);

    // What still reaches A comes through the tunnel, to the VM, as in receive.
    let original = client_to_home4(&[7; 300]);
    let inner = &original[14..];
    let frame = ethernet(
        UPLINK_MAC,
        TB_MAC,
        0x0800,
        &reference_gue(TA, TB, &key4(), TOKEN, inner),
    );
    let (ret, out) = run(&dp, &frame);
    assert_eq!(ret, XDP_REDIRECT);
    assert_eq!(out, ethernet(VM_MAC, ANYCAST_GW_MAC, 0x0800, inner));
    // A forged one does not.
    let forged = ethernet(
        UPLINK_MAC,
        TB_MAC,
        0x0800,
        &reference_gue(TA, TB, &key4(), TOKEN ^ 1, inner),
    );
    assert_dropped(&dp, &forged, Counter::DropGueBadToken);
    // H is routed here now: plain traffic to it is the kernel's to deliver.
    let (ret, out) = run(&dp, &original);
    assert_eq!((ret, out), (XDP_PASS, original.clone()));
    // The VM's replies, pre-move flow or not, leave directly: untouched, no tunnel.
    let reply = ethernet(
        ANYCAST_GW_MAC,
        VM_MAC,
        0x0800,
        &home_to_client4_ip(&[1; 200]),
    );
    let (ret, out) = run_tc(&dp, &reply);
    assert_eq!((ret, out), (TC_ACT_OK, reply));
    let counters = dp.counters().expect("counters");
    assert_eq!(counters.get(Counter::TunnelIn), 1);
    assert_eq!(counters.get(Counter::TunnelOut), 0);
    assert_eq!(counters.get(Counter::NatOut), 0);
}
