//! `movarto-user agent`: the per-site daemon. It owns the site's datapath (pinned), its
//! QEMU processes and tap devices, and serves an authenticated HTTP+JSON control API
//! ([`api`]) that the orchestrator (`movarto-user migrate`) calls.

pub mod api;
pub mod client;
pub mod garp;
pub mod netlink;
mod server;
mod site;
pub mod tap;
pub mod token;
mod vms;

use std::time::Duration;

use anyhow::Result;

pub use client::{AgentClient, AgentError};
pub use server::{AgentConfig, serve};

/// `250ms`, `5s`, `2m`; a bare number is seconds. Only `migrate`'s flags still use it;
/// the other verbs take `cli::units::parse_duration`, which requires the unit.
pub fn humantime_duration(s: &str) -> Result<Duration, String> {
    let (number, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map_or((s, "s"), |at| s.split_at(at));
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{s:?}: expected a number with ms, s, m or h"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        "h" => Ok(Duration::from_secs(n * 3600)),
        _ => Err(format!("{s:?}: the unit must be ms, s, m or h")),
    }
}

/// Serves the agent until it is stopped, on a runtime of its own.
pub fn run(config: AgentConfig) -> Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(serve(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(humantime_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(humantime_duration("5"), Ok(Duration::from_secs(5)));
        assert_eq!(humantime_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(humantime_duration("5d").is_err());
        assert!(humantime_duration("s").is_err());
    }
}
