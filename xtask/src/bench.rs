//! `cargo xtask bench <what> [-- args]`: builds and runs a benchmark as root.
//! - `tunnel`: movarto-lab's `movarto-bench-tunnel` (iperf3 through movarto's tunnel, VXLAN,
//!   OpenVPN and the direct path in namespaces); setup first if the machine lacks it.
//! - `datapath`: `movarto-user bench datapath` from a release build (cost per packet).

use std::{
    ffi::OsString,
    process::{Command, ExitCode, Stdio},
};

use anyhow::{Context as _, Result, bail};
use clap::ValueEnum;

use crate::run::{cargo, ensure_setup, exit_code, to_stderr, workspace_root};

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Bench {
    /// TCP throughput through the tunnel and its alternatives (movarto-bench-tunnel).
    Tunnel,
    /// The datapath's cost per packet (movarto-user bench datapath, release build).
    Datapath,
}

pub fn run(what: Bench, args: &[OsString]) -> Result<ExitCode> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "the benchmarks load eBPF (and build network namespaces): run `cargo xtask bench` as root"
        );
    }
    let (build, bin, pre): (&[&str], &str, &[&str]) = match what {
        Bench::Tunnel => {
            ensure_setup("bench")?;
            (
                &[
                    "build",
                    "-p",
                    "movarto-lab",
                    "--bin",
                    "movarto-bench-tunnel",
                ],
                "target/debug/movarto-bench-tunnel",
                &[],
            )
        }
        Bench::Datapath => (
            &["build", "-p", "movarto-user", "--release"],
            "target/release/movarto-user",
            &["bench", "datapath"],
        ),
    };
    to_stderr(cargo().args(build))?;
    let bin = workspace_root().join(bin);
    // The benchmark cleans up on Ctrl-C (it reaches the whole process group); wait for it.
    // SAFETY: ignoring SIGINT in this process only.
    unsafe { libc::signal(libc::SIGINT, libc::SIG_IGN) };
    let status = Command::new(&bin)
        .args(pre)
        .args(args)
        .current_dir(workspace_root())
        .stdin(Stdio::null())
        .status()
        .with_context(|| format!("running {}", bin.display()))?;
    Ok(exit_code(status))
}
