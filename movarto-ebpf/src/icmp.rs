//! ICMP "fragmentation needed" for IPv4 packets and ICMPv6 "packet too big"
//! for IPv6 packets too big for the tunnel (Katran's approach): the frame is
//! cut to its first bytes, an IP + ICMP header is put in front, and it goes
//! back where it came from with the MTU the sender must use. Connections
//! opened while tracking never need it (their MSS was clamped); older ones
//! learn the path MTU this way.

use core::ffi::c_void;

use aya_ebpf::{
    bindings::{bpf_adj_room_mode, xdp_action},
    helpers::{
        bpf_csum_diff, bpf_redirect, bpf_skb_change_tail, bpf_xdp_adjust_head, bpf_xdp_adjust_tail,
    },
    programs::{TcContext, XdpContext},
};
use movarto_common::{
    checksum,
    counters::Counter,
    gue::GUE_OVERHEAD_IPV4,
    net::{ETH_HLEN, ETH_P_IPV6, IPV6_HLEN, proto},
};

use crate::parse::bytes_mut;

/// What is kept of the offending frame: Ethernet, then the IP header and
/// 64 bytes after it are quoted (RFC 1812 asks for at least 8).
const KEEP: usize = ETH_HLEN + 20 + 64;
/// New IPv4 + ICMP headers.
const PREPEND: usize = 20 + 8;
/// ICMP header and quoted bytes, what the ICMP checksum covers (a multiple of 4).
const ICMP_LEN: usize = 8 + 20 + 64;
const FRAME: usize = ETH_HLEN + 20 + ICMP_LEN;

/// Turns the frame into an ICMP frag-needed to its sender, from the address
/// it was sent to, announcing `tunnel_mtu` minus the tunnel's overhead.
#[inline(always)]
pub fn too_big_v4(ctx: &XdpContext, tunnel_mtu: u16) -> Result<u32, Counter> {
    let frame_len = ctx.data_end() - ctx.data();
    if frame_len < KEEP {
        return Err(Counter::DropTooBig);
    }
    // SAFETY: plain helper calls on our own context.
    let trimmed = unsafe { bpf_xdp_adjust_tail(ctx.ctx, -((frame_len - KEEP) as i32)) };
    if trimmed != 0 || unsafe { bpf_xdp_adjust_head(ctx.ctx, -(PREPEND as i32)) } != 0 {
        return Err(Counter::DropResizeFailed);
    }
    let f =
        bytes_mut::<FRAME>(ctx.data(), ctx.data_end(), 0).map_err(|_| Counter::DropResizeFailed)?;
    // The old Ethernet header now sits at PREPEND: answer from its destination to its source.
    answer_macs(f, PREPEND);
    write_v4(f, tunnel_mtu)?;
    Ok(xdp_action::XDP_TX)
}

/// TC, for a packet the VM sent: the same answer, out of the VM-facing
/// interface back to the VM (`vm_ifindex`). Room is made after the Ethernet
/// header, which stays where it is.
#[inline(always)]
pub fn too_big_v4_tc(ctx: &TcContext, tunnel_mtu: u16, vm_ifindex: u32) -> Result<u32, Counter> {
    shrink_tc(ctx, KEEP, PREPEND, FRAME)?;
    let f =
        bytes_mut::<FRAME>(ctx.data(), ctx.data_end(), 0).map_err(|_| Counter::DropResizeFailed)?;
    answer_macs(f, 0);
    write_v4(f, tunnel_mtu)?;
    // SAFETY: plain helper call.
    Ok(unsafe { bpf_redirect(vm_ifindex, 0) } as u32)
}

/// Cuts the skb to `keep` bytes, makes `prepend` bytes of room after the
/// Ethernet header and makes the first `frame` bytes directly accessible.
#[inline(always)]
fn shrink_tc(ctx: &TcContext, keep: usize, prepend: usize, frame: usize) -> Result<(), Counter> {
    if (ctx.len() as usize) < keep {
        return Err(Counter::DropTooBig);
    }
    // SAFETY: plain helper call on our own context.
    if unsafe { bpf_skb_change_tail(ctx.skb.skb, keep as u32, 0) } != 0 {
        return Err(Counter::DropResizeFailed);
    }
    ctx.adjust_room(prepend as i32, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, 0)
        .map_err(|_| Counter::DropResizeFailed)?;
    ctx.pull_data(frame as u32)
        .map_err(|_| Counter::DropResizeFailed)
}

/// The answer's MACs: from the offending frame's destination to its source,
/// whose Ethernet header is at `old` in `f`.
#[inline(always)]
fn answer_macs(f: &mut [u8], old: usize) {
    let mut macs = [0u8; 12];
    macs[..6].copy_from_slice(&f[old + 6..old + 12]);
    macs[6..].copy_from_slice(&f[old..old + 6]);
    f[..12].copy_from_slice(&macs);
}

/// Writes the IPv4 and ICMP headers in front of the quote (at ETH_HLEN + PREPEND).
#[inline(always)]
fn write_v4(f: &mut [u8; FRAME], tunnel_mtu: u16) -> Result<(), Counter> {
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let quoted = ETH_HLEN + PREPEND;
    let mut addrs = [0u8; 8];
    addrs.copy_from_slice(&f[quoted + 12..quoted + 20]);

    let ip = ETH_HLEN;
    f[ip] = 0x45;
    f[ip + 1] = 0;
    f[ip + 2..ip + 4].copy_from_slice(&((20 + ICMP_LEN) as u16).to_be_bytes());
    f[ip + 4..ip + 10].copy_from_slice(&[0, 0, 0, 0, 64, 1]);
    f[ip + 10..ip + 12].copy_from_slice(&[0, 0]);
    f[ip + 12..ip + 16].copy_from_slice(&addrs[4..8]); // from the original destination
    f[ip + 16..ip + 20].copy_from_slice(&addrs[..4]); // to the original source

    let icmp = ip + 20;
    let mtu = tunnel_mtu.saturating_sub(GUE_OVERHEAD_IPV4 as u16);
    f[icmp..icmp + 8].copy_from_slice(&[3, 4, 0, 0, 0, 0, 0, 0]);
    f[icmp + 6..icmp + 8].copy_from_slice(&mtu.to_be_bytes());

    let icmp_sum = sum(&mut f[icmp..icmp + ICMP_LEN])?;
    f[icmp + 2..icmp + 4].copy_from_slice(&icmp_sum.to_be_bytes());
    let ip_sum = sum(&mut f[ip..ip + 20])?;
    f[ip + 10..ip + 12].copy_from_slice(&ip_sum.to_be_bytes());
    Ok(())
}

/// IPv6: what is kept of the offending frame: Ethernet, the IPv6 header and
/// 64 bytes after it (RFC 4443 allows less than the 1280-byte maximum).
const KEEP6: usize = ETH_HLEN + IPV6_HLEN + 64;
/// New IPv6 + ICMPv6 headers.
const PREPEND6: usize = IPV6_HLEN + 8;
/// ICMPv6 header and quoted bytes: the ICMPv6 payload length (a multiple of 4).
const ICMP6_LEN: usize = 8 + IPV6_HLEN + 64;
const FRAME6: usize = ETH_HLEN + IPV6_HLEN + ICMP6_LEN;
/// ICMPv6 type "packet too big" (RFC 4443, 3.2).
const ICMPV6_PACKET_TOO_BIG: u8 = 2;

/// Turns the frame (an IPv6 packet) into an ICMPv6 packet-too-big to its
/// sender, from the address it was sent to, announcing `tunnel_mtu` minus the
/// tunnel's overhead. The sender's stack clamps an MTU below 1280 to 1280,
/// so the tunnel MTU must be at least 1320 for IPv6 services.
#[inline(always)]
pub fn too_big_v6(ctx: &XdpContext, tunnel_mtu: u16) -> Result<u32, Counter> {
    let frame_len = ctx.data_end() - ctx.data();
    if frame_len < KEEP6 {
        return Err(Counter::DropTooBig);
    }
    // SAFETY: plain helper calls on our own context.
    let trimmed = unsafe { bpf_xdp_adjust_tail(ctx.ctx, -((frame_len - KEEP6) as i32)) };
    if trimmed != 0 || unsafe { bpf_xdp_adjust_head(ctx.ctx, -(PREPEND6 as i32)) } != 0 {
        return Err(Counter::DropResizeFailed);
    }
    let f = bytes_mut::<FRAME6>(ctx.data(), ctx.data_end(), 0)
        .map_err(|_| Counter::DropResizeFailed)?;
    // The old Ethernet header now sits at PREPEND6: answer from its destination to its source.
    answer_macs(f, PREPEND6);
    write_v6(f, tunnel_mtu)?;
    Ok(xdp_action::XDP_TX)
}

/// TC, for an IPv6 packet the VM sent: the packet-too-big back to the VM.
#[inline(always)]
pub fn too_big_v6_tc(ctx: &TcContext, tunnel_mtu: u16, vm_ifindex: u32) -> Result<u32, Counter> {
    shrink_tc(ctx, KEEP6, PREPEND6, FRAME6)?;
    let f = bytes_mut::<FRAME6>(ctx.data(), ctx.data_end(), 0)
        .map_err(|_| Counter::DropResizeFailed)?;
    answer_macs(f, 0);
    write_v6(f, tunnel_mtu)?;
    // SAFETY: plain helper call.
    Ok(unsafe { bpf_redirect(vm_ifindex, 0) } as u32)
}

/// Writes the IPv6 and ICMPv6 headers in front of the quote (at ETH_HLEN + PREPEND6).
#[inline(always)]
fn write_v6(f: &mut [u8; FRAME6], tunnel_mtu: u16) -> Result<(), Counter> {
    f[12..14].copy_from_slice(&ETH_P_IPV6.to_be_bytes());
    let quoted = ETH_HLEN + PREPEND6;
    let mut addrs = [0u8; 32];
    addrs.copy_from_slice(&f[quoted + 8..quoted + 40]);

    let ip = ETH_HLEN;
    f[ip..ip + 4].copy_from_slice(&[0x60, 0, 0, 0]);
    f[ip + 4..ip + 6].copy_from_slice(&(ICMP6_LEN as u16).to_be_bytes());
    f[ip + 6] = proto::ICMPV6;
    f[ip + 7] = 64;
    f[ip + 8..ip + 24].copy_from_slice(&addrs[16..]); // from the original destination
    f[ip + 24..ip + 40].copy_from_slice(&addrs[..16]); // to the original source

    let icmp = ip + IPV6_HLEN;
    let mtu = u32::from(tunnel_mtu.saturating_sub(GUE_OVERHEAD_IPV4 as u16));
    f[icmp..icmp + 4].copy_from_slice(&[ICMPV6_PACKET_TOO_BIG, 0, 0, 0]);
    f[icmp + 4..icmp + 8].copy_from_slice(&mtu.to_be_bytes());

    // The pseudo-header: both addresses (summed where they lie), then the
    // upper-layer length and next header, each the last byte of a 32-bit
    // big-endian word; the helper sums words as loaded (little-endian), where
    // that byte is the top one.
    let length_and_next = ((ICMP6_LEN as u32) << 24) + (u32::from(proto::ICMPV6) << 24);
    let pseudo = partial(&mut f[ip + 8..ip + 40], length_and_next)?;
    let icmp_sum = u16::from_be(checksum::fold(partial(
        &mut f[icmp..icmp + ICMP6_LEN],
        pseudo,
    )?));
    f[icmp + 2..icmp + 4].copy_from_slice(&icmp_sum.to_be_bytes());
    Ok(())
}

/// The Internet checksum of `bytes` (a multiple of 4 long), computed by the
/// kernel over packet memory so nothing is copied to the stack.
#[inline(always)]
fn sum(bytes: &mut [u8]) -> Result<u16, Counter> {
    // The helper returns a 32-bit one's-complement sum; fold it as the network order value.
    Ok(u16::from_be(checksum::fold(partial(bytes, 0)?)))
}

/// The 32-bit one's-complement sum of `bytes` (a multiple of 4 long, words
/// as loaded on this little-endian machine) plus `seed`, not yet folded.
#[inline(always)]
fn partial(bytes: &mut [u8], seed: u32) -> Result<u32, Counter> {
    // SAFETY: `bytes` is packet memory of the given, verified length.
    let sum = unsafe {
        bpf_csum_diff(
            core::ptr::null_mut(),
            0,
            bytes.as_mut_ptr() as *mut c_void as *mut u32,
            bytes.len() as u32,
            seed,
        )
    };
    if sum < 0 {
        return Err(Counter::DropResizeFailed);
    }
    Ok(sum as u32)
}
