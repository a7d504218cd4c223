//! The flow key: one connection as seen from the service's side.
//!
//! Addresses are 16 bytes so IPv4 and IPv6 share one map; an IPv4 address sits
//! in the first 4 bytes and the rest is zero. Ports are in network byte order,
//! exactly as they appear on the wire, so the datapath never swaps them.

/// Key of the flow map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// The service's address (`H` before the move).
    pub service_addr: [u8; 16],
    /// The peer's (client's) address.
    pub peer_addr: [u8; 16],
    /// The service's port, network byte order.
    pub service_port: u16,
    /// The peer's port, network byte order.
    pub peer_port: u16,
    /// IP protocol number ([`crate::net::proto`]).
    pub protocol: u8,
    /// [`crate::net::family::IPV4`] or [`crate::net::family::IPV6`].
    pub family: u8,
    /// Explicit padding, always zero, so keys hash identically in the kernel.
    pub _pad: [u8; 2],
}

#[cfg(feature = "user")]
// SAFETY: repr(C), only integer arrays and integers, explicit zeroed padding.
unsafe impl aya::Pod for FlowKey {}

#[cfg(feature = "user")]
mod user {
    use super::FlowKey;
    use crate::net::family;
    use core::net::IpAddr;

    impl FlowKey {
        /// Builds a key from the service's and the peer's socket addresses.
        /// Returns `None` when the two are of different families.
        pub fn new(service: (IpAddr, u16), peer: (IpAddr, u16), protocol: u8) -> Option<FlowKey> {
            let (service_addr, peer_addr, fam) = match (service.0, peer.0) {
                (IpAddr::V4(s), IpAddr::V4(p)) => {
                    (pad_v4(s.octets()), pad_v4(p.octets()), family::IPV4)
                }
                (IpAddr::V6(s), IpAddr::V6(p)) => (s.octets(), p.octets(), family::IPV6),
                _ => return None,
            };
            Some(FlowKey {
                service_addr,
                peer_addr,
                service_port: service.1.to_be(),
                peer_port: peer.1.to_be(),
                protocol,
                family: fam,
                _pad: [0; 2],
            })
        }
    }

    fn pad_v4(octets: [u8; 4]) -> [u8; 16] {
        let mut out = [0u8; 16];
        out[..4].copy_from_slice(&octets);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_is_fixed() {
        // The eBPF side and userspace must agree on this exactly.
        assert_eq!(core::mem::size_of::<FlowKey>(), 40);
        assert_eq!(core::mem::align_of::<FlowKey>(), 2);
    }

    #[cfg(feature = "user")]
    #[test]
    fn new_rejects_mixed_families_and_keeps_network_order() {
        use core::net::{IpAddr, Ipv4Addr, Ipv6Addr};
        let v4 = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10));
        let v6 = IpAddr::V6(Ipv6Addr::LOCALHOST);
        assert!(FlowKey::new((v4, 80), (v6, 1), 6).is_none());
        let key = FlowKey::new(
            (v4, 80),
            (IpAddr::V4(Ipv4Addr::new(198, 51, 100, 7)), 40000),
            6,
        )
        .expect("same family");
        assert_eq!(&key.service_addr[..4], &[192, 0, 2, 10]);
        assert!(key.service_addr[4..].iter().all(|b| *b == 0));
        assert_eq!(key.service_port.to_ne_bytes(), 80u16.to_be_bytes());
        assert_eq!(key.family, crate::net::family::IPV4);
    }
}
