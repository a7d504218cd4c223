//! The QEMU VMs an agent runs, and the migration halves it drives for them.
//!
//! Source side: [`Vms::start_migration`] runs [`migrate_outgoing`] in a task; at
//! `pre-switchover` the source stays stopped until the orchestrator says
//! [`Vms::continue_migration`] (or a bound passes, and the source resumes).
//! Destination side: [`Vms::prepare_incoming`], then [`Vms::finish_incoming`] and
//! [`Vms::announce`].

use std::{
    collections::HashMap,
    future::Future,
    path::PathBuf,
    pin::Pin,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use anyhow::{Context as _, Result, anyhow, bail};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use super::api::{
    IncomingRequest, MigrationPhase, MigrationState, MirrorSettings, OutgoingRequest, RunState,
    VmRequest, VmStatus,
};
use crate::qemu::{
    migrate::{
        FailedInPostcopy, SwitchoverHook, abandon_incoming, finish_incoming, migrate_outgoing,
        prepare_incoming,
    },
    mirror::{
        DiskMirror, MirrorHook, MirrorReady, abort_mirror, export_disk, start_mirror, unexport_disk,
    },
    qmp::{
        Qmp,
        commands::{AnnounceSelf, MigrateCancel, QueryStatus},
    },
    spec::{Role, VmSpec},
    vm::Vm,
};

/// How long QEMU gets to quit before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("no VM named {0} at this site")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
}

struct ManagedVm {
    vm: tokio::sync::Mutex<Option<Vm>>,
    qmp: Arc<Qmp>,
    pid: Option<u32>,
    spec_toml: String,
    incoming: bool,
    incoming_uri: Mutex<Option<String>>,
    /// The NBD export a destination serves for the source's mirror.
    exported: Mutex<Option<DiskMirror>>,
    /// The mirror a source runs toward the destination.
    mirroring: Mutex<Option<DiskMirror>>,
    migration: Mutex<Option<Migration>>,
}

impl ManagedVm {
    fn new(vm: Vm, record: VmRecord) -> Self {
        Self {
            qmp: vm.qmp_handle(),
            pid: vm.pid(),
            vm: tokio::sync::Mutex::new(Some(vm)),
            spec_toml: record.spec_toml,
            incoming: record.incoming,
            incoming_uri: Mutex::new(None),
            exported: Mutex::new(None),
            mirroring: Mutex::new(None),
            migration: Mutex::new(None),
        }
    }
}

struct Migration {
    state: Arc<Mutex<MigrationState>>,
    release: Option<oneshot::Sender<bool>>,
}

pub struct Vms {
    vms: tokio::sync::Mutex<HashMap<String, Arc<ManagedVm>>>,
    /// One record per running VM (`<name>.json`) and QEMU's log (`<name>.log`), so a
    /// restarted agent finds its VMs again.
    state_dir: PathBuf,
}

/// What the agent remembers of a VM it started.
#[derive(Serialize, Deserialize)]
struct VmRecord {
    spec_toml: String,
    incoming: bool,
    pid: u32,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Vms {
    pub fn new(state_dir: PathBuf) -> Result<Self> {
        std::fs::create_dir_all(&state_dir)
            .with_context(|| format!("creating the state directory {}", state_dir.display()))?;
        Ok(Self {
            vms: tokio::sync::Mutex::default(),
            state_dir,
        })
    }

    fn record_path(&self, name: &str) -> PathBuf {
        self.state_dir.join(format!("{name}.json"))
    }

    /// Takes back the VMs an earlier agent started that still run; forgets the others.
    pub async fn adopt_all(&self) -> Result<usize> {
        let entries = std::fs::read_dir(&self.state_dir)
            .with_context(|| format!("reading {}", self.state_dir.display()))?;
        let mut adopted = 0;
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            match self.adopt(&path).await {
                Ok(name) => {
                    tracing::info!(vm = %name, "adopted a running VM");
                    adopted += 1;
                }
                Err(err) => {
                    tracing::warn!("not adopting {}: {err:#}", path.display());
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        Ok(adopted)
    }

    async fn adopt(&self, path: &std::path::Path) -> Result<String> {
        let text = std::fs::read_to_string(path).context("reading the record")?;
        let record: VmRecord = serde_json::from_str(&text).context("parsing the record")?;
        let spec = VmSpec::parse(&record.spec_toml).context("the recorded spec")?;
        let role = if record.incoming {
            Role::Incoming
        } else {
            Role::Boot
        };
        let vm = Vm::adopt(&spec, role, record.pid).await?;
        self.vms
            .lock()
            .await
            .insert(spec.name.clone(), Arc::new(ManagedVm::new(vm, record)));
        Ok(spec.name)
    }

    async fn get(&self, name: &str) -> Result<Arc<ManagedVm>> {
        self.vms
            .lock()
            .await
            .get(name)
            .cloned()
            .ok_or_else(|| VmError::NotFound(name.to_owned()).into())
    }

    pub async fn start(&self, request: &VmRequest) -> Result<VmStatus> {
        let spec = VmSpec::parse(&request.spec_toml).context("invalid VM spec")?;
        let mut vms = self.vms.lock().await;
        if let Some(existing) = vms.get(&spec.name) {
            if existing.spec_toml == request.spec_toml && existing.incoming == request.incoming {
                let existing = existing.clone();
                drop(vms);
                return Ok(status_of(&spec.name, &existing).await);
            }
            return Err(VmError::Conflict(format!(
                "a different VM named {} runs here already",
                spec.name
            ))
            .into());
        }
        let role = if request.incoming {
            Role::Incoming
        } else {
            Role::Boot
        };
        let log = self.state_dir.join(format!("{}.log", spec.name));
        let vm = Vm::start_detached(&spec, role, &log).await?;
        let record = VmRecord {
            spec_toml: request.spec_toml.clone(),
            incoming: request.incoming,
            pid: vm.pid().context("QEMU has no PID")?,
        };
        let path = self.record_path(&spec.name);
        std::fs::write(&path, serde_json::to_vec(&record)?)
            .with_context(|| format!("writing {}", path.display()))?;
        let managed = Arc::new(ManagedVm::new(vm, record));
        vms.insert(spec.name.clone(), managed.clone());
        drop(vms);
        Ok(status_of(&spec.name, &managed).await)
    }

    pub async fn status(&self, name: &str) -> Result<VmStatus> {
        let managed = self.get(name).await?;
        Ok(status_of(name, &managed).await)
    }

    pub async fn all(&self) -> Vec<VmStatus> {
        let vms: Vec<_> = self
            .vms
            .lock()
            .await
            .iter()
            .map(|(n, m)| (n.clone(), m.clone()))
            .collect();
        let mut out = Vec::with_capacity(vms.len());
        for (name, managed) in vms {
            out.push(status_of(&name, &managed).await);
        }
        out
    }

    /// Stops (quits, then kills) the VM; fine if it is not here.
    pub async fn stop(&self, name: &str) -> Result<()> {
        let Some(managed) = self.vms.lock().await.remove(name) else {
            return Ok(());
        };
        let _ = std::fs::remove_file(self.record_path(name));
        let taken = managed.vm.lock().await.take();
        if let Some(vm) = taken {
            if managed.incoming && lock(&managed.migration).is_none() {
                abandon_incoming(&managed.qmp).await;
            }
            vm.stop(STOP_GRACE).await?;
        }
        Ok(())
    }

    /// Stops every VM (the agent is shutting down).
    pub async fn stop_all(&self) {
        let names: Vec<String> = self.vms.lock().await.keys().cloned().collect();
        for name in names {
            if let Err(err) = self.stop(&name).await {
                tracing::warn!(vm = %name, "stopping: {err:#}");
            }
        }
    }

    pub async fn prepare_incoming(&self, name: &str, request: &IncomingRequest) -> Result<()> {
        let managed = self.get(name).await?;
        if !managed.incoming {
            bail!(VmError::Conflict(format!(
                "VM {name} was not started as a migration destination"
            )));
        }
        {
            let prepared = lock(&managed.incoming_uri);
            match prepared.as_deref() {
                Some(uri) if uri == request.uri => return Ok(()),
                Some(uri) => bail!(VmError::Conflict(format!(
                    "VM {name} already listens on {uri}"
                ))),
                None => {}
            }
        }
        let options = request.settings.options();
        prepare_incoming(&managed.qmp, &request.uri, &options).await?;
        if let Some(settings) = &request.mirror {
            let mirror = settings.disk_mirror();
            export_disk(&managed.qmp, &mirror).await?;
            *lock(&managed.exported) = Some(mirror);
        }
        *lock(&managed.incoming_uri) = Some(request.uri.clone());
        Ok(())
    }

    /// The source's disk mirror toward the destination's export, up to READY.
    pub async fn start_mirror(&self, name: &str, settings: &MirrorSettings) -> Result<MirrorReady> {
        let managed = self.get(name).await?;
        let mirror = settings.disk_mirror();
        let ready = start_mirror(&managed.qmp, &mirror).await?;
        *lock(&managed.mirroring) = Some(mirror);
        Ok(ready)
    }

    /// Waits until the incoming VM runs (after the source completed).
    pub async fn finish_incoming(&self, name: &str) -> Result<VmStatus> {
        let managed = self.get(name).await?;
        let options = crate::qemu::migrate::MigrationOptions {
            announce: false,
            ..Default::default()
        };
        finish_incoming(&managed.qmp, &options).await?;
        let exported = lock(&managed.exported).take();
        if let Some(mirror) = exported {
            unexport_disk(&managed.qmp, &mirror).await?;
        }
        Ok(status_of(name, &managed).await)
    }

    /// RARP/GARP from the VM's NIC, so switches and the gateway learn where it is now.
    pub async fn announce(&self, name: &str) -> Result<()> {
        let managed = self.get(name).await?;
        managed
            .qmp
            .run(&AnnounceSelf::default())
            .await
            .context("announce-self")?;
        Ok(())
    }

    pub async fn start_migration(
        &self,
        name: &str,
        request: &OutgoingRequest,
    ) -> Result<MigrationState> {
        let managed = self.get(name).await?;
        let options = request.settings.options();
        let wait = Duration::from_secs(request.settings.switchover_wait_s);
        let mirror = match &request.mirror {
            None => None,
            Some(settings) => {
                let running = lock(&managed.mirroring).clone();
                match running {
                    Some(m)
                        if m.nbd_host == settings.nbd_host && m.nbd_port == settings.nbd_port =>
                    {
                        Some(m)
                    }
                    _ => bail!(VmError::Conflict(format!(
                        "VM {name} has no disk mirror toward {}:{}; start it first",
                        settings.nbd_host, settings.nbd_port
                    ))),
                }
            }
        };
        let state = {
            let mut slot = lock(&managed.migration);
            if let Some(current) = slot.as_ref() {
                let phase = lock(&current.state).phase;
                if matches!(
                    phase,
                    MigrationPhase::Running | MigrationPhase::AwaitingSwitchover
                ) {
                    bail!(VmError::Conflict(format!("VM {name} is already migrating")));
                }
            }
            let state = Arc::new(Mutex::new(MigrationState {
                phase: MigrationPhase::Running,
                progress: None,
                report: None,
                error: None,
                split: false,
            }));
            let (release, released) = oneshot::channel();
            *slot = Some(Migration {
                state: state.clone(),
                release: Some(release),
            });
            let qmp = managed.qmp.clone();
            let uri = request.uri.clone();
            let task_state = state.clone();
            tokio::spawn(async move {
                let (progress_tx, mut progress_rx) = mpsc::channel(16);
                let progress_state = task_state.clone();
                let forward = tokio::spawn(async move {
                    while let Some(progress) = progress_rx.recv().await {
                        lock(&progress_state).progress = Some(progress);
                    }
                });
                let mut orchestrated = OrchestratedSwitchover {
                    state: task_state.clone(),
                    released: Some(released),
                    wait,
                };
                let result = match &mirror {
                    // The mirror completes (a consistent copy) first, with the VM stopped.
                    Some(mirror) => {
                        let mut hook = MirrorHook::new(&qmp, mirror, &mut orchestrated);
                        let result =
                            migrate_outgoing(&qmp, &uri, &options, &mut hook, Some(progress_tx))
                                .await;
                        if result.is_err() {
                            abort_mirror(&qmp, mirror).await;
                        }
                        result
                    }
                    None => {
                        migrate_outgoing(&qmp, &uri, &options, &mut orchestrated, Some(progress_tx))
                            .await
                    }
                };
                let _ = forward.await;
                let mut state = lock(&task_state);
                match result {
                    Ok(report) => {
                        state.phase = MigrationPhase::Completed;
                        state.report = Some(report);
                    }
                    Err(err) => {
                        tracing::warn!("migration failed: {err:#}");
                        state.phase = MigrationPhase::Failed;
                        state.error = Some(format!("{err:#}"));
                        state.split = err.downcast_ref::<FailedInPostcopy>().is_some();
                    }
                }
            });
            state
        };
        let snapshot = lock(&state).clone();
        Ok(snapshot)
    }

    pub async fn migration(&self, name: &str) -> Result<MigrationState> {
        let managed = self.get(name).await?;
        let slot = lock(&managed.migration);
        let migration = slot
            .as_ref()
            .ok_or_else(|| anyhow!(VmError::NotFound(format!("{name}'s migration"))))?;
        let snapshot = lock(&migration.state).clone();
        Ok(snapshot)
    }

    /// Lets a source stopped at `pre-switchover` go on (`proceed`) or roll back. Aborting a
    /// migration still in its passes cancels it. Repeating the call is harmless.
    pub async fn continue_migration(&self, name: &str, proceed: bool) -> Result<MigrationState> {
        let managed = self.get(name).await?;
        let (phase, release) = {
            let mut slot = lock(&managed.migration);
            let migration = slot
                .as_mut()
                .ok_or_else(|| anyhow!(VmError::NotFound(format!("{name}'s migration"))))?;
            let phase = lock(&migration.state).phase;
            let release = if phase == MigrationPhase::AwaitingSwitchover || !proceed {
                migration.release.take()
            } else {
                None
            };
            (phase, release)
        };
        match (phase, proceed, release) {
            (MigrationPhase::AwaitingSwitchover, _, Some(release)) => {
                let _ = release.send(proceed);
            }
            (MigrationPhase::Running, false, _) => {
                managed
                    .qmp
                    .run(&MigrateCancel {})
                    .await
                    .context("migrate_cancel")?;
            }
            (MigrationPhase::Running, true, _) => {
                bail!(VmError::Conflict(format!(
                    "VM {name}'s migration is not at pre-switchover yet"
                )));
            }
            _ => {}
        }
        self.migration(name).await
    }
}

async fn status_of(name: &str, managed: &ManagedVm) -> VmStatus {
    let (run_state, run_state_error) = match managed
        .qmp
        .run_with_timeout(&QueryStatus {}, Duration::from_secs(5))
        .await
    {
        Ok(status) => (RunState::from_qemu(&status.status), None),
        Err(err) if managed.qmp.is_closed() => (RunState::Exited, Some(format!("{err:#}"))),
        Err(err) => (RunState::Unknown, Some(format!("{err:#}"))),
    };
    let migration = lock(&managed.migration)
        .as_ref()
        .map(|m| lock(&m.state).clone());
    VmStatus {
        name: name.to_owned(),
        pid: managed.pid,
        run_state,
        run_state_error,
        incoming: managed.incoming,
        migration,
    }
}

/// Holds the stopped source at `pre-switchover` until the orchestrator has flipped the
/// datapaths and says go, or a bound passes (then the source resumes: a lost orchestrator
/// must not leave the VM stopped).
struct OrchestratedSwitchover {
    state: Arc<Mutex<MigrationState>>,
    released: Option<oneshot::Receiver<bool>>,
    wait: Duration,
}

impl SwitchoverHook for OrchestratedSwitchover {
    fn at_switchover(&mut self) -> Pin<Box<dyn Future<Output = Result<()>> + Send + '_>> {
        Box::pin(async move {
            lock(&self.state).phase = MigrationPhase::AwaitingSwitchover;
            let released = self
                .released
                .take()
                .ok_or_else(|| anyhow!("pre-switchover reached twice"))?;
            let proceed = tokio::time::timeout(self.wait, released).await;
            lock(&self.state).phase = MigrationPhase::Running;
            match proceed {
                Ok(Ok(true)) => Ok(()),
                Ok(Ok(false)) => bail!("the orchestrator aborted the migration at switchover"),
                Ok(Err(_)) => bail!("the switchover was abandoned"),
                Err(_) => bail!(
                    "no word from the orchestrator within {:?} at switchover",
                    self.wait
                ),
            }
        })
    }
}
