//! The inventory: one TOML file (`/etc/movarto/movarto.toml` by default) that names the
//! sites, the services and the defaults, so that `migrate web --to b` is a whole
//! command. `docs/inventory.md` describes every key.
//!
//! [`Inventory::parse`] reads it entry by entry and key by key, so that one mistake does
//! not hide the next: every problem comes back at once, each with its line and column
//! ([`Problem`]). [`Inventory::load`] refuses a file with any problem; [`check_file`] is
//! `config check` (it also opens the files the inventory names).

mod check;
mod locate;
mod parse;
mod resolve;
#[cfg(test)]
mod tests;

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
    time::Duration,
};

use movarto_common::ids::MacAddr;
use serde::{Deserialize, Serialize};

use crate::{
    agent::{AgentClient, api::PostcopySetting, token::Token},
    migrate::AddressMode,
};

pub use locate::{Sighting, find_source, locate_migration, sightings, source_from_sightings};
pub use resolve::{MigrateFlags, ResolveError, ResumeTarget, SourceSite, builtin};

/// Where the inventory is read from when `--config` is not given.
pub const DEFAULT_PATH: &str = "/etc/movarto/movarto.toml";

/// A whole inventory, typed and checked.
#[derive(Clone, Debug, Default)]
pub struct Inventory {
    /// Where relative paths in the file start: the file's directory.
    pub base_dir: PathBuf,
    pub defaults: Defaults,
    pub sites: BTreeMap<String, Site>,
    pub services: BTreeMap<String, Service>,
}

/// `[defaults]`: what every migration uses unless its service, its sites or a flag say
/// otherwise. Each key is the `migrate` flag of the same name (with `_` for `-`).
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Defaults {
    /// MiB/s in the file (as the flag), bytes per second here.
    #[serde(default, deserialize_with = "parse::mib_per_s")]
    pub max_bandwidth: Option<u64>,
    #[serde(default, deserialize_with = "parse::mib_per_s")]
    pub max_postcopy_bandwidth: Option<u64>,
    #[serde(default, deserialize_with = "parse::duration")]
    pub downtime_limit: Option<Duration>,
    #[serde(default, deserialize_with = "parse::from_str")]
    pub postcopy: Option<PostcopySetting>,
    #[serde(default, deserialize_with = "parse::duration")]
    pub postcopy_recover_timeout: Option<Duration>,
    pub multifd: Option<u8>,
    pub auto_converge: Option<bool>,
    #[serde(default, deserialize_with = "parse::mib_per_s")]
    pub mirror_speed: Option<u64>,
    #[serde(default, deserialize_with = "parse::duration")]
    pub max_drain: Option<Duration>,
    #[serde(default, deserialize_with = "parse::duration")]
    pub drain_grace: Option<Duration>,
    #[serde(default, deserialize_with = "parse::duration")]
    pub agent_timeout: Option<Duration>,
    pub low_ttl: Option<u32>,
    pub skip_ttl_wait: Option<bool>,
    pub tunnel_mtu: Option<u16>,
    pub vm_iface: Option<String>,
    pub ca_cert: Option<PathBuf>,
    pub dns_server: Option<String>,
    pub zone: Option<String>,
    pub dns_key_file: Option<PathBuf>,
}

impl Defaults {
    /// Each value of `self`, or else `other`'s: `flags.or(inventory)`.
    pub fn or(self, other: &Defaults) -> Defaults {
        let o = other.clone();
        Defaults {
            max_bandwidth: self.max_bandwidth.or(o.max_bandwidth),
            max_postcopy_bandwidth: self.max_postcopy_bandwidth.or(o.max_postcopy_bandwidth),
            downtime_limit: self.downtime_limit.or(o.downtime_limit),
            postcopy: self.postcopy.or(o.postcopy),
            postcopy_recover_timeout: self.postcopy_recover_timeout.or(o.postcopy_recover_timeout),
            multifd: self.multifd.or(o.multifd),
            auto_converge: self.auto_converge.or(o.auto_converge),
            mirror_speed: self.mirror_speed.or(o.mirror_speed),
            max_drain: self.max_drain.or(o.max_drain),
            drain_grace: self.drain_grace.or(o.drain_grace),
            agent_timeout: self.agent_timeout.or(o.agent_timeout),
            low_ttl: self.low_ttl.or(o.low_ttl),
            skip_ttl_wait: self.skip_ttl_wait.or(o.skip_ttl_wait),
            tunnel_mtu: self.tunnel_mtu.or(o.tunnel_mtu),
            vm_iface: self.vm_iface.or(o.vm_iface),
            ca_cert: self.ca_cert.or(o.ca_cert),
            dns_server: self.dns_server.or(o.dns_server),
            zone: self.zone.or(o.zone),
            dns_key_file: self.dns_key_file.or(o.dns_key_file),
        }
    }
}

/// `[sites.<name>]`: one node, its agent and its network.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Site {
    /// The agent's URL, e.g. `https://203.0.113.1:7878`.
    pub agent: Option<String>,
    pub token_file: Option<PathBuf>,
    /// The CA the agent's TLS certificate chains to (else `[defaults]`'s).
    pub ca_cert: Option<PathBuf>,
    /// The tunnel endpoint (`TA`/`TB`): the site's own uplink address.
    pub tunnel: Option<Ipv4Addr>,
    /// The uplink the agent drives (its `--uplink`; for `evacuate` and the operator).
    pub uplink: Option<String>,
    /// The anycast gateway on the VMs' taps: the same at every site a service moves to.
    pub gateway_mac: Option<MacAddr>,
    pub gateway_cidr: Option<String>,
    /// Where this site's VM specs are: `<spec_dir>/<vm>.toml` unless the service names one.
    pub spec_dir: Option<PathBuf>,
    /// The port this site's QEMU listens on when it is the destination.
    pub migration_port: Option<u16>,
    /// The port of this site's NBD server when it is the destination of a disk mirror.
    pub nbd_port: Option<u16>,
    /// The largest outer packet this site's uplink carries; a move uses the smaller of
    /// its two sites'.
    pub tunnel_mtu: Option<u16>,
}

/// `[services.<name>]`: one VM and its addresses.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Service {
    /// The VM's name at the agents (default: the service's name).
    pub vm: Option<String>,
    /// The home address `H` (the VM keeps it).
    pub home: Option<IpAddr>,
    /// The site `H` is routed to; where the VM runs when no agent says otherwise.
    pub home_site: Option<String>,
    #[serde(default, deserialize_with = "parse::from_str")]
    pub address_mode: Option<AddressMode>,
    pub on_switch: Option<String>,
    pub vm_iface: Option<String>,
    pub dns_name: Option<String>,
    pub zone: Option<String>,
    pub dns_server: Option<String>,
    pub dns_key_file: Option<PathBuf>,
    pub low_ttl: Option<u32>,
    /// `[services.<name>.at.<site>]`, read entry by entry (not by serde as a whole).
    #[serde(skip)]
    pub at: BTreeMap<String, ServiceAt>,
}

impl Service {
    /// The VM's name: `vm`, or the service's own.
    pub fn vm_name<'a>(&'a self, service: &'a str) -> &'a str {
        self.vm.as_deref().unwrap_or(service)
    }
}

/// `[services.<name>.at.<site>]`: what the service is at one site.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceAt {
    /// The new address `N` at this site (nat address mode).
    pub new_addr: Option<IpAddr>,
    /// The VM's spec at this site (else the site's `spec_dir`).
    pub spec: Option<PathBuf>,
}

/// One mistake in the file, where it is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// The dotted key, e.g. `sites.a.gateway_mac` (empty for a syntax error).
    pub key: String,
    /// 1-based.
    pub line: usize,
    /// 1-based, in characters.
    pub column: usize,
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "line {}, column {}: ", self.line, self.column)?;
        if !self.key.is_empty() {
            write!(f, "{}: ", self.key)?;
        }
        f.write_str(&self.message)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    #[error("reading the inventory {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the inventory {path} has {} problem(s):\n{}", problems.len(), list(problems))]
    Invalid {
        path: PathBuf,
        problems: Vec<Problem>,
    },
}

fn list(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|p| format!("  {p}"))
        .collect::<Vec<_>>()
        .join("\n")
}

impl Inventory {
    /// Reads and checks `path`; any problem refuses the whole file (the files it names
    /// are opened later, by whoever uses them).
    pub fn load(path: &Path) -> Result<Inventory, InventoryError> {
        let text = std::fs::read_to_string(path).map_err(|source| InventoryError::Read {
            path: path.to_owned(),
            source,
        })?;
        let base_dir = path.parent().unwrap_or(Path::new(".")).to_owned();
        match Inventory::parse(&text, &base_dir, false) {
            (Some(inventory), problems) if problems.is_empty() => Ok(inventory),
            (_, problems) => Err(InventoryError::Invalid {
                path: path.to_owned(),
                problems,
            }),
        }
    }

    /// `--config PATH`, else the default file if there is one, else no inventory.
    pub fn load_optional(config: Option<&Path>) -> Result<Option<Inventory>, InventoryError> {
        match config {
            Some(path) => Inventory::load(path).map(Some),
            None if Path::new(DEFAULT_PATH).exists() => {
                Inventory::load(Path::new(DEFAULT_PATH)).map(Some)
            }
            None => Ok(None),
        }
    }

    /// Parses and checks `text`; with `open_files`, also reads every file it names.
    /// Returns the inventory when the file could be typed at all, and every problem.
    pub fn parse(
        text: &str,
        base_dir: &Path,
        open_files: bool,
    ) -> (Option<Inventory>, Vec<Problem>) {
        let (doc, inventory, mut problems) = match parse::typed(text, base_dir) {
            Ok(parsed) => parsed,
            Err(problem) => return (None, vec![problem]),
        };
        problems.extend(check::semantic(&doc, &inventory, open_files));
        problems.sort_by_key(|p| (p.line, p.column));
        (Some(inventory), problems)
    }

    /// A path from the file: relative ones start at the file's directory.
    pub fn path(&self, path: &Path) -> PathBuf {
        self.base_dir.join(path)
    }

    /// The service named `name`, or the one whose VM is `name`: (service name, service).
    pub fn service(&self, name: &str) -> Option<(&str, &Service)> {
        self.services
            .get_key_value(name)
            .or_else(|| {
                self.services
                    .iter()
                    .find(|(service, s)| s.vm_name(service) == name)
            })
            .map(|(n, s)| (n.as_str(), s))
    }

    /// A client of site `site`'s agent (its URL, token and CA from the file).
    pub fn agent(&self, site: &str) -> Result<AgentClient, String> {
        let s = self.site(site)?;
        let (Some(url), Some(token)) = (&s.agent, &s.token_file) else {
            return Err(format!("site {site} has no agent or no token_file"));
        };
        let token = Token::from_file(&self.path(token)).map_err(|e| format!("{e:#}"))?;
        let ca = s
            .ca_cert
            .as_ref()
            .or(self.defaults.ca_cert.as_ref())
            .map(|p| self.path(p));
        AgentClient::new(url, token.as_str(), ca.as_deref()).map_err(|e| format!("{e:#}"))
    }

    /// The site named `name`.
    pub fn site(&self, name: &str) -> Result<&Site, String> {
        self.sites.get(name).ok_or_else(|| {
            let known: Vec<&str> = self.sites.keys().map(String::as_str).collect();
            format!(
                "no site {name:?} in the inventory (it has: {})",
                known.join(", ")
            )
        })
    }
}

/// `config check`: every problem of the file at `path`, the files it names opened too.
pub fn check_file(path: &Path) -> Result<Vec<Problem>, InventoryError> {
    let text = std::fs::read_to_string(path).map_err(|source| InventoryError::Read {
        path: path.to_owned(),
        source,
    })?;
    let base_dir = path.parent().unwrap_or(Path::new(".")).to_owned();
    Ok(Inventory::parse(&text, &base_dir, true).1)
}
