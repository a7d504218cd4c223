//! `movarto-user`: the movarto command line.

mod cli;

use std::{path::PathBuf, process::ExitCode};

use clap::{CommandFactory as _, Parser, Subcommand};

use cli::logging::{self, LogFormat};

#[derive(Parser)]
#[command(
    name = "movarto-user",
    version,
    about = "Live-migrate a server across a WAN without breaking its TCP connections"
)]
struct Cli {
    /// How log lines on stderr look: `human`, or `json` (one object per line, for log
    /// collectors; `migrate`'s progress then defaults to JSON too).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human)]
    log_format: LogFormat,
    /// The inventory (sites, services, defaults; docs/inventory.md) [default:
    /// /etc/movarto/movarto.toml, if it exists].
    #[arg(long, global = true, value_name = "PATH")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Attach the datapath to an uplink (XDP) and pin it; with --home, also its first
    /// service's VM-facing interface (TC).
    Attach(cli::attach::AttachArgs),
    /// Detach the datapath from an uplink (removes its pins).
    Detach(cli::detach::DetachArgs),
    /// Show the datapath's mode, configuration and counters.
    Status(cli::status::StatusArgs),
    /// List the flows in the flow map.
    Flows(cli::flows::FlowsArgs),
    /// Switch the datapath's mode (one map write; no reload).
    Mode(cli::mode::ModeArgs),
    /// Add, change, remove or list the node's services on an attached uplink: each
    /// VM's home address with its own mode, peer, token and VM-facing interface.
    Service {
        #[command(subcommand)]
        command: cli::service::ServiceCommand,
    },
    /// Stream the datapath's verdicts as they happen: drops with their reason, tunnel,
    /// NAT and ICMP answers, with the 5-tuple and the service.
    Monitor(cli::monitor::MonitorArgs),
    /// Load the datapath through the kernel's verifier and report what was loaded.
    /// Nothing is attached; everything is unloaded on exit.
    Check(cli::check::CheckArgs),
    /// Measure the datapath on this machine.
    Bench {
        #[command(subcommand)]
        command: cli::bench::BenchCommand,
    },
    /// Show or update the service's DNS records (RFC 2136 with TSIG).
    Dns {
        #[command(subcommand)]
        command: cli::dns::DnsCommand,
    },
    /// Move a VM from one site to another, with its connections: the whole sequence.
    Migrate(Box<cli::migrate::MigrateArgs>),
    /// Move many VMs off one site at once (`--vm` repeated, or `--all`), to one or more
    /// sites, sharing one bandwidth; one VM's failure rolls back that VM only.
    Evacuate(cli::evacuate::EvacuateArgs),
    /// The inventory file (`config check`; docs/inventory.md).
    Config {
        #[command(subcommand)]
        command: cli::config::ConfigCommand,
    },
    /// List the migrations the agents know: phase, percent, ETA, bandwidth, dirty rate,
    /// downtime (`virsh domjobinfo`'s figures).
    Jobs(cli::jobs::JobsArgs),
    /// Cancel a migration before its switchover: it rolls back as a failure does.
    Abort(cli::abort::AbortArgs),
    /// Run this site's agent: the control API the orchestrator drives.
    Agent(cli::agent::AgentArgs),
    /// Start, stop or inspect a QEMU VM described by a TOML spec.
    Vm {
        #[command(subcommand)]
        command: cli::vm::VmCommand,
    },
    /// Write man pages or shell completions (packaging: `cargo xtask dist`).
    #[command(hide = true)]
    Generate(cli::generate::GenerateArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    logging::init(cli.log_format);
    let result = match cli.command {
        Command::Attach(args) => cli::attach::run(args),
        Command::Detach(args) => cli::detach::run(args),
        Command::Status(args) => cli::status::run(args),
        Command::Flows(args) => cli::flows::run(args),
        Command::Mode(args) => cli::mode::run(args),
        Command::Service { command } => cli::service::run(command),
        Command::Check(args) => cli::check::run(args),
        Command::Monitor(args) => cli::monitor::run(args),
        Command::Bench { command } => cli::bench::run(command),
        Command::Dns { command } => cli::dns::run(command),
        Command::Vm { command } => cli::vm::run(command),
        Command::Agent(args) => cli::agent::run(args),
        Command::Jobs(args) => cli::jobs::run(&args, cli.config.as_deref()),
        Command::Abort(args) => cli::abort::run(&args, cli.config.as_deref()),
        Command::Evacuate(args) => match cli::evacuate::run(&args, cli.config.as_deref()) {
            Ok(code) => return code,
            Err(err) => Err(err),
        },
        Command::Generate(args) => cli::generate::run(&args, Cli::command()),
        Command::Migrate(args) => {
            match cli::migrate::run(&args, cli.config.as_deref(), cli.log_format) {
                Ok(code) => return code,
                Err(err) => Err(err),
            }
        }
        Command::Config { command } => match cli::config::run(&command, cli.config.as_deref()) {
            Ok(code) => return code,
            Err(err) => Err(err),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            match cli.log_format {
                LogFormat::Human => eprintln!("movarto-user: {err:#}"),
                // A log collector gets the failure as one more JSON line.
                LogFormat::Json => tracing::error!(error = format!("{err:#}"), "failed"),
            }
            ExitCode::FAILURE
        }
    }
}
