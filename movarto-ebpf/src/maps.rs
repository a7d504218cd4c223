//! Every map of the datapath. BTF-defined, so `bpftool map dump` is readable.

use aya_ebpf::{
    btf_maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
    macros::btf_map,
};
use movarto_common::{
    config::Config,
    counters::COUNTER_COUNT,
    flow::{FlowKey, FlowValue},
    monitor::{MonitorControl, MonitorEvent, MonitorState},
    service::{
        ADDR_FILTER_BUCKETS, AddrKey, PeerUsers, SERVICES_DEFAULT_CAPACITY, ServiceCounters,
    },
};

/// The services maps' compiled capacity; the loader sets each to the attach's.
const SERVICES_CAPACITY: usize = SERVICES_DEFAULT_CAPACITY as usize;

/// Default flow-map capacity; the loader can change it (`max_entries`) before loading.
pub const FLOWS_DEFAULT_CAPACITY: usize = 1 << 16;
/// Default capacity of the pending flows' map (a quarter of the flow map's); the loader
/// changes it with the flow map's.
pub const PENDING_FLOWS_DEFAULT_CAPACITY: usize = FLOWS_DEFAULT_CAPACITY / 4;

/// Per-CPU verdict and drop counters, indexed by `movarto_common::counters::Counter`.
#[btf_map]
pub static COUNTERS: PerCpuArray<u64, { COUNTER_COUNT as usize }> = PerCpuArray::new();

/// The uplink's node-wide configuration (one entry; see `movarto_common::config`).
#[btf_map]
pub static CONFIG: Array<Config, 1> = Array::new();

/// Every service of the node, keyed by its home address `H`.
#[btf_map]
pub static SERVICES: HashMap<AddrKey, Config, SERVICES_CAPACITY> = HashMap::new();

/// Every service address, `H` and `N`, to its `H` (the key of [`SERVICES`]): the
/// uplink's one lookup by destination, which another tenant's packet misses.
#[btf_map]
pub static ADDRS: HashMap<AddrKey, AddrKey, { 2 * SERVICES_CAPACITY }> = HashMap::new();

/// How many service addresses fold to each bucket (`movarto_common::service::filter_bucket`):
/// a destination whose bucket is 0 is no service's, told by one array read.
#[btf_map]
pub static ADDR_FILTER: Array<u32, { ADDR_FILTER_BUCKETS as usize }> = Array::new();

/// The tunnel endpoints of the services' peers, with how many services use each,
/// and `ANY_PEER`: one more entry than services.
#[btf_map]
pub static PEERS: HashMap<AddrKey, PeerUsers, { SERVICES_CAPACITY + 1 }> = HashMap::new();

/// Per-CPU verdict and drop counters of each service, by its `Config::slot`.
#[btf_map]
pub static SERVICE_COUNTERS: PerCpuArray<ServiceCounters, SERVICES_CAPACITY> = PerCpuArray::new();

/// Confirmed flows (established, or answered), keyed from the service's side; see
/// `movarto_common::flow`. Only a flow confirmed in [`PENDING_FLOWS`] enters it, so a
/// flood of new 5-tuples never evicts one.
#[btf_map]
pub static FLOWS: LruHashMap<FlowKey, FlowValue, FLOWS_DEFAULT_CAPACITY> = LruHashMap::new();

/// Where a new flow's entry is built before it is inserted (one per CPU): a map
/// value, not the stack, which the callers' frames need.
#[btf_map]
pub static FLOW_SCRATCH: PerCpuArray<FlowValue, 1> = PerCpuArray::new();

/// Flows not confirmed yet: a SYN, or packets one way only. Every new flow starts
/// here; a flood churns this map and nothing else.
#[btf_map]
pub static PENDING_FLOWS: LruHashMap<FlowKey, FlowValue, PENDING_FLOWS_DEFAULT_CAPACITY> =
    LruHashMap::new();

/// What `movarto-user monitor` listens for (one entry; all zero: nobody listens).
#[btf_map]
pub static MONITOR_CONTROL: Array<MonitorControl, 1> = Array::new();

/// The monitor's sampling and rate-limit bookkeeping, one entry per CPU.
#[btf_map]
pub static MONITOR_STATE: PerCpuArray<MonitorState, 1> = PerCpuArray::new();

/// Size of the monitor's ring buffer: about 3,200 events of 72 bytes (plus the
/// kernel's 8-byte header each) between two reads by the listener.
pub const MONITOR_EVENTS_BYTES: usize = 256 * 1024;

/// The verdicts `movarto-user monitor` reads, as [`MonitorEvent`]s.
#[btf_map]
pub static MONITOR_EVENTS: RingBuf<MonitorEvent, MONITOR_EVENTS_BYTES> = RingBuf::new();
