//! Following a migration the lab runs, from the test.

use std::{
    thread,
    time::{Duration, Instant},
};

use movarto_lab::{lab::Lab, netns::ChildGuard};
use movarto_user::agent::api::MigrationState;

/// Waits until A's migration of the VM reaches `stage` (`reached`), while `migrate` runs.
pub fn wait_for_source_migration(
    l: &Lab,
    orchestrator: &mut ChildGuard,
    stage: &str,
    reached: impl Fn(MigrationState) -> bool + Send + Sync + Copy,
) {
    let deadline = Instant::now() + Duration::from_secs(90);
    while !l
        .with_agents(async |a, _| a.migration("web").await.is_ok_and(reached))
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
