//! `movarto-user jobs` and `abort` during real migrations (two agents, real QEMU, the
//! lab of tests/migrate.rs): the RAM copy is listed with its figures, an abort during it
//! rolls back as a failure does, and after the switchover an abort is refused.

use std::{
    thread,
    time::{Duration, Instant},
};

use movarto_common::config::Mode;
use movarto_lab::lab::{Chat, Lab};
use movarto_tests::{
    migration::{assert_rolled_back_to_a, run_with_agents},
    require_root,
};
use movarto_user::agent::api::Stage;
use serde_json::Value;

/// `jobs --json [--all]`: the listing.
fn jobs(l: &Lab, all: bool) -> Value {
    let args: &[&str] = if all {
        &["jobs", "--json", "--all"]
    } else {
        &["jobs", "--json"]
    };
    let output = run_with_agents(l, args);
    assert!(output.status.success(), "jobs failed");
    serde_json::from_slice(&output.stdout).expect("jobs prints JSON")
}

/// The job of `role` for the VM `web` in a listing.
fn job<'a>(listing: &'a Value, role: &str) -> Option<&'a Value> {
    listing["jobs"]
        .as_array()
        .expect("jobs")
        .iter()
        .find(|j| j["vm"] == "web" && j["role"] == role)
}

#[test]
fn jobs_lists_the_ram_copy_and_abort_rolls_it_back_but_not_after_the_switchover() {
    require_root();
    let l = Lab::build().expect("the lab");

    // An unknown VM: a clear refusal, and nothing is touched.
    let unknown = run_with_agents(&l, &["abort", "nosuch"]);
    assert!(!unknown.status.success(), "abort of an unknown VM fails");
    let said = String::from_utf8_lossy(&unknown.stderr);
    assert!(
        said.contains("no migration of a VM or with an id \"nosuch\""),
        "{said}"
    );

    let boot_id = l.boot_at_a().expect("the guest boots at A");
    let before = l
        .with_agents(async |a, _| a.status().await.expect("A"))
        .expect("the agents")
        .datapath
        .expect("A tracks before the move");
    let chat = Chat::start(&l).expect("the connection");

    // 8 MiB/s for the guest's ~80 MiB: the copy lasts about 10 s.
    let mut migrate = l
        .migrate_command(&["--max-bandwidth", "8"])
        .expect("the migrate command");
    let mut orchestrator = l.bind.client.spawn(&mut migrate).expect("migrate");
    let deadline = Instant::now() + Duration::from_secs(60);
    let copying = loop {
        let listing = jobs(&l, false);
        if let Some(job) = job(&listing, "source")
            && job["phase"] == "active"
            && job["percent"].as_f64().is_some_and(|p| p > 0.0)
            && job["bandwidth_bytes_per_s"].as_u64().is_some_and(|b| b > 0)
        {
            break job.clone();
        }
        assert!(Instant::now() < deadline, "no RAM copy in jobs: {listing}");
        assert!(
            orchestrator.try_wait().expect("wait").is_none(),
            "migrate ended before the RAM copy"
        );
        thread::sleep(Duration::from_millis(300));
    };
    let percent = copying["percent"].as_f64().expect("percent");
    assert!(percent > 0.0 && percent < 100.0, "{copying}");
    assert_eq!(copying["abortable"], true);
    assert_eq!(copying["stage"], "copying-ram");
    // The 8 MiB/s cap, as QEMU measures it (bursts included).
    let bandwidth = copying["bandwidth_bytes_per_s"]
        .as_u64()
        .expect("bandwidth");
    assert!(bandwidth < 16 << 20, "{copying}");
    let id = copying["id"].as_str().expect("id").to_owned();

    let aborted = run_with_agents(&l, &["abort", "web", "--wait", "60s"]);
    let said = String::from_utf8_lossy(&aborted.stdout);
    assert!(aborted.status.success(), "abort: {said}");
    assert!(
        said.contains(&format!(
            "migration {id} of web rolled back (aborted in copying-ram)"
        )) && said.contains("VM running at the source")
            && said.contains("source service back to track")
            && said.contains("destination VM stopped"),
        "{said}"
    );

    // The `migrate` that followed reports the rollback and restores the TTL.
    let (status, report) = l
        .finish_migrate(&mut orchestrator, Duration::from_secs(60), || {})
        .expect("migrate finished");
    assert!(!status.success(), "an aborted migrate fails");
    let error = report["error"].as_str().expect("error");
    assert!(error.contains("cancelled during the RAM copy"), "{error}");
    let a_status = assert_rolled_back_to_a(&l, &report, &boot_id, chat);
    let after = a_status.datapath.expect("A attached");
    assert_eq!(
        (&after.pin_dir, after.home_addr, after.mode),
        (&before.pin_dir, before.home_addr, before.mode)
    );

    let listing = jobs(&l, false);
    assert!(job(&listing, "source").is_none(), "finished: {listing}");
    assert!(listing["finished_hidden"].as_u64() >= Some(2), "{listing}");
    let listing = jobs(&l, true);
    let source = job(&listing, "source").expect("the source's half");
    assert_eq!(source["id"], id.as_str());
    assert_eq!(source["phase"], "rolled-back");
    assert_eq!(source["abortable"], false);
    assert_eq!(
        job(&listing, "destination").expect("the destination's half")["phase"],
        "rolled-back"
    );

    // Again, to the switchover: the open connection holds the drain open.
    let chat = Chat::start(&l).expect("the connection");
    let mut migrate = l
        .migrate_command(&["--drain-grace", "1s", "--max-drain", "60s"])
        .expect("the migrate command");
    let mut orchestrator = l.bind.client.spawn(&mut migrate).expect("migrate");
    let deadline = Instant::now() + Duration::from_secs(90);
    while !l
        .with_agents(async |a, _| a.migrations().await.ok())
        .expect("the agents")
        .is_some_and(|all| all.iter().any(|r| r.stage == Stage::Draining))
    {
        assert!(Instant::now() < deadline, "no drain\n{}", l.stall_report());
        thread::sleep(Duration::from_millis(100));
    }
    let refused = run_with_agents(&l, &["abort", "web"]);
    assert!(
        !refused.status.success(),
        "abort after the switchover fails"
    );
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(
        said.contains("past the switchover (draining)")
            && said.contains("already runs at the destination")
            && said.contains("the drain finishes by itself"),
        "{said}"
    );
    let draining = jobs(&l, false);
    let source = job(&draining, "source").expect("the draining migration");
    assert_eq!(source["phase"], "draining");
    assert_eq!(source["percent"], 100.0);
    assert!(source["downtime_ms"].as_u64().is_some(), "{source}");
    // The move finishes as if nothing had been asked.
    let failures = chat.stop();
    assert!(failures.is_empty(), "the connection broke: {failures:?}");
    let (status, report) = l
        .finish_migrate(&mut orchestrator, Duration::from_secs(90), || {})
        .expect("migrate finished");
    assert!(
        status.success(),
        "migrate after the refused abort: {report}"
    );
    let b = l
        .with_agents(async |_, b| b.status().await.expect("B"))
        .expect("the agents");
    assert_eq!(b.datapath.expect("B attached").mode, Mode::Nat);
}
