//! Packet parsing: Ethernet, IPv4, IPv6 (with extension headers), TCP, UDP, ICMP.
//!
//! Every read is bounds-checked against `data_end` in the form the verifier
//! understands. A frame is rejected when a header runs past the frame or past
//! the length the IP header claims, or when a header is wrong in itself. A
//! rejection is not a drop: the entry points drop a rejected packet only if
//! movarto would act on it (see `acts_on` in main.rs) and leave every other
//! one to the kernel untouched, whatever its shape.

use movarto_common::{
    counters::Counter,
    net::{
        ETH_HLEN, ETH_P_IP, ETH_P_IPV6, ICMP_HLEN, IPV4_MIN_HLEN, IPV6_HLEN, IPV6_MAX_EXT_HEADERS,
        TCP_MIN_HLEN, UDP_HLEN, family, proto,
    },
};

/// An IP packet with everything the datapath decides on.
#[derive(Clone, Copy)]
pub struct Packet {
    /// [`movarto_common::net::family`].
    pub family: u8,
    /// The transport protocol after any IPv6 extension headers.
    pub protocol: u8,
    pub l4: L4,
    /// Offset of the transport header from the start of the frame.
    pub l4_offset: usize,
    /// Addresses in the 16-byte flow-key layout.
    pub src_addr: [u8; 16],
    pub dst_addr: [u8; 16],
    /// Ports as on the wire (network byte order); zero without ports.
    pub src_port: u16,
    pub dst_port: u16,
    /// TCP flags byte (FIN 0x01, SYN 0x02, RST 0x04, ACK 0x10); zero otherwise.
    pub tcp_flags: u8,
    /// Bytes from the IP header to the end of the IP packet.
    pub ip_len: usize,
    /// Part of a fragmented packet (IPv4 MF or offset, IPv6 fragment header).
    pub fragment: bool,
}

impl Packet {
    /// What the parser fills.
    pub const EMPTY: Packet = Packet {
        family: 0,
        protocol: 0,
        l4: L4::Other,
        l4_offset: 0,
        src_addr: [0; 16],
        dst_addr: [0; 16],
        src_port: 0,
        dst_port: 0,
        tcp_flags: 0,
        ip_len: 0,
        fragment: false,
    };

    /// An IP packet of `family` and `ip_len` bytes, the rest still to be read. Field
    /// by field on the caller's [`Packet::EMPTY`] (copied from a constant, 8 bytes at
    /// a time): building a new `Packet` here makes LLVM zero the addresses with a
    /// byte-by-byte `memset` loop, on every packet.
    #[inline(always)]
    fn start_ip(&mut self, family: u8, ip_len: usize) {
        self.family = family;
        self.l4 = L4::Fragment;
        self.ip_len = ip_len;
    }
}

/// TCP flag bits in [`Packet::tcp_flags`].
pub mod tcp_flag {
    pub const FIN: u8 = 0x01;
    pub const SYN: u8 = 0x02;
    pub const RST: u8 = 0x04;
    pub const ACK: u8 = 0x10;
}

/// The transport layer of an accepted IP packet.
#[derive(Clone, Copy)]
pub enum L4 {
    Tcp,
    Udp,
    Icmp,
    Other,
    /// A non-first fragment: no transport header to read.
    Fragment,
}

impl L4 {
    pub const fn counter(self) -> Counter {
        match self {
            L4::Tcp => Counter::L4Tcp,
            L4::Udp => Counter::L4Udp,
            L4::Icmp => Counter::L4Icmp,
            L4::Other => Counter::L4Other,
            L4::Fragment => Counter::L4Fragment,
        }
    }
}

/// Why a frame was rejected; each reason has its own drop counter, bumped
/// when the entry point drops the packet for it.
#[repr(u32)]
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum ParseError {
    Truncated = 0,
    BadIpHeader = 1,
    BadL4Header = 2,
    Ipv6ExtChain = 3,
}

impl ParseError {
    #[inline(always)]
    const fn from_status(status: u32) -> ParseError {
        match status - STATUS_ERROR {
            1 => ParseError::BadIpHeader,
            2 => ParseError::BadL4Header,
            3 => ParseError::Ipv6ExtChain,
            _ => ParseError::Truncated,
        }
    }

    pub const fn counter(self) -> Counter {
        match self {
            ParseError::Truncated => Counter::DropTruncated,
            ParseError::BadIpHeader => Counter::DropBadIpHeader,
            ParseError::BadL4Header => Counter::DropBadL4Header,
            ParseError::Ipv6ExtChain => Counter::DropIpv6ExtChain,
        }
    }
}

/// `N` bytes of the frame at `offset`, or `Truncated` if the frame is shorter.
#[inline(always)]
pub fn bytes<const N: usize>(
    data: usize,
    data_end: usize,
    offset: usize,
) -> Result<&'static [u8; N], ParseError> {
    // Offsets can come back through memory (a parsed Packet), where the
    // verifier no longer knows their range; bound them explicitly.
    if offset > MAX_HEADER_OFFSET {
        return Err(ParseError::Truncated);
    }
    let start = data + offset;
    if start + N > data_end {
        return Err(ParseError::Truncated);
    }
    // SAFETY: [start, start + N) lies inside the packet, as just checked.
    Ok(unsafe { &*(start as *const [u8; N]) })
}

/// No header the datapath reads starts further into a frame than this
/// (Ethernet + IPv6 + the extension headers the parser walks + GUE).
const MAX_HEADER_OFFSET: usize = 0x2fff;

/// Mutable `N` bytes of the frame at `offset` (XDP and TC allow direct writes).
#[inline(always)]
pub fn bytes_mut<const N: usize>(
    data: usize,
    data_end: usize,
    offset: usize,
) -> Result<&'static mut [u8; N], ParseError> {
    if offset > MAX_HEADER_OFFSET {
        return Err(ParseError::Truncated);
    }
    let start = data + offset;
    if start + N > data_end {
        return Err(ParseError::Truncated);
    }
    // SAFETY: [start, start + N) lies inside the packet, as just checked.
    Ok(unsafe { &mut *(start as *mut [u8; N]) })
}

#[inline(always)]
fn be16(b0: u8, b1: u8) -> u16 {
    u16::from_be_bytes([b0, b1])
}

/// Parses the frame in `[data, data_end)` into `pkt`. `frame_len` is the
/// whole frame: for an skb only the linear part lies before `data_end` (a GSO
/// packet from the VM is mostly in page fragments), and the IP length is
/// checked against the whole, while headers are read from the linear part.
/// `Ok(true)` for an IP packet (then `pkt` is filled), `Ok(false)` for a
/// frame that is not IP. On an error `pkt` holds what was read before it:
/// family, addresses and protocol once the fixed IP header has been read
/// (the family stays 0 if it could not be), ports once the transport header
/// has, so the caller can tell whether the packet is one it acts on.
/// Filling the caller's `Packet` keeps a single copy on the stack; it must be a
/// fresh [`Packet::EMPTY`] (every caller's is), since the parser writes only the
/// fields it reads.
#[inline(always)]
pub fn parse_frame(
    data: usize,
    data_end: usize,
    frame_len: usize,
    pkt: &mut Packet,
) -> Result<bool, ParseError> {
    match parse_into(data, data_end, frame_len, pkt) {
        STATUS_IP => Ok(true),
        STATUS_NON_IP => Ok(false),
        code => Err(ParseError::from_status(code)),
    }
}

const STATUS_IP: u32 = 0;
const STATUS_NON_IP: u32 = 1;
const STATUS_ERROR: u32 = 2;

/// The parser as a separate BPF function: it runs for outer and inner packets
/// and its locals need their own stack frame. It returns a scalar status and
/// fills `out`, since a BPF call returns one register.
#[inline(never)]
fn parse_into(data: usize, data_end: usize, frame_len: usize, out: *mut Packet) -> u32 {
    // SAFETY: `out` points at the caller's Packet, borrowed mutably for this call.
    let pkt = unsafe { &mut *out };
    match parse_any(data, data_end, frame_len, pkt) {
        Ok(true) => STATUS_IP,
        Ok(false) => STATUS_NON_IP,
        Err(e) => STATUS_ERROR + e as u32,
    }
}

#[inline(always)]
fn parse_any(
    data: usize,
    data_end: usize,
    frame_len: usize,
    pkt: &mut Packet,
) -> Result<bool, ParseError> {
    let eth = bytes::<ETH_HLEN>(data, data_end, 0)?;
    match be16(eth[12], eth[13]) {
        ETH_P_IP => parse_ipv4(data, data_end, frame_len, pkt).map(|()| true),
        ETH_P_IPV6 => parse_ipv6(data, data_end, frame_len, pkt).map(|()| true),
        _ => Ok(false),
    }
}

#[inline(always)]
fn parse_ipv4(
    data: usize,
    data_end: usize,
    frame_len: usize,
    pkt: &mut Packet,
) -> Result<(), ParseError> {
    let ip = bytes::<IPV4_MIN_HLEN>(data, data_end, ETH_HLEN)?;
    if ip[0] >> 4 != 4 {
        return Err(ParseError::BadIpHeader);
    }
    let header_len = usize::from(ip[0] & 0x0f) * 4;
    let total_len = usize::from(be16(ip[2], ip[3]));
    // The fixed header is in: record whom the packet is for before judging it.
    pkt.start_ip(family::IPV4, total_len);
    pkt.protocol = ip[9];
    pkt.l4_offset = ETH_HLEN + header_len;
    pkt.fragment = be16(ip[6], ip[7]) & 0x3fff != 0;
    pkt.src_addr[..4].copy_from_slice(&ip[12..16]);
    pkt.dst_addr[..4].copy_from_slice(&ip[16..20]);
    if header_len < IPV4_MIN_HLEN || total_len < header_len {
        return Err(ParseError::BadIpHeader);
    }
    let l3_end = ETH_HLEN + total_len;
    if l3_end > frame_len {
        return Err(ParseError::Truncated);
    }
    let fragment_offset = be16(ip[6], ip[7]) & 0x1fff;
    if fragment_offset != 0 {
        return Ok(());
    }
    parse_l4(data, data_end, l3_end, proto::ICMP, pkt)
}

#[inline(always)]
fn parse_ipv6(
    data: usize,
    data_end: usize,
    frame_len: usize,
    pkt: &mut Packet,
) -> Result<(), ParseError> {
    let ip = bytes::<IPV6_HLEN>(data, data_end, ETH_HLEN)?;
    if ip[0] >> 4 != 6 {
        return Err(ParseError::BadIpHeader);
    }
    let ip_len = IPV6_HLEN + usize::from(be16(ip[4], ip[5]));
    // The protocol is only known once the extension headers have been walked.
    pkt.start_ip(family::IPV6, ip_len);
    pkt.src_addr.copy_from_slice(&ip[8..24]);
    pkt.dst_addr.copy_from_slice(&ip[24..40]);
    let l3_end = ETH_HLEN + ip_len;
    if l3_end > frame_len {
        return Err(ParseError::Truncated);
    }
    let mut next = ip[6];
    let mut offset = ETH_HLEN + IPV6_HLEN;
    for _ in 0..IPV6_MAX_EXT_HEADERS {
        match next {
            proto::HOPOPTS | proto::ROUTING | proto::DSTOPTS => {
                let ext = bytes::<2>(data, data_end, offset)?;
                next = ext[0];
                offset += (usize::from(ext[1]) + 1) * 8;
            }
            proto::FRAGMENT => {
                let ext = bytes::<8>(data, data_end, offset)?;
                next = ext[0];
                offset += 8;
                pkt.fragment = true;
                if be16(ext[2], ext[3]) >> 3 != 0 {
                    pkt.protocol = next;
                    pkt.l4_offset = offset;
                    return Ok(());
                }
            }
            _ => break,
        }
        if offset > l3_end {
            return Err(ParseError::Truncated);
        }
    }
    if matches!(
        next,
        proto::HOPOPTS | proto::ROUTING | proto::DSTOPTS | proto::FRAGMENT
    ) {
        return Err(ParseError::Ipv6ExtChain);
    }
    pkt.protocol = next;
    pkt.l4_offset = offset;
    parse_l4(data, data_end, l3_end, proto::ICMPV6, pkt)
}

/// Checks the transport header at `pkt.l4_offset` and reads ports and flags;
/// the header must end inside both the frame and the IP packet (`l3_end`).
/// `icmp` is the family's ICMP protocol number.
#[inline(always)]
fn parse_l4(
    data: usize,
    data_end: usize,
    l3_end: usize,
    icmp: u8,
    pkt: &mut Packet,
) -> Result<(), ParseError> {
    let l4_offset = pkt.l4_offset;
    let header_len = match pkt.protocol {
        proto::TCP => {
            let tcp = bytes::<TCP_MIN_HLEN>(data, data_end, l4_offset)?;
            let data_offset = usize::from(tcp[12] >> 4) * 4;
            pkt.l4 = L4::Tcp;
            pkt.src_port = u16::from_ne_bytes([tcp[0], tcp[1]]);
            pkt.dst_port = u16::from_ne_bytes([tcp[2], tcp[3]]);
            pkt.tcp_flags = tcp[13];
            if data_offset < TCP_MIN_HLEN {
                return Err(ParseError::BadL4Header);
            }
            data_offset
        }
        proto::UDP => {
            let udp = bytes::<UDP_HLEN>(data, data_end, l4_offset)?;
            pkt.l4 = L4::Udp;
            pkt.src_port = u16::from_ne_bytes([udp[0], udp[1]]);
            pkt.dst_port = u16::from_ne_bytes([udp[2], udp[3]]);
            UDP_HLEN
        }
        p if p == icmp => {
            bytes::<ICMP_HLEN>(data, data_end, l4_offset)?;
            pkt.l4 = L4::Icmp;
            ICMP_HLEN
        }
        _ => {
            pkt.l4 = L4::Other;
            return Ok(());
        }
    };
    if l4_offset + header_len > l3_end {
        return Err(ParseError::Truncated);
    }
    Ok(())
}
