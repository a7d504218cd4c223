//! Packet parsing: Ethernet, IPv4, IPv6 (with extension headers), TCP, UDP, ICMP.
//!
//! Every read is bounds-checked against `data_end` in the form the verifier
//! understands. A frame is rejected when a header runs past the frame or past
//! the length the IP header claims, or when a header is wrong in itself; the
//! kernel's own stack would drop such packets too, so dropping them early is
//! safe and, once the datapath rewrites packets, necessary.

use movarto_common::{
    counters::Counter,
    net::{
        ETH_HLEN, ETH_P_IP, ETH_P_IPV6, ICMP_HLEN, IPV4_MIN_HLEN, IPV6_HLEN, IPV6_MAX_EXT_HEADERS,
        TCP_MIN_HLEN, UDP_HLEN, proto,
    },
};

/// What the program does with the frame.
pub enum Verdict {
    Pass,
    Drop,
}

/// A frame the parser accepted.
pub enum Frame {
    /// Not IP: ARP, LLDP and the like. Left to the kernel.
    NonIp,
    Ipv4(L4),
    Ipv6(L4),
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

/// Why a frame was rejected; each reason has its own drop counter.
#[derive(Clone, Copy)]
pub enum ParseError {
    Truncated,
    BadIpHeader,
    BadL4Header,
    Ipv6ExtChain,
}

impl ParseError {
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
fn bytes<const N: usize>(
    data: usize,
    data_end: usize,
    offset: usize,
) -> Result<&'static [u8; N], ParseError> {
    let start = data + offset;
    if start + N > data_end {
        return Err(ParseError::Truncated);
    }
    // SAFETY: [start, start + N) lies inside the packet, as just checked.
    Ok(unsafe { &*(start as *const [u8; N]) })
}

#[inline(always)]
fn be16(b0: u8, b1: u8) -> u16 {
    u16::from_be_bytes([b0, b1])
}

/// Parses the frame in `[data, data_end)`.
#[inline(always)]
pub fn parse_frame(data: usize, data_end: usize) -> Result<Frame, ParseError> {
    let eth = bytes::<ETH_HLEN>(data, data_end, 0)?;
    match be16(eth[12], eth[13]) {
        ETH_P_IP => parse_ipv4(data, data_end).map(Frame::Ipv4),
        ETH_P_IPV6 => parse_ipv6(data, data_end).map(Frame::Ipv6),
        _ => Ok(Frame::NonIp),
    }
}

#[inline(always)]
fn parse_ipv4(data: usize, data_end: usize) -> Result<L4, ParseError> {
    let ip = bytes::<IPV4_MIN_HLEN>(data, data_end, ETH_HLEN)?;
    if ip[0] >> 4 != 4 {
        return Err(ParseError::BadIpHeader);
    }
    let header_len = usize::from(ip[0] & 0x0f) * 4;
    let total_len = usize::from(be16(ip[2], ip[3]));
    if header_len < IPV4_MIN_HLEN || total_len < header_len {
        return Err(ParseError::BadIpHeader);
    }
    let l3_end = ETH_HLEN + total_len;
    if data + l3_end > data_end {
        return Err(ParseError::Truncated);
    }
    let fragment_offset = be16(ip[6], ip[7]) & 0x1fff;
    if fragment_offset != 0 {
        return Ok(L4::Fragment);
    }
    parse_l4(
        data,
        data_end,
        ETH_HLEN + header_len,
        l3_end,
        ip[9],
        proto::ICMP,
    )
}

#[inline(always)]
fn parse_ipv6(data: usize, data_end: usize) -> Result<L4, ParseError> {
    let ip = bytes::<IPV6_HLEN>(data, data_end, ETH_HLEN)?;
    if ip[0] >> 4 != 6 {
        return Err(ParseError::BadIpHeader);
    }
    let l3_end = ETH_HLEN + IPV6_HLEN + usize::from(be16(ip[4], ip[5]));
    if data + l3_end > data_end {
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
                if be16(ext[2], ext[3]) >> 3 != 0 {
                    return Ok(L4::Fragment);
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
    parse_l4(data, data_end, offset, l3_end, next, proto::ICMPV6)
}

/// Checks the transport header at `l4_offset`; it must end inside both the
/// frame and the IP packet (`l3_end`). `icmp` is the family's ICMP number.
#[inline(always)]
fn parse_l4(
    data: usize,
    data_end: usize,
    l4_offset: usize,
    l3_end: usize,
    protocol: u8,
    icmp: u8,
) -> Result<L4, ParseError> {
    let (l4, header_len) = match protocol {
        proto::TCP => {
            let tcp = bytes::<TCP_MIN_HLEN>(data, data_end, l4_offset)?;
            let data_offset = usize::from(tcp[12] >> 4) * 4;
            if data_offset < TCP_MIN_HLEN {
                return Err(ParseError::BadL4Header);
            }
            (L4::Tcp, data_offset)
        }
        proto::UDP => {
            bytes::<UDP_HLEN>(data, data_end, l4_offset)?;
            (L4::Udp, UDP_HLEN)
        }
        p if p == icmp => {
            bytes::<ICMP_HLEN>(data, data_end, l4_offset)?;
            (L4::Icmp, ICMP_HLEN)
        }
        _ => return Ok(L4::Other),
    };
    if l4_offset + header_len > l3_end {
        return Err(ParseError::Truncated);
    }
    Ok(l4)
}
