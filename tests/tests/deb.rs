//! The .deb holds the binary, the systemd unit, the man pages and the completions, with
//! sane control metadata. Built as `cargo xtask dist --deb` does (man pages and
//! completions from the CLI, then cargo-deb with movarto-user's metadata), but from the
//! debug binary `cargo xtask test` has already built (`--profile dev --no-build`): a
//! release build takes 7 to 14 minutes on this machine's two cores, and the metadata
//! is the same.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace")
        .to_owned()
}

fn run(command: &mut Command) -> String {
    let out = command.output().expect("starting the command");
    assert!(
        out.status.success(),
        "{command:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_deb_holds_the_binary_the_unit_man_pages_and_completions() {
    let root = workspace();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let scratch = root.join(format!("target/deb-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    let version = env!("CARGO_PKG_VERSION");
    let deb = scratch.join(format!("movarto_{version}-1_amd64.deb"));
    run(Command::new(&cargo)
        .current_dir(&root)
        .args(["xtask", "dist"]));
    run(Command::new(&cargo)
        .current_dir(&root)
        .args([
            "deb",
            "-p",
            "movarto-user",
            "--profile",
            "dev",
            "--no-build",
            "--fast",
        ])
        .arg("--output")
        .arg(&scratch));
    assert!(deb.exists(), "{} was not built", deb.display());

    let contents = run(Command::new("dpkg-deb").arg("--contents").arg(&deb));
    let paths: Vec<&str> = contents
        .lines()
        .filter_map(|line| line.split_whitespace().last())
        .collect();
    let has = |suffix: &str| paths.iter().any(|p| p.ends_with(suffix));
    for wanted in [
        "./usr/bin/movarto-user",
        "/systemd/system/movarto-agent.service",
        "./usr/share/man/man1/movarto-user.1.gz",
        "./usr/share/man/man1/movarto-user-agent.1.gz",
        "./usr/share/man/man1/movarto-user-migrate.1.gz",
        "./usr/share/bash-completion/completions/movarto-user",
        "./usr/share/zsh/vendor-completions/_movarto-user",
        "./usr/share/fish/vendor_completions.d/movarto-user.fish",
        "./usr/share/doc/movarto/examples/agent.env",
        "./etc/movarto/movarto.toml.example",
        "./usr/share/doc/movarto/inventory.md",
        "./usr/share/doc/movarto/copyright",
    ] {
        assert!(has(wanted), "{wanted} is not in the .deb:\n{contents}");
    }
    // The hidden packaging verb gets no page.
    assert!(!has("movarto-user-generate.1.gz"), "{contents}");

    let info = run(Command::new("dpkg-deb").arg("--info").arg(&deb));
    for field in [
        "Package: movarto\n",
        &format!("Version: {version}-1\n"),
        "Architecture: amd64\n",
        "Section: admin\n",
        "Maintainer: movarto developers",
        "Description: movarto's manager",
    ] {
        assert!(info.contains(field), "{field:?} not in:\n{info}");
    }
    let depends = info
        .lines()
        .find_map(|l| l.trim().strip_prefix("Depends: "))
        .unwrap_or_else(|| panic!("no Depends:\n{info}"));
    assert!(
        depends.contains("libc6") && depends.contains("iproute2"),
        "{depends}"
    );

    // What it installs works: the binary runs, and the unit is the one in packaging/.
    let unpacked = scratch.join("unpacked");
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacked));
    let said = run(Command::new(unpacked.join("usr/bin/movarto-user")).arg("--version"));
    assert_eq!(said.trim(), format!("movarto-user {version}"));
    let unit = ["lib", "usr/lib"]
        .iter()
        .map(|dir| {
            unpacked
                .join(dir)
                .join("systemd/system/movarto-agent.service")
        })
        .find(|p| p.exists())
        .expect("the unit");
    assert_eq!(
        std::fs::read_to_string(unit).expect("unit"),
        std::fs::read_to_string(root.join("packaging/movarto-agent.service")).expect("unit")
    );
    // The example inventory is the one in packaging/ (a unit test keeps it a good file).
    let example = unpacked.join("etc/movarto/movarto.toml.example");
    assert_eq!(
        std::fs::read_to_string(&example).expect("example"),
        std::fs::read_to_string(root.join("packaging/movarto.toml")).expect("example")
    );
    let _ = std::fs::remove_dir_all(&scratch);
}
