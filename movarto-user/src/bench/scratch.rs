//! The bench's own network namespace: the programs' FIB lookups (the tunnel's
//! next hop, the inner packet's route) must succeed for the rewriting paths to
//! run to the end, and they must never see the host's routes. The namespace
//! belongs to the calling thread only and has no name, so it disappears with
//! the process, whatever way it ends.

use std::{net::Ipv4Addr, process::Command};

use anyhow::{Context as _, Result, bail};
use nix::sched::{CloneFlags, unshare};

use super::frames::{CLIENT, TA, TB};
use crate::datapath::ifindex;

/// The "uplink" and "VM-facing interface" of the scratch namespace.
pub struct Scratch {
    pub uplink_ifindex: u32,
    pub vm_ifindex: u32,
}

const UPLINK: &str = "bench-up0";
const VM_IFACE: &str = "bench-vm0";
/// The scratch uplink's own address; both tunnel endpoints are neighbours of it.
const UPLINK_ADDR: &str = "203.0.113.200/24";
/// The router clients are reached through.
const ROUTER: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 254);

/// Moves the calling thread into a fresh network namespace and builds the
/// interfaces, routes and (permanent) neighbours the measured paths look up.
/// Programs run by BPF_PROG_TEST_RUN from this thread then see only these.
pub fn enter() -> Result<Scratch> {
    let before = netns_inode()?;
    unshare(CloneFlags::CLONE_NEWNET)
        .context("creating the bench's network namespace (needs root)")?;
    // The sysctl below must reach the scratch namespace only, never the host's.
    if netns_inode()? == before {
        bail!("unshare left the thread in its network namespace");
    }
    // The decapsulated packets are routed on as a router does (`Lookup::Forward`).
    for conf in ["all", "default"] {
        std::fs::write(format!("/proc/sys/net/ipv4/conf/{conf}/forwarding"), "1")
            .context("enabling forwarding in the bench's namespace")?;
    }
    let client_net = format!("{}/24", Ipv4Addr::from(u32::from(CLIENT) & 0xffff_ff00));
    let router = ROUTER.to_string();
    for args in [
        &["link", "set", "lo", "up"][..],
        // veth pairs: this kernel has no dummy device. Both ends up, for carrier.
        &[
            "link",
            "add",
            UPLINK,
            "type",
            "veth",
            "peer",
            "name",
            "bench-up1",
        ],
        &[
            "link",
            "add",
            VM_IFACE,
            "type",
            "veth",
            "peer",
            "name",
            "bench-vm1",
        ],
        &["addr", "add", UPLINK_ADDR, "dev", UPLINK],
        &["link", "set", UPLINK, "up"],
        &["link", "set", "bench-up1", "up"],
        &["link", "set", VM_IFACE, "up"],
        &["link", "set", "bench-vm1", "up"],
        &["route", "add", &client_net, "via", &router, "dev", UPLINK],
    ] {
        ip(args)?;
    }
    for (n, neighbour) in [TA, TB, ROUTER].into_iter().enumerate() {
        let mac = format!("02:00:00:00:01:{n:02x}");
        ip(&[
            "neigh",
            "add",
            &neighbour.to_string(),
            "lladdr",
            &mac,
            "dev",
            UPLINK,
            "nud",
            "permanent",
        ])?;
    }
    Ok(Scratch {
        uplink_ifindex: ifindex(UPLINK)?,
        vm_ifindex: ifindex(VM_IFACE)?,
    })
}

/// The inode of the calling thread's network namespace.
fn netns_inode() -> Result<u64> {
    use std::os::unix::fs::MetadataExt as _;
    Ok(std::fs::metadata("/proc/thread-self/ns/net")
        .context("reading /proc/thread-self/ns/net")?
        .ino())
}

/// `ip args`, in the calling thread's namespace (a child inherits it).
fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}
