//! Attaching the datapath to a host's interfaces and finding it again.
//!
//! Everything is pinned under `/sys/fs/bpf/movarto/<pin name>/`: the maps,
//! the programs and the links. The pin name defaults to the uplink's name;
//! bpffs is one for all network namespaces, so two sites on one machine whose
//! uplinks share a name (`eth0` in two namespaces) need distinct pin names.
//! The configuration records the uplink's ifindex and network namespace, so a
//! clash is refused with a clear message rather than adopted. The pinned links keep the programs attached after
//! the manager exits or crashes; removing the directory detaches them.

use std::{
    fs,
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, anyhow, bail};
use aya::{
    maps::{Array, HashMap, MapData, PerCpuArray, PerCpuValues},
    programs::{
        SchedClassifier, TcAttachType, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        tc,
    },
};
use movarto_common::{
    config::{CONFIG_KEY, Config, Mode},
    counters::Counter,
    flow::{FlowKey, FlowValue},
};

use super::{
    ADDR_FILTER_MAP, ADDRS_MAP, CONFIG_MAP, COUNTERS_MAP, CounterSnapshot, Datapath, FLOWS_MAP,
    LoadOptions, PEERS_MAP, PENDING_FLOWS_MAP, SERVICE_COUNTERS_MAP, SERVICES_MAP, ServiceTable,
    SiteConfig, UPLINK_INGRESS, VM_INGRESS, flowmaps,
};

/// Root of movarto's pins.
pub const PIN_ROOT: &str = "/sys/fs/bpf/movarto";
const UPLINK_LINK: &str = "link_uplink_xdp";
const VM_LINK: &str = "link_vm_tc";

/// Where the datapath pinned under `pin_name` (by default its uplink's name) lives.
pub fn pin_dir(pin_name: &str) -> PathBuf {
    Path::new(PIN_ROOT).join(pin_name)
}

/// Fails unless `name` is usable as one directory name on bpffs.
pub fn check_pin_name(name: &str) -> Result<()> {
    if name.is_empty()
        || name.len() > 255
        || name.starts_with('.')
        || name.contains('/')
        || name.contains('\0')
    {
        bail!(
            "bad pin name {name:?}: it must be one non-empty path component, not starting with '.'"
        );
    }
    Ok(())
}

/// How to attach.
pub struct AttachOptions {
    pub uplink: String,
    /// The first service's VM-facing interface; `None` attaches the uplink alone
    /// (services come later, `movarto-user service add`).
    pub vm_iface: Option<String>,
    pub xdp_mode: XdpMode,
    /// The node-wide settings (tunnel endpoint, GUE port, tunnel MTU, gateway MAC)
    /// and, with `vm_iface`, the first service.
    pub site: SiteConfig,
    /// How many services the uplink holds at most;
    /// `movarto_common::service::SERVICES_DEFAULT_CAPACITY` if `None`.
    pub services_capacity: Option<u32>,
    /// The directory under [`PIN_ROOT`]; the uplink's name if `None`.
    pub pin_name: Option<String>,
    /// Capacity of the flow map; [`ATTACHED_FLOWS_CAPACITY`] if `None`. The pending
    /// flows' map gets a quarter of it.
    pub flows_capacity: Option<u32>,
    /// Load with the programs' debug logs on ([`super::LoadOptions::debug_log`]).
    pub debug_log: bool,
}

/// The flow map's capacity on an attached uplink unless told otherwise: a million
/// flows, Cilium's default for TCP conntrack; about 200 MB of kernel memory with
/// the pending map (see `movarto_common::flow`).
pub const ATTACHED_FLOWS_CAPACITY: u32 = 1 << 20;

impl AttachOptions {
    /// The pin name in effect.
    pub fn pin_name(&self) -> &str {
        self.pin_name.as_deref().unwrap_or(&self.uplink)
    }
}

/// The cookie of the calling thread's network namespace (`SO_NETNS_COOKIE`).
pub fn netns_cookie() -> Result<u64> {
    // SAFETY: plain syscall; the descriptor is closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error())
            .context("opening a socket to read the network namespace cookie");
    }
    let mut cookie = 0u64;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: valid descriptor, out-pointer and length.
    let ret = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    let err = std::io::Error::last_os_error();
    // SAFETY: our own descriptor.
    unsafe { libc::close(fd) };
    if ret != 0 {
        return Err(err).context("reading SO_NETNS_COOKIE (Linux 5.14 or later)");
    }
    Ok(cookie)
}

/// Whose pins these are, from the pinned configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Owner {
    pub uplink_ifindex: u32,
    pub netns_cookie: u64,
}

impl Owner {
    fn of(config: &Config) -> Self {
        Self {
            uplink_ifindex: config.uplink_ifindex,
            netns_cookie: config.netns_cookie,
        }
    }

    /// Whether the datapath was attached to `uplink` in the calling thread's namespace.
    pub fn is(&self, uplink: &str) -> Result<bool> {
        Ok(self.netns_cookie == netns_cookie()? && self.uplink_ifindex == ifindex(uplink)?)
    }

    /// Says whose the pins are, relative to `uplink` here.
    fn describe(&self, uplink: &str) -> Result<String> {
        let here = netns_cookie()?;
        Ok(if self.netns_cookie != here {
            format!(
                "the datapath of ifindex {} in another network namespace (cookie {}, this one is {here})",
                self.uplink_ifindex, self.netns_cookie
            )
        } else if ifindex(uplink).ok() != Some(self.uplink_ifindex) {
            format!(
                "the datapath of another interface (ifindex {}) in this network namespace",
                self.uplink_ifindex
            )
        } else {
            format!("the datapath of {uplink} in this network namespace")
        })
    }
}

/// A numeric field (`key:\tvalue`) of a /proc fdinfo file.
fn fdinfo_field(text: &str, key: &str) -> Option<u32> {
    text.lines().find_map(|line| {
        line.strip_prefix(key)?
            .strip_prefix(':')?
            .trim()
            .parse()
            .ok()
    })
}

/// The interface index of `name`.
pub fn ifindex(name: &str) -> Result<u32> {
    nix::net::if_::if_nametoindex(name)
        .map_err(|_| anyhow!("no interface named {name} in this network namespace"))
}

/// Whether the kernel forwards IPv4 (or IPv6) on `iface`; the tunnel's routing needs it.
pub fn forwarding_enabled(iface: &str, ipv6: bool) -> Result<bool> {
    // Name the missing interface, not the sysctl file it would have.
    ifindex(iface)?;
    let family = if ipv6 { "ipv6" } else { "ipv4" };
    let path = format!("/proc/sys/net/{family}/conf/{iface}/forwarding");
    let value = fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    Ok(value.trim() == "1")
}

/// Fails unless /sys/fs/bpf is a bpf filesystem in this mount namespace.
fn require_bpffs() -> Result<()> {
    use nix::sys::statfs::{BPF_FS_MAGIC, statfs};
    if !statfs("/sys/fs/bpf").is_ok_and(|st| st.filesystem_type() == BPF_FS_MAGIC) {
        bail!(
            "/sys/fs/bpf is not a bpf filesystem here: mount it (`mount -t bpf bpf /sys/fs/bpf`, \
             or `cargo xtask setup`). Inside a network namespace use `nsenter --net=/run/netns/NAME`, \
             not `ip netns exec`, which remounts /sys and hides the host's pins"
        );
    }
    Ok(())
}

/// Loads, configures, attaches and pins the datapath. On failure nothing stays attached or pinned.
pub fn attach(opts: &AttachOptions) -> Result<PathBuf> {
    require_bpffs()?;
    let pin_name = opts.pin_name();
    check_pin_name(pin_name)?;
    let dir = pin_dir(pin_name);
    if dir.exists() {
        let owner = match Pinned::open_at(&dir).and_then(|p| p.owner()) {
            Ok(owner) => owner,
            Err(err) => bail!(
                "{} exists but is not a readable movarto datapath ({err:#}); remove it or choose \
                 another pin name (--pin-name)",
                dir.display()
            ),
        };
        if owner.is(&opts.uplink)? {
            bail!(
                "movarto is already attached to {} (pinned at {}); run `movarto-user detach {}` first",
                opts.uplink,
                dir.display(),
                opts.uplink
            );
        }
        bail!(
            "pin name {pin_name:?} is taken: {} holds {}. bpffs is shared by all network \
             namespaces; attach with another pin name (--pin-name)",
            dir.display(),
            owner.describe(&opts.uplink)?
        );
    }
    let mut site = opts.site.clone();
    site.uplink_ifindex = ifindex(&opts.uplink)?;
    if let Some(vm_iface) = &opts.vm_iface {
        site.vm_ifindex = ifindex(vm_iface)?;
    }
    site.netns_cookie = netns_cookie()?;
    let mut datapath = Datapath::load_with(&LoadOptions {
        flows_capacity: Some(opts.flows_capacity.unwrap_or(ATTACHED_FLOWS_CAPACITY)),
        services_capacity: opts.services_capacity,
        debug_log: opts.debug_log,
        ..LoadOptions::default()
    })?;
    if opts.vm_iface.is_some() {
        datapath.set_config(&site)?;
    } else {
        datapath.set_uplink(&site.to_map()?)?;
    }

    fs::create_dir_all(&dir).with_context(|| {
        format!(
            "creating {} (is bpffs mounted at /sys/fs/bpf?)",
            dir.display()
        )
    })?;
    let cleanup = RemoveOnError(Some(dir.clone()));

    let xdp: &mut Xdp = datapath.program_mut(UPLINK_INGRESS)?;
    let id = xdp
        .attach(&opts.uplink, opts.xdp_mode)
        .with_context(|| format!("attaching XDP to {}", opts.uplink))?;
    let link =
        FdLink::try_from(xdp.take_link(id)?).context("the XDP attachment is not a bpf_link")?;
    link.pin(dir.join(UPLINK_LINK))
        .context("pinning the XDP link")?;

    if let Some(vm_iface) = &opts.vm_iface {
        let tc_prog: &mut SchedClassifier = datapath.program_mut(VM_INGRESS)?;
        attach_tc(tc_prog, vm_iface, &vm_link(&dir, site.vm_ifindex))?;
    }

    datapath.pin(&dir)?;
    cleanup.disarm();
    Ok(dir)
}

/// Attaches the VM-facing program to `iface`'s ingress and pins the link at `link_pin`.
fn attach_tc(tc_prog: &mut SchedClassifier, iface: &str, link_pin: &Path) -> Result<()> {
    // clsact is only needed without TCX (kernels before 6.6); it may exist already.
    let _ = tc::qdisc_add_clsact(iface);
    let id = tc_prog
        .attach(iface, TcAttachType::Ingress)
        .with_context(|| format!("attaching TC ingress to {iface}"))?;
    let link = FdLink::try_from(tc_prog.take_link(id)?)
        .context("the TC attachment is not a bpf_link (TCX needs Linux 6.6)")?;
    link.pin(link_pin)
        .with_context(|| format!("pinning the TC link of {iface}"))?;
    Ok(())
}

/// The pin of the VM-facing link on interface `vm_ifindex`: one per interface that
/// some service's VM is on.
fn vm_link(dir: &Path, vm_ifindex: u32) -> PathBuf {
    dir.join(format!("{VM_LINK}_{vm_ifindex}"))
}

/// Detaches the datapath pinned under `pin_name` (by default the uplink's
/// name) by removing its pins. It may belong to any network namespace; see
/// [`Pinned::owner`] to check first.
pub fn detach(pin_name: &str) -> Result<()> {
    require_bpffs()?;
    check_pin_name(pin_name)?;
    let dir = pin_dir(pin_name);
    if !dir.exists() {
        bail!(
            "movarto is not attached under pin name {pin_name} (nothing pinned at {})",
            dir.display()
        );
    }
    fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))
}

/// Removes a half-made pin directory unless disarmed.
struct RemoveOnError(Option<PathBuf>);

impl RemoveOnError {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for RemoveOnError {
    fn drop(&mut self) {
        if let Some(dir) = self.0.take() {
            let _ = fs::remove_dir_all(dir);
        }
    }
}

/// The maps of an attached datapath, opened from their pins.
pub struct Pinned {
    pub dir: PathBuf,
    config: Array<MapData, Config>,
    counters: PerCpuArray<MapData, u64>,
    /// Confirmed flows.
    flows: HashMap<MapData, FlowKey, FlowValue>,
    /// Flows not confirmed yet.
    pending: HashMap<MapData, FlowKey, FlowValue>,
    /// The node's services.
    pub services: ServiceTable<MapData>,
    /// How many flows each map holds at most.
    pub flows_capacity: u32,
    pub pending_flows_capacity: u32,
}

impl Pinned {
    /// Opens the datapath pinned under `pin_name` (by default the uplink's
    /// name), whatever network namespace it belongs to; see [`Pinned::owner`].
    pub fn open(pin_name: &str) -> Result<Self> {
        require_bpffs()?;
        check_pin_name(pin_name)?;
        let dir = pin_dir(pin_name);
        if !dir.exists() {
            bail!(
                "movarto is not attached under pin name {pin_name} (nothing pinned at {})",
                dir.display()
            );
        }
        Self::open_at(&dir)
    }

    /// Opens the datapath pinned under `pin_name` and checks that it is the
    /// one attached to `uplink` in the calling thread's network namespace.
    pub fn open_for(uplink: &str, pin_name: &str) -> Result<Self> {
        let pinned = Self::open(pin_name)?;
        pinned.check_owner(uplink)?;
        Ok(pinned)
    }

    /// Fails unless this is the datapath attached to `uplink` in the calling thread's
    /// network namespace.
    pub fn check_owner(&self, uplink: &str) -> Result<()> {
        let owner = self.owner()?;
        if !owner.is(uplink)? {
            bail!(
                "{} holds {}, not {uplink}'s here; bpffs is shared by all network namespaces, \
                 so pass the pin name this site attached with (--pin-name)",
                self.dir.display(),
                owner.describe(uplink)?
            );
        }
        Ok(())
    }

    /// Whose pins these are.
    pub fn owner(&self) -> Result<Owner> {
        Ok(Owner::of(&self.uplink()?))
    }

    /// Whether the uplink this datapath was attached to is gone (deleted, or with its network
    /// namespace): the kernel then detaches the pinned XDP link, which reports ifindex 0.
    pub fn uplink_gone(&self) -> Result<bool> {
        let path = self.dir.join(UPLINK_LINK);
        let link = FdLink::from(
            PinnedLink::from_pin(&path).with_context(|| format!("opening {}", path.display()))?,
        );
        let id = link
            .info()
            .with_context(|| format!("reading {}", path.display()))?
            .id();
        // aya does not hand out the link's descriptor; its fdinfo (the only place the
        // kernel names the interface) is found by the link id instead.
        let fdinfo = fs::read_dir("/proc/self/fdinfo").context("reading /proc/self/fdinfo")?;
        for entry in fdinfo.flatten() {
            let text = fs::read_to_string(entry.path()).unwrap_or_default();
            if fdinfo_field(&text, "link_id") == Some(id) {
                return Ok(fdinfo_field(&text, "ifindex") == Some(0));
            }
        }
        bail!("no fdinfo names link {id} of {}", path.display())
    }

    /// Opens the maps pinned in `dir` (as [`Datapath::pin`] leaves them).
    pub fn open_at(dir: &Path) -> Result<Self> {
        let dir = dir.to_path_buf();
        let map_data = |name: &str| -> Result<MapData> {
            let path = dir.join(name);
            MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))
        };
        let map = |name: &str| -> Result<aya::maps::Map> {
            aya::maps::Map::from_map_data(map_data(name)?).with_context(|| format!("map {name}"))
        };
        let capacity = |name: &str| -> Result<u32> {
            Ok(map_data(name)?
                .info()
                .with_context(|| format!("reading {name}'s information"))?
                .max_entries())
        };
        Ok(Self {
            flows_capacity: capacity(FLOWS_MAP)?,
            pending_flows_capacity: capacity(PENDING_FLOWS_MAP)?,
            config: Array::try_from(map(CONFIG_MAP)?).context("CONFIG")?,
            services: ServiceTable {
                capacity: capacity(SERVICES_MAP).with_context(|| {
                    format!("{SERVICES_MAP} (pins made by a movarto before services: detach and attach again)")
                })?,
                services: HashMap::try_from(map(SERVICES_MAP)?).context("SERVICES")?,
                addrs: HashMap::try_from(map(ADDRS_MAP)?).context("ADDRS")?,
                filter: Array::try_from(map(ADDR_FILTER_MAP)?).with_context(|| {
                    format!("{ADDR_FILTER_MAP} (pins made by a movarto before the address filter: detach and attach again)")
                })?,
                peers: HashMap::try_from(map(PEERS_MAP)?).context("PEERS")?,
                counters: PerCpuArray::try_from(map(SERVICE_COUNTERS_MAP)?)
                    .context("SERVICE_COUNTERS")?,
            },
            counters: PerCpuArray::try_from(map(COUNTERS_MAP)?).context("COUNTERS")?,
            flows: HashMap::try_from(map(FLOWS_MAP)?).context("FLOWS")?,
            pending: HashMap::try_from(map(PENDING_FLOWS_MAP)?).with_context(|| {
                format!(
                    "{PENDING_FLOWS_MAP} (pins made by a movarto before the pending flows' map: \
                     detach and attach again)"
                )
            })?,
            dir,
        })
    }

    /// The uplink's node-wide configuration.
    pub fn uplink(&self) -> Result<Config> {
        self.config
            .get(&CONFIG_KEY, 0)
            .context("reading the uplink's configuration")
    }

    /// The one service's configuration, or the uplink's if it serves none; an error
    /// if it serves several (see [`Pinned::services`]).
    pub fn config(&self) -> Result<Config> {
        match self.services.only()? {
            Some(service) => Ok(service),
            None => self.uplink(),
        }
    }

    /// Switches the one service's mode: one map write, no reload.
    pub fn set_mode(&mut self, mode: Mode) -> Result<()> {
        self.set_service_mode(None, mode)
    }

    /// Makes `site` the only service and rewrites the uplink's node-wide part from it;
    /// the flows stay. The interface indexes are kept from the attached configuration.
    pub fn reconfigure(&mut self, site: &SiteConfig) -> Result<()> {
        let uplink = self.uplink()?;
        let current = self.config()?;
        let mut site = site.clone();
        site.uplink_ifindex = uplink.uplink_ifindex;
        site.vm_ifindex = current.vm_ifindex;
        site.netns_cookie = uplink.netns_cookie;
        let config = site.to_map()?;
        self.config
            .set(CONFIG_KEY, super::config::uplink_part(&config), 0)
            .context("writing the uplink's configuration")?;
        self.services.put_only(config).map(drop)
    }

    /// Adds a service on VM-facing interface `vm_iface` (this namespace's), attaching
    /// the VM-facing program there unless a service or `attach` did already. The
    /// node-wide fields come from the uplink. Returns it as written.
    pub fn add_service(&mut self, site: &SiteConfig, vm_iface: &str) -> Result<Config> {
        let config = self.service_entry(site, vm_iface)?;
        self.ensure_vm_link(vm_iface, config.vm_ifindex)?;
        let added = self.services.add(config);
        if added.is_err() {
            self.release_unused_link(config.vm_ifindex)?;
        }
        added
    }

    /// Replaces the service `site.home_addr` (its counters stay); the same as
    /// [`Pinned::add_service`] otherwise.
    pub fn set_service(&mut self, site: &SiteConfig, vm_iface: &str) -> Result<Config> {
        let config = self.service_entry(site, vm_iface)?;
        let old = self.services.get(site.home_addr)?.ok_or_else(|| {
            anyhow!(
                "no service {}; add it with `movarto-user service add`",
                site.home_addr
            )
        })?;
        self.ensure_vm_link(vm_iface, config.vm_ifindex)?;
        let set = self.services.set(config)?;
        if old.vm_ifindex != set.vm_ifindex {
            self.release_unused_link(old.vm_ifindex)?;
        }
        Ok(set)
    }

    /// Removes the service `home`, and its interface's VM-facing link if no other
    /// service uses that interface. Its flows stay until they expire.
    pub fn remove_service(&mut self, home: IpAddr) -> Result<Config> {
        let old = self.services.remove(home)?;
        self.release_unused_link(old.vm_ifindex)?;
        Ok(old)
    }

    /// A service's map entry: `site`'s service fields on this uplink.
    fn service_entry(&self, site: &SiteConfig, vm_iface: &str) -> Result<Config> {
        let uplink = self.uplink()?;
        let mut site = site.clone();
        site.vm_ifindex = ifindex(vm_iface)?;
        let service = site.to_map()?;
        let config = super::config::service_on(&uplink, &service);
        super::config::check_map_tunnel(site.mode, &config)?;
        Ok(config)
    }

    /// Attaches the VM-facing program to `vm_iface` unless its link is there already.
    fn ensure_vm_link(&self, vm_iface: &str, vm_ifindex: u32) -> Result<()> {
        let link = vm_link(&self.dir, vm_ifindex);
        if link.exists() {
            return Ok(());
        }
        let path = self.dir.join(VM_INGRESS);
        let mut tc_prog = SchedClassifier::from_pin(&path)
            .with_context(|| format!("opening the pinned program {}", path.display()))?;
        attach_tc(&mut tc_prog, vm_iface, &link)
    }

    /// Detaches the VM-facing program from ifindex `vm_ifindex` if no service uses it.
    fn release_unused_link(&self, vm_ifindex: u32) -> Result<()> {
        let link = vm_link(&self.dir, vm_ifindex);
        if !link.exists()
            || self
                .services
                .list()?
                .iter()
                .any(|s| s.vm_ifindex == vm_ifindex)
        {
            return Ok(());
        }
        fs::remove_file(&link).with_context(|| format!("removing {}", link.display()))
    }

    /// Inserts (or overwrites) flows, e.g. the other site's snapshot at switchover:
    /// the confirmed ones in the flow map, the others in the pending map, so that a
    /// snapshot taken during a flood cannot push B's own connections out.
    pub fn insert_flows(&mut self, flows: &[(FlowKey, FlowValue)]) -> Result<()> {
        let (mut inserted, mut confirmed) = (0u64, 0u64);
        let result = flows.iter().try_for_each(|(key, value)| {
            let map = if value.is_confirmed() {
                &mut self.flows
            } else {
                &mut self.pending
            };
            map.insert(key, value, 0)
                .context("inserting into the flow map")?;
            inserted += 1;
            confirmed += u64::from(value.is_confirmed());
            anyhow::Ok(())
        });
        // Counted also when an insert failed part way: what went in must be known.
        self.add_to_userspace_counters(&[
            (Counter::FlowInserted, inserted),
            (Counter::FlowInsertedConfirmed, confirmed),
        ])?;
        result
    }

    /// The counters as the datapath and userspace left them; `flow_evicted` and
    /// `flow_evicted_confirmed` as of the last sweep or [`Pinned::read_now`].
    pub fn counters(&self) -> Result<CounterSnapshot> {
        CounterSnapshot::sum(&self.counters)
    }

    /// Every flow, and the counters with the evictions brought up to date from
    /// them: what `status` and `flows` show.
    pub fn read_now(&mut self) -> Result<(Vec<(FlowKey, FlowValue)>, CounterSnapshot)> {
        let flows = self.read_flows_counting_evictions()?;
        Ok((flows, self.counters()?))
    }

    /// Reads both flow maps and derives the evictions from what entered and what
    /// is present (see `Counter::FlowEvicted`); returns the flows.
    fn read_flows_counting_evictions(&mut self) -> Result<Vec<(FlowKey, FlowValue)>> {
        // Read before the maps: flows created meanwhile can only make the
        // eviction estimate smaller, never larger.
        let before = self.counters()?;
        let mut flows = flowmaps::Collected::default();
        let confirmed = flows.add(&self.flows)?;
        let pending = flows.add(&self.pending)?;
        let evicted = (before.get(Counter::FlowCreated) + before.get(Counter::FlowInserted))
            .saturating_sub(before.get(Counter::FlowDeleted))
            .saturating_sub(confirmed + pending);
        let evicted_confirmed = (before.get(Counter::FlowConfirmed)
            + before.get(Counter::FlowInsertedConfirmed))
        .saturating_sub(before.get(Counter::FlowDeletedConfirmed))
        .saturating_sub(confirmed);
        for (counter, value) in [
            (Counter::FlowEvicted, evicted),
            (Counter::FlowEvictedConfirmed, evicted_confirmed),
        ] {
            if value > before.get(counter) {
                self.set_userspace_counter(counter, value)?;
            }
        }
        Ok(flows.into_vec())
    }

    /// Removes the flows expired at `now_ns` (CLOCK_MONOTONIC, the datapath's
    /// clock) under the timeouts of `movarto_common::flow::timeout`; returns
    /// them. Also does the flow maps' bookkeeping: adds what it deleted to
    /// `flow_deleted` (and `flow_deleted_confirmed`) and brings the evictions up
    /// to date (see `Counter::FlowEvicted`). One manager sweeps a datapath at a time.
    pub fn sweep(
        &mut self,
        now_ns: u64,
        established_idle_ns: u64,
    ) -> Result<Vec<(FlowKey, FlowValue)>> {
        let present = self.read_flows_counting_evictions()?;
        let expired: Vec<_> = present
            .iter()
            .filter(|(k, v)| v.is_expired(k.protocol, now_ns, established_idle_ns))
            .copied()
            .collect();
        let (mut deleted, mut deleted_confirmed) = (0u64, 0u64);
        for (key, _) in &expired {
            // Wherever it is now. One that went away meanwhile was evicted (or
            // confirmed); the next read counts it.
            if self.flows.remove(key).is_ok() {
                deleted += 1;
                deleted_confirmed += 1;
            } else if self.pending.remove(key).is_ok() {
                deleted += 1;
            }
        }
        self.add_to_userspace_counters(&[
            (Counter::FlowDeleted, deleted),
            (Counter::FlowDeletedConfirmed, deleted_confirmed),
        ])?;
        Ok(expired)
    }

    /// Adds to counters only userspace writes.
    fn add_to_userspace_counters(&mut self, deltas: &[(Counter, u64)]) -> Result<()> {
        let before = self.counters()?;
        for &(counter, delta) in deltas {
            self.set_userspace_counter(counter, before.get(counter) + delta)?;
        }
        Ok(())
    }

    /// Sets a counter only userspace writes to `total` (in the first CPU's slot).
    fn set_userspace_counter(&mut self, counter: Counter, total: u64) -> Result<()> {
        let index = counter as u32;
        let mut values: Vec<u64> = self
            .counters
            .get(&index, 0)
            .with_context(|| format!("reading counter {}", counter.name()))?
            .iter()
            .copied()
            .collect();
        let others: u64 = values.iter().skip(1).sum();
        if let Some(first) = values.first_mut() {
            *first = total.saturating_sub(others);
        }
        let values = PerCpuValues::try_from(values)
            .with_context(|| format!("per-CPU values of counter {}", counter.name()))?;
        self.counters
            .set(index, values, 0)
            .with_context(|| format!("writing counter {}", counter.name()))
    }

    /// Detaches the VM-facing program from the one service's interface (its VM has
    /// left this site): with TCX a stale program that passes would end the chain for
    /// the next one.
    pub fn release_vm_iface(&self) -> Result<()> {
        self.release_vm_iface_of(None)
    }

    /// [`Pinned::release_vm_iface`] for the service `home` (`None`: the only one).
    pub fn release_vm_iface_of(&self, home: Option<IpAddr>) -> Result<()> {
        let service = self.service_named(home)?;
        let path = vm_link(&self.dir, service.vm_ifindex);
        fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))
    }

    /// The service `home`, or the only one if `None`; an error if there is none.
    pub fn service_named(&self, home: Option<IpAddr>) -> Result<Config> {
        match home {
            Some(home) => self
                .services
                .get(home)?
                .ok_or_else(|| anyhow!("{} serves no service {home}", self.dir.display())),
            None => self.services.only()?.ok_or_else(|| {
                anyhow!(
                    "{} serves no service; add one with `movarto-user service add`",
                    self.dir.display()
                )
            }),
        }
    }

    /// Switches the service `home`'s mode (`None`: the only one's): one map write.
    pub fn set_service_mode(&mut self, home: Option<IpAddr>, mode: Mode) -> Result<()> {
        let mut config = self.service_named(home)?;
        super::config::check_map_tunnel(mode, &config)?;
        config.mode = mode as u8;
        self.services.set(config).map(drop)
    }

    /// Adds the service `site.home_addr` on `vm_iface`, or replaces it whole. While it
    /// is the uplink's only service, `site`'s node-wide settings (tunnel endpoint, GUE
    /// port, tunnel MTU, gateway MAC) become the uplink's; beside others it must agree
    /// with the uplink's tunnel endpoint.
    pub fn put_service(&mut self, site: &SiteConfig, vm_iface: &str) -> Result<Config> {
        let wanted = site.to_map()?;
        let alone = self
            .services
            .list()?
            .iter()
            .all(|other| other.home_addr == wanted.home_addr);
        let uplink = self.uplink()?;
        if alone {
            let mut rewritten = super::config::uplink_part(&wanted);
            rewritten.uplink_ifindex = uplink.uplink_ifindex;
            rewritten.netns_cookie = uplink.netns_cookie;
            self.config
                .set(CONFIG_KEY, rewritten, 0)
                .context("writing the uplink's configuration")?;
        } else if wanted.local_tunnel_addr != uplink.local_tunnel_addr {
            bail!(
                "the uplink's tunnel endpoint is {}, the service's would be {}: the node's \
                 services share one endpoint",
                shown_v4(&uplink.local_tunnel_addr),
                shown_v4(&wanted.local_tunnel_addr)
            );
        }
        if self.services.get(site.home_addr)?.is_some() {
            self.set_service(site, vm_iface)
        } else {
            self.add_service(site, vm_iface)
        }
    }

    /// Every flow in both maps, each once (confirmed first).
    pub fn flows(&self) -> Result<Vec<(FlowKey, FlowValue)>> {
        let mut flows = flowmaps::Collected::default();
        flows.add(&self.flows)?;
        flows.add(&self.pending)?;
        Ok(flows.into_vec())
    }
}

/// An IPv4 address in the maps' 16-byte layout, for messages.
fn shown_v4(addr: &[u8; 16]) -> Ipv4Addr {
    Ipv4Addr::new(addr[0], addr[1], addr[2], addr[3])
}
