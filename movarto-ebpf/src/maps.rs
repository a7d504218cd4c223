//! Every map of the datapath. BTF-defined, so `bpftool map dump` is readable.

use aya_ebpf::{
    btf_maps::{Array, LruHashMap, PerCpuArray},
    macros::btf_map,
};
use movarto_common::{
    config::Config,
    counters::COUNTER_COUNT,
    flow::{FlowKey, FlowValue},
};

/// Default flow-map capacity; the loader can change it (`max_entries`) before loading.
pub const FLOWS_DEFAULT_CAPACITY: usize = 1 << 16;

/// Per-CPU verdict and drop counters, indexed by `movarto_common::counters::Counter`.
#[btf_map]
pub static COUNTERS: PerCpuArray<u64, { COUNTER_COUNT as usize }> = PerCpuArray::new();

/// The site's configuration (one entry; all zero means mode `idle`).
#[btf_map]
pub static CONFIG: Array<Config, 1> = Array::new();

/// Flows keyed from the service's side; see `movarto_common::flow`.
#[btf_map]
pub static FLOWS: LruHashMap<FlowKey, FlowValue, FLOWS_DEFAULT_CAPACITY> = LruHashMap::new();
