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
//! and a stateful firewall before the sender lets it through as part of the
//! sender's flow. A traceroute to `H` so shows `H` at A's hop too.

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
/// for at least 8), or the whole of a shorter packet (down to whole words).
const QUOTE: usize = IPV4_MIN_HLEN + 64;
/// New IPv4 + ICMP headers.
const PREPEND: usize = IPV4_MIN_HLEN + 8;
/// What the IPv4 writer reads and writes in place: Ethernet, the new
/// headers and the quoted IPv4 header (its addresses).
const HEAD: usize = ETH_HLEN + PREPEND + IPV4_MIN_HLEN;

/// IPv6: the IPv6 header and 64 bytes after it (RFC 4443 allows less than
/// the 1280-byte maximum), or the whole of a shorter packet (down to whole words).
const QUOTE6: usize = IPV6_HLEN + 64;
/// New IPv6 + ICMPv6 headers.
const PREPEND6: usize = IPV6_HLEN + 8;
const HEAD6: usize = ETH_HLEN + PREPEND6 + IPV6_HLEN;

/// XDP: turns the frame, whose IP packet of `fam` is `ip_len` bytes long,
/// into `msg` to its sender, back out of the port it came in on.
#[inline(always)]
pub fn answer_xdp(ctx: &XdpContext, fam: u8, ip_len: usize, msg: Message) -> Result<u32, Counter> {
    let (max_quote, prepend) = if fam == family::IPV6 {
        (QUOTE6, PREPEND6)
    } else {
        (QUOTE, PREPEND)
    };
    // Whole words only, so the checksum runs in fixed-size chunks: a packet
    // shorter than the quote loses up to 3 bytes of it, never its
    // transport header's first 8 (TCP, UDP and ICMP packets are longer).
    let quote = if ip_len < max_quote {
        ip_len & !3
    } else {
        max_quote
    };
    // The parser checked the IP packet lies within the frame; what follows
    // the quote (the rest, any Ethernet padding) goes.
    let cut = (ctx.data_end() - ctx.data())
        .checked_sub(ETH_HLEN + quote)
        .ok_or(Counter::DropTruncated)?;
    // SAFETY: plain helper calls on our own context.
    let resized = unsafe {
        (cut == 0 || bpf_xdp_adjust_tail(ctx.ctx, -(cut as i32)) == 0)
            && bpf_xdp_adjust_head(ctx.ctx, -(prepend as i32)) == 0
    };
    if !resized {
        return Err(Counter::DropResizeFailed);
    }
    // The old Ethernet header now sits at `prepend`: answer from its destination to its source.
    write(ctx.data(), ctx.data_end(), fam, msg, quote, prepend)?;
    Ok(xdp_action::XDP_TX)
}

/// TC, for an IPv4 packet the VM sent: frag-needed back to the VM, out of
/// the VM-facing interface (`vm_ifindex`).
#[inline(always)]
pub fn too_big_v4_tc(ctx: &TcContext, tunnel_mtu: u16, vm_ifindex: u32) -> Result<u32, Counter> {
    too_big_tc(ctx, family::IPV4, tunnel_mtu, vm_ifindex)
}

/// TC, for an IPv6 packet the VM sent: packet-too-big back to the VM.
#[inline(always)]
pub fn too_big_v6_tc(ctx: &TcContext, tunnel_mtu: u16, vm_ifindex: u32) -> Result<u32, Counter> {
    too_big_tc(ctx, family::IPV6, tunnel_mtu, vm_ifindex)
}

/// Room is made after the Ethernet header, which stays where it is. A
/// packet too big for the tunnel is always longer than the quote.
#[inline(always)]
fn too_big_tc(ctx: &TcContext, fam: u8, tunnel_mtu: u16, vm_ifindex: u32) -> Result<u32, Counter> {
    let (quote, prepend) = if fam == family::IPV6 {
        (QUOTE6, PREPEND6)
    } else {
        (QUOTE, PREPEND)
    };
    if (ctx.len() as usize) < ETH_HLEN + quote {
        return Err(Counter::DropTooBig);
    }
    // SAFETY: plain helper call on our own context.
    if unsafe { bpf_skb_change_tail(ctx.skb.skb, (ETH_HLEN + quote) as u32, 0) } != 0 {
        return Err(Counter::DropResizeFailed);
    }
    ctx.adjust_room(prepend as i32, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, 0)
        .map_err(|_| Counter::DropResizeFailed)?;
    ctx.pull_data((ETH_HLEN + prepend + quote) as u32)
        .map_err(|_| Counter::DropResizeFailed)?;
    write(
        ctx.data(),
        ctx.data_end(),
        fam,
        Message::too_big(fam, tunnel_mtu),
        quote,
        0,
    )?;
    // SAFETY: plain helper call.
    Ok(unsafe { bpf_redirect(vm_ifindex, 0) } as u32)
}

/// Writes Ethernet, IP and ICMP headers of `msg` in front of the quote of
/// `quote` bytes in the packet `[data, data_end)`; the offending frame's
/// Ethernet header is at `old_eth`. The quote starts at ETH_HLEN + PREPEND
/// (IPv4) or ETH_HLEN + PREPEND6 (IPv6).
#[inline(always)]
fn write(
    data: usize,
    data_end: usize,
    fam: u8,
    msg: Message,
    quote: usize,
    old_eth: usize,
) -> Result<(), Counter> {
    // First the MACs: the new headers overwrite the old Ethernet header.
    let (at, ethertype) = if fam == family::IPV6 {
        (ETH_HLEN + IPV6_HLEN, ETH_P_IPV6)
    } else {
        (ETH_HLEN + IPV4_MIN_HLEN, ETH_P_IP)
    };
    let eth = bytes_mut::<{ ETH_HLEN + PREPEND6 }>(data, data_end, 0)
        .map_err(|_| Counter::DropResizeFailed)?;
    answer_macs(eth, old_eth);
    eth[12..14].copy_from_slice(&ethertype.to_be_bytes());
    let seed = if fam == family::IPV6 {
        write_v6(data, data_end, quote)?
    } else {
        write_v4(data, data_end, quote)?
    };
    let h = bytes_mut::<8>(data, data_end, at).map_err(|_| Counter::DropResizeFailed)?;
    write_icmp_header(h, msg);
    let check = u16::from_be(checksum::fold(sum_packet(
        data,
        data_end,
        at,
        8 + quote,
        seed,
    )?));
    let h = bytes_mut::<8>(data, data_end, at).map_err(|_| Counter::DropResizeFailed)?;
    h[2..4].copy_from_slice(&check.to_be_bytes());
    Ok(())
}

/// The IPv4 header of an answer quoting `quote` bytes; no pseudo-header (0).
#[inline(always)]
fn write_v4(data: usize, data_end: usize, quote: usize) -> Result<u32, Counter> {
    let ip = ETH_HLEN;
    let mut header = [0u8; IPV4_MIN_HLEN];
    let f = bytes_mut::<HEAD>(data, data_end, 0).map_err(|_| Counter::DropResizeFailed)?;
    let quoted = ETH_HLEN + PREPEND;
    let mut addrs = [0u8; 8];
    addrs.copy_from_slice(&f[quoted + 12..quoted + 20]);

    f[ip] = 0x45;
    f[ip + 1] = 0;
    f[ip + 2..ip + 4].copy_from_slice(&((PREPEND + quote) as u16).to_be_bytes());
    f[ip + 4..ip + 10].copy_from_slice(&[0, 0, 0, 0, 64, proto::ICMP]);
    f[ip + 10..ip + 12].copy_from_slice(&[0, 0]);
    f[ip + 12..ip + 16].copy_from_slice(&addrs[4..8]); // from the original destination
    f[ip + 16..ip + 20].copy_from_slice(&addrs[..4]); // to the original source
    header.copy_from_slice(&f[ip..ip + IPV4_MIN_HLEN]);
    f[ip + 10..ip + 12].copy_from_slice(&checksum::ipv4_header(&header).to_be_bytes());
    Ok(0)
}

/// The IPv6 header of an answer quoting `quote` bytes; returns the sum of
/// the ICMPv6 pseudo-header.
#[inline(always)]
fn write_v6(data: usize, data_end: usize, quote: usize) -> Result<u32, Counter> {
    let ip = ETH_HLEN;
    let upper_len = (8 + quote) as u16;
    let f = bytes_mut::<HEAD6>(data, data_end, 0).map_err(|_| Counter::DropResizeFailed)?;
    let quoted = ETH_HLEN + PREPEND6;
    let mut addrs = [0u8; 32];
    addrs.copy_from_slice(&f[quoted + 8..quoted + 40]);

    f[ip..ip + 4].copy_from_slice(&[0x60, 0, 0, 0]);
    f[ip + 4..ip + 6].copy_from_slice(&upper_len.to_be_bytes());
    f[ip + 6] = proto::ICMPV6;
    f[ip + 7] = 64;
    f[ip + 8..ip + 24].copy_from_slice(&addrs[16..]); // from the original destination
    f[ip + 24..ip + 40].copy_from_slice(&addrs[..16]); // to the original source
    // The pseudo-header: both addresses, the upper-layer length and the next
    // header (16-bit big-endian words), summed as `sum_packet` loads words.
    let mut pseudo =
        u32::from(upper_len.swap_bytes()) + u32::from(u16::from(proto::ICMPV6).swap_bytes());
    for pair in addrs.chunks_exact(2) {
        pseudo += u32::from(u16::from_le_bytes([pair[0], pair[1]]));
    }
    Ok(pseudo)
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

/// Type, code, a zero checksum and the message's four bytes.
#[inline(always)]
fn write_icmp_header(h: &mut [u8], msg: Message) {
    h[0] = msg.kind;
    h[1] = msg.code;
    h[2] = 0;
    h[3] = 0;
    h[4..8].copy_from_slice(&msg.rest);
}

/// The one's-complement sum of the `len` bytes (a multiple of 4, below 128)
/// at `at` of the packet, words as loaded on this little-endian machine,
/// plus `seed`; not folded. The verifier needs fixed sizes for packet memory
/// and the quote's length varies, so it is summed in chunks of the sizes the
/// bits of `len` say.
#[inline(always)]
fn sum_packet(
    data: usize,
    data_end: usize,
    at: usize,
    len: usize,
    seed: u32,
) -> Result<u32, Counter> {
    let mut acc = (at, seed);
    acc = chunk::<64>(data, data_end, len, acc)?;
    acc = chunk::<32>(data, data_end, len, acc)?;
    acc = chunk::<16>(data, data_end, len, acc)?;
    acc = chunk::<8>(data, data_end, len, acc)?;
    acc = chunk::<4>(data, data_end, len, acc)?;
    Ok(acc.1)
}

/// If `len` has the bit `N` (a multiple of 4), the `N` bytes at the offset
/// in `acc` are added to its sum and the offset moves past them.
#[inline(always)]
fn chunk<const N: usize>(
    data: usize,
    data_end: usize,
    len: usize,
    acc: (usize, u32),
) -> Result<(usize, u32), Counter> {
    let (off, sum) = acc;
    if len & N == 0 {
        return Ok(acc);
    }
    let bytes = bytes_mut::<N>(data, data_end, off).map_err(|_| Counter::DropTruncated)?;
    Ok((off + N, partial(bytes, sum)?))
}

/// The 32-bit one's-complement sum of `bytes` (a multiple of 4 long, words
/// as loaded) plus `seed`, not yet folded; computed by the kernel.
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
