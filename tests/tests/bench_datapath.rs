//! `movarto-user bench datapath` runs every path it names and reports it: each
//! row's verdict is the path's own (the bench checks the counter of every run
//! and fails otherwise), and the figures are there. No timing is asserted.

use std::process::Command;

use movarto_tests::require_root;

const PATHS: [&str; 11] = [
    "not-a-service-track",
    "track-to-home",
    "track-syn-new",
    "track-from-vm",
    "forward-to-tunnel",
    "forward-from-tunnel",
    "not-a-service-receive",
    "receive-from-tunnel",
    "nat-in",
    "nat-out",
    "vm-to-tunnel",
];

fn bench(args: &[&str]) -> std::process::Output {
    let bin = movarto_lab::movarto_user().expect("movarto-user built");
    Command::new(bin)
        .args(["bench", "datapath"])
        .args(args)
        .output()
        .expect("run movarto-user bench")
}

#[test]
fn every_path_runs_with_an_empty_and_a_full_flow_map() {
    require_root();
    let out = bench(&[
        "--rounds",
        "2",
        "--repeat",
        "2000",
        "--calls",
        "200",
        "--flows-capacity",
        "4096",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "bench failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    assert_eq!(report["flows_capacity"], 4096);
    let rows = report["rows"].as_array().expect("rows");
    assert_eq!(rows.len(), 2 * PATHS.len(), "{rows:#?}");
    for fill in ["empty", "full"] {
        for path in PATHS {
            let row = rows
                .iter()
                .find(|r| r["path"] == path && r["flow_map"] == fill)
                .unwrap_or_else(|| panic!("no row for {path} with a {fill} flow map"));
            let verdict = row["verdict"].as_str().expect("verdict");
            let want: &[&str] = match path {
                "track-from-vm" => &["TC_ACT_OK"],
                "nat-out" | "vm-to-tunnel" => &["TC_ACT_OK", "TC_ACT_REDIRECT"],
                p if p.starts_with("not-a-service") || p.starts_with("track") => &["XDP_PASS"],
                _ => &["XDP_TX", "XDP_REDIRECT"],
            };
            assert!(want.contains(&verdict), "{path}: {verdict}");
            for figure in ["ns", "noop_ns"] {
                let spread = &row[figure];
                let (min, median, max) = (
                    spread["min"].as_f64().expect("min"),
                    spread["median"].as_f64().expect("median"),
                    spread["max"].as_f64().expect("max"),
                );
                assert!(min <= median && median <= max, "{path} {figure}: {spread}");
            }
            assert!(
                row["ns"]["median"].as_f64().expect("median") > 0.0,
                "{path}"
            );
            assert_eq!(row["services"], 1);
        }
    }
}

/// With the services map full (4096: the measured service and 4095 others of every
/// mode), every path still takes its own verdict.
#[test]
fn every_path_runs_beside_a_full_services_map() {
    require_root();
    let out = bench(&[
        "--rounds",
        "1",
        "--repeat",
        "2000",
        "--calls",
        "200",
        "--flows-capacity",
        "4096",
        "--flow-map",
        "empty",
        "--services",
        "4096",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "bench failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON report");
    let rows = report["rows"].as_array().expect("rows");
    assert_eq!(rows.len(), PATHS.len(), "{rows:#?}");
    for path in PATHS {
        let row = rows
            .iter()
            .find(|r| r["path"] == path)
            .unwrap_or_else(|| panic!("no row for {path}"));
        assert_eq!(row["services"], 4096, "{path}");
        assert!(
            row["verdict"].as_str().is_some_and(|v| !v.is_empty()),
            "{path}"
        );
    }
    let out = bench(&["--services", "0"]);
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn a_path_it_does_not_know_is_refused_by_name() {
    require_root();
    let out = bench(&["--path", "teleport"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no path named teleport"), "{stderr}");
    let out = bench(&["--rounds", "0"]);
    assert_eq!(out.status.code(), Some(1));
    let out = bench(&["--path", "list"]);
    assert!(out.status.success());
    let listed: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(listed, PATHS);
}
