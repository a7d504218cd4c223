//! `movarto-user attach` with no service, then `service add|set|del|list` on it: the
//! uplink is attached once, each service brings its own VM-facing interface, and a
//! VM's packets are handled by its own service's mode. Root only, in namespaces.

use std::{
    net::{SocketAddr, UdpSocket},
    process::{Command, Output},
    time::Duration,
};

use movarto_lab::netns::{Netns, in_netns, veth};
use movarto_tests::require_root;
use movarto_user::datapath::{detach, pin_dir};

/// Detaches on drop, also when the test fails.
struct Attached(String);

impl Drop for Attached {
    fn drop(&mut self) {
        let _ = detach(&self.0);
    }
}

/// `movarto-user args` inside `ns` (nsenter keeps the host's bpffs visible).
fn movarto(ns: &Netns, args: &[&str]) -> Output {
    Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", ns.name()))
        .arg(movarto_lab::movarto_user().expect("movarto-user"))
        .args(args)
        .output()
        .expect("movarto-user")
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "exit {:?}: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn refused(out: &Output, says: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(says), "wanted {says:?} in: {stderr}");
}

/// The node: uplink `up0` to `wan`, where a client is; two VMs, each on its own
/// veth (`vm1`, `vm2`) to a namespace of its own.
struct Lab {
    node: Netns,
    wan: Netns,
    _vm1: Netns,
    vm2: Netns,
}

fn lab() -> Lab {
    let node = Netns::new("svcnode").expect("netns");
    let wan = Netns::new("svcwan").expect("netns");
    let vm1 = Netns::new("svcvm1").expect("netns");
    let vm2 = Netns::new("svcvm2").expect("netns");
    veth(&node, "up0", &wan, "eth0").expect("veth");
    veth(&node, "vm1", &vm1, "eth0").expect("veth");
    veth(&node, "vm2", &vm2, "eth0").expect("veth");
    for (ns, cmds) in [
        (
            &node,
            &[
                "addr add 203.0.113.2/24 dev up0",
                "addr add 192.0.2.1/28 dev vm1",
                "addr add 192.0.2.17/28 dev vm2",
                "link set up0 up",
                "link set vm1 up",
                "link set vm2 up",
                "route add 198.51.100.0/24 via 203.0.113.1",
            ][..],
        ),
        (
            &wan,
            &[
                "addr add 203.0.113.1/24 dev eth0",
                "addr add 198.51.100.7/32 dev lo",
                "link set eth0 up",
                "link set lo up",
                "route add 198.18.0.0/15 via 203.0.113.2",
            ][..],
        ),
        (
            &vm1,
            &[
                "addr add 192.0.2.10/28 dev eth0",
                "link set eth0 up",
                "route add default via 192.0.2.1",
            ][..],
        ),
        (
            &vm2,
            &[
                "addr add 192.0.2.20/28 dev eth0",
                "link set eth0 up",
                "link set lo up",
                "route add default via 192.0.2.17",
            ][..],
        ),
    ] {
        for cmd in cmds {
            ns.ip(&cmd.split(' ').collect::<Vec<_>>()).expect(cmd);
        }
    }
    node.run("sysctl", &["-qw", "net.ipv4.conf.all.forwarding=1"])
        .expect("forwarding");
    Lab {
        node,
        wan,
        _vm1: vm1,
        vm2,
    }
}

/// What the client sees of one datagram VM 2 sends it: its source address.
fn source_seen_by_client(lab: &Lab) -> SocketAddr {
    let client = in_netns(&lab.wan, || {
        let socket = UdpSocket::bind("198.51.100.7:7000").expect("bind");
        socket
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        socket
    })
    .expect("wan");
    in_netns(&lab.vm2, || {
        let socket = UdpSocket::bind("192.0.2.20:5000").expect("bind");
        socket
            .send_to(b"from vm2", "198.51.100.7:7000")
            .expect("send");
    })
    .expect("vm2");
    let mut buf = [0u8; 64];
    let (len, from) = client.recv_from(&mut buf).expect("the datagram arrives");
    assert_eq!(&buf[..len], b"from vm2");
    from
}

#[test]
fn services_are_added_changed_and_removed_on_an_uplink_attached_once() {
    require_root();
    let lab = lab();
    let pin = format!("movarto-test-svc{}", std::process::id() % 100_000);
    let node = &lab.node;
    ok(&movarto(
        node,
        &[
            "attach",
            "up0",
            "--local-tunnel",
            "203.0.113.2",
            "--pin-name",
            &pin,
            "--services",
            "2",
            "--flows-capacity",
            "1024",
        ],
    ));
    let _attached = Attached(pin.clone());
    let list = |json: bool| {
        let mut args = vec!["service", "list", "up0", "--pin-name", &pin];
        if json {
            args.push("--json");
        }
        ok(&movarto(node, &args))
    };
    assert!(list(false).contains("0 services of 2 at most"));

    // Before VM 2 is a service, its packets leave as they are.
    assert_eq!(source_seen_by_client(&lab).ip().to_string(), "192.0.2.20");

    let add = |home: &str, iface: &str, extra: &[&str]| {
        let mut args = vec![
            "service",
            "add",
            "up0",
            "--pin-name",
            &pin,
            "--home",
            home,
            "--vm-iface",
            iface,
        ];
        args.extend_from_slice(extra);
        movarto(node, &args)
    };
    ok(&add("192.0.2.10", "vm1", &[]));
    ok(&add(
        "192.0.2.20",
        "vm2",
        &["--mode", "nat", "--new-addr", "198.18.0.20"],
    ));
    // The second service's interface got the VM-facing program: VM 2 leaves as N.
    assert_eq!(source_seen_by_client(&lab).ip().to_string(), "198.18.0.20");

    // Refusals, each saying why; nothing changes.
    refused(&add("192.0.2.30", "vm1", &[]), "the services map is full");
    refused(&add("192.0.2.10", "vm1", &[]), "exists already");
    refused(
        &add("192.0.2.20", "vm2", &["--mode", "receive"]),
        "needs --peer-tunnel",
    );
    refused(
        &add("192.0.2.40", "nosuch0", &[]),
        "no interface named nosuch0",
    );
    let report: serde_json::Value = serde_json::from_str(&list(true)).expect("json");
    assert_eq!(report["capacity"], 2);
    let services = report["services"].as_array().expect("services");
    assert_eq!(services.len(), 2);
    assert_eq!(services[0]["home_addr"], "192.0.2.10");
    assert_eq!(services[0]["mode"], "track");
    assert_eq!(services[1]["home_addr"], "192.0.2.20");
    assert_eq!(services[1]["mode"], "nat");
    assert_eq!(services[1]["new_addr"], "198.18.0.20");
    assert!(
        services[1]["counters"]["nat_out"]
            .as_u64()
            .expect("nat_out")
            >= 1,
        "{}",
        services[1]
    );
    assert_eq!(services[0]["counters"]["nat_out"], 0);
    let status = ok(&movarto(node, &["status", "up0", "--pin-name", &pin]));
    assert!(status.contains("services 2 of 2 at most"), "{status}");
    assert!(
        status.contains("service 192.0.2.20 (nat, new 198.18.0.20"),
        "{status}"
    );

    // `set` replaces the service whole: back to track, VM 2 leaves as itself.
    ok(&movarto(
        node,
        &[
            "service",
            "set",
            "up0",
            "--pin-name",
            &pin,
            "--home",
            "192.0.2.20",
            "--vm-iface",
            "vm2",
        ],
    ));
    assert_eq!(source_seen_by_client(&lab).ip().to_string(), "192.0.2.20");
    // `mode` without a service named is refused while two are served.
    refused(
        &movarto(node, &["mode", "up0", "idle", "--pin-name", &pin]),
        "serves 2 services",
    );

    // `del` removes the service and its interface's link; the other stays.
    let links = || {
        std::fs::read_dir(pin_dir(&pin))
            .expect("pins")
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|name| name.starts_with("link_vm_tc"))
            .count()
    };
    assert_eq!(links(), 2);
    ok(&movarto(
        node,
        &[
            "service",
            "del",
            "up0",
            "--pin-name",
            &pin,
            "--home",
            "192.0.2.20",
        ],
    ));
    assert_eq!(links(), 1);
    refused(
        &movarto(
            node,
            &[
                "service",
                "del",
                "up0",
                "--pin-name",
                &pin,
                "--home",
                "192.0.2.20",
            ],
        ),
        "no service 192.0.2.20",
    );
    let report: serde_json::Value = serde_json::from_str(&list(true)).expect("json");
    assert_eq!(report["services"].as_array().expect("services").len(), 1);
    assert_eq!(report["services"][0]["home_addr"], "192.0.2.10");
}
