//! A migration as the agents own it: its id, the spec both halves share, the stage it
//! has reached, and what it has measured. The same types are the wire form
//! (`/v1/migrations`) and the record each agent keeps in its state directory.
//!
//! The stages, in order, and what holds once a stage is written (it is written, and
//! fsync'd, before the stage's work acts, so a restarted agent redoes the stage's work;
//! every stage's work is safe to repeat):
//!
//! | role | stage | what it does | may the source be discarded? | may the destination be discarded? |
//! | --- | --- | --- | --- | --- |
//! | source | `accepted` | checks the VM runs, draws the token, A tracks | no | yes |
//! | source | `preparing-destination` | creates the destination's half, waits until it listens | no | yes |
//! | source | `mirroring-disk` | the disk's full copy to B's NBD export | no | yes |
//! | source | `copying-ram` | QEMU's RAM passes, until `pre-switchover` | no | yes |
//! | source | `switching-over` | A forwards (one map write), then `migrate-continue` | no | only once A runs again |
//! | source | `continued` | `migrate-continue` sent; the flows go to B; waiting for `completed` and B running | no | only once A runs again |
//! | source | `draining` | A's QEMU and tap are gone; the drain rule runs | (gone) | no |
//! | source | `done` | A detached, B in `nat` (or detached) | (gone) | no |
//! | source | `rolling-back` / `rolled-back` | cancel, VM running at A, A tracks, B cleaned | no | yes, once A runs |
//! | source | `split` | post-copy broke: both halves hold part of the VM | no | no |
//! | either | `stopped` | a safe stop the agent can't resolve (the error says why) | no | no |
//! | destination | `accepted` | tap, datapath, QEMU `-incoming defer` | — | yes |
//! | destination | `listening` | `migrate-incoming`; waits for the VM to run | — | only once A runs again |
//! | destination | `running` | the VM runs here, announced | — | no |
//! | destination | `done` | the tunnel is over: `nat` or detached | — | no |
//! | destination | `aborted` | the source runs the VM again; B is cleaned | — | (gone) |

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use movarto_common::{
    config::Mode,
    ids::{MacAddr, SessionToken},
};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::{
    agent::{
        api::{
            DatapathRequest, FlowEntry, IncomingRequest, MigrationSettings, MirrorSettings,
            OutgoingRequest, TapRequest,
        },
        blackout::StrandedFrames,
    },
    qemu::migrate::{MigrationReport, Progress},
};

/// A migration's id: 1 to 64 of `[A-Za-z0-9._-]`, unique per source agent. The
/// orchestrator makes it (`<vm>-<unix seconds>-<random>`); `migrate --resume ID` names it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, ToSchema)]
#[serde(transparent)]
pub struct MigrationId(String);

impl MigrationId {
    pub fn new(id: &str) -> Result<Self, String> {
        let ok = !id.is_empty()
            && id.len() <= 64
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
            && !id.starts_with('.');
        if ok {
            Ok(Self(id.to_owned()))
        } else {
            Err(format!(
                "{id:?} is not a migration id (1 to 64 of A-Z a-z 0-9 . _ -, not starting with .)"
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for MigrationId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        Self::new(&text).map_err(serde::de::Error::custom)
    }
}

impl std::str::FromStr for MigrationId {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Self::new(s)
    }
}

impl fmt::Display for MigrationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    Source,
    Destination,
}

/// Where a migration is; the table in this module's doc.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Stage {
    Accepted,
    PreparingDestination,
    Listening,
    MirroringDisk,
    CopyingRam,
    SwitchingOver,
    Continued,
    Running,
    Draining,
    Done,
    RollingBack,
    RolledBack,
    Aborted,
    Split,
    /// A safe stop: something the agent cannot fix by itself (the error says what);
    /// nothing more is done automatically.
    Stopped,
}

impl Stage {
    /// Nothing more happens by itself.
    pub const fn is_final(self) -> bool {
        matches!(
            self,
            Stage::Done | Stage::RolledBack | Stage::Aborted | Stage::Split | Stage::Stopped
        )
    }

    /// `migrate-continue` may have been sent: the VM may run at the destination, so
    /// nothing may roll it back to the source.
    pub const fn past_switchover(self) -> bool {
        matches!(
            self,
            Stage::Continued | Stage::Running | Stage::Draining | Stage::Done | Stage::Split
        )
    }

    pub const fn name(self) -> &'static str {
        match self {
            Stage::Accepted => "accepted",
            Stage::PreparingDestination => "preparing-destination",
            Stage::Listening => "listening",
            Stage::MirroringDisk => "mirroring-disk",
            Stage::CopyingRam => "copying-ram",
            Stage::SwitchingOver => "switching-over",
            Stage::Continued => "continued",
            Stage::Running => "running",
            Stage::Draining => "draining",
            Stage::Done => "done",
            Stage::RollingBack => "rolling-back",
            Stage::RolledBack => "rolled-back",
            Stage::Aborted => "aborted",
            Stage::Split => "split",
            Stage::Stopped => "stopped",
        }
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How one agent reaches the other (the source pushes the flows and tells B when the
/// tunnel is over; B asks A whether the VM runs there again before it discards its half).
#[derive(Clone, Serialize, Deserialize, ToSchema)]
pub struct PeerAgent {
    /// e.g. `https://203.0.113.129:7878`.
    pub url: String,
    /// That agent's site token.
    pub token: String,
    /// A CA certificate (PEM) its TLS certificate chains to.
    #[serde(default)]
    pub ca_pem: Option<String>,
}

impl fmt::Debug for PeerAgent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerAgent")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

/// When the drain is over: no live pre-move flow is left and nothing reached `H` for
/// `grace`, or `max_drain` passed (the rest are cut). In move address mode open flows go
/// the direct way, so only the tunnel's idleness counts.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct DrainRule {
    pub grace_ms: u64,
    pub max_drain_ms: u64,
}

impl DrainRule {
    pub fn grace(&self) -> Duration {
        Duration::from_millis(self.grace_ms)
    }

    pub fn max_drain(&self) -> Duration {
        Duration::from_millis(self.max_drain_ms)
    }
}

/// The service's DNS record, as far as the move changes it. The agents hold no DNS key:
/// they record what is owed, and the orchestrator (`migrate`, or `migrate --resume`) does it.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct DnsPlan {
    #[schema(value_type = String, example = "192.0.2.53:53")]
    pub server: SocketAddr,
    pub zone: String,
    pub name: String,
    /// The TTL before the move, restored at the end.
    pub original_ttl: u32,
}

/// What `POST /v1/migrations` asks of the source agent. The source's agent derives the
/// destination's half from it.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct MigrationSpec {
    pub id: MigrationId,
    pub vm: String,
    /// The source agent, as the destination reaches it.
    pub source_agent: PeerAgent,
    /// The destination agent, as the source reaches it.
    pub destination_agent: PeerAgent,
    /// The VM spec at the destination (TOML).
    pub destination_spec_toml: String,
    #[schema(value_type = String, example = "52:54:00:12:34:56")]
    pub vm_mac: MacAddr,
    #[schema(value_type = String, example = "192.0.2.10")]
    pub home: IpAddr,
    /// `N` in nat address mode; absent in move address mode (`H` itself moves).
    #[schema(value_type = Option<String>, example = "198.18.0.10")]
    pub new_addr: Option<IpAddr>,
    /// Move address mode: the command the source's agent runs at switchover to re-route
    /// `H` (with MOVARTO_VM, MOVARTO_HOME, MOVARTO_SOURCE_TUNNEL and
    /// MOVARTO_DESTINATION_TUNNEL set).
    #[serde(default)]
    pub on_switch: Option<String>,
    #[schema(value_type = String, example = "203.0.113.1")]
    pub source_tunnel: Ipv4Addr,
    #[schema(value_type = String, example = "203.0.113.129")]
    pub destination_tunnel: Ipv4Addr,
    pub migration_uri: String,
    pub vm_iface: String,
    pub tap: TapRequest,
    pub tunnel_mtu: u16,
    pub settings: MigrationSettings,
    #[serde(default)]
    pub mirror: Option<MirrorSettings>,
    pub drain: DrainRule,
    #[serde(default)]
    pub dns: Option<DnsPlan>,
    /// How long one agent retries the other (with backoff) before a step fails.
    pub agent_timeout_ms: u64,
}

impl MigrationSpec {
    pub fn agent_timeout(&self) -> Duration {
        Duration::from_millis(self.agent_timeout_ms)
    }

    /// Whether the VM moves back to its home site before its last move's drain ended
    /// (`N` given as `H`): the destination serves `H` itself, with no NAT, and the
    /// source forwards what still reaches its `N`. See "Moving back before the drain
    /// ended" in docs/datapath.md.
    pub fn moves_home(&self) -> bool {
        self.new_addr == Some(self.home)
    }

    /// Site B's mode while the tunnel lives (before the VM runs there, on a move home:
    /// `forward` until then, `return` after).
    pub fn destination_mode(&self) -> Mode {
        if self.moves_home() {
            Mode::Forward
        } else if self.new_addr.is_some() {
            Mode::Receive
        } else {
            Mode::Direct
        }
    }

    /// One site's datapath for this migration.
    pub fn datapath_request(&self, token: SessionToken, mode: Mode, role: Role) -> DatapathRequest {
        let at_source = role == Role::Source;
        let (local, peer) = if at_source {
            (self.source_tunnel, self.destination_tunnel)
        } else {
            (self.destination_tunnel, self.source_tunnel)
        };
        DatapathRequest {
            vm_iface: self.vm_iface.clone(),
            mode,
            home_addr: self.home,
            new_addr: if at_source || self.moves_home() {
                None
            } else {
                self.new_addr
            },
            local_tunnel_addr: local,
            peer_tunnel_addr: peer,
            token,
            tunnel_mtu: self.tunnel_mtu,
            vm_mac: self.vm_mac,
            gateway_mac: self.tap.gateway_mac,
        }
    }

    pub fn incoming_request(&self) -> IncomingRequest {
        IncomingRequest {
            uri: self.migration_uri.clone(),
            settings: self.settings.clone(),
            mirror: self.mirror.clone(),
        }
    }

    pub fn outgoing_request(&self) -> OutgoingRequest {
        OutgoingRequest {
            uri: self.migration_uri.clone(),
            settings: self.settings.clone(),
            mirror: self.mirror.clone(),
        }
    }
}

/// What the source's agent asks of the destination's (`POST /v1/migrations/{id}/incoming`).
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct IncomingHalf {
    pub spec: MigrationSpec,
    /// The session token the source drew.
    #[schema(value_type = String, example = "0123456789abcdef")]
    pub token: SessionToken,
}

/// One stage change, as the record keeps it.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct StageChange {
    pub stage: Stage,
    /// Milliseconds since the Unix epoch (agents' clocks: for people, not arithmetic).
    pub at_unix_ms: u64,
    /// What the stage's work found or did, once done.
    #[serde(default)]
    pub detail: String,
}

/// The DNS work the move owes (the agents hold no key, so the orchestrator does it).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DnsOwed {
    /// `H` → `N` (nat address mode), once the VM runs at the destination.
    pub switch: bool,
    /// The TTL back to [`DnsPlan::original_ttl`], after the teardown or the rollback.
    pub restore_ttl: bool,
    /// `N` → `H` again: the switch went out at the switchover, then the migration rolled
    /// back and the VM runs at the source.
    #[serde(default)]
    pub switch_back: bool,
}

/// What the orchestrator reports it has done (`POST /v1/migrations/{id}/dns`).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, ToSchema)]
pub struct DnsDone {
    pub switched: bool,
    pub ttl_restored: bool,
    /// From the switchover to the authoritative answer changing.
    #[serde(default)]
    pub switch_ms: Option<u64>,
    /// After a rollback past the switchover: `N` → `H` again.
    #[serde(default)]
    pub switched_back: bool,
}

/// What the migration measured, for the report.
#[derive(Clone, Debug, Default, Serialize, Deserialize, ToSchema)]
pub struct Figures {
    pub qemu: Option<MigrationReport>,
    /// The destination QEMU's run state once it ran.
    #[serde(default)]
    pub destination_status: Option<String>,
    pub flows_at_switchover: usize,
    /// The flows reached the destination (after `continue`).
    #[serde(default)]
    pub flows_handed: bool,
    /// From the source's stop at `pre-switchover` to the flip done (the mode written, an
    /// `--on-switch` hook run), in µs.
    #[serde(default)]
    pub flip_us: Option<u64>,
    /// From the same stop to `migrate-continue`: the flip, then `continued` saved
    /// durably (a restarted agent must never roll back a VM that may run at B).
    #[serde(default)]
    pub continue_us: Option<u64>,
    /// When the VM stopped at the source (QEMU's `STOP` event there), µs since the epoch.
    #[serde(default)]
    pub stopped_unix_us: Option<u64>,
    /// When it ran again at the destination (QEMU's `RESUME` event there), µs since the
    /// epoch: with `stopped_unix_us`, the VM's pause as its clients see it, where QEMU's
    /// downtime ends when the source has sent the last byte.
    #[serde(default)]
    pub resumed_unix_us: Option<u64>,
    pub flows_cut: Vec<FlowEntry>,
    pub packets_to_b: u64,
    pub packets_from_b: u64,
    pub premove_bytes: u64,
    pub switchover_unix_ms: Option<u64>,
    pub drain_ms: Option<u64>,
    pub teardown_unix_ms: Option<u64>,
    pub dns_switch_ms: Option<u64>,
    /// What a rollback undid (and what it could not).
    #[serde(default)]
    pub rolled_back: Option<String>,
    /// The rollback is over, the destination's part too (or given up on: `rolled_back`
    /// says so).
    #[serde(default)]
    pub rollback_finished: bool,
    /// The bandwidth caps an evacuation gave the migration while it ran, in order.
    #[serde(default)]
    pub bandwidth: Vec<BandwidthChange>,
    /// The source: frames QEMU left unread in its tap when the VM stopped, and what
    /// became of them (`agent::blackout`).
    #[serde(default)]
    pub stranded_at_source: Option<StrandedFrames>,
    /// The destination's tap dropped these (its queue was full) before the VM ran.
    #[serde(default)]
    pub dropped_at_destination_tap: Option<u64>,
}

impl Figures {
    /// From the stop at the source to the run at the destination, in µs (the hosts'
    /// clocks apart).
    pub fn vm_paused_us(&self) -> Option<u64> {
        Some(self.resumed_unix_us?.saturating_sub(self.stopped_unix_us?))
    }

    /// Packets for `H` lost at switchover: stranded at the source and not carried on,
    /// plus those the destination's tap dropped. `None` until both are known.
    pub fn lost_at_switchover(&self) -> Option<u64> {
        Some(self.stranded_at_source?.lost + self.dropped_at_destination_tap?)
    }
}

/// A new bandwidth cap (`PUT /v1/migrations/{id}/bandwidth`), and when.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct BandwidthChange {
    pub at_unix_ms: u64,
    pub bytes_per_second: u64,
}

/// A migration, as an agent holds (and persists) it.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
pub struct MigrationRecord {
    pub spec: MigrationSpec,
    pub role: Role,
    pub stage: Stage,
    #[schema(value_type = Option<String>, example = "0123456789abcdef")]
    pub token: Option<SessionToken>,
    /// The source's datapath was attached for this migration (the rollback detaches it).
    #[serde(default)]
    pub attached_for_us: bool,
    /// An abort was asked for (Ctrl-C on `migrate`): honoured before switchover only.
    #[serde(default)]
    pub abort_requested: bool,
    pub dns_owed: DnsOwed,
    pub figures: Figures,
    /// `migrate` was sent to the source's QEMU (a restarted agent follows it, and does
    /// not send it again).
    #[serde(default)]
    pub migrate_sent: bool,
    /// The source said the tunnel is over (the destination goes to `nat` or detaches).
    #[serde(default)]
    pub tunnel_over: bool,
    /// Why it failed or stopped, if it did.
    pub error: Option<String>,
    pub history: Vec<StageChange>,
    /// The RAM copy's progress (not persisted: it changes every 100 ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
}

impl MigrationRecord {
    pub fn new(spec: MigrationSpec, role: Role) -> Self {
        Self {
            spec,
            role,
            stage: Stage::Accepted,
            token: None,
            attached_for_us: false,
            abort_requested: false,
            migrate_sent: false,
            tunnel_over: false,
            dns_owed: DnsOwed::default(),
            figures: Figures::default(),
            error: None,
            history: vec![StageChange {
                stage: Stage::Accepted,
                at_unix_ms: unix_ms(),
                detail: String::new(),
            }],
            progress: None,
        }
    }

    pub fn id(&self) -> &MigrationId {
        &self.spec.id
    }

    /// Moves to `stage` (the caller persists the record before acting).
    pub fn enter(&mut self, stage: Stage) {
        if self.stage != stage {
            self.stage = stage;
            self.history.push(StageChange {
                stage,
                at_unix_ms: unix_ms(),
                detail: String::new(),
            });
        }
    }

    /// Notes what the current stage's work found.
    pub fn note(&mut self, detail: impl Into<String>) {
        if let Some(last) = self.history.last_mut() {
            let detail = detail.into();
            if last.detail.is_empty() {
                last.detail = detail;
            } else {
                last.detail = format!("{}; {detail}", last.detail);
            }
        }
    }

    /// When the record entered `stage`, if it did.
    pub fn entered(&self, stage: Stage) -> Option<&StageChange> {
        self.history.iter().find(|c| c.stage == stage)
    }
}

pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_checked() {
        assert!(MigrationId::new("web-1764600000-0a1b").is_ok());
        for bad in ["", ".hidden", "a/b", "a b", &"x".repeat(65)] {
            assert!(MigrationId::new(bad).is_err(), "{bad:?}");
        }
        assert!(serde_json::from_str::<MigrationId>("\"../etc\"").is_err());
    }

    #[test]
    fn the_stages_after_continue_are_past_switchover() {
        assert!(!Stage::SwitchingOver.past_switchover());
        assert!(Stage::Continued.past_switchover());
        assert!(Stage::Draining.past_switchover());
        assert!(!Stage::RolledBack.past_switchover());
        assert!(Stage::RolledBack.is_final() && Stage::Done.is_final());
        assert!(!Stage::Draining.is_final());
    }
}
