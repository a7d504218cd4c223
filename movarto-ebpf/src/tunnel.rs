//! GUE encapsulation and decapsulation in XDP. The bytes written here must
//! equal `movarto_common::gue::encapsulate_v4`; the tests compare them.

use aya_ebpf::{helpers::bpf_xdp_adjust_head, programs::XdpContext};
use movarto_common::{
    checksum,
    config::Config,
    counters::Counter,
    flow::{FlowKey, gue_source_port},
    gue::{GUE_FIRST_BYTE, GUE_OVERHEAD_IPV4, OUTER_TTL},
    net::{ETH_HLEN, ETH_P_IP, ETH_P_IPV6, family, proto},
};

use crate::parse::{L4, Packet, bytes, bytes_mut};

/// GUE proto field values.
const GUE_PROTO_IPV4: u8 = 4;
const GUE_PROTO_IPV6: u8 = 41;
/// Ethernet + outer IPv4 + UDP + GUE + token.
const ENCAP_HEADERS: usize = ETH_HLEN + GUE_OVERHEAD_IPV4;

/// Whether `pkt` is addressed to this site's GUE endpoint.
#[inline(always)]
pub fn is_ours(cfg: &Config, pkt: &Packet) -> bool {
    pkt.family == family::IPV4
        && matches!(pkt.l4, L4::Udp)
        && pkt.dst_port == cfg.gue_port
        && pkt.dst_addr == cfg.local_tunnel_addr
}

/// The key that picks the outer source port: the flow's 5-tuple from the
/// service's side, so both directions of a flow hash alike.
#[inline(always)]
fn hash_key(pkt: &Packet, service_is_dst: bool) -> FlowKey {
    let (service_addr, peer_addr, service_port, peer_port) = if service_is_dst {
        (pkt.dst_addr, pkt.src_addr, pkt.dst_port, pkt.src_port)
    } else {
        (pkt.src_addr, pkt.dst_addr, pkt.src_port, pkt.dst_port)
    };
    FlowKey {
        service_addr,
        peer_addr,
        service_port,
        peer_port,
        protocol: pkt.protocol,
        family: pkt.family,
        _pad: [0; 2],
    }
}

/// Wraps the IP packet of the frame in outer IPv4/UDP/GUE from this site's
/// endpoint to the peer's. The Ethernet header's MACs are left for routing.
#[inline(always)]
pub fn encapsulate(
    ctx: &XdpContext,
    cfg: &Config,
    pkt: &Packet,
    service_is_dst: bool,
) -> Result<(), Counter> {
    let outer_len = GUE_OVERHEAD_IPV4 + pkt.ip_len;
    if outer_len > usize::from(cfg.tunnel_mtu) {
        return Err(Counter::DropTooBig);
    }
    let first =
        bytes::<2>(ctx.data(), ctx.data_end(), ETH_HLEN).map_err(|_| Counter::DropTruncated)?;
    let (gue_proto, tos) = if pkt.family == family::IPV6 {
        (GUE_PROTO_IPV6, (first[0] << 4) | (first[1] >> 4))
    } else {
        (GUE_PROTO_IPV4, first[1])
    };
    let src_port = gue_source_port(&hash_key(pkt, service_is_dst));

    // SAFETY: plain helper call on our own context.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(GUE_OVERHEAD_IPV4 as i32)) } != 0 {
        return Err(Counter::DropResizeFailed);
    }
    let hdr = bytes_mut::<ENCAP_HEADERS>(ctx.data(), ctx.data_end(), 0)
        .map_err(|_| Counter::DropResizeFailed)?;
    hdr[12..14].copy_from_slice(&ETH_P_IP.to_be_bytes());

    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[1] = tos;
    ip[2..4].copy_from_slice(&(outer_len as u16).to_be_bytes());
    ip[6] = 0x40; // DF
    ip[8] = OUTER_TTL;
    ip[9] = proto::UDP;
    ip[12..16].copy_from_slice(&cfg.local_tunnel_addr[..4]);
    ip[16..20].copy_from_slice(&cfg.peer_tunnel_addr[..4]);
    let check = checksum::ipv4_header(&ip).to_be_bytes();
    ip[10] = check[0];
    ip[11] = check[1];
    hdr[14..34].copy_from_slice(&ip);

    hdr[34..36].copy_from_slice(&src_port.to_be_bytes());
    hdr[36..38].copy_from_slice(&cfg.gue_port.to_ne_bytes());
    hdr[38..40].copy_from_slice(&((outer_len - 20) as u16).to_be_bytes());
    hdr[40..42].copy_from_slice(&[0, 0]);
    hdr[42..46].copy_from_slice(&[GUE_FIRST_BYTE, gue_proto, 0, 0]);
    hdr[46..54].copy_from_slice(&cfg.token.to_be_bytes());
    Ok(())
}

/// Verifies GUE addressed to us (see [`is_ours`]) and strips the outer
/// headers, leaving an Ethernet frame (MACs still to be set) around the inner
/// packet. The inner packet is not parsed here; the caller does that.
#[inline(always)]
pub fn decapsulate(ctx: &XdpContext, cfg: &Config, pkt: &Packet) -> Result<(), Counter> {
    if pkt.src_addr != cfg.peer_tunnel_addr {
        return Err(Counter::DropGueForeignSource);
    }
    // Our encapsulation never sends outer options or fragments.
    if pkt.l4_offset != ETH_HLEN + 20 || pkt.fragment {
        return Err(Counter::DropGueMalformed);
    }
    let hdr = bytes::<ENCAP_HEADERS>(ctx.data(), ctx.data_end(), 0)
        .map_err(|_| Counter::DropGueMalformed)?;
    let ethertype = match (hdr[42], hdr[43], hdr[44], hdr[45]) {
        (GUE_FIRST_BYTE, GUE_PROTO_IPV4, 0, 0) => ETH_P_IP,
        (GUE_FIRST_BYTE, GUE_PROTO_IPV6, 0, 0) => ETH_P_IPV6,
        _ => return Err(Counter::DropGueMalformed),
    };
    let mut token = [0u8; 8];
    token.copy_from_slice(&hdr[46..54]);
    if u64::from_be_bytes(token) != cfg.token {
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
