//! The orchestrator's run: it lowers the TTL, creates the migration at the source's
//! agent, and then follows it, showing each of DESIGN.md's steps as the agents reach it.
//! The agents own the migration: if this process dies, they carry it on, and
//! `migrate --resume ID` (or the same `migrate` again) follows it from where it is and does
//! the DNS work it owes. The orchestrator holds the DNS key; the agents hold none.

use std::time::Duration;

use anyhow::{Context as _, Result, anyhow, bail};
use tokio::time::Instant;

use super::{
    interrupt::Interrupt,
    plan::{DNS_VERIFY, DnsTarget, Plan},
    progress::Step,
    report::Report,
    timeline::{ProgressFormat, Say, Timeline},
};
use crate::{
    agent::{
        AgentClient,
        api::{DnsDone, MigrationId, MigrationRecord, Role, Stage, unix_ms},
        client::retry_unreachable,
        token::random_hex,
    },
    dns::records,
    qemu::migrate::MigrationReport,
};

/// How long one look at the source's record waits for its stage to change; an
/// interrupt is noticed within it.
const POLL: Duration = Duration::from_millis(250);
/// How often the RAM copy's and the drain's progress are shown.
const NOTE_EVERY: Duration = Duration::from_secs(2);
/// How long a rollback may take once the source's agent has begun it.
const ROLLBACK_WAIT: Duration = Duration::from_secs(90);

/// What step a body returns: a value (`None`: skipped) and the detail for the report.
type StepResult<T> = Result<(Option<T>, String)>;

/// Why the run stopped following before the migration's end.
#[derive(Debug, thiserror::Error)]
enum Stopped {
    /// The migration rolled back, split or stopped safely; the record says why.
    #[error("the migration is {}", .0.stage)]
    Migration(Box<MigrationRecord>),
    /// Ctrl-C or SIGTERM after the switchover: the agents go on without us.
    #[error("interrupted by {0} after the switchover")]
    Detached(&'static str),
}

/// Everything a run follows the migration with.
struct Follow<'a> {
    source: &'a AgentClient,
    dns: Option<&'a DnsTarget>,
    id: MigrationId,
    say: Say,
    interrupt: &'a Interrupt,
    /// How long an unreachable agent is retried before a step fails.
    agent_timeout: Duration,
    /// The abort was sent (Ctrl-C before the switchover), for this signal.
    abort_sent: Option<&'static str>,
}

/// Runs (or, when the source's agent already has one for this VM, follows) the
/// migration; never panics, and always returns a report.
pub async fn run_plan(plan: &Plan, progress: ProgressFormat) -> Report {
    let say = Say::new(progress);
    let mut report = Report {
        vm: plan.vm.clone(),
        address_mode: plan.address_mode().name().to_owned(),
        ..Report::default()
    };
    let mut timeline = Timeline::new(say);
    let interrupt = Interrupt::listen();
    let outcome = start_or_find(plan, say, &mut timeline, &interrupt).await;
    let result = match outcome {
        Ok(id) => {
            let mut follow = Follow {
                source: &plan.source,
                dns: plan.dns.as_ref(),
                id,
                say,
                interrupt: &interrupt,
                agent_timeout: plan.agent_timeout,
                abort_sent: None,
            };
            follow.run(&mut timeline, &mut report).await
        }
        Err((err, lowered_from)) => {
            if let (Some(dns), Some(ttl)) = (&plan.dns, lowered_from) {
                report.rolled_back = Some(match dns.set_ttl(ttl).await {
                    Ok(_) => format!("nothing was started; DNS TTL restored to {ttl} s"),
                    Err(e) => format!("nothing was started; DNS TTL NOT undone: {e:#}"),
                });
            }
            Err(err)
        }
    };
    finish(report, timeline, say, result)
}

/// `migrate --resume ID`: follows a migration the agents run, from wherever it is.
pub async fn resume(
    source: &AgentClient,
    id: MigrationId,
    dns_key: Option<crate::dns::key::TsigKey>,
    agent_timeout: Duration,
    progress: ProgressFormat,
) -> Report {
    let say = Say::new(progress);
    let mut timeline = Timeline::new(say);
    let interrupt = Interrupt::listen();
    let mut report = Report::default();
    let record = match retry_unreachable(agent_timeout, || source.migration_record(&id)).await {
        Ok(record) => record,
        Err(err) => {
            report.error = Some(format!("{err:#}"));
            return report;
        }
    };
    report.vm = record.spec.vm.clone();
    report.address_mode = if record.spec.new_addr.is_some() {
        "nat"
    } else {
        "move"
    }
    .to_owned();
    let dns = match (&record.spec.dns, dns_key) {
        (Some(plan), Some(key)) => match DnsTarget::from_record(plan, key) {
            Ok(dns) => Some(dns),
            Err(err) => {
                report.error = Some(format!("{err:#}"));
                return report;
            }
        },
        (Some(_), None)
            if record.dns_owed.switch
                || record.dns_owed.restore_ttl
                || record.dns_owed.switch_back =>
        {
            report.error = Some(format!(
                "migration {id} owes DNS work ({}): give --dns-key-file",
                owed_text(&record)
            ));
            return report;
        }
        _ => None,
    };
    say.line(&format!("following migration {id} ({})", record.stage));
    let mut follow = Follow {
        source,
        dns: dns.as_ref(),
        id,
        say,
        interrupt: &interrupt,
        agent_timeout,
        abort_sent: None,
    };
    let result = follow.run(&mut timeline, &mut report).await;
    finish(report, timeline, say, result)
}

fn owed_text(record: &MigrationRecord) -> String {
    let mut owed = Vec::new();
    if record.dns_owed.switch {
        owed.push("the switch to N");
    }
    if record.dns_owed.switch_back {
        owed.push("the switch back to H");
    }
    if record.dns_owed.restore_ttl {
        owed.push("the TTL's restoration");
    }
    owed.join(" and ")
}

/// Step 1 and the migration's creation, or the migration the source already runs for
/// this VM. Errors carry the TTL this run lowered, to restore.
async fn start_or_find(
    plan: &Plan,
    say: Say,
    timeline: &mut Timeline,
    interrupt: &Interrupt,
) -> Result<MigrationId, (anyhow::Error, Option<u32>)> {
    let fail = |err: anyhow::Error| (err, None);
    for agent in [&plan.source, &plan.destination] {
        retry_unreachable(plan.agent_timeout, || agent.health())
            .await
            .with_context(|| format!("checking the agent at {}", agent.base()))
            .map_err(fail)?;
    }
    let known = retry_unreachable(plan.agent_timeout, || plan.source.migrations())
        .await
        .map_err(|e| fail(e.into()))?;
    let of_vm: Vec<&MigrationRecord> = known.iter().filter(|r| r.spec.vm == plan.vm).collect();
    // The same migrate again: the one in progress (or finished, with DNS work owed)
    // from this source. A move that arrived here (its drain may still run) is not it.
    if let Some(current) = of_vm.iter().rev().find(|r| {
        r.role == Role::Source
            && (!r.stage.is_final()
                || (r.stage == Stage::Done && (r.dns_owed.switch || r.dns_owed.restore_ttl)))
    }) {
        say.line(&format!(
            "migration {} of {} is {} already: following it (resume it elsewhere with \
             --resume {})",
            current.id(),
            plan.vm,
            current.stage,
            current.id()
        ));
        return Ok(current.id().clone());
    }
    interrupt.check().map_err(|e| fail(e.into()))?;
    // A TTL already at the low value may be an earlier, dead run's: its record knows
    // the TTL to restore.
    let remembered = of_vm
        .iter()
        .rev()
        .find_map(|r| r.spec.dns.as_ref().map(|d| d.original_ttl));
    let lowered = timeline
        .step(Step::LowerTtl, lower_ttl(plan))
        .await
        .map_err(fail)?;
    let original_ttl = match (lowered, &plan.dns) {
        (Some(old), Some(dns)) if old == dns.low_ttl => remembered.unwrap_or(old),
        (Some(old), _) => old,
        (None, _) => 0,
    };
    let undo = lowered.map(|_| original_ttl);
    let ttl_wait = plan.dns.as_ref().is_some_and(|d| d.wait_old_ttl);
    if let Some(old) = lowered
        && ttl_wait
        && old > 0
    {
        say.line(&format!(
            "waiting out the old TTL: {old} s (--skip-ttl-wait skips this)"
        ));
        interrupt
            .sleep(Duration::from_secs(u64::from(old)))
            .await
            .map_err(|e| (e.into(), undo))?;
    }
    interrupt.check().map_err(|e| (e.into(), undo))?;
    let id = new_id(&plan.vm).map_err(|e| (e, undo))?;
    let spec = plan.spec(id.clone(), original_ttl);
    retry_unreachable(plan.agent_timeout, || plan.source.create_migration(&spec))
        .await
        .with_context(|| format!("creating the migration at {}", plan.source.base()))
        .map_err(|e| (e, undo))?;
    say.line(&format!(
        "migration {id} created; the agents run it (if this command stops, resume with \
         --resume {id})"
    ));
    Ok(id)
}

/// `<vm>-<unix seconds>-<4 random hex>`, cut to the id's 64 characters.
fn new_id(vm: &str) -> Result<MigrationId> {
    let secs = unix_ms() / 1000;
    let mut vm: String = vm
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    vm.truncate(40);
    MigrationId::new(&format!("{vm}-{secs}-{}", random_hex(2)?)).map_err(|e| anyhow!(e))
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

impl Follow<'_> {
    /// The source's record, retried while its agent is unreachable (it restarts).
    async fn record(&self) -> Result<MigrationRecord> {
        Ok(retry_unreachable(self.agent_timeout, || {
            self.source.migration_record(&self.id)
        })
        .await?)
    }

    /// Waits until the migration has passed `stage` (or reached `Done`); a rollback, a
    /// split or a safe stop ends the wait with [`Stopped::Migration`].
    async fn past(&mut self, stage: Stage) -> Result<MigrationRecord> {
        let mut last_note = Instant::now();
        let mut seen = None;
        loop {
            let record = match seen {
                None => self.record().await?,
                // A long poll: the switchover's news comes at once (DNS goes out then).
                Some(from) => {
                    retry_unreachable(self.agent_timeout, || {
                        self.source.migration_record_changed(&self.id, from, POLL)
                    })
                    .await?
                }
            };
            seen = Some(record.stage);
            if matches!(
                record.stage,
                Stage::RollingBack | Stage::RolledBack | Stage::Split | Stage::Stopped
            ) {
                return Err(Stopped::Migration(Box::new(record)).into());
            }
            if record.stage > stage || record.stage == Stage::Done {
                return Ok(record);
            }
            if let Err(interrupted) = self.interrupt.check() {
                if record.stage.past_switchover() {
                    return Err(Stopped::Detached(interrupted.0).into());
                }
                if self.abort_sent.is_none() {
                    self.say.line(&format!(
                        "{interrupted}: rolling back (the VM keeps running at the source)"
                    ));
                    match self.source.abort_migration(&self.id).await {
                        Ok(_) => self.abort_sent = Some(interrupted.0),
                        // Refused: the switchover came first; the next look says so.
                        Err(err) => tracing::debug!("abort: {err}"),
                    }
                }
            }
            if last_note.elapsed() >= NOTE_EVERY {
                last_note = Instant::now();
                match record.stage {
                    Stage::CopyingRam => {
                        if let Some(progress) = &record.progress {
                            self.say.ram(progress);
                        }
                    }
                    Stage::Draining => self.say.line(&format!(
                        "  drain: {} bytes of pre-move flows since the switchover{}",
                        record.figures.premove_bytes,
                        if record.dns_owed.switch {
                            "; the DNS switch is owed"
                        } else {
                            ""
                        }
                    )),
                    _ => {}
                }
            }
        }
    }

    /// Follows steps 2 to 11, doing the DNS work as it falls due.
    async fn all_steps(&mut self, timeline: &mut Timeline, report: &mut Report) -> Result<()> {
        timeline
            .step(Step::PrepareDestination, async {
                let r = self.past(Stage::PreparingDestination).await?;
                Ok((
                    Some(()),
                    details(&r, &[Stage::Accepted, Stage::PreparingDestination]),
                ))
            })
            .await?;
        timeline
            .step(Step::MirrorDisk, async {
                let r = self.past(Stage::MirroringDisk).await?;
                if r.spec.mirror.is_none() {
                    return Ok((None, "no disk in the VM spec".to_owned()));
                }
                Ok((Some(()), details(&r, &[Stage::MirroringDisk])))
            })
            .await?;
        timeline
            .step(Step::MigrateRam, async {
                let r = self.past(Stage::CopyingRam).await?;
                let detail = r.progress.as_ref().map_or_else(String::new, |pr| {
                    format!(
                        "{} bytes in {} passes, {:.0} Mbit/s",
                        pr.transferred, pr.passes, pr.mbps
                    )
                });
                Ok((Some(()), detail))
            })
            .await?;
        let switched = timeline
            .step(Step::Switchover, async {
                let r = self.past(Stage::SwitchingOver).await?;
                let mut detail = details(&r, &[Stage::SwitchingOver]);
                if let Some(us) = r.figures.flip_us {
                    detail.push_str(&format!(
                        "; flipped {:.1} ms after the source stopped",
                        us as f64 / 1000.0
                    ));
                }
                Ok((Some(r), detail))
            })
            .await?;
        report.flip_us = switched.as_ref().and_then(|r| r.figures.flip_us);
        // Steps 6 and 7 together: the DNS update goes out at the switchover, while QEMU
        // completes, so that new clients learn `N` while the VM resumes there.
        let dns_switch = switch_dns(
            self.source,
            self.dns,
            self.id.clone(),
            self.agent_timeout,
            switched,
        );
        let complete = async {
            let r = self.past(Stage::Continued).await?;
            let qemu = r.figures.qemu.clone().map(|q| MigrationReport {
                destination_status: r.figures.destination_status.clone().unwrap_or_default(),
                ..q
            });
            let detail = qemu.as_ref().map_or_else(String::new, |q| {
                format!(
                    "downtime {} ms, total {} ms; destination {}",
                    q.downtime_ms, q.total_time_ms, q.destination_status
                )
            });
            Ok((Some(qemu), detail))
        };
        let (completed, dns_switched) = timeline
            .two_steps((Step::Complete, complete), (Step::DnsUpdate, dns_switch))
            .await;
        report.qemu = completed?.flatten();
        report.dns_switch_ms = dns_switched?;
        timeline
            .step(Step::Announce, async {
                let r = self.past(Stage::Running).await?;
                let detail = if r.spec.new_addr.is_some() {
                    "announce-self (RARP) from the destination".to_owned()
                } else {
                    format!(
                        "announce-self (RARP) from the VM; gratuitous ARP for {} from the \
                         destination's uplink",
                        r.spec.home
                    )
                };
                Ok((Some(()), detail))
            })
            .await?;
        let drained = timeline
            .step(Step::Drain, async {
                let r = self.past(Stage::Draining).await?;
                Ok((Some(r.clone()), details(&r, &[Stage::Draining])))
            })
            .await?;
        if let Some(r) = &drained {
            fill_figures(report, r);
        }
        timeline
            .step(Step::Teardown, async {
                let r = self.record().await?;
                let mut detail = vec![details(&r, &[Stage::Done])];
                if r.dns_owed.restore_ttl {
                    detail.push(self.restore_ttl(&r).await?);
                }
                detail.retain(|d| !d.is_empty());
                Ok((Some(()), detail.join("; ")))
            })
            .await?;
        timeline
            .step(Step::Report, async { Ok((Some(()), String::new())) })
            .await?;
        Ok(())
    }

    /// The TTL back to what it was before the move; says so for the report.
    async fn restore_ttl(&self, r: &MigrationRecord) -> Result<String> {
        let (Some(dns), Some(plan)) = (self.dns, &r.spec.dns) else {
            bail!("the TTL's restoration is owed, but no DNS key was given");
        };
        dns.set_ttl(plan.original_ttl).await?;
        let done = DnsDone {
            switched: false,
            ttl_restored: true,
            switch_ms: None,
            switched_back: false,
        };
        retry_unreachable(self.agent_timeout, || self.source.dns_done(&self.id, &done)).await?;
        Ok(format!("TTL restored to {} s", plan.original_ttl))
    }

    /// After a rollback past the switchover: `N` → `H` again at the authoritative server.
    async fn switch_dns_back(&self, r: &MigrationRecord) -> Result<String> {
        let (Some(dns), Some(new)) = (self.dns, r.spec.new_addr) else {
            bail!("no DNS key was given");
        };
        if r.spec.moves_home() {
            bail!(
                "a move home does not know the address it replaced; set it with `movarto-user dns`"
            );
        }
        let (server, name, home) = (dns.zone_server(), dns.name.clone(), r.spec.home);
        let text = tokio::task::spawn_blocking(move || -> Result<String> {
            // An orchestrator that died after the update, before it told the agent, left
            // it done: nothing to do again.
            let now = records::show(&server, &name)?;
            let rrset = if home.is_ipv4() { &now.a } else { &now.aaaa };
            if rrset.addresses == [home] {
                return Ok(format!("names {home} already (switched back before)"));
            }
            let update = records::replace_addresses(
                &server,
                &name,
                Some(&[new]),
                &[home],
                None,
                std::time::Instant::now(),
                DNS_VERIFY,
            )?;
            Ok(format!(
                "switched back {new} → {home}, serial {} → {}",
                update.before.serial, update.after.serial
            ))
        })
        .await
        .context("the DNS task panicked")??;
        let done = DnsDone {
            switched: false,
            ttl_restored: false,
            switch_ms: None,
            switched_back: true,
        };
        retry_unreachable(self.agent_timeout, || self.source.dns_done(&self.id, &done)).await?;
        Ok(text)
    }

    /// After a rollback: waits until it is done, switches DNS back if it was switched,
    /// then restores the TTL.
    async fn after_rollback(&self, mut record: MigrationRecord) -> String {
        let deadline = Instant::now() + ROLLBACK_WAIT;
        while (record.stage == Stage::RollingBack
            || (record.stage == Stage::RolledBack && !record.figures.rollback_finished))
            && Instant::now() < deadline
        {
            tokio::time::sleep(POLL).await;
            match self.record().await {
                Ok(r) => record = r,
                Err(err) => return format!("NOT undone: the rollback's end unknown: {err:#}"),
            }
        }
        let mut summary = record
            .figures
            .rolled_back
            .clone()
            .unwrap_or_else(|| format!("NOT undone: the migration is {}", record.stage));
        if record.dns_owed.switch_back {
            // The switch went out at the switchover, and the VM stayed at the source.
            match self.switch_dns_back(&record).await {
                Ok(text) => summary.push_str(&format!("; DNS {text}")),
                Err(err) => summary.push_str(&format!("; DNS NOT switched back: {err:#}")),
            }
        }
        if record.dns_owed.restore_ttl && self.dns.is_some() {
            match self.restore_ttl(&record).await {
                Ok(text) => summary.push_str(&format!("; DNS {text}")),
                Err(err) => summary.push_str(&format!("; DNS TTL NOT undone: {err:#}")),
            }
        }
        summary
    }
}

/// Step 7, from the switchover on: `H` → `N` at the authoritative server, if the move
/// still owes it; returns how long after the switchover its answer changed.
async fn switch_dns(
    source: &AgentClient,
    dns: Option<&DnsTarget>,
    id: MigrationId,
    agent_timeout: Duration,
    switched: Option<MigrationRecord>,
) -> StepResult<u64> {
    let Some(r) = switched else {
        bail!("the switchover step gave no record");
    };
    let Some(new) = r.spec.new_addr else {
        return Ok((
            None,
            "move address mode: the address moved, DNS unchanged".to_owned(),
        ));
    };
    if !r.dns_owed.switch {
        return match r.figures.dns_switch_ms {
            Some(ms) => Ok((Some(ms), "switched by an earlier run".to_owned())),
            None => Ok((None, "no DNS server given".to_owned())),
        };
    }
    let dns = dns.context("the DNS switch is owed, but no DNS server and key were given")?;
    let switchover_ms = r.figures.switchover_unix_ms.unwrap_or_else(unix_ms);
    let since = Duration::from_millis(unix_ms().saturating_sub(switchover_ms));
    let start = std::time::Instant::now()
        .checked_sub(since)
        .unwrap_or_else(std::time::Instant::now);
    // Moving home, the record holds the last move's `N`: the update takes what the
    // server holds (still atomic). Otherwise it must hold `H`.
    let expected = (!r.spec.moves_home()).then_some([r.spec.home]);
    let (server, name, home) = (dns.zone_server(), dns.name.clone(), r.spec.home);
    let update = tokio::task::spawn_blocking(move || {
        records::replace_addresses(
            &server,
            &name,
            expected.as_ref().map(|e| &e[..]),
            &[new],
            None,
            start,
            DNS_VERIFY,
        )
    })
    .await
    .context("the DNS task panicked")??;
    let done = DnsDone {
        switched: true,
        ttl_restored: false,
        switched_back: false,
        switch_ms: Some(update.answer_changed_after_ms),
    };
    retry_unreachable(agent_timeout, || source.dns_done(&id, &done)).await?;
    Ok((
        Some(update.answer_changed_after_ms),
        format!(
            "{} {} → {new}, serial {} → {}; authoritative answer changed {} ms after \
             switchover",
            dns.name,
            shown_addresses(&update.before, home),
            update.before.serial,
            update.after.serial,
            update.answer_changed_after_ms
        ),
    ))
}

/// The record's notes for these stages.
fn details(r: &MigrationRecord, stages: &[Stage]) -> String {
    r.history
        .iter()
        .filter(|c| stages.contains(&c.stage) && !c.detail.is_empty())
        .map(|c| c.detail.clone())
        .collect::<Vec<_>>()
        .join("; ")
}

fn fill_figures(report: &mut Report, r: &MigrationRecord) {
    let f = &r.figures;
    report.flows_at_switchover = f.flows_at_switchover;
    report.flows_cut = f.flows_cut.clone();
    report.flows_drained = f.flows_at_switchover.saturating_sub(f.flows_cut.len());
    report.tunnel.packets_to_b = f.packets_to_b;
    report.tunnel.packets_from_b = f.packets_from_b;
    report.tunnel.premove_bytes = f.premove_bytes;
    report.drain_ms = f.drain_ms;
    if let (Some(switchover), Some(teardown)) = (f.switchover_unix_ms, f.teardown_unix_ms) {
        report.teardown_after_switchover_ms = Some(teardown.saturating_sub(switchover));
    }
    if report.dns_switch_ms.is_none() {
        report.dns_switch_ms = f.dns_switch_ms;
    }
    report.continue_us = f.continue_us.or(report.continue_us);
    report.vm_paused_ms = f.vm_paused_us().map(|us| us as f64 / 1000.0);
    report.lost_at_switchover = f.lost_at_switchover();
    report.stranded_at_source = f.stranded_at_source;
    report.dropped_at_destination_tap = f.dropped_at_destination_tap;
}

/// The addresses `before` held of `home`'s family (moving home: the last move's `N`).
fn shown_addresses(before: &records::ServiceRecords, home: std::net::IpAddr) -> String {
    let rrset = if home.is_ipv4() {
        &before.a
    } else {
        &before.aaaa
    };
    match rrset.addresses.as_slice() {
        [] => "(none)".to_owned(),
        addrs => addrs
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", "),
    }
}

/// What the operator reads when post-copy broke: undoing anything would lose the VM.
const SPLIT_GUIDANCE: &str = "Nothing was rolled back: the VM's memory is split between the \
    source (paused, holding the pages the destination lacks) and the destination, so stopping \
    either loses it. The agents resumed post-copy on new connections until \
    --postcopy-recover-timeout ran out (or the destination's QEMU exited). If QEMU at the \
    destination still runs, mend the link and resume with QMP `migrate-recover` at the \
    destination and `migrate` with `resume: true` at the source; \
    if it exited, the VM's RAM is lost: quit the source's QEMU and boot the VM again from \
    its disk. Both datapaths are left as they are (source forwards, destination receives), \
    and DNS names the destination's address, as it has since the switchover (a VM booted \
    again at the source wants `movarto-user dns` to set the home address back)";

fn finish(mut report: Report, mut timeline: Timeline, say: Say, result: Result<()>) -> Report {
    match result {
        Ok(()) => report.succeeded = true,
        Err(err) => report.error = Some(format!("{err:#}")),
    }
    report.steps = std::mem::take(&mut timeline.steps);
    report.total_ms = say.ms();
    report
}

impl Follow<'_> {
    /// Follows the migration to its end; a stop is explained for the report.
    async fn run(&mut self, timeline: &mut Timeline, report: &mut Report) -> Result<()> {
        match self.all_steps(timeline, report).await {
            Ok(()) => Ok(()),
            Err(err) => Err(self.explain(err, report).await),
        }
    }

    /// Turns a stop into the report's words (and finishes a rollback's DNS work).
    async fn explain(&self, err: anyhow::Error, report: &mut Report) -> anyhow::Error {
        match err.downcast::<Stopped>() {
            Ok(Stopped::Migration(record)) => {
                let mut why = record.error.clone().unwrap_or_default();
                if let Some(signal) = self.abort_sent {
                    why = format!("interrupted by {signal} ({why})");
                }
                match record.stage {
                    Stage::RollingBack | Stage::RolledBack => {
                        report.rolled_back = Some(self.after_rollback(*record).await);
                        anyhow!("{why}")
                    }
                    Stage::Split => anyhow!(
                        "post-copy broke after the VM started at the destination ({why}). \
                         {SPLIT_GUIDANCE}"
                    ),
                    stage => anyhow!(
                        "the migration {} is {stage}: {why}. Nothing more is done by itself; \
                         the agents' records (GET /v1/migrations/{}) show both halves",
                        self.id,
                        self.id
                    ),
                }
            }
            Ok(Stopped::Detached(signal)) => anyhow!(
                "interrupted by {signal} after the switchover: the migration goes on in the \
                 agents (the VM runs at the destination). Follow it again, and do the DNS work \
                 it owes, with `movarto-user migrate --resume {} --source {} \
                 --source-token-file FILE [--dns-key-file FILE]`",
                self.id,
                self.source.base()
            ),
            Err(err) => anyhow!(
                "{err:#}. The migration itself goes on in the agents; follow it again with \
                 `movarto-user migrate --resume {} --source {} --source-token-file FILE \
                 [--dns-key-file FILE]`",
                self.id,
                self.source.base()
            ),
        }
    }
}
