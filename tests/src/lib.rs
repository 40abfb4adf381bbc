//! Shared helpers for Venom's cross-crate tests: start real `venom-coordinator` and
//! `venom-worker` processes on loopback, talk to them over gRPC, and kill them with
//! SIGKILL when a test wants a crash.
//!
//! The binaries are the workspace's own, found next to the test executable in the
//! target directory; `cargo test --workspace` builds them first (each binary crate has
//! an integration test, which makes cargo build its binary).

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use tonic::transport::Channel;
use venom_proto::v1 as pb;
use venom_proto::v1::client_service_client::ClientServiceClient;

/// Path of a workspace binary (`venom-coordinator`, `venom-worker`, `venomctl`).
pub fn bin_path(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test executable lives in target/<profile>/deps");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} not built: run `cargo build --workspace --bins` (or `cargo test --workspace`)",
        path.display()
    );
    path
}

/// The `RUST_LOG` filter given to spawned binaries: `VENOM_TEST_LOG`, or `warn`.
fn test_log_filter() -> String {
    std::env::var("VENOM_TEST_LOG").unwrap_or_else(|_| "warn".to_string())
}

/// Variables that switch trace export on; removed from every process a test starts, so that
/// a developer's shell cannot send test spans anywhere (tests that want traces pass them).
const TRACE_EXPORT_VARIABLES: [&str; 4] = [
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "VENOM_OTLP_ENDPOINT",
    "TRACEPARENT",
];

/// `command` without the inherited trace-export variables, plus `env`.
pub fn with_env<'a>(command: &'a mut Command, env: &[(String, String)]) -> &'a mut Command {
    for name in TRACE_EXPORT_VARIABLES {
        command.env_remove(name);
    }
    command.envs(env.iter().map(|(k, v)| (k, v)))
}

/// A free TCP port on 127.0.0.1 (bound then released).
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local addr").port()
}

/// A child process killed (SIGKILL) when dropped.
#[derive(Debug)]
pub struct Proc {
    pub child: Child,
    pub name: String,
}

impl Proc {
    /// SIGKILL, then reap.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait up to `timeout` for a clean exit; returns whether it exited.
    pub fn terminate(&mut self, timeout: Duration) -> bool {
        let pid = self.child.id() as i32;
        // SAFETY: plain signal delivery to our own child.
        #[allow(unsafe_code)]
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A coordinator process and how to reach it.
#[derive(Debug)]
pub struct Coordinator {
    pub proc: Proc,
    pub port: u16,
    pub data_dir: PathBuf,
    pub extra: Vec<String>,
    /// Environment variables it runs with (kept for restarts).
    pub env: Vec<(String, String)>,
}

impl Coordinator {
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Starts a single-node coordinator on a free port.
    pub fn start(data_dir: &Path, extra: &[&str]) -> anyhow::Result<Self> {
        Self::start_with_env(data_dir, extra, &[])
    }

    /// Starts a single-node coordinator on a free port with extra environment variables.
    pub fn start_with_env(
        data_dir: &Path,
        extra: &[&str],
        env: &[(String, String)],
    ) -> anyhow::Result<Self> {
        Self::start_on(
            data_dir,
            free_port(),
            extra.iter().map(|s| s.to_string()).collect(),
            env.to_vec(),
        )
    }

    /// Starts member `id` of a raft group on `port`; `peers` is the `--peers` value
    /// (`ID=HOST:PORT,…`, every member included). [`Coordinator::kill9_and_restart`]
    /// brings it back with the same id, port, peers and data dir.
    pub fn start_member(
        id: u64,
        port: u16,
        peers: &str,
        data_dir: &Path,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        let mut args = vec![
            "--id".to_string(),
            id.to_string(),
            "--peers".to_string(),
            peers.to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        Self::start_on(data_dir, port, args, Vec::new())
    }

    fn start_on(
        data_dir: &Path,
        port: u16,
        extra: Vec<String>,
        env: Vec<(String, String)>,
    ) -> anyhow::Result<Self> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(data_dir.with_extension(format!("{port}.log")))?;
        let mut command = Command::new(bin_path("venom-coordinator"));
        let child = with_env(&mut command, &env)
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--data-dir")
            .arg(data_dir)
            .args(&extra)
            .env("RUST_LOG", test_log_filter())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("spawn venom-coordinator")?;
        Ok(Self {
            proc: Proc {
                child,
                name: "coordinator".into(),
            },
            port,
            data_dir: data_dir.to_path_buf(),
            extra,
            env,
        })
    }

    /// Kills it with SIGKILL and starts it again on the same port and data dir.
    pub fn kill9_and_restart(&mut self) -> anyhow::Result<()> {
        self.proc.kill9();
        let again = Self::start_on(
            &self.data_dir,
            self.port,
            self.extra.clone(),
            self.env.clone(),
        )?;
        *self = again;
        Ok(())
    }
}

/// Starts a worker process.
pub fn start_worker(
    coordinator_url: &str,
    name: &str,
    slots: u32,
    extra: &[&str],
) -> anyhow::Result<Proc> {
    start_worker_with_env(coordinator_url, name, slots, extra, &[])
}

/// Starts a worker process with extra environment variables.
pub fn start_worker_with_env(
    coordinator_url: &str,
    name: &str,
    slots: u32,
    extra: &[&str],
    env: &[(String, String)],
) -> anyhow::Result<Proc> {
    let mut command = Command::new(bin_path("venom-worker"));
    let child = with_env(&mut command, env)
        .arg("--coordinator")
        .arg(coordinator_url)
        .arg("--name")
        .arg(name)
        .arg("--slots")
        .arg(slots.to_string())
        .args(extra)
        .env("RUST_LOG", test_log_filter())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .context("spawn venom-worker")?;
    Ok(Proc {
        child,
        name: name.to_string(),
    })
}

/// A gRPC client to a coordinator.
pub async fn client(url: &str) -> anyhow::Result<ClientServiceClient<Channel>> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let attempt = tonic::transport::Endpoint::from_shared(url.to_string())?
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_millis(500))
            .connect()
            .await;
        match attempt {
            Ok(channel) => return Ok(ClientServiceClient::new(channel)),
            Err(e) if Instant::now() > deadline => bail!("cannot reach {url}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// Waits until the coordinator has a leader and `n_nodes` ready nodes.
pub async fn wait_ready(url: &str, n_nodes: usize) -> anyhow::Result<ClientServiceClient<Channel>> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(mut c) = client(url).await {
            let nodes = c.list_nodes(pb::ListNodesRequest {}).await;
            let status = c.cluster_status(pb::ClusterStatusRequest::default()).await;
            if let (Ok(nodes), Ok(status)) = (nodes, status) {
                let ready = nodes
                    .into_inner()
                    .nodes
                    .iter()
                    .filter(|n| n.state == "ready")
                    .count();
                if status.into_inner().leader_id != 0 && ready >= n_nodes {
                    return Ok(c);
                }
            }
        }
        if Instant::now() > deadline {
            bail!("coordinator at {url} not ready with {n_nodes} nodes after 30 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Submits a wave file's text; returns the wave id.
pub async fn submit(c: &mut ClientServiceClient<Channel>, spec: &str) -> anyhow::Result<u64> {
    let response = c
        .submit_wave(pb::SubmitWaveRequest {
            spec: spec.as_bytes().to_vec(),
            format: "toml".into(),
            traceparent: String::new(),
        })
        .await
        .context("submit")?;
    Ok(response.into_inner().wave_id)
}

/// The leader's URL in a "not leader: leader=URL" refusal (`None` for `leader=unknown`).
pub fn leader_from_refusal(message: &str) -> Option<String> {
    let rest = &message[message.find("leader=")? + "leader=".len()..];
    let url = rest.split_whitespace().next()?;
    url.contains(':').then(|| url.to_string())
}

/// Submits a wave at `url`, following "not leader" refusals to the leader they name (and
/// retrying while no leader is known). Returns the wave id and every URL tried, in order.
pub async fn submit_following_leader(
    url: &str,
    spec: &str,
    timeout: Duration,
) -> anyhow::Result<(u64, Vec<String>)> {
    let deadline = Instant::now() + timeout;
    let mut tried = vec![url.to_string()];
    let mut target = url.to_string();
    loop {
        let mut c = client(&target).await?;
        let attempt = c
            .submit_wave(pb::SubmitWaveRequest {
                spec: spec.as_bytes().to_vec(),
                format: "toml".into(),
                traceparent: String::new(),
            })
            .await;
        match attempt {
            Ok(response) => return Ok((response.into_inner().wave_id, tried)),
            Err(status) if status.code() == tonic::Code::Unavailable => {
                if Instant::now() > deadline {
                    bail!("no leader accepted the wave after {timeout:?}: {status}");
                }
                match leader_from_refusal(status.message()) {
                    Some(leader) if leader != target => {
                        target = leader;
                        tried.push(target.clone());
                    }
                    _ => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
            Err(status) => bail!("submit at {target}: {status}"),
        }
    }
}

/// Polls the wave until it is terminal (reconnecting across coordinator restarts).
pub async fn wait_wave(
    url: &str,
    wave_id: u64,
    timeout: Duration,
) -> anyhow::Result<pb::WaveSummary> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(mut c) = client(url).await {
            if let Ok(w) = c.get_wave(pb::GetWaveRequest { wave_id }).await {
                let w = w.into_inner();
                if matches!(w.state.as_str(), "succeeded" | "failed" | "cancelled") {
                    return Ok(w);
                }
            }
        }
        if Instant::now() > deadline {
            bail!("wave {wave_id} not finished after {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Lists a wave's micro-tasks.
pub async fn tasks(url: &str, wave_id: u64) -> anyhow::Result<Vec<pb::MicroTaskInfo>> {
    let mut c = client(url).await?;
    Ok(c.list_tasks(pb::ListTasksRequest { wave_id })
        .await?
        .into_inner()
        .tasks)
}

/// Whether a process id is still alive (and not a zombie).
pub fn pid_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            // The state letter follows the parenthesised command name.
            let state = stat
                .rsplit(')')
                .next()
                .and_then(|s| s.trim().chars().next());
            !matches!(state, Some('Z') | Some('X') | None)
        }
        Err(_) => false,
    }
}

/// One line a micro-task wrote to its record file: `task index node start_ns end_ns`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub task: String,
    pub index: String,
    pub node: String,
    pub attempt: u32,
    pub start_ns: u128,
    pub end_ns: u128,
}

/// Shell snippet that records this micro-task's start and end (nanoseconds) in `dir`.
pub fn recording(dir: &Path, body: &str) -> String {
    let d = dir.display();
    format!(
        "s=$(date +%s%N); {body}; e=$(date +%s%N); \
         echo \"$VENOM_TASK_ID ${{VENOM_TASK_INDEX:--}} $VENOM_NODE $VENOM_ATTEMPT $s $e\" \
         > {d}/rec.$VENOM_TASK_ID.${{VENOM_TASK_INDEX:-x}}.$VENOM_ATTEMPT.$$"
    )
}

/// Reads every record written by [`recording`].
pub fn read_records(dir: &Path) -> anyhow::Result<Vec<Record>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if !path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("rec."))
        {
            continue;
        }
        let text = std::fs::read_to_string(&path)?;
        let f: Vec<&str> = text.split_whitespace().collect();
        if f.len() != 6 {
            bail!("malformed record {}: {text:?}", path.display());
        }
        out.push(Record {
            task: f[0].to_string(),
            index: f[1].to_string(),
            node: f[2].to_string(),
            attempt: f[3].parse()?,
            start_ns: f[4].parse()?,
            end_ns: f[5].parse()?,
        });
    }
    Ok(out)
}

/// Largest number of records overlapping in time on one node.
pub fn max_concurrency(records: &[Record], node: &str) -> usize {
    let mut events: Vec<(u128, i32)> = Vec::new();
    for r in records.iter().filter(|r| r.node == node) {
        events.push((r.start_ns, 1));
        events.push((r.end_ns, -1));
    }
    // Ends sort before starts at the same instant.
    events.sort();
    let (mut now, mut max) = (0i32, 0i32);
    for (_, delta) in events {
        now += delta;
        max = max.max(now);
    }
    max as usize
}
