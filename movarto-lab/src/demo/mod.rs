//! `cargo xtask demo`: the whole story of DESIGN.md's lab on one machine. It builds the lab
//! ([`crate::lab`]) with WAN delay and rate ([`crate::delay`]), boots the guest at site A,
//! puts the workload of [`crate::workload`] on it, moves it to site B with
//! `movarto-user migrate` (whose progress it shows), and reports per connection, with the
//! migration's timeline and a picture of the throughput. Everything it made is removed at
//! the end, on failure and on Ctrl-C alike (guards on drop; SIGINT only sets a flag).
//!
//! - [`scenario`]: the lab, the workload and the migration, step by step;
//! - [`progress`]: all the demo reads of `migrate`'s progress;
//! - [`report`]: the per-connection table, the text and the JSON;
//! - [`plot`]: the SVG.

mod plot;
mod progress;
pub mod report;
mod scenario;

use std::{
    path::PathBuf,
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};

pub use self::report::Report;
use crate::{delay::Profile, repo};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Ctrl-C (and SIGTERM) only set a flag; the demo notices it within a fraction of a second
/// and unwinds, and its guards remove what it made.
pub fn install_interrupt_handler() -> Result<()> {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        let previous = unsafe { libc::signal(sig, on_sigint as *const () as libc::sighandler_t) };
        if previous == libc::SIG_ERR {
            bail!(
                "installing the handler for signal {sig}: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    Ok(())
}

pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

fn check_interrupt() -> Result<()> {
    if interrupted() {
        bail!("interrupted (Ctrl-C); cleaning up");
    }
    Ok(())
}

/// Sleeps `d`, waking early (with an error) on Ctrl-C.
fn pause(d: Duration) -> Result<()> {
    let until = Instant::now() + d;
    while Instant::now() < until {
        check_interrupt()?;
        thread::sleep(
            until
                .saturating_duration_since(Instant::now())
                .min(Duration::from_millis(50)),
        );
    }
    Ok(())
}

/// The demo's downtime limit. QEMU stops the VM once what is left to send fits this
/// long at the rate it measures: at 200 Mbit/s 100 ms is about 2.4 MB, which the demo's
/// guest (mostly network buffers dirtied) reaches in a pass or two more than with
/// QEMU's default of 300 ms (docs/benchmarks.md has the runs).
pub const DEMO_DOWNTIME_LIMIT: Duration = Duration::from_millis(100);

/// The share of the sites' link the demo's migration may use (its bandwidth cap): at
/// 200 Mbit/s, 20 MiB/s. A migration that fills the link fills its queue too (the delay
/// line's 100 ms), and QEMU's last burst, the one the VM waits for at B, then crosses
/// that queue: the VM's pause (stop at A to run at B) was about twice as long without
/// the cap (docs/benchmarks.md has the runs).
pub const DEMO_LINK_SHARE: f64 = 0.84;

#[derive(Clone, Debug)]
pub struct Options {
    pub network: Profile,
    /// How long the workload runs before the move starts.
    pub warmup: Duration,
    /// How long the long-lived connections run on after the switchover (through the tunnel)
    /// before they close and let the drain end.
    pub after_switchover: Duration,
    pub idle_connections: usize,
    pub curl_bytes: u64,
    pub curl_rate: u64,
    pub newcomer_interval: Duration,
    /// `movarto-user migrate --drain-grace`.
    pub drain_grace: Duration,
    pub max_drain: Duration,
    /// `movarto-user migrate --downtime-limit`.
    pub downtime_limit: Duration,
    /// `movarto-user migrate --max-bandwidth`, MiB/s; `None`: [`DEMO_LINK_SHARE`] of the
    /// sites' link, or migrate's default when the link has no rate.
    pub max_bandwidth_mib_s: Option<u64>,
    /// Where the throughput picture goes; `None`: no picture.
    pub svg: Option<PathBuf>,
    /// Progress on stderr.
    pub verbose: bool,
}

impl Default for Options {
    /// The full demo: realistic WAN figures.
    fn default() -> Self {
        Self {
            network: Profile {
                site_rtt_ms: 20.0,
                site_rate_mbit: Some(200.0),
                client_rtt_ms: 30.0,
                client_rate_mbit: Some(50.0),
                queue_ms: 100.0,
            },
            warmup: Duration::from_secs(4),
            after_switchover: Duration::from_secs(6),
            idle_connections: 3,
            curl_bytes: 32 << 20,
            curl_rate: 2 << 20,
            newcomer_interval: Duration::from_millis(250),
            drain_grace: Duration::from_secs(2),
            max_drain: Duration::from_secs(120),
            downtime_limit: DEMO_DOWNTIME_LIMIT,
            max_bandwidth_mib_s: None,
            svg: Some(repo().join("target/demo/throughput.svg")),
            verbose: true,
        }
    }
}

impl Options {
    /// The migration's bandwidth cap, MiB/s, when it has one.
    pub fn migration_cap_mib_s(&self) -> Option<u64> {
        self.max_bandwidth_mib_s.or_else(|| {
            let mbit = self.network.site_rate_mbit?;
            // 1 MiB/s is 8.388608 Mbit/s.
            Some(((mbit * DEMO_LINK_SHARE / 8.388_608) as u64).max(1))
        })
    }

    /// The short variant `cargo xtask test` runs.
    pub fn short() -> Self {
        Self {
            network: Profile {
                site_rtt_ms: 10.0,
                site_rate_mbit: Some(500.0),
                client_rtt_ms: 10.0,
                client_rate_mbit: None,
                queue_ms: 100.0,
            },
            warmup: Duration::from_secs(1),
            after_switchover: Duration::from_secs(2),
            idle_connections: 1,
            curl_bytes: 8 << 20,
            curl_rate: 1 << 20,
            newcomer_interval: Duration::from_millis(200),
            drain_grace: Duration::from_secs(1),
            max_drain: Duration::from_secs(60),
            downtime_limit: DEMO_DOWNTIME_LIMIT,
            max_bandwidth_mib_s: None,
            svg: None,
            verbose: true,
        }
    }
}

/// Runs the demo end to end. Everything is cleaned up before it returns, also on error.
pub fn run(opts: &Options) -> Result<Report> {
    scenario::run(opts)
}

/// Progress on stderr, stamped with the seconds since `started`.
fn say(opts: &Options, started: Instant, line: &str) {
    if opts.verbose {
        eprintln!("[{:>6.1}s] {line}", started.elapsed().as_secs_f64());
    }
}

#[cfg(test)]
mod cap_tests {
    use super::*;

    #[test]
    fn the_migration_takes_its_share_of_the_sites_link_unless_told() {
        let mut o = Options::default();
        assert_eq!(o.migration_cap_mib_s(), Some(20), "84% of 200 Mbit/s");
        o.network.site_rate_mbit = None;
        assert_eq!(o.migration_cap_mib_s(), None, "no rate: migrate's default");
        o.max_bandwidth_mib_s = Some(7);
        assert_eq!(o.migration_cap_mib_s(), Some(7));
        assert_eq!(
            Options::short().migration_cap_mib_s(),
            Some(50),
            "500 Mbit/s"
        );
    }
}
