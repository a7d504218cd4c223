//! Many services on one uplink, under BPF_PROG_TEST_RUN: each is found by its own
//! address, verified against its own peer and token, and counted on its own row;
//! a packet of no service is passed with the lookups as its only cost. Root only;
//! nothing here routes, so no namespace is built.

use std::net::{IpAddr, Ipv4Addr};

use etherparse::PacketBuilder;
use movarto_common::{
    config::{Config, Mode},
    counters::Counter,
    gue::{OuterV4, encapsulate_v4},
    ids::{MacAddr, SessionToken},
    service::SERVICES_DEFAULT_CAPACITY,
};
use movarto_tests::{Hook, assert_counter_delta, require_root, run_frame_out};
use movarto_user::datapath::{CounterSnapshot, Datapath, SiteConfig};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_REDIRECT: u32 = 4;

/// This node (site B of two services, site A of a third).
const LOCAL: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 2);
/// The peers: X's old site, Y's old site.
const PEER_X: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
const PEER_Y: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 3);
const TOKEN_X: u64 = 0x0101_0101_0101_0101;
const TOKEN_Y: u64 = 0x0202_0202_0202_0202;
const HOME_X: [u8; 4] = [192, 0, 2, 10];
const HOME_Y: [u8; 4] = [192, 0, 2, 20];
/// A service this node is the source of, in `track`.
const HOME_Z: [u8; 4] = [192, 0, 2, 30];
/// Another tenant's address, in no map.
const NEIGHBOUR: [u8; 4] = [192, 0, 2, 99];
const NEW_X: [u8; 4] = [198, 18, 0, 10];
const NEW_Y: [u8; 4] = [198, 18, 0, 20];
const CLIENT: [u8; 4] = [198, 51, 100, 7];
const UPLINK_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xa1];
const WAN_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xfe];
const GW_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];

fn service(
    mode: Mode,
    home: [u8; 4],
    new: Option<[u8; 4]>,
    peer: Ipv4Addr,
    token: u64,
    vm: u8,
) -> SiteConfig {
    let mut site = SiteConfig::new(mode, IpAddr::from(home))
        .with_new_addr(new.map(IpAddr::from))
        .with_tunnel(LOCAL, peer, SessionToken(token))
        .with_macs(MacAddr([0x52, 0x54, 0, 0, 0, vm]), MacAddr(GW_MAC));
    site.vm_ifindex = 7 + u32::from(vm);
    site
}

/// X and Y arriving (`receive`), each from its own peer with its own token, and Z
/// leaving (`track`): a node that is the destination of two moves and the source of
/// a third at once.
fn node() -> (Datapath, [Config; 3]) {
    let mut dp = Datapath::load().expect("load datapath");
    let x = service(Mode::Receive, HOME_X, Some(NEW_X), PEER_X, TOKEN_X, 1);
    dp.set_uplink(&x.to_map().expect("map")).expect("uplink");
    let mut table = dp.services_mut().expect("services");
    let added = [
        table.add(x.to_map().expect("x")).expect("add x"),
        table
            .add(
                service(Mode::Receive, HOME_Y, Some(NEW_Y), PEER_Y, TOKEN_Y, 2)
                    .to_map()
                    .expect("y"),
            )
            .expect("add y"),
        table
            .add(
                service(Mode::Track, HOME_Z, None, Ipv4Addr::UNSPECIFIED, 0, 3)
                    .to_map()
                    .expect("z"),
            )
            .expect("add z"),
    ];
    (dp, added)
}

fn tcp(src: [u8; 4], dst: [u8; 4], payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    PacketBuilder::ipv4(src, dst, 64)
        .tcp(40000, 80, 1, 64240)
        .ack(1)
        .write(&mut out, payload)
        .expect("build");
    out
}

fn ethernet(ip: &[u8]) -> Vec<u8> {
    let mut frame = Vec::new();
    frame.extend_from_slice(&UPLINK_MAC);
    frame.extend_from_slice(&WAN_MAC);
    frame.extend_from_slice(&0x0800u16.to_be_bytes());
    frame.extend_from_slice(ip);
    frame
}

/// GUE from `src` to this node with `token`, carrying `inner`.
fn gue(src: Ipv4Addr, token: u64, inner: &[u8]) -> Vec<u8> {
    let outer = OuterV4 {
        src,
        dst: LOCAL,
        src_port: 50000,
        dst_port: 6080,
    };
    ethernet(&encapsulate_v4(&outer, token, inner))
}

fn row(dp: &Datapath, config: &Config) -> CounterSnapshot {
    dp.services()
        .expect("services")
        .counters(config.slot)
        .expect("row")
}

/// Runs `frame` on the uplink; asserts the verdict, that the global counters moved by
/// exactly `global` (besides `packets`) and each service's row by its own list.
fn run(
    dp: &Datapath,
    services: &[Config],
    frame: &[u8],
    want: u32,
    global: &[(Counter, u64)],
    rows: &[&[(Counter, u64)]],
) -> Vec<u8> {
    let before = dp.counters().expect("counters");
    let rows_before: Vec<_> = services.iter().map(|s| row(dp, s)).collect();
    let (ret, out) = run_frame_out(dp, Hook::Uplink, frame).expect("test run");
    assert_eq!(ret, want, "return value");
    let mut all = vec![(Counter::Packets, 1)];
    all.extend_from_slice(global);
    assert_counter_delta(&before, &dp.counters().expect("counters"), &all);
    for ((service, was), expected) in services.iter().zip(&rows_before).zip(rows) {
        assert_counter_delta(was, &row(dp, service), expected);
    }
    out
}

#[test]
fn gue_from_one_services_peer_cannot_inject_packets_for_another() {
    require_root();
    let (dp, services) = node();
    // X's peer with X's token, for X: unwrapped and delivered, on X's row only.
    let for_x = tcp(CLIENT, HOME_X, b"for x");
    let out = run(
        &dp,
        &services,
        &gue(PEER_X, TOKEN_X, &for_x),
        XDP_REDIRECT,
        &[
            (Counter::L4Udp, 1),
            (Counter::TunnelIn, 1),
            (Counter::FlowCreated, 1),
        ],
        &[&[(Counter::TunnelIn, 1)], &[], &[]],
    );
    assert_eq!(&out[14..], &for_x[..]);
    assert_eq!(&out[..6], &[0x52, 0x54, 0, 0, 0, 1], "to X's VM");
    // The same peer and token carrying a packet for Y: dropped, on Y's row.
    let for_y = tcp(CLIENT, HOME_Y, b"injected");
    let frame = gue(PEER_X, TOKEN_X, &for_y);
    let out = run(
        &dp,
        &services,
        &frame,
        XDP_DROP,
        &[(Counter::L4Udp, 1), (Counter::DropGueWrongService, 1)],
        &[&[], &[(Counter::DropGueWrongService, 1)], &[]],
    );
    assert_eq!(out, frame, "dropped as it came");
    // Y's token does not help X's peer either, nor X's token Y's peer.
    for (peer, token) in [(PEER_X, TOKEN_Y), (PEER_Y, TOKEN_X)] {
        let wanted = if peer == PEER_X {
            Counter::DropGueWrongService
        } else {
            Counter::DropGueBadToken
        };
        run(
            &dp,
            &services,
            &gue(peer, token, &for_y),
            XDP_DROP,
            &[(Counter::L4Udp, 1), (wanted, 1)],
            &[&[], &[(wanted, 1)], &[]],
        );
    }
    // Y's own peer and token: delivered to Y's VM.
    let out = run(
        &dp,
        &services,
        &gue(PEER_Y, TOKEN_Y, &for_y),
        XDP_REDIRECT,
        &[
            (Counter::L4Udp, 1),
            (Counter::TunnelIn, 1),
            (Counter::FlowCreated, 1),
        ],
        &[&[], &[(Counter::TunnelIn, 1)], &[]],
    );
    assert_eq!(&out[..6], &[0x52, 0x54, 0, 0, 0, 2], "to Y's VM");
    // A peer's GUE for the node's source-side service (track: it tunnels nothing).
    run(
        &dp,
        &services,
        &gue(PEER_X, TOKEN_X, &tcp(CLIENT, HOME_Z, b"z")),
        XDP_DROP,
        &[(Counter::L4Udp, 1), (Counter::DropGueWrongService, 1)],
        &[&[], &[], &[]],
    );
}

#[test]
fn each_service_is_served_in_its_own_mode_and_neighbours_are_untouched() {
    require_root();
    let (dp, services) = node();
    // To Y's N: DNATed to Y's H and delivered to Y's VM.
    let out = run(
        &dp,
        &services,
        &ethernet(&tcp(CLIENT, NEW_Y, b"to n")),
        XDP_REDIRECT,
        &[
            (Counter::L4Tcp, 1),
            (Counter::NatIn, 1),
            (Counter::FlowCreated, 1),
        ],
        &[&[], &[(Counter::NatIn, 1)], &[]],
    );
    assert_eq!(&out[14 + 16..14 + 20], &HOME_Y, "rewritten to Y's H");
    // To Z, which this node is the source of: tracked and passed.
    run(
        &dp,
        &services,
        &ethernet(&tcp(CLIENT, HOME_Z, b"to z")),
        XDP_PASS,
        &[
            (Counter::L4Tcp, 1),
            (Counter::PassIpv4, 1),
            (Counter::FlowCreated, 1),
        ],
        &[&[], &[], &[(Counter::PassIpv4, 1)]],
    );
    assert_eq!(dp.flows().expect("flows").len(), 2);
    // Another tenant's packet: passed byte for byte, on no service's row, no flow.
    let frame = ethernet(&tcp(CLIENT, NEIGHBOUR, b"not ours"));
    let out = run(
        &dp,
        &services,
        &frame,
        XDP_PASS,
        &[(Counter::L4Tcp, 1), (Counter::PassIpv4, 1)],
        &[&[], &[], &[]],
    );
    assert_eq!(out, frame);
    assert_eq!(dp.flows().expect("flows").len(), 2);
    // GUE from a stranger is not this node's tunnel.
    run(
        &dp,
        &services,
        &gue(
            Ipv4Addr::new(203, 0, 113, 66),
            TOKEN_X,
            &tcp(CLIENT, HOME_X, b"x"),
        ),
        XDP_PASS,
        &[(Counter::L4Udp, 1), (Counter::PassGueForeignSource, 1)],
        &[&[], &[], &[]],
    );
    // From Y's VM (TC): one verdict on Y's row (its tunnel, which has no route
    // under PROG_TEST_RUN), none on X's.
    let x_before = row(&dp, &services[0]);
    let y_before = row(&dp, &services[1]);
    run_frame_out(&dp, Hook::VmFacing, &ethernet(&tcp(HOME_Y, CLIENT, b"r"))).expect("tc run");
    assert_counter_delta(&x_before, &row(&dp, &services[0]), &[]);
    let y_after = row(&dp, &services[1]);
    let on_y = verdicts(&y_after) - verdicts(&y_before);
    assert_eq!(on_y, 1, "{:?}", y_after.nonzero());
}

#[test]
fn a_service_changes_mode_without_touching_the_others_and_goes_away_whole() {
    require_root();
    let (mut dp, services) = node();
    let mut table = dp.services_mut().expect("services");
    let mut z = services[2];
    z.mode = Mode::Idle as u8;
    table.set(z).expect("set z");
    // N of X may not be taken by another service, nor H of one be another's N.
    let mut clash = services[1];
    clash.new_addr = services[0].new_addr;
    let err = table.set(clash).expect_err("N taken");
    assert!(
        format!("{err:#}").contains("new address of service 192.0.2.10"),
        "{err:#}"
    );
    let err = table.add(services[0]).expect_err("H served");
    assert!(format!("{err:#}").contains("exists already"), "{err:#}");
    table.remove(IpAddr::from(HOME_X)).expect("remove x");
    // X is gone whole: its N is nobody's, its peer no longer tunnels here.
    run(
        &dp,
        &services[1..],
        &ethernet(&tcp(CLIENT, NEW_X, b"x's old n")),
        XDP_PASS,
        &[(Counter::L4Tcp, 1), (Counter::PassIpv4, 1)],
        &[&[], &[]],
    );
    run(
        &dp,
        &services[1..],
        &gue(PEER_X, TOKEN_X, &tcp(CLIENT, HOME_X, b"x")),
        XDP_PASS,
        &[(Counter::L4Udp, 1), (Counter::PassGueForeignSource, 1)],
        &[&[], &[]],
    );
    // Z in idle: passed, counted on its row, no flow.
    let flows = dp.flows().expect("flows").len();
    run(
        &dp,
        &services[1..],
        &ethernet(&tcp(CLIENT, HOME_Z, b"z")),
        XDP_PASS,
        &[(Counter::L4Tcp, 1), (Counter::PassIpv4, 1)],
        &[&[], &[(Counter::PassIpv4, 1)]],
    );
    assert_eq!(dp.flows().expect("flows").len(), flows);
    // Y still works as before.
    run(
        &dp,
        &services[1..],
        &gue(PEER_Y, TOKEN_Y, &tcp(CLIENT, HOME_Y, b"y")),
        XDP_REDIRECT,
        &[
            (Counter::L4Udp, 1),
            (Counter::TunnelIn, 1),
            (Counter::FlowCreated, 1),
        ],
        &[&[(Counter::TunnelIn, 1)], &[]],
    );
}

/// The 16-bit index `i` as a service address in 198.18.0.0/15 and its N in
/// 198.19.0.0/16.
fn numbered(i: u32) -> ([u8; 4], [u8; 4]) {
    let [_, _, hi, lo] = i.to_be_bytes();
    ([198, 18, hi, lo], [198, 19, hi, lo])
}

/// The peer of numbered service `i`: one of 250 in 203.0.113.0/24 (never `LOCAL`).
fn peer_of(i: u32) -> Ipv4Addr {
    Ipv4Addr::new(203, 0, 113, 3 + (i % 250) as u8)
}

#[test]
fn a_full_services_map_refuses_the_next_service_and_still_serves_every_one() {
    require_root();
    let capacity = SERVICES_DEFAULT_CAPACITY;
    assert!(capacity >= 4096);
    let mut dp = Datapath::load().expect("load datapath");
    let first = service(Mode::Receive, [198, 18, 0, 0], None, PEER_X, TOKEN_X, 1);
    dp.set_uplink(&first.to_map().expect("map"))
        .expect("uplink");
    let mut table = dp.services_mut().expect("services");
    assert_eq!(table.capacity, capacity);
    // Many peers, each with several services: PEERS counts its users.
    let all = (0..capacity).map(|i| {
        let (home, new) = numbered(i);
        service(
            Mode::Receive,
            home,
            Some(new),
            peer_of(i),
            u64::from(i) + 1,
            1,
        )
        .to_map()
        .expect("map")
    });
    let added = table.add_all(all).expect("4096 services");
    assert_eq!(added.len(), capacity as usize);
    // Each its own row of counters.
    let mut slots: Vec<u32> = added.iter().map(|c| c.slot).collect();
    slots.sort_unstable();
    slots.dedup();
    assert_eq!(slots.len(), capacity as usize);
    let (home, new) = numbered(capacity);
    let err = table
        .add(
            service(Mode::Receive, home, Some(new), PEER_X, 7, 1)
                .to_map()
                .expect("map"),
        )
        .expect_err("full");
    let text = format!("{err:#}");
    assert!(text.contains("the services map is full"), "{text}");
    assert!(text.contains(&capacity.to_string()), "{text}");
    assert_eq!(table.list().expect("list").len(), capacity as usize);
    let last = table
        .get(IpAddr::from(numbered(capacity - 1).0))
        .expect("get")
        .expect("last");
    // With the map full, the last service's NAT and tunnel still work, the refused
    // one's address is nobody's.
    let services = [last];
    let (home_last, new_last) = numbered(capacity - 1);
    let out = run(
        &dp,
        &services,
        &ethernet(&tcp(CLIENT, new_last, b"n")),
        XDP_REDIRECT,
        &[
            (Counter::L4Tcp, 1),
            (Counter::NatIn, 1),
            (Counter::FlowCreated, 1),
        ],
        &[&[(Counter::NatIn, 1)]],
    );
    assert_eq!(&out[14 + 16..14 + 20], &home_last);
    let peer_last = peer_of(capacity - 1);
    run(
        &dp,
        &services,
        &gue(
            peer_last,
            u64::from(capacity),
            &tcp(CLIENT, home_last, b"t"),
        ),
        XDP_REDIRECT,
        // The same 5-tuple as the NAT flow above: no new flow.
        &[(Counter::L4Udp, 1), (Counter::TunnelIn, 1)],
        &[&[(Counter::TunnelIn, 1)]],
    );
    run(
        &dp,
        &services,
        &ethernet(&tcp(CLIENT, new, b"refused")),
        XDP_PASS,
        &[(Counter::L4Tcp, 1), (Counter::PassIpv4, 1)],
        &[&[]],
    );
    // Removed one by one, the maps empty; a new service then fits again.
    let mut table = dp.services_mut().expect("services");
    for i in 0..capacity {
        table
            .remove(IpAddr::from(numbered(i).0))
            .unwrap_or_else(|e| panic!("remove {i}: {e:#}"));
    }
    assert!(table.list().expect("list").is_empty());
    table
        .add(
            service(Mode::Receive, home, Some(new), PEER_X, 7, 1)
                .to_map()
                .expect("map"),
        )
        .expect("fits again");
}

/// The sum of every counter in a row, for "one verdict here, none there".
fn verdicts(snapshot: &CounterSnapshot) -> u64 {
    snapshot.iter().map(|(_, v)| v).sum()
}

#[test]
fn the_address_filter_follows_every_change_of_a_services_addresses() {
    require_root();
    let (mut dp, services) = node();
    // 198.19.0.11 folds to the filter bucket of X's N (198.18.0.10): both 0xc618.
    const SHARES_XS_BUCKET: [u8; 4] = [198, 19, 0, 11];
    let mut y = services[1];
    let (bytes, _) = movarto_common::net::addr::to_map(IpAddr::from(SHARES_XS_BUCKET));
    y.new_addr = bytes;
    dp.services_mut()
        .expect("services")
        .set(y)
        .expect("move y's n");
    // Y's old N is nobody's now; its new one is served.
    run(
        &dp,
        &services,
        &ethernet(&tcp(CLIENT, NEW_Y, b"old n")),
        XDP_PASS,
        &[(Counter::L4Tcp, 1), (Counter::PassIpv4, 1)],
        &[&[], &[], &[]],
    );
    run(
        &dp,
        &services,
        &ethernet(&tcp(CLIENT, SHARES_XS_BUCKET, b"new n")),
        XDP_REDIRECT,
        &[
            (Counter::L4Tcp, 1),
            (Counter::NatIn, 1),
            (Counter::FlowCreated, 1),
        ],
        &[&[], &[(Counter::NatIn, 1)], &[]],
    );
    // Y goes: its N is passed, and X's, in the same bucket, is still served.
    dp.services_mut()
        .expect("services")
        .remove(IpAddr::from(HOME_Y))
        .expect("remove y");
    let left = [services[0], services[2]];
    run(
        &dp,
        &left,
        &ethernet(&tcp(CLIENT, SHARES_XS_BUCKET, b"gone")),
        XDP_PASS,
        &[(Counter::L4Tcp, 1), (Counter::PassIpv4, 1)],
        &[&[], &[]],
    );
    run(
        &dp,
        &left,
        &ethernet(&tcp(CLIENT, NEW_X, b"x stays")),
        XDP_REDIRECT,
        &[
            (Counter::L4Tcp, 1),
            (Counter::NatIn, 1),
            (Counter::FlowCreated, 1),
        ],
        &[&[(Counter::NatIn, 1)], &[]],
    );
}

#[test]
fn a_peers_gue_finds_a_forwarding_service_by_its_inner_source_whatever_else_the_peer_serves() {
    require_root();
    let (mut dp, services) = node();
    // W left this node for X's peer: in `forward`, so that peer now serves one
    // service of each role here.
    const HOME_W: [u8; 4] = [192, 0, 2, 40];
    const TOKEN_W: u64 = 0x0404_0404_0404_0404;
    let w = dp
        .services_mut()
        .expect("services")
        .add(
            service(Mode::Forward, HOME_W, None, PEER_X, TOKEN_W, 4)
                .to_map()
                .expect("w"),
        )
        .expect("add w");
    let reply = gue(PEER_X, TOKEN_W, &tcp(HOME_W, CLIENT, b"w's reply"));
    let unwrapped_for_w_only = |dp: &Datapath, others: &[Config]| {
        let w_before = row(dp, &w);
        let others_before: Vec<_> = others.iter().map(|s| row(dp, s)).collect();
        run_frame_out(dp, Hook::Uplink, &reply).expect("test run");
        // One verdict on W's row (the reply is routed out, or has no route under
        // PROG_TEST_RUN), none on another's: it was found as W's.
        assert_eq!(verdicts(&row(dp, &w)) - verdicts(&w_before), 1);
        for (s, was) in others.iter().zip(&others_before) {
            assert_counter_delta(was, &row(dp, s), &[]);
        }
        assert_eq!(row(dp, &w).get(Counter::DropGueWrongService), 0);
    };
    unwrapped_for_w_only(&dp, &services);
    // Once X is gone the peer has only W, a forwarding service: the same packet is
    // found by its source first, with the same result.
    dp.services_mut()
        .expect("services")
        .remove(IpAddr::from(HOME_X))
        .expect("remove x");
    unwrapped_for_w_only(&dp, &services[1..]);
    // X's packets from that peer are no service's now.
    let before = row(&dp, &w);
    let (ret, _) = run_frame_out(
        &dp,
        Hook::Uplink,
        &gue(PEER_X, TOKEN_X, &tcp(CLIENT, HOME_X, b"x")),
    )
    .expect("test run");
    assert_eq!(ret, XDP_DROP);
    assert_counter_delta(&before, &row(&dp, &w), &[]);
}
