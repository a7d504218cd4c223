//! The lab as an inventory: `lab.toml` for its two sites and the guest's service, and
//! `migrate web --to SITE --config lab.toml`, the short form an operator types.

use std::{
    ffi::OsString,
    fs,
    path::PathBuf,
    process::{Command, Output, Stdio},
};

use anyhow::{Context as _, Result};
use movarto_lab::{dns_server::SERVICE, lab::*, movarto_user};

use crate::extra_vm::ExtraVm;

/// Writes the lab's inventory into its scratch directory (each site's VM spec in the
/// site's `spec_dir`) and returns its path. `defaults` is added to `[defaults]`.
pub fn write_lab_inventory(l: &Lab, defaults: &str) -> Result<PathBuf> {
    write_lab_inventory_with(l, defaults, &[])
}

/// [`write_lab_inventory`] with more VMs beside the lab's guest, each a service with its
/// spec at both sites, its tap, its `N` at B and its DNS name `<name>.example.test`.
pub fn write_lab_inventory_with(l: &Lab, defaults: &str, extra: &[ExtraVm]) -> Result<PathBuf> {
    let mut sites = String::new();
    for (site, tunnel, uplink) in [("a", TA, &l.uplink_a), ("b", TB, &l.uplink_b)] {
        let spec_dir = l.scratch.join(format!("specs-{site}"));
        fs::create_dir_all(&spec_dir).with_context(|| format!("{}", spec_dir.display()))?;
        fs::write(spec_dir.join("web.toml"), l.guest_spec(site)?)
            .with_context(|| format!("the spec in {}", spec_dir.display()))?;
        for vm in extra {
            fs::write(spec_dir.join(format!("{}.toml", vm.name)), vm.spec(l, site))
                .with_context(|| format!("{}'s spec in {}", vm.name, spec_dir.display()))?;
        }
        sites.push_str(&format!(
            r#"
[sites.{site}]
agent = "http://{tunnel}:{AGENT_PORT}"
token_file = "token-{site}"
tunnel = "{tunnel}"
uplink = "{uplink}"
gateway_mac = "{GATEWAY_MAC}"
gateway_cidr = "{GATEWAY_CIDR}"
spec_dir = "{spec_dir}"
"#,
            spec_dir = spec_dir.display(),
        ));
    }
    let text = format!(
        r#"# The lab's two sites and its guest, as docs/inventory.md describes.
[defaults]
skip_ttl_wait = true
dns_server = "{server}"
zone = "example.test"
dns_key_file = "{key}"
{defaults}
{sites}
[services.web]
home = "{H}"
home_site = "a"
dns_name = "{SERVICE}"

[services.web.at.b]
new_addr = "{N}"
{more}"#,
        server = l.bind.server_addr(),
        key = l.bind.key_file().display(),
        more = extra
            .iter()
            .map(|vm| format!(
                r#"
[services.{name}]
home = "{home}"
home_site = "{home_site}"
vm_iface = "{tap}"
dns_name = "{name}.example.test."

[services.{name}.at.{other}]
new_addr = "{new}"
"#,
                name = vm.name,
                home = vm.home,
                home_site = vm.home_site,
                other = vm.other_site(),
                tap = vm.tap,
                new = vm.new_addr,
            ))
            .collect::<String>(),
    );
    // Relative token paths: they start at the inventory's own directory.
    let path = l.scratch.join("lab.toml");
    fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// `movarto-user migrate web --to SITE --config PATH --json` in the ops namespace, as
/// [`Lab::migrate_command`] runs the long form; `extra` adds flags.
pub fn short_migrate_command(
    l: &Lab,
    to: &str,
    config: &std::path::Path,
    extra: &[&str],
) -> Result<Command> {
    let mut migrate = Command::new("nsenter");
    migrate
        .arg(format!("--net=/run/netns/{}", l.bind.client.name()))
        .arg(movarto_user()?)
        .args(["migrate", "web", "--to", to, "--json", "--config"])
        .arg(config)
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    Ok(migrate)
}

/// `movarto-user ARGS --config PATH` in the ops namespace, with no agent flags: the
/// inventory names them. Its output, shown on stderr.
pub fn run_with_inventory(l: &Lab, config: &std::path::Path, args: &[&str]) -> Output {
    let mut all: Vec<OsString> = args.iter().map(OsString::from).collect();
    all.extend(["--config".into(), config.into()]);
    crate::migration::run_in_ops(l, &all)
}
