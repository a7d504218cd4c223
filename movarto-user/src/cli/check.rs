//! `movarto-user check`: loads the datapath through the verifier and reports what loaded.

use anyhow::Result;
use clap::Args;
use movarto_user::datapath::Datapath;
use serde::Serialize;

#[derive(Args, Debug)]
pub struct CheckArgs {
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
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
}

/// Nothing is attached; everything is unloaded when the datapath is dropped.
pub fn run(a: CheckArgs) -> Result<()> {
    let datapath = Datapath::load()?;
    let programs = datapath
        .program_infos()?
        .into_iter()
        .map(|(name, info)| ProgramReport {
            name,
            id: info.id(),
            btf_id: info.btf_id(),
            verified_instructions: info.verified_instruction_count(),
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
        println!(
            "  {:<16} id {:<6} btf {:<6} {insns} instructions verified",
            p.name, p.id, btf
        );
    }
    Ok(())
}
