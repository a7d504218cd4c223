//! `movarto-user service add|set|del|list`: one node's services, one by one, on an
//! attached uplink; no program is reloaded.

use std::net::{IpAddr, Ipv4Addr};

use anyhow::{Result, bail};
use clap::{Args, Subcommand};
use movarto_common::{
    config::Mode,
    ids::{MacAddr, SessionToken},
};
use movarto_user::datapath::{Pinned, SiteConfig, ifindex, pin_name_or, require_forwarding};
use serde_json::json;

#[derive(Subcommand, Debug)]
pub enum ServiceCommand {
    /// Add a service: its home address, mode, VM-facing interface and tunnel.
    Add(ServiceArgs),
    /// Replace a service's settings whole (its counters and flows stay).
    Set(ServiceArgs),
    /// Remove a service (its flows stay in the flow map until they expire).
    Del(DelArgs),
    /// List the services with their counters.
    List(ListArgs),
}

#[derive(Args, Debug)]
pub struct Uplink {
    /// The attached uplink.
    pub uplink: String,
    /// The pin name the uplink was attached with, if not its own name.
    #[arg(long, value_name = "NAME")]
    pub pin_name: Option<String>,
}

#[derive(Args, Debug)]
pub struct ServiceArgs {
    #[command(flatten)]
    pub uplink: Uplink,
    /// The service's home address H (IPv4 or IPv6).
    #[arg(long)]
    pub home: IpAddr,
    #[arg(long, value_enum, default_value = "track")]
    pub mode: Mode,
    /// The VM's interface here (QEMU's tap, or a veth); the VM-facing program is
    /// attached to it unless another service's uses it.
    #[arg(long)]
    pub vm_iface: String,
    /// The VM's MAC (site B delivers to it).
    #[arg(long, default_value = "00:00:00:00:00:00")]
    pub vm_mac: MacAddr,
    /// The new address N (site B).
    #[arg(long)]
    pub new_addr: Option<IpAddr>,
    /// The peer site's tunnel endpoint (required by forward, receive, direct).
    #[arg(long)]
    pub peer_tunnel: Option<Ipv4Addr>,
    /// The migration's session token (hex, non-zero; required by forward, receive,
    /// direct). GUE is accepted for this service only from its peer with its token.
    #[arg(long)]
    pub token: Option<SessionToken>,
}

#[derive(Args, Debug)]
pub struct DelArgs {
    #[command(flatten)]
    pub uplink: Uplink,
    /// The service's home address H.
    #[arg(long)]
    pub home: IpAddr,
}

#[derive(Args, Debug)]
pub struct ListArgs {
    #[command(flatten)]
    pub uplink: Uplink,
    #[arg(long)]
    pub json: bool,
}

pub fn run(command: ServiceCommand) -> Result<()> {
    match command {
        ServiceCommand::Add(a) => put(&a, true),
        ServiceCommand::Set(a) => put(&a, false),
        ServiceCommand::Del(a) => {
            let mut pinned = open(&a.uplink)?;
            let old = pinned.remove_service(a.home)?;
            println!(
                "removed service {} (mode {})",
                a.home,
                old.mode().map_or("unknown", Mode::name)
            );
            Ok(())
        }
        ServiceCommand::List(a) => list(&a),
    }
}

/// The uplink's pins, checked to be this namespace's.
fn open(uplink: &Uplink) -> Result<Pinned> {
    // A deleted uplink is named as such, before anything about its pins.
    ifindex(&uplink.uplink)?;
    Pinned::open_for(
        &uplink.uplink,
        pin_name_or(uplink.pin_name.as_deref(), &uplink.uplink),
    )
}

fn put(a: &ServiceArgs, add: bool) -> Result<()> {
    if a.mode.uses_tunnel() {
        for (missing, flag) in [
            (a.peer_tunnel.is_none(), "--peer-tunnel"),
            (a.token.is_none(), "--token"),
        ] {
            if missing {
                bail!(
                    "--mode {} carries the tunnel and needs {flag}; GUE for the service is \
                     accepted only from its peer's endpoint with its token",
                    a.mode
                );
            }
        }
    }
    require_forwarding(&a.uplink.uplink, a.mode, a.home)?;
    let mut pinned = open(&a.uplink)?;
    let uplink = pinned.uplink()?;
    let local = Ipv4Addr::new(
        uplink.local_tunnel_addr[0],
        uplink.local_tunnel_addr[1],
        uplink.local_tunnel_addr[2],
        uplink.local_tunnel_addr[3],
    );
    if a.mode.uses_tunnel() && local.is_unspecified() {
        bail!(
            "--mode {} carries the tunnel, and {} was attached without this site's tunnel \
             endpoint (attach --local-tunnel)",
            a.mode,
            a.uplink.uplink
        );
    }
    let site = SiteConfig::new(a.mode, a.home)
        .with_new_addr(a.new_addr)
        .with_tunnel(
            local,
            a.peer_tunnel.unwrap_or(Ipv4Addr::UNSPECIFIED),
            a.token.unwrap_or(SessionToken(0)),
        )
        .with_macs(a.vm_mac, MacAddr(uplink.gateway_mac));
    let written = if add {
        pinned.add_service(&site, &a.vm_iface)?
    } else {
        pinned.set_service(&site, &a.vm_iface)?
    };
    println!(
        "{} service {} in mode {} on {} (row {} of {})",
        if add { "added" } else { "set" },
        a.home,
        a.mode,
        a.vm_iface,
        written.slot,
        pinned.services.capacity
    );
    Ok(())
}

fn list(a: &ListArgs) -> Result<()> {
    let pinned = open(&a.uplink)?;
    let services = pinned.services.list()?;
    if a.json {
        let entries = services
            .iter()
            .map(|service| {
                let mut entry = super::status::config_json(service);
                entry["slot"] = json!(service.slot);
                entry["counters"] = serde_json::to_value(pinned.services.counters(service.slot)?)?;
                Ok(entry)
            })
            .collect::<Result<Vec<_>>>()?;
        let report = json!({
            "uplink": a.uplink.uplink,
            "capacity": pinned.services.capacity,
            "services": entries,
        });
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "{} services of {} at most on {}",
        services.len(),
        pinned.services.capacity,
        a.uplink.uplink
    );
    for service in &services {
        let shown = super::status::addr_string;
        let counters = pinned.services.counters(service.slot)?;
        let total = |drops: bool| -> u64 {
            counters
                .iter()
                .filter(|(c, _)| c.is_drop() == drops)
                .map(|(_, v)| v)
                .sum()
        };
        println!(
            "  {:<24} {:<8} new {:<24} peer {:<16} vm ifindex {:<4} verdicts {} drops {}",
            shown(service.home_addr, service.service_family),
            service.mode().map_or("unknown", Mode::name),
            shown(service.new_addr, service.service_family),
            shown(service.peer_tunnel_addr, service.tunnel_family),
            service.vm_ifindex,
            total(false),
            total(true)
        );
    }
    Ok(())
}
