//! A real BIND9 (`named`) for DNS tests: it runs in its own network namespace, with its
//! config, zone, journal and key in a temporary directory; a second namespace is the client.
//! Everything is removed on drop, also when the test fails.

use std::{
    fs::File,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};

use crate::{
    netns::{ChildGuard, Netns, checked, in_netns, veth, wait_until},
    tempdir::TempDir,
};

pub const ZONE: &str = "example.test.";
pub const SERVICE: &str = "svc.example.test.";
/// The key allowed to update the zone.
pub const KEY_NAME: &str = "movarto-key";
/// A key the server knows but whose updates it refuses.
pub const OTHER_KEY_NAME: &str = "readonly-key";
pub const SERVER_IP: &str = "192.0.2.53";
/// [`SERVER_IP`] as an address.
const SERVER_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 53);
pub const CLIENT_IP: &str = "192.0.2.1";
/// The records the zone starts with, TTL 300.
pub const HOME_V4: &str = "198.51.100.10";
pub const HOME_V6: &str = "2001:db8::10";
pub const INITIAL_TTL: u32 = 300;

/// `named` serving `example.test` at 192.0.2.53, reachable from the client namespace.
/// Fields drop in order: named first, then the namespaces, then the directory.
pub struct Bind9 {
    named: ChildGuard,
    pub client: Netns,
    pub server_ns: Netns,
    dir: TempDir,
}

impl Bind9 {
    pub fn start(tag: &str) -> Result<Self> {
        let dir = TempDir::new(&format!("movarto-bind-{tag}"))?;
        let d = dir.path().to_str().context("temp dir path is not UTF-8")?;
        for (file, key) in [("movarto.key", KEY_NAME), ("readonly.key", OTHER_KEY_NAME)] {
            let out = checked(Command::new("tsig-keygen").args(["-a", "hmac-sha256", key]))?;
            std::fs::write(dir.path().join(file), &out.stdout)?;
        }
        std::fs::write(
            dir.path().join("named.conf"),
            format!(
                r#"include "{d}/movarto.key";
include "{d}/readonly.key";
options {{
  directory "{d}";
  pid-file "{d}/named.pid";
  session-keyfile "{d}/session.key";
  managed-keys-directory "{d}";
  listen-on port 53 {{ {SERVER_IP}; }};
  listen-on-v6 {{ none; }};
  recursion no;
  dnssec-validation no;
  notify no;
}};
controls {{ }};
zone "{ZONE}" {{
  type primary;
  file "{d}/example.test.zone";
  update-policy {{ grant {KEY_NAME} zonesub ANY; }};
}};
"#
            ),
        )?;
        std::fs::write(
            dir.path().join("example.test.zone"),
            format!(
                "$TTL {INITIAL_TTL}\n\
                 @ IN SOA ns.{ZONE} hostmaster.{ZONE} 1 3600 600 86400 60\n\
                 @ IN NS ns.{ZONE}\n\
                 ns IN A {SERVER_IP}\n\
                 svc IN A {HOME_V4}\n\
                 svc IN AAAA {HOME_V6}\n"
            ),
        )?;
        checked(Command::new("named-checkconf").arg(format!("{d}/named.conf")))
            .context("named-checkconf")?;
        checked(Command::new("named-checkzone").args([ZONE, &format!("{d}/example.test.zone")]))
            .context("named-checkzone")?;

        let server_ns = Netns::new("dns")?;
        let client = Netns::new("dnscli")?;
        veth(&server_ns, "eth0", &client, "eth0")?;
        server_ns.ip(&["addr", "add", &format!("{SERVER_IP}/24"), "dev", "eth0"])?;
        client.ip(&["addr", "add", &format!("{CLIENT_IP}/24"), "dev", "eth0"])?;

        let log = File::create(dir.path().join("named.log"))?;
        let named = server_ns.spawn(
            server_ns
                .command("named")
                .args(["-g", "-c", &format!("{d}/named.conf")])
                .stdout(Stdio::from(log.try_clone()?))
                .stderr(Stdio::from(log)),
        )?;
        let mut bind = Self {
            named,
            client,
            server_ns,
            dir,
        };
        let ready = wait_until(Duration::from_secs(10), "named to answer", || {
            bind.dig(SERVICE, "A").is_ok_and(|a| !a.is_empty())
        });
        if let Err(err) = ready {
            let exited = bind.named.try_wait().ok().flatten();
            bail!("{err:#}; named exited: {exited:?}; log:\n{}", bind.log());
        }
        Ok(bind)
    }

    pub fn server_addr(&self) -> SocketAddr {
        SocketAddr::from((SERVER_V4, 53))
    }

    pub fn key_file(&self) -> PathBuf {
        self.dir.path().join("movarto.key")
    }

    pub fn other_key_file(&self) -> PathBuf {
        self.dir.path().join("readonly.key")
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("named.log")).unwrap_or_default()
    }

    /// `dig +short` from the client namespace: the answer's records, sorted.
    pub fn dig(&self, name: &str, rtype: &str) -> Result<Vec<String>> {
        let out = self.dig_with(&["+short"], name, rtype)?;
        let mut lines: Vec<String> = out.lines().map(str::to_owned).collect();
        lines.sort();
        Ok(lines)
    }

    /// `dig` from the client namespace, one try of a second, no recursion; its output.
    fn dig_with(&self, format: &[&str], name: &str, rtype: &str) -> Result<String> {
        let server = format!("@{SERVER_IP}");
        let mut args = format.to_vec();
        args.extend(["+norec", "+time=1", "+tries=1", &server, name, rtype]);
        self.client.run("dig", &args)
    }

    /// The TTLs of the answer's records.
    pub fn dig_ttls(&self, name: &str, rtype: &str) -> Result<Vec<u32>> {
        let out = self.dig_with(&["+noall", "+answer"], name, rtype)?;
        out.lines()
            .map(|l| {
                l.split_whitespace()
                    .nth(1)
                    .context("dig answer line without TTL")?
                    .parse()
                    .with_context(|| format!("TTL in {l:?}"))
            })
            .collect()
    }

    /// Runs an nsupdate script (without `server`/`send`, which are added) with the allowed key:
    /// the "someone else" who changes records behind movarto's back.
    pub fn nsupdate(&self, commands: &str) -> Result<()> {
        let script = self.dir.path().join("nsupdate.txt");
        std::fs::write(
            &script,
            format!("server {SERVER_IP}\nzone {ZONE}\n{commands}\nsend\n"),
        )?;
        let key = self.key_file();
        self.client
            .run(
                "nsupdate",
                &["-t", "3", "-k", path_str(&key)?, path_str(&script)?],
            )
            .map(drop)
    }

    /// Runs `f` on a thread inside the client namespace, so its sockets live there.
    pub fn in_client<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        in_netns(&self.client, f)
    }
}

fn path_str(path: &Path) -> Result<&str> {
    path.to_str().context("path is not UTF-8")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_addresses_agree() {
        assert_eq!(SERVER_V4.to_string(), SERVER_IP);
    }
}
