//! A move's workload in network namespaces, for either address family: the
//! guest's TCP servers (threads with sockets in the guest namespace) and the
//! client's long-lived connections, each of which checks every byte in order.
//! Every socket has a timeout, so a broken path fails the test in bounded time.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{IpAddr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use movarto_lab::netns::Netns;

/// Every socket's read, write and connect timeout.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// The ports the guest serves: download, upload, interactive echo, idle echo.
pub const DOWNLOAD_PORT: u16 = 5001;
pub const UPLOAD_PORT: u16 = 5002;
pub const ECHO_PORT: u16 = 5003;
pub const IDLE_PORT: u16 = 5004;

/// The byte at position `i` of every checked stream.
pub fn pattern(i: u64) -> u8 {
    (i.wrapping_mul(7).wrapping_add(3) % 251) as u8
}

/// Starts the guest's four servers on every address of `guest` (IPv4 and IPv6).
pub fn serve_guest(guest: &Netns) -> Result<()> {
    for (port, handler) in [
        (DOWNLOAD_PORT, download_server as fn(TcpStream)),
        (UPLOAD_PORT, upload_server),
        (ECHO_PORT, echo_server),
        (IDLE_PORT, echo_server),
    ] {
        let listener = {
            let _in = guest.enter()?;
            TcpListener::bind((Ipv6Addr::UNSPECIFIED, port))
                .with_context(|| format!("binding port {port} in {}", guest.name()))?
        };
        thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let _ = conn.set_read_timeout(Some(IO_TIMEOUT));
                let _ = conn.set_write_timeout(Some(IO_TIMEOUT));
                thread::spawn(move || handler(conn));
            }
        });
    }
    Ok(())
}

/// Streams the pattern until the client closes.
fn download_server(mut conn: TcpStream) {
    let mut at = 0u64;
    let mut buf = [0u8; 8192];
    loop {
        for b in buf.iter_mut() {
            *b = pattern(at);
            at += 1;
        }
        if conn.write_all(&buf).is_err() {
            return;
        }
        thread::sleep(Duration::from_millis(4));
    }
}

/// Checks the uploaded pattern; answers "ok <n>" or "bad <offset>" at EOF.
fn upload_server(mut conn: TcpStream) {
    let mut at = 0u64;
    let mut buf = [0u8; 8192];
    loop {
        match conn.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                for b in &buf[..n] {
                    if *b != pattern(at) {
                        let _ = writeln!(conn, "bad {at}");
                        return;
                    }
                    at += 1;
                }
            }
            Err(_) => return,
        }
    }
    let _ = writeln!(conn, "ok {at}");
}

/// Line echo.
fn echo_server(conn: TcpStream) {
    let Ok(mut out) = conn.try_clone() else {
        return;
    };
    for line in BufReader::new(conn).lines() {
        let Ok(line) = line else { return };
        if writeln!(out, "{line}").is_err() {
            return;
        }
    }
}

/// A connection from `ns` to `to`:`port`, with timeouts.
pub fn connect(ns: &Netns, to: IpAddr, port: u16) -> Result<TcpStream> {
    let _in = ns.enter()?;
    let s = TcpStream::connect_timeout(&SocketAddr::from((to, port)), IO_TIMEOUT)
        .with_context(|| format!("connecting to {to} port {port} from {}", ns.name()))?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(s)
}

/// One request/response on a fresh connection from `client` to `to`.
pub fn one_exchange(client: &Netns, to: IpAddr, port: u16, text: &str) -> Result<String> {
    let conn = connect(client, to, port)?;
    let mut out = conn.try_clone()?;
    writeln!(out, "{text}")?;
    let mut line = String::new();
    BufReader::new(conn)
        .read_line(&mut line)
        .with_context(|| format!("reading the answer from {to} port {port}"))?;
    Ok(line.trim().to_owned())
}

/// The client's long-lived connections to the guest, running in threads.
pub struct Workload {
    pub stop: Arc<AtomicBool>,
    pub downloaded: Arc<AtomicU64>,
    pub exchanges: Arc<AtomicU64>,
    pub worst_gap_ms: Arc<AtomicU64>,
    threads: Vec<JoinHandle<Result<String, String>>>,
    idle: TcpStream,
}

fn note_gap(worst: &AtomicU64, last: &mut Instant) {
    let gap = last.elapsed().as_millis() as u64;
    worst.fetch_max(gap, Ordering::Relaxed);
    *last = Instant::now();
}

impl Workload {
    /// Opens a download, an upload, an interactive and an idle connection from
    /// `client` to `home`.
    pub fn start(client: &Netns, home: IpAddr) -> Result<Workload> {
        let stop = Arc::new(AtomicBool::new(false));
        let downloaded = Arc::new(AtomicU64::new(0));
        let exchanges = Arc::new(AtomicU64::new(0));
        let worst_gap_ms = Arc::new(AtomicU64::new(0));
        let mut threads = Vec::new();

        let mut down = connect(client, home, DOWNLOAD_PORT)?;
        let (s, d, w) = (stop.clone(), downloaded.clone(), worst_gap_ms.clone());
        threads.push(thread::spawn(move || {
            let mut buf = [0u8; 16384];
            let mut last = Instant::now();
            while !s.load(Ordering::Relaxed) {
                let n = down.read(&mut buf).map_err(|e| format!("download: {e}"))?;
                if n == 0 {
                    return Err("download: server closed".into());
                }
                let at = d.load(Ordering::Relaxed);
                for (i, b) in buf[..n].iter().enumerate() {
                    if *b != pattern(at + i as u64) {
                        return Err(format!("download: wrong byte at {}", at + i as u64));
                    }
                }
                d.fetch_add(n as u64, Ordering::Relaxed);
                note_gap(&w, &mut last);
            }
            Ok(format!(
                "download: {} bytes in order",
                d.load(Ordering::Relaxed)
            ))
        }));

        let mut up = connect(client, home, UPLOAD_PORT)?;
        let (s, w) = (stop.clone(), worst_gap_ms.clone());
        threads.push(thread::spawn(move || {
            let mut at = 0u64;
            let mut buf = [0u8; 4096];
            let mut last = Instant::now();
            while !s.load(Ordering::Relaxed) {
                for b in buf.iter_mut() {
                    *b = pattern(at);
                    at += 1;
                }
                up.write_all(&buf).map_err(|e| format!("upload: {e}"))?;
                note_gap(&w, &mut last);
                thread::sleep(Duration::from_millis(5));
            }
            up.shutdown(Shutdown::Write)
                .map_err(|e| format!("upload: {e}"))?;
            let mut answer = String::new();
            BufReader::new(&up)
                .read_line(&mut answer)
                .map_err(|e| format!("upload: {e}"))?;
            if answer.trim() != format!("ok {at}") {
                return Err(format!("upload: sent {at} bytes, server says {answer:?}"));
            }
            Ok(format!("upload: {at} bytes verified by the server"))
        }));

        let chat = connect(client, home, ECHO_PORT)?;
        let (s, x, w) = (stop.clone(), exchanges.clone(), worst_gap_ms.clone());
        threads.push(thread::spawn(move || {
            let mut out = chat.try_clone().map_err(|e| e.to_string())?;
            let mut lines = BufReader::new(chat);
            let mut last = Instant::now();
            let mut n = 0u64;
            while !s.load(Ordering::Relaxed) {
                writeln!(out, "req {n}").map_err(|e| format!("interactive: {e}"))?;
                let mut line = String::new();
                lines
                    .read_line(&mut line)
                    .map_err(|e| format!("interactive: {e}"))?;
                if line.trim() != format!("req {n}") {
                    return Err(format!("interactive: sent req {n}, got {line:?}"));
                }
                n += 1;
                x.fetch_add(1, Ordering::Relaxed);
                note_gap(&w, &mut last);
                thread::sleep(Duration::from_millis(10));
            }
            Ok(format!("interactive: {n} request/response exchanges"))
        }));

        let idle = connect(client, home, IDLE_PORT)?;
        Ok(Workload {
            stop,
            downloaded,
            exchanges,
            worst_gap_ms,
            threads,
            idle,
        })
    }

    /// Bytes downloaded and exchanges made so far.
    pub fn progress(&self) -> (u64, u64) {
        (
            self.downloaded.load(Ordering::Relaxed),
            self.exchanges.load(Ordering::Relaxed),
        )
    }

    /// Stops the connections and checks each: every byte in order, the upload
    /// verified by the server, and the idle connection still answering.
    pub fn finish(self) -> Result<Vec<String>> {
        self.stop.store(true, Ordering::Relaxed);
        let mut report = Vec::new();
        for t in self.threads {
            match t.join() {
                Ok(Ok(line)) => report.push(line),
                Ok(Err(e)) => bail!("connection broke: {e}"),
                Err(_) => bail!("a connection's thread panicked"),
            }
        }
        let mut idle = self.idle;
        writeln!(idle, "still here").context("idle write")?;
        let mut line = String::new();
        BufReader::new(&idle)
            .read_line(&mut line)
            .context("idle read")?;
        if line.trim() != "still here" {
            bail!("idle: got {line:?}");
        }
        report.push("idle: still answering".to_owned());
        Ok(report)
    }
}

/// Polls `ok` every 20 ms until it holds; fails after `timeout`.
pub fn wait_for(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !ok() {
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Makes the kernel of `ns` resolve its next hop toward `peer` (XDP can't wait for ARP
/// or ND); shared with the lab's triangle.
pub use movarto_lab::triangle::prime_next_hop;
