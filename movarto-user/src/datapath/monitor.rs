//! Listening to the datapath's verdicts as they happen (`movarto-user monitor`): the
//! listener writes `MONITOR_CONTROL`, renews its deadline, reads `MONITOR_EVENTS`, and
//! clears the control when it is dropped. The programs' side and the costs:
//! `movarto_common::monitor`.
//!
//! One listener at a time: a second one overwrites the first's filter, and the first
//! to stop turns the events off until the other renews (within a second).

use std::{
    net::{IpAddr, Ipv4Addr},
    path::Path,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result, bail};
use aya::maps::{Array, Map, MapData, PerCpuArray, RingBuf};
use movarto_common::{
    config::Config,
    counters::Counter,
    monitor::{MonitorControl, MonitorEvent, MonitorState, RENEW_EVERY_MS, hook, kind},
    net::{addr, family, proto},
};
use nix::time::{ClockId, clock_gettime};
use serde::Serialize;

use super::{Datapath, MONITOR_CONTROL_MAP, MONITOR_EVENTS_MAP, MONITOR_STATE_MAP};

/// What a verdict was, on the wire of `monitor --json` and as `--type` names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum VerdictKind {
    Drop,
    Tunnel,
    Nat,
    Icmp,
}

impl VerdictKind {
    pub const ALL: [VerdictKind; 4] = [
        VerdictKind::Drop,
        VerdictKind::Tunnel,
        VerdictKind::Nat,
        VerdictKind::Icmp,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            VerdictKind::Drop => "drop",
            VerdictKind::Tunnel => "tunnel",
            VerdictKind::Nat => "nat",
            VerdictKind::Icmp => "icmp",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == name)
    }

    const fn bit(self) -> u8 {
        match self {
            VerdictKind::Drop => kind::DROP,
            VerdictKind::Tunnel => kind::TUNNEL,
            VerdictKind::Nat => kind::NAT,
            VerdictKind::Icmp => kind::ICMP,
        }
    }

    fn of_bit(bit: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.bit() == bit)
    }
}

/// Which program saw the packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HookName {
    /// XDP on the uplink.
    Uplink,
    /// TC on the VM-facing interface.
    Vm,
}

/// What to listen for.
#[derive(Clone, Debug)]
pub struct Filter {
    /// Kinds to show; empty: all.
    pub kinds: Vec<VerdictKind>,
    /// Only packets from or to this address.
    pub service: Option<IpAddr>,
    /// Show one in this many verdicts, per CPU.
    pub sample_every: u32,
    /// At most this many events per second per CPU (0: no limit).
    pub max_per_second: u32,
}

impl Default for Filter {
    fn default() -> Self {
        Self {
            kinds: Vec::new(),
            service: None,
            sample_every: 1,
            max_per_second: DEFAULT_MAX_PER_SECOND,
        }
    }
}

/// The default rate limit: enough to read along, far below what would cost the
/// datapath (an event costs about as much as a flow-map update).
pub const DEFAULT_MAX_PER_SECOND: u32 = 1_000;

impl Filter {
    fn control(&self, until_ns: u64) -> MonitorControl {
        let types = if self.kinds.is_empty() {
            kind::ALL
        } else {
            self.kinds.iter().fold(0, |bits, k| bits | k.bit())
        };
        let (service_family, service_addr) = match self.service {
            None => (0, [0; 16]),
            Some(IpAddr::V4(v4)) => {
                let mut addr = [0; 16];
                addr[..4].copy_from_slice(&v4.octets());
                (family::IPV4, addr)
            }
            Some(IpAddr::V6(v6)) => (family::IPV6, v6.octets()),
        };
        MonitorControl {
            until_ns,
            sample_every: self.sample_every.max(1),
            max_per_second: self.max_per_second,
            types,
            service_family,
            _pad: [0; 6],
            service_addr,
        }
    }
}

/// One verdict the datapath reported.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Verdict {
    /// Wall-clock time, µs since the Unix epoch.
    pub unix_us: u64,
    pub kind: VerdictKind,
    /// The verdict, drop reason or event counter it was counted under.
    pub reason: Counter,
    pub hook: HookName,
    pub ifindex: u32,
    /// Transport protocol: `tcp`, `udp`, `icmp`, `icmpv6`, or its number.
    pub protocol: String,
    pub src: IpAddr,
    pub dst: IpAddr,
    /// Ports in host order; absent without ports.
    pub src_port: Option<u16>,
    pub dst_port: Option<u16>,
    /// TCP flags (`SYN`, `ACK`, ...), empty otherwise.
    pub tcp_flags: String,
    /// The frame's length in bytes.
    pub frame_len: u32,
    /// The service it belongs to (its `H`), if from or to its `H` or `N`.
    pub service: Option<IpAddr>,
}

impl Verdict {
    /// The one-line form: `drop drop_gue_bad_token uplink udp 203.0.113.66:6080 > ...`.
    pub fn line(&self) -> String {
        let end = |addr: IpAddr, port: Option<u16>| match (addr, port) {
            (IpAddr::V6(v6), Some(p)) => format!("[{v6}]:{p}"),
            (addr, Some(p)) => format!("{addr}:{p}"),
            (addr, None) => addr.to_string(),
        };
        let flags = if self.tcp_flags.is_empty() {
            String::new()
        } else {
            format!(" [{}]", self.tcp_flags)
        };
        format!(
            "{} {} {} {} {} > {}{} len {}",
            self.kind.name(),
            self.reason.name(),
            match self.hook {
                HookName::Uplink => "uplink",
                HookName::Vm => "vm",
            },
            self.protocol,
            end(self.src, self.src_port),
            end(self.dst, self.dst_port),
            flags,
            self.frame_len
        ) + &self
            .service
            .map(|h| format!(" service {h}"))
            .unwrap_or_default()
    }
}

/// What the programs did with the monitored verdicts while listening, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Stats {
    /// Verdicts of the listened-for kinds and service.
    pub seen: u64,
    /// Written into the ring buffer.
    pub emitted: u64,
    pub sampled_out: u64,
    pub rate_limited: u64,
    /// Lost because the listener fell behind.
    pub ring_full: u64,
}

impl Stats {
    fn since(self, start: Stats) -> Stats {
        Stats {
            seen: self.seen.saturating_sub(start.seen),
            emitted: self.emitted.saturating_sub(start.emitted),
            sampled_out: self.sampled_out.saturating_sub(start.sampled_out),
            rate_limited: self.rate_limited.saturating_sub(start.rate_limited),
            ring_full: self.ring_full.saturating_sub(start.ring_full),
        }
    }
}

/// A listener: while it lives, the datapath emits the verdicts of its [`Filter`].
pub struct Listener {
    control: Array<MapData, MonitorControl>,
    state: PerCpuArray<MapData, MonitorState>,
    events: RingBuf<MapData>,
    filter: Filter,
    /// Wall clock minus CLOCK_MONOTONIC, to date the events.
    realtime_offset_ns: i128,
    /// The service's `H` and `N`, to name the service of an event.
    service: Option<(IpAddr, Option<IpAddr>)>,
    start: Stats,
}

impl Listener {
    /// Listens to the datapath pinned in `dir`.
    pub fn pinned(dir: &Path, config: &Config, filter: Filter) -> Result<Self> {
        let open = |name: &str| -> Result<Map> {
            let path = dir.join(name);
            let data = MapData::from_pin(&path).with_context(|| {
                format!(
                    "opening {} (pins made by a movarto without the monitor: detach and attach \
                     again)",
                    path.display()
                )
            })?;
            Map::from_map_data(data).with_context(|| format!("map {name}"))
        };
        Self::start(open, config, filter)
    }

    /// Listens to a loaded (maybe unattached) datapath: the tests and the bench.
    pub fn loaded(datapath: &Datapath, filter: Filter) -> Result<Self> {
        let open = |name: &str| -> Result<Map> {
            let data = match datapath.ebpf.map(name) {
                Some(Map::Array(data) | Map::PerCpuArray(data) | Map::RingBuf(data)) => data,
                _ => bail!("the object has no map {name} of the monitor's kind"),
            };
            let id = data
                .info()
                .with_context(|| format!("reading {name}'s information"))?
                .id();
            let data = MapData::from_id(id).with_context(|| format!("opening map {name}"))?;
            Map::from_map_data(data).with_context(|| format!("map {name}"))
        };
        Self::start(open, &datapath.config()?, filter)
    }

    fn start(open: impl Fn(&str) -> Result<Map>, config: &Config, filter: Filter) -> Result<Self> {
        if let Some(service) = filter.service
            && service.is_unspecified()
        {
            bail!("--service {service} names no service");
        }
        let mut listener = Self {
            control: Array::try_from(open(MONITOR_CONTROL_MAP)?).context(MONITOR_CONTROL_MAP)?,
            state: PerCpuArray::try_from(open(MONITOR_STATE_MAP)?).context(MONITOR_STATE_MAP)?,
            events: RingBuf::try_from(open(MONITOR_EVENTS_MAP)?).context(MONITOR_EVENTS_MAP)?,
            filter,
            realtime_offset_ns: realtime_offset_ns()?,
            service: addr::from_map(config.home_addr, config.service_family).map(|home| {
                let new = (config.new_addr != [0; 16])
                    .then(|| addr::from_map(config.new_addr, config.service_family))
                    .flatten();
                (home, new)
            }),
            start: Stats::default(),
        };
        listener.start = listener.totals()?;
        // Whatever an earlier listener left unread is not this one's.
        while listener.events.next().is_some() {}
        listener.renew()?;
        Ok(listener)
    }

    /// Pushes the deadline three renewals away; call it every [`Listener::RENEW_EVERY`].
    pub fn renew(&mut self) -> Result<()> {
        let now = monotonic_ns()?;
        let until = now + 3 * RENEW_EVERY_MS * 1_000_000;
        self.control
            .set(0, self.filter.control(until), 0)
            .context("writing the monitor's control")
    }

    /// How often [`Listener::renew`] must run.
    pub const RENEW_EVERY: Duration = Duration::from_millis(RENEW_EVERY_MS);

    /// Every event in the ring buffer now.
    pub fn drain(&mut self) -> Vec<Verdict> {
        let mut out = Vec::new();
        let mut events = Vec::new();
        while let Some(item) = self.events.next() {
            events.extend(read_event(&item));
        }
        for event in &events {
            out.extend(self.verdict(event));
        }
        out
    }

    /// The ring buffer's descriptor, to wait on (readable when events are in).
    pub fn events_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd as _;
        self.events.as_fd()
    }

    /// What happened to the monitored verdicts since this listener started.
    pub fn stats(&self) -> Result<Stats> {
        Ok(self.totals()?.since(self.start))
    }

    /// What happened to the monitored verdicts since the datapath was loaded, over
    /// every listener: while nobody listens it does not move.
    pub fn totals(&self) -> Result<Stats> {
        let per_cpu = self
            .state
            .get(&0, 0)
            .context("reading the monitor's state")?;
        Ok(per_cpu.iter().fold(Stats::default(), |sum, cpu| Stats {
            seen: sum.seen + cpu.seen,
            emitted: sum.emitted + cpu.emitted,
            sampled_out: sum.sampled_out + cpu.sampled_out,
            rate_limited: sum.rate_limited + cpu.rate_limited,
            ring_full: sum.ring_full + cpu.ring_full,
        }))
    }

    /// Turns the events off (also done on drop).
    pub fn stop(&mut self) -> Result<()> {
        self.control
            .set(0, MonitorControl::default(), 0)
            .context("clearing the monitor's control")
    }

    fn verdict(&self, event: &MonitorEvent) -> Option<Verdict> {
        let reason = Counter::ALL.get(event.counter as usize).copied()?;
        let kind = VerdictKind::of_bit(event.kind)?;
        let unix_ns = i128::from(event.time_ns) + self.realtime_offset_ns;
        // No family: the IP header could not be read, so there are no addresses.
        let of = |bytes| {
            addr::from_map(bytes, event.family).unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED))
        };
        let (src, dst) = (of(event.src_addr), of(event.dst_addr));
        let service = self.service.and_then(|(home, new)| {
            let ours = |a: IpAddr| a == home || Some(a) == new;
            (ours(src) || ours(dst)).then_some(home)
        });
        let has_ports = matches!(event.protocol, proto::TCP | proto::UDP)
            && (event.src_port != 0 || event.dst_port != 0);
        let port = |p: u16| has_ports.then(|| u16::from_be(p));
        Some(Verdict {
            unix_us: u64::try_from(unix_ns / 1_000).unwrap_or(0),
            kind,
            reason,
            hook: if event.hook == hook::VM {
                HookName::Vm
            } else {
                HookName::Uplink
            },
            ifindex: event.ifindex,
            protocol: protocol_name(event.protocol),
            src,
            dst,
            src_port: port(event.src_port),
            dst_port: port(event.dst_port),
            tcp_flags: if event.protocol == proto::TCP {
                tcp_flags(event.tcp_flags)
            } else {
                String::new()
            },
            frame_len: event.frame_len,
            service,
        })
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Err(err) = self.stop() {
            tracing::warn!("{err:#}: the datapath emits until the deadline passes (3 s)");
        }
    }
}

fn read_event(bytes: &[u8]) -> Option<MonitorEvent> {
    if bytes.len() < size_of::<MonitorEvent>() {
        return None;
    }
    // SAFETY: the length is checked; MonitorEvent is plain data valid for every bit
    // pattern, and read_unaligned needs no alignment.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<MonitorEvent>()) })
}

fn protocol_name(protocol: u8) -> String {
    match protocol {
        proto::TCP => "tcp".into(),
        proto::UDP => "udp".into(),
        proto::ICMP => "icmp".into(),
        proto::ICMPV6 => "icmpv6".into(),
        other => other.to_string(),
    }
}

fn tcp_flags(flags: u8) -> String {
    const NAMES: [(u8, &str); 6] = [
        (0x02, "SYN"),
        (0x10, "ACK"),
        (0x01, "FIN"),
        (0x04, "RST"),
        (0x08, "PSH"),
        (0x20, "URG"),
    ];
    NAMES
        .iter()
        .filter(|(bit, _)| flags & bit != 0)
        .map(|(_, name)| *name)
        .collect::<Vec<_>>()
        .join(",")
}

fn monotonic_ns() -> Result<u64> {
    let now = clock_gettime(ClockId::CLOCK_MONOTONIC).context("reading CLOCK_MONOTONIC")?;
    Ok(now.tv_sec() as u64 * 1_000_000_000 + now.tv_nsec() as u64)
}

fn realtime_offset_ns() -> Result<i128> {
    let monotonic = monotonic_ns()?;
    let wall = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .context("the clock is before 1970")?
        .as_nanos();
    Ok(wall as i128 - i128::from(monotonic))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_filter_becomes_the_control() {
        let control = Filter {
            kinds: vec![VerdictKind::Drop, VerdictKind::Nat],
            service: Some("192.0.2.10".parse().expect("addr")),
            sample_every: 0,
            max_per_second: 5,
        }
        .control(42);
        assert_eq!(control.until_ns, 42);
        assert_eq!(control.types, kind::DROP | kind::NAT);
        assert_eq!(control.sample_every, 1);
        assert_eq!(control.max_per_second, 5);
        assert_eq!(control.service_family, family::IPV4);
        assert_eq!(&control.service_addr[..5], &[192, 0, 2, 10, 0]);
        assert_eq!(Filter::default().control(1).types, kind::ALL);
    }

    #[test]
    fn an_event_reads_as_a_line() {
        let v = Verdict {
            unix_us: 0,
            kind: VerdictKind::Drop,
            reason: Counter::DropGueBadToken,
            hook: HookName::Uplink,
            ifindex: 2,
            protocol: protocol_name(proto::UDP),
            src: "203.0.113.66".parse().expect("addr"),
            dst: "2001:db8::2".parse().expect("addr"),
            src_port: Some(6080),
            dst_port: Some(6080),
            tcp_flags: tcp_flags(0x12),
            frame_len: 98,
            service: Some("192.0.2.10".parse().expect("addr")),
        };
        assert_eq!(
            v.line(),
            "drop drop_gue_bad_token uplink udp 203.0.113.66:6080 > [2001:db8::2]:6080 [SYN,ACK] len 98 \
             service 192.0.2.10"
        );
        assert!(read_event(&[0; 10]).is_none());
    }
}
