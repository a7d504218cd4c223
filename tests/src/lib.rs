//! Test-only helpers for movarto's integration tests: root, bpffs, BPF_PROG_TEST_RUN and
//! counter checks. The lab the tests build (namespaces, BIND9, agents, QEMU) is movarto-lab.
//!
//! Root-only tests call [`require_root`] first. It never skips: without root
//! the test fails and says why, in CI and on a developer's machine alike.

pub mod extra_vm;
pub mod inventory;
pub mod migration;
pub mod raw_socket;
pub mod site;
pub mod uplink;
pub mod workload;

use std::path::Path;

use anyhow::{Context as _, Result, bail};
use aya::programs::{TestRun as _, TestRunOptions};
use movarto_common::counters::Counter;
use movarto_lab::tempdir::TempDir;
use movarto_user::datapath::{CounterSnapshot, Datapath};

/// Fails the calling test unless it runs as root.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid,
        0,
        "this test loads eBPF programs and needs root; run `sudo cargo xtask test` (never skipped, CI={})",
        std::env::var("CI").unwrap_or_default()
    );
}

/// A directory on bpffs for one test's pins, removed (with the pins) on drop,
/// also when the test fails.
pub struct BpffsDir(TempDir);

impl BpffsDir {
    pub fn new(tag: &str) -> Result<Self> {
        let mounts = std::fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
        if !mounts.lines().any(|l| {
            l.split_whitespace().nth(1) == Some("/sys/fs/bpf")
                && l.split_whitespace().nth(2) == Some("bpf")
        }) {
            bail!("bpffs is not mounted at /sys/fs/bpf; run `cargo xtask setup`");
        }
        TempDir::new_in(Path::new("/sys/fs/bpf"), &format!("movarto-test-{tag}")).map(Self)
    }

    pub fn path(&self) -> &Path {
        self.0.path()
    }
}

/// Which program a frame is run through.
#[derive(Clone, Copy, Debug)]
pub enum Hook {
    /// XDP on the uplink.
    Uplink,
    /// TC on the VM-facing interface.
    VmFacing,
}

/// Runs `frame` once through `hook` with BPF_PROG_TEST_RUN; returns the program's return value.
pub fn run_frame(datapath: &Datapath, hook: Hook, frame: &[u8]) -> Result<u32> {
    run_frame_repeat(datapath, hook, frame, 1)
}

/// Runs `frame` `repeat` times through `hook`.
pub fn run_frame_repeat(datapath: &Datapath, hook: Hook, frame: &[u8], repeat: u32) -> Result<u32> {
    let opts = TestRunOptions {
        data_in: Some(frame),
        repeat,
        ..Default::default()
    };
    let result = match hook {
        Hook::Uplink => datapath.uplink_ingress()?.test_run(opts),
        Hook::VmFacing => datapath.vm_ingress()?.test_run(opts),
    }
    .with_context(|| {
        format!(
            "BPF_PROG_TEST_RUN on {hook:?} with a {}-byte frame",
            frame.len()
        )
    })?;
    Ok(result.return_value)
}

/// Runs `frame` once through `hook`; returns the return value and the frame
/// as the program left it.
pub fn run_frame_out(datapath: &Datapath, hook: Hook, frame: &[u8]) -> Result<(u32, Vec<u8>)> {
    let mut out = vec![0u8; frame.len() + 256];
    let opts = TestRunOptions {
        data_in: Some(frame),
        data_out: Some(&mut out),
        ..Default::default()
    };
    let result = match hook {
        Hook::Uplink => datapath.uplink_ingress()?.test_run(opts),
        Hook::VmFacing => datapath.vm_ingress()?.test_run(opts),
    }
    .with_context(|| {
        format!(
            "BPF_PROG_TEST_RUN on {hook:?} with a {}-byte frame",
            frame.len()
        )
    })?;
    out.truncate(result.data_size_out as usize);
    Ok((result.return_value, out))
}

/// Asserts that `after - before` is exactly `expected`, every other counter unchanged.
pub fn assert_counter_delta(
    before: &CounterSnapshot,
    after: &CounterSnapshot,
    expected: &[(Counter, u64)],
) {
    for counter in Counter::ALL {
        let want = expected
            .iter()
            .find(|(c, _)| *c == counter)
            .map_or(0, |(_, n)| *n);
        let got = after.get(counter) - before.get(counter);
        assert_eq!(
            got,
            want,
            "counter {} changed by {got}, expected {want}; all changes: {:?}",
            counter.name(),
            Counter::ALL
                .iter()
                .filter(|c| after.get(**c) != before.get(**c))
                .map(|c| (c.name(), after.get(*c) - before.get(*c)))
                .collect::<Vec<_>>()
        );
    }
}
