//! All the demo reads of `movarto-user migrate --progress json`'s events (its stderr, one
//! JSON object a line): it echoes each line and notes when the switchover is done.

use std::{
    io::{BufRead as _, BufReader},
    process::ChildStderr,
    sync::{Arc, OnceLock},
    thread::{self, JoinHandle},
    time::Instant,
};

use anyhow::{Result, anyhow};
use movarto_user::migrate::{ProgressEvent, Step, report::Outcome};

/// Whether `line` of migrate's progress is the event of the switchover done (the VM runs at
/// B); lines that are not events (warnings, logs) are not.
fn switchover_seen(line: &str) -> bool {
    serde_json::from_str::<ProgressEvent>(line)
        .ok()
        .and_then(|event| event.finished())
        == Some((Step::Switchover, Outcome::Ok))
}

/// A thread reading migrate's progress as it comes.
pub struct Progress {
    switched: Arc<OnceLock<Instant>>,
    reader: JoinHandle<Vec<String>>,
}

impl Progress {
    /// Follows `stderr`; echoes each line to ours, stamped with the seconds since `started`,
    /// when `echo` is set.
    pub fn follow(stderr: ChildStderr, echo: bool, started: Instant) -> Self {
        let switched = Arc::new(OnceLock::new());
        let reader = {
            let switched = switched.clone();
            thread::spawn(move || {
                let mut lines = Vec::new();
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    if echo {
                        eprintln!(
                            "[{:>6.1}s]   migrate | {line}",
                            started.elapsed().as_secs_f64()
                        );
                    }
                    if switchover_seen(&line) {
                        let _ = switched.set(Instant::now());
                    }
                    lines.push(line);
                }
                lines
            })
        };
        Self { switched, reader }
    }

    /// When the switchover was seen, if it was.
    pub fn switchover(&self) -> Option<Instant> {
        self.switched.get().copied()
    }

    /// Waits for migrate's stderr to close; every line it printed.
    pub fn finish(self) -> Result<Vec<String>> {
        self.reader
            .join()
            .map_err(|_| anyhow!("the thread reading migrate's progress panicked"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_switchover_is_its_step_finished_event() {
        let event = |step: Step, outcome: Outcome| {
            serde_json::to_string(&ProgressEvent::StepFinished {
                step,
                number: step.number(),
                at_ms: 1200,
                outcome,
                took_ms: 3,
                detail: String::new(),
            })
            .expect("json")
        };
        assert!(switchover_seen(&event(Step::Switchover, Outcome::Ok)));
        assert!(!switchover_seen(&event(Step::Switchover, Outcome::Failed)));
        assert!(!switchover_seen(&event(Step::Complete, Outcome::Ok)));
        // The old text form is not an event.
        assert!(!switchover_seen(
            "[  1.2s] step  5/11 switchover: ok (85 ms)"
        ));
    }
}
