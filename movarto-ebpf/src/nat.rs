//! NAT between the new address `N` and the home address `H` at site B (and, after a
//! move back to A, on the tunnel's packets there).
//! Checksums are updated incrementally: IPv4 header, and the TCP, UDP and
//! ICMPv6 checksums whose pseudo-header holds the rewritten address.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::{TcContext, XdpContext},
};
use movarto_common::{
    checksum,
    config::Config,
    counters::Counter,
    net::{ETH_HLEN, family},
};

use crate::parse::{L4, Packet, bytes_mut};

/// Offset of the checksum in the transport header, if it covers the addresses.
#[inline(always)]
fn l4_checksum_offset(pkt: &Packet) -> Option<usize> {
    match pkt.l4 {
        L4::Tcp => Some(16),
        L4::Udp => Some(6),
        // ICMPv6 has a pseudo-header; ICMPv4 does not.
        L4::Icmp if pkt.family == family::IPV6 => Some(2),
        _ => None,
    }
}

/// XDP: rewrites the destination of `pkt`, the service's `N`, to its `H` (DNAT).
#[inline(always)]
pub fn dnat_xdp(ctx: &XdpContext, pkt: &Packet, cfg: &Config) -> Result<(), Counter> {
    rewrite_xdp(ctx, pkt, Side::Destination, &cfg.new_addr, &cfg.home_addr)
}

/// XDP: rewrites the source of `pkt`, the service's `H`, to its `N` (SNAT): site B's
/// NAT on a reply that A tunnelled back after the VM returned there.
#[inline(always)]
pub fn snat_xdp(ctx: &XdpContext, pkt: &Packet, cfg: &Config) -> Result<(), Counter> {
    rewrite_xdp(ctx, pkt, Side::Source, &cfg.home_addr, &cfg.new_addr)
}

/// Which address of the IP header a rewrite changes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    Source,
    Destination,
}

/// Rewrites `side` from `old` (which the caller checked it is) to `new`. The old
/// address comes from the configuration, not a copy of the header: no 16-byte
/// array on a stack its callers leave little of.
#[inline(always)]
fn rewrite_xdp(
    ctx: &XdpContext,
    pkt: &Packet,
    side: Side,
    old: &[u8; 16],
    new: &[u8; 16],
) -> Result<(), Counter> {
    let (data, end) = (ctx.data(), ctx.data_end());
    if pkt.family == family::IPV4 {
        let ip = bytes_mut::<20>(data, end, ETH_HLEN).map_err(|_| Counter::DropTruncated)?;
        let at = if side == Side::Source { 12 } else { 16 };
        let old4 = [old[0], old[1], old[2], old[3]];
        let new4 = [new[0], new[1], new[2], new[3]];
        let check = checksum::replace_bytes(u16::from_be_bytes([ip[10], ip[11]]), &old4, &new4);
        ip[10..12].copy_from_slice(&check.to_be_bytes());
        ip[at..at + 4].copy_from_slice(&new4);
        fix_l4_xdp(data, end, pkt, &old4, &new4)
    } else {
        let ip = bytes_mut::<40>(data, end, ETH_HLEN).map_err(|_| Counter::DropTruncated)?;
        let at = if side == Side::Source { 8 } else { 24 };
        ip[at..at + 16].copy_from_slice(new);
        fix_l4_xdp(data, end, pkt, old, new)
    }
}

#[inline(always)]
fn fix_l4_xdp<const N: usize>(
    data: usize,
    end: usize,
    pkt: &Packet,
    old: &[u8; N],
    new: &[u8; N],
) -> Result<(), Counter> {
    let Some(at) = l4_checksum_offset(pkt) else {
        return Ok(());
    };
    let check = if matches!(pkt.l4, L4::Tcp) {
        let tcp = bytes_mut::<20>(data, end, pkt.l4_offset).map_err(|_| Counter::DropTruncated)?;
        &mut tcp[16..18]
    } else {
        // UDP and ICMPv6: the checksum sits in the first 8 bytes.
        let hdr = bytes_mut::<8>(data, end, pkt.l4_offset).map_err(|_| Counter::DropTruncated)?;
        let at = at & 6;
        &mut hdr[at..at + 2]
    };
    let updated = updated_l4_check(pkt, u16::from_be_bytes([check[0], check[1]]), old, new);
    check.copy_from_slice(&updated.to_be_bytes());
    Ok(())
}

/// UDP over IPv4 may carry no checksum (0), which stays 0; a computed 0 is sent as 0xffff.
#[inline(always)]
fn updated_l4_check<const N: usize>(pkt: &Packet, check: u16, old: &[u8; N], new: &[u8; N]) -> u16 {
    if matches!(pkt.l4, L4::Udp) && check == 0 && pkt.family == family::IPV4 {
        return 0;
    }
    match checksum::replace_bytes(check, old, new) {
        0 if matches!(pkt.l4, L4::Udp) => 0xffff,
        c => c,
    }
}

/// TC: rewrites the source address of `pkt` to `to` (SNAT) with the skb
/// helpers, which also handle a transport checksum that offload left partial.
#[inline(always)]
pub fn snat_tc(ctx: &TcContext, pkt: &Packet, to: &[u8; 16]) -> Result<(), Counter> {
    let l4_flags = u64::from(BPF_F_PSEUDO_HDR)
        | 4
        | if matches!(pkt.l4, L4::Udp) {
            u64::from(BPF_F_MARK_MANGLED_0)
        } else {
            0
        };
    let check_at = l4_checksum_offset(pkt).map(|at| pkt.l4_offset + at);
    let (src_at, words) = if pkt.family == family::IPV4 {
        (ETH_HLEN + 12, 1)
    } else {
        (ETH_HLEN + 8, 4)
    };
    for i in 0..4 {
        if i >= words {
            break;
        }
        let old = word(&pkt.src_addr, i);
        let new = word(to, i);
        ctx.store(src_at + i * 4, &new, 0)
            .map_err(|_| Counter::DropResizeFailed)?;
        if pkt.family == family::IPV4 {
            ctx.l3_csum_replace(ETH_HLEN + 10, u64::from(old), u64::from(new), 4)
                .map_err(|_| Counter::DropResizeFailed)?;
        }
        if let Some(at) = check_at {
            ctx.l4_csum_replace(at, u64::from(old), u64::from(new), l4_flags)
                .map_err(|_| Counter::DropResizeFailed)?;
        }
    }
    Ok(())
}

/// The `i`th 4-byte word of an address, as it lies in memory.
#[inline(always)]
fn word(addr: &[u8; 16], i: usize) -> u32 {
    let i = (i & 3) * 4;
    u32::from_ne_bytes([addr[i], addr[i + 1], addr[i + 2], addr[i + 3]])
}
