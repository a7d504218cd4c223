//! The demo's report: a row per connection, the newcomers by where they landed, the
//! migration's events on the demo's clock; as text ([`Report::render`]) or JSON (serde).

use std::{fmt::Write as _, net::IpAddr, path::PathBuf, sync::atomic::Ordering};

use movarto_user::migrate::report::{Outcome, Report as MigrationReport};
use serde::Serialize;

use crate::{
    delay::{Counters, Profile},
    workload::{CurlCheck, Newcomer, Sample, Tracked},
};

#[derive(Clone, Debug, Serialize)]
pub struct ConnectionRow {
    pub name: String,
    pub kind: String,
    pub target: String,
    pub kept: bool,
    pub bytes: u64,
    /// Bytes it moved after the switchover (through the tunnel, at B).
    pub bytes_after_switchover: u64,
    pub worst_stall_ms: u64,
    /// The worst stall before the move started: what the connection sees anyway (curl's
    /// --limit-rate, for one, reads in bursts with pauses between them).
    pub worst_stall_before_move_ms: u64,
    pub error: Option<String>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct NewcomerSummary {
    pub total: usize,
    /// Answered at A while the VM still ran there (resolved to H before the switchover).
    pub at_a: usize,
    /// Resolved to H after the switchover: A forwarded them through the tunnel to B.
    pub via_tunnel: usize,
    /// Resolved to N: straight to B.
    pub at_b: usize,
    pub failed: usize,
    /// A client with a stale DNS answer, connecting to H after the switchover: A forwards it.
    pub stale_dns_via_tunnel: usize,
    /// Those that asked DNS after the DNS switch, and how many of them landed at B.
    pub after_dns_switch: usize,
    pub after_dns_switch_at_b: usize,
    pub list: Vec<Newcomer>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Event {
    pub name: String,
    /// Seconds since the demo's clock started (the workload's start).
    pub at_s: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub connections_total: usize,
    pub connections_lost: usize,
    /// The longest gap the stream, the upload and the interactive connection saw (curl is
    /// left out: its --limit-rate pauses on its own; its stall is in `connections`).
    pub worst_stall_ms: u64,
    pub qemu_downtime_ms: Option<u64>,
    /// `worst_stall_ms` less QEMU's downtime: what the blackout cost beyond itself (a
    /// retransmission timeout shows here; the goal is about one round trip).
    pub stall_beyond_downtime_ms: Option<i64>,
    /// The VM's pause as its clients see it, from its stop at A to its run at B (the
    /// migration report's `vm_paused_ms`).
    pub vm_paused_ms: Option<f64>,
    /// `worst_stall_ms` less that pause: what the move cost beyond the VM's own pause.
    pub stall_beyond_pause_ms: Option<i64>,
    /// From the source's stop to the flip done, and to `migrate-continue`, in µs.
    pub flip_us: Option<u64>,
    pub continue_us: Option<u64>,
    /// Packets for `H` lost at switchover, as the migration's report counts them.
    pub lost_at_switchover: Option<u64>,
    pub dns_switch_ms: Option<u64>,
    /// Seconds from the switchover to the teardown.
    pub teardown_s: Option<f64>,
    pub migration_succeeded: bool,
    pub teardown_done: bool,
    pub destination_mode: Option<String>,
    pub network: Profile,
    pub connections: Vec<ConnectionRow>,
    pub newcomers: NewcomerSummary,
    pub curl: Option<CurlCheck>,
    pub events: Vec<Event>,
    pub delay_line: DelayFigures,
    /// `movarto-user migrate --json`, as it printed it.
    pub migration: serde_json::Value,
    /// Its progress lines (stderr), as they came.
    pub migrate_progress: Vec<String>,
    pub svg: Option<PathBuf>,
    pub namespaces: Vec<String>,
    pub namespaces_removed: bool,
    /// No datapath of this run is pinned on bpffs any more.
    pub pins_removed: bool,
    pub wall_s: f64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct DelayFigures {
    pub packets: u64,
    pub bytes: u64,
    pub dropped: u64,
}

impl DelayFigures {
    pub fn of(counters: &Counters) -> Self {
        Self {
            packets: counters.packets.load(Ordering::Relaxed),
            bytes: counters.bytes.load(Ordering::Relaxed),
            dropped: counters.dropped.load(Ordering::Relaxed),
        }
    }
}

/// The migration's steps on the demo's clock: seconds since the workload started.
#[derive(Clone, Copy, Debug, Default)]
pub struct Timeline {
    pub switchover_at: Option<f64>,
    pub dns_at: Option<f64>,
    pub teardown_at: Option<f64>,
}

impl Timeline {
    /// From migrate's report, whose times count from `migrate_at`.
    pub fn of(parsed: &MigrationReport, migrate_at: f64) -> Self {
        let step_end = |n: u8| {
            parsed
                .steps
                .iter()
                .find(|s| s.number == n && s.outcome == Outcome::Ok)
                .map(|s| migrate_at + s.end_ms as f64 / 1000.0)
        };
        let switchover_at = step_end(5);
        let dns_at = match (switchover_at, parsed.dns_switch_ms) {
            (Some(s), Some(d)) => Some(s + d as f64 / 1000.0),
            _ => step_end(7),
        };
        Self {
            switchover_at,
            dns_at,
            teardown_at: step_end(10),
        }
    }

    /// The events for the report and the picture, starting with migrate's start.
    pub fn events(&self, migrate_at: f64) -> Vec<Event> {
        let mut events = vec![Event {
            name: "migrate started".into(),
            at_s: migrate_at,
        }];
        for (name, at) in [
            ("switchover", self.switchover_at),
            ("DNS switch", self.dns_at),
            ("teardown", self.teardown_at),
        ] {
            if let Some(at_s) = at {
                events.push(Event {
                    name: name.into(),
                    at_s,
                });
            }
        }
        events
    }
}

/// A row per tracked connection. `stalls_before`: each one's worst stall when the move began.
pub fn connection_rows(
    tracked: &[std::sync::Arc<Tracked>],
    samples: &[Sample],
    switchover_at: Option<f64>,
    stalls_before: &[u64],
) -> Vec<ConnectionRow> {
    tracked
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let error = t.error();
            let bytes = t.bytes.load(Ordering::Relaxed);
            let before = switchover_at.map_or(bytes, |s| {
                samples
                    .iter()
                    .take_while(|x| x.at_s <= s)
                    .last()
                    .and_then(|x| x.bytes.get(i).copied())
                    .unwrap_or(0)
            });
            ConnectionRow {
                name: t.name.clone(),
                kind: t.kind.to_owned(),
                target: t.target.clone(),
                kept: error.is_none(),
                bytes,
                bytes_after_switchover: bytes.saturating_sub(before),
                worst_stall_ms: t.worst_stall_ms.load(Ordering::Relaxed),
                worst_stall_before_move_ms: stalls_before.get(i).copied().unwrap_or(0),
                error,
            }
        })
        .collect()
}

/// The longest stall of the stream, the upload and the interactive connection.
pub fn worst_stall_ms(connections: &[ConnectionRow]) -> u64 {
    connections
        .iter()
        .filter(|c| c.kind != "idle" && c.kind != "curl")
        .map(|c| c.worst_stall_ms)
        .max()
        .unwrap_or(0)
}

impl NewcomerSummary {
    /// Counts where each newcomer landed: `home` is H, `new_addr` N.
    pub fn of(mut list: Vec<Newcomer>, home: IpAddr, new_addr: IpAddr, timeline: Timeline) -> Self {
        list.sort_by(|a, b| a.at_s.total_cmp(&b.at_s));
        let mut newcomers = Self::default();
        for n in &list {
            newcomers.total += 1;
            if !n.ok {
                newcomers.failed += 1;
            }
            if !n.by_name {
                newcomers.stale_dns_via_tunnel += n.ok as usize;
                continue;
            }
            let after_dns = timeline.dns_at.is_some_and(|d| n.at_s > d);
            if after_dns {
                newcomers.after_dns_switch += 1;
            }
            match n.resolved {
                Some(a) if a == new_addr => {
                    newcomers.at_b += n.ok as usize;
                    if after_dns && n.ok {
                        newcomers.after_dns_switch_at_b += 1;
                    }
                }
                Some(a) if a == home && timeline.switchover_at.is_some_and(|s| n.at_s >= s) => {
                    newcomers.via_tunnel += n.ok as usize
                }
                Some(_) => newcomers.at_a += n.ok as usize,
                None => {}
            }
        }
        newcomers.list = list;
        newcomers
    }
}

pub fn human_bytes(n: u64) -> String {
    if n >= 10 << 20 {
        format!("{:.0} MiB", n as f64 / (1 << 20) as f64)
    } else if n >= 1 << 20 {
        format!("{:.1} MiB", n as f64 / (1 << 20) as f64)
    } else if n >= 1 << 10 {
        format!("{:.0} KiB", n as f64 / 1024.0)
    } else {
        format!("{n} B")
    }
}

impl Report {
    /// The text report.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let p = &self.network;
        let _ = writeln!(
            out,
            "movarto demo: the VM moved from site A to site B ({} ms RTT between the sites{}; client link +{} ms RTT{})",
            p.site_rtt_ms,
            p.site_rate_mbit
                .map(|r| format!(", {r} Mbit/s"))
                .unwrap_or_default(),
            p.client_rtt_ms,
            p.client_rate_mbit
                .map(|r| format!(", {r} Mbit/s"))
                .unwrap_or_default(),
        );
        let _ = writeln!(out);
        let _ = writeln!(
            out,
            "{:<20} {:<12} {:<24} {:<6} {:>10} {:>16} {:>12} {:>15} {:>12}",
            "connection",
            "kind",
            "to",
            "result",
            "bytes",
            "after switchover",
            "worst stall",
            "beyond downtime",
            "before move"
        );
        for c in &self.connections {
            let _ = writeln!(
                out,
                "{:<20} {:<12} {:<24} {:<6} {:>10} {:>16} {:>9} ms {:>15} {:>9} ms{}",
                c.name,
                c.kind,
                truncate(&c.target, 24),
                if c.kept { "kept" } else { "LOST" },
                human_bytes(c.bytes),
                human_bytes(c.bytes_after_switchover),
                c.worst_stall_ms,
                self.qemu_downtime_ms.map_or_else(
                    || "-".to_owned(),
                    |d| format!("{} ms", c.worst_stall_ms as i64 - d as i64)
                ),
                c.worst_stall_before_move_ms,
                c.error
                    .as_ref()
                    .map(|e| format!("  ({e})"))
                    .unwrap_or_default()
            );
        }
        let n = &self.newcomers;
        let _ = writeln!(
            out,
            "\nnew connections by name ({}, each asks BIND9, connects, GETs /id): {} total: {} at A directly, {} to H after the switchover (A → tunnel → B), {} at B via N; {} failed",
            crate::workload::SERVICE_NAME,
            n.total - n.stale_dns_via_tunnel,
            n.at_a,
            n.via_tunnel,
            n.at_b,
            n.failed
        );
        let _ = writeln!(
            out,
            "  a client with a stale DNS answer (H) after the switchover: {}",
            if n.stale_dns_via_tunnel > 0 {
                "answered by the VM at B, through A and the tunnel"
            } else {
                "FAILED"
            }
        );
        let _ = writeln!(
            out,
            "  after the DNS switch: {} of {} landed at B",
            n.after_dns_switch_at_b, n.after_dns_switch
        );
        for f in n.list.iter().filter(|n| !n.ok) {
            let _ = writeln!(
                out,
                "  failed at {:.1}s: {}",
                f.at_s,
                f.error.as_deref().unwrap_or("?")
            );
        }
        if let Some(c) = &self.curl {
            let _ = writeln!(
                out,
                "curl download: {} of {} bytes, SHA-256 {} ({})",
                c.bytes,
                c.expected_bytes,
                c.sha256,
                if c.matches { "matches" } else { "MISMATCH" }
            );
        }
        let _ = writeln!(out, "\nmigration timeline (movarto-user migrate --json):");
        match serde_json::from_value::<MigrationReport>(self.migration.clone()) {
            Ok(r) => {
                for line in r.render().lines() {
                    let _ = writeln!(out, "  {line}");
                }
            }
            Err(err) => {
                let _ = writeln!(out, "  (unreadable: {err})");
            }
        }
        let _ = writeln!(out, "events (seconds since the workload started):");
        for e in &self.events {
            let _ = writeln!(out, "  {:>7.2}s  {}", e.at_s, e.name);
        }
        let _ = writeln!(
            out,
            "\nsummary: {} connections, {} lost; worst stall {} ms (stream, upload, interactive); QEMU downtime {}; worst stall − downtime {}; VM paused {}, worst stall − pause {}; stop → flip {}, → migrate-continue {}; lost at switchover {}; DNS switch {}; teardown {} after switchover{}; destination datapath {}",
            self.connections_total,
            self.connections_lost,
            self.worst_stall_ms,
            opt_ms(self.qemu_downtime_ms),
            self.stall_beyond_downtime_ms
                .map_or_else(|| "-".into(), |ms| format!("{ms} ms")),
            self.vm_paused_ms
                .map_or_else(|| "-".into(), |ms| format!("{ms:.0} ms")),
            self.stall_beyond_pause_ms
                .map_or_else(|| "-".into(), |ms| format!("{ms} ms")),
            self.flip_us
                .map_or_else(|| "-".into(), |us| format!("{:.1} ms", us as f64 / 1000.0)),
            self.continue_us
                .map_or_else(|| "-".into(), |us| format!("{:.1} ms", us as f64 / 1000.0)),
            self.lost_at_switchover
                .map_or_else(|| "-".into(), |n| format!("{n} packets")),
            opt_ms(self.dns_switch_ms),
            self.teardown_s
                .map(|s| format!("{s:.1} s"))
                .unwrap_or_else(|| "-".into()),
            if self.teardown_done {
                ""
            } else {
                " (NOT torn down)"
            },
            self.destination_mode.as_deref().unwrap_or("-"),
        );
        let _ = writeln!(
            out,
            "wan delay line: {} packets, {}, {} dropped at full queues",
            self.delay_line.packets,
            human_bytes(self.delay_line.bytes),
            self.delay_line.dropped
        );
        if let Some(svg) = &self.svg {
            let _ = writeln!(out, "picture: {}", svg.display());
        }
        let _ = writeln!(
            out,
            "cleanup: {} namespaces {}; wall time {:.1} s",
            self.namespaces.len(),
            if self.namespaces_removed {
                "removed"
            } else {
                "STILL PRESENT"
            },
            self.wall_s
        );
        out
    }
}

fn opt_ms(v: Option<u64>) -> String {
    v.map(|v| format!("{v} ms")).unwrap_or_else(|| "-".into())
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_owned()
    } else {
        let mut t: String = s.chars().take(n - 1).collect();
        t.push('…');
        t
    }
}
