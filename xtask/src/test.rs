//! `cargo xtask test`: setup, then every check CI runs, in order, stopping at the first failure.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};

use crate::{
    guest,
    run::{cargo, describe, nightly_cargo, status},
    setup,
};

/// Packages whose unit tests need no privileges.
const UNIT_TEST_PACKAGES: &[&str] = &[
    "movarto-common",
    "movarto-user",
    "movarto-lab",
    "xtask",
    "movarto-guest-server",
];
/// The integration-test crate; its tests need root and never skip.
const ROOT_TEST_PACKAGE: &str = "movarto-tests";

/// `full`: the ignored root tests too (the whole fault matrix, the soak).
pub fn run(full: bool) -> Result<()> {
    let mut timeline: Vec<(String, Duration)> = Vec::new();

    let started = Instant::now();
    setup::run()?;
    timeline.push(("setup".into(), started.elapsed()));

    // A second setup must find nothing to do; proves idempotence on every run.
    let started = Instant::now();
    setup::check().context("setup is not idempotent: a second run would change something")?;
    timeline.push(("setup --check (second run)".into(), started.elapsed()));

    let mut unit = cargo();
    unit.args(["test", "--no-fail-fast"]);
    for p in UNIT_TEST_PACKAGES {
        unit.args(["-p", p]);
    }
    let mut root_tests = cargo();
    root_tests.args(["test", "--no-fail-fast", "-p", ROOT_TEST_PACKAGE]);
    if full {
        root_tests.args(["--", "--include-ignored"]);
    }

    let stages: Vec<(&str, Stage)> = vec![
        ("rustfmt", {
            let mut c = cargo();
            c.args(["fmt", "--all", "--check"]);
            c.into()
        }),
        ("clippy (userspace)", {
            let mut c = cargo();
            c.args(["clippy", "--all-targets", "--", "-D", "warnings"]);
            c.into()
        }),
        ("clippy (eBPF)", {
            let mut c = nightly_cargo();
            c.args([
                "clippy",
                "-p",
                "movarto-ebpf",
                "--bins",
                "--target",
                "bpfel-unknown-none",
                "-Z",
                "build-std=core",
                "--",
                "-D",
                "warnings",
            ]);
            c.into()
        }),
        ("unit tests", unit.into()),
        // The QEMU tests boot it; cached, so this is instant after the first time.
        ("test guest", Stage::Task(guest_stage)),
        // The migration test runs the real binary as the agents and the orchestrator.
        ("movarto-user binary", {
            let mut c = cargo();
            c.args(["build", "-p", "movarto-user", "--bin", "movarto-user"]);
            c.into()
        }),
        ("root-only integration tests", root_tests.into()),
    ];

    for (name, stage) in stages {
        let started = Instant::now();
        match stage {
            Stage::Command(mut cmd) => {
                println!("\n==> {name}: {}", describe(&cmd));
                status(&mut cmd).with_context(|| format!("stage `{name}` failed"))?;
            }
            Stage::Task(task) => {
                println!("\n==> {name}");
                task().with_context(|| format!("stage `{name}` failed"))?;
            }
        }
        timeline.push((name.to_owned(), started.elapsed()));
    }

    println!("\nxtask test: all stages passed");
    for (name, took) in &timeline {
        println!("  {name:<30} {:>7.1} s", took.as_secs_f64());
    }
    Ok(())
}

/// A stage is an external command or a task of xtask's own.
enum Stage {
    Command(Command),
    Task(fn() -> Result<()>),
}

impl From<Command> for Stage {
    fn from(cmd: Command) -> Self {
        Self::Command(cmd)
    }
}

fn guest_stage() -> Result<()> {
    guest::build()
}
