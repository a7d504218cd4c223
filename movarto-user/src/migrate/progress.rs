//! The migration's steps and its progress events: one definition shared by the
//! timeline, the report and anything that follows a migration (the demo).
//!
//! `movarto-user migrate --progress json` writes one [`ProgressEvent`] per line on
//! stderr, e.g. `{"event":"step-finished","step":"switchover","number":5,...}`.

use serde::{Deserialize, Serialize};

use super::report::Outcome;

/// The eleven steps of DESIGN.md's sequence, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Step {
    LowerTtl = 1,
    PrepareDestination,
    MirrorDisk,
    MigrateRam,
    Switchover,
    Complete,
    DnsUpdate,
    Announce,
    Drain,
    Teardown,
    Report,
}

impl Step {
    pub const ALL: [Step; 11] = [
        Step::LowerTtl,
        Step::PrepareDestination,
        Step::MirrorDisk,
        Step::MigrateRam,
        Step::Switchover,
        Step::Complete,
        Step::DnsUpdate,
        Step::Announce,
        Step::Drain,
        Step::Teardown,
        Step::Report,
    ];

    /// 1 to 11.
    pub const fn number(self) -> u8 {
        self as u8
    }

    /// How the timeline names it.
    pub const fn name(self) -> &'static str {
        match self {
            Step::LowerTtl => "lower DNS TTL",
            Step::PrepareDestination => "prepare destination",
            Step::MirrorDisk => "mirror disk",
            Step::MigrateRam => "migrate RAM",
            Step::Switchover => "switchover",
            Step::Complete => "complete",
            Step::DnsUpdate => "DNS update",
            Step::Announce => "announce",
            Step::Drain => "drain",
            Step::Teardown => "teardown",
            Step::Report => "report",
        }
    }
}

/// One progress event; `at_ms` is the time since the migration started.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum ProgressEvent {
    StepStarted {
        step: Step,
        number: u8,
        at_ms: u64,
    },
    StepFinished {
        step: Step,
        number: u8,
        at_ms: u64,
        outcome: Outcome,
        took_ms: u64,
        detail: String,
    },
    /// The RAM copy, about once a second.
    Ram {
        at_ms: u64,
        status: String,
        transferred: u64,
        total: u64,
        remaining: u64,
        mbps: f64,
        passes: u64,
    },
    /// Anything else worth a line (waits, retries, the drain's state).
    Note {
        at_ms: u64,
        text: String,
    },
}

impl ProgressEvent {
    /// The step this event finished, and how, if it finished one.
    pub fn finished(&self) -> Option<(Step, Outcome)> {
        match self {
            ProgressEvent::StepFinished { step, outcome, .. } => Some((*step, *outcome)),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_are_numbered_in_order() {
        for (i, step) in Step::ALL.iter().enumerate() {
            assert_eq!(usize::from(step.number()), i + 1, "{step:?}");
        }
    }

    #[test]
    fn events_are_one_tagged_json_object() {
        let event = ProgressEvent::StepFinished {
            step: Step::Switchover,
            number: 5,
            at_ms: 1200,
            outcome: Outcome::Ok,
            took_ms: 3,
            detail: "source forwards".into(),
        };
        let line = serde_json::to_string(&event).expect("json");
        assert!(
            line.starts_with(r#"{"event":"step-finished","step":"switchover","number":5,"#),
            "{line}"
        );
        let back: ProgressEvent = serde_json::from_str(&line).expect("parse");
        assert_eq!(back.finished(), Some((Step::Switchover, Outcome::Ok)));
    }
}
