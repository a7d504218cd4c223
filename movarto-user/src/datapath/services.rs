//! A node's services in the datapath's maps: `SERVICES` by `H`, `ADDRS` by `H` and `N`,
//! `PEERS` by tunnel endpoint and a row of `SERVICE_COUNTERS` each (see
//! `movarto_common::service`). Every change keeps the four consistent for the
//! programs reading them meanwhile: a service's counters, peer and NAT entries are
//! written before the service itself, and the service is removed first.

use std::{
    borrow::{Borrow, BorrowMut},
    net::IpAddr,
};

use anyhow::{Context as _, Result, anyhow, bail};
use aya::maps::{Array, HashMap, MapData, MapError, PerCpuArray, PerCpuValues};
use movarto_common::{
    config::{Config, Mode},
    net::{addr, family},
    service::{ANY_PEER, AddrKey, PeerUsers, ServiceCounters, filter_bucket},
};

use super::CounterSnapshot;

/// `BPF_NOEXIST`: an insert that never overwrites.
const NO_EXIST: u64 = 1;
const NO_ADDR: [u8; 16] = [0; 16];

/// The services maps of one datapath.
pub struct ServiceTable<M> {
    pub(super) services: HashMap<M, AddrKey, Config>,
    /// Every `H` and `N`, to its `H`.
    pub(super) addrs: HashMap<M, AddrKey, AddrKey>,
    /// How many of `addrs`' addresses fold to each bucket; never less than that.
    pub(super) filter: Array<M, u32>,
    pub(super) peers: HashMap<M, AddrKey, PeerUsers>,
    pub(super) counters: PerCpuArray<M, ServiceCounters>,
    /// How many services the maps hold at most (set at load, `--services`).
    pub capacity: u32,
}

/// The key of a service's `H`.
fn home_key(config: &Config) -> AddrKey {
    AddrKey::new(config.home_addr, config.service_family)
}

/// The key of a service's `N`, if it has one.
fn new_key(config: &Config) -> Option<AddrKey> {
    (config.new_addr != NO_ADDR).then(|| AddrKey::new(config.new_addr, config.service_family))
}

/// A service's use of its peer, if its mode carries the tunnel: GUE from a peer of
/// no tunnelling service is ordinary UDP to this host.
#[derive(Clone, Copy, PartialEq, Eq)]
struct PeerUse {
    peer: AddrKey,
    /// In `forward` mode (see [`PeerUsers`]).
    forwarding: bool,
}

fn peer_key(config: &Config) -> Option<PeerUse> {
    let mode = config.mode().filter(|mode| mode.uses_tunnel())?;
    (config.peer_tunnel_addr != NO_ADDR).then(|| PeerUse {
        peer: AddrKey::new(config.peer_tunnel_addr, family::IPV4),
        forwarding: mode == Mode::Forward,
    })
}

/// An address of the maps, for messages.
fn shown(key: &AddrKey) -> String {
    addr::from_map(key.addr, key.family)
        .map_or_else(|| format!("{:?}", key.addr), |a| a.to_string())
}

/// The key of the home address `home`.
pub fn key_of(home: IpAddr) -> AddrKey {
    let (bytes, fam) = addr::to_map(home);
    AddrKey::new(bytes, fam)
}

/// A lookup's "no such key" as `None`.
fn found<V>(result: Result<V, MapError>) -> Result<Option<V>> {
    match result {
        Ok(value) => Ok(Some(value)),
        Err(MapError::KeyNotFound) => Ok(None),
        Err(err) => Err(err).context("reading the services maps"),
    }
}

impl<M: Borrow<MapData>> ServiceTable<M> {
    /// Every service, in slot order.
    pub fn list(&self) -> Result<Vec<Config>> {
        let mut services = self
            .services
            .iter()
            .map(|entry| entry.map(|(_, config)| config))
            .collect::<Result<Vec<_>, _>>()
            .context("reading the services map")?;
        services.sort_by_key(|config| config.slot);
        Ok(services)
    }

    /// The service whose home address is `home`.
    pub fn get(&self, home: IpAddr) -> Result<Option<Config>> {
        found(self.services.get(&key_of(home), 0))
    }

    /// The one service, if there is at most one; an error naming them if there are more.
    pub fn only(&self) -> Result<Option<Config>> {
        let services = self.list()?;
        match services.as_slice() {
            [] => Ok(None),
            [one] => Ok(Some(*one)),
            many => bail!(
                "this datapath serves {} services ({}); name the one meant (`movarto-user service set H ...`)",
                many.len(),
                many.iter()
                    .map(|c| shown(&home_key(c)))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }

    /// The counters of the service in row `slot`, summed over the CPUs.
    pub fn counters(&self, slot: u32) -> Result<CounterSnapshot> {
        let per_cpu = self
            .counters
            .get(&slot, 0)
            .with_context(|| format!("reading row {slot} of the per-service counters"))?;
        Ok(CounterSnapshot::of_service(&per_cpu))
    }

    /// Fails if `config`'s `N` or `H` belongs to another service.
    fn check_addresses(&self, config: &Config) -> Result<()> {
        let home = home_key(config);
        if let Some(owner) = found(self.addrs.get(&home, 0))?
            && owner != home
        {
            bail!(
                "{} is the new address of service {}",
                shown(&home),
                shown(&owner)
            );
        }
        if let Some(new) = new_key(config) {
            if new == home {
                bail!(
                    "the new address and the home address are both {}",
                    shown(&home)
                );
            }
            match found(self.addrs.get(&new, 0))? {
                Some(owner) if owner == new => {
                    bail!("{} is the home address of another service", shown(&new))
                }
                Some(owner) if owner != home => bail!(
                    "{} is the new address of service {} already",
                    shown(&new),
                    shown(&owner)
                ),
                _ => {}
            }
        }
        Ok(())
    }
}

impl<M: BorrowMut<MapData>> ServiceTable<M> {
    /// Adds a service (its `slot` is chosen here); fails if `H` is served already, if
    /// its `N` is another's, or if the maps are full. Returns it as written.
    pub fn add(&mut self, config: Config) -> Result<Config> {
        let mut written = self.add_all([config])?;
        written.pop().ok_or_else(|| anyhow!("no service was added"))
    }

    /// [`ServiceTable::add`] for many, reading the map once (adding a node's thousands
    /// of services one by one reads it once per service). Stops at the first refusal;
    /// the ones before it stay added.
    pub fn add_all(&mut self, configs: impl IntoIterator<Item = Config>) -> Result<Vec<Config>> {
        let mut used: Vec<u32> = self.list()?.iter().map(|c| c.slot).collect();
        used.sort_unstable();
        let zero = vec![ServiceCounters::default(); aya::util::nr_cpus().map_err(|(_, e)| e)?];
        let mut written = Vec::new();
        for mut config in configs {
            let home = home_key(&config);
            if found(self.services.get(&home, 0))?.is_some() {
                bail!(
                    "service {} exists already; change it with `movarto-user service set`",
                    shown(&home)
                );
            }
            self.check_addresses(&config)?;
            if used.len() >= self.capacity as usize {
                bail!(
                    "the services map is full: it holds {} services (its capacity, set at \
                     attach with --services); remove one first or attach with a larger capacity",
                    self.capacity
                );
            }
            config.slot = (0..self.capacity)
                .find(|slot| used.binary_search(slot).is_err())
                .ok_or_else(|| anyhow!("no free row in the per-service counters"))?;
            self.counters
                .set(
                    config.slot,
                    PerCpuValues::try_from(zero.clone()).context("per-CPU counters")?,
                    0,
                )
                .context("clearing the service's counters")?;
            if let Some(peer) = peer_key(&config) {
                self.add_peer_user(peer)?;
            }
            if let Some(new) = new_key(&config) {
                self.put_addr(new, home)?;
            }
            self.put_addr(home, home)?;
            self.services
                .insert(home, config, NO_EXIST)
                .with_context(|| format!("adding service {} to the services map", shown(&home)))?;
            if let Err(at) = used.binary_search(&config.slot) {
                used.insert(at, config.slot);
            }
            written.push(config);
        }
        Ok(written)
    }

    /// Replaces a service's entry whole (its slot and counters stay); fails if there
    /// is no such service. Returns it as written.
    pub fn set(&mut self, mut config: Config) -> Result<Config> {
        let home = home_key(&config);
        let Some(old) = found(self.services.get(&home, 0))? else {
            bail!(
                "no service {}; add it with `movarto-user service add`",
                shown(&home)
            );
        };
        self.check_addresses(&config)?;
        config.slot = old.slot;
        if let Some(peer) = peer_key(&config) {
            self.add_peer_user(peer)?;
        }
        if let Some(new) = new_key(&config) {
            self.put_addr(new, home)?;
        }
        self.services
            .insert(home, config, 0)
            .with_context(|| format!("writing service {}", shown(&home)))?;
        self.forget(&old, new_key(&config))?;
        Ok(config)
    }

    /// [`ServiceTable::set`] if `H` is served, else [`ServiceTable::add`].
    pub fn put(&mut self, config: Config) -> Result<Config> {
        if found(self.services.get(&home_key(&config), 0))?.is_some() {
            self.set(config)
        } else {
            self.add(config)
        }
    }

    /// Removes the service `home`; returns what it was.
    pub fn remove(&mut self, home: IpAddr) -> Result<Config> {
        let key = key_of(home);
        let Some(old) = found(self.services.get(&key, 0))? else {
            bail!("no service {home} on this datapath");
        };
        self.services
            .remove(&key)
            .with_context(|| format!("removing service {home}"))?;
        self.drop_addr(&key)?;
        self.forget(&old, None)?;
        Ok(old)
    }

    /// Leaves `config` the only service: the single-service form of `attach --home`,
    /// `mode` and the agent's reconfiguration.
    pub fn put_only(&mut self, config: Config) -> Result<Config> {
        let home = home_key(&config);
        for other in self.list()? {
            if home_key(&other) != home
                && let Some(addr) = addr::from_map(other.home_addr, other.service_family)
            {
                self.remove(addr)?;
            }
        }
        self.put(config)
    }

    /// What `old` held beside its entry: its `N` (unless the service keeps it as
    /// `kept_new`) and its use of its peer.
    fn forget(&mut self, old: &Config, kept_new: Option<AddrKey>) -> Result<()> {
        if let Some(new) = new_key(old)
            && kept_new != Some(new)
        {
            self.drop_addr(&new)?;
        }
        if let Some(peer) = peer_key(old) {
            self.remove_peer_user(peer)?;
        }
        Ok(())
    }

    /// Points `addr` at `home` in `ADDRS`, counting a new address in the filter
    /// first: the filter never hides an address `ADDRS` holds.
    fn put_addr(&mut self, addr: AddrKey, home: AddrKey) -> Result<()> {
        let new = found(self.addrs.get(&addr, 0))?.is_none();
        if new {
            self.count_in_filter(&addr, true)?;
        }
        let written = self
            .addrs
            .insert(addr, home, 0)
            .context("writing the addresses map");
        if written.is_err() && new {
            self.count_in_filter(&addr, false)?;
        }
        written
    }

    /// Removes `addr` from `ADDRS`, then from the filter's count.
    fn drop_addr(&mut self, addr: &AddrKey) -> Result<()> {
        if found(self.addrs.get(addr, 0))?.is_none() {
            return Ok(());
        }
        self.addrs
            .remove(addr)
            .with_context(|| format!("removing {} from the addresses map", shown(addr)))?;
        self.count_in_filter(addr, false)
    }

    /// One address more (`up`) or fewer in `addr`'s bucket of the filter.
    fn count_in_filter(&mut self, addr: &AddrKey, up: bool) -> Result<()> {
        let bucket = filter_bucket(&addr.addr);
        let count = self
            .filter
            .get(&bucket, 0)
            .context("reading the address filter")?;
        let count = if up {
            count.saturating_add(1)
        } else {
            count.saturating_sub(1)
        };
        self.filter
            .set(bucket, count, 0)
            .context("writing the address filter")
    }

    /// One more service tunnels with its peer (and with any peer: [`ANY_PEER`]).
    fn add_peer_user(&mut self, used: PeerUse) -> Result<()> {
        for key in [used.peer, ANY_PEER] {
            let mut users = found(self.peers.get(&key, 0))?.unwrap_or_default();
            if used.forwarding {
                users.forwarding += 1;
            } else {
                users.others += 1;
            }
            self.peers
                .insert(key, users, 0)
                .context("writing the peers map")?;
        }
        Ok(())
    }

    /// One service fewer tunnels with its peer.
    fn remove_peer_user(&mut self, used: PeerUse) -> Result<()> {
        for key in [used.peer, ANY_PEER] {
            let Some(mut users) = found(self.peers.get(&key, 0))? else {
                continue;
            };
            if used.forwarding {
                users.forwarding = users.forwarding.saturating_sub(1);
            } else {
                users.others = users.others.saturating_sub(1);
            }
            if users.total() == 0 {
                self.peers.remove(&key).context("writing the peers map")?;
            } else {
                self.peers
                    .insert(key, users, 0)
                    .context("writing the peers map")?;
            }
        }
        Ok(())
    }
}
