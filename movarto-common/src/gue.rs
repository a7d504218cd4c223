//! GUE variant 0 (draft-ietf-intarea-gue-09) as movarto uses it:
//!
//! ```text
//! outer IPv4 | UDP (dst 6080) | GUE: ver 0, C 0, hlen 2, proto 4/41, flags 0 | 8-byte token | inner IP packet
//! ```
//!
//! With no flags set, the 8 bytes that `hlen` announces are private data; they
//! carry the per-migration session token (big-endian). The constants here are
//! used by the eBPF programs; the reference encoder and decoder (feature
//! `user`) are what tests compare the eBPF output against.

/// GUE base header length.
pub const GUE_BASE_LEN: usize = 4;
/// Private data length (the session token).
pub const GUE_PRIVATE_LEN: usize = 8;
/// The `hlen` field: optional fields plus private data, in 32-bit words.
pub const GUE_HLEN_WORDS: u8 = (GUE_PRIVATE_LEN / 4) as u8;
/// First byte of movarto's GUE header: version 0, C 0, hlen 2.
pub const GUE_FIRST_BYTE: u8 = GUE_HLEN_WORDS;
/// Outer IPv4 + UDP + GUE + private data.
pub const GUE_OVERHEAD_IPV4: usize = 20 + 8 + GUE_BASE_LEN + GUE_PRIVATE_LEN;
/// Outer IPv6 + UDP + GUE + private data.
pub const GUE_OVERHEAD_IPV6: usize = 40 + 8 + GUE_BASE_LEN + GUE_PRIVATE_LEN;
/// Outer TTL.
pub const OUTER_TTL: u8 = 64;

/// The largest TCP MSS that fits an inner packet of `family` through a tunnel of `tunnel_mtu`.
pub const fn clamped_mss(tunnel_mtu: u16, inner_is_ipv6: bool) -> u16 {
    let inner_ip_tcp = if inner_is_ipv6 { 40 + 20 } else { 20 + 20 };
    tunnel_mtu
        .saturating_sub(GUE_OVERHEAD_IPV4 as u16)
        .saturating_sub(inner_ip_tcp)
}

#[cfg(feature = "user")]
pub use reference::*;

#[cfg(feature = "user")]
mod reference {
    use core::net::Ipv4Addr;
    use std::vec::Vec;

    use super::*;

    /// The outer addressing of one encapsulated packet.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct OuterV4 {
        pub src: Ipv4Addr,
        pub dst: Ipv4Addr,
        pub src_port: u16,
        pub dst_port: u16,
    }

    /// What [`decapsulate_v4`] found.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct Decapsulated<'a> {
        pub outer: OuterV4,
        /// GUE proto field: 4 (IPv4) or 41 (IPv6).
        pub proto: u8,
        pub token: u64,
        pub inner: &'a [u8],
    }

    /// Why a packet is not movarto GUE.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum GueError {
        Truncated,
        NotIpv4,
        NotUdp,
        BadVersion,
        ControlMessage,
        BadHlen,
        BadProto,
        FlagsSet,
    }

    /// Encapsulates an inner IP packet (starting at its IP header) in outer
    /// IPv4/UDP/GUE, exactly as the datapath does: DF set, the inner packet's
    /// TOS/traffic class copied, IP ID 0, TTL 64, UDP checksum 0.
    pub fn encapsulate_v4(outer: &OuterV4, token: u64, inner: &[u8]) -> Vec<u8> {
        let (proto, tos) = match inner.first().map(|b| b >> 4) {
            Some(6) => (41u8, (u16::from_be_bytes([inner[0], inner[1]]) >> 4) as u8),
            _ => (4u8, inner.get(1).copied().unwrap_or(0)),
        };
        let total = GUE_OVERHEAD_IPV4 + inner.len();
        let mut ip = [0u8; 20];
        ip[0] = 0x45;
        ip[1] = tos;
        ip[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        ip[6] = 0x40; // DF
        ip[8] = OUTER_TTL;
        ip[9] = 17;
        ip[12..16].copy_from_slice(&outer.src.octets());
        ip[16..20].copy_from_slice(&outer.dst.octets());
        let check = crate::checksum::ipv4_header(&ip);
        ip[10..12].copy_from_slice(&check.to_be_bytes());

        let mut out = Vec::with_capacity(total);
        out.extend_from_slice(&ip);
        out.extend_from_slice(&outer.src_port.to_be_bytes());
        out.extend_from_slice(&outer.dst_port.to_be_bytes());
        out.extend_from_slice(&((total - 20) as u16).to_be_bytes());
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&[GUE_FIRST_BYTE, proto, 0, 0]);
        out.extend_from_slice(&token.to_be_bytes());
        out.extend_from_slice(inner);
        out
    }

    /// Parses outer IPv4/UDP/GUE and returns the token and the inner packet.
    /// Port and token checks are the caller's (they depend on configuration).
    pub fn decapsulate_v4(packet: &[u8]) -> Result<Decapsulated<'_>, GueError> {
        if packet.len() < 20 {
            return Err(GueError::Truncated);
        }
        if packet[0] >> 4 != 4 {
            return Err(GueError::NotIpv4);
        }
        let ihl = usize::from(packet[0] & 0x0f) * 4;
        if ihl < 20 || packet.len() < ihl + 8 + GUE_BASE_LEN {
            return Err(GueError::Truncated);
        }
        if packet[9] != 17 {
            return Err(GueError::NotUdp);
        }
        let udp = &packet[ihl..];
        let gue = &udp[8..];
        if gue[0] >> 6 != 0 {
            return Err(GueError::BadVersion);
        }
        if gue[0] & 0x20 != 0 {
            return Err(GueError::ControlMessage);
        }
        let hlen = usize::from(gue[0] & 0x1f) * 4;
        if hlen < GUE_PRIVATE_LEN {
            return Err(GueError::BadHlen);
        }
        if gue.len() < GUE_BASE_LEN + hlen {
            return Err(GueError::Truncated);
        }
        if gue[2] != 0 || gue[3] != 0 {
            return Err(GueError::FlagsSet);
        }
        let proto = gue[1];
        if proto != 4 && proto != 41 {
            return Err(GueError::BadProto);
        }
        let mut token = [0u8; 8];
        token.copy_from_slice(&gue[GUE_BASE_LEN..GUE_BASE_LEN + 8]);
        let ip4 = |b: &[u8]| Ipv4Addr::new(b[0], b[1], b[2], b[3]);
        Ok(Decapsulated {
            outer: OuterV4 {
                src: ip4(&packet[12..16]),
                dst: ip4(&packet[16..20]),
                src_port: u16::from_be_bytes([udp[0], udp[1]]),
                dst_port: u16::from_be_bytes([udp[2], udp[3]]),
            },
            proto,
            token: u64::from_be_bytes(token),
            inner: &gue[GUE_BASE_LEN + hlen..],
        })
    }
}

#[cfg(all(test, feature = "user"))]
mod tests {
    use core::net::Ipv4Addr;
    use std::vec;

    use super::*;

    fn outer() -> OuterV4 {
        OuterV4 {
            src: Ipv4Addr::new(203, 0, 113, 1),
            dst: Ipv4Addr::new(203, 0, 113, 2),
            src_port: 50000,
            dst_port: 6080,
        }
    }

    #[test]
    fn round_trip_ipv4_inner() {
        let mut inner = vec![0x45, 0xb8, 0, 24];
        inner.extend_from_slice(&[0; 20]);
        let packet = encapsulate_v4(&outer(), 0x0123_4567_89ab_cdef, &inner);
        assert_eq!(packet.len(), GUE_OVERHEAD_IPV4 + inner.len());
        // DF, TOS copied, header checksum verifies to zero.
        assert_eq!(packet[6], 0x40);
        assert_eq!(packet[1], 0xb8);
        let mut hdr = [0u8; 20];
        hdr.copy_from_slice(&packet[..20]);
        let mut sum = 0u32;
        for i in (0..20).step_by(2) {
            sum += u32::from(u16::from_be_bytes([hdr[i], hdr[i + 1]]));
        }
        assert_eq!(crate::checksum::fold(sum), 0);
        assert_eq!(&packet[28..32], &[0x02, 4, 0, 0]);
        let d = decapsulate_v4(&packet).expect("decap");
        assert_eq!(d.outer, outer());
        assert_eq!(d.proto, 4);
        assert_eq!(d.token, 0x0123_4567_89ab_cdef);
        assert_eq!(d.inner, &inner[..]);
    }

    #[test]
    fn ipv6_inner_gets_proto_41_and_traffic_class() {
        let mut inner = vec![0x6b, 0x80, 0, 0];
        inner.extend_from_slice(&[0; 36]);
        let packet = encapsulate_v4(&outer(), 1, &inner);
        assert_eq!(packet[1], 0xb8);
        assert_eq!(decapsulate_v4(&packet).expect("decap").proto, 41);
    }

    #[test]
    fn malformed_gue_is_rejected() {
        let inner = [0x45u8; 20];
        let good = encapsulate_v4(&outer(), 1, &inner);
        let with = |at: usize, v: u8| {
            let mut p = good.clone();
            p[at] = v;
            p
        };
        assert_eq!(decapsulate_v4(&good[..30]), Err(GueError::Truncated));
        assert_eq!(decapsulate_v4(&with(9, 6)), Err(GueError::NotUdp));
        assert_eq!(decapsulate_v4(&with(28, 0x42)), Err(GueError::BadVersion));
        assert_eq!(
            decapsulate_v4(&with(28, 0x22)),
            Err(GueError::ControlMessage)
        );
        assert_eq!(decapsulate_v4(&with(28, 0x01)), Err(GueError::BadHlen));
        assert_eq!(
            decapsulate_v4(&with(28, 0x1f)[..60]),
            Err(GueError::Truncated)
        );
        assert_eq!(decapsulate_v4(&with(29, 17)), Err(GueError::BadProto));
        assert_eq!(decapsulate_v4(&with(30, 0x80)), Err(GueError::FlagsSet));
    }

    #[test]
    fn mss_clamp_leaves_room_for_the_tunnel() {
        assert_eq!(clamped_mss(1500, false), 1420);
        assert_eq!(clamped_mss(1500, true), 1400);
    }
}
