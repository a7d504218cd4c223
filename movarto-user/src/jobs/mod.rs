//! `movarto-user jobs` and `abort`: the migrations the agents own, as an operator looks
//! at them (the figures of `virsh domjobinfo`, from QEMU's `query-migrate`), and
//! cancelling one before its switchover ([`abort`]).
//!
//! One [`Job`] per record an agent holds: a migration asked of both agents shows twice,
//! once per half (`role`). Only the source's half has the RAM copy's figures.

pub mod abort;

use serde::{Deserialize, Serialize};

use crate::{
    agent::{
        AgentClient,
        api::{MigrationId, MigrationRecord, Role, Stage, unix_ms},
    },
    qemu::migrate::Progress,
};

/// Where a migration is, in an operator's words (the [`Stage`]s, grouped).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// Accepted, the destination being prepared, the disk mirrored.
    Preparing,
    /// QEMU copies RAM (at the destination: it listens for the copy).
    Active,
    /// The source stopped; the flip and `migrate-continue`, until the VM runs at B.
    Switchover,
    /// The VM runs at the destination; the tunnel carries the pre-move flows.
    Draining,
    /// The move is over.
    Completed,
    RollingBack,
    /// The VM runs at the source again, as before the move (at the destination: its
    /// half is cleaned up).
    RolledBack,
    /// A safe stop (`stopped`, or `split`: post-copy broke): a person must look.
    Stopped,
}

impl Phase {
    pub const fn of(stage: Stage) -> Self {
        match stage {
            Stage::Accepted | Stage::PreparingDestination | Stage::MirroringDisk => {
                Phase::Preparing
            }
            Stage::Listening | Stage::CopyingRam => Phase::Active,
            Stage::SwitchingOver | Stage::Continued => Phase::Switchover,
            Stage::Running | Stage::Draining => Phase::Draining,
            Stage::Done => Phase::Completed,
            Stage::RollingBack => Phase::RollingBack,
            Stage::RolledBack | Stage::Aborted => Phase::RolledBack,
            Stage::Split | Stage::Stopped => Phase::Stopped,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            Phase::Preparing => "preparing",
            Phase::Active => "active",
            Phase::Switchover => "switchover",
            Phase::Draining => "draining",
            Phase::Completed => "completed",
            Phase::RollingBack => "rolling-back",
            Phase::RolledBack => "rolled-back",
            Phase::Stopped => "stopped",
        }
    }
}

/// One agent's half of a migration, with the RAM copy's figures where it has them.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Job {
    pub vm: String,
    pub id: MigrationId,
    pub role: Role,
    /// The agent that holds this half.
    pub agent: String,
    pub phase: Phase,
    pub stage: Stage,
    /// Nothing more happens by itself.
    pub finished: bool,
    /// `abort` can still roll it back (the source's half, before the switchover).
    pub abortable: bool,
    /// Of this pass over RAM: `(total - remaining) / total` (100 once past the copy).
    pub percent: Option<f64>,
    /// This pass's remaining bytes at the current bandwidth (the guest may dirty more).
    pub eta_ms: Option<u64>,
    pub bandwidth_bytes_per_s: Option<u64>,
    /// How fast the guest dirties RAM (measured from the second pass on).
    pub dirty_rate_bytes_per_s: Option<u64>,
    pub ram_total: Option<u64>,
    pub ram_remaining: Option<u64>,
    pub ram_transferred: Option<u64>,
    pub passes: Option<u64>,
    /// What QEMU expects the blackout to be if it switched over now.
    pub expected_downtime_ms: Option<u64>,
    /// The blackout, once QEMU completed (0 before the switchover: the VM has not stopped).
    pub downtime_ms: Option<u64>,
    /// Since the migration was accepted, until it finished.
    pub elapsed_ms: u64,
    pub error: Option<String>,
    /// What a rollback undid.
    pub rolled_back: Option<String>,
}

impl Job {
    pub fn from_record(record: &MigrationRecord, agent: &str, now_unix_ms: u64) -> Self {
        let stage = record.stage;
        let progress = record.progress.as_ref();
        let copying = stage == Stage::CopyingRam;
        let past_copy = stage.past_switchover() && stage != Stage::Split;
        let live = progress.filter(|_| copying);
        let percent = if past_copy {
            Some(100.0)
        } else {
            live.and_then(Progress::done_ratio).map(|r| 100.0 * r)
        };
        // Without RAM figures (before the first, or a cancelled copy's last) there is none.
        let ram = progress.filter(|p| p.total > 0);
        let bandwidth = live.map(|p| p.bytes_per_second() as u64);
        let eta_ms = live.and_then(|p| {
            let rate = p.bytes_per_second();
            (rate > 0.0).then(|| (p.remaining as f64 / rate * 1000.0) as u64)
        });
        let started = record.history.first().map_or(now_unix_ms, |c| c.at_unix_ms);
        let ended = if stage.is_final() {
            record.history.last().map_or(now_unix_ms, |c| c.at_unix_ms)
        } else {
            now_unix_ms
        };
        let qemu = record.figures.qemu.as_ref();
        let downtime_ms = match qemu {
            Some(q) => Some(q.downtime_ms),
            None if stage < Stage::SwitchingOver || Phase::of(stage) == Phase::RolledBack => {
                Some(0)
            }
            None => None,
        };
        Self {
            vm: record.spec.vm.clone(),
            id: record.id().clone(),
            role: record.role,
            agent: agent.to_owned(),
            phase: Phase::of(stage),
            stage,
            finished: stage.is_final(),
            abortable: record.role == Role::Source && !stage.is_final() && !stage.past_switchover(),
            percent,
            eta_ms,
            bandwidth_bytes_per_s: bandwidth,
            dirty_rate_bytes_per_s: live.map(|p| p.dirty_bytes_per_second()),
            ram_total: ram.map(|p| p.total),
            ram_remaining: ram.map(|p| p.remaining),
            ram_transferred: qemu.map(|q| q.transferred).or(ram.map(|p| p.transferred)),
            passes: qemu.map(|q| q.passes).or(ram.map(|p| p.passes)),
            expected_downtime_ms: live.and_then(|p| p.expected_downtime_ms),
            downtime_ms,
            elapsed_ms: ended.saturating_sub(started),
            error: record.error.clone(),
            rolled_back: record.figures.rolled_back.clone(),
        }
    }
}

/// What `jobs` found at the agents it asked.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Listing {
    pub jobs: Vec<Job>,
    /// Finished ones left out (without `--all`).
    pub finished_hidden: usize,
    /// Agents that did not answer, with why.
    pub unreachable: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum JobsError {
    #[error("no agent to ask: give --source (and --destination) with their token files")]
    NoAgent,
    #[error("no agent answered: {}", .0.join("; "))]
    NoneAnswered(Vec<String>),
}

/// The migrations `agents` hold, oldest first; finished ones only with `all`. An agent
/// that does not answer is listed in [`Listing::unreachable`]; none answering is an error.
pub async fn list(agents: &[AgentClient], all: bool) -> Result<Listing, JobsError> {
    if agents.is_empty() {
        return Err(JobsError::NoAgent);
    }
    let now = unix_ms();
    let mut listing = Listing::default();
    let mut started = Vec::new();
    for agent in agents {
        match agent.migrations().await {
            Ok(records) => {
                for record in records {
                    let at = record.history.first().map_or(0, |c| c.at_unix_ms);
                    let job = Job::from_record(&record, agent.base(), now);
                    if job.finished && !all {
                        listing.finished_hidden += 1;
                    } else {
                        started.push((at, job));
                    }
                }
            }
            Err(err) => listing.unreachable.push(err.to_string()),
        }
    }
    if listing.unreachable.len() == agents.len() {
        return Err(JobsError::NoneAnswered(listing.unreachable));
    }
    started.sort_by_key(|(at, job)| (*at, job.role == Role::Destination));
    listing.jobs = started.into_iter().map(|(_, job)| job).collect();
    Ok(listing)
}

impl Listing {
    /// The table `jobs` prints: one line per job.
    pub fn render(&self) -> String {
        let mut out = format!(
            "{:<8} {:<28} {:<11} {:<12} {:>6} {:>7} {:>12} {:>12} {:>14} {:>8}\n",
            "VM",
            "ID",
            "ROLE",
            "PHASE",
            "%",
            "ETA",
            "BANDWIDTH",
            "DIRTY RATE",
            "DOWNTIME",
            "ELAPSED"
        );
        for job in &self.jobs {
            let role = match job.role {
                Role::Source => "source",
                Role::Destination => "destination",
            };
            let downtime = match (job.downtime_ms, job.expected_downtime_ms) {
                (Some(ms), _) if ms > 0 || job.expected_downtime_ms.is_none() => format!("{ms}ms"),
                (_, Some(expected)) => format!("~{expected}ms"),
                (None, None) | (Some(_), None) => "-".to_owned(),
            };
            out.push_str(&format!(
                "{:<8} {:<28} {:<11} {:<12} {:>6} {:>7} {:>12} {:>12} {:>14} {:>8}\n",
                job.vm,
                job.id.as_str(),
                role,
                job.phase.name(),
                job.percent.map_or("-".to_owned(), |p| format!("{p:.1}")),
                job.eta_ms.map_or("-".to_owned(), seconds),
                job.bandwidth_bytes_per_s.map_or("-".to_owned(), mib_per_s),
                job.dirty_rate_bytes_per_s.map_or("-".to_owned(), mib_per_s),
                downtime,
                seconds(job.elapsed_ms),
            ));
            if let Some(error) = &job.error {
                out.push_str(&format!("    error: {error}\n"));
            }
            if let Some(undone) = &job.rolled_back {
                out.push_str(&format!("    rolled back: {undone}\n"));
            }
        }
        if self.jobs.is_empty() {
            out.push_str("(no migration in progress)\n");
        }
        if self.finished_hidden > 0 {
            out.push_str(&format!(
                "{} finished migration(s) not shown (--all shows them)\n",
                self.finished_hidden
            ));
        }
        for agent in &self.unreachable {
            out.push_str(&format!("not listed: {agent}\n"));
        }
        out
    }
}

fn seconds(ms: u64) -> String {
    format!("{:.1}s", ms as f64 / 1000.0)
}

fn mib_per_s(bytes: u64) -> String {
    format!("{:.2}MiB/s", bytes as f64 / f64::from(1 << 20))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(stage: Stage, progress: Option<Progress>) -> MigrationRecord {
        let mut record: MigrationRecord =
            serde_json::from_str(crate::agent::migrations::tests::RECORD).expect("record");
        record.stage = stage;
        record.progress = progress;
        record
    }

    fn copying() -> Progress {
        Progress {
            status: "active".into(),
            elapsed_ms: 2000,
            transferred: 40 << 20,
            remaining: 192 << 20,
            total: 256 << 20,
            mbps: 67.108864,
            passes: 1,
            cpu_throttle_percent: 0,
            dirty_pages_rate: 256,
            page_size: 4096,
            expected_downtime_ms: Some(300),
        }
    }

    #[test]
    fn a_ram_copy_shows_its_percent_eta_and_rates() {
        let job = Job::from_record(&record(Stage::CopyingRam, Some(copying())), "a", 10_001);
        assert_eq!(job.phase, Phase::Active);
        assert!(job.abortable && !job.finished);
        assert_eq!(job.percent, Some(25.0));
        assert_eq!(job.bandwidth_bytes_per_s, Some(8 << 20));
        // 192 MiB at 8 MiB/s.
        assert_eq!(job.eta_ms, Some(24_000));
        assert_eq!(job.dirty_rate_bytes_per_s, Some(1 << 20));
        assert_eq!(job.expected_downtime_ms, Some(300));
        assert_eq!(job.downtime_ms, Some(0));
        assert_eq!(job.elapsed_ms, 10_000);
        let text = Listing {
            jobs: vec![job],
            ..Listing::default()
        }
        .render();
        assert!(
            text.contains("active") && text.contains("8.00MiB/s"),
            "{text}"
        );
    }

    #[test]
    fn past_the_switchover_nothing_can_be_aborted() {
        for stage in [Stage::Continued, Stage::Draining, Stage::Done] {
            let job = Job::from_record(&record(stage, Some(copying())), "a", 2);
            assert!(!job.abortable, "{stage}");
            assert_eq!(job.percent, Some(100.0));
            assert_eq!(job.bandwidth_bytes_per_s, None, "no live copy in {stage}");
        }
        let rolled = Job::from_record(&record(Stage::RolledBack, Some(copying())), "a", 2);
        assert_eq!(rolled.phase, Phase::RolledBack);
        assert!(rolled.finished && !rolled.abortable);
        assert_eq!(rolled.percent, None);
        assert_eq!(
            serde_json::to_value(rolled.phase).expect("json"),
            "rolled-back"
        );
    }
}
