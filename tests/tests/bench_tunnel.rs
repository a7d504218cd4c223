//! The tunnel throughput benchmark (`cargo xtask bench tunnel`) runs end to end, very
//! short: one second, one round, one stream, both directions, the four paths. It asserts
//! behaviour, never speed: every path moved bytes, the JSON holds every row, the chart is
//! written, movarto's counters at A and B show tunnelled packets, and nothing the
//! benchmark made (namespaces, pins, processes) is left.

use std::{fs, path::Path};

use movarto_lab::{
    bench_tunnel::{self, Direction, Options, PREFIX},
    tempdir::TempDir,
};
use movarto_tests::require_root;

const PATHS: [&str; 4] = ["direct", "movarto", "vxlan", "openvpn"];

/// The processes whose parent is this test process.
fn children() -> Vec<String> {
    let me = std::process::id().to_string();
    let mut found = Vec::new();
    for entry in fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(stat) = fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid ...: comm may hold spaces, so split after its ')'.
        let Some((head, tail)) = stat.rsplit_once(')') else {
            continue;
        };
        if tail.split_whitespace().nth(1) == Some(me.as_str()) {
            found.push(head.to_owned() + ")");
        }
    }
    found
}

#[test]
fn tunnel_benchmark_measures_every_path_and_leaves_nothing() {
    require_root();
    let opts = Options {
        seconds: 1,
        rounds: 1,
        streams: vec![1],
        directions: vec![Direction::Up, Direction::Down],
        variants: PATHS.iter().map(|s| (*s).to_owned()).collect(),
        verbose: true,
    };
    let report = bench_tunnel::run(&opts).expect("the benchmark");
    let dir = TempDir::new("movarto-bench-tunnel-test").expect("tempdir");
    let json_path = dir.join("tunnel.json");
    let svg_path = report.write(&json_path).expect("write the report");
    eprint!("{}", report.render());

    let json: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(&json_path).expect("read the JSON"))
            .expect("parse the JSON");
    let rows = json["rows"].as_array().expect("rows");
    assert_eq!(
        rows.len(),
        PATHS.len() * 2,
        "one row per path and direction"
    );
    for path in PATHS {
        for direction in ["up", "down"] {
            let row = rows
                .iter()
                .find(|r| r["variant"] == path && r["direction"] == direction)
                .unwrap_or_else(|| panic!("no row for {path} {direction}"));
            assert_eq!(row["streams"], 1);
            assert_eq!(
                row["errors"].as_array().map(Vec::len),
                Some(0),
                "{path} {direction}: {}",
                row["errors"]
            );
            let samples = row["samples"].as_array().expect("samples");
            assert_eq!(samples.len(), 1, "{path} {direction}: one round");
            let bytes = samples[0]["bytes"].as_u64().expect("bytes");
            assert!(bytes > 0, "{path} {direction} moved no bytes");
            assert!(row["gbit_s"]["median"].as_f64().expect("Gbit/s") > 0.0);
            assert!(
                row["ratio_to_direct"].as_f64().is_some(),
                "{path} {direction}: a ratio to direct"
            );
            assert!(row["cpu_s"]["median"].as_f64().expect("cpu") > 0.0);
        }
    }

    let svg = fs::read_to_string(&svg_path).expect("the SVG beside the JSON");
    assert_eq!(
        svg_path,
        fs::canonicalize(dir.join("tunnel.svg")).expect("svg")
    );
    assert!(svg.starts_with("<svg"), "{}", &svg[..80.min(svg.len())]);
    for path in PATHS {
        assert!(svg.contains(path), "the chart names {path}");
    }

    // Both directions crossed movarto's tunnel: A encapsulated toward B and unwrapped
    // B's replies; B did the opposite.
    let c = &json["tunnel_counters"]["movarto"];
    for (site, counter) in [
        ("a", "tunnel_out"),
        ("a", "tunnel_in"),
        ("b", "tunnel_in"),
        ("b", "tunnel_out"),
    ] {
        assert!(
            c[site][counter].as_u64().unwrap_or(0) > 0,
            "movarto's {counter} at {site}: {c}"
        );
    }

    // Nothing left: namespaces, pins, processes.
    let netns = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    let pid = std::process::id().to_string();
    let ours = format!("mvt-{PREFIX}");
    let left: Vec<String> = String::from_utf8_lossy(&netns.stdout)
        .lines()
        .filter(|l| l.starts_with(&ours) && l.contains(&format!("-{pid}-")))
        .map(str::to_owned)
        .collect();
    assert!(left.is_empty(), "namespaces left: {left:?}");
    let pins = Path::new("/sys/fs/bpf/movarto");
    if pins.exists() {
        let left: Vec<_> = fs::read_dir(pins)
            .expect("pins")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| {
                n.starts_with(PREFIX) && n.ends_with(&(std::process::id() % 100_000).to_string())
            })
            .collect();
        assert!(left.is_empty(), "pins left: {left:?}");
    }
    let left = children();
    assert!(left.is_empty(), "processes left: {left:?}");
}
