//! `movarto-user agent`: this site's agent, the control API the orchestrator drives.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::{Result, bail};
use clap::Args;
use movarto_user::agent::{self, AgentConfig, token::Token};

use super::units::{DURATION_HELP, parse_duration};

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
    #[arg(long, default_value = "1s", value_parser = parse_duration,
          help = format!("How often expired flows are swept from the flow map: {DURATION_HELP}"))]
    pub sweep_interval: Duration,
    /// VM records and QEMU logs (default: /run/movarto/agent-<site>).
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Stop this site's VMs when the agent exits. By default they keep running, and a
    /// restarted agent adopts them.
    #[arg(long)]
    pub stop_vms_on_exit: bool,
    #[arg(long, default_value = "300s", value_parser = parse_duration,
          help = format!("When an established, idle pre-move flow counts as gone: {DURATION_HELP}"))]
    pub established_idle: Duration,
    /// Serve Prometheus' `GET /metrics` without the site token (e.g. to a scraper on a
    /// management network that has no token). By default it needs the token, as the
    /// whole API does; the TLS settings apply either way.
    #[arg(long)]
    pub metrics_without_token: bool,
    /// How many flows the flow map holds when the agent attaches the datapath
    /// (default 1048576, Cilium's TCP conntrack default; about 160 bytes each,
    /// preallocated, plus a quarter as many pending flows).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub flows_capacity: Option<u32>,
    /// Attach the datapath with the programs' debug logs on (aya-log), which
    /// `movarto-user monitor --debug-log` prints. Off, they cost nothing: the
    /// verifier removes them.
    #[arg(long)]
    pub debug_log: bool,
}

pub fn run(args: AgentArgs) -> Result<()> {
    if args.sweep_interval.is_zero() {
        bail!("--sweep-interval must be positive");
    }
    let state_dir = args
        .state_dir
        .unwrap_or_else(|| PathBuf::from(format!("/run/movarto/agent-{}", args.site)));
    agent::run(AgentConfig {
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
        metrics_without_token: args.metrics_without_token,
        flows_capacity: args.flows_capacity,
        debug_log: args.debug_log,
    })
}
