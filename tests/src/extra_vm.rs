//! A second VM for the lab (another tenant's, or a second one to evacuate): its own
//! name, `H`, MAC and tap beside the lab's guest, booted at A through agent A, and
//! long-lived connections to it whose every byte is checked.

use std::{
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::Duration,
};

use movarto_common::config::Mode;
use movarto_guest_server::{ECHO_PORT, STREAM_PORT};
use movarto_lab::{
    lab::{GATEWAY_MAC, GUEST_MAC, H, Lab, TA, TB},
    netns::{in_netns, wait_until},
    workload,
};
use movarto_user::agent::api::{DatapathRequest, TapRequest, VmRequest};

/// A VM beside the lab's guest.
#[derive(Clone, Copy, Debug)]
pub struct ExtraVm {
    pub name: &'static str,
    pub home: &'static str,
    pub mac: &'static str,
    pub tap: &'static str,
    /// Its `N` at the other site.
    pub new_addr: &'static str,
    /// The site it runs at first (`a` or `b`).
    pub home_site: &'static str,
}

/// The second VM: `web2` at 192.0.2.11 on `tap1`.
pub const WEB2: ExtraVm = ExtraVm {
    name: "web2",
    home: "192.0.2.11",
    mac: "52:54:00:00:00:11",
    tap: "tap1",
    new_addr: "198.18.0.11",
    home_site: "a",
};

/// A third VM at A, a neighbour that stays there.
pub const WEB3: ExtraVm = ExtraVm {
    name: "web3",
    home: "192.0.2.12",
    mac: "52:54:00:00:00:12",
    tap: "tap2",
    new_addr: "198.18.0.12",
    home_site: "a",
};

/// A VM at home at B (its `H` routed there by the wan), with its `N` at A.
pub const AT_B: ExtraVm = ExtraVm {
    name: "far",
    home: "192.0.2.40",
    mac: "52:54:00:00:00:40",
    tap: "tap3",
    new_addr: "198.18.0.40",
    home_site: "b",
};

impl ExtraVm {
    /// Its spec at `site`: the lab guest's, renamed, on its own tap at its own `H`.
    pub fn spec(&self, l: &Lab, site: &str) -> String {
        let spec = l.guest_spec(site).expect("spec");
        let renamed = spec
            .replace("name = \"web\"", &format!("name = \"{}\"", self.name))
            .replace(&format!("/web-{site}."), &format!("/{}-{site}.", self.name))
            .replace(
                &format!("movarto.ip={H}/"),
                &format!("movarto.ip={}/", self.home),
            )
            .replace(GUEST_MAC, self.mac)
            .replace("tap = \"tap0\"", &format!("tap = \"{}\"", self.tap));
        assert!(renamed.contains(self.home) && !renamed.contains("\"web\""));
        renamed
    }

    /// The site it does not start at.
    pub fn other_site(&self) -> &'static str {
        if self.home_site == "a" { "b" } else { "a" }
    }

    /// Boots it at A through agent A: its tap (the same anycast gateway, as a host route
    /// beside tap0's subnet), its service in `track`, its VM; waits until it answers.
    pub fn boot_at_a(&self, l: &Lab) {
        assert_eq!(self.home_site, "a", "{} is at home at B", self.name);
        self.boot_at_home(l);
    }

    /// Boots it at its home site, as [`ExtraVm::boot_at_a`] does at A. At B, the wan
    /// routes its `H` to B and its `N` to A (host routes beside the lab's subnets).
    pub fn boot_at_home(&self, l: &Lab) {
        let spec = self.spec(l, self.home_site);
        let vm = *self;
        let at_b = self.home_site == "b";
        let (local, peer) = if at_b { (TB, TA) } else { (TA, TB) };
        if at_b {
            for (addr, via) in [(vm.home, TB), (vm.new_addr, TA)] {
                l.wan
                    .ip(&["route", "replace", &format!("{addr}/32"), "via", via])
                    .expect("the wan's host route");
            }
        }
        l.with_agents(async |a, b| {
            let agent = if at_b { b } else { a };
            agent
                .ensure_tap(
                    vm.tap,
                    &TapRequest {
                        gateway_mac: GATEWAY_MAC.parse()?,
                        gateway_cidr: "192.0.2.1/32".to_owned(),
                    },
                )
                .await?;
            agent
                .put_service(&DatapathRequest {
                    vm_iface: vm.tap.to_owned(),
                    mode: Mode::Track,
                    home_addr: vm.home.parse()?,
                    new_addr: None,
                    local_tunnel_addr: local.parse()?,
                    peer_tunnel_addr: peer.parse()?,
                    token: movarto_common::ids::SessionToken(0),
                    tunnel_mtu: 1500,
                    vm_mac: vm.mac.parse()?,
                    gateway_mac: GATEWAY_MAC.parse()?,
                })
                .await?;
            agent
                .start_vm(&VmRequest {
                    spec_toml: spec,
                    incoming: false,
                })
                .await?;
            anyhow::Ok(())
        })
        .expect("agents")
        .unwrap_or_else(|e| panic!("{} at {}: {e:#}", vm.name, vm.home_site));
        let site = if at_b { &l.b } else { &l.a };
        site.ip(&["route", "add", &format!("{}/32", vm.home), "dev", vm.tap])
            .expect("the VM's route");
        let home: IpAddr = vm.home.parse().expect("addr");
        wait_until(Duration::from_secs(90), "the second VM to answer", || {
            in_netns(&l.client, || {
                workload::http_get(home, "/id", Duration::from_secs(2))
            })
            .is_ok_and(|answer| answer.is_ok())
        })
        .unwrap_or_else(|e| {
            panic!(
                "{e:#}; agent {}'s log:\n{}",
                vm.home_site,
                l.agent_log(vm.home_site)
            )
        });
    }
}

/// Connections to one address: a checked download and an echo exchange, each in a
/// thread until `stop`; bytes counted, the first failure kept.
pub struct Traffic {
    stop: Arc<AtomicBool>,
    bytes: Arc<AtomicU64>,
    failure: Arc<Mutex<Option<String>>>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl Traffic {
    /// Opens both connections from the client to `addr` and starts them.
    pub fn start(l: &Lab, addr: &str) -> Self {
        let addr: IpAddr = addr.parse().expect("addr");
        let connect = |port| {
            in_netns(&l.client, || workload::connect(SocketAddr::new(addr, port)))
                .expect("netns")
                .unwrap_or_else(|e| panic!("a connection to {addr}: {e:#}"))
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

    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    pub fn failure(&self) -> Option<String> {
        self.failure.lock().expect("lock").clone()
    }

    /// Stops both; the first failure, if any.
    pub fn stop(mut self) -> Option<String> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        self.failure()
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
