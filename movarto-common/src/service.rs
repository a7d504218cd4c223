//! The services of a node: one entry per VM's home address `H` in `SERVICES`
//! (its [`crate::config::Config`]), its `H` and its new address `N` in `ADDRS`, its
//! peer's tunnel endpoint in `PEERS`, and its row of `SERVICE_COUNTERS`.
//!
//! Userspace keeps the four consistent: it writes a service's counters, peer and
//! address entries before the service itself and removes the service first, so the
//! programs never find half a service.

use crate::counters::COUNTER_COUNT;

/// Services per uplink unless `attach --services` says otherwise. The maps are
/// hash maps sized at load time; a full map refuses a new service.
pub const SERVICES_DEFAULT_CAPACITY: u32 = 4096;

/// An address as the services, NAT and peers maps key it: `H`, `N` or a tunnel
/// endpoint in the 16-byte layout of [`crate::flow::FlowKey`], with its family, so
/// an IPv4 address never matches an IPv6 one with the same first bytes.
///
/// Aligned to 4 so the eBPF programs copy an address into a key a word at a time,
/// and write the family and padding as one word (see [`AddrKey::new`]).
#[repr(C, align(4))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AddrKey {
    pub addr: [u8; 16],
    /// [`crate::net::family`].
    pub family: u8,
    pub _pad: [u8; 3],
}

impl AddrKey {
    pub const fn new(addr: [u8; 16], family: u8) -> Self {
        /// `AddrKey` with its family and padding as one word: written field by field,
        /// the zeroed padding becomes a call to the BPF `memset`, a byte-by-byte loop,
        /// in every lookup by address.
        #[repr(C, align(4))]
        struct Words {
            addr: [u8; 16],
            tail: u32,
        }
        let words = Words {
            addr,
            tail: u32::from_ne_bytes([family, 0, 0, 0]),
        };
        // SAFETY: the same size (20) and alignment (4), and every byte initialised;
        // `tail`'s bytes in memory are the family and three zeros, as in `AddrKey`.
        unsafe { core::mem::transmute::<Words, AddrKey>(words) }
    }
}

/// How many services tunnel with one peer: the value of `PEERS`. While some service
/// tunnels, GUE to this node's endpoint from an address in `PEERS` is this node's
/// tunnel and is verified; from any other it is left to the kernel and counted.
///
/// Split by role so the program knows where to look for the inner packet's service:
/// a site A (`forward`) unwraps its VMs' replies, whose service is the inner source;
/// every other tunnelling mode unwraps packets to `H`, the inner destination.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerUsers {
    /// Services in `forward` mode with this peer.
    pub forwarding: u32,
    /// Services in another tunnelling mode (`receive`, `direct`) with this peer.
    pub others: u32,
}

impl PeerUsers {
    /// Every service that tunnels with this peer.
    pub const fn total(&self) -> u32 {
        self.forwarding.saturating_add(self.others)
    }

    /// Whether every service of this peer is a site A: its GUE carries packets from
    /// an `H`, so the inner source is looked up first.
    pub const fn only_forwarding(&self) -> bool {
        self.others == 0
    }
}

/// Buckets of [`ADDR_FILTER_BUCKETS`]: a counting filter of every service address
/// (`H` and `N`), so a packet for no service is told apart by one array read, which
/// the kernel inlines, before any hash lookup. A bucket counts the addresses that fold
/// to it; 0 means no service address does. Fixed size: with 4096 services (8192
/// addresses) about one bucket in eight is taken, and a packet that falls in a taken
/// bucket only costs the `ADDRS` lookup it costs without the filter.
pub const ADDR_FILTER_BUCKETS: u32 = 1 << 16;

/// The bucket of the filter (see [`ADDR_FILTER_BUCKETS`]) that `addr` (16-byte layout,
/// IPv4 in the first four) folds to: the XOR of its 16-bit words, so the host part of
/// an IPv4 address and every word of an IPv6 one move it.
#[inline(always)]
pub const fn filter_bucket(addr: &[u8; 16]) -> u32 {
    let mut fold = 0u16;
    let mut i = 0;
    while i < 16 {
        fold ^= u16::from_be_bytes([addr[i], addr[i + 1]]);
        i += 2;
    }
    fold as u32
}

/// The key of `PEERS` under which userspace counts every tunnelling service, of any
/// peer (no address has family 0): present while the node tunnels at all.
pub const ANY_PEER: AddrKey = AddrKey::new([0; 16], 0);

/// One service's verdict and drop counters (a row of the per-CPU `SERVICE_COUNTERS`,
/// indexed by [`crate::config::Config::slot`]), by [`crate::counters::Counter`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceCounters {
    pub counts: [u64; COUNTER_COUNT as usize],
}

impl Default for ServiceCounters {
    fn default() -> Self {
        Self {
            counts: [0; COUNTER_COUNT as usize],
        }
    }
}

#[cfg(feature = "user")]
// SAFETY: repr(C), integers and byte arrays only, padding explicit.
unsafe impl aya::Pod for AddrKey {}

#[cfg(feature = "user")]
// SAFETY: repr(C), an array of integers.
unsafe impl aya::Pod for ServiceCounters {}

#[cfg(feature = "user")]
// SAFETY: repr(C), two u32s, no padding.
unsafe impl aya::Pod for PeerUsers {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_is_fixed() {
        assert_eq!(core::mem::size_of::<AddrKey>(), 20);
        assert_eq!(
            core::mem::size_of::<ServiceCounters>(),
            8 * COUNTER_COUNT as usize
        );
        assert_eq!(core::mem::size_of::<PeerUsers>(), 8);
    }

    #[test]
    fn filter_buckets_spread_neighbouring_addresses() {
        let v4 = |last: u8| {
            let mut a = [0u8; 16];
            a[..4].copy_from_slice(&[192, 0, 2, last]);
            a
        };
        assert_ne!(filter_bucket(&v4(10)), filter_bucket(&v4(11)));
        // IPv4 192.0.2.10: 0xc000 ^ 0x020a.
        assert_eq!(filter_bucket(&v4(10)), 0xc20a);
        let mut v6 = [0u8; 16];
        v6[..4].copy_from_slice(&[0x20, 0x01, 0x0d, 0xb8]);
        let mut buckets = [0u32; 4096];
        for (i, bucket) in buckets.iter_mut().enumerate() {
            v6[12..14].copy_from_slice(&(i as u16).to_be_bytes());
            *bucket = filter_bucket(&v6);
        }
        buckets.sort_unstable();
        assert!(
            buckets.windows(2).all(|w| w[0] != w[1]),
            "consecutive IPv6 addresses share buckets"
        );
        assert!(buckets.iter().all(|b| *b < ADDR_FILTER_BUCKETS));
    }
}
