//! `movarto-user migrate`: parses the options, runs the migration, prints the report.

use std::{
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use anyhow::{Context as _, Result};
use clap::{
    Args,
    builder::{PossibleValuesParser, TypedValueParser as _},
};
use movarto_common::ids::MacAddr;
use movarto_user::{
    agent::{
        AgentClient,
        api::{MigrationId, PostcopySetting},
        token::Token,
    },
    dns::key::TsigKey,
    inventory::{Defaults, Inventory, MigrateFlags, SourceSite, find_source, locate_migration},
    migrate::{AddressMode, Plan, ProgressFormat, resume, run_plan},
};

use super::{
    logging::LogFormat,
    units::{parse_bandwidth, parse_duration},
};

/// `migrate NAME --to SITE` with an inventory (`--config`, docs/inventory.md), or the
/// long form with every value as a flag. A flag wins over the inventory, which wins
/// over the built-in default.
#[derive(Args, Debug)]
pub struct MigrateArgs {
    /// The service (or VM) to move, as the inventory names it; the VM's name at the
    /// agents without an inventory.
    #[arg(value_name = "NAME", conflicts_with = "vm")]
    pub name: Option<String>,
    /// The VM's name at the source agent (the long form's NAME).
    #[arg(long)]
    pub vm: Option<String>,
    /// The destination site, from the inventory's [sites].
    #[arg(long, value_name = "SITE")]
    pub to: Option<String>,
    /// The source site (default: the site whose agent runs the VM, else the service's
    /// home_site).
    #[arg(long, value_name = "SITE")]
    pub from: Option<String>,
    /// The source site's agent, e.g. https://203.0.113.1:7878.
    #[arg(long)]
    pub source: Option<String>,
    /// The destination site's agent.
    #[arg(long)]
    pub destination: Option<String>,
    #[arg(long)]
    pub source_token_file: Option<PathBuf>,
    #[arg(long)]
    pub destination_token_file: Option<PathBuf>,
    /// A CA certificate (PEM) the agents' TLS certificates chain to.
    #[arg(long)]
    pub ca_cert: Option<PathBuf>,
    /// The VM spec at the destination (TOML; paths as the destination host sees them).
    #[arg(long)]
    pub destination_spec: Option<PathBuf>,
    /// The home address H (the VM keeps it).
    #[arg(long)]
    pub home: Option<IpAddr>,
    /// The new address N at the destination (nat address mode). `H` itself moves the VM
    /// home: back to the site it came from while that move still drains.
    #[arg(long)]
    pub new_addr: Option<IpAddr>,
    /// `nat` (default): the destination has its own address N and DNS changes (MOVARTO's
    /// mode). `move`: H itself moves; --on-switch re-routes the network, DNS stays.
    #[arg(
        long,
        value_parser = PossibleValuesParser::new(["nat", "move"])
            .try_map(|s| s.parse::<AddressMode>()),
    )]
    pub address_mode: Option<AddressMode>,
    /// Move address mode: a shell command that re-routes H to the destination, run at
    /// switchover with MOVARTO_VM, MOVARTO_HOME, MOVARTO_SOURCE_TUNNEL and
    /// MOVARTO_DESTINATION_TUNNEL set.
    #[arg(long)]
    pub on_switch: Option<String>,
    /// The tunnel endpoints TA (source) and TB (destination).
    #[arg(long)]
    pub source_tunnel: Option<Ipv4Addr>,
    #[arg(long)]
    pub destination_tunnel: Option<Ipv4Addr>,
    /// The TCP port the destination QEMU listens on for the migration (on TB) [default: 4444].
    #[arg(long)]
    pub migration_port: Option<u16>,
    /// The VM's tap at both sites [default: tap0].
    #[arg(long)]
    pub vm_iface: Option<String>,
    /// The anycast gateway on the tap: the same MAC and address at both sites.
    #[arg(long)]
    pub gateway_mac: Option<MacAddr>,
    #[arg(long)]
    pub gateway_cidr: Option<String>,
    /// The largest outer packet between the sites [default: 1500].
    #[arg(long)]
    pub tunnel_mtu: Option<u16>,
    /// The authoritative DNS server (ADDRESS[:PORT]); without it DNS is left alone.
    #[arg(long)]
    pub dns_server: Option<String>,
    #[arg(long)]
    pub zone: Option<String>,
    /// The service's name, e.g. svc.example.test.
    #[arg(long)]
    pub dns_name: Option<String>,
    /// BIND key file (tsig-keygen) to sign the updates.
    #[arg(long)]
    pub dns_key_file: Option<PathBuf>,
    /// The TTL set before the move, so caches forget the old answer quickly [default: 5].
    #[arg(long)]
    pub low_ttl: Option<u32>,
    /// Lower the TTL but do not wait out the old one (`=false` undoes the inventory's).
    #[arg(long, num_args = 0..=1, default_missing_value = "true", require_equals = true)]
    pub skip_ttl_wait: Option<bool>,
    /// Disaster recovery: no TTL wait, no bandwidth cap, post-copy after the first pass.
    #[arg(long)]
    pub urgent: bool,
    /// Migration bandwidth cap, in MiB/s (as virsh counts it) [default: 1280]. Over a
    /// WAN, set it below the link's rate (the demo takes 84% of it): a migration that
    /// fills the link fills the link's queue too, and QEMU's last burst, which the VM
    /// waits for at the destination, and the tunnel's packets then wait behind that
    /// queue. The report's `pause:` line shows the VM's pause as its clients see it.
    #[arg(long, value_parser = parse_bandwidth)]
    pub max_bandwidth: Option<u64>,
    /// Post-copy bandwidth cap, in MiB/s; 0 is no cap. The VM at the destination waits
    /// for its missing pages, so cap post-copy only to spare a shared link [default: 0].
    #[arg(long, value_parser = parse_bandwidth)]
    pub max_postcopy_bandwidth: Option<u64>,
    /// The longest blackout QEMU may plan for (a number with a unit: 300ms, 1s). QEMU
    /// stops the VM once what is left fits this long at the rate it measures, so the
    /// downtime comes close to it: 100ms gives about 100 ms at 200 Mbit/s for a guest
    /// that dirties little (one or two passes more; the demo uses it), a busy guest may
    /// never get there (add --auto-converge or --postcopy) [default: 300ms, QEMU's].
    #[arg(long, value_parser = parse_duration)]
    pub downtime_limit: Option<Duration>,
    /// `off`, `after-first-pass`, or `within:<ms>` [default: off].
    #[arg(long)]
    pub postcopy: Option<PostcopySetting>,
    /// When post-copy's stream breaks (or, once the VM runs at the destination, moves
    /// nothing for 2 s), the agents resume it on a new connection for this long; the VM
    /// at the destination waits for its missing pages meanwhile. After it, the VM is
    /// left split for a person to recover. 0s: no resume [default: 60s].
    #[arg(long, value_parser = parse_duration)]
    pub postcopy_recover_timeout: Option<Duration>,
    #[arg(long)]
    pub multifd: Option<u8>,
    /// QEMU's auto-converge (`=false` undoes the inventory's).
    #[arg(long, num_args = 0..=1, default_missing_value = "true", require_equals = true)]
    pub auto_converge: Option<bool>,
    /// The destination's NBD port for the disk mirror (VMs with a disk) [default: 10809].
    #[arg(long)]
    pub nbd_port: Option<u16>,
    /// Disk mirror bandwidth, in MiB/s; 0 is unlimited [default: 0].
    #[arg(long, value_parser = parse_bandwidth)]
    pub mirror_speed: Option<u64>,
    /// Tear down after this long even if pre-move flows remain (they are cut and listed);
    /// a number with a unit: 300s, 5m [default: 300s].
    #[arg(long, value_parser = parse_duration)]
    pub max_drain: Option<Duration>,
    /// How long nothing may reach H at A before teardown (300ms, 5s, 2m); default: the
    /// old DNS TTL.
    #[arg(long, value_parser = parse_duration)]
    pub drain_grace: Option<Duration>,
    /// Progress on stderr: `text` for people, `json` for one event per line (default:
    /// `json` with `--log-format json`, so that every stderr line is JSON; else `text`).
    #[arg(
        long,
        value_parser = PossibleValuesParser::new(["text", "json"])
            .try_map(|s| s.parse::<ProgressFormat>()),
    )]
    pub progress: Option<ProgressFormat>,
    /// Print the report as JSON on stdout (progress stays on stderr).
    #[arg(long)]
    pub json: bool,
    /// Follow a migration the agents already run (after this command was killed or
    /// interrupted), and do the DNS work it owes. Needs only the source's agent (--from
    /// SITE, or --source and its token file; with an inventory, the agent that holds
    /// it is found) and, if DNS work is owed, the key: the rest is in the record.
    #[arg(long, value_name = "ID")]
    pub resume: Option<MigrationId>,
    /// How long an unreachable agent is retried, with backoff, before a step fails
    /// (a number with a unit: 30s, 2m) [default: 30s].
    #[arg(long, value_parser = parse_duration)]
    pub agent_timeout: Option<Duration>,
}

impl MigrateArgs {
    /// `--progress`, or what suits the log format: JSON logs get JSON progress.
    pub fn progress_format(&self, logs: LogFormat) -> ProgressFormat {
        self.progress.unwrap_or(match logs {
            LogFormat::Human => ProgressFormat::Text,
            LogFormat::Json => ProgressFormat::Json,
        })
    }

    /// The flags as given, for the library to complete from the inventory.
    fn flags(&self) -> MigrateFlags {
        MigrateFlags {
            name: self.name.clone().or_else(|| self.vm.clone()),
            to: self.to.clone(),
            from: self.from.clone(),
            source: self.source.clone(),
            destination: self.destination.clone(),
            source_token_file: self.source_token_file.clone(),
            destination_token_file: self.destination_token_file.clone(),
            destination_spec: self.destination_spec.clone(),
            home: self.home,
            new_addr: self.new_addr,
            address_mode: self.address_mode,
            on_switch: self.on_switch.clone(),
            source_tunnel: self.source_tunnel,
            destination_tunnel: self.destination_tunnel,
            migration_port: self.migration_port,
            nbd_port: self.nbd_port,
            gateway_mac: self.gateway_mac,
            gateway_cidr: self.gateway_cidr.clone(),
            dns_name: self.dns_name.clone(),
            urgent: self.urgent,
            defaults: Defaults {
                max_bandwidth: self.max_bandwidth,
                max_postcopy_bandwidth: self.max_postcopy_bandwidth,
                downtime_limit: self.downtime_limit,
                postcopy: self.postcopy,
                postcopy_recover_timeout: self.postcopy_recover_timeout,
                multifd: self.multifd,
                auto_converge: self.auto_converge,
                mirror_speed: self.mirror_speed,
                max_drain: self.max_drain,
                drain_grace: self.drain_grace,
                agent_timeout: self.agent_timeout,
                low_ttl: self.low_ttl,
                skip_ttl_wait: self.skip_ttl_wait,
                tunnel_mtu: self.tunnel_mtu,
                vm_iface: self.vm_iface.clone(),
                ca_cert: self.ca_cert.clone(),
                dns_server: self.dns_server.clone(),
                zone: self.zone.clone(),
                dns_key_file: self.dns_key_file.clone(),
            },
        }
    }
}

/// The source site: `--from`, the site whose agent `--source` names, or (when a value
/// of the source's side is still missing) where the agents say the VM runs.
async fn source_site(
    flags: &MigrateFlags,
    inventory: Option<&Inventory>,
) -> Result<Option<SourceSite>> {
    if let Some(from) = &flags.from {
        return Ok(Some(SourceSite::Flag(from.clone())));
    }
    let (Some(inventory), Some(to)) = (inventory, flags.to.as_deref()) else {
        return Ok(None);
    };
    if let Some(site) = flags.site_of_source(inventory) {
        return Ok(Some(SourceSite::AgentUrl(site.to_owned())));
    }
    if !flags.needs_source_site() {
        return Ok(None);
    }
    let name = flags.name.as_deref().context("give the VM's name (NAME)")?;
    let (vm, home_site) = match inventory.service(name) {
        Some((service, s)) => (s.vm_name(service), s.home_site.as_deref()),
        None => (name, None),
    };
    find_source(inventory, vm, to, home_site)
        .await
        .map(Some)
        .map_err(anyhow::Error::msg)
}

/// `--resume ID`: the source site, when no flag names its agent.
async fn resume_site(
    flags: &MigrateFlags,
    inventory: Option<&Inventory>,
    id: &MigrationId,
) -> Result<Option<String>> {
    match (&flags.from, inventory) {
        (Some(from), _) => Ok(Some(from.clone())),
        (None, Some(inventory)) if flags.source.is_none() => {
            locate_migration(inventory, id.as_str())
                .await
                .map(Some)
                .map_err(anyhow::Error::msg)
        }
        (None, Some(inventory)) => Ok(flags.site_of_source(inventory).map(str::to_owned)),
        (None, None) => Ok(None),
    }
}

pub fn run(args: &MigrateArgs, config: Option<&Path>, logs: LogFormat) -> Result<ExitCode> {
    let progress = args.progress_format(logs);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let inventory = Inventory::load_optional(config)?;
    let flags = args.flags();
    let report = match &args.resume {
        Some(id) => {
            let from = runtime.block_on(resume_site(&flags, inventory.as_ref(), id))?;
            let target = flags.resolve_resume(inventory.as_ref(), from.as_deref())?;
            let token = Token::from_file(&target.source_token_file)?;
            let source =
                AgentClient::new(&target.source, token.as_str(), target.ca_cert.as_deref())?;
            let key = target
                .dns_key_file
                .as_deref()
                .map(TsigKey::from_file)
                .transpose()?;
            runtime.block_on(resume(
                &source,
                id.clone(),
                key,
                target.agent_timeout,
                progress,
            ))
        }
        None => {
            let from = runtime.block_on(source_site(&flags, inventory.as_ref()))?;
            if let Some(from) = &from {
                tracing::info!("the VM leaves {from}");
            }
            let options = flags.resolve(inventory.as_ref(), from.as_ref().map(SourceSite::name))?;
            let plan = Plan::from_options(&options)?;
            runtime.block_on(run_plan(&plan, progress))
        }
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.render());
    }
    // A log collector sees the outcome too, not only whoever reads stdout.
    if logs == LogFormat::Json {
        match &report.error {
            None => {
                tracing::info!(vm = %report.vm, total_ms = report.total_ms, "migration succeeded")
            }
            Some(error) => {
                tracing::error!(vm = %report.vm, error = %error, rolled_back = ?report.rolled_back, "migration failed")
            }
        }
    }
    Ok(if report.succeeded {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        migrate: MigrateArgs,
    }

    fn parse(extra: &[&str]) -> Result<MigrateArgs, clap::Error> {
        let required = [
            "migrate",
            "--vm=web",
            "--source=http://a",
            "--destination=http://b",
            "--source-token-file=a",
            "--destination-token-file=b",
            "--destination-spec=b.toml",
            "--home=192.0.2.10",
            "--new-addr=198.51.100.10",
            "--source-tunnel=203.0.113.1",
            "--destination-tunnel=203.0.113.129",
            "--gateway-mac=02:00:00:00:00:01",
            "--gateway-cidr=192.0.2.1/24",
        ];
        Cli::try_parse_from(required.iter().chain(extra)).map(|cli| cli.migrate)
    }

    #[test]
    fn units_are_the_command_lines_own() {
        let args = parse(&[
            "--max-bandwidth=8",
            "--downtime-limit=250ms",
            "--max-drain=2m",
            "--postcopy=within:1500",
            "--postcopy-recover-timeout=2m",
            "--progress=json",
        ])
        .expect("parses");
        assert_eq!(
            args.postcopy_recover_timeout,
            Some(Duration::from_secs(120))
        );
        assert_eq!(args.max_bandwidth, Some(8 << 20));
        assert_eq!(args.downtime_limit, Some(Duration::from_millis(250)));
        assert_eq!(args.max_drain, Some(Duration::from_secs(120)));
        assert_eq!(args.postcopy, Some(PostcopySetting::WithinMs(1500)));
        assert_eq!(args.progress_format(LogFormat::Human), ProgressFormat::Json);
        let defaults = parse(&[]).expect("parses");
        assert_eq!(
            defaults.progress_format(LogFormat::Human),
            ProgressFormat::Text
        );
        assert_eq!(
            defaults.progress_format(LogFormat::Json),
            ProgressFormat::Json
        );
        let text = parse(&["--progress=text"]).expect("parses");
        assert_eq!(text.progress_format(LogFormat::Json), ProgressFormat::Text);
        // Without an inventory, the built-in defaults.
        let options = defaults.flags().resolve(None, None).expect("the long form");
        assert_eq!(options.address_mode, AddressMode::Nat);
        assert_eq!(options.downtime_limit, Duration::from_millis(300));
        assert_eq!(options.postcopy_recover_timeout, Duration::from_secs(60));
        assert_eq!(options.agent_timeout, Duration::from_secs(30));
        assert_eq!(options.max_bandwidth, 1280 << 20);
        assert!(!options.skip_ttl_wait && !options.auto_converge);
        let flagged = parse(&["--skip-ttl-wait", "--auto-converge=false"]).expect("parses");
        assert_eq!(flagged.skip_ttl_wait, Some(true));
        assert_eq!(flagged.auto_converge, Some(false));
        for bad in [
            "--max-drain=300",
            "--downtime-limit=300",
            "--postcopy=sometimes",
            "--progress=xml",
            "--resume=../x",
            "--agent-timeout=5",
        ] {
            assert!(parse(&[bad]).is_err(), "{bad}");
        }
    }

    /// `--resume ID` needs only the source's agent: the rest is in the record.
    #[test]
    fn resume_needs_only_the_source() {
        let args = Cli::try_parse_from([
            "migrate",
            "--resume=web-1764600000-ab12",
            "--source=http://a",
            "--source-token-file=a",
        ])
        .expect("parses")
        .migrate;
        assert_eq!(
            args.resume.as_ref().map(MigrationId::as_str),
            Some("web-1764600000-ab12")
        );
        let without =
            Cli::try_parse_from(["migrate", "--source=http://a", "--source-token-file=a"])
                .expect("parses")
                .migrate;
        let err = without.flags().resolve(None, None).expect_err("refused");
        assert!(err.to_string().contains("--vm"), "{err}");
        let both = Cli::try_parse_from(["migrate", "web", "--vm=web"]);
        assert!(both.is_err(), "NAME and --vm are one thing");
        let short = Cli::try_parse_from(["migrate", "web", "--to", "b"])
            .expect("parses")
            .migrate
            .flags();
        assert_eq!(
            (short.name.as_deref(), short.to.as_deref()),
            (Some("web"), Some("b"))
        );
    }
}
