//! `cargo xtask <task>`: the project's setup and test entry points.

mod bench;
mod demo;
mod dist;
mod guest;
mod run;
mod setup;
mod test;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "movarto project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install and prepare everything the build, the tests and the lab need (root; idempotent).
    Setup {
        /// Only report what is missing; change nothing. Exits non-zero if anything is.
        #[arg(long)]
        check: bool,
    },
    /// Run setup, formatting and lint checks, unit tests and the root-only integration tests.
    Test {
        /// Also the long tests CI leaves out (the whole fault matrix, the soak).
        #[arg(long)]
        full: bool,
    },
    /// Render man pages and shell completions from movarto-user's CLI into target/dist/
    /// (what the .deb ships); `--deb` then builds the .deb there too (cargo-deb).
    Dist {
        #[arg(long)]
        deb: bool,
    },
    /// Build the test guest (Debian kernel, busybox initramfs, test server) into target/guest/.
    Guest,
    /// Build the lab, move a VM with live connections from site A to site B, report (root).
    ///
    /// Options go to the demo program: --json, --short, --site-rtt-ms, --site-rate-mbit,
    /// --client-rtt-ms, --client-rate-mbit, --warmup-s, --after-switchover-s, --idle,
    /// --curl-mib, --curl-kib-s, --svg, --quiet (`cargo xtask demo -- --help` lists them).
    Demo {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, num_args = 0..)]
        args: Vec<std::ffi::OsString>,
    },
    /// Build and run a benchmark as root: `tunnel` (iperf3 through movarto's tunnel, VXLAN,
    /// OpenVPN and the direct path) or `datapath` (cost per packet, release build).
    ///
    /// Options go to the benchmark (`cargo xtask bench tunnel -- --help` lists them).
    Bench {
        what: bench::Bench,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, num_args = 0..)]
        args: Vec<std::ffi::OsString>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The demo's and the benchmarks' exit codes are their own (2: connections lost); the other tasks succeed or fail.
    let result = match cli.task {
        Task::Setup { check: false } => setup::run().map(|_| ExitCode::SUCCESS),
        Task::Setup { check: true } => setup::check().map(|()| ExitCode::SUCCESS),
        Task::Test { full } => test::run(full).map(|()| ExitCode::SUCCESS),
        Task::Dist { deb } => dist::run(deb).map(|()| ExitCode::SUCCESS),
        Task::Guest => guest::build().map(|()| ExitCode::SUCCESS),
        Task::Demo { args } => demo::run(&args),
        Task::Bench { what, args } => bench::run(what, &args),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("xtask: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
