//! The lab of DESIGN.md on one machine: client, wan router, ops (orchestrator and BIND9),
//! site A and site B as network namespaces, each site with its agent process.
//!
//! ```text
//! client 198.51.100.7 ── wan ── 203.0.113.1 (TA) site A ── tap0 ── VM 192.0.2.10 (H)
//!                         │  └─ 203.0.113.129 (TB) site B ── tap0   (N = 198.18.0.10)
//!   ops 198.19.255.2 ─────┘ (orchestrator; reaches BIND9 at 192.0.2.53 on its own link)
//! ```

use std::{
    fs,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{Ipv4Addr, Shutdown, TcpStream},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use aya::programs::XdpMode;
use movarto_guest_server::{ECHO_PORT, HTTP_PORT, STREAM_PORT, stream_byte};
use movarto_user::{
    agent::{
        AgentClient,
        api::{DatapathRequest, TapRequest, VmRequest},
    },
    datapath::Datapath,
};

use crate::{
    GUEST_KERNEL_ARGS,
    dns_server::{Bind9, SERVICE, in_netns},
    netns::{ChildGuard, Netns, veth},
};

pub const H: &str = "192.0.2.10";
pub const N: &str = "198.18.0.10";
pub const TA: &str = "203.0.113.1";
pub const TB: &str = "203.0.113.129";
pub const GATEWAY_MAC: &str = "02:00:00:00:00:01";
pub const GATEWAY_CIDR: &str = "192.0.2.1/24";
pub const GUEST_MAC: &str = "52:54:00:00:00:10";
pub const AGENT_PORT: u16 = 7878;
pub const IO_TIMEOUT: Duration = Duration::from_secs(20);

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

pub fn movarto_user() -> PathBuf {
    let bin = repo().join("target/debug/movarto-user");
    assert!(
        bin.exists(),
        "{} is missing: `cargo build -p movarto-user` (cargo xtask test does)",
        bin.display()
    );
    bin
}

pub fn sh(ns: &Netns, args: &[&str]) {
    ns.ip(args)
        .unwrap_or_else(|e| panic!("ip {args:?} in {}: {e:#}", ns.name()));
}

/// A scratch directory, removed on drop.
pub struct Scratch(pub PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

pub struct Lab {
    // Processes first: they stop before their namespaces go.
    agents: Vec<(String, AgentProc)>,
    _wan_xdp: Option<Datapath>,
    pub bind: Bind9,
    pub client: Netns,
    pub wan: Netns,
    pub a: Netns,
    pub b: Netns,
    pub uplink_a: String,
    pub uplink_b: String,
    pub scratch: Scratch,
    _serial: std::sync::MutexGuard<'static, ()>,
}

/// An agent process. Dropping it stops it as an operator would (SIGTERM: it stops its
/// VMs), and kills it only if it does not exit in time.
pub struct AgentProc(ChildGuard);

impl AgentProc {
    pub fn pid(&self) -> u32 {
        self.0.id()
    }

    /// SIGTERM, then wait up to `grace`; the guard's SIGKILL after that.
    pub fn stop(&mut self, grace: Duration) {
        // Reaped already: its PID may belong to someone else now.
        if matches!(self.0.try_wait(), Ok(Some(_))) {
            return;
        }
        // SAFETY: signalling a child we started, by its PID.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if matches!(self.0.try_wait(), Ok(Some(_))) {
                return;
            }
            thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(15));
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for (_, agent) in &mut self.agents {
            agent.stop(Duration::from_secs(15));
        }
        self.agents.clear();
        // A VM whose agent crashed and never came back: the records still name it.
        for site in ["a", "b"] {
            let dir = self.scratch.0.join(format!("state-{site}"));
            for entry in fs::read_dir(&dir).into_iter().flatten().flatten() {
                let pid = fs::read_to_string(entry.path())
                    .ok()
                    .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
                    .and_then(|v| v["pid"].as_u64());
                if let Some(pid) = pid
                    && movarto_user::qemu::vm::is_qemu(pid as u32)
                {
                    // SAFETY: a QEMU this lab's agent started, by its PID.
                    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                }
            }
        }
        // Pins are global (bpffs), not per namespace.
        for uplink in [&self.uplink_a, &self.uplink_b] {
            let _ = movarto_user::datapath::detach(uplink);
        }
    }
}

/// Labs share the machine's CPUs with a TCG guest each: one at a time per process.
static ONE_LAB: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Builds the lab and starts both agents; waits until they answer. Holds a process-wide
/// lock until the lab drops, so tests using it run one after another.
pub fn lab() -> Lab {
    let serial = ONE_LAB
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    // Interface and pin names are short (15 bytes) and pins are global: unique per lab.
    let tag = format!(
        "{}{}",
        std::process::id() % 10_000,
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    let scratch = Scratch(std::env::temp_dir().join(format!("movarto-migrate-{tag}")));
    fs::create_dir_all(&scratch.0).expect("scratch");
    let bind = Bind9::start("mig").expect("BIND9");
    let mut l = Lab {
        agents: Vec::new(),
        _wan_xdp: None,
        bind,
        client: Netns::new("mclient").expect("netns"),
        wan: Netns::new("mwan").expect("netns"),
        a: Netns::new("msitea").expect("netns"),
        b: Netns::new("msiteb").expect("netns"),
        uplink_a: format!("ma{tag}"),
        uplink_b: format!("mb{tag}"),
        scratch,
        _serial: serial,
    };
    for ns in [&l.wan, &l.a, &l.b] {
        ns.run("sysctl", &["-qw", "net.ipv4.conf.all.forwarding=1"])
            .expect("sysctl");
    }
    veth(&l.client, "c0", &l.wan, "wc").expect("veth");
    veth(&l.wan, "wa", &l.a, &l.uplink_a).expect("veth");
    veth(&l.wan, "wb", &l.b, &l.uplink_b).expect("veth");
    veth(&l.bind.client, "ow", &l.wan, "wo").expect("veth");
    sh(&l.client, &["addr", "add", "198.51.100.7/24", "dev", "c0"]);
    sh(
        &l.client,
        &["route", "add", "default", "via", "198.51.100.1"],
    );
    sh(&l.wan, &["addr", "add", "198.51.100.1/24", "dev", "wc"]);
    sh(&l.wan, &["addr", "add", "203.0.113.126/25", "dev", "wa"]);
    sh(&l.wan, &["addr", "add", "203.0.113.254/25", "dev", "wb"]);
    sh(&l.wan, &["addr", "add", "198.19.255.1/24", "dev", "wo"]);
    sh(&l.wan, &["route", "add", "192.0.2.0/24", "via", TA]);
    sh(&l.wan, &["route", "add", "198.18.0.0/15", "via", TB]);
    sh(
        &l.bind.client,
        &["addr", "add", "198.19.255.2/24", "dev", "ow"],
    );
    sh(
        &l.bind.client,
        &["route", "add", "203.0.113.0/24", "via", "198.19.255.1"],
    );
    sh(
        &l.a,
        &["addr", "add", &format!("{TA}/25"), "dev", &l.uplink_a],
    );
    sh(&l.a, &["route", "add", "default", "via", "203.0.113.126"]);
    sh(
        &l.b,
        &["addr", "add", &format!("{TB}/25"), "dev", &l.uplink_b],
    );
    sh(&l.b, &["route", "add", "default", "via", "203.0.113.254"]);
    // Veth endpoints checksum in software (see docs/building.md).
    l.client
        .run("ethtool", &["-K", "c0", "tx", "off"])
        .expect("ethtool");
    // A veth delivers what XDP on its peer transmits only when it runs XDP itself.
    l._wan_xdp = Some(in_netns(&l.wan, || {
        let mut pass = Datapath::load().expect("load");
        for dev in ["wa", "wb"] {
            pass.attach_xdp(dev, XdpMode::Default)
                .expect("pass-through XDP");
        }
        pass
    }));
    // The service's record points at H before the move.
    l.bind
        .nsupdate(&format!(
            "update delete {SERVICE} A\nupdate delete {SERVICE} AAAA\nupdate add {SERVICE} 300 A {H}\nsend\n"
        ))
        .expect("nsupdate");
    for site in ["a", "b"] {
        let token = l.scratch.0.join(format!("token-{site}"));
        fs::write(&token, format!("site-{site}-token-0123456789abcdef\n")).expect("token");
        fs::set_permissions(&token, fs::Permissions::from_mode(0o600)).expect("chmod");
        l.start_agent(site);
    }
    let ready = with_agents(&l, async |a, b| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while a.health().await.is_err() || b.health().await.is_err() {
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        true
    });
    assert!(
        ready,
        "the agents did not answer within 10 s:\nA:\n{}\nB:\n{}",
        agent_log(&l, "a"),
        agent_log(&l, "b")
    );
    l
}

impl Lab {
    /// Starts site `site`'s agent (`a` or `b`) in its namespace, logging to the scratch dir.
    pub fn start_agent(&mut self, site: &str) {
        let (ns, uplink, listen) = if site == "a" {
            (&self.a, &self.uplink_a, TA)
        } else {
            (&self.b, &self.uplink_b, TB)
        };
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.scratch.0.join(format!("agent-{site}.log")))
            .expect("log");
        let agent = ns
            .spawn(
                Command::new("nsenter")
                    .arg(format!("--net=/run/netns/{}", ns.name()))
                    .arg(movarto_user())
                    .args(["agent", "--site", site, "--uplink", uplink])
                    .arg("--listen")
                    .arg(format!("{listen}:{AGENT_PORT}"))
                    .arg("--token-file")
                    .arg(self.scratch.0.join(format!("token-{site}")))
                    .args(["--sweep-interval", "500ms", "--established-idle", "60s"])
                    .arg("--state-dir")
                    .arg(self.scratch.0.join(format!("state-{site}")))
                    .arg("--stop-vms-on-exit")
                    .stdout(Stdio::null())
                    .stderr(Stdio::from(log)),
            )
            .expect("agent");
        self.agents.retain(|(s, _)| s != site);
        self.agents.push((site.to_owned(), AgentProc(agent)));
    }

    /// Kills site `site`'s agent (SIGKILL), as a crash would: its VMs keep running.
    pub fn crash_agent(&mut self, site: &str) {
        if let Some(at) = self.agents.iter().position(|(s, _)| s == site) {
            let (_, mut agent) = self.agents.remove(at);
            // SAFETY: signalling a child we started, by its PID (not yet reaped).
            unsafe { libc::kill(agent.pid() as i32, libc::SIGKILL) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while !matches!(agent.0.try_wait(), Ok(Some(_))) && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// Stops site `site`'s agent (SIGTERM), e.g. to restart it.
    pub fn stop_agent(&mut self, site: &str) {
        if let Some(at) = self.agents.iter().position(|(s, _)| s == site) {
            let (_, mut agent) = self.agents.remove(at);
            agent.stop(Duration::from_secs(15));
        }
    }
}

pub fn token(l: &Lab, site: &str) -> String {
    fs::read_to_string(l.scratch.0.join(format!("token-{site}")))
        .expect("token")
        .trim()
        .to_owned()
}

pub fn agent_log(l: &Lab, site: &str) -> String {
    fs::read_to_string(l.scratch.0.join(format!("agent-{site}.log"))).unwrap_or_default()
}

/// Everything that explains a stuck migration: both agents' logs, their view of the VM
/// (run state and migration phase), and QEMU's own logs at both sites.
pub fn stall_report(l: &Lab) -> String {
    let views = with_agents(l, async |a, b| {
        (
            format!("{:?}", a.vm("web").await),
            format!("{:?}", b.vm("web").await),
        )
    });
    let qemu_log = |site: &str| {
        fs::read_to_string(l.scratch.0.join(format!("state-{site}/web.log"))).unwrap_or_default()
    };
    format!(
        "agent logs:\nA:\n{}\nB:\n{}\nVM at A: {}\nVM at B: {}\nQEMU log at A:\n{}\nQEMU log at B:\n{}",
        agent_log(l, "a"),
        agent_log(l, "b"),
        views.0,
        views.1,
        qemu_log("a"),
        qemu_log("b"),
    )
}

pub fn guest_spec(l: &Lab, site: &str) -> String {
    let guest = repo().join("target/guest");
    format!(
        r#"
name = "web"
memory_mib = 256
qmp_socket = "{dir}/web-{site}.qmp"
serial_log = "{dir}/web-{site}.console"
kernel = "{guest}/vmlinuz"
initrd = "{guest}/initramfs.cpio.gz"
append = "{GUEST_KERNEL_ARGS} movarto.ip={H}/24 movarto.gw=192.0.2.1"
{disk}
[nic]
mac = "{GUEST_MAC}"
tap = "tap0"
checksum_offload = false
"#,
        dir = l.scratch.0.display(),
        guest = guest.display(),
        disk = if disk_image(l, site).exists() {
            format!("disk = \"{}\"\n", disk_image(l, site).display())
        } else {
            String::new()
        },
    )
}

/// The guest's disk image at `site`; the spec has a disk once [`add_disk`] made them.
pub fn disk_image(l: &Lab, site: &str) -> PathBuf {
    l.scratch.0.join(format!("web-{site}.img"))
}

/// Gives the guest a `mib` MiB raw disk: at A filled with a pattern, at B an empty image of
/// the same size (the mirror's target; no shared storage).
pub fn add_disk(l: &Lab, mib: usize) {
    let block: Vec<u8> = (0..1 << 20)
        .map(|i: u32| (i.wrapping_mul(31) >> 3) as u8)
        .collect();
    let mut a = fs::File::create(disk_image(l, "a")).expect("disk at A");
    for n in 0..mib {
        let mut chunk = block.clone();
        chunk[..8].copy_from_slice(&(n as u64).to_le_bytes());
        a.write_all(&chunk).expect("write");
    }
    fs::File::create(disk_image(l, "b"))
        .and_then(|b| b.set_len((mib << 20) as u64))
        .expect("disk at B");
}

/// Site A through its agent: the tap with the anycast gateway, the datapath tracking `H`,
/// and the VM booting from `spec_a`.
pub async fn start_site_a(a: &AgentClient, spec_a: &str) -> anyhow::Result<()> {
    a.ensure_tap(
        "tap0",
        &TapRequest {
            gateway_mac: GATEWAY_MAC.parse()?,
            gateway_cidr: GATEWAY_CIDR.to_owned(),
        },
    )
    .await?;
    a.apply_datapath(&DatapathRequest {
        vm_iface: "tap0".to_owned(),
        mode: movarto_common::config::Mode::Track,
        home_addr: H.parse()?,
        new_addr: None,
        local_tunnel_addr: TA.parse()?,
        peer_tunnel_addr: TB.parse()?,
        // Tracking sends no GUE; the migration gives both sites its own token.
        token: movarto_common::ids::SessionToken(0),
        tunnel_mtu: 1500,
        vm_mac: GUEST_MAC.parse()?,
        gateway_mac: GATEWAY_MAC.parse()?,
    })
    .await?;
    a.start_vm(&VmRequest {
        spec_toml: spec_a.to_owned(),
        incoming: false,
    })
    .await?;
    Ok(())
}

/// Site A through its agent ([`start_site_a`]). Waits until the
/// guest answers at `H` and the probes' unanswered SYNs have aged out of counting as
/// connections. Returns the guest's boot id.
pub fn boot_at_a(l: &Lab) -> String {
    let spec_a = guest_spec(l, "a");
    let started = with_agents(l, async |a, _b| start_site_a(&a, &spec_a).await);
    if let Err(err) = started {
        panic!(
            "setting up site A: {err:#}\nagent A log:\n{}",
            agent_log(l, "a")
        );
    }
    let booted = Instant::now();
    wait_for("the guest to answer at A", Duration::from_secs(90), || {
        l.client
            .run(
                "curl",
                &[
                    "-sS",
                    "--fail",
                    "--max-time",
                    "2",
                    &format!("http://{H}/id"),
                ],
            )
            .is_ok()
    });
    eprintln!("guest answers at A after {:?}", booted.elapsed());
    let boot_id = http_get(l, H, "/id");
    // The probes' unanswered SYNs are tracked too; once older than a handshake they no
    // longer count as connections, so the report can be checked against ours exactly.
    thread::sleep(Duration::from_nanos(
        movarto_common::flow::timeout::HANDSHAKE_NS + 500_000_000,
    ));

    boot_id
}

/// `movarto-user migrate` for the guest from A to B, run in the ops namespace, with
/// DNS, JSON output and the TTL wait skipped; `extra` adds or overrides options.
pub fn migrate_command(l: &Lab, extra: &[&str]) -> Command {
    let spec_b_path = l.scratch.0.join("web-b.toml");
    fs::write(&spec_b_path, guest_spec(l, "b")).expect("spec");
    let mut migrate = Command::new("nsenter");
    migrate
        .arg(format!("--net=/run/netns/{}", l.bind.client.name()))
        .arg(movarto_user())
        .args(["migrate", "--vm", "web", "--json"])
        .arg("--source")
        .arg(format!("http://{TA}:{AGENT_PORT}"))
        .arg("--destination")
        .arg(format!("http://{TB}:{AGENT_PORT}"))
        .arg("--source-token-file")
        .arg(l.scratch.0.join("token-a"))
        .arg("--destination-token-file")
        .arg(l.scratch.0.join("token-b"))
        .arg("--destination-spec")
        .arg(&spec_b_path)
        .args(["--home", H])
        .args(if extra.contains(&"move") {
            &[][..]
        } else {
            &["--new-addr", N][..]
        })
        .args(["--source-tunnel", TA, "--destination-tunnel", TB])
        .args(["--gateway-mac", GATEWAY_MAC, "--gateway-cidr", GATEWAY_CIDR])
        .arg("--dns-server")
        .arg(l.bind.server_addr().to_string())
        .args(["--zone", "example.test", "--dns-name", SERVICE])
        .arg("--dns-key-file")
        .arg(l.bind.key_file())
        .arg("--skip-ttl-wait")
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    migrate
}

/// Runs `f` with a client of each agent, on a runtime inside the ops namespace.
pub fn with_agents<T: Send>(
    l: &Lab,
    f: impl AsyncFnOnce(AgentClient, AgentClient) -> T + Send,
) -> T {
    let (ta, tb) = (token(l, "a"), token(l, "b"));
    in_netns(&l.bind.client, move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let a = AgentClient::new(&format!("http://{TA}:{AGENT_PORT}"), &ta, None).expect("a");
        let b = AgentClient::new(&format!("http://{TB}:{AGENT_PORT}"), &tb, None).expect("b");
        runtime.block_on(f(a, b))
    })
}

// ---- the client's connections ----

#[derive(Default)]
pub struct Stats {
    pub streamed: AtomicU64,
    pub exchanges: AtomicU64,
    pub worst_stall_ms: AtomicU64,
    pub failed: std::sync::Mutex<Vec<String>>,
}

impl Stats {
    pub fn fail(&self, what: String) {
        self.failed.lock().expect("lock").push(what);
    }
}

pub fn connect(l: &Lab, port: u16) -> TcpStream {
    in_netns(&l.client, || {
        let addr = (H.parse::<Ipv4Addr>().expect("H"), port).into();
        let s = TcpStream::connect_timeout(&addr, IO_TIMEOUT).expect("connect to H");
        s.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
        s.set_write_timeout(Some(IO_TIMEOUT)).expect("timeout");
        s
    })
}

/// Reads the guest's byte-checked stream until `stop`; every byte must be the pattern's.
pub fn stream_reader(mut s: TcpStream, stats: Arc<Stats>, stop: Arc<AtomicBool>) {
    let mut offset = 0u64;
    let mut buf = vec![0u8; 65536];
    let mut last = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        match s.read(&mut buf) {
            Ok(0) => return stats.fail(format!("stream closed by the guest at {offset}")),
            Ok(n) => {
                for (i, b) in buf[..n].iter().enumerate() {
                    if *b != stream_byte(offset + i as u64) {
                        return stats.fail(format!("stream byte {} is wrong", offset + i as u64));
                    }
                }
                offset += n as u64;
                stats.streamed.store(offset, Ordering::Relaxed);
                let stall = last.elapsed().as_millis() as u64;
                stats.worst_stall_ms.fetch_max(stall, Ordering::Relaxed);
                last = Instant::now();
                // A paced reader: the stream must not saturate the TCG guest.
                thread::sleep(Duration::from_millis(20));
            }
            Err(err) => return stats.fail(format!("stream read at {offset}: {err}")),
        }
    }
    let _ = s.shutdown(Shutdown::Both);
}

/// Echo request/response every 50 ms until `stop`.
pub fn interactive(s: TcpStream, stats: Arc<Stats>, stop: Arc<AtomicBool>) {
    let mut reader = BufReader::new(s.try_clone().expect("clone"));
    let mut writer = s;
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let line = format!("exchange {n}\n");
        let mut back = String::new();
        if let Err(err) = writer
            .write_all(line.as_bytes())
            .and_then(|()| reader.read_line(&mut back).map(drop))
        {
            return stats.fail(format!("exchange {n}: {err}"));
        }
        if back != line {
            return stats.fail(format!("exchange {n}: echoed {back:?}"));
        }
        n += 1;
        stats.exchanges.store(n, Ordering::Relaxed);
        thread::sleep(Duration::from_millis(50));
    }
    let _ = writer.shutdown(Shutdown::Both);
}

/// The pre-move connections the migration tests watch: a byte-checked stream and an
/// interactive echo, both running, and an idle echo connection that has said hello.
pub struct Connections {
    pub stats: Arc<Stats>,
    pub idle: TcpStream,
    stop: Arc<AtomicBool>,
    workers: Vec<thread::JoinHandle<()>>,
}

impl Connections {
    /// Opens them to `H` from the client and waits until traffic flows.
    pub fn open(l: &Lab) -> Self {
        let stats = Arc::new(Stats::default());
        let stop = Arc::new(AtomicBool::new(false));
        let stream = connect(l, STREAM_PORT);
        let chat = connect(l, ECHO_PORT);
        let mut idle = connect(l, ECHO_PORT);
        assert_eq!(echo_once(&mut idle, "hello before"), "hello before");
        let workers = vec![
            {
                let (stats, stop) = (stats.clone(), stop.clone());
                thread::spawn(move || stream_reader(stream, stats, stop))
            },
            {
                let (stats, stop) = (stats.clone(), stop.clone());
                thread::spawn(move || interactive(chat, stats, stop))
            },
        ];
        wait_for("traffic before the move", IO_TIMEOUT, || {
            stats.streamed.load(Ordering::Relaxed) > 100_000
                && stats.exchanges.load(Ordering::Relaxed) > 10
        });
        Self {
            stats,
            idle,
            stop,
            workers,
        }
    }

    /// Closes all three; returns what broke along the way.
    pub fn close(self) -> Vec<String> {
        self.stop.store(true, Ordering::Relaxed);
        for worker in self.workers {
            worker.join().expect("worker");
        }
        let _ = self.idle.shutdown(Shutdown::Both);
        self.stats.failed.lock().expect("lock").clone()
    }
}

pub fn echo_once(s: &mut TcpStream, message: &str) -> String {
    s.write_all(format!("{message}\n").as_bytes())
        .expect("write");
    let mut back = String::new();
    BufReader::new(s.try_clone().expect("clone"))
        .read_line(&mut back)
        .expect("read");
    back.trim_end().to_owned()
}

pub fn http_get(l: &Lab, ip: &str, path: &str) -> String {
    let out = l
        .client
        .run(
            "curl",
            &[
                "-sS",
                "--fail",
                "--max-time",
                "10",
                &format!("http://{ip}:{HTTP_PORT}{path}"),
            ],
        )
        .unwrap_or_else(|e| panic!("curl {ip}{path}: {e:#}"));
    out.trim().to_owned()
}

/// Waits up to `limit` for `migrate` (spawned with stdout piped) to exit, calling `tick`
/// every 100 ms meanwhile; returns its exit status and its JSON report.
pub fn finish_migrate(
    l: &Lab,
    orchestrator: &mut ChildGuard,
    limit: Duration,
    mut tick: impl FnMut(),
) -> (std::process::ExitStatus, serde_json::Value) {
    let started = Instant::now();
    let status = loop {
        if let Some(status) = orchestrator.try_wait().expect("wait") {
            break status;
        }
        assert!(
            started.elapsed() < limit,
            "migrate did not finish within {limit:?}\n{}",
            stall_report(l)
        );
        tick();
        thread::sleep(Duration::from_millis(100));
    };
    let mut json = String::new();
    if let Some(mut stdout) = orchestrator.child_mut().stdout.take() {
        stdout.read_to_string(&mut json).expect("report");
    }
    eprintln!("report:\n{json}");
    let report = serde_json::from_str(&json)
        .unwrap_or_else(|e| panic!("migrate printed no JSON report ({e}): {json:?}"));
    (status, report)
}

pub fn wait_for(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(100));
    }
}
