//! The tunnel throughput benchmark; `cargo xtask bench tunnel` builds it and runs it as
//! root. Progress goes to stderr; the table (or JSON with --json) to stdout; the JSON and
//! an SVG bar chart beside it are always written to --out.

use std::{path::PathBuf, process::ExitCode};

use anyhow::{Result, bail};
use clap::Parser;
use movarto_lab::bench_tunnel::{self, Direction, Options};

#[derive(Parser)]
#[command(
    name = "movarto-bench-tunnel",
    about = "TCP bulk (iperf3) through movarto's tunnel, kernel VXLAN, OpenVPN and the direct path, in namespaces"
)]
struct Cli {
    /// Seconds per iperf3 run.
    #[arg(long, default_value_t = 10)]
    seconds: u32,
    /// Rounds; every variant is built afresh for each.
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// Parallel streams, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [1, 4])]
    streams: Vec<u32>,
    /// Directions, comma-separated: up (client to guest), down (guest to client).
    #[arg(long, value_delimiter = ',', default_values = ["up", "down"])]
    directions: Vec<String>,
    /// Variants, comma-separated (default: all; --list names them).
    #[arg(long, value_delimiter = ',')]
    variants: Vec<String>,
    /// List the variants and exit.
    #[arg(long)]
    list: bool,
    /// Print the report as JSON on stdout instead of the table.
    #[arg(long)]
    json: bool,
    /// Where the JSON goes; the SVG chart goes beside it (.svg).
    #[arg(long, default_value = "target/bench/tunnel.json")]
    out: PathBuf,
    /// No progress on stderr.
    #[arg(long, short)]
    quiet: bool,
}

fn run(cli: &Cli) -> Result<()> {
    if cli.list {
        for v in bench_tunnel::variants() {
            println!("{:<18} {}", v.name, v.about);
        }
        return Ok(());
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the benchmark builds network namespaces and loads eBPF: run it as root");
    }
    // Ctrl-C sets a flag the benchmark checks, so its guards remove what it made.
    movarto_lab::demo::install_interrupt_handler()?;
    let directions = cli
        .directions
        .iter()
        .map(|d| match d.as_str() {
            "up" => Ok(Direction::Up),
            "down" => Ok(Direction::Down),
            other => bail!("direction {other:?}: up or down"),
        })
        .collect::<Result<_>>()?;
    if cli.streams.iter().any(|s| *s == 0 || *s > 128) {
        bail!("--streams takes 1 to 128");
    }
    let opts = Options {
        seconds: cli.seconds,
        rounds: cli.rounds,
        streams: cli.streams.clone(),
        directions,
        variants: cli.variants.clone(),
        verbose: !cli.quiet,
    };
    let report = bench_tunnel::run(&opts)?;
    let svg = report.write(&cli.out)?;
    if cli.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.render());
    }
    eprintln!(
        "bench tunnel: wrote {} and {}",
        cli.out.display(),
        svg.display()
    );
    Ok(())
}

fn main() -> ExitCode {
    match run(&Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("movarto-bench-tunnel: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
