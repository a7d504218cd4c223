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
    net::family,
};

use crate::{
    maps::CONFIG,
    outcome::{Decoded, Encoded},
    parse::Packet,
};

/// Uplink ingress (XDP): every packet arriving from the network.
#[xdp]
pub fn uplink_ingress(ctx: XdpContext) -> u32 {
    let mut pkt = Packet::EMPTY;
    match parse_counted(
        ctx.data(),
        ctx.data_end(),
        ctx.data_end() - ctx.data(),
        &mut pkt,
    ) {
        Parsed::Ip => {}
        Parsed::NonIp => return xdp_action::XDP_PASS,
        Parsed::Malformed => return xdp_action::XDP_DROP,
    }
    let Some(cfg) = CONFIG.get(CONFIG_KEY) else {
        return pass(&pkt, xdp_action::XDP_PASS);
    };
    let outcome = match cfg.mode() {
        Some(Mode::Track) => {
            track::from_uplink(&ctx, cfg, &pkt);
            Decoded::Pass
        }
        Some(Mode::Forward) if tunnel::is_ours(cfg, &pkt) => {
            forward_from_tunnel(&ctx, cfg, &pkt).decode()
        }
        Some(Mode::Forward) => forward_to_tunnel(&ctx, cfg, &pkt).decode(),
        Some(Mode::Receive | Mode::Direct) if tunnel::is_ours(cfg, &pkt) => {
            receive_from_tunnel(&ctx, cfg, &pkt).decode()
        }
        Some(Mode::Receive | Mode::Nat) => receive_to_new_addr(&ctx, cfg, &pkt).decode(),
        _ => Decoded::Pass,
    };
    match outcome {
        Decoded::Pass => pass(&pkt, xdp_action::XDP_PASS),
        Decoded::Sent(action, verdict) => {
            counters::bump_index(verdict);
            action
        }
        Decoded::Drop(reason) => {
            counters::bump_index(reason);
            xdp_action::XDP_DROP
        }
        Decoded::Tunnel => pass(&pkt, xdp_action::XDP_PASS),
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
    match parse_counted(ctx.data(), ctx.data_end(), ctx.len() as usize, &mut pkt) {
        Parsed::Ip => {}
        Parsed::NonIp => return TC_ACT_OK,
        Parsed::Malformed => return TC_ACT_SHOT,
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
        Decoded::Pass => pass(&pkt, TC_ACT_OK),
        Decoded::Sent(action, verdict) => {
            counters::bump_index(verdict);
            action as i32
        }
        Decoded::Drop(reason) => {
            counters::bump_index(reason);
            TC_ACT_SHOT
        }
        // Only the TC decision step asks for the tunnel; it is resolved above.
        Decoded::Tunnel => pass(&pkt, TC_ACT_OK),
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

enum Parsed {
    Ip,
    NonIp,
    Malformed,
}

/// Parses the frame into `pkt` and counts it: non-IP frames are passed, malformed ones dropped.
#[inline(always)]
fn parse_counted(data: usize, data_end: usize, frame_len: usize, pkt: &mut Packet) -> Parsed {
    counters::bump(Counter::Packets);
    match parse::parse_frame(data, data_end, frame_len, pkt) {
        Ok(true) => {
            counters::bump(pkt.l4.counter());
            Parsed::Ip
        }
        Ok(false) => {
            counters::bump(Counter::PassNonIp);
            Parsed::NonIp
        }
        Err(reason) => {
            counters::bump(reason.counter());
            Parsed::Malformed
        }
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
