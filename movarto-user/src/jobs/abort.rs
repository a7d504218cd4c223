//! `movarto-user abort`: rolls a migration back before its switchover, exactly as a
//! failure would (the source's agent cancels QEMU's migration, the VM keeps running at
//! the source, the source's datapath tracks again as before, the destination's half is
//! cleaned up), and waits until that is finished. After the switchover the VM runs at
//! the destination: there is nothing to roll back to, and the drain ends by itself.

use std::time::Duration;

use tokio::time::Instant;

use crate::agent::{
    AgentClient, AgentError,
    api::{MigrationId, MigrationRecord, Role, Stage},
};

/// How often the rollback is looked at.
const POLL: Duration = Duration::from_millis(200);

#[derive(Debug, thiserror::Error)]
pub enum AbortError {
    #[error("the agent at {agent} has no migration of a VM or with an id {target:?}{known}")]
    Unknown {
        target: String,
        agent: String,
        /// `; it knows: …`, or nothing.
        known: String,
    },
    #[error("{id} is the destination's half at {agent}: abort at the source's agent (--source)")]
    NotSource { id: MigrationId, agent: String },
    #[error(
        "migration {id} of {vm} is past the switchover ({stage}): the VM already runs at the \
         destination, so there is nothing to roll back to; the drain finishes by itself and \
         tears the tunnel down (`movarto-user jobs` follows it)"
    )]
    PastSwitchover {
        id: MigrationId,
        vm: String,
        stage: Stage,
    },
    #[error("migration {id} of {vm} is {stage} already: nothing to abort")]
    Finished {
        id: MigrationId,
        vm: String,
        stage: Stage,
    },
    #[error("the rollback of {id} ended {stage}: {error}")]
    RollbackFailed {
        id: MigrationId,
        stage: Stage,
        error: String,
    },
    #[error(
        "the rollback of {id} did not finish within {limit:?} (it is {stage}); \
         `movarto-user jobs --all` follows it"
    )]
    Timeout {
        id: MigrationId,
        stage: Stage,
        limit: Duration,
    },
    #[error(transparent)]
    Agent(#[from] AgentError),
}

/// A finished rollback.
#[derive(Debug)]
pub struct Aborted {
    /// The record once the rollback finished.
    pub record: MigrationRecord,
    /// The stage the migration was in when the abort arrived.
    pub from: Stage,
}

impl Aborted {
    /// What the rollback undid.
    pub fn undone(&self) -> &str {
        self.record.figures.rolled_back.as_deref().unwrap_or("")
    }
}

/// The source's record `target` names: a migration id, or a VM (its unfinished
/// migration, else its latest one).
pub async fn find(source: &AgentClient, target: &str) -> Result<MigrationRecord, AbortError> {
    let records = source.migrations().await?;
    if let Some(record) = records.iter().find(|r| r.id().as_str() == target) {
        return Ok(record.clone());
    }
    let of_vm = records.iter().filter(|r| r.spec.vm == target);
    // Oldest first: the last unfinished one, else the last one.
    let chosen = of_vm
        .clone()
        .rev()
        .find(|r| !r.stage.is_final())
        .or_else(|| of_vm.clone().next_back());
    chosen.cloned().ok_or_else(|| {
        let mut vms: Vec<&str> = records.iter().map(|r| r.spec.vm.as_str()).collect();
        vms.sort_unstable();
        vms.dedup();
        AbortError::Unknown {
            target: target.to_owned(),
            agent: source.base().to_owned(),
            known: if vms.is_empty() {
                " (it has no migrations)".to_owned()
            } else {
                format!("; it knows the VMs {}", vms.join(", "))
            },
        }
    })
}

/// Aborts `target`'s migration at its source's agent and waits up to `limit` until the
/// rollback is over (the destination's half cleaned up too).
pub async fn abort(
    source: &AgentClient,
    target: &str,
    limit: Duration,
) -> Result<Aborted, AbortError> {
    let record = find(source, target).await?;
    let id = record.id().clone();
    refuse(&record, source)?;
    let rolling = matches!(record.stage, Stage::RollingBack | Stage::RolledBack);
    if !rolling && let Err(err) = source.abort_migration(&id).await {
        // Refused: the switchover came first; the record says so.
        let now = source.migration_record(&id).await?;
        refuse(&now, source)?;
        if !err.is_conflict() {
            return Err(err.into());
        }
    }
    let deadline = Instant::now() + limit;
    loop {
        let now = source.migration_record(&id).await?;
        match now.stage {
            Stage::RolledBack if now.figures.rollback_finished => {
                return Ok(Aborted {
                    record: now,
                    from: record.stage,
                });
            }
            Stage::RollingBack | Stage::RolledBack => {}
            stage if stage.past_switchover() => {
                return Err(AbortError::PastSwitchover {
                    id,
                    vm: now.spec.vm,
                    stage,
                });
            }
            stage if stage.is_final() => {
                return Err(AbortError::RollbackFailed {
                    id,
                    stage,
                    error: now.error.unwrap_or_default(),
                });
            }
            // The driver has not seen the abort yet.
            _ => {}
        }
        if Instant::now() > deadline {
            return Err(AbortError::Timeout {
                id,
                stage: now.stage,
                limit,
            });
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Why `record` can't be aborted, if it can't.
fn refuse(record: &MigrationRecord, source: &AgentClient) -> Result<(), AbortError> {
    let (id, vm, stage) = (record.id().clone(), record.spec.vm.clone(), record.stage);
    if record.role == Role::Destination {
        return Err(AbortError::NotSource {
            id,
            agent: source.base().to_owned(),
        });
    }
    if stage.past_switchover() {
        return Err(AbortError::PastSwitchover { id, vm, stage });
    }
    let rollback_running = stage == Stage::RolledBack && !record.figures.rollback_finished;
    if stage.is_final() && !rollback_running {
        return Err(AbortError::Finished { id, vm, stage });
    }
    Ok(())
}
