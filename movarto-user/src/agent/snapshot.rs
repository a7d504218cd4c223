//! The flow snapshot site A hands to site B at switchover (`GET` and `POST
//! /v1/datapath/flows`): a versioned JSON form with named fields, independent of the
//! datapath's `#[repr(C)]` layout, so agents of different builds interoperate or refuse
//! clearly. `docs/flow-snapshot.md` describes it.

use std::net::IpAddr;

use movarto_common::{
    flow::{FlowKey, FlowValue, origin, state},
    net::family,
};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The snapshot format this build writes and reads.
pub const FLOW_SNAPSHOT_VERSION: u32 = 1;

/// `{"version": 1, "flows": [...]}`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, ToSchema)]
pub struct FlowSnapshot {
    /// [`FLOW_SNAPSHOT_VERSION`]; a reader refuses any other.
    pub version: u32,
    pub flows: Vec<FlowEntry>,
}

/// A snapshot this build can't read.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum SnapshotError {
    #[error(
        "flow snapshot version {found} is not supported: this agent reads version {supported} \
         (agents of different builds?)"
    )]
    UnknownVersion { found: u64, supported: u32 },
    #[error(
        "not a flow snapshot: no \"version\" (an agent from before versioned snapshots?); \
         this agent reads version {supported}"
    )]
    Unversioned { supported: u32 },
    #[error("malformed flow snapshot (version {FLOW_SNAPSHOT_VERSION}): {0}")]
    Malformed(String),
}

impl FlowSnapshot {
    pub fn new(flows: Vec<FlowEntry>) -> Self {
        Self {
            version: FLOW_SNAPSHOT_VERSION,
            flows,
        }
    }

    /// Reads a snapshot: the version first, so an unknown one is named as such rather
    /// than reported as whatever field its format changed.
    pub fn from_json(json: serde_json::Value) -> Result<Self, SnapshotError> {
        let supported = FLOW_SNAPSHOT_VERSION;
        let version = json
            .get("version")
            .ok_or(SnapshotError::Unversioned { supported })?;
        let found = version.as_u64().ok_or_else(|| {
            SnapshotError::Malformed(format!("version {version} is not a number"))
        })?;
        if found != u64::from(supported) {
            return Err(SnapshotError::UnknownVersion { found, supported });
        }
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct V1 {
            #[serde(rename = "version")]
            _version: u32,
            flows: Vec<FlowEntry>,
        }
        let v1: V1 = serde_json::from_value(json)
            .map_err(|err| SnapshotError::Malformed(err.to_string()))?;
        for (i, flow) in v1.flows.iter().enumerate() {
            flow.key()
                .map_err(|why| SnapshotError::Malformed(format!("flow {i}: {why}")))?;
        }
        Ok(Self::new(v1.flows))
    }
}

impl<'de> Deserialize<'de> for FlowSnapshot {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let json = serde_json::Value::deserialize(deserializer)?;
        Self::from_json(json).map_err(serde::de::Error::custom)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum IpFamily {
    Ipv4,
    Ipv6,
}

/// How the flow entered the flow map (`movarto_common::flow::origin`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum FlowOrigin {
    /// Recorded at site A in `track` mode: a pre-move flow.
    Tracked,
    /// Learned at site B from the tunnel (or handed over in a snapshot).
    Tunnelled,
    /// A NAT flow at site B (`N` ↔ `H`).
    Nat,
    /// First seen at site A after switchover: a client with a stale DNS answer.
    StaleDns,
}

impl FlowOrigin {
    const ALL: [(FlowOrigin, u8); 4] = [
        (FlowOrigin::Tracked, origin::TRACKED),
        (FlowOrigin::Tunnelled, origin::TUNNELLED),
        (FlowOrigin::Nat, origin::NAT),
        (FlowOrigin::StaleDns, origin::STALE_DNS),
    ];

    fn from_map(raw: u8) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|(_, value)| *value == raw)
            .map(|(o, _)| o)
    }

    fn to_map(self) -> u8 {
        Self::ALL
            .into_iter()
            .find(|(o, _)| *o == self)
            .map_or(0, |(_, value)| value)
    }
}

/// One TCP state bit (`movarto_common::flow::state`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum FlowFlag {
    SynSeen,
    Established,
    FinPeer,
    FinService,
    Rst,
    SeenFromPeer,
    SeenFromService,
}

impl FlowFlag {
    const ALL: [(FlowFlag, u32); 7] = [
        (FlowFlag::SynSeen, state::SYN_SEEN),
        (FlowFlag::Established, state::ESTABLISHED),
        (FlowFlag::FinPeer, state::FIN_PEER),
        (FlowFlag::FinService, state::FIN_SERVICE),
        (FlowFlag::Rst, state::RST),
        (FlowFlag::SeenFromPeer, state::SEEN_FROM_PEER),
        (FlowFlag::SeenFromService, state::SEEN_FROM_SERVICE),
    ];

    fn from_bits(bits: u32) -> Vec<FlowFlag> {
        Self::ALL
            .into_iter()
            .filter(|(_, bit)| bits & bit != 0)
            .map(|(flag, _)| flag)
            .collect()
    }

    fn to_bits(flags: &[FlowFlag]) -> u32 {
        Self::ALL
            .into_iter()
            .filter(|(flag, _)| flags.contains(flag))
            .fold(0, |bits, (_, bit)| bits | bit)
    }
}

/// One flow as seen from the service, at snapshot time. Times are relative (the sites'
/// monotonic clocks differ), so the receiver rebases them on its own clock.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FlowEntry {
    /// IANA protocol number (6 TCP, 17 UDP, 1 ICMP, 58 ICMPv6).
    pub protocol: u8,
    pub family: IpFamily,
    #[schema(value_type = String, example = "192.0.2.10")]
    pub service_addr: IpAddr,
    pub service_port: u16,
    #[schema(value_type = String, example = "198.51.100.7")]
    pub peer_addr: IpAddr,
    pub peer_port: u16,
    pub origin: FlowOrigin,
    /// The TCP state bits that are set.
    pub state: Vec<FlowFlag>,
    pub packets_from_peer: u64,
    pub bytes_from_peer: u64,
    pub packets_to_peer: u64,
    pub bytes_to_peer: u64,
    /// Since the flow's first packet.
    pub age_ns: u64,
    /// Since its last packet.
    pub idle_ns: u64,
}

impl FlowEntry {
    /// The map's entry at `now_ns`; `None` for an entry the snapshot can't carry (an
    /// unknown family or origin, which this build's datapath never writes).
    pub fn from_map(key: &FlowKey, value: &FlowValue, now_ns: u64) -> Option<Self> {
        let family = match key.family {
            family::IPV4 => IpFamily::Ipv4,
            family::IPV6 => IpFamily::Ipv6,
            _ => return None,
        };
        let (service_addr, service_port) = key.service()?;
        let (peer_addr, peer_port) = key.peer()?;
        Some(Self {
            protocol: key.protocol,
            family,
            service_addr,
            service_port,
            peer_addr,
            peer_port,
            origin: FlowOrigin::from_map(value.origin)?,
            state: FlowFlag::from_bits(value.state),
            packets_from_peer: value.packets_from_peer,
            bytes_from_peer: value.bytes_from_peer,
            packets_to_peer: value.packets_to_peer,
            bytes_to_peer: value.bytes_to_peer,
            age_ns: now_ns.saturating_sub(value.first_seen_ns),
            idle_ns: now_ns.saturating_sub(value.last_seen_ns),
        })
    }

    /// The flow map's key; an error when the addresses disagree with each other or
    /// with `family`.
    pub fn key(&self) -> Result<FlowKey, String> {
        let family_matches = match self.family {
            IpFamily::Ipv4 => self.service_addr.is_ipv4(),
            IpFamily::Ipv6 => self.service_addr.is_ipv6(),
        };
        if !family_matches {
            return Err(format!(
                "service address {} is not {:?}",
                self.service_addr, self.family
            ));
        }
        FlowKey::new(
            (self.service_addr, self.service_port),
            (self.peer_addr, self.peer_port),
            self.protocol,
        )
        .ok_or_else(|| {
            format!(
                "service {} and peer {} are of different families",
                self.service_addr, self.peer_addr
            )
        })
    }

    /// The flow map's value, its times rebased on `now_ns` (this host's monotonic clock).
    pub fn value(&self, now_ns: u64) -> FlowValue {
        FlowValue {
            first_seen_ns: now_ns.saturating_sub(self.age_ns),
            last_seen_ns: now_ns.saturating_sub(self.idle_ns),
            packets_from_peer: self.packets_from_peer,
            bytes_from_peer: self.bytes_from_peer,
            packets_to_peer: self.packets_to_peer,
            bytes_to_peer: self.bytes_to_peer,
            state: FlowFlag::to_bits(&self.state),
            origin: self.origin.to_map(),
            _pad: [0; 3],
        }
    }

    /// Whether site A recorded it in `track` mode: a pre-move flow.
    pub fn is_tracked(&self) -> bool {
        self.origin == FlowOrigin::Tracked
    }

    /// [`FlowValue::holds_drain`] at snapshot time.
    pub fn holds_drain(&self) -> bool {
        self.value(self.age_ns)
            .holds_drain(self.protocol, self.idle_ns)
    }

    /// Payload bytes both ways.
    pub fn bytes(&self) -> u64 {
        self.bytes_from_peer + self.bytes_to_peer
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv6Addr;

    use movarto_common::net::proto;
    use serde_json::json;

    use super::*;

    fn entry(now: u64) -> (FlowKey, FlowValue) {
        let key = FlowKey::new(
            ("192.0.2.10".parse().expect("ip"), 80),
            ("198.51.100.7".parse().expect("ip"), 40000),
            proto::TCP,
        )
        .expect("key");
        let value = FlowValue {
            first_seen_ns: now - 9_000,
            last_seen_ns: now - 1_000,
            packets_from_peer: 3,
            bytes_from_peer: 300,
            packets_to_peer: 4,
            bytes_to_peer: 4000,
            state: state::SYN_SEEN | state::ESTABLISHED | state::SEEN_FROM_PEER,
            origin: origin::TRACKED,
            _pad: [0; 3],
        };
        (key, value)
    }

    #[test]
    fn round_trips_through_json_onto_another_clock() {
        let (key, value) = entry(50_000);
        let v6_key = FlowKey::new(
            (Ipv6Addr::LOCALHOST.into(), 443),
            ("2001:db8::7".parse().expect("ip"), 50000),
            proto::UDP,
        )
        .expect("key");
        let snapshot = FlowSnapshot::new(vec![
            FlowEntry::from_map(&key, &value, 50_000).expect("entry"),
            FlowEntry::from_map(&v6_key, &value, 50_000).expect("entry"),
        ]);
        let text = serde_json::to_string(&snapshot).expect("json");
        assert!(text.starts_with(r#"{"version":1,"flows":[{"protocol":6,"family":"ipv4","#));
        assert!(text.contains(r#""state":["syn-seen","established","seen-from-peer"]"#));
        let back: FlowSnapshot = serde_json::from_str(&text).expect("parse");
        assert_eq!(back, snapshot);
        // B's clock is elsewhere; the ages stay.
        let flow = &back.flows[0];
        assert_eq!(flow.key(), Ok(key));
        let at_b = flow.value(7_000_000);
        assert_eq!(at_b.first_seen_ns, 7_000_000 - 9_000);
        assert_eq!(at_b.last_seen_ns, 7_000_000 - 1_000);
        assert_eq!(
            FlowValue {
                first_seen_ns: value.first_seen_ns,
                last_seen_ns: value.last_seen_ns,
                ..at_b
            },
            value
        );
        assert_eq!(back.flows[1].key(), Ok(v6_key));
        assert!(flow.is_tracked() && flow.holds_drain());
    }

    #[test]
    fn an_unknown_version_is_refused_naming_both() {
        let err = FlowSnapshot::from_json(json!({"version": 2, "flows": [{"anything": 1}]}))
            .expect_err("version 2");
        assert_eq!(
            err,
            SnapshotError::UnknownVersion {
                found: 2,
                supported: 1
            }
        );
        let message = err.to_string();
        assert!(
            message.contains("version 2") && message.contains("version 1"),
            "{message}"
        );
        // The hex records of the agents before this format: a bare array.
        let err = FlowSnapshot::from_json(json!([{"key": "00", "value": "00"}]))
            .expect_err("unversioned");
        assert_eq!(err, SnapshotError::Unversioned { supported: 1 });
    }

    #[test]
    fn malformed_snapshots_are_refused() {
        let (key, value) = entry(50_000);
        let good = serde_json::to_value(FlowSnapshot::new(vec![
            FlowEntry::from_map(&key, &value, 50_000).expect("entry"),
        ]))
        .expect("json");
        // Each case sets one field (by JSON pointer) to a wrong value.
        let broken = |pointer: &str, wrong: serde_json::Value| {
            let mut json = good.clone();
            if let Some(field) = json.pointer_mut(pointer) {
                *field = wrong;
            }
            FlowSnapshot::from_json(json)
        };
        assert!(FlowSnapshot::from_json(good.clone()).is_ok());
        let cases = [
            ("/version", json!("1")),
            ("/flows", json!(null)),
            ("/flows/0/origin", json!("teleported")),
            ("/flows/0/state", json!(["syn-seen", "haunted"])),
            ("/flows/0/peer_addr", json!("2001:db8::1")),
            ("/flows/0/family", json!("ipv6")),
            ("/flows/0/service_port", json!(70000)),
        ];
        for (pointer, wrong) in cases {
            let err = broken(pointer, wrong).expect_err(pointer);
            assert!(
                matches!(err, SnapshotError::Malformed(_)),
                "{pointer}: {err}"
            );
        }
        let mut unknown_field = good.clone();
        unknown_field["flows"][0]["port"] = json!(1);
        assert!(FlowSnapshot::from_json(unknown_field).is_err());
    }
}
