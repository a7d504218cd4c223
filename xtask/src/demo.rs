//! `cargo xtask demo`: sets up what is missing, builds `movarto-user`, the test guest and the
//! demo program (`movarto-lab`'s `movarto-demo`), then runs the demo with the given options.
//! Everything but the report goes to stderr, so `--json` leaves stdout to the JSON alone.

use std::{
    ffi::OsString,
    process::{Command, ExitCode, Stdio},
};

use anyhow::{Context as _, Result, bail};

use crate::run::{cargo, ensure_setup, exit_code, to_stderr, workspace_root};

pub fn run(args: &[OsString]) -> Result<ExitCode> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the demo builds network namespaces and loads eBPF: run `cargo xtask demo` as root");
    }
    ensure_setup("demo")?;
    let xtask = std::env::current_exe().context("finding the xtask binary")?;
    eprintln!("demo: building the test guest");
    to_stderr(Command::new(&xtask).arg("guest"))?;
    for (package, bin) in [
        ("movarto-user", "movarto-user"),
        ("movarto-lab", "movarto-demo"),
    ] {
        eprintln!("demo: building {bin}");
        to_stderr(cargo().args(["build", "-p", package, "--bin", bin]))?;
    }
    let demo = workspace_root().join("target/debug/movarto-demo");
    // Ctrl-C reaches the whole process group: the demo cleans up and reports, and we wait
    // for it rather than die first.
    // SAFETY: ignoring SIGINT in this process; the demo installs its own handler.
    unsafe { libc::signal(libc::SIGINT, libc::SIG_IGN) };
    let status = Command::new(&demo)
        .args(args)
        .stdin(Stdio::null())
        .status()
        .with_context(|| format!("running {}", demo.display()))?;
    Ok(exit_code(status))
}
