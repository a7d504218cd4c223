//! The QEMU VMs an agent runs, and the migration halves it drives for them.
//!
//! Source side: [`Vms::run_outgoing`] runs (or follows) [`migrate_outgoing`] with the
//! caller's switchover hook. Destination side: [`Vms::prepare_incoming`], then
//! [`Vms::finish_incoming`] and [`Vms::announce`]. The migration's stages are the
//! agent's migrations' (`agent/migrations`).

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
use tokio::sync::mpsc;

use super::{
    api::{
        IncomingRequest, MigrationPhase, MigrationState, MirrorSettings, OutgoingRequest, RunState,
        VmRequest, VmStatus,
    },
    blackout,
};
use crate::qemu::{
    migrate::{
        FailedInPostcopy, IncomingRecovery, MigrationReport, Progress, SwitchoverHook,
        abandon_incoming, finish_incoming, follow_outgoing, migrate_outgoing, prepare_incoming,
        roll_back_source,
    },
    mirror::{
        DiskMirror, MirrorHook, MirrorReady, abort_mirror, export_disk, start_mirror, unexport_disk,
    },
    qmp::{
        Qmp,
        commands::{AnnounceSelf, Cont, MigrateSetParameters, QueryStatus},
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
    /// The spec's tap, for its counters.
    tap: Option<String>,
    incoming: bool,
    incoming_uri: Mutex<Option<String>>,
    /// The NBD export a destination serves for the source's mirror.
    exported: Mutex<Option<DiskMirror>>,
    /// A destination's QMP events from `prepare_incoming` on, for the `RESUME` event.
    incoming_events: Mutex<Option<crate::qemu::qmp::EventStream>>,
    /// When the incoming VM began to run, µs since the epoch.
    resumed_unix_us: Mutex<Option<u64>>,
    migration: Mutex<Option<Migration>>,
}

impl ManagedVm {
    fn new(vm: Vm, record: VmRecord) -> Self {
        Self {
            qmp: vm.qmp_handle(),
            pid: vm.pid(),
            vm: tokio::sync::Mutex::new(Some(vm)),
            tap: VmSpec::parse(&record.spec_toml)
                .ok()
                .map(|spec| spec.nic.tap),
            spec_toml: record.spec_toml,
            incoming: record.incoming,
            incoming_uri: Mutex::new(None),
            incoming_events: Mutex::new(None),
            resumed_unix_us: Mutex::new(None),
            exported: Mutex::new(None),
            migration: Mutex::new(None),
        }
    }
}

struct Migration {
    state: Arc<Mutex<MigrationState>>,
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

    /// Takes back the VMs an earlier agent started that still run; forgets the ones whose
    /// QEMU is gone. One whose QEMU runs but does not answer (a post-copy destination's
    /// main thread can wait on a page the broken stream does not bring) is kept on
    /// record: the agent tries again ([`Vms::unadopted`]).
    pub async fn adopt_all(&self) -> Result<usize> {
        let entries = std::fs::read_dir(&self.state_dir)
            .with_context(|| format!("reading {}", self.state_dir.display()))?;
        let mut adopted = 0;
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            let name = path
                .file_stem()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            if self.vms.lock().await.contains_key(name) {
                continue;
            }
            match self.adopt(&path).await {
                Ok(name) => {
                    tracing::info!(vm = %name, "adopted a running VM");
                    adopted += 1;
                }
                Err(err) if recorded_qemu_runs(&path) => {
                    tracing::warn!(
                        "not adopting {} yet: {err:#}; its QEMU runs, so it stays on record",
                        path.display()
                    );
                }
                Err(err) => {
                    tracing::warn!("not adopting {}: {err:#}", path.display());
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        Ok(adopted)
    }

    /// VM records left unadopted by [`Vms::adopt_all`] whose QEMU still runs.
    pub async fn unadopted(&self) -> usize {
        let Ok(entries) = std::fs::read_dir(&self.state_dir) else {
            return 0;
        };
        let vms = self.vms.lock().await;
        entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "json"))
            .filter(|p| {
                p.file_stem()
                    .and_then(|n| n.to_str())
                    .is_some_and(|name| !vms.contains_key(name))
            })
            .filter(|p| recorded_qemu_runs(p))
            .count()
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

    /// The spec a VM here was started with.
    pub async fn spec_toml(&self, name: &str) -> Option<String> {
        self.vms
            .lock()
            .await
            .get(name)
            .map(|managed| managed.spec_toml.clone())
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
        if let Ok(events) = managed.qmp.subscribe() {
            *lock(&managed.incoming_events) = Some(events);
        }
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
    /// A mirror job left by an agent that died mid-copy is cancelled first: the copy
    /// starts afresh (the VM runs on meanwhile).
    pub async fn start_mirror(&self, name: &str, settings: &MirrorSettings) -> Result<MirrorReady> {
        let managed = self.get(name).await?;
        let mirror = settings.disk_mirror();
        abort_mirror(&managed.qmp, &mirror).await;
        start_mirror(&managed.qmp, &mirror).await
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

    /// The destination's migration status in post-copy, `None` if QEMU does not answer
    /// soon ([`IncomingRecovery::status`]).
    pub async fn incoming_status(&self, name: &str) -> Result<Option<String>> {
        let managed = self.get(name).await?;
        IncomingRecovery::status(&managed.qmp).await
    }

    /// Post-copy at the destination: a broken stream listens again for the source's
    /// resume, on `uri`, the one it listened on first ([`IncomingRecovery::tend`]).
    pub async fn recover_incoming(
        &self,
        name: &str,
        recovery: &mut IncomingRecovery,
        uri: &str,
        status: Option<&str>,
        source_paused: bool,
    ) -> Result<()> {
        let managed = self.get(name).await?;
        recovery
            .tend(&managed.qmp, uri, status, source_paused)
            .await
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

    /// The source's half of the migration, until QEMU completes it (or it fails: then
    /// the VM runs at the source again, unless post-copy had begun). `follow`: QEMU runs
    /// the migration already (a restarted agent), so it is followed, not started.
    pub async fn run_outgoing(
        &self,
        name: &str,
        request: &OutgoingRequest,
        hook: &mut dyn SwitchoverHook,
        follow: bool,
        on_progress: impl Fn(Progress) + Send + 'static,
    ) -> Result<MigrationReport> {
        let managed = self.get(name).await?;
        let options = request.settings.options();
        let state = Arc::new(Mutex::new(MigrationState {
            phase: MigrationPhase::Running,
            progress: None,
            report: None,
            error: None,
            split: false,
        }));
        *lock(&managed.migration) = Some(Migration {
            state: state.clone(),
        });
        let (progress_tx, mut progress_rx) = mpsc::channel::<Progress>(16);
        let progress_state = state.clone();
        let forward = tokio::spawn(async move {
            while let Some(progress) = progress_rx.recv().await {
                lock(&progress_state).progress = Some(progress.clone());
                on_progress(progress);
            }
        });
        let qmp = managed.qmp.clone();
        let mut watched = WatchedSwitchover {
            state: state.clone(),
            inner: hook,
        };
        let result = match request.mirror.as_ref().map(MirrorSettings::disk_mirror) {
            // The mirror completes (a consistent copy) first, with the VM stopped.
            Some(mirror) => {
                let mut hook = MirrorHook::new(&qmp, &mirror, &mut watched);
                let result =
                    outgoing(&qmp, &request.uri, &options, &mut hook, progress_tx, follow).await;
                if result.is_err() {
                    abort_mirror(&qmp, &mirror).await;
                }
                result
            }
            None => {
                outgoing(
                    &qmp,
                    &request.uri,
                    &options,
                    &mut watched,
                    progress_tx,
                    follow,
                )
                .await
            }
        };
        let _ = forward.await;
        let mut state = lock(&state);
        match &result {
            Ok(report) => {
                state.phase = MigrationPhase::Completed;
                state.report = Some(report.clone());
            }
            Err(err) => {
                tracing::warn!("migration failed: {err:#}");
                state.phase = MigrationPhase::Failed;
                state.error = Some(format!("{err:#}"));
                state.split = err.downcast_ref::<FailedInPostcopy>().is_some();
            }
        }
        result
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

    /// Leaves the VM running here: QEMU's outgoing migration (and the disk mirror) is
    /// cancelled, and a stopped source resumed. Fine when nothing migrates.
    pub async fn cancel_outgoing(&self, name: &str, mirror: Option<&MirrorSettings>) -> Result<()> {
        let managed = self.get(name).await?;
        roll_back_source(&managed.qmp).await?;
        if let Some(mirror) = mirror {
            abort_mirror(&managed.qmp, &mirror.disk_mirror()).await;
        }
        Ok(())
    }

    /// The VM's QEMU died: boots it again from the spec it was started with (a fresh boot:
    /// its RAM, and so its connections, are gone). Only for a VM started here (not
    /// `-incoming`).
    pub async fn reboot(&self, name: &str) -> Result<VmStatus> {
        let managed = self.get(name).await?;
        if managed.incoming {
            bail!(VmError::Conflict(format!(
                "VM {name} was started as a migration destination"
            )));
        }
        let spec_toml = managed.spec_toml.clone();
        drop(managed);
        self.stop(name).await?;
        self.start(&VmRequest {
            spec_toml,
            incoming: false,
        })
        .await
    }

    /// Caps the VM's outgoing migration at `bytes_per_second`, before the switchover
    /// and after it (post-copy): QEMU applies a new `max-bandwidth` to a migration that
    /// runs, and the next one starts with it.
    pub async fn set_bandwidth(&self, name: &str, bytes_per_second: u64) -> Result<()> {
        let managed = self.get(name).await?;
        managed
            .qmp
            .run(&MigrateSetParameters {
                max_bandwidth: Some(bytes_per_second),
                max_postcopy_bandwidth: Some(bytes_per_second),
                ..Default::default()
            })
            .await
            .context("migrate-set-parameters max-bandwidth")?;
        Ok(())
    }

    /// `cont`: the VM runs again here (after a completed migration whose destination lost it).
    pub async fn resume(&self, name: &str) -> Result<()> {
        let managed = self.get(name).await?;
        managed.qmp.run(&Cont {}).await.context("cont")?;
        let status = managed
            .qmp
            .run(&QueryStatus {})
            .await
            .context("query-status")?;
        if !status.running {
            bail!("the VM is {} after cont", status.status);
        }
        Ok(())
    }
}

/// Whether the QEMU a VM record names still runs (its PID is a live `qemu-system` process).
fn recorded_qemu_runs(path: &std::path::Path) -> bool {
    let Some(record) = std::fs::read_to_string(path)
        .ok()
        .and_then(|text| serde_json::from_str::<VmRecord>(&text).ok())
    else {
        return false;
    };
    std::fs::read(format!("/proc/{}/cmdline", record.pid))
        .is_ok_and(|cmdline| String::from_utf8_lossy(&cmdline).contains("qemu-system"))
}

/// Starts (or, `follow`, follows) the source's half.
async fn outgoing(
    qmp: &Qmp,
    uri: &str,
    options: &crate::qemu::migrate::MigrationOptions,
    hook: &mut dyn SwitchoverHook,
    progress: mpsc::Sender<Progress>,
    follow: bool,
) -> Result<MigrationReport> {
    if follow {
        follow_outgoing(qmp, uri, options, hook, Some(progress)).await
    } else {
        migrate_outgoing(qmp, uri, options, hook, Some(progress)).await
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
        tap_dropped: match managed.tap.as_deref() {
            Some(tap) => blackout::tap_dropped(tap).await,
            None => None,
        },
        resumed_unix_us: resumed_unix_us(managed),
    }
}

/// When the incoming VM began to run, from QEMU's `RESUME` event: QEMU sends it before
/// `query-status` can say `running`, so it has come by the time a status says so.
fn resumed_unix_us(managed: &ManagedVm) -> Option<u64> {
    let mut resumed = lock(&managed.resumed_unix_us);
    if resumed.is_none() {
        let mut events = lock(&managed.incoming_events);
        while let Some(event) = events.as_mut().and_then(|e| e.try_next()) {
            if event.name == "RESUME" {
                *resumed = Some(unix_us(event.timestamp.as_system_time()));
                *events = None;
            }
        }
    }
    *resumed
}

/// `at` in µs since the epoch.
pub(crate) fn unix_us(at: std::time::SystemTime) -> u64 {
    at.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// Shows `awaiting-switchover` on `GET /v1/vms/{name}/migration` while the caller's hook
/// runs (the source stopped at `pre-switchover`).
struct WatchedSwitchover<'a> {
    state: Arc<Mutex<MigrationState>>,
    inner: &'a mut dyn SwitchoverHook,
}

impl SwitchoverHook for WatchedSwitchover<'_> {
    fn at_switchover(&mut self) -> Pin<Box<dyn Future<Output = Result<()>> + Send + '_>> {
        Box::pin(async move {
            lock(&self.state).phase = MigrationPhase::AwaitingSwitchover;
            let result = self.inner.at_switchover().await;
            lock(&self.state).phase = MigrationPhase::Running;
            result
        })
    }

    fn stopped_at(&mut self, at: std::time::SystemTime) {
        self.inner.stopped_at(at);
    }

    fn destination_gone(&mut self) -> Pin<Box<dyn Future<Output = Option<String>> + Send + '_>> {
        self.inner.destination_gone()
    }

    fn destination_runs(&mut self) -> Pin<Box<dyn Future<Output = bool> + Send + '_>> {
        self.inner.destination_runs()
    }
}
