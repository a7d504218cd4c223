//! Moving back before the drain ended, live, with real TCP in network namespaces: the
//! guest starts at A, moves to B (A forwards, B receives), and moves back to A while
//! B still tunnels (A in `return`, B in `forward`). A connection opened to `H` before
//! the first move, one opened to `N` while the guest was at B, and one opened to `H`
//! after the move back all carry checked data after both moves.
//!
//! The guest is one namespace with a link to each site (`eth1` to A's `ga`, `eth0` to
//! B's `vm0`) and `H` on its loopback: it "moves" by switching its default route, so
//! its sockets live on across both moves, as a migrated VM's do.
//!
//! ```text
//! client 198.51.100.7 -- wan -- 203.0.113.1 (TA) site A --ga-- eth1 guest 192.0.2.10 (H)
//!                          \__ 203.0.113.129 (TB) site B --vm0-- eth0 guest
//!                              (198.18.0.10 = N is routed to B)
//! ```

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    thread,
    time::Duration,
};

use movarto_common::{
    config::Mode,
    counters::Counter,
    ids::{MacAddr, SessionToken},
};
use movarto_lab::{
    netns::{Netns, veth},
    triangle::Host,
};
use movarto_tests::{
    require_root,
    site::{Attached, Triangle, attach_in, mac},
};
use movarto_user::datapath::{Pinned, SiteConfig};

const HOME: Ipv4Addr = Triangle::HOME;
const NEW: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 10);
const TA: Ipv4Addr = Triangle::TA;
const TB: Ipv4Addr = Triangle::TB;
const TOKEN: u64 = 0x6261_636b_2074_6f41;
const VM_MAC: [u8; 6] = [0x52, 0x54, 0, 0, 0, 0x2a];
const PORT: u16 = 5001;
const IO_TIMEOUT: Duration = Duration::from_secs(10);

fn service(mode: Mode, local: Ipv4Addr, peer: Ipv4Addr, new: Option<Ipv4Addr>) -> SiteConfig {
    SiteConfig::new(mode, IpAddr::V4(HOME))
        .with_new_addr(new.map(IpAddr::V4))
        .with_tunnel(local, peer, SessionToken(TOKEN))
        .with_tunnel_mtu(1400)
        .with_macs(MacAddr(VM_MAC), MacAddr(Triangle::GW_MAC))
}

/// Rewrites the one service of the site `attached` in `ns` (one map write).
fn reconfigure(ns: &Netns, attached: &Attached, site: &SiteConfig) {
    let _in = ns.enter().expect("enter");
    Pinned::open(&attached.0)
        .and_then(|mut p| p.reconfigure(site))
        .unwrap_or_else(|e| panic!("reconfigure {}: {e:#}", attached.0));
}

/// The guest now runs behind `dev` (its link to one site).
fn guest_runs_behind(guest: &Netns, dev: &str) {
    for args in [
        &["route", "replace", "192.0.2.1", "dev", dev][..],
        &[
            "route",
            "replace",
            "default",
            "via",
            "192.0.2.1",
            "dev",
            dev,
            "onlink",
        ][..],
        &["neigh", "flush", "dev", dev][..],
    ] {
        guest.ip(args).expect("guest route");
    }
}

/// Sends one line on `conn` and expects the guest to echo it.
fn echoed(conn: &TcpStream, line: &str) {
    let mut w = conn;
    writeln!(w, "{line}").unwrap_or_else(|e| panic!("send {line:?}: {e}"));
    let mut answer = String::new();
    BufReader::new(conn)
        .read_line(&mut answer)
        .unwrap_or_else(|e| panic!("echo of {line:?}: {e}"));
    assert_eq!(answer.trim_end(), line, "the guest's echo");
}

fn connect(client: &Netns, to: Ipv4Addr) -> TcpStream {
    let _in = client.enter().expect("enter");
    let conn = TcpStream::connect_timeout(&SocketAddr::from((to, PORT)), IO_TIMEOUT)
        .unwrap_or_else(|e| panic!("connect {to}: {e}"));
    conn.set_read_timeout(Some(IO_TIMEOUT)).expect("timeout");
    conn.set_write_timeout(Some(IO_TIMEOUT)).expect("timeout");
    conn
}

fn drops(site: &Attached) -> Vec<(&'static str, u64)> {
    site.counters()
        .expect("counters")
        .iter()
        .filter(|(k, v)| k.is_drop() && *v != 0)
        .map(|(k, v)| (k.name(), v))
        .collect()
}

#[test]
fn connections_of_both_addresses_survive_a_move_back_before_the_drain_ended() {
    require_root();
    let mut hosts = Triangle::build("mb", VM_MAC, Default::default()).expect("triangle");
    // The guest's second link, to A, and `H` on its loopback (see the module's doc).
    veth(&hosts.guest, "eth1", &hosts.a, "ga").expect("veth");
    for (ns, args) in [
        (
            &hosts.a,
            &["link", "set", "ga", "address", &mac(Triangle::GW_MAC)][..],
        ),
        (&hosts.a, &["addr", "add", "192.0.2.1/24", "dev", "ga"][..]),
        (
            &hosts.guest,
            &["link", "set", "eth1", "address", &mac(VM_MAC)][..],
        ),
        (
            &hosts.guest,
            &["addr", "del", "192.0.2.10/24", "dev", "eth0"][..],
        ),
        (
            &hosts.guest,
            &["addr", "add", "192.0.2.10/32", "dev", "lo"][..],
        ),
        (
            &hosts.wan,
            &["route", "add", "198.18.0.0/24", "via", "203.0.113.129"][..],
        ),
    ] {
        ns.ip(args)
            .unwrap_or_else(|e| panic!("ip {args:?} in {}: {e:#}", ns.name()));
    }
    for key in [
        "net.ipv4.conf.all.rp_filter=0",
        "net.ipv4.conf.eth0.rp_filter=0",
        "net.ipv4.conf.eth1.rp_filter=0",
    ] {
        hosts.guest.run("sysctl", &["-qw", key]).expect("sysctl");
    }
    // XDP turns frames into bytes: no checksum left to offload metadata.
    for (ns, dev) in [
        (&hosts.client, "c0"),
        (&hosts.guest, "eth0"),
        (&hosts.guest, "eth1"),
    ] {
        ns.run("ethtool", &["-K", dev, "tx", "off"])
            .expect("ethtool");
    }
    hosts.pass_through(Host::Wan, &["wa", "wb"]).expect("xdp");
    hosts
        .pass_through(Host::Guest, &["eth0", "eth1"])
        .expect("xdp");
    guest_runs_behind(&hosts.guest, "eth1");

    // The guest echoes every line, on every connection, until EOF.
    let listener = {
        let _in = hosts.guest.enter().expect("enter");
        TcpListener::bind((Ipv4Addr::UNSPECIFIED, PORT)).expect("bind")
    };
    thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            thread::spawn(move || {
                let mut w = &conn;
                for line in BufReader::new(&conn).lines().map_while(Result::ok) {
                    if writeln!(w, "{line}").is_err() {
                        return;
                    }
                }
            });
        }
    });

    // At A, tracked: a connection to H from before the first move.
    let site_a = attach_in(
        &hosts.a,
        &hosts.uplink_a,
        "ga",
        service(Mode::Track, TA, TB, None),
    );
    let pre_move = connect(&hosts.client, HOME);
    echoed(&pre_move, "pre-move, at A");

    // A -> B: B receives (with N), A forwards, the guest runs at B.
    let site_b = attach_in(
        &hosts.b,
        &hosts.uplink_b,
        "vm0",
        service(Mode::Receive, TB, TA, Some(NEW)),
    );
    hosts.prime_tunnel().expect("prime the tunnel");
    reconfigure(&hosts.a, &site_a, &service(Mode::Forward, TA, TB, None));
    guest_runs_behind(&hosts.guest, "eth0");
    echoed(&pre_move, "pre-move, through A's tunnel to B");
    let opened_at_b = connect(&hosts.client, NEW);
    echoed(&opened_at_b, "to N, at B");
    let a_tunnelled = site_a.counters().expect("counters").get(Counter::TunnelOut);
    assert!(a_tunnelled > 0, "A tunnelled the pre-move flow");

    // B -> A before the drain ended: B forwards (keeping N), A takes the VM back.
    reconfigure(
        &hosts.b,
        &site_b,
        &service(Mode::Forward, TB, TA, Some(NEW)),
    );
    reconfigure(&hosts.a, &site_a, &service(Mode::Return, TA, TB, None));
    guest_runs_behind(&hosts.guest, "eth1");
    let b_before = site_b.counters().expect("counters");
    let a_before = site_a.counters().expect("counters");
    echoed(&pre_move, "pre-move, at A again");
    let a_after = site_a.counters().expect("counters");
    assert_eq!(
        a_after.get(Counter::TunnelOut),
        a_before.get(Counter::TunnelOut),
        "A serves its own flow directly again"
    );
    echoed(&opened_at_b, "to N, through B's tunnel back to A");
    let b_after = site_b.counters().expect("counters");
    assert!(
        b_after.get(Counter::TunnelOut) > b_before.get(Counter::TunnelOut),
        "B tunnelled N's flow to A"
    );
    assert!(
        b_after.get(Counter::TunnelIn) > b_before.get(Counter::TunnelIn),
        "A's replies came back through B"
    );
    let after_return = connect(&hosts.client, HOME);
    echoed(&after_return, "new, to H, at A");
    for (conn, what) in [
        (&pre_move, "pre-move"),
        (&opened_at_b, "to N"),
        (&after_return, "new"),
    ] {
        echoed(conn, &format!("{what}: still there"));
    }
    assert_eq!(drops(&site_a), vec![], "A dropped nothing");
    assert_eq!(drops(&site_b), vec![], "B dropped nothing");
    // Fields drop in order: datapaths before the namespaces.
    drop(site_a);
    drop(site_b);
    drop(hosts);
}
