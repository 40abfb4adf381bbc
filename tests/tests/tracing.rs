//! One trace per wave, across processes. A real coordinator, two workers and `venomctl submit`
//! export spans over OTLP/gRPC to a trace receiver started inside the test: the collector's
//! `TraceService` from `opentelemetry-proto`, the protocol Jaeger accepts on port 4317. The
//! tests check a wave's span tree and parent links, the attributes of every attempt's span,
//! error status on a failed attempt, the trace id `venomctl status` prints, that the trace goes
//! on after the coordinator is SIGKILLed and restarted mid-wave, and that without an endpoint
//! nothing is exported.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::trace::v1::status::StatusCode;
use venom_proto::v1 as pb;
use venom_tests::*;

const WAIT: Duration = Duration::from_secs(90);
/// How long spans may take to arrive after the work that made them is done.
const SPANS_WAIT: Duration = Duration::from_secs(20);

/// The OTLP trace receiver: keeps every export request.
#[derive(Clone, Default)]
struct Receiver {
    requests: Arc<Mutex<Vec<ExportTraceServiceRequest>>>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.requests.lock().unwrap().push(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// Serves a receiver on `addr`; returns it and its URL.
async fn start_receiver(addr: &str) -> std::io::Result<(Receiver, String)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let url = format!("http://{}", listener.local_addr()?);
    let receiver = Receiver::default();
    let server = tonic::transport::Server::builder()
        .add_service(TraceServiceServer::new(receiver.clone()))
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
    tokio::spawn(server);
    Ok((receiver, url))
}

/// One received span, flattened with its resource.
#[derive(Debug, Clone)]
struct Span {
    service: String,
    instance: String,
    trace_id: String,
    span_id: String,
    /// Empty for a root span.
    parent: String,
    name: String,
    start_ns: u64,
    attributes: HashMap<String, Value>,
    error: bool,
}

impl Span {
    fn str(&self, key: &str) -> Option<&str> {
        match self.attributes.get(key)? {
            Value::StringValue(s) => Some(s),
            _ => None,
        }
    }

    fn int(&self, key: &str) -> Option<i64> {
        match self.attributes.get(key)? {
            Value::IntValue(i) => Some(*i),
            _ => None,
        }
    }

    fn bool(&self, key: &str) -> Option<bool> {
        match self.attributes.get(key)? {
            Value::BoolValue(b) => Some(*b),
            _ => None,
        }
    }

    fn double(&self, key: &str) -> Option<f64> {
        match self.attributes.get(key)? {
            Value::DoubleValue(d) => Some(*d),
            _ => None,
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn attributes(list: &[KeyValue]) -> HashMap<String, Value> {
    list.iter()
        .filter_map(|kv| Some((kv.key.clone(), kv.value.as_ref()?.value.clone()?)))
        .collect()
}

impl Receiver {
    fn n_requests(&self) -> usize {
        self.requests.lock().unwrap().len()
    }

    fn spans(&self) -> Vec<Span> {
        let requests = self.requests.lock().unwrap();
        let mut out = Vec::new();
        for request in requests.iter() {
            for resource_spans in &request.resource_spans {
                let resource = attributes(
                    resource_spans
                        .resource
                        .as_ref()
                        .map_or(&[][..], |r| &r.attributes[..]),
                );
                let text = |key: &str| match resource.get(key) {
                    Some(Value::StringValue(s)) => s.clone(),
                    _ => String::new(),
                };
                for scope in &resource_spans.scope_spans {
                    for span in &scope.spans {
                        out.push(Span {
                            service: text("service.name"),
                            instance: text("service.instance.id"),
                            trace_id: hex(&span.trace_id),
                            span_id: hex(&span.span_id),
                            parent: hex(&span.parent_span_id),
                            name: span.name.clone(),
                            start_ns: span.start_time_unix_nano,
                            attributes: attributes(&span.attributes),
                            error: span
                                .status
                                .as_ref()
                                .is_some_and(|s| s.code == StatusCode::Error as i32),
                        });
                    }
                }
            }
        }
        out
    }

    /// Polls until `done` holds for the spans received (or [`SPANS_WAIT`] passes); returns them.
    async fn wait_for(&self, done: impl Fn(&[Span]) -> bool) -> Vec<Span> {
        let deadline = Instant::now() + SPANS_WAIT;
        loop {
            let spans = self.spans();
            if done(&spans) || Instant::now() > deadline {
                return spans;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Environment that points a process at the receiver, flushing batches every 200 ms.
fn export_env(receiver_url: &str) -> Vec<(String, String)> {
    vec![
        (
            "OTEL_EXPORTER_OTLP_ENDPOINT".to_owned(),
            receiver_url.to_owned(),
        ),
        ("OTEL_BSP_SCHEDULE_DELAY".to_owned(), "200".to_owned()),
    ]
}

/// Runs `venomctl ARGS` against `url` with `env`; returns exit code, stdout and stderr.
async fn venomctl(url: &str, env: &[(String, String)], args: &[&str]) -> (i32, String, String) {
    let mut command = std::process::Command::new(bin_path("venomctl"));
    command.envs(venom_tests::pki::pki().env(venom_tls::Role::Admin, venom_tests::pki::ADMIN));
    with_env(&mut command, env)
        .arg("--coordinator")
        .arg(url)
        .args(args)
        .env("RUST_LOG", "warn");
    let output = tokio::process::Command::from(command)
        .output()
        .await
        .unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// The wave id in `submitted wave N …` (what `submit --wait` says on stderr).
fn submitted_wave_id(stderr: &str) -> u64 {
    let rest = stderr
        .split("submitted wave ")
        .nth(1)
        .unwrap_or_else(|| panic!("no `submitted wave` in {stderr:?}"));
    rest.split_whitespace().next().unwrap().parse().unwrap()
}

/// The trace id on the `trace id` line of `venomctl status`, if there is one.
fn printed_trace_id(status_stdout: &str) -> Option<String> {
    let line = status_stdout.lines().find(|l| l.contains("trace id"))?;
    line.split_whitespace()
        .find(|word| word.len() == 32 && word.bytes().all(|b| b.is_ascii_hexdigit()))
        .map(str::to_owned)
}

fn trace_id_of(traceparent: &str) -> String {
    traceparent.split('-').nth(1).unwrap_or_default().to_owned()
}

async fn get_wave(url: &str, wave_id: u64) -> pb::WaveSummary {
    let mut c = client(url).await.unwrap();
    c.get_wave(pb::GetWaveRequest { wave_id })
        .await
        .unwrap()
        .into_inner()
}

fn write_wave(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

fn one<'a>(spans: &'a [Span], name: &str) -> &'a Span {
    let found: Vec<&Span> = spans.iter().filter(|s| s.name == name).collect();
    assert_eq!(found.len(), 1, "expected one `{name}` span, got {found:#?}");
    found[0]
}

fn trace_ids(spans: &[Span]) -> BTreeSet<String> {
    spans.iter().map(|s| s.trace_id.clone()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wave_is_one_trace_across_client_coordinator_and_workers() {
    let t0 = Instant::now();
    let (receiver, receiver_url) = start_receiver("127.0.0.1:0").await.unwrap();
    let env = export_env(&receiver_url);
    let dir = tempfile::tempdir().unwrap();
    let coordinator =
        Coordinator::start_with_env(&dir.path().join("coordinator"), &[], &env).unwrap();
    let _workers: Vec<Proc> = ["w1", "w2"]
        .iter()
        .map(|name| {
            start_worker_with_env(&coordinator.url(), name, 2, &["--throttle", "off"], &env)
                .unwrap()
        })
        .collect();
    wait_ready(&coordinator.url(), 2).await.unwrap();

    let file = write_wave(
        dir.path(),
        "traced",
        r#"
name = "traced"
[defaults]
retries = 0
[[task]]
id = "prep"
run = "true"
env = { VENOM_TEST_SECRET = "s3cr3t-9f2c" }
[[task]]
id = "shard"
array = 4
deps = ["prep"]
run = "sleep 0.1"
[[task]]
id = "bad"
run = "exit 3"
"#,
    );
    let (code, _, stderr) = venomctl(&coordinator.url(), &env, &["submit", &file, "--wait"]).await;
    assert_eq!(code, 1, "the wave fails (task `bad`): {stderr}");
    let wave_id = submitted_wave_id(&stderr);
    let (code, status_out, _) =
        venomctl(&coordinator.url(), &env, &["status", &wave_id.to_string()]).await;
    assert_eq!(code, 0);
    let printed = printed_trace_id(&status_out)
        .unwrap_or_else(|| panic!("`venomctl status` prints no trace id: {status_out}"));

    let spans = receiver
        .wait_for(|spans| {
            let has = |name: &str| spans.iter().any(|s| s.name == name);
            [
                "submit",
                "SubmitWave",
                "validate",
                "raft.commit",
                "schedule",
            ]
            .iter()
            .all(|name| has(name))
                && spans.iter().filter(|s| s.name == "attempt").count() >= 6
        })
        .await;

    // One trace, the one `venomctl status` names, from three kinds of process.
    assert_eq!(
        trace_ids(&spans),
        BTreeSet::from([printed.clone()]),
        "every span belongs to the wave's one trace: {spans:#?}"
    );
    assert_eq!(
        trace_id_of(&get_wave(&coordinator.url(), wave_id).await.traceparent),
        printed
    );
    let processes: BTreeSet<(String, String)> = spans
        .iter()
        .map(|s| (s.service.clone(), s.instance.clone()))
        .collect();
    let services: BTreeSet<&str> = processes.iter().map(|(s, _)| s.as_str()).collect();
    assert_eq!(
        services,
        BTreeSet::from(["venomctl", "venom-coordinator", "venom-worker"]),
        "{processes:?}"
    );
    assert!(processes.len() >= 3, "{processes:?}");

    // Spans carry ids, names, states and figures: never a command or an environment value.
    for span in &spans {
        for (key, value) in &span.attributes {
            if let Value::StringValue(text) = value {
                for secret in ["s3cr3t-9f2c", "sleep 0.1", "exit 3"] {
                    assert!(
                        !text.contains(secret),
                        "span `{}` attribute `{key}` holds `{secret}`",
                        span.name
                    );
                }
            }
        }
    }
    let log = std::fs::read_to_string(coordinator.log_path()).unwrap_or_default();
    assert!(
        !log.contains("s3cr3t-9f2c"),
        "the coordinator logged an env value"
    );

    // The tree: submit → SubmitWave → {validate, raft.commit, schedule → attempt}.
    let submit = one(&spans, "submit");
    assert_eq!(submit.service, "venomctl");
    assert_eq!(submit.parent, "", "submit is the root");
    assert_eq!(submit.str("venom.wave.name"), Some("traced"));
    assert_eq!(submit.int("venom.wave.id"), Some(wave_id as i64));
    let submit_wave = one(&spans, "SubmitWave");
    assert_eq!(submit_wave.service, "venom-coordinator");
    assert_eq!(submit_wave.instance, "1");
    assert_eq!(submit_wave.parent, submit.span_id);
    assert_eq!(submit_wave.int("venom.wave.id"), Some(wave_id as i64));
    for name in ["validate", "raft.commit"] {
        assert_eq!(one(&spans, name).parent, submit_wave.span_id, "{name}");
    }
    let schedules: Vec<&Span> = spans.iter().filter(|s| s.name == "schedule").collect();
    for schedule in &schedules {
        assert_eq!(schedule.parent, submit_wave.span_id, "{schedule:#?}");
        assert_eq!(schedule.int("venom.wave.id"), Some(wave_id as i64));
    }
    let dispatched: i64 = schedules
        .iter()
        .map(|s| s.int("venom.dispatched").unwrap())
        .sum();
    assert_eq!(
        dispatched, 6,
        "six attempts dispatched in all: {schedules:#?}"
    );
    let schedule_ids: BTreeSet<&str> = schedules.iter().map(|s| s.span_id.as_str()).collect();

    // One span per attempt, recorded by the worker that ran it, with its attributes.
    let ran_on: BTreeMap<(String, Option<u32>), pb::MicroTaskInfo> =
        tasks(&coordinator.url(), wave_id)
            .await
            .unwrap()
            .into_iter()
            .map(|t| ((t.task_id.clone(), t.index), t))
            .collect();
    let attempts: Vec<&Span> = spans.iter().filter(|s| s.name == "attempt").collect();
    assert_eq!(attempts.len(), 6, "{attempts:#?}");
    let mut seen = BTreeSet::new();
    for attempt in &attempts {
        let task = attempt.str("venom.task.id").unwrap().to_owned();
        let index = attempt.int("venom.task.index").map(|i| i as u32);
        assert!(
            seen.insert((task.clone(), index)),
            "two spans for {task}[{index:?}]"
        );
        let info = &ran_on[&(task.clone(), index)];
        assert_eq!(attempt.service, "venom-worker");
        assert_eq!(attempt.str("venom.node"), Some(info.node.as_str()));
        assert_eq!(
            attempt.instance, info.node,
            "recorded on the worker that ran it"
        );
        assert!(
            schedule_ids.contains(attempt.parent.as_str()),
            "{attempt:#?}"
        );
        assert_eq!(attempt.int("venom.wave.id"), Some(wave_id as i64));
        assert_eq!(attempt.str("venom.wave.name"), Some("traced"));
        assert_eq!(attempt.int("venom.attempt"), Some(1));
        assert_eq!(attempt.bool("venom.timed_out"), Some(false));
        assert!(attempt.int("venom.queue_wait_ms").is_some(), "{attempt:#?}");
        let theta = attempt.double("venom.theta").unwrap();
        assert!((0.0..=1.0).contains(&theta), "θ {theta}");
        assert!(
            ["UNWRAP", "TRANSITION", "BALANCE", "WRAP", "OPTIMIZE"]
                .contains(&attempt.str("venom.mode").unwrap_or("")),
            "{attempt:#?}"
        );
        let expected_code = if task == "bad" { 3 } else { 0 };
        assert_eq!(attempt.int("process.exit.code"), Some(expected_code));
        assert_eq!(
            attempt.error,
            task == "bad",
            "error status exactly on the failed attempt: {attempt:#?}"
        );
    }
    assert_eq!(seen.len(), 6);
    assert!(seen.contains(&("shard".to_owned(), Some(3))));
    println!(
        "traced wave: {} spans from {} processes in trace {printed}; test took {:.1} s",
        spans.len(),
        processes.len(),
        t0.elapsed().as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_trace_goes_on_after_a_coordinator_restart() {
    let t0 = Instant::now();
    let (receiver, receiver_url) = start_receiver("127.0.0.1:0").await.unwrap();
    let env = export_env(&receiver_url);
    let dir = tempfile::tempdir().unwrap();
    let mut coordinator =
        Coordinator::start_with_env(&dir.path().join("coordinator"), &[], &env).unwrap();
    // One slot and no queue each, so most micro-tasks are dispatched after the restart.
    let _workers: Vec<Proc> = ["w1", "w2"]
        .iter()
        .map(|name| {
            start_worker_with_env(
                &coordinator.url(),
                name,
                1,
                &["--throttle", "off", "--queue-depth", "0"],
                &env,
            )
            .unwrap()
        })
        .collect();
    wait_ready(&coordinator.url(), 2).await.unwrap();
    let file = write_wave(
        dir.path(),
        "restarted",
        r#"
name = "restarted"
[[task]]
id = "slow"
array = 10
run = "sleep 0.5"
"#,
    );
    let (code, stdout, stderr) = venomctl(&coordinator.url(), &env, &["submit", &file]).await;
    assert_eq!(code, 0, "{stderr}");
    let wave_id: u64 = stdout.trim().parse().unwrap();
    let before = get_wave(&coordinator.url(), wave_id).await;
    let trace_id = trace_id_of(&before.traceparent);
    assert_eq!(trace_id.len(), 32, "{before:?}");

    // SIGKILL the coordinator mid-wave and start it again on the same data.
    let deadline = Instant::now() + WAIT;
    loop {
        let wave = get_wave(&coordinator.url(), wave_id).await;
        let succeeded = wave.counts.as_ref().map_or(0, |c| c.succeeded);
        if succeeded >= 2 {
            assert_eq!(
                wave.state(),
                pb::WaveState::Running,
                "the wave must still run at the kill"
            );
            break;
        }
        assert!(Instant::now() < deadline, "no progress: {wave:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let killed_at_ns = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    coordinator.kill9_and_restart().unwrap();
    let summary = wait_wave(&coordinator.url(), wave_id, WAIT).await.unwrap();
    assert_eq!(summary.state(), pb::WaveState::Succeeded, "{summary:?}");
    assert_eq!(
        trace_id_of(&summary.traceparent),
        trace_id,
        "the stored context survives the restart"
    );

    let after_restart = |s: &Span| s.name == "schedule" && s.start_ns > killed_at_ns;
    let spans = receiver
        .wait_for(|spans| {
            let indexes: BTreeSet<i64> = spans
                .iter()
                .filter(|s| s.name == "attempt")
                .filter_map(|s| s.int("venom.task.index"))
                .collect();
            indexes.len() == 10 && spans.iter().any(after_restart)
        })
        .await;
    assert_eq!(
        trace_ids(&spans),
        BTreeSet::from([trace_id.clone()]),
        "one trace before and after the restart: {spans:#?}"
    );
    let submit_wave = one(&spans, "SubmitWave");
    let later_rounds: Vec<&Span> = spans.iter().filter(|s| after_restart(s)).collect();
    assert!(
        !later_rounds.is_empty(),
        "the restarted coordinator dispatched under the wave's trace: {spans:#?}"
    );
    for round in &later_rounds {
        assert_eq!(round.service, "venom-coordinator");
        assert_eq!(
            round.parent, submit_wave.span_id,
            "a round after the restart hangs under the SubmitWave span of before it"
        );
    }
    let later_ids: BTreeSet<&str> = later_rounds.iter().map(|s| s.span_id.as_str()).collect();
    let later_attempts = spans
        .iter()
        .filter(|s| s.name == "attempt" && later_ids.contains(s.parent.as_str()))
        .count();
    assert!(later_attempts >= 1, "{spans:#?}");
    let indexes: BTreeSet<i64> = spans
        .iter()
        .filter(|s| s.name == "attempt")
        .filter_map(|s| s.int("venom.task.index"))
        .collect();
    assert_eq!(
        indexes,
        (0..10).collect(),
        "every micro-task's attempt is in the trace"
    );
    println!(
        "restart: {} rounds and {later_attempts} attempts after the restart in trace {trace_id}; \
         test took {:.1} s",
        later_rounds.len(),
        t0.elapsed().as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn venomctl_dev_traces_its_embedded_coordinator_and_worker() {
    let (receiver, receiver_url) = start_receiver("127.0.0.1:0").await.unwrap();
    let env = export_env(&receiver_url);
    let dir = tempfile::tempdir().unwrap();
    let file = write_wave(
        dir.path(),
        "dev",
        "name = \"dev\"\n[[task]]\nid = \"a\"\nrun = \"true\"\n\
         [[task]]\nid = \"b\"\ndeps = [\"a\"]\narray = 2\nrun = \"true\"\n",
    );
    // `--coordinator` is ignored by `dev`; the embedded cluster listens on a free port.
    let (code, _, stderr) = venomctl(
        "http://127.0.0.1:1",
        &env,
        &["dev", "--listen", "127.0.0.1:0", &file],
    )
    .await;
    assert_eq!(code, 0, "{stderr}");
    // Everything was flushed before `venomctl` exited.
    let spans = receiver.spans();
    let names: BTreeSet<&str> = spans.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        names,
        BTreeSet::from([
            "submit",
            "SubmitWave",
            "validate",
            "raft.commit",
            "schedule",
            "attempt"
        ]),
        "{spans:#?}"
    );
    assert_eq!(trace_ids(&spans).len(), 1, "{spans:#?}");
    assert!(spans.iter().all(|s| s.service == "venomctl"));
    assert_eq!(spans.iter().filter(|s| s.name == "attempt").count(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_endpoint_nothing_is_exported() {
    // A receiver on the OTLP default port catches anything sent by default, if the port is free.
    let default_port = start_receiver("127.0.0.1:4317").await.ok();
    if default_port.is_none() {
        println!("port 4317 is taken; checking only that no trace context is created");
    }
    let env = vec![("OTEL_BSP_SCHEDULE_DELAY".to_owned(), "100".to_owned())];
    let dir = tempfile::tempdir().unwrap();
    let coordinator =
        Coordinator::start_with_env(&dir.path().join("coordinator"), &[], &env).unwrap();
    let _worker = start_worker_with_env(&coordinator.url(), "w1", 2, &[], &env).unwrap();
    wait_ready(&coordinator.url(), 1).await.unwrap();
    let file = write_wave(
        dir.path(),
        "quiet",
        "name = \"quiet\"\n[[task]]\nid = \"t\"\narray = 3\nrun = \"true\"\n",
    );

    // No context of its own: the wave stores none, and `status` prints no trace id.
    let (code, _, stderr) = venomctl(&coordinator.url(), &env, &["submit", &file, "--wait"]).await;
    assert_eq!(code, 0, "{stderr}");
    let wave_id = submitted_wave_id(&stderr);
    assert_eq!(get_wave(&coordinator.url(), wave_id).await.traceparent, "");
    let (_, status_out, _) =
        venomctl(&coordinator.url(), &env, &["status", &wave_id.to_string()]).await;
    assert_eq!(printed_trace_id(&status_out), None, "{status_out}");

    // A caller's context is still carried and stored as it came.
    let caller = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let mut with_caller = env.clone();
    with_caller.push(("TRACEPARENT".to_owned(), caller.to_owned()));
    let (code, _, stderr) = venomctl(
        &coordinator.url(),
        &with_caller,
        &["submit", &file, "--wait"],
    )
    .await;
    assert_eq!(code, 0, "{stderr}");
    let wave_id = submitted_wave_id(&stderr);
    assert_eq!(
        get_wave(&coordinator.url(), wave_id).await.traceparent,
        caller
    );
    let (_, status_out, _) =
        venomctl(&coordinator.url(), &env, &["status", &wave_id.to_string()]).await;
    assert_eq!(
        printed_trace_id(&status_out).as_deref(),
        Some("4bf92f3577b34da6a3ce929d0e0e4736")
    );

    if let Some((receiver, _)) = default_port {
        // Longer than a batch interval: anything exported would have arrived.
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(
            receiver.n_requests(),
            0,
            "spans were exported without an endpoint"
        );
    }
}
