//! The migration's steps, in DESIGN.md's order, each timed and recorded: the phases
//! (before switchover, switchover, completion, after switchover), each step a function.

use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, bail};
use movarto_common::{config::Mode, counters::Counter, ids::SessionToken};
use tokio::time::Instant;

use super::{
    drain::{Drained, drain},
    interrupt::{Interrupt, Interrupted},
    plan::{DNS_VERIFY, Plan},
    progress::Step,
    report::Report,
    rollback::{Changed, roll_back},
    timeline::{ProgressFormat, Say, Timeline},
};
use crate::{
    agent::{
        api::{
            FlowEntry, FlowSnapshot, IncomingRequest, MigrationPhase, OutgoingRequest, RunState,
            TapRequest, VmRequest,
        },
        token::random_session_token,
    },
    dns::records,
    qemu::migrate::MigrationReport,
};

/// How often the orchestrator polls a running migration.
pub(super) const MIGRATION_POLL: Duration = Duration::from_millis(100);
/// How often the RAM copy's progress is shown.
const RAM_NOTE: Duration = Duration::from_secs(1);

/// What a step's body returns: a value (`None`: skipped) and the detail for the report.
type StepResult<T> = Result<(Option<T>, String)>;

struct Run<'a> {
    plan: &'a Plan,
    token: SessionToken,
    say: Say,
    timeline: Timeline,
    report: Report,
    changed: Changed,
    /// A's pre-move flows at switchover.
    switchover_flows: Vec<FlowEntry>,
    /// Ctrl-C and SIGTERM: before switchover they roll back.
    interrupt: Interrupt,
}

/// Runs the whole migration; never panics, and always returns a report.
pub async fn run_plan(plan: &Plan, progress: ProgressFormat) -> Report {
    let token = match random_session_token() {
        Ok(token) => token,
        Err(err) => {
            return Report {
                vm: plan.vm.clone(),
                error: Some(format!("{err:#}")),
                ..Report::default()
            };
        }
    };
    let say = Say::new(progress);
    let mut run = Run {
        plan,
        token,
        say,
        timeline: Timeline::new(say),
        report: Report {
            vm: plan.vm.clone(),
            address_mode: plan.address_mode().name().to_owned(),
            ..Report::default()
        },
        changed: Changed::default(),
        switchover_flows: Vec::new(),
        interrupt: Interrupt::listen(),
    };
    let outcome = run.all_steps().await;
    match outcome {
        Ok(()) => run.report.succeeded = true,
        Err(Failure::BeforeSwitchover(err)) => {
            run.report.error = Some(format!("{err:#}"));
            run.report.rolled_back = Some(roll_back(plan, &run.changed).await);
        }
        Err(Failure::Split(err)) => {
            run.report.error = Some(format!("{err:#}. {SPLIT_GUIDANCE}"));
        }
        Err(Failure::AfterSwitchover(err)) => {
            let finish = match plan.new_addr {
                Some(new) => format!(
                    "DNS to {new}, drain, then `movarto-user detach` at the source and \
                     `movarto-user mode <uplink> nat` at the destination"
                ),
                None => "drain, then `movarto-user detach` at both sites".to_owned(),
            };
            run.report.error = Some(format!(
                "{err:#}. The VM runs at the destination; the steps above show what is done. \
                 Finish by hand: {finish}"
            ));
        }
    }
    run.report.steps = std::mem::take(&mut run.timeline.steps);
    run.report.total_ms = say.ms();
    run.report
}

enum Failure {
    BeforeSwitchover(anyhow::Error),
    AfterSwitchover(anyhow::Error),
    /// Post-copy broke: the VM has run at B, and A holds pages B never got.
    Split(anyhow::Error),
}

/// The migration stream broke after post-copy began (QEMU's `postcopy-paused`, or B died).
#[derive(Debug, thiserror::Error)]
#[error("post-copy broke after the VM started at the destination ({0})")]
struct PostcopyBroke(String);

/// What the operator reads when post-copy broke: undoing anything would lose the VM.
const SPLIT_GUIDANCE: &str = "Nothing was rolled back: the VM's memory is split between the \
    source (paused, holding the pages the destination lacks) and the destination, so stopping \
    either loses it. If QEMU at the destination still runs, mend the link and resume with QMP \
    `migrate-recover` at the destination and `migrate` with `resume: true` at the source; \
    if it exited, the VM's RAM is lost: quit the source's QEMU and boot the VM again from \
    its disk. Both datapaths are left as they are (source forwards, destination receives)";

impl Run<'_> {
    async fn all_steps(&mut self) -> Result<(), Failure> {
        self.before_switchover()
            .await
            .map_err(Failure::BeforeSwitchover)?;
        // The source still runs until `continue`; a failure up to completion resumes it.
        let switchover = self.switchover().await.map_err(Failure::BeforeSwitchover)?;
        self.complete().await.map_err(|err| {
            if err.is::<PostcopyBroke>() {
                Failure::Split(err)
            } else {
                Failure::BeforeSwitchover(err)
            }
        })?;
        self.after_switchover(switchover)
            .await
            .map_err(Failure::AfterSwitchover)
    }

    /// 1 to 3: nothing has stopped yet.
    async fn before_switchover(&mut self) -> Result<()> {
        let p = self.plan;
        for agent in [&p.source, &p.destination] {
            agent
                .health()
                .await
                .with_context(|| format!("checking the agent at {}", agent.base()))?;
        }
        self.interrupt.check()?;
        let lowered = self.timeline.step(Step::LowerTtl, lower_ttl(p)).await?;
        if let Some(old_ttl) = lowered {
            self.changed.ttl_lowered_from = Some(old_ttl);
            wait_out_ttl(p, self.say, old_ttl, &self.interrupt).await?;
        }
        self.interrupt.check()?;
        self.timeline
            .step(
                Step::PrepareDestination,
                prepare_destination(p, self.token, &mut self.changed),
            )
            .await?;
        self.interrupt.check()?;
        self.timeline.step(Step::MirrorDisk, mirror_disk(p)).await?;
        self.interrupt.check()?;
        Ok(())
    }

    /// 4 and 5: RAM until `pre-switchover`, then the flip. Returns the switchover instant.
    async fn switchover(&mut self) -> Result<Instant> {
        let (p, say) = (self.plan, self.say);
        self.changed.migration_started = true;
        self.timeline
            .step(Step::MigrateRam, migrate_ram(p, say, &self.interrupt))
            .await?;
        // The guest is paused at pre-switchover here: still the source's to resume.
        self.interrupt.check()?;
        let premove = self
            .timeline
            .step(Step::Switchover, flip(p))
            .await?
            .unwrap_or_default();
        self.report.flows_at_switchover = premove.iter().filter(|f| f.holds_drain()).count();
        self.switchover_flows = premove;
        Ok(Instant::now())
    }

    /// 6: the source completes; the VM runs at the destination.
    async fn complete(&mut self) -> Result<()> {
        self.report.qemu = self
            .timeline
            .step(Step::Complete, complete(self.plan))
            .await?;
        Ok(())
    }

    /// 7 to 11: the VM runs at B. Nothing here can give it back to A.
    async fn after_switchover(&mut self, switchover: Instant) -> Result<()> {
        let (p, say) = (self.plan, self.say);
        // The source's QEMU (paused in postmigrate) and its tap hook go.
        p.source.release_vm_iface().await?;
        p.source.stop_vm(&p.vm).await?;
        p.source.delete_tap(&p.vm_iface).await?;

        self.report.dns_switch_ms = self
            .timeline
            .step(Step::DnsUpdate, update_dns(p, switchover))
            .await?;
        self.timeline.step(Step::Announce, announce(p)).await?;

        let grace = p.drain_grace.unwrap_or_else(|| {
            Duration::from_secs(u64::from(self.changed.ttl_lowered_from.unwrap_or(0)))
        });
        let drain_started = Instant::now();
        let rerouted = p.new_addr.is_none();
        let drained = self
            .timeline
            .step(
                Step::Drain,
                drain(
                    p,
                    say,
                    &self.switchover_flows,
                    grace,
                    rerouted,
                    &self.interrupt,
                ),
            )
            .await?;
        let Drained { cut, premove_bytes } = drained.unwrap_or_default();
        let report = &mut self.report;
        report.tunnel.premove_bytes = premove_bytes;
        report.drain_ms = Some(drain_started.elapsed().as_millis() as u64);
        report.flows_drained = report.flows_at_switchover.saturating_sub(cut.len());
        report.flows_cut = cut;

        let restore = self.changed.ttl_lowered_from;
        self.timeline
            .step(Step::Teardown, teardown(p, restore, report))
            .await?;
        report.teardown_after_switchover_ms = Some(switchover.elapsed().as_millis() as u64);
        self.timeline
            .step(Step::Report, async { Ok((Some(()), String::new())) })
            .await?;
        Ok(())
    }
}

/// Step 1: lowers the TTL; returns the old one.
async fn lower_ttl(p: &Plan) -> StepResult<u32> {
    let Some(dns) = &p.dns else {
        return Ok((None, "no DNS server given".to_owned()));
    };
    let old_ttl = dns.set_ttl(dns.low_ttl).await?;
    Ok((
        Some(old_ttl),
        format!("TTL {old_ttl} s → {} s", dns.low_ttl),
    ))
}

/// Between steps 1 and 2: caches forget the old answer.
async fn wait_out_ttl(
    p: &Plan,
    say: Say,
    old_ttl: u32,
    interrupt: &Interrupt,
) -> Result<(), Interrupted> {
    let wait = p.dns.as_ref().is_some_and(|d| d.wait_old_ttl);
    if wait && old_ttl > 0 {
        say.line(&format!(
            "waiting out the old TTL: {old_ttl} s (--skip-ttl-wait skips this)"
        ));
        interrupt
            .sleep(Duration::from_secs(u64::from(old_ttl)))
            .await?;
    }
    Ok(())
}

/// Step 2: the destination (tap, datapath, QEMU listening), and the source's datapath
/// with the session token.
async fn prepare_destination(
    p: &Plan,
    token: SessionToken,
    changed: &mut Changed,
) -> StepResult<()> {
    let source_status = p.source.status().await?;
    let source_vm = p
        .source
        .vm(&p.vm)
        .await
        .with_context(|| format!("the VM {} at the source", p.vm))?;
    if source_vm.run_state != RunState::Running {
        bail!(
            "the VM {} at the source is {}, not running",
            p.vm,
            source_vm.run_state
        );
    }
    let mut detail = Vec::new();
    match &source_status.datapath {
        Some(dp) if dp.mode == Mode::Track => {
            detail.push(format!("source tracking {} flows", dp.flows));
        }
        Some(dp) => bail!(
            "the source's datapath is in mode {}, not track: another migration?",
            dp.mode
        ),
        None => {
            changed.source_attached_by_us = true;
            detail.push(
                "source datapath attached now (connections opened before were not \
                 MSS-clamped)"
                    .to_owned(),
            );
        }
    }
    changed.source_reconfigured = true;
    p.source
        .apply_datapath(&p.datapath_request(token, Mode::Track, true))
        .await?;
    changed.destination_touched = true;
    p.destination
        .ensure_tap(
            &p.vm_iface,
            &TapRequest {
                gateway_mac: p.gateway_mac,
                gateway_cidr: p.gateway_cidr.clone(),
            },
        )
        .await?;
    p.destination
        .apply_datapath(&p.datapath_request(token, p.destination_mode(), false))
        .await?;
    let vm = p
        .destination
        .start_vm(&VmRequest {
            spec_toml: p.destination_spec_toml.clone(),
            incoming: true,
        })
        .await?;
    p.destination
        .prepare_incoming(
            &p.vm,
            &IncomingRequest {
                uri: p.migration_uri.clone(),
                settings: p.settings.clone(),
                mirror: p.mirror.clone(),
            },
        )
        .await?;
    detail.push(format!(
        "destination QEMU pid {} listening on {}, datapath in {}",
        vm.pid.unwrap_or_default(),
        p.migration_uri,
        p.destination_mode()
    ));
    Ok((Some(()), detail.join("; ")))
}

/// Step 3: the disk's full copy before RAM, so the switchover only adds what is still
/// dirty.
async fn mirror_disk(p: &Plan) -> StepResult<()> {
    let Some(mirror) = &p.mirror else {
        return Ok((None, "no disk in the VM spec".to_owned()));
    };
    let ready = p.source.start_mirror(&p.vm, mirror).await?;
    Ok((
        Some(()),
        format!(
            "{} bytes to nbd://{}:{}, READY after {} ms",
            ready.len, mirror.nbd_host, mirror.nbd_port, ready.ready_ms
        ),
    ))
}

/// Step 4: RAM, until the source stops at `pre-switchover`.
async fn migrate_ram(p: &Plan, say: Say, interrupt: &Interrupt) -> StepResult<()> {
    p.source
        .start_migration(
            &p.vm,
            &OutgoingRequest {
                uri: p.migration_uri.clone(),
                settings: p.settings.clone(),
                mirror: p.mirror.clone(),
            },
        )
        .await?;
    let mut last_said = Instant::now();
    loop {
        let state = p.source.migration(&p.vm).await?;
        match state.phase {
            MigrationPhase::AwaitingSwitchover => {
                let detail = state.progress.map_or_else(String::new, |pr| {
                    format!(
                        "{} bytes in {} passes, {:.0} Mbit/s",
                        pr.transferred, pr.passes, pr.mbps
                    )
                });
                return Ok((Some(()), detail));
            }
            MigrationPhase::Failed => {
                bail!("the migration failed: {}", state.error.unwrap_or_default())
            }
            MigrationPhase::Completed => {
                bail!("the migration completed without stopping at pre-switchover")
            }
            MigrationPhase::Running => {}
        }
        if let Some(progress) = &state.progress
            && last_said.elapsed() >= RAM_NOTE
        {
            last_said = Instant::now();
            say.ram(progress);
        }
        interrupt.sleep(MIGRATION_POLL).await?;
    }
}

/// Step 5: the pre-move flows to B, A forwards, the re-routing hook, and `continue`.
/// Returns the pre-move flows.
async fn flip(p: &Plan) -> StepResult<Vec<FlowEntry>> {
    let mut snapshot = p.source.flows().await?;
    snapshot.flows.retain(FlowEntry::is_tracked);
    p.destination.load_flows(&snapshot).await?;
    let FlowSnapshot { flows: premove, .. } = snapshot;
    p.source.set_mode(Mode::Forward).await?;
    if let Some(hook) = &p.on_switch {
        run_on_switch(p, hook).await?;
    }
    p.source.continue_migration(&p.vm, true).await?;
    let detail = format!(
        "{} pre-move flows handed to the destination; source forwards",
        premove.len()
    );
    Ok((Some(premove), detail))
}

/// Step 6: waits for the source to complete, then resumes the VM at the destination.
async fn complete(p: &Plan) -> StepResult<MigrationReport> {
    let report = loop {
        let state = p.source.migration(&p.vm).await?;
        match state.phase {
            MigrationPhase::Completed => {
                break state
                    .report
                    .context("a completed migration without report")?;
            }
            MigrationPhase::Failed if state.split => {
                return Err(anyhow!(PostcopyBroke(state.error.unwrap_or_default())));
            }
            MigrationPhase::Failed => bail!(
                "the migration failed after the flip: {}",
                state.error.unwrap_or_default()
            ),
            MigrationPhase::Running | MigrationPhase::AwaitingSwitchover => {
                tokio::time::sleep(MIGRATION_POLL).await
            }
        }
    };
    let vm = p.destination.finish_incoming(&p.vm).await?;
    // The source's QEMU reports the migration; only B knows how its VM runs.
    let report = MigrationReport {
        destination_status: vm.run_state.to_string(),
        ..report
    };
    let detail = format!(
        "downtime {} ms, total {} ms; destination {}",
        report.downtime_ms, report.total_time_ms, vm.run_state
    );
    Ok((Some(report), detail))
}

/// Step 7: `H` → `N` at the authoritative server; returns how long after the switchover
/// its answer changed.
async fn update_dns(p: &Plan, switchover: Instant) -> StepResult<u64> {
    let Some(new) = p.new_addr else {
        return Ok((
            None,
            "move address mode: the address moved, DNS unchanged".to_owned(),
        ));
    };
    let Some(dns) = &p.dns else {
        return Ok((None, "no DNS server given".to_owned()));
    };
    let (server, name) = (dns.zone_server(), dns.name.clone());
    let home = p.home;
    let start = std::time::Instant::now()
        .checked_sub(switchover.elapsed())
        .unwrap_or_else(std::time::Instant::now);
    let update = tokio::task::spawn_blocking(move || {
        records::replace_addresses(
            &server,
            &name,
            Some(&[home]),
            &[new],
            None,
            start,
            DNS_VERIFY,
        )
    })
    .await
    .context("the DNS task panicked")??;
    Ok((
        Some(update.answer_changed_after_ms),
        format!(
            "{} {home} → {new}, serial {} → {}; authoritative answer changed {} ms after \
             switchover",
            dns.name, update.before.serial, update.after.serial, update.answer_changed_after_ms
        ),
    ))
}

/// Step 8: the VM announces itself at B; in move address mode B's uplink claims `H`.
async fn announce(p: &Plan) -> StepResult<()> {
    p.destination.announce(&p.vm).await?;
    if p.new_addr.is_none() {
        p.destination.garp(p.home).await?;
        return Ok((
            Some(()),
            format!(
                "announce-self (RARP) from the VM; gratuitous ARP for {} from the \
                 destination's uplink",
                p.home
            ),
        ));
    }
    Ok((
        Some(()),
        "announce-self (RARP) from the destination".to_owned(),
    ))
}

/// Step 10: the tunnel goes; B keeps its NAT for `N` (the VM keeps `H` inside).
async fn teardown(p: &Plan, restore_ttl: Option<u32>, report: &mut Report) -> StepResult<()> {
    let last = p.source.status().await?;
    if let Some(dp) = &last.datapath {
        report.tunnel.packets_to_b = dp.counter(Counter::TunnelOut);
        report.tunnel.packets_from_b = dp.counter(Counter::TunnelIn);
    }
    p.source.detach_datapath().await?;
    let mut detail = if p.new_addr.is_some() {
        p.destination.set_mode(Mode::Nat).await?;
        "source detached; destination in nat".to_owned()
    } else {
        p.destination.detach_datapath().await?;
        "both sites detached".to_owned()
    };
    if let (Some(dns), Some(ttl)) = (&p.dns, restore_ttl) {
        dns.set_ttl(ttl).await?;
        detail.push_str(&format!("; TTL restored to {ttl} s"));
    }
    Ok((Some(()), detail))
}

/// Runs the operator's re-routing command (move address mode) while the source is
/// stopped at switchover; it gets the move's facts in its environment.
async fn run_on_switch(p: &Plan, hook: &str) -> Result<()> {
    let output = tokio::process::Command::new("sh")
        .args(["-c", hook])
        .env("MOVARTO_VM", &p.vm)
        .env("MOVARTO_HOME", p.home.to_string())
        .env("MOVARTO_SOURCE_TUNNEL", p.source_tunnel.to_string())
        .env(
            "MOVARTO_DESTINATION_TUNNEL",
            p.destination_tunnel.to_string(),
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
