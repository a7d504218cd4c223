//! `movarto-user monitor`: the datapath's verdicts as they happen, through a BPF ring
//! buffer, the habit of `cilium monitor --type drop`.
//!
//! Costs, in one place:
//! - Nobody listening: the verdicts movarto gives itself (a drop, a tunnel, a NAT, an
//!   ICMP answer) read [`MonitorControl`] and see `until_ns == 0`: one array lookup and
//!   a compare. Packets left to the kernel (every other tenant's) never look.
//! - Listening: a per-CPU sample counter, a per-CPU rate limit, a filter on the
//!   service, and a 72-byte reservation in the ring buffer.
//!
//! A listener that dies without clearing the control costs nothing for long: the
//! control holds a deadline (`bpf_ktime_get_ns`, CLOCK_MONOTONIC) that the listener
//! renews every [`RENEW_EVERY_MS`]; past it, the programs stop emitting.

/// What kind of verdict an event is; also the bits of [`MonitorControl::types`].
pub mod kind {
    /// A packet movarto dropped (any `drop_*` counter).
    pub const DROP: u8 = 1 << 0;
    /// Encapsulated into the tunnel, or decapsulated out of it.
    pub const TUNNEL: u8 = 1 << 1;
    /// Rewritten from `N` to `H` (in) or from `H` to `N` (out).
    pub const NAT: u8 = 1 << 2;
    /// Answered with ICMP (too big, time exceeded) instead of being sent on.
    pub const ICMP: u8 = 1 << 3;
    /// Every kind.
    pub const ALL: u8 = DROP | TUNNEL | NAT | ICMP;
}

/// Which program saw the packet.
pub mod hook {
    /// XDP on the uplink.
    pub const UPLINK: u8 = 0;
    /// TC on the VM-facing interface.
    pub const VM: u8 = 1;
}

/// How often the listener renews its deadline; the deadline is three renewals away.
pub const RENEW_EVERY_MS: u64 = 1_000;

/// The kind of a packet sent or passed on under the verdict or event `counter` (the
/// raw index of [`crate::counters::Counter`]); 0 for one that is not monitored.
#[inline(always)]
pub const fn kind_of(counter: u32) -> u8 {
    use crate::counters::Counter;
    match counter {
        c if c == Counter::TunnelOut as u32 || c == Counter::TunnelIn as u32 => kind::TUNNEL,
        c if c == Counter::NatIn as u32 || c == Counter::NatOut as u32 => kind::NAT,
        c if c == Counter::IcmpTooBig as u32 || c == Counter::IcmpTimeExceeded as u32 => kind::ICMP,
        _ => 0,
    }
}

/// The listener's request, the one entry of `MONITOR_CONTROL`. All zero: nobody listens.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MonitorControl {
    /// Emit until this CLOCK_MONOTONIC time (ns); 0: off.
    pub until_ns: u64,
    /// Emit one in this many monitored verdicts per CPU (0 or 1: every one).
    pub sample_every: u32,
    /// At most this many events per second per CPU (0: no limit).
    pub max_per_second: u32,
    /// The [`kind`] bits to emit.
    pub types: u8,
    /// The service's address family (`crate::net::family`), 0: every service.
    pub service_family: u8,
    pub _pad: [u8; 6],
    /// Only packets from or to this address (the service's `H`, or its `N`).
    pub service_addr: [u8; 16],
}

/// One CPU's bookkeeping, the entry of the per-CPU `MONITOR_STATE`: what the
/// listener is told at the end (emitted, and why the others were not).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MonitorState {
    /// Monitored verdicts of the listened-for types and service.
    pub seen: u64,
    /// Written into the ring buffer.
    pub emitted: u64,
    /// Left out by the sampling.
    pub sampled_out: u64,
    /// Left out by the rate limit.
    pub rate_limited: u64,
    /// Left out because the ring buffer was full (the listener is behind).
    pub ring_full: u64,
    /// Start of the current one-second window of the rate limit.
    pub window_start_ns: u64,
    /// Events emitted in the current window.
    pub window_count: u64,
}

/// One verdict, as written into the `MONITOR_EVENTS` ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MonitorEvent {
    /// CLOCK_MONOTONIC, ns.
    pub time_ns: u64,
    /// The verdict, drop reason or event: a [`crate::counters::Counter`] index.
    pub counter: u32,
    /// The interface the packet came in on.
    pub ifindex: u32,
    /// The frame's length in bytes.
    pub frame_len: u32,
    /// [`kind`].
    pub kind: u8,
    /// [`hook`].
    pub hook: u8,
    /// `crate::net::family`; 0 when the IP header could not be read.
    pub family: u8,
    /// IP protocol number.
    pub protocol: u8,
    /// Ports as on the wire (network byte order); zero without ports.
    pub src_port: u16,
    pub dst_port: u16,
    /// TCP flags byte; zero otherwise.
    pub tcp_flags: u8,
    pub _pad: [u8; 7],
    /// Addresses in the flow key's 16-byte layout (IPv4 in the first 4 bytes).
    pub src_addr: [u8; 16],
    pub dst_addr: [u8; 16],
}

#[cfg(feature = "user")]
// SAFETY: plain `repr(C)` data with explicit padding; every bit pattern is valid.
unsafe impl aya::Pod for MonitorControl {}
#[cfg(feature = "user")]
// SAFETY: as above.
unsafe impl aya::Pod for MonitorState {}
#[cfg(feature = "user")]
// SAFETY: as above.
unsafe impl aya::Pod for MonitorEvent {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::counters::Counter;

    #[test]
    fn layouts_are_fixed() {
        assert_eq!(core::mem::size_of::<MonitorEvent>(), 72);
        assert_eq!(core::mem::size_of::<MonitorControl>(), 40);
        assert_eq!(core::mem::size_of::<MonitorState>(), 56);
    }

    #[test]
    fn every_sent_verdict_has_a_kind_and_passes_have_none() {
        assert_eq!(kind_of(Counter::TunnelOut as u32), kind::TUNNEL);
        assert_eq!(kind_of(Counter::TunnelIn as u32), kind::TUNNEL);
        assert_eq!(kind_of(Counter::NatIn as u32), kind::NAT);
        assert_eq!(kind_of(Counter::NatOut as u32), kind::NAT);
        assert_eq!(kind_of(Counter::IcmpTooBig as u32), kind::ICMP);
        assert_eq!(kind_of(Counter::IcmpTimeExceeded as u32), kind::ICMP);
        assert_eq!(kind_of(Counter::PassIpv4 as u32), 0);
        assert_eq!(kind_of(Counter::PassGueForeignSource as u32), 0);
    }
}
