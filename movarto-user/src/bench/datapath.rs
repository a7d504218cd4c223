//! `movarto-user bench datapath`: what each path of the datapath costs per packet.
//!
//! Every path of DESIGN.md's table runs through BPF_PROG_TEST_RUN beside a no-op
//! program of the same kind (XDP or TC) in the same run, interleaved, so a busy
//! or slow machine moves both and the ratio stays meaningful. Two methods:
//! - [`Method::RepeatLoop`]: one call, the kernel runs the frame `repeat` times
//!   and reports the mean. Only for paths that leave the frame as they found
//!   it: the loop does not restore it between runs, so a rewritten frame would
//!   take another path from the second run on.
//! - [`Method::OneRunPerCall`]: the paths that rewrite the frame (encapsulate,
//!   decapsulate, NAT, clamp a SYN's MSS), one run per call on a fresh copy; the
//!   figure is the median of the kernel's time for each run, which includes its
//!   timer's overhead, so read these against the no-op timed the same way.
//!
//! Each path's verdict and counter are checked on every run: a figure is only
//! reported for the path it names.

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use aya::{
    Ebpf, EbpfLoader,
    programs::{SchedClassifier, TestRun as _, TestRunOptions, Xdp},
};
use movarto_common::{
    config::Mode,
    counters::Counter,
    flow::{FlowValue, origin, state},
    ids::{MacAddr, SessionToken},
    service::SERVICES_DEFAULT_CAPACITY,
};
use serde::Serialize;

use super::{
    frames::{
        self, CLIENT, CLIENT_PORT, GATEWAY_MAC, HOME, NEW, OTHER_TENANT, SERVICE_PORT, Segment, TA,
        TB, TOKEN, VM_MAC,
    },
    scratch::{self, Scratch},
};
use crate::datapath::{
    ATTACHED_FLOWS_CAPACITY, Datapath, LoadOptions, NOOP_OBJECT, SiteConfig, UPLINK_INGRESS,
    flows::monotonic_ns,
    monitor::{Filter, Listener},
    retry_interrupted,
};

/// How the bench runs.
#[derive(Clone, Debug)]
pub struct Options {
    /// Rounds of every path; min, median and max are over the rounds.
    pub rounds: u32,
    /// Runs per call of the kernel's repeat loop.
    pub repeat: u32,
    /// Calls per round for the paths that run once per call.
    pub calls: u32,
    /// Capacity of the flow map (`None`: what `attach` gives it).
    pub flows_capacity: Option<u32>,
    /// The flow map's states to measure in.
    pub flow_maps: Vec<FlowMap>,
    /// Only these paths (all if empty).
    pub paths: Vec<PathId>,
    /// What to measure each path with besides nothing (the default).
    pub instruments: Vec<Instrument>,
    /// How many services the uplink serves while each path is measured (the measured
    /// one, and IPv6 others to fill the services map); empty: one.
    pub services: Vec<u32>,
}

/// What runs beside the datapath while a path is measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Instrument {
    /// Nothing: nobody listens, no debug logs.
    None,
    /// `monitor` listening with its defaults (every kind, 1,000 events per second per
    /// CPU), read between calls: under load, most verdicts take the rate limit's path.
    Monitor,
    /// Loaded with the debug logs on (`attach --debug-log`), read between calls: in
    /// the repeat loop most records find aya-log's ring buffer full.
    DebugLog,
}

impl Instrument {
    pub const fn name(self) -> &'static str {
        match self {
            Instrument::None => "none",
            Instrument::Monitor => "monitor",
            Instrument::DebugLog => "debug-log",
        }
    }
}

/// What reads the instrument's output between calls.
enum Reader {
    None,
    Monitor(Box<Listener>),
    DebugLog(aya_log::EbpfLogger<NullLog>),
}

impl Reader {
    fn start(dp: &Datapath, instrument: Instrument) -> Result<Self> {
        Ok(match instrument {
            Instrument::None => Reader::None,
            Instrument::Monitor => {
                Reader::Monitor(Box::new(Listener::loaded(dp, Filter::default())?))
            }
            Instrument::DebugLog => {
                let id = dp
                    .program_infos()?
                    .into_iter()
                    .find(|(name, _)| name == UPLINK_INGRESS)
                    .map(|(_, info)| info.id())
                    .context("the uplink program is not loaded")?;
                Reader::DebugLog(
                    aya_log::EbpfLogger::init_from_id_with_logger(id, NullLog)
                        .map_err(|err| anyhow::anyhow!("reading the debug logs: {err}"))?,
                )
            }
        })
    }

    /// Empties the ring buffer, outside the kernel's timing.
    fn read(&mut self) {
        match self {
            Reader::None => {}
            Reader::Monitor(listener) => {
                listener.drain();
            }
            Reader::DebugLog(logger) => logger.flush(),
        }
    }
}

/// Discards the debug logs the bench reads.
struct NullLog;

impl log::Log for NullLog {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        false
    }
    fn log(&self, _: &log::Record<'_>) {}
    fn flush(&self) {}
}

/// The state of the flow map a path is measured in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FlowMap {
    /// Only the measured flow.
    Empty,
    /// Filled to capacity with other established flows first.
    Full,
}

impl FlowMap {
    pub const fn name(self) -> &'static str {
        match self {
            FlowMap::Empty => "empty",
            FlowMap::Full => "full",
        }
    }
}

/// How a path was timed (see the module's documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    RepeatLoop,
    OneRunPerCall,
}

impl Method {
    pub const fn name(self) -> &'static str {
        match self {
            Method::RepeatLoop => "repeat-loop",
            Method::OneRunPerCall => "one-run-per-call",
        }
    }
}

/// Which program a path runs through.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Program {
    /// XDP on the uplink.
    UplinkIngress,
    /// TC on the VM-facing interface.
    VmIngress,
}

/// The measured paths: DESIGN.md's table, by site and mode, and the packets
/// of other tenants that every path must leave alone cheaply.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PathId {
    /// Site A, `track`: a packet for another tenant's address.
    NotAServiceTrack,
    /// Site A, `track`: an established flow's packet to `H`.
    TrackToHome,
    /// Site A, `track`: a SYN to `H` on a new 5-tuple each run (insert, MSS clamp).
    TrackSynNew,
    /// Site A, `track`: the VM's packet on an established flow.
    TrackFromVm,
    /// Site A, `forward`: a packet to `H`, encapsulated to `TB`, routed, sent.
    ForwardToTunnel,
    /// Site A, `forward`: the VM's reply from `TB`, decapsulated and routed out.
    ForwardFromTunnel,
    /// Site B, `receive`: a packet for another tenant's address.
    NotAServiceReceive,
    /// Site B, `receive`: GUE from `TA`, decapsulated and delivered to the VM.
    ReceiveFromTunnel,
    /// Site B, `receive`: a packet to `N`, rewritten to `H` and delivered.
    NatIn,
    /// Site B, `receive`: the VM's reply on a NAT flow, rewritten to `N`, routed.
    NatOut,
    /// Site B, `receive`: the VM's reply on a pre-move flow, encapsulated to `TA`.
    VmToTunnel,
}

const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const XDP_REDIRECT: u32 = 4;
const TC_ACT_OK: u32 = 0;
const TC_ACT_REDIRECT: u32 = 7;

/// A return value's name.
fn verdict_name(program: Program, value: u32) -> String {
    match (program, value) {
        (Program::UplinkIngress, XDP_PASS) => "XDP_PASS".into(),
        (Program::UplinkIngress, XDP_TX) => "XDP_TX".into(),
        (Program::UplinkIngress, XDP_REDIRECT) => "XDP_REDIRECT".into(),
        (Program::VmIngress, TC_ACT_OK) => "TC_ACT_OK".into(),
        (Program::VmIngress, TC_ACT_REDIRECT) => "TC_ACT_REDIRECT".into(),
        (_, other) => format!("return value {other}"),
    }
}

impl PathId {
    pub const ALL: [PathId; 11] = [
        PathId::NotAServiceTrack,
        PathId::TrackToHome,
        PathId::TrackSynNew,
        PathId::TrackFromVm,
        PathId::ForwardToTunnel,
        PathId::ForwardFromTunnel,
        PathId::NotAServiceReceive,
        PathId::ReceiveFromTunnel,
        PathId::NatIn,
        PathId::NatOut,
        PathId::VmToTunnel,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            PathId::NotAServiceTrack => "not-a-service-track",
            PathId::TrackToHome => "track-to-home",
            PathId::TrackSynNew => "track-syn-new",
            PathId::TrackFromVm => "track-from-vm",
            PathId::ForwardToTunnel => "forward-to-tunnel",
            PathId::ForwardFromTunnel => "forward-from-tunnel",
            PathId::NotAServiceReceive => "not-a-service-receive",
            PathId::ReceiveFromTunnel => "receive-from-tunnel",
            PathId::NatIn => "nat-in",
            PathId::NatOut => "nat-out",
            PathId::VmToTunnel => "vm-to-tunnel",
        }
    }

    /// The path by its name.
    pub fn from_name(name: &str) -> Option<PathId> {
        Self::ALL.into_iter().find(|p| p.name() == name)
    }

    const fn program(self) -> Program {
        match self {
            PathId::TrackFromVm | PathId::NatOut | PathId::VmToTunnel => Program::VmIngress,
            _ => Program::UplinkIngress,
        }
    }

    const fn mode(self) -> Mode {
        match self {
            PathId::NotAServiceTrack
            | PathId::TrackToHome
            | PathId::TrackSynNew
            | PathId::TrackFromVm => Mode::Track,
            PathId::ForwardToTunnel | PathId::ForwardFromTunnel => Mode::Forward,
            _ => Mode::Receive,
        }
    }

    /// Whether the path leaves the frame as it found it, so the repeat loop can time it.
    const fn method(self) -> Method {
        match self {
            PathId::NotAServiceTrack
            | PathId::TrackToHome
            | PathId::TrackFromVm
            | PathId::NotAServiceReceive => Method::RepeatLoop,
            _ => Method::OneRunPerCall,
        }
    }

    /// The counter every run of the path adds one to: the proof it took the path.
    const fn counter(self) -> Counter {
        match self {
            PathId::NotAServiceTrack
            | PathId::TrackToHome
            | PathId::TrackFromVm
            | PathId::NotAServiceReceive => Counter::PassIpv4,
            PathId::TrackSynNew => Counter::MssClamped,
            PathId::ForwardToTunnel | PathId::VmToTunnel => Counter::TunnelOut,
            PathId::ForwardFromTunnel | PathId::ReceiveFromTunnel => Counter::TunnelIn,
            PathId::NatIn => Counter::NatIn,
            PathId::NatOut => Counter::NatOut,
        }
    }

    /// The return values the path may end in.
    const fn verdicts(self) -> &'static [u32] {
        match self {
            PathId::NotAServiceTrack
            | PathId::TrackToHome
            | PathId::TrackSynNew
            | PathId::NotAServiceReceive => &[XDP_PASS],
            PathId::TrackFromVm => &[TC_ACT_OK],
            PathId::ForwardToTunnel
            | PathId::ForwardFromTunnel
            | PathId::ReceiveFromTunnel
            | PathId::NatIn => &[XDP_TX, XDP_REDIRECT],
            PathId::NatOut | PathId::VmToTunnel => &[TC_ACT_OK, TC_ACT_REDIRECT],
        }
    }

    /// The frames the path runs: one, or (for [`PathId::TrackSynNew`]) one per
    /// run, each a new 5-tuple.
    fn frames(self, runs: u32) -> Result<Vec<Vec<u8>>> {
        let client = (CLIENT, CLIENT_PORT);
        let frame = match self {
            PathId::NotAServiceTrack | PathId::NotAServiceReceive => {
                frames::to_uplink(client, (OTHER_TENANT, SERVICE_PORT), Segment::Data)?
            }
            PathId::TrackToHome | PathId::ForwardToTunnel => {
                frames::to_uplink(client, (HOME, SERVICE_PORT), Segment::Data)?
            }
            PathId::TrackSynNew => {
                return (0..runs)
                    .map(|n| {
                        frames::to_uplink(
                            frames::flood_client(SYN_CLIENTS + n),
                            (HOME, SERVICE_PORT),
                            Segment::Syn,
                        )
                    })
                    .collect();
            }
            PathId::TrackFromVm | PathId::NatOut | PathId::VmToTunnel => {
                frames::from_vm(Segment::Data)?
            }
            PathId::ForwardFromTunnel => frames::gue(TB, TA, &frames::from_vm(Segment::Data)?),
            PathId::ReceiveFromTunnel => frames::gue(
                TA,
                TB,
                &frames::to_uplink(client, (HOME, SERVICE_PORT), Segment::Data)?,
            ),
            PathId::NatIn => frames::to_uplink(client, (NEW, SERVICE_PORT), Segment::Data)?,
        };
        Ok(vec![frame])
    }

    /// The flow the path finds in the map: the measured flow, established, of
    /// the origin the path expects (none for other tenants' packets and new SYNs).
    fn seeded_origin(self) -> Option<u8> {
        match self {
            PathId::NotAServiceTrack | PathId::NotAServiceReceive | PathId::TrackSynNew => None,
            PathId::TrackToHome
            | PathId::TrackFromVm
            | PathId::ForwardToTunnel
            | PathId::ForwardFromTunnel => Some(origin::TRACKED),
            PathId::ReceiveFromTunnel | PathId::VmToTunnel => Some(origin::TUNNELLED),
            PathId::NatIn | PathId::NatOut => Some(origin::NAT),
        }
    }
}

/// Where the SYN flood's clients start in [`frames::flood_client`]'s sequence,
/// past the flows that fill the map.
const SYN_CLIENTS: u32 = 1 << 31;

/// min, median and max.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Spread {
    pub min: f64,
    pub median: f64,
    pub max: f64,
}

impl Spread {
    fn of(values: &mut [f64]) -> Spread {
        values.sort_by(f64::total_cmp);
        Spread {
            min: values.first().copied().unwrap_or(0.0),
            median: median(values),
            max: values.last().copied().unwrap_or(0.0),
        }
    }
}

/// The median of sorted `values`.
fn median(values: &[f64]) -> f64 {
    match values.len() {
        0 => 0.0,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// One path's figures.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub path: PathId,
    pub program: Program,
    pub mode: Mode,
    pub flow_map: FlowMap,
    /// Services on the uplink: the measured one and others (IPv6, of every mode).
    pub services: u32,
    /// What ran beside the datapath.
    pub instrument: Instrument,
    pub method: Method,
    /// What the path returned (checked on every run).
    pub verdict: String,
    /// Nanoseconds per packet over the rounds.
    pub ns: Spread,
    /// The no-op program of the same kind, timed the same way in the same rounds.
    pub noop_ns: Spread,
    /// Median over the no-op's median.
    pub ratio_to_noop: f64,
    /// Median minus the no-op's median: the path's own cost.
    pub over_noop_ns: f64,
}

/// The whole run.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub kernel: String,
    pub cpus: usize,
    pub rounds: u32,
    pub repeat: u32,
    pub calls: u32,
    pub flows_capacity: u32,
    pub pending_flows_capacity: u32,
    pub rows: Vec<Row>,
}

/// The no-op XDP and TC programs, loaded.
struct Baseline {
    ebpf: Ebpf,
}

impl Baseline {
    fn load() -> Result<Self> {
        let mut ebpf = EbpfLoader::new()
            .load(NOOP_OBJECT)
            .context("loading the no-op programs")?;
        for name in ["noop_xdp", "noop_tc"] {
            let prog = ebpf
                .program_mut(name)
                .with_context(|| format!("program {name} missing"))?;
            match prog {
                aya::programs::Program::Xdp(p) => retry_interrupted(|| p.load()),
                aya::programs::Program::SchedClassifier(p) => retry_interrupted(|| p.load()),
                _ => bail!("{name} is neither XDP nor TC"),
            }
            .with_context(|| format!("the verifier rejected {name}"))?;
        }
        Ok(Self { ebpf })
    }

    fn run(&self, program: Program, frame: &[u8], repeat: u32) -> Result<(u32, Duration)> {
        let name = match program {
            Program::UplinkIngress => "noop_xdp",
            Program::VmIngress => "noop_tc",
        };
        let prog = self
            .ebpf
            .program(name)
            .with_context(|| format!("program {name} missing"))?;
        let opts = options(frame, repeat);
        let result = match prog {
            aya::programs::Program::Xdp(p) => p.test_run(opts),
            aya::programs::Program::SchedClassifier(p) => p.test_run(opts),
            _ => bail!("{name} is neither XDP nor TC"),
        }
        .with_context(|| format!("BPF_PROG_TEST_RUN of {name}"))?;
        Ok((result.return_value, result.duration))
    }
}

fn options(frame: &[u8], repeat: u32) -> TestRunOptions<'_> {
    TestRunOptions {
        data_in: Some(frame),
        repeat,
        ..Default::default()
    }
}

fn run_datapath(
    dp: &Datapath,
    program: Program,
    frame: &[u8],
    repeat: u32,
) -> Result<(u32, Duration)> {
    let opts = options(frame, repeat);
    let result = match program {
        Program::UplinkIngress => {
            let xdp: &Xdp = dp.uplink_ingress()?;
            xdp.test_run(opts)
        }
        Program::VmIngress => {
            let tc: &SchedClassifier = dp.vm_ingress()?;
            tc.test_run(opts)
        }
    }
    .context("BPF_PROG_TEST_RUN of the datapath")?;
    Ok((result.return_value, result.duration))
}

/// The site configuration a mode is measured in.
fn site(mode: Mode, scratch: &Scratch) -> SiteConfig {
    let token = SessionToken(TOKEN);
    let mut site = match mode {
        Mode::Receive | Mode::Nat | Mode::Direct => SiteConfig::new(mode, HOME.into())
            .with_new_addr(Some(NEW.into()))
            .with_tunnel(TB, TA, token),
        _ => SiteConfig::new(mode, HOME.into()).with_tunnel(TA, TB, token),
    }
    .with_macs(MacAddr(VM_MAC), MacAddr(GATEWAY_MAC));
    site.uplink_ifindex = scratch.uplink_ifindex;
    site.vm_ifindex = scratch.vm_ifindex;
    site
}

/// An established flow of `origin`, last seen `now`.
fn established(origin: u8, now: u64) -> FlowValue {
    FlowValue {
        first_seen_ns: now,
        last_seen_ns: now,
        state: state::SYN_SEEN
            | state::ESTABLISHED
            | state::SEEN_FROM_PEER
            | state::SEEN_FROM_SERVICE,
        origin,
        ..FlowValue::default()
    }
}

/// A SYN nobody answered yet, seen `now`: what a flood leaves in the pending map.
fn handshake(now: u64) -> FlowValue {
    FlowValue {
        first_seen_ns: now,
        last_seen_ns: now,
        state: state::SYN_SEEN | state::SEEN_FROM_PEER,
        origin: origin::TRACKED,
        ..FlowValue::default()
    }
}

/// Runs the bench. Root only; everything it loads and builds is gone when it returns
/// (the programs, the maps) or when the process exits (its network namespace).
pub fn run(opts: &Options, mut progress: impl FnMut(&str)) -> Result<Report> {
    if opts.rounds == 0 || opts.repeat == 0 || opts.calls == 0 {
        bail!("--rounds, --repeat and --calls must each be at least 1");
    }
    let scratch = scratch::enter()?;
    let baseline = Baseline::load()?;
    let paths: Vec<PathId> = if opts.paths.is_empty() {
        PathId::ALL.to_vec()
    } else {
        opts.paths.clone()
    };
    let mut rows = Vec::new();
    let (mut capacity, mut pending_capacity) = (0, 0);
    // The monitor is measured beside nothing, in the same rounds (see `measure`); the
    // debug logs need a datapath loaded with them.
    let mut instruments = vec![Instrument::None];
    if opts.instruments.contains(&Instrument::DebugLog) {
        instruments.push(Instrument::DebugLog);
    }
    let service_counts = if opts.services.is_empty() {
        vec![1]
    } else {
        opts.services.clone()
    };
    if service_counts.contains(&0) {
        bail!("--services must be at least 1: the measured service");
    }
    let settings: Vec<(FlowMap, u32, Instrument)> = opts
        .flow_maps
        .iter()
        .flat_map(|&fill| service_counts.iter().map(move |&n| (fill, n)))
        .flat_map(|(fill, n)| instruments.iter().map(move |&i| (fill, n, i)))
        .collect();
    for (fill, services, instrument) in settings {
        // A fresh datapath per setting: nothing carries over.
        let mut dp = Datapath::load_with(&LoadOptions {
            flows_capacity: Some(opts.flows_capacity.unwrap_or(ATTACHED_FLOWS_CAPACITY)),
            services_capacity: Some(services.max(SERVICES_DEFAULT_CAPACITY)),
            debug_log: instrument == Instrument::DebugLog,
            ..LoadOptions::default()
        })?;
        if services > 1 {
            progress(&format!("adding {} other services", services - 1));
            add_other_services(&mut dp, &scratch, services - 1)?;
        }
        capacity = dp.flows_capacity()?;
        pending_capacity = dp.pending_flows_capacity()?;
        if fill == FlowMap::Full {
            progress(&format!(
                "filling the flow maps with {capacity} established and {pending_capacity} \
                 pending flows"
            ));
            let now = monotonic_ns()?;
            dp.insert_flows((0..capacity).map(|n| {
                let (peer, port) = frames::flood_client(n);
                (
                    frames::flow_key(peer, port),
                    established(origin::TRACKED, now),
                )
            }))?;
            dp.insert_flows((capacity..capacity + pending_capacity).map(|n| {
                let (peer, port) = frames::flood_client(n);
                (frames::flow_key(peer, port), handshake(now))
            }))?;
        }
        for &path in &paths {
            progress(&format!(
                "{} (flow map {}, {services} services, instrument {})",
                path.name(),
                fill.name(),
                instrument.name()
            ));
            let setting = Setting {
                fill,
                services,
                instrument,
            };
            rows.extend(measure(&mut dp, &baseline, &scratch, path, setting, opts)?);
        }
    }
    Ok(Report {
        kernel: kernel_release(),
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        rounds: opts.rounds,
        repeat: opts.repeat,
        calls: opts.calls,
        flows_capacity: capacity,
        pending_flows_capacity: pending_capacity,
        rows,
    })
}

/// What a path is measured in.
#[derive(Clone, Copy)]
struct Setting {
    fill: FlowMap,
    services: u32,
    instrument: Instrument,
}

/// `count` services beside the measured one, in 2001:db8::/32 so none is the measured
/// one's or its client's: each mode in turn, each with its own `N`, peer and token.
fn add_other_services(dp: &mut Datapath, scratch: &Scratch, count: u32) -> Result<()> {
    let uplink = site(Mode::Track, scratch).to_map()?;
    dp.set_uplink(&uplink)?;
    let modes = [
        Mode::Track,
        Mode::Forward,
        Mode::Receive,
        Mode::Nat,
        Mode::Direct,
    ];
    let others = (0..count)
        .map(|i| {
            let [_, _, hi, lo] = i.to_be_bytes();
            let (hi, lo) = (u16::from(hi), u16::from(lo));
            let home = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, hi, lo);
            let new = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, hi, lo);
            let peer = Ipv4Addr::new(203, 0, 113, 100 + (i % 100) as u8);
            let mut other = SiteConfig::new(modes[i as usize % modes.len()], home.into())
                .with_new_addr(Some(new.into()))
                .with_tunnel(TA, peer, SessionToken(u64::from(i) + 1))
                .with_macs(MacAddr(VM_MAC), MacAddr(GATEWAY_MAC));
            other.uplink_ifindex = scratch.uplink_ifindex;
            other.vm_ifindex = scratch.vm_ifindex;
            other.to_map()
        })
        .collect::<Result<Vec<_>>>()?;
    dp.services_mut()?.add_all(others)?;
    Ok(())
}

fn measure(
    dp: &mut Datapath,
    baseline: &Baseline,
    scratch: &Scratch,
    path: PathId,
    setting: Setting,
    opts: &Options,
) -> Result<Vec<Row>> {
    let Setting {
        fill,
        services,
        instrument,
    } = setting;
    let measured = site(path.mode(), scratch);
    if services > 1 {
        // Beside the others: the uplink's half and the measured service, nothing removed.
        let config = measured.to_map()?;
        dp.set_uplink(&config)?;
        dp.services_mut()?.put(config)?;
    } else {
        dp.set_config(&measured)?;
    }
    if let Some(origin) = path.seeded_origin() {
        dp.insert_flows([(
            frames::measured_flow(),
            established(origin, monotonic_ns()?),
        )])?;
    }
    // The monitor is measured in the same rounds as nothing, run for run: turning it
    // on and off is one map write, so a noisy machine moves both alike.
    let mut variants = vec![Variant::start(dp, instrument)?];
    if instrument == Instrument::None && opts.instruments.contains(&Instrument::Monitor) {
        variants.push(Variant::start(dp, Instrument::Monitor)?);
    }
    let program = path.program();
    let method = path.method();
    let per_round = match method {
        Method::RepeatLoop => 1,
        Method::OneRunPerCall => opts.calls,
    };
    let variant_count = variants.len() as u32;
    let runs_per_round = per_round * variant_count;
    let frames = path.frames(runs_per_round * opts.rounds)?;
    let before = dp.counters()?;
    let mut runs: u64 = 0;
    let mut verdict = None;
    let mut check = |value: u32| -> Result<()> {
        if !path.verdicts().contains(&value) {
            bail!(
                "{} ended in {}, not its path's verdict; the bench did not measure it",
                path.name(),
                verdict_name(program, value)
            );
        }
        verdict.get_or_insert(value);
        Ok(())
    };
    let mut noop = Vec::new();
    for round in 0..opts.rounds {
        match method {
            Method::RepeatLoop => {
                let frame = frames.first().context("no frame")?;
                for variant in &mut variants {
                    let (value, took) = variant.run(dp, program, frame, opts.repeat)?;
                    check(value)?;
                    runs += u64::from(opts.repeat);
                    variant.ns.push(took.as_nanos() as f64);
                }
                let (_, base) = baseline.run(program, frame, opts.repeat)?;
                noop.push(base.as_nanos() as f64);
            }
            Method::OneRunPerCall => {
                let mut rounds: Vec<Vec<f64>> = vec![Vec::new(); variants.len()];
                let mut noop_round = Vec::with_capacity(per_round as usize);
                for i in 0..per_round {
                    for (v, variant) in variants.iter_mut().enumerate() {
                        // A fresh frame for every run: some paths need a new 5-tuple each.
                        let n = (round * runs_per_round + i * variant_count) as usize + v;
                        let frame = frames.get(n).or(frames.first()).context("no frame")?;
                        let (value, took) = variant.run(dp, program, frame, 1)?;
                        check(value)?;
                        runs += 1;
                        rounds[v].push(took.as_nanos() as f64);
                    }
                    let frame = frames.first().context("no frame")?;
                    let (_, base) = baseline.run(program, frame, 1)?;
                    noop_round.push(base.as_nanos() as f64);
                }
                for (variant, mut times) in variants.iter_mut().zip(rounds) {
                    times.sort_by(f64::total_cmp);
                    variant.ns.push(median(&times));
                }
                noop_round.sort_by(f64::total_cmp);
                noop.push(median(&noop_round));
            }
        }
    }
    let counted = dp.counters()?.get(path.counter()) - before.get(path.counter());
    if counted != runs {
        bail!(
            "{}: counter {} grew by {counted} in {runs} runs; the frame did not take the path \
             every time",
            path.name(),
            path.counter().name()
        );
    }
    let noop_ns = Spread::of(&mut noop);
    let verdict = verdict_name(program, verdict.unwrap_or_default());
    Ok(variants
        .into_iter()
        .map(|mut variant| {
            let ns = Spread::of(&mut variant.ns);
            Row {
                path,
                program,
                mode: path.mode(),
                flow_map: fill,
                services,
                instrument: variant.instrument,
                method,
                verdict: verdict.clone(),
                ratio_to_noop: if noop_ns.median > 0.0 {
                    ns.median / noop_ns.median
                } else {
                    f64::NAN
                },
                over_noop_ns: ns.median - noop_ns.median,
                ns,
                noop_ns,
            }
        })
        .collect())
}

/// One way of running the datapath in [`measure`], and its times.
struct Variant {
    instrument: Instrument,
    reader: Reader,
    ns: Vec<f64>,
}

impl Variant {
    fn start(dp: &Datapath, instrument: Instrument) -> Result<Self> {
        let mut reader = Reader::start(dp, instrument)?;
        if let Reader::Monitor(listener) = &mut reader {
            listener.stop()?;
        }
        Ok(Self {
            instrument,
            reader,
            ns: Vec::new(),
        })
    }

    /// Runs the frame with this variant's instrument on, and reads what it wrote.
    fn run(
        &mut self,
        dp: &Datapath,
        program: Program,
        frame: &[u8],
        repeat: u32,
    ) -> Result<(u32, Duration)> {
        if let Reader::Monitor(listener) = &mut self.reader {
            listener.renew()?;
        }
        let result = run_datapath(dp, program, frame, repeat);
        self.reader.read();
        if let Reader::Monitor(listener) = &mut self.reader {
            listener.stop()?;
        }
        result
    }
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}
