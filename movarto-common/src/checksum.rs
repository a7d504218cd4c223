//! Internet checksum helpers (RFC 1071, RFC 1624), shared by the eBPF
//! programs and the reference implementation so both compute the same bytes.

/// Folds a 32-bit one's-complement sum to 16 bits and complements it.
#[inline(always)]
pub const fn fold(mut sum: u32) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// The checksum of a 20-byte IPv4 header whose checksum field is zero.
#[inline(always)]
pub fn ipv4_header(header: &[u8; 20]) -> u16 {
    let mut sum: u32 = 0;
    let mut i = 0;
    while i < 20 {
        sum += u32::from(u16::from_be_bytes([header[i], header[i + 1]]));
        i += 2;
    }
    fold(sum)
}

/// Updates checksum `check` for a 16-bit field changing from `old` to `new`
/// (RFC 1624, eqn. 3: HC' = ~(~HC + ~m + m')). All values in host order.
#[inline(always)]
pub const fn replace16(check: u16, old: u16, new: u16) -> u16 {
    let sum = (!check as u32) + (!old as u32) + (new as u32);
    fold(sum)
}

/// Updates checksum `check` for `old` bytes (an even number, at an even
/// offset of the checksummed data) becoming `new`: an address rewritten by NAT.
#[inline(always)]
pub fn replace_bytes<const N: usize>(check: u16, old: &[u8; N], new: &[u8; N]) -> u16 {
    let mut sum = u32::from(!check);
    let mut i = 0;
    while i + 1 < N {
        sum += u32::from(!u16::from_be_bytes([old[i], old[i + 1]]));
        sum += u32::from(u16::from_be_bytes([new[i], new[i + 1]]));
        // Fold as we go so 16-byte addresses can't overflow the 32-bit sum.
        sum = (sum & 0xffff) + (sum >> 16);
        i += 2;
    }
    fold(sum)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replace16_matches_recomputation() {
        // A 20-byte IPv4 header; change the TTL/protocol word and compare.
        let mut h = [
            0x45, 0, 0, 0x54, 0, 0, 0x40, 0, 64, 6, 0, 0, 192, 0, 2, 10, 198, 51, 100, 7,
        ];
        let before = ipv4_header(&h);
        let old = u16::from_be_bytes([h[8], h[9]]);
        h[8] = 63;
        let new = u16::from_be_bytes([h[8], h[9]]);
        assert_eq!(replace16(before, old, new), ipv4_header(&h));
    }

    #[test]
    fn replace_bytes_matches_recomputation_for_an_address() {
        let mut h = [
            0x45, 0, 0, 0x54, 0, 0, 0x40, 0, 64, 6, 0, 0, 192, 0, 2, 10, 198, 51, 100, 7,
        ];
        let before = ipv4_header(&h);
        let old = [198, 51, 100, 7];
        let new = [203, 0, 113, 250];
        h[16..20].copy_from_slice(&new);
        assert_eq!(replace_bytes(before, &old, &new), ipv4_header(&h));
    }
}
