//! Every map of the datapath. BTF-defined, so `bpftool map dump` is readable.

use aya_ebpf::{btf_maps::PerCpuArray, macros::btf_map};
use movarto_common::counters::COUNTER_COUNT;

/// Per-CPU verdict and drop counters, indexed by `movarto_common::counters::Counter`.
#[btf_map]
pub static COUNTERS: PerCpuArray<u64, { COUNTER_COUNT as usize }> = PerCpuArray::new();
