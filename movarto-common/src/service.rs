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
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AddrKey {
    pub addr: [u8; 16],
    /// [`crate::net::family`].
    pub family: u8,
    pub _pad: [u8; 3],
}

impl AddrKey {
    pub const fn new(addr: [u8; 16], family: u8) -> Self {
        Self {
            addr,
            family,
            _pad: [0; 3],
        }
    }
}

/// How many services tunnel with one peer: the value of `PEERS`. While some service
/// tunnels, GUE to this node's endpoint from an address in `PEERS` is this node's
/// tunnel and is verified; from any other it is left to the kernel and counted.
pub type PeerUsers = u32;

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
    }
}
