//! `GET /metrics`: the agent's state in the OpenMetrics text format, for Prometheus
//! (the Prometheus project's `prometheus-client`). Each scrape reads what the status
//! endpoint reads (the pinned datapath's counters and flows, the migrations' records)
//! into a registry of its own, so the figures are never a copy that could drift.
//! docs/operations.md lists the names.

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::{Registry, Unit},
};

use movarto_common::counters::Counter as DatapathCounter;

use super::api::{DatapathStatus, MigrationRecord};

/// What Prometheus is told the body is.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// One service on one uplink (today: the uplink's only service, named by `H`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Service {
    uplink: String,
    service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Tunnel {
    uplink: String,
    service: String,
    /// `out` (encapsulated and sent to the peer) or `in` (decapsulated from it).
    direction: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Mode {
    uplink: String,
    service: String,
    mode: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Migration {
    migration: String,
    vm: String,
    /// `source` or `destination`: which half this agent holds.
    role: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MigrationStage {
    migration: String,
    vm: String,
    role: String,
    stage: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MigrationTunnel {
    migration: String,
    vm: String,
    role: String,
    direction: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Site {
    site: String,
    version: String,
}

/// Floating-point gauges (seconds, ratios, rates).
type FloatGauge = Gauge<f64, std::sync::atomic::AtomicU64>;

/// What one scrape shows.
pub struct Scrape<'a> {
    pub site: &'a str,
    pub uplink: &'a str,
    /// `None` when no datapath is attached.
    pub datapath: Option<&'a DatapathStatus>,
    pub migrations: &'a [MigrationRecord],
}

/// Registers a family under `name` and returns it to be filled.
fn family<L, M>(registry: &mut Registry, name: &str, help: &str, unit: Option<Unit>) -> Family<L, M>
where
    L: EncodeLabelSet + Clone + std::hash::Hash + Eq + std::fmt::Debug + Send + Sync + 'static,
    M: prometheus_client::registry::Metric + Default + prometheus_client::metrics::TypedMetric,
    Family<L, M>: prometheus_client::registry::Metric,
{
    let family = Family::<L, M>::default();
    match unit {
        Some(unit) => registry.register_with_unit(name, help, unit, family.clone()),
        None => registry.register(name, help, family.clone()),
    }
    family
}

/// The scrape's body.
pub fn render(scrape: &Scrape<'_>) -> Result<String, std::fmt::Error> {
    let mut registry = Registry::with_prefix("movarto");
    site_metrics(&mut registry, scrape);
    datapath_metrics(&mut registry, scrape);
    migration_metrics(&mut registry, scrape.migrations);
    let mut body = String::new();
    encode(&mut body, &registry)?;
    Ok(body)
}

fn site_metrics(registry: &mut Registry, scrape: &Scrape<'_>) {
    let info: Family<Site, Gauge> = family(registry, "agent", "This agent: 1", None);
    info.get_or_create(&Site {
        site: scrape.site.to_owned(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
    })
    .set(1);
    let attached: Family<Service, Gauge> = family(
        registry,
        "datapath_attached",
        "1 when the uplink's datapath is attached (pinned), else 0",
        None,
    );
    attached
        .get_or_create(&Service {
            uplink: scrape.uplink.to_owned(),
            service: service(scrape.datapath),
        })
        .set(i64::from(scrape.datapath.is_some()));
}

/// The service label: `H`, or empty when nothing is attached.
fn service(datapath: Option<&DatapathStatus>) -> String {
    datapath
        .and_then(|dp| dp.home_addr)
        .map(|h| h.to_string())
        .unwrap_or_default()
}

fn datapath_metrics(registry: &mut Registry, scrape: &Scrape<'_>) {
    let labels = Service {
        uplink: scrape.uplink.to_owned(),
        service: service(scrape.datapath),
    };
    // Registered even when detached; a family without series is left out of the scrape.
    let counters: Vec<(DatapathCounter, Family<Service, Counter>)> = DatapathCounter::ALL
        .into_iter()
        .map(|c| {
            let help = format!(
                "The datapath's `{}` counter, summed over the CPUs ({})",
                c.name(),
                if c.is_drop() {
                    "a drop reason"
                } else {
                    "see docs/operations.md"
                }
            );
            (
                c,
                family(registry, &format!("datapath_{}", c.name()), &help, None),
            )
        })
        .collect();
    let flows: Family<Service, Gauge> = family(registry, "flows", "Entries in the flow map", None);
    let live: Family<Service, Gauge> = family(
        registry,
        "live_premove_flows",
        "Pre-move flows that still hold the drain (neither closing nor expired)",
        None,
    );
    let swept: Family<Service, Counter> = family(
        registry,
        "flows_swept",
        "Expired flows this agent's sweeper removed since it started",
        None,
    );
    let idle: Family<Service, FloatGauge> = family(
        registry,
        "flows_idle",
        "Time since the newest packet of any flow",
        Some(Unit::Seconds),
    );
    let tunnel: Family<Tunnel, Counter> = family(
        registry,
        "tunnel_packets",
        "Packets through the GUE tunnel: out (encapsulated to the peer), in (decapsulated)",
        None,
    );
    let mode: Family<Mode, Gauge> = family(
        registry,
        "datapath_mode",
        "1 for the service's current mode",
        None,
    );
    let Some(dp) = scrape.datapath else {
        return;
    };
    for (counter, family) in &counters {
        family.get_or_create(&labels).inc_by(dp.counter(*counter));
    }
    flows.get_or_create(&labels).set(dp.flows as i64);
    live.get_or_create(&labels)
        .set(dp.live_premove_flows as i64);
    swept.get_or_create(&labels).inc_by(dp.swept);
    if let Some(ms) = dp.idle_ms {
        idle.get_or_create(&labels).set(ms as f64 / 1e3);
    }
    for (direction, counter) in [
        ("out", DatapathCounter::TunnelOut),
        ("in", DatapathCounter::TunnelIn),
    ] {
        tunnel
            .get_or_create(&Tunnel {
                uplink: labels.uplink.clone(),
                service: labels.service.clone(),
                direction: direction.to_owned(),
            })
            .inc_by(dp.counter(counter));
    }
    mode.get_or_create(&Mode {
        uplink: labels.uplink.clone(),
        service: labels.service.clone(),
        mode: dp.mode.to_string(),
    })
    .set(1);
}

fn migration_metrics(registry: &mut Registry, migrations: &[MigrationRecord]) {
    let stage: Family<MigrationStage, Gauge> = family(
        registry,
        "migration_stage",
        "1 for the stage the migration is in (agent/migrations/record.rs lists them)",
        None,
    );
    let progress: Family<Migration, FloatGauge> = family(
        registry,
        "migration_progress_ratio",
        "The RAM copy's progress, 0 to 1 (1 once QEMU completed)",
        None,
    );
    let transferred: Family<Migration, Gauge> = family(
        registry,
        "migration_ram_transferred",
        "RAM QEMU has sent so far",
        Some(Unit::Bytes),
    );
    let remaining: Family<Migration, Gauge> = family(
        registry,
        "migration_ram_remaining",
        "RAM QEMU has still to send (dirty pages included)",
        Some(Unit::Bytes),
    );
    let total: Family<Migration, Gauge> = family(
        registry,
        "migration_ram_total",
        "The VM's RAM",
        Some(Unit::Bytes),
    );
    let bandwidth: Family<Migration, FloatGauge> = family(
        registry,
        "migration_bandwidth_bytes_per_second",
        "QEMU's current migration throughput",
        None,
    );
    let passes: Family<Migration, Gauge> = family(
        registry,
        "migration_ram_passes",
        "Completed passes over the VM's RAM (QEMU's dirty-sync-count)",
        None,
    );
    let downtime: Family<Migration, FloatGauge> = family(
        registry,
        "migration_downtime",
        "QEMU's downtime (the blackout), once the migration completed",
        Some(Unit::Seconds),
    );
    let flows: Family<Migration, Gauge> = family(
        registry,
        "migration_flows_at_switchover",
        "Live pre-move flows at the switchover",
        None,
    );
    let tunnel_bytes: Family<Migration, Gauge> = family(
        registry,
        "migration_tunnel_premove",
        "Bytes the pre-move flows carried through the tunnel during the drain (source)",
        Some(Unit::Bytes),
    );
    let tunnel_packets: Family<MigrationTunnel, Gauge> = family(
        registry,
        "migration_tunnel_packets",
        "Packets through the tunnel over the whole drain, read at the teardown (source)",
        None,
    );
    for record in migrations {
        let labels = Migration {
            migration: record.id().to_string(),
            vm: record.spec.vm.clone(),
            role: role(record).to_owned(),
        };
        stage
            .get_or_create(&MigrationStage {
                migration: labels.migration.clone(),
                vm: labels.vm.clone(),
                role: labels.role.clone(),
                stage: record.stage.name().to_owned(),
            })
            .set(1);
        let report = record.figures.qemu.as_ref();
        if let Some(p) = &record.progress {
            transferred.get_or_create(&labels).set(p.transferred as i64);
            remaining.get_or_create(&labels).set(p.remaining as i64);
            total.get_or_create(&labels).set(p.total as i64);
            bandwidth.get_or_create(&labels).set(p.bytes_per_second());
            passes.get_or_create(&labels).set(p.passes as i64);
        }
        let ratio = match (&record.progress, report) {
            (_, Some(r)) if r.status == "completed" => Some(1.0),
            (Some(p), _) => p.done_ratio(),
            _ => None,
        };
        if let Some(ratio) = ratio {
            progress.get_or_create(&labels).set(ratio);
        }
        if let Some(r) = report {
            downtime
                .get_or_create(&labels)
                .set(r.downtime_ms as f64 / 1e3);
            if record.progress.is_none() {
                transferred.get_or_create(&labels).set(r.transferred as i64);
            }
        }
        if record.stage.past_switchover() {
            flows
                .get_or_create(&labels)
                .set(record.figures.flows_at_switchover as i64);
        }
        if record.figures.premove_bytes > 0 {
            tunnel_bytes
                .get_or_create(&labels)
                .set(record.figures.premove_bytes as i64);
        }
        if record.figures.teardown_unix_ms.is_some() {
            for (direction, packets) in [
                ("out", record.figures.packets_to_b),
                ("in", record.figures.packets_from_b),
            ] {
                tunnel_packets
                    .get_or_create(&MigrationTunnel {
                        migration: labels.migration.clone(),
                        vm: labels.vm.clone(),
                        role: labels.role.clone(),
                        direction: direction.to_owned(),
                    })
                    .set(packets as i64);
            }
        }
    }
}

fn role(record: &MigrationRecord) -> &'static str {
    match record.role {
        super::api::Role::Source => "source",
        super::api::Role::Destination => "destination",
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use movarto_common::config::Mode as DpMode;

    use super::*;
    use crate::agent::api::CounterMap;

    fn datapath() -> DatapathStatus {
        DatapathStatus {
            pin_dir: "/sys/fs/bpf/movarto/up0".to_owned(),
            home_addr: Some("192.0.2.10".parse().expect("addr")),
            mode: DpMode::Forward,
            counters: CounterMap(BTreeMap::from([
                (DatapathCounter::Packets, 1234),
                (DatapathCounter::TunnelOut, 77),
            ])),
            service_counters: None,
            flows: 3,
            live_premove_flows: 2,
            idle_ms: Some(1500),
            swept: 9,
        }
    }

    #[test]
    fn every_counter_is_a_labelled_family() {
        let dp = datapath();
        let record: MigrationRecord =
            serde_json::from_str(crate::agent::migrations::tests::RECORD).expect("record");
        let body = render(&Scrape {
            site: "a",
            uplink: "up0",
            datapath: Some(&dp),
            migrations: std::slice::from_ref(&record),
        })
        .expect("render");
        let labels = r#"{uplink="up0",service="192.0.2.10"}"#;
        for counter in DatapathCounter::ALL {
            let value = dp.counter(counter);
            let line = format!(
                "movarto_datapath_{}_total{labels} {value}\n",
                counter.name()
            );
            assert!(body.contains(&line), "{line}in\n{body}");
        }
        for line in [
            format!("movarto_flows{labels} 3\n"),
            format!("movarto_live_premove_flows{labels} 2\n"),
            format!("movarto_flows_swept_total{labels} 9\n"),
            format!("movarto_flows_idle_seconds{labels} 1.5\n"),
            r#"movarto_tunnel_packets_total{uplink="up0",service="192.0.2.10",direction="out"} 77"#
                .to_owned(),
            r#"movarto_datapath_mode{uplink="up0",service="192.0.2.10",mode="forward"} 1"#
                .to_owned(),
            r#"movarto_migration_stage{migration="web-1-ab",vm="web",role="source",stage="copying-ram"} 1"#
                .to_owned(),
        ] {
            assert!(body.contains(&line), "{line} in\n{body}");
        }
        assert!(body.ends_with("# EOF\n"), "{body}");
    }

    #[test]
    fn a_detached_uplink_says_so_and_has_no_counters() {
        let body = render(&Scrape {
            site: "a",
            uplink: "up0",
            datapath: None,
            migrations: &[],
        })
        .expect("render");
        assert!(!body.contains("movarto_datapath_packets"), "{body}");
        assert!(body.contains(r#"movarto_datapath_attached{uplink="up0",service=""} 0"#));
    }
}
