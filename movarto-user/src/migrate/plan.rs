//! What a migration needs, checked before anything changes: the [`Plan`], built from
//! plain [`MigrateOptions`] (the command line's, or a caller's own).

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use hickory_proto::rr::Name;
use movarto_common::ids::MacAddr;

use crate::{
    agent::{
        AgentClient,
        api::{
            DnsPlan, DrainRule, MigrationId, MigrationSettings, MigrationSpec, MirrorSettings,
            PeerAgent, PostcopySetting, TapRequest,
        },
        token::Token,
    },
    dns::{client::ZoneServer, key::TsigKey, records},
    qemu::spec::VmSpec,
};

/// How long the DNS change may take to show on the authoritative server.
pub(super) const DNS_VERIFY: Duration = Duration::from_secs(10);

/// How the service's address moves.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AddressMode {
    /// The destination has its own address `N` and DNS changes (MOVARTO's mode).
    #[default]
    Nat,
    /// `H` itself moves; a hook re-routes the network, DNS stays.
    Move,
}

impl AddressMode {
    pub const fn name(self) -> &'static str {
        match self {
            AddressMode::Nat => "nat",
            AddressMode::Move => "move",
        }
    }
}

impl std::str::FromStr for AddressMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        [AddressMode::Nat, AddressMode::Move]
            .into_iter()
            .find(|mode| mode.name() == s)
            .ok_or_else(|| format!("{s:?}: expected `nat` or `move`"))
    }
}

/// A migration as its caller states it; [`Plan::from_options`] checks it. Bandwidths
/// are bytes per second.
#[derive(Clone, Debug)]
pub struct MigrateOptions {
    pub vm: String,
    pub source: String,
    pub destination: String,
    pub source_token_file: PathBuf,
    pub destination_token_file: PathBuf,
    pub ca_cert: Option<PathBuf>,
    pub destination_spec: PathBuf,
    pub home: IpAddr,
    pub new_addr: Option<IpAddr>,
    pub address_mode: AddressMode,
    pub on_switch: Option<String>,
    pub source_tunnel: Ipv4Addr,
    pub destination_tunnel: Ipv4Addr,
    pub migration_port: u16,
    pub vm_iface: String,
    pub gateway_mac: MacAddr,
    pub gateway_cidr: String,
    pub tunnel_mtu: u16,
    pub dns_server: Option<String>,
    pub zone: Option<String>,
    pub dns_name: Option<String>,
    pub dns_key_file: Option<PathBuf>,
    pub low_ttl: u32,
    pub skip_ttl_wait: bool,
    pub urgent: bool,
    pub max_bandwidth: u64,
    /// 0: no cap.
    pub max_postcopy_bandwidth: u64,
    pub downtime_limit: Duration,
    pub postcopy: PostcopySetting,
    pub postcopy_recover_timeout: Duration,
    pub multifd: Option<u8>,
    pub auto_converge: bool,
    pub nbd_port: u16,
    /// 0: unlimited.
    pub mirror_speed: u64,
    pub max_drain: Duration,
    pub drain_grace: Option<Duration>,
    /// How long an unreachable agent is retried (with backoff) before a step fails.
    pub agent_timeout: Duration,
}

/// The authoritative server and the record the move changes.
pub struct DnsTarget {
    pub server: SocketAddr,
    pub zone: Name,
    pub name: Name,
    pub key: TsigKey,
    pub low_ttl: u32,
    pub wait_old_ttl: bool,
}

impl DnsTarget {
    /// The target a migration's record names, with the operator's key.
    pub fn from_record(plan: &DnsPlan, key: TsigKey) -> Result<Self> {
        Ok(Self {
            server: plan.server,
            zone: crate::dns::parse_name(&plan.zone).context("the record's zone")?,
            name: crate::dns::parse_name(&plan.name).context("the record's name")?,
            key,
            low_ttl: 0,
            wait_old_ttl: false,
        })
    }

    pub(super) fn zone_server(&self) -> ZoneServer {
        ZoneServer::new(self.server, self.zone.clone(), Some(self.key.clone()))
    }

    /// Sets the name's TTL (the DNS client blocks: off the async threads); returns the
    /// longest old TTL.
    pub(super) async fn set_ttl(&self, ttl: u32) -> Result<u32> {
        let (server, name) = (self.zone_server(), self.name.clone());
        let (_, old_ttl) =
            tokio::task::spawn_blocking(move || records::set_ttl(&server, &name, ttl, DNS_VERIFY))
                .await
                .context("the DNS task panicked")??;
        Ok(old_ttl)
    }
}

/// Everything a migration needs, checked.
pub struct Plan {
    pub vm: String,
    pub source: AgentClient,
    pub destination: AgentClient,
    pub destination_spec_toml: String,
    pub vm_mac: MacAddr,
    pub home: IpAddr,
    /// `N` in nat address mode; `None` in move address mode (`H` itself moves).
    pub new_addr: Option<IpAddr>,
    /// Move address mode: the command that re-routes `H` to the destination.
    pub on_switch: Option<String>,
    pub source_tunnel: Ipv4Addr,
    pub destination_tunnel: Ipv4Addr,
    pub migration_uri: String,
    pub vm_iface: String,
    pub gateway_mac: MacAddr,
    pub gateway_cidr: String,
    pub tunnel_mtu: u16,
    pub dns: Option<DnsTarget>,
    pub settings: MigrationSettings,
    /// Set when the VM has a disk: mirrored over NBD to the destination.
    pub mirror: Option<MirrorSettings>,
    pub urgent: bool,
    pub max_drain: Duration,
    pub drain_grace: Option<Duration>,
    pub agent_timeout: Duration,
    /// How each agent reaches the other (the same URLs and tokens this run uses).
    pub source_agent: PeerAgent,
    pub destination_agent: PeerAgent,
}

impl Plan {
    pub fn address_mode(&self) -> AddressMode {
        if self.new_addr.is_some() {
            AddressMode::Nat
        } else {
            AddressMode::Move
        }
    }

    /// What the source's agent is asked to run (`POST /v1/migrations`).
    pub(super) fn spec(&self, id: MigrationId, original_ttl: u32) -> MigrationSpec {
        let grace = self
            .drain_grace
            .unwrap_or_else(|| Duration::from_secs(u64::from(original_ttl)));
        MigrationSpec {
            id,
            vm: self.vm.clone(),
            source_agent: self.source_agent.clone(),
            destination_agent: self.destination_agent.clone(),
            destination_spec_toml: self.destination_spec_toml.clone(),
            vm_mac: self.vm_mac,
            home: self.home,
            new_addr: self.new_addr,
            on_switch: self.on_switch.clone(),
            source_tunnel: self.source_tunnel,
            destination_tunnel: self.destination_tunnel,
            migration_uri: self.migration_uri.clone(),
            vm_iface: self.vm_iface.clone(),
            tap: TapRequest {
                gateway_mac: self.gateway_mac,
                gateway_cidr: self.gateway_cidr.clone(),
            },
            tunnel_mtu: self.tunnel_mtu,
            settings: self.settings.clone(),
            mirror: self.mirror.clone(),
            drain: DrainRule {
                grace_ms: grace.as_millis() as u64,
                max_drain_ms: self.max_drain.as_millis() as u64,
            },
            dns: self.dns.as_ref().map(|d| DnsPlan {
                server: d.server,
                zone: d.zone.to_string(),
                name: d.name.to_string(),
                original_ttl,
            }),
            agent_timeout_ms: self.agent_timeout.as_millis() as u64,
        }
    }

    /// Checks the options, reads the tokens, the destination spec and the TSIG key.
    pub fn from_options(options: &MigrateOptions) -> Result<Self> {
        let o = options;
        let read_token = |path: &PathBuf| Token::from_file(path).map(|t| t.as_str().to_owned());
        let spec_toml = std::fs::read_to_string(&o.destination_spec).with_context(|| {
            format!(
                "reading the destination spec {}",
                o.destination_spec.display()
            )
        })?;
        let spec = VmSpec::parse(&spec_toml).with_context(|| {
            format!("invalid destination spec {}", o.destination_spec.display())
        })?;
        if spec.name != o.vm {
            bail!(
                "the destination spec names VM {:?}, but --vm is {:?}",
                spec.name,
                o.vm
            );
        }
        let new_addr = match (o.address_mode, o.new_addr) {
            (AddressMode::Nat, Some(new)) if new.is_ipv4() != o.home.is_ipv4() => {
                bail!("--home and --new-addr must be of the same family")
            }
            (AddressMode::Nat, Some(new)) => Some(new),
            (AddressMode::Nat, None) => bail!("nat address mode needs --new-addr"),
            (AddressMode::Move, Some(_)) => {
                bail!("move address mode keeps H: drop --new-addr")
            }
            (AddressMode::Move, None) => None,
        };
        if o.address_mode == AddressMode::Move && o.on_switch.is_none() {
            bail!(
                "move address mode needs --on-switch CMD to re-route {} to the destination",
                o.home
            );
        }
        let dns = match &o.dns_server {
            None => None,
            Some(server) => Some(dns_target(o, server)?),
        };
        let (max_bandwidth, max_postcopy_bandwidth, postcopy) = if o.urgent {
            (u64::MAX / 2, 0, PostcopySetting::AfterFirstPass)
        } else {
            (o.max_bandwidth, o.max_postcopy_bandwidth, o.postcopy)
        };
        if o.agent_timeout.is_zero() {
            bail!("--agent-timeout must be positive");
        }
        let ca_pem = o
            .ca_cert
            .as_deref()
            .map(|path| {
                std::fs::read_to_string(path)
                    .with_context(|| format!("reading the CA certificate {}", path.display()))
            })
            .transpose()?;
        let (source_token, destination_token) = (
            read_token(&o.source_token_file)?,
            read_token(&o.destination_token_file)?,
        );
        let settings = MigrationSettings {
            max_bandwidth,
            max_postcopy_bandwidth,
            downtime_limit_ms: o.downtime_limit.as_millis() as u64,
            multifd_channels: o.multifd,
            auto_converge: o.auto_converge,
            postcopy,
            postcopy_recover_timeout_ms: o.postcopy_recover_timeout.as_millis() as u64,
            ..Default::default()
        };
        Ok(Self {
            vm: o.vm.clone(),
            source: AgentClient::new(&o.source, &source_token, o.ca_cert.as_deref())?,
            destination: AgentClient::new(
                &o.destination,
                &destination_token,
                o.ca_cert.as_deref(),
            )?,
            source_agent: PeerAgent {
                url: o.source.clone(),
                token: source_token,
                ca_pem: ca_pem.clone(),
            },
            destination_agent: PeerAgent {
                url: o.destination.clone(),
                token: destination_token,
                ca_pem,
            },
            agent_timeout: o.agent_timeout,
            destination_spec_toml: spec_toml,
            vm_mac: spec
                .nic
                .mac
                .parse()
                .context("the destination spec's nic.mac")?,
            home: o.home,
            new_addr,
            on_switch: o.on_switch.clone(),
            source_tunnel: o.source_tunnel,
            destination_tunnel: o.destination_tunnel,
            migration_uri: format!("tcp:{}:{}", o.destination_tunnel, o.migration_port),
            vm_iface: o.vm_iface.clone(),
            gateway_mac: o.gateway_mac,
            gateway_cidr: o.gateway_cidr.clone(),
            tunnel_mtu: o.tunnel_mtu,
            dns,
            settings,
            mirror: spec.disk.is_some().then(|| MirrorSettings {
                nbd_host: o.destination_tunnel.to_string(),
                nbd_port: o.nbd_port,
                speed: o.mirror_speed,
            }),
            urgent: o.urgent,
            max_drain: o.max_drain,
            drain_grace: o.drain_grace,
        })
    }
}

fn dns_target(o: &MigrateOptions, server: &str) -> Result<DnsTarget> {
    let zone = o.zone.as_deref().context("--zone")?;
    let name = o.dns_name.as_deref().context("--dns-name")?;
    let key = o
        .dns_key_file
        .as_deref()
        .map(TsigKey::from_file)
        .transpose()?
        .context("DNS updates must be signed: give --dns-key-file")?;
    Ok(DnsTarget {
        server: crate::dns::parse_server(server)?,
        zone: crate::dns::parse_name(zone).context("--zone")?,
        name: crate::dns::parse_name(name).context("--dns-name")?,
        key,
        low_ttl: o.low_ttl,
        wait_old_ttl: !o.skip_ttl_wait && !o.urgent,
    })
}
