//! What `attach` and `mode` check before they touch anything: the forwarding of the
//! service's own family, and an uplink that does not exist (named as such). Root only.

use std::process::Command;

use movarto_common::config::Mode;
use movarto_lab::netns::{Netns, veth};
use movarto_tests::require_root;
use movarto_user::datapath::require_forwarding;

#[test]
fn an_ipv6_service_needs_ipv6_forwarding_on_the_uplink() {
    require_root();
    let ns = Netns::new("fwd6").expect("netns");
    let peer = Netns::new("fwd6peer").expect("netns");
    veth(&ns, "up0", &peer, "eth0").expect("veth");
    ns.run(
        "sysctl",
        &[
            "-qw",
            "net.ipv4.conf.all.forwarding=1",
            "net.ipv6.conf.all.forwarding=0",
        ],
    )
    .expect("sysctl");
    let _in = ns.enter().expect("enter");
    let v4 = "192.0.2.10".parse().expect("ip");
    let v6 = "2001:db8::10".parse().expect("ip");
    require_forwarding("up0", Mode::Forward, v4).expect("IPv4 forwards");
    let err = require_forwarding("up0", Mode::Forward, v6).expect_err("IPv6 does not");
    assert!(
        err.to_string().contains("IPv6 forwarding is off on up0"),
        "{err:#}"
    );
    require_forwarding("up0", Mode::Track, v6).expect("track routes nothing");
    ns.run("sysctl", &["-qw", "net.ipv6.conf.all.forwarding=1"])
        .expect("sysctl");
    require_forwarding("up0", Mode::Receive, v6).expect("IPv6 forwards now");
}

#[test]
fn mode_and_attach_name_a_missing_uplink() {
    require_root();
    let bin = movarto_lab::movarto_user().expect("the movarto-user binary");
    for args in [
        &["mode", "movarto-gone0", "forward"][..],
        &[
            "attach",
            "movarto-gone0",
            "--vm-iface",
            "movarto-gone1",
            "--home",
            "192.0.2.10",
            "--mode",
            "receive",
            "--local-tunnel",
            "203.0.113.2",
            "--peer-tunnel",
            "203.0.113.1",
            "--token",
            "5eed",
        ],
    ] {
        let out = Command::new(&bin).args(args).output().expect("run");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(
            stderr.contains("no interface named movarto-gone0"),
            "{args:?}: {stderr}"
        );
        assert!(!stderr.contains("/proc/sys"), "{args:?}: {stderr}");
    }
}
