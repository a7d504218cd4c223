//! All the demo reads of `movarto-user migrate`'s progress (its stderr): it echoes each line
//! and notes when the switchover is done. Nothing else in the demo looks at that text, so
//! reading `--progress json` events instead changes only [`switchover_seen`] (and the flag).

use std::{
    io::{BufRead as _, BufReader},
    process::ChildStderr,
    sync::{Arc, OnceLock},
    thread::{self, JoinHandle},
    time::Instant,
};

use anyhow::{Result, anyhow};

/// Whether `line` of migrate's progress says the switchover is done (the VM runs at B).
fn switchover_seen(line: &str) -> bool {
    line.contains("step  5/11 switchover: ok")
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
    fn the_switchover_is_step_five_done() {
        assert!(switchover_seen(
            "[  1.2s] step  5/11 switchover: ok (85 ms)"
        ));
        assert!(!switchover_seen("[  1.0s] step  5/11 switchover ..."));
        assert!(!switchover_seen("[  1.3s] step  6/11 resume at B: ok"));
    }
}
