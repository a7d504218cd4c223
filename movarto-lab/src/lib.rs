//! The lab of DESIGN.md on one machine, and the demo that moves a VM through it.
//!
//! Everything here returns errors rather than panicking: the demo reports them, and the
//! integration tests (movarto-tests) `expect` at the call site. Every namespace, process,
//! pin and directory the lab makes is removed by a guard on drop, on failure too.

pub mod bench_tunnel;
pub mod delay;
pub mod demo;
pub mod dns_server;
pub mod lab;
pub mod netns;
pub mod svg;
pub mod tempdir;
pub mod triangle;
pub mod workload;

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};

/// The test guest's kernel options, before its address: a serial console, and QEMU ends
/// when the guest panics. (QEMU 7.2's TCG needed `pti=on` too; QEMU 10 does not, see
/// docs/building.md.)
pub const GUEST_KERNEL_ARGS: &str = "console=ttyS0 panic=-1 quiet";

/// The workspace's root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The test guest built by `cargo xtask guest`: its kernel and its initramfs.
pub fn guest_files() -> Result<(PathBuf, PathBuf)> {
    let dir = repo().join("target").join("guest");
    let kernel = dir.join("vmlinuz");
    let initramfs = dir.join("initramfs.cpio.gz");
    if !(kernel.exists() && initramfs.exists()) {
        bail!(
            "the test guest is missing in {}; build it with `cargo xtask guest` \
             (`cargo xtask test` does so before these tests)",
            dir.display()
        );
    }
    Ok((kernel, initramfs))
}

/// The `movarto-user` binary the lab runs (agents, migrate).
pub fn movarto_user() -> Result<PathBuf> {
    let bin = repo().join("target/debug/movarto-user");
    if !bin.exists() {
        bail!(
            "{} is missing: `cargo build -p movarto-user` (cargo xtask test does)",
            bin.display()
        );
    }
    Ok(bin)
}
