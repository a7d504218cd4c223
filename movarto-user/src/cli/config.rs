//! `movarto-user config check`: every problem of the inventory, each with its line.

use std::{path::Path, process::ExitCode};

use anyhow::Result;
use clap::{Args, Subcommand};
use movarto_user::inventory::{DEFAULT_PATH, Problem, check_file};
use serde::Serialize;

#[derive(Subcommand, Debug)]
pub enum ConfigCommand {
    /// Check the inventory: every problem, each with its line and column.
    ///
    /// The file is `--config PATH`, else /etc/movarto/movarto.toml. Checked: syntax, keys,
    /// types, addresses, references between entries, addresses used twice, and the files
    /// it names. The exit code is 1 if there is any problem.
    Check(ConfigCheckArgs),
}

#[derive(Args, Debug)]
pub struct ConfigCheckArgs {
    /// Print the problems as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize)]
struct CheckReport<'a> {
    path: &'a Path,
    ok: bool,
    problems: &'a [Problem],
}

pub fn run(command: &ConfigCommand, config: Option<&Path>) -> Result<ExitCode> {
    let ConfigCommand::Check(args) = command;
    let path = config.unwrap_or(Path::new(DEFAULT_PATH));
    let problems = check_file(path)?;
    if args.json {
        let report = CheckReport {
            path,
            ok: problems.is_empty(),
            problems: &problems,
        };
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        // As compilers say it, so editors jump to the line.
        for p in &problems {
            let key = if p.key.is_empty() {
                String::new()
            } else {
                format!("{}: ", p.key)
            };
            println!(
                "{}:{}:{}: {key}{}",
                path.display(),
                p.line,
                p.column,
                p.message
            );
        }
        match problems.len() {
            0 => println!("{}: ok", path.display()),
            n => println!("{}: {n} problem(s)", path.display()),
        }
    }
    Ok(if problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
