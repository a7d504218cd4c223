//! Mode `return` at site A: the VM moved back from B before that move's drain
//! ended, and B still tunnels what reaches `N` (DNATed to `H`). On the uplink A is
//! as in `track` (traffic to `H` is the VM's own again), and GUE from `TB` is
//! delivered to the VM as in `receive`. This file holds the VM side.

use aya_ebpf::programs::TcContext;
use movarto_common::{config::Config, counters::Counter, flow::origin};

use crate::{
    flows::{self, Direction, Origin},
    link_local,
    outcome::Outcome,
    parse::{Packet, tcp_flag},
    track,
};

/// VM-facing ingress: what the VM sends from `H`. A flow A saw itself (pre-move flows,
/// which A recorded before the first move, and every connection opened since the VM
/// is back) leaves directly, as in `track`. Any other flow, learned from the tunnel
/// or never seen, goes back through it: B holds its NAT and undoes it there. In
/// `forward` (A before the VM is back) the same, for the moment the VM runs here.
#[inline(always)]
pub fn from_vm(ctx: &TcContext, cfg: &Config, pkt: &Packet) -> Result<Outcome, Counter> {
    if pkt.family != cfg.service_family || pkt.src_addr != cfg.home_addr {
        return Ok(Outcome::Pass);
    }
    if link_local::stays_on_link(ctx.data(), ctx.data_end(), pkt) {
        return Ok(Outcome::Pass);
    }
    // No ports (ICMP): A's own, as the kernel routes it.
    let Some(key) = flows::key_of(pkt, Direction::ToPeer) else {
        return Ok(Outcome::Pass);
    };
    let opens_connection = pkt.tcp_flags & (tcp_flag::SYN | tcp_flag::ACK) == tcp_flag::SYN;
    // A's own origins only: a snapshot from B may bring its NAT and tunnelled flows.
    let own = opens_connection
        || flows::origin_of(&key)
            .is_some_and(|seen| seen == origin::TRACKED || seen == origin::STALE_DNS);
    if own {
        track::from_vm(ctx, cfg, pkt);
        return Ok(Outcome::Pass);
    }
    flows::record_key(
        &key,
        pkt,
        Direction::ToPeer,
        origin::TUNNELLED,
        Origin::Entry,
    );
    Ok(Outcome::Tunnel)
}
