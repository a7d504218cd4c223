//! The whole move: two site agents (separate `movarto-user agent` processes), real QEMU,
//! real BIND9 and `movarto-user migrate` as an operator runs it, with live connections
//! from a client namespace. The lab is `movarto_tests::lab`.

use std::{
    fs,
    io::{BufRead as _, BufReader, Read as _},
    net::Shutdown,
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use movarto_guest_server::{ECHO_PORT, STREAM_PORT};
use movarto_tests::{dns_server::SERVICE, lab::*, require_root};
use movarto_user::{
    agent::api::{DatapathRequest, TapRequest, VmRequest},
    datapath::{cli::ModeArg, pin_dir},
};

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
