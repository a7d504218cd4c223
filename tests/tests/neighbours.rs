//! A node serves many tenants: site A runs two VMs behind one uplink, each its own
//! service, and one of them moves to B while the other keeps serving. The neighbour's
//! connections carry every byte, checked, throughout; its service's counters show no
//! tunnel, NAT or drop verdict; the teardown removes the moved VM's service and leaves
//! the neighbour's (and the datapath) in place. Root, namespaces, real QEMU and agents.

use std::{
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::Duration,
};

use movarto_common::{config::Mode, counters::Counter};
use movarto_guest_server::{ECHO_PORT, STREAM_PORT};
use movarto_lab::{
    lab::{GATEWAY_MAC, GUEST_MAC, H, IO_TIMEOUT, Lab, TA, TB},
    netns::{in_netns, wait_until},
    workload,
};
use movarto_tests::require_root;
use movarto_user::{
    agent::api::{DatapathRequest, TapRequest, VmRequest},
    datapath::Pinned,
};

/// The neighbour: another tenant's VM at A, on its own tap.
const H2: &str = "192.0.2.11";
const MAC2: &str = "52:54:00:00:00:11";
const TAP2: &str = "tap1";

/// The neighbour's spec: the lab guest's, renamed, on `tap1` at `H2`.
fn neighbour_spec(l: &Lab) -> String {
    let spec = l.guest_spec("a").expect("spec");
    let renamed = spec
        .replace("name = \"web\"", "name = \"web2\"")
        .replace("/web-a.", "/web2-a.")
        .replace(&format!("movarto.ip={H}/"), &format!("movarto.ip={H2}/"))
        .replace(GUEST_MAC, MAC2)
        .replace("tap = \"tap0\"", &format!("tap = \"{TAP2}\""));
    assert!(renamed.contains(H2) && renamed.contains(TAP2) && !renamed.contains("\"web\""));
    renamed
}

/// The neighbour's tap (the same anycast gateway, as a host route, beside tap0's
/// subnet), its service in `track`, and its VM, through agent A.
fn boot_neighbour(l: &Lab) {
    let spec = neighbour_spec(l);
    l.with_agents(async |a, _b| {
        a.ensure_tap(
            TAP2,
            &TapRequest {
                gateway_mac: GATEWAY_MAC.parse()?,
                gateway_cidr: "192.0.2.1/32".to_owned(),
            },
        )
        .await?;
        a.apply_datapath(&DatapathRequest {
            vm_iface: TAP2.to_owned(),
            mode: Mode::Track,
            home_addr: H2.parse()?,
            new_addr: None,
            local_tunnel_addr: TA.parse()?,
            peer_tunnel_addr: TB.parse()?,
            token: movarto_common::ids::SessionToken(0),
            tunnel_mtu: 1500,
            vm_mac: MAC2.parse()?,
            gateway_mac: GATEWAY_MAC.parse()?,
        })
        .await?;
        a.start_vm(&VmRequest {
            spec_toml: spec,
            incoming: false,
        })
        .await?;
        anyhow::Ok(())
    })
    .expect("agents")
    .expect("the neighbour at A");
    l.a.ip(&["route", "add", &format!("{H2}/32"), "dev", TAP2])
        .expect("the neighbour's route");
    let h2: IpAddr = H2.parse().expect("addr");
    wait_until(Duration::from_secs(90), "the neighbour to answer", || {
        in_netns(&l.client, || {
            workload::http_get(h2, "/id", Duration::from_secs(2))
        })
        .is_ok_and(|answer| answer.is_ok())
    })
    .unwrap_or_else(|e| panic!("{e:#}; agent A's log:\n{}", l.agent_log("a")));
}

/// The neighbour's connections: a checked download and an echo exchange, each in a
/// thread until `stop`; bytes counted, the first failure kept.
struct NeighbourTraffic {
    stop: Arc<AtomicBool>,
    bytes: Arc<AtomicU64>,
    failure: Arc<Mutex<Option<String>>>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl NeighbourTraffic {
    fn start(l: &Lab) -> Self {
        let h2: IpAddr = H2.parse().expect("addr");
        let connect = |port| {
            in_netns(&l.client, || workload::connect(SocketAddr::new(h2, port)))
                .expect("netns")
                .expect("a connection to the neighbour")
        };
        let (stream, echo) = (connect(STREAM_PORT), connect(ECHO_PORT));
        let mut traffic = Self {
            stop: Arc::new(AtomicBool::new(false)),
            bytes: Arc::new(AtomicU64::new(0)),
            failure: Arc::new(Mutex::new(None)),
            threads: Vec::new(),
        };
        for (i, socket) in [stream, echo].into_iter().enumerate() {
            let (stop, bytes, failure) = (
                traffic.stop.clone(),
                traffic.bytes.clone(),
                traffic.failure.clone(),
            );
            traffic.threads.push(thread::spawn(move || {
                let progress = |n| {
                    bytes.fetch_add(n, Ordering::Relaxed);
                };
                let result = if i == 0 {
                    workload::read_stream(
                        socket,
                        16 * 1024,
                        Duration::from_millis(20),
                        &stop,
                        progress,
                    )
                } else {
                    workload::interactive(socket, Duration::from_millis(50), &stop, progress)
                };
                if let Err(err) = result {
                    let mut first = failure.lock().expect("lock");
                    first.get_or_insert(format!("{err:#}"));
                }
            }));
        }
        traffic
    }

    fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    fn failure(&self) -> Option<String> {
        self.failure.lock().expect("lock").clone()
    }

    fn stop(mut self) -> Option<String> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        self.failure()
    }
}

impl Drop for NeighbourTraffic {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The neighbour's service row at A.
fn neighbour_row(l: &Lab) -> movarto_user::datapath::CounterSnapshot {
    let pinned = Pinned::open(&l.uplink_a).expect("A's pins");
    let service = pinned
        .services
        .get(H2.parse().expect("addr"))
        .expect("services")
        .expect("the neighbour's service");
    pinned.services.counters(service.slot).expect("row")
}

#[test]
fn a_vm_moves_while_its_neighbour_on_the_same_uplink_serves_untouched() {
    require_root();
    let l = Lab::build().expect("the lab");
    l.boot_at_a().expect("the guest boots at A");
    boot_neighbour(&l);
    let neighbour = NeighbourTraffic::start(&l);
    wait_until(IO_TIMEOUT, "the neighbour's traffic", || {
        neighbour.bytes() > 100_000
    })
    .expect("the neighbour's traffic flows");
    {
        let pinned = Pinned::open(&l.uplink_a).expect("A's pins");
        assert_eq!(
            pinned.services.list().expect("list").len(),
            2,
            "two services at A"
        );
    }

    let mut migrate = l
        .migrate_command(&["--drain-grace", "1s", "--max-drain", "30s"])
        .expect("the migrate command");
    let mut orchestrator = l.bind.client.spawn(&mut migrate).expect("migrate");
    let (status, report) = l
        .finish_migrate(&mut orchestrator, Duration::from_secs(240), || {})
        .expect("migrate finishes");
    assert!(status.success(), "migrate failed: {report}");
    assert_eq!(report["succeeded"], true, "{report}");
    assert_eq!(report["qemu"]["status"], "completed", "{report}");

    // The neighbour kept serving throughout, every byte checked, and still does.
    let before = neighbour.bytes();
    wait_until(IO_TIMEOUT, "the neighbour's traffic after the move", || {
        neighbour.bytes() > before + 50_000
    })
    .expect("the neighbour's traffic after the move");
    assert_eq!(neighbour.stop(), None, "the neighbour's connections broke");

    // Its service saw no tunnel, NAT or drop verdict: the move was not its.
    let row = neighbour_row(&l);
    for counter in movarto_common::counters::Counter::ALL {
        let touched = counter.is_drop()
            || matches!(
                counter,
                Counter::TunnelOut
                    | Counter::TunnelIn
                    | Counter::NatIn
                    | Counter::NatOut
                    | Counter::IcmpTooBig
                    | Counter::IcmpTimeExceeded
            );
        if touched {
            assert_eq!(
                row.get(counter),
                0,
                "{}: {:?}",
                counter.name(),
                row.nonzero()
            );
        }
    }
    assert!(row.get(Counter::PassIpv4) > 0, "{:?}", row.nonzero());

    // The teardown removed the moved VM's service only; the datapath stays for the
    // neighbour, still tracking.
    let pinned = Pinned::open(&l.uplink_a).expect("A's pins stay");
    let services = pinned.services.list().expect("list");
    assert_eq!(services.len(), 1, "only the neighbour's service is left");
    assert_eq!(services[0].mode(), Some(Mode::Track));
    assert!(
        pinned
            .services
            .get(H.parse().expect("addr"))
            .expect("get")
            .is_none()
    );
}
