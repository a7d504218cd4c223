//! `migrate`'s values from three layers: a flag, else the inventory (the service, its
//! sites, `[defaults]`), else the built-in default. A value none of them gives is an
//! error that names both the flag and the key.

use std::{
    net::{IpAddr, Ipv4Addr},
    path::PathBuf,
};

use movarto_common::ids::MacAddr;

use super::{Defaults, Inventory, Service, Site};
use crate::{
    agent::api::PostcopySetting,
    migrate::{AddressMode, MigrateOptions},
};

/// The built-in defaults: what `migrate` uses when neither a flag nor the inventory
/// says.
pub mod builtin {
    use std::time::Duration;

    pub const MIGRATION_PORT: u16 = 4444;
    pub const NBD_PORT: u16 = 10809;
    pub const VM_IFACE: &str = "tap0";
    pub const TUNNEL_MTU: u16 = 1500;
    pub const LOW_TTL: u32 = 5;
    /// 1280 MiB/s (about 10 Gbit/s), in bytes per second.
    pub const MAX_BANDWIDTH: u64 = 1280 << 20;
    pub const DOWNTIME_LIMIT: Duration = Duration::from_millis(300);
    pub const MAX_DRAIN: Duration = Duration::from_secs(300);
    pub const AGENT_TIMEOUT: Duration = Duration::from_secs(30);
}

/// `migrate`'s flags as given (`None`: not given), without clap.
#[derive(Clone, Debug, Default)]
pub struct MigrateFlags {
    /// The service or VM (the positional `NAME`, or `--vm`).
    pub name: Option<String>,
    pub to: Option<String>,
    pub from: Option<String>,
    pub source: Option<String>,
    pub destination: Option<String>,
    pub source_token_file: Option<PathBuf>,
    pub destination_token_file: Option<PathBuf>,
    pub destination_spec: Option<PathBuf>,
    pub home: Option<IpAddr>,
    pub new_addr: Option<IpAddr>,
    pub address_mode: Option<AddressMode>,
    pub on_switch: Option<String>,
    pub source_tunnel: Option<Ipv4Addr>,
    pub destination_tunnel: Option<Ipv4Addr>,
    pub migration_port: Option<u16>,
    pub nbd_port: Option<u16>,
    pub gateway_mac: Option<MacAddr>,
    pub gateway_cidr: Option<String>,
    pub dns_name: Option<String>,
    pub urgent: bool,
    /// The flags `[defaults]` has keys for.
    pub defaults: Defaults,
}

/// Which site the VM leaves, and how that was decided (the progress says it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceSite {
    /// `--from`.
    Flag(String),
    /// The site whose agent `--source` names.
    AgentUrl(String),
    /// The site whose agent says the VM runs there.
    Agents(String),
    /// No agent said: the service's `home_site`.
    HomeSite(String),
}

impl SourceSite {
    pub fn name(&self) -> &str {
        match self {
            SourceSite::Flag(s)
            | SourceSite::AgentUrl(s)
            | SourceSite::Agents(s)
            | SourceSite::HomeSite(s) => s,
        }
    }
}

impl std::fmt::Display for SourceSite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SourceSite::Flag(s) => write!(f, "site {s} (--from)"),
            SourceSite::AgentUrl(s) => write!(f, "site {s} (its agent is --source)"),
            SourceSite::Agents(s) => write!(f, "site {s} (its agent runs the VM)"),
            SourceSite::HomeSite(s) => write!(f, "site {s} (the service's home_site)"),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ResolveError {
    #[error("no {what}: give {flag}, or set `{key}` in the inventory")]
    Missing {
        what: &'static str,
        flag: &'static str,
        key: String,
    },
    #[error("{0}")]
    Invalid(String),
}

fn missing(what: &'static str, flag: &'static str, key: impl Into<String>) -> ResolveError {
    ResolveError::Missing {
        what,
        flag,
        key: key.into(),
    }
}

/// What `migrate --resume` needs: the source's agent, and the key for the DNS it owes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResumeTarget {
    pub source: String,
    pub source_token_file: PathBuf,
    pub ca_cert: Option<PathBuf>,
    pub dns_key_file: Option<PathBuf>,
    pub agent_timeout: std::time::Duration,
}

/// The inventory's entries one migration uses.
struct Layers<'a> {
    inventory: Option<&'a Inventory>,
    service: Option<(&'a str, &'a Service)>,
    from: Option<(&'a str, &'a Site)>,
    to: Option<(&'a str, &'a Site)>,
}

impl<'a> Layers<'a> {
    fn new(
        flags: &MigrateFlags,
        inventory: Option<&'a Inventory>,
        from: Option<&str>,
    ) -> Result<Self, ResolveError> {
        let site =
            |name: Option<&str>, flag: &str| -> Result<Option<(&'a str, &'a Site)>, ResolveError> {
                let Some(name) = name else { return Ok(None) };
                let inventory = inventory.ok_or_else(|| {
                ResolveError::Invalid(format!(
                    "{flag} {name} names a site of the inventory, and there is none (--config PATH)"
                ))
            })?;
                inventory
                    .sites
                    .get_key_value(name)
                    .map(|(n, s)| Some((n.as_str(), s)))
                    .ok_or_else(|| {
                        ResolveError::Invalid(inventory.site(name).err().unwrap_or_default())
                    })
            };
        let layers = Layers {
            inventory,
            service: inventory
                .zip(flags.name.as_deref())
                .and_then(|(i, n)| i.service(n)),
            from: site(from, "--from")?,
            to: site(flags.to.as_deref(), "--to")?,
        };
        if let (Some((f, _)), Some((t, _))) = (layers.from, layers.to)
            && f == t
        {
            return Err(ResolveError::Invalid(format!(
                "the source and the destination are both site {f}"
            )));
        }
        Ok(layers)
    }

    fn service_key(&self, key: &str) -> String {
        let name = self.service.map_or("<name>", |(n, _)| n);
        format!("services.{name}.{key}")
    }

    fn source_key(&self, key: &str) -> String {
        format!("sites.{}.{key}", self.from.map_or("<from>", |(n, _)| n))
    }

    fn dest_key(&self, key: &str) -> String {
        format!("sites.{}.{key}", self.to.map_or("<to>", |(n, _)| n))
    }

    fn at_key(&self, key: &str) -> String {
        let to = self.to.map_or("<to>", |(n, _)| n);
        self.service_key(&format!("at.{to}.{key}"))
    }

    fn source_site<T>(&self, get: impl Fn(&Site) -> Option<T>) -> Option<T> {
        self.from.and_then(|(_, s)| get(s))
    }

    fn dest_site<T>(&self, get: impl Fn(&Site) -> Option<T>) -> Option<T> {
        self.to.and_then(|(_, s)| get(s))
    }

    fn svc<T>(&self, get: impl Fn(&Service) -> Option<T>) -> Option<T> {
        self.service.and_then(|(_, s)| get(s))
    }

    /// The service's `H` when the destination is its home site: the move home, which
    /// `migrate` takes as `--new-addr H` (no NAT at home).
    fn home_when_going_home(&self) -> Option<IpAddr> {
        let (_, service) = self.service?;
        let (to, _) = self.to?;
        (service.home_site.as_deref() == Some(to))
            .then_some(service.home)
            .flatten()
    }

    fn at<T>(&self, get: impl Fn(&super::ServiceAt) -> Option<T>) -> Option<T> {
        let (_, service) = self.service?;
        let (to, _) = self.to?;
        service.at.get(to).and_then(get)
    }

    /// A path from the inventory, relative to its directory.
    fn path(&self, path: Option<&PathBuf>) -> Option<PathBuf> {
        let inventory = self.inventory?;
        path.map(|p| inventory.path(p))
    }

    fn inventory_defaults(&self) -> Defaults {
        self.inventory
            .map(|i| i.defaults.clone())
            .unwrap_or_default()
    }

    /// One value both sites may give: they must agree (one CA, one anycast gateway).
    fn both_sites<T: PartialEq + std::fmt::Display + Clone>(
        &self,
        key: &str,
        get: impl Fn(&Site) -> Option<T>,
    ) -> Result<Option<T>, ResolveError> {
        match (self.source_site(&get), self.dest_site(&get)) {
            (Some(a), Some(b)) if a != b => Err(ResolveError::Invalid(format!(
                "{} is {a} but {} is {b}: both sites must give the same",
                self.source_key(key),
                self.dest_key(key)
            ))),
            (a, b) => Ok(b.or(a)),
        }
    }
}

impl MigrateFlags {
    /// Whether `migrate` needs the source site from the inventory, i.e. a value of the
    /// source's side no flag gives.
    pub fn needs_source_site(&self) -> bool {
        self.to.is_some()
            && (self.source.is_none()
                || self.source_token_file.is_none()
                || self.source_tunnel.is_none())
    }

    /// The migration's options: each value from its flag, the inventory or the built-in
    /// default. `from` is the source site (`--from`, or where the agents say the VM runs).
    pub fn resolve(
        &self,
        inventory: Option<&Inventory>,
        from: Option<&str>,
    ) -> Result<MigrateOptions, ResolveError> {
        let l = Layers::new(self, inventory, from)?;
        let name = self
            .name
            .clone()
            .ok_or_else(|| missing("VM", "NAME (or --vm)", "services.<name>"))?;
        let vm = l
            .service
            .map_or(name.clone(), |(n, s)| s.vm_name(n).to_owned());
        let d = self.defaults.clone().or(&l.inventory_defaults());
        let address_mode = self
            .address_mode
            .or_else(|| l.svc(|s| s.address_mode))
            .unwrap_or_default();
        let new_addr = match address_mode {
            AddressMode::Move => self.new_addr,
            AddressMode::Nat => Some(
                self.new_addr
                    .or_else(|| l.at(|a| a.new_addr))
                    .or_else(|| l.home_when_going_home())
                    .ok_or_else(|| missing("new address N", "--new-addr", l.at_key("new_addr")))?,
            ),
        };
        let destination_spec = self
            .destination_spec
            .clone()
            .or_else(|| l.path(l.at(|a| a.spec.clone()).as_ref()))
            .or_else(|| {
                l.path(l.dest_site(|s| s.spec_dir.clone()).as_ref())
                    .map(|dir| dir.join(format!("{vm}.toml")))
            })
            .ok_or_else(|| {
                missing(
                    "destination VM spec",
                    "--destination-spec",
                    format!("{} (or {})", l.at_key("spec"), l.dest_key("spec_dir")),
                )
            })?;
        let ca_cert = match &self.defaults.ca_cert {
            Some(flag) => Some(flag.clone()),
            None => l
                .both_sites("ca_cert", |s| {
                    s.ca_cert.as_ref().map(|p| p.display().to_string())
                })?
                .map(PathBuf::from)
                .or_else(|| l.inventory_defaults().ca_cert)
                .and_then(|p| l.path(Some(&p))),
        };
        let gateway_mac = match self.gateway_mac {
            Some(mac) => mac,
            None => l
                .both_sites("gateway_mac", |s| s.gateway_mac)?
                .ok_or_else(|| {
                    missing(
                        "anycast gateway MAC",
                        "--gateway-mac",
                        l.dest_key("gateway_mac"),
                    )
                })?,
        };
        let gateway_cidr = match &self.gateway_cidr {
            Some(cidr) => cidr.clone(),
            None => l
                .both_sites("gateway_cidr", |s| s.gateway_cidr.clone())?
                .ok_or_else(|| {
                    missing(
                        "anycast gateway address",
                        "--gateway-cidr",
                        l.dest_key("gateway_cidr"),
                    )
                })?,
        };
        let tunnel_mtu = self
            .defaults
            .tunnel_mtu
            .or_else(|| {
                [
                    l.source_site(|s| s.tunnel_mtu),
                    l.dest_site(|s| s.tunnel_mtu),
                ]
                .into_iter()
                .flatten()
                .min()
            })
            .or(d.tunnel_mtu)
            .unwrap_or(builtin::TUNNEL_MTU);
        // DNS: the service's, else [defaults]'s; all or nothing, as the flags.
        let dns_server = self
            .defaults
            .dns_server
            .clone()
            .or_else(|| l.svc(|s| s.dns_server.clone()))
            .or(d.dns_server.clone());
        let zone = self
            .defaults
            .zone
            .clone()
            .or_else(|| l.svc(|s| s.zone.clone()))
            .or(d.zone.clone());
        let dns_name = self
            .dns_name
            .clone()
            .or_else(|| l.svc(|s| s.dns_name.clone()));
        if dns_server.is_some() {
            zone.as_ref()
                .ok_or_else(|| missing("DNS zone", "--zone", l.service_key("zone")))?;
            dns_name
                .as_ref()
                .ok_or_else(|| missing("DNS name", "--dns-name", l.service_key("dns_name")))?;
        }
        let dns_key_file = self
            .defaults
            .dns_key_file
            .clone()
            .or_else(|| l.path(l.svc(|s| s.dns_key_file.clone()).as_ref()))
            .or_else(|| l.path(d.dns_key_file.as_ref()));
        let (source, source_token_file) = self.source_agent(&l)?;
        Ok(MigrateOptions {
            vm,
            source,
            destination: self
                .destination
                .clone()
                .or_else(|| l.dest_site(|s| s.agent.clone()))
                .ok_or_else(|| {
                    missing(
                        "destination agent",
                        "--destination (or --to SITE)",
                        l.dest_key("agent"),
                    )
                })?,
            source_token_file,
            destination_token_file: self
                .destination_token_file
                .clone()
                .or_else(|| l.path(l.dest_site(|s| s.token_file.clone()).as_ref()))
                .ok_or_else(|| {
                    missing(
                        "destination token",
                        "--destination-token-file",
                        l.dest_key("token_file"),
                    )
                })?,
            ca_cert,
            destination_spec,
            home: self
                .home
                .or_else(|| l.svc(|s| s.home))
                .ok_or_else(|| missing("home address H", "--home", l.service_key("home")))?,
            new_addr,
            address_mode,
            on_switch: self
                .on_switch
                .clone()
                .or_else(|| l.svc(|s| s.on_switch.clone())),
            source_tunnel: self
                .source_tunnel
                .or_else(|| l.source_site(|s| s.tunnel))
                .ok_or_else(|| {
                    missing(
                        "source tunnel endpoint",
                        "--source-tunnel",
                        l.source_key("tunnel"),
                    )
                })?,
            destination_tunnel: self
                .destination_tunnel
                .or_else(|| l.dest_site(|s| s.tunnel))
                .ok_or_else(|| {
                    missing(
                        "destination tunnel endpoint",
                        "--destination-tunnel",
                        l.dest_key("tunnel"),
                    )
                })?,
            migration_port: self
                .migration_port
                .or_else(|| l.dest_site(|s| s.migration_port))
                .unwrap_or(builtin::MIGRATION_PORT),
            vm_iface: self
                .defaults
                .vm_iface
                .clone()
                .or_else(|| l.svc(|s| s.vm_iface.clone()))
                .or(d.vm_iface.clone())
                .unwrap_or_else(|| builtin::VM_IFACE.to_owned()),
            gateway_mac,
            gateway_cidr,
            tunnel_mtu,
            dns_server,
            zone,
            dns_name,
            dns_key_file,
            low_ttl: self
                .defaults
                .low_ttl
                .or_else(|| l.svc(|s| s.low_ttl))
                .or(d.low_ttl)
                .unwrap_or(builtin::LOW_TTL),
            skip_ttl_wait: d.skip_ttl_wait.unwrap_or(false),
            urgent: self.urgent,
            max_bandwidth: d.max_bandwidth.unwrap_or(builtin::MAX_BANDWIDTH),
            max_postcopy_bandwidth: d.max_postcopy_bandwidth.unwrap_or(0),
            downtime_limit: d.downtime_limit.unwrap_or(builtin::DOWNTIME_LIMIT),
            postcopy: d.postcopy.unwrap_or(PostcopySetting::Off),
            postcopy_recover_timeout: d
                .postcopy_recover_timeout
                .unwrap_or(crate::qemu::migrate::DEFAULT_POSTCOPY_RECOVER_TIMEOUT),
            multifd: d.multifd,
            auto_converge: d.auto_converge.unwrap_or(false),
            nbd_port: self
                .nbd_port
                .or_else(|| l.dest_site(|s| s.nbd_port))
                .unwrap_or(builtin::NBD_PORT),
            mirror_speed: d.mirror_speed.unwrap_or(0),
            max_drain: d.max_drain.unwrap_or(builtin::MAX_DRAIN),
            drain_grace: d.drain_grace,
            agent_timeout: d.agent_timeout.unwrap_or(builtin::AGENT_TIMEOUT),
        })
    }

    /// `--resume`: the source's agent (flags, else the source site's), the key for the
    /// DNS work owed (flag, the service's, `[defaults]`'s).
    pub fn resolve_resume(
        &self,
        inventory: Option<&Inventory>,
        from: Option<&str>,
    ) -> Result<ResumeTarget, ResolveError> {
        let l = Layers::new(self, inventory, from)?;
        let d = self.defaults.clone().or(&l.inventory_defaults());
        let (source, source_token_file) = self.source_agent(&l)?;
        Ok(ResumeTarget {
            source,
            source_token_file,
            ca_cert: self.defaults.ca_cert.clone().or_else(|| {
                l.path(l.source_site(|s| s.ca_cert.clone()).as_ref())
                    .or_else(|| l.path(d.ca_cert.as_ref()))
            }),
            dns_key_file: self.defaults.dns_key_file.clone().or_else(|| {
                l.path(l.svc(|s| s.dns_key_file.clone()).as_ref())
                    .or_else(|| l.path(d.dns_key_file.as_ref()))
            }),
            agent_timeout: d.agent_timeout.unwrap_or(builtin::AGENT_TIMEOUT),
        })
    }

    /// The source's agent and its token file: the flags, else the source site's.
    fn source_agent(&self, l: &Layers<'_>) -> Result<(String, PathBuf), ResolveError> {
        let agent = self
            .source
            .clone()
            .or_else(|| l.source_site(|s| s.agent.clone()))
            .ok_or_else(|| {
                missing(
                    "source agent",
                    "--source (or --from SITE)",
                    l.source_key("agent"),
                )
            })?;
        let token_file = self
            .source_token_file
            .clone()
            .or_else(|| l.path(l.source_site(|s| s.token_file.clone()).as_ref()))
            .ok_or_else(|| {
                missing(
                    "source token",
                    "--source-token-file",
                    l.source_key("token_file"),
                )
            })?;
        Ok((agent, token_file))
    }

    /// `--source URL` with an inventory: the site whose agent that is.
    pub fn site_of_source<'i>(&self, inventory: &'i Inventory) -> Option<&'i str> {
        let source = self.source.as_deref()?;
        inventory
            .sites
            .iter()
            .find(|(_, s)| s.agent.as_deref() == Some(source))
            .map(|(n, _)| n.as_str())
    }
}
