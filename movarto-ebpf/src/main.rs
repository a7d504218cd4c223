//! movarto's eBPF programs. Each entry point is a short dispatch on the mode;
//! the work is in one file per topic (parse, flows, mss, track, counters, maps).
#![no_std]
#![no_main]

mod counters;
mod flows;
mod forward;
mod maps;
mod mss;
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
    outcome::Outcome,
    parse::{Frame, Packet},
};

/// Uplink ingress (XDP): every packet arriving from the network.
#[xdp]
pub fn uplink_ingress(ctx: XdpContext) -> u32 {
    let pkt = match parse_counted(ctx.data(), ctx.data_end()) {
        Parsed::Ip(pkt) => pkt,
        Parsed::NonIp => return xdp_action::XDP_PASS,
        Parsed::Malformed => return xdp_action::XDP_DROP,
    };
    let Some(cfg) = CONFIG.get(CONFIG_KEY) else {
        return pass(&pkt, xdp_action::XDP_PASS);
    };
    let outcome = match cfg.mode() {
        Some(Mode::Track) => {
            track::from_uplink(&ctx, cfg, &pkt);
            Outcome::Pass
        }
        Some(Mode::Forward) => forward::from_uplink(&ctx, cfg, &pkt).into(),
        Some(Mode::Receive) => receive::from_uplink(&ctx, cfg, &pkt).into(),
        _ => Outcome::Pass,
    };
    match outcome {
        Outcome::Pass => pass(&pkt, xdp_action::XDP_PASS),
        Outcome::Sent(action, verdict) => {
            counters::bump(verdict);
            action
        }
        Outcome::Drop(reason) => {
            counters::bump(reason);
            xdp_action::XDP_DROP
        }
    }
}

/// VM-facing ingress (TC): every packet the VM sends.
#[classifier]
pub fn vm_ingress(ctx: TcContext) -> i32 {
    let pkt = match parse_counted(ctx.data(), ctx.data_end()) {
        Parsed::Ip(pkt) => pkt,
        Parsed::NonIp => return TC_ACT_OK,
        Parsed::Malformed => return TC_ACT_SHOT,
    };
    let Some(cfg): Option<&Config> = CONFIG.get(CONFIG_KEY) else {
        return pass(&pkt, TC_ACT_OK);
    };
    if let Some(Mode::Track) = cfg.mode() {
        track::from_vm(&ctx, cfg, &pkt);
    }
    pass(&pkt, TC_ACT_OK)
}

enum Parsed {
    Ip(Packet),
    NonIp,
    Malformed,
}

/// Parses the frame and counts it: non-IP frames are passed, malformed ones dropped.
#[inline(always)]
fn parse_counted(data: usize, data_end: usize) -> Parsed {
    counters::bump(Counter::Packets);
    match parse::parse_frame(data, data_end) {
        Ok(Frame::Ip(pkt)) => {
            counters::bump(pkt.l4.counter());
            Parsed::Ip(pkt)
        }
        Ok(Frame::NonIp) => {
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
