//! The migrations this agent owns: each a state machine ([`record`]) persisted in the
//! state directory ([`journal`]) and driven by a task of its own, at the source
//! ([`source`]) or the destination ([`destination`]). A restarted agent reloads the
//! records and carries each migration on from the stage it had reached, without waiting
//! for the orchestrator; the orchestrator only creates a migration and follows it.
//!
//! The rule that never loses the VM (docs/failures.md): before `migrate-continue` nothing
//! discards the source's VM; after it, nothing stops the destination's QEMU unless the
//! source's VM verifiably runs again (its agent says `rolled-back`, having asked QEMU).

mod destination;
mod drain;
mod journal;
pub mod leftovers;
pub mod record;
mod source;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use anyhow::{Context as _, Result};
use tokio::sync::Notify;

use self::{
    journal::Journal,
    record::{DnsDone, IncomingHalf, MigrationId, MigrationRecord, MigrationSpec, Role, Stage},
};
use super::{AgentClient, AgentError, server::Agent};

/// How long a driver waits before it tries a failed step again, after switchover (when
/// there is nothing to roll back, only to finish).
const RETRY_PAUSE: Duration = Duration::from_secs(2);

/// One migration: its record (saved on every stage change) and a wake-up for its driver.
pub struct Handle {
    record: Mutex<MigrationRecord>,
    journal: Arc<Journal>,
    wake: Notify,
    /// The saved record's stage, for callers that wait for it to change.
    stage_saved: tokio::sync::watch::Sender<Stage>,
}

impl Handle {
    pub fn snapshot(&self) -> MigrationRecord {
        self.record
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub fn stage(&self) -> Stage {
        self.record
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .stage
    }

    /// Changes the record and saves it before returning: what follows may act on it.
    pub fn update<T>(&self, change: impl FnOnce(&mut MigrationRecord) -> T) -> Result<T> {
        let mut record = self.record.lock().unwrap_or_else(PoisonError::into_inner);
        let out = change(&mut record);
        self.journal.save(&record)?;
        let stage = record.stage;
        self.stage_saved.send_if_modified(|saved| {
            let changed = *saved != stage;
            *saved = stage;
            changed
        });
        Ok(out)
    }

    /// Waits until the saved stage is not `from` (at once if it is not), or `limit`.
    /// The orchestrator long-polls on it so that it learns of the switchover at once.
    pub async fn wait_stage_change(&self, from: Stage, limit: Duration) {
        let mut saved = self.stage_saved.subscribe();
        let _ = tokio::time::timeout(limit, saved.wait_for(|stage| *stage != from)).await;
    }

    /// Enters `stage`, durably.
    pub fn enter(&self, stage: Stage) -> Result<()> {
        tracing::info!(migration = %self.snapshot().id(), %stage, "stage");
        self.update(|r| r.enter(stage))
    }

    /// Notes what the current stage found (saved).
    pub fn note(&self, detail: impl Into<String>) -> Result<()> {
        self.update(|r| r.note(detail))
    }

    /// In memory only: the RAM copy's progress.
    pub fn set_progress(&self, progress: crate::qemu::migrate::Progress) {
        let mut record = self.record.lock().unwrap_or_else(PoisonError::into_inner);
        // QEMU has no RAM figures once cancelled or failed: keep how far the copy got.
        if progress.total == 0 && record.progress.as_ref().is_some_and(|p| p.total > 0) {
            return;
        }
        record.progress = Some(progress);
    }

    /// The other site's agent.
    pub fn peer(&self) -> Result<AgentClient> {
        let record = self.snapshot();
        let peer = match record.role {
            Role::Source => &record.spec.destination_agent,
            Role::Destination => &record.spec.source_agent,
        };
        AgentClient::from_peer(peer)
    }

    /// Waits for a wake-up (an API call about this migration) or `limit`.
    pub async fn nap(&self, limit: Duration) {
        let _ = tokio::time::timeout(limit, self.wake.notified()).await;
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error("no migration {0} at this site")]
    NotFound(MigrationId),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    BadRequest(String),
}

pub struct Migrations {
    journal: Arc<Journal>,
    live: tokio::sync::Mutex<HashMap<MigrationId, Arc<Handle>>>,
}

impl Migrations {
    pub fn new(state_dir: &std::path::Path) -> Result<Self> {
        Ok(Self {
            journal: Arc::new(Journal::new(state_dir)?),
            live: tokio::sync::Mutex::default(),
        })
    }

    /// Reloads the records an earlier agent left and drives the unfinished ones on.
    pub async fn resume_all(agent: &Arc<Agent>) -> usize {
        let mut resumed = 0;
        for record in agent.migrations.journal.load_all() {
            let final_ = record.stage.is_final();
            let (id, stage) = (record.id().clone(), record.stage);
            let handle = agent.migrations.insert(record).await;
            if !final_ {
                tracing::info!(migration = %id, %stage, "resuming a migration");
                spawn_driver(agent.clone(), handle);
                resumed += 1;
            }
        }
        resumed
    }

    async fn insert(&self, record: MigrationRecord) -> Arc<Handle> {
        let id = record.id().clone();
        let handle = Arc::new(Handle {
            stage_saved: tokio::sync::watch::Sender::new(record.stage),
            record: Mutex::new(record),
            journal: self.journal.clone(),
            wake: Notify::new(),
        });
        self.live.lock().await.insert(id, handle.clone());
        handle
    }

    pub async fn get(&self, id: &MigrationId) -> Result<Arc<Handle>> {
        self.live
            .lock()
            .await
            .get(id)
            .cloned()
            .ok_or_else(|| MigrationError::NotFound(id.clone()).into())
    }

    pub async fn all(&self) -> Vec<MigrationRecord> {
        let mut out: Vec<MigrationRecord> = self
            .live
            .lock()
            .await
            .values()
            .map(|h| h.snapshot())
            .collect();
        out.sort_by_key(|r| r.history.first().map_or(0, |c| c.at_unix_ms));
        out
    }

    /// The live (unfinished) migration of `vm`, if any.
    pub async fn live_for(&self, vm: &str) -> Option<MigrationRecord> {
        self.all()
            .await
            .into_iter()
            .find(|r| r.spec.vm == vm && !r.stage.is_final())
    }

    /// A new migration in `role`; the same id again returns the one there is.
    async fn create(
        agent: &Arc<Agent>,
        spec: MigrationSpec,
        role: Role,
        token: Option<movarto_common::ids::SessionToken>,
    ) -> Result<MigrationRecord> {
        let migrations = &agent.migrations;
        if let Ok(existing) = migrations.get(&spec.id).await {
            let existing = existing.snapshot();
            if existing.role != role || existing.spec.vm != spec.vm {
                return Err(MigrationError::Conflict(format!(
                    "migration {} exists here already, for another VM or role",
                    spec.id
                ))
                .into());
            }
            return Ok(existing);
        }
        let mut token = token;
        if let Some(other) = migrations.live_for(&spec.vm).await {
            match home_coming(&spec, role, &other) {
                // The VM moves back before its last move drained: that move's tunnel
                // carries on under this one, so its token does too.
                Some(true) => {
                    if role == Role::Source {
                        token = other.token;
                    }
                }
                draining => {
                    let hint = match draining {
                        Some(false) => {
                            "; its drain has not ended, and before then it can only move \
                             back to the site it came from (`--new-addr` set to its home \
                             address); wait for the drain, or bound it with `--max-drain`"
                        }
                        _ => "",
                    };
                    return Err(MigrationError::Conflict(format!(
                        "VM {} is in migration {} already ({}){hint}",
                        spec.vm,
                        other.id(),
                        other.stage
                    ))
                    .into());
                }
            }
        }
        let mut record = MigrationRecord::new(spec, role);
        record.token = token;
        migrations.journal.save(&record)?;
        let handle = migrations.insert(record).await;
        spawn_driver(agent.clone(), handle.clone());
        Ok(handle.snapshot())
    }

    /// The draining migration of `vm` that a move home at this agent supersedes (see
    /// [`home_coming`]), other than `id` itself.
    pub async fn superseded_by(&self, id: &MigrationId, vm: &str) -> Option<Arc<Handle>> {
        self.live
            .lock()
            .await
            .values()
            .find(|h| {
                let r = h.snapshot();
                r.id() != id && r.spec.vm == vm && !r.stage.is_final()
            })
            .cloned()
    }

    /// `POST /v1/migrations`: this agent is the source.
    pub async fn create_outgoing(
        agent: &Arc<Agent>,
        spec: MigrationSpec,
    ) -> Result<MigrationRecord> {
        // Refused at once, with nothing recorded: a VM that isn't here and running.
        if agent.migrations.get(&spec.id).await.is_err() {
            let vm = agent.vms.status(&spec.vm).await?;
            if vm.run_state != super::api::RunState::Running {
                return Err(MigrationError::Conflict(format!(
                    "the VM {} is {} here, not running",
                    spec.vm, vm.run_state
                ))
                .into());
            }
        }
        Self::create(agent, spec, Role::Source, None).await
    }

    /// `POST /v1/migrations/{id}/incoming`: the source's agent makes this the destination.
    pub async fn create_incoming(
        agent: &Arc<Agent>,
        half: IncomingHalf,
    ) -> Result<MigrationRecord> {
        if half.token.is_zero() {
            return Err(
                MigrationError::Conflict("the session token must not be zero".into()).into(),
            );
        }
        Self::create(agent, half.spec, Role::Destination, Some(half.token)).await
    }

    /// `POST /v1/migrations/{id}/abort`. At the source: a rollback, refused once
    /// `migrate-continue` may have been sent. At the destination: it asks the source
    /// whether the VM runs there again, and cleans up only if it does.
    pub async fn abort(&self, id: &MigrationId) -> Result<MigrationRecord> {
        let handle = self.get(id).await?;
        // Checked and set under the record's lock: the switchover hook enters `continued`
        // only if no abort was asked for, so exactly one of the two wins.
        let past = handle.update(|r| {
            if r.role != Role::Source || r.stage.is_final() {
                None
            } else if r.stage.past_switchover() {
                Some(r.stage)
            } else {
                r.abort_requested = true;
                None
            }
        })?;
        if let Some(stage) = past {
            return Err(MigrationError::Conflict(format!(
                "migration {id} is past the switchover ({stage}): the VM may run at the \
                 destination, so it can't be rolled back"
            ))
            .into());
        }
        handle.wake.notify_waiters();
        Ok(handle.snapshot())
    }

    /// `PUT /v1/migrations/{id}/bandwidth`, at the source: the migration's cap from now
    /// on (QEMU takes it at once), and for a RAM copy that has not started yet. Refused
    /// once the migration is over.
    pub async fn set_bandwidth(
        agent: &Arc<Agent>,
        id: &MigrationId,
        bytes_per_second: u64,
    ) -> Result<MigrationRecord> {
        if bytes_per_second == 0 {
            return Err(MigrationError::BadRequest(
                "a bandwidth of 0 would stop the migration; give bytes per second".to_owned(),
            )
            .into());
        }
        let handle = agent.migrations.get(id).await?;
        let vm = handle.update(|r| {
            if r.role != Role::Source || r.stage.is_final() {
                return Err(r.stage);
            }
            r.spec.settings.max_bandwidth = bytes_per_second;
            r.spec.settings.max_postcopy_bandwidth = bytes_per_second;
            r.figures.bandwidth.push(record::BandwidthChange {
                at_unix_ms: record::unix_ms(),
                bytes_per_second,
            });
            Ok(r.spec.vm.clone())
        })?;
        let vm = vm.map_err(|stage| {
            MigrationError::Conflict(format!(
                "migration {id} is {stage} here: only a running outgoing migration takes a bandwidth"
            ))
        })?;
        // No QEMU of the VM here any more (released after the switchover): nothing to cap.
        if let Err(err) = agent.vms.set_bandwidth(&vm, bytes_per_second).await {
            tracing::debug!(%vm, "bandwidth: {err:#}");
        }
        Ok(handle.snapshot())
    }

    /// `POST /v1/migrations/{id}/tunnel-over`, from the source at teardown.
    pub async fn tunnel_over(agent: &Arc<Agent>, id: &MigrationId) -> Result<MigrationRecord> {
        let handle = agent.migrations.get(id).await?;
        if handle.snapshot().role != Role::Destination {
            return Err(MigrationError::Conflict(format!("{id} is not incoming here")).into());
        }
        destination::end_tunnel(agent, &handle).await?;
        Ok(handle.snapshot())
    }

    /// `POST /v1/migrations/{id}/dns`: the orchestrator did DNS work the move owed.
    pub async fn dns_done(&self, id: &MigrationId, done: DnsDone) -> Result<MigrationRecord> {
        let handle = self.get(id).await?;
        handle.update(|r| {
            if done.switched {
                r.dns_owed.switch = false;
                r.figures.dns_switch_ms = done.switch_ms.or(r.figures.dns_switch_ms);
                // Switched while the source rolled back: to be undone.
                if matches!(r.stage, Stage::RollingBack | Stage::RolledBack) {
                    r.dns_owed.switch_back = true;
                }
            }
            if done.ttl_restored {
                r.dns_owed.restore_ttl = false;
            }
            if done.switched_back {
                r.dns_owed.switch_back = false;
            }
        })?;
        handle.wake.notify_waiters();
        Ok(handle.snapshot())
    }
}

/// Whether `spec` (this agent in `role`) moves its VM home while `other`, the VM's last
/// move, drains here: `None` if `other` is not draining, `Some(true)` for the move back
/// to the site `other` came from (at its destination, now the source; at its source,
/// now the destination), `Some(false)` for any other move.
fn home_coming(spec: &MigrationSpec, role: Role, other: &MigrationRecord) -> Option<bool> {
    let back = match (role, other.role, other.stage) {
        (Role::Source, Role::Destination, Stage::Running) => {
            other.spec.source_tunnel == spec.destination_tunnel
        }
        (Role::Destination, Role::Source, Stage::Draining) => {
            other.spec.destination_tunnel == spec.source_tunnel
        }
        _ => return None,
    };
    Some(back && spec.moves_home() && other.spec.home == spec.home && !other.spec.moves_home())
}

fn spawn_driver(agent: Arc<Agent>, handle: Arc<Handle>) {
    tokio::spawn(async move {
        let role = handle.snapshot().role;
        match role {
            Role::Source => source::drive(agent, handle).await,
            Role::Destination => destination::drive(agent, handle).await,
        }
    });
}

/// Whether an agent error is "not found" (the other side has no such migration or VM).
fn is_not_found(err: &AgentError) -> bool {
    err.is_not_found()
}

/// Runs a blocking datapath call (the verifier, map walks) off the async threads.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .context("the datapath task panicked")?
}

#[cfg(test)]
pub(crate) mod tests {
    /// A record as an agent saves it, for the journal's test.
    pub(crate) const RECORD: &str = r#"{
        "spec": {
            "id": "web-1-ab", "vm": "web",
            "source_agent": {"url": "http://203.0.113.1:7878", "token": "a"},
            "destination_agent": {"url": "http://203.0.113.129:7878", "token": "b"},
            "destination_spec_toml": "", "vm_mac": "52:54:00:00:00:10",
            "home": "192.0.2.10", "new_addr": "198.18.0.10",
            "source_tunnel": "203.0.113.1", "destination_tunnel": "203.0.113.129",
            "migration_uri": "tcp:203.0.113.129:4444", "vm_iface": "tap0",
            "tap": {"gateway_mac": "02:00:00:00:00:01", "gateway_cidr": "192.0.2.1/24"},
            "tunnel_mtu": 1500,
            "settings": {"max_bandwidth": 1, "downtime_limit_ms": 300, "multifd_channels": null,
                "auto_converge": false, "postcopy": "off", "timeout_s": 300},
            "drain": {"grace_ms": 1000, "max_drain_ms": 60000},
            "agent_timeout_ms": 30000
        },
        "role": "source", "stage": "copying-ram", "token": "00000000000000aa",
        "dns_owed": {"switch": false, "restore_ttl": false},
        "figures": {"qemu": null, "flows_at_switchover": 0, "flows_cut": [],
            "packets_to_b": 0, "packets_from_b": 0, "premove_bytes": 0,
            "switchover_unix_ms": null, "drain_ms": null, "teardown_unix_ms": null,
            "dns_switch_ms": null},
        "error": null,
        "history": [{"stage": "accepted", "at_unix_ms": 1}]
    }"#;

    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn a_wait_for_the_stage_to_change_ends_when_it_is_saved() {
        let dir = std::env::temp_dir().join(format!("movarto-stage-wait-{}", std::process::id()));
        let migrations = Migrations::new(&dir).expect("the journal");
        let record: MigrationRecord = serde_json::from_str(RECORD).expect("the record");
        let handle = migrations.insert(record).await;

        // Left already: at once.
        let waited = tokio::time::Instant::now();
        handle
            .wait_stage_change(Stage::Accepted, Duration::from_secs(30))
            .await;
        assert!(waited.elapsed() < Duration::from_secs(5));

        // Still there: until the change is saved, not until the limit.
        let waiter = {
            let handle = handle.clone();
            tokio::spawn(async move {
                handle
                    .wait_stage_change(Stage::CopyingRam, Duration::from_secs(30))
                    .await;
                handle.stage()
            })
        };
        tokio::task::yield_now().await;
        handle.enter(Stage::Continued).expect("saved");
        let seen = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("woken by the change")
            .expect("the waiter");
        assert_eq!(seen, Stage::Continued);

        // Nothing changes: the limit ends the wait.
        handle
            .wait_stage_change(Stage::Continued, Duration::from_millis(20))
            .await;
        let _ = std::fs::remove_dir_all(&dir);
    }
}
