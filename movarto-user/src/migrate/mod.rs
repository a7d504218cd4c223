//! `movarto-user migrate`: the orchestrator. It drives both sites' agents through the
//! sequence of DESIGN.md as named, timed steps, and reports.
//!
//! Before switchover any failure rolls back: the VM keeps running at A, DNS is unchanged
//! (the TTL restored), B is cleaned up and A goes back to `track`.

mod progress;
pub mod report;
mod steps;

use std::{
    net::{IpAddr, Ipv4Addr},
    path::PathBuf,
    process::ExitCode,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use clap::Args;
use movarto_common::ids::MacAddr;

use crate::agent::humantime_duration;
pub use progress::{ProgressEvent, Step};
pub use steps::{DnsTarget, Plan, run_plan};

#[derive(Args, Debug)]
pub struct MigrateArgs {
    /// The VM's name at the source agent.
    #[arg(long)]
    pub vm: String,
    /// The source site's agent, e.g. https://203.0.113.1:7878.
    #[arg(long)]
    pub source: String,
    /// The destination site's agent.
    #[arg(long)]
    pub destination: String,
    #[arg(long)]
    pub source_token_file: PathBuf,
    #[arg(long)]
    pub destination_token_file: PathBuf,
    /// A CA certificate (PEM) the agents' TLS certificates chain to.
    #[arg(long)]
    pub ca_cert: Option<PathBuf>,
    /// The VM spec at the destination (TOML; paths as the destination host sees them).
    #[arg(long)]
    pub destination_spec: PathBuf,
    /// The home address H (the VM keeps it).
    #[arg(long)]
    pub home: IpAddr,
    /// The new address N at the destination (nat address mode).
    #[arg(long, required_if_eq("address_mode", "nat"))]
    pub new_addr: Option<IpAddr>,
    /// `nat`: the destination has its own address N and DNS changes (MOVARTO's mode).
    /// `move`: H itself moves; --on-switch re-routes the network, DNS stays.
    #[arg(long, value_enum, default_value = "nat")]
    pub address_mode: AddressMode,
    /// Move address mode: a shell command that re-routes H to the destination, run at
    /// switchover with MOVARTO_VM, MOVARTO_HOME, MOVARTO_SOURCE_TUNNEL and
    /// MOVARTO_DESTINATION_TUNNEL set.
    #[arg(long)]
    pub on_switch: Option<String>,
    /// The tunnel endpoints TA (source) and TB (destination).
    #[arg(long)]
    pub source_tunnel: Ipv4Addr,
    #[arg(long)]
    pub destination_tunnel: Ipv4Addr,
    /// The TCP port the destination QEMU listens on for the migration (on TB).
    #[arg(long, default_value_t = 4444)]
    pub migration_port: u16,
    /// The VM's tap at both sites.
    #[arg(long, default_value = "tap0")]
    pub vm_iface: String,
    /// The anycast gateway on the tap: the same MAC and address at both sites.
    #[arg(long)]
    pub gateway_mac: MacAddr,
    #[arg(long)]
    pub gateway_cidr: String,
    /// The largest outer packet between the sites.
    #[arg(long, default_value_t = 1500)]
    pub tunnel_mtu: u16,
    /// The authoritative DNS server (ADDRESS[:PORT]); without it DNS is left alone.
    #[arg(long, requires_all = ["zone", "dns_name"])]
    pub dns_server: Option<String>,
    #[arg(long)]
    pub zone: Option<String>,
    /// The service's name, e.g. svc.example.test.
    #[arg(long)]
    pub dns_name: Option<String>,
    /// BIND key file (tsig-keygen) to sign the updates.
    #[arg(long)]
    pub dns_key_file: Option<PathBuf>,
    /// The TTL set before the move, so caches forget the old answer quickly.
    #[arg(long, default_value_t = 5)]
    pub low_ttl: u32,
    /// Lower the TTL but do not wait out the old one.
    #[arg(long)]
    pub skip_ttl_wait: bool,
    /// Disaster recovery: no TTL wait, no bandwidth cap, post-copy after the first pass.
    #[arg(long)]
    pub urgent: bool,
    /// Migration bandwidth cap, bytes per second.
    #[arg(long, default_value_t = 10 * 1024 * 1024 * 1024 / 8)]
    pub max_bandwidth: u64,
    /// Post-copy bandwidth cap, bytes per second (0: none). The VM at the destination
    /// waits for its missing pages, so cap post-copy only to spare a shared link.
    #[arg(long, default_value_t = 0)]
    pub max_postcopy_bandwidth: u64,
    #[arg(long, default_value_t = 300)]
    pub downtime_limit_ms: u64,
    /// `off`, `after-first-pass`, or `within:<ms>`.
    #[arg(long, default_value = "off")]
    pub postcopy: String,
    #[arg(long)]
    pub multifd: Option<u8>,
    #[arg(long)]
    pub auto_converge: bool,
    /// The destination's NBD port for the disk mirror (VMs with a disk).
    #[arg(long, default_value_t = 10809)]
    pub nbd_port: u16,
    /// Disk mirror bandwidth, bytes per second (0: unlimited).
    #[arg(long, default_value_t = 0)]
    pub mirror_speed: u64,
    /// Tear down after this long even if pre-move flows remain (they are cut and listed).
    #[arg(long, default_value = "300s", value_parser = humantime_duration)]
    pub max_drain: Duration,
    /// How long nothing may reach H at A before teardown; default: the old DNS TTL.
    #[arg(long, value_parser = humantime_duration)]
    pub drain_grace: Option<Duration>,
    /// Print the report as JSON on stdout (progress stays on stderr).
    #[arg(long)]
    pub json: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum AddressMode {
    Nat,
    Move,
}

pub fn run(args: MigrateArgs) -> Result<ExitCode> {
    let plan = Plan::from_args(&args)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let report = runtime.block_on(run_plan(&plan, true));
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.render());
    }
    Ok(if report.succeeded {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

impl Plan {
    pub fn from_args(args: &MigrateArgs) -> Result<Self> {
        let read_token = |path: &PathBuf| {
            crate::agent::token::Token::from_file(path).map(|t| t.as_str().to_owned())
        };
        let spec_toml = std::fs::read_to_string(&args.destination_spec).with_context(|| {
            format!(
                "reading the destination spec {}",
                args.destination_spec.display()
            )
        })?;
        let spec = crate::qemu::spec::VmSpec::parse(&spec_toml).with_context(|| {
            format!(
                "invalid destination spec {}",
                args.destination_spec.display()
            )
        })?;
        if spec.name != args.vm {
            bail!(
                "the destination spec names VM {:?}, but --vm is {:?}",
                spec.name,
                args.vm
            );
        }
        let new_addr = match (args.address_mode, args.new_addr) {
            (AddressMode::Nat, Some(new)) if new.is_ipv4() != args.home.is_ipv4() => {
                bail!("--home and --new-addr must be of the same family")
            }
            (AddressMode::Nat, Some(new)) => Some(new),
            (AddressMode::Nat, None) => bail!("nat address mode needs --new-addr"),
            (AddressMode::Move, Some(_)) => {
                bail!("move address mode keeps H: drop --new-addr")
            }
            (AddressMode::Move, None) => None,
        };
        if args.address_mode == AddressMode::Move && args.on_switch.is_none() {
            bail!(
                "move address mode needs --on-switch CMD to re-route {} to the destination",
                args.home
            );
        }
        let dns = match &args.dns_server {
            None => None,
            Some(server) => {
                let zone = args.zone.as_deref().context("--zone")?;
                let name = args.dns_name.as_deref().context("--dns-name")?;
                let key = args
                    .dns_key_file
                    .as_deref()
                    .map(crate::dns::key::TsigKey::from_file)
                    .transpose()?
                    .context("DNS updates must be signed: give --dns-key-file")?;
                Some(DnsTarget {
                    server: crate::dns::parse_server(server)?,
                    zone: crate::dns::parse_name(zone).context("--zone")?,
                    name: crate::dns::parse_name(name).context("--dns-name")?,
                    key,
                    low_ttl: args.low_ttl,
                    wait_old_ttl: !args.skip_ttl_wait && !args.urgent,
                })
            }
        };
        let (max_bandwidth, max_postcopy_bandwidth, postcopy) = if args.urgent {
            (u64::MAX / 2, 0, "after-first-pass".to_owned())
        } else {
            (
                args.max_bandwidth,
                args.max_postcopy_bandwidth,
                args.postcopy.clone(),
            )
        };
        let settings = crate::agent::api::MigrationSettings {
            max_bandwidth,
            max_postcopy_bandwidth,
            downtime_limit_ms: args.downtime_limit_ms,
            multifd_channels: args.multifd,
            auto_converge: args.auto_converge,
            postcopy,
            ..Default::default()
        };
        settings.options().context("--postcopy")?;
        Ok(Self {
            vm: args.vm.clone(),
            source: crate::agent::AgentClient::new(
                &args.source,
                &read_token(&args.source_token_file)?,
                args.ca_cert.as_deref(),
            )?,
            destination: crate::agent::AgentClient::new(
                &args.destination,
                &read_token(&args.destination_token_file)?,
                args.ca_cert.as_deref(),
            )?,
            destination_spec_toml: spec_toml,
            vm_mac: spec
                .nic
                .mac
                .parse()
                .context("the destination spec's nic.mac")?,
            home: args.home,
            new_addr,
            on_switch: args.on_switch.clone(),
            source_tunnel: args.source_tunnel,
            destination_tunnel: args.destination_tunnel,
            migration_uri: format!("tcp:{}:{}", args.destination_tunnel, args.migration_port),
            vm_iface: args.vm_iface.clone(),
            gateway_mac: args.gateway_mac,
            gateway_cidr: args.gateway_cidr.clone(),
            tunnel_mtu: args.tunnel_mtu,
            dns,
            settings,
            mirror: spec
                .disk
                .is_some()
                .then(|| crate::agent::api::MirrorSettings {
                    nbd_host: args.destination_tunnel.to_string(),
                    nbd_port: args.nbd_port,
                    speed: args.mirror_speed,
                }),
            urgent: args.urgent,
            max_drain: args.max_drain,
            drain_grace: args.drain_grace,
        })
    }
}
