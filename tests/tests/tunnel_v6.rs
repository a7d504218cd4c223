//! IPv6 through the tunnel under BPF_PROG_TEST_RUN: site A in `forward`
//! unwrapping site B's IPv6 replies (GUE proto 41), and the link's own IPv6
//! traffic (neighbour discovery, link-local, multicast) kept out of the tunnel
//! and the NAT at both sites. Routing uses the kernel FIB of a namespace the
//! test builds, as in `tunnel.rs`.

use std::net::{IpAddr, Ipv4Addr};

use etherparse::{Icmpv6Type, PacketBuilder};
use movarto_common::{
    config::Mode,
    counters::Counter,
    flow::{FlowKey, gue_source_port, origin},
    gue::{OuterV4, encapsulate_v4},
    ids::{MacAddr, SessionToken},
    net::proto,
};
use movarto_tests::{
    Hook, assert_counter_delta, require_root, run_frame_out,
    uplink::{GW_MAC, Site, UPLINK_MAC, site},
};
use movarto_user::datapath::{Datapath, SiteConfig};

const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const XDP_REDIRECT: u32 = 4;
const TC_ACT_OK: u32 = 0;
const TC_ACT_REDIRECT: u32 = 7;

const TA: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
const TB: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 2);
/// H, on the VM's link 2001:db8::/64, whose anycast gateway is 2001:db8::1.
const HOME6: [u8; 16] = v6([0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x10]);
const GATEWAY6: [u8; 16] = v6([0x2001, 0xdb8, 0, 0, 0, 0, 0, 1]);
/// A client, routed by the site's uplink gateway.
const PEER6: [u8; 16] = v6([0x2001, 0xdb8, 1, 0, 0, 0, 0, 7]);
const NEW6: [u8; 16] = v6([0x2001, 0xdb8, 2, 0, 0, 0, 0, 0x10]);
const VM_LINK_LOCAL: [u8; 16] = v6([0xfe80, 0, 0, 0, 0x5054, 0xff, 0xfe00, 0x10]);
const GATEWAY_LINK_LOCAL: [u8; 16] = v6([0xfe80, 0, 0, 0, 0, 0, 0, 1]);
const ALL_NODES: [u8; 16] = v6([0xff02, 0, 0, 0, 0, 0, 0, 1]);
const ALL_ROUTERS: [u8; 16] = v6([0xff02, 0, 0, 0, 0, 0, 0, 2]);
/// The solicited-node multicast group of the gateway (ff02::1:ff00:1).
const SOLICITED_GATEWAY: [u8; 16] = v6([0xff02, 0, 0, 0, 0, 1, 0xff00, 1]);
/// The solicited-node multicast group of H (ff02::1:ff00:10).
const SOLICITED_HOME: [u8; 16] = v6([0xff02, 0, 0, 0, 0, 1, 0xff00, 0x10]);
const TOKEN: u64 = 0x6d6f_7661_7274_6f36;

const TB_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xb1];
const TA_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xa9];
const VM_MAC: [u8; 6] = [0x52, 0x54, 0, 0, 0, 0x10];
const ANYCAST_GW_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const ANY_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x99];

/// ICMPv6 neighbour discovery (RFC 4861).
const ND_ROUTER_SOLICIT: u8 = 133;
const ND_ROUTER_ADVERT: u8 = 134;
const ND_NEIGHBOUR_SOLICIT: u8 = 135;
const ND_NEIGHBOUR_ADVERT: u8 = 136;
const ND_REDIRECT: u8 = 137;

const fn v6(words: [u16; 8]) -> [u8; 16] {
    let mut out = [0u8; 16];
    let mut i = 0;
    while i < 8 {
        out[2 * i] = (words[i] >> 8) as u8;
        out[2 * i + 1] = words[i] as u8;
        i += 1;
    }
    out
}

fn site_a_config(s: &Site) -> SiteConfig {
    let mut cfg = SiteConfig::new(Mode::Forward, IpAddr::from(HOME6));
    cfg.uplink_ifindex = s.uplink_ifindex;
    cfg.local_tunnel_addr = TA;
    cfg.peer_tunnel_addr = TB;
    cfg.token = SessionToken(TOKEN);
    cfg.tunnel_mtu = 1500;
    cfg
}

fn site_b_config(s: &Site, mode: Mode) -> SiteConfig {
    let mut cfg = SiteConfig::new(mode, IpAddr::from(HOME6));
    cfg.new_addr = Some(IpAddr::from(NEW6));
    cfg.uplink_ifindex = s.uplink_ifindex;
    cfg.local_tunnel_addr = TB;
    cfg.peer_tunnel_addr = TA;
    cfg.token = SessionToken(TOKEN);
    cfg.tunnel_mtu = 1500;
    cfg.vm_ifindex = 7;
    cfg.vm_mac = MacAddr(VM_MAC);
    cfg.gateway_mac = MacAddr(ANYCAST_GW_MAC);
    cfg
}

fn load(cfg: &SiteConfig) -> Datapath {
    let mut dp = Datapath::load().expect("load datapath");
    dp.set_config(cfg).expect("config");
    dp
}

fn ethernet(dst: [u8; 6], src: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An ICMPv6 packet of `icmp_type` (code 0) from `src` to `dst`, hop limit
/// `hops`, with `body` after the first 8 bytes (an ND target and options).
fn icmpv6(src: [u8; 16], dst: [u8; 16], hops: u8, icmp_type: u8, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ipv6(src, dst, hops)
        .icmpv6(Icmpv6Type::Unknown {
            type_u8: icmp_type,
            code_u8: 0,
            bytes5to8: [0; 4],
        })
        .write(&mut out, body)
        .expect("build");
    out
}

/// A neighbour solicitation or advertisement body: the target and a
/// link-layer address option (source for NS, target for NA).
fn nd_body(target: [u8; 16], option: u8, lladdr: [u8; 6]) -> Vec<u8> {
    let mut body = target.to_vec();
    body.extend_from_slice(&[option, 1]);
    body.extend_from_slice(&lladdr);
    body
}

fn udp6(src: [u8; 16], dst: [u8; 16], payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ipv6(src, dst, 64)
        .udp(5353, 5353)
        .write(&mut out, payload)
        .expect("build");
    out
}

fn reference_gue(src: Ipv4Addr, dst: Ipv4Addr, key: &FlowKey, inner: &[u8]) -> Vec<u8> {
    let outer = OuterV4 {
        src,
        dst,
        src_port: gue_source_port(key),
        dst_port: 6080,
    };
    encapsulate_v4(&outer, TOKEN, inner)
}

/// The counters one passed IPv6 packet of transport `l4` moves.
fn passed(l4: Counter) -> [(Counter, u64); 3] {
    [(Counter::Packets, 1), (l4, 1), (Counter::PassIpv6, 1)]
}

/// Runs `frame` through `hook`: it must be left to the kernel, byte for
/// byte, with nothing counted but the pass, and no flow recorded.
fn assert_stays_local(dp: &Datapath, hook: Hook, what: &str, frame: &[u8], l4: Counter) {
    let pass = match hook {
        Hook::Uplink => XDP_PASS,
        Hook::VmFacing => TC_ACT_OK,
    };
    let before = dp.counters().expect("counters");
    let (ret, out) = run_frame_out(dp, hook, frame).expect("test run");
    let after = dp.counters().expect("counters");
    assert_eq!(ret, pass, "{what}: left to the kernel");
    assert_eq!(out, frame, "{what}: untouched");
    assert_counter_delta(&before, &after, &passed(l4));
    assert!(
        dp.flows().expect("flows").is_empty(),
        "{what}: no flow recorded"
    );
}

// ---- site A, forward: B's IPv6 replies ----

/// A decapsulated packet must equal `inner` in every byte but the hop limit,
/// which site A may decrement (it routes the packet) but not otherwise change.
fn assert_inner_modulo_hop_limit(out: &[u8], inner: &[u8]) {
    assert_eq!(&out[..14], &ethernet(GW_MAC, UPLINK_MAC, 0x86dd, &[])[..]);
    assert_eq!(out.len(), 14 + inner.len(), "the inner packet's length");
    let hop_limit = 7;
    assert!(
        out[14 + hop_limit] == inner[hop_limit] || out[14 + hop_limit] == inner[hop_limit] - 1,
        "hop limit {} from {}",
        out[14 + hop_limit],
        inner[hop_limit]
    );
    let mut got = out[14..].to_vec();
    got[hop_limit] = inner[hop_limit];
    assert_eq!(got, inner, "the inner packet, byte for byte");
}

#[test]
fn forward_unwraps_site_bs_ipv6_replies_and_routes_them_to_the_client() {
    require_root();
    let s = site(TA, TB, TB_MAC);
    let _in = s.ns.enter().expect("enter");
    let dp = load(&site_a_config(&s));

    let mut tcp = Vec::new();
    PacketBuilder::ipv6(HOME6, PEER6, 64)
        .tcp(443, 40000, 1, 64240)
        .ack(1)
        .write(&mut tcp, &[0x42; 300])
        .expect("build");
    tcp[0] = 0x6b; // traffic class 0xb8 and a flow label: carried as they are
    tcp[1] = 0x81;
    tcp[2] = 0x23;
    let key = FlowKey::new(
        (IpAddr::from(HOME6), 443),
        (IpAddr::from(PEER6), 40000),
        proto::TCP,
    )
    .expect("key");
    let frame = ethernet(
        UPLINK_MAC,
        TB_MAC,
        0x0800,
        &reference_gue(TB, TA, &key, &tcp),
    );
    assert_eq!(frame[14 + 29], 41, "GUE proto 41: IPv6 inside");
    let before = dp.counters().expect("counters");
    let (ret, out) = run_frame_out(&dp, Hook::Uplink, &frame).expect("test run");
    let after = dp.counters().expect("counters");
    assert!(
        ret == XDP_REDIRECT || ret == XDP_TX,
        "sent toward the client, got {ret}"
    );
    assert_inner_modulo_hop_limit(&out, &tcp);
    assert_counter_delta(
        &before,
        &after,
        &[
            (Counter::Packets, 1),
            (Counter::L4Udp, 1),
            (Counter::TunnelIn, 1),
            (Counter::FlowCreated, 1),
        ],
    );
    let flows = dp.flows().expect("flows");
    assert_eq!(flows.len(), 1);
    assert_eq!(flows[0].0, key);
    assert_eq!(flows[0].1.packets_to_peer, 1);
    assert_eq!(flows[0].1.origin, origin::STALE_DNS);

    // An ICMPv6 reply has no ports; it is unwrapped all the same.
    let mut pong = Vec::new();
    PacketBuilder::ipv6(HOME6, PEER6, 64)
        .icmpv6_echo_reply(7, 1)
        .write(&mut pong, b"pong")
        .expect("build");
    let key = FlowKey::new(
        (IpAddr::from(HOME6), 0),
        (IpAddr::from(PEER6), 0),
        proto::ICMPV6,
    )
    .expect("key");
    let frame = ethernet(
        UPLINK_MAC,
        TB_MAC,
        0x0800,
        &reference_gue(TB, TA, &key, &pong),
    );
    let before = dp.counters().expect("counters");
    let (ret, out) = run_frame_out(&dp, Hook::Uplink, &frame).expect("test run");
    let after = dp.counters().expect("counters");
    assert!(ret == XDP_REDIRECT || ret == XDP_TX, "got {ret}");
    assert_inner_modulo_hop_limit(&out, &pong);
    assert_eq!(
        after.get(Counter::TunnelIn) - before.get(Counter::TunnelIn),
        1
    );
}

// ---- site A, forward: the link's IPv6 traffic is never tunnelled ----

#[test]
fn forward_never_tunnels_neighbour_discovery_or_link_local_traffic_for_home() {
    require_root();
    let s = site(TA, TB, TB_MAC);
    let _in = s.ns.enter().expect("enter");
    let dp = load(&site_a_config(&s));
    let rows: [(&str, Vec<u8>, Counter); 9] = [
        (
            "unicast NS to H (NUD)",
            icmpv6(
                GATEWAY6,
                HOME6,
                255,
                ND_NEIGHBOUR_SOLICIT,
                &nd_body(HOME6, 1, ANY_MAC),
            ),
            Counter::L4Icmp,
        ),
        (
            "NS to H's solicited-node group",
            icmpv6(
                GATEWAY_LINK_LOCAL,
                SOLICITED_HOME,
                255,
                ND_NEIGHBOUR_SOLICIT,
                &nd_body(HOME6, 1, ANY_MAC),
            ),
            Counter::L4Icmp,
        ),
        (
            "NA to H",
            icmpv6(
                GATEWAY6,
                HOME6,
                255,
                ND_NEIGHBOUR_ADVERT,
                &nd_body(GATEWAY6, 2, ANY_MAC),
            ),
            Counter::L4Icmp,
        ),
        (
            "RS to H",
            icmpv6(PEER6, HOME6, 255, ND_ROUTER_SOLICIT, &[]),
            Counter::L4Icmp,
        ),
        (
            "RA to H",
            icmpv6(GATEWAY_LINK_LOCAL, HOME6, 255, ND_ROUTER_ADVERT, &[0; 8]),
            Counter::L4Icmp,
        ),
        (
            "redirect to H",
            icmpv6(
                GATEWAY_LINK_LOCAL,
                HOME6,
                255,
                ND_REDIRECT,
                &[GATEWAY6, PEER6].concat(),
            ),
            Counter::L4Icmp,
        ),
        (
            "UDP from a link-local source to H",
            udp6(GATEWAY_LINK_LOCAL, HOME6, b"ll"),
            Counter::L4Udp,
        ),
        (
            "UDP to all nodes",
            udp6(PEER6, ALL_NODES, b"mc"),
            Counter::L4Udp,
        ),
        (
            "UDP to a link-local address",
            udp6(PEER6, GATEWAY_LINK_LOCAL, b"ll"),
            Counter::L4Udp,
        ),
    ];
    for (what, packet, l4) in rows {
        let frame = ethernet(UPLINK_MAC, ANY_MAC, 0x86dd, &packet);
        assert_stays_local(&dp, Hook::Uplink, what, &frame, l4);
    }

    // Other ICMPv6 for H is the service's and goes into the tunnel as before.
    let mut ping = Vec::new();
    PacketBuilder::ipv6(PEER6, HOME6, 64)
        .icmpv6_echo_request(7, 1)
        .write(&mut ping, b"ping")
        .expect("build");
    let frame = ethernet(UPLINK_MAC, ANY_MAC, 0x86dd, &ping);
    let (ret, _) = run_frame_out(&dp, Hook::Uplink, &frame).expect("test run");
    assert_eq!(ret, XDP_REDIRECT, "an echo request to H is tunnelled");
    assert_eq!(dp.counters().expect("counters").get(Counter::TunnelOut), 1);
}

// ---- site B: the VM's link-local traffic stays on the link ----

/// What the VM sends that is the link's business (B's kernel, which holds the
/// anycast gateway's address, answers it), each with its transport counter.
fn vm_link_traffic() -> Vec<(&'static str, Vec<u8>, Counter)> {
    vec![
        (
            "NS from H for the gateway, to its solicited-node group",
            icmpv6(
                HOME6,
                SOLICITED_GATEWAY,
                255,
                ND_NEIGHBOUR_SOLICIT,
                &nd_body(GATEWAY6, 1, VM_MAC),
            ),
            Counter::L4Icmp,
        ),
        (
            "unicast NS from H to the gateway's global address (NUD)",
            icmpv6(
                HOME6,
                GATEWAY6,
                255,
                ND_NEIGHBOUR_SOLICIT,
                &nd_body(GATEWAY6, 1, VM_MAC),
            ),
            Counter::L4Icmp,
        ),
        (
            "NA from H to the gateway's global address",
            icmpv6(
                HOME6,
                GATEWAY6,
                255,
                ND_NEIGHBOUR_ADVERT,
                &nd_body(HOME6, 2, VM_MAC),
            ),
            Counter::L4Icmp,
        ),
        (
            "NA from H to a remote address",
            icmpv6(
                HOME6,
                PEER6,
                255,
                ND_NEIGHBOUR_ADVERT,
                &nd_body(HOME6, 2, VM_MAC),
            ),
            Counter::L4Icmp,
        ),
        (
            "RS from H to all routers",
            icmpv6(HOME6, ALL_ROUTERS, 255, ND_ROUTER_SOLICIT, &[]),
            Counter::L4Icmp,
        ),
        (
            "RS from H to a remote address",
            icmpv6(HOME6, PEER6, 255, ND_ROUTER_SOLICIT, &[]),
            Counter::L4Icmp,
        ),
        (
            "RA from H",
            icmpv6(HOME6, PEER6, 255, ND_ROUTER_ADVERT, &[0; 8]),
            Counter::L4Icmp,
        ),
        (
            "redirect from H",
            icmpv6(HOME6, PEER6, 255, ND_REDIRECT, &[GATEWAY6, PEER6].concat()),
            Counter::L4Icmp,
        ),
        (
            "UDP from H to fe80::1",
            udp6(HOME6, GATEWAY_LINK_LOCAL, b"ll"),
            Counter::L4Udp,
        ),
        (
            "echo request from H to ff02::1",
            {
                let mut out = Vec::new();
                PacketBuilder::ipv6(HOME6, ALL_NODES, 1)
                    .icmpv6_echo_request(1, 1)
                    .write(&mut out, b"all")
                    .expect("build");
                out
            },
            Counter::L4Icmp,
        ),
        (
            "NS from the VM's link-local address",
            icmpv6(
                VM_LINK_LOCAL,
                SOLICITED_GATEWAY,
                255,
                ND_NEIGHBOUR_SOLICIT,
                &nd_body(GATEWAY6, 1, VM_MAC),
            ),
            Counter::L4Icmp,
        ),
    ]
}

#[test]
fn receive_keeps_the_vms_neighbour_discovery_and_link_local_traffic_on_the_link() {
    require_root();
    let s = site(TB, TA, TA_MAC);
    let _in = s.ns.enter().expect("enter");
    let dp = load(&site_b_config(&s, Mode::Receive));
    for (what, packet, l4) in vm_link_traffic() {
        let frame = ethernet(ANYCAST_GW_MAC, VM_MAC, 0x86dd, &packet);
        assert_stays_local(&dp, Hook::VmFacing, what, &frame, l4);
    }
    // The VM's other IPv6 from H still goes into the tunnel.
    let reply = udp6(HOME6, PEER6, b"answer");
    let (ret, _) = run_frame_out(
        &dp,
        Hook::VmFacing,
        &ethernet(ANYCAST_GW_MAC, VM_MAC, 0x86dd, &reply),
    )
    .expect("test run");
    assert_eq!(ret, TC_ACT_REDIRECT, "a reply from H is tunnelled");
    assert_eq!(dp.counters().expect("counters").get(Counter::TunnelOut), 1);
}

#[test]
fn nat_keeps_the_vms_neighbour_discovery_and_link_local_traffic_out_of_the_nat() {
    require_root();
    let s = site(TB, TA, TA_MAC);
    let _in = s.ns.enter().expect("enter");
    let dp = load(&site_b_config(&s, Mode::Nat));
    for (what, packet, l4) in vm_link_traffic() {
        let frame = ethernet(ANYCAST_GW_MAC, VM_MAC, 0x86dd, &packet);
        assert_stays_local(&dp, Hook::VmFacing, what, &frame, l4);
    }
    // The VM's other IPv6 from H leaves as N.
    let reply = udp6(HOME6, PEER6, b"answer");
    let (ret, out) = run_frame_out(
        &dp,
        Hook::VmFacing,
        &ethernet(ANYCAST_GW_MAC, VM_MAC, 0x86dd, &reply),
    )
    .expect("test run");
    assert_eq!(ret, TC_ACT_OK);
    assert_eq!(&out[14 + 8..14 + 24], &NEW6, "SNATed to N");
    assert_eq!(dp.counters().expect("counters").get(Counter::NatOut), 1);
}
