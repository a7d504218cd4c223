//! Non-shared storage: the disk is mirrored over NBD while the VM runs, the libvirt
//! `--copy-storage-all` sequence (QEMU's `docs/interop/live-block-operations.rst`).
//!
//! Destination (started with `-incoming defer` and an image of the same size):
//! 1. [`export_disk`]: `nbd-server-start`, then `block-export-add` (type `nbd`, writable) of
//!    the disk node;
//! 2. after the move, [`unexport_disk`]: `block-export-del`, `nbd-server-stop`.
//!
//! Source:
//! 1. [`start_mirror`]: `blockdev-add` an NBD client node for the destination's export, then
//!    `blockdev-mirror` (`sync: full`) onto it, and wait for `BLOCK_JOB_READY`: the target
//!    has every block, and every new guest write is mirrored too;
//! 2. the RAM migration runs (see [`super::migrate`]);
//! 3. at `pre-switchover`, with the VM stopped, [`complete_mirror`]: `block-job-cancel` (not
//!    forced) on the READY job, which copies what is still dirty and ends with
//!    `BLOCK_JOB_COMPLETED`: a consistent point-in-time copy, without pivoting the source
//!    onto the target. [`MirrorHook`] does this before the caller's own hook; then
//!    `migrate-continue`.
//! 4. on failure, [`abort_mirror`]: the job is cancelled by force and the source keeps
//!    using its own disk.
//!
//! Each half takes only its own site's [`Qmp`], so the per-site agents can run them;
//! [`mirror_disk`] then [`migrate_with_mirror`] compose them in one process.

use std::{future::Future, pin::Pin, time::Duration};

use anyhow::{Context as _, Result, bail};
use serde::Serialize;
use tokio::{sync::mpsc, time::Instant};

use super::{
    migrate::{
        MigrationOptions, MigrationReport, Progress, SwitchoverHook, abandon_incoming,
        finish_incoming, migrate_outgoing, prepare_incoming,
    },
    qmp::{
        Event, EventStream, Qmp,
        commands::{
            BlockExportAddNbd, BlockExportDel, BlockJobCancel, BlockdevAddNbd, BlockdevDel,
            BlockdevMirror, InetAddressLegacy, InetSocketAddress, InetSocketAddressFlat,
            NbdServerStart, NbdServerStop, QueryBlockJobs,
        },
    },
    spec::DISK_NODE,
};

/// What both halves agree on for one disk.
#[derive(Clone, Debug)]
pub struct DiskMirror {
    /// The disk's node name, the same at both ends ([`DISK_NODE`] for a [`super::spec::VmSpec`]).
    pub node: String,
    /// Where the destination's NBD server listens, and where the source connects.
    pub nbd_host: String,
    pub nbd_port: u16,
    /// Bytes per second for the mirror; 0 is unlimited.
    pub speed: u64,
    /// `write-blocking`: guest writes complete only once they reached the target, so a guest
    /// that writes faster than the link still converges (at the cost of write latency).
    pub write_blocking: bool,
    /// How long the first full copy may take.
    pub ready_timeout: Duration,
    /// How long the final cancel (copying what is still dirty) may take.
    pub complete_timeout: Duration,
}

impl DiskMirror {
    /// Mirrors the spec's disk through an NBD server at `nbd_host:nbd_port`.
    pub fn new(nbd_host: &str, nbd_port: u16) -> Self {
        Self {
            node: DISK_NODE.to_owned(),
            nbd_host: nbd_host.to_owned(),
            nbd_port,
            speed: 0,
            write_blocking: false,
            ready_timeout: Duration::from_secs(600),
            complete_timeout: Duration::from_secs(60),
        }
    }

    /// The export's id and name at the destination.
    pub fn export_name(&self) -> String {
        self.node.clone()
    }

    /// The block job's id at the source.
    pub fn job_id(&self) -> String {
        format!("mirror-{}", self.node)
    }

    /// The source's NBD client node, the mirror's target.
    pub fn target_node(&self) -> String {
        format!("mirror-{}-target", self.node)
    }
}

/// The mirror reached READY: the target holds the whole disk.
#[derive(Clone, Debug, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct MirrorReady {
    pub ready_ms: u64,
    /// The job's work so far, in bytes: the disk's size plus whatever the guest rewrote
    /// after it had been copied.
    pub len: u64,
}

/// The mirror ended with a consistent copy at the destination.
#[derive(Clone, Debug, Serialize)]
pub struct MirrorCompleted {
    /// From `block-job-cancel` to `BLOCK_JOB_COMPLETED` (the VM is stopped meanwhile).
    pub complete_ms: u64,
    /// The job's total work and how much of it was done (equal once it completed).
    pub len: u64,
    pub offset: u64,
}

/// The destination's half, before the source mirrors: serve the disk node over NBD,
/// writable. The destination QEMU runs with `-incoming defer`.
pub async fn export_disk(destination: &Qmp, mirror: &DiskMirror) -> Result<()> {
    destination
        .run(&NbdServerStart {
            addr: InetAddressLegacy {
                kind: "inet",
                data: InetSocketAddress {
                    host: mirror.nbd_host.clone(),
                    port: mirror.nbd_port.to_string(),
                },
            },
        })
        .await
        .with_context(|| {
            format!(
                "destination: nbd-server-start on {}:{}",
                mirror.nbd_host, mirror.nbd_port
            )
        })?;
    let added = destination
        .run(&BlockExportAddNbd {
            kind: "nbd",
            id: mirror.export_name(),
            node_name: mirror.node.clone(),
            writable: true,
            name: Some(mirror.export_name()),
        })
        .await
        .with_context(|| format!("destination: block-export-add of node {}", mirror.node));
    if added.is_err() {
        let _ = destination.run(&NbdServerStop {}).await;
    }
    added.map(|_| ())
}

/// The destination's half after the move (or to give up): remove the export and stop the
/// NBD server.
pub async fn unexport_disk(destination: &Qmp, mirror: &DiskMirror) -> Result<()> {
    // `hard`: by now the source has let go; a leftover client must not keep it open.
    destination
        .run(&BlockExportDel {
            id: mirror.export_name(),
            mode: Some("hard"),
        })
        .await
        .context("destination: block-export-del")?;
    destination
        .run(&NbdServerStop {})
        .await
        .context("destination: nbd-server-stop")?;
    Ok(())
}

/// The source's half: mirror the whole disk onto the destination's export and wait for
/// READY. On failure the job and the target node are removed again.
pub async fn start_mirror(source: &Qmp, mirror: &DiskMirror) -> Result<MirrorReady> {
    let started = Instant::now();
    let mut events = source.subscribe()?;
    source
        .run(&BlockdevAddNbd {
            driver: "nbd",
            node_name: mirror.target_node(),
            server: InetSocketAddressFlat {
                kind: "inet",
                host: mirror.nbd_host.clone(),
                port: mirror.nbd_port.to_string(),
            },
            export: mirror.export_name(),
        })
        .await
        .with_context(|| {
            format!(
                "source: blockdev-add of the NBD target {}:{}/{}",
                mirror.nbd_host,
                mirror.nbd_port,
                mirror.export_name()
            )
        })?;
    let outcome = async {
        source
            .run(&BlockdevMirror {
                job_id: mirror.job_id(),
                device: mirror.node.clone(),
                target: mirror.target_node(),
                sync: "full",
                speed: Some(mirror.speed),
                copy_mode: Some(if mirror.write_blocking {
                    "write-blocking"
                } else {
                    "background"
                }),
            })
            .await
            .context("source: blockdev-mirror")?;
        let ready = expect_job_event(
            &mut events,
            &mirror.job_id(),
            "BLOCK_JOB_READY",
            mirror.ready_timeout,
        )
        .await?;
        Ok(MirrorReady {
            ready_ms: started.elapsed().as_millis() as u64,
            len: ready.data["len"].as_u64().unwrap_or_default(),
        })
    }
    .await;
    match outcome {
        Ok(ready) => {
            tracing::info!(?ready, job = %mirror.job_id(), "disk mirror READY");
            Ok(ready)
        }
        Err(err) => {
            abort_mirror(source, mirror).await;
            Err(err)
        }
    }
}

/// The source's half at `pre-switchover` (the VM stopped): end the READY mirror with a
/// consistent copy, then detach the target.
pub async fn complete_mirror(source: &Qmp, mirror: &DiskMirror) -> Result<MirrorCompleted> {
    let started = Instant::now();
    let mut events = source.subscribe()?;
    source
        .run(&BlockJobCancel {
            device: mirror.job_id(),
            force: false,
        })
        .await
        .context("source: block-job-cancel of the READY mirror")?;
    // Only COMPLETED without an error means the target is a full, consistent copy.
    let done = expect_job_event(
        &mut events,
        &mirror.job_id(),
        "BLOCK_JOB_COMPLETED",
        mirror.complete_timeout,
    )
    .await?;
    if let Some(error) = done.data.get("error").and_then(|e| e.as_str()) {
        bail!("the disk mirror failed at completion: {error}");
    }
    let completed = MirrorCompleted {
        complete_ms: started.elapsed().as_millis() as u64,
        len: done.data["len"].as_u64().unwrap_or_default(),
        offset: done.data["offset"].as_u64().unwrap_or_default(),
    };
    source
        .run(&BlockdevDel {
            node_name: mirror.target_node(),
        })
        .await
        .context("source: blockdev-del of the NBD target")?;
    tracing::info!(?completed, "disk mirror completed");
    Ok(completed)
}

/// Best effort: stop the mirror by force and detach the target; the source keeps its disk.
pub async fn abort_mirror(source: &Qmp, mirror: &DiskMirror) {
    if source.is_closed() {
        return;
    }
    let running = source
        .run(&QueryBlockJobs {})
        .await
        .map(|jobs| jobs.iter().any(|j| j.device == mirror.job_id()))
        .unwrap_or(false);
    if running && let Ok(mut events) = source.subscribe() {
        let cancelled = source
            .run(&BlockJobCancel {
                device: mirror.job_id(),
                force: true,
            })
            .await;
        if cancelled.is_ok()
            && let Err(err) =
                wait_for_job(&mut events, &mirror.job_id(), Duration::from_secs(10)).await
        {
            tracing::warn!("the disk mirror did not end after a forced cancel: {err:#}");
        }
    }
    let _ = source
        .run(&BlockdevDel {
            node_name: mirror.target_node(),
        })
        .await;
}

/// Waits for job `id`'s next event and fails unless it is `expected`.
async fn expect_job_event(
    events: &mut EventStream,
    id: &str,
    expected: &str,
    limit: Duration,
) -> Result<Event> {
    let event = wait_for_job(events, id, limit)
        .await
        .with_context(|| format!("waiting for {expected} of the disk mirror"))?;
    if event.name != expected {
        bail!(
            "the disk mirror sent {} instead of {expected}: {}",
            event.name,
            event.data
        );
    }
    Ok(event)
}

/// The next READY, COMPLETED, CANCELLED or ERROR event of job `id`.
async fn wait_for_job(events: &mut EventStream, id: &str, limit: Duration) -> Result<Event> {
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let event = events.next(left).await?;
        let ours = event.data.get("device").and_then(|d| d.as_str()) == Some(id);
        if !ours {
            continue;
        }
        match event.name.as_str() {
            "BLOCK_JOB_READY" | "BLOCK_JOB_COMPLETED" | "BLOCK_JOB_CANCELLED" => {
                return Ok(event);
            }
            // With the default error policy the job stops on its own; report it now.
            "BLOCK_JOB_ERROR" => bail!("the disk mirror reported an error: {}", event.data),
            _ => {}
        }
    }
}

/// Completes the disk mirror at `pre-switchover`, then runs the caller's hook.
pub struct MirrorHook<'a> {
    source: &'a Qmp,
    mirror: &'a DiskMirror,
    inner: &'a mut dyn SwitchoverHook,
    completed: Option<MirrorCompleted>,
}

impl<'a> MirrorHook<'a> {
    pub fn new(source: &'a Qmp, mirror: &'a DiskMirror, inner: &'a mut dyn SwitchoverHook) -> Self {
        Self {
            source,
            mirror,
            inner,
            completed: None,
        }
    }

    /// Set once the mirror has completed at switchover.
    pub fn completed(&self) -> Option<&MirrorCompleted> {
        self.completed.as_ref()
    }
}

impl SwitchoverHook for MirrorHook<'_> {
    fn at_switchover(&mut self) -> Pin<Box<dyn Future<Output = Result<()>> + Send + '_>> {
        Box::pin(async move {
            self.completed = Some(complete_mirror(self.source, self.mirror).await?);
            self.inner.at_switchover().await
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

/// Both halves of the disk mirror up to READY: export at the destination, mirror from the
/// source. On failure the export is removed again.
pub async fn mirror_disk(
    source: &Qmp,
    destination: &Qmp,
    mirror: &DiskMirror,
) -> Result<MirrorReady> {
    export_disk(destination, mirror).await?;
    let ready = start_mirror(source, mirror).await;
    if ready.is_err() && !destination.is_closed() {
        let _ = unexport_disk(destination, mirror).await;
    }
    ready
}

/// With the mirror READY ([`mirror_disk`]): the RAM migration, completing the mirror at
/// `pre-switchover` before `hook`, then the destination's finish and the export's removal.
/// On failure the mirror is aborted, the source keeps running on its own disk, and the
/// destination is told to quit.
pub async fn migrate_with_mirror(
    source: &Qmp,
    destination: &Qmp,
    uri: &str,
    mirror: &DiskMirror,
    options: &MigrationOptions,
    hook: &mut dyn SwitchoverHook,
    progress: Option<mpsc::Sender<Progress>>,
) -> Result<(MigrationReport, MirrorCompleted)> {
    if !options.pause_before_switchover {
        bail!(
            "a disk mirror needs pause_before_switchover: it must complete while the VM is stopped"
        );
    }
    let outcome = async {
        prepare_incoming(destination, uri, options).await?;
        let mut mirror_hook = MirrorHook::new(source, mirror, hook);
        let mut report = migrate_outgoing(source, uri, options, &mut mirror_hook, progress).await?;
        let completed = mirror_hook
            .completed
            .take()
            .context("the migration completed without passing pre-switchover")?;
        report.destination_status = finish_incoming(destination, options).await?;
        unexport_disk(destination, mirror).await?;
        Ok((report, completed))
    }
    .await;
    if outcome.is_err() {
        abort_mirror(source, mirror).await;
        abandon_incoming(destination).await;
    }
    outcome
}
