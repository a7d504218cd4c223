//! `movarto-user generate man|completions DIR` (hidden): renders the clap definitions,
//! so that the man pages and completions always match the binary. `cargo xtask dist`
//! runs it; the .deb ships what it writes.

use std::path::PathBuf;

use anyhow::{Context as _, Result};
use clap::{Args, ValueEnum};
use clap_complete::Shell;

#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// What to write.
    pub what: What,
    /// The directory to write into (created if missing).
    pub dir: PathBuf,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum What {
    /// movarto-user.1 and one page per verb (movarto-user-migrate.1, ...).
    Man,
    /// bash (movarto-user.bash), zsh (_movarto-user) and fish (movarto-user.fish).
    Completions,
}

/// The shells the .deb has a place for.
const SHELLS: [Shell; 3] = [Shell::Bash, Shell::Zsh, Shell::Fish];

pub fn run(args: &GenerateArgs, mut command: clap::Command) -> Result<()> {
    std::fs::create_dir_all(&args.dir)
        .with_context(|| format!("creating {}", args.dir.display()))?;
    let name = command.get_name().to_owned();
    match args.what {
        What::Man => clap_mangen::generate_to(command, &args.dir)
            .with_context(|| format!("writing man pages into {}", args.dir.display()))?,
        What::Completions => {
            for shell in SHELLS {
                clap_complete::generate_to(shell, &mut command, &name, &args.dir).with_context(
                    || format!("writing {shell} completions into {}", args.dir.display()),
                )?;
            }
        }
    }
    Ok(())
}
