//! Following a migration the lab runs, from the test.

use std::{
    ffi::OsString,
    process::{Command, Output},
    sync::atomic::Ordering,
    thread,
    time::{Duration, Instant},
};

use movarto_common::config::Mode;
use movarto_lab::{
    dns_server::SERVICE,
    lab::{AGENT_PORT, Chat, H, Lab, TA, TB},
    movarto_user,
    netns::ChildGuard,
};
use movarto_user::agent::api::{MigrationState, SiteStatus};

/// Waits until A's migration of the VM reaches `stage` (`reached`), while `migrate` runs.
pub fn wait_for_source_migration(
    l: &Lab,
    orchestrator: &mut ChildGuard,
    stage: &str,
    reached: impl Fn(MigrationState) -> bool + Send + Sync + Copy,
) {
    wait_for_source_migration_of(l, "web", orchestrator, stage, reached);
}

/// [`wait_for_source_migration`] of the VM `vm`.
pub fn wait_for_source_migration_of(
    l: &Lab,
    vm: &str,
    orchestrator: &mut ChildGuard,
    stage: &str,
    reached: impl Fn(MigrationState) -> bool + Send + Sync + Copy,
) {
    let deadline = Instant::now() + Duration::from_secs(90);
    while !l
        .with_agents(async |a, _| a.migration(vm).await.is_ok_and(reached))
        .expect("the agents")
    {
        assert!(Instant::now() < deadline, "{stage} did not start");
        assert!(
            orchestrator.try_wait().expect("wait").is_none(),
            "migrate ended before {stage}: {}",
            l.agent_log("a")
        );
        thread::sleep(Duration::from_millis(100));
    }
}

/// After a migration that failed before switchover: the rollback says the VM runs at
/// the source, and it does (the same instance, its connection kept, DNS unchanged); A
/// tracks again and B has no VM and no datapath left. Returns A's status.
pub fn assert_rolled_back_to_a(
    l: &Lab,
    report: &serde_json::Value,
    boot_id: &str,
    chat: Chat,
) -> SiteStatus {
    assert_eq!(report["succeeded"], false);
    let rolled_back = report["rolled_back"].as_str().expect("rollback summary");
    assert!(
        rolled_back.contains("VM running at the source") && !rolled_back.contains("NOT undone"),
        "{rolled_back}"
    );
    assert_eq!(l.http_get(H, "/id").expect("GET"), boot_id);
    let stats = chat.stats.clone();
    let failures = chat.stop();
    assert!(failures.is_empty(), "the connection broke: {failures:?}");
    eprintln!(
        "rollback: worst stall of the connection {} ms",
        stats.worst_stall_ms.load(Ordering::Relaxed)
    );
    assert_eq!(l.bind.dig(SERVICE, "A").expect("dig"), [H]);
    assert_eq!(l.bind.dig_ttls(SERVICE, "A").expect("dig"), [300]);
    let (a_status, b_status) = l
        .with_agents(async |a, b| (a.status().await.expect("A"), b.status().await.expect("B")))
        .expect("the agents");
    assert_eq!(
        a_status.datapath.as_ref().expect("A attached").mode,
        Mode::Track
    );
    assert!(b_status.datapath.is_none(), "B detached");
    assert!(b_status.vms.is_empty(), "no VM at B: {:?}", b_status.vms);
    a_status
}

/// `movarto-user ARGS` in the ops namespace, naming both agents as `migrate` does
/// (`--source`, `--destination` and their token files); its output, shown on stderr.
pub fn run_with_agents(l: &Lab, args: &[&str]) -> Output {
    let mut all: Vec<OsString> = args.iter().map(OsString::from).collect();
    all.extend([
        "--source".into(),
        format!("http://{TA}:{AGENT_PORT}").into(),
        "--source-token-file".into(),
        l.scratch.join("token-a").into(),
        "--destination".into(),
        format!("http://{TB}:{AGENT_PORT}").into(),
        "--destination-token-file".into(),
        l.scratch.join("token-b").into(),
    ]);
    run_in_ops(l, &all)
}

/// `movarto-user ARGS` in the ops namespace; its output, shown on stderr.
pub fn run_in_ops(l: &Lab, args: &[OsString]) -> Output {
    let output = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", l.bind.client.name()))
        .arg(movarto_user().expect("the movarto-user binary"))
        .args(args)
        .output()
        .expect("movarto-user runs");
    let shown: Vec<_> = args.iter().map(|a| a.to_string_lossy()).collect();
    eprintln!(
        "movarto-user {}: {}\n{}{}",
        shown.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}
