//! The frames the datapath bench runs: one site pair's addresses (documentation
//! ranges only) and a builder per kind of packet. Built with etherparse, so the
//! bench shares no code with the programs it measures.

use std::net::Ipv4Addr;

use anyhow::{Context as _, Result};
use etherparse::{PacketBuilder, TcpOptionElement};
use movarto_common::{
    config::GUE_DEFAULT_PORT,
    flow::{FlowKey, gue_source_port},
    gue::{OuterV4, encapsulate_v4},
    net::proto,
};

/// The service's home address `H`.
pub const HOME: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
/// Another tenant's address behind the same uplink: no service of ours.
pub const OTHER_TENANT: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 99);
/// The service's new address `N` at site B.
pub const NEW: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 10);
/// Site A's tunnel endpoint.
pub const TA: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
/// Site B's tunnel endpoint.
pub const TB: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 129);
/// The client of the measured flow.
pub const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
/// The service's port.
pub const SERVICE_PORT: u16 = 80;
/// The client's port on the measured flow.
pub const CLIENT_PORT: u16 = 40000;
/// The session token both sites hold.
pub const TOKEN: u64 = 0x6265_6e63_686d_6b21;
/// The MSS a client's SYN offers (Ethernet's), which tracking clamps for the tunnel.
pub const OFFERED_MSS: u16 = 1460;
/// Payload of a mid-stream segment: a typical small request or ACK-with-data.
const PAYLOAD: &[u8] = &[0x5a; 64];

const ROUTER_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0xfe];
const UPLINK_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x01];
/// The VM's MAC at either site.
pub const VM_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x00, 0x00, 0x10];
/// The VM-facing interface's (anycast gateway) MAC.
pub const GATEWAY_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x0a];

/// What a TCP segment carries.
#[derive(Clone, Copy)]
pub enum Segment {
    /// A SYN offering [`OFFERED_MSS`].
    Syn,
    /// ACK with [`PAYLOAD`]: an established flow's packet.
    Data,
}

fn tcp(
    builder: etherparse::PacketBuilderStep<etherparse::IpHeaders>,
    ports: (u16, u16),
    seg: Segment,
) -> Result<Vec<u8>> {
    let b = builder.tcp(ports.0, ports.1, 1000, 64240);
    let (b, payload) = match seg {
        Segment::Syn => (
            b.syn()
                .options(&[
                    TcpOptionElement::MaximumSegmentSize(OFFERED_MSS),
                    TcpOptionElement::SelectiveAcknowledgementPermitted,
                    TcpOptionElement::Noop,
                    TcpOptionElement::WindowScale(7),
                ])
                .context("TCP options")?,
            &[][..],
        ),
        Segment::Data => (b.ack(1), PAYLOAD),
    };
    let mut out = Vec::with_capacity(128);
    b.write(&mut out, payload).context("building a TCP frame")?;
    Ok(out)
}

/// A segment from `src:src_port` to `dst:dst_port` arriving on the uplink.
pub fn to_uplink(src: (Ipv4Addr, u16), dst: (Ipv4Addr, u16), seg: Segment) -> Result<Vec<u8>> {
    tcp(
        PacketBuilder::ethernet2(ROUTER_MAC, UPLINK_MAC).ipv4(src.0.octets(), dst.0.octets(), 64),
        (src.1, dst.1),
        seg,
    )
}

/// A segment the VM sends from `H` to the client.
pub fn from_vm(seg: Segment) -> Result<Vec<u8>> {
    tcp(
        PacketBuilder::ethernet2(VM_MAC, GATEWAY_MAC).ipv4(HOME.octets(), CLIENT.octets(), 64),
        (SERVICE_PORT, CLIENT_PORT),
        seg,
    )
}

/// `inner` (a whole Ethernet frame) wrapped in GUE from `src` to `dst`, as the
/// peer site sends it, with the outer source port the datapath would pick.
pub fn gue(src: Ipv4Addr, dst: Ipv4Addr, inner: &[u8]) -> Vec<u8> {
    let outer = OuterV4 {
        src,
        dst,
        src_port: gue_source_port(&measured_flow()),
        dst_port: GUE_DEFAULT_PORT,
    };
    let mut frame = Vec::with_capacity(inner.len() + 64);
    frame.extend_from_slice(&UPLINK_MAC);
    frame.extend_from_slice(&ROUTER_MAC);
    frame.extend_from_slice(&0x0800u16.to_be_bytes());
    frame.extend_from_slice(&encapsulate_v4(
        &outer,
        TOKEN,
        inner.get(14..).unwrap_or_default(),
    ));
    frame
}

/// The measured flow's key: `H:80` with the client.
pub fn measured_flow() -> FlowKey {
    flow_key(CLIENT, CLIENT_PORT)
}

/// The key of the flow between `H:80` and `peer:port`.
pub fn flow_key(peer: Ipv4Addr, port: u16) -> FlowKey {
    let mut key = FlowKey {
        service_port: SERVICE_PORT.to_be(),
        peer_port: port.to_be(),
        protocol: proto::TCP,
        family: movarto_common::net::family::IPV4,
        ..FlowKey::default()
    };
    key.service_addr[..4].copy_from_slice(&HOME.octets());
    key.peer_addr[..4].copy_from_slice(&peer.octets());
    key
}

/// The `n`th client of a flood: a distinct address and port for every `n` below 2^32.
pub fn flood_client(n: u32) -> (Ipv4Addr, u16) {
    // 198.18.0.0/15 holds 2^17 addresses; with 2^15 ports each, 2^32 tuples.
    let addr = Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 0, 0)) | (n & 0x1_ffff));
    (addr, 1024 + ((n >> 17) & 0x7fff) as u16)
}
