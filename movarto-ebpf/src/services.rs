//! Which service a packet belongs to: the lookups in `SERVICES`, `ADDRS` and
//! `PEERS` (see `movarto_common::service`). A packet for no service costs these
//! lookups and nothing else.

use movarto_common::{
    config::{Config, Mode},
    counters::Counter,
    gue::GUE_OVERHEAD_IPV4,
    net::{ETH_HLEN, family},
    service::{ANY_PEER, AddrKey, PeerUsers, filter_bucket},
};

use crate::{
    maps::{ADDR_FILTER, ADDRS, PEERS, SERVICES},
    parse::{Packet, bytes},
};

/// Offset of the inner IP header in GUE as movarto sends it (outer IPv4 without
/// options; `tunnel::decapsulate` refuses anything else).
const INNER_IP: usize = ETH_HLEN + GUE_OVERHEAD_IPV4;
/// Where GUE's proto field is: 4 (IPv4) or 41 (IPv6) inside.
const GUE_PROTO: usize = ETH_HLEN + 20 + 8 + 1;

/// The service whose home address is `addr`.
#[inline(always)]
fn by_home(addr: &[u8; 16], fam: u8) -> Option<&'static Config> {
    let key = AddrKey::new(*addr, fam);
    // SAFETY: a map value stays valid while the program runs; userspace replaces
    // entries whole, so a reader sees the old service or the new one.
    unsafe { SERVICES.get(key) }
}

/// Uplink: the service the destination belongs to, as its `H` or its `N`. A packet
/// for no service is told by the address filter's empty bucket, one inlined array
/// read; one whose bucket is taken by another address costs one miss, in `ADDRS`.
#[inline(never)]
pub fn of_destination(pkt: &Packet) -> Option<&'static Config> {
    if ADDR_FILTER
        .get(filter_bucket(&pkt.dst_addr))
        .is_none_or(|count| *count == 0)
    {
        return None;
    }
    let key = AddrKey::new(pkt.dst_addr, pkt.family);
    // SAFETY: as in `by_home`.
    let home = unsafe { ADDRS.get(key) }?;
    // SAFETY: as in `by_home`.
    unsafe { SERVICES.get(home) }
}

/// VM-facing: the service the source belongs to (the VM's `H`).
#[inline(never)]
pub fn of_source(pkt: &Packet) -> Option<&'static Config> {
    by_home(&pkt.src_addr, pkt.family)
}

/// The services tunnelling with `addr`, if it is some service's peer endpoint: GUE
/// from it is this node's tunnel, to be verified; GUE from anyone else is left to
/// the kernel.
#[inline(never)]
pub fn peer(addr: &[u8; 16]) -> Option<&'static PeerUsers> {
    let key = AddrKey::new(*addr, family::IPV4);
    // SAFETY: as in `by_home`.
    unsafe { PEERS.get(key) }
}

/// Whether `addr` is some service's peer endpoint (see [`peer`]).
#[inline(always)]
pub fn is_peer(addr: &[u8; 16]) -> bool {
    peer(addr).is_some()
}

/// Whether some service tunnels (see `movarto_common::service::ANY_PEER`): only then
/// is UDP to this node's GUE endpoint and port its tunnel, or a stranger's GUE.
#[inline(never)]
pub fn any_tunnel() -> bool {
    PEERS.get_ptr(ANY_PEER).is_some()
}

/// GUE from a peer: the service its inner packet belongs to, by the inner
/// destination (site B's `receive` and `direct` unwrap packets to `H`) or the inner
/// source (site A's `forward` unwraps the VM's replies); the source first when every
/// service of that peer here forwards (`sources_first`), so site A takes one lookup.
/// `None` if it is for no service that tunnels here, or its addresses can't be read;
/// the caller drops it.
#[inline(never)]
pub fn of_tunnelled(data: usize, data_end: usize, sources_first: bool) -> Option<&'static Config> {
    let proto = bytes::<1>(data, data_end, GUE_PROTO).ok()?[0];
    let (fam, src, dst) = if proto == 41 {
        let h = bytes::<40>(data, data_end, INNER_IP).ok()?;
        let mut src = [0u8; 16];
        let mut dst = [0u8; 16];
        src.copy_from_slice(&h[8..24]);
        dst.copy_from_slice(&h[24..40]);
        (family::IPV6, src, dst)
    } else {
        let h = bytes::<20>(data, data_end, INNER_IP).ok()?;
        (family::IPV4, v4_layout(&h[12..16]), v4_layout(&h[16..20]))
    };
    // The handler checks the direction against the mode (a packet to `H` at A
    // is malformed GUE); this only finds whose packet it is.
    let (first, second) = if sources_first {
        (&src, &dst)
    } else {
        (&dst, &src)
    };
    if let Some(cfg) = by_home(first, fam).filter(|cfg| tunnels(cfg)) {
        return Some(cfg);
    }
    by_home(second, fam).filter(|cfg| tunnels(cfg))
}

/// An IPv4 address (4 bytes) in the 16-byte layout, as one wide value: zeroing
/// an array and copying 4 bytes in makes LLVM call the BPF `memset`, a
/// byte-by-byte loop, on every tunnelled packet.
#[inline(always)]
fn v4_layout(addr: &[u8]) -> [u8; 16] {
    let word = match addr {
        [a, b, c, d] => u32::from_le_bytes([*a, *b, *c, *d]),
        _ => 0,
    };
    u128::from(word).to_le_bytes()
}

/// Whether the service's mode carries the tunnel.
#[inline(always)]
fn tunnels(cfg: &Config) -> bool {
    cfg.mode().is_some_and(Mode::uses_tunnel)
}

/// Why GUE from a peer that belongs to no service here is dropped: its inner
/// packet can't be read where [`of_tunnelled`] reads it, or it is for a service
/// that does not tunnel with that peer. A counter index.
#[inline(never)]
pub fn unknown_reason(data: usize, data_end: usize) -> u32 {
    let readable = match bytes::<1>(data, data_end, GUE_PROTO) {
        Ok(proto) if proto[0] == 41 => bytes::<40>(data, data_end, INNER_IP).is_ok(),
        Ok(_) => bytes::<20>(data, data_end, INNER_IP).is_ok(),
        Err(_) => false,
    };
    if readable {
        Counter::DropGueWrongService as u32
    } else {
        Counter::DropGueMalformed as u32
    }
}
