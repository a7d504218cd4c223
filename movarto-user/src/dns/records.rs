//! The service record: reading it, replacing it atomically, lowering and restoring its TTL,
//! and verifying the change on the authoritative server.

use std::{
    net::IpAddr,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use hickory_proto::{
    op::ResponseCode,
    rr::{Name, RData, RecordType},
};
use serde::Serialize;

use super::{
    client::ZoneServer,
    error::{DnsError, DnsErrorKind},
    message::{RrsetChange, query_message, record_type_of, update_message},
};

/// The managed record types.
pub const ADDRESS_TYPES: [RecordType; 2] = [RecordType::A, RecordType::AAAA];

/// One RRset as the authoritative server holds it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Rrset {
    #[serde(rename = "type")]
    pub record_type: String,
    /// 0 when the RRset is empty.
    pub ttl: u32,
    /// Sorted.
    pub addresses: Vec<IpAddr>,
}

/// A name's address records and the zone's serial, read together.
#[derive(Clone, Debug, Serialize)]
pub struct ServiceRecords {
    pub name: String,
    pub zone: String,
    pub server: String,
    pub serial: u32,
    pub a: Rrset,
    pub aaaa: Rrset,
}

impl ServiceRecords {
    pub fn rrset(&self, record_type: RecordType) -> &Rrset {
        if record_type == RecordType::AAAA {
            &self.aaaa
        } else {
            &self.a
        }
    }
}

/// Reads one RRset; an existing name without records of this type gives an empty RRset.
pub fn query_rrset(
    server: &ZoneServer,
    name: &Name,
    record_type: RecordType,
) -> Result<Rrset, DnsError> {
    let response = server.exchange(query_message(name, record_type), false)?;
    if !response.authoritative {
        return Err(server.error(DnsErrorKind::Rcode {
            rcode: ResponseCode::NotAuth,
            tsig: None,
        }));
    }
    let mut ttl = 0;
    let mut addresses: Vec<IpAddr> = response
        .answers
        .iter()
        .filter(|r| r.record_type() == record_type && &r.name == name)
        .filter_map(|r| {
            ttl = r.ttl;
            r.data.ip_addr()
        })
        .collect();
    addresses.sort();
    Ok(Rrset {
        record_type: record_type.to_string(),
        ttl,
        addresses,
    })
}

/// The zone's SOA serial.
pub fn soa_serial(server: &ZoneServer) -> Result<u32, DnsError> {
    let response = server.exchange(query_message(&server.zone, RecordType::SOA), false)?;
    response
        .answers
        .iter()
        .find_map(|r| match &r.data {
            RData::SOA(soa) => Some(soa.serial),
            _ => None,
        })
        .ok_or_else(|| {
            server.error(DnsErrorKind::Malformed(
                "no SOA record in the answer".into(),
            ))
        })
}

pub fn show(server: &ZoneServer, name: &Name) -> Result<ServiceRecords, DnsError> {
    Ok(ServiceRecords {
        name: name.to_string(),
        zone: server.zone.to_string(),
        server: server.server.to_string(),
        serial: soa_serial(server)?,
        a: query_rrset(server, name, RecordType::A)?,
        aaaa: query_rrset(server, name, RecordType::AAAA)?,
    })
}

/// What an update did.
#[derive(Clone, Debug, Serialize)]
pub struct UpdateReport {
    pub before: ServiceRecords,
    pub after: ServiceRecords,
    /// From the caller's start instant (e.g. switchover) to the authoritative answer showing
    /// the change.
    pub answer_changed_after_ms: u64,
}

/// Replaces the addresses of `name`: for each family in `new`, the RRset becomes exactly those
/// addresses. `expected` are the addresses it must hold now; `None` takes what the server holds
/// at the start (still atomic: the update fails if they change in between).
/// `ttl` defaults to the current TTL of each RRset.
pub fn replace_addresses(
    server: &ZoneServer,
    name: &Name,
    expected: Option<&[IpAddr]>,
    new: &[IpAddr],
    ttl: Option<u32>,
    start: Instant,
    verify_timeout: Duration,
) -> Result<UpdateReport> {
    let before = show(server, name)?;
    let changes = address_changes(&before, name, expected, new, ttl)?;
    apply(server, name, &changes, before, start, verify_timeout)
}

/// The RRset changes that make `name`'s addresses `new` (see [`replace_addresses`]).
fn address_changes(
    before: &ServiceRecords,
    name: &Name,
    expected: Option<&[IpAddr]>,
    new: &[IpAddr],
    ttl: Option<u32>,
) -> Result<Vec<RrsetChange>> {
    let mut changes = Vec::new();
    for record_type in ADDRESS_TYPES {
        let new_addrs = of_type(new, record_type);
        let current = match expected {
            Some(expected) => of_type(expected, record_type),
            None => before.rrset(record_type).addresses.clone(),
        };
        let touched = !new_addrs.is_empty() || expected.is_some_and(|_| !current.is_empty());
        if !touched {
            continue;
        }
        let ttl = ttl.unwrap_or_else(|| default_ttl(before, record_type));
        changes.push(RrsetChange {
            name: name.clone(),
            record_type,
            current,
            new: new_addrs,
            ttl,
        });
    }
    if changes.is_empty() {
        bail!("no new addresses given for {name}");
    }
    Ok(changes)
}

/// One name's switch in [`replace_many`]: as the arguments of [`replace_addresses`].
#[derive(Clone, Debug)]
pub struct Switch {
    pub name: Name,
    /// The addresses it must hold now; `None`: what the server holds at the start.
    pub expected: Option<Vec<IpAddr>>,
    pub new: Vec<IpAddr>,
    pub ttl: Option<u32>,
}

/// What [`replace_many`] did for one name.
#[derive(Debug)]
pub struct SwitchOutcome {
    pub name: Name,
    pub result: Result<UpdateReport>,
    /// It went in the one UPDATE with the others (or needed none); `false`: it was sent
    /// alone after the batch was refused.
    pub batched: bool,
}

/// Replaces the addresses of several names of one zone in one UPDATE: evacuating a host
/// switches many services at once, and one message is one round trip and one serial.
/// Every RRset stays guarded by its own prerequisite. A refused prerequisite refuses the
/// whole message (RFC 2136 §3.2), so a batch refused for one is sent again name by name:
/// a name someone else changed fails alone and holds up no other.
pub fn replace_many(
    server: &ZoneServer,
    switches: &[Switch],
    start: Instant,
    verify_timeout: Duration,
) -> Vec<SwitchOutcome> {
    let mut outcomes = Vec::new();
    // (switch, records before, changes) of the names that need the update.
    let mut pending = Vec::new();
    for switch in switches {
        let planned = show(server, &switch.name)
            .map_err(anyhow::Error::from)
            .and_then(|before| {
                let changes = address_changes(
                    &before,
                    &switch.name,
                    switch.expected.as_deref(),
                    &switch.new,
                    switch.ttl,
                )?;
                Ok((before, changes))
            });
        match planned {
            Err(err) => outcomes.push(SwitchOutcome {
                name: switch.name.clone(),
                result: Err(err),
                batched: false,
            }),
            Ok((before, changes)) if already_applied(&before, &changes) => {
                outcomes.push(SwitchOutcome {
                    name: switch.name.clone(),
                    result: Ok(unchanged(before, start)),
                    batched: true,
                })
            }
            Ok((before, changes)) => pending.push((switch, before, changes)),
        }
    }
    if pending.is_empty() {
        return outcomes;
    }
    let all: Vec<RrsetChange> = pending.iter().flat_map(|(_, _, c)| c.clone()).collect();
    let sent = update_message(&server.zone, &all).and_then(|message| {
        tracing::debug!(server = %server.server, zone = %server.zone, names = pending.len(), "sending one signed DNS UPDATE for several names");
        Ok(server.exchange(message, true)?)
    });
    match sent {
        Ok(_) => {
            for (switch, before, changes) in pending {
                let serial = before.serial;
                let result = verify(
                    server,
                    &switch.name,
                    &expected_rrsets(&changes),
                    serial,
                    start,
                    verify_timeout,
                )
                .map(|(after, elapsed)| UpdateReport {
                    before,
                    after,
                    answer_changed_after_ms: millis(elapsed),
                });
                outcomes.push(SwitchOutcome {
                    name: switch.name.clone(),
                    result,
                    batched: true,
                });
            }
        }
        Err(err) if is_prerequisite_failure(&err) => {
            tracing::info!(
                "the batched DNS UPDATE was refused for a prerequisite; sending each name alone"
            );
            for (switch, before, changes) in pending {
                outcomes.push(SwitchOutcome {
                    name: switch.name.clone(),
                    result: apply(
                        server,
                        &switch.name,
                        &changes,
                        before,
                        start,
                        verify_timeout,
                    ),
                    batched: false,
                });
            }
        }
        Err(err) => {
            for (switch, _, _) in pending {
                outcomes.push(SwitchOutcome {
                    name: switch.name.clone(),
                    result: Err(anyhow::anyhow!("{err:#}")),
                    batched: true,
                });
            }
        }
    }
    outcomes
}

fn is_prerequisite_failure(err: &anyhow::Error) -> bool {
    err.downcast_ref::<DnsError>()
        .is_some_and(|dns| matches!(dns.kind, DnsErrorKind::PrerequisiteFailed { .. }))
}

fn millis(elapsed: Duration) -> u64 {
    u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX)
}

/// The report of an update the records already held.
fn unchanged(before: ServiceRecords, start: Instant) -> UpdateReport {
    UpdateReport {
        after: before.clone(),
        before,
        answer_changed_after_ms: millis(start.elapsed()),
    }
}

/// The RRsets `changes` leave, as [`verify`] expects them.
fn expected_rrsets(changes: &[RrsetChange]) -> Vec<Rrset> {
    changes
        .iter()
        .map(|c| {
            let mut addresses = c.new.clone();
            addresses.sort();
            Rrset {
                record_type: c.record_type.to_string(),
                ttl: if addresses.is_empty() { 0 } else { c.ttl },
                addresses,
            }
        })
        .collect()
}

/// Sets the TTL of `name`'s existing A and AAAA RRsets, keeping their addresses.
/// Returns the report and the longest old TTL: caches may hold the old answer that long.
pub fn set_ttl(
    server: &ZoneServer,
    name: &Name,
    ttl: u32,
    verify_timeout: Duration,
) -> Result<(UpdateReport, u32)> {
    let start = Instant::now();
    let before = show(server, name)?;
    let mut old_ttl = 0;
    let mut changes = Vec::new();
    for record_type in ADDRESS_TYPES {
        let rrset = before.rrset(record_type);
        if rrset.addresses.is_empty() {
            continue;
        }
        old_ttl = old_ttl.max(rrset.ttl);
        changes.push(RrsetChange {
            name: name.clone(),
            record_type,
            current: rrset.addresses.clone(),
            new: rrset.addresses.clone(),
            ttl,
        });
    }
    if changes.is_empty() {
        bail!("{name} has no A or AAAA records in zone {}", server.zone);
    }
    let report = apply(server, name, &changes, before, start, verify_timeout)?;
    Ok((report, old_ttl))
}

/// The RRset's own TTL; for a new RRset, the other family's (it may have been lowered), else
/// BIND's usual 300 s.
fn default_ttl(before: &ServiceRecords, record_type: RecordType) -> u32 {
    let own = before.rrset(record_type);
    let other = if record_type == RecordType::A {
        &before.aaaa
    } else {
        &before.a
    };
    [own, other]
        .into_iter()
        .find(|r| !r.addresses.is_empty())
        .map_or(300, |r| r.ttl)
}

fn of_type(addrs: &[IpAddr], record_type: RecordType) -> Vec<IpAddr> {
    let mut out: Vec<IpAddr> = addrs
        .iter()
        .copied()
        .filter(|a| record_type_of(*a) == record_type)
        .collect();
    out.sort();
    out.dedup();
    out
}

fn apply(
    server: &ZoneServer,
    name: &Name,
    changes: &[RrsetChange],
    before: ServiceRecords,
    start: Instant,
    verify_timeout: Duration,
) -> Result<UpdateReport> {
    // An update that changes nothing leaves the serial where it is, so its verification
    // would wait for ever; a re-run (after a crash, say) finds it already applied.
    if already_applied(&before, changes) {
        tracing::debug!(%name, ?changes, "the records already hold the update; nothing sent");
        return Ok(unchanged(before, start));
    }
    let message = update_message(&server.zone, changes)?;
    tracing::debug!(server = %server.server, zone = %server.zone, %name, ?changes, "sending signed DNS UPDATE");
    server.exchange(message, true)?;
    let (after, elapsed) = verify(
        server,
        name,
        &expected_rrsets(changes),
        before.serial,
        start,
        verify_timeout,
    )?;
    Ok(UpdateReport {
        before,
        after,
        answer_changed_after_ms: millis(elapsed),
    })
}

/// Whether the server already holds every change: the same addresses, and the same TTL
/// where any remain.
fn already_applied(before: &ServiceRecords, changes: &[RrsetChange]) -> bool {
    changes.iter().all(|c| {
        let now = before.rrset(c.record_type);
        let mut want = c.new.clone();
        want.sort();
        want.dedup();
        now.addresses == want && (want.is_empty() || now.ttl == c.ttl)
    })
}

/// Polls the authoritative server until `name` holds `expected` and the SOA serial has moved
/// past `serial_before`. Returns what it saw and the time since `start`.
pub fn verify(
    server: &ZoneServer,
    name: &Name,
    expected: &[Rrset],
    serial_before: u32,
    start: Instant,
    timeout: Duration,
) -> Result<(ServiceRecords, Duration)> {
    let deadline = Instant::now() + timeout;
    loop {
        let now = show(server, name)?;
        let answer_matches = expected.iter().all(|want| {
            let rt = if want.record_type == "AAAA" {
                RecordType::AAAA
            } else {
                RecordType::A
            };
            now.rrset(rt) == want
        });
        // RFC 1982 serial arithmetic: the serial may wrap.
        let serial_advanced =
            now.serial != serial_before && now.serial.wrapping_sub(serial_before) < (1 << 31);
        if answer_matches && serial_advanced {
            return Ok((now, start.elapsed()));
        }
        if Instant::now() >= deadline {
            return Err(anyhow::anyhow!(
                "after {timeout:?}, {name} on {} still shows A {:?} TTL {}, AAAA {:?} TTL {}, serial {} (was {serial_before}); expected {expected:?}",
                server.server,
                now.a.addresses,
                now.a.ttl,
                now.aaaa.addresses,
                now.aaaa.ttl,
                now.serial
            ))
            .context("verifying the update on the authoritative server");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn records(a: (u32, &[&str]), aaaa: (u32, &[&str])) -> ServiceRecords {
        let rrset = |rt: &str, (ttl, addrs): (u32, &[&str])| Rrset {
            record_type: rt.into(),
            ttl,
            addresses: addrs.iter().map(|a| a.parse().expect("ip")).collect(),
        };
        ServiceRecords {
            name: "svc.example.test.".into(),
            zone: "example.test.".into(),
            server: "192.0.2.53:53".into(),
            serial: 1,
            a: rrset("A", a),
            aaaa: rrset("AAAA", aaaa),
        }
    }

    #[test]
    fn an_update_the_records_already_hold_is_not_sent_again() {
        let before = records((20, &["198.51.100.10"]), (20, &["2001:db8::10"]));
        let change = |rt, addrs: &[&str], ttl| RrsetChange {
            name: Name::from_ascii("svc.example.test.").expect("name"),
            record_type: rt,
            current: Vec::new(),
            new: addrs.iter().map(|a| a.parse().expect("ip")).collect(),
            ttl,
        };
        let same = [
            change(RecordType::A, &["198.51.100.10"], 20),
            change(RecordType::AAAA, &["2001:db8::10"], 20),
        ];
        assert!(already_applied(&before, &same));
        assert!(!already_applied(
            &before,
            &[change(RecordType::A, &["198.51.100.10"], 300)]
        ));
        assert!(!already_applied(
            &before,
            &[change(RecordType::A, &["198.18.0.10"], 20)]
        ));
        let none = records((0, &[]), (20, &["2001:db8::10"]));
        assert!(already_applied(&none, &[change(RecordType::A, &[], 20)]));
    }

    #[test]
    fn new_rrsets_inherit_the_lowered_ttl_of_the_other_family() {
        let before = records((20, &["198.51.100.10"]), (0, &[]));
        assert_eq!(default_ttl(&before, RecordType::A), 20);
        assert_eq!(default_ttl(&before, RecordType::AAAA), 20);
        let nothing = records((0, &[]), (0, &[]));
        assert_eq!(default_ttl(&nothing, RecordType::AAAA), 300);
    }

    #[test]
    fn addresses_split_by_family_sorted_and_deduplicated() {
        let addrs: Vec<IpAddr> = ["203.0.113.2", "2001:db8::1", "203.0.113.1", "203.0.113.2"]
            .iter()
            .map(|a| a.parse().expect("ip"))
            .collect();
        assert_eq!(
            of_type(&addrs, RecordType::A),
            [
                "203.0.113.1".parse::<IpAddr>().expect("ip"),
                "203.0.113.2".parse().expect("ip")
            ]
        );
        assert_eq!(of_type(&addrs, RecordType::AAAA).len(), 1);
    }
}
