//! The drain ends when the clients close: under BPF_PROG_TEST_RUN, site A in
//! `forward` sees a pre-move flow's closing packets from both sides (the client's
//! on the uplink, the VM's from the tunnel) and the flow stops holding the drain:
//! at once for both FINs or an RST, once idle for a half-closed one. Root only.

use std::net::{IpAddr, Ipv4Addr};

use etherparse::PacketBuilder;
use movarto_common::{
    config::Mode,
    counters::Counter,
    flow::{FlowKey, FlowValue, gue_source_port, origin, state, timeout},
    gue::{OuterV4, encapsulate_v4},
    ids::SessionToken,
    net::proto,
};
use movarto_tests::{Hook, require_root, run_frame};
use movarto_user::datapath::{Datapath, SiteConfig};

const HOME: [u8; 4] = [192, 0, 2, 10];
const CLIENT: [u8; 4] = [198, 51, 100, 7];
const TA: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
const TB: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 129);
const TOKEN: u64 = 0x5eed;
const MAC_A: [u8; 6] = [0x02, 0, 0, 0, 0, 0xa1];
const MAC_R: [u8; 6] = [0x02, 0, 0, 0, 0, 0xfe];

/// Site A in `mode`, with the tunnel configured.
fn site(mode: Mode) -> SiteConfig {
    SiteConfig::new(mode, IpAddr::from(HOME)).with_tunnel(TA, TB, SessionToken(TOKEN))
}

fn datapath(mode: Mode) -> Datapath {
    require_root();
    let mut dp = Datapath::load().expect("load datapath");
    dp.set_config(&site(mode)).expect("config");
    dp
}

fn key(peer_port: u16) -> FlowKey {
    FlowKey::new(
        (IpAddr::from(HOME), 80),
        (IpAddr::from(CLIENT), peer_port),
        proto::TCP,
    )
    .expect("key")
}

/// A TCP segment as an Ethernet frame; `flags` are FIN 1, SYN 2, RST 4.
fn segment(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let mut t = PacketBuilder::ethernet2(MAC_R, MAC_A)
        .ipv4(src, dst, 64)
        .tcp(sport, dport, 1000, 64240);
    // Everything but the client's first SYN acknowledges.
    if flags & 2 == 0 {
        t = t.ack(1);
    }
    if flags & 1 != 0 {
        t = t.fin();
    }
    if flags & 2 != 0 {
        t = t.syn();
    }
    if flags & 4 != 0 {
        t = t.rst();
    }
    let mut out = Vec::new();
    t.write(&mut out, b"").expect("build");
    out
}

/// The client's segment on the uplink.
fn from_client(dp: &Datapath, peer_port: u16, flags: u8) {
    run_frame(
        dp,
        Hook::Uplink,
        &segment(CLIENT, HOME, peer_port, 80, flags),
    )
    .expect("run");
}

/// The VM's segment, as B tunnels it to A.
fn from_vm_through_tunnel(dp: &Datapath, peer_port: u16, flags: u8) {
    let inner = segment(HOME, CLIENT, 80, peer_port, flags);
    let outer = OuterV4 {
        src: TB,
        dst: TA,
        src_port: gue_source_port(&key(peer_port)),
        dst_port: 6080,
    };
    let mut frame = Vec::from(&inner[..12]);
    frame.extend_from_slice(&0x0800u16.to_be_bytes());
    frame.extend_from_slice(&encapsulate_v4(&outer, TOKEN, &inner[14..]));
    run_frame(dp, Hook::Uplink, &frame).expect("run");
}

fn flow(dp: &Datapath, peer_port: u16) -> FlowValue {
    dp.flows()
        .expect("flows")
        .into_iter()
        .find(|(k, _)| *k == key(peer_port))
        .map(|(_, v)| v)
        .unwrap_or_else(|| panic!("no flow for client port {peer_port}"))
}

/// Opens a pre-move flow while tracking: handshake and one segment each way.
fn track_connection(dp: &mut Datapath, peer_port: u16) {
    dp.set_config(&site(Mode::Track)).expect("track");
    from_client(dp, peer_port, 2);
    from_client(dp, peer_port, 0);
    run_frame(dp, Hook::VmFacing, &segment(HOME, CLIENT, 80, peer_port, 0)).expect("run");
}

#[test]
fn both_fins_or_an_rst_end_a_pre_move_flows_hold_on_the_drain_at_once() {
    let mut dp = datapath(Mode::Track);
    for port in [40001, 40002, 40003, 40004] {
        track_connection(&mut dp, port);
        let v = flow(&dp, port);
        assert_eq!(v.origin, origin::TRACKED);
        assert!(v.holds_drain(proto::TCP, 0), "port {port}: {v:?}");
    }
    dp.set_config(&site(Mode::Forward)).expect("forward");

    // The client closes first, the VM answers through the tunnel.
    from_client(&dp, 40001, 1);
    from_vm_through_tunnel(&dp, 40001, 1);
    // The VM closes first.
    from_vm_through_tunnel(&dp, 40002, 1);
    from_client(&dp, 40002, 1);
    // Resets, from either side.
    from_client(&dp, 40003, 4);
    from_vm_through_tunnel(&dp, 40004, 4);

    for (port, bits) in [
        (40001, state::FIN_PEER | state::FIN_SERVICE),
        (40002, state::FIN_PEER | state::FIN_SERVICE),
        (40003, state::RST),
        (40004, state::RST),
    ] {
        let v = flow(&dp, port);
        assert_eq!(v.state & bits, bits, "port {port}: {v:?}");
        assert!(
            !v.holds_drain(proto::TCP, 0),
            "port {port} is closing and must not hold the drain: {v:?}"
        );
    }

    // The client reuses a closed flow's port for a new connection (to `H`, with a
    // stale DNS answer): a new flow, not a closing pre-move one.
    let reused_before = dp.counters().expect("counters").get(Counter::FlowReused);
    from_client(&dp, 40001, 2);
    let v = flow(&dp, 40001);
    assert_eq!(v.origin, origin::STALE_DNS, "{v:?}");
    assert!(!state::is_closing(v.state), "{v:?}");
    assert_eq!(
        dp.counters().expect("counters").get(Counter::FlowReused),
        reused_before + 1
    );
}

#[test]
fn a_half_closed_pre_move_flow_holds_the_drain_only_while_it_carries_data() {
    let mut dp = datapath(Mode::Track);
    track_connection(&mut dp, 40010);
    track_connection(&mut dp, 40011);
    dp.set_config(&site(Mode::Forward)).expect("forward");
    from_client(&dp, 40010, 1);
    from_vm_through_tunnel(&dp, 40011, 1);
    for (port, fin) in [(40010, state::FIN_PEER), (40011, state::FIN_SERVICE)] {
        let v = flow(&dp, port);
        assert_eq!(v.state & fin, fin, "port {port}: {v:?}");
        assert!(v.holds_drain(proto::TCP, 0), "data may still follow");
        assert!(
            !v.holds_drain(proto::TCP, timeout::HALF_CLOSED_IDLE_NS + 1),
            "idle after one FIN: port {port} must not hold the drain"
        );
    }
}
