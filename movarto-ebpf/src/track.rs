//! Mode `track` at site A: record the service's flows and clamp MSS. Pass everything.

use aya_ebpf::programs::{TcContext, XdpContext};
use movarto_common::{config::Config, flow::origin, gue::clamped_mss, net::family};

use crate::{
    flows::{self, Direction},
    mss,
    parse::{L4, Packet},
};

/// Uplink ingress: peer -> `H`. Separate BPF functions keep the entry point's frame small.
#[inline(never)]
pub fn from_uplink(ctx: &XdpContext, cfg: &Config, pkt: &Packet) {
    if pkt.family != cfg.service_family || pkt.dst_addr != cfg.home_addr {
        return;
    }
    flows::record(pkt, Direction::FromPeer, origin::TRACKED);
    if matches!(pkt.l4, L4::Tcp) && mss::is_syn(pkt) {
        mss::clamp_xdp(ctx.data(), ctx.data_end(), pkt, max_mss(cfg, pkt));
    }
}

/// VM-facing ingress: `H` -> peer.
#[inline(never)]
pub fn from_vm(ctx: &TcContext, cfg: &Config, pkt: &Packet) {
    if pkt.family != cfg.service_family || pkt.src_addr != cfg.home_addr {
        return;
    }
    flows::record(pkt, Direction::ToPeer, origin::TRACKED);
    if matches!(pkt.l4, L4::Tcp) && mss::is_syn(pkt) {
        mss::clamp_tc(ctx, pkt, max_mss(cfg, pkt));
    }
}

#[inline(always)]
fn max_mss(cfg: &Config, pkt: &Packet) -> u16 {
    clamped_mss(cfg.tunnel_mtu, pkt.family == family::IPV6)
}
