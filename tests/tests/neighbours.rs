//! A node serves many tenants: site A runs two VMs behind one uplink, each its own
//! service, and one of them moves to B while the other keeps serving. The neighbour's
//! connections carry every byte, checked, throughout; its service's counters show no
//! tunnel, NAT or drop verdict; the teardown removes the moved VM's service and leaves
//! the neighbour's (and the datapath) in place. Root, namespaces, real QEMU and agents.

use std::time::Duration;

use movarto_common::{config::Mode, counters::Counter};
use movarto_lab::{
    lab::{H, IO_TIMEOUT, Lab},
    netns::wait_until,
};
use movarto_tests::{
    extra_vm::{Traffic, WEB2},
    require_root,
};
use movarto_user::datapath::Pinned;

/// The neighbour's service row at A.
fn neighbour_row(l: &Lab) -> movarto_user::datapath::CounterSnapshot {
    let pinned = Pinned::open(&l.uplink_a).expect("A's pins");
    let service = pinned
        .services
        .get(WEB2.home.parse().expect("addr"))
        .expect("services")
        .expect("the neighbour's service");
    pinned.services.counters(service.slot).expect("row")
}

#[test]
fn a_vm_moves_while_its_neighbour_on_the_same_uplink_serves_untouched() {
    require_root();
    let l = Lab::build().expect("the lab");
    l.boot_at_a().expect("the guest boots at A");
    WEB2.boot_at_a(&l);
    let neighbour = Traffic::start(&l, WEB2.home);
    wait_until(IO_TIMEOUT, "the neighbour's traffic", || {
        neighbour.bytes() > 100_000
    })
    .expect("the neighbour's traffic flows");
    // Agent A's API lists both services, each with its own counters.
    let listed = l
        .with_agents(async |a, _b| a.services().await)
        .expect("agents")
        .expect("GET /v1/services");
    assert_eq!(listed.capacity, 4096);
    let homes: Vec<_> = listed.services.iter().map(|s| s.home_addr).collect();
    assert_eq!(
        homes,
        [
            Some(H.parse().expect("addr")),
            Some(WEB2.home.parse().expect("addr"))
        ]
    );
    assert!(
        listed
            .services
            .iter()
            .all(|s| s.mode == Mode::Track && s.service_counters.is_some()),
        "{listed:?}"
    );

    let mut migrate = l
        .migrate_command(&["--drain-grace", "1s", "--max-drain", "30s"])
        .expect("the migrate command");
    let mut orchestrator = l.bind.client.spawn(&mut migrate).expect("migrate");
    let (status, report) = l
        .finish_migrate(&mut orchestrator, Duration::from_secs(240), || {})
        .expect("migrate finishes");
    assert!(status.success(), "migrate failed: {report}");
    assert_eq!(report["succeeded"], true, "{report}");
    assert_eq!(report["qemu"]["status"], "completed", "{report}");

    // The neighbour kept serving throughout, every byte checked, and still does.
    let before = neighbour.bytes();
    wait_until(IO_TIMEOUT, "the neighbour's traffic after the move", || {
        neighbour.bytes() > before + 50_000
    })
    .expect("the neighbour's traffic after the move");
    assert_eq!(neighbour.stop(), None, "the neighbour's connections broke");

    // Its service saw no tunnel, NAT or drop verdict: the move was not its.
    let row = neighbour_row(&l);
    for counter in movarto_common::counters::Counter::ALL {
        let touched = counter.is_drop()
            || matches!(
                counter,
                Counter::TunnelOut
                    | Counter::TunnelIn
                    | Counter::NatIn
                    | Counter::NatOut
                    | Counter::IcmpTooBig
                    | Counter::IcmpTimeExceeded
            );
        if touched {
            assert_eq!(
                row.get(counter),
                0,
                "{}: {:?}",
                counter.name(),
                row.nonzero()
            );
        }
    }
    assert!(row.get(Counter::PassIpv4) > 0, "{:?}", row.nonzero());

    // The teardown removed the moved VM's service only; the datapath stays for the
    // neighbour, still tracking.
    let pinned = Pinned::open(&l.uplink_a).expect("A's pins stay");
    let services = pinned.services.list().expect("list");
    assert_eq!(services.len(), 1, "only the neighbour's service is left");
    assert_eq!(services[0].mode(), Some(Mode::Track));
    assert!(
        pinned
            .services
            .get(H.parse().expect("addr"))
            .expect("get")
            .is_none()
    );
    drop(pinned);
    // DELETE /v1/services/{home} removes the neighbour's service, and the datapath stays;
    // a second DELETE is fine.
    l.with_agents(async |a, _b| {
        let home = WEB2.home.parse().expect("addr");
        a.delete_service(home).await?;
        a.delete_service(home).await?;
        a.services().await
    })
    .expect("agents")
    .map(|left| assert!(left.services.is_empty(), "{left:?}"))
    .expect("DELETE /v1/services");
    assert!(
        movarto_user::datapath::pin_dir(&l.uplink_a).exists(),
        "A stays attached"
    );
}
