//! The loaded object carries BTF, so bpftool shows programs and maps readably.
//! Root only; pins under a per-test bpffs directory that is removed on drop.

use std::process::Command;

use anyhow::{Context as _, Result, bail};
use movarto_common::counters::Counter;
use movarto_tests::{BpffsDir, Hook, require_root, run_frame};
use movarto_user::datapath::{COUNTERS_MAP, Datapath, UPLINK_INGRESS, VM_INGRESS};
use serde_json::Value;

fn bpftool_json(args: &[&str]) -> Result<Value> {
    let out = Command::new("bpftool")
        .arg("--json")
        .args(args)
        .output()
        .context("running bpftool (installed by `cargo xtask setup`)")?;
    if !out.status.success() {
        bail!(
            "bpftool {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    serde_json::from_slice(&out.stdout).with_context(|| format!("parsing bpftool {args:?} output"))
}

#[test]
fn bpftool_shows_programs_with_btf() {
    require_root();
    let mut datapath = Datapath::load().expect("load datapath");
    let pins = BpffsDir::new("btf-prog").expect("bpffs dir");
    datapath.pin(pins.path()).expect("pin");
    for (name, kind) in [(UPLINK_INGRESS, "xdp"), (VM_INGRESS, "sched_cls")] {
        let path = pins.path().join(name);
        let info = bpftool_json(&["prog", "show", "pinned", path.to_str().expect("utf-8")])
            .expect("prog show");
        assert_eq!(info["name"], name, "{info}");
        assert_eq!(info["type"], kind, "{info}");
        assert!(
            info["btf_id"].as_u64().is_some_and(|id| id > 0),
            "no BTF on {name}: {info}"
        );
    }
}

#[test]
fn bpftool_dumps_counters_formatted() {
    require_root();
    let mut datapath = Datapath::load().expect("load datapath");
    // One well-formed-looking but truncated IPv4 frame, no service's: Packets and PassMalformed become 1.
    let mut frame = vec![0u8; 20];
    frame[12] = 0x08;
    run_frame(&datapath, Hook::Uplink, &frame).expect("test run");
    let pins = BpffsDir::new("btf-map").expect("bpffs dir");
    datapath.pin(pins.path()).expect("pin");
    let path = pins.path().join(COUNTERS_MAP);
    let dump =
        bpftool_json(&["map", "dump", "pinned", path.to_str().expect("utf-8")]).expect("map dump");
    let entries = dump.as_array().expect("array of entries");
    assert_eq!(entries.len(), Counter::ALL.len());
    for counter in Counter::ALL {
        // With BTF, bpftool decodes key and per-CPU values as integers under "formatted".
        let formatted = &entries[counter as usize]["formatted"];
        assert_eq!(
            formatted["key"], counter as u64,
            "entry not decoded with BTF: {formatted}"
        );
        let total: u64 = formatted["values"]
            .as_array()
            .expect("per-CPU values")
            .iter()
            .map(|v| v["value"].as_u64().expect("integer value"))
            .sum();
        let want = u64::from(matches!(counter, Counter::Packets | Counter::PassMalformed));
        assert_eq!(total, want, "{}", counter.name());
    }
}
