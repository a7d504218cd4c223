//! Loading movarto's eBPF object and reading its state.

mod attach;
pub mod budget;
mod config;
mod control;
mod counters;
mod flowmaps;
pub mod flows;
pub mod monitor;
pub mod recorder;
mod services;

use std::path::Path;

use anyhow::{Context as _, Result, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData},
    programs::{ProgramInfo, SchedClassifier, Xdp},
};

pub use attach::{
    ATTACHED_FLOWS_CAPACITY, AttachOptions, Owner, PIN_ROOT, Pinned, attach, check_pin_name,
    detach, forwarding_enabled, ifindex, netns_cookie, pin_dir,
};
pub use config::SiteConfig;
pub use control::{Detached, Status, detach_uplink, pin_name_or, require_forwarding, switch_mode};
pub use counters::CounterSnapshot;
use movarto_common::{
    config::{CONFIG_KEY, Config},
    flow::{FlowKey, FlowValue},
};
pub use services::{ServiceTable, key_of as service_key};

/// The eBPF object movarto-user's build.rs compiled from movarto-ebpf.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/movarto"));

/// The no-op programs the bench measures against (`movarto-ebpf/src/bin/noop.rs`).
pub static NOOP_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/movarto-noop"));

/// XDP program on the uplink's ingress.
pub const UPLINK_INGRESS: &str = "uplink_ingress";
/// TC program on the VM-facing interface's ingress.
pub const VM_INGRESS: &str = "vm_ingress";
/// Per-CPU counter array.
pub const COUNTERS_MAP: &str = "COUNTERS";
/// The uplink's node-wide configuration (one entry).
pub const CONFIG_MAP: &str = "CONFIG";
/// The services, by home address.
pub const SERVICES_MAP: &str = "SERVICES";
/// Every service address, `H` and `N`, to its home address.
pub const ADDRS_MAP: &str = "ADDRS";
/// The counting filter of every service address (fixed size, not set by `--services`).
pub const ADDR_FILTER_MAP: &str = "ADDR_FILTER";
/// The services' peers' tunnel endpoints.
pub const PEERS_MAP: &str = "PEERS";
/// Each service's per-CPU counters.
pub const SERVICE_COUNTERS_MAP: &str = "SERVICE_COUNTERS";
/// The maps sized by [`LoadOptions::services_capacity`].
const SERVICES_MAPS: [&str; 4] = [SERVICES_MAP, ADDRS_MAP, PEERS_MAP, SERVICE_COUNTERS_MAP];
/// The flow map (confirmed flows).
pub const FLOWS_MAP: &str = "FLOWS";
/// The pending flows' map (see `movarto_common::flow`).
pub const PENDING_FLOWS_MAP: &str = "PENDING_FLOWS";
/// What `monitor` listens for; see `movarto_common::monitor`.
pub const MONITOR_CONTROL_MAP: &str = "MONITOR_CONTROL";
/// The monitor's per-CPU sampling and rate-limit bookkeeping.
pub const MONITOR_STATE_MAP: &str = "MONITOR_STATE";
/// The ring buffer of monitor events.
pub const MONITOR_EVENTS_MAP: &str = "MONITOR_EVENTS";

/// How often a program load interrupted by a signal is tried again.
const LOAD_ATTEMPTS: usize = 5;

/// The verifier gives up with EAGAIN when a signal arrives mid-verification
/// (a busy process gets SIGCHLD and timers); libbpf retries such loads too.
pub(crate) fn retry_interrupted(
    mut load: impl FnMut() -> Result<(), aya::programs::ProgramError>,
) -> Result<(), aya::programs::ProgramError> {
    let mut attempt = 1;
    loop {
        match with_signals_blocked(&mut load) {
            Err(aya::programs::ProgramError::LoadError { io_error, .. })
                if io_error.raw_os_error() == Some(libc::EAGAIN) && attempt < LOAD_ATTEMPTS =>
            {
                tracing::debug!(attempt, "program load interrupted; retrying");
                attempt += 1;
            }
            other => return other,
        }
    }
}

/// Runs `f` with this thread's signals blocked (SIGKILL and SIGSTOP can't be), so
/// that the process's signals go to other threads, or wait, and don't cut the
/// verification short: a busy test process loading several programs at once
/// exhausted the retries once.
fn with_signals_blocked<T>(f: impl FnOnce() -> T) -> T {
    use nix::sys::signal::{SigSet, SigmaskHow, pthread_sigmask};
    let mut old = SigSet::empty();
    let blocked =
        pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&SigSet::all()), Some(&mut old)).is_ok();
    let result = f();
    if blocked {
        let _ = pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&old), None);
    }
    result
}

/// aya-log's level with every statement off (its levels start at 1, error).
const DEBUG_LOG_OFF: u8 = 0;

/// The datapath loaded into the kernel (verified), not yet attached anywhere.
pub struct Datapath {
    ebpf: Ebpf,
}

/// How to load the datapath.
#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    /// Capacity of the (confirmed) flow map; the object's default (65536) if `None`.
    pub flows_capacity: Option<u32>,
    /// Capacity of the pending flows' map; a quarter of the flow map's if `None`.
    pub pending_flows_capacity: Option<u32>,
    /// How many services the datapath holds at most;
    /// `movarto_common::service::SERVICES_DEFAULT_CAPACITY` if `None`.
    pub services_capacity: Option<u32>,
    /// Load with the programs' debug logs on (aya-log, read by `monitor --debug-log`).
    /// Off, the verifier prunes every log statement: they cost nothing.
    pub debug_log: bool,
}

impl LoadOptions {
    /// The flow maps' capacities as the kernel will create them: (confirmed, pending).
    pub fn capacities(&self) -> Result<(Option<u32>, Option<u32>)> {
        if self.flows_capacity == Some(0) || self.pending_flows_capacity == Some(0) {
            bail!("the flow maps need a capacity of at least 1");
        }
        let pending = self
            .pending_flows_capacity
            .or_else(|| self.flows_capacity.map(|c| (c / 4).max(1)));
        Ok((self.flows_capacity, pending))
    }
}

impl Datapath {
    /// Loads the object and every program in it through the verifier.
    pub fn load() -> Result<Self> {
        Self::load_with(&LoadOptions::default())
    }

    /// [`Datapath::load`] with options.
    pub fn load_with(opts: &LoadOptions) -> Result<Self> {
        let mut loader = EbpfLoader::new();
        let (confirmed, pending) = opts.capacities()?;
        if let Some(capacity) = confirmed {
            loader.map_max_entries(FLOWS_MAP, capacity);
        }
        if let Some(capacity) = pending {
            loader.map_max_entries(PENDING_FLOWS_MAP, capacity);
        }
        match opts.services_capacity {
            Some(0) => bail!("the services map needs a capacity of at least 1"),
            Some(capacity) => {
                for name in SERVICES_MAPS {
                    // PEERS also holds `ANY_PEER`; ADDRS both `H` and `N` of each.
                    let entries = match name {
                        PEERS_MAP => capacity.saturating_add(1),
                        ADDRS_MAP => capacity.saturating_mul(2),
                        _ => capacity,
                    };
                    loader.map_max_entries(name, entries);
                }
            }
            None => {}
        }
        let log_level = if opts.debug_log {
            aya_log::Level::Debug as u8
        } else {
            DEBUG_LOG_OFF
        };
        loader.override_global(aya_log::LEVEL, &log_level, true);
        let mut ebpf = loader
            .load(EBPF_OBJECT)
            .context("loading the movarto eBPF object (are you root, with BTF-enabled kernel?)")?;
        let xdp: &mut Xdp = program_mut(&mut ebpf, UPLINK_INGRESS)?;
        retry_interrupted(|| xdp.load())
            .with_context(|| format!("the verifier rejected {UPLINK_INGRESS}"))?;
        let tc: &mut SchedClassifier = program_mut(&mut ebpf, VM_INGRESS)?;
        retry_interrupted(|| tc.load())
            .with_context(|| format!("the verifier rejected {VM_INGRESS}"))?;
        Ok(Self { ebpf })
    }

    /// The uplink XDP program.
    pub fn uplink_ingress(&self) -> Result<&Xdp> {
        program(&self.ebpf, UPLINK_INGRESS)
    }

    /// The VM-facing TC program.
    pub fn vm_ingress(&self) -> Result<&SchedClassifier> {
        program(&self.ebpf, VM_INGRESS)
    }

    /// Kernel information about every loaded program, by name.
    pub fn program_infos(&self) -> Result<Vec<(String, ProgramInfo)>> {
        let mut infos = self
            .ebpf
            .programs()
            .map(|(name, prog)| {
                let info = prog
                    .info()
                    .with_context(|| format!("reading program info of {name}"))?;
                Ok((name.to_owned(), info))
            })
            .collect::<Result<Vec<_>>>()?;
        infos.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(infos)
    }

    /// Sums the per-CPU counters.
    pub fn counters(&self) -> Result<CounterSnapshot> {
        let map = self
            .ebpf
            .map(COUNTERS_MAP)
            .ok_or_else(|| anyhow!("map {COUNTERS_MAP} missing from the eBPF object"))?;
        CounterSnapshot::read(map)
    }

    /// Attaches the uplink program to `iface` for as long as this value lives
    /// (not pinned). In mode `idle` it passes everything, which also makes a
    /// veth deliver frames that XDP on its peer sends into it.
    pub fn attach_xdp(&mut self, iface: &str, mode: aya::programs::XdpMode) -> Result<()> {
        let xdp: &mut Xdp = program_mut(&mut self.ebpf, UPLINK_INGRESS)?;
        xdp.attach(iface, mode)
            .with_context(|| format!("attaching XDP to {iface}"))?;
        Ok(())
    }

    /// Makes `site` the uplink's configuration and its only service; the programs
    /// use it from their next packet. [`Datapath::services_mut`] adds more.
    pub fn set_config(&mut self, site: &SiteConfig) -> Result<()> {
        let config = site.to_map()?;
        self.set_uplink(&config::uplink_part(&config))?;
        self.services_mut()?.put_only(config).map(drop)
    }

    /// Writes the uplink's node-wide configuration (the services keep theirs).
    pub fn set_uplink(&mut self, uplink: &Config) -> Result<()> {
        let mut array: Array<&mut MapData, Config> = Array::try_from(
            self.ebpf
                .map_mut(CONFIG_MAP)
                .ok_or_else(|| anyhow!("map {CONFIG_MAP} missing from the eBPF object"))?,
        )
        .context("CONFIG is not an array")?;
        array
            .set(CONFIG_KEY, config::uplink_part(uplink), 0)
            .context("writing the uplink's configuration")
    }

    /// The one service's configuration, or the uplink's if it serves none.
    pub fn config(&self) -> Result<Config> {
        if let Some(service) = self.services()?.only()? {
            return Ok(service);
        }
        let array: Array<&MapData, Config> = Array::try_from(
            self.ebpf
                .map(CONFIG_MAP)
                .ok_or_else(|| anyhow!("map {CONFIG_MAP} missing from the eBPF object"))?,
        )
        .context("CONFIG is not an array")?;
        array
            .get(&CONFIG_KEY, 0)
            .context("reading the uplink's configuration")
    }

    /// The services, to read.
    pub fn services(&self) -> Result<ServiceTable<&MapData>> {
        let map = |name: &str| {
            self.ebpf
                .map(name)
                .ok_or_else(|| anyhow!("map {name} missing from the eBPF object"))
        };
        let capacity = match map(SERVICES_MAP)? {
            aya::maps::Map::HashMap(data) => data.info()?.max_entries(),
            _ => bail!("{SERVICES_MAP} is not a hash map"),
        };
        Ok(ServiceTable {
            services: HashMap::try_from(map(SERVICES_MAP)?)?,
            addrs: HashMap::try_from(map(ADDRS_MAP)?)?,
            filter: aya::maps::Array::try_from(map(ADDR_FILTER_MAP)?)?,
            peers: HashMap::try_from(map(PEERS_MAP)?)?,
            counters: aya::maps::PerCpuArray::try_from(map(SERVICE_COUNTERS_MAP)?)?,
            capacity,
        })
    }

    /// The services, to change.
    pub fn services_mut(&mut self) -> Result<ServiceTable<&mut MapData>> {
        let capacity = self.services()?.capacity;
        let mut maps: std::collections::HashMap<&str, &mut aya::maps::Map> = self
            .ebpf
            .maps_mut()
            .filter(|(name, _)| SERVICES_MAPS.contains(name) || *name == ADDR_FILTER_MAP)
            .collect();
        let mut take = |name: &str| {
            maps.remove(name)
                .ok_or_else(|| anyhow!("map {name} missing from the eBPF object"))
        };
        Ok(ServiceTable {
            services: HashMap::try_from(take(SERVICES_MAP)?)?,
            addrs: HashMap::try_from(take(ADDRS_MAP)?)?,
            filter: aya::maps::Array::try_from(take(ADDR_FILTER_MAP)?)?,
            peers: HashMap::try_from(take(PEERS_MAP)?)?,
            counters: aya::maps::PerCpuArray::try_from(take(SERVICE_COUNTERS_MAP)?)?,
            capacity,
        })
    }

    /// Every flow in the flow maps, confirmed first.
    pub fn flows(&self) -> Result<Vec<(FlowKey, FlowValue)>> {
        let mut flows = flowmaps::Collected::default();
        for name in [FLOWS_MAP, PENDING_FLOWS_MAP] {
            flows.add(&self.flow_map(name)?)?;
        }
        Ok(flows.into_vec())
    }

    fn flow_map(&self, name: &str) -> Result<HashMap<&MapData, FlowKey, FlowValue>> {
        HashMap::try_from(
            self.ebpf
                .map(name)
                .ok_or_else(|| anyhow!("map {name} missing from the eBPF object"))?,
        )
        .with_context(|| format!("{name} is not a hash map"))
    }

    /// How many flows the flow map holds at most, as the kernel created it.
    pub fn flows_capacity(&self) -> Result<u32> {
        self.capacity_of(FLOWS_MAP)
    }

    /// How many flows the pending flows' map holds at most.
    pub fn pending_flows_capacity(&self) -> Result<u32> {
        self.capacity_of(PENDING_FLOWS_MAP)
    }

    fn capacity_of(&self, name: &str) -> Result<u32> {
        match self.ebpf.map(name) {
            Some(aya::maps::Map::LruHashMap(data) | aya::maps::Map::HashMap(data)) => Ok(data
                .info()
                .with_context(|| format!("reading {name}'s information"))?
                .max_entries()),
            _ => bail!("map {name} missing from the eBPF object, or not a hash map"),
        }
    }

    /// Inserts (or overwrites) flows: the confirmed ones in the flow map, the others
    /// in the pending flows' map, as the datapath would hold them.
    pub fn insert_flows(
        &mut self,
        flows: impl IntoIterator<Item = (FlowKey, FlowValue)>,
    ) -> Result<()> {
        for (key, value) in flows {
            let name = flowmaps::map_for(&value);
            let mut map: HashMap<&mut MapData, FlowKey, FlowValue> = HashMap::try_from(
                self.ebpf
                    .map_mut(name)
                    .ok_or_else(|| anyhow!("map {name} missing from the eBPF object"))?,
            )
            .with_context(|| format!("{name} is not a hash map"))?;
            map.insert(key, value, 0)
                .with_context(|| format!("inserting into {name}"))?;
        }
        Ok(())
    }

    /// Pins every map and program under `dir` (which must be on a bpffs).
    pub fn pin(&mut self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        // Internal data sections (.rodata, .bss) are not pinned; bpffs refuses dot-names.
        for (name, map) in self.ebpf.maps().filter(|(name, _)| !name.starts_with('.')) {
            let path = dir.join(name);
            map.pin(&path)
                .with_context(|| format!("pinning map {name} at {}", path.display()))?;
        }
        for (name, prog) in self.ebpf.programs_mut() {
            let path = dir.join(name);
            prog.pin(&path)
                .with_context(|| format!("pinning program {name} at {}", path.display()))?;
        }
        Ok(())
    }
}

fn program<'a, T>(ebpf: &'a Ebpf, name: &str) -> Result<&'a T>
where
    &'a T: TryFrom<&'a aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let prog = ebpf
        .program(name)
        .ok_or_else(|| anyhow!("program {name} missing from the eBPF object"))?;
    prog.try_into()
        .with_context(|| format!("program {name} has an unexpected type"))
}

impl Datapath {
    /// A program of the object, by name and type.
    pub(crate) fn program_mut<'a, T>(&'a mut self, name: &str) -> Result<&'a mut T>
    where
        &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
    {
        program_mut(&mut self.ebpf, name)
    }
}

fn program_mut<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut T>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let prog = ebpf
        .program_mut(name)
        .ok_or_else(|| anyhow!("program {name} missing from the eBPF object"))?;
    prog.try_into()
        .with_context(|| format!("program {name} has an unexpected type"))
}
