//! The whole move: two site agents (separate `movarto-user agent` processes), real QEMU,
//! real BIND9 and `movarto-user migrate` as an operator runs it, with live connections
//! from a client namespace.
//!
//! ```text
//! client 198.51.100.7 ── wan ── 203.0.113.1 (TA) site A ── tap0 ── VM 192.0.2.10 (H)
//!                         │  └─ 203.0.113.129 (TB) site B ── tap0   (N = 198.18.0.10)
//!   ops 198.19.255.2 ─────┘ (orchestrator; also reaches BIND at 192.0.2.53 on its own link)
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
use movarto_tests::{
    dns_server::{Bind9, SERVICE, in_netns},
    netns::{ChildGuard, Netns, veth},
    require_root,
};
use movarto_user::{
    agent::{
        AgentClient,
        api::{DatapathRequest, TapRequest, VmRequest},
    },
    datapath::{Datapath, cli::ModeArg, pin_dir},
};

const H: &str = "192.0.2.10";
const N: &str = "198.18.0.10";
const TA: &str = "203.0.113.1";
const TB: &str = "203.0.113.129";
const GATEWAY_MAC: &str = "02:00:00:00:00:01";
const GATEWAY_CIDR: &str = "192.0.2.1/24";
const GUEST_MAC: &str = "52:54:00:00:00:10";
const AGENT_PORT: u16 = 7878;
const IO_TIMEOUT: Duration = Duration::from_secs(20);

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn movarto_user() -> PathBuf {
    let bin = repo().join("target/debug/movarto-user");
    assert!(
        bin.exists(),
        "{} is missing: `cargo build -p movarto-user` (cargo xtask test does)",
        bin.display()
    );
    bin
}

fn sh(ns: &Netns, args: &[&str]) {
    ns.ip(args)
        .unwrap_or_else(|e| panic!("ip {args:?} in {}: {e:#}", ns.name()));
}

/// A scratch directory, removed on drop.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

struct Lab {
    // Processes first: they drop (and die) before their namespaces go.
    agents: Vec<ChildGuard>,
    _wan_xdp: Option<Datapath>,
    bind: Bind9,
    client: Netns,
    wan: Netns,
    a: Netns,
    b: Netns,
    uplink_a: String,
    uplink_b: String,
    scratch: Scratch,
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.agents.clear();
        // Pins are global (bpffs), not per namespace.
        for uplink in [&self.uplink_a, &self.uplink_b] {
            let _ = movarto_user::datapath::detach(uplink);
        }
    }
}

fn lab() -> Lab {
    let tag = std::process::id() % 100_000;
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
    for (site, ns, uplink) in [
        ("a", &l.a, l.uplink_a.clone()),
        ("b", &l.b, l.uplink_b.clone()),
    ] {
        let token = l.scratch.0.join(format!("token-{site}"));
        fs::write(&token, format!("site-{site}-token-0123456789abcdef\n")).expect("token");
        fs::set_permissions(&token, fs::Permissions::from_mode(0o600)).expect("chmod");
        let listen = if site == "a" { TA } else { TB };
        let log = fs::File::create(l.scratch.0.join(format!("agent-{site}.log"))).expect("log");
        let agent = ns
            .spawn(
                Command::new("nsenter")
                    .arg(format!("--net=/run/netns/{}", ns.name()))
                    .arg(movarto_user())
                    .args(["agent", "--site", site, "--uplink", &uplink])
                    .arg("--listen")
                    .arg(format!("{listen}:{AGENT_PORT}"))
                    .arg("--token-file")
                    .arg(&token)
                    .args(["--sweep-interval", "500ms", "--established-idle", "60s"])
                    .stdout(Stdio::null())
                    .stderr(Stdio::from(log)),
            )
            .expect("agent");
        l.agents.push(agent);
    }
    l
}

fn token(l: &Lab, site: &str) -> String {
    fs::read_to_string(l.scratch.0.join(format!("token-{site}")))
        .expect("token")
        .trim()
        .to_owned()
}

fn agent_log(l: &Lab, site: &str) -> String {
    fs::read_to_string(l.scratch.0.join(format!("agent-{site}.log"))).unwrap_or_default()
}

fn guest_spec(l: &Lab, site: &str) -> String {
    let guest = repo().join("target/guest");
    format!(
        r#"
name = "web"
memory_mib = 256
qmp_socket = "{dir}/web-{site}.qmp"
serial_log = "{dir}/web-{site}.console"
kernel = "{guest}/vmlinuz"
initrd = "{guest}/initramfs.cpio.gz"
append = "console=ttyS0 panic=-1 quiet movarto.ip={H}/24 movarto.gw=192.0.2.1"

[nic]
mac = "{GUEST_MAC}"
tap = "tap0"
checksum_offload = false
"#,
        dir = l.scratch.0.display(),
        guest = guest.display(),
    )
}

/// Runs `f` with a client of each agent, on a runtime inside the ops namespace.
fn with_agents<T: Send>(l: &Lab, f: impl AsyncFnOnce(AgentClient, AgentClient) -> T + Send) -> T {
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
struct Stats {
    streamed: AtomicU64,
    exchanges: AtomicU64,
    worst_stall_ms: AtomicU64,
    failed: std::sync::Mutex<Vec<String>>,
}

impl Stats {
    fn fail(&self, what: String) {
        self.failed.lock().expect("lock").push(what);
    }
}

fn connect(l: &Lab, port: u16) -> TcpStream {
    in_netns(&l.client, || {
        let addr = (H.parse::<Ipv4Addr>().expect("H"), port).into();
        let s = TcpStream::connect_timeout(&addr, IO_TIMEOUT).expect("connect to H");
        s.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
        s.set_write_timeout(Some(IO_TIMEOUT)).expect("timeout");
        s
    })
}

/// Reads the guest's byte-checked stream until `stop`; every byte must be the pattern's.
fn stream_reader(mut s: TcpStream, stats: Arc<Stats>, stop: Arc<AtomicBool>) {
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
fn interactive(s: TcpStream, stats: Arc<Stats>, stop: Arc<AtomicBool>) {
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

fn echo_once(s: &mut TcpStream, message: &str) -> String {
    s.write_all(format!("{message}\n").as_bytes())
        .expect("write");
    let mut back = String::new();
    BufReader::new(s.try_clone().expect("clone"))
        .read_line(&mut back)
        .expect("read");
    back.trim_end().to_owned()
}

fn http_get(l: &Lab, ip: &str, path: &str) -> String {
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

fn wait_for(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn nat_mode_migration_keeps_every_connection_and_switches_dns() {
    require_root();
    let l = lab();
    let spec_a = guest_spec(&l, "a");
    let spec_b = guest_spec(&l, "b");
    let spec_b_path = l.scratch.0.join("web-b.toml");
    fs::write(&spec_b_path, &spec_b).expect("spec");

    // Site A: the tap, the datapath tracking, the VM booted; all through A's agent.
    let started = with_agents(&l, async |a, _b| {
        for agent in [&a] {
            let deadline = Instant::now() + Duration::from_secs(10);
            while agent.health().await.is_err() {
                assert!(Instant::now() < deadline, "agent A did not come up");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        a.ensure_tap(
            "tap0",
            &TapRequest {
                gateway_mac: GATEWAY_MAC.to_owned(),
                gateway_cidr: GATEWAY_CIDR.to_owned(),
            },
        )
        .await?;
        a.apply_datapath(&DatapathRequest {
            vm_iface: "tap0".to_owned(),
            mode: ModeArg::Track,
            home_addr: H.parse()?,
            new_addr: None,
            local_tunnel_addr: TA.parse()?,
            peer_tunnel_addr: TB.parse()?,
            token: "0".to_owned(),
            tunnel_mtu: 1500,
            vm_mac: GUEST_MAC.to_owned(),
            gateway_mac: GATEWAY_MAC.to_owned(),
        })
        .await?;
        a.start_vm(&VmRequest {
            spec_toml: spec_a.clone(),
            incoming: false,
        })
        .await?;
        anyhow::Ok(())
    });
    if let Err(err) = started {
        panic!(
            "setting up site A: {err:#}\nagent A log:\n{}",
            agent_log(&l, "a")
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
    let boot_id = http_get(&l, H, "/id");
    // The probes' unanswered SYNs are tracked too; once older than a handshake they no
    // longer count as connections, so the report can be checked against ours exactly.
    thread::sleep(Duration::from_nanos(
        movarto_user::agent::api::HANDSHAKE_NS + 500_000_000,
    ));

    // The pre-move connections.
    let stats = Arc::new(Stats::default());
    let stop = Arc::new(AtomicBool::new(false));
    let stream = connect(&l, STREAM_PORT);
    let chat = connect(&l, ECHO_PORT);
    let mut idle = connect(&l, ECHO_PORT);
    assert_eq!(echo_once(&mut idle, "hello before"), "hello before");
    let workers = [
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

    // The move, as an operator runs it, from the ops namespace.
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
        .args(["--home", H, "--new-addr", N])
        .args(["--source-tunnel", TA, "--destination-tunnel", TB])
        .args(["--gateway-mac", GATEWAY_MAC, "--gateway-cidr", GATEWAY_CIDR])
        .arg("--dns-server")
        .arg(l.bind.server_addr().to_string())
        .args(["--zone", "example.test", "--dns-name", SERVICE])
        .arg("--dns-key-file")
        .arg(l.bind.key_file())
        .args([
            "--skip-ttl-wait",
            "--drain-grace",
            "2s",
            "--max-drain",
            "60s",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut orchestrator = l.bind.client.spawn(&mut migrate).expect("migrate");
    let stderr = orchestrator.child_mut().stderr.take().expect("stderr");
    let draining = Arc::new(AtomicBool::new(false));
    let progress = {
        let draining = draining.clone();
        thread::spawn(move || {
            let mut lines = Vec::new();
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("migrate: {line}");
                if line.contains("step  9/11 drain ...") {
                    draining.store(true, Ordering::Relaxed);
                }
                lines.push(line);
            }
            lines
        })
    };
    let mut stdout = orchestrator.child_mut().stdout.take().expect("stdout");

    // The drain: the connections keep running through the tunnel, then close.
    let deadline = Instant::now() + Duration::from_secs(120);
    while !draining.load(Ordering::Relaxed) {
        assert!(
            Instant::now() < deadline,
            "the migration did not reach the drain; agent logs:\nA:\n{}\nB:\n{}",
            agent_log(&l, "a"),
            agent_log(&l, "b")
        );
        if orchestrator.try_wait().expect("wait").is_some() {
            break;
        }
        thread::sleep(Duration::from_millis(100));
    }
    let (streamed, exchanged) = (
        stats.streamed.load(Ordering::Relaxed),
        stats.exchanges.load(Ordering::Relaxed),
    );
    wait_for("traffic through the tunnel", IO_TIMEOUT, || {
        stats.streamed.load(Ordering::Relaxed) > streamed + 100_000
            && stats.exchanges.load(Ordering::Relaxed) > exchanged + 10
    });
    assert_eq!(echo_once(&mut idle, "hello after"), "hello after");
    assert_eq!(
        http_get(&l, N, "/id"),
        boot_id,
        "the same guest answers at N"
    );
    // A newcomer with a stale DNS answer still reaches the VM through A.
    assert_eq!(http_get(&l, H, "/id"), boot_id, "stale-DNS newcomer via A");
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().expect("worker");
    }
    let _ = idle.shutdown(Shutdown::Both);
    drop(idle);

    let finished = Instant::now();
    let status = loop {
        if let Some(status) = orchestrator.try_wait().expect("wait") {
            break status;
        }
        assert!(
            finished.elapsed() < Duration::from_secs(90),
            "the migration did not finish; agent logs:\nA:\n{}\nB:\n{}",
            agent_log(&l, "a"),
            agent_log(&l, "b")
        );
        thread::sleep(Duration::from_millis(100));
    };
    let mut json = String::new();
    stdout.read_to_string(&mut json).expect("report");
    let _lines = progress.join().expect("progress");
    eprintln!("report:\n{json}");
    let report: serde_json::Value = serde_json::from_str(&json).expect("JSON report");
    assert!(status.success(), "migrate exited {status}: {json}");
    let failures = stats.failed.lock().expect("lock").clone();
    assert!(failures.is_empty(), "connections broke: {failures:?}");

    // The report matches what the test saw.
    assert_eq!(report["succeeded"], true);
    assert_eq!(
        report["flows_at_switchover"], 3,
        "stream, interactive, idle"
    );
    assert_eq!(report["flows_drained"], 3);
    assert_eq!(report["flows_cut"].as_array().map(Vec::len), Some(0));
    assert_eq!(report["qemu"]["status"], "completed");
    assert!(
        report["qemu"]["downtime_ms"]
            .as_u64()
            .is_some_and(|d| d > 0)
    );
    assert!(report["dns_switch_ms"].as_u64().is_some());
    assert!(
        report["tunnel"]["packets_to_b"]
            .as_u64()
            .is_some_and(|p| p > 0)
    );
    assert!(
        report["tunnel"]["packets_from_b"]
            .as_u64()
            .is_some_and(|p| p > 0)
    );
    let steps = report["steps"].as_array().expect("steps");
    assert_eq!(steps.len(), 11, "{steps:?}");

    // DNS points at N, with the TTL restored.
    assert_eq!(l.bind.dig(SERVICE, "A").expect("dig"), [N]);
    assert_eq!(l.bind.dig_ttls(SERVICE, "A").expect("dig"), [300]);
    // Teardown: A's datapath is gone; B serves N through its NAT.
    assert!(!pin_dir(&l.uplink_a).exists(), "A is detached");
    let b_mode = with_agents(&l, async |_a, b| b.status().await.map(|s| s.datapath));
    let b_dp = b_mode.expect("B status").expect("B attached");
    assert_eq!(b_dp.mode, "nat");
    assert_eq!(http_get(&l, N, "/id"), boot_id, "N after teardown");
    eprintln!(
        "streamed {} bytes, {} exchanges, worst stall {} ms",
        stats.streamed.load(Ordering::Relaxed),
        stats.exchanges.load(Ordering::Relaxed),
        stats.worst_stall_ms.load(Ordering::Relaxed)
    );
    // B's VM is stopped by its agent when the lab drops.
    drop(l);
}
