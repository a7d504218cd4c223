//! The agent's control API: paths and JSON bodies, shared by the server and the client.
//!
//! Every path is under `/v1` and needs `Authorization: Bearer <site token>`, except
//! `GET /v1/health`; Prometheus' `GET /metrics` needs it too unless the agent runs with
//! `--metrics-without-token`. Errors come back as [`ApiError`] with a non-2xx status. The
//! machine-readable description is `docs/agent-api.openapi.json`, generated from the
//! handlers' `#[utoipa::path]` (agent/server.rs), which also build the router.
//!
//! | method | path | body → reply | retry-safe |
//! | --- | --- | --- | --- |
//! | GET | `/v1/health` | → [`Health`] (no token) | yes |
//! | GET | `/v1/status` | → [`SiteStatus`] | yes |
//! | GET | `/v1/datapath` | → [`DatapathStatus`] (404 when not attached) | yes |
//! | PUT | `/v1/datapath` | [`DatapathRequest`] → [`DatapathStatus`] (attach, or reconfigure) | yes |
//! | DELETE | `/v1/datapath` | → `{}` (teardown; fine if not attached) | yes |
//! | PUT | `/v1/datapath/mode` | [`ModeRequest`] → [`DatapathStatus`] | yes |
//! | GET | `/v1/datapath/flows` | → [`FlowSnapshot`] | yes |
//! | POST | `/v1/datapath/flows` | [`FlowSnapshot`] → [`Loaded`] (load A's snapshot; 400 for a version this agent doesn't read) | yes |
//! | POST | `/v1/datapath/release-vm-iface` | → `{}` | yes |
//! | GET | `/v1/services` | → [`ServiceList`] (every service, its own counters) | yes |
//! | PUT | `/v1/services/{home}` | [`DatapathRequest`] → [`DatapathStatus`] (add, or rewrite; the others untouched) | yes |
//! | DELETE | `/v1/services/{home}` | → `{}` (the datapath stays; fine if absent) | yes |
//! | POST | `/v1/garp` | [`GarpRequest`] → `{}` (gratuitous ARP on the uplink) | yes |
//! | PUT | `/v1/taps/{name}` | [`TapRequest`] → `{}` | yes |
//! | DELETE | `/v1/taps/{name}` | → `{}` | yes |
//! | POST | `/v1/vms` | [`VmRequest`] → [`VmStatus`] (same spec again: no-op) | yes |
//! | GET | `/v1/vms/{name}` | → [`VmStatus`] | yes |
//! | DELETE | `/v1/vms/{name}` | → `{}` | yes |
//! | POST | `/v1/vms/{name}/announce` | → `{}` | yes |
//! | GET | `/v1/vms/{name}/migration` | → [`MigrationState`] (QEMU's side: progress) | yes |
//! | POST | `/v1/migrations` | [`MigrationSpec`] → [`MigrationRecord`] (at the source; the same id again: the one there is) | yes |
//! | GET | `/v1/migrations` | → [`MigrationRecord`]s | yes |
//! | GET | `/v1/migrations/{id}` | → [`MigrationRecord`] | yes |
//! | POST | `/v1/migrations/{id}/incoming` | [`IncomingHalf`] → [`MigrationRecord`] (the source's agent makes the destination's half) | yes |
//! | POST | `/v1/migrations/{id}/abort` | → [`MigrationRecord`] (source: roll back, 409 past switchover; destination: clean up once the source runs the VM again) | yes |
//! | PUT | `/v1/migrations/{id}/bandwidth` | [`BandwidthRequest`] → [`MigrationRecord`] (source: QEMU's cap from now on; 409 once over) | yes |
//! | POST | `/v1/migrations/{id}/tunnel-over` | → [`MigrationRecord`] (destination: `nat`, or detach) | yes |
//! | POST | `/v1/migrations/{id}/dns` | [`DnsDone`] → [`MigrationRecord`] (the orchestrator did owed DNS work) | yes |
//! | GET | `/v1/leftovers` | → [`Leftovers`] (dry run: what ended migrations left that nothing needs) | yes |
//! | DELETE | `/v1/leftovers` | → [`Leftovers`] (removed) | yes |
//! | GET | `/metrics` | → OpenMetrics text for Prometheus (the token too, unless the agent runs with `--metrics-without-token`) | yes |
//!
//! Migrations are the agents' own (agent/migrations): the orchestrator creates one at the
//! source and follows it; the agents carry it on without the orchestrator, and after
//! their own restarts. Records returned by the API have the peers' tokens blanked.
use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
    time::Duration,
};

use movarto_common::{
    config::Mode,
    counters::Counter,
    ids::{MacAddr, SessionToken},
};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

pub use super::migrations::leftovers::Leftovers;
pub use super::migrations::record::{
    BandwidthChange, DnsDone, DnsOwed, DnsPlan, DrainRule, Figures, IncomingHalf, MigrationId,
    MigrationRecord, MigrationSpec, PeerAgent, Role, Stage, StageChange, unix_ms,
};
pub use super::snapshot::{
    FLOW_SNAPSHOT_VERSION, FlowEntry, FlowFlag, FlowOrigin, FlowSnapshot, IpFamily, SnapshotError,
};
use crate::qemu::{
    migrate::{MigrationOptions, MigrationReport, Postcopy, Progress},
    mirror::DiskMirror,
};

/// An error reply.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct ApiError {
    pub error: String,
}

/// `GET /v1/health`.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct Health {
    pub site: String,
    pub version: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct SiteStatus {
    pub site: String,
    pub uplink: String,
    /// `None` when no datapath is attached.
    pub datapath: Option<DatapathStatus>,
    pub vms: Vec<VmStatus>,
}

/// The datapath's site configuration, as the orchestrator states it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DatapathRequest {
    pub vm_iface: String,
    #[schema(value_type = String, example = "track")]
    pub mode: Mode,
    #[schema(value_type = String, example = "192.0.2.10")]
    pub home_addr: IpAddr,
    #[schema(value_type = Option<String>, example = "198.18.0.10")]
    pub new_addr: Option<IpAddr>,
    #[schema(value_type = String, example = "203.0.113.1")]
    pub local_tunnel_addr: Ipv4Addr,
    #[schema(value_type = String, example = "203.0.113.129")]
    pub peer_tunnel_addr: Ipv4Addr,
    /// The migration's session token, 16 hex digits on the wire.
    #[schema(value_type = String, example = "0123456789abcdef")]
    pub token: SessionToken,
    pub tunnel_mtu: u16,
    #[schema(value_type = String, example = "52:54:00:12:34:56")]
    pub vm_mac: MacAddr,
    #[schema(value_type = String, example = "02:00:00:00:00:01")]
    pub gateway_mac: MacAddr,
}

/// `PUT /v1/migrations/{id}/bandwidth`.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, ToSchema)]
pub struct BandwidthRequest {
    /// QEMU's `max-bandwidth` (and `max-postcopy-bandwidth`) from now on, bytes per second.
    pub bytes_per_second: u64,
}

/// `GET /v1/migrations/{id}?changed_from=STAGE&wait_ms=N`: a long poll. The reply
/// comes once the migration has left `changed_from`, or after `wait_ms` (at most
/// [`RecordWait::LONGEST_MS`]) with the record as it is.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct RecordWait {
    /// The stage the caller last saw.
    #[param(value_type = Option<String>, example = "copying-ram")]
    pub changed_from: Option<Stage>,
    /// How long to wait for it to change, in milliseconds.
    pub wait_ms: Option<u64>,
}

impl RecordWait {
    pub const LONGEST_MS: u64 = 30_000;
}

/// `GET /v1/services`: the node's services.
#[derive(Clone, Debug, Default, Serialize, Deserialize, ToSchema)]
pub struct ServiceList {
    /// How many services the datapath holds at most (0: not attached).
    pub capacity: u32,
    pub services: Vec<DatapathStatus>,
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct ModeRequest {
    /// `idle`, `track`, `forward`, `receive`, `nat`, `direct` or `return`.
    #[schema(value_type = String, example = "forward")]
    pub mode: Mode,
    /// The service's home address; absent: the datapath's only service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>, example = "192.0.2.10")]
    pub home: Option<IpAddr>,
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct DatapathStatus {
    pub pin_dir: String,
    /// The service's home address `H` (absent from older agents).
    #[serde(default)]
    #[schema(value_type = Option<String>, example = "192.0.2.10")]
    pub home_addr: Option<IpAddr>,
    #[schema(value_type = String, example = "track")]
    pub mode: Mode,
    /// Every non-zero counter, by its snake_case name.
    #[schema(value_type = BTreeMap<String, u64>)]
    pub counters: CounterMap,
    /// The service's own non-zero verdict and drop counters (absent for the uplink's
    /// status, and from older agents).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<BTreeMap<String, u64>>)]
    pub service_counters: Option<CounterMap>,
    /// The service's flows (every flow in the uplink's status).
    pub flows: usize,
    /// Pre-move flows (tracked at A, or handed over to B) that are neither closing nor expired.
    pub live_premove_flows: usize,
    /// Milliseconds since the newest packet of any flow; `None` with an empty map.
    pub idle_ms: Option<u64>,
    /// Flows the agent's sweeper removed since it started.
    pub swept: u64,
}

impl DatapathStatus {
    /// A counter of the whole uplink.
    pub fn counter(&self, counter: Counter) -> u64 {
        self.counters.get(counter)
    }

    /// A verdict or drop counter of the service (the uplink's, from an older agent).
    pub fn service_counter(&self, counter: Counter) -> u64 {
        self.service_counters
            .as_ref()
            .unwrap_or(&self.counters)
            .get(counter)
    }
}

/// Counters by [`Counter`]; on the wire a JSON object keyed by [`Counter::name`]. A
/// name this build doesn't know (a newer agent's counter) is skipped, not refused.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct CounterMap(pub BTreeMap<Counter, u64>);

impl CounterMap {
    pub fn get(&self, counter: Counter) -> u64 {
        self.0.get(&counter).copied().unwrap_or(0)
    }
}

impl FromIterator<(Counter, u64)> for CounterMap {
    fn from_iter<I: IntoIterator<Item = (Counter, u64)>>(iter: I) -> Self {
        Self(iter.into_iter().collect())
    }
}

impl<'de> Deserialize<'de> for CounterMap {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let by_name = BTreeMap::<String, u64>::deserialize(deserializer)?;
        Ok(by_name
            .into_iter()
            .filter_map(|(name, value)| Some((Counter::from_name(&name)?, value)))
            .collect())
    }
}

/// How many flows a snapshot loaded.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct Loaded {
    pub loaded: usize,
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct GarpRequest {
    #[schema(value_type = String, example = "192.0.2.10")]
    pub address: Ipv4Addr,
}

/// A tap for a VM's NIC, with the site's (anycast) gateway on it.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct TapRequest {
    #[schema(value_type = String, example = "02:00:00:00:00:01")]
    pub gateway_mac: MacAddr,
    /// e.g. `192.0.2.1/24`.
    pub gateway_cidr: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct VmRequest {
    /// The VM spec, in its TOML form (paths are the agent's host's).
    pub spec_toml: String,
    /// Start with `-incoming defer` (the destination of a migration).
    pub incoming: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct VmStatus {
    pub name: String,
    pub pid: Option<u32>,
    pub run_state: RunState,
    /// Why the run state is [`RunState::Exited`] or [`RunState::Unknown`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_state_error: Option<String>,
    pub incoming: bool,
    pub migration: Option<MigrationState>,
    /// Frames the VM's tap dropped so far because its queue was full (`tx_dropped`).
    #[serde(default)]
    pub tap_dropped: Option<u64>,
    /// When an incoming VM began to run here (QEMU's `RESUME` event), µs since the epoch.
    #[serde(default)]
    pub resumed_unix_us: Option<u64>,
}

/// QEMU's run state (QMP `query-status`, QAPI `RunState`), plus what the agent sees
/// when it can't ask: the process exited, or QMP did not answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum RunState {
    Running,
    Paused,
    Inmigrate,
    Postmigrate,
    FinishMigrate,
    Prelaunch,
    Debug,
    InternalError,
    IoError,
    RestoreVm,
    SaveVm,
    Shutdown,
    Suspended,
    Watchdog,
    GuestPanicked,
    Colo,
    /// The QEMU process is gone (the agent's own state, not QEMU's).
    Exited,
    /// QMP did not answer, or named a state this build doesn't know.
    #[serde(other)]
    Unknown,
}

impl RunState {
    const ALL: [RunState; 18] = [
        RunState::Running,
        RunState::Paused,
        RunState::Inmigrate,
        RunState::Postmigrate,
        RunState::FinishMigrate,
        RunState::Prelaunch,
        RunState::Debug,
        RunState::InternalError,
        RunState::IoError,
        RunState::RestoreVm,
        RunState::SaveVm,
        RunState::Shutdown,
        RunState::Suspended,
        RunState::Watchdog,
        RunState::GuestPanicked,
        RunState::Colo,
        RunState::Exited,
        RunState::Unknown,
    ];

    /// QEMU's name for it, e.g. `finish-migrate`.
    pub const fn name(self) -> &'static str {
        match self {
            RunState::Running => "running",
            RunState::Paused => "paused",
            RunState::Inmigrate => "inmigrate",
            RunState::Postmigrate => "postmigrate",
            RunState::FinishMigrate => "finish-migrate",
            RunState::Prelaunch => "prelaunch",
            RunState::Debug => "debug",
            RunState::InternalError => "internal-error",
            RunState::IoError => "io-error",
            RunState::RestoreVm => "restore-vm",
            RunState::SaveVm => "save-vm",
            RunState::Shutdown => "shutdown",
            RunState::Suspended => "suspended",
            RunState::Watchdog => "watchdog",
            RunState::GuestPanicked => "guest-panicked",
            RunState::Colo => "colo",
            RunState::Exited => "exited",
            RunState::Unknown => "unknown",
        }
    }

    /// What `query-status` said; a state this build doesn't know is `Unknown`.
    pub fn from_qemu(status: &str) -> Self {
        Self::ALL
            .into_iter()
            .find(|state| state.name() == status)
            .unwrap_or(RunState::Unknown)
    }
}

impl std::fmt::Display for RunState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// How a migration runs; the wire form of [`MigrationOptions`].
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct MigrationSettings {
    pub max_bandwidth: u64,
    /// 0: no cap (absent from older orchestrators).
    #[serde(default)]
    pub max_postcopy_bandwidth: u64,
    pub downtime_limit_ms: u64,
    pub multifd_channels: Option<u8>,
    pub auto_converge: bool,
    pub postcopy: PostcopySetting,
    pub timeout_s: u64,
    /// How long a broken post-copy is resumed before the VM is left split.
    #[serde(default = "default_postcopy_recover_timeout_ms")]
    pub postcopy_recover_timeout_ms: u64,
}

fn default_postcopy_recover_timeout_ms() -> u64 {
    crate::qemu::migrate::DEFAULT_POSTCOPY_RECOVER_TIMEOUT.as_millis() as u64
}

impl Default for MigrationSettings {
    fn default() -> Self {
        let options = MigrationOptions::default();
        Self {
            max_bandwidth: options.max_bandwidth,
            max_postcopy_bandwidth: options.max_postcopy_bandwidth,
            downtime_limit_ms: options.downtime_limit.as_millis() as u64,
            multifd_channels: None,
            auto_converge: false,
            postcopy: PostcopySetting::Off,
            timeout_s: options.timeout.as_secs(),
            postcopy_recover_timeout_ms: options.postcopy_recover_timeout.as_millis() as u64,
        }
    }
}

impl MigrationSettings {
    pub fn options(&self) -> MigrationOptions {
        MigrationOptions {
            max_bandwidth: self.max_bandwidth,
            max_postcopy_bandwidth: self.max_postcopy_bandwidth,
            downtime_limit: Duration::from_millis(self.downtime_limit_ms),
            pause_before_switchover: true,
            // The destination's agent announces, when the orchestrator says so.
            announce: false,
            timeout: Duration::from_secs(self.timeout_s),
            multifd_channels: self.multifd_channels,
            auto_converge: self.auto_converge,
            postcopy: self.postcopy.into(),
            postcopy_recover_timeout: Duration::from_millis(self.postcopy_recover_timeout_ms),
            ..MigrationOptions::default()
        }
    }
}

/// When a migration switches to post-copy. JSON: `"off"`, `"after-first-pass"`, or
/// `{"within-ms": 2000}`; text (the command line): `off`, `after-first-pass`,
/// `within:<ms>`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum PostcopySetting {
    #[default]
    Off,
    /// As soon as the first pass over RAM is done.
    AfterFirstPass,
    /// If pre-copy has not converged within this many milliseconds.
    WithinMs(u64),
}

impl From<PostcopySetting> for Postcopy {
    fn from(setting: PostcopySetting) -> Self {
        match setting {
            PostcopySetting::Off => Postcopy::Off,
            PostcopySetting::AfterFirstPass => Postcopy::AfterFirstPass,
            PostcopySetting::WithinMs(ms) => {
                Postcopy::IfNotConvergedWithin(Duration::from_millis(ms))
            }
        }
    }
}

impl std::str::FromStr for PostcopySetting {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "off" => Ok(Self::Off),
            "after-first-pass" => Ok(Self::AfterFirstPass),
            other => other
                .strip_prefix("within:")
                .and_then(|ms| ms.parse().ok())
                .map(Self::WithinMs)
                .ok_or_else(|| {
                    format!("{other:?}: expected `off`, `after-first-pass` or `within:<ms>`")
                }),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct IncomingRequest {
    /// Where the destination listens, e.g. `tcp:203.0.113.129:4444`.
    pub uri: String,
    pub settings: MigrationSettings,
    /// Export the disk over NBD for the source's mirror (no shared storage).
    #[serde(default)]
    pub mirror: Option<MirrorSettings>,
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct OutgoingRequest {
    pub uri: String,
    pub settings: MigrationSettings,
    /// Complete the disk mirror (started with `POST .../mirror`) at `pre-switchover`.
    #[serde(default)]
    pub mirror: Option<MirrorSettings>,
}

/// The disk mirror both sites agree on: the destination's NBD server.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct MirrorSettings {
    pub nbd_host: String,
    pub nbd_port: u16,
    /// Bytes per second; 0 is unlimited.
    pub speed: u64,
}

impl MirrorSettings {
    pub fn disk_mirror(&self) -> DiskMirror {
        DiskMirror {
            speed: self.speed,
            ..DiskMirror::new(&self.nbd_host, self.nbd_port)
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum MigrationPhase {
    Running,
    /// The source is stopped at `pre-switchover`, waiting for `continue`.
    AwaitingSwitchover,
    Completed,
    Failed,
}

#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct MigrationState {
    pub phase: MigrationPhase,
    pub progress: Option<Progress>,
    pub report: Option<MigrationReport>,
    pub error: Option<String>,
    /// It failed after post-copy began: the VM's RAM is split between the sites.
    #[serde(default)]
    pub split: bool,
}
