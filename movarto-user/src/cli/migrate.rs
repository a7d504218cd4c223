//! `movarto-user migrate`: parses the options, runs the migration, prints the report.

use std::{
    net::{IpAddr, Ipv4Addr},
    path::PathBuf,
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
    migrate::{AddressMode, MigrateOptions, Plan, ProgressFormat, resume, run_plan},
};

use super::{
    logging::LogFormat,
    units::{parse_bandwidth, parse_duration},
};

#[derive(Args, Debug)]
pub struct MigrateArgs {
    /// The VM's name at the source agent.
    #[arg(long, required_unless_present = "resume")]
    pub vm: Option<String>,
    /// The source site's agent, e.g. https://203.0.113.1:7878.
    #[arg(long)]
    pub source: String,
    /// The destination site's agent.
    #[arg(long, required_unless_present = "resume")]
    pub destination: Option<String>,
    #[arg(long)]
    pub source_token_file: PathBuf,
    #[arg(long, required_unless_present = "resume")]
    pub destination_token_file: Option<PathBuf>,
    /// A CA certificate (PEM) the agents' TLS certificates chain to.
    #[arg(long)]
    pub ca_cert: Option<PathBuf>,
    /// The VM spec at the destination (TOML; paths as the destination host sees them).
    #[arg(long, required_unless_present = "resume")]
    pub destination_spec: Option<PathBuf>,
    /// The home address H (the VM keeps it).
    #[arg(long, required_unless_present = "resume")]
    pub home: Option<IpAddr>,
    /// The new address N at the destination (nat address mode).
    #[arg(long, required_if_eq("address_mode", "nat"))]
    pub new_addr: Option<IpAddr>,
    /// `nat`: the destination has its own address N and DNS changes (MOVARTO's mode).
    /// `move`: H itself moves; --on-switch re-routes the network, DNS stays.
    #[arg(
        long,
        default_value = "nat",
        value_parser = PossibleValuesParser::new(["nat", "move"])
            .try_map(|s| s.parse::<AddressMode>()),
    )]
    pub address_mode: AddressMode,
    /// Move address mode: a shell command that re-routes H to the destination, run at
    /// switchover with MOVARTO_VM, MOVARTO_HOME, MOVARTO_SOURCE_TUNNEL and
    /// MOVARTO_DESTINATION_TUNNEL set.
    #[arg(long)]
    pub on_switch: Option<String>,
    /// The tunnel endpoints TA (source) and TB (destination).
    #[arg(long, required_unless_present = "resume")]
    pub source_tunnel: Option<Ipv4Addr>,
    #[arg(long, required_unless_present = "resume")]
    pub destination_tunnel: Option<Ipv4Addr>,
    /// The TCP port the destination QEMU listens on for the migration (on TB).
    #[arg(long, default_value_t = 4444)]
    pub migration_port: u16,
    /// The VM's tap at both sites.
    #[arg(long, default_value = "tap0")]
    pub vm_iface: String,
    /// The anycast gateway on the tap: the same MAC and address at both sites.
    #[arg(long, required_unless_present = "resume")]
    pub gateway_mac: Option<MacAddr>,
    #[arg(long, required_unless_present = "resume")]
    pub gateway_cidr: Option<String>,
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
    /// Migration bandwidth cap, in MiB/s (as virsh counts it).
    #[arg(long, default_value = "1280", value_parser = parse_bandwidth)]
    pub max_bandwidth: u64,
    /// Post-copy bandwidth cap, in MiB/s; 0 is no cap. The VM at the destination waits
    /// for its missing pages, so cap post-copy only to spare a shared link.
    #[arg(long, default_value = "0", value_parser = parse_bandwidth)]
    pub max_postcopy_bandwidth: u64,
    /// The longest blackout QEMU may plan for (a number with a unit: 300ms, 1s).
    #[arg(long, default_value = "300ms", value_parser = parse_duration)]
    pub downtime_limit: Duration,
    /// `off`, `after-first-pass`, or `within:<ms>`.
    #[arg(long, default_value = "off")]
    pub postcopy: PostcopySetting,
    #[arg(long)]
    pub multifd: Option<u8>,
    #[arg(long)]
    pub auto_converge: bool,
    /// The destination's NBD port for the disk mirror (VMs with a disk).
    #[arg(long, default_value_t = 10809)]
    pub nbd_port: u16,
    /// Disk mirror bandwidth, in MiB/s; 0 is unlimited.
    #[arg(long, default_value = "0", value_parser = parse_bandwidth)]
    pub mirror_speed: u64,
    /// Tear down after this long even if pre-move flows remain (they are cut and listed);
    /// a number with a unit: 300s, 5m.
    #[arg(long, default_value = "300s", value_parser = parse_duration)]
    pub max_drain: Duration,
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
    /// interrupted), and do the DNS work it owes. Needs only --source, its token file and
    /// (if DNS work is owed) --dns-key-file: the rest is in the migration's record.
    #[arg(long, value_name = "ID")]
    pub resume: Option<MigrationId>,
    /// How long an unreachable agent is retried, with backoff, before a step fails
    /// (a number with a unit: 30s, 2m).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub agent_timeout: Duration,
}

impl MigrateArgs {
    /// `--progress`, or what suits the log format: JSON logs get JSON progress.
    pub fn progress_format(&self, logs: LogFormat) -> ProgressFormat {
        self.progress.unwrap_or(match logs {
            LogFormat::Human => ProgressFormat::Text,
            LogFormat::Json => ProgressFormat::Json,
        })
    }

    fn options(&self) -> Result<MigrateOptions> {
        let need = |what: &str| anyhow::anyhow!("--{what} is required (without --resume)");
        Ok(MigrateOptions {
            vm: self.vm.clone().ok_or_else(|| need("vm"))?,
            source: self.source.clone(),
            destination: self
                .destination
                .clone()
                .ok_or_else(|| need("destination"))?,
            source_token_file: self.source_token_file.clone(),
            destination_token_file: self
                .destination_token_file
                .clone()
                .ok_or_else(|| need("destination-token-file"))?,
            ca_cert: self.ca_cert.clone(),
            destination_spec: self
                .destination_spec
                .clone()
                .ok_or_else(|| need("destination-spec"))?,
            home: self.home.ok_or_else(|| need("home"))?,
            new_addr: self.new_addr,
            address_mode: self.address_mode,
            on_switch: self.on_switch.clone(),
            source_tunnel: self.source_tunnel.ok_or_else(|| need("source-tunnel"))?,
            destination_tunnel: self
                .destination_tunnel
                .ok_or_else(|| need("destination-tunnel"))?,
            migration_port: self.migration_port,
            vm_iface: self.vm_iface.clone(),
            gateway_mac: self.gateway_mac.ok_or_else(|| need("gateway-mac"))?,
            gateway_cidr: self
                .gateway_cidr
                .clone()
                .ok_or_else(|| need("gateway-cidr"))?,
            tunnel_mtu: self.tunnel_mtu,
            dns_server: self.dns_server.clone(),
            zone: self.zone.clone(),
            dns_name: self.dns_name.clone(),
            dns_key_file: self.dns_key_file.clone(),
            low_ttl: self.low_ttl,
            skip_ttl_wait: self.skip_ttl_wait,
            urgent: self.urgent,
            max_bandwidth: self.max_bandwidth,
            max_postcopy_bandwidth: self.max_postcopy_bandwidth,
            downtime_limit: self.downtime_limit,
            postcopy: self.postcopy,
            multifd: self.multifd,
            auto_converge: self.auto_converge,
            nbd_port: self.nbd_port,
            mirror_speed: self.mirror_speed,
            max_drain: self.max_drain,
            drain_grace: self.drain_grace,
            agent_timeout: self.agent_timeout,
        })
    }
}

pub fn run(args: &MigrateArgs, logs: LogFormat) -> Result<ExitCode> {
    let progress = args.progress_format(logs);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let report = match &args.resume {
        Some(id) => {
            let token = Token::from_file(&args.source_token_file)?;
            let source = AgentClient::new(&args.source, token.as_str(), args.ca_cert.as_deref())?;
            let key = args
                .dns_key_file
                .as_deref()
                .map(TsigKey::from_file)
                .transpose()?;
            runtime.block_on(resume(
                &source,
                id.clone(),
                key,
                args.agent_timeout,
                progress,
            ))
        }
        None => {
            let plan = Plan::from_options(&args.options()?)?;
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
            "--progress=json",
        ])
        .expect("parses");
        assert_eq!(args.max_bandwidth, 8 << 20);
        assert_eq!(args.downtime_limit, Duration::from_millis(250));
        assert_eq!(args.max_drain, Duration::from_secs(120));
        assert_eq!(args.postcopy, PostcopySetting::WithinMs(1500));
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
        assert_eq!(defaults.address_mode, AddressMode::Nat);
        assert_eq!(defaults.downtime_limit, Duration::from_millis(300));
        assert_eq!(defaults.agent_timeout, Duration::from_secs(30));
        assert!(defaults.options().is_ok());
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
            Cli::try_parse_from(["migrate", "--source=http://a", "--source-token-file=a"]);
        let err = without.err().expect("refused").to_string();
        assert!(err.contains("--vm"), "{err}");
    }
}
