//! `cargo xtask demo`: the whole story of DESIGN.md's lab on one machine. It builds the lab
//! ([`crate::lab`]) with WAN delay and rate ([`crate::delay`]), boots the guest at site A,
//! puts the workload of [`crate::workload`] on it, moves it to site B with
//! `movarto-user migrate` (whose progress it shows), and reports per connection, with the
//! migration's timeline and a picture of the throughput. Everything it made is removed at
//! the end, on failure and on Ctrl-C alike (guards on drop; SIGINT only sets a flag).

use std::{
    fmt::Write as _,
    fs,
    io::{BufRead as _, BufReader, Read as _},
    net::IpAddr,
    panic::AssertUnwindSafe,
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};
use movarto_user::{
    datapath::pin_dir,
    migrate::{
        ProgressEvent, Step,
        report::{Outcome, Report as MigrationReport},
    },
};
use serde::Serialize;

use crate::{
    delay::{DelayLine, Profile},
    dns_server::SERVICE,
    lab::{self, H, Lab, N},
    workload::{self, CurlCheck, Newcomer, Settings, Workload},
};

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
            svg: Some(lab::repo().join("target/demo/throughput.svg")),
            verbose: true,
        }
    }
}

impl Options {
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
            svg: None,
            verbose: true,
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct ConnectionRow {
    pub name: String,
    pub kind: String,
    pub target: String,
    pub kept: bool,
    pub bytes: u64,
    /// Bytes it moved after the switchover (through the tunnel, at B).
    pub bytes_after_switchover: u64,
    pub worst_stall_ms: u64,
    /// The worst stall before the move started: what the connection sees anyway (curl's
    /// --limit-rate, for one, reads in bursts with pauses between them).
    pub worst_stall_before_move_ms: u64,
    pub error: Option<String>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct NewcomerSummary {
    pub total: usize,
    /// Answered at A while the VM still ran there (resolved to H before the switchover).
    pub at_a: usize,
    /// Resolved to H after the switchover: A forwarded them through the tunnel to B.
    pub via_tunnel: usize,
    /// Resolved to N: straight to B.
    pub at_b: usize,
    pub failed: usize,
    /// A client with a stale DNS answer, connecting to H after the switchover: A forwards it.
    pub stale_dns_via_tunnel: usize,
    /// Those that asked DNS after the DNS switch, and how many of them landed at B.
    pub after_dns_switch: usize,
    pub after_dns_switch_at_b: usize,
    pub list: Vec<Newcomer>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Event {
    pub name: String,
    /// Seconds since the demo's clock started (the workload's start).
    pub at_s: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub connections_total: usize,
    pub connections_lost: usize,
    /// The longest gap the stream, the upload and the interactive connection saw (curl is
    /// left out: its --limit-rate pauses on its own; its stall is in `connections`).
    pub worst_stall_ms: u64,
    pub qemu_downtime_ms: Option<u64>,
    pub dns_switch_ms: Option<u64>,
    /// Seconds from the switchover to the teardown.
    pub teardown_s: Option<f64>,
    pub migration_succeeded: bool,
    pub teardown_done: bool,
    pub destination_mode: Option<String>,
    pub network: Profile,
    pub connections: Vec<ConnectionRow>,
    pub newcomers: NewcomerSummary,
    pub curl: Option<CurlCheck>,
    pub events: Vec<Event>,
    pub delay_line: DelayFigures,
    /// `movarto-user migrate --json`, as it printed it.
    pub migration: serde_json::Value,
    /// Its progress events (`--progress json` on stderr), as they came.
    pub migrate_progress: Vec<String>,
    pub svg: Option<PathBuf>,
    pub namespaces: Vec<String>,
    pub namespaces_removed: bool,
    /// No datapath of this run is pinned on bpffs any more.
    pub pins_removed: bool,
    pub wall_s: f64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct DelayFigures {
    pub packets: u64,
    pub bytes: u64,
    pub dropped: u64,
}

fn say(opts: &Options, started: Instant, line: &str) {
    if opts.verbose {
        eprintln!("[{:>6.1}s] {line}", started.elapsed().as_secs_f64());
    }
}

/// Fails clearly if what this run needs is already there (a leftover of an earlier run with
/// the same process id), and points out leftovers of runs that were killed.
fn check_names_free() -> Result<()> {
    let pid = std::process::id();
    let listed = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .context("running `ip netns list`")?;
    let names: Vec<String> = String::from_utf8_lossy(&listed.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect();
    let ours: Vec<&String> = names
        .iter()
        .filter(|n| n.starts_with("mvt-") && n.contains(&format!("-{pid}-")))
        .collect();
    if !ours.is_empty() {
        bail!(
            "the network namespaces this run needs already exist: {}; they are left from an \
             earlier run that had the same process id. Remove them with `ip netns del NAME` \
             and run again",
            ours.iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    // The lab names its uplinks (and so its pins) ma<tag>/mb<tag>, the tag starting with
    // the process id modulo 10000.
    let tag = pid % 10_000;
    let pinned: Vec<String> = fs::read_dir(pin_dir(""))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with(&format!("ma{tag}")) || n.starts_with(&format!("mb{tag}")))
        .collect();
    if !pinned.is_empty() {
        bail!(
            "{} already holds pinned datapaths named like this run's uplinks: {}; they are left \
             by an earlier run (or belong to a run whose process id ends the same). Remove a \
             leftover with `movarto-user detach NAME` and run again",
            pin_dir("").display(),
            pinned.join(", ")
        );
    }
    let stale: Vec<&String> = names
        .iter()
        .filter(|n| n.starts_with("mvt-"))
        .filter(|n| {
            n.split('-')
                .nth(2)
                .and_then(|p| p.parse::<u32>().ok())
                .is_some_and(|p| !Path::new(&format!("/proc/{p}")).exists())
        })
        .collect();
    if !stale.is_empty() {
        eprintln!(
            "note: {} network namespace(s) named mvt-* belong to runs that no longer exist \
             (killed?): {}; they do not stop this run. `ip netns del NAME` removes them",
            stale.len(),
            stale
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
    Ok(())
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_else(|| "a panic without message".to_owned())
}

/// The lab's helpers panic on failure (they serve tests); here that becomes an error.
fn guarded<T>(what: &str, f: impl FnOnce() -> T) -> Result<T> {
    std::panic::catch_unwind(AssertUnwindSafe(f))
        .map_err(|p| anyhow!("{what}: {}", panic_message(p)))
}

fn namespace_names(l: &Lab) -> Vec<String> {
    [
        &l.client,
        &l.wan,
        &l.a,
        &l.b,
        &l.bind.client,
        &l.bind.server_ns,
    ]
    .iter()
    .map(|ns| ns.name().to_owned())
    .collect()
}

fn namespaces_exist(names: &[String]) -> Result<bool> {
    let listed = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .context("running `ip netns list`")?;
    let text = String::from_utf8_lossy(&listed.stdout);
    Ok(text
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .any(|n| names.iter().any(|m| m == n)))
}

/// Runs the demo end to end. Everything is cleaned up before it returns, also on error.
pub fn run(opts: &Options) -> Result<Report> {
    let started = Instant::now();
    check_names_free()?;
    say(
        opts,
        started,
        "building the lab: client, wan, ops with BIND9, site A, site B, an agent per site",
    );
    let l = guarded("building the lab", lab::lab)?;
    let names = namespace_names(&l);
    let uplinks = [l.uplink_a.clone(), l.uplink_b.clone()];
    let mut report = {
        // Everything that runs inside the lab lives in here, so it all stops before the lab goes.
        let result = run_in_lab(opts, &l, started);
        let mut l = l;
        say(
            opts,
            started,
            "cleaning up: agents (and their VMs), pins, namespaces",
        );
        l.stop_agent("a");
        l.stop_agent("b");
        drop(l);
        result?
    };
    report.namespaces_removed = !namespaces_exist(&names)?;
    report.pins_removed = uplinks.iter().all(|u| !pin_dir(u).exists());
    report.namespaces = names;
    report.wall_s = started.elapsed().as_secs_f64();
    Ok(report)
}

fn run_in_lab(opts: &Options, l: &Lab, started: Instant) -> Result<Report> {
    check_interrupt()?;
    // The client reaches BIND9 at 192.0.2.53 through the wan and ops namespaces.
    lab_ip(
        l,
        &l.wan,
        &["route", "add", "192.0.2.53/32", "via", "198.19.255.2"],
    )?;
    l.bind
        .client
        .run("sysctl", &["-qw", "net.ipv4.conf.all.forwarding=1"])?;
    lab_ip(
        l,
        &l.bind.client,
        &["route", "add", "198.51.100.0/24", "via", "198.19.255.1"],
    )?;
    lab_ip(
        l,
        &l.bind.server_ns,
        &["route", "add", "198.51.100.0/24", "via", "192.0.2.1"],
    )?;
    let delay = DelayLine::start(&l.wan, &["wc", "wa", "wb", "wo"], opts.network)
        .context("starting the wan's delay line")?;
    let p = opts.network;
    say(
        opts,
        started,
        &format!(
            "wan: {} ms RTT between the sites{}, client link +{} ms RTT{}",
            p.site_rtt_ms,
            p.site_rate_mbit
                .map(|r| format!(" at {r} Mbit/s"))
                .unwrap_or_default(),
            p.client_rtt_ms,
            p.client_rate_mbit
                .map(|r| format!(" at {r} Mbit/s"))
                .unwrap_or_default(),
        ),
    );

    // Site A: the tap, the datapath tracking, the VM booted; all through A's agent.
    say(
        opts,
        started,
        "site A: tap, datapath in track mode, booting the guest (QEMU, TCG)",
    );
    let spec_a = lab::guest_spec(l, "a");
    let home: IpAddr = H.parse()?;
    let new_addr: IpAddr = N.parse()?;
    let booted = guarded("talking to the agents", || {
        lab::with_agents(l, async |a, _b| {
            let deadline = Instant::now() + Duration::from_secs(10);
            while a.health().await.is_err() {
                if Instant::now() > deadline {
                    bail!("agent A did not come up");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            lab::start_site_a(&a, &spec_a).await
        })
    })?;
    booted.with_context(|| {
        format!(
            "setting up site A; agent A's log:\n{}",
            lab::agent_log(l, "a")
        )
    })?;
    let client_ns = format!("/run/netns/{}", l.client.name());
    let boot_deadline = Instant::now() + Duration::from_secs(120);
    let boot_id = loop {
        check_interrupt()?;
        let id = in_ns(&client_ns, move || workload::http_get(home, "/id"))?;
        if let Ok(id) = id {
            break id.trim().to_owned();
        }
        if Instant::now() > boot_deadline {
            bail!(
                "the guest did not answer at {H} within 2 minutes; agent A's log:\n{}",
                lab::agent_log(l, "a")
            );
        }
        thread::sleep(Duration::from_millis(250));
    };
    say(
        opts,
        started,
        &format!("the guest answers at H = {H} (boot id {boot_id})"),
    );
    let resolved = in_ns(&client_ns, workload::resolve)?
        .context("the client asking the lab's DNS for the service")?;
    say(
        opts,
        started,
        &format!("DNS: {SERVICE} is {resolved} (BIND9 at 192.0.2.53, TTL 300)"),
    );

    // The workload.
    let clock = Instant::now();
    let since = |at: Instant| at.duration_since(clock).as_secs_f64();
    let curl_output = l.scratch.0.join("curl.out");
    let mut work = Workload::start(Settings {
        client_ns: l.client.name().to_owned(),
        home,
        idle_connections: opts.idle_connections,
        curl_bytes: opts.curl_bytes,
        curl_rate: opts.curl_rate,
        curl_output,
        newcomer_interval: opts.newcomer_interval,
        boot_id: boot_id.clone(),
        clock,
    })?;
    say(
        opts,
        started,
        &format!(
            "workload: download stream, upload, interactive every 10 ms, {} idle, curl of {} MiB at {} KiB/s, a new connection by name every {} ms",
            opts.idle_connections,
            opts.curl_bytes >> 20,
            opts.curl_rate >> 10,
            opts.newcomer_interval.as_millis()
        ),
    );
    let flowing_deadline = Instant::now() + Duration::from_secs(30);
    while !work.flowing() {
        check_interrupt()?;
        let failures = work.failures();
        if !failures.is_empty() {
            bail!("connections failed before the move: {failures:?}");
        }
        if Instant::now() > flowing_deadline {
            bail!("the workload did not get going within 30 s");
        }
        thread::sleep(Duration::from_millis(50));
    }
    pause(opts.warmup)?;
    status_line(opts, started, &work);

    // The move, as an operator runs it, from the ops namespace.
    let drain_grace = format!("{}ms", opts.drain_grace.as_millis());
    let max_drain = format!("{}s", opts.max_drain.as_secs());
    let mut migrate = guarded("preparing movarto-user migrate", || {
        lab::migrate_command(
            l,
            &[
                "--drain-grace",
                &drain_grace,
                "--max-drain",
                &max_drain,
                "--progress",
                "json",
            ],
        )
    })?;
    say(
        opts,
        started,
        "movarto-user migrate --vm web ... (from the ops namespace)",
    );
    let stalls_before: Vec<u64> = work
        .tracked
        .iter()
        .map(|t| t.worst_stall_ms.load(Ordering::Relaxed))
        .collect();
    let migrate_at = since(Instant::now());
    let mut orchestrator = l.bind.client.spawn(&mut migrate)?;
    let stderr = orchestrator
        .child_mut()
        .stderr
        .take()
        .context("migrate's stderr")?;
    let mut stdout = orchestrator
        .child_mut()
        .stdout
        .take()
        .context("migrate's stdout")?;
    let switched: Arc<Mutex<Option<Instant>>> = Arc::new(Mutex::new(None));
    let progress = {
        let (switched, verbose) = (switched.clone(), opts.verbose);
        thread::spawn(move || {
            let mut lines = Vec::new();
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if verbose {
                    eprintln!(
                        "[{:>6.1}s]   migrate | {line}",
                        started.elapsed().as_secs_f64()
                    );
                }
                let event = serde_json::from_str::<ProgressEvent>(&line).ok();
                let finished = event.as_ref().and_then(ProgressEvent::finished);
                if finished == Some((Step::Switchover, Outcome::Ok))
                    && let Ok(mut s) = switched.lock()
                {
                    *s = Some(Instant::now());
                }
                lines.push(line);
            }
            lines
        })
    };
    let json_reader = thread::spawn(move || {
        let mut json = String::new();
        let _ = stdout.read_to_string(&mut json);
        json
    });

    // Until the switchover, then the connections keep running through the tunnel for a while.
    let mut last_status = Instant::now();
    let switchover = loop {
        check_interrupt()?;
        if let Some(at) = switched.lock().ok().and_then(|s| *s) {
            break Some(at);
        }
        if orchestrator.try_wait()?.is_some() {
            break None;
        }
        if last_status.elapsed() > Duration::from_secs(1) {
            status_line(opts, started, &work);
            last_status = Instant::now();
        }
        thread::sleep(Duration::from_millis(20));
    };
    let mut stale_newcomer = None;
    if let Some(at) = switchover {
        say(
            opts,
            started,
            "switchover: the VM runs at B; pre-move connections now go A → GUE tunnel → B",
        );
        // A client with a stale DNS answer: it still connects to H, and A forwards it.
        pause(Duration::from_millis(300))?;
        let t = since(Instant::now());
        let began = Instant::now();
        let id = in_ns(&client_ns, move || workload::http_get(home, "/id"))?;
        stale_newcomer = Some(Newcomer {
            at_s: t,
            resolved: Some(home),
            by_name: false,
            ok: id.as_ref().is_ok_and(|id| id.trim() == boot_id),
            took_ms: began.elapsed().as_millis() as u64,
            error: id.err().map(|e| format!("stale-DNS client: {e:#}")),
        });
        while at.elapsed() < opts.after_switchover {
            check_interrupt()?;
            if last_status.elapsed() > Duration::from_secs(1) {
                status_line(opts, started, &work);
                last_status = Instant::now();
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
    say(
        opts,
        started,
        "closing the long-lived connections (each checks once more first); curl runs to its end",
    );
    work.stop_long_lived();
    let curl = match work.finish_curl(Duration::from_secs(300)) {
        Ok(check) => Some(check),
        Err(err) => {
            say(opts, started, &format!("curl: {err:#}"));
            None
        }
    };
    say(
        opts,
        started,
        "waiting for the drain to end and the tunnel to be torn down",
    );
    let migrate_deadline = Instant::now() + opts.max_drain + Duration::from_secs(120);
    let status = loop {
        check_interrupt()?;
        if let Some(status) = orchestrator.try_wait()? {
            break status;
        }
        if Instant::now() > migrate_deadline {
            bail!(
                "movarto-user migrate did not finish; agent logs:\nA:\n{}\nB:\n{}",
                lab::agent_log(l, "a"),
                lab::agent_log(l, "b")
            );
        }
        thread::sleep(Duration::from_millis(50));
    };
    // A few more newcomers after the teardown: they must land at B too.
    pause(opts.newcomer_interval * 3)?;
    work.stop_newcomers();
    work.stop_sampler();
    let json = json_reader
        .join()
        .map_err(|p| anyhow!("reading migrate's report: {}", panic_message(p)))?;
    let migrate_progress = progress
        .join()
        .map_err(|p| anyhow!("reading migrate's progress: {}", panic_message(p)))?;
    let migration: serde_json::Value = serde_json::from_str(&json)
        .with_context(|| format!("migrate ({status}) printed no JSON report: {json:?}"))?;
    let parsed: MigrationReport =
        serde_json::from_value(migration.clone()).context("reading migrate's report")?;
    say(
        opts,
        started,
        &format!("movarto-user migrate exited: {status}"),
    );

    // What the sites say now.
    let destination_mode = guarded("asking B for its status", || {
        lab::with_agents(l, async |_a, b| {
            b.status()
                .await
                .map(|s| s.datapath.map(|d| d.mode.to_string()))
        })
    })?
    .ok()
    .flatten();
    let teardown_done = parsed
        .steps
        .iter()
        .any(|s| s.number == 10 && s.outcome == Outcome::Ok)
        && !pin_dir(&l.uplink_a).exists();

    // The report.
    let step_end = |n: u8| {
        parsed
            .steps
            .iter()
            .find(|s| s.number == n && s.outcome == Outcome::Ok)
            .map(|s| migrate_at + s.end_ms as f64 / 1000.0)
    };
    let switchover_at = step_end(5);
    let dns_at = match (switchover_at, parsed.dns_switch_ms) {
        (Some(s), Some(d)) => Some(s + d as f64 / 1000.0),
        _ => step_end(7),
    };
    let teardown_at = step_end(10);
    let mut events = vec![Event {
        name: "migrate started".into(),
        at_s: migrate_at,
    }];
    for (name, at) in [
        ("switchover", switchover_at),
        ("DNS switch", dns_at),
        ("teardown", teardown_at),
    ] {
        if let Some(at_s) = at {
            events.push(Event {
                name: name.into(),
                at_s,
            });
        }
    }

    let samples = work.samples.lock().map(|s| s.clone()).unwrap_or_default();
    let connections: Vec<ConnectionRow> = work
        .tracked
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let error = t.error();
            let bytes = t.bytes.load(Ordering::Relaxed);
            let before = switchover_at.map_or(bytes, |s| {
                samples
                    .iter()
                    .take_while(|x| x.at_s <= s)
                    .last()
                    .and_then(|x| x.bytes.get(i).copied())
                    .unwrap_or(0)
            });
            ConnectionRow {
                name: t.name.clone(),
                kind: t.kind.to_owned(),
                target: t.target.clone(),
                kept: error.is_none(),
                bytes,
                bytes_after_switchover: bytes.saturating_sub(before),
                worst_stall_ms: t.worst_stall_ms.load(Ordering::Relaxed),
                worst_stall_before_move_ms: stalls_before.get(i).copied().unwrap_or(0),
                error,
            }
        })
        .collect();
    let mut list = work.newcomers.lock().map(|l| l.clone()).unwrap_or_default();
    list.extend(stale_newcomer);
    list.sort_by(|a, b| a.at_s.total_cmp(&b.at_s));
    let mut newcomers = NewcomerSummary::default();
    for n in &list {
        newcomers.total += 1;
        if !n.ok {
            newcomers.failed += 1;
        }
        if !n.by_name {
            newcomers.stale_dns_via_tunnel += n.ok as usize;
            continue;
        }
        let after_dns = dns_at.is_some_and(|d| n.at_s > d);
        if after_dns {
            newcomers.after_dns_switch += 1;
        }
        match n.resolved {
            Some(a) if a == new_addr => {
                newcomers.at_b += n.ok as usize;
                if after_dns && n.ok {
                    newcomers.after_dns_switch_at_b += 1;
                }
            }
            Some(a) if a == home && switchover_at.is_some_and(|s| n.at_s >= s) => {
                newcomers.via_tunnel += n.ok as usize
            }
            Some(_) => newcomers.at_a += n.ok as usize,
            None => {}
        }
    }
    newcomers.list = list;
    let lost = connections.iter().filter(|c| !c.kept).count() + newcomers.failed;
    if lost > 0 {
        // Keep what tells why: the scratch directory (consoles, QEMU logs, agent logs,
        // VM records) goes to target/demo/failed-<pid>, and the essentials to stderr.
        let kept = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../target/demo")
            .join(format!("failed-{}", std::process::id()));
        match copy_tree(&l.scratch.0, &kept) {
            Ok(()) => eprintln!("demo: the lab's files are kept in {}", kept.display()),
            Err(err) => eprintln!("demo: could not keep the lab's files: {err:#}"),
        }
        let console = fs::read_to_string(l.scratch.0.join("web-b.console")).unwrap_or_default();
        let tail: Vec<&str> = console.lines().rev().take(40).collect();
        eprintln!(
            "demo: {lost} connections lost; the guest's console at B (last lines):\n{}\n\
             agent A:\n{}\nagent B:\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
            lab::agent_log(l, "a"),
            lab::agent_log(l, "b")
        );
    }
    let worst_stall_ms = connections
        .iter()
        .filter(|c| c.kind != "idle" && c.kind != "curl")
        .map(|c| c.worst_stall_ms)
        .max()
        .unwrap_or(0);
    let svg = match &opts.svg {
        Some(path) => {
            let series: Vec<(String, usize, usize)> = work
                .tracked
                .iter()
                .enumerate()
                .filter(|(_, t)| t.kind != "idle")
                .map(|(i, t)| {
                    let window = if t.kind == "curl" { 20 } else { 4 };
                    (t.name.clone(), i, window)
                })
                .collect();
            crate::demo_plot::throughput_svg(path, &samples, &series, &events)
                .with_context(|| format!("drawing {}", path.display()))?;
            Some(fs::canonicalize(path).unwrap_or_else(|_| path.clone()))
        }
        None => None,
    };
    drop(work);
    let counters = &delay.counters;
    let delay_line = DelayFigures {
        packets: counters.packets.load(Ordering::Relaxed),
        bytes: counters.bytes.load(Ordering::Relaxed),
        dropped: counters.dropped.load(Ordering::Relaxed),
    };
    drop(delay);
    Ok(Report {
        connections_total: connections.len() + newcomers.total,
        connections_lost: lost,
        worst_stall_ms,
        qemu_downtime_ms: parsed.qemu.as_ref().map(|q| q.downtime_ms),
        dns_switch_ms: parsed.dns_switch_ms,
        teardown_s: parsed
            .teardown_after_switchover_ms
            .map(|ms| ms as f64 / 1000.0),
        migration_succeeded: parsed.succeeded && status.success(),
        teardown_done,
        destination_mode,
        network: opts.network,
        connections,
        newcomers,
        curl,
        events,
        delay_line,
        migration,
        migrate_progress,
        svg,
        namespaces: Vec::new(),
        namespaces_removed: false,
        pins_removed: false,
        wall_s: 0.0,
    })
}

fn lab_ip(_l: &Lab, ns: &crate::netns::Netns, args: &[&str]) -> Result<()> {
    ns.ip(args)
        .with_context(|| format!("ip {} in {}", args.join(" "), ns.name()))
}

/// Runs `f` on a thread inside the namespace at `path`.
fn in_ns<T: Send + 'static>(path: &str, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    let path = path.to_owned();
    thread::spawn(move || crate::delay::enter(&path).map(|()| f()))
        .join()
        .map_err(|p| anyhow!("{}", panic_message(p)))?
}

fn status_line(opts: &Options, started: Instant, work: &Workload) {
    if !opts.verbose {
        return;
    }
    let mut line = String::from("traffic |");
    for t in work.tracked.iter().filter(|t| t.kind != "idle") {
        let _ = write!(
            line,
            " {} {}{}",
            t.kind,
            human_bytes(t.bytes.load(Ordering::Relaxed)),
            if t.error().is_some() { " LOST" } else { "" }
        );
        line.push(',');
    }
    let newcomers = work.newcomers.lock().map(|l| l.clone()).unwrap_or_default();
    let at = |addr: &str| {
        newcomers
            .iter()
            .filter(|n| n.ok && n.resolved.is_some_and(|r| r.to_string() == addr))
            .count()
    };
    let _ = write!(
        line,
        " newcomers {} (to H {}, to N {}, failed {})",
        newcomers.len(),
        at(H),
        at(N),
        newcomers.iter().filter(|n| !n.ok).count()
    );
    say(opts, started, &line);
}

pub fn human_bytes(n: u64) -> String {
    if n >= 10 << 20 {
        format!("{:.0} MiB", n as f64 / (1 << 20) as f64)
    } else if n >= 1 << 20 {
        format!("{:.1} MiB", n as f64 / (1 << 20) as f64)
    } else if n >= 1 << 10 {
        format!("{:.0} KiB", n as f64 / 1024.0)
    } else {
        format!("{n} B")
    }
}

impl Report {
    /// The text report.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let p = &self.network;
        let _ = writeln!(
            out,
            "movarto demo: the VM moved from site A to site B ({} ms RTT between the sites{}; client link +{} ms RTT{})",
            p.site_rtt_ms,
            p.site_rate_mbit
                .map(|r| format!(", {r} Mbit/s"))
                .unwrap_or_default(),
            p.client_rtt_ms,
            p.client_rate_mbit
                .map(|r| format!(", {r} Mbit/s"))
                .unwrap_or_default(),
        );
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "{:<20} {:<12} {:<24} {:<6} {:>10} {:>16} {:>12} {:>12}",
            "connection",
            "kind",
            "to",
            "result",
            "bytes",
            "after switchover",
            "worst stall",
            "before move"
        );
        for c in &self.connections {
            let _ = writeln!(
                out,
                "{:<20} {:<12} {:<24} {:<6} {:>10} {:>16} {:>9} ms {:>9} ms{}",
                c.name,
                c.kind,
                truncate(&c.target, 24),
                if c.kept { "kept" } else { "LOST" },
                human_bytes(c.bytes),
                human_bytes(c.bytes_after_switchover),
                c.worst_stall_ms,
                c.worst_stall_before_move_ms,
                c.error
                    .as_ref()
                    .map(|e| format!("  ({e})"))
                    .unwrap_or_default()
            );
        }
        let n = &self.newcomers;
        let _ = writeln!(
            out,
            "\nnew connections by name ({}, each asks BIND9, connects, GETs /id): {} total: {} at A directly, {} to H after the switchover (A → tunnel → B), {} at B via N; {} failed",
            crate::workload::SERVICE_NAME,
            n.total - n.stale_dns_via_tunnel,
            n.at_a,
            n.via_tunnel,
            n.at_b,
            n.failed
        );
        let _ = writeln!(
            out,
            "  a client with a stale DNS answer (H) after the switchover: {}",
            if n.stale_dns_via_tunnel > 0 {
                "answered by the VM at B, through A and the tunnel"
            } else {
                "FAILED"
            }
        );
        let _ = writeln!(
            out,
            "  after the DNS switch: {} of {} landed at B",
            n.after_dns_switch_at_b, n.after_dns_switch
        );
        for f in n.list.iter().filter(|n| !n.ok) {
            let _ = writeln!(
                out,
                "  failed at {:.1}s: {}",
                f.at_s,
                f.error.as_deref().unwrap_or("?")
            );
        }
        if let Some(c) = &self.curl {
            let _ = writeln!(
                out,
                "curl download: {} of {} bytes, SHA-256 {} ({})",
                c.bytes,
                c.expected_bytes,
                c.sha256,
                if c.matches { "matches" } else { "MISMATCH" }
            );
        }
        let _ = writeln!(out, "\nmigration timeline (movarto-user migrate --json):");
        match serde_json::from_value::<MigrationReport>(self.migration.clone()) {
            Ok(r) => {
                for line in r.render().lines() {
                    let _ = writeln!(out, "  {line}");
                }
            }
            Err(err) => {
                let _ = writeln!(out, "  (unreadable: {err})");
            }
        }
        let _ = writeln!(out, "events (seconds since the workload started):");
        for e in &self.events {
            let _ = writeln!(out, "  {:>7.2}s  {}", e.at_s, e.name);
        }
        let _ = writeln!(
            out,
            "\nsummary: {} connections, {} lost; worst stall {} ms (stream, upload, interactive); QEMU downtime {}; DNS switch {}; teardown {} after switchover{}; destination datapath {}",
            self.connections_total,
            self.connections_lost,
            self.worst_stall_ms,
            opt_ms(self.qemu_downtime_ms),
            opt_ms(self.dns_switch_ms),
            self.teardown_s
                .map(|s| format!("{s:.1} s"))
                .unwrap_or_else(|| "-".into()),
            if self.teardown_done {
                ""
            } else {
                " (NOT torn down)"
            },
            self.destination_mode.as_deref().unwrap_or("-"),
        );
        let _ = writeln!(
            out,
            "wan delay line: {} packets, {}, {} dropped at full queues",
            self.delay_line.packets,
            human_bytes(self.delay_line.bytes),
            self.delay_line.dropped
        );
        if let Some(svg) = &self.svg {
            let _ = writeln!(out, "picture: {}", svg.display());
        }
        let _ = writeln!(
            out,
            "cleanup: {} namespaces {}; wall time {:.1} s",
            self.namespaces.len(),
            if self.namespaces_removed {
                "removed"
            } else {
                "STILL PRESENT"
            },
            self.wall_s
        );
        out
    }
}

fn opt_ms(v: Option<u64>) -> String {
    v.map(|v| format!("{v} ms")).unwrap_or_else(|| "-".into())
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_owned()
    } else {
        let mut t: String = s.chars().take(n - 1).collect();
        t.push('…');
        t
    }
}

/// Copies the regular files of `from` (and of its directories, one level down) to `to`.
fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    fs::create_dir_all(to).with_context(|| format!("creating {}", to.display()))?;
    for entry in fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let entry = entry?;
        let path = entry.path();
        let target = to.join(entry.file_name());
        if path.is_dir() {
            copy_tree(&path, &target)?;
        } else if path.is_file() {
            fs::copy(&path, &target).with_context(|| format!("copying {}", path.display()))?;
        }
    }
    Ok(())
}
