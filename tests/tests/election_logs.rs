//! Elections, leadership won and lost, and a new leader followed each leave one log line on
//! the member concerned (`venom_coordinator::replica`, at info; a step-down at warn).

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use venom_tests::*;

fn log_of(group: &Group, id: u64) -> String {
    let member = group.members[(id - 1) as usize].as_ref().unwrap();
    std::fs::read_to_string(member.log_path()).unwrap_or_default()
}

/// Waits until member `id`'s log holds `needle` (logs are written as things happen).
async fn wait_log(group: &Group, id: u64, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let log = log_of(group, id);
        if log.contains(needle) {
            return log;
        }
        assert!(
            Instant::now() < deadline,
            "member {id} never logged `{needle}`:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn elections_leader_changes_and_step_downs_are_logged() {
    // This test binary holds this one test: the variable reaches only its coordinators.
    std::env::set_var("VENOM_TEST_LOG", "info");
    let dir = tempfile::tempdir().unwrap();
    let mut group = Group::start(dir.path(), 3, &[]).unwrap();
    let first = group.wait_leader(0, Duration::from_secs(20)).await;
    wait_log(&group, first, "became leader").await;
    for id in group.ids().into_iter().filter(|&id| id != first) {
        wait_log(&group, id, "following a new leader").await;
    }

    // The leader dies: a follower starts an election, wins it, and is followed.
    let down = group.kill9(first);
    let second = group.wait_leader(first, Duration::from_secs(20)).await;
    let log = wait_log(&group, second, "starting an election").await;
    let wins = log.matches("became leader").count();
    assert_eq!(wins, 1, "member {second} won one election:\n{log}");
    group.restart(first, down).unwrap();
    wait_log(&group, first, &format!("leader={second}")).await;

    // Removing the leader makes it hand leadership over first: it steps down.
    let (ok, _, stderr) = venomctl(
        &group.all_urls(),
        &["cluster", "remove", &second.to_string()],
    );
    assert!(ok, "cluster remove: {stderr}");
    let log = wait_log(&group, second, "stepped down as leader").await;
    assert!(log.contains("WARN"), "a step-down is a warning:\n{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_registering_draining_and_marked_down_are_logged_by_the_leader() {
    std::env::set_var("VENOM_TEST_LOG", "info");
    let dir = tempfile::tempdir().unwrap();
    let coordinator =
        Coordinator::start(&dir.path().join("c"), &["--worker-lease-ms", "1500"]).unwrap();
    let log = || std::fs::read_to_string(coordinator.log_path()).unwrap_or_default();
    let wait = |needle: &'static str| {
        let log = &log;
        async move {
            let deadline = Instant::now() + Duration::from_secs(15);
            while !log().contains(needle) {
                assert!(
                    Instant::now() < deadline,
                    "never logged `{needle}`:\n{}",
                    log()
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let mut worker = start_worker(&coordinator.url(), "n1", 1, &[]).unwrap();
    wait_ready(&coordinator.url(), 1).await.unwrap();
    wait("node ready node=n1 from=\"unregistered\"").await;
    let (ok, _, stderr) = venomctl(&coordinator.url(), &["drain", "n1"]);
    assert!(ok, "{stderr}");
    wait("node draining node=n1 from=\"ready\"").await;
    worker.kill9();
    wait("node marked down").await;
    assert!(log().contains("from=\"draining\""), "{}", log());
}
