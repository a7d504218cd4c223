//! `cargo xtask setup`: an idempotent bootstrap of a fresh machine, run as root.
//!
//! Each step first checks whether it is already satisfied and skips if so, so
//! a second run changes nothing and takes about a second.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::run::{self, output, status};

/// Debian packages: LLVM 22 dev files for bpf-linker, then the tools the tests and the lab use.
const PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "busybox-static",
    "bind9",
    "bind9-utils",
    // dig and nsupdate: the DNS tests check records and make concurrent changes with them.
    "bind9-dnsutils",
    "iperf3",
    "openvpn",
    "curl",
    "socat",
    "iproute2",
    "ethtool",
    "bpftool",
    "tcpdump",
];

/// build-std for the BPF target needs rust-src; `cargo xtask test` lints the eBPF crate with clippy.
const NIGHTLY_COMPONENTS: &[&str] = &["rust-src", "clippy"];

/// QEMU comes from bookworm-backports: bookworm's 7.2 (2022) lacks post-copy recovery and
/// postcopy-preempt, and installing it removes the `qemu-utils` 10 the machine image ships.
const BACKPORTS_SUITE: &str = "bookworm-backports";
const QEMU_PACKAGE: &str = "qemu-system-x86";
const QEMU_MAJOR: &str = "10";
/// Where setup writes the backports suite; the URI is copied from the machine's own source.
const BACKPORTS_SOURCE_FILE: &str = "/etc/apt/sources.list.d/movarto-bookworm-backports.sources";

const BPF_LINKER_VERSION: &str = "0.13.0";
/// Builds the .deb (`cargo xtask dist --deb`, and the package test); ~2.5 min to build.
const CARGO_DEB_VERSION: &str = "3.8.0";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

struct Step {
    name: &'static str,
    /// `None` when satisfied, otherwise what is missing.
    missing: fn() -> Result<Option<String>>,
    apply: fn() -> Result<()>,
}

const STEPS: &[Step] = &[
    Step {
        name: "bpffs mounted at /sys/fs/bpf",
        missing: bpffs_missing,
        apply: bpffs_mount,
    },
    Step {
        name: "rust-src and clippy for the nightly toolchain",
        missing: rust_src_missing,
        apply: rust_src_add,
    },
    Step {
        name: "Debian packages",
        missing: packages_missing,
        apply: packages_install,
    },
    Step {
        name: "the bookworm-backports suite in the Debian source",
        missing: backports_missing,
        apply: backports_add,
    },
    Step {
        name: "QEMU 10 from bookworm-backports",
        missing: qemu_missing,
        apply: qemu_install,
    },
    Step {
        name: "bpf-linker 0.13.0 built against LLVM 22",
        missing: bpf_linker_missing,
        apply: bpf_linker_install,
    },
    Step {
        name: "cargo-deb 3.8.0",
        missing: cargo_deb_missing,
        apply: cargo_deb_install,
    },
];

/// Runs every step that is not yet satisfied. Returns how many steps changed something.
pub fn run() -> Result<usize> {
    require_root()?;
    let total = STEPS.len();
    let mut changed = 0;
    for (i, step) in STEPS.iter().enumerate() {
        let started = Instant::now();
        match (step.missing)().with_context(|| format!("checking: {}", step.name))? {
            None => println!(
                "setup: [{}/{total}] {}: already satisfied",
                i + 1,
                step.name
            ),
            Some(missing) => {
                println!(
                    "setup: [{}/{total}] {}: missing {missing}; installing",
                    i + 1,
                    step.name
                );
                (step.apply)().with_context(|| format!("setup step failed: {}", step.name))?;
                if let Some(still) = (step.missing)()? {
                    bail!(
                        "setup step `{}` ran but {still} is still missing",
                        step.name
                    );
                }
                changed += 1;
                println!(
                    "setup: [{}/{total}] {}: done in {}",
                    i + 1,
                    step.name,
                    secs(started.elapsed())
                );
            }
        }
    }
    println!("setup: complete ({changed} of {total} steps changed something)");
    Ok(changed)
}

/// Reports what is missing without changing anything; fails if anything is.
pub fn check() -> Result<()> {
    let started = Instant::now();
    let mut missing = Vec::new();
    for step in STEPS {
        if let Some(what) = (step.missing)().with_context(|| format!("checking: {}", step.name))? {
            println!("setup --check: {}: missing {what}", step.name);
            missing.push(step.name);
        } else {
            println!("setup --check: {}: ok", step.name);
        }
    }
    if !missing.is_empty() {
        bail!(
            "not set up: {}; run `cargo xtask setup` as root",
            missing.join(", ")
        );
    }
    println!(
        "setup --check: all {} steps satisfied in {}",
        STEPS.len(),
        secs(started.elapsed())
    );
    Ok(())
}

fn secs(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

fn require_root() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "`cargo xtask setup` must run as root: it mounts bpffs and installs Debian packages \
             (try `sudo -E cargo xtask setup`)"
        );
    }
    Ok(())
}

fn bpffs_missing() -> Result<Option<String>> {
    let mounts = std::fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    let mounted = mounts.lines().any(|line| {
        let mut fields = line.split_whitespace().skip(1);
        fields.next() == Some("/sys/fs/bpf") && fields.next() == Some("bpf")
    });
    Ok((!mounted).then(|| "the bpf filesystem".to_owned()))
}

fn bpffs_mount() -> Result<()> {
    status(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))
}

fn rust_src_missing() -> Result<Option<String>> {
    let out = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))?
    .context("rustup not found; movarto builds with rustup's stable and nightly toolchains")?;
    if !out.status.success() {
        bail!(
            "the `nightly` toolchain is not installed ({}); the eBPF crate needs it",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let installed = String::from_utf8_lossy(&out.stdout);
    let missing: Vec<&str> = NIGHTLY_COMPONENTS
        .iter()
        .copied()
        .filter(|c| !installed.lines().any(|l| l.starts_with(c)))
        .collect();
    Ok((!missing.is_empty()).then(|| missing.join(" ")))
}

fn rust_src_add() -> Result<()> {
    status(
        Command::new("rustup")
            .args(["component", "add", "--toolchain", "nightly"])
            .args(NIGHTLY_COMPONENTS),
    )
}

fn missing_packages() -> Result<Vec<&'static str>> {
    let out = output(
        Command::new("dpkg-query")
            .args(["-W", "-f=${Package} ${db:Status-Status}\\n"])
            .args(PACKAGES),
    )?
    .context("dpkg-query not found: `cargo xtask setup` supports Debian and its derivatives")?;
    // dpkg-query exits 1 when some package is unknown; the listing still says which are installed.
    let listing = String::from_utf8_lossy(&out.stdout);
    Ok(PACKAGES
        .iter()
        .copied()
        .filter(|pkg| !listing.lines().any(|l| l == format!("{pkg} installed")))
        .collect())
}

fn packages_missing() -> Result<Option<String>> {
    let missing = missing_packages()?;
    Ok((!missing.is_empty()).then(|| missing.join(" ")))
}

fn packages_install() -> Result<()> {
    let missing = missing_packages()?;
    status(
        Command::new("apt-get")
            .args(["-q", "-o", "Dpkg::Use-Pty=0", "update"])
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    status(
        Command::new("apt-get")
            .args(["-q", "-y", "-o", "Dpkg::Use-Pty=0", "install"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

fn bpf_linker_missing() -> Result<Option<String>> {
    let Some(out) = output(Command::new("bpf-linker").arg("--version"))? else {
        return Ok(Some("bpf-linker".to_owned()));
    };
    let version = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    if version != format!("bpf-linker {BPF_LINKER_VERSION}") {
        return Ok(Some(format!(
            "bpf-linker {BPF_LINKER_VERSION} (found `{version}`)"
        )));
    }
    // Built against LLVM 14 it fails at link time with "unable to find library -lLLVM".
    let path = output(Command::new("sh").args(["-c", "command -v bpf-linker"]))?
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let ldd = output(Command::new("ldd").arg(&path))?
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    if !ldd.contains("libLLVM.so.22") {
        return Ok(Some(format!(
            "bpf-linker linked against LLVM 22 ({path} is not)"
        )));
    }
    Ok(None)
}

fn bpf_linker_install() -> Result<()> {
    let path = std::env::var("PATH").unwrap_or_default();
    status(
        run::cargo()
            .args([
                "install",
                &format!("bpf-linker@{BPF_LINKER_VERSION}"),
                "--locked",
                "--force",
            ])
            .args(["--no-default-features", "--features", "llvm-22"])
            .env("PATH", format!("{LLVM_PREFIX}/bin:{path}"))
            .env("LLVM_PREFIX", LLVM_PREFIX),
    )
}

fn cargo_deb_missing() -> Result<Option<String>> {
    let found = output(run::cargo().args(["deb", "--version"]))?
        .filter(|out| out.status.success())
        .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_owned());
    Ok(match found {
        Some(version) if version.ends_with(CARGO_DEB_VERSION) => None,
        Some(version) => Some(format!("cargo-deb {CARGO_DEB_VERSION} (found `{version}`)")),
        None => Some("cargo-deb".to_owned()),
    })
}

fn cargo_deb_install() -> Result<()> {
    status(run::cargo().args([
        "install",
        &format!("cargo-deb@{CARGO_DEB_VERSION}"),
        "--locked",
        "--force",
    ]))
}

/// Every apt source file: the one-line list and the deb822 `.sources` files.
fn apt_source_files() -> Result<Vec<(std::path::PathBuf, String)>> {
    let mut files = Vec::new();
    let list = std::path::PathBuf::from("/etc/apt/sources.list");
    if let Ok(text) = std::fs::read_to_string(&list) {
        files.push((list, text));
    }
    if let Ok(dir) = std::fs::read_dir("/etc/apt/sources.list.d") {
        for entry in dir {
            let path = entry.context("reading /etc/apt/sources.list.d")?.path();
            let name = path.to_string_lossy();
            if name.ends_with(".sources") || name.ends_with(".list") {
                let text = std::fs::read_to_string(&path)
                    .with_context(|| format!("reading {}", path.display()))?;
                files.push((path, text));
            }
        }
    }
    Ok(files)
}

/// The Debian archive the machine already uses for `bookworm`: its URI and signing key.
#[derive(Debug, PartialEq)]
struct DebianSource {
    uri: String,
    signed_by: Option<String>,
}

/// Finds the stanza (deb822) or line (one-line format) that serves `bookworm` itself.
fn bookworm_source(text: &str) -> Option<DebianSource> {
    for stanza in text.split("\n\n") {
        let field = |name: &str| {
            stanza.lines().find_map(|l| {
                let (key, value) = l.split_once(':')?;
                (key.trim().eq_ignore_ascii_case(name)).then(|| value.trim().to_owned())
            })
        };
        let (Some(uris), Some(suites)) = (field("URIs"), field("Suites")) else {
            continue;
        };
        if field("Types").is_some_and(|t| !t.split_whitespace().any(|t| t == "deb")) {
            continue;
        }
        if suites.split_whitespace().any(|s| s == "bookworm") {
            let uri = uris.split_whitespace().next()?.to_owned();
            return Some(DebianSource {
                uri,
                signed_by: field("Signed-By"),
            });
        }
    }
    for line in text.lines() {
        let mut words = line.split_whitespace();
        if words.next() != Some("deb") {
            continue;
        }
        let mut words = words.skip_while(|w| w.starts_with('['));
        if let (Some(uri), Some("bookworm")) = (words.next(), words.next()) {
            return Some(DebianSource {
                uri: uri.to_owned(),
                signed_by: None,
            });
        }
    }
    None
}

fn backports_missing() -> Result<Option<String>> {
    let present = apt_source_files()?.iter().any(|(_, text)| {
        text.lines()
            .filter(|l| !l.trim_start().starts_with('#'))
            .any(|l| l.split_whitespace().any(|w| w == BACKPORTS_SUITE))
    });
    Ok((!present).then(|| format!("the {BACKPORTS_SUITE} suite")))
}

fn backports_add() -> Result<()> {
    let source = apt_source_files()?
        .iter()
        .find_map(|(_, text)| bookworm_source(text))
        .context(
            "no apt source serves Debian bookworm; add bookworm-backports to your sources by hand",
        )?;
    let mut stanza = format!(
        "# Added by `cargo xtask setup` for QEMU 10 (movarto); same archive as bookworm.\n\
         Types: deb\nURIs: {}\nSuites: {BACKPORTS_SUITE}\nComponents: main\n",
        source.uri
    );
    if let Some(key) = &source.signed_by {
        stanza.push_str(&format!("Signed-By: {key}\n"));
    }
    std::fs::write(BACKPORTS_SOURCE_FILE, stanza)
        .with_context(|| format!("writing {BACKPORTS_SOURCE_FILE}"))?;
    apt_update()
}

fn apt_update() -> Result<()> {
    status(
        Command::new("apt-get")
            .args(["-q", "-o", "Dpkg::Use-Pty=0", "update"])
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

/// The installed version of `package`, if it is installed.
fn installed_version(package: &str) -> Result<Option<String>> {
    let out = output(Command::new("dpkg-query").args([
        "-W",
        "-f=${db:Status-Status} ${Version}",
        package,
    ]))?
    .context("dpkg-query not found: `cargo xtask setup` supports Debian and its derivatives")?;
    let listing = String::from_utf8_lossy(&out.stdout);
    Ok(listing
        .strip_prefix("installed ")
        .map(|v| v.trim().to_owned()))
}

/// Whether a Debian version (`1:10.0.2+ds-...`) has the given upstream major version.
fn has_major(version: &str, major: &str) -> bool {
    let upstream = version.split_once(':').map_or(version, |(_, v)| v);
    upstream.split('.').next() == Some(major)
}

fn qemu_missing() -> Result<Option<String>> {
    match installed_version(QEMU_PACKAGE)? {
        Some(v) if has_major(&v, QEMU_MAJOR) => Ok(None),
        Some(v) => Ok(Some(format!("{QEMU_PACKAGE} {QEMU_MAJOR} (found {v})"))),
        None => Ok(Some(format!("{QEMU_PACKAGE} {QEMU_MAJOR}"))),
    }
}

fn qemu_install() -> Result<()> {
    let utils_before = installed_version("qemu-utils")?;
    // -t takes QEMU's own dependencies (qemu-system-common, -data) from backports too.
    status(
        Command::new("apt-get")
            .args(["-q", "-y", "-o", "Dpkg::Use-Pty=0", "install", "-t"])
            .arg(BACKPORTS_SUITE)
            .arg(QEMU_PACKAGE)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    if utils_before.is_some() && installed_version("qemu-utils")?.is_none() {
        bail!("installing {QEMU_PACKAGE} removed qemu-utils; reinstall it from {BACKPORTS_SUITE}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_bookworm_in_a_deb822_source_and_skips_security() {
        let text = "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\n\
                    Components: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n\
                    Types: deb\nURIs: http://mirror.example/debian-security\nSuites: bookworm-security\n";
        assert_eq!(
            bookworm_source(text),
            Some(DebianSource {
                uri: "http://mirror.example/debian".into(),
                signed_by: Some("/usr/share/keyrings/debian-archive-keyring.gpg".into()),
            })
        );
        let security_only =
            "Types: deb\nURIs: http://m/debian-security\nSuites: bookworm-security\n";
        assert_eq!(bookworm_source(security_only), None);
    }

    #[test]
    fn finds_bookworm_in_a_one_line_source() {
        let text = "# comment\ndeb-src http://m/debian bookworm main\n\
                    deb [arch=amd64] http://m/debian bookworm main contrib\n";
        assert_eq!(
            bookworm_source(text),
            Some(DebianSource {
                uri: "http://m/debian".into(),
                signed_by: None
            })
        );
    }

    #[test]
    fn qemu_major_is_read_from_the_debian_version() {
        assert!(has_major("1:10.0.2+ds-2+deb13u1~bpo12+1", "10"));
        assert!(!has_major("1:7.2+dfsg-7+deb12u18+b3", "10"));
        assert!(has_major("10.1.0-1", "10"));
    }
}
