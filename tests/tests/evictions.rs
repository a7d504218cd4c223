//! The flow map's LRU evictions are counted (`flow_evicted`): every flow the
//! datapath created is still in the map, deleted by userspace's sweep
//! (`flow_deleted`) or counted as evicted. Runs a small flow map (256 entries)
//! over capacity with PROG_TEST_RUN.

use std::net::IpAddr;

use etherparse::PacketBuilder;
use movarto_common::{config::Mode, counters::Counter};
use movarto_tests::{BpffsDir, Hook, require_root, run_frame};
use movarto_user::datapath::{Datapath, LoadOptions, Pinned, SiteConfig};

const XDP_PASS: u32 = 2;
const HOME4: [u8; 4] = [192, 0, 2, 10];
const CAPACITY: u32 = 256;

fn tracking(capacity: Option<u32>) -> Datapath {
    let mut dp = Datapath::load_with(&LoadOptions {
        flows_capacity: capacity,
        // One-way datagrams are pending flows: that map is the one measured here.
        pending_flows_capacity: capacity,
        ..LoadOptions::default()
    })
    .expect("load datapath");
    dp.set_config(&SiteConfig::new(Mode::Track, IpAddr::from(HOME4)))
        .expect("config");
    dp
}

/// A UDP datagram from peer 198.18.x.y:`port` to H:53, a flow of its own per (`n`, `port`).
fn datagram(n: u16, port: u16) -> Vec<u8> {
    let [hi, lo] = n.to_be_bytes();
    let mut out = Vec::new();
    PacketBuilder::ethernet2([0x02, 0, 0, 0, 0, 1], [0x02, 0, 0, 0, 0, 2])
        .ipv4([198, 18, hi, lo], HOME4, 64)
        .udp(port, 53)
        .write(&mut out, b"q")
        .expect("build");
    out
}

fn send_flows(dp: &Datapath, range: std::ops::Range<u16>, port: u16) {
    for n in range {
        assert_eq!(
            run_frame(dp, Hook::Uplink, &datagram(n, port)).expect("test run"),
            XDP_PASS
        );
    }
}

fn counters(pinned: &Pinned) -> (u64, u64, u64, u64) {
    let c = pinned.counters().expect("counters");
    (
        c.get(Counter::FlowCreated),
        c.get(Counter::FlowDeleted),
        c.get(Counter::FlowEvicted),
        c.get(Counter::FlowInsertFailed),
    )
}

/// A sweep at time 0 expires nothing (every flow was seen later).
fn bookkeeping(pinned: &mut Pinned) {
    assert!(pinned.sweep(0, 1).expect("sweep").is_empty());
}

#[test]
fn lru_evictions_are_counted_and_deletions_are_not() {
    require_root();
    let mut dp = tracking(Some(CAPACITY));
    let pins = BpffsDir::new("evictions").expect("bpffs dir");
    dp.pin(pins.path()).expect("pin");
    let mut pinned = Pinned::open_at(pins.path()).expect("open pins");

    // A quarter of the capacity: no eviction (the LRU's per-CPU free lists
    // hold at most half of it).
    let quarter = u64::from(CAPACITY / 4);
    send_flows(&dp, 0..quarter as u16, 1000);
    bookkeeping(&mut pinned);
    assert_eq!(counters(&pinned), (quarter, 0, 0, 0));

    // Four times the capacity: the LRU must evict, and every flow created is
    // now either in the map or counted as evicted.
    send_flows(&dp, 0..(4 * CAPACITY) as u16, 2000);
    bookkeeping(&mut pinned);
    let (created, deleted, evicted, failed) = counters(&pinned);
    assert_eq!(
        (created, deleted, failed),
        (quarter + 4 * quarter * 4, 0, 0)
    );
    let present = pinned.flows().expect("flows");
    assert!(
        present.len() <= CAPACITY as usize,
        "{} flows",
        present.len()
    );
    assert!(evicted > 0, "nothing evicted");
    assert_eq!(evicted, created - present.len() as u64);
    // The survivors are the most recent flows: the LRU evicted the oldest.
    assert!(
        present.iter().all(|(k, _)| k.peer_port == 2000u16.to_be()),
        "a flow of the first batch survived four capacities of newer ones"
    );
    eprintln!(
        "created {created}, evicted {evicted}, present {}",
        present.len()
    );

    // Expire everything: the sweep deletes, which is not eviction.
    let swept = pinned.sweep(u64::MAX / 2, 1).expect("sweep");
    assert_eq!(swept.len(), present.len());
    assert!(pinned.flows().expect("flows").is_empty());
    assert_eq!(
        counters(&pinned),
        (created, present.len() as u64, evicted, 0),
        "deleted counts the sweep; evicted unchanged"
    );

    // With room again, new flows evict nothing.
    send_flows(&dp, 0..quarter as u16, 3000);
    bookkeeping(&mut pinned);
    assert_eq!(
        counters(&pinned),
        (created + quarter, present.len() as u64, evicted, 0)
    );
}
