//! bpffs is shared by every network namespace, so two sites on one machine
//! whose uplinks have the same name would share /sys/fs/bpf/movarto/<uplink>.
//! The second attach is refused with a clear message; a pin name separates them.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use aya::programs::XdpMode;
use movarto_common::config::Mode;
use movarto_lab::netns::{Netns, veth, wait_until};
use movarto_tests::require_root;
use movarto_user::datapath::{
    AttachOptions, Pinned, SiteConfig, attach, detach, netns_cookie, pin_dir,
};

/// Detaches on drop, also when the test fails.
struct Attached(String);

impl Drop for Attached {
    fn drop(&mut self) {
        let _ = detach(&self.0);
    }
}

/// A site namespace with an uplink `uplink` and a VM-facing `vm0` (veths to a peer namespace).
fn site(uplink: &str) -> (Netns, Netns) {
    let ns = Netns::new("pin").expect("netns");
    let peer = Netns::new("pinpeer").expect("netns");
    veth(&ns, uplink, &peer, "eth0").expect("veth");
    veth(&ns, "vm0", &peer, "eth1").expect("veth");
    (ns, peer)
}

fn options(uplink: &str, pin_name: Option<&str>) -> AttachOptions {
    AttachOptions {
        uplink: uplink.to_owned(),
        vm_iface: Some("vm0".to_owned()),
        services_capacity: None,
        xdp_mode: XdpMode::Default,
        site: SiteConfig::new(Mode::Track, IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10))),
        pin_name: pin_name.map(str::to_owned),
        flows_capacity: None,
        debug_log: false,
    }
}

fn attach_in(ns: &Netns, opts: &AttachOptions) -> anyhow::Result<std::path::PathBuf> {
    let _in = ns.enter().expect("enter");
    attach(opts)
}

#[test]
fn same_uplink_name_in_two_namespaces_needs_a_pin_name() {
    require_root();
    let uplink = format!("mvp{}", std::process::id() % 100_000);
    let pin_b = format!("{uplink}-site-b");
    let (ns_a, _peer_a) = site(&uplink);
    let (ns_b, _peer_b) = site(&uplink);
    let cookie_a = {
        let _in = ns_a.enter().expect("enter");
        netns_cookie().expect("cookie")
    };

    // Site A takes the default pin name, the uplink's.
    let dir_a = attach_in(&ns_a, &options(&uplink, None)).expect("attach A");
    let _a = Attached(uplink.clone());
    assert_eq!(dir_a, pin_dir(&uplink));

    // Site B's uplink has the same name: refused, saying why and what to do.
    let err = attach_in(&ns_b, &options(&uplink, None)).expect_err("clash refused");
    let msg = format!("{err:#}");
    assert!(msg.contains("another network namespace"), "{msg}");
    assert!(msg.contains("--pin-name"), "{msg}");
    // ...and A's datapath is untouched.
    let a = Pinned::open(&uplink).expect("A's pins");
    assert_eq!(a.owner().expect("owner").netns_cookie, cookie_a);
    assert_eq!(a.config().expect("config").mode, Mode::Track as u8);

    // Attaching A twice is "already attached", not a clash.
    let err = attach_in(&ns_a, &options(&uplink, None)).expect_err("twice");
    assert!(format!("{err:#}").contains("already attached"), "{err:#}");

    // With its own pin name, B attaches beside A.
    let dir_b = attach_in(&ns_b, &options(&uplink, Some(&pin_b))).expect("attach B");
    let _b = Attached(pin_b.clone());
    assert_eq!(dir_b, pin_dir(&pin_b));
    assert!(dir_b.join("link_uplink_xdp").exists());

    // Each site finds its own datapath; the other's name is refused.
    {
        let _in = ns_b.enter().expect("enter");
        let err = Pinned::open_for(&uplink, &uplink)
            .err()
            .expect("A's pins are not B's");
        assert!(
            format!("{err:#}").contains("another network namespace"),
            "{err:#}"
        );
        let mut b = Pinned::open_for(&uplink, &pin_b).expect("B's pins");
        // Attached in track without a token: no mode that carries the tunnel yet.
        let err = b.set_mode(Mode::Receive).expect_err("no token");
        assert!(format!("{err:#}").contains("session token"), "{err:#}");
        b.set_mode(Mode::Nat).expect("mode");
    }
    {
        let _in = ns_a.enter().expect("enter");
        let a = Pinned::open_for(&uplink, &uplink).expect("A's pins");
        assert_eq!(
            a.config().expect("config").mode,
            Mode::Track as u8,
            "B's mode switch left A alone"
        );
    }
    assert_eq!(
        Pinned::open(&pin_b)
            .expect("B")
            .config()
            .expect("config")
            .mode,
        Mode::Nat as u8
    );

    // Names that are not one plain path component are refused before anything is made.
    for bad in ["", "..", "../escape", "a/b", ".hidden"] {
        let err = attach_in(&ns_b, &options(&uplink, Some(bad))).expect_err(bad);
        assert!(
            format!("{err:#}").contains("bad pin name"),
            "{bad:?}: {err:#}"
        );
    }

    drop(_b);
    assert!(!dir_b.exists(), "B detached");
    assert!(dir_a.exists(), "A still attached");
}

/// A site whose namespace was deleted without `detach` leaves its pins on bpffs (global).
/// `movarto-user detach` refuses another namespace's live datapath, but removes pins whose
/// uplink is gone: the kernel has detached their XDP link, so nothing is attached.
#[test]
fn detach_removes_the_pins_of_a_datapath_whose_namespace_is_gone() {
    require_root();
    let uplink = format!("mvg{}", std::process::id() % 100_000);
    let pin = format!("{uplink}-gone");
    let elsewhere = Netns::new("pinelse").expect("netns");
    // nsenter, not `ip netns exec`: that remounts /sys, hiding the host's bpffs.
    let detach_from_elsewhere = || {
        std::process::Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", elsewhere.name()))
            .arg(movarto_lab::movarto_user().expect("movarto-user"))
            .args(["detach", &uplink, "--pin-name", &pin])
            .output()
            .expect("movarto-user detach")
    };
    let (ns, peer) = site(&uplink);
    let dir = attach_in(&ns, &options(&uplink, Some(&pin))).expect("attach");
    let _cleanup = Attached(pin.clone());
    assert!(
        !Pinned::open(&pin)
            .expect("pins")
            .uplink_gone()
            .expect("link")
    );

    // Live, in another namespace: refused, and the pins stay.
    let refused = detach_from_elsewhere();
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("in another network namespace (cookie"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    assert!(dir.exists());

    // The site's namespace goes (its uplink with it) without a detach. The kernel
    // unregisters a deleted namespace's devices in a workqueue, after `ip netns del`
    // returns, so the link's interface is gone only some time later.
    drop(ns);
    drop(peer);
    wait_until(
        Duration::from_secs(20),
        "the uplink to go with its namespace",
        || {
            Pinned::open(&pin)
                .expect("pins")
                .uplink_gone()
                .expect("link")
        },
    )
    .expect("uplink gone");
    let removed = detach_from_elsewhere();
    assert!(
        removed.status.success(),
        "{}",
        String::from_utf8_lossy(&removed.stderr)
    );
    assert!(
        String::from_utf8_lossy(&removed.stdout).contains("no longer exists"),
        "{}",
        String::from_utf8_lossy(&removed.stdout)
    );
    assert!(!dir.exists(), "the pins are gone");
}
