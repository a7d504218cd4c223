//! The lab of DESIGN.md on one machine: client, wan router, ops (orchestrator and BIND9),
//! site A and site B as network namespaces, each site with its agent process.
//!
//! ```text
//! client 198.51.100.7 ── wan ── 203.0.113.1 (TA) site A ── tap0 ── VM 192.0.2.10 (H)
//!                         │  └─ 203.0.113.129 (TB) site B ── tap0   (N = 198.18.0.10)
//!   ops 198.19.255.2 ─────┘ (orchestrator; reaches BIND9 at 192.0.2.53 on its own link)
//! ```

use std::{
    fs,
    io::{Read as _, Write as _},
    net::{IpAddr, Shutdown, SocketAddr, TcpStream},
    os::unix::fs::PermissionsExt as _,
    path::PathBuf,
    process::{Command, ExitStatus, Stdio},
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use aya::programs::XdpMode;
use movarto_guest_server::{ECHO_PORT, STREAM_PORT};
use movarto_user::{
    agent::{
        AgentClient,
        api::{DatapathRequest, TapRequest, VmRequest},
    },
    datapath::Datapath,
};

use crate::{
    GUEST_KERNEL_ARGS,
    dns_server::{Bind9, SERVICE},
    movarto_user,
    netns::{ChildGuard, Netns, in_netns, veth, wait_until},
    tempdir::TempDir,
    workload,
};

pub const H: &str = "192.0.2.10";
pub const N: &str = "198.18.0.10";
pub const TA: &str = "203.0.113.1";
pub const TB: &str = "203.0.113.129";
pub const GATEWAY_MAC: &str = "02:00:00:00:00:01";
pub const GATEWAY_CIDR: &str = "192.0.2.1/24";
pub const GUEST_MAC: &str = "52:54:00:00:00:10";
pub const AGENT_PORT: u16 = 7878;
pub const IO_TIMEOUT: Duration = Duration::from_secs(20);

pub struct Lab {
    // Processes first: they stop before their namespaces go.
    agents: Vec<(String, AgentProc)>,
    _wan_xdp: Option<Datapath>,
    pub bind: Bind9,
    pub client: Netns,
    pub wan: Netns,
    pub a: Netns,
    pub b: Netns,
    pub uplink_a: String,
    pub uplink_b: String,
    pub scratch: TempDir,
    _serial: MutexGuard<'static, ()>,
}

/// An agent process. Dropping it stops it as an operator would (SIGTERM: it stops its
/// VMs), and kills it only if it does not exit in time.
pub struct AgentProc(ChildGuard);

impl AgentProc {
    pub fn pid(&self) -> u32 {
        self.0.id()
    }

    /// SIGTERM, then wait up to `grace`; the guard's SIGKILL after that.
    pub fn stop(&mut self, grace: Duration) {
        // Reaped already: its PID may belong to someone else now.
        if matches!(self.0.try_wait(), Ok(Some(_))) {
            return;
        }
        // SAFETY: signalling a child we started, by its PID.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if matches!(self.0.try_wait(), Ok(Some(_))) {
                return;
            }
            thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(15));
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for (_, agent) in &mut self.agents {
            agent.stop(Duration::from_secs(15));
        }
        self.agents.clear();
        // A VM whose agent crashed and never came back: the records still name it.
        for site in ["a", "b"] {
            let dir = self.scratch.join(format!("state-{site}"));
            for entry in fs::read_dir(&dir).into_iter().flatten().flatten() {
                let pid = fs::read_to_string(entry.path())
                    .ok()
                    .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
                    .and_then(|v| v["pid"].as_u64());
                if let Some(pid) = pid
                    && movarto_user::qemu::vm::is_qemu(pid as u32)
                {
                    // SAFETY: a QEMU this lab's agent started, by its PID.
                    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                }
            }
        }
        // Pins are global (bpffs), not per namespace.
        for uplink in [&self.uplink_a, &self.uplink_b] {
            let _ = movarto_user::datapath::detach(uplink);
        }
    }
}

/// Labs share the machine's CPUs with a TCG guest each: one at a time per process.
static ONE_LAB: Mutex<()> = Mutex::new(());

impl Lab {
    /// Builds the lab and starts both agents; waits until they answer. Holds a process-wide
    /// lock until the lab drops, so tests using it run one after another. On failure what
    /// was made is removed (each piece is a guard).
    pub fn build() -> Result<Self> {
        let serial = ONE_LAB.lock().unwrap_or_else(PoisonError::into_inner);
        static NEXT: AtomicU32 = AtomicU32::new(0);
        // Interface and pin names are short (15 bytes) and pins are global: unique per lab.
        let tag = format!(
            "{}{}",
            std::process::id() % 10_000,
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let scratch = TempDir::new("movarto-lab")?;
        let bind = Bind9::start("mig").context("starting BIND9")?;
        let mut l = Lab {
            agents: Vec::new(),
            _wan_xdp: None,
            bind,
            client: Netns::new("mclient")?,
            wan: Netns::new("mwan")?,
            a: Netns::new("msitea")?,
            b: Netns::new("msiteb")?,
            uplink_a: format!("ma{tag}"),
            uplink_b: format!("mb{tag}"),
            scratch,
            _serial: serial,
        };
        l.wire()?;
        l._wan_xdp = Some(in_netns(&l.wan, wan_pass_through)??);
        // The service's record points at H before the move.
        l.bind
            .nsupdate(&format!(
                "update delete {SERVICE} A\nupdate delete {SERVICE} AAAA\nupdate add {SERVICE} 300 A {H}\nsend\n"
            ))
            .context("pointing the service's record at H")?;
        for site in ["a", "b"] {
            let token = l.scratch.join(format!("token-{site}"));
            fs::write(&token, format!("site-{site}-token-0123456789abcdef\n"))
                .with_context(|| format!("writing {}", token.display()))?;
            fs::set_permissions(&token, fs::Permissions::from_mode(0o600))
                .with_context(|| format!("chmod 600 {}", token.display()))?;
            l.start_agent(site)?;
        }
        let ready = l.with_agents(async |a, b| {
            let deadline = Instant::now() + Duration::from_secs(10);
            while a.health().await.is_err() || b.health().await.is_err() {
                if Instant::now() > deadline {
                    return false;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            true
        })?;
        if !ready {
            bail!(
                "the agents did not answer within 10 s:\nA:\n{}\nB:\n{}",
                l.agent_log("a"),
                l.agent_log("b")
            );
        }
        Ok(l)
    }

    /// The links and routes of the lab's picture (the module's doc).
    fn wire(&self) -> Result<()> {
        for ns in [&self.wan, &self.a, &self.b] {
            ns.run("sysctl", &["-qw", "net.ipv4.conf.all.forwarding=1"])?;
        }
        let (client, wan, ops) = (&self.client, &self.wan, &self.bind.client);
        let (a, b) = (&self.a, &self.b);
        veth(client, "c0", wan, "wc")?;
        veth(wan, "wa", a, &self.uplink_a)?;
        veth(wan, "wb", b, &self.uplink_b)?;
        veth(ops, "ow", wan, "wo")?;
        client.ip(&["addr", "add", "198.51.100.7/24", "dev", "c0"])?;
        client.ip(&["route", "add", "default", "via", "198.51.100.1"])?;
        wan.ip(&["addr", "add", "198.51.100.1/24", "dev", "wc"])?;
        wan.ip(&["addr", "add", "203.0.113.126/25", "dev", "wa"])?;
        wan.ip(&["addr", "add", "203.0.113.254/25", "dev", "wb"])?;
        wan.ip(&["addr", "add", "198.19.255.1/24", "dev", "wo"])?;
        wan.ip(&["route", "add", "192.0.2.0/24", "via", TA])?;
        wan.ip(&["route", "add", "198.18.0.0/15", "via", TB])?;
        ops.ip(&["addr", "add", "198.19.255.2/24", "dev", "ow"])?;
        ops.ip(&["route", "add", "203.0.113.0/24", "via", "198.19.255.1"])?;
        a.ip(&["addr", "add", &format!("{TA}/25"), "dev", &self.uplink_a])?;
        a.ip(&["route", "add", "default", "via", "203.0.113.126"])?;
        b.ip(&["addr", "add", &format!("{TB}/25"), "dev", &self.uplink_b])?;
        b.ip(&["route", "add", "default", "via", "203.0.113.254"])?;
        // Veth endpoints checksum in software (see docs/building.md).
        client.run("ethtool", &["-K", "c0", "tx", "off"])?;
        Ok(())
    }

    /// Starts site `site`'s agent (`a` or `b`) in its namespace, logging to the scratch dir.
    pub fn start_agent(&mut self, site: &str) -> Result<()> {
        let (ns, uplink, listen) = if site == "a" {
            (&self.a, &self.uplink_a, TA)
        } else {
            (&self.b, &self.uplink_b, TB)
        };
        let log_path = self.scratch.join(format!("agent-{site}.log"));
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("opening {}", log_path.display()))?;
        let agent = ns.spawn(
            Command::new("nsenter")
                .arg(format!("--net=/run/netns/{}", ns.name()))
                .arg(movarto_user()?)
                .args(["agent", "--site", site, "--uplink", uplink])
                .arg("--listen")
                .arg(format!("{listen}:{AGENT_PORT}"))
                .arg("--token-file")
                .arg(self.scratch.join(format!("token-{site}")))
                .args(["--sweep-interval", "500ms", "--established-idle", "60s"])
                .arg("--state-dir")
                .arg(self.scratch.join(format!("state-{site}")))
                .arg("--stop-vms-on-exit")
                .stdout(Stdio::null())
                .stderr(Stdio::from(log)),
        )?;
        self.agents.retain(|(s, _)| s != site);
        self.agents.push((site.to_owned(), AgentProc(agent)));
        Ok(())
    }

    /// The PID of site `site`'s agent, while it runs.
    pub fn agent_pid(&self, site: &str) -> Option<u32> {
        self.agents
            .iter()
            .find(|(s, _)| s == site)
            .map(|(_, agent)| agent.pid())
    }

    /// Kills site `site`'s agent (SIGKILL), as a crash would: its VMs keep running.
    pub fn crash_agent(&mut self, site: &str) {
        if let Some(at) = self.agents.iter().position(|(s, _)| s == site) {
            let (_, mut agent) = self.agents.remove(at);
            // SAFETY: signalling a child we started, by its PID (not yet reaped).
            unsafe { libc::kill(agent.pid() as i32, libc::SIGKILL) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while !matches!(agent.0.try_wait(), Ok(Some(_))) && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// Stops site `site`'s agent (SIGTERM), e.g. to restart it.
    pub fn stop_agent(&mut self, site: &str) {
        if let Some(at) = self.agents.iter().position(|(s, _)| s == site) {
            let (_, mut agent) = self.agents.remove(at);
            agent.stop(Duration::from_secs(15));
        }
    }

    /// The namespaces the lab made, by name.
    pub fn namespace_names(&self) -> Vec<String> {
        [
            &self.client,
            &self.wan,
            &self.a,
            &self.b,
            &self.bind.client,
            &self.bind.server_ns,
        ]
        .iter()
        .map(|ns| ns.name().to_owned())
        .collect()
    }

    pub fn token(&self, site: &str) -> Result<String> {
        let path = self.scratch.join(format!("token-{site}"));
        let token =
            fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        Ok(token.trim().to_owned())
    }

    /// Site `site`'s agent log so far ("" if there is none).
    pub fn agent_log(&self, site: &str) -> String {
        fs::read_to_string(self.scratch.join(format!("agent-{site}.log"))).unwrap_or_default()
    }

    /// Everything that explains a stuck migration: both agents' logs, their view of the VM
    /// (run state and migration phase), and QEMU's own logs at both sites.
    pub fn stall_report(&self) -> String {
        let views = self
            .with_agents(async |a, b| {
                (
                    format!("{:?}", a.vm("web").await),
                    format!("{:?}", b.vm("web").await),
                )
            })
            .unwrap_or_else(|err| (format!("{err:#}"), format!("{err:#}")));
        let qemu_log = |site: &str| {
            fs::read_to_string(self.scratch.join(format!("state-{site}/web.log")))
                .unwrap_or_default()
        };
        format!(
            "agent logs:\nA:\n{}\nB:\n{}\nVM at A: {}\nVM at B: {}\nQEMU log at A:\n{}\nQEMU log at B:\n{}",
            self.agent_log("a"),
            self.agent_log("b"),
            views.0,
            views.1,
            qemu_log("a"),
            qemu_log("b"),
        )
    }

    /// The guest's spec (TOML) at `site`.
    pub fn guest_spec(&self, site: &str) -> Result<String> {
        let (kernel, initrd) = crate::guest_files()?;
        let disk = self.disk_image(site);
        Ok(format!(
            r#"
name = "web"
memory_mib = 256
qmp_socket = "{dir}/web-{site}.qmp"
serial_log = "{dir}/web-{site}.console"
kernel = "{kernel}"
initrd = "{initrd}"
append = "{GUEST_KERNEL_ARGS} movarto.ip={H}/24 movarto.gw=192.0.2.1"
{disk}
[nic]
mac = "{GUEST_MAC}"
tap = "tap0"
checksum_offload = false
"#,
            dir = self.scratch.path().display(),
            kernel = kernel.display(),
            initrd = initrd.display(),
            disk = if disk.exists() {
                format!("disk = \"{}\"\n", disk.display())
            } else {
                String::new()
            },
        ))
    }

    /// The guest's disk image at `site`; the spec has a disk once [`Lab::add_disk`] made them.
    pub fn disk_image(&self, site: &str) -> PathBuf {
        self.scratch.join(format!("web-{site}.img"))
    }

    /// Gives the guest a `mib` MiB raw disk: at A filled with a pattern, at B an empty image
    /// of the same size (the mirror's target; no shared storage).
    pub fn add_disk(&self, mib: usize) -> Result<()> {
        let block: Vec<u8> = (0..1 << 20)
            .map(|i: u32| (i.wrapping_mul(31) >> 3) as u8)
            .collect();
        let mut a = fs::File::create(self.disk_image("a")).context("the disk at A")?;
        for n in 0..mib {
            let mut chunk = block.clone();
            chunk[..8].copy_from_slice(&(n as u64).to_le_bytes());
            a.write_all(&chunk).context("writing the disk at A")?;
        }
        fs::File::create(self.disk_image("b"))
            .and_then(|b| b.set_len((mib << 20) as u64))
            .context("the disk at B")
    }

    /// Site A through its agent ([`start_site_a`]), with agent A's log in the error.
    pub fn start_site_a(&self) -> Result<()> {
        let spec_a = self.guest_spec("a")?;
        self.with_agents(async |a, _b| start_site_a(&a, &spec_a).await)?
            .with_context(|| format!("setting up site A; agent A's log:\n{}", self.agent_log("a")))
    }

    /// Site A ([`Lab::start_site_a`]). Waits until the guest answers at `H` and the probes'
    /// unanswered SYNs have aged out of counting as connections. Returns the guest's boot id.
    pub fn boot_at_a(&self) -> Result<String> {
        self.start_site_a()?;
        let booted = Instant::now();
        let home: IpAddr = H.parse()?;
        wait_until(Duration::from_secs(90), "the guest to answer at A", || {
            in_netns(&self.client, || {
                workload::http_get(home, "/id", Duration::from_secs(2))
            })
            .is_ok_and(|answer| answer.is_ok())
        })
        .with_context(|| format!("agent A's log:\n{}", self.agent_log("a")))?;
        eprintln!("guest answers at A after {:?}", booted.elapsed());
        let boot_id = self.http_get(H, "/id")?;
        // The probes' unanswered SYNs are tracked too; once older than a handshake they no
        // longer count as connections, so the report can be checked against ours exactly.
        thread::sleep(Duration::from_nanos(
            movarto_common::flow::timeout::HANDSHAKE_NS + 500_000_000,
        ));
        Ok(boot_id)
    }

    /// `movarto-user migrate` for the guest from A to B, run in the ops namespace, with
    /// DNS, JSON output and the TTL wait skipped; `extra` adds or overrides options.
    pub fn migrate_command(&self, extra: &[&str]) -> Result<Command> {
        self.migrate_command_from("a", extra)
    }

    /// [`Lab::migrate_command`] from site `from` (`a` or `b`) to the other one.
    pub fn migrate_command_from(&self, from: &str, extra: &[&str]) -> Result<Command> {
        let to = if from == "a" { "b" } else { "a" };
        let tunnel = |site: &str| if site == "a" { TA } else { TB };
        let spec_path = self.scratch.join(format!("web-{to}.toml"));
        fs::write(&spec_path, self.guest_spec(to)?)
            .with_context(|| format!("writing {}", spec_path.display()))?;
        let mut migrate = Command::new("nsenter");
        migrate
            .arg(format!("--net=/run/netns/{}", self.bind.client.name()))
            .arg(movarto_user()?)
            .args(["migrate", "--vm", "web", "--json"])
            .arg("--source")
            .arg(format!("http://{}:{AGENT_PORT}", tunnel(from)))
            .arg("--destination")
            .arg(format!("http://{}:{AGENT_PORT}", tunnel(to)))
            .arg("--source-token-file")
            .arg(self.scratch.join(format!("token-{from}")))
            .arg("--destination-token-file")
            .arg(self.scratch.join(format!("token-{to}")))
            .arg("--destination-spec")
            .arg(&spec_path)
            .args(["--home", H])
            .args(if extra.contains(&"move") {
                &[][..]
            } else {
                &["--new-addr", N][..]
            })
            .args(["--source-tunnel", tunnel(from)])
            .args(["--destination-tunnel", tunnel(to)])
            .args(["--gateway-mac", GATEWAY_MAC, "--gateway-cidr", GATEWAY_CIDR])
            .arg("--dns-server")
            .arg(self.bind.server_addr().to_string())
            .args(["--zone", "example.test", "--dns-name", SERVICE])
            .arg("--dns-key-file")
            .arg(self.bind.key_file())
            .arg("--skip-ttl-wait")
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        Ok(migrate)
    }

    /// The move address mode's `--on-switch` command: the wan router sends `H`'s subnet
    /// to `tunnel` (the destination site), as a routing change would.
    pub fn reroute_hook(&self, tunnel: &str) -> String {
        format!(
            "ip netns exec {} ip route replace 192.0.2.0/24 via {tunnel}",
            self.wan.name()
        )
    }

    /// Cuts the link between the wan router and site B for `length`, as a failed WAN
    /// link: the router's port toward B goes down (what is sent to B's networks meanwhile
    /// is unreachable), then comes up again with its route to B's networks.
    pub fn cut_site_b(&self, length: Duration) -> Result<()> {
        self.set_site_b_link(false)?;
        thread::sleep(length);
        self.set_site_b_link(true)
    }

    /// The wan router's port toward B down (`up` false) or up again, with its route to
    /// B's networks ([`Lab::cut_site_b`]).
    pub fn set_site_b_link(&self, up: bool) -> Result<()> {
        if !up {
            return self.wan.ip(&["link", "set", "wb", "down"]);
        }
        self.wan.ip(&["link", "set", "wb", "up"])?;
        self.wan
            .ip(&["route", "replace", "198.18.0.0/15", "via", TB])
            .context("the route to B's networks, after the cut")
    }

    /// `movarto-user migrate --resume ID`, as an operator runs it after the first
    /// `migrate` died: only the source's agent and the DNS key are given.
    pub fn resume_command(&self, id: &str) -> Result<Command> {
        let mut resume = Command::new("nsenter");
        resume
            .arg(format!("--net=/run/netns/{}", self.bind.client.name()))
            .arg(movarto_user()?)
            .args(["migrate", "--json", "--resume", id])
            .arg("--source")
            .arg(format!("http://{TA}:{AGENT_PORT}"))
            .arg("--source-token-file")
            .arg(self.scratch.join("token-a"))
            .arg("--dns-key-file")
            .arg(self.bind.key_file())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        Ok(resume)
    }

    /// Waits up to `limit` for `migrate` (spawned with stdout piped) to exit, calling `tick`
    /// every 100 ms meanwhile; returns its exit status and its JSON report.
    pub fn finish_migrate(
        &self,
        orchestrator: &mut ChildGuard,
        limit: Duration,
        mut tick: impl FnMut(),
    ) -> Result<(ExitStatus, serde_json::Value)> {
        let started = Instant::now();
        let status = loop {
            if let Some(status) = orchestrator.try_wait()? {
                break status;
            }
            if started.elapsed() > limit {
                bail!(
                    "migrate did not finish within {limit:?}\n{}",
                    self.stall_report()
                );
            }
            tick();
            thread::sleep(Duration::from_millis(100));
        };
        let mut json = String::new();
        if let Some(mut stdout) = orchestrator.child_mut().stdout.take() {
            stdout
                .read_to_string(&mut json)
                .context("reading migrate's report")?;
        }
        eprintln!("report:\n{json}");
        let report = serde_json::from_str(&json)
            .with_context(|| format!("migrate printed no JSON report: {json:?}"))?;
        Ok((status, report))
    }

    /// Runs `f` with a client of each agent, on a runtime inside the ops namespace.
    pub fn with_agents<T: Send>(
        &self,
        f: impl AsyncFnOnce(AgentClient, AgentClient) -> T + Send,
    ) -> Result<T> {
        let (ta, tb) = (self.token("a")?, self.token("b")?);
        in_netns(&self.bind.client, move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("a runtime for the agents' clients")?;
            let a = AgentClient::new(&format!("http://{TA}:{AGENT_PORT}"), &ta, None)?;
            let b = AgentClient::new(&format!("http://{TB}:{AGENT_PORT}"), &tb, None)?;
            Ok(runtime.block_on(f(a, b)))
        })?
    }

    /// A connection from the client to the guest at `H` on `port`.
    pub fn connect(&self, port: u16) -> Result<TcpStream> {
        let addr = SocketAddr::new(H.parse()?, port);
        in_netns(&self.client, || workload::connect(addr))?
    }

    /// `GET path` from the client to the guest at `ip`; the body, trimmed.
    pub fn http_get(&self, ip: &str, path: &str) -> Result<String> {
        let addr: IpAddr = ip.parse()?;
        let body = in_netns(&self.client, || {
            workload::http_get(addr, path, Duration::from_secs(10))
        })?
        .with_context(|| format!("GET http://{ip}{path}"))?;
        Ok(body.trim().to_owned())
    }
}

/// A pass-through XDP on the wan's site links: a veth delivers what XDP on its peer
/// transmits only when it runs XDP itself. Runs inside the wan namespace.
fn wan_pass_through() -> Result<Datapath> {
    let mut pass = Datapath::load()?;
    for dev in ["wa", "wb"] {
        pass.attach_xdp(dev, XdpMode::Default)
            .with_context(|| format!("pass-through XDP on {dev}"))?;
    }
    Ok(pass)
}

/// Site A through its agent: the tap with the anycast gateway, the datapath tracking `H`,
/// and the VM booting from `spec_a`.
pub async fn start_site_a(a: &AgentClient, spec_a: &str) -> Result<()> {
    a.ensure_tap(
        "tap0",
        &TapRequest {
            gateway_mac: GATEWAY_MAC.parse()?,
            gateway_cidr: GATEWAY_CIDR.to_owned(),
        },
    )
    .await?;
    a.apply_datapath(&DatapathRequest {
        vm_iface: "tap0".to_owned(),
        mode: movarto_common::config::Mode::Track,
        home_addr: H.parse()?,
        new_addr: None,
        local_tunnel_addr: TA.parse()?,
        peer_tunnel_addr: TB.parse()?,
        // Tracking sends no GUE; the migration gives both sites its own token.
        token: movarto_common::ids::SessionToken(0),
        tunnel_mtu: 1500,
        vm_mac: GUEST_MAC.parse()?,
        gateway_mac: GATEWAY_MAC.parse()?,
    })
    .await?;
    a.start_vm(&VmRequest {
        spec_toml: spec_a.to_owned(),
        incoming: false,
    })
    .await?;
    Ok(())
}

// ---- the migration tests' connections ----

#[derive(Default)]
pub struct Stats {
    pub streamed: AtomicU64,
    pub exchanges: AtomicU64,
    pub worst_stall_ms: AtomicU64,
    pub failed: Mutex<Vec<String>>,
}

impl Stats {
    pub fn fail(&self, what: String) {
        self.failed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(what);
    }

    /// Waits until the connections carry more from now on: 100 kB streamed and ten
    /// exchanges, within `timeout`.
    pub fn wait_for_more_traffic(&self, timeout: Duration, what: &str) -> Result<()> {
        let (streamed, exchanged) = (
            self.streamed.load(Ordering::Relaxed),
            self.exchanges.load(Ordering::Relaxed),
        );
        wait_until(timeout, what, || {
            self.streamed.load(Ordering::Relaxed) > streamed + 100_000
                && self.exchanges.load(Ordering::Relaxed) > exchanged + 10
        })
    }

    /// What broke so far.
    pub fn failures(&self) -> Vec<String> {
        self.failed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Reads the guest's byte-checked stream until `stop`, into `streamed` and
    /// `worst_stall_ms`. A paced reader: the stream must not saturate the TCG guest.
    pub fn read_stream(&self, s: TcpStream, stop: &AtomicBool) {
        let mut last = Instant::now();
        let read = workload::read_stream(s, 65536, Duration::from_millis(20), stop, |n| {
            self.streamed.fetch_add(n, Ordering::Relaxed);
            let stall = last.elapsed().as_millis() as u64;
            self.worst_stall_ms.fetch_max(stall, Ordering::Relaxed);
            last = Instant::now();
        });
        if let Err(err) = read {
            self.fail(format!("stream: {err:#}"));
        }
    }

    /// Echo request/response every 50 ms until `stop`, counted in `exchanges`.
    pub fn chat(&self, s: TcpStream, stop: &AtomicBool) {
        let chat = workload::interactive(s, Duration::from_millis(50), stop, |_| {
            self.exchanges.fetch_add(1, Ordering::Relaxed);
        });
        if let Err(err) = chat {
            self.fail(format!("interactive: {err:#}"));
        }
    }
}

/// A byte-checked interactive connection to `H`, already carrying traffic.
pub struct Chat {
    pub stats: Arc<Stats>,
    stop: Arc<AtomicBool>,
    worker: Option<thread::JoinHandle<()>>,
}

impl Chat {
    /// Connects from the client and waits until it carries traffic.
    pub fn start(l: &Lab) -> Result<Chat> {
        let stats = Arc::new(Stats::default());
        let stop = Arc::new(AtomicBool::new(false));
        let conn = l.connect(ECHO_PORT)?;
        let worker = {
            let (stats, stop) = (stats.clone(), stop.clone());
            thread::spawn(move || stats.chat(conn, &stop))
        };
        let chat = Chat {
            stats,
            stop,
            worker: Some(worker),
        };
        wait_until(IO_TIMEOUT, "traffic before the move", || {
            chat.stats.exchanges.load(Ordering::Relaxed) > 10
        })?;
        Ok(chat)
    }

    /// Checks it still carries traffic, stops it, and returns what broke.
    pub fn stop(mut self) -> Vec<String> {
        let exchanged = self.stats.exchanges.load(Ordering::Relaxed);
        let flowing = wait_until(IO_TIMEOUT, "traffic after the move", || {
            self.stats.exchanges.load(Ordering::Relaxed) > exchanged + 5
        });
        self.halt();
        let mut failures = self.stats.failures();
        if let Err(err) = flowing {
            failures.push(format!("{err:#}"));
        }
        failures
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(worker) = self.worker.take()
            && worker.join().is_err()
        {
            self.stats
                .fail("the connection's worker panicked".to_owned());
        }
    }
}

impl Drop for Chat {
    fn drop(&mut self) {
        self.halt();
    }
}

/// The pre-move connections the migration tests watch: a byte-checked stream and an
/// interactive echo, both running, and an idle echo connection that has said hello.
pub struct Connections {
    pub stats: Arc<Stats>,
    pub idle: TcpStream,
    stop: Arc<AtomicBool>,
    workers: Vec<thread::JoinHandle<()>>,
}

impl Connections {
    /// Opens them to `H` from the client and waits until traffic flows.
    pub fn open(l: &Lab) -> Result<Self> {
        let stats = Arc::new(Stats::default());
        let stop = Arc::new(AtomicBool::new(false));
        let stream = l.connect(STREAM_PORT)?;
        let chat = l.connect(ECHO_PORT)?;
        let mut idle = l.connect(ECHO_PORT)?;
        let hello = workload::echo_once(&mut idle, "hello before")?;
        if hello != "hello before" {
            bail!("the idle connection's hello came back as {hello:?}");
        }
        let mut conns = Self {
            stats,
            idle,
            stop,
            workers: Vec::new(),
        };
        // From here on, dropping `conns` (on failure too) stops the workers.
        let (stats, stop) = (conns.stats.clone(), conns.stop.clone());
        conns
            .workers
            .push(thread::spawn(move || stats.read_stream(stream, &stop)));
        let (stats, stop) = (conns.stats.clone(), conns.stop.clone());
        conns
            .workers
            .push(thread::spawn(move || stats.chat(chat, &stop)));
        let stats = &conns.stats;
        wait_until(IO_TIMEOUT, "traffic before the move", || {
            stats.streamed.load(Ordering::Relaxed) > 100_000
                && stats.exchanges.load(Ordering::Relaxed) > 10
        })?;
        Ok(conns)
    }

    /// Closes all three; returns what broke along the way.
    pub fn close(mut self) -> Vec<String> {
        self.stop_workers();
        self.stats.failures()
    }

    fn stop_workers(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for worker in self.workers.drain(..) {
            if worker.join().is_err() {
                self.stats.fail("a connection's worker panicked".to_owned());
            }
        }
        let _ = self.idle.shutdown(Shutdown::Both);
    }
}

impl Drop for Connections {
    fn drop(&mut self) {
        self.stop_workers();
    }
}
