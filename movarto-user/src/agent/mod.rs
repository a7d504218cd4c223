//! `movarto-user agent`: the per-site daemon. It owns the site's datapath (pinned), its
//! QEMU processes and tap devices, and serves an authenticated HTTP+JSON control API
//! ([`api`]) that the orchestrator (`movarto-user migrate`) calls.

pub mod api;
pub mod client;
pub mod garp;
pub mod netlink;
mod server;
mod site;
mod snapshot;
pub mod tap;
pub mod token;
mod vms;

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::{Result, bail};
use clap::Args;

pub use client::{AgentClient, AgentError};
pub use server::{AgentConfig, openapi, serve};
use token::Token;

#[derive(Args, Debug)]
pub struct AgentArgs {
    /// This site's name, for logs and reports.
    #[arg(long)]
    pub site: String,
    /// Where the control API listens.
    #[arg(long, default_value = "0.0.0.0:7878")]
    pub listen: SocketAddr,
    /// A file holding the site token (mode 600; e.g. `openssl rand -hex 32`).
    #[arg(long)]
    pub token_file: PathBuf,
    /// The uplink the site's datapath is (or will be) attached to.
    #[arg(long)]
    pub uplink: String,
    /// The datapath's pin name under /sys/fs/bpf/movarto (default: the uplink's name; set
    /// it when another namespace on this host has an uplink of the same name).
    #[arg(long)]
    pub pin_name: Option<String>,
    /// TLS certificate chain (PEM); TLS is on when given, with --tls-key.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// How often expired flows are swept from the flow map.
    #[arg(long, default_value = "1s", value_parser = humantime_duration)]
    pub sweep_interval: Duration,
    /// VM records and QEMU logs (default: /run/movarto/agent-<site>).
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Stop this site's VMs when the agent exits. By default they keep running, and a
    /// restarted agent adopts them.
    #[arg(long)]
    pub stop_vms_on_exit: bool,
    /// When an established, idle pre-move flow counts as gone.
    #[arg(long, default_value = "300s", value_parser = humantime_duration)]
    pub established_idle: Duration,
}

/// `250ms`, `5s`, `2m`.
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

pub fn run(args: AgentArgs) -> Result<()> {
    if args.sweep_interval.is_zero() {
        bail!("--sweep-interval must be positive");
    }
    let state_dir = args
        .state_dir
        .unwrap_or_else(|| PathBuf::from(format!("/run/movarto/agent-{}", args.site)));
    let config = AgentConfig {
        state_dir,
        stop_vms_on_exit: args.stop_vms_on_exit,
        site: args.site,
        listen: args.listen,
        token: Token::from_file(&args.token_file)?,
        uplink: args.uplink,
        pin_name: args.pin_name,
        tls: args.tls_cert.zip(args.tls_key),
        sweep_interval: args.sweep_interval,
        established_idle: args.established_idle,
    };
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
