//! The link's own IPv6 traffic: neighbour discovery, link-local and multicast.
//! It belongs to the site it is seen at (B's kernel holds the anycast gateway
//! and answers the VM), never to the tunnel or the NAT: a tunnelled NS reaches
//! A, which has no route for it, and the VM never resolves its gateway.

use movarto_common::net::{family, proto};

use crate::parse::{L4, Packet, bytes};

/// ICMPv6 router solicitation .. redirect (RFC 4861), types 133 to 137.
const ND_FIRST: u8 = 133;
const ND_LAST: u8 = 137;

/// Whether `pkt` stays on the link: IPv6 to a link-local (fe80::/10) or
/// multicast (ff00::/8) address, from a link-local one, or ND whatever its
/// addresses (NUD probes go unicast between global addresses).
#[inline(always)]
pub fn stays_on_link(data: usize, data_end: usize, pkt: &Packet) -> bool {
    if pkt.family != family::IPV6 {
        return false;
    }
    if pkt.dst_addr[0] == 0xff || is_link_local(&pkt.dst_addr) || is_link_local(&pkt.src_addr) {
        return true;
    }
    if pkt.protocol != proto::ICMPV6 || !matches!(pkt.l4, L4::Icmp) {
        return false;
    }
    // Type and code: the parser has checked the ICMPv6 header is there. (A
    // one-byte read compiles to a bounds check the verifier rejects.)
    bytes::<2>(data, data_end, pkt.l4_offset).is_ok_and(|t| (ND_FIRST..=ND_LAST).contains(&t[0]))
}

#[inline(always)]
fn is_link_local(addr: &[u8; 16]) -> bool {
    addr[0] == 0xfe && addr[1] & 0xc0 == 0x80
}
