//! The namespace helpers themselves: two hosts on a veth reach each other over
//! TCP, and dropping the namespaces removes them and the processes inside.

use std::{process::Command, time::Duration};

use movarto_lab::netns::{Netns, veth, wait_until};
use movarto_tests::require_root;

#[test]
fn two_namespaces_talk_over_veth_and_vanish_on_drop() {
    require_root();
    let names;
    {
        let server = Netns::new("srv").expect("netns");
        let client = Netns::new("cli").expect("netns");
        names = [server.name().to_owned(), client.name().to_owned()];
        veth(&server, "eth0", &client, "eth0").expect("veth");
        server
            .ip(&["addr", "add", "192.0.2.1/24", "dev", "eth0"])
            .expect("addr");
        client
            .ip(&["addr", "add", "192.0.2.2/24", "dev", "eth0"])
            .expect("addr");
        let _listener = server
            .spawn(
                server
                    .command("socat")
                    .args(["TCP-LISTEN:7000,reuseaddr", "SYSTEM:echo movarto-ok"]),
            )
            .expect("socat");
        wait_until(Duration::from_secs(5), "the listener", || {
            server
                .run("ss", &["-Htln", "sport = :7000"])
                .is_ok_and(|o| !o.trim().is_empty())
        })
        .expect("listening");
        let reply = client
            .run(
                "socat",
                &["-u", "TCP:192.0.2.1:7000,connect-timeout=5", "STDOUT"],
            )
            .expect("client");
        assert_eq!(reply.trim(), "movarto-ok");
    }
    let listed = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    let listed = String::from_utf8_lossy(&listed.stdout);
    for name in names {
        assert!(!listed.contains(&name), "{name} left behind");
    }
}
