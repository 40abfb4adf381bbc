//! Shared helpers for Venom's cross-crate tests: start real `venom-coordinator` and
//! `venom-worker` processes on loopback, talk to them over gRPC, and kill them with
//! SIGKILL when a test wants a crash.
//!
//! The binaries are the workspace's own, found next to the test executable in the
//! target directory; `cargo test --workspace` builds them first (each binary crate has
//! an integration test, which makes cargo build its binary).

#![allow(clippy::unwrap_used)]

pub mod attempts;
pub mod netns;
pub mod pki;
pub mod powercut;
pub mod scenario;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use tonic::transport::Channel;
use venom_core::WaveState;
use venom_proto::leader::leader_hint;
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
pub fn test_log_filter() -> String {
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
    /// `RUST_LOG` for this process (kept across restarts).
    pub log_filter: String,
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

    /// Starts a single-node coordinator on a free port with extra environment variables
    /// (founding its cluster when `data_dir` is empty: `--bootstrap`).
    pub fn start_with_env(
        data_dir: &Path,
        extra: &[&str],
        env: &[(String, String)],
    ) -> anyhow::Result<Self> {
        Self::start_on(
            data_dir,
            free_port(),
            std::iter::once("--bootstrap")
                .chain(extra.iter().copied())
                .map(str::to_string)
                .collect(),
            test_log_filter(),
            env.to_vec(),
        )
    }

    /// Starts member `id` of a raft group on `port`; `peers` is the `--peers` value
    /// (`ID=HOST:PORT,…`, every member included). A founding member gets `--bootstrap`
    /// (unless `extra` holds `--join`). [`Coordinator::kill9_and_restart`] brings it back
    /// with the same id, port, peers, flags and data dir.
    pub fn start_member(
        id: u64,
        port: u16,
        peers: &str,
        data_dir: &Path,
        extra: &[&str],
    ) -> anyhow::Result<Self> {
        let mut flags = Vec::new();
        if !extra.contains(&"--join") {
            flags.push("--bootstrap");
        }
        flags.extend_from_slice(extra);
        Self::start_member_exact(id, port, peers, data_dir, &flags)
    }

    /// Like [`Coordinator::start_member`], with exactly the flags in `extra` (neither
    /// `--bootstrap` nor `--join` unless given).
    pub fn start_member_exact(
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
        Self::start_on(data_dir, port, args, test_log_filter(), Vec::new())
    }

    /// Waits up to `timeout` for the process to exit by itself; its exit code, or `None`
    /// if it is still running (or died of a signal).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.proc.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Where its stderr (the `tracing` log) goes: beside the data dir, appended to across
    /// restarts.
    pub fn log_path(&self) -> PathBuf {
        log_path(&self.data_dir, self.port)
    }

    fn start_on(
        data_dir: &Path,
        port: u16,
        extra: Vec<String>,
        log_filter: String,
        env: Vec<(String, String)>,
    ) -> anyhow::Result<Self> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_path(data_dir, port))?;
        let mut env = env;
        if !pki::chooses_tls(&env, &extra) {
            let id = extra
                .iter()
                .position(|f| f == "--id")
                .and_then(|i| extra.get(i + 1))
                .cloned()
                .unwrap_or_else(|| "1".to_owned());
            env.extend(pki::pki().env(venom_tls::Role::Member, &id));
        }
        let mut command = Command::new(bin_path("venom-coordinator"));
        let child = with_env(&mut command, &env)
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--data-dir")
            .arg(data_dir)
            .args(&extra)
            .env("RUST_LOG", &log_filter)
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
            log_filter,
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
            self.log_filter.clone(),
            self.env.clone(),
        )?;
        *self = again;
        Ok(())
    }
}

fn log_path(data_dir: &Path, port: u16) -> PathBuf {
    data_dir.with_extension(format!("{port}.log"))
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

/// The data dir a test's worker gets unless it names one: one per test process, node name
/// and coordinators, so a restarted worker finds its predecessor's and tests running side by
/// side in one process (with the same node names) never share one.
pub fn worker_data_dir(coordinator_url: &str, name: &str) -> PathBuf {
    use std::hash::{Hash as _, Hasher as _};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    coordinator_url.hash(&mut hasher);
    std::env::temp_dir()
        .join(format!("venom-test-workers-{}", std::process::id()))
        .join(format!("{name}-{:016x}", hasher.finish()))
}

/// Starts a worker process with extra environment variables.
pub fn start_worker_with_env(
    coordinator_url: &str,
    name: &str,
    slots: u32,
    extra: &[&str],
    env: &[(String, String)],
) -> anyhow::Result<Proc> {
    let mut env = env.to_vec();
    let flags: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    if !pki::chooses_tls(&env, &flags) {
        env.extend(pki::pki().env(venom_tls::Role::Worker, name));
    }
    if !flags.iter().any(|flag| flag.starts_with("--data-dir"))
        && !env.iter().any(|(k, _)| k == "VENOM_WORKER_DATA_DIR")
    {
        env.push((
            "VENOM_WORKER_DATA_DIR".to_owned(),
            worker_data_dir(coordinator_url, name).display().to_string(),
        ));
    }
    let mut command = Command::new(bin_path("venom-worker"));
    let child = with_env(&mut command, &env)
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

/// Runs `venomctl --coordinator URLS ARGS…`; returns (success, stdout, stderr).
pub fn venomctl(urls: &str, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(bin_path("venomctl"))
        .envs(pki::pki().env(venom_tls::Role::Admin, pki::ADMIN))
        .arg("--coordinator")
        .arg(urls)
        .args(args)
        .output()
        .expect("venomctl runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// An endpoint for `url` with the test admin's certificate (mutual TLS).
pub fn endpoint(url: &str) -> anyhow::Result<tonic::transport::Endpoint> {
    Ok(pki::pki().admin().endpoint(url)?)
}

/// A gRPC client to a coordinator.
pub async fn client(url: &str) -> anyhow::Result<ClientServiceClient<Channel>> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let attempt = endpoint(url)?
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
                    .filter(|n| n.state() == pb::NodeState::Ready)
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
            submission_id: String::new(),
        })
        .await
        .context("submit")?;
    Ok(response.into_inner().wave_id)
}

/// Whether a wave has reached a final state.
pub fn is_finished(wave: &pb::WaveSummary) -> bool {
    WaveState::try_from(wave.state()).is_ok_and(WaveState::is_terminal)
}

/// Submits a wave at `url`, following not-leader refusals to the leader their error detail
/// names ([`leader_hint`]; retrying while no leader is known). Returns the wave id and every
/// URL tried, in order.
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
                submission_id: String::new(),
            })
            .await;
        match attempt {
            Ok(response) => return Ok((response.into_inner().wave_id, tried)),
            Err(status) if status.code() == tonic::Code::Unavailable => {
                if Instant::now() > deadline {
                    bail!("no leader accepted the wave after {timeout:?}: {status}");
                }
                match leader_hint(&status) {
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
                if is_finished(&w) {
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

/// One line a micro-task wrote to its record file: `task index node attempt start_ns end_ns`.
/// A task that is not an array records index 0 (every micro-task sees `VENOM_TASK_INDEX`).
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

/// `GET http://ADDR/metrics` over a plain socket; the response body.
pub fn scrape(addr: &str) -> anyhow::Result<String> {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .context("no end of headers")?;
    if !head.starts_with("HTTP/1.1 200") {
        bail!("scrape of {addr} answered {head}");
    }
    if !head
        .to_ascii_lowercase()
        .contains("content-type: text/plain; version=0.0.4")
    {
        bail!("not the Prometheus text format: {head}");
    }
    Ok(body.to_string())
}

/// Labels of one series, sorted by name.
type LabelSet = Vec<(String, String)>;

/// One sample of a Prometheus text exposition.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// Parses the Prometheus text format (0.0.4) strictly: every sample's family has a `# TYPE`
/// line before it, names and label names are valid, label values are quoted and escaped,
/// values are floats, and each histogram's buckets are cumulative with `+Inf` equal to
/// `_count`.
pub fn parse_prometheus(text: &str) -> anyhow::Result<Vec<Sample>> {
    fn valid_name(name: &str) -> bool {
        let mut chars = name.chars();
        chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    }
    let mut types: BTreeMap<String, String> = BTreeMap::new();
    let mut samples = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let n = n + 1;
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            let kind = parts.next().unwrap_or_default();
            let name = parts.next().unwrap_or_default();
            if !valid_name(name) {
                bail!("line {n}: bad metric name in {line:?}");
            }
            if kind == "TYPE" {
                let t = parts.next().unwrap_or_default();
                if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&t) {
                    bail!("line {n}: bad type {t:?}");
                }
                if types.insert(name.to_string(), t.to_string()).is_some() {
                    bail!("line {n}: second TYPE for {name}");
                }
            }
            continue;
        }
        let (name, rest) = match line.find(['{', ' ']) {
            Some(i) => line.split_at(i),
            None => bail!("line {n}: no value in {line:?}"),
        };
        if !valid_name(name) {
            bail!("line {n}: bad metric name {name:?}");
        }
        let mut labels = BTreeMap::new();
        let mut rest = rest;
        if let Some(inner) = rest.strip_prefix('{') {
            let mut chars = inner.char_indices().peekable();
            let end;
            loop {
                let start = chars
                    .peek()
                    .map(|(i, _)| *i)
                    .context("unterminated labels")?;
                if inner[start..].starts_with('}') {
                    end = start + 1;
                    break;
                }
                let eq = inner[start..].find('=').context("label without =")? + start;
                let key = &inner[start..eq];
                if !valid_name(key) || key.contains(':') {
                    bail!("line {n}: bad label name {key:?}");
                }
                if !inner[eq + 1..].starts_with('"') {
                    bail!("line {n}: unquoted label value");
                }
                let mut value = String::new();
                let mut i = eq + 2;
                let bytes: Vec<char> = inner[i..].chars().collect();
                let mut k = 0;
                loop {
                    let c = *bytes.get(k).context("unterminated label value")?;
                    k += 1;
                    match c {
                        '\\' => {
                            let e = *bytes.get(k).context("dangling escape")?;
                            k += 1;
                            value.push(match e {
                                'n' => '\n',
                                '\\' => '\\',
                                '"' => '"',
                                other => bail!("line {n}: bad escape \\{other}"),
                            });
                        }
                        '"' => break,
                        c => value.push(c),
                    }
                }
                i += bytes[..k].iter().map(|c| c.len_utf8()).sum::<usize>();
                labels.insert(key.to_string(), value);
                while chars.peek().is_some_and(|(j, _)| *j < i) {
                    chars.next();
                }
                if inner[i..].starts_with(',') {
                    chars.next();
                }
            }
            rest = &inner[end..];
        }
        let value_text = rest.trim().split(' ').next().unwrap_or_default();
        let value: f64 = match value_text {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            other => other
                .parse()
                .with_context(|| format!("line {n}: bad value {other:?}"))?,
        };
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suffix| {
                name.strip_suffix(suffix)
                    .filter(|base| types.get(*base).is_some_and(|t| t == "histogram"))
            })
            .unwrap_or(name);
        if !types.contains_key(family) {
            bail!("line {n}: sample {name} has no TYPE line before it");
        }
        samples.push(Sample {
            name: name.to_string(),
            labels,
            value,
        });
    }
    // Histograms: cumulative buckets, +Inf == _count.
    for (family, t) in &types {
        if t != "histogram" {
            continue;
        }
        let bucket = format!("{family}_bucket");
        let count = format!("{family}_count");
        let mut series: BTreeMap<LabelSet, Vec<(f64, f64)>> = BTreeMap::new();
        for s in samples.iter().filter(|s| s.name == bucket) {
            let le = s.labels.get("le").context("bucket without le")?;
            let le: f64 = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse()?
            };
            let key: Vec<_> = s
                .labels
                .iter()
                .filter(|(k, _)| *k != "le")
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            series.entry(key).or_default().push((le, s.value));
        }
        for (key, mut buckets) in series {
            buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
            if buckets.windows(2).any(|w| w[1].1 < w[0].1) {
                bail!("{family}{key:?}: buckets are not cumulative");
            }
            let inf = buckets.last().map(|b| b.1).unwrap_or_default();
            let total = samples
                .iter()
                .find(|s| {
                    s.name == count
                        && s.labels
                            .iter()
                            .map(|(k, v)| (k.clone(), v.clone()))
                            .collect::<Vec<_>>()
                            == key
                })
                .map(|s| s.value)
                .context("histogram without _count")?;
            if (inf - total).abs() > f64::EPSILON {
                bail!("{family}{key:?}: +Inf bucket {inf} != count {total}");
            }
        }
    }
    Ok(samples)
}

/// The value of the one sample named `name` whose labels include `labels`.
pub fn sample_value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples
        .iter()
        .find(|s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
}

/// A string as a TOML literal (multi-line, no escapes), for shell bodies in wave files.
pub fn toml_str(s: &str) -> String {
    format!("'''{s}'''")
}

/// Shell snippet that only records that this micro-task ran (start and end written as 0):
/// shell builtins only, so a micro-task costs one process. [`read_records`] reads it.
pub fn record_only(dir: &Path) -> String {
    let d = dir.display();
    format!(
        "echo \"$VENOM_TASK_ID ${{VENOM_TASK_INDEX:--}} $VENOM_NODE $VENOM_ATTEMPT 0 0\" \
         > {d}/rec.$VENOM_TASK_ID.${{VENOM_TASK_INDEX:-x}}.$VENOM_ATTEMPT.$$"
    )
}

/// One connection attempt with short timeouts (a killed member must not stall a test).
pub async fn try_client(url: &str) -> Option<ClientServiceClient<Channel>> {
    let channel = endpoint(url)
        .ok()?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_millis(300))
        .timeout(Duration::from_secs(5))
        .connect()
        .await
        .ok()?;
    Some(ClientServiceClient::new(channel))
}

/// `ClusterStatus` from one member; `None` when it cannot answer.
pub async fn cluster_status(url: &str) -> Option<pb::ClusterStatusResponse> {
    let mut c = try_client(url).await?;
    c.cluster_status(pb::ClusterStatusRequest::default())
        .await
        .ok()
        .map(|r| r.into_inner())
}

/// `GetWave` from one member; `None` when it cannot answer.
pub async fn get_wave(url: &str, wave_id: u64) -> Option<pb::WaveSummary> {
    let mut c = try_client(url).await?;
    c.get_wave(pb::GetWaveRequest { wave_id })
        .await
        .ok()
        .map(|r| r.into_inner())
}

/// `ListTasks` from one member; `None` when it cannot answer.
pub async fn list_tasks(url: &str, wave_id: u64) -> Option<Vec<pb::MicroTaskInfo>> {
    let mut c = try_client(url).await?;
    c.list_tasks(pb::ListTasksRequest { wave_id })
        .await
        .ok()
        .map(|r| r.into_inner().tasks)
}

/// `ListWaves` from one member; `None` when it cannot answer.
pub async fn list_waves(url: &str) -> Option<Vec<pb::WaveSummary>> {
    let mut c = try_client(url).await?;
    c.list_waves(pb::ListWavesRequest {})
        .await
        .ok()
        .map(|r| r.into_inner().waves)
}

/// A raft group of `venom-coordinator` processes on loopback, indexed by raft id − 1; a
/// member is `None` while it is down.
pub struct Group {
    pub members: Vec<Option<Coordinator>>,
    pub urls: Vec<String>,
}

impl Group {
    /// Starts `n` members on ports chosen up front, each listing all of them as peers;
    /// member `id` keeps its data in `root/c<id>` and gets `extra` flags.
    pub fn start(root: &Path, n: usize, extra: &[&str]) -> anyhow::Result<Group> {
        let dirs: Vec<PathBuf> = (1..=n).map(|id| root.join(format!("c{id}"))).collect();
        Self::start_in(&dirs, extra)
    }

    /// Starts one member per data dir (ids from 1, in order), as [`Group::start`] does.
    pub fn start_in(data_dirs: &[PathBuf], extra: &[&str]) -> anyhow::Result<Group> {
        let ports: Vec<u16> = data_dirs.iter().map(|_| free_port()).collect();
        let peers = ports
            .iter()
            .enumerate()
            .map(|(i, p)| format!("{}=127.0.0.1:{p}", i + 1))
            .collect::<Vec<_>>()
            .join(",");
        let mut members = Vec::new();
        for (i, (&port, dir)) in ports.iter().zip(data_dirs).enumerate() {
            members.push(Some(Coordinator::start_member(
                i as u64 + 1,
                port,
                &peers,
                dir,
                extra,
            )?));
        }
        let urls = members
            .iter()
            .flatten()
            .map(Coordinator::url)
            .collect::<Vec<_>>();
        Ok(Group { members, urls })
    }

    pub fn url(&self, id: u64) -> &str {
        &self.urls[(id - 1) as usize]
    }

    /// The `--peers` value naming every member (`1=HOST:PORT,…`).
    pub fn peers_arg(&self) -> String {
        self.urls
            .iter()
            .enumerate()
            .map(|(i, url)| format!("{}={}", i + 1, url.trim_start_matches("http://")))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Every member's URL, comma-separated (what workers and clients are given).
    pub fn all_urls(&self) -> String {
        self.urls.join(",")
    }

    pub fn ids(&self) -> Vec<u64> {
        (1..=self.members.len() as u64).collect()
    }

    pub fn live_ids(&self) -> Vec<u64> {
        self.ids()
            .into_iter()
            .filter(|id| self.members[(id - 1) as usize].is_some())
            .collect()
    }

    /// Kills member `id` with SIGKILL; it stays down (and is returned) until
    /// [`Group::restart`].
    pub fn kill9(&mut self, id: u64) -> Coordinator {
        let mut member = self.members[(id - 1) as usize]
            .take()
            .unwrap_or_else(|| panic!("member {id} is already down"));
        member.proc.kill9();
        member
    }

    /// Starts a killed member again on its port and data dir.
    pub fn restart(&mut self, id: u64, mut member: Coordinator) -> anyhow::Result<()> {
        member.kill9_and_restart()?;
        self.members[(id - 1) as usize] = Some(member);
        Ok(())
    }

    /// Waits until a live member other than `not` says it is the leader; returns its id.
    pub async fn wait_leader(&self, not: u64, timeout: Duration) -> u64 {
        let deadline = Instant::now() + timeout;
        loop {
            for id in self.live_ids() {
                if id == not {
                    continue;
                }
                if let Some(status) = cluster_status(self.url(id)).await {
                    let own_role = status.members.iter().find(|m| m.id == id).map(|m| m.role());
                    if status.leader_id == id && own_role == Some(pb::MemberRole::Leader) {
                        return id;
                    }
                }
            }
            assert!(
                Instant::now() < deadline,
                "no member (other than {not}) became leader within {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Asks the live members in turn; the first that knows the wave answers.
    pub async fn wave(&self, wave_id: u64) -> Option<pb::WaveSummary> {
        for id in self.live_ids() {
            if let Some(w) = get_wave(self.url(id), wave_id).await {
                return Some(w);
            }
        }
        None
    }

    /// Waits until some live member reports the wave in a final state; returns it.
    pub async fn wait_finished(&self, wave_id: u64, timeout: Duration) -> pb::WaveSummary {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(w) = self.wave(wave_id).await {
                if is_finished(&w) {
                    return w;
                }
            }
            assert!(
                Instant::now() < deadline,
                "wave {wave_id} did not finish within {timeout:?}: {:?}",
                self.wave(wave_id).await
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the leader has recorded at least `n` succeeded micro-tasks.
    pub async fn wait_succeeded(&self, leader: u64, wave_id: u64, n: u64, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(w) = get_wave(self.url(leader), wave_id).await {
                let done = w.counts.as_ref().map_or(0, |c| c.succeeded);
                if done >= n {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "leader {leader} did not reach {n} succeeded micro-tasks within {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until member `id` follows `leader` and has applied what the leader had
    /// committed when this was called.
    pub async fn wait_caught_up(&self, id: u64, leader: u64, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let target = loop {
            if let Some(s) = cluster_status(self.url(leader)).await {
                break s.commit_index;
            }
            assert!(
                Instant::now() < deadline,
                "leader {leader} stopped answering"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        loop {
            if let Some(s) = cluster_status(self.url(id)).await {
                if s.leader_id == leader && s.applied_index >= target {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "member {id} did not rejoin leader {leader} and apply index {target} \
                 within {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A fresh directory for one test, removed afterwards unless `VENOM_KEEP_TEST_DIR` is set
/// (then its path is printed and it stays, with the processes' data dirs and logs).
#[derive(Debug)]
pub struct TestDir {
    pub path: PathBuf,
    _temp: Option<tempfile::TempDir>,
}

pub fn test_dir(name: &str) -> anyhow::Result<TestDir> {
    let temp = tempfile::tempdir()?;
    let path = temp.path().to_path_buf();
    let temp = if std::env::var_os("VENOM_KEEP_TEST_DIR").is_some() {
        eprintln!("{name}: keeping {}", path.display());
        let _ = temp.keep();
        None
    } else {
        Some(temp)
    };
    Ok(TestDir { path, _temp: temp })
}
