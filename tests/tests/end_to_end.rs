//! End to end with the real binaries on loopback: one `venom-coordinator` and two
//! `venom-worker` processes per test, waves submitted over gRPC, micro-tasks that record
//! what they did in files, and crashes delivered with SIGKILL.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::time::Duration;

use venom_proto::v1 as pb;
use venom_tests::*;

const WAIT: Duration = Duration::from_secs(90);

struct Cluster {
    _dir: tempfile::TempDir,
    work: std::path::PathBuf,
    coordinator: Coordinator,
    workers: Vec<Proc>,
}

impl Cluster {
    async fn start(
        n_workers: usize,
        slots: u32,
        coordinator_args: &[&str],
        worker_args: &[&str],
    ) -> Cluster {
        let dir = tempfile::tempdir().unwrap();
        let work = dir.path().join("work");
        std::fs::create_dir_all(&work).unwrap();
        let coordinator =
            Coordinator::start(&dir.path().join("coordinator"), coordinator_args).unwrap();
        let workers = (0..n_workers)
            .map(|i| {
                start_worker(
                    &coordinator.url(),
                    &format!("w{}", i + 1),
                    slots,
                    worker_args,
                )
                .unwrap()
            })
            .collect();
        wait_ready(&coordinator.url(), n_workers).await.unwrap();
        Cluster {
            _dir: dir,
            work,
            coordinator,
            workers,
        }
    }

    fn url(&self) -> String {
        self.coordinator.url()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dag_order_and_per_node_concurrency_hold() {
    let cluster = Cluster::start(2, 2, &[], &["--throttle", "off"]).await;
    let w = &cluster.work;
    let body = "sleep 0.05";
    let spec = format!(
        r#"
name = "dag"
[[task]]
id = "a"
run = {a}
[[task]]
id = "fan"
array = 12
deps = ["a"]
run = {fan}
[[task]]
id = "b"
deps = ["a"]
run = {b}
[[task]]
id = "join"
deps = ["fan", "b"]
run = {join}
"#,
        a = toml_str(&recording(w, body)),
        fan = toml_str(&recording(w, body)),
        b = toml_str(&recording(w, body)),
        join = toml_str(&recording(w, body)),
    );
    let mut c = client(&cluster.url()).await.unwrap();
    let id = submit(&mut c, &spec).await.unwrap();
    let summary = wait_wave(&cluster.url(), id, WAIT).await.unwrap();
    assert_eq!(summary.state(), pb::WaveState::Succeeded, "{summary:?}");
    let records = read_records(w).unwrap();
    assert_eq!(
        records.len(),
        15,
        "every micro-task ran exactly once: {records:?}"
    );
    let end_of = |task: &str| {
        records
            .iter()
            .filter(|r| r.task == task)
            .map(|r| r.end_ns)
            .max()
            .unwrap()
    };
    let start_of = |task: &str| {
        records
            .iter()
            .filter(|r| r.task == task)
            .map(|r| r.start_ns)
            .min()
            .unwrap()
    };
    assert!(
        start_of("fan") >= end_of("a"),
        "fan started before a finished"
    );
    assert!(start_of("b") >= end_of("a"), "b started before a finished");
    assert!(
        start_of("join") >= end_of("fan"),
        "join started before every fan[i] finished"
    );
    assert!(
        start_of("join") >= end_of("b"),
        "join started before b finished"
    );
    for node in ["w1", "w2"] {
        let max = max_concurrency(&records, node);
        assert!(
            max <= 2,
            "node {node} ran {max} micro-tasks at once with 2 slots"
        );
    }
    // Both nodes took part: placement spreads load.
    assert!(records.iter().any(|r| r.node == "w1") && records.iter().any(|r| r.node == "w2"));
    assert!(summary.work_ms > 0 && summary.makespan_ms > 0);
    assert!(
        summary.measured_speedup > 0.0 && summary.dag_bound >= 1.0,
        "{summary:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_task_is_retried_then_its_dependents_are_skipped() {
    let cluster = Cluster::start(2, 2, &[], &[]).await;
    let w = cluster.work.display().to_string();
    let spec = format!(
        r#"
name = "retries"
on_failure = "skip-dependents"
[[task]]
id = "flaky"
retries = 2
run = 'echo $VENOM_ATTEMPT >> {w}/flaky; test "$VENOM_ATTEMPT" -ge 2'
[[task]]
id = "broken"
retries = 1
run = 'echo $VENOM_ATTEMPT >> {w}/broken; echo boom >&2; exit 3'
[[task]]
id = "after-broken"
deps = ["broken"]
run = 'touch {w}/after-broken'
[[task]]
id = "after-after"
deps = ["after-broken", "flaky"]
run = 'touch {w}/after-after'
[[task]]
id = "independent"
deps = ["flaky"]
run = 'touch {w}/independent'
"#
    );
    let mut c = client(&cluster.url()).await.unwrap();
    let id = submit(&mut c, &spec).await.unwrap();
    let summary = wait_wave(&cluster.url(), id, WAIT).await.unwrap();
    assert_eq!(summary.state(), pb::WaveState::Failed);
    let tasks: BTreeMap<String, pb::MicroTaskInfo> = tasks(&cluster.url(), id)
        .await
        .unwrap()
        .into_iter()
        .map(|t| (t.task_id.clone(), t))
        .collect();
    assert_eq!(tasks["flaky"].state(), pb::TaskState::Succeeded);
    assert_eq!(tasks["flaky"].attempt, 2);
    assert_eq!(tasks["broken"].state(), pb::TaskState::Failed);
    assert_eq!(tasks["broken"].attempt, 2, "one retry");
    assert_eq!(tasks["broken"].exit_code, Some(3));
    assert_eq!(tasks["after-broken"].state(), pb::TaskState::Skipped);
    assert_eq!(tasks["after-after"].state(), pb::TaskState::Skipped);
    assert_eq!(tasks["independent"].state(), pb::TaskState::Succeeded);
    assert_eq!(
        std::fs::read_to_string(format!("{w}/broken")).unwrap(),
        "1\n2\n"
    );
    assert!(!std::path::Path::new(&format!("{w}/after-broken")).exists());
    let logs = c
        .get_logs(pb::GetLogsRequest {
            wave_id: id,
            task_id: "broken".into(),
            index: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(logs.stderr, b"boom\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeout_kills_the_task_and_its_children() {
    let cluster = Cluster::start(1, 2, &[], &[]).await;
    let w = cluster.work.display().to_string();
    let spec = format!(
        r#"
name = "timeout"
[[task]]
id = "slow"
timeout = "1s"
run = 'sleep 60 & echo $! > {w}/child.pid; echo $$ > {w}/shell.pid; wait'
"#
    );
    let mut c = client(&cluster.url()).await.unwrap();
    let id = submit(&mut c, &spec).await.unwrap();
    let summary = wait_wave(&cluster.url(), id, WAIT).await.unwrap();
    assert_eq!(summary.state(), pb::WaveState::Failed);
    let t = &tasks(&cluster.url(), id).await.unwrap()[0];
    assert!(t.timed_out, "{t:?}");
    for f in ["child.pid", "shell.pid"] {
        let pid: i32 = std::fs::read_to_string(format!("{w}/{f}"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while pid_alive(pid) && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(!pid_alive(pid), "{f} ({pid}) survived the timeout");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_kills_running_processes_on_both_workers() {
    let cluster = Cluster::start(2, 2, &[], &["--throttle", "off"]).await;
    let w = cluster.work.display().to_string();
    let spec = format!(
        r#"
name = "to-cancel"
[[task]]
id = "sleepers"
array = 4
run = 'sleep 120 & echo $! > {w}/pid.$VENOM_TASK_INDEX.$VENOM_NODE; wait'
"#
    );
    let mut c = client(&cluster.url()).await.unwrap();
    let id = submit(&mut c, &spec).await.unwrap();
    // Wait until all four run (two per node).
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let n = std::fs::read_dir(&cluster.work).unwrap().count();
        if n == 4 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "sleepers never all started"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut pids = Vec::new();
    let mut nodes = std::collections::BTreeSet::new();
    for entry in std::fs::read_dir(&cluster.work).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        nodes.insert(name.rsplit('.').next().unwrap().to_string());
        pids.push(
            std::fs::read_to_string(&path)
                .unwrap()
                .trim()
                .parse::<i32>()
                .unwrap(),
        );
    }
    assert_eq!(nodes.len(), 2, "both workers run sleepers: {nodes:?}");
    assert!(pids.iter().all(|&p| pid_alive(p)));
    let n = c
        .cancel_wave(pb::CancelWaveRequest { wave_id: id })
        .await
        .unwrap()
        .into_inner()
        .n_cancelled;
    assert_eq!(n, 4);
    let summary = wait_wave(&cluster.url(), id, WAIT).await.unwrap();
    assert_eq!(summary.state(), pb::WaveState::Cancelled);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while pids.iter().any(|&p| pid_alive(p)) && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let alive: Vec<_> = pids.iter().filter(|&&p| pid_alive(p)).collect();
    assert!(alive.is_empty(), "still running after cancel: {alive:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_killed_mid_wave_has_its_tasks_finished_elsewhere() {
    let mut cluster =
        Cluster::start(2, 2, &["--worker-lease-ms", "1500"], &["--throttle", "off"]).await;
    let w = cluster.work.clone();
    let spec = format!(
        r#"
name = "survive-worker-loss"
[[task]]
id = "work"
array = 8
run = {body}
"#,
        body = toml_str(&recording(&w, "sleep 1"))
    );
    let mut c = client(&cluster.url()).await.unwrap();
    let id = submit(&mut c, &spec).await.unwrap();
    // Kill w1 once it is running something.
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let ts = tasks(&cluster.url(), id).await.unwrap();
        if ts
            .iter()
            .any(|t| t.node == "w1" && t.state() == pb::TaskState::Running)
        {
            break;
        }
        assert!(std::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cluster.workers[0].kill9();
    let summary = wait_wave(&cluster.url(), id, WAIT).await.unwrap();
    assert_eq!(summary.state(), pb::WaveState::Succeeded, "{summary:?}");
    let ts = tasks(&cluster.url(), id).await.unwrap();
    assert_eq!(ts.len(), 8);
    assert!(ts.iter().all(|t| t.state() == pb::TaskState::Succeeded));
    // Whatever w1 had not finished was re-run on w2 with a later attempt.
    let moved: Vec<_> = ts.iter().filter(|t| t.attempt > 1).collect();
    assert!(!moved.is_empty(), "w1's tasks were re-dispatched");
    assert!(moved.iter().all(|t| t.node == "w2"), "{moved:?}");
    let nodes = client(&cluster.url())
        .await
        .unwrap()
        .list_nodes(pb::ListNodesRequest {})
        .await
        .unwrap()
        .into_inner()
        .nodes;
    let w1 = nodes.iter().find(|n| n.name == "w1").unwrap();
    assert_eq!(w1.state(), pb::NodeState::Down);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_killed_mid_wave_resumes_without_rerunning_completed_tasks() {
    let mut cluster = Cluster::start(2, 2, &[], &["--throttle", "off"]).await;
    let w = cluster.work.clone();
    let spec = format!(
        r#"
name = "survive-coordinator-crash"
[[task]]
id = "first"
array = 6
run = {first}
[[task]]
id = "second"
array = 6
deps = ["first"]
run = {second}
"#,
        first = toml_str(&recording(&w, "sleep 0.3")),
        second = toml_str(&recording(&w, "sleep 0.3")),
    );
    let mut c = client(&cluster.url()).await.unwrap();
    let id = submit(&mut c, &spec).await.unwrap();
    // Crash once some micro-tasks have finished.
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let done = read_records(&w).unwrap().len();
        if done >= 3 {
            break;
        }
        assert!(std::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cluster.coordinator.kill9_and_restart().unwrap();
    let summary = wait_wave(&cluster.url(), id, WAIT).await.unwrap();
    assert_eq!(summary.state(), pb::WaveState::Succeeded, "{summary:?}");
    let records = read_records(&w).unwrap();
    let mut runs: BTreeMap<(String, String), usize> = BTreeMap::new();
    for r in &records {
        *runs.entry((r.task.clone(), r.index.clone())).or_default() += 1;
    }
    assert_eq!(runs.len(), 12, "every micro-task ran: {runs:?}");
    let twice: Vec<_> = runs.iter().filter(|(_, &n)| n > 1).collect();
    assert!(
        twice.is_empty(),
        "re-run after the coordinator restart: {twice:?}"
    );
}
