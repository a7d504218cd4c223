//! `movarto-user status`: the datapath's mode, configuration and counters.

use anyhow::Result;
use clap::Args;
use movarto_common::{
    config::{Config, Mode},
    ids::MacAddr,
    net::addr,
};
use movarto_user::datapath::Status;
use serde_json::json;

#[derive(Args, Debug)]
pub struct StatusArgs {
    pub uplink: String,
    #[arg(long, value_name = "NAME")]
    pub pin_name: Option<String>,
    #[arg(long)]
    pub json: bool,
}

pub(crate) fn addr_string(bytes: [u8; 16], family: u8) -> String {
    if bytes == [0; 16] {
        return "-".to_owned();
    }
    addr::from_map(bytes, family).map_or_else(|| "?".to_owned(), |a| a.to_string())
}

pub(crate) fn config_json(c: &Config) -> serde_json::Value {
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

pub fn run(a: StatusArgs) -> Result<()> {
    let uplink = &a.uplink;
    let status = Status::read(uplink, a.pin_name.as_deref())?;
    let config = &status.config;
    if a.json {
        let report = json!({
            "uplink": uplink,
            "pinned_at": status.pinned_at,
            "uplink_ifindex": status.owner.uplink_ifindex,
            "netns_cookie": status.owner.netns_cookie,
            "attached_here": status.attached_here,
            "config": config_json(config),
            "flows": status.flows.len(),
            "flows_confirmed": status.flows.iter().filter(|(_, v)| v.is_confirmed()).count(),
            "flows_capacity": status.flows_capacity,
            "pending_flows_capacity": status.pending_flows_capacity,
            "counters": status.counters,
            "services_capacity": status.services_capacity,
            "services": status.services.iter().map(|(service, counters)| {
                let mut entry = config_json(service);
                entry["counters"] = serde_json::to_value(counters).unwrap_or_default();
                entry
            }).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "movarto on {uplink} (pinned at {})",
        status.pinned_at.display()
    );
    if !status.attached_here {
        println!(
            "  note     attached to ifindex {} in network namespace {}, not to {uplink} here",
            status.owner.uplink_ifindex, status.owner.netns_cookie
        );
    }
    println!("  mode     {}", config.mode().map_or("unknown", Mode::name));
    println!(
        "  home     {}   new {}",
        addr_string(config.home_addr, config.service_family),
        addr_string(config.new_addr, config.service_family)
    );
    println!(
        "  tunnel   {} -> {}  port {}  mtu {}",
        addr_string(config.local_tunnel_addr, config.tunnel_family),
        addr_string(config.peer_tunnel_addr, config.tunnel_family),
        u16::from_be(config.gue_port),
        config.tunnel_mtu
    );
    let confirmed = status
        .flows
        .iter()
        .filter(|(_, v)| v.is_confirmed())
        .count();
    println!(
        "  flows    {confirmed} confirmed of {} at most, {} pending of {} at most",
        status.flows_capacity,
        status.flows.len() - confirmed,
        status.pending_flows_capacity
    );
    println!(
        "  services {} of {} at most",
        status.services.len(),
        status.services_capacity
    );
    println!("counters:");
    print_counters(&status.counters);
    if status.services.len() > 1 {
        for (service, counters) in &status.services {
            println!(
                "service {} ({}, new {}, peer {}):",
                addr_string(service.home_addr, service.service_family),
                service.mode().map_or("unknown", Mode::name),
                addr_string(service.new_addr, service.service_family),
                addr_string(service.peer_tunnel_addr, service.tunnel_family)
            );
            print_counters(counters);
        }
    }
    Ok(())
}

fn print_counters(counters: &movarto_user::datapath::CounterSnapshot) {
    let nonzero = counters.nonzero();
    if nonzero.is_empty() {
        println!("  (all zero)");
    }
    for (counter, value) in nonzero {
        let mark = if counter.is_drop() { "  (drop)" } else { "" };
        println!("  {:<26} {value}{mark}", counter.name());
    }
}
