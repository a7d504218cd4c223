//! Where a VM runs, when `--from` is not given: ask the agents of the inventory's sites,
//! and fall back on the service's `home_site`.

use std::time::Duration;

use tokio::task::JoinSet;

use super::{Inventory, SourceSite};
use crate::agent::api::{Role, RunState};

/// How long one agent may take to say whether it runs the VM.
const ASK_TIMEOUT: Duration = Duration::from_secs(5);

/// What one site's agent said about the VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sighting {
    pub site: String,
    /// `Ok(None)`: the agent has no such VM; `Err`: the agent could not be asked.
    pub state: Result<Option<RunState>, String>,
}

/// The source site from what the agents said (pure, so the rule is tested on its own):
/// 1. the one site other than `to` whose QEMU runs the VM (`running`);
/// 2. else the one other site that still holds it outside a migration's incoming half
///    (`postmigrate`, `paused`, ...: a move from there is under way, and `migrate`
///    follows it);
/// 3. else the service's `home_site`, unless that is `to`.
pub fn source_from_sightings(
    vm: &str,
    to: &str,
    sightings: &[Sighting],
    home_site: Option<&str>,
) -> Result<SourceSite, String> {
    let others = || sightings.iter().filter(|s| s.site != to);
    let pick = |keep: &dyn Fn(RunState) -> bool| -> Vec<&str> {
        others()
            .filter(|s| matches!(s.state, Ok(Some(state)) if keep(state)))
            .map(|s| s.site.as_str())
            .collect()
    };
    for found in [
        pick(&|state| state == RunState::Running),
        pick(&|state| {
            !matches!(
                state,
                RunState::Inmigrate | RunState::Exited | RunState::Unknown
            )
        }),
    ] {
        match found[..] {
            [site] => return Ok(SourceSite::Agents(site.to_owned())),
            [] => {}
            _ => {
                return Err(format!(
                    "the agents of sites {} all hold VM {vm}: say which with --from SITE",
                    found.join(", ")
                ));
            }
        }
    }
    let at_to = sightings
        .iter()
        .any(|s| s.site == to && s.state == Ok(Some(RunState::Running)));
    if at_to {
        return Err(format!("VM {vm} already runs at site {to}"));
    }
    let unasked: Vec<String> = others()
        .filter_map(|s| s.state.as_ref().err().map(|e| format!("{}: {e}", s.site)))
        .collect();
    match home_site {
        Some(home) if home != to => Ok(SourceSite::HomeSite(home.to_owned())),
        _ => Err(format!(
            "no agent says where VM {vm} runs{}, and its service has no home_site other than \
             {to}: give --from SITE",
            if unasked.is_empty() {
                String::new()
            } else {
                format!(" ({} could not be asked)", unasked.join("; "))
            }
        )),
    }
}

/// Asks every site's agent (at once, [`ASK_TIMEOUT`] each) whether it runs `vm`.
pub async fn sightings(inventory: &Inventory, vm: &str) -> Vec<Sighting> {
    let mut asks = JoinSet::new();
    for site in inventory.sites.keys() {
        let (site, vm) = (site.clone(), vm.to_owned());
        let agent = inventory.agent(&site);
        asks.spawn(async move {
            let state = match agent {
                Err(err) => Err(err),
                Ok(agent) => match tokio::time::timeout(ASK_TIMEOUT, agent.vm(&vm)).await {
                    Err(_) => Err(format!("no answer within {ASK_TIMEOUT:?}")),
                    Ok(Ok(status)) => Ok(Some(status.run_state)),
                    Ok(Err(crate::agent::AgentError::Refused { status: 404, .. })) => Ok(None),
                    Ok(Err(err)) => Err(err.to_string()),
                },
            };
            Sighting { site, state }
        });
    }
    let mut out = Vec::new();
    while let Some(done) = asks.join_next().await {
        if let Ok(sighting) = done {
            out.push(sighting);
        }
    }
    out.sort_by(|a, b| a.site.cmp(&b.site));
    out
}

/// The source site of `migrate NAME --to TO` without `--from` ([`source_from_sightings`]).
pub async fn find_source(
    inventory: &Inventory,
    vm: &str,
    to: &str,
    home_site: Option<&str>,
) -> Result<SourceSite, String> {
    let seen = sightings(inventory, vm).await;
    source_from_sightings(vm, to, &seen, home_site)
}

/// The site whose agent holds the source's half of `target` (a migration id, or a VM:
/// its unfinished migration first): `--resume ID` and `abort NAME` without an agent.
pub async fn locate_migration(inventory: &Inventory, target: &str) -> Result<String, String> {
    let mut asks = JoinSet::new();
    for site in inventory.sites.keys() {
        let (site, target) = (site.clone(), target.to_owned());
        let agent = inventory.agent(&site);
        asks.spawn(async move {
            let agent = agent.ok()?;
            let records = tokio::time::timeout(ASK_TIMEOUT, agent.migrations())
                .await
                .ok()?
                .ok()?;
            // The source's half is the one `--resume` follows and `abort` rolls back.
            let ours = records.iter().filter(|r| {
                r.role == Role::Source && (r.id().as_str() == target || r.spec.vm == target)
            });
            let unfinished = ours.clone().any(|r| !r.stage.is_final());
            ours.clone().next().map(|_| (unfinished, site))
        });
    }
    let mut found = Vec::new();
    while let Some(done) = asks.join_next().await {
        if let Ok(Some(hit)) = done {
            found.push(hit);
        }
    }
    // A site with the move under way beats one with an old, finished one.
    found.sort();
    found.pop().map(|(_, site)| site).ok_or_else(|| {
        format!(
            "no site's agent holds a migration {target} as its source: give --from SITE or \
             --source URL"
        )
    })
}
