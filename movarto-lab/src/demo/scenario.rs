//! The demo's scenario: the lab with its WAN, the guest at A, the workload, the move with
//! `movarto-user migrate`, the drain, and the cleanup. Every step is a function; what they
//! leave behind is a guard, dropped in the right order also on error or Ctrl-C.

use std::{
    fmt::Write as _,
    fs,
    io::Read as _,
    net::IpAddr,
    path::Path,
    process::{Command, ExitStatus},
    sync::atomic::Ordering,
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};
use movarto_user::{
    datapath::pin_dir,
    migrate::report::{Outcome, Report as MigrationReport},
};

use super::{
    Options, check_interrupt, pause, plot,
    progress::Progress,
    report::{
        DelayFigures, NewcomerSummary, Report, Timeline, connection_rows, human_bytes,
        worst_stall_ms,
    },
    say,
};
use crate::{
    delay::DelayLine,
    dns_server::SERVICE,
    lab::{H, IO_TIMEOUT, Lab, N},
    netns::{ChildGuard, in_netns},
    repo,
    workload::{self, CurlCheck, Newcomer, Settings, Workload},
};

/// Builds the lab, runs the scenario in it, and removes it; then checks nothing is left.
pub fn run(opts: &Options) -> Result<Report> {
    let started = Instant::now();
    check_names_free()?;
    say(
        opts,
        started,
        "building the lab: client, wan, ops with BIND9, site A, site B, an agent per site",
    );
    let mut l = Lab::build().context("building the lab")?;
    let names = l.namespace_names();
    let uplinks = [l.uplink_a.clone(), l.uplink_b.clone()];
    // Everything that runs inside the lab lives in the scenario, so it all stops before the
    // lab goes.
    let result = Scenario {
        opts,
        l: &l,
        started,
    }
    .run();
    say(
        opts,
        started,
        "cleaning up: agents (and their VMs), pins, namespaces",
    );
    l.stop_agent("a");
    l.stop_agent("b");
    drop(l);
    let mut report = result?;
    report.namespaces_removed = !namespaces_exist(&names)?;
    report.pins_removed = uplinks.iter().all(|u| !pin_dir(u).exists());
    report.namespaces = names;
    report.wall_s = started.elapsed().as_secs_f64();
    Ok(report)
}

struct Scenario<'a> {
    opts: &'a Options,
    l: &'a Lab,
    /// The demo's start, for the progress lines.
    started: Instant,
}

/// `movarto-user migrate` running, and the threads reading what it prints.
struct Migration {
    orchestrator: ChildGuard,
    progress: Progress,
    report: JoinHandle<String>,
    /// When it started, in seconds on the workload's clock.
    at_s: f64,
    /// Each tracked connection's worst stall before it started.
    stalls_before: Vec<u64>,
}

/// What the move left to report.
struct Moved {
    migrate_at: f64,
    stalls_before: Vec<u64>,
    stale_newcomer: Option<Newcomer>,
    curl: Option<CurlCheck>,
    status: ExitStatus,
    json: String,
    progress: Vec<String>,
}

impl Scenario<'_> {
    fn run(&self) -> Result<Report> {
        check_interrupt()?;
        self.route_client_to_bind()?;
        let delay = self.start_delay_line()?;
        let boot_id = self.boot_guest()?;
        let clock = Instant::now();
        let mut work = self.start_workload(&boot_id, clock)?;
        let moved = self.move_vm(&mut work, &boot_id, clock)?;
        self.report(work, delay, moved)
    }

    fn say(&self, line: &str) {
        say(self.opts, self.started, line);
    }

    /// The client reaches BIND9 at 192.0.2.53 through the wan and ops namespaces.
    fn route_client_to_bind(&self) -> Result<()> {
        let l = self.l;
        l.wan
            .ip(&["route", "add", "192.0.2.53/32", "via", "198.19.255.2"])?;
        l.bind
            .client
            .run("sysctl", &["-qw", "net.ipv4.conf.all.forwarding=1"])?;
        l.bind
            .client
            .ip(&["route", "add", "198.51.100.0/24", "via", "198.19.255.1"])?;
        l.bind
            .server_ns
            .ip(&["route", "add", "198.51.100.0/24", "via", "192.0.2.1"])
    }

    fn start_delay_line(&self) -> Result<DelayLine> {
        let p = self.opts.network;
        let delay = DelayLine::start(&self.l.wan, &["wc", "wa", "wb", "wo"], p)
            .context("starting the wan's delay line")?;
        let rate = |r: Option<f64>| r.map(|r| format!(" at {r} Mbit/s")).unwrap_or_default();
        self.say(&format!(
            "wan: {} ms RTT between the sites{}, client link +{} ms RTT{}",
            p.site_rtt_ms,
            rate(p.site_rate_mbit),
            p.client_rtt_ms,
            rate(p.client_rate_mbit),
        ));
        Ok(delay)
    }

    /// Site A: the tap, the datapath tracking, the VM booted; all through A's agent. Returns
    /// the guest's boot id once it answers.
    fn boot_guest(&self) -> Result<String> {
        let l = self.l;
        self.say("site A: tap, datapath in track mode, booting the guest (QEMU, TCG)");
        l.start_site_a()?;
        let boot_deadline = Instant::now() + Duration::from_secs(120);
        let boot_id = loop {
            check_interrupt()?;
            if let Ok(id) = l.http_get(H, "/id") {
                break id;
            }
            if Instant::now() > boot_deadline {
                bail!(
                    "the guest did not answer at {H} within 2 minutes; agent A's log:\n{}",
                    l.agent_log("a")
                );
            }
            thread::sleep(Duration::from_millis(250));
        };
        self.say(&format!("the guest answers at H = {H} (boot id {boot_id})"));
        let resolved = in_netns(&l.client, workload::resolve)?
            .context("the client asking the lab's DNS for the service")?;
        self.say(&format!(
            "DNS: {SERVICE} is {resolved} (BIND9 at 192.0.2.53, TTL 300)"
        ));
        Ok(boot_id)
    }

    /// The workload, running until the warm-up is over.
    fn start_workload(&self, boot_id: &str, clock: Instant) -> Result<Workload> {
        let opts = self.opts;
        let work = Workload::start(Settings {
            client_ns: self.l.client.name().to_owned(),
            home: H.parse()?,
            idle_connections: opts.idle_connections,
            curl_bytes: opts.curl_bytes,
            curl_rate: opts.curl_rate,
            curl_output: self.l.scratch.join("curl.out"),
            newcomer_interval: opts.newcomer_interval,
            boot_id: boot_id.to_owned(),
            clock,
        })?;
        self.say(&format!(
            "workload: download stream, upload, interactive every 10 ms, {} idle, curl of {} MiB at {} KiB/s, a new connection by name every {} ms",
            opts.idle_connections,
            opts.curl_bytes >> 20,
            opts.curl_rate >> 10,
            opts.newcomer_interval.as_millis()
        ));
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
        self.status_line(&work);
        Ok(work)
    }

    /// The move: migrate until the switchover, the connections through the tunnel for a
    /// while, then closed, and migrate on to the teardown.
    fn move_vm(&self, work: &mut Workload, boot_id: &str, clock: Instant) -> Result<Moved> {
        let mut migration = self.start_migrate(work, clock)?;
        let mut last_status = Instant::now();
        let mut stale_newcomer = None;
        if let Some(at) = self.until_switchover(&mut migration, work, &mut last_status)? {
            self.say(
                "switchover: the VM runs at B; pre-move connections now go A → GUE tunnel → B",
            );
            stale_newcomer = Some(self.stale_dns_client(boot_id, clock)?);
            while at.elapsed() < self.opts.after_switchover {
                check_interrupt()?;
                self.status_every_second(work, &mut last_status);
                thread::sleep(Duration::from_millis(20));
            }
        }
        let curl = self.close_connections(work);
        let status = self.until_teardown(&mut migration)?;
        // A few more newcomers after the teardown: they must land at B too.
        pause(self.opts.newcomer_interval * 3)?;
        work.stop_newcomers();
        work.stop_sampler();
        let json = migration
            .report
            .join()
            .map_err(|_| anyhow!("the thread reading migrate's report panicked"))?;
        Ok(Moved {
            migrate_at: migration.at_s,
            stalls_before: migration.stalls_before,
            stale_newcomer,
            curl,
            status,
            json,
            progress: migration.progress.finish()?,
        })
    }

    /// The move, as an operator runs it, from the ops namespace.
    fn start_migrate(&self, work: &Workload, clock: Instant) -> Result<Migration> {
        let opts = self.opts;
        let drain_grace = format!("{}ms", opts.drain_grace.as_millis());
        let max_drain = format!("{}s", opts.max_drain.as_secs());
        let downtime_limit = format!("{}ms", opts.downtime_limit.as_millis());
        let mut args = vec![
            "--drain-grace".to_owned(),
            drain_grace,
            "--max-drain".to_owned(),
            max_drain,
            "--downtime-limit".to_owned(),
            downtime_limit,
            "--progress".to_owned(),
            "json".to_owned(),
        ];
        if let Some(cap) = opts.migration_cap_mib_s() {
            args.push(format!("--max-bandwidth={cap}"));
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut migrate = self.l.migrate_command(&args)?;
        self.say("movarto-user migrate --vm web ... (from the ops namespace)");
        let stalls_before = work
            .tracked
            .iter()
            .map(|t| t.worst_stall_ms.load(Ordering::Relaxed))
            .collect();
        let at_s = clock.elapsed().as_secs_f64();
        let mut orchestrator = self.l.bind.client.spawn(&mut migrate)?;
        let child = orchestrator.child_mut();
        let stderr = child.stderr.take().context("migrate's stderr")?;
        let mut stdout = child.stdout.take().context("migrate's stdout")?;
        let progress = Progress::follow(stderr, opts.verbose, self.started);
        let report = thread::spawn(move || {
            let mut json = String::new();
            let _ = stdout.read_to_string(&mut json);
            json
        });
        Ok(Migration {
            orchestrator,
            progress,
            report,
            at_s,
            stalls_before,
        })
    }

    /// Waits for the switchover; `None` if migrate ended without one.
    fn until_switchover(
        &self,
        migration: &mut Migration,
        work: &Workload,
        last_status: &mut Instant,
    ) -> Result<Option<Instant>> {
        loop {
            check_interrupt()?;
            if let Some(at) = migration.progress.switchover() {
                return Ok(Some(at));
            }
            if migration.orchestrator.try_wait()?.is_some() {
                return Ok(None);
            }
            self.status_every_second(work, last_status);
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// A client with a stale DNS answer: it still connects to H, and A forwards it.
    fn stale_dns_client(&self, boot_id: &str, clock: Instant) -> Result<Newcomer> {
        pause(Duration::from_millis(300))?;
        let home: IpAddr = H.parse()?;
        let at_s = clock.elapsed().as_secs_f64();
        let began = Instant::now();
        let id = in_netns(&self.l.client, || {
            workload::http_get(home, "/id", IO_TIMEOUT)
        })?;
        Ok(Newcomer {
            at_s,
            resolved: Some(home),
            by_name: false,
            ok: id.as_ref().is_ok_and(|id| id.trim() == boot_id),
            took_ms: began.elapsed().as_millis() as u64,
            error: id.err().map(|e| format!("stale-DNS client: {e:#}")),
        })
    }

    /// Closes the long-lived connections (each checks once more first) and lets curl run to
    /// its end; curl's check, if it finished.
    fn close_connections(&self, work: &mut Workload) -> Option<CurlCheck> {
        self.say(
            "closing the long-lived connections (each checks once more first); curl runs to its end",
        );
        work.stop_long_lived();
        match work.finish_curl(Duration::from_secs(300)) {
            Ok(check) => Some(check),
            Err(err) => {
                self.say(&format!("curl: {err:#}"));
                None
            }
        }
    }

    /// Waits for migrate to exit (the drain over, the tunnel torn down).
    fn until_teardown(&self, migration: &mut Migration) -> Result<ExitStatus> {
        self.say("waiting for the drain to end and the tunnel to be torn down");
        let deadline = Instant::now() + self.opts.max_drain + Duration::from_secs(120);
        let status = loop {
            check_interrupt()?;
            if let Some(status) = migration.orchestrator.try_wait()? {
                break status;
            }
            if Instant::now() > deadline {
                bail!(
                    "movarto-user migrate did not finish; agent logs:\nA:\n{}\nB:\n{}",
                    self.l.agent_log("a"),
                    self.l.agent_log("b")
                );
            }
            thread::sleep(Duration::from_millis(50));
        };
        self.say(&format!("movarto-user migrate exited: {status}"));
        Ok(status)
    }

    /// The report, from what the move left, the workload's figures and the sites' state.
    fn report(&self, work: Workload, delay: DelayLine, moved: Moved) -> Result<Report> {
        let l = self.l;
        let migration: serde_json::Value =
            serde_json::from_str(&moved.json).with_context(|| {
                format!(
                    "migrate ({}) printed no JSON report: {:?}",
                    moved.status, moved.json
                )
            })?;
        let parsed: MigrationReport =
            serde_json::from_value(migration.clone()).context("reading migrate's report")?;
        // What the sites say now.
        let destination_mode = l
            .with_agents(async |_a, b| {
                b.status()
                    .await
                    .map(|s| s.datapath.map(|d| d.mode.to_string()))
            })?
            .ok()
            .flatten();
        let teardown_done = parsed
            .steps
            .iter()
            .any(|s| s.number == 10 && s.outcome == Outcome::Ok)
            && !pin_dir(&l.uplink_a).exists();
        let timeline = Timeline::of(&parsed, moved.migrate_at);
        let events = timeline.events(moved.migrate_at);
        let samples = work.samples.lock().map(|s| s.clone()).unwrap_or_default();
        let connections = connection_rows(
            &work.tracked,
            &samples,
            timeline.switchover_at,
            &moved.stalls_before,
        );
        let mut list = work.newcomers.lock().map(|l| l.clone()).unwrap_or_default();
        list.extend(moved.stale_newcomer);
        let newcomers = NewcomerSummary::of(list, H.parse()?, N.parse()?, timeline);
        let lost = connections.iter().filter(|c| !c.kept).count() + newcomers.failed;
        if lost > 0 {
            self.keep_lab_files(lost);
        }
        let svg = match &self.opts.svg {
            Some(path) => Some(plot::draw(path, &work.tracked, &samples, &events)?),
            None => None,
        };
        drop(work);
        let delay_line = DelayFigures::of(&delay.counters);
        drop(delay);
        let worst = worst_stall_ms(&connections);
        let downtime = parsed.qemu.as_ref().map(|q| q.downtime_ms);
        Ok(Report {
            connections_total: connections.len() + newcomers.total,
            connections_lost: lost,
            worst_stall_ms: worst,
            qemu_downtime_ms: downtime,
            stall_beyond_downtime_ms: downtime.map(|d| worst as i64 - d as i64),
            vm_paused_ms: parsed.vm_paused_ms,
            stall_beyond_pause_ms: parsed.vm_paused_ms.map(|p| worst as i64 - p.round() as i64),
            flip_us: parsed.flip_us,
            continue_us: parsed.continue_us,
            lost_at_switchover: parsed.lost_at_switchover,
            dns_switch_ms: parsed.dns_switch_ms,
            teardown_s: parsed
                .teardown_after_switchover_ms
                .map(|ms| ms as f64 / 1000.0),
            migration_succeeded: parsed.succeeded && moved.status.success(),
            teardown_done,
            destination_mode,
            network: self.opts.network,
            connections,
            newcomers,
            curl: moved.curl,
            events,
            delay_line,
            migration,
            migrate_progress: moved.progress,
            svg,
            namespaces: Vec::new(),
            namespaces_removed: false,
            pins_removed: false,
            wall_s: 0.0,
        })
    }

    /// Keeps what tells why connections were lost: the scratch directory (consoles, QEMU
    /// logs, agent logs, VM records) goes to target/demo/failed-<pid>, the essentials to
    /// stderr.
    fn keep_lab_files(&self, lost: usize) {
        let l = self.l;
        let kept = repo()
            .join("target/demo")
            .join(format!("failed-{}", std::process::id()));
        match copy_tree(l.scratch.path(), &kept) {
            Ok(()) => eprintln!("demo: the lab's files are kept in {}", kept.display()),
            Err(err) => eprintln!("demo: could not keep the lab's files: {err:#}"),
        }
        let console = fs::read_to_string(l.scratch.join("web-b.console")).unwrap_or_default();
        let tail: Vec<&str> = console.lines().rev().take(40).collect();
        eprintln!(
            "demo: {lost} connections lost; the guest's console at B (last lines):\n{}\n\
             agent A:\n{}\nagent B:\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
            l.agent_log("a"),
            l.agent_log("b")
        );
    }

    /// [`Scenario::status_line`] once a second.
    fn status_every_second(&self, work: &Workload, last: &mut Instant) {
        if last.elapsed() > Duration::from_secs(1) {
            self.status_line(work);
            *last = Instant::now();
        }
    }

    /// A line of what the workload has moved so far.
    fn status_line(&self, work: &Workload) {
        if !self.opts.verbose {
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
        self.say(&line);
    }
}

/// The network namespaces that exist, by name.
fn namespace_list() -> Result<Vec<String>> {
    let listed = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .context("running `ip netns list`")?;
    Ok(String::from_utf8_lossy(&listed.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect())
}

fn namespaces_exist(names: &[String]) -> Result<bool> {
    Ok(namespace_list()?.iter().any(|n| names.contains(n)))
}

/// Fails clearly if what this run needs is already there (a leftover of an earlier run with
/// the same process id), and points out leftovers of runs that were killed.
fn check_names_free() -> Result<()> {
    let pid = std::process::id();
    let names = namespace_list()?;
    let ours: Vec<&str> = names
        .iter()
        .filter(|n| n.starts_with("mvt-") && n.contains(&format!("-{pid}-")))
        .map(String::as_str)
        .collect();
    if !ours.is_empty() {
        bail!(
            "the network namespaces this run needs already exist: {}; they are left from an \
             earlier run that had the same process id. Remove them with `ip netns del NAME` \
             and run again",
            ours.join(", ")
        );
    }
    check_pins_free(pid)?;
    note_stale_namespaces(&names);
    Ok(())
}

/// The lab names its uplinks (and so its pins) ma<tag>/mb<tag>, the tag starting with the
/// process id modulo 10000.
fn check_pins_free(pid: u32) -> Result<()> {
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
    Ok(())
}

/// Namespaces of earlier runs that were killed do not stop this one; says so.
fn note_stale_namespaces(names: &[String]) {
    let stale: Vec<&str> = names
        .iter()
        .filter(|n| n.starts_with("mvt-"))
        .filter(|n| {
            n.split('-')
                .nth(2)
                .and_then(|p| p.parse::<u32>().ok())
                .is_some_and(|p| !Path::new(&format!("/proc/{p}")).exists())
        })
        .map(String::as_str)
        .collect();
    if !stale.is_empty() {
        eprintln!(
            "note: {} network namespace(s) named mvt-* belong to runs that no longer exist \
             (killed?): {}; they do not stop this run. `ip netns del NAME` removes them",
            stale.len(),
            stale.join(" ")
        );
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
