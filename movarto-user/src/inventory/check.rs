//! What serde can't see: required keys, addresses and their families, references between
//! entries, addresses used twice, and (for `config check`) the files the inventory names.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
    str::FromStr as _,
};

use ipnet::IpNet;

use super::{
    Inventory, Problem, Service,
    parse::{Doc, problem, span_of},
};
use crate::{agent::token::Token, dns::key::TsigKey, migrate::AddressMode, qemu::spec::VmSpec};

/// Collects problems, each at its key's position.
struct Problems<'a> {
    doc: &'a Doc,
    found: Vec<Problem>,
}

impl Problems<'_> {
    fn at(&mut self, path: &[&str], message: impl Into<String>) {
        let key = path.join(".");
        let span = span_of(self.doc, path);
        self.found
            .push(problem(self.doc, &key, span, message.into()));
    }

    /// An error from the library's own parsers and readers, in full.
    fn check<T, E: std::fmt::Display>(&mut self, path: &[&str], result: Result<T, E>) {
        if let Err(err) = result {
            self.at(path, err.to_string());
        }
    }
}

pub(super) fn semantic(doc: &Doc, inventory: &Inventory, open_files: bool) -> Vec<Problem> {
    let mut p = Problems {
        doc,
        found: Vec::new(),
    };
    sites(&mut p, inventory, open_files);
    defaults(&mut p, inventory, open_files);
    let mut addresses: BTreeMap<String, String> = BTreeMap::new();
    let mut vms: BTreeMap<String, String> = BTreeMap::new();
    for (name, service) in &inventory.services {
        self::service(&mut p, inventory, name, service, open_files);
        let vm = service.vm_name(name).to_owned();
        let here = format!("services.{name}");
        if let Some(first) = vms.insert(vm.clone(), here.clone()) {
            p.at(
                &["services", name],
                format!("VM {vm:?} is also the VM of {first}"),
            );
        }
        // H and every N name one service each: two would steal each other's packets.
        let mut used = Vec::new();
        if let Some(home) = service.home {
            used.push((home, vec!["services", name, "home"]));
        }
        for (site, at) in &service.at {
            if let Some(new) = at.new_addr {
                used.push((new, vec!["services", name, "at", site, "new_addr"]));
            }
        }
        for (address, path) in used {
            let key = path.join(".");
            match addresses.get(&address.to_string()) {
                Some(first) if !first.starts_with(&format!("{here}.")) => {
                    p.at(&path, format!("{address} is also {first}"));
                }
                _ => {
                    addresses.insert(address.to_string(), key);
                }
            }
        }
    }
    p.found
}

fn sites(p: &mut Problems<'_>, inventory: &Inventory, open_files: bool) {
    let mut tunnels = BTreeMap::new();
    let mut agents = BTreeMap::new();
    for (name, site) in &inventory.sites {
        let key = |k: &'static str| ["sites", name.as_str(), k];
        for (missing, k) in [
            (site.agent.is_none(), "agent"),
            (site.token_file.is_none(), "token_file"),
            (site.tunnel.is_none(), "tunnel"),
        ] {
            // A key with a bad value is absent from the typed site, and already named.
            if missing && span_of(p.doc, &["sites", name, k]) == span_of(p.doc, &["sites", name]) {
                p.at(&["sites", name], format!("missing `{k}`"));
            }
        }
        if let Some(agent) = &site.agent {
            match reqwest::Url::parse(agent) {
                Ok(url) if ["http", "https"].contains(&url.scheme()) => {}
                Ok(url) => p.at(
                    &key("agent"),
                    format!(
                        "{agent:?}: expected http:// or https://, not {}:",
                        url.scheme()
                    ),
                ),
                Err(err) => p.at(&key("agent"), format!("{agent:?} is not a URL: {err}")),
            }
            if let Some(first) = agents.insert(agent.clone(), name.clone()) {
                p.at(
                    &key("agent"),
                    format!("{agent} is also site {first}'s agent"),
                );
            }
        }
        if let Some(tunnel) = site.tunnel
            && let Some(first) = tunnels.insert(tunnel, name.clone())
        {
            p.at(
                &key("tunnel"),
                format!("{tunnel} is also site {first}'s tunnel endpoint"),
            );
        }
        if let Some(cidr) = &site.gateway_cidr {
            p.check(
                &key("gateway_cidr"),
                IpNet::from_str(cidr).map_err(|err| format!("{cidr:?}: {err} (e.g. 192.0.2.1/24)")),
            );
        }
        for (port, k) in [
            (site.migration_port, "migration_port"),
            (site.nbd_port, "nbd_port"),
        ] {
            if port == Some(0) {
                p.at(&key(k), "port 0");
            }
        }
        if let Some(mtu) = site.tunnel_mtu {
            mtu_in_range(p, &key("tunnel_mtu"), mtu);
        }
        if open_files {
            if let Some(path) = &site.token_file {
                p.check(
                    &key("token_file"),
                    Token::from_file(&inventory.path(path)).map_err(alt),
                );
            }
            if let Some(path) = &site.ca_cert {
                readable(p, &key("ca_cert"), &inventory.path(path));
            }
            if let Some(dir) = &site.spec_dir
                && !inventory.path(dir).is_dir()
            {
                p.at(
                    &key("spec_dir"),
                    format!("{} is not a directory", inventory.path(dir).display()),
                );
            }
        }
    }
}

fn defaults(p: &mut Problems<'_>, inventory: &Inventory, open_files: bool) {
    let d = &inventory.defaults;
    let key = |k: &'static str| ["defaults", k];
    dns_keys(
        p,
        &["defaults"],
        d.dns_server.as_deref(),
        d.zone.as_deref(),
        None,
    );
    if d.agent_timeout.is_some_and(|t| t.is_zero()) {
        p.at(&key("agent_timeout"), "must be positive");
    }
    if let Some(mtu) = d.tunnel_mtu {
        mtu_in_range(p, &key("tunnel_mtu"), mtu);
    }
    if open_files {
        if let Some(path) = &d.ca_cert {
            readable(p, &key("ca_cert"), &inventory.path(path));
        }
        if let Some(path) = &d.dns_key_file {
            p.check(
                &key("dns_key_file"),
                TsigKey::from_file(&inventory.path(path)).map_err(alt),
            );
        }
    }
}

fn service(p: &mut Problems<'_>, inventory: &Inventory, name: &str, s: &Service, open_files: bool) {
    let key = |k: &'static str| ["services", name, k];
    let d = &inventory.defaults;
    if s.home.is_none() && span_of(p.doc, &key("home")) == span_of(p.doc, &["services", name]) {
        p.at(&["services", name], "missing `home` (the address H)");
    }
    if let Some(site) = &s.home_site
        && !inventory.sites.contains_key(site)
    {
        p.at(&key("home_site"), format!("no site {site:?} in [sites]"));
    }
    let mode = s.address_mode.unwrap_or_default();
    if mode == AddressMode::Move && s.on_switch.is_none() {
        p.at(
            &key("address_mode"),
            "move address mode needs `on_switch` (the command that re-routes H)",
        );
    }
    for (site, at) in &s.at {
        let at_key = |k: &'static str| ["services", name, "at", site.as_str(), k];
        if !inventory.sites.contains_key(site) {
            p.at(
                &["services", name, "at", site],
                format!("no site {site:?} in [sites]"),
            );
        }
        if let Some(new) = at.new_addr {
            if mode == AddressMode::Move {
                p.at(
                    &at_key("new_addr"),
                    "move address mode keeps H: no `new_addr`",
                );
            }
            match s.home {
                Some(home) if home.is_ipv4() != new.is_ipv4() => p.at(
                    &at_key("new_addr"),
                    format!("{new} and the home address {home} are of different families"),
                ),
                Some(home) if home == new => {
                    p.at(&at_key("new_addr"), "N is the home address H itself")
                }
                _ => {}
            }
        }
        if open_files && let Some(spec) = &at.spec {
            let path = inventory.path(spec);
            let parsed = std::fs::read_to_string(&path)
                .map_err(|err| format!("reading {}: {err}", path.display()))
                .and_then(|text| {
                    VmSpec::parse(&text).map_err(|err| format!("{}: {err:#}", path.display()))
                });
            match parsed {
                Ok(vm) if vm.name != s.vm_name(name) => p.at(
                    &at_key("spec"),
                    format!(
                        "{} names VM {:?}, not {:?}",
                        path.display(),
                        vm.name,
                        s.vm_name(name)
                    ),
                ),
                Ok(_) => {}
                Err(err) => p.at(&at_key("spec"), err),
            }
        }
    }
    gateways(p, inventory, name, s);
    let server = s.dns_server.as_deref().or(d.dns_server.as_deref());
    let zone = s.zone.as_deref().or(d.zone.as_deref());
    dns_keys(
        p,
        &["services", name],
        s.dns_server.as_deref(),
        s.zone.as_deref(),
        s.dns_name.as_deref(),
    );
    if s.dns_name.is_some() {
        if server.is_none() || zone.is_none() {
            p.at(
                &key("dns_name"),
                "DNS needs `dns_server` and `zone` (here or in [defaults])",
            );
        } else if s.dns_key_file.is_none() && d.dns_key_file.is_none() {
            p.at(
                &key("dns_name"),
                "DNS updates must be signed: set `dns_key_file` (here or in [defaults])",
            );
        }
    }
    if open_files && let Some(path) = &s.dns_key_file {
        p.check(
            &key("dns_key_file"),
            TsigKey::from_file(&inventory.path(path)).map_err(alt),
        );
    }
}

/// The anycast gateway: every site the service lives at gives its tap the same MAC and
/// address, or the VM loses its default route when it moves.
fn gateways(p: &mut Problems<'_>, inventory: &Inventory, name: &str, s: &Service) {
    let sites: BTreeSet<&str> = s
        .home_site
        .iter()
        .map(String::as_str)
        .chain(s.at.keys().map(String::as_str))
        .collect();
    let mut seen_mac = None;
    let mut seen_cidr = None;
    for site in sites {
        let Some(found) = inventory.sites.get(site) else {
            continue;
        };
        if let Some(mac) = found.gateway_mac {
            match seen_mac {
                Some((first, other)) if first != mac => p.at(
                    &["sites", site, "gateway_mac"],
                    format!("{mac} differs from site {other}'s {first}, and service {name} lives at both"),
                ),
                None => seen_mac = Some((mac, site)),
                _ => {}
            }
        }
        if let Some(cidr) = &found.gateway_cidr {
            match seen_cidr {
                Some((first, other)) if first != cidr => p.at(
                    &["sites", site, "gateway_cidr"],
                    format!("{cidr} differs from site {other}'s {first}, and service {name} lives at both"),
                ),
                None => seen_cidr = Some((cidr, site)),
                _ => {}
            }
        }
    }
}

/// `dns_server`, `zone` and `dns_name` parse as the DNS client needs them.
fn dns_keys(
    p: &mut Problems<'_>,
    prefix: &[&str],
    server: Option<&str>,
    zone: Option<&str>,
    dns_name: Option<&str>,
) {
    let key = |k: &'static str| [prefix, &[k]].concat();
    if let Some(server) = server {
        p.check(
            &key("dns_server"),
            crate::dns::parse_server(server).map_err(alt),
        );
    }
    if let Some(zone) = zone {
        p.check(&key("zone"), crate::dns::parse_name(zone).map_err(alt));
    }
    if let Some(name) = dns_name {
        p.check(&key("dns_name"), crate::dns::parse_name(name).map_err(alt));
    }
}

fn mtu_in_range(p: &mut Problems<'_>, key: &[&str], mtu: u16) {
    if mtu < 576 {
        p.at(
            key,
            format!("{mtu} is below 576, the least IPv4 guarantees"),
        );
    }
}

fn readable(p: &mut Problems<'_>, key: &[&str], path: &Path) {
    p.check(
        key,
        std::fs::File::open(path).map_err(|err| format!("{}: {err}", path.display())),
    );
}

/// anyhow's whole chain on one line.
fn alt(err: anyhow::Error) -> String {
    format!("{err:#}")
}
