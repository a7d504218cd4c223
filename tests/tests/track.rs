//! Mode `track` at site A under BPF_PROG_TEST_RUN: flows to and from `H` are
//! recorded with the right direction, counts and state bits; SYN and SYN-ACK
//! MSS is clamped with a correct checksum; other traffic is left alone.

use std::net::IpAddr;

use etherparse::{PacketBuilder, SlicedPacket, TcpOptionElement, TransportSlice};
use movarto_common::{
    config::Mode,
    counters::Counter,
    flow::{FlowKey, FlowValue, origin, state},
    net::proto,
};
use movarto_tests::{Hook, require_root, run_frame_out};
use movarto_user::datapath::{Datapath, SiteConfig};

const XDP_PASS: u32 = 2;
const TC_ACT_OK: u32 = 0;
const MAC_A: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0a];
const MAC_B: [u8; 6] = [0x02, 0, 0, 0, 0, 0x0b];
const HOME4: [u8; 4] = [192, 0, 2, 10];
const PEER4: [u8; 4] = [198, 51, 100, 7];
const OTHER4: [u8; 4] = [192, 0, 2, 99];
const HOME6: [u8; 16] = [
    0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
];
const PEER6: [u8; 16] = [
    0x20, 0x01, 0x0d, 0xb8, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x07,
];

fn tracking(home: IpAddr, mode: Mode) -> Datapath {
    require_root();
    let mut datapath = Datapath::load().expect("load datapath");
    let mut site = SiteConfig::new(mode, home);
    site.tunnel_mtu = 1500;
    datapath.set_config(&site).expect("config");
    datapath
}

#[derive(Clone, Copy)]
struct Seg {
    syn: bool,
    ack: bool,
    fin: bool,
    rst: bool,
    mss: Option<u16>,
}

const SYN: Seg = Seg {
    syn: true,
    ack: false,
    fin: false,
    rst: false,
    mss: Some(1460),
};
const SYN_ACK: Seg = Seg {
    syn: true,
    ack: true,
    fin: false,
    rst: false,
    mss: Some(1460),
};
const ACK: Seg = Seg {
    syn: false,
    ack: true,
    fin: false,
    rst: false,
    mss: None,
};
const FIN: Seg = Seg {
    syn: false,
    ack: true,
    fin: true,
    rst: false,
    mss: None,
};
const RST: Seg = Seg {
    syn: false,
    ack: false,
    fin: false,
    rst: true,
    mss: None,
};

fn tcp_step(
    seg: Seg,
    builder: etherparse::PacketBuilderStep<etherparse::IpHeaders>,
    sport: u16,
    dport: u16,
    payload: &[u8],
) -> Vec<u8> {
    let mut b = builder.tcp(sport, dport, 1000, 64240);
    if seg.syn {
        b = b.syn();
    }
    if seg.ack {
        b = b.ack(1);
    }
    if seg.fin {
        b = b.fin();
    }
    if seg.rst {
        b = b.rst();
    }
    if let Some(mss) = seg.mss {
        b = b
            .options(&[
                TcpOptionElement::MaximumSegmentSize(mss),
                TcpOptionElement::SelectiveAcknowledgementPermitted,
                TcpOptionElement::Noop,
                TcpOptionElement::WindowScale(7),
            ])
            .expect("options");
    }
    let mut out = Vec::new();
    b.write(&mut out, payload).expect("build");
    out
}

/// peer:40000 -> H:80 (arrives on the uplink).
fn from_peer4(seg: Seg, payload: &[u8]) -> Vec<u8> {
    tcp_step(
        seg,
        PacketBuilder::ethernet2(MAC_B, MAC_A).ipv4(PEER4, HOME4, 64),
        40000,
        80,
        payload,
    )
}

/// H:80 -> peer:40000 (sent by the VM).
fn to_peer4(seg: Seg, payload: &[u8]) -> Vec<u8> {
    tcp_step(
        seg,
        PacketBuilder::ethernet2(MAC_A, MAC_B).ipv4(HOME4, PEER4, 64),
        80,
        40000,
        payload,
    )
}

fn key4() -> FlowKey {
    FlowKey::new(
        (IpAddr::from(HOME4), 80),
        (IpAddr::from(PEER4), 40000),
        proto::TCP,
    )
    .expect("key")
}

fn flow(datapath: &Datapath, key: &FlowKey) -> Option<FlowValue> {
    datapath
        .flows()
        .expect("flows")
        .into_iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v)
}

/// The MSS option of a TCP frame, and whether its checksum verifies.
fn mss_and_checksum_ok(frame: &[u8]) -> (Option<u16>, bool) {
    let sliced = SlicedPacket::from_ethernet(frame).expect("parse output");
    let Some(TransportSlice::Tcp(tcp)) = sliced.transport else {
        panic!("not TCP");
    };
    let mss = tcp.options_iterator().find_map(|o| match o {
        Ok(TcpOptionElement::MaximumSegmentSize(m)) => Some(m),
        _ => None,
    });
    let header = tcp.to_header();
    let ok = match sliced.net {
        Some(etherparse::NetSlice::Ipv4(ip)) => {
            header
                .calc_checksum_ipv4(&ip.header().to_header(), tcp.payload())
                .expect("csum")
                == tcp.checksum()
        }
        Some(etherparse::NetSlice::Ipv6(ip)) => {
            header
                .calc_checksum_ipv6(&ip.header().to_header(), tcp.payload())
                .expect("csum")
                == tcp.checksum()
        }
        _ => panic!("not IP"),
    };
    (mss, ok)
}

fn run(datapath: &Datapath, hook: Hook, frame: &[u8]) -> Vec<u8> {
    let (ret, out) = run_frame_out(datapath, hook, frame).expect("test run");
    let want = match hook {
        Hook::Uplink => XDP_PASS,
        Hook::VmFacing => TC_ACT_OK,
    };
    assert_eq!(ret, want, "track mode passes everything");
    out
}

#[test]
fn handshake_data_and_close_are_recorded_both_ways() {
    let dp = tracking(IpAddr::from(HOME4), Mode::Track);
    run(&dp, Hook::Uplink, &from_peer4(SYN, b""));
    let v = flow(&dp, &key4()).expect("flow created by the peer's SYN");
    assert_eq!(v.origin, origin::TRACKED);
    assert_eq!(v.state, state::SYN_SEEN | state::SEEN_FROM_PEER);
    assert!(v.first_seen_ns > 0 && v.first_seen_ns == v.last_seen_ns);

    run(&dp, Hook::VmFacing, &to_peer4(SYN_ACK, b""));
    let v = flow(&dp, &key4()).expect("flow");
    assert_eq!(
        v.state & state::ESTABLISHED,
        0,
        "SYN-ACK alone does not establish"
    );
    assert_eq!(v.packets_to_peer, 1);

    let ack = from_peer4(ACK, b"GET / HTTP/1.1\r\n\r\n");
    run(&dp, Hook::Uplink, &ack);
    let data = to_peer4(ACK, &[7u8; 300]);
    run(&dp, Hook::VmFacing, &data);
    let v = flow(&dp, &key4()).expect("flow");
    assert_ne!(v.state & state::ESTABLISHED, 0);
    assert_eq!((v.packets_from_peer, v.packets_to_peer), (2, 2));
    // Bytes count the IP packet: headers included.
    let syn_len = from_peer4(SYN, b"").len() - 14;
    assert_eq!(v.bytes_from_peer, (syn_len + ack.len() - 14) as u64);
    assert_eq!(
        v.bytes_to_peer,
        (to_peer4(SYN_ACK, b"").len() - 14 + data.len() - 14) as u64
    );
    assert!(!state::is_closing(v.state));

    run(&dp, Hook::Uplink, &from_peer4(FIN, b""));
    assert!(
        !state::is_closing(flow(&dp, &key4()).expect("flow").state),
        "one FIN"
    );
    run(&dp, Hook::VmFacing, &to_peer4(FIN, b""));
    let v = flow(&dp, &key4()).expect("flow");
    assert_eq!(
        v.state & (state::FIN_PEER | state::FIN_SERVICE),
        state::FIN_PEER | state::FIN_SERVICE
    );
    assert!(state::is_closing(v.state));
    assert_eq!(dp.flows().expect("flows").len(), 1);
    assert_eq!(
        dp.counters().expect("counters").get(Counter::FlowCreated),
        1
    );
}

#[test]
fn a_flow_older_than_tracking_becomes_established_mid_stream() {
    let dp = tracking(IpAddr::from(HOME4), Mode::Track);
    run(&dp, Hook::VmFacing, &to_peer4(ACK, b"data"));
    run(&dp, Hook::Uplink, &from_peer4(ACK, b""));
    let v = flow(&dp, &key4()).expect("flow");
    assert_eq!(v.state & state::SYN_SEEN, 0);
    assert_ne!(v.state & state::ESTABLISHED, 0);
}

#[test]
fn rst_marks_the_flow_closing() {
    let dp = tracking(IpAddr::from(HOME4), Mode::Track);
    run(&dp, Hook::Uplink, &from_peer4(ACK, b""));
    run(&dp, Hook::Uplink, &from_peer4(RST, b""));
    assert!(state::is_closing(flow(&dp, &key4()).expect("flow").state));
}

#[test]
fn syn_and_syn_ack_mss_is_clamped_with_valid_checksum() {
    let dp = tracking(IpAddr::from(HOME4), Mode::Track);
    let input = from_peer4(SYN, b"");
    assert_eq!(mss_and_checksum_ok(&input), (Some(1460), true));
    let out = run(&dp, Hook::Uplink, &input);
    // 1500 - 40 (GUE over IPv4) - 40 (inner IPv4 + TCP).
    assert_eq!(mss_and_checksum_ok(&out), (Some(1420), true));
    assert_eq!(out.len(), input.len());

    let out = run(&dp, Hook::VmFacing, &to_peer4(SYN_ACK, b""));
    assert_eq!(mss_and_checksum_ok(&out), (Some(1420), true));
    assert_eq!(dp.counters().expect("counters").get(Counter::MssClamped), 2);
}

#[test]
fn small_mss_and_non_syn_segments_are_untouched() {
    let dp = tracking(IpAddr::from(HOME4), Mode::Track);
    let small = from_peer4(
        Seg {
            mss: Some(1200),
            ..SYN
        },
        b"",
    );
    assert_eq!(run(&dp, Hook::Uplink, &small), small);
    let ack = from_peer4(ACK, b"payload");
    assert_eq!(run(&dp, Hook::Uplink, &ack), ack);
    assert_eq!(dp.counters().expect("counters").get(Counter::MssClamped), 0);
}

#[test]
fn ipv6_flows_are_tracked_and_clamped() {
    let dp = tracking(IpAddr::from(HOME6), Mode::Track);
    let syn = tcp_step(
        SYN,
        PacketBuilder::ethernet2(MAC_B, MAC_A).ipv6(PEER6, HOME6, 64),
        40000,
        443,
        b"",
    );
    let out = run(&dp, Hook::Uplink, &syn);
    // 1500 - 40 - 60 (inner IPv6 + TCP).
    assert_eq!(mss_and_checksum_ok(&out), (Some(1400), true));
    let key = FlowKey::new(
        (IpAddr::from(HOME6), 443),
        (IpAddr::from(PEER6), 40000),
        proto::TCP,
    )
    .expect("key");
    let v = flow(&dp, &key).expect("IPv6 flow");
    assert_eq!(v.state, state::SYN_SEEN | state::SEEN_FROM_PEER);
}

#[test]
fn udp_flows_are_tracked() {
    let dp = tracking(IpAddr::from(HOME4), Mode::Track);
    let mut q = Vec::new();
    PacketBuilder::ethernet2(MAC_B, MAC_A)
        .ipv4(PEER4, HOME4, 64)
        .udp(5353, 53)
        .write(&mut q, b"q")
        .expect("build");
    run(&dp, Hook::Uplink, &q);
    let key = FlowKey::new(
        (IpAddr::from(HOME4), 53),
        (IpAddr::from(PEER4), 5353),
        proto::UDP,
    )
    .expect("key");
    assert_eq!(flow(&dp, &key).expect("UDP flow").packets_from_peer, 1);
}

#[test]
fn traffic_not_for_home_is_not_tracked_or_clamped() {
    let dp = tracking(IpAddr::from(HOME4), Mode::Track);
    let frame = tcp_step(
        SYN,
        PacketBuilder::ethernet2(MAC_B, MAC_A).ipv4(PEER4, OTHER4, 64),
        40000,
        80,
        b"",
    );
    assert_eq!(run(&dp, Hook::Uplink, &frame), frame);
    // And from the VM side, a source other than H.
    let frame = tcp_step(
        SYN_ACK,
        PacketBuilder::ethernet2(MAC_A, MAC_B).ipv4(OTHER4, PEER4, 64),
        80,
        40000,
        b"",
    );
    assert_eq!(run(&dp, Hook::VmFacing, &frame), frame);
    assert!(dp.flows().expect("flows").is_empty());
}

#[test]
fn idle_mode_records_nothing() {
    let dp = tracking(IpAddr::from(HOME4), Mode::Idle);
    let syn = from_peer4(SYN, b"");
    assert_eq!(run(&dp, Hook::Uplink, &syn), syn);
    assert!(dp.flows().expect("flows").is_empty());
}
