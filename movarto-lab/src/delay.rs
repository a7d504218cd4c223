//! The wan router's delay line: WAN delay and rate between the lab's hosts.
//!
//! This kernel has no netem (`CONFIG_NET_SCH_NETEM` is off; see docs/building.md), so the
//! wan namespace routes every packet it forwards through a TUN device, `wdelay`, whose other
//! end is a thread here. The thread holds each packet for the one-way delay of the links it
//! crosses, serialises it at the destination link's rate (a FIFO queue with a bound, like a
//! router's; what overflows it is dropped), and writes it back into the TUN device, where the
//! kernel routes it on to its real next hop by the main table.
//!
//! ```text
//! wc/wa/wb/wo ──(ip rule iif … lookup 100: default dev wdelay)──► wdelay ──► this thread
//!        ▲                                                                        │ delay, rate
//!        └──────────(main table)◄── packet received on wdelay ◄───────────────────┘
//! ```
//!
//! Links are told apart by address, as the lab assigns them: the client's 198.51.100.0/24,
//! site A's uplink 203.0.113.0/25 and the home prefix 192.0.2.0/24, site B's uplink
//! 203.0.113.128/25 and 198.18.0.0/16 (N), and the ops link (198.19.255.0/24 and BIND9 at
//! 192.0.2.53), which has no delay.

use std::{
    cmp::Reverse,
    collections::BinaryHeap,
    fs::{File, OpenOptions},
    io::{Read as _, Write as _},
    net::Ipv4Addr,
    os::fd::AsRawFd as _,
    os::unix::fs::OpenOptionsExt as _,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde::Serialize;

use crate::netns::{Netns, move_thread_into};

/// The TUN device's name in the wan namespace.
pub const DEVICE: &str = "wdelay";
/// The routing table the wan's forwarded packets are looked up in.
const TABLE: &str = "100";

/// One-way delay and rate of the lab's links.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Profile {
    /// Round-trip time between site A and site B (each site's link has a quarter of it
    /// each way, so A→B→A crosses four).
    pub site_rtt_ms: f64,
    /// Rate of each site's link (both directions into a site), Mbit/s; `None`: unlimited.
    pub site_rate_mbit: Option<f64>,
    /// Round-trip time the client's own link adds (half each way).
    pub client_rtt_ms: f64,
    pub client_rate_mbit: Option<f64>,
    /// The most a link queues before it drops, in milliseconds of its rate.
    pub queue_ms: f64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    Client,
    SiteA,
    SiteB,
    Ops,
}

impl Side {
    fn of(addr: Ipv4Addr) -> Self {
        let [a, b, c, d] = addr.octets();
        match (a, b, c, d) {
            (198, 51, 100, _) => Self::Client,
            (192, 0, 2, 53) => Self::Ops,
            (203, 0, 113, x) if x < 128 => Self::SiteA,
            (203, 0, 113, _) => Self::SiteB,
            (192, 0, 2, _) => Self::SiteA,
            (198, 18, _, _) => Self::SiteB,
            _ => Self::Ops,
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl Profile {
    fn one_way(&self, side: Side) -> Duration {
        let ms = match side {
            Side::Client => self.client_rtt_ms / 2.0,
            Side::SiteA | Side::SiteB => self.site_rtt_ms / 4.0,
            Side::Ops => 0.0,
        };
        Duration::from_secs_f64(ms.max(0.0) / 1000.0)
    }

    fn rate_bps(&self, side: Side) -> Option<f64> {
        match side {
            Side::Client => self.client_rate_mbit,
            Side::SiteA | Side::SiteB => self.site_rate_mbit,
            Side::Ops => None,
        }
        .filter(|r| *r > 0.0)
        .map(|r| r * 1e6)
    }
}

/// What went through the delay line.
#[derive(Debug, Default, Serialize)]
pub struct Counters {
    pub packets: AtomicU64,
    pub bytes: AtomicU64,
    /// Dropped because the destination link's queue was full.
    pub dropped: AtomicU64,
    /// Writes back into the kernel that failed.
    pub write_errors: AtomicU64,
}

/// The running delay line; dropping it stops the thread, which removes the TUN device.
/// Drop it before the wan namespace.
pub struct DelayLine {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    pub counters: Arc<Counters>,
    pub profile: Profile,
}

impl DelayLine {
    /// Puts the delay line between every link of `wan` (`ifaces`: its interfaces).
    pub fn start(wan: &Netns, ifaces: &[&str], profile: Profile) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(Counters::default());
        let (ready_tx, ready_rx) = mpsc::channel::<Result<()>>();
        let ns_path = format!("/run/netns/{}", wan.name());
        let thread = {
            let (stop, counters) = (stop.clone(), counters.clone());
            thread::Builder::new()
                .name("wan-delay".into())
                .spawn(move || {
                    let tun = move_thread_into(&ns_path).and_then(|()| open_tun(DEVICE));
                    match tun {
                        Err(err) => {
                            let _ = ready_tx.send(Err(err));
                        }
                        Ok(tun) => {
                            let _ = ready_tx.send(Ok(()));
                            pump(tun, profile, &stop, &counters);
                        }
                    }
                })
                .context("starting the delay line's thread")?
        };
        let line = Self {
            stop,
            thread: Some(thread),
            counters,
            profile,
        };
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .context("the delay line's thread did not start")??;
        wan.ip(&["link", "set", DEVICE, "up"])?;
        for dev in ["all", DEVICE] {
            wan.run(
                "sysctl",
                &["-qw", &format!("net.ipv4.conf.{dev}.rp_filter=0")],
            )?;
        }
        wan.ip(&["route", "add", "default", "dev", DEVICE, "table", TABLE])?;
        for iface in ifaces {
            wan.ip(&["rule", "add", "iif", iface, "lookup", TABLE, "pref", "100"])
                .with_context(|| {
                    format!("sending what arrives on {iface} through the delay line")
                })?;
        }
        Ok(line)
    }
}

impl Drop for DelayLine {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

// <linux/if_tun.h>: TUNSETIFF is _IOW('T', 202, int), yet takes an ifreq and writes the
// name back (as agent::tap declares it).
nix::ioctl_readwrite_bad!(
    tun_set_iff,
    nix::request_code_write!(b'T', 202, size_of::<libc::c_int>()),
    libc::ifreq
);

/// Creates TUN device `name` (IFF_TUN | IFF_NO_PI, non-blocking); it lives while the fd does.
fn open_tun(name: &str) -> Result<File> {
    if name.len() >= libc::IFNAMSIZ {
        bail!("interface name {name} is too long");
    }
    let tun = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("/dev/net/tun")
        .context("opening /dev/net/tun")?;
    // SAFETY: an all-zero ifreq is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (slot, byte) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *slot = byte as libc::c_char;
    }
    req.ifr_ifru.ifru_flags = (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short;
    // SAFETY: an open tun descriptor and an ifreq that lives through the call.
    unsafe { tun_set_iff(tun.as_raw_fd(), &mut req) }
        .with_context(|| format!("creating TUN device {name}"))?;
    Ok(tun)
}

type Held = Reverse<(Instant, u64, Vec<u8>)>;

fn pump(mut tun: File, profile: Profile, stop: &AtomicBool, counters: &Counters) {
    let mut held: BinaryHeap<Held> = BinaryHeap::new();
    let mut link_free = [Instant::now(); 4];
    let mut seq = 0u64;
    let mut buf = vec![0u8; 65536];
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        while held.peek().is_some_and(|Reverse((at, _, _))| *at <= now) {
            if let Some(Reverse((_, _, packet))) = held.pop()
                && tun.write(&packet).is_err()
            {
                counters.write_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        let wait = held
            .peek()
            .map_or(Duration::from_millis(50), |Reverse((at, _, _))| {
                at.saturating_duration_since(now)
            })
            .min(Duration::from_millis(50));
        let mut pfd = libc::pollfd {
            fd: tun.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ts = libc::timespec {
            tv_sec: wait.as_secs() as libc::time_t,
            tv_nsec: wait.subsec_nanos() as libc::c_long,
        };
        // SAFETY: one pollfd, a valid timespec, no signal mask.
        let ready = unsafe { libc::ppoll(&mut pfd, 1, &ts, std::ptr::null()) };
        if ready <= 0 {
            continue;
        }
        loop {
            let n = match tun.read(&mut buf) {
                Ok(n) if n > 0 => n,
                _ => break,
            };
            let packet = buf[..n].to_vec();
            let arrived = Instant::now();
            let Some((src, dst)) = sides(&packet) else {
                // Not IPv4 (the lab has no IPv6 routes): passed on at once.
                held.push(Reverse((arrived, seq, packet)));
                seq += 1;
                continue;
            };
            let mut sent = arrived;
            if let Some(rate) = profile.rate_bps(dst) {
                let free = &mut link_free[dst.index()];
                let start = (*free).max(arrived);
                if start.saturating_duration_since(arrived).as_secs_f64() * 1000.0
                    > profile.queue_ms
                {
                    counters.dropped.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                sent = start + Duration::from_secs_f64(n as f64 * 8.0 / rate);
                *free = sent;
            }
            let release = sent + profile.one_way(src) + profile.one_way(dst);
            counters.packets.fetch_add(1, Ordering::Relaxed);
            counters.bytes.fetch_add(n as u64, Ordering::Relaxed);
            held.push(Reverse((release, seq, packet)));
            seq += 1;
        }
    }
}

fn sides(packet: &[u8]) -> Option<(Side, Side)> {
    if packet.len() < 20 || packet[0] >> 4 != 4 {
        return None;
    }
    let src = Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]);
    let dst = Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19]);
    Some((Side::of(src), Side::of(dst)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tunsetiff_is_the_kernels_request_number() {
        // TUNSETIFF as <linux/if_tun.h> spells it on x86 and arm.
        let request = nix::request_code_write!(b'T', 202, std::mem::size_of::<libc::c_int>());
        assert_eq!(request as u64, 0x4004_54ca);
    }

    #[test]
    fn sides_follow_the_lab_addresses() {
        let ip = |s: &str| Side::of(s.parse().expect("addr"));
        assert_eq!(ip("198.51.100.7"), Side::Client);
        assert_eq!(ip("203.0.113.1"), Side::SiteA);
        assert_eq!(ip("192.0.2.10"), Side::SiteA);
        assert_eq!(ip("192.0.2.53"), Side::Ops);
        assert_eq!(ip("203.0.113.129"), Side::SiteB);
        assert_eq!(ip("198.18.0.10"), Side::SiteB);
        assert_eq!(ip("198.19.255.2"), Side::Ops);
    }

    #[test]
    fn site_to_site_round_trip_is_the_site_rtt() {
        let p = Profile {
            site_rtt_ms: 20.0,
            site_rate_mbit: None,
            client_rtt_ms: 30.0,
            client_rate_mbit: None,
            queue_ms: 50.0,
        };
        let one_way = p.one_way(Side::SiteA) + p.one_way(Side::SiteB);
        assert_eq!(one_way * 2, Duration::from_millis(20));
        let client_a = p.one_way(Side::Client) + p.one_way(Side::SiteA);
        assert_eq!(client_a * 2, Duration::from_millis(40));
    }
}
