//! Site B's NAT under BPF_PROG_TEST_RUN: traffic to `N` is rewritten to `H`
//! and delivered to the VM; the VM's packets on NAT flows leave as `N`.
//! Every rewritten packet's checksums are recomputed and compared.

use std::net::{IpAddr, Ipv4Addr};

use etherparse::{NetSlice, PacketBuilder, SlicedPacket, TransportSlice};
use movarto_common::{
    config::Mode,
    counters::Counter,
    flow::{FlowKey, origin},
    net::proto,
};
use movarto_tests::{Hook, require_root, run_frame_out};
use movarto_user::datapath::{Datapath, SiteConfig};

const XDP_PASS: u32 = 2;
const XDP_REDIRECT: u32 = 4;
const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;

const HOME4: [u8; 4] = [192, 0, 2, 10];
const NEW4: [u8; 4] = [198, 18, 0, 10];
const PEER4: [u8; 4] = [198, 51, 100, 7];
const HOME6: [u8; 16] = [
    0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
];
const NEW6: [u8; 16] = [
    0x20, 0x01, 0x0d, 0xb8, 0, 0xb, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
];
const PEER6: [u8; 16] = [
    0x20, 0x01, 0x0d, 0xb8, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x07,
];
const VM_MAC: [u8; 6] = [0x52, 0x54, 0, 0, 0, 0x10];
const GW_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const UPLINK_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xb1];
const ROUTER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xfe];

fn site_b(mode: Mode, home: IpAddr, new: IpAddr) -> Datapath {
    require_root();
    let mut cfg = SiteConfig::new(mode, home);
    cfg.new_addr = Some(new);
    cfg.local_tunnel_addr = Ipv4Addr::new(203, 0, 113, 2);
    cfg.peer_tunnel_addr = Ipv4Addr::new(203, 0, 113, 1);
    cfg.token = movarto_common::ids::SessionToken(7);
    cfg.vm_ifindex = 7;
    cfg.vm_mac = movarto_common::ids::MacAddr(VM_MAC);
    cfg.gateway_mac = movarto_common::ids::MacAddr(GW_MAC);
    let mut dp = Datapath::load().expect("load datapath");
    dp.set_config(&cfg).expect("config");
    dp
}

fn v4(src: [u8; 4], dst: [u8; 4]) -> etherparse::PacketBuilderStep<etherparse::IpHeaders> {
    PacketBuilder::ethernet2(ROUTER_MAC, UPLINK_MAC).ipv4(src, dst, 64)
}

fn v6(src: [u8; 16], dst: [u8; 16]) -> etherparse::PacketBuilderStep<etherparse::IpHeaders> {
    PacketBuilder::ethernet2(ROUTER_MAC, UPLINK_MAC).ipv6(src, dst, 64)
}

fn tcp(
    b: etherparse::PacketBuilderStep<etherparse::IpHeaders>,
    sport: u16,
    dport: u16,
    syn: bool,
    payload: &[u8],
) -> Vec<u8> {
    let mut t = b.tcp(sport, dport, 1, 64240);
    t = if syn { t.syn() } else { t.ack(1) };
    let mut out = Vec::new();
    t.write(&mut out, payload).expect("build");
    out
}

fn udp(b: etherparse::PacketBuilderStep<etherparse::IpHeaders>, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    b.udp(5353, 53).write(&mut out, payload).expect("build");
    out
}

/// Source and destination of the frame, after checking every checksum in it.
fn addresses_with_valid_checksums(frame: &[u8]) -> (IpAddr, IpAddr) {
    let sliced = SlicedPacket::from_ethernet(frame).expect("parse");
    let (src, dst, v4h, v6h) = match &sliced.net {
        Some(NetSlice::Ipv4(ip)) => {
            let h = ip.header().to_header();
            assert_eq!(
                h.header_checksum,
                h.calc_header_checksum(),
                "IPv4 header checksum"
            );
            (
                IpAddr::from(h.source),
                IpAddr::from(h.destination),
                Some(h),
                None,
            )
        }
        Some(NetSlice::Ipv6(ip)) => {
            let h = ip.header().to_header();
            (
                IpAddr::from(h.source),
                IpAddr::from(h.destination),
                None,
                Some(h),
            )
        }
        _ => panic!("not IP"),
    };
    match sliced.transport {
        Some(TransportSlice::Tcp(t)) => {
            let want = match (&v4h, &v6h) {
                (Some(h), _) => t
                    .to_header()
                    .calc_checksum_ipv4(h, t.payload())
                    .expect("csum"),
                (_, Some(h)) => t
                    .to_header()
                    .calc_checksum_ipv6(h, t.payload())
                    .expect("csum"),
                _ => unreachable!(),
            };
            assert_eq!(t.checksum(), want, "TCP checksum");
        }
        Some(TransportSlice::Udp(u)) => {
            let h = u.to_header();
            match (&v4h, &v6h) {
                (Some(_), _) if h.checksum == 0 => {}
                (Some(ip), _) => assert_eq!(
                    h.checksum,
                    h.calc_checksum_ipv4(ip, u.payload()).expect("csum"),
                    "UDP checksum"
                ),
                (_, Some(ip)) => assert_eq!(
                    h.checksum,
                    h.calc_checksum_ipv6(ip, u.payload()).expect("csum"),
                    "UDP checksum"
                ),
                _ => unreachable!(),
            }
        }
        Some(TransportSlice::Icmpv4(i)) => {
            assert_eq!(
                i.checksum(),
                i.icmp_type().calc_checksum(i.payload()),
                "ICMP checksum"
            );
        }
        Some(TransportSlice::Icmpv6(i)) => {
            let h = v6h.expect("ICMPv6 over IPv6");
            let want = i
                .icmp_type()
                .calc_checksum(h.source, h.destination, i.payload())
                .expect("csum");
            assert_eq!(i.checksum(), want, "ICMPv6 checksum");
        }
        _ => {}
    }
    (src, dst)
}

fn run(dp: &Datapath, hook: Hook, frame: &[u8]) -> (u32, Vec<u8>) {
    run_frame_out(dp, hook, frame).expect("test run")
}

fn origin_of(dp: &Datapath, key: &FlowKey) -> Option<u8> {
    dp.flows()
        .expect("flows")
        .into_iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.origin)
}

#[test]
fn traffic_to_new_address_is_dnatted_and_delivered_to_the_vm() {
    let dp = site_b(Mode::Receive, IpAddr::from(HOME4), IpAddr::from(NEW4));
    let frame = tcp(v4(PEER4, NEW4), 40000, 80, true, b"");
    let (ret, out) = run(&dp, Hook::Uplink, &frame);
    assert_eq!(ret, XDP_REDIRECT);
    assert_eq!(&out[..6], &VM_MAC);
    assert_eq!(&out[6..12], &GW_MAC);
    assert_eq!(
        addresses_with_valid_checksums(&out),
        (IpAddr::from(PEER4), IpAddr::from(HOME4))
    );
    assert_eq!(out.len(), frame.len());
    let key = FlowKey::new(
        (IpAddr::from(HOME4), 80),
        (IpAddr::from(PEER4), 40000),
        proto::TCP,
    )
    .expect("key");
    assert_eq!(origin_of(&dp, &key), Some(origin::NAT));
    assert_eq!(dp.counters().expect("counters").get(Counter::NatIn), 1);
}

#[test]
fn dnat_keeps_udp_and_icmp_checksums_right() {
    let dp = site_b(Mode::Receive, IpAddr::from(HOME4), IpAddr::from(NEW4));
    let with_sum = udp(v4(PEER4, NEW4), b"query");
    let (_, out) = run(&dp, Hook::Uplink, &with_sum);
    assert_eq!(addresses_with_valid_checksums(&out).1, IpAddr::from(HOME4));
    let mut without_sum = udp(v4(PEER4, NEW4), b"query");
    without_sum[14 + 20 + 6] = 0;
    without_sum[14 + 20 + 7] = 0;
    let (_, out) = run(&dp, Hook::Uplink, &without_sum);
    assert_eq!(
        &out[14 + 20 + 6..14 + 20 + 8],
        &[0, 0],
        "no UDP checksum stays none"
    );
    let mut ping = Vec::new();
    v4(PEER4, NEW4)
        .icmpv4_echo_request(1, 1)
        .write(&mut ping, b"ping")
        .expect("build");
    let (ret, out) = run(&dp, Hook::Uplink, &ping);
    assert_eq!(ret, XDP_REDIRECT);
    assert_eq!(addresses_with_valid_checksums(&out).1, IpAddr::from(HOME4));
}

#[test]
fn ipv6_dnat_and_snat_fix_the_pseudo_header_checksums() {
    let dp = site_b(Mode::Receive, IpAddr::from(HOME6), IpAddr::from(NEW6));
    let (ret, out) = run(
        &dp,
        Hook::Uplink,
        &tcp(v6(PEER6, NEW6), 40000, 443, true, b""),
    );
    assert_eq!(ret, XDP_REDIRECT);
    assert_eq!(addresses_with_valid_checksums(&out).1, IpAddr::from(HOME6));
    let mut ping = Vec::new();
    v6(PEER6, NEW6)
        .icmpv6_echo_request(1, 1)
        .write(&mut ping, b"ping")
        .expect("build");
    let (_, out) = run(&dp, Hook::Uplink, &ping);
    assert_eq!(addresses_with_valid_checksums(&out).1, IpAddr::from(HOME6));
    let reply = tcp(v6(HOME6, PEER6), 443, 40000, false, b"hello");
    let (ret, out) = run(&dp, Hook::VmFacing, &reply);
    assert_eq!(ret, TC_ACT_OK);
    assert_eq!(addresses_with_valid_checksums(&out).0, IpAddr::from(NEW6));
}

#[test]
fn replies_on_nat_flows_leave_as_the_new_address() {
    let dp = site_b(Mode::Receive, IpAddr::from(HOME4), IpAddr::from(NEW4));
    run(
        &dp,
        Hook::Uplink,
        &tcp(v4(PEER4, NEW4), 40000, 80, true, b""),
    );
    let reply = tcp(v4(HOME4, PEER4), 80, 40000, false, &[3; 700]);
    let (ret, out) = run(&dp, Hook::VmFacing, &reply);
    assert_eq!(ret, TC_ACT_OK, "then the kernel routes it");
    assert_eq!(
        addresses_with_valid_checksums(&out),
        (IpAddr::from(NEW4), IpAddr::from(PEER4))
    );
    assert_eq!(dp.counters().expect("counters").get(Counter::NatOut), 1);
    let mut reply = udp(v4(HOME4, PEER4), b"answer");
    reply[14 + 20 + 6] = 0;
    reply[14 + 20 + 7] = 0;
    // A UDP flow the VM did not open through NAT is not rewritten: in receive
    // mode it takes the tunnel (which has no route in this test; see tunnel.rs).
    let (ret, _) = run(&dp, Hook::VmFacing, &reply);
    assert_eq!(ret, TC_ACT_SHOT);
    let counters = dp.counters().expect("counters");
    assert_eq!(counters.get(Counter::NatOut), 1);
    assert_eq!(counters.get(Counter::DropNoRoute), 1);
}

#[test]
fn a_connection_the_vm_opens_goes_out_through_nat() {
    let dp = site_b(Mode::Receive, IpAddr::from(HOME4), IpAddr::from(NEW4));
    let server = [203, 0, 113, 80];
    let syn = tcp(v4(HOME4, server), 50000, 443, true, b"");
    let (ret, out) = run(&dp, Hook::VmFacing, &syn);
    assert_eq!(ret, TC_ACT_OK);
    assert_eq!(addresses_with_valid_checksums(&out).0, IpAddr::from(NEW4));
    let key = FlowKey::new(
        (IpAddr::from(HOME4), 50000),
        (IpAddr::from(server), 443),
        proto::TCP,
    )
    .expect("key");
    assert_eq!(origin_of(&dp, &key), Some(origin::NAT));
    let ack = tcp(v4(HOME4, server), 50000, 443, false, b"GET");
    let (_, out) = run(&dp, Hook::VmFacing, &ack);
    assert_eq!(
        addresses_with_valid_checksums(&out).0,
        IpAddr::from(NEW4),
        "the rest of the flow follows"
    );
}

/// Pre-move flows are never NATed at B: they take the tunnel (no route here,
/// so the attempt is dropped and counted; tunnel.rs tests the way out).
#[test]
fn flows_that_are_not_nat_flows_are_not_rewritten_in_receive_mode() {
    let dp = site_b(Mode::Receive, IpAddr::from(HOME4), IpAddr::from(NEW4));
    let reply = tcp(v4(HOME4, PEER4), 80, 40000, false, b"pre-move flow");
    let (ret, _) = run(&dp, Hook::VmFacing, &reply);
    assert_eq!(ret, TC_ACT_SHOT);
    let counters = dp.counters().expect("counters");
    assert_eq!(counters.get(Counter::NatOut), 0);
    assert_eq!(counters.get(Counter::DropNoRoute), 1);
}

#[test]
fn nat_mode_rewrites_every_flow_and_no_longer_unwraps_the_tunnel() {
    let dp = site_b(Mode::Nat, IpAddr::from(HOME4), IpAddr::from(NEW4));
    let reply = tcp(v4(HOME4, PEER4), 80, 40000, false, b"x");
    let (_, out) = run(&dp, Hook::VmFacing, &reply);
    assert_eq!(addresses_with_valid_checksums(&out).0, IpAddr::from(NEW4));
    let (ret, out) = run(
        &dp,
        Hook::Uplink,
        &tcp(v4(PEER4, NEW4), 40001, 80, true, b""),
    );
    assert_eq!(ret, XDP_REDIRECT);
    assert_eq!(addresses_with_valid_checksums(&out).1, IpAddr::from(HOME4));
    // GUE to our old endpoint is just UDP to the kernel now.
    let gue = udp(
        v4([203, 0, 113, 1], [203, 0, 113, 2]),
        &[0x02, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 7],
    );
    let mut gue = gue;
    gue[14 + 20 + 2..14 + 20 + 4].copy_from_slice(&6080u16.to_be_bytes());
    let (ret, _) = run(&dp, Hook::Uplink, &gue);
    assert_eq!(ret, XDP_PASS);
    assert_eq!(dp.counters().expect("counters").get(Counter::TunnelIn), 0);
}

/// A newcomer to `N` from a client port that a pre-move flow used (the other
/// site's snapshot puts every pre-move flow into B's map as tunnelled) is a NAT
/// flow: its SYN-ACK must leave as `N`, not go into the tunnel, where the
/// client would get it from `H` and never connect.
#[test]
fn a_newcomer_to_the_new_address_on_a_pre_move_flows_tuple_is_a_nat_flow() {
    for (home, new, peer) in [
        (IpAddr::from(HOME4), IpAddr::from(NEW4), IpAddr::from(PEER4)),
        (IpAddr::from(HOME6), IpAddr::from(NEW6), IpAddr::from(PEER6)),
    ] {
        let dp = site_b(Mode::Receive, home, new);
        let frame = |src: IpAddr, dst: IpAddr, sport, dport, syn, ack: bool| {
            let b = match (src, dst) {
                (IpAddr::V4(s), IpAddr::V4(d)) => v4(s.octets(), d.octets()),
                (IpAddr::V6(s), IpAddr::V6(d)) => v6(s.octets(), d.octets()),
                _ => unreachable!("one family"),
            };
            let mut t = b.tcp(sport, dport, 1, 64240);
            if syn {
                t = t.syn();
            }
            if ack {
                t = t.ack(1);
            }
            let mut out = Vec::new();
            t.write(&mut out, b"").expect("build");
            out
        };
        // The pre-move flow: the VM's packet on it is learned as tunnelled (and
        // takes the tunnel, which has no route in a test run).
        let (ret, _) = run(
            &dp,
            Hook::VmFacing,
            &frame(home, peer, 80, 40000, false, true),
        );
        assert_eq!(ret, TC_ACT_SHOT);
        let key = FlowKey::new((home, 80), (peer, 40000), proto::TCP).expect("key");
        assert_eq!(origin_of(&dp, &key), Some(origin::TUNNELLED));

        let (ret, out) = run(&dp, Hook::Uplink, &frame(peer, new, 40000, 80, true, false));
        assert_eq!(ret, XDP_REDIRECT);
        assert_eq!(addresses_with_valid_checksums(&out), (peer, home));
        assert_eq!(origin_of(&dp, &key), Some(origin::NAT), "{home}");
        let counters = dp.counters().expect("counters");
        assert_eq!(counters.get(Counter::FlowReused), 1);

        let (ret, out) = run(
            &dp,
            Hook::VmFacing,
            &frame(home, peer, 80, 40000, true, true),
        );
        assert_eq!(ret, TC_ACT_OK, "the SYN-ACK is NATed, not tunnelled");
        assert_eq!(addresses_with_valid_checksums(&out), (new, peer));
        let counters = dp.counters().expect("counters");
        assert_eq!(counters.get(Counter::NatOut), 1);
        assert_eq!(counters.get(Counter::TunnelOut), 0);
        assert_eq!(counters.get(Counter::FlowReused), 1, "replaced once");
    }
}

/// At B, only the tunnel and `N` lead to the VM: a plain packet for `H` from the
/// Internet would be routed straight to it by B's kernel, past the peer and token
/// checks, so `receive` and `nat` drop it. In `direct` (move address mode) `H` is
/// routed to B, and such packets are the normal path.
#[test]
fn packets_for_the_home_address_that_did_not_come_through_the_tunnel_are_dropped() {
    const XDP_DROP: u32 = 1;
    for (home, new, peer) in [
        (IpAddr::from(HOME4), IpAddr::from(NEW4), IpAddr::from(PEER4)),
        (IpAddr::from(HOME6), IpAddr::from(NEW6), IpAddr::from(PEER6)),
    ] {
        let plain = |dp: &Datapath| {
            let b = match (peer, home) {
                (IpAddr::V4(s), IpAddr::V4(d)) => v4(s.octets(), d.octets()),
                (IpAddr::V6(s), IpAddr::V6(d)) => v6(s.octets(), d.octets()),
                _ => unreachable!("one family"),
            };
            let mut out = Vec::new();
            b.udp(5353, 9).write(&mut out, b"spoofed").expect("build");
            run(dp, Hook::Uplink, &out).0
        };
        for (mode, want, dropped) in [
            (Mode::Receive, XDP_DROP, 1),
            (Mode::Nat, XDP_DROP, 1),
            (Mode::Direct, XDP_PASS, 0),
            (Mode::Idle, XDP_PASS, 0),
        ] {
            let dp = site_b(mode, home, new);
            assert_eq!(plain(&dp), want, "{mode} {home}");
            let counters = dp.counters().expect("counters");
            assert_eq!(counters.get(Counter::DropNotTunnelled), dropped, "{mode}");
            assert_eq!(counters.get(Counter::NatIn), 0);
        }
    }
}

/// A router's unicast NUD probe of `N` (ICMPv6 neighbour solicitation to `N`) on B's
/// uplink is the link's business: B's kernel answers it. DNATed to the VM it would go
/// unanswered, and the router would lose `N`'s neighbour entry.
#[test]
fn neighbour_discovery_for_the_new_address_stays_with_bs_kernel() {
    for mode in [Mode::Receive, Mode::Nat] {
        let dp = site_b(mode, IpAddr::from(HOME6), IpAddr::from(NEW6));
        let router = [0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        let mut body = NEW6.to_vec();
        body.extend_from_slice(&[1, 1]);
        body.extend_from_slice(&ROUTER_MAC);
        for src in [PEER6, router] {
            let mut ns = Vec::new();
            PacketBuilder::ethernet2(ROUTER_MAC, UPLINK_MAC)
                .ipv6(src, NEW6, 255)
                .icmpv6(etherparse::Icmpv6Type::Unknown {
                    type_u8: 135,
                    code_u8: 0,
                    bytes5to8: [0; 4],
                })
                .write(&mut ns, &body)
                .expect("build");
            let (ret, out) = run(&dp, Hook::Uplink, &ns);
            assert_eq!((ret, &out), (XDP_PASS, &ns), "{mode}");
        }
        let counters = dp.counters().expect("counters");
        assert_eq!(counters.get(Counter::NatIn), 0);
        assert_eq!(counters.get(Counter::DropNotTunnelled), 0);
    }
}
