//! Building RFC 2136 UPDATE and plain query messages with hickory-proto.

use std::net::IpAddr;

use anyhow::{Result, bail};
use hickory_proto::{
    op::{Edns, Message, Query, UpdateMessage as _, update_message},
    rr::{Name, RData, RecordSet, RecordType},
};

/// Replace one RRset atomically: the server applies it only if the RRset is still `current`.
#[derive(Clone, Debug, PartialEq)]
pub struct RrsetChange {
    pub name: Name,
    /// `A` or `AAAA`.
    pub record_type: RecordType,
    /// What the RRset must hold now (empty: it must not exist).
    pub current: Vec<IpAddr>,
    /// What it holds afterwards (empty: it is deleted).
    pub new: Vec<IpAddr>,
    /// TTL of the new records.
    pub ttl: u32,
}

/// The record type that holds `addr`.
pub fn record_type_of(addr: IpAddr) -> RecordType {
    match addr {
        IpAddr::V4(_) => RecordType::A,
        IpAddr::V6(_) => RecordType::AAAA,
    }
}

fn rrset(name: &Name, record_type: RecordType, ttl: u32, addrs: &[IpAddr]) -> Result<RecordSet> {
    let mut set = RecordSet::with_ttl(name.clone(), record_type, ttl);
    for addr in addrs {
        if record_type_of(*addr) != record_type {
            bail!("{addr} does not belong in a {record_type} record of {name}");
        }
        set.add_rdata(RData::from(*addr));
    }
    Ok(set)
}

/// One UPDATE for all `changes`, so A and AAAA change together or not at all.
///
/// Each change carries a value-dependent prerequisite (RFC 2136 §2.4.2: the RRset is exactly
/// `current`), or "RRset does not exist" (§2.4.3) when `current` is empty.
pub fn update_message(zone: &Name, changes: &[RrsetChange]) -> Result<Message> {
    if changes.is_empty() {
        bail!("nothing to update");
    }
    let mut message: Option<Message> = None;
    for change in changes {
        if !matches!(change.record_type, RecordType::A | RecordType::AAAA) {
            bail!(
                "only A and AAAA records are managed, not {}",
                change.record_type
            );
        }
        // hickory asserts this; check first so a typo is an error, not a panic.
        if !zone.zone_of(&change.name) {
            bail!("{} is not inside zone {zone}", change.name);
        }
        if change.current.is_empty() && change.new.is_empty() {
            bail!(
                "{} {}: neither the current nor the new addresses are given",
                change.name,
                change.record_type
            );
        }
        let new = rrset(&change.name, change.record_type, change.ttl, &change.new)?;
        let part = if change.current.is_empty() {
            update_message::create(new, zone.clone(), false)
        } else {
            let current = rrset(&change.name, change.record_type, 0, &change.current)?;
            update_message::compare_and_swap(current, new, zone.clone(), false)
        };
        match message.as_mut() {
            None => message = Some(part),
            Some(message) => {
                message.add_pre_requisites(part.prerequisites().to_vec());
                message.add_updates(part.updates().to_vec());
            }
        }
    }
    message.ok_or_else(|| anyhow::anyhow!("nothing to update"))
}

/// A non-recursive query, as an authoritative server expects it.
pub fn query_message(name: &Name, record_type: RecordType) -> Message {
    let mut message = Message::query();
    message.add_query(Query::query(name.clone(), record_type));
    message.metadata.recursion_desired = false;
    let mut edns = Edns::new();
    edns.set_max_payload(1232);
    message.set_edns(edns);
    message
}

#[cfg(test)]
mod tests {
    use hickory_proto::{
        op::OpCode,
        rr::{DNSClass, Record, TSigner, rdata::tsig::TsigAlgorithm},
    };

    use super::*;

    fn name(s: &str) -> Name {
        Name::from_ascii(s).expect("name")
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    fn change(rt: RecordType, current: &[&str], new: &[&str]) -> RrsetChange {
        RrsetChange {
            name: name("svc.example.test."),
            record_type: rt,
            current: current.iter().map(|s| ip(s)).collect(),
            new: new.iter().map(|s| ip(s)).collect(),
            ttl: 20,
        }
    }

    /// Through the wire and back, so we test what the server receives.
    fn round_trip(message: &Message) -> Message {
        Message::from_vec(&message.to_vec().expect("encode")).expect("decode")
    }

    fn summary(records: &[Record]) -> Vec<(String, DNSClass, u32, String)> {
        records
            .iter()
            .map(|r| {
                (
                    r.record_type().to_string(),
                    r.dns_class,
                    r.ttl,
                    r.data.ip_addr().map(|a| a.to_string()).unwrap_or_default(),
                )
            })
            .collect()
    }

    #[test]
    fn replace_requires_the_old_value_deletes_it_and_adds_the_new() {
        let zone = name("example.test.");
        let m = update_message(
            &zone,
            &[change(RecordType::A, &["198.51.100.10"], &["203.0.113.20"])],
        )
        .expect("build");
        let m = round_trip(&m);
        assert_eq!(m.op_code, OpCode::Update);
        assert_eq!(m.zones().len(), 1);
        assert_eq!(m.zones()[0].name(), &zone);
        assert_eq!(m.zones()[0].query_type(), RecordType::SOA);
        assert_eq!(
            summary(m.prerequisites()),
            [("A".into(), DNSClass::IN, 0, "198.51.100.10".into())]
        );
        assert_eq!(
            summary(m.updates()),
            [
                ("A".into(), DNSClass::NONE, 0, "198.51.100.10".into()),
                ("A".into(), DNSClass::IN, 20, "203.0.113.20".into()),
            ]
        );
    }

    #[test]
    fn a_and_aaaa_go_in_one_message() {
        let zone = name("example.test.");
        let m = update_message(
            &zone,
            &[
                change(RecordType::A, &["198.51.100.10"], &["203.0.113.20"]),
                change(RecordType::AAAA, &["2001:db8::10"], &["2001:db8:1::20"]),
            ],
        )
        .expect("build");
        let m = round_trip(&m);
        assert_eq!(m.zones().len(), 1);
        assert_eq!(m.prerequisites().len(), 2);
        assert_eq!(m.updates().len(), 4);
        assert_eq!(
            summary(&m.updates()[3..]),
            [("AAAA".into(), DNSClass::IN, 20, "2001:db8:1::20".into())]
        );
    }

    #[test]
    fn adding_to_an_absent_rrset_requires_it_to_be_absent() {
        let zone = name("example.test.");
        let m = update_message(&zone, &[change(RecordType::AAAA, &[], &["2001:db8::20"])])
            .expect("build");
        let m = round_trip(&m);
        assert_eq!(
            summary(m.prerequisites()),
            [("AAAA".into(), DNSClass::NONE, 0, String::new())]
        );
        assert_eq!(
            summary(m.updates()),
            [("AAAA".into(), DNSClass::IN, 20, "2001:db8::20".into())]
        );
    }

    #[test]
    fn ttl_change_keeps_the_address() {
        let zone = name("example.test.");
        let m = update_message(
            &zone,
            &[change(
                RecordType::A,
                &["198.51.100.10"],
                &["198.51.100.10"],
            )],
        )
        .expect("build");
        let m = round_trip(&m);
        assert_eq!(
            summary(m.updates()),
            [
                ("A".into(), DNSClass::NONE, 0, "198.51.100.10".into()),
                ("A".into(), DNSClass::IN, 20, "198.51.100.10".into()),
            ]
        );
    }

    #[test]
    fn rejects_bad_changes_without_panicking() {
        let zone = name("example.test.");
        let mut outside = change(RecordType::A, &["198.51.100.10"], &["203.0.113.20"]);
        outside.name = name("svc.other.test.");
        let err = update_message(&zone, &[outside]).expect_err("outside the zone");
        assert!(err.to_string().contains("not inside zone"), "{err}");
        let err = update_message(
            &zone,
            &[change(RecordType::A, &["2001:db8::1"], &["203.0.113.20"])],
        )
        .expect_err("family");
        assert!(err.to_string().contains("does not belong"), "{err}");
        assert!(update_message(&zone, &[change(RecordType::A, &[], &[])]).is_err());
        assert!(update_message(&zone, &[]).is_err());
        assert!(update_message(&zone, &[change(RecordType::MX, &[], &["192.0.2.1"])]).is_err());
    }

    #[test]
    fn signed_update_carries_a_verifiable_tsig() {
        let zone = name("example.test.");
        let mut m = update_message(
            &zone,
            &[change(RecordType::A, &["198.51.100.10"], &["203.0.113.20"])],
        )
        .expect("build");
        let signer = TSigner::new(
            b"secret".to_vec(),
            TsigAlgorithm::HmacSha256,
            name("mv-key."),
            300,
        )
        .expect("signer");
        m.finalize(&signer, 1_800_000_000).expect("sign");
        let bytes = m.to_vec().expect("encode");
        let (_, time, _) = signer
            .verify_message_byte(&bytes, None, true)
            .expect("verifies");
        assert_eq!(time, 1_800_000_000);
        let decoded = Message::from_vec(&bytes).expect("decode");
        let tsig = decoded.signature().expect("TSIG present");
        assert_eq!(tsig.name, name("mv-key."));
        let other = TSigner::new(
            b"other".to_vec(),
            TsigAlgorithm::HmacSha256,
            name("mv-key."),
            300,
        )
        .expect("signer");
        assert!(other.verify_message_byte(&bytes, None, true).is_err());
    }

    #[test]
    fn queries_are_not_recursive() {
        let m = round_trip(&query_message(&name("svc.example.test."), RecordType::AAAA));
        assert_eq!(m.op_code, OpCode::Query);
        assert!(!m.recursion_desired);
        assert_eq!(m.queries[0].query_type(), RecordType::AAAA);
    }
}
