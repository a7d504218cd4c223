//! What the datapath checks on GUE before it unwraps anything, under
//! BPF_PROG_TEST_RUN: the outer UDP length must match the packet, and GUE
//! from anyone but the peer is not this node's tunnel, so it is left to the
//! kernel untouched. Root only; no routing is involved (everything here is
//! decided before a FIB lookup), so no namespace is built.

use std::net::{IpAddr, Ipv4Addr};

use etherparse::PacketBuilder;
use movarto_common::{
    config::Mode,
    counters::Counter,
    gue::{OuterV4, encapsulate_v4},
    ids::{MacAddr, SessionToken},
};
use movarto_tests::{Hook, assert_counter_delta, require_root, run_frame_out};
use movarto_user::datapath::{Datapath, SiteConfig};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_REDIRECT: u32 = 4;

const TA: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
const TB: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 2);
const INTRUDER: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 66);
const HOME4: [u8; 4] = [192, 0, 2, 10];
const NEW4: [u8; 4] = [198, 18, 0, 10];
const CLIENT4: [u8; 4] = [198, 51, 100, 7];
const TOKEN: u64 = 0x6775_6563_6865_636b;

const UPLINK_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xa1];
const WAN_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xfe];
const VM_MAC: [u8; 6] = [0x52, 0x54, 0, 0, 0, 0x10];
const GW_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];

/// Outer UDP length field, from the start of the frame.
const UDP_LEN_AT: usize = 14 + 20 + 4;

/// The configuration of the site at `local` whose peer is `peer`, in `mode`.
fn site(mode: Mode, local: Ipv4Addr, peer: Ipv4Addr) -> SiteConfig {
    let mut cfg = SiteConfig::new(mode, IpAddr::from(HOME4))
        .with_new_addr(Some(IpAddr::from(NEW4)))
        .with_tunnel(local, peer, SessionToken(TOKEN))
        .with_macs(MacAddr(VM_MAC), MacAddr(GW_MAC));
    cfg.vm_ifindex = 7;
    cfg
}

/// Site B (TB) in `receive`, or another mode, with site A (TA) as its peer.
fn site_b(mode: Mode) -> Datapath {
    let mut dp = Datapath::load().expect("load datapath");
    dp.set_config(&site(mode, TB, TA)).expect("config");
    dp
}

/// A client's TCP packet for H, as an IP packet: what A tunnels to B.
fn inner() -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ipv4(CLIENT4, HOME4, 64)
        .tcp(40000, 80, 1, 64240)
        .ack(1)
        .write(&mut out, b"through the tunnel")
        .expect("build");
    out
}

/// The frame `src` sends to B's endpoint for `inner`, per the reference encoder.
fn gue_to_b(src: Ipv4Addr, inner: &[u8]) -> Vec<u8> {
    let outer = OuterV4 {
        src,
        dst: TB,
        src_port: 50000,
        dst_port: 6080,
    };
    let mut frame = Vec::new();
    frame.extend_from_slice(&UPLINK_MAC);
    frame.extend_from_slice(&WAN_MAC);
    frame.extend_from_slice(&0x0800u16.to_be_bytes());
    frame.extend_from_slice(&encapsulate_v4(&outer, TOKEN, inner));
    frame
}

fn set_be16(frame: &mut [u8], at: usize, value: usize) {
    let v = u16::try_from(value).expect("fits u16");
    frame[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

/// Recomputes the outer IPv4 header checksum after an edit.
fn fix_outer_checksum(frame: &mut [u8]) {
    frame[14 + 10..14 + 12].copy_from_slice(&[0, 0]);
    let mut header = [0u8; 20];
    header.copy_from_slice(&frame[14..34]);
    let check = movarto_common::checksum::ipv4_header(&header);
    frame[14 + 10..14 + 12].copy_from_slice(&check.to_be_bytes());
}

/// Runs `frame` on the uplink; asserts the return value and that exactly
/// `counters` (besides `packets`) changed. Returns the frame as it left.
fn run(dp: &Datapath, frame: &[u8], want: u32, counters: &[(Counter, u64)]) -> Vec<u8> {
    let before = dp.counters().expect("counters");
    let (ret, out) = run_frame_out(dp, Hook::Uplink, frame).expect("test run");
    let after = dp.counters().expect("counters");
    assert_eq!(ret, want, "return value");
    let mut all = vec![(Counter::Packets, 1)];
    all.extend_from_slice(counters);
    assert_counter_delta(&before, &after, &all);
    out
}

fn assert_malformed(dp: &Datapath, frame: &[u8]) {
    run(
        dp,
        frame,
        XDP_DROP,
        &[(Counter::L4Udp, 1), (Counter::DropGueMalformed, 1)],
    );
}

#[test]
fn gue_whose_lengths_agree_is_unwrapped_also_with_ethernet_padding() {
    require_root();
    let dp = site_b(Mode::Receive);
    let inner = inner();
    let delivered = [
        (Counter::L4Udp, 1),
        (Counter::TunnelIn, 1),
        (Counter::FlowCreated, 1),
    ];
    let out = run(&dp, &gue_to_b(TA, &inner), XDP_REDIRECT, &delivered);
    assert_eq!(&out[14..], &inner[..]);
    // Bytes after the outer IP packet are the link's, not GUE's.
    let mut padded = gue_to_b(TA, &inner);
    padded.extend_from_slice(&[0; 6]);
    let out = run(
        &dp,
        &padded,
        XDP_REDIRECT,
        &[(Counter::L4Udp, 1), (Counter::TunnelIn, 1)],
    );
    assert_eq!(&out[14..14 + inner.len()], &inner[..]);
}

#[test]
fn gue_with_udp_length_8_is_malformed() {
    require_root();
    let mut frame = gue_to_b(TA, &inner());
    set_be16(&mut frame, UDP_LEN_AT, 8);
    for mode in [Mode::Receive, Mode::Direct] {
        assert_malformed(&site_b(mode), &frame);
    }
    // Site A unwraps the VM's replies: the same check.
    let mut dp = Datapath::load().expect("load datapath");
    dp.set_config(&site(Mode::Forward, TB, TA)).expect("config");
    assert_malformed(&dp, &frame);
}

#[test]
fn gue_with_a_udp_length_longer_or_shorter_than_the_packet_is_malformed() {
    require_root();
    let dp = site_b(Mode::Receive);
    let good = gue_to_b(TA, &inner());
    let udp_len = good.len() - 14 - 20;
    for claimed in [udp_len - 1, udp_len + 1, udp_len + 100, 0xffff, 0] {
        let mut frame = good.clone();
        set_be16(&mut frame, UDP_LEN_AT, claimed);
        assert_malformed(&dp, &frame);
    }
}

#[test]
fn gue_with_bytes_after_the_inner_packet_is_malformed() {
    require_root();
    let dp = site_b(Mode::Receive);
    // Outer IP and UDP lengths cover 4 more bytes than the inner packet.
    let mut frame = gue_to_b(TA, &inner());
    frame.extend_from_slice(b"junk");
    let outer_len = frame.len() - 14;
    set_be16(&mut frame, 14 + 2, outer_len);
    set_be16(&mut frame, UDP_LEN_AT, outer_len - 20);
    fix_outer_checksum(&mut frame);
    assert_malformed(&dp, &frame);
    // The inner packet claims 4 bytes more than GUE carries.
    let mut frame = gue_to_b(TA, &inner());
    let inner_len = frame.len() - 14 - 40;
    set_be16(&mut frame, 14 + 40 + 2, inner_len + 4);
    assert_malformed(&dp, &frame);
}

#[test]
fn gue_from_a_non_peer_is_passed_untouched_in_the_tunnel_modes() {
    require_root();
    let frame = gue_to_b(INTRUDER, &inner());
    let foreign = [(Counter::L4Udp, 1), (Counter::PassGueForeignSource, 1)];
    for mode in [Mode::Receive, Mode::Direct] {
        let dp = site_b(mode);
        let out = run(&dp, &frame, XDP_PASS, &foreign);
        assert_eq!(out, frame, "{mode}: left as it came");
        assert!(dp.flows().expect("flows").is_empty());
    }
    // At site A in forward mode, the same from anyone but B.
    let mut dp = Datapath::load().expect("load datapath");
    dp.set_config(&site(Mode::Forward, TB, TA)).expect("config");
    let out = run(&dp, &frame, XDP_PASS, &foreign);
    assert_eq!(out, frame, "forward: left as it came");
    // Without a tunnel it is ordinary UDP to this host.
    for mode in [Mode::Idle, Mode::Track, Mode::Nat] {
        let dp = site_b(mode);
        let out = run(
            &dp,
            &frame,
            XDP_PASS,
            &[(Counter::L4Udp, 1), (Counter::PassIpv4, 1)],
        );
        assert_eq!(out, frame, "{mode}: left as it came");
    }
}

#[test]
fn malformed_udp_to_our_endpoint_is_dropped_only_from_the_peer() {
    require_root();
    let dp = site_b(Mode::Receive);
    for src in [TA, INTRUDER] {
        // The outer IP length runs past the frame, so the UDP header is not
        // read: from the peer it may be our GUE, from anyone else it is not.
        let mut frame = gue_to_b(src, &inner());
        let claimed = frame.len() - 14 + 64;
        set_be16(&mut frame, 14 + 2, claimed);
        fix_outer_checksum(&mut frame);
        let (want, verdict) = if src == TA {
            (XDP_DROP, Counter::DropTruncated)
        } else {
            (XDP_PASS, Counter::PassMalformed)
        };
        let out = run(&dp, &frame, want, &[(verdict, 1)]);
        if want == XDP_PASS {
            assert_eq!(out, frame);
        }
    }
}
