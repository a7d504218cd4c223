//! The QEMU side: a QMP client, VM specs, running VMs and live migration.

pub mod migrate;
pub mod mirror;
pub mod qmp;
pub mod spec;
pub mod vm;

use std::{path::PathBuf, process::Stdio, time::Duration};

use anyhow::{Context as _, Result, bail};
use clap::Subcommand;
use serde::Serialize;

use self::{
    qmp::{Qmp, commands},
    spec::{Role, VmSpec},
};

/// `movarto-user vm ...`
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
pub fn cli(command: VmCommand) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        match command {
            VmCommand::Start { spec, incoming } => {
                start_daemon(&VmSpec::load(&spec)?, incoming).await
            }
            VmCommand::Stop { spec } => stop(&VmSpec::load(&spec)?).await,
            VmCommand::Status { spec, json } => status(&VmSpec::load(&spec)?, json).await,
        }
    })
}

async fn start_daemon(spec: &VmSpec, incoming: bool) -> Result<()> {
    let role = if incoming { Role::Incoming } else { Role::Boot };
    if Qmp::connect(&spec.qmp_socket, Duration::ZERO).await.is_ok() {
        bail!(
            "VM {} is already running (its QMP socket {} answers)",
            spec.name,
            spec.qmp_socket.display()
        );
    }
    let _ = std::fs::remove_file(&spec.qmp_socket);
    let pidfile = spec.qmp_socket.with_extension("pid");
    let mut cmd = spec.command(role);
    cmd.arg("-daemonize")
        .arg("-pidfile")
        .arg(&pidfile)
        .stdin(Stdio::null());
    // With -daemonize, QEMU's parent exits once the VM is set up (or failed to be).
    let out = tokio::process::Command::from(cmd)
        .output()
        .await
        .context("starting QEMU")?;
    if !out.status.success() {
        bail!(
            "QEMU for VM {} failed to start ({}): {}",
            spec.name,
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let qmp = Qmp::connect(&spec.qmp_socket, Duration::from_secs(30)).await?;
    let state = qmp.run(&commands::QueryStatus {}).await?;
    let pid = std::fs::read_to_string(&pidfile).unwrap_or_default();
    println!(
        "VM {} started: QEMU pid {}, {}, QMP {}",
        spec.name,
        pid.trim(),
        state.status,
        spec.qmp_socket.display()
    );
    Ok(())
}

async fn stop(spec: &VmSpec) -> Result<()> {
    let qmp = Qmp::connect(&spec.qmp_socket, Duration::ZERO)
        .await
        .with_context(|| format!("VM {} does not seem to run", spec.name))?;
    qmp.run(&commands::Quit {}).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !qmp.is_closed() {
        if tokio::time::Instant::now() > deadline {
            bail!("VM {} did not quit within 10 s", spec.name);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = std::fs::remove_file(&spec.qmp_socket);
    let _ = std::fs::remove_file(spec.qmp_socket.with_extension("pid"));
    println!("VM {} stopped", spec.name);
    Ok(())
}

#[derive(Serialize)]
struct StatusReport {
    name: String,
    status: String,
    running: bool,
    qemu: String,
    migration: Option<String>,
}

async fn status(spec: &VmSpec, json: bool) -> Result<()> {
    let qmp = Qmp::connect(&spec.qmp_socket, Duration::ZERO)
        .await
        .with_context(|| format!("VM {} does not seem to run", spec.name))?;
    let state = qmp.run(&commands::QueryStatus {}).await?;
    let migration = qmp.run(&commands::QueryMigrate {}).await?;
    let v = qmp.greeting().qmp.version.qemu;
    let report = StatusReport {
        name: spec.name.clone(),
        status: state.status,
        running: state.running,
        qemu: format!("{}.{}.{}", v.major, v.minor, v.micro),
        migration: migration.status,
    };
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
    Ok(())
}
