//! Incrementing the per-CPU counters.

use movarto_common::counters::Counter;

use crate::maps::COUNTERS;

/// Adds one to `counter` on this CPU. Per-CPU slots need no atomics.
#[inline(always)]
pub fn bump(counter: Counter) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: the pointer is this CPU's slot of a map value; nothing else writes it now.
        unsafe { *slot += 1 };
    }
}
