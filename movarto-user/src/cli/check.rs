//! `movarto-user check`: loads the datapath through the verifier and reports what loaded.

use anyhow::Result;
use clap::Args;
use movarto_user::datapath::{
    Datapath, LoadOptions,
    budget::{ALLOWED_GROWTH_PERCENT, over_budget, verifier_budget},
};
use serde::Serialize;

#[derive(Args, Debug)]
pub struct CheckArgs {
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Load the programs with their debug logs on, as `attach --debug-log` does.
    #[arg(long)]
    pub debug_log: bool,
}

#[derive(Serialize)]
struct CheckReport {
    programs: Vec<ProgramReport>,
}

#[derive(Serialize)]
struct ProgramReport {
    name: String,
    id: u32,
    btf_id: Option<u32>,
    verified_instructions: Option<u32>,
    /// The checked-in budget (`movarto-ebpf/verifier-budget.toml`).
    instruction_budget: Option<u32>,
    /// More than the allowed growth over the budget (CI fails then; here it is a warning).
    over_budget: bool,
}

/// Nothing is attached; everything is unloaded when the datapath is dropped.
pub fn run(a: CheckArgs) -> Result<()> {
    let datapath = Datapath::load_with(&LoadOptions {
        debug_log: a.debug_log,
        ..LoadOptions::default()
    })?;
    let budget = verifier_budget()?;
    let programs = datapath
        .program_infos()?
        .into_iter()
        .map(|(name, info)| {
            let verified = info.verified_instruction_count();
            let instruction_budget = budget.get(&name).copied();
            let over = verified
                .zip(instruction_budget)
                .and_then(|(n, b)| over_budget(&name, n, b));
            if let Some(why) = &over {
                tracing::warn!("{why}");
            }
            ProgramReport {
                id: info.id(),
                btf_id: info.btf_id(),
                verified_instructions: verified,
                instruction_budget,
                over_budget: over.is_some(),
                name,
            }
        })
        .collect();
    let report = CheckReport { programs };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!("datapath loaded and verified:");
    for p in &report.programs {
        let btf = p
            .btf_id
            .map_or_else(|| "none".to_owned(), |id| id.to_string());
        let insns = p
            .verified_instructions
            .map_or_else(|| "?".to_owned(), |n| n.to_string());
        let budget = match (p.instruction_budget, p.over_budget) {
            (Some(b), false) => format!(" (budget {b})"),
            (Some(b), true) => {
                format!(" (OVER its budget of {b} by more than {ALLOWED_GROWTH_PERCENT} %)")
            }
            (None, _) => String::new(),
        };
        println!(
            "  {:<16} id {:<6} btf {:<6} {insns} instructions verified{budget}",
            p.name, p.id, btf
        );
    }
    Ok(())
}
