//! The worker agent against a fake coordinator: a tonic `WorkerService` on 127.0.0.1:0 whose
//! streams each test drives by hand, message by message (and a member that refuses every
//! stream as "not leader", the way a coordinator's follower does). The fake grants a lease
//! for every registration and heartbeat, as a leader does once it committed them, up to a
//! budget a test can set.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::TcpIncoming;
use tonic::transport::Server;
use tonic::{Request, Response, Status, Streaming};
use venom_proto::worker_service_server::{WorkerService, WorkerServiceServer};
use venom_proto::{
    Assignment, AttemptRef, CoordinatorMessage, LeaseGrant, TaskFinished, WorkerMessage,
};
use venom_worker::WorkerConfig;

/// Upper bound on any single wait in these tests.
const PATIENCE: Duration = Duration::from_secs(30);

/// One worker stream, as the fake coordinator sees it.
struct Connection {
    inbound: mpsc::Receiver<WorkerMessage>,
    outbound: mpsc::Sender<Result<CoordinatorMessage, Status>>,
}

impl Connection {
    async fn next(&mut self) -> WorkerMessage {
        tokio::time::timeout(PATIENCE, self.inbound.recv())
            .await
            .expect("the worker sends within the patience window")
            .expect("the worker keeps the stream open")
    }

    async fn send(&self, message: CoordinatorMessage) {
        self.outbound
            .send(Ok(message))
            .await
            .expect("the worker is listening");
    }

    /// Reads messages until `n` results arrived; returns them by micro index, with the most
    /// tasks seen started-but-not-finished at once.
    async fn collect_finished(&mut self, n: usize) -> BTreeMap<u32, TaskFinished> {
        let mut results = BTreeMap::new();
        while results.len() < n {
            let message = self.next().await;
            assert!(message.register.is_none(), "register only opens a stream");
            for finished in message.finished {
                let micro = finished.attempt.expect("results name their attempt").micro;
                results.insert(micro, finished);
            }
        }
        results
    }
}

struct FakeCoordinator {
    connections: mpsc::Sender<Connection>,
    /// Lease grants left to give (each registration or heartbeat takes one).
    grants: Arc<AtomicU64>,
    lease_ms: u64,
}

#[tonic::async_trait]
impl WorkerService for FakeCoordinator {
    type ConnectStream = ReceiverStream<Result<CoordinatorMessage, Status>>;

    async fn connect(
        &self,
        request: Request<Streaming<WorkerMessage>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        let (outbound, receiver) = mpsc::channel(64);
        let (to_test, inbound) = mpsc::channel(4096);
        let mut raw = request.into_inner();
        let grants = Arc::clone(&self.grants);
        let lease_ms = self.lease_ms;
        let granting = outbound.clone();
        // Passes every message to the test, granting a lease for registrations and heartbeats
        // first; ends (dropping its sender) once the test has dropped the connection.
        tokio::spawn(async move {
            while let Ok(Some(message)) = raw.message().await {
                let renews = message.register.is_some() || message.heartbeat.is_some();
                let granted = renews
                    && grants
                        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                        .is_ok();
                if granted {
                    let grant = CoordinatorMessage {
                        lease: Some(LeaseGrant {
                            seq: message.seq,
                            lease_ms,
                        }),
                        ..Default::default()
                    };
                    if granting.send(Ok(grant)).await.is_err() {
                        break;
                    }
                }
                if to_test.send(message).await.is_err() {
                    break;
                }
            }
        });
        self.connections
            .send(Connection { inbound, outbound })
            .await
            .map_err(|_| Status::unavailable("the test is over"))?;
        Ok(Response::new(ReceiverStream::new(receiver)))
    }
}

/// Starts a fake coordinator that grants a minute's lease for every registration and
/// heartbeat; returns its URL and the streams workers open to it.
async fn fake_coordinator() -> (String, mpsc::Receiver<Connection>) {
    fake_coordinator_granting(u64::MAX, 60_000).await
}

/// Starts a fake coordinator that grants `grants` leases of `lease_ms` in all.
async fn fake_coordinator_granting(
    grants: u64,
    lease_ms: u64,
) -> (String, mpsc::Receiver<Connection>) {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind a free port");
    let address = listener.local_addr().expect("bound address");
    let (connections, receiver) = mpsc::channel(8);
    // TCP_NODELAY, as the real coordinator sets it: small messages must not wait on Nagle.
    let incoming = TcpIncoming::from_listener(listener, true, None).expect("wrap the listener");
    tokio::spawn(
        Server::builder()
            .add_service(WorkerServiceServer::new(FakeCoordinator {
                connections,
                grants: Arc::new(AtomicU64::new(grants)),
                lease_ms,
            }))
            .serve_with_incoming(incoming),
    );
    (format!("http://{address}"), receiver)
}

/// A member that is not the leader: it reads each stream's first message, hands it to the
/// test, then refuses the stream as "not leader", naming `leader`.
struct RefusingCoordinator {
    leader: String,
    first_messages: mpsc::Sender<WorkerMessage>,
}

#[tonic::async_trait]
impl WorkerService for RefusingCoordinator {
    type ConnectStream = ReceiverStream<Result<CoordinatorMessage, Status>>;

    async fn connect(
        &self,
        request: Request<Streaming<WorkerMessage>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        let mut inbound = request.into_inner();
        if let Some(first) = inbound.message().await? {
            let _ = self.first_messages.send(first).await;
        }
        Err(venom_proto::leader::not_leader(Some(&self.leader)))
    }
}

/// Starts a member that refuses every stream, naming `leader`; returns its URL and the first
/// message of each stream a worker opened to it.
async fn refusing_coordinator(leader: String) -> (String, mpsc::Receiver<WorkerMessage>) {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind a free port");
    let address = listener.local_addr().expect("bound address");
    let (first_messages, receiver) = mpsc::channel(8);
    let incoming = TcpIncoming::from_listener(listener, true, None).expect("wrap the listener");
    tokio::spawn(
        Server::builder()
            .add_service(WorkerServiceServer::new(RefusingCoordinator {
                leader,
                first_messages,
            }))
            .serve_with_incoming(incoming),
    );
    (format!("http://{address}"), receiver)
}

async fn accept(connections: &mut mpsc::Receiver<Connection>) -> Connection {
    tokio::time::timeout(PATIENCE, connections.recv())
        .await
        .expect("the worker connects within the patience window")
        .expect("the server is running")
}

/// Starts a worker; returns the shutdown trigger and its task.
fn start_worker(
    coordinators: Vec<String>,
    slots: u32,
) -> (oneshot::Sender<()>, JoinHandle<anyhow::Result<()>>) {
    // Log everything the worker says (captured per test): every log statement's arguments are
    // then evaluated, as they are in production.
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter("venom_worker=debug")
        .try_init();
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let mut config = WorkerConfig::for_dev(String::new(), Some(slots), "test-node".to_owned());
    config.coordinators = coordinators;
    // A data dir of its own per worker (tests run side by side in one process).
    config.data_dir = Some(std::env::temp_dir().join(format!(
        "venom-agent-test-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )));
    config.heartbeat_ms = 50;
    config.labels = vec![("zone".to_owned(), "test".to_owned())];
    let (stop, stopped) = oneshot::channel::<()>();
    let worker = tokio::spawn(venom_worker::run(config, async {
        let _ = stopped.await;
    }));
    (stop, worker)
}

async fn stop_worker(stop: oneshot::Sender<()>, worker: JoinHandle<anyhow::Result<()>>) {
    let _ = stop.send(());
    tokio::time::timeout(PATIENCE, worker)
        .await
        .expect("the worker stops promptly")
        .expect("the worker task did not panic")
        .expect("the worker exits cleanly");
}

fn attempt(micro: u32) -> AttemptRef {
    AttemptRef {
        wave_id: 1,
        micro,
        attempt: 0,
    }
}

fn shell_assignment(micro: u32, shell: String) -> Assignment {
    Assignment {
        attempt: Some(attempt(micro)),
        wave_name: "test".to_owned(),
        task_id: "task".to_owned(),
        index: Some(micro),
        shell,
        cpus: 1,
        ..Default::default()
    }
}

/// True when `pid` no longer runs (gone, or a zombie nobody reaped yet).
fn process_is_dead(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state == "Z" || state == "X"),
    }
}

async fn wait_for_file(path: &Path) -> String {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        if let Ok(text) = std::fs::read_to_string(path) {
            if text.ends_with('\n') {
                return text;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_assignments_one_at_a_time_and_resends_only_unacknowledged_results() {
    let (url, mut connections) = fake_coordinator().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let log = dir.path().join("log");
    let (stop, worker) = start_worker(vec![url], 4);

    let mut first = accept(&mut connections).await;
    let register = first
        .next()
        .await
        .register
        .expect("the first message registers");
    assert_eq!(register.name, "test-node");
    assert_eq!(register.slots, 4);
    assert_eq!(register.queue_depth, 32);
    assert_eq!(
        register.throttle_policy(),
        venom_proto::ThrottlePolicy::Adaptive
    );
    assert_eq!(
        register.labels.get("zone").map(String::as_str),
        Some("test")
    );
    let profile = register
        .profile
        .expect("the register carries the hardware profile");
    assert!(profile.cpu_logical_cores >= 1 && profile.memory_total_bytes > 0);
    assert!(register.running.is_empty() && register.unacknowledged.is_empty());

    let exit_codes = [0, 3, 7];
    let assign = exit_codes
        .iter()
        .zip(0u32..)
        .map(|(code, micro)| {
            shell_assignment(
                micro,
                format!(
                    "echo start $VENOM_TASK_INDEX >> {log}; sleep 0.2; echo end $VENOM_TASK_INDEX >> {log}; exit {code}",
                    log = log.display()
                ),
            )
        })
        .collect();
    first
        .send(CoordinatorMessage {
            registered: true,
            slots_limit: Some(1),
            assign,
            ..Default::default()
        })
        .await;

    let results = first.collect_finished(3).await;
    for (micro, code) in (0u32..).zip(exit_codes) {
        let result = &results[&micro];
        assert_eq!(result.exit_code, Some(code), "micro {micro}: {result:?}");
        assert!(result.error.is_empty() && !result.cancelled && !result.timed_out);
        assert!(result.finished_ms >= result.started_ms);
    }

    // One at a time: the log alternates start i / end i.
    let lines: Vec<String> = std::fs::read_to_string(&log)
        .expect("the tasks wrote the log")
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(lines.len(), 6, "{lines:?}");
    for pair in lines.chunks(2) {
        let started = pair[0].strip_prefix("start ").expect("a start line");
        assert_eq!(
            pair[1],
            format!("end {started}"),
            "two tasks overlapped: {lines:?}"
        );
    }

    // Acknowledge the first two; let a few heartbeats pass so the acks are surely applied.
    first
        .send(CoordinatorMessage {
            ack: vec![attempt(0), attempt(1)],
            ..Default::default()
        })
        .await;
    let mut heartbeats = 0;
    while heartbeats < 3 {
        let message = first.next().await;
        assert!(
            message.finished.is_empty(),
            "nothing else finished: {message:?}"
        );
        if let Some(heartbeat) = message.heartbeat {
            assert!((0.0..=1.0).contains(&heartbeat.theta));
            assert_eq!(heartbeat.running, 0);
            heartbeats += 1;
        }
    }

    // The coordinator goes away; the worker re-registers with only the unacknowledged result.
    drop(first);
    let mut second = accept(&mut connections).await;
    let register = second
        .next()
        .await
        .register
        .expect("a reconnect registers again");
    assert!(register.running.is_empty());
    assert_eq!(
        register.unacknowledged.len(),
        1,
        "{:?}",
        register.unacknowledged
    );
    assert_eq!(register.unacknowledged[0].attempt, Some(attempt(2)));
    assert_eq!(register.unacknowledged[0].exit_code, Some(7));
    second
        .send(CoordinatorMessage {
            registered: true,
            ack: vec![attempt(2)],
            ..Default::default()
        })
        .await;

    stop_worker(stop, worker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wide_task_runs_alone_and_the_narrow_ones_then_share_the_slots() {
    let (url, mut connections) = fake_coordinator().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let log = dir.path().join("log");
    let (stop, worker) = start_worker(vec![url], 4);
    let mut conn = accept(&mut connections).await;
    assert!(conn.next().await.register.is_some());

    let step = |name: &str| {
        format!(
            "echo start {name} >> {log}; sleep 0.3; echo end {name} >> {log}",
            log = log.display()
        )
    };
    let mut wide = shell_assignment(0, step("wide"));
    wide.cpus = 4;
    let narrow = (1..=3).map(|micro| shell_assignment(micro, step(&format!("n{micro}"))));
    conn.send(CoordinatorMessage {
        registered: true,
        slots_limit: Some(3),
        assign: std::iter::once(wide).chain(narrow).collect(),
        ..Default::default()
    })
    .await;
    let results = conn.collect_finished(4).await;
    assert!(
        results.values().all(|result| result.exit_code == Some(0)),
        "{results:?}"
    );

    let lines: Vec<String> = std::fs::read_to_string(&log)
        .expect("log")
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(
        &lines[..2],
        ["start wide", "end wide"],
        "the wide task runs alone: {lines:?}"
    );
    assert!(
        lines[2..5].iter().all(|line| line.starts_with("start n")),
        "the three narrow tasks run together once it ends: {lines:?}"
    );
    stop_worker(stop, worker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_attempts_survive_a_reconnect_and_report_afterwards() {
    let (url, mut connections) = fake_coordinator().await;
    let (stop, worker) = start_worker(vec![url], 2);

    let mut first = accept(&mut connections).await;
    assert!(first.next().await.register.is_some());
    first
        .send(CoordinatorMessage {
            registered: true,
            assign: vec![shell_assignment(0, "sleep 0.7; exit 5".to_owned())],
            ..Default::default()
        })
        .await;
    // Wait until it started, then drop the stream.
    loop {
        let message = first.next().await;
        if let Some(started) = message.started.first() {
            assert_eq!(started.attempt, Some(attempt(0)));
            assert!(started.pid > 0);
            break;
        }
    }
    drop(first);

    let mut second = accept(&mut connections).await;
    let register = second.next().await.register.expect("registers again");
    assert_eq!(
        register.running,
        vec![attempt(0)],
        "the attempt kept running"
    );
    second
        .send(CoordinatorMessage {
            registered: true,
            ..Default::default()
        })
        .await;
    let results = second.collect_finished(1).await;
    assert_eq!(results[&0].exit_code, Some(5));

    stop_worker(stop, worker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_kills_the_running_attempt_and_drops_the_queued_one() {
    let (url, mut connections) = fake_coordinator().await;
    let (stop, worker) = start_worker(vec![url], 4);

    let mut conn = accept(&mut connections).await;
    assert!(conn.next().await.register.is_some());
    conn.send(CoordinatorMessage {
        registered: true,
        slots_limit: Some(1),
        assign: vec![
            shell_assignment(0, "sleep 30".to_owned()),
            shell_assignment(1, "sleep 30".to_owned()),
            // A duplicate of a queued attempt is ignored.
            shell_assignment(1, "sleep 30".to_owned()),
        ],
        ..Default::default()
    })
    .await;
    loop {
        if !conn.next().await.started.is_empty() {
            break;
        }
    }
    let asked = std::time::Instant::now();
    conn.send(CoordinatorMessage {
        cancel: vec![attempt(0), attempt(1)],
        ..Default::default()
    })
    .await;
    let results = conn.collect_finished(2).await;
    assert!(
        asked.elapsed() < Duration::from_secs(10),
        "cancel took {:?}",
        asked.elapsed()
    );
    assert!(
        results[&0].cancelled && results[&1].cancelled,
        "{results:?}"
    );
    assert_eq!(results[&0].signal, Some(9), "the running one was killed");
    assert_eq!(results[&1].exit_code, None, "the queued one never ran");

    stop_worker(stop, worker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_naming_the_leader_sends_the_worker_there() {
    let (leader_url, mut leader) = fake_coordinator().await;
    // The refusal names the leader without a scheme; the worker adds it.
    let leader_address = leader_url.trim_start_matches("http://").to_owned();
    let (follower_url, mut refused) = refusing_coordinator(leader_address).await;
    let (stop, worker) = start_worker(vec![follower_url], 1);

    let first = tokio::time::timeout(PATIENCE, refused.recv())
        .await
        .expect("the worker connects to the follower within the patience window")
        .expect("the follower is running");
    assert!(first.register.is_some());

    let mut accepted = accept(&mut leader).await;
    let register = accepted
        .next()
        .await
        .register
        .expect("registers with the leader");
    assert_eq!(register.name, "test-node");

    stop_worker(stop, worker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_coordinator_costs_no_connect_timeout() {
    // Accepts TCP connections and never answers, like a member stopped with SIGSTOP.
    let frozen = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let frozen_url = format!("http://{}", frozen.local_addr().expect("address"));
    let (url, mut connections) = fake_coordinator().await;
    let started = std::time::Instant::now();
    let (stop, worker) = start_worker(vec![frozen_url, url], 1);
    let mut conn = accept(&mut connections).await;
    assert!(conn.next().await.register.is_some());
    // The frozen member is tried at the same time, not first.
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "registered after {:?}",
        started.elapsed()
    );
    stop_worker(stop, worker).await;
    drop(frozen);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_renewed_lease_the_worker_kills_its_attempts_and_reports_nothing() {
    // One grant only: the registration's, for 1.5 s.
    let (url, mut connections) = fake_coordinator_granting(1, 1_500).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let pid_file = dir.path().join("child.pid");
    let (stop, worker) = start_worker(vec![url], 1);
    let mut conn = accept(&mut connections).await;
    assert!(conn.next().await.register.is_some());
    conn.send(CoordinatorMessage {
        registered: true,
        assign: vec![shell_assignment(
            0,
            format!("sleep 30 & echo $! > {}; wait", pid_file.display()),
        )],
        ..Default::default()
    })
    .await;
    let child_pid: i32 = wait_for_file(&pid_file)
        .await
        .trim()
        .parse()
        .expect("a pid");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !process_is_dead(child_pid) {
        assert!(
            std::time::Instant::now() < deadline,
            "the attempt outlived the worker's lease"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The worker gave up on the silent leader: it looks for the leader again, and once the
    // lease is gone its registrations no longer claim the killed attempt; nothing ever
    // reports it.
    let killed_at = tokio::time::Instant::now();
    let mut reregistered = false;
    let give_up = killed_at + PATIENCE;
    let mut streams = vec![conn];
    while !reregistered && tokio::time::Instant::now() < give_up {
        tokio::select! {
            Some(again) = connections.recv() => streams.push(again),
            () = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
        for stream in &mut streams {
            while let Ok(message) = stream.inbound.try_recv() {
                assert!(
                    message.finished.is_empty(),
                    "a fenced attempt reported: {message:?}"
                );
                if let Some(register) = message.register {
                    assert!(register.unacknowledged.is_empty(), "{register:?}");
                    if register.running.is_empty() {
                        reregistered = true;
                    } else {
                        // Claimed while it still held the lease (raced before it ran out).
                        assert!(
                            tokio::time::Instant::now() < killed_at + Duration::from_millis(500),
                            "{register:?}"
                        );
                    }
                }
            }
        }
    }
    assert!(reregistered, "the worker never looked for another leader");
    stop_worker(stop, worker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_coordinator_is_raced_past() {
    // A port that was free a moment ago: nothing listens there.
    let dead = {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        format!("http://{}", listener.local_addr().expect("address"))
    };
    let (url, mut connections) = fake_coordinator().await;
    let (stop, worker) = start_worker(vec![dead, url], 1);
    let mut conn = accept(&mut connections).await;
    assert!(conn.next().await.register.is_some());
    stop_worker(stop, worker).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_kills_running_process_groups() {
    let (url, mut connections) = fake_coordinator().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let pid_file = dir.path().join("child.pid");
    let (stop, worker) = start_worker(vec![url], 1);

    let mut conn = accept(&mut connections).await;
    assert!(conn.next().await.register.is_some());
    conn.send(CoordinatorMessage {
        registered: true,
        assign: vec![shell_assignment(
            0,
            format!("sleep 30 & echo $! > {}; wait", pid_file.display()),
        )],
        ..Default::default()
    })
    .await;
    let child_pid: i32 = wait_for_file(&pid_file)
        .await
        .trim()
        .parse()
        .expect("a pid");
    let stopping = std::time::Instant::now();
    stop_worker(stop, worker).await;
    assert!(stopping.elapsed() < Duration::from_secs(10));
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !process_is_dead(child_pid) {
        assert!(
            std::time::Instant::now() < deadline,
            "the task's child outlived the worker"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Drives `n` `true` tasks through a worker with 2 slots the way a coordinator would: a few
/// assignments beyond the slots up front, then one more per result, acknowledging as results
/// arrive. Returns the exit code reported for each micro index and the seconds taken.
async fn drive_short_tasks(n: u32) -> (BTreeMap<u32, Vec<Option<i32>>>, f64) {
    let (url, mut connections) = fake_coordinator().await;
    let (stop, worker) = start_worker(vec![url], 2);
    let mut conn = accept(&mut connections).await;
    let register = conn.next().await.register.expect("registers");
    let task = |micro| Assignment {
        attempt: Some(attempt(micro)),
        argv: vec!["true".to_owned()],
        cpus: 1,
        ..Default::default()
    };
    let started = std::time::Instant::now();
    let mut sent = (2 + register.queue_depth).min(n);
    conn.send(CoordinatorMessage {
        registered: true,
        assign: (0..sent).map(task).collect(),
        ..Default::default()
    })
    .await;
    let mut reported: BTreeMap<u32, Vec<Option<i32>>> = BTreeMap::new();
    let mut n_reported = 0;
    while n_reported < n {
        let message = conn.next().await;
        if message.finished.is_empty() {
            continue;
        }
        let mut ack = Vec::new();
        for finished in message.finished {
            let attempt = finished.attempt.expect("results name their attempt");
            reported
                .entry(attempt.micro)
                .or_default()
                .push(finished.exit_code);
            ack.push(attempt);
            n_reported += 1;
        }
        let more = (n - sent).min(u32::try_from(ack.len()).expect("small batch"));
        let assign = (sent..sent + more).map(task).collect();
        sent += more;
        conn.send(CoordinatorMessage {
            assign,
            ack,
            ..Default::default()
        })
        .await;
    }
    let elapsed_s = started.elapsed().as_secs_f64();
    stop_worker(stop, worker).await;
    (reported, elapsed_s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_short_tasks_each_report_exactly_once() {
    let n = 400;
    let (reported, elapsed_s) = drive_short_tasks(n).await;
    assert_eq!(
        reported.len(),
        usize::try_from(n).expect("small"),
        "every task reported"
    );
    for (micro, exit_codes) in &reported {
        assert_eq!(
            exit_codes,
            &vec![Some(0)],
            "micro {micro} reported {exit_codes:?}"
        );
    }
    eprintln!("{n} short tasks in {elapsed_s:.2} s");
}
