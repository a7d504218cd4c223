//! A SYN flood of new 5-tuples, ten times the flow map's capacity, evicts no
//! established flow and no pre-move flow, before the move (`track`) and during
//! the drain (`forward`), and every eviction it does cause (of its own pending
//! SYNs) is counted on the next read. Before the pending map, the LRU took the
//! oldest entry, which is the idle pre-move connection the drain waits for.
//! Frames run with PROG_TEST_RUN in a network namespace of the test's own (the
//! `forward` path looks up routes; it must not see the host's).

use std::net::IpAddr;

use etherparse::PacketBuilder;
use movarto_common::{
    config::Mode,
    counters::Counter,
    flow::{FlowKey, FlowValue, origin},
    ids::SessionToken,
    net::proto,
};
use movarto_lab::netns::Netns;
use movarto_tests::{BpffsDir, Hook, require_root, run_frame};
use movarto_user::datapath::{Datapath, LoadOptions, Pinned, SiteConfig, flows::monotonic_ns};

const HOME: [u8; 4] = [192, 0, 2, 10];
const CLIENT: [u8; 4] = [198, 51, 100, 7];
const TA: [u8; 4] = [203, 0, 113, 1];
const TB: [u8; 4] = [203, 0, 113, 129];
const CAPACITY: u32 = 256;
const PENDING_CAPACITY: u32 = 64;
const FLOOD: u32 = 10 * CAPACITY;
const MAC_ROUTER: [u8; 6] = [0x02, 0, 0, 0, 0, 0xfe];
const MAC_UPLINK: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const MAC_VM: [u8; 6] = [0x52, 0x54, 0, 0, 0, 0x10];

#[derive(Clone, Copy)]
enum Flags {
    Syn,
    SynAck,
    Ack,
}

fn segment(from_peer: bool, peer: ([u8; 4], u16), flags: Flags, payload: &[u8]) -> Vec<u8> {
    let builder = if from_peer {
        PacketBuilder::ethernet2(MAC_ROUTER, MAC_UPLINK)
            .ipv4(peer.0, HOME, 64)
            .tcp(peer.1, 80, 1000, 64240)
    } else {
        PacketBuilder::ethernet2(MAC_VM, MAC_UPLINK)
            .ipv4(HOME, peer.0, 64)
            .tcp(80, peer.1, 5000, 64240)
    };
    let builder = match flags {
        Flags::Syn => builder.syn(),
        Flags::SynAck => builder.syn().ack(1001),
        Flags::Ack => builder.ack(5001),
    };
    let mut out = Vec::new();
    builder.write(&mut out, payload).expect("build");
    out
}

fn key(peer: ([u8; 4], u16)) -> FlowKey {
    FlowKey::new(
        (IpAddr::from(HOME), 80),
        (IpAddr::from(peer.0), peer.1),
        proto::TCP,
    )
    .expect("one family")
}

/// The `n`th flooding client: spoofed, distinct 5-tuples from 198.18.0.0/15.
fn flooder(n: u32) -> ([u8; 4], u16) {
    let [_, _, c, d] = n.to_be_bytes();
    ([198, 18, c, d], 1024 + (n >> 16) as u16)
}

fn flood(dp: &Datapath, first: u32) {
    for n in first..first + FLOOD {
        let frame = segment(true, flooder(n), Flags::Syn, &[]);
        run_frame(dp, Hook::Uplink, &frame).expect("test run");
    }
}

fn find(flows: &[(FlowKey, FlowValue)], key: &FlowKey) -> Option<FlowValue> {
    flows.iter().find(|(k, _)| k == key).map(|(_, v)| *v)
}

/// The pre-move connection is there, confirmed, and holds the drain.
/// At least `min_evicted` evictions (of the flood's SYNs) are counted.
fn assert_premove_flow_kept(pinned: &mut Pinned, premove: &FlowKey, when: &str, min_evicted: u64) {
    let (flows, counters) = pinned.read_now().expect("read flows and counters");
    let flow = find(&flows, premove)
        .unwrap_or_else(|| panic!("{when}: the flood evicted the pre-move connection"));
    assert_eq!(flow.origin, origin::TRACKED, "{when}");
    assert!(flow.is_confirmed(), "{when}: {flow:?}");
    let idle = monotonic_ns()
        .expect("clock")
        .saturating_sub(flow.last_seen_ns);
    assert!(flow.holds_drain(proto::TCP, idle), "{when}: {flow:?}");
    assert_eq!(
        counters.get(Counter::FlowEvictedConfirmed),
        0,
        "{when}: a confirmed flow was evicted"
    );
    // Every flow created is present, deleted or counted as evicted, now, not at
    // some later sweep.
    let created = counters.get(Counter::FlowCreated) + counters.get(Counter::FlowInserted);
    let gone = counters.get(Counter::FlowDeleted) + counters.get(Counter::FlowEvicted);
    assert_eq!(created, gone + flows.len() as u64, "{when}: {counters:?}");
    assert!(
        counters.get(Counter::FlowEvicted) >= min_evicted,
        "{when}: evictions not counted: {}",
        counters.get(Counter::FlowEvicted)
    );
}

#[test]
fn a_syn_flood_evicts_no_established_flow_before_or_during_the_drain() {
    require_root();
    let ns = Netns::new("flood").expect("netns");
    let _in = ns.enter().expect("enter netns");
    let mut dp = Datapath::load_with(&LoadOptions {
        flows_capacity: Some(CAPACITY),
        pending_flows_capacity: Some(PENDING_CAPACITY),
        ..LoadOptions::default()
    })
    .expect("load");
    let site = |mode| {
        SiteConfig::new(mode, IpAddr::from(HOME)).with_tunnel(
            TA.into(),
            TB.into(),
            SessionToken(0x5eed),
        )
    };
    dp.set_config(&site(Mode::Track)).expect("track");
    let pins = BpffsDir::new("syn-flood").expect("bpffs");
    dp.pin(pins.path()).expect("pin");
    let mut pinned = Pinned::open_at(pins.path()).expect("pins");

    // The pre-move connection: a full handshake, then a request and its answer.
    let client = (CLIENT, 40000);
    run_frame(&dp, Hook::Uplink, &segment(true, client, Flags::Syn, &[])).expect("syn");
    let before = pinned.counters().expect("counters");
    assert_eq!(before.get(Counter::FlowCreated), 1);
    assert_eq!(
        before.get(Counter::FlowConfirmed),
        0,
        "a SYN is not confirmed"
    );
    run_frame(
        &dp,
        Hook::VmFacing,
        &segment(false, client, Flags::SynAck, &[]),
    )
    .expect("syn-ack");
    run_frame(
        &dp,
        Hook::Uplink,
        &segment(true, client, Flags::Ack, b"GET"),
    )
    .expect("ack");
    run_frame(
        &dp,
        Hook::VmFacing,
        &segment(false, client, Flags::Ack, b"200"),
    )
    .expect("reply");
    let counters = pinned.counters().expect("counters");
    assert_eq!(
        counters.get(Counter::FlowConfirmed),
        1,
        "the handshake confirms it"
    );
    let premove = key(client);
    assert_premove_flow_kept(&mut pinned, &premove, "after the handshake", 0);

    // Ten times the capacity of new SYNs: they only churn the pending map.
    flood(&dp, 0);
    assert_premove_flow_kept(
        &mut pinned,
        &premove,
        "after a flood in track",
        u64::from(FLOOD - PENDING_CAPACITY),
    );

    // The move: A forwards, and the drain watches the same map.
    dp.set_config(&site(Mode::Forward)).expect("forward");
    flood(&dp, FLOOD);
    assert_premove_flow_kept(
        &mut pinned,
        &premove,
        "after a flood during the drain",
        u64::from(2 * FLOOD - PENDING_CAPACITY),
    );

    // The connection still moves data through A, and stays.
    run_frame(
        &dp,
        Hook::Uplink,
        &segment(true, client, Flags::Ack, b"more"),
    )
    .expect("data");
    let flows = pinned.flows().expect("flows");
    let flow = find(&flows, &premove).expect("kept");
    assert_eq!(flow.packets_from_peer, 3, "{flow:?}");
}

#[test]
fn a_handed_over_snapshot_keeps_handshakes_out_of_the_confirmed_map() {
    require_root();
    let dp = Datapath::load_with(&LoadOptions {
        flows_capacity: Some(CAPACITY),
        pending_flows_capacity: Some(PENDING_CAPACITY),
        ..LoadOptions::default()
    })
    .expect("load");
    let mut dp = dp;
    let pins = BpffsDir::new("snapshot-split").expect("bpffs");
    dp.pin(pins.path()).expect("pin");
    let mut pinned = Pinned::open_at(pins.path()).expect("pins");
    let now = monotonic_ns().expect("clock");
    let established = FlowValue {
        first_seen_ns: now,
        last_seen_ns: now,
        state: movarto_common::flow::state::ESTABLISHED
            | movarto_common::flow::state::SEEN_FROM_PEER
            | movarto_common::flow::state::SEEN_FROM_SERVICE,
        origin: origin::TRACKED,
        ..FlowValue::default()
    };
    let handshake = FlowValue {
        state: movarto_common::flow::state::SYN_SEEN | movarto_common::flow::state::SEEN_FROM_PEER,
        ..established
    };
    // More handshakes than the pending map holds: they may evict each other, never
    // the established flow.
    let mut snapshot = vec![(key((CLIENT, 40000)), established)];
    snapshot.extend((0..CAPACITY * 2).map(|n| (key(flooder(n)), handshake)));
    pinned.insert_flows(&snapshot).expect("insert");
    let (flows, counters) = pinned.read_now().expect("read");
    assert!(find(&flows, &key((CLIENT, 40000))).is_some());
    assert_eq!(counters.get(Counter::FlowInserted), snapshot.len() as u64);
    assert_eq!(counters.get(Counter::FlowInsertedConfirmed), 1);
    assert_eq!(counters.get(Counter::FlowEvictedConfirmed), 0);
    assert_eq!(
        counters.get(Counter::FlowEvicted),
        snapshot.len() as u64 - flows.len() as u64
    );
    assert!(
        flows.len() as u32 <= 1 + PENDING_CAPACITY,
        "{}",
        flows.len()
    );
}
