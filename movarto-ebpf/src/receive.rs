//! Mode `receive` at site B: GUE from `TA` is unwrapped and delivered to the VM.

use aya_ebpf::{helpers::bpf_redirect, programs::XdpContext};
use movarto_common::{config::Config, counters::Counter, flow::origin, net::ETH_HLEN};

use crate::{
    flows::{self, Direction},
    outcome::Outcome,
    parse::{self, Frame, bytes_mut},
    tunnel,
};

/// Uplink ingress.
#[inline(always)]
pub fn from_uplink(
    ctx: &XdpContext,
    cfg: &Config,
    pkt: &parse::Packet,
) -> Result<Outcome, Counter> {
    if !tunnel::is_ours(cfg, pkt) {
        return Ok(Outcome::Pass);
    }
    tunnel::decapsulate(ctx, cfg, pkt)?;
    let Ok(Frame::Ip(inner)) = parse::parse_frame(ctx.data(), ctx.data_end()) else {
        return Err(Counter::DropGueMalformed);
    };
    // The tunnel carries traffic for the service only.
    if inner.family != cfg.service_family || inner.dst_addr != cfg.home_addr {
        return Err(Counter::DropGueMalformed);
    }
    flows::record(&inner, Direction::FromPeer, origin::TUNNELLED);
    Ok(Outcome::Sent(deliver_to_vm(ctx, cfg)?, Counter::TunnelIn))
}

/// Addresses the frame from the anycast gateway to the VM and redirects it
/// to the VM-facing interface.
#[inline(always)]
fn deliver_to_vm(ctx: &XdpContext, cfg: &Config) -> Result<u32, Counter> {
    let eth = bytes_mut::<ETH_HLEN>(ctx.data(), ctx.data_end(), 0)
        .map_err(|_| Counter::DropResizeFailed)?;
    eth[..6].copy_from_slice(&cfg.vm_mac);
    eth[6..12].copy_from_slice(&cfg.gateway_mac);
    // SAFETY: plain helper call.
    Ok(unsafe { bpf_redirect(cfg.vm_ifindex, 0) } as u32)
}
