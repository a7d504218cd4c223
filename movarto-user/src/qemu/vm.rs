//! A running QEMU process with its QMP session.
//!
//! Three ways to hold one:
//! - [`Vm::start`]: a child killed when the `Vm` drops, so a failing caller (a test, the
//!   `vm` CLI) never leaks one;
//! - [`Vm::start_detached`]: what the agent does. QEMU gets its own process group and
//!   logs to a file, so it outlives an agent that crashes or restarts;
//! - [`Vm::adopt`]: a restarted agent takes such a QEMU back by PID and QMP socket.

use std::{
    path::Path,
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

/// How the process is held.
enum Process {
    /// Our child; `kill_on_drop` when `owned`.
    Child(Child),
    /// Someone else's child (an earlier agent's): known by PID only.
    Adopted(u32),
}

pub struct Vm {
    spec: VmSpec,
    role: Role,
    process: Process,
    qmp: Arc<Qmp>,
    stderr: Arc<Mutex<Vec<String>>>,
    /// Remove the QMP socket on drop (not for QEMUs meant to outlive us).
    owned: bool,
}

impl Vm {
    /// Starts QEMU for `spec` (booting, or waiting for a migration) and connects to its
    /// QMP. QEMU is killed when the `Vm` drops.
    pub async fn start(spec: &VmSpec, role: Role) -> Result<Self> {
        Self::spawn(spec, role, None).await
    }

    /// Starts QEMU so that it survives this process: its own process group, stderr to
    /// `log`, not killed on drop. Stop it with [`Vm::stop`].
    pub async fn start_detached(spec: &VmSpec, role: Role, log: &Path) -> Result<Self> {
        Self::spawn(spec, role, Some(log)).await
    }

    async fn spawn(spec: &VmSpec, role: Role, detached_log: Option<&Path>) -> Result<Self> {
        spec.validate()?;
        // A socket left by a previous run would make QEMU fail to bind.
        let _ = std::fs::remove_file(&spec.qmp_socket);
        let mut cmd = Command::from(spec.command(role));
        cmd.stdin(Stdio::null()).stdout(Stdio::null());
        match detached_log {
            None => {
                cmd.stderr(Stdio::piped()).kill_on_drop(true);
            }
            Some(log) => {
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(log)
                    .with_context(|| format!("opening QEMU's log {}", log.display()))?;
                // Its own group: a Ctrl-C or a SIGTERM to the agent's group spares it.
                cmd.stderr(Stdio::from(file)).process_group(0);
            }
        }
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
                let mut said = stderr.lock().unwrap_or_else(std::sync::PoisonError::into_inner).join("\n");
                if let Some(log) = detached_log {
                    said = tail(&std::fs::read_to_string(log).unwrap_or_default());
                }
                bail!("QEMU for VM {} exited at start ({}): {said}", spec.name,
                    status.map_or_else(|e| e.to_string(), |s| s.to_string()));
            }
        };
        let qmp = qmp.with_context(|| format!("QMP of VM {}", spec.name))?;
        tracing::info!(vm = %spec.name, pid = child.id(), ?role, detached = detached_log.is_some(), "QEMU started");
        Ok(Self {
            spec: spec.clone(),
            role,
            process: Process::Child(child),
            qmp: Arc::new(qmp),
            stderr,
            owned: detached_log.is_none(),
        })
    }

    /// Takes back a QEMU started earlier (by a previous agent) for `spec`, running as `pid`.
    pub async fn adopt(spec: &VmSpec, role: Role, pid: u32) -> Result<Self> {
        if !is_qemu(pid) {
            bail!("process {pid} is not a running QEMU (VM {})", spec.name);
        }
        let qmp = Qmp::connect(&spec.qmp_socket, Duration::from_secs(5))
            .await
            .with_context(|| format!("QMP of adopted VM {} (pid {pid})", spec.name))?;
        tracing::info!(vm = %spec.name, pid, "adopted a running QEMU");
        Ok(Self {
            spec: spec.clone(),
            role,
            process: Process::Adopted(pid),
            qmp: Arc::new(qmp),
            stderr: Arc::new(Mutex::new(Vec::new())),
            owned: false,
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
        match &self.process {
            Process::Child(child) => child.id(),
            Process::Adopted(pid) => Some(*pid),
        }
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
        match &mut self.process {
            Process::Child(child) => !matches!(child.try_wait(), Ok(None)),
            Process::Adopted(pid) => !is_qemu(*pid),
        }
    }

    /// Asks QEMU to quit, waits up to `grace`, then kills it.
    pub async fn stop(mut self, grace: Duration) -> Result<()> {
        if let Err(err) = self.qmp.run_with_timeout(&commands::Quit {}, grace).await {
            tracing::debug!(vm = %self.spec.name, "quit: {err:#}");
        }
        if !self.wait_exit(grace).await {
            tracing::warn!(vm = %self.spec.name, "QEMU did not quit within {grace:?}; killing it");
            self.kill().await?;
        }
        let _ = std::fs::remove_file(&self.spec.qmp_socket);
        Ok(())
    }

    async fn wait_exit(&mut self, limit: Duration) -> bool {
        match &mut self.process {
            Process::Child(child) => tokio::time::timeout(limit, child.wait()).await.is_ok(),
            Process::Adopted(pid) => {
                let deadline = tokio::time::Instant::now() + limit;
                while is_qemu(*pid) {
                    if tokio::time::Instant::now() > deadline {
                        return false;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                true
            }
        }
    }

    /// Kills QEMU at once (SIGKILL) and, if it is our child, reaps it.
    pub async fn kill(&mut self) -> Result<()> {
        match &mut self.process {
            Process::Child(child) => {
                if child.try_wait()?.is_none() {
                    child
                        .kill()
                        .await
                        .with_context(|| format!("killing QEMU of VM {}", self.spec.name))?;
                }
            }
            Process::Adopted(pid) => {
                if is_qemu(*pid) {
                    // SAFETY: signalling the QEMU this VM record owns, by its PID.
                    unsafe { libc::kill(*pid as i32, libc::SIGKILL) };
                }
                let pid = *pid;
                self.wait_exit(Duration::from_secs(5)).await;
                if is_qemu(pid) {
                    bail!("QEMU {pid} of VM {} survived SIGKILL", self.spec.name);
                }
            }
        }
        Ok(())
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        // kill_on_drop sends SIGKILL; the socket file is ours to remove.
        if self.owned {
            let _ = std::fs::remove_file(&self.spec.qmp_socket);
        }
    }
}

/// Whether `pid` is a live (not zombie) QEMU.
pub fn is_qemu(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // `pid (comm) state ...`; comm may hold spaces, so split at the last ')'.
    let Some((head, rest)) = stat.rsplit_once(')') else {
        return false;
    };
    let alive = !matches!(rest.trim_start().chars().next(), Some('Z' | 'X') | None);
    alive && head.contains("qemu")
}

fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(STDERR_LINES)..].join("\n")
}
