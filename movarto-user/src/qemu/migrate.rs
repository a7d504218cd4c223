//! RAM pre-copy live migration between two QEMUs, coordinated over both QMP sessions.
//!
//! Sequence:
//! 1. capabilities on both sides (`events`, and `pause-before-switchover` on the source);
//!    `max-bandwidth` and `downtime-limit` on the source, read back so QEMU's default cap
//!    never applies silently;
//! 2. `migrate-incoming` at the destination (started with `-incoming defer`), `migrate` at
//!    the source;
//! 3. progress from `query-migrate` as a stream of [`Progress`];
//! 4. at `pre-switchover` (the source is stopped, the device state not yet sent) the
//!    caller's [`SwitchoverHook`] runs (movarto flips the datapaths there), then
//!    `migrate-continue`;
//! 5. once `completed`: the destination runs, `announce-self` from it, and the final
//!    numbers (total time, downtime, bytes) are returned.
//!
//! Options: `multifd` channels, `auto-converge`, and post-copy after the first pass or when
//! pre-copy has not converged within a bound ([`Postcopy`]).
//!
//! Post-copy recovers by itself: when its stream breaks (`postcopy-paused`, or a stream that
//! has moved nothing for [`POSTCOPY_STALL`], which is paused on purpose), the source sends
//! `migrate` with `resume` every [`RESUME_RETRY`] until the destination, which listens
//! again with `migrate-recover` ([`IncomingRecovery`]), takes it, or until
//! `postcopy_recover_timeout` runs out. The report says how long it was paused.
//!
//! On failure, timeout or a hook error the migration is cancelled, the source is made to run
//! again if it was stopped, and the destination is told to quit: the VM stays at the source.

use std::{future::Future, pin::Pin, time::Duration};

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};
use tokio::{sync::mpsc, time::Instant};

use super::qmp::{
    Qmp,
    commands::{
        AnnounceSelf, Cont, Migrate, MigrateCancel, MigrateContinue, MigrateIncoming, MigratePause,
        MigrateRecover, MigrateSetCapabilities, MigrateSetParameters, MigrateStartPostcopy,
        MigrationCapabilityStatus, MigrationInfo, QueryMigrate, QueryMigrateParameters,
        QueryStatus, Quit,
    },
};

/// How often a paused post-copy migration is resumed (`migrate` with `resume`): each try
/// is one TCP connect, refused at once while the destination does not listen yet.
pub const RESUME_RETRY: Duration = Duration::from_millis(500);
/// A post-copy stream that has moved no byte for this long, with pages still to send, is
/// broken even if TCP has not said so (a black-holed link retransmits for minutes, with
/// back-off): it is paused on purpose and resumed on a fresh connection.
pub const POSTCOPY_STALL: Duration = Duration::from_secs(2);
/// How often the switchover hook is asked about the destination in post-copy (whether
/// the VM runs there; while broken, whether its QEMU is gone).
const DESTINATION_ASKED: Duration = Duration::from_millis(500);
/// A resume still connecting after this long (its SYN lost in a link that is still cut,
/// and TCP's next try seconds away) is paused again, so that the next try starts afresh.
pub const RESUME_STUCK: Duration = Duration::from_secs(3);
/// A resume connected but still in its handshake after this long is paused again: the
/// handshake carries the destination's bitmap of received pages (1 bit per page: 32 MiB
/// for a 1 TiB guest), so it gets more time than the connect.
pub const RECOVER_STUCK: Duration = Duration::from_secs(30);

/// How a migration runs.
#[derive(Clone, Debug)]
pub struct MigrationOptions {
    /// Bytes per second; QEMU's own default cap is far too low for a WAN.
    pub max_bandwidth: u64,
    /// Bytes per second once in post-copy; 0 (QEMU's default) is no cap: the VM waits on
    /// every page it still lacks, so post-copy normally takes all the link has.
    pub max_postcopy_bandwidth: u64,
    /// The longest pause QEMU aims for at switchover.
    pub downtime_limit: Duration,
    /// Stop at `pre-switchover` and run the hook before `migrate-continue`.
    pub pause_before_switchover: bool,
    /// Announce the VM from the destination (RARP/GARP) once it runs.
    pub announce: bool,
    /// The whole migration, from `migrate` to `completed`.
    pub timeout: Duration,
    /// How often progress is polled.
    pub progress_interval: Duration,
    /// Send RAM over this many parallel connections (`multifd` on both sides).
    pub multifd_channels: Option<u8>,
    /// Throttle the guest's vCPUs while it dirties memory faster than the link carries it.
    pub auto_converge: bool,
    /// With `auto_converge`: the first throttle, and the step added each pass that still
    /// does not converge (percent of vCPU time; QEMU's defaults are 20 and 10).
    pub throttle_initial_percent: u8,
    pub throttle_increment_percent: u8,
    /// When to switch to post-copy, if at all.
    pub postcopy: Postcopy,
    /// Once post-copy's stream broke: how long to keep resuming it before giving up (the
    /// VM is then split between the sites, for a person to recover). Zero: no retry.
    pub postcopy_recover_timeout: Duration,
}

/// Post-copy: the VM resumes at the destination early and pulls the pages it still lacks on
/// demand, so a guest that dirties memory faster than the link still moves, in bounded time.
/// The price: until `completed`, the VM needs both sides; losing either loses the VM.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Postcopy {
    /// Pre-copy only.
    #[default]
    Off,
    /// `migrate-start-postcopy` once the first pass over memory is done.
    AfterFirstPass,
    /// `migrate-start-postcopy` if pre-copy has not completed within this time.
    IfNotConvergedWithin(Duration),
}

impl Default for MigrationOptions {
    fn default() -> Self {
        Self {
            max_bandwidth: 10 * 1024 * 1024 * 1024 / 8, // 10 Gbit/s: effectively no cap
            max_postcopy_bandwidth: 0,
            downtime_limit: Duration::from_millis(300),
            pause_before_switchover: true,
            announce: true,
            timeout: Duration::from_secs(300),
            progress_interval: Duration::from_millis(100),
            multifd_channels: None,
            auto_converge: false,
            throttle_initial_percent: 20,
            throttle_increment_percent: 10,
            postcopy: Postcopy::Off,
            postcopy_recover_timeout: DEFAULT_POSTCOPY_RECOVER_TIMEOUT,
        }
    }
}

/// Long enough for a routing change or a link that flaps; the VM at the destination is
/// frozen meanwhile (it waits for pages only the source has), so not much longer.
pub const DEFAULT_POSTCOPY_RECOVER_TIMEOUT: Duration = Duration::from_secs(60);

/// A snapshot of a running migration, for a progress display: QEMU's `query-migrate`
/// (`MigrationInfo` and its `ram` `MigrationStats`).
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Progress {
    pub status: String,
    pub elapsed_ms: u64,
    /// RAM bytes sent so far, over every pass.
    pub transferred: u64,
    /// RAM bytes still to send in this pass.
    pub remaining: u64,
    /// The guest's RAM, in bytes.
    pub total: u64,
    /// Megabits per second (QEMU's `mbps`).
    pub mbps: f64,
    /// Completed passes over memory (`dirty-sync-count`).
    pub passes: u64,
    /// The vCPU throttle auto-converge applies, in percent.
    pub cpu_throttle_percent: u64,
    /// Pages the guest dirties per second, measured over the last pass (0 in the first).
    #[serde(default)]
    pub dirty_pages_rate: u64,
    /// The bytes per page of the page counts.
    #[serde(default)]
    pub page_size: u64,
    /// The downtime QEMU expects if it switched over now, in ms (while active).
    #[serde(default)]
    pub expected_downtime_ms: Option<u64>,
}

impl Progress {
    /// The guest's dirtying rate, in bytes per second.
    pub fn dirty_bytes_per_second(&self) -> u64 {
        self.dirty_pages_rate.saturating_mul(self.page_size)
    }

    /// How much of this pass over RAM is sent, 0 to 1 (`None` without RAM figures).
    pub fn done_ratio(&self) -> Option<f64> {
        (self.total > 0)
            .then(|| self.total.saturating_sub(self.remaining) as f64 / self.total as f64)
    }

    /// The copy's bandwidth, in bytes per second.
    pub fn bytes_per_second(&self) -> f64 {
        self.mbps * 1e6 / 8.0
    }
}

/// The outcome of a completed migration, as QEMU's source reports it.
#[derive(Clone, Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct MigrationReport {
    pub status: String,
    pub total_time_ms: u64,
    pub downtime_ms: u64,
    pub setup_time_ms: u64,
    pub transferred: u64,
    pub passes: u64,
    /// Time spent in the switchover hook (the source was stopped meanwhile).
    pub hook_ms: u64,
    /// Whether the migration switched to post-copy, and after how long.
    pub postcopy_started_ms: Option<u64>,
    /// Bytes sent after the switch to post-copy.
    pub postcopy_bytes: u64,
    /// Bytes sent over the multifd channels.
    pub multifd_bytes: u64,
    /// The highest vCPU throttle auto-converge applied, in percent.
    pub max_cpu_throttle_percent: u64,
    /// The destination's run state after the move.
    pub destination_status: String,
    /// How long post-copy's stream was broken (`postcopy-paused` until `postcopy-active`
    /// again), in all.
    #[serde(default)]
    pub postcopy_paused_ms: u64,
    /// How often it broke and was resumed.
    #[serde(default)]
    pub postcopy_recoveries: u32,
}

/// What the migration loop saw along the way, for the report (and the rollback).
#[derive(Default)]
struct Observed {
    hook_ms: u64,
    /// The hook ran and `migrate-continue` was sent.
    continued: bool,
    postcopy_started_ms: Option<u64>,
    max_cpu_throttle_percent: u64,
    recovery: Recovery,
}

/// Post-copy's stream: when it last moved, and its breaks.
#[derive(Default)]
struct Recovery {
    /// `ram.transferred`, and when it last grew.
    transferred: u64,
    moved_at: Option<Instant>,
    /// Broken since then (paused, or resuming).
    broken_since: Option<Instant>,
    /// The last `migrate` with `resume`, or `migrate-pause`.
    last_try: Option<Instant>,
    paused_ms: u64,
    recoveries: u32,
    /// The last time the hook was asked whether the destination is gone, or runs.
    asked_destination: Option<Instant>,
    /// The hook said the VM runs at the destination: its device state is loaded, so a
    /// stalled stream may be paused (a break before that is fatal to the destination).
    destination_ran: bool,
}

/// Runs at `pre-switchover`, while the source VM is stopped; an error cancels the migration.
pub trait SwitchoverHook: Send {
    fn at_switchover(&mut self) -> Pin<Box<dyn Future<Output = Result<()>> + Send + '_>>;

    /// QEMU's `STOP` event came, stamped `at` (wall clock): the VM stopped for the
    /// switchover. Told before [`SwitchoverHook::at_switchover`] when the event has come.
    fn stopped_at(&mut self, _at: std::time::SystemTime) {}

    /// Asked while post-copy is broken: why resuming cannot succeed (the destination's
    /// QEMU is gone), or `None` to keep trying.
    fn destination_gone(&mut self) -> Pin<Box<dyn Future<Output = Option<String>> + Send + '_>> {
        Box::pin(async { None })
    }

    /// Asked in post-copy until it says yes: whether the VM has run at the destination.
    /// Until then a stalled stream is left to TCP: QEMU's destination cannot survive a
    /// break while it loads the device state. `false`: never paused on a stall.
    fn destination_runs(&mut self) -> Pin<Box<dyn Future<Output = bool> + Send + '_>> {
        Box::pin(async { false })
    }
}

/// A hook that does nothing.
pub struct NoHook;

impl SwitchoverHook for NoHook {
    fn at_switchover(&mut self) -> Pin<Box<dyn Future<Output = Result<()>> + Send + '_>> {
        Box::pin(async { Ok(()) })
    }
}

/// Migrates the VM behind `source` into `destination`, which listens on `uri`
/// (e.g. `tcp:198.51.100.2:4444`). Both QMP sessions in one process; the agents run the
/// halves ([`prepare_incoming`], [`migrate_outgoing`], [`finish_incoming`]) at their sites.
pub async fn migrate(
    source: &Qmp,
    destination: &Qmp,
    uri: &str,
    options: &MigrationOptions,
    hook: &mut dyn SwitchoverHook,
    progress: Option<mpsc::Sender<Progress>>,
) -> Result<MigrationReport> {
    let outcome = async {
        prepare_incoming(destination, uri, options).await?;
        let mut report = migrate_outgoing(source, uri, options, hook, progress).await?;
        report.destination_status = finish_incoming(destination, options).await?;
        Ok(report)
    }
    .await;
    if outcome.is_err() {
        abandon_incoming(destination).await;
    }
    outcome
}

/// The destination's half, before the source starts: the capabilities both ends must agree
/// on, then `migrate-incoming` on `uri`. QEMU must have been started with `-incoming defer`.
pub async fn prepare_incoming(
    destination: &Qmp,
    uri: &str,
    options: &MigrationOptions,
) -> Result<()> {
    destination
        .run(&MigrateSetCapabilities {
            capabilities: shared_capabilities(options),
        })
        .await
        .context("destination: migrate-set-capabilities")?;
    if let Some(channels) = options.multifd_channels {
        destination
            .run(&MigrateSetParameters {
                multifd_channels: Some(channels),
                ..Default::default()
            })
            .await
            .context("destination: migrate-set-parameters")?;
    }
    destination
        .run(&MigrateIncoming {
            uri: uri.to_owned(),
        })
        .await
        .context("destination: migrate-incoming")?;
    Ok(())
}

/// The source's half: configure, `migrate`, follow progress, run the hook at
/// `pre-switchover`, until `completed`. On failure before post-copy the migration is
/// cancelled and the source runs again; the caller cleans up the destination.
/// `destination_status` in the report is left empty ([`finish_incoming`] tells it).
pub async fn migrate_outgoing(
    source: &Qmp,
    uri: &str,
    options: &MigrationOptions,
    hook: &mut dyn SwitchoverHook,
    progress: Option<mpsc::Sender<Progress>>,
) -> Result<MigrationReport> {
    outgoing(source, Start::New(uri), options, hook, progress).await
}

/// The source's half of a migration QEMU already runs (the agent that started it died):
/// follows it from wherever it is, as [`migrate_outgoing`] would have.
/// `uri` is where the destination listens (a broken post-copy resumes there).
pub async fn follow_outgoing(
    source: &Qmp,
    uri: &str,
    options: &MigrationOptions,
    hook: &mut dyn SwitchoverHook,
    progress: Option<mpsc::Sender<Progress>>,
) -> Result<MigrationReport> {
    outgoing(source, Start::Follow(uri), options, hook, progress).await
}

/// Start the migration, or follow the one that runs; either way to this URI.
#[derive(Clone, Copy)]
enum Start<'a> {
    New(&'a str),
    Follow(&'a str),
}

impl Start<'_> {
    fn uri(&self) -> &str {
        match self {
            Start::New(uri) | Start::Follow(uri) => uri,
        }
    }
}

async fn outgoing(
    source: &Qmp,
    uri: Start<'_>,
    options: &MigrationOptions,
    hook: &mut dyn SwitchoverHook,
    progress: Option<mpsc::Sender<Progress>>,
) -> Result<MigrationReport> {
    let mut observed = Observed::default();
    let result = run(source, uri, options, hook, progress, &mut observed).await;
    match result {
        Ok(report) => Ok(report),
        // Once in post-copy the destination has run and the source's memory is stale:
        // resuming the source would fork the VM. QEMU keeps both paused instead.
        Err(err) if observed.postcopy_started_ms.is_some() => Err(err.context(FailedInPostcopy)),
        Err(err) => {
            tracing::warn!("migration failed: {err:#}; rolling back to the source");
            if let Err(rollback) = roll_back_source(source).await {
                return Err(err.context(format!("and the rollback failed too: {rollback:#}")));
            }
            Err(err)
        }
    }
}

/// The context of a migration that failed after post-copy began: the VM's RAM is split
/// between the two sides, so callers must not treat it like a pre-copy failure.
#[derive(Debug, thiserror::Error)]
#[error(
    "the migration failed in post-copy; the source cannot resume \
     (QEMU keeps it paused for a post-copy recovery)"
)]
pub struct FailedInPostcopy;

/// The destination's half after `completed`: waits until the VM runs there, then announces
/// it (RARP/GARP). Returns the destination's run state.
pub async fn finish_incoming(destination: &Qmp, options: &MigrationOptions) -> Result<String> {
    // The destination resumes by itself (no -S); wait until it says so.
    let deadline = Instant::now() + Duration::from_secs(30);
    let destination_status = loop {
        let status = destination
            .run(&QueryStatus {})
            .await
            .context("destination: query-status")?;
        if status.running {
            break status.status;
        }
        if Instant::now() > deadline {
            bail!(
                "the destination is `{}`, not running, 30 s after the migration completed",
                status.status
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    if options.announce {
        destination
            .run(&AnnounceSelf::default())
            .await
            .context("destination: announce-self")?;
    }
    Ok(destination_status)
}

/// Tells a destination whose migration failed to quit (best effort: the caller's `Vm`
/// guard kills it anyway).
pub async fn abandon_incoming(destination: &Qmp) {
    if !destination.is_closed() {
        let _ = destination
            .run_with_timeout(&Quit {}, Duration::from_secs(2))
            .await;
    }
}

async fn run(
    source: &Qmp,
    start: Start<'_>,
    options: &MigrationOptions,
    hook: &mut dyn SwitchoverHook,
    progress: Option<mpsc::Sender<Progress>>,
    observed: &mut Observed,
) -> Result<MigrationReport> {
    let mut source_events = source.subscribe()?;
    let started = Instant::now();
    match start {
        Start::New(uri) => {
            configure_source(source, options).await?;
            source
                .run(&Migrate {
                    uri: uri.to_owned(),
                    resume: None,
                })
                .await
                .context("source: migrate")?;
        }
        Start::Follow(_) => {
            let info = source
                .run(&QueryMigrate {})
                .await
                .context("source: query-migrate")?;
            // Post-copy may have begun under the agent that died: treat it as such.
            if info
                .status
                .as_deref()
                .is_some_and(|status| status.starts_with("postcopy"))
            {
                observed.postcopy_started_ms = Some(0);
            }
            if matches!(info.status.as_deref(), None | Some("none")) {
                bail!("the source's QEMU runs no migration to follow");
            }
        }
    }

    let mut ticker = tokio::time::interval(options.progress_interval);
    loop {
        // Wake on every MIGRATION event (pre-switchover must be answered at once: the
        // source is stopped), and poll between them for progress.
        tokio::select! {
            event = source_events.next(options.progress_interval) => {
                match event {
                    Ok(event) if event.name == "STOP" => {
                        hook.stopped_at(event.timestamp.as_system_time());
                    }
                    Err(err)
                        if !matches!(
                            err.downcast_ref(),
                            Some(super::qmp::QmpError::Timeout { .. })
                        ) =>
                    {
                        return Err(err.context("source QEMU went away during the migration"));
                    }
                    _ => {}
                }
            }
            _ = ticker.tick() => {}
        }
        let info = source
            .run(&QueryMigrate {})
            .await
            .context("source: query-migrate")?;
        let status = info.status.clone().unwrap_or_default();
        if let Some(tx) = &progress {
            // A slow or gone display must not stall the migration.
            let _ = tx.try_send(progress_of(&info, started));
        }
        observed.max_cpu_throttle_percent = observed
            .max_cpu_throttle_percent
            .max(info.cpu_throttle_percentage.unwrap_or_default());
        if status == "active" && observed.postcopy_started_ms.is_none() {
            let passes = info.ram.as_ref().map_or(0, |r| r.dirty_sync_count);
            let switch = match options.postcopy {
                Postcopy::Off => false,
                // dirty-sync-count is 1 during the first pass and grows as each one ends.
                Postcopy::AfterFirstPass => passes >= 2,
                Postcopy::IfNotConvergedWithin(bound) => started.elapsed() >= bound,
            };
            if switch {
                source
                    .run(&MigrateStartPostcopy {})
                    .await
                    .context("source: migrate-start-postcopy")?;
                observed.postcopy_started_ms = Some(started.elapsed().as_millis() as u64);
                tracing::info!(passes, "switched to post-copy");
            }
        }
        if observed.postcopy_started_ms.is_some() {
            watch_postcopy(
                source,
                start.uri(),
                options,
                hook,
                &info,
                &mut observed.recovery,
            )
            .await?;
        }
        match status.as_str() {
            "completed" => {
                let info = final_numbers(source, info).await?;
                return Ok(source_report(info, observed));
            }
            // QEMU leaves `pre-switchover` asynchronously after `migrate-continue`: a
            // query right after it may still say so, and must not run the hook again.
            "pre-switchover" if !observed.continued => {
                observed.continued = true;
                // The STOP event may still be unread when the ticker woke the loop.
                while let Some(event) = source_events.try_next() {
                    if event.name == "STOP" {
                        hook.stopped_at(event.timestamp.as_system_time());
                    }
                }
                let hook_started = Instant::now();
                hook.at_switchover()
                    .await
                    .context("the switchover hook failed")?;
                observed.hook_ms = hook_started.elapsed().as_millis() as u64;
                source
                    .run(&MigrateContinue {
                        state: "pre-switchover".to_owned(),
                    })
                    .await
                    .context("source: migrate-continue")?;
            }
            "failed" | "cancelled" => {
                bail!(
                    "QEMU reports the migration {status}: {}",
                    info.error_desc.as_deref().unwrap_or("no reason given")
                );
            }
            _ => {}
        }
        // The time post-copy was broken does not count: its own timeout bounds it.
        let paused = Duration::from_millis(observed.recovery.paused_ms);
        if observed.recovery.broken_since.is_none() && started.elapsed() > options.timeout + paused
        {
            bail!(
                "the migration did not complete within {:?} (status {status})",
                options.timeout
            );
        }
    }
}

/// Post-copy's stream, at each look: a stall is paused on purpose; a break is resumed
/// every [`RESUME_RETRY`] until it is whole again, or the timeout (or a destination that
/// is gone) ends it with an error.
async fn watch_postcopy(
    source: &Qmp,
    uri: &str,
    options: &MigrationOptions,
    hook: &mut dyn SwitchoverHook,
    info: &MigrationInfo,
    recovery: &mut Recovery,
) -> Result<()> {
    let now = Instant::now();
    let status = info.status.as_deref().unwrap_or_default();
    let ram = info.ram.clone().unwrap_or_default();
    match status {
        "postcopy-active" => {
            if !recovery.destination_ran
                && recovery
                    .asked_destination
                    .is_none_or(|at| now - at >= DESTINATION_ASKED)
            {
                recovery.asked_destination = Some(now);
                recovery.destination_ran = hook.destination_runs().await;
            }
            if let Some(since) = recovery.broken_since.take() {
                let paused = since.elapsed();
                recovery.paused_ms += paused.as_millis() as u64;
                recovery.recoveries += 1;
                recovery.moved_at = Some(now);
                tracing::info!(?paused, "post-copy resumed");
            }
            if ram.transferred != recovery.transferred || recovery.moved_at.is_none() {
                recovery.transferred = ram.transferred;
                recovery.moved_at = Some(now);
            } else if ram.remaining > 0
                && recovery.destination_ran
                && options.postcopy_recover_timeout > Duration::ZERO
                && recovery
                    .moved_at
                    .is_some_and(|at| now - at >= POSTCOPY_STALL)
            {
                tracing::warn!(
                    "post-copy moved nothing for {POSTCOPY_STALL:?}: pausing it, to resume \
                     on a new connection"
                );
                recovery.broken_since = Some(now);
                recovery.last_try = Some(now);
                pause(source).await;
            }
        }
        "postcopy-paused" | "postcopy-recover-setup" | "postcopy-recover" => {
            let why = info.error_desc.as_deref().unwrap_or("no reason given");
            let since = *recovery.broken_since.get_or_insert_with(|| {
                tracing::warn!("post-copy's stream broke ({status}: {why}); resuming it");
                now
            });
            if options.postcopy_recover_timeout.is_zero() {
                bail!("the stream to the destination broke (QEMU: {status}, {why})");
            }
            if now - since > options.postcopy_recover_timeout {
                bail!(
                    "the stream to the destination broke (QEMU: {status}, {why}) and did \
                     not resume within {:?}",
                    options.postcopy_recover_timeout
                );
            }
            if recovery
                .asked_destination
                .is_none_or(|at| now - at >= DESTINATION_ASKED)
            {
                recovery.asked_destination = Some(now);
                if let Some(gone) = hook.destination_gone().await {
                    bail!(
                        "the stream to the destination broke (QEMU: {status}, {why}), and \
                         it cannot resume: {gone}"
                    );
                }
            }
            let waited = recovery.last_try.map_or(Duration::MAX, |at| now - at);
            if status == "postcopy-paused" && waited >= RESUME_RETRY {
                recovery.last_try = Some(now);
                let resume = Migrate {
                    uri: uri.to_owned(),
                    resume: Some(true),
                };
                if let Err(err) = source.run(&resume).await {
                    tracing::debug!("migrate resume: {err:#}");
                }
            } else if (status == "postcopy-recover-setup" && waited >= RESUME_STUCK)
                || (status == "postcopy-recover" && waited >= RECOVER_STUCK)
            {
                recovery.last_try = Some(now);
                tracing::info!("the resume is stuck in {status}: pausing it to try afresh");
                pause(source).await;
            }
        }
        _ => {}
    }
    Ok(())
}

/// `migrate-pause`, best effort and out-of-band: QEMU refuses it in a state that is
/// already paused.
async fn pause(qmp: &Qmp) {
    if let Err(err) = qmp.run_oob(&MigratePause {}, OOB_TIMEOUT).await {
        tracing::debug!("migrate-pause: {err:#}");
    }
}

/// How long an out-of-band command, or the destination's `query-migrate` in post-copy,
/// may take: the first is answered by the monitor's own thread, and the second not at
/// all while the main thread waits on a page.
const OOB_TIMEOUT: Duration = Duration::from_secs(1);

/// The destination's side of a post-copy recovery, looked at every few hundred ms.
#[derive(Default)]
pub struct IncomingRecovery {
    /// The last `migrate-recover` QEMU took: it listens from then on, so it is not
    /// repeated unless the stream is still paused [`RESUME_STUCK`] later.
    listened_at: Option<Instant>,
}

impl IncomingRecovery {
    /// The destination's migration status; `None` if QEMU does not answer soon (its main
    /// thread waits on a page the broken stream does not bring).
    pub async fn status(destination: &Qmp) -> Result<Option<String>> {
        match destination
            .run_with_timeout(&QueryMigrate {}, OOB_TIMEOUT)
            .await
        {
            Ok(info) => Ok(Some(info.status.unwrap_or_default())),
            Err(err)
                if matches!(
                    err.downcast_ref(),
                    Some(super::qmp::QmpError::Timeout { .. })
                ) =>
            {
                Ok(None)
            }
            Err(err) => Err(err.context("destination: query-migrate")),
        }
    }

    /// Given the destination's `status` (`None`: unknown), and whether the source says
    /// its stream is paused: a paused stream listens again on `uri` (`migrate-recover`);
    /// one the source reports paused while this side still waits on it (the break has
    /// not reached here, as over a cut link) is paused here too, so that it can listen.
    /// Both out-of-band: they work while the main thread waits.
    pub async fn tend(
        &mut self,
        destination: &Qmp,
        uri: &str,
        status: Option<&str>,
        source_paused: bool,
    ) -> Result<()> {
        let may_listen = self
            .listened_at
            .is_none_or(|at| at.elapsed() >= RESUME_STUCK);
        let listen = match status {
            Some("postcopy-paused") => may_listen,
            Some("postcopy-active") if source_paused => {
                tracing::info!("the source's post-copy stream broke: pausing this side too");
                pause(destination).await;
                false
            }
            // Unknown: pause (refused if paused already), then listen (refused if not
            // paused yet: the next look tries again).
            None if source_paused => {
                pause(destination).await;
                may_listen
            }
            _ => false,
        };
        if listen {
            let recover = MigrateRecover {
                uri: uri.to_owned(),
            };
            match destination.run_oob(&recover, OOB_TIMEOUT).await {
                Ok(_) => {
                    self.listened_at = Some(Instant::now());
                    tracing::info!(uri, "post-copy broke: listening for the source's resume");
                }
                Err(err) if status.is_none() => tracing::debug!("migrate-recover: {err:#}"),
                Err(err) => return Err(err.context("destination: migrate-recover")),
            }
        }
        Ok(())
    }
}

/// QEMU reports `completed` a moment before it has computed the total time and downtime
/// (they read 0 meanwhile); query again briefly until they are there.
async fn final_numbers(source: &Qmp, mut info: MigrationInfo) -> Result<MigrationInfo> {
    let deadline = Instant::now() + Duration::from_secs(2);
    while info.total_time.unwrap_or_default() == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
        info = source
            .run(&QueryMigrate {})
            .await
            .context("source: query-migrate")?;
    }
    if info.total_time.unwrap_or_default() == 0 {
        tracing::warn!("QEMU reported no total time for the completed migration");
    }
    Ok(info)
}

/// The capabilities both ends must agree on.
fn shared_capabilities(options: &MigrationOptions) -> Vec<MigrationCapabilityStatus> {
    vec![
        capability("events", true),
        capability("postcopy-ram", options.postcopy != Postcopy::Off),
        // Post-copy's page requests on a channel of their own, ahead of the background
        // copy: the VM at the destination waits one round trip per missing page, not the
        // send queue's length too. QEMU 10 re-makes the channel on a resume.
        capability("postcopy-preempt", options.postcopy != Postcopy::Off),
        capability("multifd", options.multifd_channels.is_some()),
    ]
}

fn capability(name: &str, state: bool) -> MigrationCapabilityStatus {
    MigrationCapabilityStatus {
        capability: name.to_owned(),
        state,
    }
}

async fn configure_source(source: &Qmp, options: &MigrationOptions) -> Result<()> {
    let mut capabilities = shared_capabilities(options);
    capabilities.push(capability(
        "pause-before-switchover",
        options.pause_before_switchover,
    ));
    capabilities.push(capability("auto-converge", options.auto_converge));
    source
        .run(&MigrateSetCapabilities { capabilities })
        .await
        .context("source: migrate-set-capabilities")?;
    let downtime_ms = options.downtime_limit.as_millis() as u64;
    source
        .run(&MigrateSetParameters {
            max_bandwidth: Some(options.max_bandwidth),
            max_postcopy_bandwidth: Some(options.max_postcopy_bandwidth),
            downtime_limit: Some(downtime_ms),
            multifd_channels: options.multifd_channels,
            // Zero pages found by the channels' threads, in parallel, not by the main
            // migration thread (QEMU 10's default with multifd; set so that it holds).
            zero_page_detection: options.multifd_channels.map(|_| "multifd"),
            cpu_throttle_initial: options
                .auto_converge
                .then_some(options.throttle_initial_percent),
            cpu_throttle_increment: options
                .auto_converge
                .then_some(options.throttle_increment_percent),
            ..Default::default()
        })
        .await
        .context("source: migrate-set-parameters")?;
    let applied = source
        .run(&QueryMigrateParameters {})
        .await
        .context("source: query-migrate-parameters")?;
    if applied.max_bandwidth != Some(options.max_bandwidth)
        || applied.max_postcopy_bandwidth != Some(options.max_postcopy_bandwidth)
        || applied.downtime_limit != Some(downtime_ms)
    {
        bail!(
            "QEMU did not apply the migration parameters: max-bandwidth {:?} (asked {}), \
             max-postcopy-bandwidth {:?} (asked {}), downtime-limit {:?} ms (asked {downtime_ms})",
            applied.max_bandwidth,
            options.max_bandwidth,
            applied.max_postcopy_bandwidth,
            options.max_postcopy_bandwidth,
            applied.downtime_limit
        );
    }
    Ok(())
}

fn progress_of(info: &MigrationInfo, started: Instant) -> Progress {
    let ram = info.ram.clone().unwrap_or_default();
    Progress {
        status: info.status.clone().unwrap_or_default(),
        elapsed_ms: started.elapsed().as_millis() as u64,
        transferred: ram.transferred,
        remaining: ram.remaining,
        total: ram.total,
        mbps: ram.mbps,
        passes: ram.dirty_sync_count,
        cpu_throttle_percent: info.cpu_throttle_percentage.unwrap_or_default(),
        dirty_pages_rate: ram.dirty_pages_rate,
        page_size: ram.page_size,
        expected_downtime_ms: info.expected_downtime,
    }
}

fn source_report(info: MigrationInfo, observed: &Observed) -> MigrationReport {
    let ram = info.ram.clone().unwrap_or_default();
    let report = MigrationReport {
        status: info.status.unwrap_or_default(),
        total_time_ms: info.total_time.unwrap_or_default(),
        downtime_ms: info.downtime.unwrap_or_default(),
        setup_time_ms: info.setup_time.unwrap_or_default(),
        transferred: ram.transferred,
        passes: ram.dirty_sync_count,
        hook_ms: observed.hook_ms,
        postcopy_started_ms: observed.postcopy_started_ms,
        postcopy_bytes: ram.postcopy_bytes,
        multifd_bytes: ram.multifd_bytes,
        max_cpu_throttle_percent: observed.max_cpu_throttle_percent,
        destination_status: String::new(),
        postcopy_paused_ms: observed.recovery.paused_ms,
        postcopy_recoveries: observed.recovery.recoveries,
    };
    tracing::info!(?report, "migration completed at the source");
    report
}

/// Leaves the VM running at the source.
pub async fn roll_back_source(source: &Qmp) -> Result<()> {
    if !source.is_closed() {
        let info = source.run(&QueryMigrate {}).await.unwrap_or_default();
        let active = !matches!(
            info.status.as_deref(),
            None | Some("completed" | "failed" | "cancelled")
        );
        if active {
            source
                .run(&MigrateCancel {})
                .await
                .context("source: migrate_cancel")?;
            // Cancelling is asynchronous; wait until QEMU has left the migration.
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let status = source.run(&QueryMigrate {}).await?.status;
                if matches!(
                    status.as_deref(),
                    Some("cancelled" | "failed" | "completed")
                ) {
                    break;
                }
                if Instant::now() > deadline {
                    bail!("the source did not leave the migration 10 s after migrate_cancel");
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        let status = source.run(&QueryStatus {}).await?;
        if !status.running {
            tracing::info!(status = %status.status, "restarting the stopped source VM");
            source.run(&Cont {}).await.context("source: cont")?;
        }
    }
    Ok(())
}
