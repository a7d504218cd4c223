//! The drain (step 9): watching A until the pre-move flows are gone.

use std::{collections::HashMap, time::Duration};

use anyhow::{Context as _, Result, bail};
use movarto_common::{counters::Counter, flow::FlowKey};
use tokio::time::Instant;

use super::{interrupt::Interrupt, plan::Plan, timeline::Say};
use crate::agent::{
    AgentError,
    api::{DatapathStatus, FlowEntry},
};

/// How often the drain polls the source.
const DRAIN_POLL: Duration = Duration::from_millis(500);
/// How often the drain says where it is.
const DRAIN_NOTE: Duration = Duration::from_secs(2);

/// What the drain leaves: the flows `--max-drain` cut and the bytes the pre-move flows
/// carried after switchover.
#[derive(Default)]
pub(super) struct Drained {
    pub(super) cut: Vec<FlowEntry>,
    pub(super) premove_bytes: u64,
}

/// Watches A until no live pre-move flow is left and nothing has reached `H` for
/// `grace`, or `max_drain` passes. `rerouted` (move address mode): open flows go the
/// direct way, so the tunnel is done once nothing reaches A any more.
pub(super) async fn drain(
    p: &Plan,
    say: Say,
    switchover_flows: &[FlowEntry],
    grace: Duration,
    rerouted: bool,
    interrupt: &Interrupt,
) -> Result<(Option<Drained>, String)> {
    let started = Instant::now();
    let mut last_activity = Instant::now();
    let mut last_packets = None;
    let mut bytes_seen: HashMap<FlowKey, u64> = switchover_flows
        .iter()
        .filter_map(|f| Some((f.key().ok()?, f.bytes())))
        .collect();
    let baseline: u64 = bytes_seen.values().sum();
    let mut unreachable_since: Option<Instant> = None;
    let mut last_said = Instant::now();
    let mut told_interrupted = false;
    loop {
        // The VM runs at the destination: a first signal only says so, a second one
        // leaves the drain (and the teardown) to the operator.
        match interrupt.count() {
            0 => {}
            1 if !told_interrupted => {
                told_interrupted = true;
                say.line(
                    "interrupted: the VM already runs at the destination, so nothing is rolled \
                     back; draining and tearing down as planned (interrupt again to leave \
                     them to you)",
                );
            }
            1 => {}
            _ => interrupt.check()?,
        }
        let Some(dp) = source_datapath(p, say, &mut unreachable_since).await? else {
            if started.elapsed() >= p.max_drain {
                bail!("the source's agent stayed unreachable through --max-drain");
            }
            tokio::time::sleep(DRAIN_POLL).await;
            continue;
        };
        let packets = dp.counter(Counter::TunnelOut) + dp.counter(Counter::TunnelIn);
        if last_packets != Some(packets) {
            last_packets = Some(packets);
            last_activity = Instant::now();
        }
        let flows = p.source.flows().await?.flows;
        for f in &flows {
            if let Some(seen) = f.key().ok().and_then(|key| bytes_seen.get_mut(&key)) {
                *seen = (*seen).max(f.bytes());
            }
        }
        let idle = last_activity.elapsed();
        if last_said.elapsed() >= DRAIN_NOTE {
            last_said = Instant::now();
            say.line(&format!(
                "  drain: {} live pre-move flows, {} tunnel packets, idle {:.1} s of {:.0} s",
                dp.live_premove_flows,
                packets,
                idle.as_secs_f64(),
                grace.as_secs_f64()
            ));
        }
        let premove_bytes = bytes_seen.values().sum::<u64>() - baseline;
        if (dp.live_premove_flows == 0 || rerouted) && idle >= grace {
            let left = if rerouted {
                format!("{} open flows go direct now", dp.live_premove_flows)
            } else {
                "no live pre-move flow".to_owned()
            };
            return Ok((
                Some(Drained {
                    cut: Vec::new(),
                    premove_bytes,
                }),
                format!(
                    "drained: {left}, tunnel idle {:.1} s; {premove_bytes} bytes of pre-move \
                     flows after switchover",
                    idle.as_secs_f64()
                ),
            ));
        }
        if started.elapsed() >= p.max_drain {
            let cut: Vec<FlowEntry> = flows
                .into_iter()
                .filter(|f| f.holds_drain() && f.is_tracked())
                .collect();
            let detail = format!(
                "--max-drain {:?} reached: {} live pre-move flows cut",
                p.max_drain,
                cut.len()
            );
            return Ok((Some(Drained { cut, premove_bytes }), detail));
        }
        tokio::time::sleep(DRAIN_POLL).await;
    }
}

/// The source's datapath; `None` while its agent is unreachable (restarting: the pinned
/// datapath keeps forwarding meanwhile).
async fn source_datapath(
    p: &Plan,
    say: Say,
    unreachable_since: &mut Option<Instant>,
) -> Result<Option<DatapathStatus>> {
    match p.source.status().await {
        Ok(status) => {
            if let Some(since) = unreachable_since.take() {
                say.line(&format!(
                    "  the source's agent is back after {:.1} s",
                    since.elapsed().as_secs_f64()
                ));
            }
            status
                .datapath
                .context("the source's datapath disappeared during the drain")
                .map(Some)
        }
        Err(AgentError::Unreachable { reason, .. }) => {
            if unreachable_since.is_none() {
                say.line(&format!(
                    "  the source's agent is unreachable ({reason}); retrying"
                ));
                *unreachable_since = Some(Instant::now());
            }
            Ok(None)
        }
        Err(err) => Err(err.into()),
    }
}
