//! Reading the flow map: the clock the datapath stamps flows with, and an entry's
//! readable form (`flows --json`, the agent's snapshot).

use std::{net::IpAddr, time::Duration};

use anyhow::{Context as _, Result, anyhow};
use movarto_common::flow::{FlowKey, FlowValue, origin, state};
use serde_json::json;

pub fn origin_name(o: u8) -> &'static str {
    match o {
        origin::TRACKED => "pre-move",
        origin::TUNNELLED => "tunnelled",
        origin::NAT => "nat",
        origin::STALE_DNS => "stale-dns",
        _ => "?",
    }
}

pub fn state_names(bits: u32) -> Vec<&'static str> {
    [
        (state::SYN_SEEN, "syn"),
        (state::ESTABLISHED, "established"),
        (state::FIN_PEER, "fin-peer"),
        (state::FIN_SERVICE, "fin-service"),
        (state::RST, "rst"),
    ]
    .into_iter()
    .filter(|(bit, _)| bits & bit != 0)
    .map(|(_, name)| name)
    .collect()
}

pub fn endpoint(e: Option<(IpAddr, u16)>) -> String {
    e.map_or_else(
        || "?".to_owned(),
        |(a, p)| match a {
            IpAddr::V6(_) => format!("[{a}]:{p}"),
            IpAddr::V4(_) => format!("{a}:{p}"),
        },
    )
}

/// Nanoseconds on CLOCK_MONOTONIC, the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> Result<u64> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec out-pointer.
    if unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) } != 0 {
        return Err(anyhow!(
            "clock_gettime: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(u64::try_from(ts.tv_sec).context("clock")? * 1_000_000_000
        + u64::try_from(ts.tv_nsec).context("clock")?)
}

pub fn flow_json(k: &FlowKey, v: &FlowValue, now: u64) -> serde_json::Value {
    json!({
        "protocol": k.protocol,
        "service": endpoint(k.service()),
        "peer": endpoint(k.peer()),
        "origin": origin_name(v.origin),
        "state": state_names(v.state),
        "closing": state::is_closing(v.state),
        // In the confirmed map, out of a flood's reach (else pending).
        "confirmed": v.is_confirmed(),
        "packets_from_peer": v.packets_from_peer,
        "bytes_from_peer": v.bytes_from_peer,
        "packets_to_peer": v.packets_to_peer,
        "bytes_to_peer": v.bytes_to_peer,
        "idle_ms": Duration::from_nanos(now.saturating_sub(v.last_seen_ns)).as_millis() as u64,
        "age_ms": Duration::from_nanos(now.saturating_sub(v.first_seen_ns)).as_millis() as u64,
    })
}
