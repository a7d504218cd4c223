//! What a router does to the TTL (IPv4) or hop limit (IPv6) of a packet it
//! forwards (RFC 1812 5.3.1, RFC 8200 3): a packet that arrives with 1 or 0
//! expires there; any other is forwarded with one less. Shared by the eBPF
//! programs and the tests' expectations.

use crate::checksum;

/// Offset of the TTL in the IPv4 header (the protocol follows, the checksum after it).
pub const IPV4_TTL: usize = 8;
/// Offset of the hop limit in the IPv6 header.
pub const IPV6_HOP_LIMIT: usize = 7;

/// Whether a packet arriving with this TTL or hop limit expires at a router.
#[inline(always)]
pub const fn expires(ttl: u8) -> bool {
    ttl <= 1
}

/// Decrements the TTL of the IPv4 header whose first 12 bytes are `h` and
/// updates its checksum incrementally (RFC 1624), as options and all other
/// fields are unchanged. `false`, header untouched, if the packet expires.
#[inline(always)]
pub fn decrement_ipv4(h: &mut [u8; 12]) -> bool {
    let ttl = h[IPV4_TTL];
    if expires(ttl) {
        return false;
    }
    let protocol = h[IPV4_TTL + 1];
    let check = u16::from_be_bytes([h[10], h[11]]);
    let old = u16::from_be_bytes([ttl, protocol]);
    let new = u16::from_be_bytes([ttl - 1, protocol]);
    h[IPV4_TTL] = ttl - 1;
    h[10..12].copy_from_slice(&checksum::replace16(check, old, new).to_be_bytes());
    true
}

/// Decrements the hop limit of the IPv6 header whose first 8 bytes are `h`
/// (IPv6 has no header checksum). `false`, header untouched, if the packet expires.
#[inline(always)]
pub fn decrement_ipv6(h: &mut [u8; 8]) -> bool {
    let hop_limit = h[IPV6_HOP_LIMIT];
    if expires(hop_limit) {
        return false;
    }
    h[IPV6_HOP_LIMIT] = hop_limit - 1;
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(ttl: u8, protocol: u8, id: u16) -> [u8; 20] {
        let mut h = [
            0x45, 0, 0, 0x54, 0, 0, 0x40, 0, ttl, protocol, 0, 0, 192, 0, 2, 10, 198, 51, 100, 7,
        ];
        h[4..6].copy_from_slice(&id.to_be_bytes());
        let check = checksum::ipv4_header(&h);
        h[10..12].copy_from_slice(&check.to_be_bytes());
        h
    }

    /// The checksum of a header with its checksum field in place: 0 when valid.
    fn verify(h: &[u8; 20]) -> u16 {
        let sum: u32 = h
            .chunks(2)
            .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
            .sum();
        checksum::fold(sum)
    }

    #[test]
    fn ipv4_decrement_keeps_the_checksum_valid_for_every_ttl_and_many_headers() {
        for ttl in 2..=255u8 {
            for (protocol, id) in [(6, 0), (17, 0xffff), (1, 0x1234), (6, 0xbeef)] {
                let mut h = header(ttl, protocol, id);
                let mut first = [0u8; 12];
                first.copy_from_slice(&h[..12]);
                assert!(decrement_ipv4(&mut first));
                h[..12].copy_from_slice(&first);
                assert_eq!(h[IPV4_TTL], ttl - 1);
                assert_eq!(verify(&h), 0, "ttl {ttl} protocol {protocol} id {id:#x}");
                // The same bytes as a header built with the lower TTL from scratch.
                assert_eq!(h, header(ttl - 1, protocol, id));
            }
        }
    }

    #[test]
    fn ipv4_ttl_1_and_0_expire_and_are_left_alone() {
        for ttl in [0, 1] {
            let h = header(ttl, 6, 7);
            let mut first = [0u8; 12];
            first.copy_from_slice(&h[..12]);
            assert!(!decrement_ipv4(&mut first));
            assert_eq!(first, h[..12]);
        }
    }

    #[test]
    fn ipv6_hop_limit() {
        let mut h = [0x60, 0, 0, 0, 0, 8, 17, 64];
        assert!(decrement_ipv6(&mut h));
        assert_eq!(h, [0x60, 0, 0, 0, 0, 8, 17, 63]);
        for hop_limit in [0, 1] {
            let mut h = [0x60, 0, 0, 0, 0, 8, 17, hop_limit];
            assert!(!decrement_ipv6(&mut h));
            assert_eq!(h[7], hop_limit);
        }
        assert!(!expires(2) && expires(1) && expires(0));
    }
}
