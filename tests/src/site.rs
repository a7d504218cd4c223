//! A site in the namespace tests: `ip` commands that must work, MACs as text, the
//! datapath attached with a guard that detaches it, and pass-through XDP for the veth
//! ends that must deliver what XDP on their peer transmits.

use aya::programs::XdpMode;
use movarto_common::ids::MacAddr;
use movarto_lab::netns::Netns;
use movarto_user::datapath::{
    AttachOptions, CounterSnapshot, Datapath, Pinned, SiteConfig, attach, detach,
};

/// Runs `ip args` in `ns`; the test fails if it does.
pub fn sh(ns: &Netns, args: &[&str]) {
    ns.ip(args)
        .unwrap_or_else(|e| panic!("ip {args:?} in {}: {e:#}", ns.name()));
}

/// `m` as `ip link` takes it.
pub fn mac(m: [u8; 6]) -> String {
    MacAddr(m).to_string()
}

/// A site's datapath, detached on drop (also when the test fails). Holds the pin name.
pub struct Attached(pub String);

impl Attached {
    /// The site's pins.
    pub fn pinned(&self) -> Pinned {
        Pinned::open(&self.0).unwrap_or_else(|e| panic!("pins of {}: {e:#}", self.0))
    }

    pub fn counters(&self) -> CounterSnapshot {
        self.pinned().counters().expect("counters")
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        let _ = detach(&self.0);
    }
}

/// Attaches the datapath in `ns` to `uplink` (XDP) and `vm_iface` (TC), pinned under
/// the uplink's name.
pub fn attach_in(ns: &Netns, uplink: &str, vm_iface: &str, site: SiteConfig) -> Attached {
    let _in = ns.enter().expect("enter");
    attach(&AttachOptions {
        uplink: uplink.to_owned(),
        vm_iface: vm_iface.to_owned(),
        xdp_mode: XdpMode::Default,
        site,
        pin_name: None,
        flows_capacity: None,
    })
    .unwrap_or_else(|e| panic!("attach in {}: {e:#}", ns.name()));
    Attached(uplink.to_owned())
}

/// movarto's programs, unconfigured (they pass everything), on `devs` in `ns`. A veth
/// delivers what XDP on its peer transmits (XDP_TX, a redirect) only when it has NAPI,
/// and an XDP program gives it that (GRO alone was not enough). Detached on drop.
pub fn pass_through_xdp(ns: &Netns, devs: &[&str]) -> Datapath {
    let _in = ns.enter().expect("enter");
    let mut pass = Datapath::load().expect("load");
    for dev in devs {
        pass.attach_xdp(dev, XdpMode::Default)
            .unwrap_or_else(|e| panic!("pass-through XDP on {dev} in {}: {e:#}", ns.name()));
    }
    pass
}

/// The hosts after a move, as the tunnel tests need them: the guest sits at site B, and
/// its client reaches it at `H` through site A.
///
/// ```text
/// client 198.51.100.7 -- wan -- 203.0.113.1 (TA) site A
///                          \__ 203.0.113.129 (TB) site B --vm0-- guest 192.0.2.10 (H)
/// ```
///
/// Fields drop in order: the pass-through programs before the namespaces.
pub struct Triangle {
    _pass: Vec<Datapath>,
    pub client: Netns,
    pub wan: Netns,
    pub a: Netns,
    pub b: Netns,
    pub guest: Netns,
    pub uplink_a: String,
    pub uplink_b: String,
}

impl Triangle {
    /// The home address, the tunnel endpoints and the anycast gateway's MAC.
    pub const HOME: std::net::Ipv4Addr = std::net::Ipv4Addr::new(192, 0, 2, 10);
    pub const TA: std::net::Ipv4Addr = std::net::Ipv4Addr::new(203, 0, 113, 1);
    pub const TB: std::net::Ipv4Addr = std::net::Ipv4Addr::new(203, 0, 113, 129);
    pub const GW_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];

    /// Builds it; `prefix` keeps a test's interface names (and so its pins) apart.
    /// A has no VM any more, but its TC program needs an interface: `vm0` to the wan.
    pub fn new(prefix: &str, vm_mac: [u8; 6]) -> Triangle {
        use movarto_lab::netns::veth;
        let tag = std::process::id() % 100_000;
        let ns = |role: &str| Netns::new(&format!("{prefix}{role}")).expect("netns");
        let t = Triangle {
            _pass: Vec::new(),
            client: ns("client"),
            wan: ns("wan"),
            a: ns("sitea"),
            b: ns("siteb"),
            guest: ns("guest"),
            uplink_a: format!("{prefix}a{tag}"),
            uplink_b: format!("{prefix}b{tag}"),
        };
        for ns in [&t.wan, &t.a, &t.b] {
            ns.run("sysctl", &["-qw", "net.ipv4.conf.all.forwarding=1"])
                .expect("sysctl");
        }
        veth(&t.client, "c0", &t.wan, "wc").expect("veth");
        veth(&t.wan, "wa", &t.a, &t.uplink_a).expect("veth");
        veth(&t.wan, "wb", &t.b, &t.uplink_b).expect("veth");
        veth(&t.guest, "eth0", &t.b, "vm0").expect("veth");
        veth(&t.a, "vm0", &t.wan, "xa").expect("veth");
        sh(&t.client, &["addr", "add", "198.51.100.7/24", "dev", "c0"]);
        sh(
            &t.client,
            &["route", "add", "default", "via", "198.51.100.1"],
        );
        sh(&t.wan, &["addr", "add", "198.51.100.1/24", "dev", "wc"]);
        sh(&t.wan, &["addr", "add", "203.0.113.126/25", "dev", "wa"]);
        sh(&t.wan, &["addr", "add", "203.0.113.254/25", "dev", "wb"]);
        sh(
            &t.wan,
            &["route", "add", "192.0.2.0/24", "via", "203.0.113.1"],
        );
        sh(&t.a, &["addr", "add", "203.0.113.1/25", "dev", &t.uplink_a]);
        sh(&t.a, &["route", "add", "default", "via", "203.0.113.126"]);
        sh(
            &t.b,
            &["addr", "add", "203.0.113.129/25", "dev", &t.uplink_b],
        );
        sh(&t.b, &["route", "add", "default", "via", "203.0.113.254"]);
        sh(&t.b, &["link", "set", "vm0", "address", &mac(Self::GW_MAC)]);
        sh(&t.b, &["addr", "add", "192.0.2.1/24", "dev", "vm0"]);
        sh(&t.guest, &["link", "set", "eth0", "address", &mac(vm_mac)]);
        sh(&t.guest, &["addr", "add", "192.0.2.10/24", "dev", "eth0"]);
        sh(&t.guest, &["route", "add", "default", "via", "192.0.2.1"]);
        let pass = vec![
            pass_through_xdp(&t.wan, &["wa", "wb"]),
            pass_through_xdp(&t.guest, &["eth0"]),
        ];
        Triangle { _pass: pass, ..t }
    }

    /// Resolves both sites' next hops toward the other's tunnel endpoint (XDP can't
    /// wait for ARP).
    pub fn prime_tunnel(&self) {
        use crate::workload::prime_next_hop;
        prime_next_hop(&self.a, Self::TB.into(), [203, 0, 113, 126].into())
            .expect("A's next hop toward TB");
        prime_next_hop(&self.b, Self::TA.into(), [203, 0, 113, 254].into())
            .expect("B's next hop toward TA");
    }
}
