//! The hosts after a move, as the tunnel tests and the tunnel benchmark need them: the guest
//! sits at site B, and its client reaches it at `H` through site A. Also the pieces they
//! share: a site's datapath attached with a guard, pass-through XDP, and next hops primed
//! for XDP (which can't wait for ARP).
//!
//! ```text
//! client 198.51.100.7 -- wan -- 203.0.113.1 (TA) site A
//!                          \__ 203.0.113.129 (TB) site B --vm0-- guest 192.0.2.10 (H)
//! ```

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, UdpSocket},
    time::Duration,
};

use anyhow::{Context as _, Result};
use aya::programs::XdpMode;
use movarto_common::ids::MacAddr;
use movarto_user::datapath::{
    AttachOptions, CounterSnapshot, Datapath, Pinned, SiteConfig, attach, detach,
};

use crate::netns::{Netns, veth_queues, wait_until};

/// `m` as `ip link` takes it.
pub fn mac(m: [u8; 6]) -> String {
    MacAddr(m).to_string()
}

/// A site's datapath, detached on drop (also on failure). Holds the pin name.
pub struct Attached(pub String);

impl Attached {
    /// The site's pins.
    pub fn pinned(&self) -> Result<Pinned> {
        Pinned::open(&self.0).with_context(|| format!("pins of {}", self.0))
    }

    pub fn counters(&self) -> Result<CounterSnapshot> {
        self.pinned()?.counters()
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        let _ = detach(&self.0);
    }
}

/// Attaches the datapath in `ns` to `uplink` (XDP in `xdp_mode`) and `vm_iface` (TC),
/// pinned under the uplink's name.
pub fn attach_in(
    ns: &Netns,
    uplink: &str,
    vm_iface: &str,
    site: SiteConfig,
    xdp_mode: XdpMode,
) -> Result<Attached> {
    let _in = ns.enter()?;
    attach(&AttachOptions {
        uplink: uplink.to_owned(),
        vm_iface: Some(vm_iface.to_owned()),
        services_capacity: None,
        xdp_mode,
        site,
        pin_name: None,
        flows_capacity: None,
        debug_log: false,
    })
    .with_context(|| format!("attach in {}", ns.name()))?;
    Ok(Attached(uplink.to_owned()))
}

/// movarto's programs, unconfigured (they pass everything), on `devs` in `ns`. A veth
/// delivers what XDP on its peer transmits (XDP_TX, a redirect) only when it has NAPI,
/// and an XDP program gives it that (GRO alone was not enough). Detached on drop.
pub fn pass_through_xdp(ns: &Netns, devs: &[&str]) -> Result<Datapath> {
    let _in = ns.enter()?;
    let mut pass = Datapath::load()?;
    for dev in devs {
        pass.attach_xdp(dev, XdpMode::Default)
            .with_context(|| format!("pass-through XDP on {dev} in {}", ns.name()))?;
    }
    Ok(pass)
}

/// Makes the kernel of `ns` resolve its next hop toward `peer` (XDP can't
/// wait for ARP or ND): one datagram to the discard port, then waits until
/// `next_hop` has a link-layer address.
pub fn prime_next_hop(ns: &Netns, peer: IpAddr, next_hop: IpAddr) -> Result<()> {
    {
        let _in = ns.enter()?;
        let unspecified: IpAddr = match peer {
            IpAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
            IpAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
        };
        let socket = UdpSocket::bind((unspecified, 0))?;
        socket
            .send_to(b"prime", (peer, 9))
            .with_context(|| format!("priming the next hop toward {peer}"))?;
    }
    let hop = next_hop.to_string();
    wait_until(
        Duration::from_secs(10),
        &format!("the link-layer address of {hop} in {}", ns.name()),
        || {
            ns.run("ip", &["neigh", "show", &hop])
                .is_ok_and(|out| out.contains("lladdr"))
        },
    )
}

/// How the triangle's links are built.
#[derive(Clone, Copy, Debug)]
pub struct Layout {
    /// TX and RX queues at each veth end (1: the kernel's default).
    pub queues: u32,
    /// The MTU of the links between the wan and the sites (the tunnels' underlay);
    /// `None` keeps 1500.
    pub underlay_mtu: Option<u32>,
}

impl Default for Layout {
    fn default() -> Self {
        Self {
            queues: 1,
            underlay_mtu: None,
        }
    }
}

/// A host of the triangle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Host {
    Client,
    Wan,
    A,
    B,
    Guest,
}

/// See the module's documentation. Fields drop in order: the pass-through programs
/// before the namespaces.
pub struct Triangle {
    pass: Vec<Datapath>,
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
    pub const HOME: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
    pub const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
    pub const TA: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
    pub const TB: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 129);
    /// The wan's addresses toward A and B.
    pub const WAN_AT_A: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 126);
    pub const WAN_AT_B: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 254);
    pub const GW_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];

    /// Builds it with pass-through XDP where movarto's tunnel needs it (the wan's ends
    /// toward the sites, the guest's eth0); `prefix` keeps a test's interface names (and
    /// so its pins) apart. A has no VM any more, but its TC program needs an interface:
    /// `vm0` to the wan.
    pub fn new(prefix: &str, vm_mac: [u8; 6]) -> Result<Triangle> {
        let mut t = Self::build(prefix, vm_mac, Layout::default())?;
        t.pass_through(Host::Wan, &["wa", "wb"])?;
        t.pass_through(Host::Guest, &["eth0"])?;
        Ok(t)
    }

    /// Builds the hosts and links with no XDP anywhere; the wan routes `H` to A.
    pub fn build(prefix: &str, vm_mac: [u8; 6], layout: Layout) -> Result<Triangle> {
        let tag = std::process::id() % 100_000;
        let ns = |role: &str| Netns::new(&format!("{prefix}{role}"));
        let t = Triangle {
            pass: Vec::new(),
            client: ns("client")?,
            wan: ns("wan")?,
            a: ns("sitea")?,
            b: ns("siteb")?,
            guest: ns("guest")?,
            uplink_a: format!("{prefix}a{tag}"),
            uplink_b: format!("{prefix}b{tag}"),
        };
        for ns in [&t.wan, &t.a, &t.b] {
            ns.run("sysctl", &["-qw", "net.ipv4.conf.all.forwarding=1"])?;
        }
        let q = layout.queues;
        veth_queues(&t.client, "c0", &t.wan, "wc", q)?;
        veth_queues(&t.wan, "wa", &t.a, &t.uplink_a, q)?;
        veth_queues(&t.wan, "wb", &t.b, &t.uplink_b, q)?;
        veth_queues(&t.guest, "eth0", &t.b, "vm0", q)?;
        veth_queues(&t.a, "vm0", &t.wan, "xa", q)?;
        if let Some(mtu) = layout.underlay_mtu {
            let mtu = mtu.to_string();
            for (ns, dev) in [
                (&t.wan, "wa"),
                (&t.wan, "wb"),
                (&t.a, t.uplink_a.as_str()),
                (&t.b, t.uplink_b.as_str()),
            ] {
                ns.ip(&["link", "set", dev, "mtu", &mtu])?;
            }
        }
        let cmds: [(&Netns, &[&str]); 15] = [
            (&t.client, &["addr", "add", "198.51.100.7/24", "dev", "c0"]),
            (
                &t.client,
                &["route", "add", "default", "via", "198.51.100.1"],
            ),
            (&t.wan, &["addr", "add", "198.51.100.1/24", "dev", "wc"]),
            (&t.wan, &["addr", "add", "203.0.113.126/25", "dev", "wa"]),
            (&t.wan, &["addr", "add", "203.0.113.254/25", "dev", "wb"]),
            (
                &t.wan,
                &["route", "add", "192.0.2.0/24", "via", "203.0.113.1"],
            ),
            (&t.a, &["addr", "add", "203.0.113.1/25", "dev", &t.uplink_a]),
            (&t.a, &["route", "add", "default", "via", "203.0.113.126"]),
            (
                &t.b,
                &["addr", "add", "203.0.113.129/25", "dev", &t.uplink_b],
            ),
            (&t.b, &["route", "add", "default", "via", "203.0.113.254"]),
            (&t.b, &["link", "set", "vm0", "address", &mac(Self::GW_MAC)]),
            (&t.b, &["addr", "add", "192.0.2.1/24", "dev", "vm0"]),
            (&t.guest, &["link", "set", "eth0", "address", &mac(vm_mac)]),
            (&t.guest, &["addr", "add", "192.0.2.10/24", "dev", "eth0"]),
            (&t.guest, &["route", "add", "default", "via", "192.0.2.1"]),
        ];
        for (ns, args) in cmds {
            ns.ip(args)
                .with_context(|| format!("ip {args:?} in {}", ns.name()))?;
        }
        Ok(t)
    }

    /// The namespace of `host`.
    pub fn ns(&self, host: Host) -> &Netns {
        match host {
            Host::Client => &self.client,
            Host::Wan => &self.wan,
            Host::A => &self.a,
            Host::B => &self.b,
            Host::Guest => &self.guest,
        }
    }

    /// Pass-through XDP on `devs` of `host`, for as long as the triangle lives.
    pub fn pass_through(&mut self, host: Host, devs: &[&str]) -> Result<()> {
        let pass = pass_through_xdp(self.ns(host), devs)?;
        self.pass.push(pass);
        Ok(())
    }

    /// Resolves both sites' next hops toward the other's tunnel endpoint (XDP can't
    /// wait for ARP).
    pub fn prime_tunnel(&self) -> Result<()> {
        prime_next_hop(&self.a, Self::TB.into(), Self::WAN_AT_A.into())
            .context("A's next hop toward TB")?;
        prime_next_hop(&self.b, Self::TA.into(), Self::WAN_AT_B.into())
            .context("B's next hop toward TA")
    }
}
