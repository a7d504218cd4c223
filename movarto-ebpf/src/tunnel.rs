//! GUE encapsulation and decapsulation in XDP. The bytes written here must
//! equal `movarto_common::gue::encapsulate_v4`; the tests compare them.

use aya_ebpf::{
    bindings::{BPF_F_ADJ_ROOM_ENCAP_L3_IPV4, BPF_F_ADJ_ROOM_ENCAP_L4_UDP, bpf_adj_room_mode},
    helpers::bpf_xdp_adjust_head,
    programs::{TcContext, XdpContext},
};
use movarto_common::{
    checksum,
    config::Config,
    counters::Counter,
    flow::gue_source_port,
    gue::{GUE_BASE_LEN, GUE_FIRST_BYTE, GUE_OVERHEAD_IPV4, GUE_PRIVATE_LEN, OUTER_TTL},
    net::{ETH_HLEN, ETH_P_IP, ETH_P_IPV6, IPV6_HLEN, UDP_HLEN, family, proto},
};

use crate::{
    flows::{self, Direction},
    parse::{self, L4, Packet, bytes, bytes_mut},
    services,
};

/// GUE proto field values.
const GUE_PROTO_IPV4: u8 = 4;
const GUE_PROTO_IPV6: u8 = 41;
/// Ethernet + outer IPv4 + UDP + GUE + token.
const ENCAP_HEADERS: usize = ETH_HLEN + GUE_OVERHEAD_IPV4;

/// Whether `pkt` is UDP to this node's GUE endpoint and port (`cfg` is the uplink's
/// or a service's entry), from anyone. It is this node's GUE when it also comes from
/// a service's peer (`services::is_peer`); GUE from anyone else is left to the kernel.
#[inline(always)]
pub fn to_endpoint(cfg: &Config, pkt: &Packet) -> bool {
    pkt.family == family::IPV4
        && matches!(pkt.l4, L4::Udp)
        && pkt.dst_port == cfg.gue_port
        && pkt.dst_addr == cfg.local_tunnel_addr
}

/// Whether a packet the parser rejected, whose UDP header may not have been
/// read, is this node's GUE: UDP from a service's peer to our endpoint (`uplink`
/// holds it) counts as ours unless its port is known to be another one.
#[inline(always)]
pub fn may_be_ours(uplink: &Config, pkt: &Packet) -> bool {
    pkt.family == family::IPV4
        && pkt.protocol == proto::UDP
        && pkt.dst_addr == uplink.local_tunnel_addr
        && (!matches!(pkt.l4, L4::Udp) || pkt.dst_port == uplink.gue_port)
        && services::is_peer(&pkt.src_addr)
}

/// What the outer headers of one packet depend on, read before the packet grows.
struct Inner {
    gue_proto: u8,
    tos: u8,
    src_port: u16,
}

/// Reads the inner packet's TOS/traffic class and picks the outer source port.
#[inline(always)]
fn inner_of(data: usize, data_end: usize, pkt: &Packet, dir: Direction) -> Result<Inner, Counter> {
    let first = bytes::<2>(data, data_end, ETH_HLEN).map_err(|_| Counter::DropTruncated)?;
    let (gue_proto, tos) = if pkt.family == family::IPV6 {
        (GUE_PROTO_IPV6, (first[0] << 4) | (first[1] >> 4))
    } else {
        (GUE_PROTO_IPV4, first[1])
    };
    Ok(Inner {
        gue_proto,
        tos,
        // Both directions of a flow hash alike.
        src_port: gue_source_port(&flows::tuple_of(pkt, dir)),
    })
}

/// Writes outer IPv4 + UDP + GUE + token for an inner packet of `ip_len`
/// bytes into `h`: DF, TOS copied, IP ID 0, TTL 64, UDP checksum 0 (RFC 6935
/// allows it for IPv4). `h` is packet memory in XDP, a stack buffer in TC.
#[inline(always)]
fn write_outer(h: &mut [u8; GUE_OVERHEAD_IPV4], cfg: &Config, inner: &Inner, ip_len: usize) {
    let outer_len = (GUE_OVERHEAD_IPV4 + ip_len) as u16;
    h[0] = 0x45;
    h[1] = inner.tos;
    h[2..4].copy_from_slice(&outer_len.to_be_bytes());
    h[4..6].copy_from_slice(&[0, 0]);
    h[6..8].copy_from_slice(&[0x40, 0]); // DF
    h[8] = OUTER_TTL;
    h[9] = proto::UDP;
    h[10..12].copy_from_slice(&[0, 0]);
    h[12..16].copy_from_slice(&cfg.local_tunnel_addr[..4]);
    h[16..20].copy_from_slice(&cfg.peer_tunnel_addr[..4]);
    let mut ip_header = [0u8; 20];
    ip_header.copy_from_slice(&h[..20]);
    let check = checksum::ipv4_header(&ip_header);
    h[10..12].copy_from_slice(&check.to_be_bytes());
    h[20..22].copy_from_slice(&inner.src_port.to_be_bytes());
    h[22..24].copy_from_slice(&cfg.gue_port.to_ne_bytes());
    h[24..26].copy_from_slice(&(outer_len - 20).to_be_bytes());
    h[26..28].copy_from_slice(&[0, 0]);
    h[28..32].copy_from_slice(&[GUE_FIRST_BYTE, inner.gue_proto, 0, 0]);
    h[32..40].copy_from_slice(&cfg.token.to_be_bytes());
}

/// Whether an inner packet fits the tunnel. A GSO super-packet from the VM
/// always does: `bpf_skb_adjust_room` lowers its `gso_size` by the headers it
/// adds, so every segment comes out at most the size it was meant to be.
#[inline(always)]
pub fn fits(cfg: &Config, pkt: &Packet, gso_size: u32) -> bool {
    gso_size != 0 || GUE_OVERHEAD_IPV4 + pkt.ip_len <= usize::from(cfg.tunnel_mtu)
}

/// XDP: wraps the IP packet of the frame in outer IPv4/UDP/GUE from this
/// site's endpoint to the peer's. The Ethernet MACs are left for routing.
#[inline(always)]
pub fn encapsulate(
    ctx: &XdpContext,
    cfg: &Config,
    pkt: &Packet,
    dir: Direction,
) -> Result<(), Counter> {
    if !fits(cfg, pkt, 0) {
        return Err(Counter::DropTooBig);
    }
    let inner = inner_of(ctx.data(), ctx.data_end(), pkt, dir)?;
    // SAFETY: plain helper call on our own context.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(GUE_OVERHEAD_IPV4 as i32)) } != 0 {
        return Err(Counter::DropResizeFailed);
    }
    // Written in place: a stack copy would cost 40 bytes of the 512.
    let hdr = bytes_mut::<ENCAP_HEADERS>(ctx.data(), ctx.data_end(), 0)
        .map_err(|_| Counter::DropResizeFailed)?;
    hdr[12..14].copy_from_slice(&ETH_P_IP.to_be_bytes());
    let outer: &mut [u8; GUE_OVERHEAD_IPV4] = (&mut hdr[ETH_HLEN..])
        .try_into()
        .map_err(|_| Counter::DropResizeFailed)?;
    write_outer(outer, cfg, &inner, pkt.ip_len);
    Ok(())
}

/// TC: the same for a packet the VM sent (`H` -> peer), which the caller has
/// checked [`fits`] (it answers the VM with ICMP otherwise). Room is made after
/// the MAC header with the encapsulation flags, so the kernel segments GSO
/// packets as UDP-tunnelled and switches skb->protocol for an IPv6 inner.
#[inline(always)]
pub fn encapsulate_tc(ctx: &TcContext, cfg: &Config, pkt: &Packet) -> Result<(), Counter> {
    let inner = inner_of(ctx.data(), ctx.data_end(), pkt, Direction::ToPeer)?;
    let mut outer = [0u8; GUE_OVERHEAD_IPV4];
    write_outer(&mut outer, cfg, &inner, pkt.ip_len);
    let flags = u64::from(BPF_F_ADJ_ROOM_ENCAP_L3_IPV4) | u64::from(BPF_F_ADJ_ROOM_ENCAP_L4_UDP);
    ctx.adjust_room(
        GUE_OVERHEAD_IPV4 as i32,
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
        flags,
    )
    .map_err(|_| Counter::DropResizeFailed)?;
    ctx.store(12, &ETH_P_IP.to_be_bytes(), 0)
        .map_err(|_| Counter::DropResizeFailed)?;
    ctx.store(ETH_HLEN, &outer, 0)
        .map_err(|_| Counter::DropResizeFailed)?;
    Ok(())
}

/// Verifies GUE from the peer to our endpoint (the caller checked), strips the outer
/// headers, leaving an Ethernet frame (MACs still to be set) around the inner
/// packet, and parses that into `inner`. The tunnel carries the service's
/// traffic only: its address must be the inner packet's `H` side for `dir`.
#[inline(always)]
pub fn decapsulate(
    ctx: &XdpContext,
    cfg: &Config,
    outer: &Packet,
    dir: Direction,
    inner: &mut Packet,
) -> Result<(), Counter> {
    if decapsulate_either(ctx, cfg, outer, inner)? != dir {
        return Err(Counter::DropGueMalformed);
    }
    Ok(())
}

/// [`decapsulate`] for a site in `forward` that may see the tunnel both ways: the
/// VM's replies (from `H`) and, after a move back, packets for the VM that the
/// other site still tunnels (to `H`). Returns which it was.
#[inline(always)]
pub fn decapsulate_either(
    ctx: &XdpContext,
    cfg: &Config,
    outer: &Packet,
    inner: &mut Packet,
) -> Result<Direction, Counter> {
    strip_outer(ctx, cfg, outer)?;
    if parse::parse_frame(
        ctx.data(),
        ctx.data_end(),
        ctx.data_end() - ctx.data(),
        inner,
    ) != Ok(true)
    {
        return Err(Counter::DropGueMalformed);
    }
    decapsulated_direction(cfg, inner).ok_or(Counter::DropGueMalformed)
}

/// Which way the unwrapped `inner` goes for the service, if its `H` is on one side
/// (the tunnel carries the service's traffic only).
#[inline(always)]
fn decapsulated_direction(cfg: &Config, inner: &Packet) -> Option<Direction> {
    if inner.family != cfg.service_family {
        None
    } else if inner.src_addr == cfg.home_addr {
        Some(Direction::ToPeer)
    } else if inner.dst_addr == cfg.home_addr {
        Some(Direction::FromPeer)
    } else {
        None
    }
}

/// UDP header, GUE header and token: what the UDP length adds to the inner packet.
const UDP_GUE_LEN: usize = UDP_HLEN + GUE_BASE_LEN + GUE_PRIVATE_LEN;
/// The headers [`strip_outer`] reads: up to the inner packet's length field
/// (IPv4 total length at 2, IPv6 payload length at 4).
const CHECKED_HEADERS: usize = ENCAP_HEADERS + 6;

/// The verification and stripping of [`decapsulate`]. Everything is checked
/// before the packet is changed, so a refused packet is dropped as it came.
#[inline(always)]
fn strip_outer(ctx: &XdpContext, cfg: &Config, pkt: &Packet) -> Result<(), Counter> {
    // Our encapsulation never sends outer options or fragments.
    if pkt.l4_offset != ETH_HLEN + 20 || pkt.fragment {
        return Err(Counter::DropGueMalformed);
    }
    let hdr = bytes::<CHECKED_HEADERS>(ctx.data(), ctx.data_end(), 0)
        .map_err(|_| Counter::DropGueMalformed)?;
    let (ethertype, inner_len) = match (hdr[42], hdr[43], hdr[44], hdr[45]) {
        (GUE_FIRST_BYTE, GUE_PROTO_IPV4, 0, 0) => (
            ETH_P_IP,
            usize::from(u16::from_be_bytes([hdr[56], hdr[57]])),
        ),
        (GUE_FIRST_BYTE, GUE_PROTO_IPV6, 0, 0) => (
            ETH_P_IPV6,
            IPV6_HLEN + usize::from(u16::from_be_bytes([hdr[58], hdr[59]])),
        ),
        _ => return Err(Counter::DropGueMalformed),
    };
    // The UDP length must cover exactly the outer packet's payload, and that
    // exactly GUE and one inner packet: no empty GUE, no trailing bytes.
    let udp_len = usize::from(u16::from_be_bytes([hdr[38], hdr[39]]));
    if udp_len + 20 != pkt.ip_len || inner_len + UDP_GUE_LEN != udp_len {
        return Err(Counter::DropGueMalformed);
    }
    let mut token = [0u8; 8];
    token.copy_from_slice(&hdr[46..54]);
    // Userspace never configures token 0 for a tunnel mode; should one get into
    // the map anyway, it authenticates nothing.
    if cfg.token == 0 || u64::from_be_bytes(token) != cfg.token {
        return Err(Counter::DropGueBadToken);
    }
    // SAFETY: plain helper call on our own context.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, GUE_OVERHEAD_IPV4 as i32) } != 0 {
        return Err(Counter::DropResizeFailed);
    }
    let eth = bytes_mut::<ETH_HLEN>(ctx.data(), ctx.data_end(), 0)
        .map_err(|_| Counter::DropResizeFailed)?;
    eth[12..14].copy_from_slice(&ethertype.to_be_bytes());
    Ok(())
}
