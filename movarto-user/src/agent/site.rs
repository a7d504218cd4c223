//! The site's datapath as the agent manages it: attach or reconfigure, modes, flow
//! snapshots, the sweep of expired flows, teardown. All state lives in the pins, so a
//! restarted agent simply opens them again (adoption) and forwarding never stops.

use std::{
    net::{IpAddr, Ipv4Addr, UdpSocket},
    sync::{
        Mutex, MutexGuard, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, Result};
use aya::programs::XdpMode;
use movarto_common::{
    config::Mode,
    net::{addr, family},
};

use super::{
    api::{DatapathRequest, DatapathStatus, FlowEntry, FlowOrigin, FlowSnapshot, ServiceList},
    netlink,
};
use crate::datapath::{
    AttachOptions, Pinned, SiteConfig, attach, detach, flows::monotonic_ns, pin_dir,
    require_forwarding,
};

/// How long the agent waits for the tunnel's next hop to resolve.
const NEXT_HOP_WAIT: Duration = Duration::from_secs(2);

pub struct SiteDatapath {
    pub uplink: String,
    /// Where the pins live (bpffs is shared by every network namespace on the host).
    pub pin_name: String,
    established_idle_ns: u64,
    /// The flow map's capacity when the agent attaches (`None`: the attach default).
    flows_capacity: Option<u32>,
    /// Attach with the programs' debug logs on.
    debug_log: bool,
    swept: AtomicU64,
    /// Held while the datapath is attached, detached or its services change: two
    /// migrations preparing at once must not both attach (the second would find no pins
    /// yet, load a datapath of its own and replace the first's).
    changing: Mutex<()>,
}

impl SiteDatapath {
    pub fn new(
        uplink: String,
        pin_name: Option<String>,
        established_idle: Duration,
        flows_capacity: Option<u32>,
    ) -> Self {
        Self {
            flows_capacity,
            pin_name: pin_name.unwrap_or_else(|| uplink.clone()),
            uplink,
            established_idle_ns: established_idle.as_nanos() as u64,
            debug_log: false,
            swept: AtomicU64::new(0),
            changing: Mutex::new(()),
        }
    }

    /// Attach with the programs' debug logs on (`monitor --debug-log` reads them).
    pub fn with_debug_log(mut self, debug_log: bool) -> Self {
        self.debug_log = debug_log;
        self
    }

    /// The guard of [`SiteDatapath::changing`].
    fn changing(&self) -> MutexGuard<'_, ()> {
        self.changing.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn attached(&self) -> bool {
        pin_dir(&self.pin_name).exists()
    }

    fn open(&self) -> Result<Pinned> {
        Pinned::open_for(&self.uplink, &self.pin_name)
    }

    /// The status of the service `home` (`None`: the only one, or the uplink's if it
    /// serves none or several); `None` when nothing is attached, or it serves no `home`.
    pub fn status(&self, home: Option<IpAddr>) -> Result<Option<DatapathStatus>> {
        if !self.attached() {
            return Ok(None);
        }
        let mut pinned = self.open()?;
        let now = monotonic_ns()?;
        let (flows, counters) = pinned.read_now()?;
        let (config, service_counters) = match home {
            Some(home) => match pinned.services.get(home)? {
                Some(service) => (service, Some(pinned.services.counters(service.slot)?)),
                None => return Ok(None),
            },
            None => match pinned.services.only() {
                Ok(Some(service)) => (service, Some(pinned.services.counters(service.slot)?)),
                Ok(None) | Err(_) => (pinned.uplink()?, None),
            },
        };
        // A service's own flows only; the uplink's status counts every flow.
        let flows: Vec<_> = flows
            .into_iter()
            .filter(|(k, _)| {
                config.service_family == 0
                    || (k.family == config.service_family && k.service_addr == config.home_addr)
            })
            .collect();
        let live_premove_flows = flows
            .iter()
            .filter(|(k, v)| {
                v.holds_drain(k.protocol, now.saturating_sub(v.last_seen_ns))
                    && !v.is_expired(k.protocol, now, self.established_idle_ns)
            })
            .count();
        let idle_ms = flows
            .iter()
            .map(|(_, v)| now.saturating_sub(v.last_seen_ns) / 1_000_000)
            .min();
        let counters = counters.nonzero().into_iter().collect();
        let service_counters = service_counters.map(|c| c.nonzero().into_iter().collect());
        let mode = config.mode().with_context(|| {
            format!(
                "the pinned configuration has mode {}, which this build doesn't know",
                config.mode
            )
        })?;
        Ok(Some(DatapathStatus {
            pin_dir: pinned.dir.display().to_string(),
            home_addr: addr::from_map(config.home_addr, config.service_family),
            mode,
            counters,
            service_counters,
            flows: flows.len(),
            live_premove_flows,
            idle_ms,
            swept: self.swept.load(Ordering::Relaxed),
        }))
    }

    /// Attaches with the request's service, or adds it to what is attached, or
    /// rewrites it there (the flows stay); the node's other services are untouched.
    pub fn apply(&self, request: &DatapathRequest) -> Result<DatapathStatus> {
        let site = site_config(request)?;
        require_forwarding(&self.uplink, site.mode, site.home_addr)?;
        let changing = self.changing();
        if self.attached() {
            self.open()?.put_service(&site, &request.vm_iface)?;
        } else {
            attach(&AttachOptions {
                uplink: self.uplink.clone(),
                pin_name: Some(self.pin_name.clone()),
                vm_iface: Some(request.vm_iface.clone()),
                services_capacity: None,
                xdp_mode: XdpMode::Default,
                site: site.clone(),
                flows_capacity: self.flows_capacity,
                debug_log: self.debug_log,
            })?;
        }
        drop(changing);
        if site.mode.uses_tunnel() {
            self.prime_next_hop(site.peer_tunnel_addr);
        }
        self.status(Some(site.home_addr))?
            .context("the datapath vanished after attaching")
    }

    /// Switches the service `home`'s mode (`None`: the only service's).
    pub fn set_mode(&self, home: Option<IpAddr>, mode: Mode) -> Result<DatapathStatus> {
        let changing = self.changing();
        let mut pinned = self.open()?;
        let config = pinned.service_named(home)?;
        let home = addr::from_map(config.home_addr, config.service_family);
        if let Some(home) = home {
            require_forwarding(&self.uplink, mode, home)?;
        }
        pinned.set_service_mode(home, mode)?;
        drop((pinned, changing));
        if mode.uses_tunnel()
            && let Some(IpAddr::V4(peer)) = addr::from_map(config.peer_tunnel_addr, family::IPV4)
        {
            self.prime_next_hop(peer);
        }
        self.status(home)?.context("the datapath vanished")
    }

    /// The switchover's flip of the service `home` to `forward`, and nothing else: it is
    /// inside the VM's blackout. The pins' owner was checked when the migration set the
    /// service up (the check reads every descriptor's fdinfo, milliseconds), and the
    /// status and the next hop's priming (it was resolved for the migration's own
    /// traffic to the peer) are left out.
    pub fn flip_to_forward(&self, home: IpAddr) -> Result<()> {
        let _changing = self.changing();
        Pinned::open(&self.pin_name)?.set_service_mode(Some(home), Mode::Forward)
    }

    /// The flows of the service `home` (`None`: every flow).
    pub fn flows(&self, home: Option<IpAddr>) -> Result<FlowSnapshot> {
        let now = monotonic_ns()?;
        let service = home.map(crate::datapath::service_key);
        Ok(FlowSnapshot::new(
            self.open()?
                .flows()?
                .iter()
                .filter(|(k, _)| {
                    service.is_none_or(|s| k.family == s.family && k.service_addr == s.addr)
                })
                .filter_map(|(k, v)| FlowEntry::from_map(k, v, now))
                .collect(),
        ))
    }

    /// Loads the other site's snapshot as tunnelled flows, on this host's clock.
    pub fn load_flows(&self, snapshot: &FlowSnapshot) -> Result<usize> {
        let now = monotonic_ns()?;
        let flows = snapshot
            .flows
            .iter()
            .enumerate()
            .map(|(i, flow)| {
                let key = flow
                    .key()
                    .map_err(|why| anyhow::anyhow!("flow {i} of the snapshot: {why}"))?;
                let value = FlowEntry {
                    origin: FlowOrigin::Tunnelled,
                    ..flow.clone()
                }
                .value(now);
                Ok((key, value))
            })
            .collect::<Result<Vec<_>>>()?;
        self.open()?.insert_flows(&flows)?;
        Ok(flows.len())
    }

    /// Detaches the VM-facing program from the service `home`'s interface (`None`:
    /// the only service's).
    pub fn release_vm_iface(&self, home: Option<IpAddr>) -> Result<()> {
        let _changing = self.changing();
        match self.open()?.release_vm_iface_of(home) {
            // Already released: a retry.
            Err(err) if !self.attached() => Err(err),
            Err(err) => {
                tracing::debug!("release: {err:#}");
                Ok(())
            }
            Ok(()) => Ok(()),
        }
    }

    /// Every service, with its own status; empty when nothing is attached.
    pub fn services(&self) -> Result<ServiceList> {
        if !self.attached() {
            return Ok(ServiceList::default());
        }
        let pinned = self.open()?;
        let homes: Vec<_> = pinned
            .services
            .list()?
            .iter()
            .filter_map(|s| addr::from_map(s.home_addr, s.service_family))
            .collect();
        let capacity = pinned.services.capacity;
        drop(pinned);
        let services = homes
            .into_iter()
            .map(|home| self.status(Some(home)))
            .filter_map(Result::transpose)
            .collect::<Result<Vec<_>>>()?;
        Ok(ServiceList { capacity, services })
    }

    /// Removes the service `home` (fine if it is not there); the datapath stays.
    pub fn remove_service(&self, home: IpAddr) -> Result<()> {
        let _changing = self.changing();
        if !self.attached() {
            return Ok(());
        }
        let mut pinned = self.open()?;
        if pinned.services.get(home)?.is_some() {
            pinned.remove_service(home)?;
        }
        Ok(())
    }

    /// Teardown of the service `home`, and of the whole datapath once it serves no
    /// other (`None`: the whole datapath); fine when nothing is attached.
    pub fn detach(&self, home: Option<IpAddr>) -> Result<()> {
        let _changing = self.changing();
        if !self.attached() {
            return Ok(());
        }
        // Only our own: another namespace's pins of the same name stay.
        let mut pinned = self.open()?;
        if let Some(home) = home {
            if pinned.services.get(home)?.is_some() {
                pinned.remove_service(home)?;
            }
            if !pinned.services.list()?.is_empty() {
                return Ok(());
            }
        }
        drop(pinned);
        detach(&self.pin_name)
    }

    /// Removes expired flows (Cilium-style timeouts); returns how many.
    pub fn sweep(&self) -> Result<usize> {
        if !self.attached() {
            return Ok(0);
        }
        let swept = self
            .open()?
            .sweep(monotonic_ns()?, self.established_idle_ns)?
            .len();
        self.swept.fetch_add(swept as u64, Ordering::Relaxed);
        Ok(swept)
    }

    /// `bpf_fib_lookup` drops while the next hop's MAC is unknown: make the kernel resolve
    /// it by sending one datagram toward the peer, and wait until the neighbour entry of the
    /// route's own next hop (not just any on the uplink) has a link-layer address.
    fn prime_next_hop(&self, peer: Ipv4Addr) {
        let sent = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))
            .and_then(|socket| socket.send_to(b"movarto: resolving the next hop", (peer, 9)));
        if let Err(err) = sent {
            tracing::warn!(%peer, "could not send toward the tunnel peer: {err}");
            return;
        }
        match netlink::wait_for_next_hop(peer, NEXT_HOP_WAIT) {
            Ok((_, true)) => {}
            Ok((hop, false)) => tracing::warn!(
                uplink = %self.uplink, %peer, next_hop = %hop.addr,
                "the tunnel's next hop is still unresolved"
            ),
            Err(err) => tracing::warn!(%peer, "could not look up the tunnel's next hop: {err:#}"),
        }
    }
}

fn site_config(request: &DatapathRequest) -> Result<SiteConfig> {
    SiteConfig::new(request.mode, request.home_addr)
        .with_new_addr(request.new_addr)
        .with_tunnel(
            request.local_tunnel_addr,
            request.peer_tunnel_addr,
            request.token,
        )
        .with_tunnel_mtu(request.tunnel_mtu)
        .with_macs(request.vm_mac, request.gateway_mac)
        .checked()
        .context("inconsistent datapath settings")
}
