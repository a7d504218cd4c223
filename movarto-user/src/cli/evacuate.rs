//! `movarto-user evacuate`: many VMs off one site at once (before a disaster, or to empty
//! a host), from the inventory; the library's `migrate::evacuate` does it.

use std::{path::Path, process::ExitCode, time::Duration};

use anyhow::{Context as _, Result, bail};
use clap::Args;
use movarto_user::{
    inventory::{Defaults, Inventory, MigrateFlags},
    migrate::evacuate::{DEFAULT_MAX_CONCURRENT, EvacuateOptions, evacuate},
    units::{parse_bandwidth, parse_duration},
};

#[derive(Args, Debug)]
pub struct EvacuateArgs {
    /// The site the VMs leave (a site of the inventory).
    #[arg(long)]
    pub from: String,
    /// A service (or VM) to move; repeat it. Or --all.
    #[arg(long = "vm", value_name = "NAME", required_unless_present = "all")]
    pub vms: Vec<String>,
    /// Every service of the inventory whose VM runs at --from (by its agent).
    #[arg(long, conflicts_with = "vms")]
    pub all: bool,
    /// Where the VMs go; repeat it to spread them (round robin, each VM to the next
    /// site it has an `at.<site>` table for).
    #[arg(long = "destination", value_name = "SITE", required = true)]
    pub destinations: Vec<String>,
    /// How many migrations run at once (KubeVirt's default: 2).
    #[arg(long, default_value_t = DEFAULT_MAX_CONCURRENT as u16,
          value_parser = clap::value_parser!(u16).range(1..))]
    pub max_concurrent: u16,
    /// The bandwidth all the migrations share, in MiB/s: divided among those copying
    /// RAM, and again as each gets past its switchover.
    #[arg(long, value_parser = parse_bandwidth)]
    pub bandwidth: Option<u64>,
    /// Disaster recovery for every VM: no TTL wait, post-copy after the first pass.
    #[arg(long)]
    pub urgent: bool,
    /// Each VM's drain: the idle time after which its tunnel goes (as `migrate`).
    #[arg(long, value_parser = parse_duration)]
    pub drain_grace: Option<Duration>,
    /// Each VM's longest drain (as `migrate`).
    #[arg(long, value_parser = parse_duration)]
    pub max_drain: Option<Duration>,
    /// The report as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: &EvacuateArgs, config: Option<&Path>) -> Result<ExitCode> {
    let Some(inventory) = Inventory::load_optional(config)? else {
        bail!(
            "evacuate reads the VMs and the sites from the inventory: give --config FILE \
             (docs/inventory.md)"
        );
    };
    if matches!(args.bandwidth, Some(0)) {
        bail!("--bandwidth 0 would stop every migration");
    }
    let opts = EvacuateOptions {
        from: args.from.clone(),
        vms: if args.all {
            Vec::new()
        } else {
            args.vms.clone()
        },
        destinations: args.destinations.clone(),
        max_concurrent: usize::from(args.max_concurrent),
        bandwidth: args.bandwidth,
        flags: MigrateFlags {
            urgent: args.urgent,
            defaults: Defaults {
                drain_grace: args.drain_grace,
                max_drain: args.max_drain,
                ..Defaults::default()
            },
            ..MigrateFlags::default()
        },
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    let report = runtime.block_on(evacuate(&inventory, &opts))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.render());
    }
    Ok(if report.succeeded {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
