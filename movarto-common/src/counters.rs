//! The datapath's per-CPU counters: one slot per verdict and per drop reason.
//!
//! Every packet a program sees increments [`Counter::Packets`], exactly one
//! verdict counter (`Pass*`, `Tunnel*` or `Drop*`), and for IP packets one L4 class
//! counter; event counters (`Flow*`, `MssClamped`, `NatOut`) count what was done to it.
//! [`Counter::FlowDeleted`] and [`Counter::FlowEvicted`] are userspace's
//! bookkeeping of the flow map, kept here so all counters are in one place.
//! Userspace sums the per-CPU slots.

/// Index into the `COUNTERS` per-CPU array.
///
/// With the `user` feature it is also the wire form: serde uses [`Counter::name`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[cfg_attr(feature = "user", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "user", serde(rename_all = "snake_case"))]
pub enum Counter {
    /// Every packet seen by any movarto program.
    Packets = 0,
    /// Verdict: passed, not IPv4 or IPv6 (ARP, LLDP, ...).
    PassNonIp,
    /// Verdict: passed, well-formed IPv4.
    PassIpv4,
    /// Verdict: passed, well-formed IPv6.
    PassIpv6,
    /// Class: TCP with a complete header.
    L4Tcp,
    /// Class: UDP with a complete header.
    L4Udp,
    /// Class: ICMP or ICMPv6 with a complete header.
    L4Icmp,
    /// Class: another transport protocol (no ports to read).
    L4Other,
    /// Class: a non-first IP fragment, which carries no transport header.
    L4Fragment,
    /// Drop: a header runs past the end of the frame or past the IP length.
    DropTruncated,
    /// Drop: an IP header that is wrong in itself (version, IHL, total length).
    DropBadIpHeader,
    /// Drop: a transport header that is wrong in itself (TCP data offset).
    DropBadL4Header,
    /// Drop: more IPv6 extension headers than the parser walks.
    DropIpv6ExtChain,
    /// Flow map: a new flow was recorded.
    FlowCreated,
    /// Flow map: an insert failed (another CPU raced us, or the map refused).
    FlowInsertFailed,
    /// The MSS option of a SYN or SYN-ACK was lowered to fit the tunnel.
    MssClamped,
    /// Verdict: encapsulated in GUE and sent to the peer site.
    TunnelOut,
    /// Verdict: GUE from the peer site, decapsulated and sent on.
    TunnelIn,
    /// Verdict: UDP to our GUE endpoint and port from an address that is not
    /// the peer site. It is not this node's tunnel, so it is left to the kernel
    /// untouched, as if movarto were not attached (nothing listens there, so the
    /// kernel drops it); it never reaches a VM.
    PassGueForeignSource,
    /// Drop: GUE from the peer site without this migration's token (or with a
    /// zero token configured, which authenticates nothing).
    DropGueBadToken,
    /// Drop: GUE that is not movarto's format (version, hlen, flags, proto,
    /// outer IPv4 options or fragments, a UDP length that disagrees with the
    /// outer or the inner packet, or an inner packet that fails to parse).
    DropGueMalformed,
    /// Drop: the encapsulated packet would exceed the tunnel MTU and no ICMP
    /// is sent for it: a frame too short to quote, or a (non-GSO) packet the
    /// VM sends at site B, which TC can't answer.
    DropTooBig,
    /// Drop: no route, or the route's neighbour is not resolved yet.
    DropNoRoute,
    /// Drop: growing or shrinking the packet failed.
    DropResizeFailed,
    /// Verdict: to `N`, rewritten to `H` and delivered to the VM (site B).
    NatIn,
    /// From `H` on a NAT flow, source rewritten to `N` (site B); then passed.
    NatOut,
    /// Verdict: too big for the tunnel, answered with ICMP fragmentation-needed
    /// (IPv4) or ICMPv6 packet-too-big (IPv6).
    IcmpTooBig,
    /// Flow map: entries userspace deleted (its sweep). Written by
    /// userspace, not the datapath, into the first CPU's slot.
    FlowDeleted,
    /// Flow map: entries the kernel's LRU evicted to make room for new flows,
    /// from either map, as of userspace's last read of the maps. The LRU evicts
    /// silently, in batches, and even for an insert that then fails, so the
    /// datapath can't count it; userspace derives it from the only other ways
    /// an entry comes and leaves: `flow_created + flow_inserted -
    /// flow_deleted - entries present` (see `flow`). Written by userspace into the first
    /// CPU's slot at each sweep and each read that asks (`status`, `flows`);
    /// it never decreases, never over-counts, and is exact when no packet
    /// creates a flow during the read (otherwise it catches up at the next
    /// one). The sweep removes expired entries, so an evicted entry was live,
    /// or had expired only since the last sweep.
    FlowEvicted,
    /// Verdict: a packet the parser rejects (truncated, bad header, long IPv6
    /// extension chain) that is addressed to no service: left to the kernel
    /// untouched, which decides on it as it would without movarto.
    PassMalformed,
    /// Drop (site B, `receive` and `nat`): a packet for `H` that did not come
    /// through the tunnel. Only GUE from the service's peer with its token may
    /// reach `H`; traffic from the Internet reaches the VM through `N`.
    DropNotTunnelled,
    /// Verdict (site A, `forward`): a packet for `H` whose TTL or hop limit
    /// would expire here, answered with ICMP time-exceeded as a router does.
    IcmpTimeExceeded,
    /// Drop (site A, `forward`): a packet whose TTL or hop limit expires at A
    /// and that gets no answer: one from the tunnel (no ICMP goes back into
    /// the tunnel), or one for `H` that a router may not answer (an ICMP error,
    /// a non-first fragment).
    DropTtlExceeded,
    /// An IPv4 packet without DF too big for the tunnel. XDP cannot fragment,
    /// so it is answered with frag-needed like a DF packet (also counted under
    /// [`Counter::IcmpTooBig`]); the sender then fragments at the source.
    TooBigNoDf,
    /// Flow map: an entry replaced by a new flow with the same key: a
    /// connection to `N` at B from a client port a pre-move flow used, or a
    /// SYN on the 5-tuple of a closed connection.
    FlowReused,
    /// Flow map: a pending flow was confirmed (established, not closing) and
    /// moved into the confirmed map, out of a flood's reach (see `flow`).
    FlowConfirmed,
    /// Flow map: flows userspace inserted (the snapshot handed over at
    /// switchover), into either map. Written by userspace.
    FlowInserted,
    /// Flow map: of [`Counter::FlowInserted`], those that went into the
    /// confirmed map. Written by userspace.
    FlowInsertedConfirmed,
    /// Flow map: of [`Counter::FlowDeleted`], those deleted from the confirmed
    /// map. Written by userspace.
    FlowDeletedConfirmed,
    /// Flow map: of [`Counter::FlowEvicted`], confirmed flows the LRU evicted:
    /// only more real connections than the map holds can cause one. Derived by
    /// userspace like [`Counter::FlowEvicted`].
    FlowEvictedConfirmed,
    /// Drop: GUE from one service's peer, with a packet for a service that does not
    /// tunnel with that peer (another tenant's, or none that tunnels here). Each
    /// service's peer and token vouch for that service's packets only.
    DropGueWrongService,
}

/// Number of slots in the counter array.
pub const COUNTER_COUNT: u32 = Counter::DropGueWrongService as u32 + 1;

impl Counter {
    /// Every counter, in index order.
    pub const ALL: [Counter; COUNTER_COUNT as usize] = [
        Counter::Packets,
        Counter::PassNonIp,
        Counter::PassIpv4,
        Counter::PassIpv6,
        Counter::L4Tcp,
        Counter::L4Udp,
        Counter::L4Icmp,
        Counter::L4Other,
        Counter::L4Fragment,
        Counter::DropTruncated,
        Counter::DropBadIpHeader,
        Counter::DropBadL4Header,
        Counter::DropIpv6ExtChain,
        Counter::FlowCreated,
        Counter::FlowInsertFailed,
        Counter::MssClamped,
        Counter::TunnelOut,
        Counter::TunnelIn,
        Counter::PassGueForeignSource,
        Counter::DropGueBadToken,
        Counter::DropGueMalformed,
        Counter::DropTooBig,
        Counter::DropNoRoute,
        Counter::DropResizeFailed,
        Counter::NatIn,
        Counter::NatOut,
        Counter::IcmpTooBig,
        Counter::FlowDeleted,
        Counter::FlowEvicted,
        Counter::PassMalformed,
        Counter::DropNotTunnelled,
        Counter::IcmpTimeExceeded,
        Counter::DropTtlExceeded,
        Counter::TooBigNoDf,
        Counter::FlowReused,
        Counter::FlowConfirmed,
        Counter::FlowInserted,
        Counter::FlowInsertedConfirmed,
        Counter::FlowDeletedConfirmed,
        Counter::FlowEvictedConfirmed,
        Counter::DropGueWrongService,
    ];

    /// Stable snake_case name, used in `status` output and JSON.
    pub const fn name(self) -> &'static str {
        match self {
            Counter::Packets => "packets",
            Counter::PassNonIp => "pass_non_ip",
            Counter::PassIpv4 => "pass_ipv4",
            Counter::PassIpv6 => "pass_ipv6",
            Counter::L4Tcp => "l4_tcp",
            Counter::L4Udp => "l4_udp",
            Counter::L4Icmp => "l4_icmp",
            Counter::L4Other => "l4_other",
            Counter::L4Fragment => "l4_fragment",
            Counter::DropTruncated => "drop_truncated",
            Counter::DropBadIpHeader => "drop_bad_ip_header",
            Counter::DropBadL4Header => "drop_bad_l4_header",
            Counter::DropIpv6ExtChain => "drop_ipv6_ext_chain",
            Counter::FlowCreated => "flow_created",
            Counter::FlowInsertFailed => "flow_insert_failed",
            Counter::MssClamped => "mss_clamped",
            Counter::TunnelOut => "tunnel_out",
            Counter::TunnelIn => "tunnel_in",
            Counter::PassGueForeignSource => "pass_gue_foreign_source",
            Counter::DropGueBadToken => "drop_gue_bad_token",
            Counter::DropGueMalformed => "drop_gue_malformed",
            Counter::DropTooBig => "drop_too_big",
            Counter::DropNoRoute => "drop_no_route",
            Counter::DropResizeFailed => "drop_resize_failed",
            Counter::NatIn => "nat_in",
            Counter::NatOut => "nat_out",
            Counter::IcmpTooBig => "icmp_too_big",
            Counter::FlowDeleted => "flow_deleted",
            Counter::FlowEvicted => "flow_evicted",
            Counter::PassMalformed => "pass_malformed",
            Counter::DropNotTunnelled => "drop_not_tunnelled",
            Counter::IcmpTimeExceeded => "icmp_time_exceeded",
            Counter::DropTtlExceeded => "drop_ttl_exceeded",
            Counter::TooBigNoDf => "too_big_no_df",
            Counter::FlowReused => "flow_reused",
            Counter::FlowConfirmed => "flow_confirmed",
            Counter::FlowInserted => "flow_inserted",
            Counter::FlowInsertedConfirmed => "flow_inserted_confirmed",
            Counter::FlowDeletedConfirmed => "flow_deleted_confirmed",
            Counter::FlowEvictedConfirmed => "flow_evicted_confirmed",
            Counter::DropGueWrongService => "drop_gue_wrong_service",
        }
    }

    /// The counter of a [`Counter::name`]; `None` for a name this build doesn't know.
    pub fn from_name(name: &str) -> Option<Counter> {
        Counter::ALL.into_iter().find(|c| c.name() == name)
    }

    /// Whether this counter is a drop reason.
    pub const fn is_drop(self) -> bool {
        matches!(
            self,
            Counter::DropTruncated
                | Counter::DropBadIpHeader
                | Counter::DropBadL4Header
                | Counter::DropIpv6ExtChain
                | Counter::DropGueBadToken
                | Counter::DropGueMalformed
                | Counter::DropTooBig
                | Counter::DropNoRoute
                | Counter::DropResizeFailed
                | Counter::DropNotTunnelled
                | Counter::DropTtlExceeded
                | Counter::DropGueWrongService
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_is_in_index_order_and_names_are_unique() {
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(*c as usize, i, "{c:?} out of order");
        }
        for a in Counter::ALL {
            let same = Counter::ALL.iter().filter(|b| b.name() == a.name()).count();
            assert_eq!(same, 1, "duplicate name {}", a.name());
        }
        assert_eq!(Counter::ALL.iter().filter(|c| c.is_drop()).count(), 12);
        for c in Counter::ALL {
            assert_eq!(Counter::from_name(c.name()), Some(c));
        }
        assert_eq!(Counter::from_name("no_such_counter"), None);
    }

    #[cfg(feature = "user")]
    #[test]
    fn serde_names_are_the_stable_names() {
        extern crate std;
        use std::format;
        for c in Counter::ALL {
            let json = serde_json::to_string(&c).expect("serialize");
            assert_eq!(json, format!("\"{}\"", c.name()));
            let back: Counter = serde_json::from_str(&json).expect("deserialize");
            assert_eq!(back, c);
        }
    }
}
