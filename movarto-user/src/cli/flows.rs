//! `movarto-user flows`: the flow map, most recently seen first.

use std::time::Duration;

use anyhow::Result;
use clap::Args;
use movarto_user::datapath::{
    Pinned,
    flows::{endpoint, flow_json, monotonic_ns, origin_name, state_names},
    pin_name_or,
};

#[derive(Args, Debug)]
pub struct FlowsArgs {
    pub uplink: String,
    #[arg(long, value_name = "NAME")]
    pub pin_name: Option<String>,
    #[arg(long)]
    pub json: bool,
}

/// Read-only: works from any namespace.
pub fn run(a: FlowsArgs) -> Result<()> {
    let pinned = Pinned::open(pin_name_or(a.pin_name.as_deref(), &a.uplink))?;
    let now = monotonic_ns()?;
    let mut flows = pinned.flows()?;
    flows.sort_by_key(|(_, v)| std::cmp::Reverse(v.last_seen_ns));
    if a.json {
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
