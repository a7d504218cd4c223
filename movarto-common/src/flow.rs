//! The flow key: one connection as seen from the service's side.
//!
//! Addresses are 16 bytes so IPv4 and IPv6 share one map; an IPv4 address sits
//! in the first 4 bytes and the rest is zero. Ports are in network byte order,
//! exactly as they appear on the wire, so the datapath never swaps them.
//!
//! Two LRU hash maps hold the flows, so that a flood cannot push out a real
//! connection (a SYN flood of new 5-tuples is MOVARTO's CDN case, and the drain
//! watches these maps: an evicted pre-move flow would let it tear the tunnel
//! down under a live connection):
//! - `PENDING_FLOWS`: every new flow starts here: a SYN, a datagram one way, a
//!   mid-stream packet of a connection older than the tracking. A flood churns
//!   this map and nothing else.
//! - `FLOWS`: a flow moves here once it is confirmed
//!   ([`FlowValue::is_confirmed`]: established and not closing), which a spoofed
//!   sender can't make happen. Only more real connections than its capacity can
//!   evict one.
//!
//! The pending map is a quarter of the flow map's size by default (Cilium's
//! split of its TCP and other conntrack maps is similar). Each entry is a
//! 40-byte key and a 56-byte value; with the kernel's per-element overhead
//! (`struct htab_elem`, 48 bytes, and rounding) an entry takes about 160 bytes,
//! all preallocated: the default million flows (Cilium's TCP conntrack
//! default) and a quarter million pending take about 200 MB of kernel memory.
//!
//! Entries leave a map in exactly three ways:
//! - a pending flow is confirmed and moves to `FLOWS`
//!   (`Counter::FlowConfirmed`);
//! - userspace deletes them: its sweep removes the entries expired under
//!   [`timeout`] (`Counter::FlowDeleted`, of which
//!   `Counter::FlowDeletedConfirmed` from `FLOWS`);
//! - the kernel evicts them to make room when a new flow is inserted into a
//!   full map. The kernel's LRU evicts in batches (up to 128 entries into a
//!   CPU's free list), possibly before the map is strictly full and even for
//!   an insert that then fails, and tells nobody. So evictions are derived
//!   from what entered and what is present, on every read of the counters
//!   that asks for it (`status`, `flows`, the agent's sweep and status):
//!   `FlowEvicted = created + inserted - deleted - present` over both maps, and
//!   `FlowEvictedConfirmed = confirmed + inserted confirmed -
//!   deleted confirmed - present in FLOWS`, where `created` counts the datapath's new flows
//!   (exact: a successful `BPF_NOEXIST` insert) and `inserted` the flows
//!   userspace put in (a snapshot handed over at switchover). A tracing program
//!   on the kernel's eviction callback (`htab_lru_map_delete_node`) would count
//!   at the moment of eviction, but this machine's kernel refuses to load
//!   tracing programs (EPERM).

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

/// TCP state bits of a flow, after Cilium's conntrack. Set, never cleared.
pub mod state {
    /// A SYN from the peer was seen (the connection opened while tracking).
    pub const SYN_SEEN: u32 = 1 << 0;
    /// A packet without SYN was seen in both directions, or an ACK completed the handshake.
    pub const ESTABLISHED: u32 = 1 << 1;
    /// The peer sent FIN.
    pub const FIN_PEER: u32 = 1 << 2;
    /// The service sent FIN.
    pub const FIN_SERVICE: u32 = 1 << 3;
    /// Either side sent RST.
    pub const RST: u32 = 1 << 4;
    /// A packet from the peer was seen.
    pub const SEEN_FROM_PEER: u32 = 1 << 5;
    /// A packet from the service was seen.
    pub const SEEN_FROM_SERVICE: u32 = 1 << 6;

    /// Both FINs or an RST: the flow is closing.
    pub const fn is_closing(bits: u32) -> bool {
        bits & RST != 0 || bits & (FIN_PEER | FIN_SERVICE) == (FIN_PEER | FIN_SERVICE)
    }
}

/// How a flow entered the map.
pub mod origin {
    /// Recorded at site A in `track` mode: a pre-move flow.
    pub const TRACKED: u8 = 1;
    /// Learned at site B from the tunnel.
    pub const TUNNELLED: u8 = 2;
    /// A NAT flow at site B (`N` <-> `H`).
    pub const NAT: u8 = 3;
    /// First seen at site A after switchover: a client with a stale DNS answer.
    pub const STALE_DNS: u8 = 4;
}

/// Timeouts userspace applies when it sweeps the flow map (Cilium's values
/// for SYN-only and closing; established-idle is configurable).
pub mod timeout {
    /// A flow that has only seen a SYN.
    pub const SYN_ONLY_NS: u64 = 60 * 1_000_000_000;
    /// A flow with both FINs or an RST.
    pub const CLOSING_NS: u64 = 10 * 1_000_000_000;
    /// Default for an established flow that is idle (Cilium's TCP default, 6 h).
    pub const ESTABLISHED_IDLE_DEFAULT_NS: u64 = 21_600 * 1_000_000_000;
    /// Non-TCP flows (UDP, ICMP) idle this long are expired.
    pub const NON_TCP_IDLE_NS: u64 = 60 * 1_000_000_000;
    /// A SYN younger than this may still become a connection (retransmits come at 1
    /// and 3 s); see [`super::FlowValue::holds_drain`].
    pub const HANDSHAKE_NS: u64 = 5 * 1_000_000_000;
    /// A half-closed flow (one FIN) holds the drain only while it still carries
    /// data: idle this long, as long as a closing flow lives, it is taken as over.
    /// The other side's FIN may never come (a client that exits after its FIN,
    /// a server that never closes), and the drain must not wait for it.
    pub const HALF_CLOSED_IDLE_NS: u64 = CLOSING_NS;
}

/// Value of the flow map. Times are `bpf_ktime_get_ns` (CLOCK_MONOTONIC).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowValue {
    pub first_seen_ns: u64,
    pub last_seen_ns: u64,
    pub packets_from_peer: u64,
    pub bytes_from_peer: u64,
    pub packets_to_peer: u64,
    pub bytes_to_peer: u64,
    /// [`state`] bits.
    pub state: u32,
    /// [`origin`] of the entry.
    pub origin: u8,
    pub _pad: [u8; 3],
}

#[cfg(feature = "user")]
// SAFETY: repr(C), integers only, explicit padding.
unsafe impl aya::Pod for FlowValue {}

impl FlowValue {
    /// Whether userspace's sweep at `now_ns` considers the flow expired.
    pub const fn is_expired(&self, protocol: u8, now_ns: u64, established_idle_ns: u64) -> bool {
        let idle = now_ns.saturating_sub(self.last_seen_ns);
        if protocol != crate::net::proto::TCP {
            return idle > timeout::NON_TCP_IDLE_NS;
        }
        let limit = if state::is_closing(self.state) {
            timeout::CLOSING_NS
        } else if self.state & state::ESTABLISHED == 0 {
            timeout::SYN_ONLY_NS
        } else {
            established_idle_ns
        };
        idle > limit
    }

    /// Whether the flow has shown it is a real connection, and so belongs in the
    /// confirmed flow map, out of a flood's reach: established (for TCP, packets
    /// without SYN both ways; for other protocols, packets both ways) and not closing.
    /// A spoofed SYN never gets there: its sender can't complete the handshake, and
    /// the service's RST to a spoofed ACK closes the flow.
    pub const fn is_confirmed(&self) -> bool {
        self.state & state::ESTABLISHED != 0 && !state::is_closing(self.state)
    }

    /// Whether the flow keeps the drain going: a pre-move flow (tracked at A, or handed
    /// over to B) that is still open. For TCP that is an established connection not
    /// closing (both FINs or an RST end it at once; one FIN once the flow is idle for
    /// [`timeout::HALF_CLOSED_IDLE_NS`]), or a handshake seen within
    /// [`timeout::HANDSHAKE_NS`]: a SYN nobody answered is a failed attempt, not a
    /// connection. Other protocols hold it until their timeout. Expiry is the
    /// caller's ([`FlowValue::is_expired`]).
    pub const fn holds_drain(&self, protocol: u8, idle_ns: u64) -> bool {
        if !matches!(self.origin, origin::TRACKED | origin::TUNNELLED) {
            return false;
        }
        if protocol != crate::net::proto::TCP {
            return true;
        }
        if state::is_closing(self.state) {
            return false;
        }
        if self.state & (state::FIN_PEER | state::FIN_SERVICE) != 0 {
            return idle_ns < timeout::HALF_CLOSED_IDLE_NS;
        }
        self.state & state::ESTABLISHED != 0 || idle_ns < timeout::HANDSHAKE_NS
    }
}

/// A 32-bit hash of the flow, the same in eBPF and userspace: it picks the
/// outer UDP source port so receivers with RSS spread tunnelled flows.
/// FNV-1a over the 5-tuple plus a finaliser; cheap and verifier-friendly (fixed length).
#[inline(always)]
pub fn flow_hash(key: &FlowKey) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    let mut i = 0;
    while i < 16 {
        h = (h ^ u32::from(key.service_addr[i])).wrapping_mul(0x0100_0193);
        h = (h ^ u32::from(key.peer_addr[i])).wrapping_mul(0x0100_0193);
        i += 1;
    }
    h = (h ^ u32::from(key.service_port)).wrapping_mul(0x0100_0193);
    h = (h ^ u32::from(key.peer_port)).wrapping_mul(0x0100_0193);
    h = (h ^ u32::from(key.protocol)).wrapping_mul(0x0100_0193);
    // murmur3's finaliser: FNV alone leaves the low bits poorly mixed.
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// The outer UDP source port for a flow: in the dynamic range 49152-65535.
#[inline(always)]
pub fn gue_source_port(key: &FlowKey) -> u16 {
    49152 | (flow_hash(key) & 0x3fff) as u16
}

#[cfg(feature = "user")]
mod user {
    use core::net::IpAddr;

    use super::FlowKey;
    use crate::net::addr;

    impl FlowKey {
        /// Builds a key from the service's and the peer's socket addresses.
        /// Returns `None` when the two are of different families.
        pub fn new(service: (IpAddr, u16), peer: (IpAddr, u16), protocol: u8) -> Option<FlowKey> {
            let (service_addr, service_family) = addr::to_map(service.0);
            let (peer_addr, peer_family) = addr::to_map(peer.0);
            (service_family == peer_family).then_some(FlowKey {
                service_addr,
                peer_addr,
                service_port: service.1.to_be(),
                peer_port: peer.1.to_be(),
                protocol,
                family: service_family,
                _pad: [0; 2],
            })
        }

        /// The service's address and port.
        pub fn service(&self) -> Option<(IpAddr, u16)> {
            Some((
                addr::from_map(self.service_addr, self.family)?,
                u16::from_be(self.service_port),
            ))
        }

        /// The peer's address and port.
        pub fn peer(&self) -> Option<(IpAddr, u16)> {
            Some((
                addr::from_map(self.peer_addr, self.family)?,
                u16::from_be(self.peer_port),
            ))
        }
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
        assert_eq!(core::mem::size_of::<FlowValue>(), 56);
    }

    #[test]
    fn expiry_follows_state() {
        let s = 1_000_000_000u64;
        let est = 3600 * s;
        let mut v = FlowValue {
            last_seen_ns: 0,
            state: state::SYN_SEEN,
            ..Default::default()
        };
        assert!(!v.is_expired(6, 59 * s, est));
        assert!(v.is_expired(6, 61 * s, est));
        v.state |= state::ESTABLISHED;
        assert!(!v.is_expired(6, 61 * s, est));
        assert!(v.is_expired(6, 3601 * s, est));
        v.state |= state::FIN_PEER;
        assert!(!v.is_expired(6, 11 * s, est), "one FIN is not closing");
        v.state |= state::FIN_SERVICE;
        assert!(v.is_expired(6, 11 * s, est));
        let rst = FlowValue {
            state: state::ESTABLISHED | state::RST,
            ..Default::default()
        };
        assert!(rst.is_expired(6, 11 * s, est));
        let udp = FlowValue::default();
        assert!(!udp.is_expired(17, 59 * s, est));
        assert!(udp.is_expired(17, 61 * s, est));
    }

    #[test]
    fn drain_is_held_by_open_premove_flows() {
        let s = 1_000_000_000u64;
        let established = FlowValue {
            origin: origin::TRACKED,
            state: state::SYN_SEEN | state::ESTABLISHED,
            ..Default::default()
        };
        assert!(established.holds_drain(6, 3600 * s));
        let closing = FlowValue {
            state: established.state | state::RST,
            ..established
        };
        assert!(!closing.holds_drain(6, 0));
        let syn = FlowValue {
            state: state::SYN_SEEN,
            ..established
        };
        assert!(syn.holds_drain(6, s));
        assert!(
            !syn.holds_drain(6, 6 * s),
            "an unanswered SYN is not a connection"
        );
        for fin in [state::FIN_PEER, state::FIN_SERVICE] {
            let half_closed = FlowValue {
                state: established.state | fin,
                ..established
            };
            assert!(half_closed.holds_drain(6, 9 * s), "still carrying data");
            assert!(
                !half_closed.holds_drain(6, 11 * s),
                "idle after one FIN: the other may never come"
            );
            let both = FlowValue {
                state: established.state | state::FIN_PEER | state::FIN_SERVICE,
                ..established
            };
            assert!(!both.holds_drain(6, 0), "both FINs end it at once");
        }
        let nat = FlowValue {
            origin: origin::NAT,
            ..established
        };
        assert!(!nat.holds_drain(6, 0));
        let udp = FlowValue {
            origin: origin::TUNNELLED,
            ..Default::default()
        };
        assert!(udp.holds_drain(17, 50 * s));
    }

    #[test]
    fn source_port_is_stable_and_in_dynamic_range() {
        let mut key = FlowKey {
            protocol: 6,
            family: 4,
            ..Default::default()
        };
        let mut seen = [false; 4];
        for port in 0..256u16 {
            key.peer_port = port.to_be();
            let p = gue_source_port(&key);
            assert!(p >= 49152);
            assert_eq!(p, gue_source_port(&key));
            seen[usize::from(p & 3)] = true;
        }
        assert!(seen.iter().all(|s| *s), "ports spread");
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
