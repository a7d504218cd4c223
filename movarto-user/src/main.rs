//! `movarto-user`: the movarto command line.

mod cli;

use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};
use movarto_user::datapath::{self, Datapath};
use serde::Serialize;

#[derive(Parser)]
#[command(
    name = "movarto-user",
    version,
    about = "Live-migrate a server across a WAN without breaking its TCP connections"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Attach the datapath to an uplink (XDP) and the VM-facing interface (TC), and pin it.
    Attach(datapath::cli::AttachArgs),
    /// Detach the datapath from an uplink (removes its pins).
    Detach {
        uplink: String,
        /// The pin name given to `attach --pin-name`.
        #[arg(long, value_name = "NAME")]
        pin_name: Option<String>,
    },
    /// Show the datapath's mode, configuration and counters.
    Status {
        uplink: String,
        #[arg(long, value_name = "NAME")]
        pin_name: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// List the flows in the flow map.
    Flows {
        uplink: String,
        #[arg(long, value_name = "NAME")]
        pin_name: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Switch the datapath's mode (one map write; no reload).
    Mode {
        uplink: String,
        #[arg(value_enum)]
        mode: movarto_common::config::Mode,
        #[arg(long, value_name = "NAME")]
        pin_name: Option<String>,
    },
    /// Load the datapath through the kernel's verifier and report what was loaded.
    /// Nothing is attached; everything is unloaded on exit.
    Check {
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show or update the service's DNS records (RFC 2136 with TSIG).
    Dns {
        #[command(subcommand)]
        command: movarto_user::dns::cli::DnsCommand,
    },
    /// Move a VM from one site to another, with its connections: the whole sequence.
    Migrate(Box<cli::migrate::MigrateArgs>),
    /// Run this site's agent: the control API the orchestrator drives.
    Agent(movarto_user::agent::AgentArgs),
    /// Start, stop or inspect a QEMU VM described by a TOML spec.
    Vm {
        #[command(subcommand)]
        command: movarto_user::qemu::VmCommand,
    },
}

#[derive(Serialize)]
struct CheckReport {
    programs: Vec<ProgramReport>,
}

#[derive(Serialize)]
struct ProgramReport {
    name: String,
    id: u32,
    btf_id: Option<u32>,
    verified_instructions: Option<u32>,
}

fn check(json: bool) -> Result<()> {
    let datapath = Datapath::load()?;
    let programs = datapath
        .program_infos()?
        .into_iter()
        .map(|(name, info)| ProgramReport {
            name,
            id: info.id(),
            btf_id: info.btf_id(),
            verified_instructions: info.verified_instruction_count(),
        })
        .collect();
    let report = CheckReport { programs };
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!("datapath loaded and verified:");
    for p in &report.programs {
        let btf = p
            .btf_id
            .map_or_else(|| "none".to_owned(), |id| id.to_string());
        let insns = p
            .verified_instructions
            .map_or_else(|| "?".to_owned(), |n| n.to_string());
        println!(
            "  {:<16} id {:<6} btf {:<6} {insns} instructions verified",
            p.name, p.id, btf
        );
    }
    Ok(())
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Check { json } => check(json),
        Command::Attach(args) => datapath::cli::run_attach(args),
        Command::Detach { uplink, pin_name } => {
            datapath::cli::run_detach(&uplink, pin_name.as_deref())
        }
        Command::Status {
            uplink,
            pin_name,
            json,
        } => datapath::cli::run_status(&uplink, pin_name.as_deref(), json),
        Command::Flows {
            uplink,
            pin_name,
            json,
        } => datapath::cli::run_flows(&uplink, pin_name.as_deref(), json),
        Command::Mode {
            uplink,
            mode,
            pin_name,
        } => datapath::cli::run_mode(&uplink, pin_name.as_deref(), mode),
        Command::Dns { command } => movarto_user::dns::cli::run(command),
        Command::Vm { command } => movarto_user::qemu::cli(command),
        Command::Agent(args) => movarto_user::agent::run(args),
        Command::Migrate(args) => match cli::migrate::run(&args) {
            Ok(code) => return code,
            Err(err) => Err(err),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("movarto-user: {err:#}");
            ExitCode::FAILURE
        }
    }
}
