//! The verdicts `movarto-user monitor` listens for, and the programs' debug logs.
//! Costs and the wire format: `movarto_common::monitor`.

use aya_ebpf::{
    EbpfContext,
    helpers::bpf_ktime_get_ns,
    programs::{TcContext, XdpContext},
};
use aya_log_ebpf::debug;
use movarto_common::monitor::{MonitorControl, MonitorEvent, kind};

use crate::{
    maps::{MONITOR_CONTROL, MONITOR_EVENTS, MONITOR_STATE},
    parse::Packet,
};

const NS_PER_SECOND: u64 = 1_000_000_000;

/// Where a context's packet came in, for the event.
pub trait Ingress: EbpfContext {
    fn ifindex(&self) -> u32;
    fn frame_len(&self) -> u32;
}

impl Ingress for XdpContext {
    #[inline(always)]
    fn ifindex(&self) -> u32 {
        self.ingress_ifindex() as u32
    }

    #[inline(always)]
    fn frame_len(&self) -> u32 {
        (self.data_end() - self.data()) as u32
    }
}

impl Ingress for TcContext {
    #[inline(always)]
    fn ifindex(&self) -> u32 {
        // SAFETY: reading a field of our own context.
        unsafe { (*self.skb.skb).ifindex }
    }

    #[inline(always)]
    fn frame_len(&self) -> u32 {
        self.len()
    }
}

/// Reports a verdict movarto gave (`counter`, of kind `kind` seen at `hook`): a debug
/// log line if the object was loaded with logs on, and an event if someone listens.
/// Other tenants' packets never come here. Its own BPF function, called after the
/// mode handler returned, so its frame never stacks on a handler's.
#[inline(never)]
pub fn report<C: Ingress>(ctx: &C, kind_and_hook: u32, counter: u32, pkt: &Packet) {
    // Pruned by the verifier unless loaded with logs on (AYA_LOG_LEVEL, in .rodata).
    debug!(
        ctx,
        "verdict {} (kind {:x}) proto {} ports {}>{}",
        counter,
        kind_and_hook & 0xff,
        pkt.protocol,
        u16::from_be(pkt.src_port),
        u16::from_be(pkt.dst_port)
    );
    let Some(control) = MONITOR_CONTROL.get(0) else {
        return;
    };
    if control.until_ns != 0 {
        emit(ctx, control, kind_and_hook, counter, pkt);
    }
}

/// [`report`]'s event: filtered, sampled and rate-limited per CPU, then written.
#[inline(always)]
fn emit<C: Ingress>(
    ctx: &C,
    control: &MonitorControl,
    kind_and_hook: u32,
    counter: u32,
    pkt: &Packet,
) {
    // SAFETY: the helper has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let event_kind = (kind_and_hook & 0xff) as u8;
    if now >= control.until_ns || control.types & event_kind == 0 {
        return;
    }
    if control.service_family != 0
        && (pkt.family != control.service_family
            || (pkt.src_addr != control.service_addr && pkt.dst_addr != control.service_addr))
    {
        return;
    }
    let Some(state) = MONITOR_STATE.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's slot of a per-CPU map value; nothing else writes it now.
    let state = unsafe { &mut *state };
    state.seen += 1;
    if control.sample_every > 1 && state.seen % u64::from(control.sample_every) != 0 {
        state.sampled_out += 1;
        return;
    }
    if control.max_per_second != 0 {
        if now.wrapping_sub(state.window_start_ns) >= NS_PER_SECOND {
            state.window_start_ns = now;
            state.window_count = 0;
        }
        if state.window_count >= u64::from(control.max_per_second) {
            state.rate_limited += 1;
            return;
        }
        state.window_count += 1;
    }
    let Some(mut entry) = MONITOR_EVENTS.reserve(0) else {
        state.ring_full += 1;
        return;
    };
    entry.write(MonitorEvent {
        time_ns: now,
        counter,
        ifindex: ctx.ifindex(),
        frame_len: ctx.frame_len(),
        kind: event_kind,
        hook: (kind_and_hook >> 8) as u8,
        family: pkt.family,
        protocol: pkt.protocol,
        src_port: pkt.src_port,
        dst_port: pkt.dst_port,
        tcp_flags: pkt.tcp_flags,
        _pad: [0; 7],
        src_addr: pkt.src_addr,
        dst_addr: pkt.dst_addr,
    });
    entry.submit(0);
    state.emitted += 1;
}

/// The `kind_and_hook` argument of [`report`].
#[inline(always)]
pub const fn kind_and_hook(event_kind: u8, hook: u8) -> u32 {
    event_kind as u32 | (hook as u32) << 8
}

/// [`kind_and_hook`] of a drop.
#[inline(always)]
pub const fn drop_at(hook: u8) -> u32 {
    kind_and_hook(kind::DROP, hook)
}
