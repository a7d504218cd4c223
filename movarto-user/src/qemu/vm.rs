//! A running QEMU process with its QMP session.

use std::{
    process::Stdio,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use tokio::{
    io::{AsyncBufReadExt as _, BufReader},
    process::{Child, Command},
};

use super::{
    qmp::{Qmp, commands},
    spec::{Role, VmSpec},
};

/// How long QEMU may take to open its QMP socket.
const QMP_STARTUP: Duration = Duration::from_secs(30);
/// Lines of QEMU's stderr kept for error messages.
const STDERR_LINES: usize = 20;

/// A QEMU started by us; killed when dropped, so a failing caller never leaks one.
pub struct Vm {
    spec: VmSpec,
    role: Role,
    child: Child,
    qmp: Arc<Qmp>,
    stderr: Arc<Mutex<Vec<String>>>,
}

impl Vm {
    /// Starts QEMU for `spec` (booting, or waiting for a migration) and connects to its QMP.
    pub async fn start(spec: &VmSpec, role: Role) -> Result<Self> {
        spec.validate()?;
        // A socket left by a previous run would make QEMU fail to bind.
        let _ = std::fs::remove_file(&spec.qmp_socket);
        let mut cmd = Command::from(spec.command(role));
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting QEMU for VM {}", spec.name))?;
        let stderr = Arc::new(Mutex::new(Vec::new()));
        if let Some(pipe) = child.stderr.take() {
            let kept = stderr.clone();
            let name = spec.name.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(pipe).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    tracing::warn!(vm = %name, "qemu: {line}");
                    let mut kept = kept
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    if kept.len() == STDERR_LINES {
                        kept.remove(0);
                    }
                    kept.push(line);
                }
            });
        }
        let qmp = tokio::select! {
            qmp = Qmp::connect(&spec.qmp_socket, QMP_STARTUP) => qmp,
            status = child.wait() => {
                // Let the stderr reader catch up before reporting.
                tokio::time::sleep(Duration::from_millis(100)).await;
                let said = stderr.lock().unwrap_or_else(std::sync::PoisonError::into_inner).join("\n");
                bail!("QEMU for VM {} exited at start ({}): {said}", spec.name,
                    status.map_or_else(|e| e.to_string(), |s| s.to_string()));
            }
        };
        let qmp = qmp.with_context(|| format!("QMP of VM {}", spec.name))?;
        tracing::info!(vm = %spec.name, pid = child.id(), ?role, "QEMU started");
        Ok(Self {
            spec: spec.clone(),
            role,
            child,
            qmp: Arc::new(qmp),
            stderr,
        })
    }

    pub fn qmp(&self) -> &Qmp {
        &self.qmp
    }

    /// The QMP session, shareable with a task that outlives this borrow (a migration).
    pub fn qmp_handle(&self) -> Arc<Qmp> {
        self.qmp.clone()
    }

    pub fn spec(&self) -> &VmSpec {
        &self.spec
    }

    pub fn role(&self) -> Role {
        self.role
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// QEMU's last lines on stderr.
    pub fn stderr_tail(&self) -> String {
        self.stderr
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .join("\n")
    }

    /// Whether QEMU has exited.
    pub fn has_exited(&mut self) -> bool {
        !matches!(self.child.try_wait(), Ok(None))
    }

    /// Asks QEMU to quit, waits up to `grace`, then kills it.
    pub async fn stop(mut self, grace: Duration) -> Result<()> {
        if let Err(err) = self.qmp.run_with_timeout(&commands::Quit {}, grace).await {
            tracing::debug!(vm = %self.spec.name, "quit: {err:#}");
        }
        if tokio::time::timeout(grace, self.child.wait())
            .await
            .is_err()
        {
            tracing::warn!(vm = %self.spec.name, "QEMU did not quit within {grace:?}; killing it");
            self.kill().await?;
        }
        let _ = std::fs::remove_file(&self.spec.qmp_socket);
        Ok(())
    }

    /// Kills QEMU at once (SIGKILL) and reaps it.
    pub async fn kill(&mut self) -> Result<()> {
        if self.child.try_wait()?.is_none() {
            self.child
                .kill()
                .await
                .with_context(|| format!("killing QEMU of VM {}", self.spec.name))?;
        }
        Ok(())
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        // kill_on_drop sends SIGKILL; the socket file is ours to remove.
        let _ = std::fs::remove_file(&self.spec.qmp_socket);
    }
}
