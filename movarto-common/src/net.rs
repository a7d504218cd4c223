//! Wire constants the parser needs, in host byte order.

/// EtherType of IPv4.
pub const ETH_P_IP: u16 = 0x0800;
/// EtherType of IPv6.
pub const ETH_P_IPV6: u16 = 0x86DD;

/// Length of an Ethernet header without VLAN tags.
pub const ETH_HLEN: usize = 14;
/// Length of an IPv4 header without options.
pub const IPV4_MIN_HLEN: usize = 20;
/// Length of the fixed IPv6 header.
pub const IPV6_HLEN: usize = 40;
/// Length of a TCP header without options.
pub const TCP_MIN_HLEN: usize = 20;
/// Length of a UDP header.
pub const UDP_HLEN: usize = 8;
/// Length of the ICMP / ICMPv6 header fields the datapath reads (type, code, checksum, rest).
pub const ICMP_HLEN: usize = 8;

/// IP protocol numbers (IANA).
pub mod proto {
    pub const HOPOPTS: u8 = 0;
    pub const ICMP: u8 = 1;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    pub const ROUTING: u8 = 43;
    pub const FRAGMENT: u8 = 44;
    pub const ICMPV6: u8 = 58;
    pub const DSTOPTS: u8 = 60;
}

/// Address family of a flow, as stored in [`crate::flow::FlowKey::family`].
pub mod family {
    pub const IPV4: u8 = 4;
    pub const IPV6: u8 = 6;
}

/// How many IPv6 extension headers the parser walks before giving up.
/// Bounded so the verifier can prove the loop terminates.
pub const IPV6_MAX_EXT_HEADERS: usize = 4;

/// Conversions between `IpAddr` and the 16-byte address layout of the maps.
#[cfg(feature = "user")]
pub mod addr {
    use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    use super::family;

    /// The 16-byte map layout of `addr` and its family.
    pub fn to_map(addr: IpAddr) -> ([u8; 16], u8) {
        match addr {
            IpAddr::V4(v4) => {
                let mut out = [0u8; 16];
                out[..4].copy_from_slice(&v4.octets());
                (out, family::IPV4)
            }
            IpAddr::V6(v6) => (v6.octets(), family::IPV6),
        }
    }

    /// The address stored as `bytes` for `fam`; `None` for an unknown family.
    pub fn from_map(bytes: [u8; 16], fam: u8) -> Option<IpAddr> {
        match fam {
            family::IPV4 => Some(IpAddr::V4(Ipv4Addr::new(
                bytes[0], bytes[1], bytes[2], bytes[3],
            ))),
            family::IPV6 => Some(IpAddr::V6(Ipv6Addr::from(bytes))),
            _ => None,
        }
    }
}
