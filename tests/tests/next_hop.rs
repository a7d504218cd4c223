//! What the agent asks rtnetlink: the tunnel's next hop toward the peer (the route's
//! gateway) counts as resolved only once its own neighbour entry is, whatever else the
//! uplink's neighbour table holds; an interface's MAC for the gratuitous ARP; and the
//! VM's tap (TUNSETIFF, then rtnetlink for its MAC and the gateway's address).

use std::{
    net::{Ipv4Addr, UdpSocket},
    time::Duration,
};

use movarto_lab::netns::{Netns, veth};
use movarto_tests::require_root;
use movarto_user::{
    agent::{
        netlink::{self, NextHop},
        tap,
    },
    datapath::ifindex,
};

const SITE: &str = "198.51.100.2/24";
const ROUTER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
/// A neighbour on the site's segment that has nothing to do with the tunnel.
const UNRELATED: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 99);
const PEER: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 2);

/// site (eth0) -- (eth0) router (eth1) -- (eth0) peer.
struct Topology {
    site: Netns,
    _router: Netns,
    _peer: Netns,
}

fn topology() -> Topology {
    let site = Netns::new("nh-site").expect("netns");
    let router = Netns::new("nh-rtr").expect("netns");
    let peer = Netns::new("nh-peer").expect("netns");
    veth(&site, "eth0", &router, "eth0").expect("veth");
    veth(&router, "eth1", &peer, "eth0").expect("veth");
    site.ip(&["link", "set", "eth0", "address", "02:00:00:00:00:0a"])
        .expect("mac");
    site.ip(&["addr", "add", SITE, "dev", "eth0"])
        .expect("addr");
    site.ip(&["route", "add", "default", "via", "198.51.100.1"])
        .expect("route");
    router
        .ip(&["addr", "add", "198.51.100.1/24", "dev", "eth0"])
        .expect("addr");
    router
        .ip(&["addr", "add", "203.0.113.1/24", "dev", "eth1"])
        .expect("addr");
    router
        .run("sysctl", &["-qw", "net.ipv4.ip_forward=1"])
        .expect("forwarding");
    peer.ip(&["addr", "add", "203.0.113.2/24", "dev", "eth0"])
        .expect("addr");
    peer.ip(&["route", "add", "default", "via", "203.0.113.1"])
        .expect("route");
    Topology {
        site,
        _router: router,
        _peer: peer,
    }
}

#[test]
fn only_the_peers_own_next_hop_counts_as_resolved() {
    require_root();
    let t = topology();
    // A complete entry on the uplink that is not the next hop: the old rule (any complete
    // ARP entry on the uplink) took it for the tunnel's next hop.
    t.site
        .ip(&[
            "neigh",
            "add",
            "198.51.100.99",
            "lladdr",
            "02:00:00:00:00:99",
            "dev",
            "eth0",
            "nud",
            "permanent",
        ])
        .expect("neighbour");
    let arp = t.site.run("cat", &["/proc/net/arp"]).expect("arp");
    assert!(
        arp.lines()
            .any(|l| l.starts_with(&UNRELATED.to_string()) && l.contains("0x6")),
        "{arp}"
    );

    let _in = t.site.enter().expect("enter");
    let eth0 = ifindex("eth0").expect("ifindex");
    let via_router = NextHop {
        addr: ROUTER,
        ifindex: eth0,
    };
    assert_eq!(
        netlink::next_hop(PEER).expect("next hop"),
        (via_router, false),
        "an unrelated resolved neighbour must not count"
    );

    let socket = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).expect("udp");
    socket.send_to(b"prime", (PEER, 9)).expect("send");
    assert_eq!(
        netlink::wait_for_next_hop(PEER, Duration::from_secs(5)).expect("next hop"),
        (via_router, true),
        "the route's gateway resolves once something is sent toward the peer"
    );

    // A destination on the segment is its own next hop.
    assert_eq!(
        netlink::next_hop(ROUTER).expect("next hop"),
        (via_router, true)
    );
    assert_eq!(
        netlink::next_hop(UNRELATED).expect("next hop"),
        (
            NextHop {
                addr: UNRELATED,
                ifindex: eth0
            },
            true
        )
    );
}

#[test]
fn the_mac_of_an_interface_comes_from_its_namespace() {
    require_root();
    let t = topology();
    let _in = t.site.enter().expect("enter");
    assert_eq!(netlink::mac_of("eth0").expect("mac"), [2, 0, 0, 0, 0, 0x0a]);
    let err = netlink::mac_of("nonexistent0").expect_err("no such interface");
    assert!(format!("{err:#}").contains("nonexistent0"), "{err:#}");
}

#[test]
fn the_tap_is_created_once_with_the_gateway_and_deleted() {
    require_root();
    let ns = Netns::new("nh-tap").expect("netns");
    let _in = ns.enter().expect("enter");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mac = [2, 0, 0, 0, 0, 1];
    let (gateway, prefix) = tap::parse_cidr("192.0.2.1/24").expect("cidr");
    for _ in 0..2 {
        runtime
            .block_on(tap::ensure_tap("tap0", mac, gateway, prefix))
            .expect("tap");
    }
    assert_eq!(netlink::mac_of("tap0").expect("mac"), mac);
    let addrs = ns
        .run("ip", &["-4", "-o", "addr", "show", "tap0"])
        .expect("ip");
    assert_eq!(addrs.matches("192.0.2.1/24").count(), 1, "{addrs}");
    runtime.block_on(tap::delete_tap("tap0")).expect("delete");
    assert!(ifindex("tap0").is_err());
    runtime
        .block_on(tap::delete_tap("tap0"))
        .expect("deleting a missing tap is fine");
}
