//! `cargo xtask dist`: what the .deb ships besides the binary, rendered from
//! movarto-user's own clap definitions (its hidden `generate` verb), so the man pages
//! and completions never disagree with the binary:
//!
//! - `target/dist/man/`: `movarto-user.1` and one page per verb (clap_mangen);
//! - `target/dist/completions/`: bash, zsh and fish (clap_complete).
//!
//! With `--deb` it then builds the package (`cargo deb -p movarto-user`) into
//! `target/dist/`.

use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, Result};

use crate::run::{cargo, status, workspace_root};

pub fn dist_dir() -> PathBuf {
    workspace_root().join("target/dist")
}

pub fn run(deb: bool) -> Result<()> {
    let mut build = cargo();
    build.args(["build", "-p", "movarto-user", "--bin", "movarto-user"]);
    status(&mut build)?;
    let binary = workspace_root().join("target/debug/movarto-user");
    let dist = dist_dir();
    // Pages of verbs that are gone must not linger.
    for sub in ["man", "completions"] {
        let dir = dist.join(sub);
        if dir.exists() {
            std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
        }
        // The directory is named as the verb's argument: `generate man DIR`.
        status(Command::new(&binary).args(["generate", sub]).arg(&dir))?;
        let count = std::fs::read_dir(&dir)
            .with_context(|| format!("reading {}", dir.display()))?
            .count();
        println!("dist: {count} files in {}", dir.display());
    }
    if deb {
        let mut package = cargo();
        package
            .args(["deb", "-p", "movarto-user", "--output"])
            .arg(&dist);
        status(&mut package).context("cargo deb (`cargo xtask setup` installs cargo-deb)")?;
    }
    Ok(())
}
