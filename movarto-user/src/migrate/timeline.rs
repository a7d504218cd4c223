//! The run's progress on stderr ([`Say`]) and its step records ([`Timeline`]).

use std::{future::Future, io::Write as _};

use anyhow::Result;
use tokio::time::Instant;

use super::{
    progress::{ProgressEvent, Step},
    report::{Outcome, StepRecord},
};
use crate::qemu::migrate::Progress;

/// How progress is shown on stderr.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ProgressFormat {
    /// Nothing.
    Quiet,
    /// Lines for humans, stamped with the time since the start.
    #[default]
    Text,
    /// One [`ProgressEvent`] per line, for programs that follow a migration.
    Json,
}

impl ProgressFormat {
    pub const fn name(self) -> &'static str {
        match self {
            ProgressFormat::Quiet => "quiet",
            ProgressFormat::Text => "text",
            ProgressFormat::Json => "json",
        }
    }
}

impl std::str::FromStr for ProgressFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        [
            ProgressFormat::Quiet,
            ProgressFormat::Text,
            ProgressFormat::Json,
        ]
        .into_iter()
        .find(|format| format.name() == s)
        .ok_or_else(|| format!("{s:?}: expected `text`, `json` or `quiet`"))
    }
}

/// Progress on stderr, timed from the start.
#[derive(Clone, Copy)]
pub(super) struct Say {
    started: Instant,
    format: ProgressFormat,
}

impl Say {
    pub(super) fn new(format: ProgressFormat) -> Self {
        Self {
            started: Instant::now(),
            format,
        }
    }

    /// Milliseconds since the start.
    pub(super) fn ms(self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// A note: a line of text, or a [`ProgressEvent::Note`].
    pub(super) fn line(self, line: &str) {
        self.emit(line, || ProgressEvent::Note {
            at_ms: self.ms(),
            text: line.trim_start().to_owned(),
        });
    }

    /// The RAM copy's progress.
    pub(super) fn ram(self, progress: &Progress) {
        let text = format!(
            "  RAM: {} {} of {} MiB sent, {} MiB left, {:.0} Mbit/s, pass {}",
            progress.status,
            progress.transferred >> 20,
            progress.total >> 20,
            progress.remaining >> 20,
            progress.mbps,
            progress.passes
        );
        self.emit(&text, || ProgressEvent::Ram {
            at_ms: self.ms(),
            status: progress.status.clone(),
            transferred: progress.transferred,
            total: progress.total,
            remaining: progress.remaining,
            mbps: progress.mbps,
            passes: progress.passes,
        });
    }

    fn emit(self, text: &str, event: impl FnOnce() -> ProgressEvent) {
        let mut err = std::io::stderr().lock();
        // A closed stderr must not stop a migration.
        let _ = match self.format {
            ProgressFormat::Quiet => Ok(()),
            ProgressFormat::Text => writeln!(
                err,
                "[{:>7.1}s] {text}",
                self.started.elapsed().as_secs_f64()
            ),
            ProgressFormat::Json => match serde_json::to_string(&event()) {
                Ok(json) => writeln!(err, "{json}"),
                Err(_) => Ok(()),
            },
        };
    }
}

/// The steps run so far, with their timing and outcome.
pub(super) struct Timeline {
    say: Say,
    pub(super) steps: Vec<StepRecord>,
}

impl Timeline {
    pub(super) fn new(say: Say) -> Self {
        Self {
            say,
            steps: Vec::new(),
        }
    }

    /// Runs one step and records its timing and outcome. `Ok((None, why))` from the body
    /// means skipped.
    pub(super) async fn step<T>(
        &mut self,
        step: Step,
        body: impl Future<Output = Result<(Option<T>, String)>>,
    ) -> Result<Option<T>> {
        let (record, value) = self.timed(step, body).await;
        self.steps.push(record);
        value
    }

    /// Two steps at once (each shown as it starts and ends), recorded in this order.
    pub(super) async fn two_steps<A, B>(
        &mut self,
        (first, first_body): (Step, impl Future<Output = Result<(Option<A>, String)>>),
        (second, second_body): (Step, impl Future<Output = Result<(Option<B>, String)>>),
    ) -> (Result<Option<A>>, Result<Option<B>>) {
        let this = &*self;
        let ((first, a), (second, b)) = tokio::join!(
            this.timed(first, first_body),
            this.timed(second, second_body)
        );
        self.steps.push(first);
        self.steps.push(second);
        (a, b)
    }

    /// Runs `body`, showing its start and end.
    async fn timed<T>(
        &self,
        step: Step,
        body: impl Future<Output = Result<(Option<T>, String)>>,
    ) -> (StepRecord, Result<Option<T>>) {
        let (number, name) = (step.number(), step.name());
        let start_ms = self.say.ms();
        self.say
            .emit(&format!("step {number:>2}/11 {name} ..."), || {
                ProgressEvent::StepStarted {
                    step,
                    number,
                    at_ms: start_ms,
                }
            });
        let result = body.await;
        let end_ms = self.say.ms();
        let (outcome, detail, value) = match result {
            Ok((Some(value), detail)) => (Outcome::Ok, detail, Ok(Some(value))),
            Ok((None, detail)) => (Outcome::Skipped, detail, Ok(None)),
            Err(err) => (Outcome::Failed, format!("{err:#}"), Err(err)),
        };
        let took_ms = end_ms - start_ms;
        self.say.emit(
            &format!(
                "step {number:>2}/11 {name}: {} ({took_ms} ms) {detail}",
                match outcome {
                    Outcome::Ok => "ok",
                    Outcome::Skipped => "skipped",
                    Outcome::Failed => "FAILED",
                },
            ),
            || ProgressEvent::StepFinished {
                step,
                number,
                at_ms: end_ms,
                outcome,
                took_ms,
                detail: detail.clone(),
            },
        );
        let record = StepRecord {
            step,
            number,
            name: name.to_owned(),
            start_ms,
            end_ms,
            outcome,
            detail,
        };
        (record, value)
    }
}
