//! Mode `forward` at site A (from switchover): everything for `H` goes to
//! `TB` in GUE; GUE from `TB` is unwrapped and routed out from `H`.

use core::ffi::c_void;

use aya_ebpf::programs::XdpContext;
use movarto_common::{
    config::Config,
    counters::Counter,
    flow::origin,
    gue::{GUE_OVERHEAD_IPV4, clamped_mss},
    net::family,
};

use crate::{
    flows::{self, Direction},
    icmp, link_local, mss,
    outcome::Outcome,
    parse, route, tunnel,
};

/// Uplink ingress, anything but our GUE: traffic for `H` goes into the tunnel.
#[inline(always)]
pub fn to_tunnel(ctx: &XdpContext, cfg: &Config, pkt: &parse::Packet) -> Result<Outcome, Counter> {
    // ND and link-local/multicast traffic is this link's, even for `H`.
    if link_local::stays_on_link(ctx.data(), ctx.data_end(), pkt) {
        return Ok(Outcome::Pass);
    }
    if pkt.family != cfg.service_family || pkt.dst_addr != cfg.home_addr {
        return Ok(Outcome::Pass);
    }
    // Pre-move flows and stale-DNS newcomers alike.
    flows::record(pkt, Direction::FromPeer, origin::STALE_DNS);
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
        let action = if pkt.family == family::IPV6 {
            icmp::too_big_v6(ctx, cfg.tunnel_mtu)?
        } else {
            icmp::too_big_v4(ctx, cfg.tunnel_mtu)?
        };
        return Ok(Outcome::Sent(action, Counter::IcmpTooBig));
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

/// Uplink ingress, GUE to our endpoint: the VM's replies from `TB`, to be
/// sent from `H` as before the move.
#[inline(always)]
pub fn from_tunnel(
    ctx: &XdpContext,
    cfg: &Config,
    outer: &parse::Packet,
) -> Result<Outcome, Counter> {
    let mut inner = parse::Packet::EMPTY;
    tunnel::decapsulate(ctx, cfg, outer, Direction::ToPeer, &mut inner)?;
    flows::record(&inner, Direction::ToPeer, origin::STALE_DNS);
    let hop = route::lookup(
        ctx.ctx as *mut c_void,
        inner.family,
        &inner.src_addr,
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
