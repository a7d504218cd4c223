//! `movarto-user evacuate`: two VMs leave site A at once, sharing one bandwidth, each
//! with live connections; every connection is kept, each VM's DNS name switched, each
//! drained and torn down on its own, and the report shows the bandwidth each was given.
//! Root, namespaces, real QEMU, BIND9 and agents.

use std::{
    io::{BufRead as _, BufReader},
    net::IpAddr,
    path::PathBuf,
    process::{Command, Stdio},
    thread,
    time::Duration,
};

use movarto_lab::{
    dns_server::SERVICE,
    lab::{Connections, IO_TIMEOUT, Lab, N},
    movarto_user,
    netns::{ChildGuard, in_netns, wait_until},
    workload,
};
use movarto_tests::{
    extra_vm::{Traffic, WEB2},
    inventory::write_lab_inventory_with,
    migration::wait_for_source_migration_of,
    require_root,
};
use movarto_user::{agent::api::Stage, datapath::Pinned};

/// The bandwidth the two migrations share, MiB/s.
const TOTAL_MIB: u64 = 256;

/// Waits until A's migration of `vm` is in `stage`, while `evacuate` runs.
fn wait_for_stage(l: &Lab, vm: &str, stage: Stage, orchestrator: &mut ChildGuard) {
    let deadline = std::time::Instant::now() + Duration::from_secs(240);
    loop {
        let there = l
            .with_agents(async |a, _| {
                a.migrations()
                    .await
                    .map(|all| all.iter().any(|r| r.spec.vm == vm && r.stage == stage))
            })
            .expect("the agents");
        if there.unwrap_or(false) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{vm} did not reach {stage}; agent A's log:\n{}",
            l.agent_log("a")
        );
        assert!(
            orchestrator.try_wait().expect("wait").is_none(),
            "evacuate ended before {vm} reached {stage}"
        );
        thread::sleep(Duration::from_millis(100));
    }
}

/// The lab with two VMs at A (`web` and `web2`), each with live connections and a DNS
/// name, and the inventory naming both.
struct Evacuation {
    l: Lab,
    boot_id: String,
    web2_id: String,
    web2_name: String,
    web: Connections,
    web2: Traffic,
    config: PathBuf,
}

fn two_vms_at_a() -> Evacuation {
    let l = Lab::build().expect("the lab");
    let boot_id = l.boot_at_a().expect("web boots at A");
    WEB2.boot_at_a(&l);
    let web2_id = l.http_get(WEB2.home, "/id").expect("web2's id");
    let web2_name = format!("{}.example.test.", WEB2.name);
    l.bind
        .nsupdate(&format!(
            "update delete {web2_name} A\nupdate add {web2_name} 300 A {}\nsend\n",
            WEB2.home
        ))
        .expect("web2's record");
    let config = write_lab_inventory_with(&l, "", &[WEB2]).expect("the inventory");
    let web = Connections::open(&l).expect("web's connections");
    let web2 = Traffic::start(&l, WEB2.home);
    wait_until(IO_TIMEOUT, "web2's traffic", || web2.bytes() > 100_000)
        .expect("web2's traffic flows");
    Evacuation {
        l,
        boot_id,
        web2_id,
        web2_name,
        web,
        web2,
        config,
    }
}

/// `evacuate` of both VMs from A to B, at most two at once, sharing `total_mib` MiB/s,
/// started in the ops namespace; its stderr is echoed and collected by the thread.
fn start_evacuation(
    e: &Evacuation,
    total_mib: u64,
) -> (ChildGuard, thread::JoinHandle<Vec<String>>) {
    let mut evacuate = Command::new("nsenter");
    evacuate
        .arg(format!("--net=/run/netns/{}", e.l.bind.client.name()))
        .arg(movarto_user().expect("movarto-user"))
        .args([
            "evacuate",
            "--from",
            "a",
            "--destination",
            "b",
            "--vm",
            "web",
            "--vm",
            WEB2.name,
            "--max-concurrent",
            "2",
            "--bandwidth",
            &total_mib.to_string(),
            "--drain-grace",
            "1s",
            "--max-drain",
            "30s",
            "--json",
            "--config",
        ])
        .arg(&e.config)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut orchestrator = e.l.bind.client.spawn(&mut evacuate).expect("evacuate");
    let stderr = orchestrator.child_mut().stderr.take().expect("stderr");
    let progress = thread::spawn(move || {
        BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .inspect(|line| eprintln!("evacuate: {line}"))
            .collect::<Vec<_>>()
    });
    (orchestrator, progress)
}

#[test]
fn two_vms_are_evacuated_at_once_sharing_the_bandwidth_and_keep_their_connections() {
    require_root();
    let e = two_vms_at_a();
    let (mut orchestrator, progress) = start_evacuation(&e, TOTAL_MIB);
    let Evacuation {
        l,
        boot_id,
        web2_id,
        web2_name,
        web,
        web2,
        ..
    } = e;
    // Both drain: the connections run through the tunnels, every byte checked, then close
    // (until they do, they hold the drains).
    for vm in ["web", WEB2.name] {
        wait_for_stage(&l, vm, Stage::Draining, &mut orchestrator);
    }
    web.stats
        .wait_for_more_traffic(IO_TIMEOUT, "web's traffic through the tunnel")
        .expect("web's traffic through the tunnel");
    let before = web2.bytes();
    wait_until(IO_TIMEOUT, "web2's traffic through the tunnel", || {
        web2.bytes() > before + 50_000
    })
    .expect("web2's traffic through the tunnel");
    let failures = web.close();
    assert!(failures.is_empty(), "web's connections: {failures:?}");
    assert_eq!(web2.stop(), None, "web2's connections");
    let (status, report) = l
        .finish_migrate(&mut orchestrator, Duration::from_secs(300), || {})
        .expect("evacuate finishes");
    let progress = progress.join().expect("progress");
    assert!(status.success(), "evacuate failed: {report:#}");

    // The summary: both moved, nothing cut, both names switched.
    assert_eq!(report["succeeded"], true, "{report:#}");
    assert_eq!(report["moved"], 2);
    assert_eq!(report["failed"], 0);
    assert_eq!(report["connections_cut"], 0);
    assert_eq!(report["dns_switches"], 2);
    assert_eq!(report["max_concurrent"], 2);
    let vms = report["vms"].as_array().expect("vms");
    assert_eq!(vms.len(), 2);
    let total = TOTAL_MIB << 20;
    for (vm, kept_at_least) in vms.iter().zip([3, 2]) {
        let name = vm["service"].as_str().expect("name");
        assert_eq!(vm["destination"], "b", "{name}");
        assert_eq!(vm["succeeded"], true, "{name}: {vm:#}");
        assert!(
            vm["connections_kept"].as_u64().expect("kept") >= kept_at_least,
            "{name}: {vm:#}"
        );
        assert!(vm["downtime_ms"].as_u64().is_some(), "{name}");
        // Each got a share of the total: half while both copied, all of it alone.
        let caps: Vec<u64> = vm["bandwidth"]
            .as_array()
            .expect("bandwidth")
            .iter()
            .map(|p| p["bytes_per_second"].as_u64().expect("cap"))
            .collect();
        assert!(!caps.is_empty(), "{name} was given no bandwidth");
        assert!(
            caps.iter().all(|c| *c == total || *c == total / 2),
            "{name}: {caps:?}"
        );
        assert_eq!(vm["report"]["succeeded"], true);
    }
    // They ran at once: each started before the other finished.
    let (a, b) = (&vms[0], &vms[1]);
    let at = |v: &serde_json::Value, k: &str| v[k].as_u64().expect(k);
    assert!(
        at(a, "started_ms") < at(b, "finished_ms") && at(b, "started_ms") < at(a, "finished_ms"),
        "{vms:#?}"
    );
    assert!(
        progress.iter().any(|l| l.contains("web2: moved")),
        "{progress:?}"
    );

    // Both answer at their N, as the same guests.
    assert_eq!(l.http_get(N, "/id").expect("web at N"), boot_id);
    let n2: IpAddr = WEB2.new_addr.parse().expect("addr");
    let at_n2 = in_netns(&l.client, || workload::http_get(n2, "/id", IO_TIMEOUT))
        .expect("netns")
        .expect("web2 at N2");
    assert_eq!(at_n2.trim(), web2_id.trim());
    assert_eq!(l.bind.dig(SERVICE, "A").expect("dig"), vec![N.to_owned()]);
    assert_eq!(
        l.bind.dig(&web2_name, "A").expect("dig"),
        vec![WEB2.new_addr.to_owned()]
    );

    // Each was torn down on its own: A serves neither any more, B both in nat.
    let pinned_b = Pinned::open(&l.uplink_b).expect("B's pins");
    let at_b = pinned_b.services.list().expect("B's services");
    assert_eq!(at_b.len(), 2, "{at_b:?}");
    assert!(
        at_b.iter()
            .all(|s| s.mode() == Some(movarto_common::config::Mode::Nat))
    );
    assert!(
        !movarto_user::datapath::pin_dir(&l.uplink_a).exists(),
        "A detached"
    );
    eprintln!(
        "{}",
        serde_json::to_string_pretty(&report).unwrap_or_default()
    );
}

/// One VM's destination QEMU dies during its RAM copy: that VM rolls back and keeps
/// serving at A, with its connections; the other moves.
#[test]
fn a_destination_dying_during_one_vms_ram_copy_rolls_back_that_vm_only() {
    require_root();
    let e = two_vms_at_a();
    // 8 MiB/s each while both copy: web2's copy takes seconds, so it can be hit mid-way.
    let (mut orchestrator, progress) = start_evacuation(&e, 16);
    let l = &e.l;
    wait_for_source_migration_of(l, WEB2.name, &mut orchestrator, "web2's RAM copy", |m| {
        m.progress.is_some_and(|p| p.transferred > 8 << 20)
    });
    let pid = l
        .with_agents(async |_, b| b.vm(WEB2.name).await.ok().and_then(|vm| vm.pid))
        .expect("the agents")
        .expect("web2's QEMU runs at B");
    // SAFETY: web2's destination QEMU, started by the test's own agent, by its PID.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
    // web goes on: it drains, its connections through the tunnel, then they close.
    wait_for_stage(l, "web", Stage::Draining, &mut orchestrator);
    e.web
        .stats
        .wait_for_more_traffic(IO_TIMEOUT, "web's traffic through the tunnel")
        .expect("web's traffic through the tunnel");
    let Evacuation {
        l,
        boot_id,
        web2_id,
        web2_name,
        web,
        web2,
        ..
    } = e;
    let failures = web.close();
    assert!(failures.is_empty(), "web's connections: {failures:?}");
    let (status, report) = l
        .finish_migrate(&mut orchestrator, Duration::from_secs(300), || {})
        .expect("evacuate finishes");
    let progress = progress.join().expect("progress");
    assert!(!status.success(), "one VM failed: the exit code says so");
    assert_eq!(report["succeeded"], false, "{report:#}");
    assert_eq!(report["moved"], 1);
    assert_eq!(report["failed"], 1);
    let vms = report["vms"].as_array().expect("vms");
    let vm = |name: &str| {
        vms.iter()
            .find(|v| v["service"] == name)
            .unwrap_or_else(|| panic!("{name} in {vms:#?}"))
    };
    assert_eq!(vm("web")["succeeded"], true, "{:#}", vm("web"));
    let failed = vm(WEB2.name);
    assert_eq!(failed["succeeded"], false);
    assert!(failed["error"].as_str().is_some_and(|e| !e.is_empty()));
    let rolled_back = failed["rolled_back"].as_str().expect("rolled back");
    assert!(
        rolled_back.contains("VM running at the source"),
        "{rolled_back}"
    );
    assert!(
        progress.iter().any(|l| l.contains("web2: FAILED")),
        "{progress:?}"
    );

    // web2 still runs at A, the same guest, its connections whole, its name unchanged.
    assert_eq!(web2.stop(), None, "web2's connections");
    assert_eq!(l.http_get(WEB2.home, "/id").expect("web2 at A"), web2_id);
    assert_eq!(
        l.bind.dig(&web2_name, "A").expect("dig"),
        vec![WEB2.home.to_owned()]
    );
    // web moved.
    assert_eq!(l.http_get(N, "/id").expect("web at N"), boot_id);
    assert_eq!(l.bind.dig(SERVICE, "A").expect("dig"), vec![N.to_owned()]);
    // A serves web2 alone, in track; B serves web alone.
    let at_a = Pinned::open(&l.uplink_a)
        .expect("A's pins")
        .services
        .list()
        .expect("A's services");
    assert_eq!(at_a.len(), 1, "{at_a:?}");
    assert_eq!(at_a[0].mode(), Some(movarto_common::config::Mode::Track));
    let at_b = Pinned::open(&l.uplink_b)
        .expect("B's pins")
        .services
        .list()
        .expect("B's services");
    assert_eq!(at_b.len(), 1, "{at_b:?}");
}
