//! A VM's definition in TOML, and the QEMU command line it gives.
//!
//! ```toml
//! name = "web"
//! memory_mib = 256
//! vcpus = 1
//! qmp_socket = "/run/movarto/web.qmp"
//! kernel = "target/guest/vmlinuz"            # or: disk = "web.qcow2"
//! initrd = "target/guest/initramfs.cpio.gz"
//! append = "console=ttyS0 movarto.ip=192.0.2.10/24 movarto.gw=192.0.2.1"
//! netns = "site-a"                            # optional: run QEMU inside this namespace
//! serial_log = "/run/movarto/web.console"     # optional
//!
//! [nic]
//! mac = "52:54:00:00:00:10"
//! tap = "tap0"
//! ```
//!
//! The same spec starts the destination of a migration: [`VmSpec::qemu_args`] with
//! [`Role::Incoming`] adds `-incoming defer`, so the caller picks the address later with
//! `migrate-incoming`.

use std::{
    fmt,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};
use serde::Deserialize;

/// The QEMU binary; TCG works everywhere, KVM only where the host allows it.
pub const QEMU_BINARY: &str = "qemu-system-x86_64";

/// The disk's format node: the same name at both ends of a migration, so the destination
/// can export it over NBD and the source can mirror it (see [`super::mirror`]).
pub const DISK_NODE: &str = "disk0";

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    pub name: String,
    pub memory_mib: u32,
    #[serde(default = "one")]
    pub vcpus: u32,
    pub qmp_socket: PathBuf,
    pub kernel: Option<PathBuf>,
    pub initrd: Option<PathBuf>,
    /// The kernel command line (only with `kernel`).
    pub append: Option<String>,
    /// A disk image: the boot disk without `kernel`, or an extra disk with it.
    pub disk: Option<PathBuf>,
    /// `raw` or `qcow2`; default `raw`.
    #[serde(default)]
    pub disk_format: DiskFormat,
    pub nic: Nic,
    /// A network namespace to run QEMU in (the site's host, in the lab).
    pub netns: Option<String>,
    /// Where the serial console goes; default: nowhere.
    pub serial_log: Option<PathBuf>,
    /// `tcg` (default; works everywhere) or `kvm`.
    #[serde(default)]
    pub accel: Accel,
    /// Keep the VM paused once it has booted or arrived (QEMU `-S`) until a QMP `cont`:
    /// to inspect a migrated guest's memory before it runs again.
    #[serde(default)]
    pub start_paused: bool,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Nic {
    pub mac: String,
    pub tap: String,
    /// Let the guest leave checksums to the host (virtio `csum`); default on. Off where
    /// frames cross veths with XDP (a lab), which never finish a partial checksum.
    #[serde(default = "yes")]
    pub checksum_offload: bool,
    /// The MTU the guest's NIC announces (virtio `host_mtu`): set it to the tunnel MTU
    /// minus movarto's 40 bytes, and the VM never sends a packet the tunnel cannot carry
    /// nor advertises an MSS that needs clamping.
    pub mtu: Option<u16>,
}

fn yes() -> bool {
    true
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    #[default]
    Raw,
    Qcow2,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    #[default]
    Tcg,
    Kvm,
}

fn one() -> u32 {
    1
}

impl fmt::Display for DiskFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Raw => "raw",
            Self::Qcow2 => "qcow2",
        })
    }
}

/// Whether QEMU boots the guest or waits for a migration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Boot,
    /// `-incoming defer`: waits for `migrate-incoming`.
    Incoming,
}

impl VmSpec {
    /// Parses and validates; every error names the offending field.
    pub fn parse(text: &str) -> Result<Self> {
        let spec: Self = toml::from_str(text).map_err(|err| anyhow::anyhow!("{err}"))?;
        spec.validate()?;
        Ok(spec)
    }

    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading VM spec {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("invalid VM spec {}", path.display()))
    }

    pub fn validate(&self) -> Result<()> {
        if self.name.is_empty()
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            bail!(
                "field `name`: {:?} must be non-empty letters, digits, `-` or `_`",
                self.name
            );
        }
        if self.memory_mib < 64 {
            bail!(
                "field `memory_mib`: {} MiB is too little for a guest (at least 64)",
                self.memory_mib
            );
        }
        if self.vcpus == 0 || self.vcpus > 64 {
            bail!("field `vcpus`: {} must be 1 to 64", self.vcpus);
        }
        if self.kernel.is_none() && self.disk.is_none() {
            bail!("fields `kernel` and `disk`: one is needed to boot the guest");
        }
        if self.kernel.is_none() && (self.initrd.is_some() || self.append.is_some()) {
            bail!("fields `initrd` and `append` need `kernel`");
        }
        parse_mac(&self.nic.mac).with_context(|| format!("field `nic.mac`: {:?}", self.nic.mac))?;
        if let Some(mtu) = self.nic.mtu
            && !(576..=9000).contains(&mtu)
        {
            bail!("field `nic.mtu`: {mtu} must be 576 to 9000");
        }
        if self.nic.tap.is_empty() || self.nic.tap.len() > 15 || self.nic.tap.contains(['/', ' ']) {
            bail!(
                "field `nic.tap`: {:?} is not an interface name (1 to 15 characters, no `/` or space)",
                self.nic.tap
            );
        }
        if self.qmp_socket.as_os_str().is_empty() {
            bail!("field `qmp_socket` is empty");
        }
        if let Some(ns) = &self.netns
            && (ns.is_empty() || ns.contains('/'))
        {
            bail!("field `netns`: {ns:?} is not a namespace name");
        }
        Ok(())
    }

    /// QEMU's arguments (without the binary) for this VM.
    pub fn qemu_args(&self, role: Role) -> Vec<String> {
        let mut args: Vec<String> = Vec::new();
        let mut push = |parts: &[&str]| args.extend(parts.iter().map(|s| (*s).to_owned()));
        push(&["-name", &self.name]);
        // A fixed machine type, so both ends of a migration build the same device model.
        push(&["-machine", "pc-i440fx-7.2"]);
        match self.accel {
            Accel::Tcg => push(&["-accel", "tcg"]),
            Accel::Kvm => push(&["-accel", "kvm", "-cpu", "host"]),
        }
        push(&["-m", &self.memory_mib.to_string()]);
        push(&["-smp", &self.vcpus.to_string()]);
        push(&["-nodefaults", "-no-user-config", "-display", "none"]);
        // A guest that panics or reboots ends QEMU instead of looping.
        push(&["-no-reboot"]);
        let serial = match &self.serial_log {
            Some(path) => format!("file:{}", path.display()),
            None => "null".to_owned(),
        };
        push(&["-serial", &serial]);
        if let Some(kernel) = &self.kernel {
            push(&["-kernel", &kernel.display().to_string()]);
            if let Some(initrd) = &self.initrd {
                push(&["-initrd", &initrd.display().to_string()]);
            }
            if let Some(append) = &self.append {
                push(&["-append", append]);
            }
        }
        if let Some(disk) = &self.disk {
            push(&[
                "-blockdev",
                &format!(
                    "driver=file,node-name={DISK_NODE}-file,filename={},cache.direct=off",
                    disk.display()
                ),
                "-blockdev",
                &format!(
                    "driver={},node-name={DISK_NODE},file={DISK_NODE}-file",
                    self.disk_format
                ),
                "-device",
                &format!("virtio-blk-pci,drive={DISK_NODE},id={DISK_NODE}-dev"),
            ]);
        }
        push(&[
            "-netdev",
            &format!(
                "tap,id=net0,ifname={},script=no,downscript=no",
                self.nic.tap
            ),
            // No option ROM: the kernel is loaded directly, and iPXE only slows boot.
            "-device",
            &format!(
                "virtio-net-pci,netdev=net0,mac={},romfile={}{}",
                self.nic.mac,
                if self.nic.checksum_offload {
                    ""
                } else {
                    ",csum=off,guest_csum=off"
                },
                self.nic
                    .mtu
                    .map_or_else(String::new, |mtu| format!(",host_mtu={mtu}"))
            ),
        ]);
        push(&[
            "-qmp",
            &format!("unix:{},server=on,wait=off", self.qmp_socket.display()),
        ]);
        if self.start_paused {
            push(&["-S"]);
        }
        if role == Role::Incoming {
            push(&["-incoming", "defer"]);
        }
        args
    }

    /// The full command: QEMU, run through `ip netns exec` when the spec names a namespace.
    pub fn command(&self, role: Role) -> std::process::Command {
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut cmd = std::process::Command::new("ip");
                cmd.args(["netns", "exec", ns, QEMU_BINARY]);
                cmd
            }
            None => std::process::Command::new(QEMU_BINARY),
        };
        cmd.args(self.qemu_args(role));
        cmd
    }
}

fn parse_mac(mac: &str) -> Result<[u8; 6]> {
    let movarto_common::ids::MacAddr(out) = mac.parse()?;
    if out[0] & 1 != 0 {
        bail!("a multicast address cannot be a NIC's");
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
name = "web"
memory_mib = 256
qmp_socket = "/run/movarto/web.qmp"
kernel = "vmlinuz"
initrd = "initramfs.cpio.gz"
append = "console=ttyS0"

[nic]
mac = "52:54:00:00:00:10"
tap = "tap0"
"#;

    fn error_of(text: &str) -> String {
        format!("{:#}", VmSpec::parse(text).expect_err("must be rejected"))
    }

    #[test]
    fn a_good_spec_gives_the_expected_command_line() {
        let spec = VmSpec::parse(GOOD).expect("valid");
        assert_eq!(spec.vcpus, 1);
        let boot = spec.qemu_args(Role::Boot).join(" ");
        assert!(boot.contains("-m 256"), "{boot}");
        assert!(boot.contains("-accel tcg"), "{boot}");
        assert!(boot.contains("ifname=tap0"), "{boot}");
        assert!(boot.contains("mac=52:54:00:00:00:10"), "{boot}");
        assert!(
            boot.contains("unix:/run/movarto/web.qmp,server=on,wait=off"),
            "{boot}"
        );
        assert!(!boot.contains("-incoming"), "{boot}");
        assert!(!boot.contains("host_mtu"), "{boot}");
        let small = VmSpec::parse(&GOOD.replace("[nic]", "[nic]\nmtu = 1460"))
            .expect("valid with an MTU")
            .qemu_args(Role::Boot)
            .join(" ");
        assert!(small.contains(",host_mtu=1460"), "{small}");
        let incoming = spec.qemu_args(Role::Incoming).join(" ");
        assert!(incoming.ends_with("-incoming defer"), "{incoming}");
        assert!(!incoming.contains(" -S"), "{incoming}");
        let paused = VmSpec::parse(&GOOD.replace("[nic]", "start_paused = true\n\n[nic]"))
            .expect("valid paused")
            .qemu_args(Role::Incoming)
            .join(" ");
        assert!(paused.ends_with("-S -incoming defer"), "{paused}");
        let with_disk = VmSpec::parse(&GOOD.replace("[nic]", "disk = \"vm.img\"\n\n[nic]"))
            .expect("valid with a disk")
            .qemu_args(Role::Incoming)
            .join(" ");
        // Both ends name the disk node alike, so the mirror can address it.
        assert!(
            with_disk.contains("driver=raw,node-name=disk0,file=disk0-file"),
            "{with_disk}"
        );
        assert!(
            with_disk.contains("virtio-blk-pci,drive=disk0"),
            "{with_disk}"
        );
    }

    #[test]
    fn errors_name_the_field() {
        let typo = GOOD.replace("memory_mib", "memory_mb");
        assert!(error_of(&typo).contains("memory_mb"), "{}", error_of(&typo));
        let missing = GOOD.replace("memory_mib = 256\n", "");
        assert!(
            error_of(&missing).contains("memory_mib"),
            "{}",
            error_of(&missing)
        );
        let bad_mac = GOOD.replace("52:54:00:00:00:10", "52:54:00:00:10");
        assert!(
            error_of(&bad_mac).contains("nic.mac"),
            "{}",
            error_of(&bad_mac)
        );
        let tiny_mtu = GOOD.replace("[nic]", "[nic]\nmtu = 100");
        assert!(
            error_of(&tiny_mtu).contains("nic.mtu"),
            "{}",
            error_of(&tiny_mtu)
        );
        let wrong_type = GOOD.replace("memory_mib = 256", "memory_mib = \"lots\"");
        assert!(
            error_of(&wrong_type).contains("memory_mib"),
            "{}",
            error_of(&wrong_type)
        );
        let no_boot = GOOD
            .replace("kernel = \"vmlinuz\"\n", "")
            .replace("initrd = \"initramfs.cpio.gz\"\n", "")
            .replace("append = \"console=ttyS0\"\n", "");
        assert!(
            error_of(&no_boot).contains("`kernel`"),
            "{}",
            error_of(&no_boot)
        );
        let long_tap = GOOD.replace("tap0", "a-very-long-tap-name");
        assert!(
            error_of(&long_tap).contains("nic.tap"),
            "{}",
            error_of(&long_tap)
        );
    }
}
