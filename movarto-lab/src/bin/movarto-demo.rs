//! The lab demo's program; `cargo xtask demo` builds what it needs and runs it as root.
//! Progress goes to stderr; the report (text, or JSON with --json) to stdout.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::{Result, bail};
use clap::Parser;
use movarto_lab::demo::{self, Options};

#[derive(Parser)]
#[command(
    name = "movarto-demo",
    about = "Builds the lab, moves a VM with live connections from site A to site B, reports"
)]
struct Cli {
    /// Print the report as JSON on stdout.
    #[arg(long)]
    json: bool,
    /// The short variant `cargo xtask test` runs (less traffic, shorter phases).
    #[arg(long)]
    short: bool,
    /// Round-trip time between the sites, ms.
    #[arg(long)]
    site_rtt_ms: Option<f64>,
    /// Rate of each site's link, Mbit/s (0: unlimited).
    #[arg(long)]
    site_rate_mbit: Option<f64>,
    /// Round-trip time the client's link adds, ms.
    #[arg(long)]
    client_rtt_ms: Option<f64>,
    /// Rate of the client's link, Mbit/s (0: unlimited).
    #[arg(long)]
    client_rate_mbit: Option<f64>,
    /// Seconds of traffic before the move.
    #[arg(long)]
    warmup_s: Option<f64>,
    /// Seconds the pre-move connections keep running through the tunnel after the switchover.
    #[arg(long)]
    after_switchover_s: Option<f64>,
    /// How many idle connections.
    #[arg(long)]
    idle: Option<usize>,
    /// Size of the curl download, MiB.
    #[arg(long)]
    curl_mib: Option<u64>,
    /// curl's rate limit, KiB/s.
    #[arg(long)]
    curl_kib_s: Option<u64>,
    /// The migration's downtime limit, ms [default: 100, for about 100 ms of downtime
    /// at 200 Mbit/s; QEMU's own default is 300].
    #[arg(long)]
    downtime_limit_ms: Option<u64>,
    /// The migration's bandwidth cap, MiB/s [default: 84% of the sites' link, 20 at
    /// 200 Mbit/s, so that the migration leaves the link's queue empty; 1280, `movarto-user
    /// migrate`'s own default, when the link has no rate].
    #[arg(long)]
    max_bandwidth_mib_s: Option<u64>,
    /// Where the throughput picture goes (SVG).
    #[arg(long)]
    svg: Option<PathBuf>,
    /// No progress on stderr.
    #[arg(long, short)]
    quiet: bool,
}

fn options(cli: &Cli) -> Result<Options> {
    let mut o = if cli.short {
        Options::short()
    } else {
        Options::default()
    };
    let secs = |s: f64| -> Result<Duration> {
        if !(0.0..=3600.0).contains(&s) {
            bail!("{s} s is out of range");
        }
        Ok(Duration::from_secs_f64(s))
    };
    if let Some(v) = cli.site_rtt_ms {
        o.network.site_rtt_ms = v;
    }
    if let Some(v) = cli.client_rtt_ms {
        o.network.client_rtt_ms = v;
    }
    if let Some(v) = cli.site_rate_mbit {
        o.network.site_rate_mbit = (v > 0.0).then_some(v);
    }
    if let Some(v) = cli.client_rate_mbit {
        o.network.client_rate_mbit = (v > 0.0).then_some(v);
    }
    if o.network.site_rtt_ms < 0.0 || o.network.client_rtt_ms < 0.0 {
        bail!("round-trip times cannot be negative");
    }
    if let Some(v) = cli.warmup_s {
        o.warmup = secs(v)?;
    }
    if let Some(v) = cli.after_switchover_s {
        o.after_switchover = secs(v)?;
    }
    if let Some(v) = cli.idle {
        o.idle_connections = v;
    }
    if let Some(v) = cli.curl_mib {
        if v == 0 {
            bail!("--curl-mib must be at least 1");
        }
        o.curl_bytes = v << 20;
    }
    if let Some(v) = cli.curl_kib_s {
        if v == 0 {
            bail!("--curl-kib-s must be at least 1");
        }
        o.curl_rate = v << 10;
    }
    if let Some(cap) = cli.max_bandwidth_mib_s {
        if cap == 0 {
            bail!("--max-bandwidth-mib-s must be at least 1");
        }
        o.max_bandwidth_mib_s = Some(cap);
    }
    if let Some(ms) = cli.downtime_limit_ms {
        if !(1..=60_000).contains(&ms) {
            bail!("--downtime-limit-ms must be 1 to 60000");
        }
        o.downtime_limit = Duration::from_millis(ms);
    }
    if let Some(svg) = &cli.svg {
        o.svg = Some(svg.clone());
    }
    o.verbose = !cli.quiet;
    Ok(o)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = (|| -> Result<demo::Report> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            bail!("the demo builds network namespaces and loads eBPF: run it as root");
        }
        demo::install_interrupt_handler()?;
        demo::run(&options(&cli)?)
    })();
    match result {
        Ok(report) => {
            if cli.json {
                match serde_json::to_string_pretty(&report) {
                    Ok(json) => println!("{json}"),
                    Err(err) => {
                        eprintln!("movarto-demo: error: the report as JSON: {err}");
                        return ExitCode::FAILURE;
                    }
                }
            } else {
                print!("{}", report.render());
            }
            if report.connections_lost == 0 && report.migration_succeeded {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(2)
            }
        }
        Err(err) => {
            eprintln!("movarto-demo: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
