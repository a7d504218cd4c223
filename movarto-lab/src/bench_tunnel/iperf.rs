//! One iperf3 run between the client and the guest, with the machine's CPU time over it.

use std::{
    fs,
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use super::{Direction, paths::Path};
use crate::{netns::wait_until, tempdir::TempDir, triangle::Triangle};

const PORT: &str = "5201";
/// What iperf3 may take beyond its test time (connect, results exchange).
const GRACE: Duration = Duration::from_secs(20);

/// What one run measured.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Sample {
    pub bytes: u64,
    pub seconds: f64,
    pub gbit_s: f64,
    pub retransmits: u64,
    /// Busy CPU time of the whole machine (user, system, irq, softirq), seconds.
    pub cpu_s: f64,
    /// Of which softirq (the kernel's packet processing), seconds.
    pub softirq_s: f64,
    /// Packets the veths dropped (rx and tx, every end).
    pub veth_drops: u64,
}

/// The machine's CPU time so far from /proc/stat's `cpu` line, in seconds: (busy, softirq).
fn cpu_times() -> Result<(f64, f64)> {
    let stat = fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let line = stat
        .lines()
        .find(|l| l.starts_with("cpu "))
        .context("no cpu line in /proc/stat")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    let at = |i: usize| v.get(i).copied().unwrap_or(0);
    // user nice system idle iowait irq softirq steal: busy is all but idle and iowait.
    let busy = at(0) + at(1) + at(2) + at(5) + at(6) + at(7);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Ok((busy as f64 / hz, at(6) as f64 / hz))
}

/// Runs iperf3 for `seconds` with `streams` streams in `direction`; the server runs in
/// the guest, the client in the client's namespace. Bounded: both are killed past
/// `seconds` plus a grace.
pub fn run(path: &Path, seconds: u32, streams: u32, direction: Direction) -> Result<Sample> {
    let h = &path.hosts;
    let dir = TempDir::new("movarto-bench-iperf")?;
    let mut server = h.guest.spawn(
        h.guest
            .command("iperf3")
            .args(["-s", "-1", "-p", PORT])
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
    )?;
    wait_until(Duration::from_secs(5), "iperf3's server", || {
        h.guest
            .run("ss", &["-Hltn", &format!("sport = :{PORT}")])
            .is_ok_and(|out| !out.trim().is_empty())
    })?;
    let out_path = dir.join("client.json");
    let out = fs::File::create(&out_path).context("creating iperf3's output file")?;
    let mut cmd = h.client.command("iperf3");
    cmd.args([
        "-c",
        &Triangle::HOME.to_string(),
        "-p",
        PORT,
        "-J",
        "-i",
        "0",
    ])
    .args(["-t", &seconds.to_string(), "-P", &streams.to_string()])
    .args(["--connect-timeout", "5000"])
    .stdout(out)
    .stderr(Stdio::null());
    if direction == Direction::Down {
        cmd.arg("-R");
    }
    let drops_before = path.veth_drops()?;
    let (busy0, soft0) = cpu_times()?;
    let mut client = h.client.spawn(&mut cmd)?;
    let deadline = Instant::now() + Duration::from_secs(seconds.into()) + GRACE;
    let status = loop {
        if let Some(status) = client.try_wait()? {
            break status;
        }
        if crate::demo::interrupted() {
            bail!("interrupted (Ctrl-C); cleaning up");
        }
        if Instant::now() > deadline {
            bail!("iperf3 did not finish within {seconds} s plus {GRACE:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let (busy1, soft1) = cpu_times()?;
    let drops_after = path.veth_drops()?;
    // The server ends after its one test; a few ms to do so, else its guard kills it.
    let _ = wait_until(Duration::from_secs(2), "iperf3's server to end", || {
        server.try_wait().is_ok_and(|s| s.is_some())
    });
    let text = fs::read_to_string(&out_path).context("reading iperf3's output")?;
    let json: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("iperf3 ({status}) printed no JSON: {text}"))?;
    if let Some(error) = json["error"].as_str() {
        bail!("iperf3: {error}");
    }
    let received = &json["end"]["sum_received"];
    let sample = Sample {
        bytes: received["bytes"].as_u64().unwrap_or(0),
        seconds: received["seconds"].as_f64().unwrap_or(0.0),
        gbit_s: received["bits_per_second"].as_f64().unwrap_or(0.0) / 1e9,
        retransmits: json["end"]["sum_sent"]["retransmits"].as_u64().unwrap_or(0),
        cpu_s: busy1 - busy0,
        softirq_s: soft1 - soft0,
        veth_drops: drops_after.saturating_sub(drops_before),
    };
    if !status.success() {
        bail!("iperf3 failed ({status}) after {} bytes", sample.bytes);
    }
    Ok(sample)
}
