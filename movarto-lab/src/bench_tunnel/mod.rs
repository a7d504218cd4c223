//! The tunnel throughput benchmark (issue 18, item 2): TCP bulk with iperf3 between a
//! client and a "VM" namespace at site B, over the direct route, movarto's tunnel after a
//! move (A in `forward`, B in `receive`), kernel VXLAN and OpenVPN on the same triangle,
//! and over movarto with the veth settings a user can choose (item 4's throughput side).
//!
//! - [`paths`]: building each path;
//! - [`iperf`]: one run and its CPU time;
//! - [`chart`]: the SVG bar chart.
//!
//! Every variant is built afresh for each round, and the rounds interleave the variants,
//! so a burst of other load on the machine falls on all of them alike.

mod chart;
mod iperf;
mod paths;

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    path::{Path as FsPath, PathBuf},
};

use anyhow::{Context as _, Result, bail};
use aya::programs::XdpMode;
use movarto_common::counters::Counter;
use serde::Serialize;

pub use self::{
    iperf::Sample,
    paths::{Gro, PassThrough, Tunnel},
};

/// Names the benchmark's namespaces (`mvt-bt-<host>-<pid>-<n>`) and its uplinks
/// (`bt-a<pid>`, `bt-b<pid>`, which are also its pin names under /sys/fs/bpf/movarto).
pub const PREFIX: &str = "bt-";

/// Which way the bulk data goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Client to guest.
    Up,
    /// Guest to client (iperf3 -R).
    Down,
}

impl Direction {
    pub fn name(self) -> &'static str {
        match self {
            Direction::Up => "up",
            Direction::Down => "down",
        }
    }
}

/// One benchmarked setup: a tunnel and the veth settings around it.
#[derive(Clone, Debug, Serialize)]
pub struct Variant {
    pub name: &'static str,
    pub about: &'static str,
    pub tunnel: Tunnel,
    #[serde(skip)]
    pub pass_through: PassThrough,
    pub queues: u32,
    pub underlay_mtu: Option<u32>,
    pub gro: Gro,
    /// How movarto's XDP attaches to the uplinks.
    #[serde(serialize_with = "mode_name")]
    pub xdp_mode: XdpMode,
    pub threaded_napi: bool,
    pub qdisc: bool,
}

const fn variant(name: &'static str, about: &'static str, tunnel: Tunnel) -> Variant {
    Variant {
        name,
        about,
        tunnel,
        pass_through: match tunnel {
            Tunnel::Movarto => PassThrough::Triangle,
            _ => PassThrough::None,
        },
        queues: 1,
        underlay_mtu: None,
        gro: Gro::Off,
        xdp_mode: XdpMode::Default,
        threaded_napi: false,
        qdisc: false,
    }
}

/// Every variant, the four paths first; the name `direct` is the ratios' reference.
pub fn variants() -> Vec<Variant> {
    use Tunnel::*;
    vec![
        variant(
            "direct",
            "routed client-wan-B-guest, no XDP, no tunnel",
            Direct,
        ),
        variant(
            "movarto",
            "A forward, B receive; pass-through XDP on wa, wb, guest eth0",
            Movarto,
        ),
        variant(
            "vxlan",
            "kernel VXLAN A-B, the guest's replies policy-routed back",
            Vxlan,
        ),
        variant(
            "openvpn",
            "OpenVPN 2.6 p2p, static key, AES-256-CBC + SHA256, UDP",
            Openvpn,
        ),
        Variant {
            pass_through: PassThrough::LikeMovarto,
            ..variant(
                "direct-xdp",
                "direct, idle XDP on every end movarto has XDP on",
                Direct,
            )
        },
        Variant {
            pass_through: PassThrough::Needed,
            ..variant(
                "movarto-less-xdp",
                "movarto, pass-through XDP only on wa and eth0",
                Movarto,
            )
        },
        Variant {
            gro: Gro::Endpoints,
            ..variant(
                "movarto-gro",
                "movarto, GRO on the client's c0 and B's vm0",
                Movarto,
            )
        },
        Variant {
            gro: Gro::All,
            ..variant(
                "movarto-gro-all",
                "movarto, GRO on every veth end (the wan's too)",
                Movarto,
            )
        },
        Variant {
            xdp_mode: XdpMode::Skb,
            pass_through: PassThrough::None,
            ..variant(
                "movarto-generic",
                "movarto in generic (skb) XDP, no pass-through XDP",
                Movarto,
            )
        },
        Variant {
            queues: 2,
            ..variant(
                "movarto-2q",
                "movarto, 2 TX and RX queues per veth end",
                Movarto,
            )
        },
        Variant {
            threaded_napi: true,
            ..variant(
                "movarto-threaded",
                "movarto, threaded NAPI on the veths with NAPI",
                Movarto,
            )
        },
        Variant {
            qdisc: true,
            ..variant(
                "movarto-qdisc",
                "movarto, pfifo qdisc on veths sending into XDP",
                Movarto,
            )
        },
        Variant {
            qdisc: true,
            gro: Gro::Endpoints,
            pass_through: PassThrough::Needed,
            ..variant(
                "movarto-tuned",
                "movarto-less-xdp + movarto-gro + movarto-qdisc",
                Movarto,
            )
        },
        Variant {
            underlay_mtu: Some(1540),
            ..variant(
                "movarto-mtu1540",
                "movarto, underlay MTU 1540: inner 1500 fits",
                Movarto,
            )
        },
    ]
}

fn mode_name<S: serde::Serializer>(mode: &XdpMode, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(match mode {
        XdpMode::Default => "default",
        XdpMode::Skb => "skb",
        XdpMode::Driver => "driver",
        XdpMode::Hardware => "hardware",
    })
}

/// What to run.
#[derive(Clone, Debug)]
pub struct Options {
    pub seconds: u32,
    pub rounds: u32,
    pub streams: Vec<u32>,
    pub directions: Vec<Direction>,
    /// Names from [`variants`]; all of them if empty.
    pub variants: Vec<String>,
    /// Progress on stderr.
    pub verbose: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            seconds: 10,
            rounds: 3,
            streams: vec![1, 4],
            directions: vec![Direction::Up, Direction::Down],
            variants: Vec::new(),
            verbose: true,
        }
    }
}

/// Minimum, median and maximum over the rounds.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct Spread {
    pub min: f64,
    pub median: f64,
    pub max: f64,
}

impl Spread {
    fn of(values: impl IntoIterator<Item = f64>) -> Spread {
        let mut v: Vec<f64> = values.into_iter().collect();
        if v.is_empty() {
            return Spread::default();
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Spread {
            min: v[0],
            median,
            max: v[n - 1],
        }
    }
}

/// One line of the table: a variant, a stream count and a direction over all rounds.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    pub variant: String,
    pub streams: u32,
    pub direction: Direction,
    pub gbit_s: Spread,
    /// Median Gbit/s over the direct path's median with the same streams and direction.
    pub ratio_to_direct: Option<f64>,
    pub cpu_s: Spread,
    pub softirq_s: Spread,
    /// Median busy CPU-seconds per GB received; none when next to nothing was received.
    pub cpu_s_per_gb: Option<f64>,
    pub retransmits: Spread,
    pub veth_drops: Spread,
    pub samples: Vec<Sample>,
    /// Runs that failed, with why.
    pub errors: Vec<String>,
}

/// Everything the benchmark measured.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub kernel: String,
    pub cores: usize,
    pub seconds: u32,
    pub rounds: u32,
    pub cpu_note: &'static str,
    pub variants: Vec<Variant>,
    pub rows: Vec<Row>,
    /// movarto's datapath counters at A and B (nonzero ones), summed over the rounds, by
    /// variant.
    pub tunnel_counters: BTreeMap<String, BTreeMap<String, BTreeMap<String, u64>>>,
}

const CPU_NOTE: &str = "busy time of the whole machine from /proc/stat (user+nice+system+irq+softirq+steal) \
     over each iperf3 run, so it includes iperf3 at both ends, every namespace's packet \
     processing, OpenVPN, and any other load on the machine";

/// Runs the benchmark.
pub fn run(opts: &Options) -> Result<Report> {
    if opts.seconds == 0 || opts.rounds == 0 {
        bail!("--seconds and --rounds must be at least 1");
    }
    let all = variants();
    let chosen: Vec<Variant> = if opts.variants.is_empty() {
        all.clone()
    } else {
        opts.variants
            .iter()
            .map(|name| {
                all.iter()
                    .find(|v| v.name == name)
                    .cloned()
                    .with_context(|| {
                        format!(
                            "no variant {name:?}; there are {}",
                            all.iter().map(|v| v.name).collect::<Vec<_>>().join(", ")
                        )
                    })
            })
            .collect::<Result<_>>()?
    };
    let mut results = Results::new();
    let mut counters: BTreeMap<String, BTreeMap<String, BTreeMap<String, u64>>> = BTreeMap::new();
    for round in 1..=opts.rounds {
        for (i, v) in chosen.iter().enumerate() {
            if crate::demo::interrupted() {
                bail!("interrupted (Ctrl-C); cleaned up");
            }
            if opts.verbose {
                eprintln!("bench tunnel: round {round}/{}: {}", opts.rounds, v.name);
            }
            let path =
                paths::Path::build(PREFIX, v).with_context(|| format!("building {}", v.name))?;
            for &streams in &opts.streams {
                for &direction in &opts.directions {
                    let entry = results.entry((i, streams, direction)).or_default();
                    match iperf::run(&path, opts.seconds, streams, direction) {
                        Ok(sample) => {
                            if opts.verbose {
                                eprintln!(
                                    "  {streams} stream(s) {}: {:.2} Gbit/s, {} retransmits",
                                    direction.name(),
                                    sample.gbit_s,
                                    sample.retransmits
                                );
                            }
                            entry.0.push(sample);
                        }
                        Err(err) => {
                            let err = format!("round {round}: {err:#}");
                            if opts.verbose {
                                eprintln!("  {streams} stream(s) {}: {err}", direction.name());
                            }
                            entry.1.push(err);
                        }
                    }
                }
            }
            if let Some(c) = path.counters()? {
                let sites = counters.entry(v.name.to_owned()).or_default();
                for (site, snap) in [("a", &c.a), ("b", &c.b)] {
                    let site = sites.entry(site.to_owned()).or_default();
                    for (counter, n) in snap.nonzero() {
                        *site.entry(counter.name().to_owned()).or_default() += n;
                    }
                }
            }
        }
    }
    let rows = rows(&chosen, results);
    Ok(Report {
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_owned(),
        cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
        seconds: opts.seconds,
        rounds: opts.rounds,
        cpu_note: CPU_NOTE,
        variants: chosen,
        rows,
        tunnel_counters: counters,
    })
}

/// By variant (index), streams and direction: the samples and the failed runs.
type Results = BTreeMap<(usize, u32, Direction), (Vec<Sample>, Vec<String>)>;

fn rows(chosen: &[Variant], results: Results) -> Vec<Row> {
    let mut rows: Vec<Row> = results
        .into_iter()
        .map(|((i, streams, direction), (samples, errors))| {
            let gbit_s = Spread::of(samples.iter().map(|s| s.gbit_s));
            let cpu_s = Spread::of(samples.iter().map(|s| s.cpu_s));
            let gb = Spread::of(samples.iter().map(|s| s.bytes as f64 / 1e9)).median;
            Row {
                variant: chosen[i].name.to_owned(),
                streams,
                direction,
                gbit_s,
                ratio_to_direct: None,
                cpu_s,
                softirq_s: Spread::of(samples.iter().map(|s| s.softirq_s)),
                cpu_s_per_gb: (gb >= 0.01).then(|| cpu_s.median / gb),
                retransmits: Spread::of(samples.iter().map(|s| s.retransmits as f64)),
                veth_drops: Spread::of(samples.iter().map(|s| s.veth_drops as f64)),
                samples,
                errors,
            }
        })
        .collect();
    let direct: BTreeMap<(u32, Direction), f64> = rows
        .iter()
        .filter(|r| r.variant == "direct")
        .map(|r| ((r.streams, r.direction), r.gbit_s.median))
        .collect();
    for row in &mut rows {
        row.ratio_to_direct = direct
            .get(&(row.streams, row.direction))
            .filter(|d| **d > 0.0)
            .map(|d| row.gbit_s.median / d);
    }
    rows
}

impl Report {
    /// The text table.
    pub fn render(&self) -> String {
        let mut s = format!(
            "tunnel throughput: iperf3 TCP, {} s per run, {} round(s), {} cores, kernel {}\n\
             Gbit/s min/median/max; ratio = median / direct's median; CPU = {}\n\n",
            self.seconds, self.rounds, self.cores, self.kernel, self.cpu_note
        );
        let _ = writeln!(
            s,
            "{:<18} {:>3} {:<4} {:>20} {:>6} {:>7} {:>8} {:>7} {:>9} {:>9}",
            "variant",
            "P",
            "dir",
            "Gbit/s min/med/max",
            "ratio",
            "CPU s",
            "softirq",
            "CPU/GB",
            "retrans",
            "veth drop"
        );
        for r in &self.rows {
            let g = r.gbit_s;
            let _ = writeln!(
                s,
                "{:<18} {:>3} {:<4} {:>20} {:>6} {:>7.1} {:>8.1} {:>7} {:>9.0} {:>9.0}{}",
                r.variant,
                r.streams,
                r.direction.name(),
                format!("{:.2}/{:.2}/{:.2}", g.min, g.median, g.max),
                r.ratio_to_direct.map_or("-".into(), |x| format!("{x:.2}")),
                r.cpu_s.median,
                r.softirq_s.median,
                r.cpu_s_per_gb.map_or("-".into(), |x| format!("{x:.2}")),
                r.retransmits.median,
                r.veth_drops.median,
                if r.errors.is_empty() {
                    String::new()
                } else {
                    format!("  ({} failed: {})", r.errors.len(), r.errors[0])
                }
            );
        }
        s.push_str("\nvariants:\n");
        for v in &self.variants {
            let _ = writeln!(s, "  {:<18} {}", v.name, v.about);
        }
        if !self.tunnel_counters.is_empty() {
            s.push_str("\nmovarto's counters (all rounds):\n");
            for (variant, sites) in &self.tunnel_counters {
                for (site, c) in sites {
                    let pick = |k: &str| c.get(k).copied().unwrap_or(0);
                    let drops: u64 = c
                        .iter()
                        .filter(|(k, _)| k.starts_with("drop_"))
                        .map(|(_, v)| v)
                        .sum();
                    let _ = writeln!(
                        s,
                        "  {variant:<18} {site}: tunnel_in {} tunnel_out {} icmp_too_big {} drops {drops}",
                        pick(Counter::TunnelIn.name()),
                        pick(Counter::TunnelOut.name()),
                        pick(Counter::IcmpTooBig.name()),
                    );
                }
            }
        }
        s
    }

    /// Writes the JSON to `json` and the bar chart beside it (same name, `.svg`); returns
    /// the chart's path.
    pub fn write(&self, json: &FsPath) -> Result<PathBuf> {
        if let Some(dir) = json.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let text = serde_json::to_string_pretty(self).context("the report as JSON")?;
        std::fs::write(json, text + "\n").with_context(|| format!("writing {}", json.display()))?;
        chart::draw(&json.with_extension("svg"), self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_takes_the_middle_or_the_mean_of_the_two_middles() {
        let s = Spread::of([3.0, 1.0, 2.0]);
        assert_eq!((s.min, s.median, s.max), (1.0, 2.0, 3.0));
        assert_eq!(Spread::of([4.0, 1.0, 2.0, 3.0]).median, 2.5);
        assert_eq!(Spread::of([]).median, 0.0);
    }

    #[test]
    fn ratios_are_to_direct_with_the_same_streams_and_direction() {
        let chosen: Vec<Variant> = variants()
            .into_iter()
            .filter(|v| v.name == "direct" || v.name == "movarto")
            .collect();
        let sample = |gbit_s: f64| Sample {
            bytes: 1_000_000_000,
            gbit_s,
            ..Sample::default()
        };
        let mut results = Results::new();
        for (i, up, down) in [(0, 4.0, 8.0), (1, 2.0, 2.0)] {
            results.insert((i, 1, Direction::Up), (vec![sample(up)], vec![]));
            results.insert((i, 1, Direction::Down), (vec![sample(down)], vec![]));
        }
        let rows = rows(&chosen, results);
        let ratio = |v: &str, d| {
            rows.iter()
                .find(|r| r.variant == v && r.direction == d)
                .and_then(|r| r.ratio_to_direct)
        };
        assert_eq!(ratio("direct", Direction::Up), Some(1.0));
        assert_eq!(ratio("movarto", Direction::Up), Some(0.5));
        assert_eq!(ratio("movarto", Direction::Down), Some(0.25));
    }
}
