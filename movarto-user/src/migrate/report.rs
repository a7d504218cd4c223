//! The migration report: the step timeline (like the GMPLS system's table) and the figures.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use super::progress::Step;
use crate::{
    agent::{api::FlowEntry, blackout::StrandedFrames},
    qemu::migrate::MigrationReport,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Ok,
    Skipped,
    Failed,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StepRecord {
    pub step: Step,
    pub number: u8,
    pub name: String,
    /// Milliseconds since the migration started.
    pub start_ms: u64,
    pub end_ms: u64,
    pub outcome: Outcome,
    pub detail: String,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct TunnelFigures {
    /// Packets site A encapsulated toward B, and decapsulated from B.
    pub packets_to_b: u64,
    pub packets_from_b: u64,
    /// Payload bytes of pre-move flows carried after switchover (from A's flow map).
    pub premove_bytes: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Report {
    pub vm: String,
    pub address_mode: String,
    pub succeeded: bool,
    pub error: Option<String>,
    /// When the run failed before switchover: what was undone.
    pub rolled_back: Option<String>,
    pub total_ms: u64,
    pub steps: Vec<StepRecord>,
    pub qemu: Option<MigrationReport>,
    /// From the switchover to the authoritative answer showing `N`.
    pub dns_switch_ms: Option<u64>,
    /// From the source's stop at `pre-switchover` to the flip done, in µs.
    #[serde(default)]
    pub flip_us: Option<u64>,
    /// From the same stop to `migrate-continue` (after `continued` is saved), in µs.
    #[serde(default)]
    pub continue_us: Option<u64>,
    /// The VM's pause as its clients see it: from QEMU's `STOP` at the source to its
    /// `RESUME` at the destination (their hosts' clocks apart). QEMU's own downtime ends
    /// when the source has sent the last byte, before it has crossed the WAN.
    #[serde(default)]
    pub vm_paused_ms: Option<f64>,
    pub flows_at_switchover: usize,
    pub flows_drained: usize,
    /// Flows still live when `--max-drain` forced the teardown.
    pub flows_cut: Vec<FlowEntry>,
    pub tunnel: TunnelFigures,
    pub drain_ms: Option<u64>,
    /// From the switchover to the teardown.
    pub teardown_after_switchover_ms: Option<u64>,
    /// Packets for `H` lost at switchover: left in the source's tap and not carried on,
    /// plus those the destination's tap dropped before the VM ran.
    #[serde(default)]
    pub lost_at_switchover: Option<u64>,
    /// The frames QEMU left unread in the source's tap when the VM stopped there.
    #[serde(default)]
    pub stranded_at_source: Option<StrandedFrames>,
    /// Frames the destination's tap dropped (its queue full) before the VM ran.
    #[serde(default)]
    pub dropped_at_destination_tap: Option<u64>,
}

/// A duration in ms for people: `850 ms`, `12.3 s`.
pub(super) fn ms(v: u64) -> String {
    if v >= 10_000 {
        format!("{:.1} s", v as f64 / 1000.0)
    } else {
        format!("{v} ms")
    }
}

impl Report {
    pub fn render(&self) -> String {
        let mut out = String::new();
        let verdict = if self.succeeded {
            "completed"
        } else {
            "FAILED"
        };
        let _ = writeln!(
            out,
            "movarto: migration of {} ({} mode) {verdict} in {}",
            self.vm,
            self.address_mode,
            ms(self.total_ms)
        );
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "{:>3}  {:<22} {:>10} {:>10} {:>10}  {:<8} detail",
            "#", "step", "start", "end", "took", "outcome"
        );
        for s in &self.steps {
            let outcome = match s.outcome {
                Outcome::Ok => "ok",
                Outcome::Skipped => "skipped",
                Outcome::Failed => "FAILED",
            };
            let _ = writeln!(
                out,
                "{:>3}  {:<22} {:>10} {:>10} {:>10}  {:<8} {}",
                s.number,
                s.name,
                ms(s.start_ms),
                ms(s.end_ms),
                ms(s.end_ms.saturating_sub(s.start_ms)),
                outcome,
                s.detail
            );
        }
        let _ = writeln!(out);
        if let Some(q) = &self.qemu {
            let _ = writeln!(
                out,
                "QEMU:     total {}, downtime {} ms, {} bytes in {} passes{}",
                ms(q.total_time_ms),
                q.downtime_ms,
                q.transferred,
                q.passes,
                q.postcopy_started_ms
                    .map(|at| format!(", post-copy after {}", ms(at)))
                    .unwrap_or_default()
            );
            if q.postcopy_recoveries > 0 {
                let _ = writeln!(
                    out,
                    "          post-copy's stream broke {} time(s) and resumed: paused {} in all",
                    q.postcopy_recoveries,
                    ms(q.postcopy_paused_ms)
                );
            }
        }
        if let Some(us) = self.flip_us {
            let _ = writeln!(
                out,
                "flip:     forwarding {:.1} ms after the source stopped; migrate-continue {}",
                us as f64 / 1000.0,
                self.continue_us.map_or_else(
                    || "-".to_owned(),
                    |c| format!("{:.1} ms (the record saved)", c as f64 / 1000.0)
                )
            );
        }
        if let Some(paused) = self.vm_paused_ms {
            let _ = writeln!(
                out,
                "pause:    the VM stopped at the source and ran at the destination {paused:.1} ms \
                 later"
            );
        }
        if let Some(dns) = self.dns_switch_ms {
            let _ = writeln!(
                out,
                "DNS:      authoritative answer changed {} after switchover",
                ms(dns)
            );
        }
        if let Some(lost) = self.lost_at_switchover {
            let stranded = self.stranded_at_source.unwrap_or_default();
            let held = match (stranded.held_by_qemu, stranded.held_carried) {
                (0, _) => "",
                (_, true) => "; the one QEMU held went on from the tap's recording",
                (_, false) => "; the one QEMU held is lost",
            };
            let again = if stranded.sent_again > 0 {
                "; 1 sent again that QEMU may have discarded at the stop (the VM may get it twice)"
            } else {
                ""
            };
            let _ = writeln!(
                out,
                "lost:     {lost} packets at switchover ({} for the VM left unread in the \
                 source's tap, {} of them carried on to the destination{held}{again}; {} \
                 dropped at the destination's tap)",
                stranded.forwarded + stranded.lost,
                stranded.forwarded,
                self.dropped_at_destination_tap.unwrap_or_default()
            );
        }
        let _ = writeln!(
            out,
            "flows:    {} pre-move at switchover, {} drained, {} cut",
            self.flows_at_switchover,
            self.flows_drained,
            self.flows_cut.len()
        );
        let _ = writeln!(
            out,
            "tunnel:   {} packets A→B, {} packets B→A, {} bytes of pre-move flows",
            self.tunnel.packets_to_b, self.tunnel.packets_from_b, self.tunnel.premove_bytes
        );
        if let Some(t) = self.teardown_after_switchover_ms {
            let _ = writeln!(out, "teardown: {} after switchover", ms(t));
        }
        for flow in &self.flows_cut {
            let _ = writeln!(
                out,
                "cut:      {}",
                serde_json::to_string(flow).unwrap_or_default()
            );
        }
        if let Some(rolled_back) = &self.rolled_back {
            let _ = writeln!(out, "rollback: {rolled_back}");
        }
        if let Some(error) = &self.error {
            let _ = writeln!(out, "error:    {error}");
        }
        out
    }
}
