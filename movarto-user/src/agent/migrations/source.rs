//! The source's half: A tracks, B is prepared (by its own agent), the disk mirror, the
//! RAM copy, the switchover (done here, on QMP's `pre-switchover`, with no round trip to
//! the orchestrator), completion, A's release, the drain and the teardown. Before
//! `migrate-continue` any failure rolls back; after it the driver only retries forward.

use std::{future::Future, pin::Pin, sync::Arc, time::Duration};

use anyhow::{Context as _, Result, anyhow, bail};
use movarto_common::config::Mode;
use tokio::time::Instant;

use super::{
    Handle, RETRY_PAUSE, blocking, drain, is_not_found,
    record::{IncomingHalf, MigrationRecord, Role, Stage, unix_ms},
};
use crate::{
    agent::{
        AgentClient,
        api::{FlowEntry, RunState},
        blackout::{self, Recording, TunnelTo},
        client::retry_unreachable,
        server::Agent,
        tap,
        token::random_session_token,
    },
    qemu::migrate::{FailedInPostcopy, SwitchoverHook},
};

/// How long the destination may take to start QEMU and listen.
const DESTINATION_READY: Duration = Duration::from_secs(120);
/// How often the destination is asked whether its VM runs, after completion.
const DESTINATION_POLL: Duration = Duration::from_millis(200);
/// A rollback that can't verify the VM runs at A tries this often before a safe stop.
const ROLLBACK_TRIES: u32 = 5;

/// Carries the migration on from its recorded stage until a final one.
pub(super) async fn drive(agent: Arc<Agent>, m: Arc<Handle>) {
    let mut rollback_tries = 0;
    // The source tap's recording, from the RAM copy until A's QEMU goes.
    let mut recording = None;
    loop {
        let stage = m.stage();
        if stage.is_final() {
            return;
        }
        if stage == Stage::CopyingRam && recording.is_none() {
            recording = start_recording(&m).await;
        } else if !matches!(
            stage,
            Stage::CopyingRam | Stage::SwitchingOver | Stage::Continued | Stage::Running
        ) {
            recording = None;
        }
        let result = match stage {
            Stage::Accepted => accept(&agent, &m).await,
            Stage::PreparingDestination => prepare_destination(&m).await,
            Stage::MirroringDisk => mirror_disk(&agent, &m).await,
            Stage::CopyingRam | Stage::SwitchingOver | Stage::Continued => {
                copy_and_switch(&agent, &m, recording.clone()).await
            }
            Stage::Running => release(&agent, &m, recording.clone()).await,
            Stage::Draining => drain::drain_and_tear_down(&agent, &m).await,
            Stage::RollingBack => {
                rollback_tries += 1;
                roll_back(&agent, &m).await
            }
            other => Err(anyhow!("a source never is in stage {other}")),
        };
        let Err(err) = result else { continue };
        tracing::warn!(migration = %m.snapshot().id(), %stage, "{err:#}");
        let stage = m.stage();
        let saved = if stage == Stage::RollingBack {
            if rollback_tries >= ROLLBACK_TRIES {
                m.update(|r| {
                    r.error = Some(format!(
                        "{}; the rollback could not verify the VM runs at the source: {err:#}",
                        r.error.clone().unwrap_or_default()
                    ));
                    r.enter(Stage::Stopped);
                })
            } else {
                Ok(())
            }
        } else if err.downcast_ref::<FailedInPostcopy>().is_some() {
            // Undoing anything now would lose the VM: a safe stop for a person.
            m.update(|r| {
                r.error = Some(format!("{err:#}"));
                r.enter(Stage::Split);
            })
        } else if stage.past_switchover() {
            // Nothing to roll back: only finishing is left, so try again.
            m.update(|r| r.error = Some(format!("{stage}: {err:#} (retrying)")))
        } else {
            m.update(|r| {
                r.error = Some(format!("{stage}: {err:#}"));
                r.enter(Stage::RollingBack);
            })
        };
        if let Err(err) = saved {
            tracing::error!("saving the migration record: {err:#}");
        }
        if matches!(m.stage(), Stage::RollingBack) || m.stage().past_switchover() {
            m.nap(RETRY_PAUSE).await;
        }
    }
}

/// What a rollback asked for with `POST /v1/migrations/{id}/abort` says (`movarto-user
/// abort`, or Ctrl-C on `migrate`).
const ABORTED: &str = "aborted on request, before the switchover";

fn aborted(m: &Handle) -> Result<()> {
    if m.snapshot().abort_requested {
        bail!(ABORTED);
    }
    Ok(())
}

/// Returns once an abort has been asked for (the API call wakes the nap).
async fn abort_asked(m: &Handle) {
    while !m.snapshot().abort_requested {
        m.nap(Duration::from_millis(500)).await;
    }
}

/// The VM runs at A; the token is drawn; A tracks the service with it.
async fn accept(agent: &Arc<Agent>, m: &Handle) -> Result<()> {
    aborted(m)?;
    let record = m.snapshot();
    let vm = agent
        .vms
        .status(&record.spec.vm)
        .await
        .with_context(|| format!("the VM {} at the source", record.spec.vm))?;
    if vm.run_state != RunState::Running {
        bail!(
            "the VM {} at the source is {}, not running",
            record.spec.vm,
            vm.run_state
        );
    }
    let token = match record.token {
        Some(token) => token,
        None => {
            let token = random_session_token()?;
            m.update(|r| r.token = Some(token))?;
            token
        }
    };
    // This VM's service only: the node's other services are other tenants'.
    let status = agent.datapath.status(Some(record.spec.home))?;
    if record.spec.moves_home() {
        // The last move's service stays as it is until the switchover: it still
        // receives that move's pre-move flows from the site the VM goes back to.
        match &status {
            Some(dp) if dp.mode == Mode::Receive => {}
            other => bail!(
                "moving {} home needs its service here in receive (its last move's drain), \
                 not {}",
                record.spec.home,
                other
                    .as_ref()
                    .map_or("none".to_owned(), |dp| dp.mode.to_string())
            ),
        }
        m.note("moving home: the service stays in receive until the switchover")?;
        return m.enter(Stage::PreparingDestination);
    }
    let detail = match &status {
        Some(dp) if dp.mode == Mode::Track => format!("source tracking {} flows", dp.flows),
        Some(dp) => bail!(
            "the source's service {} is in mode {}, not track: another migration?",
            record.spec.home,
            dp.mode
        ),
        None => {
            m.update(|r| r.attached_for_us = true)?;
            "source service added now (connections opened before were not MSS-clamped)".to_owned()
        }
    };
    let request = record
        .spec
        .datapath_request(token, Mode::Track, Role::Source);
    let datapath = agent.clone();
    blocking(move || datapath.datapath.apply(&request)).await?;
    m.note(detail)?;
    m.enter(Stage::PreparingDestination)
}

/// The destination's agent prepares its half (tap, datapath, QEMU listening).
async fn prepare_destination(m: &Handle) -> Result<()> {
    aborted(m)?;
    let record = m.snapshot();
    let peer = m.peer()?;
    let limit = record.spec.agent_timeout();
    let half = IncomingHalf {
        spec: record.spec.clone(),
        token: record.token.context("no session token")?,
    };
    retry_unreachable(limit, || peer.create_incoming(&half)).await?;
    let deadline = Instant::now() + DESTINATION_READY;
    let there = loop {
        aborted(m)?;
        let there = retry_unreachable(limit, || peer.migration_record(record.id())).await?;
        match there.stage {
            Stage::Accepted => {}
            Stage::Listening => break there,
            other => bail!(
                "the destination's half is {other}: {}",
                there.error.unwrap_or_default()
            ),
        }
        if Instant::now() > deadline {
            bail!("the destination did not listen within {DESTINATION_READY:?}");
        }
        m.nap(Duration::from_millis(200)).await;
    };
    m.note(
        there
            .history
            .last()
            .map(|c| c.detail.clone())
            .unwrap_or_default(),
    )?;
    m.enter(if record.spec.mirror.is_some() {
        Stage::MirroringDisk
    } else {
        Stage::CopyingRam
    })
}

/// The disk's full copy to B's export, before RAM.
async fn mirror_disk(agent: &Arc<Agent>, m: &Handle) -> Result<()> {
    aborted(m)?;
    let record = m.snapshot();
    let mirror = record.spec.mirror.clone().context("no mirror")?;
    let ready = agent.vms.start_mirror(&record.spec.vm, &mirror).await?;
    m.note(format!(
        "{} bytes to nbd://{}:{}, READY after {} ms",
        ready.len, mirror.nbd_host, mirror.nbd_port, ready.ready_ms
    ))?;
    m.enter(Stage::CopyingRam)
}

/// The recording of what goes into the source's tap (`agent::blackout`), so that a
/// packet QEMU holds after the stop can be carried on. Without it (a failure is noted)
/// such a packet is counted lost.
async fn start_recording(m: &Handle) -> Option<Arc<Recording>> {
    let tap = m.snapshot().spec.vm_iface;
    let started = blocking(move || Recording::start(&tap)).await;
    match started {
        Ok(recording) => Some(Arc::new(recording)),
        Err(err) => {
            tracing::warn!("no recording of the source's tap: {err:#}");
            let _ = m.note(format!("no recording of the source's tap: {err:#}"));
            None
        }
    }
}

/// RAM, the switchover at `pre-switchover`, and completion. A restarted agent follows
/// the migration QEMU still runs instead of starting another.
async fn copy_and_switch(
    agent: &Arc<Agent>,
    m: &Arc<Handle>,
    recording: Option<Arc<Recording>>,
) -> Result<()> {
    aborted(m)?;
    let record = m.snapshot();
    let follow = record.migrate_sent;
    if !follow {
        m.update(|r| r.migrate_sent = true)?;
    }
    let mut hook = LocalSwitchover {
        agent: agent.clone(),
        m: m.clone(),
        decoy: blackout::MarkerSocket::open(&record.spec.vm_iface, record.spec.vm_mac.0)
            .inspect_err(|err| tracing::warn!("no decoy for the source's tap: {err:#}"))
            .ok(),
        recording,
        stopped_at: None,
    };
    let progress_handle = m.clone();
    let request = record.spec.outgoing_request();
    let copy = agent
        .vms
        .run_outgoing(&record.spec.vm, &request, &mut hook, follow, move |p| {
            progress_handle.set_progress(p)
        });
    tokio::pin!(copy);
    // An abort during the RAM copy cancels QEMU's migration at once, before the guest
    // ever stops (the hook refuses it from `pre-switchover` on, and an abort is refused
    // once `continued`); the copy then ends in an error and the driver rolls back.
    // The agent always pauses before switchover, so with an abort asked for QEMU can't
    // complete (the hook refuses to continue): cancelling never resumes a VM that moved.
    // `biased`: a copy that has ended is taken as it ended.
    let outcome = tokio::select! {
        biased;
        outcome = &mut copy => outcome,
        () = abort_asked(m) => {
            let cancelled = agent.vms.cancel_outgoing(&record.spec.vm, None).await;
            let outcome = copy.await;
            match (outcome, cancelled) {
                (Ok(report), _) => Ok(report),
                (Err(_), Ok(())) => Err(anyhow!(
                    "{ABORTED}: QEMU's migration cancelled during the RAM copy"
                )),
                (Err(err), Err(cancel)) => {
                    Err(err.context(format!("{ABORTED}; migrate_cancel: {cancel:#}")))
                }
            }
        }
    };
    let report = match outcome {
        Ok(report) => report,
        Err(err) => {
            // After `continue` the outcome is QEMU's to tell: a pre-copy failure left the
            // VM at A (QEMU resumed it), and B never got the whole state.
            if m.stage().past_switchover() && err.downcast_ref::<FailedInPostcopy>().is_none() {
                let at_a = agent.vms.status(&record.spec.vm).await;
                if at_a.is_ok_and(|vm| vm.run_state == RunState::Running) {
                    m.update(|r| {
                        r.error = Some(format!("{err:#}"));
                        r.enter(Stage::RollingBack);
                    })?;
                    return Ok(());
                }
                // A's QEMU died after it sent the state: B may run the VM now.
                if let Ok(peer) = m.peer()
                    && peer
                        .vm(&record.spec.vm)
                        .await
                        .is_ok_and(|vm| vm.run_state == RunState::Running)
                {
                    m.update(|r| {
                        r.note(format!(
                            "the source's QEMU failed ({err:#}); the VM runs at the destination"
                        ));
                        r.figures.destination_status = Some(RunState::Running.to_string());
                        r.enter(Stage::Running);
                    })?;
                    return Ok(());
                }
            }
            return Err(err);
        }
    };
    m.update(|r| r.figures.qemu = Some(report.clone()))?;
    confirm_destination_runs(agent, m).await
}

/// After `completed`: the VM must run at B before anything at A goes. If B's QEMU is
/// verifiably gone (it never ran the VM), A's paused VM is resumed instead.
async fn confirm_destination_runs(agent: &Arc<Agent>, m: &Handle) -> Result<()> {
    let record = m.snapshot();
    let peer = m.peer()?;
    loop {
        match peer.vm(&record.spec.vm).await {
            Ok(vm) if vm.run_state == RunState::Running => {
                m.update(|r| {
                    r.figures.destination_status = Some(vm.run_state.to_string());
                    r.figures.dropped_at_destination_tap = vm.tap_dropped;
                    r.figures.resumed_unix_us = vm.resumed_unix_us;
                    r.enter(Stage::Running);
                })?;
                return Ok(());
            }
            Ok(vm) if vm.run_state == RunState::Exited => {
                return resume_at_source(agent, m, "the destination's QEMU exited").await;
            }
            Err(err) if is_not_found(&err) => {
                return resume_at_source(agent, m, "the destination has no QEMU").await;
            }
            Ok(_) | Err(_) => {}
        }
        m.nap(DESTINATION_POLL).await;
    }
}

/// QEMU completed but the destination lost the VM: A's copy (paused in `postmigrate`)
/// is the only one left; it runs again, and the migration rolls back.
async fn resume_at_source(agent: &Arc<Agent>, m: &Handle, why: &str) -> Result<()> {
    let vm = m.snapshot().spec.vm;
    let exited = agent
        .vms
        .status(&vm)
        .await
        .is_ok_and(|s| s.run_state == RunState::Exited);
    if exited {
        // Both copies are gone: the VM can only boot again, here.
        agent.vms.reboot(&vm).await?;
    } else {
        agent.vms.resume(&vm).await.with_context(|| {
            format!("{why} after completion, and the source's VM could not be resumed")
        })?;
    }
    m.update(|r| {
        r.error = Some(format!(
            "{why} after completion; the VM runs at the source again"
        ));
        r.enter(Stage::RollingBack);
    })
}

/// The VM runs at B: A's QEMU (paused in `postmigrate`), its tap and its tap hook go.
async fn release(agent: &Arc<Agent>, m: &Handle, recording: Option<Arc<Recording>>) -> Result<()> {
    // Anything that still reached the tap after the switchover's pass goes on to B too,
    // and QEMU, completed, says whether it holds a packet of its own.
    carry_stranded(agent, m, Pass::Last, recording).await;
    let record = m.snapshot();
    let datapath = agent.clone();
    let home = Some(record.spec.home);
    blocking(move || datapath.datapath.release_vm_iface(home)).await?;
    agent.vms.stop(&record.spec.vm).await?;
    tap::delete_tap(&record.spec.vm_iface).await?;
    m.update(|r| {
        r.note("the source's QEMU and tap are gone");
        r.enter(Stage::Draining);
    })
}

/// When the source's tap is read empty.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Pass {
    /// Right after the flip, while QEMU sends the device state.
    AtSwitchover,
    /// Once QEMU has completed, before it goes: with the probe for a packet it holds.
    Last,
}

/// The frames QEMU left unread in the source's tap go on to the destination
/// (`agent::blackout`), counted in the record. A failure is noted, never fatal.
async fn carry_stranded(
    agent: &Arc<Agent>,
    m: &Handle,
    pass: Pass,
    recording: Option<Arc<Recording>>,
) {
    let record = m.snapshot();
    let spec = &record.spec;
    let pid = agent.vms.status(&spec.vm).await.ok().and_then(|vm| vm.pid);
    let (Some(pid), Some(token)) = (pid, record.token) else {
        let _ = m.note("no QEMU at the source to take unread frames from");
        return;
    };
    let tunnel = TunnelTo {
        local: spec.source_tunnel,
        peer: spec.destination_tunnel,
        token,
        mtu: spec.tunnel_mtu,
    };
    let (tap, home, vm_mac) = (spec.vm_iface.clone(), spec.home, spec.vm_mac.0);
    let earlier = record.figures.stranded_at_source.unwrap_or_default();
    let pass = if earlier.probed {
        Pass::AtSwitchover
    } else {
        pass
    };
    let found = blocking(move || match pass {
        Pass::AtSwitchover => {
            blackout::forward_stranded(pid, &tap, home, tunnel, recording.as_deref())
        }
        Pass::Last => blackout::probe_held(
            pid,
            &tap,
            vm_mac,
            home,
            tunnel,
            earlier,
            recording.as_deref(),
        ),
    });
    match found.await {
        Ok(found) => {
            let saved = m.update(|r| {
                r.figures
                    .stranded_at_source
                    .get_or_insert_default()
                    .add(found)
            });
            if let Err(err) = saved {
                tracing::warn!("saving the stranded frames' count: {err:#}");
            }
        }
        Err(err) => {
            tracing::warn!(migration = %record.id(), "the source's unread frames: {err:#}");
            let _ = m.note(format!(
                "the frames QEMU left unread in {} were not carried on: {err:#}",
                spec.vm_iface
            ));
        }
    }
}

/// Runs at `pre-switchover` (the source stopped), and does only what must happen
/// before `migrate-continue`: A forwards (one map write), the re-routing hook in move
/// address mode, and the record says `continued` (one fsync). The pre-move flows go to B
/// after `continue`: B tunnels a flow it has never seen back to A anyway, so the VM
/// needs no snapshot to resume, and no WAN round trip lengthens the blackout.
struct LocalSwitchover {
    agent: Arc<Agent>,
    m: Arc<Handle>,
    /// Opened beforehand: opening and closing it take milliseconds (`agent::blackout`).
    decoy: Option<blackout::MarkerSocket>,
    recording: Option<Arc<Recording>>,
    /// QEMU's `STOP` event's time, when it came.
    stopped_at: Option<std::time::SystemTime>,
}

impl SwitchoverHook for LocalSwitchover {
    fn stopped_at(&mut self, at: std::time::SystemTime) {
        self.stopped_at = Some(at);
        if let Some(recording) = &self.recording {
            recording.note_stop_at(at);
        }
    }

    fn at_switchover(&mut self) -> Pin<Box<dyn Future<Output = Result<()>> + Send + '_>> {
        Box::pin(async move {
            let (agent, m) = (&self.agent, &self.m);
            let stopped = tokio::time::Instant::now();
            // A restarted agent found QEMU still at pre-switchover after the flip: the
            // flip is done, only `migrate-continue` is left.
            if m.stage() != Stage::Continued {
                aborted(m)?;
                let record = m.snapshot();
                if let Some(recording) = &self.recording {
                    recording.note_stop();
                }
                // First in the tap's queue, so that the frame QEMU reads and holds after
                // the stop is this one rather than the VM's (`agent::blackout`).
                let decoy_sent = self.decoy.as_ref().is_some_and(|decoy| {
                    decoy
                        .send_decoy()
                        .inspect_err(|err| tracing::warn!("the decoy: {err:#}"))
                        .is_ok()
                });
                // What reaches A from now on waits in B's tap for the VM.
                agent.datapath.flip_to_forward(record.spec.home)?;
                let flip_us = stopped.elapsed().as_micros() as u64;
                if let Some(hook) = &record.spec.on_switch {
                    run_on_switch(&record, hook).await?;
                }
                let stopped_at = self.stopped_at;
                // Under the record's lock, as the abort's own check: either the abort
                // came first (nothing continues) or `continued` did (the abort is refused).
                let continued = m.update(|r| {
                    if r.abort_requested {
                        return false;
                    }
                    r.enter(Stage::SwitchingOver);
                    r.figures.switchover_unix_ms = Some(unix_ms());
                    r.dns_owed.switch = r.spec.dns.is_some() && r.spec.new_addr.is_some();
                    r.note("source forwards");
                    r.enter(Stage::Continued);
                    r.figures.flip_us = Some(flip_us);
                    r.figures.stopped_unix_us = stopped_at.map(crate::agent::vms::unix_us);
                    r.figures
                        .stranded_at_source
                        .get_or_insert_default()
                        .decoy_sent = decoy_sent;
                    true
                })?;
                if !continued {
                    bail!(ABORTED);
                }
                // `continued` is on disk: what is left is `migrate-continue`. Noted after
                // it, so that no second save lengthens the blackout.
                let continue_us = stopped.elapsed().as_micros() as u64;
                let m = m.clone();
                tokio::spawn(async move {
                    if let Err(err) = m.update(|r| r.figures.continue_us = Some(continue_us)) {
                        tracing::warn!("saving the switchover's figure: {err:#}");
                    }
                });
            }
            // Everything else after `migrate-continue`, outside the blackout.
            tokio::spawn({
                let (agent, m, recording) = (agent.clone(), m.clone(), self.recording.clone());
                async move { carry_stranded(&agent, &m, Pass::AtSwitchover, recording).await }
            });
            if m.snapshot().spec.moves_home() {
                // The last move's drain ends here: this one carries its tunnel on. The
                // destination needs none of these flows (its own it knows; the rest it
                // sends back here by default).
                let (agent, m) = (agent.clone(), m.clone());
                tokio::spawn(async move { supersede(&agent, &m).await });
            } else {
                tokio::spawn(hand_over_flows(agent.clone(), m.clone()));
            }
            Ok(())
        })
    }

    /// Post-copy: the destination's agent says the VM runs there (noted in the record,
    /// where `destination_status` tells it from then on). Unreachable is a no.
    fn destination_runs(&mut self) -> Pin<Box<dyn Future<Output = bool> + Send + '_>> {
        Box::pin(async move {
            let record = self.m.snapshot();
            if record.figures.destination_status.as_deref() == Some("running") {
                return true;
            }
            let Ok(peer) = self.m.peer() else {
                return false;
            };
            let asked = tokio::time::timeout(Duration::from_secs(1), peer.vm(&record.spec.vm));
            let runs = matches!(asked.await, Ok(Ok(vm)) if vm.run_state == RunState::Running);
            if runs {
                let noted = self.m.update(|r| {
                    r.figures.destination_status = Some(RunState::Running.to_string());
                });
                if let Err(err) = noted {
                    tracing::warn!("saving the destination's run state: {err:#}");
                }
            }
            runs
        })
    }

    /// Post-copy broke: resuming is hopeless only once the destination's agent says its
    /// QEMU has exited. Unreachable (the link may be what broke) is no answer.
    fn destination_gone(&mut self) -> Pin<Box<dyn Future<Output = Option<String>> + Send + '_>> {
        Box::pin(async move {
            let record = self.m.snapshot();
            let peer = self.m.peer().ok()?;
            let asked = tokio::time::timeout(Duration::from_secs(1), peer.vm(&record.spec.vm));
            match asked.await {
                Ok(Ok(vm)) if vm.run_state == RunState::Exited => Some(format!(
                    "the destination's QEMU has exited{}",
                    vm.run_state_error
                        .map_or_else(String::new, |why| format!(" ({why})"))
                )),
                _ => None,
            }
        })
    }
}

/// A move home went past the point of no return: the VM's last move, draining at this
/// agent, ends here without touching the datapath (this one owns its service now).
pub(super) async fn supersede(agent: &Arc<Agent>, m: &Handle) {
    let record = m.snapshot();
    let Some(old) = agent
        .migrations
        .superseded_by(record.id(), &record.spec.vm)
        .await
    else {
        return;
    };
    let id = record.id().clone();
    let result = old.update(|r| {
        if !r.stage.is_final() {
            r.tunnel_over = true;
            r.note(format!(
                "superseded by {id}: the VM moves home before the drain ended; its tunnel \
                 carries on under that migration"
            ));
            r.enter(Stage::Done);
        }
    });
    if let Err(err) = result {
        tracing::warn!(migration = %id, "superseding the last move: {err:#}");
    }
}

/// After `continue`: A's pre-move flows to B (they count for B's own status; B forwards
/// what it has not seen to A in any case). Retried for `--agent-timeout`; a failure is
/// noted, never fatal.
async fn hand_over_flows(agent: Arc<Agent>, m: Arc<Handle>) {
    if m.snapshot().figures.flows_handed {
        return;
    }
    let handed = async {
        let datapath = agent.clone();
        let home = Some(m.snapshot().spec.home);
        let mut snapshot = blocking(move || datapath.datapath.flows(home)).await?;
        snapshot.flows.retain(FlowEntry::is_tracked);
        let live = snapshot.flows.iter().filter(|f| f.holds_drain()).count();
        let peer = m.peer()?;
        let limit = m.snapshot().spec.agent_timeout();
        tokio::time::timeout(
            limit,
            retry_unreachable(limit, || peer.load_flows(&snapshot)),
        )
        .await
        .map_err(|_| anyhow!("no answer within {limit:?}"))??;
        anyhow::Ok((snapshot.flows.len(), live))
    }
    .await;
    let saved = m.update(|r| match handed {
        Ok((flows, live)) => {
            r.figures.flows_handed = true;
            r.figures.flows_at_switchover = live;
            r.note(format!(
                "{flows} pre-move flows handed to the destination after continue"
            ));
        }
        Err(err) => r.note(format!("the flows did not reach the destination: {err:#}")),
    });
    if let Err(err) = saved {
        tracing::warn!("saving the migration record: {err:#}");
    }
}

/// Runs the operator's re-routing command (move address mode) while the source is
/// stopped at switchover; it gets the move's facts in its environment.
async fn run_on_switch(record: &MigrationRecord, hook: &str) -> Result<()> {
    let spec = &record.spec;
    let output = tokio::process::Command::new("sh")
        .args(["-c", hook])
        .env("MOVARTO_VM", &spec.vm)
        .env("MOVARTO_HOME", spec.home.to_string())
        .env("MOVARTO_SOURCE_TUNNEL", spec.source_tunnel.to_string())
        .env(
            "MOVARTO_DESTINATION_TUNNEL",
            spec.destination_tunnel.to_string(),
        )
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(30), output)
        .await
        .map_err(|_| anyhow!("--on-switch did not finish within 30 s: {hook}"))?
        .with_context(|| format!("running --on-switch {hook:?}"))?;
    if !output.status.success() {
        bail!(
            "--on-switch {hook:?} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// Undoes a migration that stopped before `migrate-continue`: QEMU's migration is
/// cancelled and the VM verified running at A, A tracks again (or is detached if the
/// migration attached it), and the destination is told (it cleans up once it has asked
/// us and seen `rolled-back`).
async fn roll_back(agent: &Arc<Agent>, m: &Handle) -> Result<()> {
    let record = m.snapshot();
    let vm = &record.spec.vm;
    let mut done = Vec::new();
    let before = agent.vms.status(vm).await?;
    if before.run_state == RunState::Exited {
        // The running copy crashed before `continue`: B holds nothing of it, so the
        // VM can only boot again here.
        agent.vms.reboot(vm).await?;
        done.push("the source's QEMU had died: the VM booted again from its spec".to_owned());
    } else {
        agent
            .vms
            .cancel_outgoing(vm, record.spec.mirror.as_ref())
            .await?;
    }
    let at_a = agent.vms.status(vm).await?;
    if at_a.run_state != RunState::Running {
        bail!("the VM at the source is {}, not running", at_a.run_state);
    }
    done.push("migration cancelled, VM running at the source".to_owned());
    let datapath = agent.clone();
    // A migration that never got past `accepted` never configured the datapath: what is
    // there is someone else's.
    let configured = record.entered(Stage::PreparingDestination).is_some();
    let home = Some(record.spec.home);
    if configured && record.attached_for_us {
        blocking(move || datapath.datapath.detach(home)).await?;
        done.push("source service removed".to_owned());
    } else if configured && record.spec.moves_home() {
        done.push("source service left in receive (the last move's drain goes on)".to_owned());
    } else if configured && agent.datapath.status(home)?.is_some() {
        blocking(move || datapath.datapath.set_mode(home, Mode::Track)).await?;
        done.push("source service back to track".to_owned());
    }
    m.update(|r| {
        r.figures.rolled_back = Some(done.join("; "));
        r.dns_owed.restore_ttl = r.spec.dns.is_some();
        // The VM runs here: a switch not yet made is owed no more, one made is undone.
        r.dns_owed.switch = false;
        r.dns_owed.switch_back = r.figures.dns_switch_ms.is_some();
        r.enter(Stage::RolledBack);
    })?;
    // Best effort: the destination also asks by itself.
    if let Ok(peer) = m.peer() {
        let cleaned = tell_destination_to_abort(&peer, m).await;
        m.update(|r| {
            let summary = r.figures.rolled_back.get_or_insert_with(String::new);
            match cleaned {
                Ok(()) => {
                    summary.push_str("; destination VM stopped, datapath detached, tap removed")
                }
                Err(err) => summary.push_str(&format!(
                    "; destination NOT cleaned yet (it cleans up once it reaches us): {err:#}"
                )),
            }
        })?;
    }
    m.update(|r| r.figures.rollback_finished = true)
}

/// Asks the destination to abort and waits (bounded) until it has.
async fn tell_destination_to_abort(peer: &AgentClient, m: &Handle) -> Result<()> {
    let record = m.snapshot();
    let limit = record.spec.agent_timeout();
    match retry_unreachable(limit, || peer.abort_migration(record.id())).await {
        Ok(_) => {}
        Err(err) if is_not_found(&err) => return Ok(()),
        Err(err) => return Err(err.into()),
    }
    let deadline = Instant::now() + limit;
    loop {
        let there = retry_unreachable(limit, || peer.migration_record(record.id())).await?;
        if there.stage == Stage::Aborted {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the destination is still {}", there.stage);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
