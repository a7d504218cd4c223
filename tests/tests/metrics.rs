//! The agents' Prometheus endpoint during a real migration (two agents, QEMU, BIND9,
//! `movarto-user migrate`): every datapath counter agrees with the status endpoint read
//! at the same time, and the migration's stage, progress, bandwidth and downtime show.

use std::{
    collections::HashMap,
    thread,
    time::{Duration, Instant},
};

use movarto_common::counters::Counter;
use movarto_lab::lab::*;
use movarto_tests::{migration::wait_for_source_migration, require_root};
use movarto_user::agent::api::{SiteStatus, Stage};

/// A scrape: each series (name and labels, as written) and its value.
fn parse(text: &str) -> HashMap<String, f64> {
    assert!(
        text.ends_with("# EOF\n"),
        "not a whole OpenMetrics scrape:\n{text}"
    );
    text.lines()
        .filter(|line| !line.starts_with('#') && !line.is_empty())
        .map(|line| {
            let (series, value) = line.rsplit_once(' ').expect("series and value");
            let value = value.parse().unwrap_or_else(|_| panic!("value in {line}"));
            (series.to_owned(), value)
        })
        .collect()
}

/// The one series whose name and labels start with `prefix`.
fn only(scrape: &HashMap<String, f64>, prefix: &str) -> (String, f64) {
    let found: Vec<_> = scrape
        .iter()
        .filter(|(k, _)| k.starts_with(prefix))
        .collect();
    assert_eq!(found.len(), 1, "{prefix}: {found:?}");
    (found[0].0.clone(), *found[0].1)
}

/// Scrape, status, scrape: counters only grow, so each counter of the status lies
/// between the two scrapes.
fn scrape_status_scrape(
    l: &Lab,
    site: &str,
) -> (HashMap<String, f64>, SiteStatus, HashMap<String, f64>) {
    let site = site.to_owned();
    let (first, status, second) = l
        .with_agents(async |a, b| {
            let agent = if site == "a" { a } else { b };
            let first = agent.metrics().await.expect("scrape");
            let status = agent.status().await.expect("status");
            let second = agent.metrics().await.expect("scrape");
            (first, status, second)
        })
        .expect("the agents");
    (parse(&first), status, parse(&second))
}

fn check_counters(
    uplink: &str,
    first: &HashMap<String, f64>,
    status: &SiteStatus,
    second: &HashMap<String, f64>,
    min_flows: f64,
) {
    let dp = status.datapath.as_ref().expect("attached");
    let labels = format!(r#"{{uplink="{uplink}",service="{H}"}}"#);
    for counter in Counter::ALL {
        let series = format!("movarto_datapath_{}_total{labels}", counter.name());
        let (before, after) = (first[&series], second[&series]);
        let now = dp.counter(counter) as f64;
        assert!(
            before <= now && now <= after,
            "{series}: scrape {before}, status {now}, scrape {after}"
        );
    }
    assert!(first[&format!("movarto_datapath_packets_total{labels}")] > 0.0);
    let flows = second[&format!("movarto_flows{labels}")];
    assert!(flows >= min_flows, "flows in the map: {flows}");
    assert_eq!(second[&format!("movarto_datapath_attached{labels}")], 1.0);
}

#[test]
fn metrics_during_a_migration_agree_with_the_status() {
    require_root();
    let l = Lab::build().expect("the lab");
    l.boot_at_a().expect("the guest boots at A");
    let chat = Chat::start(&l).expect("the connection");

    // A slow copy (8 MiB/s), so that the scrapes land in the middle of it.
    let mut migrate = l
        .migrate_command(&[
            "--max-bandwidth",
            "8",
            "--drain-grace",
            "1s",
            "--max-drain",
            "60s",
        ])
        .expect("the migrate command");
    let mut orchestrator = l.bind.client.spawn(&mut migrate).expect("migrate");
    wait_for_source_migration(&l, &mut orchestrator, "the RAM copy", |m| {
        m.progress.is_some_and(|p| p.transferred > 4 << 20)
    });

    // During the RAM copy, at A (tracking) and at B (receiving).
    let started = Instant::now();
    let (first, status, second) = scrape_status_scrape(&l, "a");
    eprintln!("scrape, status, scrape at A: {:?}", started.elapsed());
    check_counters(&l.uplink_a, &first, &status, &second, 1.0);
    let mode = format!(
        r#"movarto_datapath_mode{{uplink="{}",service="{H}",mode="track"}}"#,
        l.uplink_a
    );
    assert_eq!(first[&mode], 1.0, "A tracks");
    let (stage, _) = only(&first, "movarto_migration_stage{");
    assert!(
        stage.contains(r#"vm="web",role="source",stage="copying-ram""#),
        "{stage}"
    );
    let (_, ratio) = only(&first, "movarto_migration_progress_ratio{");
    assert!(ratio > 0.0 && ratio < 1.0, "progress {ratio}");
    let (_, bandwidth) = only(&first, "movarto_migration_bandwidth_bytes_per_second{");
    // Capped at 8 MiB/s; QEMU averages over its own intervals.
    assert!(
        bandwidth > 0.0 && bandwidth < 16.0 * 1048576.0,
        "bandwidth {bandwidth}"
    );
    let (_, total) = only(&first, "movarto_migration_ram_total_bytes{");
    assert!(total >= 64.0 * 1048576.0, "RAM {total}");

    let (first, status, second) = scrape_status_scrape(&l, "b");
    // B learns the flows after the switchover.
    check_counters(&l.uplink_b, &first, &status, &second, 0.0);
    let (stage, _) = only(&first, "movarto_migration_stage{");
    assert!(stage.contains(r#"role="destination",stage="#), "{stage}");

    // The drain: the chat's flow runs through the tunnel, and QEMU's downtime is known.
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let stage = l
            .with_agents(async |a, _| a.migrations().await.ok())
            .expect("the agents")
            .and_then(|all| all.last().map(|r| r.stage));
        if stage == Some(Stage::Draining) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no drain: {stage:?}\n{}",
            l.stall_report()
        );
        thread::sleep(Duration::from_millis(100));
    }
    thread::sleep(Duration::from_millis(500));
    let (first, status, second) = scrape_status_scrape(&l, "a");
    check_counters(&l.uplink_a, &first, &status, &second, 1.0);
    let (stage, _) = only(&second, "movarto_migration_stage{");
    assert!(stage.contains(r#"stage="draining""#), "{stage}");
    let tunnelled = format!(
        r#"movarto_tunnel_packets_total{{uplink="{}",service="{H}",direction="out"}}"#,
        l.uplink_a
    );
    assert!(second[&tunnelled] > 0.0, "{tunnelled}");
    let (_, downtime) = only(&second, "movarto_migration_downtime_seconds{");
    assert!(downtime > 0.0 && downtime < 5.0, "downtime {downtime}");
    assert_eq!(only(&second, "movarto_migration_progress_ratio{").1, 1.0);
    let live = second[&format!(
        r#"movarto_live_premove_flows{{uplink="{}",service="{H}"}}"#,
        l.uplink_a
    )];
    assert_eq!(live, 1.0, "the chat holds the drain");

    let failures = chat.stop();
    let (status, report) = l
        .finish_migrate(&mut orchestrator, Duration::from_secs(90), || {})
        .expect("migrate finished");
    assert!(status.success(), "migrate: {report}");
    assert!(failures.is_empty(), "the connection broke: {failures:?}");

    // After the teardown A has no datapath, and the migration is done.
    let after = parse(
        &l.with_agents(async |a, _| a.metrics().await.expect("scrape"))
            .expect("the agents"),
    );
    assert_eq!(
        after[&format!(
            r#"movarto_datapath_attached{{uplink="{}",service=""}}"#,
            l.uplink_a
        )],
        0.0
    );
    let (stage, _) = only(&after, "movarto_migration_stage{");
    assert!(stage.contains(r#"stage="done""#), "{stage}");
    let (series, out) = after
        .iter()
        .find(|(k, _)| {
            k.starts_with("movarto_migration_tunnel_packets{") && k.contains(r#"direction="out""#)
        })
        .expect("the tunnel's packets at the teardown");
    assert_eq!(
        *out,
        report["tunnel"]["packets_to_b"].as_f64().expect("report"),
        "{series}"
    );
}
