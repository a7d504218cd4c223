//! Reading the per-CPU counter array.

use std::borrow::Borrow;

use anyhow::{Context as _, Result};
use aya::maps::{Map, MapData, PerCpuArray};
use movarto_common::counters::{COUNTER_COUNT, Counter};
use serde::{Serialize, Serializer, ser::SerializeMap as _};

/// The counters summed over all CPUs, at one instant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CounterSnapshot {
    values: [u64; COUNTER_COUNT as usize],
}

// Derived Default stops at 32-element arrays.
impl Default for CounterSnapshot {
    fn default() -> Self {
        Self {
            values: [0; COUNTER_COUNT as usize],
        }
    }
}

impl CounterSnapshot {
    pub(super) fn read(map: &Map) -> Result<Self> {
        Self::sum(&PerCpuArray::try_from(map).context("COUNTERS is not a per-CPU array")?)
    }

    /// Each counter summed over the CPUs' slots of `array`.
    pub(super) fn sum<T: Borrow<MapData>>(array: &PerCpuArray<T, u64>) -> Result<Self> {
        let mut values = [0u64; COUNTER_COUNT as usize];
        for counter in Counter::ALL {
            let per_cpu = array
                .get(&(counter as u32), 0)
                .with_context(|| format!("reading counter {}", counter.name()))?;
            values[counter as usize] = per_cpu.iter().sum();
        }
        Ok(Self { values })
    }

    /// One service's counters (its row of `SERVICE_COUNTERS`), summed over the CPUs.
    pub(super) fn of_service(per_cpu: &[movarto_common::service::ServiceCounters]) -> Self {
        let mut values = [0u64; COUNTER_COUNT as usize];
        for row in per_cpu {
            for (total, count) in values.iter_mut().zip(row.counts) {
                *total += count;
            }
        }
        Self { values }
    }

    /// The value of one counter.
    pub fn get(&self, counter: Counter) -> u64 {
        self.values[counter as usize]
    }

    /// Every counter with its value, in index order.
    pub fn iter(&self) -> impl Iterator<Item = (Counter, u64)> + '_ {
        Counter::ALL.into_iter().map(|c| (c, self.get(c)))
    }

    /// The counters that are not zero.
    pub fn nonzero(&self) -> Vec<(Counter, u64)> {
        self.iter().filter(|(_, v)| *v != 0).collect()
    }
}

impl Serialize for CounterSnapshot {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(Counter::ALL.len()))?;
        for (counter, value) in self.iter() {
            map.serialize_entry(counter.name(), &value)?;
        }
        map.end()
    }
}
