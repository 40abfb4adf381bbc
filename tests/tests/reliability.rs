//! Reliability scenarios with the real binaries on loopback: each starts three
//! `venom-coordinator` processes (one raft group) and two `venom-worker` processes, runs
//! a wave and delivers crashes with SIGKILL: the leader killed three times during a
//! 10,000-micro-task wave, a worker killed mid-task, all three coordinators killed at
//! once and restarted, and a follower restarted after the leader compacted its log past
//! everything the follower holds.
//!
//! Every scenario ends with the checks of [`venom_tests::scenario`] (nothing lost,
//! nothing recorded twice, no acknowledged wave lost, members identical, extra executions
//! bounded) and prints one summary line (see it with `--nocapture`);
//! docs/RELIABILITY.md reports those figures.
//!
//! The scenarios take turns (one lock): run side by side they would overload a small
//! machine and slow each other's elections. Set `VENOM_KEEP_TEST_DIR=1` to keep the
//! coordinators' data dirs and logs.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::{Duration, Instant};

use venom_coordinator::storage::Store;
use venom_proto::v1 as pb;
use venom_tests::scenario::*;
use venom_tests::*;

/// `(first_index, last_index)` of the raft log stored in `dir` (the member must be down).
fn log_bounds(dir: &Path) -> (u64, u64) {
    let store = Store::open(dir).expect("open a stopped member's store");
    (
        store.first_log_index().expect("first index"),
        store.last_log_index().expect("last index"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_killed_three_times_during_a_10000_micro_task_wave() {
    const N_MICRO_TASKS: u32 = 10_000;
    /// Succeeded micro-tasks at which the leader is killed.
    const KILL_AT: [u64; 3] = [1_500, 4_000, 6_500];
    let _turn = ONE_AT_A_TIME.lock().await;
    let mut s = Scenario::start("leader kills", &[], &[], 8).await;
    let records = s.records_dir("fan");
    let spec = format!(
        "name = \"leader-kills\"\n[[task]]\nid = \"fan\"\narray = {N_MICRO_TASKS}\nrun = {}\n",
        toml_str(&record_only(&records))
    );
    let wave_id = s
        .submit(&spec, &records, &[("fan", Some(N_MICRO_TASKS))])
        .await;

    let mut leader = s.group.wait_leader(0, Duration::from_secs(20)).await;
    let mut killed = Vec::new();
    let mut progress_at_kill = Vec::new();
    let mut failover_ms = Vec::new();
    let mut catch_up_ms = Vec::new();
    let mut resume_ms = Vec::new();
    for at in KILL_AT {
        s.group
            .wait_succeeded(leader, wave_id, at, Duration::from_secs(120))
            .await;
        // Whoever leads now (normally still `leader`) is the one to kill.
        leader = s.group.wait_leader(0, Duration::from_secs(20)).await;
        let summary = get_wave(s.group.url(leader), wave_id).await.unwrap();
        assert_eq!(
            summary.state(),
            pb::WaveState::Running,
            "the wave must still be running when its leader dies: {summary:?}"
        );
        let at_kill = summary.counts.as_ref().map_or(0, |c| c.succeeded);
        progress_at_kill.push(at_kill);

        let victim = s.group.kill9(leader);
        let t_kill = Instant::now();
        killed.push(leader);
        let new_leader = s.group.wait_leader(leader, Duration::from_secs(20)).await;
        failover_ms.push(t_kill.elapsed().as_millis());

        s.group.restart(leader, victim).unwrap();
        let t_restart = Instant::now();
        let bound = s.in_flight_bound() as u64;
        let group = &s.group;
        tokio::join!(
            async {
                group
                    .wait_caught_up(leader, new_leader, Duration::from_secs(30))
                    .await;
                catch_up_ms.push(t_restart.elapsed().as_millis());
            },
            async {
                // More results than could have been in flight when the leader died.
                group
                    .wait_succeeded(
                        new_leader,
                        wave_id,
                        at_kill + bound + 1,
                        Duration::from_secs(60),
                    )
                    .await;
                resume_ms.push(t_kill.elapsed().as_millis());
            }
        );
        leader = new_leader;
    }
    let summary = s
        .group
        .wait_finished(wave_id, Duration::from_secs(180))
        .await;
    assert_eq!(summary.state(), pb::WaveState::Succeeded, "{summary:?}");
    assert_eq!(summary.n_micro_tasks, u64::from(N_MICRO_TASKS));
    let makespan_s = summary.makespan_ms as f64 / 1000.0;

    s.finish(
        KILL_AT.len(),
        &format!(
            "killed leaders {killed:?} at {progress_at_kill:?} succeeded; failover {}; \
             killed member caught up {}; work resumed {}; makespan {makespan_s:.1} s",
            ms_figures(&failover_ms),
            ms_figures(&catch_up_ms),
            ms_figures(&resume_ms),
        ),
        "",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_killed_mid_task_has_its_micro_tasks_redone_elsewhere() {
    const N_MICRO_TASKS: u32 = 12;
    let _turn = ONE_AT_A_TIME.lock().await;
    // A short TTL so the dead worker is noticed quickly; live workers beat 5× as often.
    let mut s = Scenario::start(
        "worker kill",
        &["--worker-lease-ms", "1500"],
        &["--heartbeat-ms", "300"],
        2,
    )
    .await;
    let records = s.records_dir("work");
    let spec = format!(
        "name = \"worker-kill\"\n[[task]]\nid = \"work\"\narray = {N_MICRO_TASKS}\nrun = {}\n",
        toml_str(&recording(&records, "sleep 1"))
    );
    let wave_id = s
        .submit(&spec, &records, &[("work", Some(N_MICRO_TASKS))])
        .await;

    // Kill w1 once it runs something; note what it held (running or queued).
    let leader = s.group.wait_leader(0, Duration::from_secs(20)).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let held_by_w1: Vec<u32> = loop {
        if let Some(tasks) = list_tasks(s.group.url(leader), wave_id).await {
            if tasks
                .iter()
                .any(|t| t.node == "w1" && t.state() == pb::TaskState::Running)
            {
                break tasks
                    .iter()
                    .filter(|t| {
                        t.node == "w1"
                            && matches!(t.state(), pb::TaskState::Assigned | pb::TaskState::Running)
                    })
                    .filter_map(|t| t.index)
                    .collect();
            }
        }
        assert!(Instant::now() < deadline, "w1 never ran a micro-task");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    s.workers[0].take().unwrap().kill9();
    let t_kill = Instant::now();

    // w1 is marked down after the TTL.
    let deadline = Instant::now() + Duration::from_secs(30);
    let down_ms = loop {
        let mut c = client(s.group.url(leader)).await.unwrap();
        if let Ok(nodes) = c.list_nodes(pb::ListNodesRequest {}).await {
            if nodes
                .into_inner()
                .nodes
                .iter()
                .any(|n| n.name == "w1" && n.state() == pb::NodeState::Down)
            {
                break t_kill.elapsed().as_millis();
            }
        }
        assert!(Instant::now() < deadline, "w1 never marked down");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let summary = s
        .group
        .wait_finished(wave_id, Duration::from_secs(60))
        .await;
    assert_eq!(summary.state(), pb::WaveState::Succeeded, "{summary:?}");

    // What w1 held was redone on w2 with a later attempt.
    let tasks = list_tasks(s.group.url(leader), wave_id).await.unwrap();
    for index in &held_by_w1 {
        let t = tasks.iter().find(|t| t.index == Some(*index)).unwrap();
        assert!(
            t.node == "w2" && t.attempt > 1,
            "work[{index}] was on w1 when it died, yet ended {t:?}"
        );
    }
    // The killed worker's micro-tasks run in their own process groups, so the ones it was
    // running outlive it, finish and write their records: extra executions by design.
    let orphans = read_records(&records)
        .unwrap()
        .iter()
        .filter(|r| r.node == "w1")
        .filter(|r| {
            tasks
                .iter()
                .any(|t| t.index.map(|i| i.to_string()) == Some(r.index.clone()) && t.node != "w1")
        })
        .count();
    s.finish(
        1,
        &format!("w1 held {held_by_w1:?} when killed; marked down {down_ms} ms after the kill"),
        &format!(
            "{orphans} of them by the killed worker's orphaned children (own process group, \
             outlive a SIGKILL of the worker, finish their attempt #1)"
        ),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_three_coordinators_killed_mid_wave_and_restarted() {
    const N_MICRO_TASKS: u32 = 300;
    let _turn = ONE_AT_A_TIME.lock().await;
    let mut s = Scenario::start("full-cluster restart", &[], &[], 4).await;
    let records = s.records_dir("fan");
    let spec = format!(
        "name = \"full-restart\"\n\
         [[task]]\nid = \"fan\"\narray = {N_MICRO_TASKS}\nrun = {}\n\
         [[task]]\nid = \"after\"\ndeps = [\"fan\"]\nrun = {}\n",
        toml_str(&recording(&records, "sleep 0.05")),
        toml_str(&recording(&records, "true")),
    );
    let wave_id = s
        .submit(
            &spec,
            &records,
            &[("fan", Some(N_MICRO_TASKS)), ("after", None)],
        )
        .await;
    let leader = s.group.wait_leader(0, Duration::from_secs(20)).await;
    s.group
        .wait_succeeded(leader, wave_id, 80, Duration::from_secs(60))
        .await;
    let summary = get_wave(s.group.url(leader), wave_id).await.unwrap();
    assert_eq!(summary.state(), pb::WaveState::Running, "{summary:?}");
    let at_kill = summary.counts.as_ref().map_or(0, |c| c.succeeded);

    let victims: Vec<(u64, Coordinator)> = s
        .group
        .ids()
        .into_iter()
        .map(|id| (id, s.group.kill9(id)))
        .collect();
    // The workers keep running what they hold; their results wait for a leader.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for (id, victim) in victims {
        s.group.restart(id, victim).unwrap();
    }
    let t_restart = Instant::now();
    let new_leader = s.group.wait_leader(0, Duration::from_secs(30)).await;
    let election_ms = t_restart.elapsed().as_millis();
    let bound = s.in_flight_bound() as u64;
    s.group
        .wait_succeeded(
            new_leader,
            wave_id,
            at_kill + bound + 1,
            Duration::from_secs(60),
        )
        .await;
    let resume_ms = t_restart.elapsed().as_millis();
    let summary = s
        .group
        .wait_finished(wave_id, Duration::from_secs(90))
        .await;
    assert_eq!(summary.state(), pb::WaveState::Succeeded, "{summary:?}");

    s.finish(
        1,
        &format!(
            "all members killed at {at_kill} succeeded, down 500 ms; a leader {election_ms} ms \
             after the restart; work resumed {resume_ms} ms after the restart"
        ),
        "",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follower_restarted_after_compaction_catches_up_by_snapshot() {
    const COMPACT_AFTER_ENTRIES: u64 = 50;
    /// How far the leader's commit index must move past the stopped follower's log.
    const LEAD_ENTRIES: u64 = 300;
    let _turn = ONE_AT_A_TIME.lock().await;
    let compact = COMPACT_AFTER_ENTRIES.to_string();
    let mut s = Scenario::start(
        "follower after compaction",
        &["--compact-after-entries", &compact],
        &[],
        4,
    )
    .await;
    let wave = |name: &str, n: u32, dir: &Path| {
        format!(
            "name = \"{name}\"\n[[task]]\nid = \"fan\"\narray = {n}\nrun = {}\n",
            toml_str(&record_only(dir))
        )
    };
    let records = s.records_dir("before");
    let first = s
        .submit(
            &wave("before", 50, &records),
            &records,
            &[("fan", Some(50))],
        )
        .await;
    s.group.wait_finished(first, Duration::from_secs(60)).await;

    let leader = s.group.wait_leader(0, Duration::from_secs(20)).await;
    let follower = s.group.ids().into_iter().find(|&id| id != leader).unwrap();
    let mut victim = s.group.kill9(follower);
    let (_, follower_last) = log_bounds(&victim.data_dir);

    // Work while the follower is down, until the leader's log is far past the follower's.
    let mut n_waves_while_down = 0;
    loop {
        let label = format!("down-{n_waves_while_down}");
        let records = s.records_dir(&label);
        let id = s
            .submit(
                &wave(&label, 200, &records),
                &records,
                &[("fan", Some(200))],
            )
            .await;
        s.group.wait_finished(id, Duration::from_secs(60)).await;
        n_waves_while_down += 1;
        let leader = s.group.wait_leader(0, Duration::from_secs(20)).await;
        let commit = cluster_status(s.group.url(leader))
            .await
            .map_or(0, |c| c.commit_index);
        if commit >= follower_last + LEAD_ENTRIES {
            break;
        }
        assert!(
            n_waves_while_down < 30,
            "the leader's commit index stays below {}",
            follower_last + LEAD_ENTRIES
        );
    }
    // Let the leader checkpoint (every 200 ms) and compact behind its last entries.
    tokio::time::sleep(Duration::from_millis(1_000)).await;

    // The restarted follower logs the snapshot it installs.
    victim.log_filter = format!("{},venom_coordinator::replica=info", test_log_filter());
    let log_path = victim.log_path();
    let log_before = std::fs::read_to_string(&log_path).unwrap_or_default().len();
    s.group.restart(follower, victim).unwrap();
    let t_restart = Instant::now();
    let leader = s.group.wait_leader(follower, Duration::from_secs(20)).await;
    s.group
        .wait_caught_up(follower, leader, Duration::from_secs(60))
        .await;
    let catch_up_ms = t_restart.elapsed().as_millis();
    let log = std::fs::read_to_string(&log_path).unwrap();
    let installed = log[log_before..].contains("caught up by snapshot");
    assert!(
        installed,
        "follower {follower} (log ending at {follower_last}) caught up without a snapshot; \
         its log: {}",
        &log[log_before..]
    );
    let commit = cluster_status(s.group.url(leader))
        .await
        .unwrap()
        .commit_index;

    s.finish(
        1,
        &format!(
            "follower {follower} stopped at log index {follower_last}, {n_waves_while_down} \
             waves while down, leader commit {commit}; caught up by snapshot in {catch_up_ms} ms"
        ),
        "",
    )
    .await;
}
