//! The source tap's recording (`movarto-ebpf/src/bin/recorder.rs`): every frame sent
//! into the interface is kept, byte for byte and in order, and one too long for a slot
//! is marked cut short; the frames themselves go on untouched.

use movarto_lab::netns::{Netns, veth};
use movarto_tests::{
    raw_socket::{ifindex, packet_socket, send_frame as send_on},
    require_root,
};
use movarto_user::datapath::recorder::TapRecorder;

/// Sends `frame` out of `iface` on a packet socket (the way the agent's decoy goes).
fn send_frame(iface: &str, frame: &[u8]) {
    send_on(&packet_socket(iface, 0), ifindex(iface), frame);
}

fn frame(n: u16, len: usize) -> Vec<u8> {
    let mut f = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2, 0x88, 0xb5];
    f.extend_from_slice(&n.to_be_bytes());
    f.resize(len, n as u8);
    f
}

#[test]
fn the_recording_keeps_each_frame_sent_into_the_tap_in_order() {
    require_root();
    let ns = Netns::new("rec").expect("netns");
    let peer = Netns::new("recpeer").expect("netns");
    veth(&ns, "tap0", &peer, "eth0").expect("veth");
    ns.run("ip", &["link", "set", "tap0", "mtu", "4000"])
        .expect("mtu");
    peer.run("ip", &["link", "set", "eth0", "mtu", "4000"])
        .expect("mtu");
    let _in = ns.enter().expect("enter");
    let recorder = TapRecorder::start("tap0").expect("the recorder attaches");

    let sent: Vec<Vec<u8>> = (0..10)
        .map(|n| frame(n, 60 + 100 * usize::from(n)))
        .collect();
    for f in &sent {
        send_frame("tap0", f);
    }
    let long = frame(99, 3000);
    send_frame("tap0", &long);

    // The kernel's own frames on the link (IPv6's router solicitation) are recorded too;
    // the test's are those of its EtherType.
    let recorded: Vec<_> = recorder
        .frames()
        .expect("read")
        .into_iter()
        .filter(|f| f.data[12..14] == [0x88, 0xb5])
        .collect();
    assert_eq!(recorded.len(), sent.len() + 1, "every frame, once");
    for (got, want) in recorded.iter().zip(&sent) {
        assert_eq!(got.frame(), Some(&want[..]), "byte for byte, in order");
    }
    let last = recorded.last().expect("the long frame");
    assert_eq!(last.len, 3000, "its whole length");
    assert!(last.frame().is_none(), "cut short, so never carried on");

    drop(recorder);
    // Detached with the recorder: what is sent now is not recorded anywhere, and
    // a new recording starts empty.
    send_frame("tap0", &sent[0]);
    let again = TapRecorder::start("tap0").expect("attaches again");
    assert!(
        !again
            .frames()
            .expect("read")
            .iter()
            .any(|f| f.data[12..14] == [0x88, 0xb5]),
        "a new recording starts empty"
    );
}

/// The frame QEMU holds is carried on from the recording. A QEMU that never started its
/// VM (`-S`) behaves as one stopped for the switchover: its tap backend reads one frame,
/// keeps it for the stopped device, and reads no more. Three datagrams go to the VM's
/// address: QEMU holds the first, the other two wait in the tap's queue. The agent's two
/// passes (`agent::blackout`) must send all three to the peer in GUE, the held one from
/// the recording, and count none lost.
#[test]
fn the_frame_qemu_holds_goes_on_to_the_destination_from_the_recording() {
    use std::{
        net::{IpAddr, Ipv4Addr, UdpSocket},
        time::Duration,
    };

    use movarto_common::{config::GUE_DEFAULT_PORT, gue::GUE_FIRST_BYTE, ids::SessionToken};
    use movarto_lab::netns::wait_until;
    use movarto_user::agent::{
        blackout::{Recording, TunnelTo, forward_stranded, probe_held},
        netlink::tx_packets,
    };

    require_root();
    const VM: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
    const VM_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
    let (local, peer) = (Ipv4Addr::new(198, 18, 0, 1), Ipv4Addr::new(198, 18, 0, 2));
    let ns = Netns::new("held").expect("netns");
    let mut qemu = ns
        .spawn(ns.command("qemu-system-x86_64").args([
            "-S",
            "-nodefaults",
            "-display",
            "none",
            "-accel",
            "tcg",
            "-netdev",
            "tap,id=n0,ifname=tap0,script=no,downscript=no,vnet_hdr=on",
            "-device",
            "virtio-net-pci,netdev=n0,mac=52:54:00:12:34:56",
        ]))
        .expect("QEMU");
    wait_until(Duration::from_secs(30), "QEMU's tap", || {
        ns.run("ip", &["link", "show", "tap0"]).is_ok()
    })
    .unwrap_or_else(|err| panic!("{err}: QEMU {:?}", qemu.try_wait()));
    // No IPv6 on the tap: the kernel's own first frames (router solicitation, MLD) would
    // be the one QEMU holds.
    ns.run("sysctl", &["-qw", "net.ipv6.conf.tap0.disable_ipv6=1"])
        .expect("IPv6 off on the tap");
    for args in [
        &["link", "set", "lo", "up"][..],
        &["link", "set", "tap0", "up"],
        &["addr", "add", "192.0.2.1/24", "dev", "tap0"],
        &["addr", "add", "198.18.0.1/32", "dev", "lo"],
        &["addr", "add", "198.18.0.2/32", "dev", "lo"],
        &[
            "neigh",
            "replace",
            "192.0.2.10",
            "lladdr",
            "52:54:00:12:34:56",
            "dev",
            "tap0",
            "nud",
            "permanent",
        ],
    ] {
        ns.run("ip", args).expect("the namespace's addresses");
    }
    let _in = ns.enter().expect("enter");
    let gue = UdpSocket::bind((peer, GUE_DEFAULT_PORT)).expect("the peer's GUE port");
    gue.set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    let recording = Recording::start("tap0").expect("the recording");

    assert_eq!(
        tx_packets("tap0").expect("the tap's statistics"),
        0,
        "QEMU has read nothing yet"
    );
    let to_vm = UdpSocket::bind("192.0.2.1:0").expect("a socket");
    let texts = ["held-0", "queued-1", "queued-2"];
    for text in texts {
        to_vm.send_to(text.as_bytes(), (VM, 7)).expect("a datagram");
    }
    wait_until(Duration::from_secs(10), "QEMU to read one frame", || {
        tx_packets("tap0").is_ok_and(|n| n >= 1)
    })
    .expect("QEMU reads its tap");

    let qemu_pid = qemu.id();
    let home = IpAddr::V4(VM);
    let tunnel = TunnelTo {
        local,
        peer,
        token: SessionToken(0x1234_5678_9abc_def0),
        mtu: 1500,
    };
    let first =
        forward_stranded(qemu_pid, "tap0", home, tunnel, Some(&recording)).expect("a first pass");
    assert_eq!(
        (first.found, first.forwarded, first.lost),
        (2, 2, 0),
        "the two queued datagrams: {first:?}"
    );
    assert!(
        first.held_seen && first.held_carried,
        "the held one, from the recording, at the first read: {first:?}"
    );
    let last = probe_held(
        qemu_pid,
        "tap0",
        VM_MAC,
        home,
        tunnel,
        first,
        Some(&recording),
    )
    .expect("the probe");
    assert_eq!(last.held_by_qemu, 1, "QEMU holds one: {last:?}");
    assert!(!last.held_decoy, "no decoy went in: {last:?}");
    assert_eq!(last.lost, 0, "the held one is not lost: {last:?}");
    assert_eq!(
        first.sent_again + last.sent_again,
        0,
        "nothing came before it"
    );

    let mut got = Vec::new();
    let mut buf = [0u8; 2048];
    while got.len() < texts.len() {
        let len = gue.recv(&mut buf).expect("a GUE datagram at the peer");
        let datagram = &buf[..len];
        assert_eq!(datagram[0], GUE_FIRST_BYTE, "a GUE header");
        assert_eq!(datagram[1], 4, "IPv4 inside");
        assert_eq!(
            datagram[4..12],
            0x1234_5678_9abc_def0u64.to_be_bytes(),
            "the session token"
        );
        let inner = &datagram[12..];
        assert_eq!(inner[16..20], VM.octets(), "for the VM");
        // IPv4 (20 bytes, no options) and UDP (8): the payload.
        got.push(String::from_utf8_lossy(&inner[28..]).into_owned());
    }
    got.sort();
    let mut want: Vec<String> = texts.iter().map(|t| (*t).to_owned()).collect();
    want.sort();
    assert_eq!(got, want, "all three reached the peer, the held one too");
    drop(qemu);
}
