//! `movarto-user monitor`: the verdicts movarto gives reach the listener with their
//! reason, 5-tuple and service; filters, sampling and the rate limit hold; nothing is
//! emitted (or even counted) while nobody listens; the debug logs are off unless
//! loaded with them. Root only. The library's listener under BPF_PROG_TEST_RUN, then
//! the command on an attached uplink in a namespace of its own.

use std::{
    io::{BufRead as _, BufReader},
    net::{IpAddr, Ipv4Addr},
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use etherparse::PacketBuilder;
use movarto_common::{
    config::Mode,
    counters::Counter,
    gue::{OuterV4, encapsulate_v4},
    ids::{MacAddr, SessionToken},
};
use movarto_lab::netns::{Netns, veth};
use movarto_tests::{Hook, require_root, run_frame_out};
use movarto_user::datapath::{
    Datapath, LoadOptions, SiteConfig,
    monitor::{Filter, HookName, Listener, Verdict, VerdictKind},
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_REDIRECT: u32 = 4;
const TC_ACT_OK: u32 = 0;

const TA: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
const TB: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 2);
const HOME: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const OTHER_TENANT: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 99);
const NEW: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 10);
const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
const TOKEN: u64 = 0x6d6f_6e69_746f_7221;

const UPLINK_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xa1];
const WAN_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xfe];

/// Site B in `receive`, with A as its peer.
fn site_b(options: &LoadOptions) -> Datapath {
    let mut dp = Datapath::load_with(options).expect("load datapath");
    let mut cfg = SiteConfig::new(Mode::Receive, IpAddr::V4(HOME))
        .with_new_addr(Some(IpAddr::V4(NEW)))
        .with_tunnel(TB, TA, SessionToken(TOKEN))
        .with_macs(
            MacAddr([0x52, 0x54, 0, 0, 0, 0x10]),
            MacAddr([0x02, 0, 0, 0, 0, 0x01]),
        );
    cfg.vm_ifindex = 7;
    dp.set_config(&cfg).expect("config");
    dp
}

fn ethernet(ip_packet: &[u8]) -> Vec<u8> {
    let mut frame = Vec::new();
    frame.extend_from_slice(&UPLINK_MAC);
    frame.extend_from_slice(&WAN_MAC);
    frame.extend_from_slice(&0x0800u16.to_be_bytes());
    frame.extend_from_slice(ip_packet);
    frame
}

/// A client's TCP segment from port 40000 to `dst`:80, as an IP packet.
fn tcp_to(dst: Ipv4Addr) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ipv4(CLIENT.octets(), dst.octets(), 64)
        .tcp(40000, 80, 1, 64240)
        .ack(1)
        .write(&mut out, b"monitored")
        .expect("build");
    out
}

/// The VM's SYN from H:80 to the client: a new connection, which leaves as N.
fn syn_from_home() -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ipv4(HOME.octets(), CLIENT.octets(), 64)
        .tcp(80, 40001, 1, 64240)
        .syn()
        .write(&mut out, &[])
        .expect("build");
    out
}

/// GUE from A to B carrying `inner`, with `token`.
fn gue(token: u64, inner: &[u8]) -> Vec<u8> {
    let outer = OuterV4 {
        src: TA,
        dst: TB,
        src_port: 50000,
        dst_port: 6080,
    };
    ethernet(&encapsulate_v4(&outer, token, inner))
}

fn run(dp: &Datapath, frame: &[u8], want: u32) {
    let (ret, _) = run_frame_out(dp, Hook::Uplink, frame).expect("test run");
    assert_eq!(ret, want, "return value");
}

#[test]
fn drops_tunnel_and_nat_reach_the_listener_with_reason_tuple_and_service() {
    require_root();
    let dp = site_b(&LoadOptions::default());
    let mut listener = Listener::loaded(&dp, Filter::default()).expect("listen");
    run(&dp, &ethernet(&tcp_to(HOME)), XDP_DROP);
    run(&dp, &gue(TOKEN ^ 1, &tcp_to(HOME)), XDP_DROP);
    run(&dp, &gue(TOKEN, &tcp_to(HOME)), XDP_REDIRECT);
    // Another tenant's packet is the kernel's: no event.
    run(&dp, &ethernet(&tcp_to(OTHER_TENANT)), XDP_PASS);
    // The VM opens a connection: it leaves from N (NAT out), then passes.
    let before = dp.counters().expect("counters");
    let (ret, _) = run_frame_out(&dp, Hook::VmFacing, &ethernet(&syn_from_home())).expect("run");
    assert_eq!(ret, TC_ACT_OK);
    let after = dp.counters().expect("counters");
    assert_eq!(after.get(Counter::NatOut) - before.get(Counter::NatOut), 1);
    assert_eq!(
        after.get(Counter::PassIpv4) - before.get(Counter::PassIpv4),
        1
    );
    let events = listener.drain();
    let got: Vec<(VerdictKind, Counter)> = events.iter().map(|v| (v.kind, v.reason)).collect();
    assert_eq!(
        got,
        [
            (VerdictKind::Drop, Counter::DropNotTunnelled),
            (VerdictKind::Drop, Counter::DropGueBadToken),
            (VerdictKind::Tunnel, Counter::TunnelIn),
            (VerdictKind::Nat, Counter::NatOut),
        ],
        "{events:#?}"
    );
    let nat_out = &events[3];
    assert_eq!(nat_out.hook, HookName::Vm);
    assert_eq!(nat_out.tcp_flags, "SYN");
    // The tuple is the packet as the VM sent it, before the rewrite to N.
    assert_eq!(
        (nat_out.src, nat_out.dst),
        (IpAddr::V4(HOME), IpAddr::V4(CLIENT))
    );
    assert_eq!(nat_out.service, Some(IpAddr::V4(HOME)));
    let not_tunnelled = &events[0];
    assert_eq!(not_tunnelled.hook, HookName::Uplink);
    assert_eq!(not_tunnelled.protocol, "tcp");
    assert_eq!(not_tunnelled.src, IpAddr::V4(CLIENT));
    assert_eq!(not_tunnelled.dst, IpAddr::V4(HOME));
    assert_eq!(
        (not_tunnelled.src_port, not_tunnelled.dst_port),
        (Some(40000), Some(80))
    );
    assert_eq!(not_tunnelled.tcp_flags, "ACK");
    assert_eq!(not_tunnelled.service, Some(IpAddr::V4(HOME)));
    assert_eq!(
        not_tunnelled.frame_len as usize,
        ethernet(&tcp_to(HOME)).len()
    );
    // The bad token is reported on the outer packet, which is no service's.
    let bad_token = &events[1];
    assert_eq!(
        (bad_token.src, bad_token.dst),
        (IpAddr::V4(TA), IpAddr::V4(TB))
    );
    assert_eq!(
        (bad_token.protocol.as_str(), bad_token.dst_port),
        ("udp", Some(6080))
    );
    assert_eq!(bad_token.service, None);
    let stats = listener.stats().expect("stats");
    assert_eq!((stats.seen, stats.emitted), (4, 4), "{stats:?}");
    assert_eq!(stats.rate_limited + stats.sampled_out + stats.ring_full, 0);
}

#[test]
fn the_type_and_service_filters_hold_in_the_kernel() {
    require_root();
    let dp = site_b(&LoadOptions::default());
    let drop_to_home = ethernet(&tcp_to(HOME));
    let tunnelled = gue(TOKEN, &tcp_to(HOME));
    {
        let mut only_tunnel = Listener::loaded(
            &dp,
            Filter {
                kinds: vec![VerdictKind::Tunnel],
                ..Filter::default()
            },
        )
        .expect("listen");
        run(&dp, &drop_to_home, XDP_DROP);
        run(&dp, &tunnelled, XDP_REDIRECT);
        let events = only_tunnel.drain();
        assert_eq!(events.len(), 1, "{events:#?}");
        assert_eq!(events[0].reason, Counter::TunnelIn);
        // The drop was not even looked at: it is not the listened-for kind.
        assert_eq!(only_tunnel.stats().expect("stats").seen, 1);
    }
    let mut other_service = Listener::loaded(
        &dp,
        Filter {
            service: Some(IpAddr::V4(OTHER_TENANT)),
            ..Filter::default()
        },
    )
    .expect("listen");
    run(&dp, &drop_to_home, XDP_DROP);
    assert!(other_service.drain().is_empty());
    let mut home = Listener::loaded(
        &dp,
        Filter {
            service: Some(IpAddr::V4(HOME)),
            ..Filter::default()
        },
    )
    .expect("listen");
    run(&dp, &drop_to_home, XDP_DROP);
    let events: Vec<Verdict> = home.drain();
    assert_eq!(events.len(), 1, "{events:#?}");
    assert_eq!(events[0].reason, Counter::DropNotTunnelled);
}

/// Pins this thread to one CPU, so that the per-CPU sample count is one count.
fn pin_to_one_cpu() {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; the calls only read it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        let cpu = libc::sched_getcpu().max(0) as usize;
        libc::CPU_SET(cpu, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set),
            0,
            "sched_setaffinity"
        );
    }
}

#[test]
fn sampling_and_the_rate_limit_count_what_they_leave_out() {
    require_root();
    pin_to_one_cpu();
    let dp = site_b(&LoadOptions::default());
    let frame = ethernet(&tcp_to(HOME));
    {
        let mut sampled = Listener::loaded(
            &dp,
            Filter {
                sample_every: 4,
                max_per_second: 0,
                ..Filter::default()
            },
        )
        .expect("listen");
        for _ in 0..20 {
            run(&dp, &frame, XDP_DROP);
        }
        assert_eq!(sampled.drain().len(), 5);
        let stats = sampled.stats().expect("stats");
        assert_eq!(
            (stats.seen, stats.emitted, stats.sampled_out),
            (20, 5, 15),
            "{stats:?}"
        );
    }
    const LIMIT: u32 = 3;
    let mut limited = Listener::loaded(
        &dp,
        Filter {
            max_per_second: LIMIT,
            ..Filter::default()
        },
    )
    .expect("listen");
    let started = Instant::now();
    for _ in 0..50 {
        run(&dp, &frame, XDP_DROP);
    }
    // However slow the machine, each second's window lets LIMIT through.
    let windows = 2 + started.elapsed().as_secs();
    let shown = limited.drain().len() as u64;
    let stats = limited.stats().expect("stats");
    assert_eq!(stats.seen, 50, "{stats:?}");
    assert_eq!(shown, stats.emitted);
    assert!(
        (u64::from(LIMIT)..=u64::from(LIMIT) * windows).contains(&stats.emitted),
        "{stats:?}"
    );
    assert_eq!(stats.emitted + stats.rate_limited, 50, "{stats:?}");
}

#[test]
fn nothing_is_emitted_or_counted_while_nobody_listens() {
    require_root();
    let dp = site_b(&LoadOptions::default());
    let frame = ethernet(&tcp_to(HOME));
    // Drops before anyone listened are not counted.
    run(&dp, &frame, XDP_DROP);
    let mut first = Listener::loaded(&dp, Filter::default()).expect("listen");
    assert_eq!(first.totals().expect("totals").seen, 0);
    run(&dp, &frame, XDP_DROP);
    run(&dp, &frame, XDP_DROP);
    assert_eq!(first.drain().len(), 2);
    drop(first);
    for _ in 0..5 {
        run(&dp, &frame, XDP_DROP);
    }
    let mut second = Listener::loaded(&dp, Filter::default()).expect("listen");
    assert_eq!(
        second.totals().expect("totals").seen,
        2,
        "the programs looked while nobody listened"
    );
    assert!(second.drain().is_empty(), "events left from nobody's time");
}

/// Collects aya-log records.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<String>>>);

impl log::Log for Captured {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, record: &log::Record<'_>) {
        self.0
            .lock()
            .expect("lock")
            .push(format!("{} {}", record.level(), record.args()));
    }
    fn flush(&self) {}
}

fn logged_lines(options: &LoadOptions) -> Vec<String> {
    let dp = site_b(options);
    let (_, info) = dp
        .program_infos()
        .expect("infos")
        .into_iter()
        .find(|(name, _)| name == "uplink_ingress")
        .expect("uplink program");
    let captured = Captured::default();
    let mut logger =
        aya_log::EbpfLogger::init_from_id_with_logger(info.id(), captured.clone()).expect("logger");
    run(&dp, &ethernet(&tcp_to(HOME)), XDP_DROP);
    logger.flush();
    captured.0.lock().expect("lock").clone()
}

#[test]
fn debug_logs_are_written_only_when_loaded_with_them() {
    require_root();
    let on = logged_lines(&LoadOptions {
        debug_log: true,
        ..LoadOptions::default()
    });
    let want = format!(
        "DEBUG verdict {} (kind 1) proto 6 ports 40000>80",
        Counter::DropNotTunnelled as u32
    );
    assert_eq!(on, [want]);
    assert!(logged_lines(&LoadOptions::default()).is_empty());
}

/// Site B attached to `up0` in a namespace of its own, with a client namespace on
/// the other end of the veth.
struct Attached {
    site: Netns,
    client: Netns,
}

/// `bin` run in `ns`: nsenter, not `ip netns exec`, which remounts /sys and hides
/// the host's bpffs.
fn in_ns(ns: &Netns, bin: &std::path::Path) -> Command {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net=/run/netns/{}", ns.name())).arg(bin);
    cmd
}

fn attach_site_b(bin: &std::path::Path) -> Attached {
    let site = Netns::new("mon").expect("netns");
    let client = Netns::new("monc").expect("netns");
    veth(&site, "up0", &client, "eth0").expect("veth");
    veth(&site, "vm0", &client, "vmpeer").expect("veth");
    for (ns, cmds) in [
        (
            &site,
            &[
                &["addr", "add", "203.0.113.2/24", "dev", "up0"][..],
                &["link", "set", "up0", "up"],
                &["link", "set", "vm0", "up"],
            ][..],
        ),
        (
            &client,
            &[
                &["addr", "add", "203.0.113.9/24", "dev", "eth0"][..],
                &["link", "set", "eth0", "up"],
                &["route", "add", "192.0.2.0/24", "via", "203.0.113.2"],
            ],
        ),
    ] {
        for cmd in cmds {
            ns.ip(cmd).expect("ip");
        }
    }
    site.run("sysctl", &["-qw", "net.ipv4.conf.all.forwarding=1"])
        .expect("sysctl");
    let out = in_ns(&site, bin)
        .args([
            "attach",
            "up0",
            "--vm-iface",
            "vm0",
            "--home",
            "192.0.2.10",
            "--new-addr",
            "198.18.0.10",
            "--mode",
            "receive",
            "--local-tunnel",
            "203.0.113.2",
            "--peer-tunnel",
            "203.0.113.1",
            "--token",
            "5eed",
            "--pin-name",
            "movarto-test-monitor",
            "--flows-capacity",
            "1024",
        ])
        .output()
        .expect("attach");
    assert!(
        out.status.success(),
        "attach: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Attached { site, client }
}

impl Drop for Attached {
    fn drop(&mut self) {
        if let Ok(bin) = movarto_lab::movarto_user() {
            let _ = in_ns(&self.site, &bin)
                .args(["detach", "up0", "--pin-name", "movarto-test-monitor"])
                .output();
        }
    }
}

#[test]
fn the_command_streams_drops_as_json_and_ends_with_a_summary() {
    require_root();
    let bin = movarto_lab::movarto_user().expect("the movarto-user binary");
    let lab = attach_site_b(&bin);
    let mut monitor = lab
        .site
        .spawn(
            in_ns(&lab.site, &bin)
                .args([
                    "monitor",
                    "up0",
                    "--pin-name",
                    "movarto-test-monitor",
                    "--type",
                    "drop",
                    "--service",
                    "192.0.2.10",
                    "--count",
                    "2",
                    "--duration",
                    "60s",
                    "--json",
                ])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped()),
        )
        .expect("monitor");
    // The listener is up once the control map holds its deadline; until then, send
    // again (each send is one more drop, and --count 2 ends it).
    let send = || {
        // A connection attempt: its SYN (and any retransmission) is a drop at B.
        let _ = lab.client.run(
            "timeout",
            &["1", "bash", "-c", "echo > /dev/tcp/192.0.2.10/80"],
        );
    };
    let stdout = monitor.child_mut().stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || {
        BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<_>>()
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    while monitor.try_wait().expect("wait").is_none() {
        assert!(Instant::now() < deadline, "monitor never saw two drops");
        send();
    }
    let status = monitor.try_wait().expect("wait").expect("exited");
    let lines = reader.join().expect("reader");
    assert!(status.success(), "monitor: {status:?} {lines:?}");
    let records: Vec<serde_json::Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    assert_eq!(records.len(), 3, "{lines:?}");
    for verdict in &records[..2] {
        assert_eq!(verdict["record"], "verdict", "{verdict}");
        assert_eq!(verdict["kind"], "drop");
        assert_eq!(verdict["reason"], "drop_not_tunnelled");
        assert_eq!(verdict["dst"], "192.0.2.10");
        assert_eq!(verdict["dst_port"], 80);
        assert_eq!(verdict["src"], "203.0.113.9");
        assert_eq!(verdict["service"], "192.0.2.10");
        assert_eq!(verdict["hook"], "uplink");
    }
    let summary = &records[2];
    assert_eq!(summary["record"], "summary", "{summary}");
    assert_eq!(summary["shown"], 2);
    assert!(
        summary["programs"]["emitted"].as_u64() >= Some(2),
        "{summary}"
    );
}

#[test]
fn bad_monitor_command_lines_are_refused() {
    require_root();
    let bin = movarto_lab::movarto_user().expect("the movarto-user binary");
    for (args, says) in [
        (
            &["monitor", "up0", "--type", "teleport"][..],
            "unknown type",
        ),
        (&["monitor", "up0", "--sample", "0"], "--sample"),
        (&["monitor", "up0", "--count", "0"], "--count"),
    ] {
        let out = Command::new(&bin).args(args).output().expect("run");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }
    let out = Command::new(&bin)
        .args([
            "monitor",
            "movarto-gone0",
            "--pin-name",
            "movarto-test-none",
        ])
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("not attached"), "{stderr}");
}
