//! Undoing a migration that failed before switchover: the VM keeps running at A, DNS is
//! unchanged (the TTL restored), B is cleaned up and A goes back to `track`.

use std::time::Duration;

use anyhow::{Result, anyhow, bail};
use movarto_common::config::Mode;
use tokio::time::Instant;

use super::{plan::Plan, steps::MIGRATION_POLL};
use crate::agent::{
    AgentError,
    api::{MigrationPhase, RunState},
};

/// What has been changed so far: what a rollback must undo.
#[derive(Default)]
pub(super) struct Changed {
    pub(super) ttl_lowered_from: Option<u32>,
    pub(super) source_attached_by_us: bool,
    pub(super) source_reconfigured: bool,
    pub(super) destination_touched: bool,
    pub(super) migration_started: bool,
}

/// Undoes what was changed, best effort, and says what it did.
pub(super) async fn roll_back(p: &Plan, changed: &Changed) -> String {
    let mut done = Vec::new();
    let mut failed = Vec::new();
    let mut note = |what: &str, result: Result<(), anyhow::Error>| match result {
        Ok(()) => done.push(what.to_owned()),
        Err(err) => failed.push(format!("{what}: {err:#}")),
    };
    if changed.migration_started {
        note(
            "migration cancelled, VM running at the source",
            cancel_migration(p).await,
        );
    }
    if changed.source_attached_by_us {
        note(
            "source datapath detached",
            p.source.detach_datapath().await.map_err(Into::into),
        );
    } else if changed.source_reconfigured {
        note(
            "source datapath back to track",
            p.source
                .set_mode(Mode::Track)
                .await
                .map(drop)
                .map_err(Into::into),
        );
    }
    if changed.destination_touched {
        note(
            "destination VM stopped",
            p.destination.stop_vm(&p.vm).await.map_err(Into::into),
        );
        note(
            "destination datapath detached",
            p.destination.detach_datapath().await.map_err(Into::into),
        );
        note(
            "destination tap removed",
            p.destination
                .delete_tap(&p.vm_iface)
                .await
                .map_err(Into::into),
        );
    }
    if let (Some(dns), Some(ttl)) = (&p.dns, changed.ttl_lowered_from) {
        note(
            &format!("DNS TTL restored to {ttl} s"),
            dns.set_ttl(ttl).await.map(drop),
        );
    }
    let mut out = done.join("; ");
    if !failed.is_empty() {
        out.push_str(&format!("; NOT undone: {}", failed.join("; ")));
    }
    out
}

/// Aborts the source's migration and waits until its VM runs again.
async fn cancel_migration(p: &Plan) -> Result<()> {
    match p.source.continue_migration(&p.vm, false).await {
        // 404: the migration is already gone.
        Ok(_) | Err(AgentError::Refused { status: 404, .. }) => {}
        Err(err) => return Err(anyhow!(err)),
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let state = p.source.migration(&p.vm).await?;
        if matches!(
            state.phase,
            MigrationPhase::Failed | MigrationPhase::Completed
        ) {
            break;
        }
        if Instant::now() > deadline {
            bail!("the source did not leave the migration within 30 s");
        }
        tokio::time::sleep(MIGRATION_POLL).await;
    }
    let vm = p.source.vm(&p.vm).await?;
    if vm.run_state != RunState::Running {
        bail!("the VM at the source is {}", vm.run_state);
    }
    Ok(())
}
