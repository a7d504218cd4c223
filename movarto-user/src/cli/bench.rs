//! `movarto-user bench`: the datapath's cost per packet on this machine.

use anyhow::{Result, anyhow};
use clap::{Args, Subcommand, ValueEnum};
use movarto_user::bench::datapath::{self, FlowMap, Instrument, Options, PathId, Report};

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Time every path of the datapath with BPF_PROG_TEST_RUN beside a no-op program
    /// in the same run (root). Nothing is attached: the programs run in a network
    /// namespace of the bench's own, gone when it exits.
    Datapath(DatapathArgs),
}

#[derive(Args, Debug)]
pub struct DatapathArgs {
    /// Rounds of every path; the table gives min, median and max over them.
    #[arg(long, default_value_t = 5)]
    pub rounds: u32,
    /// Runs per call in the kernel's repeat loop (paths that leave the frame unchanged).
    #[arg(long, default_value_t = 1_000_000)]
    pub repeat: u32,
    /// Calls per round for the paths that rewrite the frame (one run per call).
    #[arg(long, default_value_t = 20_000)]
    pub calls: u32,
    /// Capacity of the flow map (default: what `attach` gives it, 1048576).
    #[arg(long)]
    pub flows_capacity: Option<u32>,
    /// The flow map's states to measure in (repeat it; default both).
    #[arg(long = "flow-map", value_enum)]
    pub flow_maps: Vec<FlowMapArg>,
    /// Only this path (repeat it; default all). `--path list` names them.
    #[arg(long = "path")]
    pub paths: Vec<String>,
    /// Also measure every path with this running beside it (repeat it): `monitor`
    /// (a listener with its defaults) or `debug-log` (loaded with the debug logs on).
    #[arg(long = "with", value_enum, value_name = "INSTRUMENT")]
    pub instruments: Vec<InstrumentArg>,
    /// Measure with this many services on the uplink (repeat it; default 1): the
    /// measured one and others filling the services map (e.g. 4096).
    #[arg(long = "services", value_name = "N")]
    pub services: Vec<u32>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum InstrumentArg {
    Monitor,
    DebugLog,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum FlowMapArg {
    Empty,
    Full,
}

pub fn run(command: BenchCommand) -> Result<()> {
    match command {
        BenchCommand::Datapath(a) => datapath_bench(a),
    }
}

fn datapath_bench(a: DatapathArgs) -> Result<()> {
    if a.paths.iter().any(|p| p == "list") {
        for p in PathId::ALL {
            println!("{}", p.name());
        }
        return Ok(());
    }
    let paths = a
        .paths
        .iter()
        .map(|name| {
            PathId::from_name(name)
                .ok_or_else(|| anyhow!("no path named {name}; `--path list` names them"))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut flow_maps: Vec<FlowMap> = a
        .flow_maps
        .iter()
        .map(|f| match f {
            FlowMapArg::Empty => FlowMap::Empty,
            FlowMapArg::Full => FlowMap::Full,
        })
        .collect();
    if flow_maps.is_empty() {
        flow_maps = vec![FlowMap::Empty, FlowMap::Full];
    }
    let opts = Options {
        rounds: a.rounds,
        repeat: a.repeat,
        calls: a.calls,
        flows_capacity: a.flows_capacity,
        flow_maps,
        paths,
        instruments: a
            .instruments
            .iter()
            .map(|i| match i {
                InstrumentArg::Monitor => Instrument::Monitor,
                InstrumentArg::DebugLog => Instrument::DebugLog,
            })
            .collect(),
        services: a.services.clone(),
    };
    let report = datapath::run(&opts, |step| eprintln!("bench: {step}"))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&report);
    }
    Ok(())
}

fn print_table(r: &Report) {
    println!(
        "datapath cost per packet: kernel {}, {} CPUs, {} rounds, repeat loop {} runs, \
         {} calls per round otherwise, flow maps of {} confirmed and {} pending flows",
        r.kernel, r.cpus, r.rounds, r.repeat, r.calls, r.flows_capacity, r.pending_flows_capacity
    );
    println!(
        "{:<22} {:<8} {:<6} {:<10} {:<16} {:<15} {:>7} {:>7} {:>7} {:>7} {:>6} {:>7}",
        "path",
        "mode",
        "flows",
        "with",
        "method",
        "verdict",
        "min",
        "median",
        "max",
        "no-op",
        "ratio",
        "+ns"
    );
    for row in &r.rows {
        println!(
            "{:<22} {:<8} {:<6} {:<10} {:<16} {:<15} {:>7.1} {:>7.1} {:>7.1} {:>7.1} {:>5.2}x {:>7.1}",
            row.path.name(),
            row.mode.name(),
            row.flow_map.name(),
            row.instrument.name(),
            row.method.name(),
            row.verdict,
            row.ns.min,
            row.ns.median,
            row.ns.max,
            row.noop_ns.median,
            row.ratio_to_noop,
            row.over_noop_ns
        );
    }
    println!(
        "ns per packet as the kernel times it; repeat-loop rows are the loop's mean, \
         one-run-per-call rows the median of single runs (they include the timer's own \
         overhead, so read them against their no-op)"
    );
}
