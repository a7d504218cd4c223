//! movarto's eBPF programs. Each entry point is a short dispatch; the work is
//! in one file per topic (parse, counters, maps).
#![no_std]
#![no_main]

mod counters;
mod maps;
mod parse;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT, xdp_action},
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};

use movarto_common::counters::Counter;

use crate::parse::{Frame, Verdict};

/// Parses the frame and counts the outcome. Packets this datapath has nothing
/// to do with yet are passed; malformed ones are dropped.
#[inline(always)]
fn classify(data: usize, data_end: usize) -> Verdict {
    counters::bump(Counter::Packets);
    match parse::parse_frame(data, data_end) {
        Ok(Frame::NonIp) => {
            counters::bump(Counter::PassNonIp);
            Verdict::Pass
        }
        Ok(Frame::Ipv4(l4)) => {
            counters::bump(l4.counter());
            counters::bump(Counter::PassIpv4);
            Verdict::Pass
        }
        Ok(Frame::Ipv6(l4)) => {
            counters::bump(l4.counter());
            counters::bump(Counter::PassIpv6);
            Verdict::Pass
        }
        Err(reason) => {
            counters::bump(reason.counter());
            Verdict::Drop
        }
    }
}

/// Uplink ingress (XDP): every packet arriving from the network.
#[xdp]
pub fn uplink_ingress(ctx: XdpContext) -> u32 {
    match classify(ctx.data(), ctx.data_end()) {
        Verdict::Pass => xdp_action::XDP_PASS,
        Verdict::Drop => xdp_action::XDP_DROP,
    }
}

/// VM-facing ingress (TC): every packet the VM sends.
#[classifier]
pub fn vm_ingress(ctx: TcContext) -> i32 {
    match classify(ctx.data(), ctx.data_end()) {
        Verdict::Pass => TC_ACT_OK,
        Verdict::Drop => TC_ACT_SHOT,
    }
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
