//! Running commands with their output passed through and their failure explained.

use std::{
    path::PathBuf,
    process::{Command, ExitCode, ExitStatus, Output, Stdio},
};

use anyhow::{Context as _, Result, bail};

/// The workspace root (xtask lives one level below it).
pub fn workspace_root() -> PathBuf {
    let manifest_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest_dir
        .parent()
        .map_or(manifest_dir.clone(), PathBuf::from)
}

/// Describes `cmd` the way a user would type it.
pub fn describe(cmd: &Command) -> String {
    let mut parts = vec![cmd.get_program().to_string_lossy().into_owned()];
    parts.extend(cmd.get_args().map(|a| a.to_string_lossy().into_owned()));
    parts.join(" ")
}

/// Runs `cmd` with inherited stdio; fails unless it exits 0.
pub fn status(cmd: &mut Command) -> Result<()> {
    let what = describe(cmd);
    let status = cmd
        .stdin(Stdio::null())
        .status()
        .with_context(|| format!("could not start `{what}`"))?;
    if !status.success() {
        bail!("`{what}` failed ({status})");
    }
    Ok(())
}

/// Runs `cmd` capturing its output; `Ok(None)` if the program does not exist.
pub fn output(cmd: &mut Command) -> Result<Option<Output>> {
    let what = describe(cmd);
    match cmd.stdin(Stdio::null()).output() {
        Ok(out) => Ok(Some(out)),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(err) => Err(err).with_context(|| format!("could not start `{what}`")),
    }
}

/// A `cargo` command for the stable toolchain this xtask was started with.
pub fn cargo() -> Command {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace_root());
    cmd
}

/// A `cargo` command on the nightly toolchain (the eBPF crate builds with it).
pub fn nightly_cargo() -> Command {
    let mut cmd = Command::new("rustup");
    cmd.args(["run", "nightly", "cargo"])
        .current_dir(workspace_root());
    // Whatever toolchain started us must not leak into the nightly build.
    for key in [
        "CARGO",
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTUP_TOOLCHAIN",
    ] {
        cmd.env_remove(key);
    }
    cmd
}

/// Runs `cmd` with its stdout sent to our stderr (a report owns our stdout); fails unless
/// it exits 0.
pub fn to_stderr(cmd: &mut Command) -> Result<()> {
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

/// Runs `cargo xtask setup` first if `setup --check` finds anything missing; `task` names
/// who asks.
pub fn ensure_setup(task: &str) -> Result<()> {
    let xtask = std::env::current_exe().context("finding the xtask binary")?;
    let check = Command::new(&xtask)
        .args(["setup", "--check"])
        .stdin(Stdio::null())
        .output()
        .context("running `cargo xtask setup --check`")?;
    if !check.status.success() {
        eprintln!("{task}: the machine is not set up yet; running `cargo xtask setup`");
        to_stderr(Command::new(&xtask).arg("setup"))?;
    }
    Ok(())
}

/// A program's exit status as ours (a signal: failure).
pub fn exit_code(status: ExitStatus) -> ExitCode {
    match status.code() {
        Some(0) => ExitCode::SUCCESS,
        Some(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        None => ExitCode::FAILURE,
    }
}
