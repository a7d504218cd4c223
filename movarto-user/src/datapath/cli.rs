//! `movarto-user attach|detach|status|flows|mode`: the datapath on one host.

use std::{
    net::{IpAddr, Ipv4Addr},
    time::Duration,
};

use anyhow::{Result, bail};
use aya::programs::XdpMode;
use clap::{Args, ValueEnum};
use movarto_common::{
    config::{Config, GUE_DEFAULT_PORT, Mode},
    ids::{MacAddr, SessionToken},
    net::addr,
};
use serde_json::json;

use super::{
    AttachOptions, Pinned, SiteConfig, attach, detach,
    flows::{endpoint, flow_json, monotonic_ns, origin_name, state_names},
    forwarding_enabled,
};

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
    /// The VM-facing interface: QEMU's tap, or a veth (TC on ingress).
    #[arg(long)]
    pub vm_iface: String,
    /// The home address H.
    #[arg(long)]
    pub home: IpAddr,
    #[arg(long, value_enum, default_value = "track")]
    pub mode: Mode,
    /// The new address N (site B).
    #[arg(long)]
    pub new_addr: Option<IpAddr>,
    /// This site's tunnel endpoint.
    #[arg(long, default_value = "0.0.0.0")]
    pub local_tunnel: Ipv4Addr,
    /// The other site's tunnel endpoint.
    #[arg(long, default_value = "0.0.0.0")]
    pub peer_tunnel: Ipv4Addr,
    /// The migration's session token (hex, as given to both sites).
    #[arg(long, default_value = "0")]
    pub token: SessionToken,
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
}

/// The datapath's pin name: `--pin-name`, or else the uplink's name.
pub fn pin_name_or<'a>(pin_name: Option<&'a str>, uplink: &'a str) -> &'a str {
    pin_name.unwrap_or(uplink)
}

pub fn run_attach(a: AttachArgs) -> Result<()> {
    let mut site = SiteConfig::new(a.mode, a.home);
    site.new_addr = a.new_addr;
    site.local_tunnel_addr = a.local_tunnel;
    site.peer_tunnel_addr = a.peer_tunnel;
    site.token = a.token;
    site.gue_port = a.gue_port;
    site.tunnel_mtu = a.tunnel_mtu;
    site.vm_mac = a.vm_mac;
    site.gateway_mac = a.gateway_mac;
    warn_if_not_forwarding(&a.uplink, site.mode)?;
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
        pin_name: a.pin_name.clone(),
    })?;
    println!(
        "attached to {} (XDP) and {} (TC ingress) in mode {}; pinned at {}",
        a.uplink,
        a.vm_iface,
        a.mode,
        dir.display()
    );
    Ok(())
}

fn warn_if_not_forwarding(uplink: &str, mode: Mode) -> Result<()> {
    if mode.routes_packets() && !forwarding_enabled(uplink)? {
        bail!(
            "IPv4 forwarding is off on {uplink}; mode {} routes packets through it \
             (sysctl -w net.ipv4.conf.all.forwarding=1)",
            mode.name()
        );
    }
    Ok(())
}

/// Detaches the datapath of `uplink` in this network namespace, or removes the pins of
/// one whose uplink no longer exists anywhere (nothing is attached then).
pub fn run_detach(uplink: &str, pin_name: Option<&str>) -> Result<()> {
    let name = pin_name_or(pin_name, uplink);
    let pinned = Pinned::open(name)?;
    if pinned.uplink_gone()? {
        drop(pinned);
        detach(name)?;
        println!(
            "removed the pins under {name}: the uplink they were attached to no longer exists \
             (deleted, or its network namespace was), so nothing was attached"
        );
        return Ok(());
    }
    // Refuses another namespace's datapath that happens to use the same name.
    pinned.check_owner(uplink)?;
    drop(pinned);
    detach(name)?;
    println!("detached from {uplink} (pin name {name})");
    Ok(())
}

pub fn run_mode(uplink: &str, pin_name: Option<&str>, mode: Mode) -> Result<()> {
    warn_if_not_forwarding(uplink, mode)?;
    let mut pinned = Pinned::open_for(uplink, pin_name_or(pin_name, uplink))?;
    let before = pinned.config()?.mode().map_or("unknown", Mode::name);
    pinned.set_mode(mode)?;
    println!("{uplink}: mode {before} -> {}", mode.name());
    Ok(())
}

fn addr_string(bytes: [u8; 16], family: u8) -> String {
    if bytes == [0; 16] {
        return "-".to_owned();
    }
    addr::from_map(bytes, family).map_or_else(|| "?".to_owned(), |a| a.to_string())
}

fn config_json(c: &Config) -> serde_json::Value {
    json!({
        "mode": c.mode().map_or("unknown", Mode::name),
        "home_addr": addr_string(c.home_addr, c.service_family),
        "new_addr": addr_string(c.new_addr, c.service_family),
        "local_tunnel_addr": addr_string(c.local_tunnel_addr, c.tunnel_family),
        "peer_tunnel_addr": addr_string(c.peer_tunnel_addr, c.tunnel_family),
        "gue_port": u16::from_be(c.gue_port),
        "tunnel_mtu": c.tunnel_mtu,
        "uplink_ifindex": c.uplink_ifindex,
        "vm_ifindex": c.vm_ifindex,
        "vm_mac": MacAddr(c.vm_mac).to_string(),
        "gateway_mac": MacAddr(c.gateway_mac).to_string(),
    })
}

/// Read-only: works from any namespace, and says whose datapath it shows.
pub fn run_status(uplink: &str, pin_name: Option<&str>, as_json: bool) -> Result<()> {
    let pinned = Pinned::open(pin_name_or(pin_name, uplink))?;
    let owner = pinned.owner()?;
    let here = owner.is(uplink).unwrap_or(false);
    let config = pinned.config()?;
    let counters = pinned.counters()?;
    let flows = pinned.flows()?;
    if as_json {
        let report = json!({
            "uplink": uplink,
            "pinned_at": pinned.dir,
            "uplink_ifindex": owner.uplink_ifindex,
            "netns_cookie": owner.netns_cookie,
            "attached_here": here,
            "config": config_json(&config),
            "flows": flows.len(),
            "counters": counters,
        });
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    let c = config_json(&config);
    println!("movarto on {uplink} (pinned at {})", pinned.dir.display());
    if !here {
        println!(
            "  note     attached to ifindex {} in network namespace {}, not to {uplink} here",
            owner.uplink_ifindex, owner.netns_cookie
        );
    }
    println!("  mode     {}", c["mode"].as_str().unwrap_or("?"));
    println!(
        "  home     {}   new {}",
        c["home_addr"].as_str().unwrap_or("?"),
        c["new_addr"].as_str().unwrap_or("?")
    );
    println!(
        "  tunnel   {} -> {}  port {}  mtu {}",
        c["local_tunnel_addr"].as_str().unwrap_or("?"),
        c["peer_tunnel_addr"].as_str().unwrap_or("?"),
        u16::from_be(config.gue_port),
        config.tunnel_mtu
    );
    println!("  flows    {}", flows.len());
    println!("counters:");
    let nonzero = counters.nonzero();
    if nonzero.is_empty() {
        println!("  (all zero)");
    }
    for (counter, value) in nonzero {
        let mark = if counter.is_drop() { "  (drop)" } else { "" };
        println!("  {:<26} {value}{mark}", counter.name());
    }
    Ok(())
}

/// Read-only: works from any namespace.
pub fn run_flows(uplink: &str, pin_name: Option<&str>, as_json: bool) -> Result<()> {
    let pinned = Pinned::open(pin_name_or(pin_name, uplink))?;
    let now = monotonic_ns()?;
    let mut flows = pinned.flows()?;
    flows.sort_by_key(|(_, v)| std::cmp::Reverse(v.last_seen_ns));
    if as_json {
        let list: Vec<_> = flows.iter().map(|(k, v)| flow_json(k, v, now)).collect();
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(());
    }
    println!(
        "{:<5} {:<24} {:<24} {:<10} {:<22} {:>9} {:>9} {:>8}",
        "proto", "service", "peer", "origin", "state", "pkts in", "pkts out", "idle"
    );
    for (k, v) in &flows {
        let proto = match k.protocol {
            6 => "tcp",
            17 => "udp",
            _ => "?",
        };
        let idle = Duration::from_nanos(now.saturating_sub(v.last_seen_ns));
        println!(
            "{:<5} {:<24} {:<24} {:<10} {:<22} {:>9} {:>9} {:>7.1}s",
            proto,
            endpoint(k.service()),
            endpoint(k.peer()),
            origin_name(v.origin),
            state_names(v.state).join(","),
            v.packets_from_peer,
            v.packets_to_peer,
            idle.as_secs_f64()
        );
    }
    println!("{} flows", flows.len());
    Ok(())
}
