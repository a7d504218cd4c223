//! `cargo xtask demo`: sets up what is missing, builds `movarto-user`, the test guest and the
//! demo program (`movarto-lab`'s `movarto-demo`), then runs the demo with the given options.
//! Everything but the report goes to stderr, so `--json` leaves stdout to the JSON alone.

use std::{
    ffi::OsString,
    process::{Command, ExitCode, Stdio},
};

use anyhow::{Context as _, Result, bail};

use crate::run::{cargo, describe, workspace_root};

pub fn run(args: &[OsString]) -> Result<ExitCode> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the demo builds network namespaces and loads eBPF: run `cargo xtask demo` as root");
    }
    let xtask = std::env::current_exe().context("finding the xtask binary")?;
    let quiet_check = Command::new(&xtask)
        .args(["setup", "--check"])
        .stdin(Stdio::null())
        .output()
        .context("running `cargo xtask setup --check`")?;
    if !quiet_check.status.success() {
        eprintln!("demo: the machine is not set up yet; running `cargo xtask setup`");
        to_stderr(Command::new(&xtask).arg("setup"))?;
    }
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
    Ok(match status.code() {
        Some(0) => ExitCode::SUCCESS,
        Some(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        None => ExitCode::FAILURE,
    })
}

/// Runs `cmd` with its stdout sent to our stderr; fails unless it exits 0.
fn to_stderr(cmd: &mut Command) -> Result<()> {
    let what = describe(cmd);
    let status = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::from(std::io::stderr()))
        .status()
        .with_context(|| format!("could not start `{what}`"))?;
    if !status.success() {
        bail!("`{what}` failed ({status})");
    }
    Ok(())
}
