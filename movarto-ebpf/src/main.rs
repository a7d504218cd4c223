//! movarto's eBPF programs. Each entry point is a short dispatch on the mode;
//! the work is in one file per topic (parse, flows, mss, track, counters, maps).
#![no_std]
#![no_main]

mod counters;
mod flows;
mod forward;
mod icmp;
mod link_local;
mod maps;
mod monitor;
mod mss;
mod nat;
mod outcome;
mod parse;
mod receive;
mod route;
mod track;
mod tunnel;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT, xdp_action},
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use movarto_common::{
    config::{CONFIG_KEY, Config, Mode},
    counters::Counter,
    monitor::{hook, kind_of},
    net::family,
};

use crate::{
    maps::CONFIG,
    monitor::{drop_at, kind_and_hook},
    outcome::{Decoded, Encoded},
    parse::{Packet, ParseError},
};

/// Uplink ingress (XDP): every packet arriving from the network.
#[xdp]
pub fn uplink_ingress(ctx: XdpContext) -> u32 {
    let mut pkt = Packet::EMPTY;
    match parse_counted(
        ctx.data(),
        ctx.data_end(),
        ctx.data_end() - ctx.data(),
        Hook::Uplink,
        &mut pkt,
    ) {
        Parsed::IP => {}
        Parsed::PASS => return xdp_action::XDP_PASS,
        Parsed(reason) => {
            monitor::report(&ctx, drop_at(hook::UPLINK), reason, &pkt);
            return xdp_action::XDP_DROP;
        }
    }
    let Some(cfg) = CONFIG.get(CONFIG_KEY) else {
        return pass(&pkt, xdp_action::XDP_PASS);
    };
    let mode = cfg.mode();
    let gue = match mode {
        Some(m) if m.uses_tunnel() => gue_of(cfg, &pkt),
        _ => Gue::No,
    };
    let outcome = match (mode, gue) {
        // Not this node's tunnel: the kernel's, untouched.
        (_, Gue::Foreign) => {
            Decoded::Sent(xdp_action::XDP_PASS, Counter::PassGueForeignSource as u32)
        }
        (Some(Mode::Track), _) => {
            track::from_uplink(&ctx, cfg, &pkt);
            Decoded::Pass
        }
        (Some(Mode::Forward), Gue::Ours) => forward_from_tunnel(&ctx, cfg, &pkt).decode(),
        (Some(Mode::Forward), _) => forward_to_tunnel(&ctx, cfg, &pkt).decode(),
        (Some(Mode::Receive | Mode::Direct), Gue::Ours) => {
            receive_from_tunnel(&ctx, cfg, &pkt).decode()
        }
        (Some(Mode::Receive | Mode::Nat), _) => receive_to_new_addr(&ctx, cfg, &pkt).decode(),
        _ => Decoded::Pass,
    };
    match outcome {
        Decoded::Pass | Decoded::Tunnel => pass(&pkt, xdp_action::XDP_PASS),
        Decoded::Sent(action, verdict) => {
            counters::bump_index(verdict);
            report_sent(&ctx, hook::UPLINK, verdict, &pkt);
            action
        }
        Decoded::Drop(reason) => {
            counters::bump_index(reason);
            monitor::report(&ctx, drop_at(hook::UPLINK), reason, &pkt);
            xdp_action::XDP_DROP
        }
        Decoded::PassAfter(event) => {
            counters::bump_index(event);
            report_sent(&ctx, hook::UPLINK, event, &pkt);
            pass(&pkt, xdp_action::XDP_PASS)
        }
    }
}

/// Whether a packet is UDP to this site's GUE endpoint, and from whom.
#[repr(u32)]
#[derive(Clone, Copy)]
enum Gue {
    No,
    /// From the peer: this node's tunnel.
    Ours,
    /// From anyone else: not this node's tunnel.
    Foreign,
}

/// Classifies `pkt` as GUE from the peer, from anyone else, or not UDP to
/// our endpoint at all. Its own BPF function: inlined, its address
/// comparisons cost the entry point stack, which the mode handlers need.
#[inline(never)]
fn gue_of(cfg: &Config, pkt: &Packet) -> Gue {
    if !tunnel::to_endpoint(cfg, pkt) {
        Gue::No
    } else if pkt.src_addr == cfg.peer_tunnel_addr {
        Gue::Ours
    } else {
        Gue::Foreign
    }
}

// Each path is its own BPF function: they never run together, and separate
// frames keep every call chain within the 512-byte stack.

#[inline(never)]
fn forward_to_tunnel(ctx: &XdpContext, cfg: &Config, pkt: &Packet) -> Encoded {
    forward::to_tunnel(ctx, cfg, pkt).into()
}

#[inline(never)]
fn forward_from_tunnel(ctx: &XdpContext, cfg: &Config, pkt: &Packet) -> Encoded {
    forward::from_tunnel(ctx, cfg, pkt).into()
}

#[inline(never)]
fn receive_from_tunnel(ctx: &XdpContext, cfg: &Config, pkt: &Packet) -> Encoded {
    receive::from_tunnel(ctx, cfg, pkt).into()
}

#[inline(never)]
fn receive_to_new_addr(ctx: &XdpContext, cfg: &Config, pkt: &Packet) -> Encoded {
    receive::to_new_addr(ctx, cfg, pkt).into()
}

/// VM-facing ingress (TC): every packet the VM sends.
#[classifier]
pub fn vm_ingress(ctx: TcContext) -> i32 {
    let mut pkt = Packet::EMPTY;
    match parse_counted(
        ctx.data(),
        ctx.data_end(),
        ctx.len() as usize,
        Hook::Vm,
        &mut pkt,
    ) {
        Parsed::IP => {}
        Parsed::PASS => return TC_ACT_OK,
        Parsed(reason) => {
            monitor::report(&ctx, drop_at(hook::VM), reason, &pkt);
            return TC_ACT_SHOT;
        }
    }
    let Some(cfg): Option<&Config> = CONFIG.get(CONFIG_KEY) else {
        return pass(&pkt, TC_ACT_OK);
    };
    let outcome = match cfg.mode() {
        Some(Mode::Track) => {
            track::from_vm(&ctx, cfg, &pkt);
            Decoded::Pass
        }
        Some(Mode::Receive) => match receive_from_vm(&ctx, cfg, &pkt).decode() {
            Decoded::Tunnel => vm_to_tunnel(&ctx, cfg, &pkt).decode(),
            other => other,
        },
        Some(Mode::Nat) => nat_from_vm(&ctx, cfg, &pkt).decode(),
        _ => Decoded::Pass,
    };
    match outcome {
        // Only the TC decision step asks for the tunnel; it is resolved above.
        Decoded::Pass | Decoded::Tunnel => pass(&pkt, TC_ACT_OK),
        Decoded::Sent(action, verdict) => {
            counters::bump_index(verdict);
            report_sent(&ctx, hook::VM, verdict, &pkt);
            action as i32
        }
        Decoded::Drop(reason) => {
            counters::bump_index(reason);
            monitor::report(&ctx, drop_at(hook::VM), reason, &pkt);
            TC_ACT_SHOT
        }
        Decoded::PassAfter(event) => {
            counters::bump_index(event);
            report_sent(&ctx, hook::VM, event, &pkt);
            pass(&pkt, TC_ACT_OK)
        }
    }
}

/// Reports a packet movarto sent, or changed and passed on, under `verdict`.
#[inline(always)]
fn report_sent<C: monitor::Ingress>(ctx: &C, at: u8, verdict: u32, pkt: &Packet) {
    let event_kind = kind_of(verdict);
    if event_kind != 0 {
        monitor::report(ctx, kind_and_hook(event_kind, at), verdict, pkt);
    }
}

#[inline(never)]
fn vm_to_tunnel(ctx: &TcContext, cfg: &Config, pkt: &Packet) -> Encoded {
    receive::vm_to_tunnel(ctx, cfg, pkt).into()
}

#[inline(never)]
fn receive_from_vm(ctx: &TcContext, cfg: &Config, pkt: &Packet) -> Encoded {
    receive::from_vm(ctx, cfg, pkt, false).into()
}

#[inline(never)]
fn nat_from_vm(ctx: &TcContext, cfg: &Config, pkt: &Packet) -> Encoded {
    receive::from_vm(ctx, cfg, pkt, true).into()
}

/// What [`parse_counted`] found; a BPF call returns one register. Any other
/// value: malformed and movarto's, so the reason (this counter index) was
/// counted; drop it.
#[repr(transparent)]
#[derive(PartialEq, Eq)]
struct Parsed(u32);

impl Parsed {
    /// A well-formed IP packet, for the mode to decide on.
    const IP: Parsed = Parsed(u32::MAX);
    /// Not IP, or malformed and not movarto's: verdict counted, pass it.
    const PASS: Parsed = Parsed(u32::MAX - 1);
}

/// Parses the frame into `pkt` and counts it: the packet, the class of an IP
/// packet, and the verdict of one that is not a well-formed IP packet (see
/// [`drops_malformed`]). Its own BPF function, so the malformed path's locals
/// stay out of the entry points' frames, which the mode handlers need.
#[inline(never)]
fn parse_counted(
    data: usize,
    data_end: usize,
    frame_len: usize,
    hook: Hook,
    pkt: &mut Packet,
) -> Parsed {
    counters::bump(Counter::Packets);
    match parse::parse_frame(data, data_end, frame_len, pkt) {
        Ok(true) => {
            counters::bump(pkt.l4.counter());
            Parsed::IP
        }
        Ok(false) => {
            counters::bump(Counter::PassNonIp);
            Parsed::PASS
        }
        Err(reason) if drops_malformed(hook, pkt, reason) => Parsed(reason.counter() as u32),
        Err(_) => Parsed::PASS,
    }
}

/// Which program sees the packet.
#[derive(Clone, Copy)]
enum Hook {
    /// XDP on the uplink: packets from the network.
    Uplink,
    /// TC on the VM-facing interface: packets the VM sends.
    Vm,
}

const NO_ADDR: [u8; 16] = [0; 16];

/// Whether movarto would act on `pkt` at `hook` in the configured mode: the
/// packets it rewrites, tunnels, unwraps or delivers. Only those are dropped
/// when malformed; everything else is the kernel's, whatever its shape. Track
/// mode only records, so a malformed packet to `H` passes unrecorded there.
/// One configuration today; per service, this is the service's mode.
#[inline(always)]
fn acts_on(cfg: &Config, hook: Hook, pkt: &Packet) -> bool {
    let Some(mode) = cfg.mode() else {
        return false;
    };
    let service = pkt.family == cfg.service_family;
    match hook {
        Hook::Uplink => {
            let to_home = service && pkt.dst_addr == cfg.home_addr;
            let to_new = service && cfg.new_addr != NO_ADDR && pkt.dst_addr == cfg.new_addr;
            let gue = || tunnel::may_be_ours(cfg, pkt);
            match mode {
                Mode::Forward => to_home || gue(),
                Mode::Receive => to_home || to_new || gue(),
                Mode::Nat => to_home || to_new,
                Mode::Direct => gue(),
                Mode::Track | Mode::Idle => false,
            }
        }
        Hook::Vm => {
            matches!(mode, Mode::Receive | Mode::Nat) && service && pkt.src_addr == cfg.home_addr
        }
    }
}

/// The verdict on a packet the parser rejected for `reason`: dropped and
/// counted under the reason if movarto acts on it, else passed untouched as
/// [`Counter::PassMalformed`]. A frame whose IP header could not be read has
/// no addresses (family 0) and is always passed. Returns whether to drop.
#[inline(always)]
fn drops_malformed(hook: Hook, pkt: &Packet, reason: ParseError) -> bool {
    let cfg: Option<&Config> = CONFIG.get(CONFIG_KEY);
    if cfg.is_some_and(|cfg| acts_on(cfg, hook, pkt)) {
        counters::bump(reason.counter());
        true
    } else {
        counters::bump(Counter::PassMalformed);
        false
    }
}

/// Counts the pass verdict of an IP packet and returns `action`.
#[inline(always)]
fn pass<T>(pkt: &Packet, action: T) -> T {
    counters::bump(if pkt.family == family::IPV6 {
        Counter::PassIpv6
    } else {
        Counter::PassIpv4
    });
    action
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// GPL-compatible so the GPL-only helpers (bpf_fib_lookup, redirect) are available.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
