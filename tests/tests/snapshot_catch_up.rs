//! Log compaction and snapshot catch-up in a three-coordinator raft group run in-process
//! on loopback: one follower is stopped, the other two commit enough waves to compact
//! their logs past everything the stopped follower holds (checked by opening their sled
//! stores while they are down), then all three restart on their data dirs. The follower
//! can only catch up by installing a state-machine snapshot, and afterwards must answer
//! `GetWave` for every wave exactly as the leader does.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use venom_coordinator::storage::Store;
use venom_coordinator::CoordinatorConfig;
use venom_proto::v1 as pb;
use venom_tests::client;

/// The leader compacts once this many applied entries pile up (keeping half of them).
const COMPACT_AFTER_ENTRIES: u64 = 20;
/// Waves submitted while the follower is down: each is at least one raft entry.
const N_WAVES_WHILE_DOWN: u64 = 80;

/// `(first_index, last_index)` of the raft log stored in `dir` (the member must be down).
fn log_bounds(dir: &Path) -> (u64, u64) {
    let store = Store::open(dir).expect("open a stopped member's store");
    (
        store.first_log_index().expect("first index"),
        store.last_log_index().expect("last index"),
    )
}

/// One in-process coordinator.
struct Member {
    id: u64,
    port: u16,
    dir: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Member {
    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn start(&mut self, listener: TcpListener, ports: &[u16]) {
        let addr = listener.local_addr().unwrap();
        let mut config = CoordinatorConfig::single_node(addr, self.dir.clone());
        config.id = self.id;
        config.peers = ports
            .iter()
            .enumerate()
            .map(|(i, port)| format!("{}=127.0.0.1:{port}", i + 1))
            .collect();
        config.compact_after_entries = COMPACT_AFTER_ENTRIES;
        let files = venom_tests::pki::pki().files(venom_tls::Role::Member, &self.id.to_string());
        config.tls = venom_tls::TlsArgs {
            tls_ca: Some(files.ca),
            tls_cert: Some(files.cert),
            tls_key: Some(files.key),
        };
        config.tick_ms = 50;
        let (stop, stopped) = oneshot::channel();
        self.stop = Some(stop);
        self.task = Some(tokio::spawn(venom_coordinator::run(
            config,
            listener,
            async move {
                let _ = stopped.await;
            },
        )));
    }

    /// Binds its old port again (the previous listener is closed) and starts.
    async fn restart(&mut self, ports: &[u16]) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let listener = loop {
            match TcpListener::bind(("127.0.0.1", self.port)).await {
                Ok(listener) => break listener,
                Err(e) if Instant::now() < deadline => {
                    eprintln!("rebinding port {}: {e}", self.port);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("cannot rebind port {}: {e}", self.port),
            }
        };
        self.start(listener, ports);
    }

    async fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let result = tokio::time::timeout(Duration::from_secs(15), task)
                .await
                .expect("coordinator stops within 15 s")
                .expect("coordinator task did not panic");
            result.expect("coordinator ran without error");
        }
    }
}

async fn cluster_status(url: &str) -> Option<pb::ClusterStatusResponse> {
    let mut c = client(url).await.ok()?;
    c.cluster_status(pb::ClusterStatusRequest::default())
        .await
        .ok()
        .map(|r| r.into_inner())
}

/// Waits until a member reports a leader; returns its id.
async fn wait_leader(members: &[Member]) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        for m in members.iter().filter(|m| m.task.is_some()) {
            if let Some(status) = cluster_status(&m.url()).await {
                if status.leader_id != 0 {
                    return status.leader_id;
                }
            }
        }
        assert!(Instant::now() < deadline, "no leader elected in 30 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn submit_wave(url: &str, name: &str) -> u64 {
    let spec = format!("name = \"{name}\"\n[[task]]\nid = \"a\"\nrun = \"true\"\n");
    let mut c = client(url).await.unwrap();
    c.submit_wave(pb::SubmitWaveRequest {
        spec: spec.into_bytes(),
        format: "toml".into(),
        traceparent: String::new(),
        submission_id: String::new(),
    })
    .await
    .expect("leader accepts the wave")
    .into_inner()
    .wave_id
}

/// Every wave as one member answers `GetWave` (`None` where it answers an error).
async fn waves(url: &str, ids: &[u64]) -> BTreeMap<u64, Option<pb::WaveSummary>> {
    let mut out = BTreeMap::new();
    let Ok(mut c) = client(url).await else {
        return ids.iter().map(|id| (*id, None)).collect();
    };
    for id in ids {
        let answer = c
            .get_wave(pb::GetWaveRequest { wave_id: *id })
            .await
            .ok()
            .map(|r| r.into_inner());
        out.insert(*id, answer);
    }
    out
}

fn member_dir(root: &Path, id: u64) -> PathBuf {
    root.join(format!("coordinator-{id}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stopped_follower_catches_up_by_snapshot_after_compaction() {
    let root = tempfile::tempdir().unwrap();
    let mut listeners = Vec::new();
    for _ in 0..3 {
        listeners.push(TcpListener::bind("127.0.0.1:0").await.unwrap());
    }
    let ports: Vec<u16> = listeners
        .iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect();
    let mut members: Vec<Member> = (1..=3u64)
        .map(|id| Member {
            id,
            port: ports[id as usize - 1],
            dir: member_dir(root.path(), id),
            stop: None,
            task: None,
        })
        .collect();
    for (m, listener) in members.iter_mut().zip(listeners) {
        m.start(listener, &ports);
    }

    let leader = wait_leader(&members).await;
    let leader_url = members[leader as usize - 1].url();
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(submit_wave(&leader_url, &format!("before-{i}")).await);
    }
    let follower = if leader == 1 { 2 } else { 1 };
    let other = 6 - leader - follower;
    // The follower applies what it has before it stops.
    let deadline = Instant::now() + Duration::from_secs(20);
    let leader_commit = cluster_status(&leader_url).await.unwrap().commit_index;
    loop {
        let status = cluster_status(&members[follower as usize - 1].url()).await;
        if status.is_some_and(|s| s.applied_index >= leader_commit) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "follower never applied the first waves"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    members[follower as usize - 1].stop().await;
    let (_, follower_last) = log_bounds(&members[follower as usize - 1].dir);

    for i in 0..N_WAVES_WHILE_DOWN {
        ids.push(submit_wave(&leader_url, &format!("while-down-{i}")).await);
    }
    // Several checkpoint intervals, so the last checkpoint and compaction happen.
    tokio::time::sleep(Duration::from_millis(800)).await;
    members[leader as usize - 1].stop().await;
    members[other as usize - 1].stop().await;
    for id in [leader, other] {
        let (first, last) = log_bounds(&members[id as usize - 1].dir);
        assert!(
            first > follower_last + 1,
            "member {id}'s log (first {first}, last {last}) still holds what follower \
             {follower} lacks after its index {follower_last}: compaction did not happen"
        );
    }

    members[leader as usize - 1].restart(&ports).await;
    members[other as usize - 1].restart(&ports).await;
    let leader = wait_leader(&members).await;
    members[follower as usize - 1].restart(&ports).await;

    let leader_url = members[leader as usize - 1].url();
    let follower_url = members[follower as usize - 1].url();
    let expected = waves(&leader_url, &ids).await;
    assert!(
        expected.values().all(Option::is_some),
        "the leader answers for every wave"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = waves(&follower_url, &ids).await;
        if got == expected {
            break;
        }
        let missing = got.values().filter(|w| w.is_none()).count();
        assert!(
            Instant::now() < deadline,
            "follower {follower} did not catch up in 30 s ({missing} of {} waves missing)",
            ids.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    for m in &mut members {
        m.stop().await;
    }
    // The follower's log now starts after the snapshot it installed.
    let (first, _) = log_bounds(&member_dir(root.path(), follower));
    assert!(
        first > follower_last + 1,
        "follower's log starts at {first}: it was not rebuilt from a snapshot"
    );
}
