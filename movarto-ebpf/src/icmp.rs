//! ICMP errors, written over the offending frame (Katran's approach): the
//! frame is cut to its IP header and the 64 bytes after it (the quote), an IP
//! + ICMP header is put in front, and it goes back where it came from.
//!
//! - Too big for the tunnel: IPv4 fragmentation-needed or ICMPv6
//!   packet-too-big with the MTU the sender must use; site A for packets to
//!   `H`, site B for the VM's. Connections opened while tracking never need
//!   it (their MSS was clamped); older ones learn the path MTU this way.
//! - Time exceeded: site A, the router for `H`, for a packet to `H` whose TTL
//!   or hop limit expires there.
//!
//! The answer comes from the offending packet's destination (`H`, or the
//! client for the VM's packets): XDP has no address of the node's to pick,
//! and `H` is the one address the sender surely routes back through A.

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
    net::{ETH_HLEN, ETH_P_IP, ETH_P_IPV6, IPV4_MIN_HLEN, IPV6_HLEN, family, proto},
};

use crate::parse::bytes_mut;

/// What an ICMP error says: its type, its code and the four bytes after the checksum.
#[derive(Clone, Copy)]
pub struct Message {
    kind: u8,
    code: u8,
    rest: [u8; 4],
}

/// ICMP (RFC 792, RFC 1191) and ICMPv6 (RFC 4443) types and codes.
const ICMP_DEST_UNREACHABLE: u8 = 3;
const ICMP_FRAG_NEEDED: u8 = 4;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMPV6_PACKET_TOO_BIG: u8 = 2;
const ICMPV6_TIME_EXCEEDED: u8 = 3;
/// Time exceeded: "TTL / hop limit exceeded in transit".
const IN_TRANSIT: u8 = 0;

impl Message {
    /// Frag-needed (IPv4) or packet-too-big (IPv6) announcing what fits
    /// through a tunnel of `tunnel_mtu`. An IPv6 sender clamps an MTU below
    /// 1280 to 1280, so IPv6 services need a tunnel MTU of at least 1320.
    #[inline(always)]
    pub fn too_big(fam: u8, tunnel_mtu: u16) -> Message {
        let mtu = tunnel_mtu.saturating_sub(GUE_OVERHEAD_IPV4 as u16);
        if fam == family::IPV6 {
            Message {
                kind: ICMPV6_PACKET_TOO_BIG,
                code: 0,
                rest: u32::from(mtu).to_be_bytes(),
            }
        } else {
            let [hi, lo] = mtu.to_be_bytes();
            Message {
                kind: ICMP_DEST_UNREACHABLE,
                code: ICMP_FRAG_NEEDED,
                rest: [0, 0, hi, lo],
            }
        }
    }

    /// Time exceeded in transit.
    #[inline(always)]
    pub fn time_exceeded(fam: u8) -> Message {
        Message {
            kind: if fam == family::IPV6 {
                ICMPV6_TIME_EXCEEDED
            } else {
                ICMP_TIME_EXCEEDED
            },
            code: IN_TRANSIT,
            rest: [0; 4],
        }
    }
}

/// IPv4: the quote is the IP header and 64 bytes after it (RFC 1812 asks
/// for at least 8), or the whole packet if it is shorter.
const QUOTE: usize = IPV4_MIN_HLEN + 64;
/// New IPv4 + ICMP headers.
const PREPEND: usize = IPV4_MIN_HLEN + 8;
/// ICMP header and the longest quote: what the ICMP checksum covers (a multiple of 4).
const ICMP_LEN: usize = 8 + QUOTE;
const FRAME: usize = ETH_HLEN + IPV4_MIN_HLEN + ICMP_LEN;

/// IPv6: the IPv6 header and 64 bytes after it (RFC 4443 allows less than
/// the 1280-byte maximum), or the whole packet if it is shorter.
const QUOTE6: usize = IPV6_HLEN + 64;
/// New IPv6 + ICMPv6 headers.
const PREPEND6: usize = IPV6_HLEN + 8;
/// ICMPv6 header and the longest quote (a multiple of 4).
const ICMP6_LEN: usize = 8 + QUOTE6;
const FRAME6: usize = ETH_HLEN + IPV6_HLEN + ICMP6_LEN;

/// XDP: turns the frame, whose IP packet of `fam` is `ip_len` bytes long,
/// into `msg` to its sender, back out of the port it came in on.
#[inline(always)]
pub fn answer_xdp(ctx: &XdpContext, fam: u8, ip_len: usize, msg: Message) -> Result<u32, Counter> {
    let padding = if fam == family::IPV6 {
        let quote = resize_xdp(ctx, ip_len, QUOTE6, PREPEND6)?;
        let f = bytes_mut::<FRAME6>(ctx.data(), ctx.data_end(), 0)
            .map_err(|_| Counter::DropResizeFailed)?;
        // The old Ethernet header now sits at PREPEND6: answer from its destination to its source.
        answer_macs(f, PREPEND6);
        write_v6(f, msg, quote)?;
        QUOTE6 - quote
    } else {
        let quote = resize_xdp(ctx, ip_len, QUOTE, PREPEND)?;
        let f = bytes_mut::<FRAME>(ctx.data(), ctx.data_end(), 0)
            .map_err(|_| Counter::DropResizeFailed)?;
        answer_macs(f, PREPEND);
        write_v4(f, msg, quote)?;
        QUOTE - quote
    };
    // SAFETY: plain helper call on our own context.
    if padding > 0 && unsafe { bpf_xdp_adjust_tail(ctx.ctx, -(padding as i32)) } != 0 {
        return Err(Counter::DropResizeFailed);
    }
    Ok(xdp_action::XDP_TX)
}

/// Cuts the frame to Ethernet and the quote (the first `max_quote` bytes of
/// its `ip_len`-byte IP packet, or all of a shorter one), pads it with zeros
/// to `max_quote` and makes `prepend` bytes of room in front. The writers
/// checksum the longest quote, which the zeros leave as if it were cut
/// there; the caller then trims them. Returns the quote's length.
#[inline(always)]
fn resize_xdp(
    ctx: &XdpContext,
    ip_len: usize,
    max_quote: usize,
    prepend: usize,
) -> Result<usize, Counter> {
    let quote = if ip_len < max_quote {
        ip_len
    } else {
        max_quote
    };
    let frame_len = ctx.data_end() - ctx.data();
    // The parser checked the IP packet lies within the frame.
    let cut = frame_len
        .checked_sub(ETH_HLEN + quote)
        .ok_or(Counter::DropTruncated)?;
    let padding = max_quote - quote;
    // SAFETY: plain helper calls on our own context. A grown tail is zeroed
    // by the kernel (bpf_xdp_adjust_tail clears what it adds).
    let resized = unsafe {
        (cut == 0 || bpf_xdp_adjust_tail(ctx.ctx, -(cut as i32)) == 0)
            && (padding == 0 || bpf_xdp_adjust_tail(ctx.ctx, padding as i32) == 0)
            && bpf_xdp_adjust_head(ctx.ctx, -(prepend as i32)) == 0
    };
    if !resized {
        return Err(Counter::DropResizeFailed);
    }
    Ok(quote)
}

/// TC, for an IPv4 packet the VM sent: frag-needed back to the VM, out of
/// the VM-facing interface (`vm_ifindex`).
#[inline(always)]
pub fn too_big_v4_tc(ctx: &TcContext, tunnel_mtu: u16, vm_ifindex: u32) -> Result<u32, Counter> {
    shrink_tc(ctx, ETH_HLEN + QUOTE, PREPEND, FRAME)?;
    let f =
        bytes_mut::<FRAME>(ctx.data(), ctx.data_end(), 0).map_err(|_| Counter::DropResizeFailed)?;
    answer_macs(f, 0);
    write_v4(f, Message::too_big(family::IPV4, tunnel_mtu), QUOTE)?;
    // SAFETY: plain helper call.
    Ok(unsafe { bpf_redirect(vm_ifindex, 0) } as u32)
}

/// TC, for an IPv6 packet the VM sent: packet-too-big back to the VM.
#[inline(always)]
pub fn too_big_v6_tc(ctx: &TcContext, tunnel_mtu: u16, vm_ifindex: u32) -> Result<u32, Counter> {
    shrink_tc(ctx, ETH_HLEN + QUOTE6, PREPEND6, FRAME6)?;
    let f = bytes_mut::<FRAME6>(ctx.data(), ctx.data_end(), 0)
        .map_err(|_| Counter::DropResizeFailed)?;
    answer_macs(f, 0);
    write_v6(f, Message::too_big(family::IPV6, tunnel_mtu), QUOTE6)?;
    // SAFETY: plain helper call.
    Ok(unsafe { bpf_redirect(vm_ifindex, 0) } as u32)
}

/// Cuts the skb to `keep` bytes, makes `prepend` bytes of room after the
/// Ethernet header and makes the first `frame` bytes directly accessible.
/// A packet too big for the tunnel is always longer than the quote.
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

/// Writes the IPv4 and ICMP headers of `msg` in front of the quote of
/// `quote` bytes (at ETH_HLEN + PREPEND, zeros after it up to QUOTE).
#[inline(always)]
fn write_v4(f: &mut [u8; FRAME], msg: Message, quote: usize) -> Result<(), Counter> {
    f[12..14].copy_from_slice(&ETH_P_IP.to_be_bytes());
    let quoted = ETH_HLEN + PREPEND;
    let mut addrs = [0u8; 8];
    addrs.copy_from_slice(&f[quoted + 12..quoted + 20]);

    let ip = ETH_HLEN;
    f[ip] = 0x45;
    f[ip + 1] = 0;
    f[ip + 2..ip + 4].copy_from_slice(&((PREPEND + quote) as u16).to_be_bytes());
    f[ip + 4..ip + 10].copy_from_slice(&[0, 0, 0, 0, 64, proto::ICMP]);
    f[ip + 10..ip + 12].copy_from_slice(&[0, 0]);
    f[ip + 12..ip + 16].copy_from_slice(&addrs[4..8]); // from the original destination
    f[ip + 16..ip + 20].copy_from_slice(&addrs[..4]); // to the original source

    let icmp = ip + IPV4_MIN_HLEN;
    write_icmp_header(&mut f[icmp..icmp + 8], msg);
    let icmp_sum = sum(&mut f[icmp..icmp + ICMP_LEN])?;
    f[icmp + 2..icmp + 4].copy_from_slice(&icmp_sum.to_be_bytes());
    let ip_sum = sum(&mut f[ip..ip + IPV4_MIN_HLEN])?;
    f[ip + 10..ip + 12].copy_from_slice(&ip_sum.to_be_bytes());
    Ok(())
}

/// Writes the IPv6 and ICMPv6 headers of `msg` in front of the quote of
/// `quote` bytes (at ETH_HLEN + PREPEND6, zeros after it up to QUOTE6).
#[inline(always)]
fn write_v6(f: &mut [u8; FRAME6], msg: Message, quote: usize) -> Result<(), Counter> {
    f[12..14].copy_from_slice(&ETH_P_IPV6.to_be_bytes());
    let quoted = ETH_HLEN + PREPEND6;
    let mut addrs = [0u8; 32];
    addrs.copy_from_slice(&f[quoted + 8..quoted + 40]);

    let ip = ETH_HLEN;
    let upper_len = (8 + quote) as u16;
    f[ip..ip + 4].copy_from_slice(&[0x60, 0, 0, 0]);
    f[ip + 4..ip + 6].copy_from_slice(&upper_len.to_be_bytes());
    f[ip + 6] = proto::ICMPV6;
    f[ip + 7] = 64;
    f[ip + 8..ip + 24].copy_from_slice(&addrs[16..]); // from the original destination
    f[ip + 24..ip + 40].copy_from_slice(&addrs[..16]); // to the original source

    let icmp = ip + IPV6_HLEN;
    write_icmp_header(&mut f[icmp..icmp + 8], msg);
    // The pseudo-header: both addresses (summed where they lie), then the
    // upper-layer length and the next header, each a 32-bit big-endian word
    // (their sum fits one); the helper sums words as loaded, so the seed is
    // that word as loaded too.
    let length_and_next =
        u32::from_ne_bytes((u32::from(upper_len) + u32::from(proto::ICMPV6)).to_be_bytes());
    let pseudo = partial(&mut f[ip + 8..ip + 40], length_and_next)?;
    let icmp_sum = u16::from_be(checksum::fold(partial(
        &mut f[icmp..icmp + ICMP6_LEN],
        pseudo,
    )?));
    f[icmp + 2..icmp + 4].copy_from_slice(&icmp_sum.to_be_bytes());
    Ok(())
}

/// Type, code, a zero checksum and the message's four bytes.
#[inline(always)]
fn write_icmp_header(h: &mut [u8], msg: Message) {
    h[0] = msg.kind;
    h[1] = msg.code;
    h[2] = 0;
    h[3] = 0;
    h[4..8].copy_from_slice(&msg.rest);
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
