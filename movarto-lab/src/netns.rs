//! Network namespaces for the lab and the tests: each builds its own hosts and links,
//! and everything is removed on drop, also on failure.
//!
//! Only documentation and benchmark address ranges are used inside them
//! (192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24, 198.18.0.0/15); nothing
//! here touches the host's own interfaces, routes or firewall.

use std::{
    fs::File,
    os::fd::AsRawFd as _,
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

/// A network namespace owned by one test. Dropping it ends every process
/// still inside it (all started by the test) and deletes it.
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates `mvt-<tag>-<pid>-<n>` with its loopback up.
    pub fn new(tag: &str) -> Result<Self> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "mvt-{tag}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        checked(Command::new("ip").args(["netns", "add", &name]))
            .with_context(|| format!("creating network namespace {name}"))?;
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `ip -n <ns> <args>`.
    pub fn ip(&self, args: &[&str]) -> Result<()> {
        checked(Command::new("ip").arg("-n").arg(&self.name).args(args)).map(drop)
    }

    /// A command that runs `program` inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }

    /// Runs `program args` inside the namespace to completion; returns stdout.
    pub fn run(&self, program: &str, args: &[&str]) -> Result<String> {
        let out = checked(self.command(program).args(args))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Starts `cmd` (built with [`Netns::command`]); it is killed when the guard drops.
    pub fn spawn(&self, cmd: &mut Command) -> Result<ChildGuard> {
        let child = cmd
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {cmd:?} in {}", self.name))?;
        Ok(ChildGuard(child))
    }

    /// Moves the calling thread into the namespace until the guard drops.
    /// BPF_PROG_TEST_RUN runs in the caller's namespace, so fib lookups in
    /// the programs then see this namespace's routes and neighbours.
    pub fn enter(&self) -> Result<Entered> {
        let original =
            File::open("/proc/thread-self/ns/net").context("opening this thread's netns")?;
        let target = File::open(format!("/run/netns/{}", self.name))
            .with_context(|| format!("opening namespace {}", self.name))?;
        // SAFETY: setns on an fd we hold open; affects only this thread.
        if unsafe { libc::setns(target.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            bail!(
                "setns into {}: {}",
                self.name,
                std::io::Error::last_os_error()
            );
        }
        Ok(Entered { original })
    }

    /// PIDs of the processes inside the namespace.
    fn pids(&self) -> Vec<i32> {
        Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .split_whitespace()
                    .filter_map(|p| p.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Everything inside a test's namespace was started by that test.
        for pid in self.pids() {
            // SAFETY: plain kill(2) on a PID read from this namespace.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.pids().is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if let Err(err) = checked(Command::new("ip").args(["netns", "del", &self.name])) {
            eprintln!("warning: could not delete namespace {}: {err:#}", self.name);
        }
    }
}

/// The calling thread is inside a namespace; dropping this returns it.
pub struct Entered {
    original: File,
}

impl Drop for Entered {
    fn drop(&mut self) {
        // SAFETY: setns back to the namespace fd saved on entry.
        if unsafe { libc::setns(self.original.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            eprintln!(
                "warning: could not return to the original namespace: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

/// Connects `a` and `b` with a veth pair, `a_if` in `a` and `b_if` in `b`, both up.
/// The pair is created inside `a`, so the host's namespace never sees it.
pub fn veth(a: &Netns, a_if: &str, b: &Netns, b_if: &str) -> Result<()> {
    veth_queues(a, a_if, b, b_if, 1)
}

/// [`veth`] with `queues` TX and RX queues at each end (a veth's XDP ring and NAPI are
/// per RX queue).
pub fn veth_queues(a: &Netns, a_if: &str, b: &Netns, b_if: &str, queues: u32) -> Result<()> {
    let q = queues.max(1).to_string();
    let queues = ["numtxqueues", &q, "numrxqueues", &q];
    let mut args = vec!["link", "add", a_if];
    args.extend(queues);
    args.extend(["type", "veth", "peer", "name", b_if]);
    args.extend(queues);
    args.extend(["netns", b.name()]);
    a.ip(&args)
        .with_context(|| format!("veth {}:{a_if} <-> {}:{b_if}", a.name(), b.name()))?;
    a.ip(&["link", "set", a_if, "up"])?;
    b.ip(&["link", "set", b_if, "up"])
}

/// A child process killed and reaped on drop.
pub struct ChildGuard(Child);

impl ChildGuard {
    pub fn id(&self) -> u32 {
        self.0.id()
    }

    /// Whether the process has exited (and with what).
    pub fn try_wait(&mut self) -> Result<Option<std::process::ExitStatus>> {
        self.0.try_wait().context("waiting for child")
    }

    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Moves the calling thread into the network namespace at `ns_path` for good
/// (setns changes only this thread).
pub fn move_thread_into(ns_path: &str) -> Result<()> {
    let ns = File::open(ns_path).with_context(|| format!("opening {ns_path}"))?;
    // SAFETY: setns on a namespace fd we hold; it changes only this thread.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!("setns into {ns_path}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// Runs `f` on a new thread that has entered `ns`'s network namespace, so its sockets live
/// there. A panic in `f` is passed on as it is.
pub fn in_netns<T: Send>(ns: &Netns, f: impl FnOnce() -> T + Send) -> Result<T> {
    let path = format!("/run/netns/{}", ns.name());
    std::thread::scope(|scope| {
        match scope
            .spawn(move || move_thread_into(&path).map(|()| f()))
            .join()
        {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// Polls `ready` every 20 ms until it returns true or `timeout` passes.
pub fn wait_until(timeout: Duration, what: &str, mut ready: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if ready() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("timed out after {timeout:?} waiting for {what}")
}

/// Runs `cmd`; fails with its stderr unless it exits 0.
pub fn checked(cmd: &mut Command) -> Result<Output> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("starting {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}
