//! movarto's DNS updates against a real BIND9 in its own namespace: signed RFC 2136 updates,
//! key errors, prerequisites that protect against concurrent changes, TTL lowering and
//! restoring, A and AAAA. `dig @server` checks every outcome independently.

use std::{
    net::IpAddr,
    time::{Duration, Instant},
};

use anyhow::bail;
use hickory_proto::rr::{Name, RecordType};
use movarto_lab::{
    dns_server::{Bind9, HOME_V4, HOME_V6, INITIAL_TTL, KEY_NAME, SERVER_IP, SERVICE, ZONE},
    movarto_user,
};
use movarto_tests::require_root;
use movarto_user::dns::{
    DnsError, DnsErrorKind, TsigKey, ZoneServer,
    client::Transport,
    message::{RrsetChange, query_message, update_message},
    records,
};

const NEW_V4: &str = "203.0.113.20";
const NEW_V6: &str = "2001:db8:1::20";
const VERIFY: Duration = Duration::from_secs(5);

fn name(s: &str) -> Name {
    Name::from_ascii(s).expect("name")
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

fn zone_server(bind: &Bind9, key: Option<TsigKey>) -> ZoneServer {
    let mut server = ZoneServer::new(bind.server_addr(), name(ZONE), key);
    server.timeout = Duration::from_secs(2);
    server
}

fn good_key(bind: &Bind9) -> TsigKey {
    TsigKey::from_file(&bind.key_file()).expect("key file")
}

/// The DnsError inside an anyhow error.
fn dns_error(err: &anyhow::Error) -> &DnsError {
    err.downcast_ref::<DnsError>()
        .unwrap_or_else(|| panic!("not a DnsError: {err:#}"))
}

fn assert_unchanged(bind: &Bind9) {
    assert_eq!(bind.dig(SERVICE, "A").expect("dig"), [HOME_V4]);
    assert_eq!(bind.dig(SERVICE, "AAAA").expect("dig"), [HOME_V6]);
}

/// Runs `movarto-user dns <args>` in the client namespace; returns stdout or the error.
fn cli(bind: &Bind9, args: &[&str]) -> anyhow::Result<String> {
    let bin = movarto_user()?;
    // The child inherits the namespace of the thread that spawns it.
    let out = bind.in_client(move || {
        std::process::Command::new(bin)
            .arg("dns")
            .args(args)
            .output()
    })??;
    if !out.status.success() {
        bail!(
            "movarto-user dns {}: {}: {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8(out.stdout)?)
}

#[test]
fn signed_update_replaces_a_and_aaaa_and_dig_shows_them() {
    require_root();
    let bind = Bind9::start("update").expect("named");
    let server = zone_server(&bind, Some(good_key(&bind)));
    let start = Instant::now();
    let report = bind
        .in_client(|| {
            records::replace_addresses(
                &server,
                &name(SERVICE),
                Some(&[ip(HOME_V4), ip(HOME_V6)]),
                &[ip(NEW_V4), ip(NEW_V6)],
                Some(20),
                start,
                VERIFY,
            )
        })
        .expect("the client namespace")
        .unwrap_or_else(|err| panic!("update failed: {err:#}\n{}", bind.log()));
    assert_eq!(bind.dig(SERVICE, "A").expect("dig"), [NEW_V4]);
    assert_eq!(bind.dig(SERVICE, "AAAA").expect("dig"), [NEW_V6]);
    assert_eq!(bind.dig_ttls(SERVICE, "A").expect("dig"), [20]);
    assert_eq!(report.before.a.addresses, [ip(HOME_V4)]);
    assert_eq!(report.after.a.addresses, [ip(NEW_V4)]);
    assert_eq!(report.after.aaaa.addresses, [ip(NEW_V6)]);
    assert!(
        report.after.serial > report.before.serial,
        "serial {} -> {}",
        report.before.serial,
        report.after.serial
    );
    assert!(
        u128::from(report.answer_changed_after_ms) <= start.elapsed().as_millis(),
        "timing is measured from the given start"
    );
    // The server logged it as an update signed with our key.
    assert!(
        bind.log()
            .contains(&format!("/key {KEY_NAME}: updating zone")),
        "{}",
        bind.log()
    );
}

#[test]
fn cli_show_and_update_with_key_file_and_json() {
    require_root();
    let bind = Bind9::start("cli").expect("named");
    let key_file = bind.key_file();
    let key_file = key_file.to_str().expect("utf-8");
    let common = ["-s", SERVER_IP, "-z", ZONE];

    let shown = cli(&bind, &[&["show", SERVICE][..], &common[..]].concat()).expect("show");
    assert!(
        shown.contains(HOME_V4) && shown.contains(HOME_V6),
        "{shown}"
    );
    assert!(shown.contains("serial 1"), "{shown}");

    let out = cli(
        &bind,
        &[
            &["update", SERVICE, "-k", key_file, "--to", NEW_V4, "--json"][..],
            &common[..],
        ]
        .concat(),
    )
    .expect("update");
    let json: serde_json::Value = serde_json::from_str(&out).expect("JSON output");
    assert_eq!(json["after"]["a"]["addresses"][0], NEW_V4, "{json}");
    assert_eq!(json["after"]["a"]["ttl"], INITIAL_TTL, "TTL kept: {json}");
    // Only A was asked for; AAAA stays.
    assert_eq!(json["after"]["aaaa"]["addresses"][0], HOME_V6, "{json}");
    assert!(json["answer_changed_after_ms"].is_u64(), "{json}");
    assert_eq!(bind.dig(SERVICE, "A").expect("dig"), [NEW_V4]);
    assert_eq!(bind.dig(SERVICE, "AAAA").expect("dig"), [HOME_V6]);

    // The same with -y, as nsupdate takes it, moving AAAA.
    let key_text = std::fs::read_to_string(bind.key_file()).expect("key");
    let secret = key_text.split('"').nth(3).expect("secret in key file");
    let spec = format!("hmac-sha256:{KEY_NAME}:{secret}");
    let out = cli(
        &bind,
        &[
            &["update", SERVICE, "-y", &spec, "--to", NEW_V6][..],
            &common[..],
        ]
        .concat(),
    )
    .expect("update with -y");
    assert!(
        out.contains(&format!("AAAA  {HOME_V6} TTL 300 -> {NEW_V6} TTL 300")),
        "{out}"
    );
    assert_eq!(bind.dig(SERVICE, "AAAA").expect("dig"), [NEW_V6]);
}

#[test]
fn wrong_keys_and_zones_are_refused_with_clear_errors() {
    require_root();
    let bind = Bind9::start("badkey").expect("named");
    let secret = std::fs::read_to_string(bind.key_file()).expect("key");
    let secret = secret.split('"').nth(3).expect("secret").to_owned();
    let cases = [
        (
            "unknown key name",
            zone_server(
                &bind,
                Some(TsigKey::new("nobody-key", "hmac-sha256", &secret).expect("key")),
            ),
            "BADKEY",
            "does not know this TSIG key",
        ),
        (
            "wrong secret",
            zone_server(
                &bind,
                Some(
                    TsigKey::new(
                        KEY_NAME,
                        "hmac-sha256",
                        "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
                    )
                    .expect("key"),
                ),
            ),
            "BADSIG",
            "secret differs",
        ),
        (
            "key not granted by update-policy",
            zone_server(
                &bind,
                Some(TsigKey::from_file(&bind.other_key_file()).expect("key")),
            ),
            "REFUSED",
            "does not let this key change this name",
        ),
    ];
    for (what, server, code, phrase) in cases {
        let err = bind
            .in_client(|| records::set_ttl(&server, &name(SERVICE), 20, VERIFY).map(drop))
            .expect("the client namespace")
            .expect_err(what);
        let dns = dns_error(&err);
        assert_eq!(dns.kind.code(), code, "{what}: {err:#}");
        let text = format!("{err:#}");
        for part in [phrase, SERVER_IP, ":53"] {
            assert!(text.contains(part), "{what}: {text:?} lacks {part:?}");
        }
        assert!(text.contains("zone "), "{what}: {text}");
        assert!(text.contains("key "), "{what}: {text}");
        assert_unchanged(&bind);
        assert_eq!(
            bind.dig_ttls(SERVICE, "A").expect("dig"),
            [INITIAL_TTL],
            "{what}"
        );
    }
}

#[test]
fn update_for_a_zone_the_server_does_not_serve_is_notauth() {
    require_root();
    let bind = Bind9::start("notauth").expect("named");
    let server = ZoneServer::new(
        bind.server_addr(),
        name("other.test."),
        Some(good_key(&bind)),
    );
    let change = RrsetChange {
        name: name("svc.other.test."),
        record_type: RecordType::A,
        current: vec![ip(HOME_V4)],
        new: vec![ip(NEW_V4)],
        ttl: 20,
    };
    let message = update_message(&server.zone, &[change]).expect("message");
    let err = bind
        .in_client(|| server.exchange(message, true))
        .expect("the client namespace")
        .expect_err("not authoritative");
    assert_eq!(err.kind.code(), "NOTAUTH", "{err}");
    let text = err.to_string();
    for part in [
        "not authoritative",
        "192.0.2.53:53",
        "zone other.test.",
        KEY_NAME,
    ] {
        assert!(text.contains(part), "{text:?} lacks {part:?}");
    }
    assert_unchanged(&bind);
}

#[test]
fn skewed_clock_is_badtime() {
    require_root();
    let bind = Bind9::start("badtime").expect("named");
    let mut server = zone_server(&bind, Some(good_key(&bind)));
    server.clock_skew_secs = -3600;
    let err = bind
        .in_client(|| records::set_ttl(&server, &name(SERVICE), 20, VERIFY))
        .expect("the client namespace")
        .expect_err("BADTIME");
    assert_eq!(dns_error(&err).kind.code(), "BADTIME", "{err:#}");
    assert!(format!("{err:#}").contains("clocks differ"), "{err:#}");
    assert_eq!(bind.dig_ttls(SERVICE, "A").expect("dig"), [INITIAL_TTL]);
}

#[test]
fn families_in_from_but_not_to_are_deleted_others_left_alone() {
    require_root();
    let bind = Bind9::start("families").expect("named");
    let server = zone_server(&bind, Some(good_key(&bind)));
    // Only A is named: AAAA stays.
    bind.in_client(|| {
        records::replace_addresses(
            &server,
            &name(SERVICE),
            Some(&[ip(HOME_V4)]),
            &[ip(NEW_V4)],
            None,
            Instant::now(),
            VERIFY,
        )
    })
    .expect("the client namespace")
    .expect("A only");
    assert_eq!(bind.dig(SERVICE, "A").expect("dig"), [NEW_V4]);
    assert_eq!(bind.dig(SERVICE, "AAAA").expect("dig"), [HOME_V6]);
    // AAAA is named in --from but not in --to: it goes.
    let report = bind
        .in_client(|| {
            records::replace_addresses(
                &server,
                &name(SERVICE),
                Some(&[ip(NEW_V4), ip(HOME_V6)]),
                &[ip(NEW_V4)],
                None,
                Instant::now(),
                VERIFY,
            )
        })
        .expect("the client namespace")
        .expect("delete AAAA");
    assert!(report.after.aaaa.addresses.is_empty());
    assert_eq!(bind.dig(SERVICE, "A").expect("dig"), [NEW_V4]);
    assert!(bind.dig(SERVICE, "AAAA").expect("dig").is_empty());
}

#[test]
fn prerequisite_fails_when_someone_else_changed_the_record() {
    require_root();
    let bind = Bind9::start("prereq").expect("named");
    // Someone else moves the A record behind movarto's back.
    bind.nsupdate(&format!(
        "update delete {SERVICE} A\nupdate add {SERVICE} 300 A 198.51.100.99"
    ))
    .expect("nsupdate");
    assert_eq!(bind.dig(SERVICE, "A").expect("dig"), ["198.51.100.99"]);
    let server = zone_server(&bind, Some(good_key(&bind)));
    let err = bind
        .in_client(|| {
            records::replace_addresses(
                &server,
                &name(SERVICE),
                Some(&[ip(HOME_V4), ip(HOME_V6)]),
                &[ip(NEW_V4), ip(NEW_V6)],
                None,
                Instant::now(),
                VERIFY,
            )
        })
        .expect("the client namespace")
        .expect_err("the prerequisite must fail");
    let dns = dns_error(&err);
    assert!(
        matches!(dns.kind, DnsErrorKind::PrerequisiteFailed { .. }),
        "{err:#}"
    );
    assert!(
        format!("{err:#}").contains("someone else changed them"),
        "{err:#}"
    );
    // Nothing changed, not even the AAAA half of the same update.
    assert_eq!(bind.dig(SERVICE, "A").expect("dig"), ["198.51.100.99"]);
    assert_eq!(bind.dig(SERVICE, "AAAA").expect("dig"), [HOME_V6]);
}

#[test]
fn ttl_is_lowered_before_the_move_and_restored_after() {
    require_root();
    let bind = Bind9::start("ttl").expect("named");
    let key_file = bind.key_file();
    let key_file = key_file.to_str().expect("utf-8");
    let common = ["-s", SERVER_IP, "-z", ZONE, "-k", key_file];

    // Lower: the planned wait is the old TTL; --no-wait skips it.
    let out = cli(
        &bind,
        &[
            &["update", SERVICE, "--ttl", "20", "--no-wait", "--json"][..],
            &common[..],
        ]
        .concat(),
    )
    .expect("lower");
    let json: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(json["planned_wait_secs"], INITIAL_TTL, "{json}");
    assert_eq!(json["waited"], false, "{json}");
    assert_eq!(bind.dig_ttls(SERVICE, "A").expect("dig"), [20]);
    assert_eq!(bind.dig_ttls(SERVICE, "AAAA").expect("dig"), [20]);
    assert_unchanged(&bind);

    // Switch over, keeping the short TTL.
    let out = cli(
        &bind,
        &[
            &["update", SERVICE, "--to", NEW_V4, "--to", NEW_V6][..],
            &common[..],
        ]
        .concat(),
    )
    .expect("switch");
    assert!(out.contains("authoritative answer changed after"), "{out}");
    assert_eq!(bind.dig(SERVICE, "A").expect("dig"), [NEW_V4]);
    assert_eq!(bind.dig_ttls(SERVICE, "A").expect("dig"), [20]);
    assert_eq!(bind.dig_ttls(SERVICE, "AAAA").expect("dig"), [20]);

    // Restore after the drain: raising the TTL needs no wait.
    let out = cli(
        &bind,
        &[&["update", SERVICE, "--ttl", "300"][..], &common[..]].concat(),
    )
    .expect("restore");
    assert!(!out.contains("TTL lowered"), "{out}");
    assert_eq!(bind.dig_ttls(SERVICE, "A").expect("dig"), [300]);
    assert_eq!(bind.dig_ttls(SERVICE, "AAAA").expect("dig"), [300]);
    assert_eq!(bind.dig(SERVICE, "A").expect("dig"), [NEW_V4]);
    assert_eq!(bind.dig(SERVICE, "AAAA").expect("dig"), [NEW_V6]);
}

#[test]
fn nxdomain_timeouts_and_tcp_fallback() {
    require_root();
    let bind = Bind9::start("misc").expect("named");
    let server = zone_server(&bind, Some(good_key(&bind)));

    let err = bind
        .in_client(|| records::show(&server, &name("nothing-here.example.test.")))
        .expect("the client namespace")
        .expect_err("NXDOMAIN");
    assert_eq!(err.kind.code(), "NXDOMAIN", "{err}");
    assert!(err.to_string().contains("does not exist"), "{err}");

    // A zone the server does not serve: the read is refused, and the message says why.
    let elsewhere = ZoneServer::new(bind.server_addr(), name("other.test."), None);
    let err = bind
        .in_client(|| records::show(&elsewhere, &name("svc.other.test.")))
        .expect("the client namespace")
        .expect_err("REFUSED");
    assert_eq!(err.kind.code(), "REFUSED", "{err}");
    assert!(err.to_string().contains("refused the query"), "{err}");
    assert!(err.to_string().contains("zone other.test."), "{err}");

    // Nobody answers at this address.
    let mut silent = ZoneServer::new(
        "192.0.2.99:53".parse().expect("addr"),
        name(ZONE),
        Some(good_key(&bind)),
    );
    silent.timeout = Duration::from_millis(500);
    let started = Instant::now();
    let err = bind
        .in_client(|| records::show(&silent, &name(SERVICE)))
        .expect("the client namespace")
        .expect_err("timeout");
    assert_eq!(err.kind.code(), "TIMEOUT", "{err}");
    assert!(err.to_string().contains("192.0.2.99:53"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(3));

    // 90 A records (BIND 9.18 allows 100 per RRset) do not fit in a 1232-byte UDP answer: the client retries over TCP.
    let adds: Vec<String> = (1..=90)
        .map(|i| format!("update add big.{ZONE} 300 A 198.18.0.{i}"))
        .collect();
    bind.nsupdate(&adds.join("\n")).expect("nsupdate");
    let rrset = bind
        .in_client(|| records::query_rrset(&server, &name(&format!("big.{ZONE}")), RecordType::A))
        .expect("the client namespace")
        .expect("TCP fallback");
    assert_eq!(rrset.addresses.len(), 90);
    let (_, transport) = bind
        .in_client(|| {
            server.exchange_with_transport(
                query_message(&name(&format!("big.{ZONE}")), RecordType::A),
                false,
            )
        })
        .expect("the client namespace")
        .expect("query");
    assert_eq!(transport, Transport::Tcp);
    let (_, transport) = bind
        .in_client(|| {
            server.exchange_with_transport(query_message(&name(SERVICE), RecordType::A), false)
        })
        .expect("the client namespace")
        .expect("query");
    assert_eq!(transport, Transport::Udp);
}

/// How the fake server in [`forged_or_unsigned_responses_are_rejected`] answers.
#[derive(Clone, Copy, Debug)]
enum Forgery {
    /// Signed with the right secret: the control case, accepted.
    Genuine,
    Unsigned,
    WrongSecret,
}

/// A server that answers one signed UPDATE with NOERROR, signed correctly, unsigned, or signed
/// with another secret. movarto believes only the first.
#[test]
fn forged_or_unsigned_responses_are_rejected() {
    use hickory_proto::{
        op::{Message, OpCode},
        rr::{TSigResponseContext, TSigner, rdata::tsig::TsigAlgorithm},
    };
    require_root();
    let bind = Bind9::start("forged").expect("named");
    let real_secret = good_key(&bind).signer().expect("signer").key().to_vec();
    for forgery in [Forgery::Genuine, Forgery::Unsigned, Forgery::WrongSecret] {
        let real_secret = real_secret.clone();
        // Any free port: a fixed one may be among the random ports named opened for
        // its own queries in that namespace.
        let socket = movarto_lab::netns::in_netns(&bind.server_ns, || {
            std::net::UdpSocket::bind((SERVER_IP, 0)).expect("bind fake server")
        })
        .expect("the server namespace");
        let fake_addr = socket.local_addr().expect("the fake server's address");
        socket
            .set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let fake = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            let (len, peer) = socket.recv_from(&mut buf).expect("request");
            let request = Message::from_vec(&buf[..len]).expect("decode request");
            let mut response = Message::response(request.id, OpCode::Update);
            response.queries = request.queries.clone();
            let secret = match forgery {
                Forgery::Genuine => Some(real_secret),
                Forgery::WrongSecret => Some(b"not the secret".to_vec()),
                Forgery::Unsigned => None,
            };
            if let Some(secret) = secret {
                let request_mac = request
                    .signature()
                    .expect("signed request")
                    .data
                    .mac
                    .clone();
                let signer = TSigner::new(
                    secret,
                    TsigAlgorithm::HmacSha256,
                    request.signature().expect("signed").name.clone(),
                    300,
                )
                .expect("signer");
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .expect("clock")
                    .as_secs();
                let tsig = TSigResponseContext::new(request.id, now, signer, request_mac, None)
                    .sign(&response.to_vec().expect("encode"))
                    .expect("sign");
                response.set_signature(tsig);
            }
            socket
                .send_to(&response.to_vec().expect("encode"), peer)
                .expect("reply");
        });
        let mut server = ZoneServer::new(fake_addr, name(ZONE), Some(good_key(&bind)));
        server.timeout = Duration::from_secs(2);
        let change = RrsetChange {
            name: name(SERVICE),
            record_type: RecordType::A,
            current: vec![ip(HOME_V4)],
            new: vec![ip(NEW_V4)],
            ttl: 20,
        };
        let message = update_message(&server.zone, &[change]).expect("message");
        let result = bind
            .in_client(|| server.exchange(message, true))
            .expect("the client namespace");
        fake.join().expect("fake server");
        let want = match forgery {
            Forgery::Genuine => {
                result.expect("a correctly signed answer is accepted");
                continue;
            }
            Forgery::Unsigned => "UNSIGNED_RESPONSE",
            Forgery::WrongSecret => "BAD_RESPONSE_SIGNATURE",
        };
        let err = result.expect_err("a forged answer must not be accepted");
        assert_eq!(err.kind.code(), want, "{forgery:?}: {err}");
        assert!(err.to_string().contains(&fake_addr.to_string()), "{err}");
    }
}

/// A re-run after a crash finds its DNS work done: lowering a TTL that is already low
/// and switching to addresses the name already has succeed at once, without an update
/// (which would change no serial, so its verification would wait for ever).
#[test]
fn an_update_already_applied_is_verified_not_repeated() {
    require_root();
    let bind = Bind9::start("again").expect("named");
    let key_file = bind.key_file();
    let key_file = key_file.to_str().expect("utf-8");
    let common = ["-s", SERVER_IP, "-z", ZONE, "-k", key_file];
    for args in [
        &["update", SERVICE, "--ttl", "20", "--no-wait"][..],
        &["update", SERVICE, "--to", NEW_V4, "--to", NEW_V6][..],
    ] {
        // Before, the second one failed: its verification timed out.
        for attempt in ["first", "again"] {
            cli(&bind, &[args, &common[..]].concat())
                .unwrap_or_else(|e| panic!("{args:?} {attempt}: {e:#}"));
        }
    }
    assert_eq!(bind.dig(SERVICE, "A").expect("dig"), [NEW_V4]);
    assert_eq!(bind.dig(SERVICE, "AAAA").expect("dig"), [NEW_V6]);
    assert_eq!(bind.dig_ttls(SERVICE, "A").expect("dig"), [20]);
}

const SECOND: &str = "shop.example.test.";
const SECOND_HOME: &str = "198.51.100.11";
const SECOND_NEW: &str = "203.0.113.21";

/// An evacuation switches several names of one zone: one UPDATE (the serial moves by
/// one), each RRset still guarded by its own prerequisite; a name someone else changed
/// fails alone, and the others are switched all the same.
#[test]
fn several_names_switch_in_one_update_and_a_changed_one_holds_up_no_other() {
    require_root();
    let bind = Bind9::start("batch").expect("named");
    bind.nsupdate(&format!("update add {SECOND} 300 A {SECOND_HOME}"))
        .expect("nsupdate");
    let server = zone_server(&bind, Some(good_key(&bind)));
    let switch = |n: &str, from: &str, to: &str| records::Switch {
        name: name(n),
        expected: Some(vec![ip(from)]),
        new: vec![ip(to)],
        ttl: None,
    };
    let (serial_before, outcomes, serial_after) = bind
        .in_client(|| {
            let before = records::soa_serial(&server).expect("serial");
            let outcomes = records::replace_many(
                &server,
                &[
                    switch(SERVICE, HOME_V4, NEW_V4),
                    switch(SECOND, SECOND_HOME, SECOND_NEW),
                ],
                Instant::now(),
                VERIFY,
            );
            (
                before,
                outcomes,
                records::soa_serial(&server).expect("serial"),
            )
        })
        .expect("the client namespace");
    for outcome in &outcomes {
        let report = outcome.result.as_ref().expect("switched");
        assert!(outcome.batched, "{}", outcome.name);
        assert_ne!(report.before.serial, report.after.serial);
    }
    assert_eq!(serial_after, serial_before + 1, "one UPDATE, one serial");
    assert_eq!(bind.dig(SERVICE, "A").expect("dig"), [NEW_V4]);
    // AAAA was not named in the switch: left alone.
    assert_eq!(bind.dig(SERVICE, "AAAA").expect("dig"), [HOME_V6]);
    assert_eq!(bind.dig(SECOND, "A").expect("dig"), [SECOND_NEW]);

    // Someone else moves the second name; switching both back: the first goes, the
    // second is refused by its prerequisite and keeps what the other party set.
    bind.nsupdate(&format!(
        "update delete {SECOND} A\nupdate add {SECOND} 300 A 198.51.100.99"
    ))
    .expect("nsupdate");
    let outcomes = bind
        .in_client(|| {
            records::replace_many(
                &server,
                &[
                    switch(SERVICE, NEW_V4, HOME_V4),
                    switch(SECOND, SECOND_NEW, SECOND_HOME),
                ],
                Instant::now(),
                VERIFY,
            )
        })
        .expect("the client namespace");
    let by_name = |n: &str| {
        outcomes
            .iter()
            .find(|o| o.name == name(n))
            .unwrap_or_else(|| panic!("no outcome for {n}"))
    };
    let first = by_name(SERVICE);
    first.result.as_ref().expect("the first name switched");
    assert!(!first.batched, "sent alone after the batch was refused");
    let err = by_name(SECOND).result.as_ref().expect_err("refused");
    assert!(
        matches!(dns_error(err).kind, DnsErrorKind::PrerequisiteFailed { .. }),
        "{err:#}"
    );
    assert_eq!(bind.dig(SERVICE, "A").expect("dig"), [HOME_V4]);
    assert_eq!(bind.dig(SECOND, "A").expect("dig"), ["198.51.100.99"]);
}
