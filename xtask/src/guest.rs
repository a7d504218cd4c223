//! `cargo xtask guest`: the test guest, built once and cached under `target/guest/`.
//!
//! - Debian's kernel: the image package that `linux-image-amd64` depends on, fetched with
//!   `apt-get download` and unpacked with `dpkg -x` (never installed on the host). Only
//!   `vmlinuz` and the virtio modules are kept, in `target/guest/kernel/<release>/`.
//! - A busybox initramfs (newc cpio, gzip) whose `/init` loads the virtio modules in
//!   dependency order, configures eth0 from the kernel command line
//!   (`movarto.ip=<addr/len> movarto.gw=<addr>`) and runs the test server.
//! - The test server, `tests/guest-server`, linked statically (`+crt-static`, glibc).
//!
//! Results: `target/guest/vmlinuz` and `target/guest/initramfs.cpio.gz`. The initramfs is
//! rewritten only when the hash of its inputs changes, so a second build takes well
//! under a second.

use std::{
    fs,
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, Result, bail};

use crate::run::{cargo, describe, output, status, workspace_root};

/// The meta-package whose dependency names the current kernel image package.
const KERNEL_META_PACKAGE: &str = "linux-image-amd64";

/// Loaded by `/init` in this order (each needs the ones before it). A module the kernel
/// has built in is simply not shipped.
pub const VIRTIO_MODULES: &[&str] = &[
    "virtio_ring",
    "virtio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "failover",
    "net_failover",
    "virtio_net",
    // For the optional disk; after the NIC so networking never waits on it.
    "virtio_blk",
];

const BUSYBOX: &str = "/bin/busybox";
const SERVER_PACKAGE: &str = "movarto-guest-server";
const HOST_TARGET: &str = "x86_64-unknown-linux-gnu";

pub fn guest_dir() -> PathBuf {
    workspace_root().join("target").join("guest")
}

/// Builds (or finds cached) the guest kernel and initramfs.
pub fn build() -> Result<()> {
    let started = Instant::now();
    let dir = guest_dir();
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;

    let kernel_dir = fetch_kernel(&dir)?;
    let server = build_server(&dir)?;
    let busybox = fs::read(BUSYBOX).with_context(|| {
        format!("reading {BUSYBOX}; install busybox-static (`cargo xtask setup`)")
    })?;

    let mut archive = Cpio::default();
    for d in [
        "bin",
        "sbin",
        "dev",
        "proc",
        "sys",
        "tmp",
        "etc",
        "root",
        "lib",
        "lib/modules",
    ] {
        archive.dir(d);
    }
    // The kernel opens /dev/console for PID 1 before /init could mount devtmpfs.
    archive.char_device("dev/console", 5, 1);
    archive.file("init", 0o755, init_script(&kernel_dir)?.into_bytes());
    archive.file("bin/busybox", 0o755, busybox);
    archive.file(
        "bin/movarto-guest-server",
        0o755,
        fs::read(&server).with_context(|| format!("reading {}", server.display()))?,
    );
    for module in shipped_modules(&kernel_dir)? {
        let path = kernel_dir.join("modules").join(format!("{module}.ko"));
        let bytes = fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        archive.file(&format!("lib/modules/{module}.ko"), 0o644, bytes);
    }
    let cpio = archive.finish();

    let kernel_src = kernel_dir.join("vmlinuz");
    let kernel = dir.join("vmlinuz");
    let initramfs = dir.join("initramfs.cpio.gz");
    let key_path = dir.join("initramfs.key");
    let vmlinuz_bytes =
        fs::read(&kernel_src).with_context(|| format!("reading {}", kernel_src.display()))?;
    let key = format!("{:016x}-{:016x}", fnv1a(&cpio), fnv1a(&vmlinuz_bytes));
    let cached = fs::read_to_string(&key_path).is_ok_and(|k| k.trim() == key)
        && initramfs.exists()
        && kernel.exists();
    if cached {
        println!(
            "guest: up to date ({} and {}, {:.1} s)",
            kernel.display(),
            initramfs.display(),
            started.elapsed().as_secs_f64()
        );
    } else {
        write_atomically(&kernel, &vmlinuz_bytes)?;
        write_atomically(&initramfs, &gzip(&cpio)?)?;
        fs::write(&key_path, &key).with_context(|| format!("writing {}", key_path.display()))?;
        println!(
            "guest: built {} and {} in {:.1} s",
            kernel.display(),
            initramfs.display(),
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

/// The kernel image package `linux-image-amd64` currently depends on, e.g.
/// `linux-image-6.1.0-56-amd64`.
fn kernel_package() -> Result<String> {
    let out = output(Command::new("apt-cache").args(["depends", KERNEL_META_PACKAGE]))?
        .context("apt-cache not found: the guest kernel comes from Debian's archive")?;
    if !out.status.success() {
        bail!(
            "apt-cache depends {KERNEL_META_PACKAGE} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().trim_start_matches('|').strip_prefix("Depends: "))
        .map(str::trim)
        .find(|p| p.starts_with("linux-image-") && !p.starts_with('<'))
        .map(str::to_owned)
        .with_context(|| {
            format!("`apt-cache depends {KERNEL_META_PACKAGE}` names no linux-image package")
        })
}

/// Downloads and unpacks the kernel unless `target/guest/kernel/<release>/` is complete.
fn fetch_kernel(dir: &Path) -> Result<PathBuf> {
    let package = kernel_package()?;
    let release = package
        .strip_prefix("linux-image-")
        .context("kernel package name")?
        .to_owned();
    let kernel_dir = dir.join("kernel").join(&release);
    let complete = kernel_dir.join("complete");
    if complete.exists() {
        return Ok(kernel_dir);
    }
    println!("guest: fetching {package} (not installed on the host)");
    let work = dir.join("download");
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    // As root, apt would otherwise try to drop to the _apt user, who cannot write here.
    status(
        Command::new("apt-get")
            .args(["-q", "-o", "APT::Sandbox::User=root", "download", &package])
            .current_dir(&work),
    )?;
    let deb = fs::read_dir(&work)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .with_context(|| format!("apt-get download {package} left no .deb"))?;
    let unpacked = work.join("root");
    status(Command::new("dpkg").arg("-x").arg(&deb).arg(&unpacked))?;

    let _ = fs::remove_dir_all(&kernel_dir);
    let modules_out = kernel_dir.join("modules");
    fs::create_dir_all(&modules_out)?;
    let vmlinuz = unpacked.join("boot").join(format!("vmlinuz-{release}"));
    fs::copy(&vmlinuz, kernel_dir.join("vmlinuz"))
        .with_context(|| format!("copying {}", vmlinuz.display()))?;
    let modules_root = unpacked.join("lib/modules").join(&release);
    let builtin = fs::read_to_string(modules_root.join("modules.builtin")).unwrap_or_default();
    fs::write(kernel_dir.join("modules.builtin"), &builtin)?;
    let index = module_index(&modules_root)?;
    for module in VIRTIO_MODULES {
        let Some(path) = index.iter().find(|p| module_name(p) == Some(*module)) else {
            if is_builtin(&builtin, module) {
                continue;
            }
            bail!("{package} has neither a {module}.ko nor a built-in {module}");
        };
        let bytes = decompress_module(path)?;
        fs::write(modules_out.join(format!("{module}.ko")), bytes)?;
    }
    fs::write(&complete, &package)?;
    fs::remove_dir_all(&work).with_context(|| format!("removing {}", work.display()))?;
    Ok(kernel_dir)
}

/// The modules of [`VIRTIO_MODULES`] shipped as files, in load order.
fn shipped_modules(kernel_dir: &Path) -> Result<Vec<&'static str>> {
    Ok(VIRTIO_MODULES
        .iter()
        .copied()
        .filter(|m| kernel_dir.join("modules").join(format!("{m}.ko")).exists())
        .collect())
}

fn is_builtin(modules_builtin: &str, module: &str) -> bool {
    modules_builtin
        .lines()
        .any(|l| module_name(Path::new(l)) == Some(module))
}

/// `kernel/drivers/virtio/virtio_ring.ko.xz` -> `virtio_ring`.
fn module_name(path: &Path) -> Option<&str> {
    let name = path.file_name()?.to_str()?;
    let stem = name.split(".ko").next()?;
    (name.len() > stem.len()).then_some(stem)
}

fn module_index(root: &Path) -> Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    let mut pending = vec![root.join("kernel")];
    while let Some(dir) = pending.pop() {
        for entry in fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                pending.push(path);
            } else if module_name(&path).is_some() {
                found.push(path);
            }
        }
    }
    Ok(found)
}

/// busybox's insmod takes plain ELF; newer Debian kernels compress their modules.
fn decompress_module(path: &Path) -> Result<Vec<u8>> {
    let name = path.to_string_lossy();
    let tool = if name.ends_with(".ko") {
        return fs::read(path).with_context(|| format!("reading {name}"));
    } else if name.ends_with(".ko.xz") {
        "xz"
    } else if name.ends_with(".ko.zst") {
        "zstd"
    } else if name.ends_with(".ko.gz") {
        "gzip"
    } else {
        bail!("unknown module compression: {name}");
    };
    let out = output(Command::new(tool).args(["-d", "-c"]).arg(path))?
        .with_context(|| format!("{tool} not found, needed to decompress {name}"))?;
    if !out.status.success() {
        bail!("{tool} -d {name} failed");
    }
    Ok(out.stdout)
}

fn build_server(dir: &Path) -> Result<PathBuf> {
    let target_dir = dir.join("cargo");
    let mut cmd = cargo();
    cmd.args([
        "build",
        "--quiet",
        "--release",
        "-p",
        SERVER_PACKAGE,
        "--bin",
        SERVER_PACKAGE,
        "--target",
        HOST_TARGET,
    ])
    .arg("--target-dir")
    .arg(&target_dir)
    // Static glibc: the initramfs has no dynamic loader. With an explicit --target these
    // flags reach only the target, not build scripts.
    .env("RUSTFLAGS", "-C target-feature=+crt-static");
    status(&mut cmd).with_context(|| format!("building the guest server: {}", describe(&cmd)))?;
    let bin = target_dir
        .join(HOST_TARGET)
        .join("release")
        .join(SERVER_PACKAGE);
    let elf = fs::read(&bin).with_context(|| format!("reading {}", bin.display()))?;
    if contains(&elf, b"/lib64/ld-linux") {
        bail!("{} is dynamically linked", bin.display());
    }
    Ok(bin)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn init_script(kernel_dir: &Path) -> Result<String> {
    let modules = shipped_modules(kernel_dir)?.join(" ");
    Ok(format!(
        r#"#!/bin/busybox sh
# PID 1 of movarto's test guest (written by `cargo xtask guest`).
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
# Dependency order; modules the kernel has built in are not shipped.
for m in {modules}; do
    insmod /lib/modules/$m.ko || echo "movarto-guest: insmod $m failed"
done
ip=
gw=
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        movarto.ip=*) ip="${{arg#movarto.ip=}}" ;;
        movarto.gw=*) gw="${{arg#movarto.gw=}}" ;;
    esac
done
ip link set lo up
ip link set eth0 up
[ -n "$ip" ] && ip addr add "$ip" dev eth0
[ -n "$gw" ] && ip route add default via "$gw"
echo "movarto-guest: eth0 $ip via $gw"
while true; do
    /bin/movarto-guest-server
    echo "movarto-guest: server exited ($?); restarting"
    sleep 1
done
"#
    ))
}

fn gzip(data: &[u8]) -> Result<Vec<u8>> {
    let mut child = Command::new("gzip")
        .args(["-n", "-6", "-c"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting gzip")?;
    let mut stdin = child.stdin.take().context("gzip stdin")?;
    let input = data.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let out = child.wait_with_output().context("running gzip")?;
    writer
        .join()
        .map_err(|_| anyhow::anyhow!("gzip writer panicked"))?
        .context("writing to gzip")?;
    if !out.status.success() {
        bail!("gzip failed ({})", out.status);
    }
    Ok(out.stdout)
}

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))
}

/// 64-bit FNV-1a: stable across Rust releases, unlike `DefaultHasher`.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, b| {
        (hash ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// A newc ("070701") cpio archive, the format the kernel unpacks into its initramfs.
/// Deterministic: every entry has mtime 0 and owner root.
#[derive(Default)]
struct Cpio {
    out: Vec<u8>,
    next_inode: u32,
}

impl Cpio {
    fn dir(&mut self, name: &str) {
        self.entry(name, 0o040_755, (0, 0), &[]);
    }

    fn file(&mut self, name: &str, perm: u32, data: Vec<u8>) {
        self.entry(name, 0o100_000 | perm, (0, 0), &data);
    }

    fn char_device(&mut self, name: &str, major: u32, minor: u32) {
        self.entry(name, 0o020_600, (major, minor), &[]);
    }

    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
        self.next_inode += 1;
        let name_len = name.len() + 1;
        let fields = [
            self.next_inode,
            mode,
            0, // uid
            0, // gid
            1, // nlink
            0, // mtime
            data.len() as u32,
            0, // devmajor
            0, // devminor
            rdev.0,
            rdev.1,
            name_len as u32,
            0, // check
        ];
        self.out.extend_from_slice(b"070701");
        for field in fields {
            self.out
                .extend_from_slice(format!("{field:08x}").as_bytes());
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }

    fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_names_strip_every_compression() {
        for p in [
            "kernel/drivers/virtio/virtio_ring.ko",
            "kernel/drivers/virtio/virtio_ring.ko.xz",
            "kernel/drivers/virtio/virtio_ring.ko.zst",
        ] {
            assert_eq!(module_name(Path::new(p)), Some("virtio_ring"));
        }
        assert_eq!(module_name(Path::new("modules.builtin")), None);
    }

    #[test]
    fn cpio_entries_are_aligned_and_terminated() {
        let mut cpio = Cpio::default();
        cpio.file("init", 0o755, b"#!/bin/sh\n".to_vec());
        let bytes = cpio.finish();
        assert!(bytes.starts_with(b"070701"));
        assert!(bytes.len().is_multiple_of(4));
        assert!(contains(&bytes, b"TRAILER!!!"));
    }
}
