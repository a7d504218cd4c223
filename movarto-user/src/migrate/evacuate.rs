//! `movarto-user evacuate`: many VMs off one site at once, each a migration of its own
//! (the agents own each, as for `migrate`), at most `max_concurrent` at a time, sharing one
//! bandwidth. One VM's failure rolls back that VM only; the others go on.
//!
//! **Placement.** The VMs are taken in the order given (`--all`: the inventory's order);
//! each goes to the next of the destinations, round robin, that it has an
//! `[services.<name>.at.<site>]` table for (a VM with no such table at all, in move address
//! mode, takes the next one). A VM with tables for none of them is refused before anything
//! starts.
//!
//! **Interrupts.** Ctrl-C or SIGTERM: every running migration rolls back before its
//! switchover, or goes on by itself after it, as `migrate`'s does; the VMs still waiting
//! for their turn are not started.
//!
//! **Bandwidth.** The total is divided equally among the migrations still copying RAM
//! (not yet past their switchover), and divided again whenever one of them gets there or
//! ends: QEMU takes a new `max-bandwidth` during a migration (`PUT
//! /v1/migrations/{id}/bandwidth` at the source's agent). Each VM's report lists the
//! caps it was given and when.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, PoisonError},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use serde::Serialize;
use tokio::{sync::Semaphore, time::Instant};

use super::{
    ProgressFormat,
    plan::Plan,
    report::{Report, ms},
    run_plan,
};
use crate::{
    agent::{
        AgentClient,
        api::{MigrationId, MigrationRecord, Role},
    },
    inventory::{Inventory, MigrateFlags},
};

/// KubeVirt's default of outbound migrations per node (`parallelOutboundMigrationsPerNode`):
/// two migrations share the link well; more mostly lengthen each one's RAM copy, and with it
/// the time every evacuated VM is at risk.
pub const DEFAULT_MAX_CONCURRENT: usize = 2;

/// How often the bandwidth is divided again.
const REDIVIDE_EVERY: Duration = Duration::from_millis(500);

/// What to evacuate, and how.
#[derive(Clone, Debug)]
pub struct EvacuateOptions {
    /// The site the VMs leave.
    pub from: String,
    /// The services (or VMs) to move; empty: every service whose VM runs at `from`.
    pub vms: Vec<String>,
    pub destinations: Vec<String>,
    pub max_concurrent: usize,
    /// Bytes per second for all the migrations together; `None`: each its own cap.
    pub bandwidth: Option<u64>,
    /// The flags every VM's migration gets (`migrate`'s, e.g. `--urgent`, `--max-drain`).
    pub flags: MigrateFlags,
}

/// One cap a migration was given, and when (since the evacuation started).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct BandwidthPoint {
    pub at_ms: u64,
    pub bytes_per_second: u64,
}

/// One VM of the evacuation: where it went, how it went, and `migrate`'s report.
#[derive(Clone, Debug, Serialize)]
pub struct EvacuatedVm {
    pub service: String,
    pub vm: String,
    pub destination: String,
    pub succeeded: bool,
    pub error: Option<String>,
    pub rolled_back: Option<String>,
    /// Since the evacuation started.
    pub started_ms: u64,
    pub finished_ms: u64,
    /// QEMU's blackout.
    pub downtime_ms: Option<u64>,
    /// The flows at the switchover that drained, and the ones the teardown cut.
    pub connections_kept: usize,
    pub connections_cut: usize,
    pub dns_switched: bool,
    pub bandwidth: Vec<BandwidthPoint>,
    pub report: Report,
}

/// The evacuation's summary and every VM's report.
#[derive(Clone, Debug, Serialize)]
pub struct EvacuationReport {
    pub from: String,
    pub destinations: Vec<String>,
    pub max_concurrent: usize,
    pub bandwidth_total: Option<u64>,
    pub succeeded: bool,
    pub moved: usize,
    pub failed: usize,
    pub total_ms: u64,
    pub worst_downtime_ms: Option<u64>,
    pub connections_kept: usize,
    pub connections_cut: usize,
    pub dns_switches: usize,
    pub vms: Vec<EvacuatedVm>,
}

/// A VM's move before it starts: its service, VM name, destination and plan.
struct Move {
    service: String,
    destination: String,
    plan: Plan,
}

/// Which VMs leave `opts.from`, each with its destination (the module's placement rule).
pub async fn placement(
    inventory: &Inventory,
    opts: &EvacuateOptions,
) -> Result<Vec<(String, String)>> {
    if opts.destinations.is_empty() {
        bail!("give at least one --destination");
    }
    for site in opts.destinations.iter().chain([&opts.from]) {
        inventory.site(site).map_err(anyhow::Error::msg)?;
    }
    if opts.destinations.contains(&opts.from) {
        bail!("--destination {} is the site the VMs leave", opts.from);
    }
    let names = if opts.vms.is_empty() {
        running_at(inventory, &opts.from).await?
    } else {
        opts.vms.clone()
    };
    if names.is_empty() {
        bail!("no VM of the inventory runs at {}", opts.from);
    }
    let mut next = 0;
    let mut placed = Vec::new();
    for name in names {
        let (at, home_site): (Vec<&String>, Option<&String>) = inventory
            .service(&name)
            .map(|(_, s)| (s.at.keys().collect(), s.home_site.as_ref()))
            .unwrap_or_default();
        // Its home site counts as a table: moving home, its address there is `H`.
        let pick = (0..opts.destinations.len())
            .map(|i| (next + i) % opts.destinations.len())
            .find(|&i| {
                let to = &opts.destinations[i];
                at.is_empty() || at.contains(&to) || home_site == Some(to)
            });
        let Some(i) = pick else {
            bail!(
                "{name} has no [services.{name}.at.<site>] table for any destination ({}); \
                 it would have no address there",
                opts.destinations.join(", ")
            );
        };
        placed.push((name, opts.destinations[i].clone()));
        next = i + 1;
    }
    Ok(placed)
}

/// The inventory's services whose VM runs at `site`, by its agent.
async fn running_at(inventory: &Inventory, site: &str) -> Result<Vec<String>> {
    let agent = inventory.agent(site).map_err(anyhow::Error::msg)?;
    let status = agent
        .status()
        .await
        .with_context(|| format!("asking {site}'s agent which VMs run there"))?;
    let running: Vec<&str> = status
        .vms
        .iter()
        .filter(|vm| vm.run_state == crate::agent::api::RunState::Running && !vm.incoming)
        .map(|vm| vm.name.as_str())
        .collect();
    Ok(inventory
        .services
        .iter()
        .filter(|(name, s)| running.contains(&s.vm_name(name)))
        .map(|(name, _)| name.clone())
        .collect())
}

/// Runs the evacuation; every VM gets a report, whatever happens to the others.
pub async fn evacuate(inventory: &Inventory, opts: &EvacuateOptions) -> Result<EvacuationReport> {
    let placed = placement(inventory, opts).await?;
    let max_concurrent = opts.max_concurrent.max(1);
    let first_share = opts
        .bandwidth
        .map(|total| total / max_concurrent.min(placed.len()) as u64);
    // Every plan is checked before the first VM moves.
    let mut moves = Vec::new();
    for (service, destination) in &placed {
        let flags = MigrateFlags {
            name: Some(service.clone()),
            to: Some(destination.clone()),
            from: Some(opts.from.clone()),
            ..opts.flags.clone()
        };
        let options = flags
            .resolve(Some(inventory), Some(&opts.from))
            .with_context(|| service.clone())?;
        let mut plan = Plan::from_options(&options).with_context(|| service.clone())?;
        if let Some(share) = first_share {
            plan.settings.max_bandwidth = share;
            plan.settings.max_postcopy_bandwidth = share;
        }
        moves.push(Move {
            service: service.clone(),
            destination: destination.clone(),
            plan,
        });
    }
    let source = inventory.agent(&opts.from).map_err(anyhow::Error::msg)?;
    let started = Instant::now();
    let ms = move || started.elapsed().as_millis() as u64;
    let permits = Arc::new(Semaphore::new(max_concurrent));
    // Ctrl-C or SIGTERM: the running migrations roll back or detach as `migrate`'s do
    // (each run listens too); the ones still waiting for their turn never start.
    let interrupted = Arc::new(std::sync::Mutex::new(None::<&'static str>));
    let listener = listen_for_signals(interrupted.clone());
    let mut tasks = tokio::task::JoinSet::new();
    for (index, m) in moves.into_iter().enumerate() {
        let (permits, interrupted) = (permits.clone(), interrupted.clone());
        tasks.spawn(async move {
            let _permit = permits.acquire_owned().await;
            let begun = ms();
            let signal = *interrupted.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(signal) = signal {
                let report = Report {
                    vm: m.plan.vm.clone(),
                    error: Some(format!(
                        "not started: the evacuation was interrupted by {signal}"
                    )),
                    ..Report::default()
                };
                return (
                    index,
                    m.service,
                    m.destination,
                    m.plan.vm,
                    begun,
                    begun,
                    report,
                );
            }
            eprintln!(
                "[{:>7.1}s] {}: to {}",
                begun as f64 / 1000.0,
                m.service,
                m.destination
            );
            let report = run_plan(&m.plan, ProgressFormat::Quiet).await;
            let done = ms();
            eprintln!(
                "[{:>7.1}s] {}: {}",
                done as f64 / 1000.0,
                m.service,
                match &report.error {
                    None => "moved".to_owned(),
                    Some(error) => format!("FAILED: {error}"),
                }
            );
            (
                index,
                m.service,
                m.destination,
                m.plan.vm,
                begun,
                done,
                report,
            )
        });
    }
    let vms_by_name: HashMap<String, usize> = placed
        .iter()
        .enumerate()
        .map(|(i, (service, _))| {
            let vm = inventory
                .service(service)
                .map_or(service.as_str(), |(name, s)| s.vm_name(name));
            (vm.to_owned(), i)
        })
        .collect();
    let mut bandwidth: Vec<Vec<BandwidthPoint>> = vec![Vec::new(); placed.len()];
    let mut finished = BTreeMap::new();
    let mut next_division = Instant::now();
    while !tasks.is_empty() {
        if let Some(total) = opts.bandwidth
            && Instant::now() >= next_division
        {
            divide(&source, total, &vms_by_name, &mut bandwidth, ms()).await;
            next_division = Instant::now() + REDIVIDE_EVERY;
        }
        match tokio::time::timeout(REDIVIDE_EVERY, tasks.join_next()).await {
            Ok(Some(Ok(done))) => {
                finished.insert(done.0, done);
                // Its share goes to the others at once.
                next_division = Instant::now();
            }
            Ok(Some(Err(panicked))) => bail!("a migration's task failed: {panicked}"),
            Ok(None) | Err(_) => {}
        }
    }
    if let Some(listener) = listener {
        listener.abort();
    }
    let vms: Vec<EvacuatedVm> = finished
        .into_values()
        .map(|(index, service, destination, vm, begun, done, report)| {
            let cut = report.flows_cut.len();
            EvacuatedVm {
                service,
                vm,
                destination,
                succeeded: report.succeeded,
                error: report.error.clone(),
                rolled_back: report.rolled_back.clone(),
                started_ms: begun,
                finished_ms: done,
                downtime_ms: report.qemu.as_ref().map(|q| q.downtime_ms),
                connections_kept: report.flows_at_switchover.saturating_sub(cut),
                connections_cut: cut,
                dns_switched: report.dns_switch_ms.is_some(),
                bandwidth: std::mem::take(&mut bandwidth[index]),
                report,
            }
        })
        .collect();
    let moved = vms.iter().filter(|v| v.succeeded).count();
    Ok(EvacuationReport {
        from: opts.from.clone(),
        destinations: opts.destinations.clone(),
        max_concurrent,
        bandwidth_total: opts.bandwidth,
        succeeded: moved == vms.len(),
        moved,
        failed: vms.len() - moved,
        total_ms: ms(),
        worst_downtime_ms: vms.iter().filter_map(|v| v.downtime_ms).max(),
        connections_kept: vms.iter().map(|v| v.connections_kept).sum(),
        connections_cut: vms.iter().map(|v| v.connections_cut).sum(),
        dns_switches: vms.iter().filter(|v| v.dns_switched).count(),
        vms,
    })
}

/// Notes the first SIGINT or SIGTERM in `interrupted`; `None` if the handlers can't be
/// installed (the runs' own handlers still roll back what runs).
fn listen_for_signals(
    interrupted: Arc<std::sync::Mutex<Option<&'static str>>>,
) -> Option<tokio::task::JoinHandle<()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        return None;
    };
    Some(tokio::spawn(async move {
        let name = tokio::select! {
            Some(()) = int.recv() => "SIGINT",
            Some(()) = term.recv() => "SIGTERM",
            else => return,
        };
        eprintln!("evacuate: {name}: the migrations not started yet will not start");
        *interrupted.lock().unwrap_or_else(PoisonError::into_inner) = Some(name);
    }))
}

/// Divides `total` equally among the evacuation's migrations that still copy RAM at the
/// source (by the source's agent), telling each whose share changed.
async fn divide(
    source: &AgentClient,
    total: u64,
    vms: &HashMap<String, usize>,
    bandwidth: &mut [Vec<BandwidthPoint>],
    at_ms: u64,
) {
    let records = match source.migrations().await {
        Ok(records) => records,
        Err(err) => {
            tracing::warn!("evacuate: the source's migrations: {err}");
            return;
        }
    };
    for (index, id, share) in shares(&records, vms, total) {
        if bandwidth[index].last().map(|p| p.bytes_per_second) == Some(share) {
            continue;
        }
        match source.set_bandwidth(&id, share).await {
            Ok(_) => bandwidth[index].push(BandwidthPoint {
                at_ms,
                bytes_per_second: share,
            }),
            // It got past its copy meanwhile: the next division leaves it out.
            Err(err) => tracing::debug!(%id, "evacuate: bandwidth: {err}"),
        }
    }
}

/// Each of the evacuation's migrations (`vms`: VM name to its index) that copies RAM at
/// the source, with its share of `total`: equal shares among those.
fn shares(
    records: &[MigrationRecord],
    vms: &HashMap<String, usize>,
    total: u64,
) -> Vec<(usize, MigrationId, u64)> {
    let copying: Vec<_> = records
        .iter()
        .filter(|r| r.role == Role::Source && !r.stage.is_final() && !r.stage.past_switchover())
        .filter_map(|r| vms.get(&r.spec.vm).map(|&i| (i, r.id().clone())))
        .collect();
    let share = total / copying.len().max(1) as u64;
    copying
        .into_iter()
        .map(|(index, id)| (index, id, share))
        .collect()
}

impl EvacuationReport {
    /// The summary and one line per VM, for humans.
    pub fn render(&self) -> String {
        let mut out = format!(
            "evacuation of {} to {}: {} of {} moved in {}, at most {} at a time{}\n",
            self.from,
            self.destinations.join(", "),
            self.moved,
            self.vms.len(),
            ms(self.total_ms),
            self.max_concurrent,
            self.bandwidth_total
                .map(|b| format!(", {} MiB/s shared", b >> 20))
                .unwrap_or_default()
        );
        out.push_str(&format!(
            "connections kept {}, cut {}; DNS switched {}; worst downtime {}\n\n",
            self.connections_kept,
            self.connections_cut,
            self.dns_switches,
            self.worst_downtime_ms.map_or("-".to_owned(), ms)
        ));
        out.push_str(&format!(
            "{:<16} {:<6} {:>9} {:>9} {:>9} {:>5} {:>4}  {}\n",
            "vm", "to", "started", "took", "downtime", "kept", "cut", "outcome"
        ));
        for v in &self.vms {
            out.push_str(&format!(
                "{:<16} {:<6} {:>9} {:>9} {:>9} {:>5} {:>4}  {}\n",
                v.service,
                v.destination,
                ms(v.started_ms),
                ms(v.finished_ms.saturating_sub(v.started_ms)),
                v.downtime_ms.map_or("-".to_owned(), ms),
                v.connections_kept,
                v.connections_cut,
                match (&v.error, &v.rolled_back) {
                    (None, _) => "moved".to_owned(),
                    (Some(e), Some(r)) => format!("FAILED: {e} (rolled back: {r})"),
                    (Some(e), None) => format!("FAILED: {e}"),
                }
            ));
            for p in &v.bandwidth {
                out.push_str(&format!(
                    "    bandwidth {} MiB/s from {}\n",
                    p.bytes_per_second >> 20,
                    ms(p.at_ms)
                ));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::agent::api::Stage;

    const SITES: &str = r#"
[sites.a]
agent = "https://203.0.113.1:7878"
token_file = "a.token"
tunnel = "203.0.113.1"

[sites.b]
agent = "https://203.0.113.129:7878"
token_file = "b.token"
tunnel = "203.0.113.129"

[sites.c]
agent = "https://203.0.113.65:7878"
token_file = "c.token"
tunnel = "203.0.113.65"

[services.web]
home = "192.0.2.10"
[services.web.at.b]
new_addr = "198.18.0.10"
[services.web.at.c]
new_addr = "198.19.0.10"

[services.shop]
home = "192.0.2.11"
[services.shop.at.c]
new_addr = "198.19.0.11"

[services.db]
home = "192.0.2.12"
address_mode = "move"
on_switch = "true"
"#;

    fn options(vms: &[&str], destinations: &[&str]) -> EvacuateOptions {
        EvacuateOptions {
            from: "a".to_owned(),
            vms: vms.iter().map(|v| (*v).to_owned()).collect(),
            destinations: destinations.iter().map(|d| (*d).to_owned()).collect(),
            max_concurrent: DEFAULT_MAX_CONCURRENT,
            bandwidth: None,
            flags: MigrateFlags::default(),
        }
    }

    fn place(vms: &[&str], destinations: &[&str]) -> Result<Vec<(String, String)>, String> {
        let (inventory, problems) = Inventory::parse(SITES, Path::new("/nonexistent"), false);
        assert_eq!(problems, [], "{problems:?}");
        let inventory = inventory.expect("inventory");
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
            .block_on(placement(&inventory, &options(vms, destinations)))
            .map_err(|e| format!("{e:#}"))
    }

    #[test]
    fn each_vm_goes_to_the_next_destination_it_has_an_address_at() {
        let placed = place(&["web", "shop", "db"], &["b", "c"]).expect("placed");
        let pairs: Vec<(&str, &str)> = placed
            .iter()
            .map(|(vm, to)| (vm.as_str(), to.as_str()))
            .collect();
        // web to b (the first), shop skips b (no address there) for c, db (move
        // address mode, no table) takes the next in turn, b.
        assert_eq!(pairs, [("web", "b"), ("shop", "c"), ("db", "b")]);
        let placed = place(&["db", "web", "shop"], &["b", "c"]).expect("placed");
        let to: Vec<&str> = placed.iter().map(|(_, to)| to.as_str()).collect();
        assert_eq!(to, ["b", "c", "c"]);
    }

    #[test]
    fn an_evacuation_that_cannot_place_every_vm_is_refused_before_it_starts() {
        let err = place(&["web", "shop"], &["b"]).expect_err("shop has no address at b");
        assert!(
            err.contains("shop has no [services.shop.at.<site>] table"),
            "{err}"
        );
        let err = place(&["web"], &["a"]).expect_err("to itself");
        assert!(err.contains("is the site the VMs leave"), "{err}");
        let err = place(&["web"], &["z"]).expect_err("no such site");
        assert!(err.contains('z'), "{err}");
        let err = place(&["web"], &[]).expect_err("nowhere");
        assert!(err.contains("at least one --destination"), "{err}");
    }

    #[test]
    fn a_vm_may_go_back_to_its_home_site_without_a_table_there() {
        let with_home = SITES.replace(
            "[services.shop]\nhome = \"192.0.2.11\"",
            "[services.shop]\nhome = \"192.0.2.11\"\nhome_site = \"a\"",
        );
        let run = |text: &str| {
            let (inventory, problems) = Inventory::parse(text, Path::new("/nonexistent"), false);
            assert_eq!(problems, [], "{problems:?}");
            let mut opts = options(&["shop"], &["a"]);
            opts.from = "c".to_owned();
            tokio::runtime::Builder::new_current_thread()
                .build()
                .expect("runtime")
                .block_on(placement(&inventory.expect("inventory"), &opts))
                .map_err(|e| format!("{e:#}"))
        };
        assert_eq!(
            run(&with_home).expect("placed"),
            [("shop".to_owned(), "a".to_owned())]
        );
        let err = run(SITES).expect_err("no home site, no table at a");
        assert!(err.contains("no [services.shop.at.<site>] table"), "{err}");
    }

    fn record(vm: &str, stage: Stage) -> MigrationRecord {
        let mut record: MigrationRecord =
            serde_json::from_str(crate::agent::migrations::tests::RECORD).expect("record");
        record.spec.vm = vm.to_owned();
        record.spec.id = MigrationId::new(&format!("{vm}-1-ab")).expect("id");
        record.stage = stage;
        record
    }

    #[test]
    fn the_bandwidth_is_shared_by_the_migrations_still_copying_ram() {
        let vms = HashMap::from([("web".to_owned(), 0), ("web2".to_owned(), 1)]);
        let total = 200 << 20;
        let both = [
            record("web", Stage::CopyingRam),
            record("web2", Stage::CopyingRam),
        ];
        let got = shares(&both, &vms, total);
        assert_eq!(got.len(), 2);
        assert!(
            got.iter().all(|(_, _, share)| *share == 100 << 20),
            "{got:?}"
        );
        // web got past its switchover: web2 has it all.
        let one = [
            record("web", Stage::Draining),
            record("web2", Stage::CopyingRam),
        ];
        assert_eq!(
            shares(&one, &vms, total)
                .into_iter()
                .map(|(i, _, share)| (i, share))
                .collect::<Vec<_>>(),
            vec![(1, 200 << 20)]
        );
        // Another VM's migration, and finished ones, take no share.
        let others = [
            record("other", Stage::CopyingRam),
            record("web", Stage::RolledBack),
            record("web2", Stage::Accepted),
        ];
        assert_eq!(
            shares(&others, &vms, total)
                .into_iter()
                .map(|(i, _, share)| (i, share))
                .collect::<Vec<_>>(),
            vec![(1, 200 << 20)]
        );
    }
}
