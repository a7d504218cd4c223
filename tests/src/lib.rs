//! Helpers for movarto's integration tests.
//!
//! Root-only tests call [`require_root`] first. It never skips: without root
//! the test fails and says why, in CI and on a developer's machine alike.

pub mod delay;
pub mod demo;
pub mod demo_plot;
pub mod dns_server;
pub mod lab;
pub mod netns;
pub mod workload;

use std::{
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context as _, Result, bail};
use aya::programs::{TestRun as _, TestRunOptions};
use movarto_common::counters::Counter;
use movarto_user::datapath::{CounterSnapshot, Datapath};

/// The test guest's kernel options, before its address: a serial console, and QEMU ends
/// when the guest panics. (QEMU 7.2's TCG needed `pti=on` too; QEMU 10 does not, see
/// docs/building.md.)
pub const GUEST_KERNEL_ARGS: &str = "console=ttyS0 panic=-1 quiet";

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
pub struct BpffsDir {
    path: PathBuf,
}

impl BpffsDir {
    pub fn new(tag: &str) -> Result<Self> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let root = Path::new("/sys/fs/bpf");
        let mounts = std::fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
        if !mounts.lines().any(|l| {
            l.split_whitespace().nth(1) == Some("/sys/fs/bpf")
                && l.split_whitespace().nth(2) == Some("bpf")
        }) {
            bail!("bpffs is not mounted at /sys/fs/bpf; run `cargo xtask setup`");
        }
        let path = root.join(format!(
            "movarto-test-{}-{}-{}",
            tag,
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for BpffsDir {
    fn drop(&mut self) {
        if let Err(err) = std::fs::remove_dir_all(&self.path) {
            eprintln!("warning: could not remove {}: {err}", self.path.display());
        }
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
