//! Ctrl-C (SIGINT) and SIGTERM during `migrate`. Before switchover the migration is
//! rolled back exactly as a failure is (the source's agent cancels it; the VM keeps
//! running at the source). After it the VM runs at the destination and the agents finish
//! by themselves, so the orchestrator detaches and says how to follow again
//! (`migrate --resume ID`).
//!
//! The run looks at the signals between its calls: in the wait for the old TTL and at
//! each look at the migration. A signal never cuts a call to an agent in half.

use std::time::Duration;

use tokio::{
    signal::unix::{SignalKind, signal},
    sync::watch,
    task::JoinHandle,
};

/// The run was interrupted; before switchover, it rolls back.
#[derive(Debug, thiserror::Error)]
#[error("interrupted by {0}")]
pub(super) struct Interrupted(pub &'static str);

/// The signals received so far, counted by a listening task.
pub(super) struct Interrupt {
    received: watch::Receiver<(usize, &'static str)>,
    listener: Option<JoinHandle<()>>,
}

impl Interrupt {
    /// Starts listening for SIGINT and SIGTERM. Where the handlers can't be installed
    /// (no runtime with signal support), the run is simply never interrupted.
    pub(super) fn listen() -> Self {
        let (tx, received) = watch::channel((0, ""));
        let (Ok(mut int), Ok(mut term)) = (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        ) else {
            tracing::warn!("could not install the SIGINT/SIGTERM handlers; Ctrl-C kills migrate");
            return Self {
                received,
                listener: None,
            };
        };
        let listener = tokio::spawn(async move {
            loop {
                let name = tokio::select! {
                    Some(()) = int.recv() => "SIGINT",
                    Some(()) = term.recv() => "SIGTERM",
                    else => return,
                };
                tx.send_modify(|(count, last)| {
                    *count += 1;
                    *last = name;
                });
            }
        });
        Self {
            received,
            listener: Some(listener),
        }
    }

    /// `Err(Interrupted)` once a signal has arrived.
    pub(super) fn check(&self) -> Result<(), Interrupted> {
        match *self.received.borrow() {
            (0, _) => Ok(()),
            (_, name) => Err(Interrupted(name)),
        }
    }

    /// Sleeps for `wait`, or less if a signal arrives (then `Err(Interrupted)`).
    pub(super) async fn sleep(&self, wait: Duration) -> Result<(), Interrupted> {
        let mut received = self.received.clone();
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            _ = received.wait_for(|(count, _)| *count > 0) => {}
        }
        self.check()
    }
}

impl Drop for Interrupt {
    fn drop(&mut self) {
        if let Some(listener) = self.listener.take() {
            listener.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use nix::sys::signal::{Signal, raise};

    use super::*;

    #[tokio::test]
    async fn a_signal_cuts_the_wait_short_and_is_counted() {
        let interrupt = Interrupt::listen();
        assert!(interrupt.check().is_ok());
        assert!(interrupt.sleep(Duration::from_millis(1)).await.is_ok());
        // The handler is installed by `listen`: the signal is caught, not fatal.
        raise(Signal::SIGTERM).expect("raise");
        let waited = tokio::time::timeout(Duration::from_secs(10), interrupt.sleep(Duration::MAX))
            .await
            .expect("the signal ends the wait");
        assert_eq!(
            waited.map_err(|e| e.to_string()),
            Err("interrupted by SIGTERM".into())
        );
        assert!(interrupt.check().is_err());
    }
}
