//! The recording of the frames sent into a VM's tap, attached to the tap's TC egress at
//! the source for the length of a migration (`movarto_common::recorder`). Each frame
//! goes to the VM untouched; a copy of it goes to this CPU's next slot.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::TC_ACT_OK,
    btf_maps::{Array, PerCpuArray},
    helpers::{bpf_get_smp_processor_id, bpf_ktime_get_ns, bpf_skb_load_bytes},
    macros::{btf_map, classifier},
    programs::TcContext,
};
use movarto_common::recorder::{FRAMES_PER_CPU, RECORDED_BYTES, RecordedFrame};

/// The slots, `FRAMES_PER_CPU` for each CPU; the loader sets the length.
#[btf_map]
static RECENT_FRAMES: Array<RecordedFrame, { FRAMES_PER_CPU as usize }> = Array::new();

/// Each CPU's next slot (counting up; taken modulo `FRAMES_PER_CPU`).
#[btf_map]
static RECENT_NEXT: PerCpuArray<u32, 1> = PerCpuArray::new();

#[classifier]
pub fn record_to_vm(ctx: TcContext) -> i32 {
    record(&ctx);
    TC_ACT_OK
}

#[inline(always)]
fn record(ctx: &TcContext) {
    let Some(next) = RECENT_NEXT.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's own counter; a TC program runs with preemption off, so no one
    // else on this CPU writes it meanwhile.
    let n = unsafe { *next };
    // SAFETY: as above.
    unsafe { *next = n.wrapping_add(1) };
    // SAFETY: a helper without arguments.
    let cpu = unsafe { bpf_get_smp_processor_id() };
    let index = cpu
        .wrapping_mul(FRAMES_PER_CPU)
        .wrapping_add(n % FRAMES_PER_CPU);
    let Some(slot) = RECENT_FRAMES.get_ptr_mut(index) else {
        return;
    };
    let len = ctx.len();
    let copy = if len > RECORDED_BYTES {
        RECORDED_BYTES
    } else {
        len
    };
    if copy == 0 {
        return;
    }
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: `slot` points into the map's value, which holds `RECORDED_BYTES` of data;
    // `copy` is at most that. The slot reads as unwritten (0) while it is being filled.
    unsafe {
        (*slot).ktime_ns = 0;
        let loaded = bpf_skb_load_bytes(
            ctx.skb.skb.cast(),
            0,
            (*slot).data.as_mut_ptr().cast(),
            copy,
        );
        (*slot).len = len;
        (*slot).ktime_ns = if loaded == 0 { now } else { 0 };
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
