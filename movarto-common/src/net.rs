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
