//! Mode `forward` at site A (from switchover): everything for `H` goes to
//! `TB` in GUE; GUE from `TB` is unwrapped and routed out from `H`.
//!
//! Site B is in `forward` too when the VM moves back to A before the drain ended
//! (mode `return` there): traffic to its `N` goes to A in GUE as well, DNATed to
//! `H` as a NAT flow, and A's tunnelled replies on NAT flows leave as `N` again.
//! A packet for `H` that comes through the tunnel is for a VM arriving here (A
//! still in `forward` while the VM resumes): it is delivered to the VM.
//!
//! A is a router on both paths, as its kernel was when it routed `H` to the
//! VM: the TTL (IPv4) or hop limit (IPv6) of the inner packet is decremented
//! once, at A, and B delivers without touching it, so the VM and the
//! clients see what they saw before the move.

use core::ffi::c_void;

use aya_ebpf::programs::XdpContext;
use movarto_common::{
    config::Config,
    counters::Counter,
    flow::origin,
    gue::{GUE_OVERHEAD_IPV4, clamped_mss},
    net::{ETH_HLEN, ICMP_HLEN, family},
    ttl,
};

use crate::{
    counters,
    flows::{self, Direction, Origin},
    icmp::{self, Message},
    link_local, mss, nat,
    outcome::Outcome,
    parse::{self, bytes, bytes_mut},
    receive, route, tunnel,
};

const NO_ADDR: [u8; 16] = [0; 16];

/// IPv4 "don't fragment" in the flags byte (offset 6 of the header).
const IPV4_DF: u8 = 0x40;

/// Uplink ingress, anything but our GUE: traffic for `H` goes into the tunnel.
#[inline(always)]
pub fn to_tunnel(ctx: &XdpContext, cfg: &Config, pkt: &parse::Packet) -> Result<Outcome, Counter> {
    if pkt.family != cfg.service_family || !(pkt.dst_addr == cfg.home_addr || to_new(cfg, pkt)) {
        return Ok(Outcome::Pass);
    }
    // ND and link-local/multicast traffic is this link's, even for `H`.
    if link_local::stays_on_link(ctx.data(), ctx.data_end(), pkt) {
        return Ok(Outcome::Pass);
    }
    // As a router, the TTL check comes before anything else; the packet
    // never reaches the VM, so it is not the flow's.
    if ttl::expires(hop_limit(ctx, pkt)?) {
        return time_exceeded(ctx, pkt);
    }
    record_to_tunnel(cfg, pkt);
    // A newcomer's connection runs through the tunnel all its life: clamp its
    // SYN's MSS as tracking does, so the VM's segments fit the tunnel.
    if matches!(pkt.l4, parse::L4::Tcp) && mss::is_syn(pkt) {
        mss::clamp_xdp(
            ctx.data(),
            ctx.data_end(),
            pkt,
            clamped_mss(cfg.tunnel_mtu, pkt.family == family::IPV6),
        );
    }
    if !tunnel::fits(cfg, pkt, 0) {
        // XDP turns one packet into one packet: it cannot fragment a DF-clear
        // one. Frag-needed makes the sender fragment at the source instead
        // (it lowers its path MTU for `H` whatever the socket's DF setting).
        if pkt.family == family::IPV4 && !dont_fragment(ctx)? {
            counters::bump(Counter::TooBigNoDf);
        }
        // Quoted as it arrived, before the decrement, as a router does.
        let action = icmp::answer_xdp(
            ctx,
            pkt.family,
            pkt.ip_len,
            Message::too_big(pkt.family, cfg.tunnel_mtu),
        )?;
        return Ok(Outcome::Sent(action, Counter::IcmpTooBig));
    }
    if !decrement(ctx, pkt)? {
        return Err(Counter::DropTtlExceeded);
    }
    // The VM, wherever it runs now, knows only `H`. Asked again here, not kept from
    // the start: a flag live across the whole path doubles the verifier's walk.
    if to_new(cfg, pkt) {
        nat::dnat_xdp(ctx, pkt, cfg)?;
    }
    tunnel::encapsulate(ctx, cfg, pkt, Direction::FromPeer)?;
    let hop = route::lookup(
        ctx.ctx as *mut c_void,
        family::IPV4,
        &cfg.local_tunnel_addr,
        &cfg.peer_tunnel_addr,
        uplink(ctx, cfg),
        (GUE_OVERHEAD_IPV4 + pkt.ip_len) as u16,
        route::Lookup::Output,
    )?;
    Ok(Outcome::Sent(
        route::transmit_xdp(ctx, &hop)?,
        Counter::TunnelOut,
    ))
}

/// Whether `pkt` is for the service's `N` (site B after a move back).
#[inline(always)]
fn to_new(cfg: &Config, pkt: &parse::Packet) -> bool {
    cfg.new_addr != NO_ADDR && pkt.dst_addr == cfg.new_addr
}

/// Records a packet the tunnel takes: pre-move flows and stale-DNS newcomers alike,
/// and traffic to `N`, which is NAT by definition (as in `receive`), under `H`.
#[inline(always)]
fn record_to_tunnel(cfg: &Config, pkt: &parse::Packet) {
    let Some(mut key) = flows::key_of(pkt, Direction::FromPeer) else {
        return;
    };
    key.service_addr = cfg.home_addr;
    let (flow_origin, decides) = if to_new(cfg, pkt) {
        (origin::NAT, Origin::Packet)
    } else {
        (origin::STALE_DNS, Origin::Entry)
    };
    flows::record_key(&key, pkt, Direction::FromPeer, flow_origin, decides);
}

/// A packet for `H` whose TTL or hop limit expires at A: ICMP time-exceeded
/// to its source, as the router before `H` answers. Never about an ICMP
/// error or a non-first fragment (RFC 1812 4.3.2.7, RFC 4443 2.4): those are
/// dropped.
#[inline(always)]
fn time_exceeded(ctx: &XdpContext, pkt: &parse::Packet) -> Result<Outcome, Counter> {
    if matches!(pkt.l4, parse::L4::Fragment) || is_icmp_error(ctx, pkt)? {
        return Err(Counter::DropTtlExceeded);
    }
    let action = icmp::answer_xdp(
        ctx,
        pkt.family,
        pkt.ip_len,
        Message::time_exceeded(pkt.family),
    )?;
    Ok(Outcome::Sent(action, Counter::IcmpTimeExceeded))
}

/// Whether `pkt` is an ICMP error message (IPv4 types 3, 4, 5, 11, 12;
/// ICMPv6 types below 128).
#[inline(always)]
fn is_icmp_error(ctx: &XdpContext, pkt: &parse::Packet) -> Result<bool, Counter> {
    if !matches!(pkt.l4, parse::L4::Icmp) {
        return Ok(false);
    }
    // The parser checked the whole ICMP header is there.
    let kind = bytes::<ICMP_HLEN>(ctx.data(), ctx.data_end(), pkt.l4_offset)
        .map_err(|_| Counter::DropTruncated)?[0];
    Ok(if pkt.family == family::IPV6 {
        kind < 128
    } else {
        matches!(kind, 3 | 4 | 5 | 11 | 12)
    })
}

/// The TTL or hop limit of the frame's IP packet.
#[inline(always)]
fn hop_limit(ctx: &XdpContext, pkt: &parse::Packet) -> Result<u8, Counter> {
    let at = if pkt.family == family::IPV6 {
        ttl::IPV6_HOP_LIMIT
    } else {
        ttl::IPV4_TTL
    };
    let h =
        bytes::<12>(ctx.data(), ctx.data_end(), ETH_HLEN).map_err(|_| Counter::DropTruncated)?;
    Ok(h[at])
}

/// Whether the frame's IPv4 packet has DF set.
#[inline(always)]
fn dont_fragment(ctx: &XdpContext) -> Result<bool, Counter> {
    let h =
        bytes::<12>(ctx.data(), ctx.data_end(), ETH_HLEN).map_err(|_| Counter::DropTruncated)?;
    Ok(h[6] & IPV4_DF != 0)
}

/// Decrements the TTL (and fixes the IPv4 checksum) or the hop limit of the
/// frame's IP packet; `false` if it expires here.
#[inline(always)]
fn decrement(ctx: &XdpContext, pkt: &parse::Packet) -> Result<bool, Counter> {
    if pkt.family == family::IPV6 {
        let h = bytes_mut::<8>(ctx.data(), ctx.data_end(), ETH_HLEN)
            .map_err(|_| Counter::DropTruncated)?;
        Ok(ttl::decrement_ipv6(h))
    } else {
        let h = bytes_mut::<12>(ctx.data(), ctx.data_end(), ETH_HLEN)
            .map_err(|_| Counter::DropTruncated)?;
        Ok(ttl::decrement_ipv4(h))
    }
}

/// Uplink ingress, GUE to our endpoint: the VM's replies from `TB`, to be
/// sent from `H` as before the move.
#[inline(always)]
pub fn from_tunnel(
    ctx: &XdpContext,
    cfg: &Config,
    outer: &parse::Packet,
) -> Result<Outcome, Counter> {
    let mut inner = parse::Packet::EMPTY;
    if tunnel::decapsulate_either(ctx, cfg, outer, &mut inner)? == Direction::FromPeer {
        // For `H`: the peer tunnels to the VM, which is arriving here (a move back).
        // Not recorded: in `return` and until then, a flow A did not see itself goes
        // back through the tunnel in any case (and a record would overflow the
        // 512-byte stack of this call chain).
        return Ok(Outcome::Sent(
            receive::deliver_to_vm(ctx, cfg)?,
            Counter::TunnelIn,
        ));
    }
    // A routes the reply, so it decrements. One that expires here is dropped
    // without an answer: the VM is behind the tunnel, and an ICMP to it would
    // have to be encapsulated back toward B (its TTL 1 came from the VM
    // itself, which B does not decrement: a traceroute's first hop).
    if !decrement(ctx, &inner)? {
        return Err(Counter::DropTtlExceeded);
    }
    // A NAT flow of this site's (B's, after a move back) leaves as `N`.
    let nat = flows::record(&inner, Direction::ToPeer, origin::STALE_DNS) == Some(origin::NAT)
        && cfg.new_addr != NO_ADDR;
    let src = if nat {
        nat::snat_xdp(ctx, &inner, cfg)?;
        &cfg.new_addr
    } else {
        &inner.src_addr
    };
    let hop = route::lookup(
        ctx.ctx as *mut c_void,
        inner.family,
        src,
        &inner.dst_addr,
        ctx.ingress_ifindex() as u32,
        inner.ip_len as u16,
        route::Lookup::Forward,
    )?;
    Ok(Outcome::Sent(
        route::transmit_xdp(ctx, &hop)?,
        Counter::TunnelIn,
    ))
}

/// The uplink's ifindex: configured, or else the interface the packet came in on.
#[inline(always)]
fn uplink(ctx: &XdpContext, cfg: &Config) -> u32 {
    if cfg.uplink_ifindex != 0 {
        cfg.uplink_ifindex
    } else {
        ctx.ingress_ifindex() as u32
    }
}
