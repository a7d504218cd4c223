//! `movarto-user vm start|stop|status`: a QEMU VM described by a TOML spec.

use std::path::PathBuf;

use anyhow::{Context as _, Result};
use clap::Subcommand;
use movarto_user::qemu::{
    self,
    spec::{Role, VmSpec},
};

#[derive(Debug, Subcommand)]
pub enum VmCommand {
    /// Start the VM of a TOML spec in the background (QEMU daemonizes).
    Start {
        spec: PathBuf,
        /// Start as a migration destination (`-incoming defer`) instead of booting.
        #[arg(long)]
        incoming: bool,
    },
    /// Ask the VM's QEMU to quit, and wait until it has.
    Stop { spec: PathBuf },
    /// Show QEMU's run state and the last migration's status.
    Status {
        spec: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Runs a `vm` subcommand to completion.
pub fn run(command: VmCommand) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        match command {
            VmCommand::Start { spec, incoming } => {
                let spec = VmSpec::load(&spec)?;
                let role = if incoming { Role::Incoming } else { Role::Boot };
                let started = qemu::start_daemon(&spec, role).await?;
                println!(
                    "VM {} started: QEMU pid {}, {}, QMP {}",
                    spec.name,
                    started.pid,
                    started.status,
                    spec.qmp_socket.display()
                );
            }
            VmCommand::Stop { spec } => {
                let spec = VmSpec::load(&spec)?;
                qemu::stop(&spec).await?;
                println!("VM {} stopped", spec.name);
            }
            VmCommand::Status { spec, json } => {
                let report = qemu::status(&VmSpec::load(&spec)?).await?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&report)?);
                } else {
                    println!(
                        "VM {}: {} (QEMU {}){}",
                        report.name,
                        report.status,
                        report.qemu,
                        report
                            .migration
                            .map(|m| format!(", last migration {m}"))
                            .unwrap_or_default()
                    );
                }
            }
        }
        Ok(())
    })
}
