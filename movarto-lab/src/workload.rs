//! The demo's workload, run from the lab's client namespace: long-lived connections of
//! every kind (a byte-checked download stream, a byte-checked upload, interactive
//! request/response every 10 ms, idle connections), a large curl download checked by
//! SHA-256, and new connections opened by name through the lab's DNS throughout the move.
//!
//! Every connection keeps its own byte count, worst stall (the longest gap between two
//! successful operations) and first error; a sampler turns the counts into throughput.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{IpAddr, Shutdown, SocketAddr, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use movarto_guest_server::{
    ECHO_PORT, HTTP_PORT, STREAM_PORT, UPLOAD_BAD, UPLOAD_CHUNK, UPLOAD_PORT, fill_stream,
    stream_byte,
};
use serde::Serialize;

use crate::{dns_server::SERVER_IP, lab::IO_TIMEOUT, netns::move_thread_into};

/// How long a new connection may take to connect, and to be answered.
const NEWCOMER_TIMEOUT: Duration = Duration::from_secs(5);

/// The service's name as clients ask for it.
pub const SERVICE_NAME: &str = "svc.example.test";

/// One long-lived connection (or the curl download) being watched.
pub struct Tracked {
    pub name: String,
    pub kind: &'static str,
    pub target: String,
    pub bytes: AtomicU64,
    pub worst_stall_ms: AtomicU64,
    error: Mutex<Option<String>>,
    last: Mutex<Option<Instant>>,
    pub finished: AtomicBool,
}

impl Tracked {
    fn new(name: &str, kind: &'static str, target: String) -> Arc<Self> {
        Arc::new(Self {
            name: name.to_owned(),
            kind,
            target,
            bytes: AtomicU64::new(0),
            worst_stall_ms: AtomicU64::new(0),
            error: Mutex::new(None),
            last: Mutex::new(None),
            finished: AtomicBool::new(false),
        })
    }

    /// `n` more bytes arrived (or were acknowledged): the gap since the last progress is a stall.
    fn progress(&self, n: u64) {
        let now = Instant::now();
        if let Ok(mut last) = self.last.lock() {
            if let Some(prev) = *last {
                let gap = now.duration_since(prev).as_millis() as u64;
                self.worst_stall_ms.fetch_max(gap, Ordering::Relaxed);
            }
            *last = Some(now);
        }
        self.bytes.fetch_add(n, Ordering::Relaxed);
    }

    fn fail(&self, what: String) {
        if let Ok(mut error) = self.error.lock()
            && error.is_none()
        {
            *error = Some(what);
        }
    }

    pub fn error(&self) -> Option<String> {
        self.error.lock().ok().and_then(|e| e.clone())
    }
}

/// Where a new connection opened by name landed.
#[derive(Clone, Debug, Serialize)]
pub struct Newcomer {
    /// Seconds since the demo's clock started, when it asked DNS.
    pub at_s: f64,
    pub resolved: Option<IpAddr>,
    /// False for a client that kept a stale answer (H) instead of asking DNS.
    pub by_name: bool,
    pub ok: bool,
    pub took_ms: u64,
    pub error: Option<String>,
}

/// A throughput sample: seconds since the clock started, and each tracked connection's
/// byte count then.
#[derive(Clone, Debug)]
pub struct Sample {
    pub at_s: f64,
    pub bytes: Vec<u64>,
}

pub struct Settings {
    /// The client namespace's name.
    pub client_ns: String,
    pub home: IpAddr,
    pub idle_connections: usize,
    pub curl_bytes: u64,
    /// curl's --limit-rate, bytes per second.
    pub curl_rate: u64,
    pub curl_output: PathBuf,
    pub newcomer_interval: Duration,
    /// The guest's boot id: every newcomer must reach this very guest.
    pub boot_id: String,
    pub clock: Instant,
}

/// The running workload. Dropping it stops everything (also on failure or Ctrl-C).
pub struct Workload {
    pub tracked: Vec<Arc<Tracked>>,
    pub newcomers: Arc<Mutex<Vec<Newcomer>>>,
    pub samples: Arc<Mutex<Vec<Sample>>>,
    /// Clones of the long-lived sockets: shut down on drop, so no worker waits out a timeout.
    sockets: Arc<Mutex<Vec<TcpStream>>>,
    stop_long: Arc<AtomicBool>,
    stop_newcomers: Arc<AtomicBool>,
    stop_sampler: Arc<AtomicBool>,
    long: Vec<JoinHandle<()>>,
    newcomer_thread: Option<JoinHandle<()>>,
    sampler: Option<JoinHandle<()>>,
    curl: Option<Child>,
    curl_watch: Option<JoinHandle<()>>,
    curl_index: usize,
    settings: Settings,
}

impl Workload {
    pub fn start(settings: Settings) -> Result<Self> {
        let ns = settings.client_ns.clone();
        let home = settings.home;
        let mut tracked = Vec::new();
        let mut long = Vec::new();
        let stop_long = Arc::new(AtomicBool::new(false));
        let sockets: Arc<Mutex<Vec<TcpStream>>> = Arc::new(Mutex::new(Vec::new()));

        let target = |port: u16| format!("{home}:{port}");
        // Connections first (all of them before any traffic), each in the client namespace.
        let mut spawn =
            |t: Arc<Tracked>,
             port: u16,
             run: fn(TcpStream, &Tracked, &AtomicBool) -> Result<()>| {
                let (ns, stop, sockets) = (ns.clone(), stop_long.clone(), sockets.clone());
                tracked.push(t.clone());
                let (tx, rx) = std::sync::mpsc::channel::<Result<()>>();
                long.push(thread::spawn(move || {
                    let conn = move_thread_into(&format!("/run/netns/{ns}"))
                        .and_then(|()| connect(SocketAddr::new(home, port)));
                    match conn {
                        Ok(conn) => {
                            if let (Ok(clone), Ok(mut list)) = (conn.try_clone(), sockets.lock()) {
                                list.push(clone);
                            }
                            let _ = tx.send(Ok(()));
                            if let Err(err) = run(conn, &t, &stop) {
                                t.fail(format!("{err:#}"));
                            }
                        }
                        Err(err) => {
                            t.fail(format!("{err:#}"));
                            let _ = tx.send(Err(err));
                        }
                    }
                    t.finished.store(true, Ordering::Relaxed);
                }));
                rx.recv_timeout(IO_TIMEOUT + Duration::from_secs(1))
                    .context("opening a connection timed out")?
            };
        spawn(
            Tracked::new("download stream", "stream", target(STREAM_PORT)),
            STREAM_PORT,
            download,
        )?;
        spawn(
            Tracked::new("upload", "upload", target(UPLOAD_PORT)),
            UPLOAD_PORT,
            upload,
        )?;
        spawn(
            Tracked::new("interactive 10 ms", "interactive", target(ECHO_PORT)),
            ECHO_PORT,
            chat,
        )?;
        for i in 0..settings.idle_connections {
            spawn(
                Tracked::new(&format!("idle {}", i + 1), "idle", target(ECHO_PORT)),
                ECHO_PORT,
                idle,
            )?;
        }

        // The large download with curl; its progress is the output file's size.
        let curl_t = Tracked::new(
            &format!("curl {} MiB", settings.curl_bytes >> 20),
            "curl",
            format!("http://{home}/bytes/{}", settings.curl_bytes),
        );
        let _ = std::fs::remove_file(&settings.curl_output);
        let curl = Command::new("ip")
            .args(["netns", "exec", &ns, "curl", "-sS", "--fail"])
            .args(["--limit-rate", &settings.curl_rate.to_string()])
            .args(["--speed-limit", "1", "--speed-time", "60"])
            .arg("-o")
            .arg(&settings.curl_output)
            .arg(&curl_t.target)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting curl in the client namespace")?;
        let curl_index = tracked.len();
        tracked.push(curl_t.clone());
        let curl_watch = {
            let path = settings.curl_output.clone();
            let t = curl_t;
            Some(thread::spawn(move || {
                let mut seen = 0u64;
                while !t.finished.load(Ordering::Relaxed) {
                    let now = std::fs::metadata(&path).map_or(0, |m| m.len());
                    if now > seen {
                        t.progress(now - seen);
                        seen = now;
                    }
                    thread::sleep(Duration::from_millis(10));
                }
                let now = std::fs::metadata(&path).map_or(0, |m| m.len());
                if now > seen {
                    t.bytes.fetch_add(now - seen, Ordering::Relaxed);
                }
            }))
        };

        // New connections by name, all through the move.
        let newcomers = Arc::new(Mutex::new(Vec::new()));
        let stop_newcomers = Arc::new(AtomicBool::new(false));
        let newcomer_thread = {
            let (ns, stop, list) = (ns.clone(), stop_newcomers.clone(), newcomers.clone());
            let (interval, boot_id, clock) = (
                settings.newcomer_interval,
                settings.boot_id.clone(),
                settings.clock,
            );
            Some(thread::spawn(move || {
                if let Err(err) = move_thread_into(&format!("/run/netns/{ns}")) {
                    if let Ok(mut list) = list.lock() {
                        list.push(Newcomer {
                            at_s: 0.0,
                            resolved: None,
                            by_name: true,
                            ok: false,
                            took_ms: 0,
                            error: Some(format!("{err:#}")),
                        });
                    }
                    return;
                }
                while !stop.load(Ordering::Relaxed) {
                    let started = Instant::now();
                    let n = newcomer(&boot_id, clock);
                    if let Ok(mut list) = list.lock() {
                        list.push(n);
                    }
                    thread::sleep(interval.saturating_sub(started.elapsed()));
                }
            }))
        };

        // The sampler: every connection's bytes every 100 ms.
        let samples = Arc::new(Mutex::new(Vec::new()));
        let stop_sampler = Arc::new(AtomicBool::new(false));
        let sampler = {
            let (stop, samples, tracked) = (stop_sampler.clone(), samples.clone(), tracked.clone());
            let clock = settings.clock;
            Some(thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let sample = Sample {
                        at_s: clock.elapsed().as_secs_f64(),
                        bytes: tracked
                            .iter()
                            .map(|t| t.bytes.load(Ordering::Relaxed))
                            .collect(),
                    };
                    if let Ok(mut samples) = samples.lock() {
                        samples.push(sample);
                    }
                    thread::sleep(Duration::from_millis(100));
                }
            }))
        };

        Ok(Self {
            tracked,
            newcomers,
            samples,
            sockets,
            stop_long,
            stop_newcomers,
            stop_sampler,
            long,
            newcomer_thread,
            sampler,
            curl: Some(curl),
            curl_watch,
            curl_index,
            settings,
        })
    }

    /// Whether every long-lived connection has moved data (and the idle ones answered).
    pub fn flowing(&self) -> bool {
        self.tracked.iter().all(|t| match t.kind {
            "stream" | "upload" | "interactive" => t.bytes.load(Ordering::Relaxed) > 0,
            _ => true,
        })
    }

    pub fn failures(&self) -> Vec<String> {
        self.tracked
            .iter()
            .filter_map(|t| t.error().map(|e| format!("{}: {e}", t.name)))
            .collect()
    }

    /// Ends the long-lived connections: each checks a last time (the idle ones echo) and closes.
    pub fn stop_long_lived(&mut self) {
        self.stop_long.store(true, Ordering::Relaxed);
        for worker in self.long.drain(..) {
            let _ = worker.join();
        }
    }

    pub fn stop_newcomers(&mut self) {
        self.stop_newcomers.store(true, Ordering::Relaxed);
        if let Some(t) = self.newcomer_thread.take() {
            let _ = t.join();
        }
    }

    /// Whether curl has exited.
    pub fn curl_done(&mut self) -> bool {
        self.curl
            .as_mut()
            .is_none_or(|c| matches!(c.try_wait(), Ok(Some(_))))
    }

    /// Waits for curl (up to `timeout`), then checks its file against the pattern's SHA-256.
    pub fn finish_curl(&mut self, timeout: Duration) -> Result<CurlCheck> {
        let t = self
            .tracked
            .get(self.curl_index)
            .context("curl is not tracked")?
            .clone();
        let deadline = Instant::now() + timeout;
        let Some(mut curl) = self.curl.take() else {
            bail!("curl was already finished");
        };
        let status = loop {
            if let Some(status) = curl.try_wait().context("waiting for curl")? {
                break status;
            }
            if Instant::now() > deadline || crate::demo::interrupted() {
                let _ = curl.kill();
                let _ = curl.wait();
                t.finished.store(true, Ordering::Relaxed);
                t.fail("curl did not finish in time".to_owned());
                bail!("curl did not finish within {timeout:?}");
            }
            thread::sleep(Duration::from_millis(50));
        };
        t.finished.store(true, Ordering::Relaxed);
        if let Some(w) = self.curl_watch.take() {
            let _ = w.join();
        }
        let mut stderr = String::new();
        if let Some(mut e) = curl.stderr.take() {
            let _ = e.read_to_string(&mut stderr);
        }
        if !status.success() {
            t.fail(format!("curl exited {status}: {}", stderr.trim()));
        }
        let got = std::fs::read(&self.settings.curl_output).unwrap_or_default();
        let sha256 = hex(ring::digest::digest(&ring::digest::SHA256, &got).as_ref());
        let expected = expected_sha256(self.settings.curl_bytes);
        let check = CurlCheck {
            bytes: got.len() as u64,
            expected_bytes: self.settings.curl_bytes,
            matches: sha256 == expected && got.len() as u64 == self.settings.curl_bytes,
            sha256,
            expected_sha256: expected,
        };
        if !check.matches {
            t.fail(format!(
                "downloaded {} bytes with SHA-256 {}, expected {} bytes with {}",
                check.bytes, check.sha256, check.expected_bytes, check.expected_sha256
            ));
        }
        let _ = std::fs::remove_file(&self.settings.curl_output);
        Ok(check)
    }

    pub fn stop_sampler(&mut self) {
        self.stop_sampler.store(true, Ordering::Relaxed);
        if let Some(t) = self.sampler.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Workload {
    /// On the way out (normally everything has stopped by now; on failure or Ctrl-C it has
    /// not): ends curl, shuts the sockets so blocked workers return at once, and does not
    /// wait longer than a newcomer's own timeouts for the newcomer thread.
    fn drop(&mut self) {
        if let Some(mut curl) = self.curl.take() {
            let _ = curl.kill();
            let _ = curl.wait();
        }
        for t in &self.tracked {
            t.finished.store(true, Ordering::Relaxed);
        }
        if let Some(w) = self.curl_watch.take() {
            let _ = w.join();
        }
        self.stop_long.store(true, Ordering::Relaxed);
        if let Ok(sockets) = self.sockets.lock() {
            for s in sockets.iter() {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
        self.stop_long_lived();
        self.stop_newcomers.store(true, Ordering::Relaxed);
        if let Some(t) = self.newcomer_thread.take() {
            let deadline = Instant::now() + NEWCOMER_TIMEOUT * 2;
            while !t.is_finished() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(20));
            }
            if t.is_finished() {
                let _ = t.join();
            }
        }
        self.stop_sampler();
        let _ = std::fs::remove_file(&self.settings.curl_output);
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct CurlCheck {
    pub bytes: u64,
    pub expected_bytes: u64,
    pub sha256: String,
    pub expected_sha256: String,
    pub matches: bool,
}

/// The SHA-256 of `/bytes/<len>`: the stream pattern's first `len` bytes.
pub fn expected_sha256(len: u64) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 1 << 20];
    let mut offset = 0u64;
    while offset < len {
        let n = (len - offset).min(buf.len() as u64) as usize;
        fill_stream(&mut buf[..n], offset);
        ctx.update(&buf[..n]);
        offset += n as u64;
    }
    hex(ctx.finish().as_ref())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Connects to `addr` from the calling thread's namespace; every read and write may take
/// up to [`IO_TIMEOUT`].
pub fn connect(addr: SocketAddr) -> Result<TcpStream> {
    connect_within(addr, IO_TIMEOUT)
}

fn connect_within(addr: SocketAddr, timeout: Duration) -> Result<TcpStream> {
    let s = TcpStream::connect_timeout(&addr, timeout)
        .with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// Reads the guest's endless pattern in `chunk`-byte pieces until `stop`, every byte
/// checked, pausing `pause` after each piece; `progress` is told each piece's size.
pub fn read_stream(
    mut s: TcpStream,
    chunk: usize,
    pause: Duration,
    stop: &AtomicBool,
    mut progress: impl FnMut(u64),
) -> Result<()> {
    let mut buf = vec![0u8; chunk];
    let mut offset = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let n = s
            .read(&mut buf)
            .with_context(|| format!("read at byte {offset}"))?;
        if n == 0 {
            bail!("closed by the guest at byte {offset}");
        }
        if let Some(i) = (0..n).find(|i| buf[*i] != stream_byte(offset + *i as u64)) {
            bail!("byte {} is wrong", offset + i as u64);
        }
        offset += n as u64;
        progress(n as u64);
        thread::sleep(pause);
    }
    let _ = s.shutdown(Shutdown::Both);
    Ok(())
}

/// One numbered request to the guest's echo every `every` until `stop`; each answer must be
/// its own, in order. `progress` is told each exchange's size.
pub fn interactive(
    s: TcpStream,
    every: Duration,
    stop: &AtomicBool,
    mut progress: impl FnMut(u64),
) -> Result<()> {
    let mut reader = BufReader::new(s.try_clone().context("cloning the socket")?);
    let mut writer = s;
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let line = format!("request {n}\n");
        let mut back = String::new();
        writer
            .write_all(line.as_bytes())
            .and_then(|()| reader.read_line(&mut back).map(drop))
            .with_context(|| format!("request {n}"))?;
        if back != line {
            bail!("request {n} answered with {back:?}");
        }
        progress(line.len() as u64);
        n += 1;
        thread::sleep(every);
    }
    let _ = writer.shutdown(Shutdown::Both);
    Ok(())
}

/// Sends `message` to the guest's echo on `s`; what came back, without the newline.
pub fn echo_once(s: &mut TcpStream, message: &str) -> Result<String> {
    s.write_all(format!("{message}\n").as_bytes())
        .context("writing to the echo")?;
    let mut back = String::new();
    BufReader::new(s.try_clone()?)
        .read_line(&mut back)
        .context("reading the echo")?;
    Ok(back.trim_end().to_owned())
}

/// The guest's endless pattern, read in 16 KiB pieces every 10 ms.
fn download(s: TcpStream, t: &Tracked, stop: &AtomicBool) -> Result<()> {
    read_stream(s, 16 * 1024, Duration::from_millis(10), stop, |n| {
        t.progress(n)
    })
}

/// The pattern sent in 16 KiB chunks every 10 ms; the guest checks it and acknowledges each.
fn upload(mut s: TcpStream, t: &Tracked, stop: &AtomicBool) -> Result<()> {
    let mut chunk = vec![0u8; UPLOAD_CHUNK];
    let mut offset = 0u64;
    while !stop.load(Ordering::Relaxed) {
        fill_stream(&mut chunk, offset);
        let mut ack = [0u8; 8];
        s.write_all(&chunk)
            .and_then(|()| s.read_exact(&mut ack))
            .with_context(|| format!("chunk at byte {offset}"))?;
        offset += chunk.len() as u64;
        match u64::from_le_bytes(ack) {
            UPLOAD_BAD => bail!("the guest found a wrong byte before {offset}"),
            checked if checked != offset => {
                bail!("the guest checked {checked} bytes, {offset} were sent")
            }
            _ => t.progress(chunk.len() as u64),
        }
        thread::sleep(Duration::from_millis(10));
    }
    let _ = s.shutdown(Shutdown::Both);
    Ok(())
}

/// One numbered request every 10 ms.
fn chat(s: TcpStream, t: &Tracked, stop: &AtomicBool) -> Result<()> {
    interactive(s, Duration::from_millis(10), stop, |n| t.progress(n))
}

/// Says hello once, stays silent through the move, then must still be answered.
fn idle(mut s: TcpStream, t: &Tracked, stop: &AtomicBool) -> Result<()> {
    let mut echo = |msg: &str| -> Result<()> {
        let back = echo_once(&mut s, msg)?;
        if back != msg {
            bail!("{msg:?} echoed as {back:?}");
        }
        t.bytes.fetch_add(msg.len() as u64 + 1, Ordering::Relaxed);
        Ok(())
    };
    echo("hello before the move")?;
    while !stop.load(Ordering::Relaxed) {
        thread::sleep(Duration::from_millis(20));
    }
    echo("hello after the move")?;
    let _ = s.shutdown(Shutdown::Both);
    Ok(())
}

/// Resolves the service with dig against BIND9, connects to what it says, and asks `/id`.
fn newcomer(boot_id: &str, clock: Instant) -> Newcomer {
    let at_s = clock.elapsed().as_secs_f64();
    let started = Instant::now();
    let mut n = Newcomer {
        at_s,
        resolved: None,
        by_name: true,
        ok: false,
        took_ms: 0,
        error: None,
    };
    let result = (|| -> Result<()> {
        let addr = resolve()?;
        n.resolved = Some(addr);
        let body = http_get(addr, "/id", NEWCOMER_TIMEOUT)?;
        if body.trim() != boot_id.trim() {
            bail!("{addr} answered {:?}, not the guest's boot id", body.trim());
        }
        Ok(())
    })();
    n.took_ms = started.elapsed().as_millis() as u64;
    match result {
        Ok(()) => n.ok = true,
        Err(err) => n.error = Some(format!("{err:#}")),
    }
    n
}

/// `dig +short @BIND9 svc.example.test A`, from the calling thread's namespace.
pub fn resolve() -> Result<IpAddr> {
    let out = Command::new("dig")
        .args(["+short", "+norec", "+time=2", "+tries=2"])
        .arg(format!("@{SERVER_IP}"))
        .args([SERVICE_NAME, "A"])
        .stdin(Stdio::null())
        .output()
        .context("running dig")?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.trim().parse().ok())
        .with_context(|| {
            format!(
                "dig gave no address for {SERVICE_NAME}: {} {}",
                text.trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            )
        })
}

/// `GET path` from the guest's HTTP server at `addr`, from the calling thread's namespace;
/// connecting, and each read and write, may take up to `timeout`. The body.
pub fn http_get(addr: IpAddr, path: &str, timeout: Duration) -> Result<String> {
    let mut s = connect_within(SocketAddr::new(addr, HTTP_PORT), timeout)?;
    write!(s, "GET {path} HTTP/1.0\r\n\r\n")?;
    let mut response = String::new();
    s.read_to_string(&mut response)
        .with_context(|| format!("reading the answer from {addr}"))?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .context("an HTTP answer without headers")?;
    if !head.starts_with("HTTP/1.0 200") {
        bail!("GET {path}: {}", head.lines().next().unwrap_or_default());
    }
    Ok(body.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expected_sha256_is_the_pattern_digest() {
        let mut pattern = vec![0u8; 3 << 20];
        fill_stream(&mut pattern, 0);
        let direct = hex(ring::digest::digest(&ring::digest::SHA256, &pattern).as_ref());
        assert_eq!(expected_sha256(3 << 20), direct);
        assert_ne!(expected_sha256(3 << 20), expected_sha256((3 << 20) - 1));
    }
}
