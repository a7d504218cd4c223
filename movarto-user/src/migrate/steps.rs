//! The migration's steps, in DESIGN.md's order, each timed and recorded.

use std::{
    collections::HashMap,
    future::Future,
    io::Write as _,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::Duration,
};

use anyhow::{Context as _, Result, anyhow, bail};
use hickory_proto::rr::Name;
use movarto_common::{
    config::Mode,
    flow::origin,
    ids::{MacAddr, SessionToken},
};
use tokio::time::Instant;

use super::report::{Outcome, Report, StepRecord};
use crate::{
    agent::{
        AgentClient,
        api::{
            DatapathRequest, FlowRecord, IncomingRequest, MigrationPhase, MigrationSettings,
            MirrorSettings, OutgoingRequest, TapRequest, VmRequest,
        },
        token::random_session_token,
    },
    dns::{client::ZoneServer, key::TsigKey, records},
    qemu::migrate::MigrationReport,
};

/// How often the orchestrator polls a running migration and the drain.
const MIGRATION_POLL: Duration = Duration::from_millis(100);
const DRAIN_POLL: Duration = Duration::from_millis(500);
/// How long the DNS change may take to show on the authoritative server.
const DNS_VERIFY: Duration = Duration::from_secs(10);

pub struct DnsTarget {
    pub server: SocketAddr,
    pub zone: Name,
    pub name: Name,
    pub key: TsigKey,
    pub low_ttl: u32,
    pub wait_old_ttl: bool,
}

impl Plan {
    pub fn address_mode(&self) -> &'static str {
        if self.new_addr.is_some() {
            "nat"
        } else {
            "move"
        }
    }

    /// Site B's mode while the tunnel lives.
    fn destination_mode(&self) -> Mode {
        if self.new_addr.is_some() {
            Mode::Receive
        } else {
            Mode::Direct
        }
    }
}

impl DnsTarget {
    fn zone_server(&self) -> ZoneServer {
        ZoneServer::new(self.server, self.zone.clone(), Some(self.key.clone()))
    }

    /// Sets the name's TTL (the DNS client blocks: off the async threads); returns the
    /// longest old TTL.
    async fn set_ttl(&self, ttl: u32) -> Result<u32> {
        let (server, name) = (self.zone_server(), self.name.clone());
        let (_, old_ttl) =
            tokio::task::spawn_blocking(move || records::set_ttl(&server, &name, ttl, DNS_VERIFY))
                .await
                .context("the DNS task panicked")??;
        Ok(old_ttl)
    }
}

/// Everything a migration needs, checked.
pub struct Plan {
    pub vm: String,
    pub source: AgentClient,
    pub destination: AgentClient,
    pub destination_spec_toml: String,
    pub vm_mac: MacAddr,
    pub home: IpAddr,
    /// `N` in nat address mode; `None` in move address mode (`H` itself moves).
    pub new_addr: Option<IpAddr>,
    /// Move address mode: the command that re-routes `H` to the destination.
    pub on_switch: Option<String>,
    pub source_tunnel: Ipv4Addr,
    pub destination_tunnel: Ipv4Addr,
    pub migration_uri: String,
    pub vm_iface: String,
    pub gateway_mac: MacAddr,
    pub gateway_cidr: String,
    pub tunnel_mtu: u16,
    pub dns: Option<DnsTarget>,
    pub settings: MigrationSettings,
    /// Set when the VM has a disk: mirrored over NBD to the destination.
    pub mirror: Option<MirrorSettings>,
    pub urgent: bool,
    pub max_drain: Duration,
    pub drain_grace: Option<Duration>,
}

/// What has been changed so far: what a rollback must undo.
#[derive(Default)]
struct Changed {
    ttl_lowered_from: Option<u32>,
    source_attached_by_us: bool,
    source_reconfigured: bool,
    destination_touched: bool,
    migration_started: bool,
}

/// Progress lines on stderr, stamped with the time since the start.
#[derive(Clone, Copy)]
struct Say {
    started: Instant,
    progress: bool,
}

impl Say {
    fn line(self, line: &str) {
        if self.progress {
            let mut err = std::io::stderr().lock();
            let _ = writeln!(
                err,
                "[{:>7.1}s] {line}",
                self.started.elapsed().as_secs_f64()
            );
        }
    }

    fn ms(self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }
}

struct Timeline {
    say: Say,
    steps: Vec<StepRecord>,
}

impl Timeline {
    /// Runs one step and records its timing and outcome. `Ok((None, why))` from the body
    /// means skipped.
    async fn step<T>(
        &mut self,
        number: u8,
        name: &str,
        body: impl Future<Output = Result<(Option<T>, String)>>,
    ) -> Result<Option<T>> {
        let start_ms = self.say.ms();
        self.say.line(&format!("step {number:>2}/11 {name} ..."));
        let result = body.await;
        let end_ms = self.say.ms();
        let (outcome, detail, value) = match result {
            Ok((Some(value), detail)) => (Outcome::Ok, detail, Ok(Some(value))),
            Ok((None, detail)) => (Outcome::Skipped, detail, Ok(None)),
            Err(err) => (Outcome::Failed, format!("{err:#}"), Err(err)),
        };
        self.say.line(&format!(
            "step {number:>2}/11 {name}: {} ({} ms) {detail}",
            match outcome {
                Outcome::Ok => "ok",
                Outcome::Skipped => "skipped",
                Outcome::Failed => "FAILED",
            },
            end_ms - start_ms
        ));
        self.steps.push(StepRecord {
            number,
            name: name.to_owned(),
            start_ms,
            end_ms,
            outcome,
            detail,
        });
        value
    }
}

struct Run<'a> {
    plan: &'a Plan,
    token: SessionToken,
    say: Say,
    timeline: Timeline,
    report: Report,
    changed: Changed,
    /// A's pre-move flows at switchover.
    switchover_flows: Vec<FlowRecord>,
}

/// Runs the whole migration; never panics, and always returns a report.
pub async fn run_plan(plan: &Plan, progress: bool) -> Report {
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
    let say = Say {
        started: Instant::now(),
        progress,
    };
    let mut run = Run {
        plan,
        token,
        say,
        timeline: Timeline {
            say,
            steps: Vec::new(),
        },
        report: Report {
            vm: plan.vm.clone(),
            address_mode: plan.address_mode().to_owned(),
            ..Report::default()
        },
        changed: Changed::default(),
        switchover_flows: Vec::new(),
    };
    let outcome = run.all_steps().await;
    match outcome {
        Ok(()) => run.report.succeeded = true,
        Err(Failure::BeforeSwitchover(err)) => {
            run.report.error = Some(format!("{err:#}"));
            run.report.rolled_back = Some(run.roll_back().await);
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
#[derive(Debug)]
struct PostcopyBroke(String);

impl std::fmt::Display for PostcopyBroke {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "post-copy broke after the VM started at the destination ({})",
            self.0
        )
    }
}

impl std::error::Error for PostcopyBroke {}

/// What the operator reads when post-copy broke: undoing anything would lose the VM.
const SPLIT_GUIDANCE: &str = "Nothing was rolled back: the VM's memory is split between the \
    source (paused, holding the pages the destination lacks) and the destination, so stopping \
    either loses it. If QEMU at the destination still runs, mend the link and resume with QMP \
    `migrate-recover` at the destination and `migrate` with `resume: true` at the source; \
    if it exited, the VM's RAM is lost: quit the source's QEMU and boot the VM again from \
    its disk. Both datapaths are left as they are (source forwards, destination receives)";

fn datapath_request(p: &Plan, token: SessionToken, mode: Mode, at_source: bool) -> DatapathRequest {
    {
        let (local, peer) = if at_source {
            (p.source_tunnel, p.destination_tunnel)
        } else {
            (p.destination_tunnel, p.source_tunnel)
        };
        DatapathRequest {
            vm_iface: p.vm_iface.clone(),
            mode,
            home_addr: p.home,
            new_addr: if at_source { None } else { p.new_addr },
            local_tunnel_addr: local,
            peer_tunnel_addr: peer,
            token,
            tunnel_mtu: p.tunnel_mtu,
            vm_mac: p.vm_mac,
            gateway_mac: p.gateway_mac,
        }
    }
}

impl Run<'_> {
    async fn all_steps(&mut self) -> Result<(), Failure> {
        self.before_switchover()
            .await
            .map_err(Failure::BeforeSwitchover)?;
        // The source still runs until `continue`; a failure up to completion resumes it.
        let switchover = self.switchover().await.map_err(Failure::BeforeSwitchover)?;
        let completed = self.complete(switchover).await.map_err(|err| {
            if err.is::<PostcopyBroke>() {
                Failure::Split(err)
            } else {
                Failure::BeforeSwitchover(err)
            }
        })?;
        self.after_switchover(completed)
            .await
            .map_err(Failure::AfterSwitchover)
    }

    async fn before_switchover(&mut self) -> Result<()> {
        let Run {
            plan,
            token,
            say,
            timeline,
            changed,
            ..
        } = self;
        let (p, say): (&Plan, Say) = (*plan, *say);
        for agent in [&p.source, &p.destination] {
            agent
                .health()
                .await
                .with_context(|| format!("checking the agent at {}", agent.base()))?;
        }

        // 1. TTL.
        let lowered = timeline
            .step(1, "lower DNS TTL", async {
                let Some(dns) = &p.dns else {
                    return Ok((None, "no DNS server given".to_owned()));
                };
                let old_ttl = dns.set_ttl(dns.low_ttl).await?;
                Ok((
                    Some(old_ttl),
                    format!("TTL {old_ttl} s → {} s", dns.low_ttl),
                ))
            })
            .await?;
        if let Some(old_ttl) = lowered {
            changed.ttl_lowered_from = Some(old_ttl);
            let wait = p.dns.as_ref().is_some_and(|d| d.wait_old_ttl);
            if wait && old_ttl > 0 {
                say.line(&format!(
                    "waiting out the old TTL: {old_ttl} s (--skip-ttl-wait skips this)"
                ));
                tokio::time::sleep(Duration::from_secs(u64::from(old_ttl))).await;
            }
        }

        // 2. The destination, and the source's datapath with the session token.
        timeline
            .step(2, "prepare destination", async {
                let source_status = p.source.status().await?;
                let source_vm = p
                    .source
                    .vm(&p.vm)
                    .await
                    .with_context(|| format!("the VM {} at the source", p.vm))?;
                if source_vm.run_state != "running" {
                    bail!(
                        "the VM {} at the source is {}, not running",
                        p.vm,
                        source_vm.run_state
                    );
                }
                let mut detail = Vec::new();
                match &source_status.datapath {
                    Some(dp) if dp.mode == "track" => {
                        detail.push(format!("source tracking {} flows", dp.flows));
                    }
                    Some(dp) => bail!(
                        "the source's datapath is in mode {}, not track: another migration?",
                        dp.mode
                    ),
                    None => {
                        changed.source_attached_by_us = true;
                        detail.push(
                            "source datapath attached now (connections opened before were \
                         not MSS-clamped)"
                                .to_owned(),
                        );
                    }
                }
                changed.source_reconfigured = true;
                p.source
                    .apply_datapath(&datapath_request(p, *token, Mode::Track, true))
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
                    .apply_datapath(&datapath_request(p, *token, p.destination_mode(), false))
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
                    if p.new_addr.is_some() {
                        "receive"
                    } else {
                        "direct"
                    }
                ));
                Ok((Some(()), detail.join("; ")))
            })
            .await?;

        // 3. Disk: the full copy before RAM, so the switchover only adds what is still dirty.
        timeline
            .step(3, "mirror disk", async {
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
            })
            .await?;
        Ok(())
    }

    /// 4 and 5: RAM until `pre-switchover`, then the flip. Returns the switchover instant.
    async fn switchover(&mut self) -> Result<Instant> {
        let Run {
            plan,
            say,
            timeline,
            changed,
            report,
            switchover_flows,
            ..
        } = self;
        let (p, say): (&Plan, Say) = (*plan, *say);
        changed.migration_started = true;
        timeline
            .step(4, "migrate RAM", async {
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
                    if let Some(pr) = &state.progress
                        && last_said.elapsed() >= Duration::from_secs(1)
                    {
                        last_said = Instant::now();
                        say.line(&format!(
                            "  RAM: {} {} of {} MiB sent, {} MiB left, {:.0} Mbit/s, pass {}",
                            pr.status,
                            pr.transferred >> 20,
                            pr.total >> 20,
                            pr.remaining >> 20,
                            pr.mbps,
                            pr.passes
                        ));
                    }
                    tokio::time::sleep(MIGRATION_POLL).await;
                }
            })
            .await?;

        let mut at_switchover = Vec::new();
        timeline
            .step(5, "switchover", async {
                let flows = p.source.flows().await?;
                let premove: Vec<FlowRecord> = flows
                    .into_iter()
                    .filter(|f| f.decode().is_ok_and(|(_, v)| v.origin == origin::TRACKED))
                    .collect();
                p.destination.load_flows(&premove).await?;
                p.source.set_mode(Mode::Forward).await?;
                if let Some(hook) = &p.on_switch {
                    run_on_switch(p, hook).await?;
                }
                p.source.continue_migration(&p.vm, true).await?;
                at_switchover = premove;
                Ok((
                    Some(()),
                    format!(
                        "{} pre-move flows handed to the destination; source forwards",
                        at_switchover.len()
                    ),
                ))
            })
            .await?;
        report.flows_at_switchover = at_switchover.iter().filter(|f| f.holds_drain()).count();
        *switchover_flows = at_switchover;
        Ok(Instant::now())
    }

    /// 6: the source completes; the VM runs at the destination; the source's VM is gone.
    async fn complete(&mut self, switchover: Instant) -> Result<Instant> {
        let Run {
            plan,
            timeline,
            report,
            ..
        } = self;
        let p: &Plan = plan;
        let qemu = timeline
            .step(6, "complete", async {
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
                        _ => tokio::time::sleep(MIGRATION_POLL).await,
                    }
                };
                let vm = p.destination.finish_incoming(&p.vm).await?;
                // The source's QEMU reports the migration; only B knows how its VM runs.
                let report = MigrationReport {
                    destination_status: vm.run_state.clone(),
                    ..report
                };
                Ok((
                    Some(report.clone()),
                    format!(
                        "downtime {} ms, total {} ms; destination {}",
                        report.downtime_ms, report.total_time_ms, vm.run_state
                    ),
                ))
            })
            .await?;
        report.qemu = qemu;
        Ok(switchover)
    }

    /// 7 to 11: the VM runs at B. Nothing here can give it back to A.
    async fn after_switchover(&mut self, switchover: Instant) -> Result<()> {
        let Run {
            plan,
            say,
            timeline,
            changed,
            report,
            switchover_flows,
            ..
        } = self;
        let (p, say): (&Plan, Say) = (*plan, *say);
        // The source's QEMU (paused in postmigrate) and its tap hook go.
        p.source.release_vm_iface().await?;
        p.source.stop_vm(&p.vm).await?;
        p.source.delete_tap(&p.vm_iface).await?;

        let dns_ms = timeline
            .step(7, "DNS update", async {
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
                        "{} {home} → {new}, serial {} → {}; authoritative answer changed {} ms \
                         after switchover",
                        dns.name,
                        update.before.serial,
                        update.after.serial,
                        update.answer_changed_after_ms
                    ),
                ))
            })
            .await?;
        report.dns_switch_ms = dns_ms;

        timeline
            .step(8, "announce", async {
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
            })
            .await?;

        let grace = p.drain_grace.unwrap_or_else(|| {
            Duration::from_secs(u64::from(changed.ttl_lowered_from.unwrap_or(0)))
        });
        let drain_started = Instant::now();
        let cut = timeline
            .step(
                9,
                "drain",
                drain(p, say, switchover_flows, grace, p.new_addr.is_none()),
            )
            .await?;
        let (cut, premove_bytes) = cut.unwrap_or_default();
        report.tunnel.premove_bytes = premove_bytes;
        report.drain_ms = Some(drain_started.elapsed().as_millis() as u64);
        report.flows_drained = report.flows_at_switchover.saturating_sub(cut.len());
        report.flows_cut = cut.iter().map(|f| f.readable.clone()).collect();

        let restore = changed.ttl_lowered_from;
        timeline
            .step(10, "teardown", async {
                let last = p.source.status().await?;
                if let Some(dp) = &last.datapath {
                    report.tunnel.packets_to_b = dp.counter("tunnel_out");
                    report.tunnel.packets_from_b = dp.counter("tunnel_in");
                }
                p.source.detach_datapath().await?;
                let mut detail = if p.new_addr.is_some() {
                    // The VM keeps H inside: B's NAT for N stays.
                    p.destination.set_mode(Mode::Nat).await?;
                    "source detached; destination in nat".to_owned()
                } else {
                    p.destination.detach_datapath().await?;
                    "both sites detached".to_owned()
                };
                if let (Some(dns), Some(ttl)) = (&p.dns, restore) {
                    dns.set_ttl(ttl).await?;
                    detail.push_str(&format!("; TTL restored to {ttl} s"));
                }
                Ok((Some(()), detail))
            })
            .await?;
        report.teardown_after_switchover_ms = Some(switchover.elapsed().as_millis() as u64);
        timeline
            .step(11, "report", async { Ok((Some(()), String::new())) })
            .await?;
        Ok(())
    }
}

/// Watches A until no live pre-move flow is left and nothing has reached `H` for
/// `grace`, or `max_drain` passes. Returns the flows cut by the bound and the bytes the
/// pre-move flows carried after switchover.
async fn drain(
    p: &Plan,
    say: Say,
    switchover_flows: &[FlowRecord],
    grace: Duration,
    rerouted: bool,
) -> Result<(Option<(Vec<FlowRecord>, u64)>, String)> {
    {
        let started = Instant::now();
        let mut last_activity = Instant::now();
        let mut last_packets = None;
        let mut bytes_seen: HashMap<String, u64> = switchover_flows
            .iter()
            .map(|f| (f.key.clone(), flow_bytes(f)))
            .collect();
        let baseline: u64 = bytes_seen.values().sum();
        let mut unreachable_since: Option<Instant> = None;
        let mut last_said = Instant::now();
        loop {
            let status = match p.source.status().await {
                Ok(status) => {
                    if let Some(since) = unreachable_since.take() {
                        say.line(&format!(
                            "  the source's agent is back after {:.1} s",
                            since.elapsed().as_secs_f64()
                        ));
                    }
                    status
                }
                // An agent restarting: the pinned datapath keeps forwarding meanwhile.
                Err(crate::agent::AgentError::Unreachable { reason, .. }) => {
                    if unreachable_since.is_none() {
                        say.line(&format!(
                            "  the source's agent is unreachable ({reason}); retrying"
                        ));
                        unreachable_since = Some(Instant::now());
                    }
                    if started.elapsed() >= p.max_drain {
                        bail!("the source's agent stayed unreachable through --max-drain");
                    }
                    tokio::time::sleep(DRAIN_POLL).await;
                    continue;
                }
                Err(err) => return Err(err.into()),
            };
            let dp = status
                .datapath
                .context("the source's datapath disappeared during the drain")?;
            let packets = dp.counter("tunnel_out") + dp.counter("tunnel_in");
            if last_packets != Some(packets) {
                last_packets = Some(packets);
                last_activity = Instant::now();
            }
            let flows = p.source.flows().await?;
            for f in &flows {
                if let Some(seen) = bytes_seen.get_mut(&f.key) {
                    *seen = (*seen).max(flow_bytes(f));
                }
            }
            let idle = last_activity.elapsed();
            if last_said.elapsed() >= Duration::from_secs(2) {
                last_said = Instant::now();
                say.line(&format!(
                    "  drain: {} live pre-move flows, {} tunnel packets, idle {:.1} s of {:.0} s",
                    dp.live_premove_flows,
                    packets,
                    idle.as_secs_f64(),
                    grace.as_secs_f64()
                ));
            }
            let premove_bytes = bytes_seen.values().sum::<u64>() - baseline;
            // Re-routed (move address mode), open flows go the direct way: the tunnel is
            // done once nothing reaches A any more.
            if (dp.live_premove_flows == 0 || rerouted) && idle >= grace {
                return Ok((
                    Some((Vec::new(), premove_bytes)),
                    format!(
                        "drained: {}, tunnel idle {:.1} s; {premove_bytes} bytes of pre-move \
                         flows after switchover",
                        if rerouted {
                            format!("{} open flows go direct now", dp.live_premove_flows)
                        } else {
                            "no live pre-move flow".to_owned()
                        },
                        idle.as_secs_f64()
                    ),
                ));
            }
            if started.elapsed() >= p.max_drain {
                let cut: Vec<FlowRecord> = flows
                    .into_iter()
                    .filter(|f| {
                        f.holds_drain()
                            && f.decode().is_ok_and(|(_, v)| v.origin == origin::TRACKED)
                    })
                    .collect();
                let count = cut.len();
                return Ok((
                    Some((cut, premove_bytes)),
                    format!(
                        "--max-drain {:?} reached: {} live pre-move flows cut",
                        p.max_drain, count
                    ),
                ));
            }
            tokio::time::sleep(DRAIN_POLL).await;
        }
    }
}

impl Run<'_> {
    /// Undoes what was changed, best effort, and says what it did.
    async fn roll_back(&mut self) -> String {
        let p = self.plan;
        let mut done = Vec::new();
        let mut failed = Vec::new();
        let mut note = |what: &str, result: Result<(), anyhow::Error>| match result {
            Ok(()) => done.push(what.to_owned()),
            Err(err) => failed.push(format!("{what}: {err:#}")),
        };
        if self.changed.migration_started {
            let aborted = async {
                match p.source.continue_migration(&p.vm, false).await {
                    Ok(_) | Err(crate::agent::AgentError::Refused { status: 404, .. }) => {}
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
                if vm.run_state != "running" {
                    bail!("the VM at the source is {}", vm.run_state);
                }
                Ok(())
            }
            .await;
            note("migration cancelled, VM running at the source", aborted);
        }
        if self.changed.source_attached_by_us {
            note(
                "source datapath detached",
                p.source.detach_datapath().await.map_err(Into::into),
            );
        } else if self.changed.source_reconfigured {
            note(
                "source datapath back to track",
                p.source
                    .set_mode(Mode::Track)
                    .await
                    .map(drop)
                    .map_err(Into::into),
            );
        }
        if self.changed.destination_touched {
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
        if let (Some(dns), Some(ttl)) = (&p.dns, self.changed.ttl_lowered_from) {
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

fn flow_bytes(flow: &FlowRecord) -> u64 {
    flow.decode()
        .map(|(_, v)| v.bytes_from_peer + v.bytes_to_peer)
        .unwrap_or(0)
}
