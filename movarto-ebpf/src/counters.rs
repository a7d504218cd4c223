//! Incrementing the per-CPU counters.

use movarto_common::counters::Counter;

use crate::maps::COUNTERS;

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
