//! Recording flows in the flow map: counts, times and TCP state bits.

use aya_ebpf::{bindings::BPF_NOEXIST, helpers::bpf_ktime_get_ns};
use movarto_common::{
    counters::Counter,
    flow::{FlowKey, FlowValue, state},
};

use crate::{
    counters::bump,
    maps::{FLOW_SCRATCH, FLOWS, PENDING_FLOWS},
    parse::{L4, Packet, tcp_flag},
};

/// Which way a packet travels relative to the service.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Peer -> service (arriving on the uplink at A).
    FromPeer,
    /// Service -> peer (sent by the VM).
    ToPeer,
}

/// The flow key of `pkt` seen from the service's side; `None` without ports.
#[inline(always)]
pub fn key_of(pkt: &Packet, dir: Direction) -> Option<FlowKey> {
    if !matches!(pkt.l4, L4::Tcp | L4::Udp) {
        return None;
    }
    Some(tuple_of(pkt, dir))
}

/// The 5-tuple of `pkt` seen from the service's side, ports zero without them: the flow
/// key, and what the tunnel's outer source port is hashed from.
#[inline(always)]
pub fn tuple_of(pkt: &Packet, dir: Direction) -> FlowKey {
    let (service_addr, peer_addr, service_port, peer_port) = match dir {
        Direction::FromPeer => (pkt.dst_addr, pkt.src_addr, pkt.dst_port, pkt.src_port),
        Direction::ToPeer => (pkt.src_addr, pkt.dst_addr, pkt.src_port, pkt.dst_port),
    };
    FlowKey {
        service_addr,
        peer_addr,
        service_port,
        peer_port,
        protocol: pkt.protocol,
        family: pkt.family,
        _pad: [0; 2],
    }
}

/// The origin of the flow `key`, if either map has it.
#[inline(always)]
pub fn origin_of(key: &FlowKey) -> Option<u8> {
    // SAFETY: the value is only read, and only its origin, which is set once at creation.
    FLOWS
        .get_ptr(key)
        .or_else(|| PENDING_FLOWS.get_ptr(key))
        .map(|v| unsafe { (*v).origin })
}

/// Whose word decides a flow's origin when its entry already exists.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The entry's: it keeps the origin it was created with.
    Entry,
    /// The packet's, which says itself what kind of flow it belongs to (traffic to
    /// `N` is NAT by definition). An entry of another origin is an earlier
    /// connection on the same 5-tuple, e.g. a pre-move flow from the client port a
    /// newcomer to `N` now uses; keeping its origin would send the newcomer's
    /// replies into the tunnel.
    Packet,
}

/// Records `pkt` in the flow map, creating the entry with `origin` if needed.
/// Returns the entry's origin, `None` for a packet without ports.
#[inline(always)]
pub fn record(pkt: &Packet, dir: Direction, origin: u8) -> Option<u8> {
    let key = key_of(pkt, dir)?;
    Some(record_key(&key, pkt, dir, origin, Origin::Entry))
}

/// Records `pkt` under `key` (for when the key differs from the packet's own
/// addresses, as after a NAT rewrite), creating the entry with `origin` if
/// needed. An existing entry starts afresh, counted as [`Counter::FlowReused`],
/// when the packet opens a new connection on its 5-tuple: a SYN on a closed
/// flow (which must not inherit the closing bits, or the sweep drops it), or a
/// packet whose `decides` origin differs from the entry's. Returns the entry's
/// origin (the one it had, or `origin`).
#[inline(always)]
pub fn record_key(key: &FlowKey, pkt: &Packet, dir: Direction, origin: u8, decides: Origin) -> u8 {
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    if let Some(value) = FLOWS.get_ptr_mut(key) {
        // SAFETY: a live map value. Updates are plain read-modify-writes: RSS
        // keeps a flow's packets on one CPU per direction, and a rare race
        // between the two directions loses at most one count or a state bit
        // that the next packet sets again.
        let value = unsafe { &mut *value };
        if reopens(value, pkt) || (decides == Origin::Packet && value.origin != origin) {
            start_afresh(value, origin, now);
        }
        update(value, pkt, dir, now);
        return value.origin;
    }
    record_pending(key, pkt, dir, origin, decides)
}

/// Records a flow the confirmed map does not hold: in [`PENDING_FLOWS`], where every
/// new flow starts, and moves it to [`FLOWS`] once the packet confirms it (see
/// [`FlowValue::is_confirmed`]).
#[inline(always)]
fn record_pending(key: &FlowKey, pkt: &Packet, dir: Direction, origin: u8, decides: Origin) -> u8 {
    // SAFETY: no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    if let Some(value) = PENDING_FLOWS.get_ptr_mut(key) {
        // SAFETY: a live map value; the same reasoning as in `record_key`.
        let value = unsafe { &mut *value };
        if reopens(value, pkt) || (decides == Origin::Packet && value.origin != origin) {
            start_afresh(value, origin, now);
        }
        update(value, pkt, dir, now);
        let kept = value.origin;
        if value.is_confirmed() {
            confirm(key, value);
        }
        return kept;
    }
    // The new entry is built in this CPU's scratch slot, not on the stack: the
    // callers' frames leave this function little of the 512 bytes.
    let Some(scratch) = FLOW_SCRATCH.get_ptr_mut(0) else {
        return origin;
    };
    // SAFETY: this CPU's slot of the scratch map. movarto's programs run in
    // softirq context (XDP) or with bottom halves off (TC), so none interrupts
    // another on this CPU while the slot is in use.
    let value = unsafe { &mut *scratch };
    *value = FlowValue {
        first_seen_ns: now,
        origin,
        ..FlowValue::default()
    };
    update(value, pkt, dir, now);
    match PENDING_FLOWS.insert(key, value, u64::from(BPF_NOEXIST)) {
        Ok(()) => bump(Counter::FlowCreated),
        Err(_) => {
            // Another CPU created it first: add this packet to theirs.
            bump(Counter::FlowInsertFailed);
            if let Some(existing) = PENDING_FLOWS.get_ptr_mut(key) {
                // SAFETY: as above.
                update(unsafe { &mut *existing }, pkt, dir, now);
            }
        }
    }
    origin
}

/// Whether `pkt` opens a new connection on a closed flow's 5-tuple: a SYN on a
/// flow that is closing, which must not inherit the closing bits (the sweep would
/// drop it, and a pending flow would never be confirmed).
#[inline(always)]
fn reopens(value: &FlowValue, pkt: &Packet) -> bool {
    matches!(pkt.l4, L4::Tcp)
        && pkt.tcp_flags & (tcp_flag::SYN | tcp_flag::ACK) == tcp_flag::SYN
        && state::is_closing(value.state)
}

/// Moves a pending flow that is now confirmed into [`FLOWS`].
#[inline(always)]
fn confirm(key: &FlowKey, value: &FlowValue) {
    match FLOWS.insert(key, value, u64::from(BPF_NOEXIST)) {
        Ok(()) => {
            bump(Counter::FlowConfirmed);
            let _ = PENDING_FLOWS.remove(key);
        }
        // Another CPU confirmed it first; its entry holds the flow now.
        Err(_) => {
            bump(Counter::FlowInsertFailed);
            let _ = PENDING_FLOWS.remove(key);
        }
    }
}

/// Turns an existing entry into a new flow's. Its own BPF function: inlined, the
/// rewrite multiplies the paths the verifier walks through every caller.
#[inline(never)]
fn start_afresh(value: &mut FlowValue, origin: u8, now: u64) {
    *value = FlowValue {
        first_seen_ns: now,
        origin,
        ..FlowValue::default()
    };
    bump(Counter::FlowReused);
}

#[inline(always)]
fn update(value: &mut FlowValue, pkt: &Packet, dir: Direction, now: u64) {
    let bytes = pkt.ip_len as u64;
    let mut bits = value.state;
    match dir {
        Direction::FromPeer => {
            value.packets_from_peer += 1;
            value.bytes_from_peer += bytes;
            bits |= state::SEEN_FROM_PEER;
        }
        Direction::ToPeer => {
            value.packets_to_peer += 1;
            value.bytes_to_peer += bytes;
            bits |= state::SEEN_FROM_SERVICE;
        }
    }
    let both = state::SEEN_FROM_PEER | state::SEEN_FROM_SERVICE;
    if matches!(pkt.l4, L4::Tcp) {
        let flags = pkt.tcp_flags;
        if flags & tcp_flag::RST != 0 {
            bits |= state::RST;
        }
        if flags & tcp_flag::FIN != 0 {
            bits |= match dir {
                Direction::FromPeer => state::FIN_PEER,
                Direction::ToPeer => state::FIN_SERVICE,
            };
        }
        if flags & tcp_flag::SYN != 0 {
            if dir == Direction::FromPeer && flags & tcp_flag::ACK == 0 {
                bits |= state::SYN_SEEN;
            }
        } else if bits & both == both {
            // Mid-stream packets both ways: also how flows that predate tracking become established.
            bits |= state::ESTABLISHED;
        }
    } else if bits & both == both {
        bits |= state::ESTABLISHED;
    }
    value.state = bits;
    value.last_seen_ns = now;
}
