//! A three-coordinator raft group with the real binaries on loopback: a wave submitted
//! through a follower (the client follows the "not leader" refusal to the leader), the
//! leader SIGKILLed twice while micro-tasks run, each killed member restarted on its own
//! data dir. The wave must still succeed with every micro-task run at least once and few
//! re-runs, and all three members must end up reporting the same wave.
//!
//! Set `VENOM_KEEP_TEST_DIR=1` to keep the coordinators' data dirs and logs.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use venom_proto::v1 as pb;
use venom_tests::*;

const N_MICRO_TASKS: u32 = 300;
const N_WORKERS: u32 = 2;
const SLOTS: u32 = 2;
const QUEUE_DEPTH: u32 = 4;
const N_KILLS: usize = 2;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wave_survives_two_leader_kills_and_members_converge() {
    let test_start = Instant::now();
    let dir = test_dir("replicated").unwrap();
    let root = dir.path.clone();
    let work = root.join("work");
    std::fs::create_dir_all(&work).unwrap();

    // 1. Three members on ports chosen up front, each listing all three as peers.
    let mut group = Group::start(&root, 3, &[]).unwrap();
    let all_urls = group.all_urls();
    let _workers: Vec<Proc> = (1..=N_WORKERS)
        .map(|i| {
            start_worker(
                &all_urls,
                &format!("w{i}"),
                SLOTS,
                &[
                    "--throttle",
                    "off",
                    "--queue-depth",
                    &QUEUE_DEPTH.to_string(),
                ],
            )
            .unwrap()
        })
        .collect();

    // 2. Find the leader; wait for both workers to register with it.
    let leader = group.wait_leader(0, Duration::from_secs(30)).await;
    wait_ready(group.url(leader), N_WORKERS as usize)
        .await
        .unwrap();
    let status = cluster_status(group.url(leader)).await.unwrap();
    let addresses: BTreeMap<u64, String> = status
        .members
        .iter()
        .map(|m| (m.id, m.address.clone()))
        .collect();
    assert_eq!(addresses.len(), 3, "{status:?}");
    assert_eq!(addresses[&leader], group.url(leader));
    let follower = (1..=3).find(|&id| id != leader).unwrap();

    let body = "sleep 0.1";
    let spec = format!(
        r#"
name = "failover"
[[task]]
id = "fan"
array = {N_MICRO_TASKS}
run = {fan}
[[task]]
id = "after"
deps = ["fan"]
run = {after}
"#,
        fan = toml_str(&recording(&work, body)),
        after = toml_str(&recording(&work, "true")),
    );
    let (wave_id, tried) =
        submit_following_leader(&addresses[&follower], &spec, Duration::from_secs(20))
            .await
            .unwrap();
    assert_eq!(
        tried,
        vec![addresses[&follower].clone(), addresses[&leader].clone()],
        "a follower refuses the submission and names the leader"
    );

    // 3. Kill the leader twice while the wave runs, restarting each killed member.
    let mut leader = leader;
    let mut killed = Vec::new();
    let mut failover_ms = Vec::new();
    let mut resume_ms = Vec::new();
    let mut rejoin_ms = Vec::new();
    let mut progress_at_kill = Vec::new();
    for round in 0..N_KILLS {
        let before = get_wave(group.url(leader), wave_id)
            .await
            .and_then(|w| w.counts)
            .map_or(0, |c| c.succeeded);
        group
            .wait_succeeded(leader, wave_id, before + 20, Duration::from_secs(30))
            .await;
        // Whoever leads now (normally still `leader`) is the one to kill.
        leader = group.wait_leader(0, Duration::from_secs(20)).await;
        let summary = get_wave(group.url(leader), wave_id).await.unwrap();
        assert_eq!(
            summary.state(),
            pb::WaveState::Running,
            "kill {round}: the wave must still be running when its leader dies: {summary:?}"
        );
        let at_kill = summary.counts.as_ref().map_or(0, |c| c.succeeded);
        progress_at_kill.push(at_kill);

        let victim = group.kill9(leader);
        let t_kill = Instant::now();
        killed.push(leader);
        let new_leader = group.wait_leader(leader, Duration::from_secs(20)).await;
        failover_ms.push(t_kill.elapsed().as_millis());
        assert_ne!(new_leader, leader);

        group.restart(leader, victim).unwrap();
        let t_restart = Instant::now();
        // The restarted member catches up while the workers find the new leader and the
        // wave moves on (more than the few results that could have reached the old
        // leader just before it died).
        tokio::join!(
            async {
                group
                    .wait_caught_up(leader, new_leader, Duration::from_secs(20))
                    .await;
                rejoin_ms.push(t_restart.elapsed().as_millis());
            },
            async {
                let target = at_kill + u64::from(N_WORKERS * SLOTS) + 1;
                group
                    .wait_succeeded(new_leader, wave_id, target, Duration::from_secs(30))
                    .await;
                resume_ms.push(t_kill.elapsed().as_millis());
            }
        );
        leader = new_leader;
    }
    assert_ne!(killed[0], killed[1], "two different leaders were killed");

    // 4. The wave finishes; read it from any live member.
    let summary = group.wait_finished(wave_id, Duration::from_secs(60)).await;
    assert_eq!(summary.state(), pb::WaveState::Succeeded, "{summary:?}");
    assert_eq!(summary.n_micro_tasks, u64::from(N_MICRO_TASKS) + 1);

    // Reads are linearizable (ReadIndex): once any member has answered "succeeded", a
    // single read from every member, followers included, says so too — no polling.
    for id in group.live_ids() {
        let w = get_wave(group.url(id), wave_id)
            .await
            .unwrap_or_else(|| panic!("member {id} did not answer GetWave"));
        assert_eq!(
            w.state(),
            pb::WaveState::Succeeded,
            "member {id} answered a stale read: {w:?}"
        );
    }

    let tasks = list_tasks(group.url(leader), wave_id).await.unwrap();
    assert_eq!(tasks.len(), N_MICRO_TASKS as usize + 1);
    let not_succeeded: Vec<_> = tasks
        .iter()
        .filter(|t| t.state() != pb::TaskState::Succeeded)
        .collect();
    assert!(not_succeeded.is_empty(), "{not_succeeded:?}");
    let redispatched = tasks.iter().filter(|t| t.attempt > 1).count();

    // Every micro-task ran at least once; re-runs are bounded by what can be in flight.
    let records = read_records(&work).unwrap();
    let mut runs: BTreeMap<(String, String), Vec<&Record>> = BTreeMap::new();
    for r in &records {
        runs.entry((r.task.clone(), r.index.clone()))
            .or_default()
            .push(r);
    }
    let missing: Vec<u32> = (0..N_MICRO_TASKS)
        .filter(|i| !runs.contains_key(&("fan".to_string(), i.to_string())))
        .collect();
    assert!(missing.is_empty(), "fan[i] never ran for i in {missing:?}");
    let after_runs: Vec<&Record> = records.iter().filter(|r| r.task == "after").collect();
    assert!(!after_runs.is_empty(), "`after` never ran");
    assert_eq!(runs.len(), N_MICRO_TASKS as usize + 1, "unexpected records");
    let reruns: usize = runs.values().map(|v| v.len() - 1).sum();
    let in_flight_bound = (N_WORKERS * (SLOTS + QUEUE_DEPTH)) as usize;
    assert!(
        reruns <= in_flight_bound,
        "{reruns} re-runs after {N_KILLS} leader kills; at most {in_flight_bound} \
         micro-tasks can be in flight at once"
    );
    // `after` started once every fan[i] had finished (at least one run of it).
    let after_start = after_runs.iter().map(|r| r.start_ns).min().unwrap();
    let late: Vec<_> = runs
        .iter()
        .filter(|((task, _), _)| task == "fan")
        .filter(|(_, v)| v.iter().map(|r| r.end_ns).min().unwrap() > after_start)
        .map(|(k, _)| k.clone())
        .collect();
    assert!(late.is_empty(), "`after` started before {late:?} finished");

    // 5. Every member, asked directly, reports the same applied wave once caught up.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut views = Vec::new();
        for id in 1..=3 {
            views.push((
                id,
                get_wave(group.url(id), wave_id).await,
                list_tasks(group.url(id), wave_id).await,
            ));
        }
        let agree = views
            .iter()
            .all(|(_, w, t)| w.as_ref() == Some(&summary) && t.as_ref() == Some(&tasks));
        if agree {
            break;
        }
        if Instant::now() > deadline {
            let differing: Vec<_> = views
                .iter()
                .filter(|(_, w, _)| w.as_ref() != Some(&summary))
                .map(|(id, w, _)| (id, w.clone()))
                .collect();
            panic!(
                "members disagree about wave {wave_id} after 10 s; reference {summary:?}, \
                 differing summaries {differing:?}, task lists equal: {:?}",
                views
                    .iter()
                    .map(|(id, _, t)| (id, t.as_ref() == Some(&tasks)))
                    .collect::<Vec<_>>()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    eprintln!(
        "replicated: killed leaders {killed:?} at {progress_at_kill:?} succeeded; \
         failover {failover_ms:?} ms; progress resumed {resume_ms:?} ms after the kill; \
         rejoin {rejoin_ms:?} ms; {reruns} re-runs, \
         {redispatched} micro-tasks re-dispatched; total {:?}",
        test_start.elapsed()
    );
}
