//! Moving back before the drain ended (A→B, then B→A while B still tunnels), under
//! BPF_PROG_TEST_RUN. Site B is in `forward`: traffic to its `N` goes to A in GUE,
//! DNATed to `H`, and A's tunnelled replies on those NAT flows leave B as `N` again.
//! Site A is in `forward` until the VM runs there and in `return` after: traffic to
//! `H` is its own, GUE from B is delivered to the VM, and the VM's packets on flows A
//! did not see itself go back through the tunnel. Every encapsulated output is
//! compared byte for byte with movarto-common's reference encoder, every other
//! output with the packet it must be. Routing uses the kernel FIB of a namespace.

use std::net::{IpAddr, Ipv4Addr};

use etherparse::PacketBuilder;
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
    uplink::{GW_MAC, UPLINK_MAC, site},
};
use movarto_user::datapath::{Datapath, SiteConfig};

const XDP_PASS: u32 = 2;
const XDP_REDIRECT: u32 = 4;
const TC_ACT_OK: u32 = 0;
const TC_ACT_REDIRECT: u32 = 7;

const TA: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
const TB: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 2);
const TA_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xa9];
const TB_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xb1];
const TOKEN: u64 = 0x6d6f_7661_7274_6f21;
const HOME: [u8; 4] = [192, 0, 2, 10];
/// The service's address at B, where clients connected while the VM ran there.
const NEW: [u8; 4] = [198, 18, 0, 10];
/// A client of `N` (it connected while the VM was at B).
const CLIENT_OF_NEW: [u8; 4] = [198, 51, 100, 7];
/// A client of `H` from before the first move (or since the VM is back).
const CLIENT_OF_HOME: [u8; 4] = [198, 51, 100, 8];
/// A peer no site has seen.
const STRANGER: [u8; 4] = [198, 51, 100, 9];
const VM_MAC: [u8; 6] = [0x52, 0x54, 0, 0, 0, 0x10];
const ANYCAST_GW_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const WAN_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x99];
const VM_IFINDEX: u32 = 7;

fn service(mode: Mode, uplink_ifindex: u32, local: Ipv4Addr, peer: Ipv4Addr) -> SiteConfig {
    let mut cfg = SiteConfig::new(mode, IpAddr::from(HOME))
        .with_tunnel(local, peer, SessionToken(TOKEN))
        .with_macs(MacAddr(VM_MAC), MacAddr(ANYCAST_GW_MAC));
    cfg.uplink_ifindex = uplink_ifindex;
    cfg.vm_ifindex = VM_IFINDEX;
    cfg.tunnel_mtu = 1500;
    cfg
}

fn load(cfg: &SiteConfig) -> Datapath {
    let mut dp = Datapath::load().expect("load datapath");
    dp.set_config(cfg).expect("config");
    dp
}

/// TCP from `src` port `sport` to `dst` port `dport`, as an IP packet.
fn tcp(src: [u8; 4], dst: [u8; 4], ports: (u16, u16), ttl: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ipv4(src, dst, ttl)
        .tcp(ports.0, ports.1, 1, 64240)
        .ack(1)
        .write(&mut out, payload)
        .expect("build");
    out
}

fn to_service(client: [u8; 4], service: [u8; 4], ttl: u8, payload: &[u8]) -> Vec<u8> {
    tcp(client, service, (40000, 80), ttl, payload)
}

fn from_service(service: [u8; 4], client: [u8; 4], ttl: u8, payload: &[u8]) -> Vec<u8> {
    tcp(service, client, (80, 40000), ttl, payload)
}

fn ethernet(dst: [u8; 6], src: [u8; 6], ip: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + ip.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    f.extend_from_slice(ip);
    f
}

/// The flow of `client` as seen from `service`, port 80 to 40000.
fn key(service: [u8; 4], client: [u8; 4]) -> FlowKey {
    FlowKey::new(
        (IpAddr::from(service), 80),
        (IpAddr::from(client), 40000),
        proto::TCP,
    )
    .expect("key")
}

/// What site `src` sends to site `dst` for `inner`, per the reference encoder.
fn reference_gue(src: Ipv4Addr, dst: Ipv4Addr, key: &FlowKey, inner: &[u8]) -> Vec<u8> {
    let outer = OuterV4 {
        src,
        dst,
        src_port: gue_source_port(key),
        dst_port: 6080,
    };
    encapsulate_v4(&outer, TOKEN, inner)
}

/// GUE from A as it arrives at B's uplink.
fn gue_from_a(key: &FlowKey, inner: &[u8]) -> Vec<u8> {
    ethernet(UPLINK_MAC, TA_MAC, &reference_gue(TA, TB, key, inner))
}

/// GUE from B as it arrives at A's uplink.
fn gue_from_b(key: &FlowKey, inner: &[u8]) -> Vec<u8> {
    ethernet(UPLINK_MAC, TB_MAC, &reference_gue(TB, TA, key, inner))
}

/// Runs `frame` on `hook`; asserts the verdict and the counters' change (besides
/// `packets`), and returns the frame that left.
fn run(dp: &Datapath, hook: Hook, frame: &[u8], want: u32, delta: &[(Counter, u64)]) -> Vec<u8> {
    let before = dp.counters().expect("counters");
    let (ret, out) = run_frame_out(dp, hook, frame).expect("test run");
    assert_eq!(ret, want, "verdict");
    let mut all = vec![(Counter::Packets, 1)];
    all.extend_from_slice(delta);
    assert_counter_delta(&before, &dp.counters().expect("counters"), &all);
    out
}

fn origin_of(dp: &Datapath, key: &FlowKey) -> Option<u8> {
    dp.flows()
        .expect("flows")
        .into_iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.origin)
}

/// The VM's reply to `client` at A, on a flow A saw itself: it leaves untouched.
fn vm_reply_leaves_directly(dp: &Datapath, client: [u8; 4]) {
    let direct = ethernet(
        ANYCAST_GW_MAC,
        VM_MAC,
        &from_service(HOME, client, 64, b"direct"),
    );
    let out = run(
        dp,
        Hook::VmFacing,
        &direct,
        TC_ACT_OK,
        &[TCP, (Counter::PassIpv4, 1), (Counter::FlowConfirmed, 1)],
    );
    assert_eq!(out, direct, "untouched");
}

/// The VM's reply to `client` at A, on a flow A did not see itself: into the tunnel
/// to B, exactly like the reference; `flow` is the flow map's change.
fn vm_reply_goes_to_b(dp: &Datapath, client: [u8; 4], flow: &[(Counter, u64)]) {
    let reply = from_service(HOME, client, 64, b"through B");
    let mut delta = vec![TCP, (Counter::TunnelOut, 1)];
    delta.extend_from_slice(flow);
    let out = run(
        dp,
        Hook::VmFacing,
        &ethernet(ANYCAST_GW_MAC, VM_MAC, &reply),
        TC_ACT_REDIRECT,
        &delta,
    );
    assert_eq!(
        out,
        ethernet(
            TB_MAC,
            UPLINK_MAC,
            &reference_gue(TA, TB, &key(HOME, client), &reply)
        ),
        "into the tunnel, exactly like the reference"
    );
}

const TCP: (Counter, u64) = (Counter::L4Tcp, 1);
const UDP: (Counter, u64) = (Counter::L4Udp, 1);

#[test]
fn site_b_in_forward_tunnels_its_nat_flows_to_the_vm_back_at_a_and_undoes_the_nat() {
    require_root();
    let s = site(TB, TA, TA_MAC);
    let _in = s.ns.enter().expect("enter");
    let mut cfg = service(Mode::Forward, s.uplink_ifindex, TB, TA);
    cfg.new_addr = Some(IpAddr::from(NEW));
    let dp = load(&cfg);

    // A client of N: DNATed to H, one hop older, into the tunnel to A.
    let sent = to_service(CLIENT_OF_NEW, NEW, 64, b"to N");
    let out = run(
        &dp,
        Hook::Uplink,
        &ethernet(UPLINK_MAC, WAN_MAC, &sent),
        XDP_REDIRECT,
        &[TCP, (Counter::TunnelOut, 1), (Counter::FlowCreated, 1)],
    );
    let inner = to_service(CLIENT_OF_NEW, HOME, 63, b"to N");
    assert_eq!(
        out,
        ethernet(
            TA_MAC,
            UPLINK_MAC,
            // The outer source port is hashed from the packet as it arrived.
            &reference_gue(TB, TA, &key(NEW, CLIENT_OF_NEW), &inner)
        ),
        "GUE to A around the DNATed packet"
    );
    assert_eq!(
        origin_of(&dp, &key(HOME, CLIENT_OF_NEW)),
        Some(origin::NAT),
        "a NAT flow, under H"
    );

    // A's reply on that flow leaves B as N, one hop older.
    let reply = from_service(HOME, CLIENT_OF_NEW, 64, b"from the VM at A");
    let gue = gue_from_a(&key(HOME, CLIENT_OF_NEW), &reply);
    let out = run(
        &dp,
        Hook::Uplink,
        &gue,
        XDP_REDIRECT,
        &[UDP, (Counter::TunnelIn, 1), (Counter::FlowConfirmed, 1)],
    );
    assert_eq!(
        out,
        ethernet(
            GW_MAC,
            UPLINK_MAC,
            &from_service(NEW, CLIENT_OF_NEW, 63, b"from the VM at A")
        ),
        "SNATed to N, checksums right, toward the clients"
    );

    // A reply on a flow B holds no NAT for leaves as H.
    let reply = from_service(HOME, STRANGER, 64, b"not B's");
    let gue = gue_from_a(&key(HOME, STRANGER), &reply);
    let out = run(
        &dp,
        Hook::Uplink,
        &gue,
        XDP_REDIRECT,
        &[UDP, (Counter::TunnelIn, 1), (Counter::FlowCreated, 1)],
    );
    assert_eq!(
        out,
        ethernet(
            GW_MAC,
            UPLINK_MAC,
            &from_service(HOME, STRANGER, 63, b"not B's")
        )
    );

    // Plain traffic to another address is the kernel's.
    let other = ethernet(
        UPLINK_MAC,
        WAN_MAC,
        &to_service(CLIENT_OF_NEW, [198, 18, 0, 11], 64, b"x"),
    );
    let out = run(
        &dp,
        Hook::Uplink,
        &other,
        XDP_PASS,
        &[TCP, (Counter::PassIpv4, 1)],
    );
    assert_eq!(out, other);
}

#[test]
fn site_a_in_forward_delivers_what_the_peer_tunnels_for_home_to_the_arriving_vm() {
    require_root();
    let s = site(TA, TB, TB_MAC);
    let _in = s.ns.enter().expect("enter");
    let dp = load(&service(Mode::Forward, s.uplink_ifindex, TA, TB));

    // B tunnels a client of N, DNATed: A is where the VM arrives.
    let inner = to_service(CLIENT_OF_NEW, HOME, 63, b"for the VM");
    let gue = gue_from_b(&key(NEW, CLIENT_OF_NEW), &inner);
    let out = run(
        &dp,
        Hook::Uplink,
        &gue,
        XDP_REDIRECT,
        &[UDP, (Counter::TunnelIn, 1)],
    );
    assert_eq!(
        out,
        ethernet(VM_MAC, ANYCAST_GW_MAC, &inner),
        "unwrapped, untouched, to the VM"
    );

    // A client of H still goes to B while the VM is not here...
    let sent = to_service(CLIENT_OF_HOME, HOME, 64, b"pre-move");
    run(
        &dp,
        Hook::Uplink,
        &ethernet(UPLINK_MAC, WAN_MAC, &sent),
        XDP_REDIRECT,
        &[TCP, (Counter::TunnelOut, 1), (Counter::FlowCreated, 1)],
    );
    // ...and once the VM runs here, its replies on that flow, which A saw itself,
    // leave directly, while those on a flow A never saw go back to B.
    vm_reply_leaves_directly(&dp, CLIENT_OF_HOME);
    vm_reply_goes_to_b(&dp, CLIENT_OF_NEW, &[(Counter::FlowCreated, 1)]);
}

#[test]
fn site_a_in_return_serves_its_own_flows_directly_and_tunnels_the_rest_to_b() {
    require_root();
    let s = site(TA, TB, TB_MAC);
    let _in = s.ns.enter().expect("enter");
    let dp = load(&service(Mode::Return, s.uplink_ifindex, TA, TB));

    // Traffic to H is the VM's own again: recorded, passed untouched.
    let plain = ethernet(
        UPLINK_MAC,
        WAN_MAC,
        &to_service(CLIENT_OF_HOME, HOME, 64, b"mine"),
    );
    let out = run(
        &dp,
        Hook::Uplink,
        &plain,
        XDP_PASS,
        &[TCP, (Counter::PassIpv4, 1), (Counter::FlowCreated, 1)],
    );
    assert_eq!(out, plain);
    assert_eq!(
        origin_of(&dp, &key(HOME, CLIENT_OF_HOME)),
        Some(origin::TRACKED)
    );

    // GUE from B (a client of N, DNATed there) is delivered to the VM.
    let inner = to_service(CLIENT_OF_NEW, HOME, 63, b"via B");
    let gue = gue_from_b(&key(NEW, CLIENT_OF_NEW), &inner);
    let out = run(
        &dp,
        Hook::Uplink,
        &gue,
        XDP_REDIRECT,
        &[UDP, (Counter::TunnelIn, 1), (Counter::FlowCreated, 1)],
    );
    assert_eq!(out, ethernet(VM_MAC, ANYCAST_GW_MAC, &inner));
    assert_eq!(
        origin_of(&dp, &key(HOME, CLIENT_OF_NEW)),
        Some(origin::TUNNELLED)
    );
    // Not from B, or without the token: dropped.
    let mut forged = gue.clone();
    let token_at = 14 + 20 + 8 + 4;
    forged[token_at] ^= 0xff;
    run(
        &dp,
        Hook::Uplink,
        &forged,
        1,
        &[UDP, (Counter::DropGueBadToken, 1)],
    );

    // The VM's reply on A's own flow leaves directly, untouched; on the flow learned
    // from the tunnel, and on one never seen, back to B, where the NAT flows are.
    vm_reply_leaves_directly(&dp, CLIENT_OF_HOME);
    vm_reply_goes_to_b(&dp, CLIENT_OF_NEW, &[(Counter::FlowConfirmed, 1)]);
    vm_reply_goes_to_b(&dp, STRANGER, &[(Counter::FlowCreated, 1)]);
    // A connection the VM opens is A's own.
    let mut syn = Vec::new();
    PacketBuilder::ipv4(HOME, [198, 51, 100, 20], 64)
        .tcp(41000, 443, 1, 64240)
        .syn()
        .write(&mut syn, &[])
        .expect("build");
    let syn = ethernet(ANYCAST_GW_MAC, VM_MAC, &syn);
    let out = run(
        &dp,
        Hook::VmFacing,
        &syn,
        TC_ACT_OK,
        &[TCP, (Counter::PassIpv4, 1), (Counter::FlowCreated, 1)],
    );
    assert_eq!(out, syn);
}

const fn v6(w: [u16; 8]) -> [u8; 16] {
    let mut out = [0u8; 16];
    let mut i = 0;
    while i < 8 {
        out[2 * i] = (w[i] >> 8) as u8;
        out[2 * i + 1] = w[i] as u8;
        i += 1;
    }
    out
}

const HOME6: [u8; 16] = v6([0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x10]);
const NEW6: [u8; 16] = v6([0x2001, 0xdb8, 2, 0, 0, 0, 0, 0x10]);
/// A client of `N`, routed by the site's uplink gateway.
const CLIENT6: [u8; 16] = v6([0x2001, 0xdb8, 1, 0, 0, 0, 0, 7]);

fn udp6(src: [u8; 16], dst: [u8; 16], ports: (u16, u16), hop_limit: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ipv6(src, dst, hop_limit)
        .udp(ports.0, ports.1)
        .write(&mut out, payload)
        .expect("build");
    out
}

fn ethernet6(dst: [u8; 6], src: [u8; 6], ip: &[u8]) -> Vec<u8> {
    let mut f = ethernet(dst, src, ip);
    f[12..14].copy_from_slice(&0x86ddu16.to_be_bytes());
    f
}

#[test]
fn site_b_in_forward_does_the_same_for_an_ipv6_service_over_udp() {
    require_root();
    let s = site(TB, TA, TA_MAC);
    let _in = s.ns.enter().expect("enter");
    let mut cfg = service(Mode::Forward, s.uplink_ifindex, TB, TA);
    cfg.home_addr = IpAddr::from(HOME6);
    cfg.new_addr = Some(IpAddr::from(NEW6));
    let dp = load(&cfg);
    let key6 = |service: [u8; 16]| {
        FlowKey::new(
            (IpAddr::from(service), 53),
            (IpAddr::from(CLIENT6), 5353),
            proto::UDP,
        )
        .expect("key")
    };

    // To N: DNATed to H (the UDP checksum follows), one hop older, into the tunnel.
    let sent = udp6(CLIENT6, NEW6, (5353, 53), 64, b"query");
    let out = run(
        &dp,
        Hook::Uplink,
        &ethernet6(UPLINK_MAC, WAN_MAC, &sent),
        XDP_REDIRECT,
        &[UDP, (Counter::TunnelOut, 1), (Counter::FlowCreated, 1)],
    );
    let inner = udp6(CLIENT6, HOME6, (5353, 53), 63, b"query");
    assert_eq!(
        out,
        ethernet(
            TA_MAC,
            UPLINK_MAC,
            &reference_gue(TB, TA, &key6(NEW6), &inner)
        )
    );
    assert_eq!(origin_of(&dp, &key6(HOME6)), Some(origin::NAT));

    // A's reply on that flow leaves as N.
    let reply = udp6(HOME6, CLIENT6, (53, 5353), 64, b"answer");
    let out = run(
        &dp,
        Hook::Uplink,
        &gue_from_a(&key6(HOME6), &reply),
        XDP_REDIRECT,
        &[UDP, (Counter::TunnelIn, 1), (Counter::FlowConfirmed, 1)],
    );
    assert_eq!(
        out,
        ethernet6(
            GW_MAC,
            UPLINK_MAC,
            &udp6(NEW6, CLIENT6, (53, 5353), 63, b"answer")
        ),
        "SNATed to N, checksum right"
    );
}
