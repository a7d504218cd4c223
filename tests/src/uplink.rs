//! A site's uplink for the BPF_PROG_TEST_RUN tests whose programs route
//! (`bpf_fib_lookup`): a namespace with `up0`, permanent neighbours and routes, so
//! a test run finds next hops without any traffic.

use std::net::Ipv4Addr;

use movarto_lab::netns::{Netns, veth};

use crate::site::{mac, sh};

/// `up0`'s MAC.
pub const UPLINK_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xa1];
/// The gateway toward the clients, at 203.0.113.254 and 2001:db8:ff::fe.
pub const GW_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xfe];
pub const WAN_GW: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 254);

/// A site's uplink: `up0` with address `local`, a permanent neighbour for the
/// other tunnel endpoint and a gateway toward the clients' network.
pub struct Site {
    _wan: Netns,
    pub ns: Netns,
    pub uplink_ifindex: u32,
}

pub fn site(local: Ipv4Addr, remote: Ipv4Addr, remote_mac: [u8; 6]) -> Site {
    let ns = Netns::new("site").expect("netns");
    let wan = Netns::new("wan").expect("netns");
    // A site forwards (decapsulated replies leave toward the clients).
    for key in [
        "net.ipv4.conf.all.forwarding=1",
        "net.ipv6.conf.all.forwarding=1",
    ] {
        ns.run("sysctl", &["-qw", key])
            .expect("sysctl in the site namespace");
    }
    veth(&ns, "up0", &wan, "eth0").expect("veth");
    ns.ip(&["link", "set", "up0", "address", &mac(UPLINK_MAC)])
        .expect("mac");
    ns.ip(&["addr", "add", &format!("{local}/24"), "dev", "up0"])
        .expect("addr");
    ns.ip(&[
        "-6",
        "addr",
        "add",
        "2001:db8:ff::1/64",
        "dev",
        "up0",
        "nodad",
    ])
    .expect("addr6");
    // The other tunnel endpoint and the gateway toward the clients, both families.
    let (remote, remote_mac, wan_gw, gw_mac) = (
        remote.to_string(),
        mac(remote_mac),
        WAN_GW.to_string(),
        mac(GW_MAC),
    );
    for (addr, lladdr) in [
        (remote.as_str(), &remote_mac),
        (wan_gw.as_str(), &gw_mac),
        ("2001:db8:ff::fe", &gw_mac),
    ] {
        sh(
            &ns,
            &[
                "neigh",
                "replace",
                addr,
                "lladdr",
                lladdr,
                "dev",
                "up0",
                "nud",
                "permanent",
            ],
        );
    }
    sh(&ns, &["route", "add", "198.51.100.0/24", "via", &wan_gw]);
    sh(
        &ns,
        &[
            "-6",
            "route",
            "add",
            "2001:db8:1::/64",
            "via",
            "2001:db8:ff::fe",
        ],
    );
    let link = ns.run("ip", &["-o", "link", "show", "up0"]).expect("link");
    let uplink_ifindex = link
        .split(':')
        .next()
        .and_then(|i| i.trim().parse().ok())
        .expect("ifindex");
    Site {
        _wan: wan,
        ns,
        uplink_ifindex,
    }
}
