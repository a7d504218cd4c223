//! Each benchmarked path on the triangle of [`crate::triangle`]: the direct route, movarto's
//! tunnel after a move, kernel VXLAN and OpenVPN, and the veth settings a user can choose.
//! Everything built here (namespaces, programs, pins, OpenVPN processes, key files) goes
//! when the [`Path`] drops, on failure too.

use std::{fs, net::IpAddr, time::Duration};

use anyhow::{Context as _, Result, bail};
use movarto_common::{
    config::Mode,
    ids::{MacAddr, SessionToken},
};
use movarto_user::datapath::{CounterSnapshot, SiteConfig};

use super::Variant;
use crate::{
    netns::{ChildGuard, Netns, wait_until},
    tempdir::TempDir,
    triangle::{Attached, Host, Layout, Triangle, attach_in},
};

pub const VM_MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x58];
const TOKEN: u64 = 0x6265_6e63_6874_756e;
/// The inner point-to-point addresses of VXLAN and OpenVPN (benchmark range).
const VXLAN_A: &str = "198.18.0.1";
const VXLAN_B: &str = "198.18.0.2";
const OVPN_A: &str = "198.18.0.5";
const OVPN_B: &str = "198.18.0.6";
/// How long OpenVPN may take to come up.
const OPENVPN_START: Duration = Duration::from_secs(15);

/// Which tunnel carries client to guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Tunnel {
    /// None: the wan routes `H` to B (as once routing has converged).
    Direct,
    Movarto,
    Vxlan,
    Openvpn,
}

/// Which veth ends carry pass-through XDP (programs that pass everything).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PassThrough {
    None,
    /// The tests' triangle: the wan's ends toward both sites and the guest's eth0.
    Triangle,
    /// Only the ends that must deliver what XDP sends them: the wan's end toward A (A's
    /// XDP_TX) and the guest's eth0 (B's redirect).
    Needed,
    /// On the direct path: every end movarto's path has XDP on, the uplinks included.
    LikeMovarto,
}

/// Where GRO is turned on (`ethtool -K <dev> gro on`; a veth with XDP has it already).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Gro {
    Off,
    /// The ends that deliver to the endpoints' neighbours and feed no XDP: the client's
    /// c0 and B's vm0.
    Endpoints,
    /// Every veth end, the wan's included: the wan then forwards GRO super-packets into
    /// A's XDP.
    All,
}

/// A built path: the hosts and whatever keeps the tunnel up.
pub struct Path {
    // Drop order: the tunnel's processes and pins before the namespaces.
    _openvpn: Vec<ChildGuard>,
    sites: Option<(Attached, Attached)>,
    pub hosts: Triangle,
    _dir: TempDir,
}

/// The datapath counters of both sites.
pub struct SiteCounters {
    pub a: CounterSnapshot,
    pub b: CounterSnapshot,
}

impl Path {
    /// Builds `variant`'s path; `prefix` names its namespaces and interfaces.
    pub fn build(prefix: &str, variant: &Variant) -> Result<Path> {
        let layout = Layout {
            queues: variant.queues,
            underlay_mtu: variant.underlay_mtu,
        };
        let mut hosts = Triangle::build(prefix, VM_MAC, layout)?;
        let dir = TempDir::new("movarto-bench-tunnel")?;
        // As in tests/tests/gso_bulk.rs, for every path alike: the guest offloads (TSO,
        // GSO, checksums); the client and B's uplink checksum in software, as XDP turns
        // frames into bytes and would lose a checksum left to skb metadata.
        hosts
            .client
            .run("ethtool", &["-K", "c0", "tx", "off"])
            .context("ethtool on the client")?;
        hosts
            .b
            .run("ethtool", &["-K", &hosts.uplink_b, "tx", "off"])
            .context("ethtool on B's uplink")?;
        let (uplink_a, uplink_b) = (hosts.uplink_a.clone(), hosts.uplink_b.clone());
        match variant.pass_through {
            PassThrough::None => {}
            PassThrough::Triangle => {
                hosts.pass_through(Host::Wan, &["wa", "wb"])?;
                hosts.pass_through(Host::Guest, &["eth0"])?;
            }
            PassThrough::Needed => {
                hosts.pass_through(Host::Wan, &["wa"])?;
                hosts.pass_through(Host::Guest, &["eth0"])?;
            }
            PassThrough::LikeMovarto => {
                hosts.pass_through(Host::Wan, &["wa", "wb"])?;
                hosts.pass_through(Host::Guest, &["eth0"])?;
                hosts.pass_through(Host::A, &[&uplink_a])?;
                hosts.pass_through(Host::B, &[&uplink_b])?;
            }
        }
        let mut path = Path {
            _openvpn: Vec::new(),
            sites: None,
            hosts,
            _dir: dir,
        };
        match variant.tunnel {
            Tunnel::Direct => {
                path.hosts
                    .wan
                    .ip(&["route", "replace", "192.0.2.0/24", "via", "203.0.113.129"])?;
            }
            Tunnel::Movarto => path.movarto(variant)?,
            Tunnel::Vxlan => path.vxlan()?,
            Tunnel::Openvpn => path.openvpn()?,
        }
        path.tune(variant)?;
        Ok(path)
    }

    /// A in `forward`, B in `receive`: the state right after the switchover.
    fn movarto(&mut self, variant: &Variant) -> Result<()> {
        let h = &self.hosts;
        let mtu = variant.underlay_mtu.unwrap_or(1500);
        let site = |ns, uplink, mode, local, peer| {
            let config = SiteConfig::new(mode, IpAddr::V4(Triangle::HOME))
                .with_tunnel(local, peer, SessionToken(TOKEN))
                .with_tunnel_mtu(u16::try_from(mtu).unwrap_or(u16::MAX))
                .with_macs(MacAddr(VM_MAC), MacAddr(Triangle::GW_MAC));
            attach_in(ns, uplink, "vm0", config, variant.xdp_mode)
        };
        let a = site(&h.a, &h.uplink_a, Mode::Forward, Triangle::TA, Triangle::TB)?;
        let b = site(&h.b, &h.uplink_b, Mode::Receive, Triangle::TB, Triangle::TA)?;
        self.sites = Some((a, b));
        self.hosts.prime_tunnel()
    }

    /// The guest's replies go back into the tunnel at B (policy routing on what comes
    /// from vm0), so both directions cross A as with movarto.
    fn reply_through(&self, peer: &str) -> Result<()> {
        let b = &self.hosts.b;
        b.ip(&[
            "rule",
            "add",
            "pref",
            "100",
            "iif",
            "vm0",
            "from",
            "192.0.2.0/24",
            "lookup",
            "100",
        ])?;
        b.ip(&["route", "add", "default", "via", peer, "table", "100"])
    }

    fn vxlan(&mut self) -> Result<()> {
        let h = &self.hosts;
        for (ns, uplink, local, remote, inner) in [
            (&h.a, &h.uplink_a, Triangle::TA, Triangle::TB, VXLAN_A),
            (&h.b, &h.uplink_b, Triangle::TB, Triangle::TA, VXLAN_B),
        ] {
            let (local, remote) = (local.to_string(), remote.to_string());
            ns.ip(&[
                "link", "add", "vx0", "type", "vxlan", "id", "42", "local", &local, "remote",
                &remote, "dstport", "4789", "dev", uplink,
            ])
            .context("creating the VXLAN device")?;
            ns.ip(&["addr", "add", &format!("{inner}/30"), "dev", "vx0"])?;
            ns.ip(&["link", "set", "vx0", "up"])?;
        }
        h.a.ip(&["route", "add", "192.0.2.0/24", "via", VXLAN_B])?;
        self.reply_through(VXLAN_A)
    }

    /// OpenVPN point-to-point with a static key (OpenVPN 2.6 still has `--secret`).
    fn openvpn(&mut self) -> Result<()> {
        let key = self._dir.join("static.key");
        let out = std::process::Command::new("openvpn")
            .args(["--genkey", "secret"])
            .arg(&key)
            .output()
            .context("running openvpn --genkey (is openvpn installed? `cargo xtask setup`)")?;
        if !out.status.success() {
            bail!(
                "openvpn --genkey failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let key = key.to_string_lossy().into_owned();
        let h = &self.hosts;
        for (site, ns, local, remote, inner, peer) in [
            ("a", &h.a, Triangle::TA, Triangle::TB, OVPN_A, OVPN_B),
            ("b", &h.b, Triangle::TB, Triangle::TA, OVPN_B, OVPN_A),
        ] {
            let log = self._dir.join(format!("openvpn-{site}.log"));
            let mut cmd = ns.command("openvpn");
            cmd.args(["--dev", "ovpn0", "--dev-type", "tun", "--proto", "udp"])
                .args([
                    "--local",
                    &local.to_string(),
                    "--remote",
                    &remote.to_string(),
                ])
                .args(["--port", "1194", "--ifconfig", inner, peer])
                .args([
                    "--secret",
                    &key,
                    "--cipher",
                    "AES-256-CBC",
                    "--auth",
                    "SHA256",
                ])
                .args(["--route-noexec", "--script-security", "0", "--verb", "3"])
                .arg("--log")
                .arg(&log);
            // Everything goes to its log (the deprecation notice for --secret too).
            cmd.stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null());
            self._openvpn.push(ns.spawn(&mut cmd)?);
        }
        for site in ["a", "b"] {
            let log = self._dir.join(format!("openvpn-{site}.log"));
            wait_until(OPENVPN_START, &format!("OpenVPN at site {site}"), || {
                fs::read_to_string(&log)
                    .is_ok_and(|l| l.contains("Initialization Sequence Completed"))
            })
            .with_context(|| {
                format!(
                    "OpenVPN's log: {}",
                    fs::read_to_string(&log).unwrap_or_default()
                )
            })?;
        }
        for guard in &mut self._openvpn {
            if let Some(status) = guard.try_wait()? {
                bail!("openvpn exited early ({status})");
            }
        }
        h.a.ip(&["route", "add", "192.0.2.0/24", "via", OVPN_B])?;
        self.reply_through(OVPN_A)
    }

    /// The variant's veth settings, after XDP is attached (it gives a veth NAPI).
    fn tune(&self, variant: &Variant) -> Result<()> {
        let h = &self.hosts;
        let all: [(&Netns, &str); 10] = [
            (&h.client, "c0"),
            (&h.wan, "wc"),
            (&h.wan, "wa"),
            (&h.wan, "wb"),
            (&h.wan, "xa"),
            (&h.a, &h.uplink_a),
            (&h.a, "vm0"),
            (&h.b, &h.uplink_b),
            (&h.b, "vm0"),
            (&h.guest, "eth0"),
        ];
        let endpoints: [(&Netns, &str); 2] = [(&h.client, "c0"), (&h.b, "vm0")];
        let gro_on: &[(&Netns, &str)] = match variant.gro {
            Gro::Off => &[],
            Gro::Endpoints => &endpoints,
            Gro::All => &all,
        };
        for &(ns, dev) in gro_on {
            ns.run("ethtool", &["-K", dev, "gro", "on"])
                .with_context(|| format!("GRO on {dev}"))?;
        }
        if variant.threaded_napi {
            // Only ends with NAPI (XDP or GRO) accept it; /sys is the namespace's under
            // `ip netns exec`.
            for (ns, dev) in all {
                let knob = format!("/sys/class/net/{dev}/threaded");
                let _ = ns.run("sh", &["-c", &format!("echo 1 > {knob}")]);
            }
        }
        if variant.qdisc {
            // A veth with a qdisc stops its queue when the peer's ring is full rather
            // than drop (Linux 6.16 and later): on the ends that send into an XDP end.
            let senders: [(&Netns, &str); 5] = [
                (&h.wan, "wa"),
                (&h.wan, "wb"),
                (&h.a, &h.uplink_a),
                (&h.b, &h.uplink_b),
                (&h.b, "vm0"),
            ];
            for (ns, dev) in senders {
                ns.run(
                    "tc",
                    &[
                        "qdisc", "replace", "dev", dev, "root", "pfifo", "limit", "1000",
                    ],
                )
                .with_context(|| format!("a qdisc on {dev}"))?;
            }
        }
        Ok(())
    }

    /// movarto's counters at both sites, if this is movarto's path.
    pub fn counters(&self) -> Result<Option<SiteCounters>> {
        match &self.sites {
            None => Ok(None),
            Some((a, b)) => Ok(Some(SiteCounters {
                a: a.counters()?,
                b: b.counters()?,
            })),
        }
    }

    /// Dropped packets summed over every veth end of the triangle (rx and tx).
    pub fn veth_drops(&self) -> Result<u64> {
        let h = &self.hosts;
        let mut total = 0;
        for ns in [&h.client, &h.wan, &h.a, &h.b, &h.guest] {
            let out = ns.run("ip", &["-s", "-j", "link", "show"])?;
            let links: serde_json::Value =
                serde_json::from_str(&out).context("parsing `ip -s -j link`")?;
            for link in links.as_array().into_iter().flatten() {
                let stats = &link["stats64"];
                for dir in ["rx", "tx"] {
                    total += stats[dir]["dropped"].as_u64().unwrap_or(0);
                }
            }
        }
        Ok(total)
    }
}
