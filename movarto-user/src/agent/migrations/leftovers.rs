//! What migrations left behind at this site that no live migration and no running VM
//! needs: QEMUs that will never run the VM (a destination's `-incoming` QEMU that never
//! got it, a source's QEMU left in `postmigrate`, or one that exited), the taps ended
//! migrations made, and a datapath still in a tunnel mode. A restarted agent lists them,
//! then removes them; `GET /v1/leftovers` is the dry run, `DELETE /v1/leftovers` the removal.

use std::{collections::BTreeSet, sync::Arc};

use anyhow::Result;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{blocking, record::Role};
use crate::{
    agent::{api::RunState, server::Agent, tap},
    datapath::ifindex,
    qemu::spec::VmSpec,
};

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Leftovers {
    /// VMs (by name) whose QEMU will never run them.
    pub vms: Vec<String>,
    /// Taps an ended migration made that no VM here uses.
    pub taps: Vec<String>,
    /// The datapath's mode, when it is still in a tunnel mode with no live migration.
    #[serde(default)]
    pub datapath_mode: Option<String>,
}

impl Leftovers {
    pub fn is_empty(&self) -> bool {
        self.vms.is_empty() && self.taps.is_empty() && self.datapath_mode.is_none()
    }
}

/// The dry run: what [`remove`] would remove now.
pub async fn find(agent: &Arc<Agent>) -> Result<Leftovers> {
    let records = agent.migrations.all().await;
    let live: Vec<_> = records.iter().filter(|r| !r.stage.is_final()).collect();
    let mut out = Leftovers::default();
    let mut taps_in_use = BTreeSet::new();
    for vm in agent.vms.all().await {
        let migrating = live.iter().any(|r| r.spec.vm == vm.name);
        if let Some(tap) = agent
            .vms
            .spec_toml(&vm.name)
            .await
            .and_then(|toml| VmSpec::parse(&toml).ok())
            .map(|spec| spec.nic.tap)
        {
            taps_in_use.insert(tap);
        }
        let dead_end = match vm.run_state {
            RunState::Exited | RunState::Postmigrate => true,
            RunState::Inmigrate => vm.incoming,
            _ => false,
        };
        if dead_end && !migrating {
            out.vms.push(vm.name);
        }
    }
    for r in &live {
        taps_in_use.insert(r.spec.vm_iface.clone());
    }
    let ended_taps: BTreeSet<String> = records
        .iter()
        .filter(|r| r.stage.is_final())
        .filter(|r| r.role == Role::Destination || r.stage == super::record::Stage::Done)
        .map(|r| r.spec.vm_iface.clone())
        .collect();
    for tap in ended_taps {
        if !taps_in_use.contains(&tap) && ifindex(&tap).is_ok() {
            out.taps.push(tap);
        }
    }
    // A tunnel mode with a VM running here is a migration someone must finish by hand
    // (a split, a safe stop): it stays.
    let vm_runs_here = agent
        .vms
        .all()
        .await
        .iter()
        .any(|vm| vm.run_state == RunState::Running);
    if live.is_empty()
        && !vm_runs_here
        && let Some(dp) = agent.datapath.status(None)?
        && dp.mode.uses_tunnel()
    {
        out.datapath_mode = Some(dp.mode.to_string());
    }
    Ok(out)
}

/// Removes what [`find`] lists (the dead QEMUs first: their taps are free after them);
/// returns what it removed.
pub async fn remove(agent: &Arc<Agent>) -> Result<Leftovers> {
    let dead = find(agent).await?.vms;
    for vm in &dead {
        tracing::info!(%vm, "leftovers: stopping a QEMU no migration needs");
        agent.vms.stop(vm).await?;
    }
    let mut found = find(agent).await?;
    found.vms = dead;
    for name in &found.taps {
        tracing::info!(tap = %name, "leftovers: removing a tap no VM uses");
        tap::delete_tap(name).await?;
    }
    if let Some(mode) = &found.datapath_mode {
        tracing::info!(%mode, "leftovers: detaching a datapath no migration uses");
        let datapath = agent.clone();
        blocking(move || datapath.datapath.detach(None)).await?;
    }
    Ok(found)
}
