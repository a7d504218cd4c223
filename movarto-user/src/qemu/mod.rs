//! The QEMU side: a QMP client, VM specs, running VMs and live migration.

pub mod migrate;
pub mod mirror;
pub mod qmp;
pub mod spec;
pub mod vm;

use std::{process::Stdio, time::Duration};

use anyhow::{Context as _, Result, bail};
use serde::Serialize;

use self::{
    qmp::{Qmp, commands},
    spec::{Role, VmSpec},
};

/// A VM that [`start_daemon`] started.
#[derive(Clone, Debug)]
pub struct Started {
    /// QEMU's pid, from its pidfile (empty if unreadable).
    pub pid: String,
    /// QEMU's run state right after the start.
    pub status: String,
}

/// Starts the VM of `spec` in the background (QEMU daemonizes) in `role`.
pub async fn start_daemon(spec: &VmSpec, role: Role) -> Result<Started> {
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
    // A QEMU that fails after binding its QMP socket (an unbootable kernel, say)
    // leaves the socket file: it must go with the failure.
    let remove_leftovers = || {
        let _ = std::fs::remove_file(&spec.qmp_socket);
        let _ = std::fs::remove_file(&pidfile);
    };
    // With -daemonize, QEMU's parent exits once the VM is set up (or failed to be).
    let out = tokio::process::Command::from(cmd)
        .output()
        .await
        .context("starting QEMU")?;
    if !out.status.success() {
        remove_leftovers();
        bail!(
            "QEMU for VM {} failed to start ({}): {}",
            spec.name,
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let qmp = match Qmp::connect(&spec.qmp_socket, Duration::from_secs(30)).await {
        Ok(qmp) => qmp,
        Err(err) => {
            remove_leftovers();
            return Err(err);
        }
    };
    let state = qmp.run(&commands::QueryStatus {}).await?;
    let pid = std::fs::read_to_string(&pidfile).unwrap_or_default();
    Ok(Started {
        pid: pid.trim().to_owned(),
        status: state.status,
    })
}

/// Asks the VM's QEMU to quit, and waits until it has.
pub async fn stop(spec: &VmSpec) -> Result<()> {
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
    Ok(())
}

/// QEMU's run state and the last migration's status.
#[derive(Clone, Debug, Serialize)]
pub struct VmStatus {
    pub name: String,
    pub status: String,
    pub running: bool,
    /// QEMU's version, `major.minor.micro`.
    pub qemu: String,
    pub migration: Option<String>,
}

/// Asks the VM's QEMU for its state.
pub async fn status(spec: &VmSpec) -> Result<VmStatus> {
    let qmp = Qmp::connect(&spec.qmp_socket, Duration::ZERO)
        .await
        .with_context(|| format!("VM {} does not seem to run", spec.name))?;
    let state = qmp.run(&commands::QueryStatus {}).await?;
    let migration = qmp.run(&commands::QueryMigrate {}).await?;
    let v = qmp.greeting().qmp.version.qemu;
    Ok(VmStatus {
        name: spec.name.clone(),
        status: state.status,
        running: state.running,
        qemu: format!("{}.{}.{}", v.major, v.minor, v.micro),
        migration: migration.status,
    })
}
