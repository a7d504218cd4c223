//! The destination's half: the tap with the anycast gateway, the datapath in `receive`
//! (or `direct`), QEMU listening; then, once QEMU runs the VM here, the announcement; at
//! the end of the drain, `nat` (or detached). It never discards its QEMU unless the
//! source's agent says the VM runs there again (`rolled-back`).

use std::{sync::Arc, time::Duration};

use anyhow::{Context as _, Result};
use movarto_common::config::Mode;

use super::{
    Handle, RETRY_PAUSE, blocking,
    record::{MigrationRecord, Role, Stage},
};
use crate::{
    agent::{
        api::{PostcopySetting, RunState, VmRequest},
        blackout,
        server::Agent,
        tap,
    },
    qemu::migrate::IncomingRecovery,
};

/// How often the destination looks at its QEMU while it waits for the VM.
const VM_POLL: Duration = Duration::from_millis(100);
/// How often it asks the source how the migration goes (a rollback, or the drain's end).
const SOURCE_POLL: Duration = Duration::from_secs(2);
/// How often the destination looks at a post-copy migration (and the source's side of it):
/// a broken stream waits this long at most before it listens again.
const POSTCOPY_POLL: Duration = Duration::from_millis(250);
/// Beyond QEMU's downtime, how long the tap holds the tunnel's packets for the VM: the
/// device state's load and the VM's start here (a TCG guest's take hundreds of ms).
const VM_START: Duration = Duration::from_secs(1);

pub(super) async fn drive(agent: Arc<Agent>, m: Arc<Handle>) {
    if m.snapshot().spec.settings.postcopy != PostcopySetting::Off {
        // Beside the stages: post-copy can break before the VM first runs here (as the
        // switch's device state comes in) and after; QEMU's main thread may then wait
        // on a page, and the stages' own QMP calls with it.
        tokio::spawn(watch_postcopy(agent.clone(), m.clone()));
    }
    loop {
        let stage = m.stage();
        if stage.is_final() {
            return;
        }
        let result = match stage {
            Stage::Accepted => prepare(&agent, &m).await,
            Stage::Listening => wait_for_the_vm(&agent, &m).await,
            Stage::Running => wait_for_the_drain(&agent, &m).await,
            other => Err(anyhow::anyhow!("a destination never is in stage {other}")),
        };
        if let Err(err) = result {
            tracing::warn!(migration = %m.snapshot().id(), %stage, "{err:#}");
            let _ = m.update(|r| r.error = Some(format!("{stage}: {err:#}")));
            // The source decides: it rolls back (and we then clean up) or goes on.
            m.nap(RETRY_PAUSE).await;
        }
    }
}

/// Tap, datapath, QEMU `-incoming defer`, `migrate-incoming`. A restart in this stage
/// starts over: the source starts copying only once this half listens.
async fn prepare(agent: &Arc<Agent>, m: &Handle) -> Result<()> {
    let record = m.snapshot();
    let spec = &record.spec;
    if source_rolled_back(m).await {
        return clean_up(agent, m).await;
    }
    let (ip, prefix) = tap::parse_cidr(&spec.tap.gateway_cidr)?;
    tap::ensure_tap(&spec.vm_iface, spec.tap.gateway_mac.0, ip, prefix).await?;
    // The tunnel's packets wait in the tap until the VM runs: room for the blackout.
    let blackout = Duration::from_millis(spec.settings.downtime_limit_ms) + VM_START;
    let frames = blackout::queue_for_blackout(&agent.datapath.uplink, blackout);
    if let Err(err) = blackout::set_queue_len(&spec.vm_iface, frames).await {
        // The default queue still holds a short blackout: go on, and say so.
        tracing::warn!("{err:#}");
        m.note(format!("{err:#}; the tap keeps its queue"))?;
    }
    let token = record.token.context("no session token")?;
    let request = spec.datapath_request(token, spec.destination_mode(), Role::Destination);
    let datapath = agent.clone();
    blocking(move || datapath.datapath.apply(&request)).await?;
    // A QEMU left by an agent that died in this stage may never have listened; a VM of
    // that name that runs is someone's only copy, and is never touched.
    if let Ok(there) = agent.vms.status(&spec.vm).await {
        if there.run_state == RunState::Running || !there.incoming {
            anyhow::bail!("a VM named {} runs here already", spec.vm);
        }
        agent.vms.stop(&spec.vm).await?;
    }
    let vm = agent
        .vms
        .start(&VmRequest {
            spec_toml: spec.destination_spec_toml.clone(),
            incoming: true,
        })
        .await?;
    agent
        .vms
        .prepare_incoming(&spec.vm, &spec.incoming_request())
        .await?;
    m.note(format!(
        "destination QEMU pid {} listening on {}, datapath in {}",
        vm.pid.unwrap_or_default(),
        spec.migration_uri,
        spec.destination_mode()
    ))?;
    m.enter(Stage::Listening)
}

/// Until QEMU runs the VM here (then: NBD export ended, announce-self, and in move
/// address mode gratuitous ARP for `H`), or the source has rolled back.
async fn wait_for_the_vm(agent: &Arc<Agent>, m: &Handle) -> Result<()> {
    let record = m.snapshot();
    let spec = &record.spec;
    let mut asked = tokio::time::Instant::now();
    loop {
        let vm = agent.vms.status(&spec.vm).await;
        if let Ok(vm) = &vm
            && vm.run_state == RunState::Running
        {
            break;
        }
        if asked.elapsed() >= SOURCE_POLL || vm.is_err() {
            asked = tokio::time::Instant::now();
            if source_rolled_back(m).await {
                return clean_up(agent, m).await;
            }
        }
        m.nap(VM_POLL).await;
    }
    agent.vms.finish_incoming(&spec.vm).await?;
    agent.vms.announce(&spec.vm).await?;
    let mut detail = "the VM runs here; announce-self (RARP)".to_owned();
    if spec.moves_home() {
        // Home again: traffic to `H` is the VM's own; the source forwards what still
        // reaches its `N`, and this site's last move (its drain) ends here.
        let (datapath, home) = (agent.clone(), Some(spec.home));
        blocking(move || datapath.datapath.set_mode(home, Mode::Return).map(drop)).await?;
        super::source::supersede(agent, m).await;
        detail.push_str("; datapath in return (home again)");
    }
    if spec.new_addr.is_none()
        && let std::net::IpAddr::V4(home) = spec.home
    {
        crate::agent::garp::send(&agent.datapath.uplink, home, 3)?;
        detail.push_str(&format!("; gratuitous ARP for {home} from the uplink"));
    }
    m.update(|r| {
        r.figures.destination_status = Some(RunState::Running.to_string());
        r.note(detail);
        r.enter(Stage::Running);
    })
}

/// Until the source says the tunnel is over (or its record says `done`).
async fn wait_for_the_drain(agent: &Arc<Agent>, m: &Handle) -> Result<()> {
    loop {
        if m.snapshot().tunnel_over {
            return end_tunnel(agent, m).await;
        }
        if source_record(m)
            .await
            .is_some_and(|there| there.stage == Stage::Done)
        {
            return end_tunnel(agent, m).await;
        }
        m.nap(SOURCE_POLL).await;
    }
}

/// [`PostcopyWatch`] every [`POSTCOPY_POLL`], from QEMU listening here until its
/// migration is over (or this half's is).
async fn watch_postcopy(agent: Arc<Agent>, m: Arc<Handle>) {
    let mut watch = PostcopyWatch::default();
    while !watch.done && !m.stage().is_final() {
        if m.stage() != Stage::Accepted {
            watch.tend(&agent, &m).await;
        }
        tokio::time::sleep(POSTCOPY_POLL).await;
    }
}

/// The source's record, or `None` if its agent does not answer soon: over a cut link the
/// answer never comes, and the destination's own work goes on.
async fn source_record(m: &Handle) -> Option<MigrationRecord> {
    let peer = m.peer().ok()?;
    tokio::time::timeout(
        Duration::from_secs(1),
        peer.migration_record(m.snapshot().id()),
    )
    .await
    .ok()?
    .ok()
}

/// Post-copy at the destination, from the switch to post-copy until QEMU completes: a
/// stream that broke listens again for the source's resume; one the source reports
/// paused while this side still waits on it (the break has not reached here) is paused
/// here too (`IncomingRecovery`).
#[derive(Default)]
struct PostcopyWatch {
    recovery: IncomingRecovery,
    /// QEMU's incoming migration is over: nothing more to watch.
    done: bool,
}

impl PostcopyWatch {
    async fn tend(&mut self, agent: &Arc<Agent>, m: &Handle) {
        if self.done {
            return;
        }
        let spec = m.snapshot().spec;
        let (vm, uri) = (&spec.vm, &spec.migration_uri);
        let status = match agent.vms.incoming_status(vm).await {
            Ok(status) => status,
            Err(err) => {
                tracing::warn!("post-copy at the destination: {err:#}");
                return;
            }
        };
        // Active, or no answer (QEMU may wait on a page): did the stream break at the
        // source?
        let source_paused = matches!(status.as_deref(), None | Some("postcopy-active"))
            && source_record(m)
                .await
                .and_then(|there| there.progress)
                .is_some_and(|p| p.status == "postcopy-paused");
        let tended = agent
            .vms
            .recover_incoming(
                vm,
                &mut self.recovery,
                uri,
                status.as_deref(),
                source_paused,
            )
            .await;
        if let Err(err) = tended {
            tracing::warn!("post-copy at the destination: {err:#}");
        }
        self.done = matches!(
            status.as_deref(),
            Some("completed" | "failed" | "cancelled")
        );
    }
}

/// The tunnel is over: `nat` keeps `N` served, or (move address mode) nothing is left.
pub(super) async fn end_tunnel(agent: &Arc<Agent>, m: &Handle) -> Result<()> {
    if m.stage() == Stage::Done {
        return Ok(());
    }
    if m.stage() != Stage::Running {
        anyhow::bail!("the VM does not run here yet ({})", m.stage());
    }
    m.update(|r| r.tunnel_over = true)?;
    let spec = m.snapshot().spec;
    let (home_again, home) = (spec.moves_home(), Some(spec.home));
    let nat = spec.new_addr.is_some() && !home_again;
    let datapath = agent.clone();
    blocking(move || {
        if home_again {
            datapath.datapath.set_mode(home, Mode::Track).map(drop)
        } else if nat {
            datapath.datapath.set_mode(home, Mode::Nat).map(drop)
        } else {
            datapath.datapath.detach(home)
        }
    })
    .await?;
    m.update(|r| {
        r.note(if home_again {
            "datapath in track (home again)"
        } else if nat {
            "datapath in nat"
        } else {
            "datapath detached"
        });
        r.enter(Stage::Done);
    })
}

/// Whether this half may go: the source's agent says the VM runs there again
/// (`rolled-back`), or it stopped before `migrate-continue` was ever sent (so this QEMU
/// holds nothing of the VM). Unreachable, or any other answer: no.
async fn source_rolled_back(m: &Handle) -> bool {
    let Ok(peer) = m.peer() else { return false };
    // Not even a 404: the source wrote its record before it made this half, so a source
    // that forgot it has lost its state, not the migration (QEMU may still copy).
    peer.migration_record(m.snapshot().id())
        .await
        .is_ok_and(|there| match there.stage {
            Stage::RolledBack => true,
            Stage::Stopped => there.entered(Stage::Continued).is_none(),
            _ => false,
        })
}

/// The source runs the VM again: this half goes (QEMU, datapath, tap).
async fn clean_up(agent: &Arc<Agent>, m: &Handle) -> Result<()> {
    let spec = m.snapshot().spec;
    agent.vms.stop(&spec.vm).await?;
    let datapath = agent.clone();
    let home = Some(spec.home);
    // On a move home, the service is the last move's, still forwarding its drain.
    let keep = spec.moves_home();
    if !keep {
        blocking(move || datapath.datapath.detach(home)).await?;
    }
    tap::delete_tap(&spec.vm_iface).await?;
    m.update(|r| {
        r.note(if keep {
            "the source runs the VM again: QEMU stopped, tap removed, service left forwarding"
        } else {
            "the source runs the VM again: QEMU stopped, datapath detached, tap removed"
        });
        r.enter(Stage::Aborted);
    })
}
