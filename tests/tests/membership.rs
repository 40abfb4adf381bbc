//! Membership changes with the real binaries on loopback: three founding coordinators, a
//! fourth added with `venomctl cluster add` and started with `--join` (it can only catch up
//! by snapshot: founding members start their logs after a snapshot point), then a follower
//! and the leader removed with `venomctl cluster remove`. Waves submitted before, between
//! and after the changes all succeed and every remaining member reports all of them;
//! `venomctl cluster` shows every member's own view; bad requests are refused with one
//! clear error and change nothing.
//!
//! Set `VENOM_KEEP_TEST_DIR=1` to keep the coordinators' data dirs and logs.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use tonic::transport::Channel;
use venom_proto::v1 as pb;
use venom_proto::v1::client_service_client::ClientServiceClient;
use venom_tests::*;

async fn quick_client(url: &str) -> Option<ClientServiceClient<Channel>> {
    let channel = endpoint(url)
        .ok()?
        .connect_timeout(Duration::from_millis(300))
        .timeout(Duration::from_secs(3))
        .connect()
        .await
        .ok()?;
    Some(ClientServiceClient::new(channel))
}

async fn own_status(url: &str) -> Option<pb::ClusterStatusResponse> {
    let mut c = quick_client(url).await?;
    c.cluster_status(pb::ClusterStatusRequest::default())
        .await
        .ok()
        .map(|r| r.into_inner())
}

/// The id of the member that says it leads, asking each of `urls`.
async fn find_leader(urls: &BTreeMap<u64, String>, timeout: Duration) -> u64 {
    let deadline = Instant::now() + timeout;
    loop {
        for (&id, url) in urls {
            if let Some(s) = own_status(url).await {
                let own = s.members.iter().find(|m| m.reported);
                if s.leader_id == id && own.is_some_and(|m| m.role() == pb::MemberRole::Leader) {
                    return id;
                }
            }
        }
        assert!(Instant::now() < deadline, "no leader among {urls:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wave_names(url: &str) -> Option<Vec<(u64, String, pb::WaveState)>> {
    let mut c = quick_client(url).await?;
    let waves = c
        .list_waves(pb::ListWavesRequest::default())
        .await
        .ok()?
        .into_inner()
        .waves;
    Some(
        waves
            .into_iter()
            .map(|w| {
                let state = w.state();
                (w.wave_id, w.name, state)
            })
            .collect(),
    )
}

async fn run_wave(urls: &BTreeMap<u64, String>, name: &str, work: &std::path::Path) -> u64 {
    let spec = format!(
        "name = \"{name}\"\n[[task]]\nid = \"t\"\narray = 8\nrun = '''{}'''\n",
        recording(work, "true")
    );
    let any = urls.values().next().unwrap();
    let (wave_id, _) = submit_following_leader(any, &spec, Duration::from_secs(20))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        for url in urls.values() {
            if let Some(waves) = wave_names(url).await {
                if let Some((_, _, state)) = waves.iter().find(|(id, _, _)| *id == wave_id) {
                    if *state == pb::WaveState::Succeeded {
                        return wave_id;
                    }
                    assert!(
                        matches!(state, pb::WaveState::Running | pb::WaveState::Pending),
                        "wave {name} ended {state:?}"
                    );
                }
            }
        }
        assert!(Instant::now() < deadline, "wave {name} did not finish");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_are_added_and_removed_one_at_a_time_and_waves_keep_running() {
    let dir = test_dir("membership").unwrap();
    let root = dir.path.clone();
    let work = root.join("work");
    std::fs::create_dir_all(&work).unwrap();

    let ports: Vec<u16> = (0..4).map(|_| free_port()).collect();
    let founders = (0..3)
        .map(|i| format!("{}=127.0.0.1:{}", i + 1, ports[i]))
        .collect::<Vec<_>>()
        .join(",");
    let mut procs: BTreeMap<u64, Coordinator> = BTreeMap::new();
    for i in 0..3u64 {
        let c = Coordinator::start_member(
            i + 1,
            ports[i as usize],
            &founders,
            &root.join(format!("c{}", i + 1)),
            &["--compact-after-entries", "20"],
        )
        .unwrap();
        procs.insert(i + 1, c);
    }
    let mut urls: BTreeMap<u64, String> = procs.iter().map(|(&id, c)| (id, c.url())).collect();
    let founder_urls = urls.values().cloned().collect::<Vec<_>>().join(",");
    let _worker = start_worker(&founder_urls, "w1", 4, &["--throttle", "off"]).unwrap();
    let leader = find_leader(&urls, Duration::from_secs(30)).await;
    wait_ready(&urls[&leader], 1).await.unwrap();

    // Enough waves that the founders compact their logs past the join point.
    let mut waves = Vec::new();
    for i in 0..4 {
        waves.push(run_wave(&urls, &format!("before-{i}"), &work).await);
    }

    // Bad requests: one clear error each, non-zero exit, nothing changes.
    let (ok, _, err) = venomctl(&founder_urls, &["cluster", "add", "2", "127.0.0.1:1"]);
    assert!(!ok && err.contains("already a member"), "{err}");
    let (ok, _, err) = venomctl(&founder_urls, &["cluster", "add", "9", "no-port-here"]);
    assert!(!ok && err.contains("address"), "{err}");
    let (ok, _, err) = venomctl(&founder_urls, &["cluster", "remove", "42"]);
    assert!(!ok && err.contains("not a member"), "{err}");
    let address_in_use = urls[&1].trim_start_matches("http://").to_string();
    let (ok, _, err) = venomctl(&founder_urls, &["cluster", "add", "9", &address_in_use]);
    assert!(
        !ok && err.contains("already belongs to coordinator 1"),
        "{err}"
    );

    // Add member 4, then start it with --join: it catches up by snapshot.
    let addr4 = format!("127.0.0.1:{}", ports[3]);
    let (ok, out, err) = venomctl(&founder_urls, &["cluster", "add", "4", &addr4]);
    assert!(ok, "cluster add failed: {out}{err}");
    let t_start = Instant::now();
    let joiner = Coordinator::start_member(
        4,
        ports[3],
        &founders,
        &root.join("c4"),
        &["--join", "--compact-after-entries", "20"],
    )
    .unwrap();
    urls.insert(4, joiner.url());
    procs.insert(4, joiner);
    let target = own_status(&urls[&leader]).await.unwrap().commit_index;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(s) = own_status(&urls[&4]).await {
            if s.applied_index >= target && s.leader_id == leader {
                break;
            }
        }
        assert!(Instant::now() < deadline, "member 4 did not catch up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let catch_up = t_start.elapsed();
    // Member 4 answers reads with every wave (linearizable, through ReadIndex).
    let on_4 = wave_names(&urls[&4]).await.unwrap();
    for id in &waves {
        assert!(
            on_4.iter()
                .any(|(w, _, s)| w == id && *s == pb::WaveState::Succeeded),
            "{on_4:?}"
        );
    }

    // `venomctl cluster` (any member) shows every member's own view.
    let (ok, out, err) = venomctl(&urls[&4], &["--output", "json", "cluster"]);
    assert!(ok, "{err}");
    let view: serde_json::Value = serde_json::from_str(&out).unwrap();
    let rows = view["members"].as_array().unwrap();
    assert_eq!(rows.len(), 4, "{out}");
    for row in rows {
        let role = row["role"].as_str().unwrap();
        assert!(role == "leader" || role == "follower", "{out}");
        assert!(row["applied_index"].as_u64().unwrap() > 1, "{out}");
        assert!(row["term"].as_u64().unwrap() >= 2, "{out}");
    }
    let (ok, table, _) = venomctl(&urls[&1], &["cluster"]);
    assert!(ok);
    for id in 1..=4 {
        assert!(table.contains(&urls[&id]), "{table}");
    }

    waves.push(run_wave(&urls, "with-four", &work).await);

    // Remove a follower, then the leader itself (it hands leadership over first).
    let follower = (1..=3).find(|&id| id != leader).unwrap();
    let (ok, out, err) = venomctl(&urls[&4], &["cluster", "remove", &follower.to_string()]);
    assert!(ok, "remove follower: {out}{err}");
    procs.remove(&follower).unwrap().proc.kill9();
    urls.remove(&follower);
    waves.push(run_wave(&urls, "after-follower-removed", &work).await);

    let leader_url = urls[&leader].clone();
    let t_remove = Instant::now();
    let (ok, out, err) = venomctl(&leader_url, &["cluster", "remove", &leader.to_string()]);
    assert!(ok, "remove leader: {out}{err}");
    let handover = t_remove.elapsed();
    procs.remove(&leader).unwrap().proc.kill9();
    urls.remove(&leader);
    let new_leader = find_leader(&urls, Duration::from_secs(20)).await;
    assert_ne!(new_leader, leader);
    waves.push(run_wave(&urls, "after-leader-removed", &work).await);

    // Two members remain; both list exactly each other and report every wave.
    for (&id, url) in &urls {
        let s = own_status(url).await.unwrap();
        let ids: Vec<u64> = s.members.iter().map(|m| m.id).collect();
        assert_eq!(
            ids,
            urls.keys().copied().collect::<Vec<_>>(),
            "member {id}: {s:?}"
        );
        let listed = wave_names(url).await.unwrap();
        for w in &waves {
            assert!(
                listed
                    .iter()
                    .any(|(x, _, s)| x == w && *s == pb::WaveState::Succeeded),
                "member {id} misses wave {w}: {listed:?}"
            );
        }
    }
    // Member 4's log starts after a snapshot point: it never held the founders' early
    // entries, so it can only have caught up by installing a snapshot.
    let mut four = procs.remove(&4).unwrap();
    four.proc.terminate(Duration::from_secs(10));
    let store = venom_coordinator::storage::Store::open(&root.join("c4")).unwrap();
    assert!(store.first_log_index().unwrap() > 1);
    assert!(store.persisted_applied().unwrap() > 1);
    eprintln!(
        "membership: member 4 caught up by snapshot in {catch_up:?}; removing the leader \
         (hand-over + commit) took {handover:?}; {} waves all succeeded",
        waves.len()
    );
}
