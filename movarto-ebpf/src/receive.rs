//! Site B. Mode `receive` (before switchover and during the drain): GUE from
//! `TA` is unwrapped and delivered to the VM, traffic to `N` is DNATed to `H`,
//! and the VM's packets on NAT flows are SNATed back to `N`. Mode `nat` (after
//! teardown): the same without the tunnel, and every flow from `H` is a NAT flow.

use core::ffi::c_void;

use aya_ebpf::{
    helpers::bpf_redirect,
    programs::{TcContext, XdpContext},
};
use movarto_common::{
    config::Config,
    counters::Counter,
    flow::origin,
    net::{ETH_HLEN, family},
};

use crate::{
    flows::{self, Direction, Origin},
    icmp, link_local, nat,
    outcome::Outcome,
    parse::{Packet, bytes_mut, tcp_flag},
    route, tunnel,
};

const NO_ADDR: [u8; 16] = [0; 16];

/// Uplink ingress, anything but our GUE: traffic to `N` is DNATed to `H`
/// and delivered to the VM. Traffic to `H` itself did not come through the
/// tunnel, so nothing vouches for it: B's kernel would route it straight to
/// the VM, past the peer and token checks, so it is dropped.
#[inline(always)]
pub fn to_new_addr(ctx: &XdpContext, cfg: &Config, pkt: &Packet) -> Result<Outcome, Counter> {
    if pkt.family != cfg.service_family {
        return Ok(Outcome::Pass);
    }
    let to_home = pkt.dst_addr == cfg.home_addr;
    let to_new = cfg.new_addr != NO_ADDR && pkt.dst_addr == cfg.new_addr;
    // Other tenants' packets cost the two comparisons only. ND is the uplink's
    // own business even for `H` or `N` (a router's NUD probe of `N` must reach
    // B's kernel, not the VM).
    if !(to_home || to_new) || link_local::stays_on_link(ctx.data(), ctx.data_end(), pkt) {
        return Ok(Outcome::Pass);
    }
    if to_home {
        return Err(Counter::DropNotTunnelled);
    }
    nat::dnat_xdp(ctx, pkt, cfg)?;
    if let Some(mut key) = flows::key_of(pkt, Direction::FromPeer) {
        key.service_addr = cfg.home_addr;
        flows::record_key(&key, pkt, Direction::FromPeer, origin::NAT, Origin::Packet);
    }
    Ok(Outcome::Sent(deliver_to_vm(ctx, cfg)?, Counter::NatIn))
}

/// Uplink ingress, GUE to our endpoint (mode `receive`): a pre-move flow's
/// (or a stale-DNS client's) packet for `H`.
#[inline(always)]
pub fn from_tunnel(ctx: &XdpContext, cfg: &Config, pkt: &Packet) -> Result<Outcome, Counter> {
    let mut inner = Packet::EMPTY;
    tunnel::decapsulate(ctx, cfg, pkt, Direction::FromPeer, &mut inner)?;
    flows::record(&inner, Direction::FromPeer, origin::TUNNELLED);
    Ok(Outcome::Sent(deliver_to_vm(ctx, cfg)?, Counter::TunnelIn))
}

/// Addresses the frame from the anycast gateway to the VM and redirects it
/// to the VM-facing interface.
#[inline(always)]
pub fn deliver_to_vm(ctx: &XdpContext, cfg: &Config) -> Result<u32, Counter> {
    let eth = bytes_mut::<ETH_HLEN>(ctx.data(), ctx.data_end(), 0)
        .map_err(|_| Counter::DropResizeFailed)?;
    eth[..6].copy_from_slice(&cfg.vm_mac);
    eth[6..12].copy_from_slice(&cfg.gateway_mac);
    // SAFETY: plain helper call.
    Ok(unsafe { bpf_redirect(cfg.vm_ifindex, 0) } as u32)
}

/// VM-facing ingress: what the VM sends from `H`. NAT flows (and, in mode
/// `nat`, every flow) leave as `N` through the kernel's routing. In mode
/// `receive` everything else goes into the tunnel to `TA`, also flows the map
/// never saw, so pre-move flows work whatever the map knows.
#[inline(always)]
pub fn from_vm(
    ctx: &TcContext,
    cfg: &Config,
    pkt: &Packet,
    nat_only: bool,
) -> Result<Outcome, Counter> {
    if pkt.family != cfg.service_family || pkt.src_addr != cfg.home_addr {
        return Ok(Outcome::Pass);
    }
    // ND and link-local/multicast traffic is for B's kernel, which holds the
    // anycast gateway: neither the tunnel nor the NAT.
    if link_local::stays_on_link(ctx.data(), ctx.data_end(), pkt) {
        return Ok(Outcome::Pass);
    }
    let key = flows::key_of(pkt, Direction::ToPeer);
    let opens_connection = pkt.tcp_flags & (tcp_flag::SYN | tcp_flag::ACK) == tcp_flag::SYN;
    let is_nat = cfg.new_addr != NO_ADDR
        && key.is_some()
        && (nat_only
            || opens_connection
            || key.as_ref().and_then(flows::origin_of) == Some(origin::NAT));
    if is_nat {
        flows::record(pkt, Direction::ToPeer, origin::NAT);
        nat::snat_tc(ctx, pkt, &cfg.new_addr)?;
        return Ok(Outcome::PassAfter(Counter::NatOut));
    }
    if nat_only {
        return Ok(Outcome::Pass);
    }
    flows::record(pkt, Direction::ToPeer, origin::TUNNELLED);
    Ok(Outcome::Tunnel)
}

/// The VM's packet for a non-NAT flow: GUE to `TA`, out of the uplink.
#[inline(always)]
pub fn vm_to_tunnel(ctx: &TcContext, cfg: &Config, pkt: &Packet) -> Result<Outcome, Counter> {
    // SAFETY: reading a field of our own context.
    let gso_size = unsafe { (*ctx.skb.skb).gso_size };
    // Too big and not GSO: the VM learns the tunnel's MTU, as A's clients do.
    if !tunnel::fits(cfg, pkt, gso_size) {
        let action = if pkt.family == family::IPV6 {
            icmp::too_big_v6_tc(ctx, cfg.tunnel_mtu, cfg.vm_ifindex)?
        } else {
            icmp::too_big_v4_tc(ctx, cfg.tunnel_mtu, cfg.vm_ifindex)?
        };
        return Ok(Outcome::Sent(action, Counter::IcmpTooBig));
    }
    tunnel::encapsulate_tc(ctx, cfg, pkt)?;
    // tot_len 0: the kernel checks the (encapsulated) skb against the MTU
    // itself, GSO-aware; a GSO packet's own length would fail the check.
    let hop = route::lookup(
        ctx.skb.skb as *mut c_void,
        family::IPV4,
        &cfg.local_tunnel_addr,
        &cfg.peer_tunnel_addr,
        cfg.uplink_ifindex,
        0,
        route::Lookup::Output,
    )?;
    Ok(Outcome::Sent(
        route::transmit_tc(ctx, &hop)?,
        Counter::TunnelOut,
    ))
}
