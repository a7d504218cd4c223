//! Incrementing the per-CPU counters.

use movarto_common::counters::Counter;

use crate::maps::{COUNTERS, SERVICE_COUNTERS};

/// Adds one to `counter` on this CPU. Per-CPU slots need no atomics.
#[inline(always)]
pub fn bump(counter: Counter) {
    bump_index(counter as u32);
}

/// [`bump`] by the counter's index.
#[inline(always)]
pub fn bump_index(index: u32) {
    if let Some(slot) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: the pointer is this CPU's slot of a map value; nothing else writes it now.
        unsafe { *slot += 1 };
    }
}

/// Row of the per-service counters for a packet of no service.
pub const NO_SERVICE: u32 = u32::MAX;

/// [`bump_index`], and the same counter of the service in row `slot` (unless
/// [`NO_SERVICE`]).
#[inline(always)]
pub fn bump_verdict(slot: u32, index: u32) {
    bump_index(index);
    if slot == NO_SERVICE {
        return;
    }
    if let Some(row) = SERVICE_COUNTERS.get_ptr_mut(slot)
        // SAFETY: this CPU's row of a per-CPU map value; nothing else writes it now.
        && let Some(count) = unsafe { (*row).counts.get_mut(index as usize) }
    {
        *count += 1;
    }
}
