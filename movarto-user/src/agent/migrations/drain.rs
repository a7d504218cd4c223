//! The drain and the teardown, at the source's agent: A forwards until no live pre-move
//! flow is left and nothing has reached `H` for the grace period (or `max_drain`
//! passes; the rest are cut and listed), then A detaches and B goes to `nat` (or
//! detaches, in move address mode). No orchestrator is needed for any of it.
//!
//! While the DNS switch is still owed (the orchestrator died before it, and nobody has
//! resumed it), new connections keep arriving at `H`: the drain then only ends at
//! `max_drain`.

use std::{collections::HashMap, net::IpAddr, sync::Arc, time::Duration};

use anyhow::{Result, bail};
use movarto_common::{counters::Counter, flow::FlowKey};
use tokio::time::Instant;

use super::{
    Handle, blocking, is_not_found,
    record::{Role, Stage, unix_ms},
};
use crate::agent::{api::FlowEntry, client::retry_unreachable, server::Agent};

/// How often the drain looks at A's datapath.
const DRAIN_POLL: Duration = Duration::from_millis(500);

pub(super) async fn drain_and_tear_down(agent: &Arc<Agent>, m: &Handle) -> Result<()> {
    let record = m.snapshot();
    let rule = record.spec.drain.clone();
    // The drain's clock starts at the switchover; a restarted agent keeps it.
    let started_unix = record
        .entered(Stage::Draining)
        .map_or_else(unix_ms, |c| c.at_unix_ms);
    let elapsed = || Duration::from_millis(unix_ms().saturating_sub(started_unix));
    let rerouted = record.spec.new_addr.is_none();
    let mut last_activity = Instant::now();
    let mut last_packets = None;
    let mut bytes_seen: HashMap<FlowKey, u64> = HashMap::new();
    let mut baseline: Option<u64> = None;
    let home = Some(record.spec.home);
    let cut = loop {
        // A move home superseded this migration: its tunnel is that one's now.
        if m.stage().is_final() {
            return Ok(());
        }
        // A move home is under way here: its service is this one's, not to tear down.
        let moving_home = agent
            .migrations
            .superseded_by(record.id(), &record.spec.vm)
            .await
            .is_some_and(|other| other.snapshot().role == Role::Destination);
        let datapath = agent.clone();
        let (status, flows) = blocking(move || {
            let status = datapath.datapath.status(home)?;
            let flows = match &status {
                Some(_) => datapath.datapath.flows(home)?.flows,
                None => Vec::new(),
            };
            Ok((status, flows))
        })
        .await?;
        let Some(dp) = status else {
            // Detached already (a restart after the teardown began).
            break Vec::new();
        };
        // The service's own tunnel: the node's other services' traffic is not its.
        let packets =
            dp.service_counter(Counter::TunnelOut) + dp.service_counter(Counter::TunnelIn);
        if last_packets != Some(packets) {
            last_packets = Some(packets);
            last_activity = Instant::now();
        }
        for f in flows.iter().filter(|f| f.is_tracked()) {
            if let Ok(key) = f.key() {
                let seen = bytes_seen.entry(key).or_insert(f.bytes());
                *seen = (*seen).max(f.bytes());
            }
        }
        let total: u64 = bytes_seen.values().sum();
        let base = *baseline.get_or_insert(total);
        let premove_bytes = total.saturating_sub(base);
        if m.snapshot().figures.premove_bytes != premove_bytes {
            m.update(|r| r.figures.premove_bytes = premove_bytes)?;
        }
        let dns_owed = m.snapshot().dns_owed.switch;
        let idle = last_activity.elapsed();
        if moving_home {
            m.nap(DRAIN_POLL).await;
            continue;
        }
        if (dp.live_premove_flows == 0 || rerouted) && idle >= rule.grace() && !dns_owed {
            let left = if rerouted {
                format!("{} open flows go direct now", dp.live_premove_flows)
            } else {
                "no live pre-move flow".to_owned()
            };
            m.note(format!(
                "drained: {left}, tunnel idle {:.1} s",
                idle.as_secs_f64()
            ))?;
            break Vec::new();
        }
        if elapsed() >= rule.max_drain() {
            let cut: Vec<FlowEntry> = flows
                .into_iter()
                .filter(|f| f.holds_drain() && f.is_tracked())
                .collect();
            m.note(format!(
                "max drain {:?} reached: {} live pre-move flows cut{}",
                rule.max_drain(),
                cut.len(),
                if dns_owed {
                    "; the DNS switch is still owed (run `migrate --resume`)"
                } else {
                    ""
                }
            ))?;
            break cut;
        }
        m.nap(DRAIN_POLL).await;
    };
    tear_down(agent, m, cut, elapsed()).await
}

/// The destination leaves the tunnel (`nat`, or detached), then A detaches.
async fn tear_down(
    agent: &Arc<Agent>,
    m: &Handle,
    cut: Vec<FlowEntry>,
    drained: Duration,
) -> Result<()> {
    let (to_b, from_b) = tunnel_counters(agent, m.snapshot().spec.home);
    m.update(|r| {
        r.figures.flows_cut = cut;
        r.figures.drain_ms = Some(drained.as_millis() as u64);
        if to_b + from_b > 0 {
            r.figures.packets_to_b = to_b;
            r.figures.packets_from_b = from_b;
        }
    })?;
    let record = m.snapshot();
    let peer = m.peer()?;
    match retry_unreachable(record.spec.agent_timeout(), || peer.end_tunnel(record.id())).await {
        Ok(there) if there.stage == Stage::Done => {}
        Ok(there) => bail!("the destination is {} after the tunnel ended", there.stage),
        // The destination forgot the migration: nothing of it is left to end there.
        Err(err) if is_not_found(&err) => {}
        Err(err) => return Err(err.into()),
    }
    let datapath = agent.clone();
    let home = Some(record.spec.home);
    blocking(move || datapath.datapath.detach(home)).await?;
    m.update(|r| {
        r.figures.teardown_unix_ms = Some(unix_ms());
        r.dns_owed.restore_ttl = r.spec.dns.is_some();
        let b = if r.spec.moves_home() {
            "destination tracking its own traffic again (home)"
        } else if r.spec.new_addr.is_some() {
            "destination in nat"
        } else {
            "destination detached"
        };
        r.enter(Stage::Done);
        r.note(format!("source detached; {b}"));
    })
}

/// A's counters for the report, read just before the teardown.
fn tunnel_counters(agent: &Agent, home: IpAddr) -> (u64, u64) {
    match agent.datapath.status(Some(home)) {
        Ok(Some(dp)) => (
            dp.service_counter(Counter::TunnelOut),
            dp.service_counter(Counter::TunnelIn),
        ),
        _ => (0, 0),
    }
}
