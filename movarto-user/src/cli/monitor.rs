//! `movarto-user monitor`: the datapath's verdicts as they happen (drops with their
//! reason, tunnel, NAT, ICMP answers), like `cilium monitor --type drop`.

use std::{
    io::Write as _,
    net::IpAddr,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow};
use clap::Args;
use movarto_user::datapath::{
    Pinned, UPLINK_INGRESS,
    monitor::{DEFAULT_MAX_PER_SECOND, Filter, Listener, Stats, Verdict, VerdictKind},
    pin_name_or,
};
use serde_json::json;
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{SignalKind, signal},
};

use crate::cli::units::parse_duration;

#[derive(Args, Debug)]
pub struct MonitorArgs {
    /// The uplink movarto is attached to.
    pub uplink: String,
    #[arg(long, value_name = "NAME")]
    pub pin_name: Option<String>,
    /// Which verdicts: drop, tunnel, nat, icmp (repeat or separate with commas;
    /// default: all).
    #[arg(long = "type", value_name = "TYPE", value_delimiter = ',', value_parser = parse_kind)]
    pub types: Vec<VerdictKind>,
    /// Only packets from or to this address (a service's H, or its N).
    #[arg(long, value_name = "ADDR")]
    pub service: Option<IpAddr>,
    /// Show one in N verdicts (per CPU).
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub sample: u32,
    /// At most this many events per second per CPU; 0 for no limit. Verdicts over
    /// it are counted in the summary, not shown.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_PER_SECOND)]
    pub rate: u32,
    /// Stop after showing this many events.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub count: Option<u64>,
    /// Stop after this long (e.g. `30s`); by default, at Ctrl-C.
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Also print the programs' debug log lines (the datapath must be attached
    /// with `--debug-log`).
    #[arg(long)]
    pub debug_log: bool,
    /// One JSON object per line: `"record": "verdict"`, `"log"`, and a last `"summary"`.
    #[arg(long)]
    pub json: bool,
}

fn parse_kind(name: &str) -> Result<VerdictKind, String> {
    VerdictKind::from_name(name).ok_or_else(|| {
        let names: Vec<_> = VerdictKind::ALL.iter().map(|k| k.name()).collect();
        format!("unknown type {name:?}; one of {}", names.join(", "))
    })
}

/// How often the ring buffer is read even without a wake-up, and the logs flushed.
const POLL_EVERY: Duration = Duration::from_millis(250);

pub fn run(a: MonitorArgs) -> Result<()> {
    let pinned = Pinned::open_for(&a.uplink, pin_name_or(a.pin_name.as_deref(), &a.uplink))?;
    let filter = Filter {
        kinds: a.types.clone(),
        service: a.service,
        sample_every: a.sample,
        max_per_second: a.rate,
    };
    let mut listener = Listener::pinned(&pinned.dir, &pinned.config()?, filter)?;
    let mut logs = if a.debug_log {
        let id = aya::programs::ProgramInfo::from_pin(pinned.dir.join(UPLINK_INGRESS))
            .context("reading the uplink program's id")?
            .id();
        Some(
            aya_log::EbpfLogger::init_from_id_with_logger(id, LogPrinter { json: a.json })
                .map_err(|err| anyhow!("reading the programs' debug logs: {err}"))?,
        )
    } else {
        None
    };
    if !a.json {
        eprintln!(
            "listening on {} (Ctrl-C to stop){}",
            a.uplink,
            if a.debug_log {
                "; debug logs appear only if the datapath was attached with --debug-log"
            } else {
                ""
            }
        );
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let shown = runtime.block_on(listen(&a, &mut listener, logs.as_mut()))?;
    if let Some(logs) = logs.as_mut() {
        logs.flush();
    }
    let stats = listener.stats()?;
    listener.stop()?;
    print_summary(a.json, shown, stats);
    Ok(())
}

/// Prints events until Ctrl-C, SIGTERM, `--count` or `--duration`; returns how many.
async fn listen(
    a: &MonitorArgs,
    listener: &mut Listener,
    mut logs: Option<&mut aya_log::EbpfLogger<LogPrinter>>,
) -> Result<u64> {
    // A duplicate of the ring buffer's descriptor, owned by the AsyncFd: the same
    // file description, so it wakes when events come in.
    let fd = listener
        .events_fd()
        .try_clone_to_owned()
        .context("duplicating the ring buffer's descriptor")?;
    // SAFETY: the AsyncFd owns `fd`, which stays open and the same until it is dropped.
    let events = unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
        .map_err(|err| anyhow!("waiting on the ring buffer: {err}"))?;
    let mut interrupt = signal(SignalKind::interrupt()).context("installing SIGINT")?;
    let mut terminate = signal(SignalKind::terminate()).context("installing SIGTERM")?;
    let deadline = a.duration.map(|d| tokio::time::Instant::now() + d);
    let mut poll = tokio::time::interval(POLL_EVERY);
    let mut renewed = Instant::now();
    let mut shown = 0u64;
    let mut out = std::io::stdout().lock();
    loop {
        let woken = tokio::select! {
            ready = events.readable() => Some(ready.context("waiting on the ring buffer")?),
            _ = poll.tick() => None,
            _ = interrupt.recv() => return Ok(shown),
            _ = terminate.recv() => return Ok(shown),
            _ = async { match deadline {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            } } => return Ok(shown),
        };
        for verdict in listener.drain() {
            match print_verdict(&mut out, a.json, &verdict) {
                Ok(()) => {}
                // The reader went away (`monitor ... | head`): the end, not a failure.
                Err(err) if err.kind() == std::io::ErrorKind::BrokenPipe => return Ok(shown),
                Err(err) => return Err(err).context("writing the events"),
            }
            shown += 1;
            if a.count.is_some_and(|count| shown >= count) {
                return Ok(shown);
            }
        }
        if let Some(mut ready) = woken {
            ready.clear_ready();
        }
        if let Some(logs) = logs.as_deref_mut() {
            logs.flush();
        }
        if renewed.elapsed() >= Listener::RENEW_EVERY {
            listener.renew()?;
            renewed = Instant::now();
        }
    }
}

fn print_verdict(
    out: &mut impl std::io::Write,
    as_json: bool,
    verdict: &Verdict,
) -> std::io::Result<()> {
    if as_json {
        let mut line = serde_json::to_value(verdict)?;
        line["record"] = json!("verdict");
        writeln!(out, "{line}")?;
    } else {
        writeln!(out, "{} {}", clock(verdict.unix_us), verdict.line())?;
    }
    out.flush()
}

/// `HH:MM:SS.micro`, UTC.
fn clock(unix_us: u64) -> String {
    let secs = unix_us / 1_000_000;
    format!(
        "{:02}:{:02}:{:02}.{:06}",
        secs / 3600 % 24,
        secs / 60 % 60,
        secs % 60,
        unix_us % 1_000_000
    )
}

fn print_summary(as_json: bool, shown: u64, stats: Stats) {
    if as_json {
        // A closed stdout (`| head`) is no failure of the monitor's.
        let _ = writeln!(
            std::io::stdout(),
            "{}",
            json!({"record": "summary", "shown": shown, "programs": stats})
        );
    } else {
        eprintln!(
            "{shown} shown; the programs saw {} matching verdicts: {} emitted, {} sampled out, \
             {} over the rate limit, {} lost (ring buffer full)",
            stats.seen, stats.emitted, stats.sampled_out, stats.rate_limited, stats.ring_full
        );
    }
}

/// Prints the programs' aya-log records in the monitor's format.
struct LogPrinter {
    json: bool,
}

impl log::Log for LogPrinter {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let level = record.level().as_str().to_lowercase();
        let mut out = std::io::stdout();
        // As for the events, a closed stdout ends nothing here.
        let _ = if self.json {
            writeln!(
                out,
                "{}",
                json!({"record": "log", "level": level, "message": record.args().to_string()})
            )
        } else {
            writeln!(out, "log {level} {}", record.args())
        };
    }

    fn flush(&self) {}
}
