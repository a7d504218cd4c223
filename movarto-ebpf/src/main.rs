//! movarto's eBPF programs. Each entry point finds the packet's service and is a
//! short dispatch on the service's mode;
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
mod return_home;
mod route;
mod services;
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
    let Some(uplink) = CONFIG.get(CONFIG_KEY) else {
        return pass(counters::NO_SERVICE, &pkt, xdp_action::XDP_PASS);
    };
    let service;
    let to_endpoint = tunnel::to_endpoint(uplink, &pkt);
    // A peer is in `PEERS` only while one of its services tunnels: the tunnel's own
    // packets take one lookup before their service's.
    let peer = if to_endpoint {
        services::peer(&pkt.src_addr)
    } else {
        None
    };
    let outcome = if let Some(users) = peer {
        service = services::of_tunnelled(ctx.data(), ctx.data_end(), users.only_forwarding());
        match service {
            // A peer vouches for its own services' packets only.
            Some(cfg) if cfg.peer_tunnel_addr == pkt.src_addr => match cfg.mode() {
                Some(Mode::Forward) => forward_from_tunnel(&ctx, cfg, &pkt).decode(),
                _ => receive_from_tunnel(&ctx, cfg, &pkt).decode(),
            },
            Some(_) => Decoded::Drop(Counter::DropGueWrongService as u32),
            None => Decoded::Drop(services::unknown_reason(ctx.data(), ctx.data_end())),
        }
    } else if to_endpoint && services::any_tunnel() {
        // Not this node's tunnel: the kernel's, untouched.
        service = None;
        Decoded::Sent(xdp_action::XDP_PASS, Counter::PassGueForeignSource as u32)
    } else {
        service = services::of_destination(&pkt);
        match service {
            None => Decoded::Pass,
            Some(cfg) => match cfg.mode() {
                Some(Mode::Track | Mode::Return) => {
                    track::from_uplink(&ctx, cfg, &pkt);
                    Decoded::Pass
                }
                Some(Mode::Forward) => forward_to_tunnel(&ctx, cfg, &pkt).decode(),
                Some(Mode::Receive | Mode::Nat) => receive_to_new_addr(&ctx, cfg, &pkt).decode(),
                _ => Decoded::Pass,
            },
        }
    };
    let slot = service.map_or(counters::NO_SERVICE, |cfg| cfg.slot);
    match outcome {
        Decoded::Pass | Decoded::Tunnel => pass(slot, &pkt, xdp_action::XDP_PASS),
        Decoded::Sent(action, verdict) => {
            counters::bump_verdict(slot, verdict);
            report_sent(&ctx, hook::UPLINK, verdict, &pkt);
            action
        }
        Decoded::Drop(reason) => {
            counters::bump_verdict(slot, reason);
            monitor::report(&ctx, drop_at(hook::UPLINK), reason, &pkt);
            xdp_action::XDP_DROP
        }
        Decoded::PassAfter(event) => {
            counters::bump_verdict(slot, event);
            report_sent(&ctx, hook::UPLINK, event, &pkt);
            pass(slot, &pkt, xdp_action::XDP_PASS)
        }
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
    let service = services::of_source(&pkt);
    let outcome = match service {
        None => Decoded::Pass,
        Some(cfg) => match cfg.mode() {
            Some(Mode::Track) => {
                track::from_vm(&ctx, cfg, &pkt);
                Decoded::Pass
            }
            // One call site of the tunnel: the verifier walks a function once per call.
            Some(mode @ (Mode::Receive | Mode::Return | Mode::Forward)) => {
                let decided = if mode == Mode::Receive {
                    receive_from_vm(&ctx, cfg, &pkt)
                } else {
                    returned_from_vm(&ctx, cfg, &pkt)
                };
                match decided.decode() {
                    Decoded::Tunnel => vm_to_tunnel(&ctx, cfg, &pkt).decode(),
                    other => other,
                }
            }
            Some(Mode::Nat) => nat_from_vm(&ctx, cfg, &pkt).decode(),
            _ => Decoded::Pass,
        },
    };
    let slot = service.map_or(counters::NO_SERVICE, |cfg| cfg.slot);
    match outcome {
        // Only the TC decision step asks for the tunnel; it is resolved above.
        Decoded::Pass | Decoded::Tunnel => pass(slot, &pkt, TC_ACT_OK),
        Decoded::Sent(action, verdict) => {
            counters::bump_verdict(slot, verdict);
            report_sent(&ctx, hook::VM, verdict, &pkt);
            action as i32
        }
        Decoded::Drop(reason) => {
            counters::bump_verdict(slot, reason);
            monitor::report(&ctx, drop_at(hook::VM), reason, &pkt);
            TC_ACT_SHOT
        }
        Decoded::PassAfter(event) => {
            counters::bump_verdict(slot, event);
            report_sent(&ctx, hook::VM, event, &pkt);
            pass(slot, &pkt, TC_ACT_OK)
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
fn returned_from_vm(ctx: &TcContext, cfg: &Config, pkt: &Packet) -> Encoded {
    return_home::from_vm(ctx, cfg, pkt).into()
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

/// Whether movarto would act on `pkt` at `hook` in its service's mode: the
/// packets it rewrites, tunnels, unwraps or delivers. Only those are dropped
/// when malformed; everything else is the kernel's, whatever its shape. Track
/// mode only records, so a malformed packet to `H` passes unrecorded there.
#[inline(always)]
fn acts_on(hook: Hook, pkt: &Packet) -> bool {
    match hook {
        Hook::Uplink => {
            if CONFIG
                .get(CONFIG_KEY)
                .is_some_and(|uplink| tunnel::may_be_ours(uplink, pkt))
            {
                return true;
            }
            let Some(cfg) = services::of_destination(pkt) else {
                return false;
            };
            match cfg.mode() {
                Some(Mode::Forward) => {
                    pkt.dst_addr == cfg.home_addr
                        || (cfg.new_addr != [0; 16] && pkt.dst_addr == cfg.new_addr)
                }
                Some(Mode::Receive | Mode::Nat) => true,
                _ => false,
            }
        }
        Hook::Vm => services::of_source(pkt).is_some_and(|cfg| {
            matches!(
                cfg.mode(),
                Some(Mode::Receive | Mode::Nat | Mode::Return | Mode::Forward)
            )
        }),
    }
}

/// The verdict on a packet the parser rejected for `reason`: dropped and
/// counted under the reason if movarto acts on it, else passed untouched as
/// [`Counter::PassMalformed`]. A frame whose IP header could not be read has
/// no addresses (family 0) and is always passed. Returns whether to drop.
#[inline(always)]
fn drops_malformed(hook: Hook, pkt: &Packet, reason: ParseError) -> bool {
    if acts_on(hook, pkt) {
        counters::bump(reason.counter());
        true
    } else {
        counters::bump(Counter::PassMalformed);
        false
    }
}

/// Counts the pass verdict of an IP packet (also for its service in row `slot`,
/// unless [`counters::NO_SERVICE`]) and returns `action`.
#[inline(always)]
fn pass<T>(slot: u32, pkt: &Packet, action: T) -> T {
    let verdict = if pkt.family == family::IPV6 {
        Counter::PassIpv6
    } else {
        Counter::PassIpv4
    };
    counters::bump_verdict(slot, verdict as u32);
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
