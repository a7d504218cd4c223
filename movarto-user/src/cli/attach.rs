//! `movarto-user attach`: the datapath on an uplink (XDP) and a VM-facing interface (TC).

use std::net::{IpAddr, Ipv4Addr};

use anyhow::{Result, bail};
use aya::programs::XdpMode;
use clap::{Args, ValueEnum};
use movarto_common::{
    config::{GUE_DEFAULT_PORT, Mode},
    ids::{MacAddr, SessionToken},
};
use movarto_user::datapath::{AttachOptions, SiteConfig, attach, require_forwarding};

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum XdpModeArg {
    /// Let the kernel choose (native when the driver supports it).
    Auto,
    /// Native (driver) XDP.
    Native,
    /// Generic XDP in the network stack.
    Skb,
}

#[derive(Args, Debug)]
pub struct AttachArgs {
    /// The uplink (XDP on ingress).
    pub uplink: String,
    /// The first service's VM-facing interface: QEMU's tap, or a veth (TC on
    /// ingress). With --home; without both, the uplink is attached alone and
    /// services are added with `movarto-user service add`.
    #[arg(long, requires = "home")]
    pub vm_iface: Option<String>,
    /// The first service's home address H.
    #[arg(long, requires = "vm_iface")]
    pub home: Option<IpAddr>,
    /// The first service's mode (default track).
    #[arg(long, value_enum, requires = "home")]
    pub mode: Option<Mode>,
    /// The new address N (site B).
    #[arg(long)]
    pub new_addr: Option<IpAddr>,
    /// This site's tunnel endpoint (required by the modes that carry the tunnel:
    /// forward, receive, direct).
    #[arg(long)]
    pub local_tunnel: Option<Ipv4Addr>,
    /// The other site's tunnel endpoint (required by forward, receive, direct).
    #[arg(long)]
    pub peer_tunnel: Option<Ipv4Addr>,
    /// The migration's session token (hex, non-zero, the same at both sites;
    /// required by forward, receive, direct).
    #[arg(long)]
    pub token: Option<SessionToken>,
    #[arg(long, default_value_t = GUE_DEFAULT_PORT)]
    pub gue_port: u16,
    /// Largest outer packet between the sites.
    #[arg(long, default_value_t = 1500)]
    pub tunnel_mtu: u16,
    /// The VM's MAC (site B delivers to it).
    #[arg(long, default_value = "00:00:00:00:00:00")]
    pub vm_mac: MacAddr,
    /// The VM-facing interface's gateway MAC, the same at both sites.
    #[arg(long, default_value = "00:00:00:00:00:00")]
    pub gateway_mac: MacAddr,
    #[arg(long, value_enum, default_value = "auto")]
    pub xdp_mode: XdpModeArg,
    /// Pin under /sys/fs/bpf/movarto/<NAME> instead of the uplink's name;
    /// needed when another network namespace's uplink has the same name.
    #[arg(long, value_name = "NAME")]
    pub pin_name: Option<String>,
    /// How many flows the flow map holds (default 1048576, Cilium's TCP conntrack
    /// default). Each takes about 160 bytes of kernel memory, preallocated; a map a
    /// quarter that size holds the flows not confirmed yet (SYNs, one-way traffic),
    /// so that a flood of new 5-tuples never pushes out an established connection.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub flows_capacity: Option<u32>,
    /// How many services the uplink holds at most (default 4096). The services map,
    /// the NAT map and the per-service counters are sized by it at attach time.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub services: Option<u32>,
    /// Load the programs with their debug logs on (aya-log), which `movarto-user
    /// monitor --debug-log` prints. Off, they cost nothing: the verifier removes them.
    #[arg(long)]
    pub debug_log: bool,
}

pub fn run(a: AttachArgs) -> Result<()> {
    // Without a first service the uplink entry alone is written (mode idle).
    let home = a.home.unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    let mode = match a.home {
        Some(_) => a.mode.unwrap_or(Mode::Track),
        None => Mode::Idle,
    };
    if mode.uses_tunnel() {
        for (missing, flag) in [
            (a.local_tunnel.is_none(), "--local-tunnel"),
            (a.peer_tunnel.is_none(), "--peer-tunnel"),
            (a.token.is_none(), "--token"),
        ] {
            if missing {
                bail!(
                    "--mode {mode} carries the tunnel and needs {flag}; GUE is accepted only \
                     from the peer's endpoint with the migration's token"
                );
            }
        }
    }
    let site = SiteConfig::new(mode, home)
        .with_new_addr(a.new_addr)
        .with_tunnel(
            a.local_tunnel.unwrap_or(Ipv4Addr::UNSPECIFIED),
            a.peer_tunnel.unwrap_or(Ipv4Addr::UNSPECIFIED),
            a.token.unwrap_or(SessionToken(0)),
        )
        .with_gue_port(a.gue_port)
        .with_tunnel_mtu(a.tunnel_mtu)
        .with_macs(a.vm_mac, a.gateway_mac)
        .checked()?;
    if a.home.is_some() {
        require_forwarding(&a.uplink, site.mode, site.home_addr)?;
    }
    let xdp_mode = match a.xdp_mode {
        XdpModeArg::Auto => XdpMode::Default,
        XdpModeArg::Native => XdpMode::Driver,
        XdpModeArg::Skb => XdpMode::Skb,
    };
    let dir = attach(&AttachOptions {
        uplink: a.uplink.clone(),
        vm_iface: a.vm_iface.clone(),
        xdp_mode,
        site,
        pin_name: a.pin_name,
        flows_capacity: a.flows_capacity,
        services_capacity: a.services,
        debug_log: a.debug_log,
    })?;
    match &a.vm_iface {
        Some(vm_iface) => println!(
            "attached to {} (XDP) and {vm_iface} (TC ingress) in mode {}; pinned at {}",
            a.uplink,
            mode,
            dir.display()
        ),
        None => println!(
            "attached to {} (XDP) with no service yet; pinned at {}",
            a.uplink,
            dir.display()
        ),
    }
    Ok(())
}
