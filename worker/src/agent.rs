//! The agent loop: one worker's conversation with the coordinator.
//!
//! The agent keeps one bidirectional `WorkerService.Connect` stream open to the leader. It
//! registers (profile, slots, labels, policy, plus whatever it is still running and every result
//! the coordinator has not acknowledged), then reacts to events as they happen: assignments are
//! queued FIFO and started while the running attempts' `cpus` fit the coordinator's
//! `slots_limit`; each start and finish is reported, and everything that is ready at one moment
//! leaves in one `WorkerMessage`; a heartbeat carries θ every interval.
//!
//! Execution is decoupled from the connection: running processes keep running while the agent
//! reconnects (round-robin over the coordinator URLs, following "not leader" hints, with capped
//! exponential backoff and jitter), and finished results stay in an unacknowledged set until the
//! coordinator acknowledges them, so a leader change loses nothing.
//!
//! Attempts run on runners: pooled blocking threads (see the executor for why not async). When
//! an attempt ends, its runner records the result and starts the next queued attempt itself, so
//! back-to-back micro-tasks on a slot never wait for the agent loop or the network; the loop is
//! only woken to report. [`AgentState`] holds all bookkeeping behind one mutex and does no I/O,
//! so it is tested directly; the loop in [`run`] owns the connection.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use futures::StreamExt;
use prost::Message as _;
use rand::Rng;
use tokio::sync::{mpsc, Notify};
use tokio::time::{Instant, MissedTickBehavior, Sleep};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Endpoint;
use tonic::Streaming;
use venom_proto::worker_service_client::WorkerServiceClient;
use venom_proto::{
    Assignment, CoordinatorMessage, Heartbeat, Register, TaskFinished, TaskStarted, WorkerMessage,
};

use crate::config::WorkerConfig;
use crate::executor::{
    cancel_pair, spawn_attempt, AttemptKey, AttemptOutcome, CancelHandle, CancelToken,
};
use crate::metrics::WorkerMetrics;
use crate::scan::HardwareProfile;
use crate::theta::{ThetaMonitor, ThetaSnapshot, DEFAULT_SAMPLE_INTERVAL};

/// Messages buffered towards the coordinator; when full, events accumulate in [`AgentState`]
/// and leave together in the next message.
const OUTBOUND_CHANNEL_CAPACITY: usize = 8;
/// Assignments queued beyond this are refused with an error result: the coordinator sends at
/// most slots + queue depth, so only a misbehaving one gets here.
const MAX_QUEUED_ASSIGNMENTS: usize = 10_000;
/// Soft limit on one `WorkerMessage`; more results than fit go in the following messages.
/// Well under tonic's default 4 MiB decoding limit.
const MESSAGE_BUDGET_BYTES: usize = 1024 * 1024;
/// Largest `CoordinatorMessage` accepted.
const MAX_INBOUND_MESSAGE_BYTES: usize = 64 * 1024 * 1024;
/// How long a start report may wait for company. Nothing waits on `TaskStarted`, so it rides
/// along with the next result or heartbeat when one comes soon, halving the messages for short
/// tasks. Results wait the same way, but only while work is queued here (see
/// `AgentState::has_urgent_outbound`).
const STARTED_COALESCE: Duration = Duration::from_millis(5);

/// Results held back while work is queued here are sent once this many wait.
const MAX_COALESCED_RESULTS: usize = 64;
/// Time allowed to open a connection and the stream.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// HTTP/2 keep-alive: how a silently dead coordinator is noticed.
const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(5);
const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// How soon to ask again when a coordinator says it is not the leader and knows none yet
/// (an election is under way).
const NOT_LEADER_RETRY: Duration = Duration::from_millis(100);

/// Reconnect backoff bounds.
const BACKOFF_MIN_MS: u64 = 50;
const BACKOFF_MAX_MS: u64 = 2_000;
/// On shutdown, how long to wait for killed attempts to be reaped.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Why the agent cannot run at all. Everything after start-up is retried, never returned.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("no coordinator URL given")]
    NoCoordinator,
    #[error("invalid coordinator URL `{url}`: {reason}")]
    InvalidCoordinatorUrl { url: String, reason: String },
    #[error("--metrics-listen: cannot listen on {addr}: {source}")]
    MetricsListen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

/// What an attempt's runner records in the [`AgentState`].
#[derive(Debug)]
pub enum ExecEvent {
    Started(TaskStarted),
    Finished(TaskFinished),
}

/// An attempt [`AgentState::start_next`] marked running, for a runner to start.
#[derive(Debug)]
pub struct NextAttempt {
    pub assignment: Assignment,
    /// Signalled when the coordinator cancels the attempt.
    pub cancel: CancelToken,
    /// When the assignment arrived here.
    pub received_at: std::time::Instant,
}

/// A running (or starting) attempt.
#[derive(Debug)]
struct RunningSlot {
    /// Kills the attempt's process group.
    cancel: CancelHandle,
    /// Slots it occupies (its `cpus`, at least 1).
    cpus: u32,
}

/// The agent's bookkeeping: queue, running attempts, unacknowledged results and what is waiting
/// to be sent. No I/O and no clock beyond time stamps (results, assignment arrival).
#[derive(Debug)]
pub struct AgentState {
    /// Slots this worker may fill at once now (the coordinator's throttled view).
    slots_limit: u32,
    /// Accepted assignments not yet started, FIFO, with when each arrived (for the queue wait
    /// an attempt's span records).
    queue: VecDeque<(Assignment, std::time::Instant)>,
    /// Keys of `queue`, for duplicate detection.
    queued: HashSet<AttemptKey>,
    running: HashMap<AttemptKey, RunningSlot>,
    /// Sum of `cpus` over `running`.
    running_cpus: u32,
    /// Finished results the coordinator has not acknowledged, re-sent on every registration.
    unacked: BTreeMap<AttemptKey, TaskFinished>,
    /// Waiting to be sent.
    out_started: Vec<TaskStarted>,
    out_finished: VecDeque<TaskFinished>,
    out_heartbeat: Option<Heartbeat>,
}

impl AgentState {
    pub fn new(slots_limit: u32) -> Self {
        Self {
            slots_limit,
            queue: VecDeque::new(),
            queued: HashSet::new(),
            running: HashMap::new(),
            running_cpus: 0,
            unacked: BTreeMap::new(),
            out_started: Vec::new(),
            out_finished: VecDeque::new(),
            out_heartbeat: None,
        }
    }

    pub fn slots_limit(&self) -> u32 {
        self.slots_limit
    }

    pub fn n_running(&self) -> usize {
        self.running.len()
    }

    pub fn n_queued(&self) -> usize {
        self.queue.len()
    }

    pub fn running_cpus(&self) -> u32 {
        self.running_cpus
    }

    /// Keys of the unacknowledged results.
    pub fn unacked_keys(&self) -> Vec<AttemptKey> {
        self.unacked.keys().copied().collect()
    }

    /// Applies one coordinator message (everything but `error`, which the loop handles).
    pub fn on_coordinator_message(&mut self, message: CoordinatorMessage) {
        if let Some(limit) = message.slots_limit {
            self.slots_limit = limit;
        }
        for attempt in message.ack {
            self.unacked.remove(&AttemptKey::from(attempt));
        }
        for assignment in message.assign {
            self.assign(assignment);
        }
        for attempt in message.cancel {
            self.cancel(AttemptKey::from(attempt));
        }
    }

    /// Queues an assignment, ignoring one already queued or running. One that already finished
    /// here has its result sent again instead of running twice.
    pub fn assign(&mut self, assignment: Assignment) {
        let key = AttemptKey::from(assignment.attempt);
        if self.running.contains_key(&key) || self.queued.contains(&key) {
            tracing::debug!(%key, "duplicate assignment ignored");
            return;
        }
        if let Some(result) = self.unacked.get(&key) {
            tracing::debug!(%key, "assignment of a finished attempt; sending its result again");
            self.out_finished.push_back(result.clone());
            return;
        }
        if self.queue.len() >= MAX_QUEUED_ASSIGNMENTS {
            tracing::warn!(%key, "assignment queue full; refusing");
            let outcome = AttemptOutcome {
                attempt: key,
                started_ms: crate::unix_now_ms(),
                finished_ms: crate::unix_now_ms(),
                error: Some(format!(
                    "worker queue full ({MAX_QUEUED_ASSIGNMENTS} assignments)"
                )),
                ..AttemptOutcome::default()
            };
            self.record_finished(outcome.into());
            return;
        }
        self.queued.insert(key);
        self.queue
            .push_back((assignment, std::time::Instant::now()));
    }

    /// Cancels a running attempt (its result follows with `cancelled`) or drops a queued one
    /// (reported as cancelled at once).
    pub fn cancel(&mut self, key: AttemptKey) {
        if let Some(slot) = self.running.get(&key) {
            slot.cancel.cancel();
        } else if self.queued.remove(&key) {
            self.queue
                .retain(|(assignment, _)| AttemptKey::from(assignment.attempt) != key);
            self.record_finished(AttemptOutcome::cancelled_before_start(key).into());
        }
    }

    /// Cancels everything running and forgets the queue (shutdown).
    pub fn cancel_all(&mut self) {
        for slot in self.running.values() {
            slot.cancel.cancel();
        }
        self.queue.clear();
        self.queued.clear();
    }

    /// The next assignment that may start now, marked running. FIFO: a head that does not fit
    /// waits for capacity, except that anything may start when nothing runs (a task asking for
    /// more cpus than the limit runs alone). A limit of 0 starts nothing.
    pub fn start_next(&mut self) -> Option<NextAttempt> {
        let (front, _) = self.queue.front()?;
        let cpus = front.cpus.max(1);
        if self.slots_limit == 0
            || (self.running_cpus > 0 && self.running_cpus.saturating_add(cpus) > self.slots_limit)
        {
            return None;
        }
        let (assignment, received_at) = self.queue.pop_front()?;
        let key = AttemptKey::from(assignment.attempt);
        self.queued.remove(&key);
        let (cancel, token) = cancel_pair();
        self.running.insert(key, RunningSlot { cancel, cpus });
        self.running_cpus = self.running_cpus.saturating_add(cpus);
        Some(NextAttempt {
            assignment,
            cancel: token,
            received_at,
        })
    }

    /// Records an event from an attempt.
    pub fn on_event(&mut self, event: ExecEvent) {
        match event {
            ExecEvent::Started(started) => {
                if self
                    .running
                    .contains_key(&AttemptKey::from(started.attempt))
                {
                    self.out_started.push(started);
                }
            }
            ExecEvent::Finished(finished) => {
                let key = AttemptKey::from(finished.attempt);
                if let Some(slot) = self.running.remove(&key) {
                    self.running_cpus = self.running_cpus.saturating_sub(slot.cpus);
                }
                self.record_finished(finished);
            }
        }
    }

    fn record_finished(&mut self, finished: TaskFinished) {
        let key = AttemptKey::from(finished.attempt);
        self.unacked.insert(key, finished.clone());
        self.out_finished.push_back(finished);
    }

    /// Sets the heartbeat to send with the next message (replacing an unsent one).
    pub fn set_heartbeat(&mut self, heartbeat: Heartbeat) {
        self.out_heartbeat = Some(heartbeat);
    }

    /// True when a result or a heartbeat waits: send at once.
    ///
    /// A result is urgent unless this worker still has queued work: then nothing waits on
    /// the coordinator's answer, and results coalesce like start reports (fewer messages,
    /// bigger group commits), up to [`MAX_COALESCED_RESULTS`].
    pub fn has_urgent_outbound(&self) -> bool {
        self.out_heartbeat.is_some()
            || (!self.out_finished.is_empty()
                && (self.queue.is_empty() || self.out_finished.len() >= MAX_COALESCED_RESULTS))
    }

    /// True when something waits to be sent.
    pub fn has_outbound(&self) -> bool {
        !self.out_started.is_empty()
            || !self.out_finished.is_empty()
            || self.out_heartbeat.is_some()
    }

    /// The next message: the heartbeat, every start, and as many results as fit the budget
    /// (always at least one). `None` when nothing waits.
    pub fn take_message(&mut self) -> Option<WorkerMessage> {
        if !self.has_outbound() {
            return None;
        }
        let mut message = WorkerMessage {
            register: None,
            heartbeat: self.out_heartbeat.take(),
            started: std::mem::take(&mut self.out_started),
            finished: Vec::new(),
        };
        let mut size_bytes = message.encoded_len();
        while let Some(next) = self.out_finished.front() {
            let next_bytes = next.encoded_len() + 8;
            if !message.finished.is_empty() && size_bytes + next_bytes > MESSAGE_BUDGET_BYTES {
                break;
            }
            size_bytes += next_bytes;
            message.finished.extend(self.out_finished.pop_front());
        }
        Some(message)
    }

    /// The registration for a new connection. It lists every running or queued attempt and
    /// every unacknowledged result (those beyond the size budget follow as ordinary `finished`
    /// messages), so everything waiting to be sent before is superseded and dropped.
    pub fn register(&mut self, identity: &Identity) -> WorkerMessage {
        self.out_started.clear();
        self.out_finished.clear();
        let mut running: Vec<_> = self.running.keys().copied().collect();
        running.sort();
        running.extend(
            self.queue
                .iter()
                .map(|(assignment, _)| AttemptKey::from(assignment.attempt)),
        );
        let mut register = Register {
            name: identity.name.to_string(),
            profile: Some(identity.profile.clone()),
            slots: identity.slots,
            labels: identity.labels.clone(),
            throttle_policy: identity.throttle_policy.clone(),
            running: running.into_iter().map(AttemptKey::to_proto).collect(),
            unacknowledged: Vec::new(),
            queue_depth: identity.queue_depth,
        };
        let mut size_bytes = register.encoded_len();
        for result in self.unacked.values() {
            let result_bytes = result.encoded_len() + 8;
            if !register.unacknowledged.is_empty()
                && size_bytes + result_bytes > MESSAGE_BUDGET_BYTES
            {
                self.out_finished.push_back(result.clone());
            } else {
                size_bytes += result_bytes;
                register.unacknowledged.push(result.clone());
            }
        }
        WorkerMessage {
            register: Some(register),
            ..WorkerMessage::default()
        }
    }
}

/// What the worker says about itself in every registration.
#[derive(Debug, Clone)]
pub struct Identity {
    pub name: Arc<str>,
    pub profile: venom_proto::HardwareProfile,
    pub slots: u32,
    pub labels: HashMap<String, String>,
    pub throttle_policy: String,
    pub queue_depth: u32,
}

/// Capped exponential backoff with jitter: 50 ms doubling to 2 s, each delay drawn from the
/// upper half of the current step so that many workers do not reconnect in lockstep.
#[derive(Debug)]
struct Backoff {
    step_ms: u64,
}

impl Backoff {
    fn new() -> Self {
        Self {
            step_ms: BACKOFF_MIN_MS,
        }
    }

    fn next_delay(&mut self) -> Duration {
        let step_ms = self.step_ms;
        self.step_ms = (step_ms * 2).min(BACKOFF_MAX_MS);
        Duration::from_millis(rand::thread_rng().gen_range(step_ms / 2..=step_ms))
    }

    fn reset(&mut self) {
        self.step_ms = BACKOFF_MIN_MS;
    }
}

/// Adds `http://` to an address given without a scheme.
pub fn normalize_url(url: &str) -> String {
    let url = url.trim();
    if url.contains("://") {
        url.to_owned()
    } else {
        format!("http://{url}")
    }
}

/// The leader's address in a refusal like "not leader: leader=http://10.0.0.2:7070" (the
/// coordinator's form) or "not leader: 10.0.0.2:7070", if it names one.
pub fn leader_hint(error: &str) -> Option<String> {
    let lower = error.to_ascii_lowercase();
    let at = lower.find("not leader")? + "not leader".len();
    let rest = error[at..].trim_start_matches([':', ' ', ';', ',', '\t']);
    let word = rest
        .split_whitespace()
        .next()?
        .trim_end_matches([',', ';', ')', '.'])
        .trim_start_matches('(');
    let candidate = match word.get(..7) {
        Some(prefix) if prefix.eq_ignore_ascii_case("leader=") => &word[7..],
        _ => word,
    };
    let looks_like_address = !candidate.is_empty()
        && (candidate.contains(':') || candidate.contains('.'))
        && !candidate.eq_ignore_ascii_case("unknown");
    looks_like_address.then(|| normalize_url(candidate))
}

type ConnectFuture =
    Pin<Box<dyn Future<Output = Result<Box<Streaming<CoordinatorMessage>>, String>> + Send>>;

/// The connection's state.
enum Link {
    /// Waiting to (re)connect.
    Idle(Pin<Box<Sleep>>),
    /// Opening the stream; the registration is already queued on it.
    Connecting(ConnectFuture),
    /// Streaming; the coordinator's messages arrive here.
    Up(Box<Streaming<CoordinatorMessage>>),
}

/// What happened on the link.
enum LinkEvent {
    RetryDue,
    Connected(Result<Box<Streaming<CoordinatorMessage>>, String>),
    Inbound(Option<Result<CoordinatorMessage, tonic::Status>>),
}

impl Link {
    fn idle_for(delay: Duration) -> Self {
        Link::Idle(Box::pin(tokio::time::sleep(delay)))
    }

    /// The next event; cancel-safe (every future lives in `self`).
    async fn next(&mut self) -> LinkEvent {
        match self {
            Link::Idle(sleep) => {
                sleep.as_mut().await;
                LinkEvent::RetryDue
            }
            Link::Connecting(connecting) => LinkEvent::Connected(connecting.as_mut().await),
            Link::Up(inbound) => LinkEvent::Inbound(inbound.next().await),
        }
    }
}

/// Opens the stream to `url` with `register` as its first message. Returns the sender for the
/// messages that follow and the future that completes once the stream is open.
fn open_stream(
    url: String,
    register: WorkerMessage,
) -> (mpsc::Sender<WorkerMessage>, ConnectFuture) {
    let (sender, receiver) = mpsc::channel(OUTBOUND_CHANNEL_CAPACITY);
    if sender.try_send(register).is_err() {
        // Unreachable: the channel is new, empty and its receiver is held below.
        tracing::error!("cannot queue the registration on a new channel");
    }
    let connecting = async move {
        let endpoint = Endpoint::from_shared(url.clone())
            .map_err(|error| format!("invalid URL {url}: {error}"))?
            .tcp_nodelay(true)
            .connect_timeout(CONNECT_TIMEOUT)
            .http2_keep_alive_interval(KEEP_ALIVE_INTERVAL)
            .keep_alive_timeout(KEEP_ALIVE_TIMEOUT)
            .keep_alive_while_idle(true);
        let channel = endpoint
            .connect()
            .await
            .map_err(|error| format!("cannot connect to {url}: {}", error_chain(&error)))?;
        let mut client =
            WorkerServiceClient::new(channel).max_decoding_message_size(MAX_INBOUND_MESSAGE_BYTES);
        let response = client
            .connect(ReceiverStream::new(receiver))
            .await
            .map_err(|status| format!("{url} refused the stream: {}", status.message()))?;
        Ok(Box::new(response.into_inner()))
    };
    let bounded = async move {
        tokio::time::timeout(CONNECT_TIMEOUT, connecting)
            .await
            .unwrap_or_else(|_| Err("timed out opening the stream".to_owned()))
    };
    (sender, Box::pin(bounded))
}

/// An error and its sources, "outer: inner: innermost".
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    text
}

/// What the agent loop and the attempt runners share.
struct Shared {
    /// All bookkeeping; held only briefly, never across an await.
    state: Mutex<AgentState>,
    /// Wakes the agent loop when a runner changed the state (a start or a result to report).
    wake: Notify,
    node_name: Arc<str>,
    max_output_bytes: usize,
    metrics: Arc<WorkerMetrics>,
    /// The latest θ sample (`f64` bits), recorded on attempt spans.
    theta_bits: AtomicU64,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, AgentState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn theta(&self) -> f64 {
        f64::from_bits(self.theta_bits.load(Ordering::Relaxed))
    }
}

/// The span of one attempt, under `$target` (which decides whether it is exported). The fields
/// left empty are recorded only on exported spans. Integers are recorded as `i64`, the type
/// OpenTelemetry attributes have.
macro_rules! attempt_span {
    ($target:expr, $assignment:expr) => {
        tracing::info_span!(
            target: $target,
            "attempt",
            venom.wave.id = $assignment.attempt.map_or(0, |a| a.wave_id as i64),
            venom.task.id = %$assignment.task_id,
            venom.task.index = $assignment.index.map(i64::from),
            venom.attempt = $assignment.attempt.map_or(0, |a| i64::from(a.attempt)),
            venom.wave.name = tracing::field::Empty,
            venom.node = tracing::field::Empty,
            venom.theta = tracing::field::Empty,
            venom.mode = tracing::field::Empty,
            venom.queue_wait_ms = tracing::field::Empty,
            process.exit.code = tracing::field::Empty,
            venom.signal = tracing::field::Empty,
            venom.timed_out = tracing::field::Empty,
            venom.cancelled = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
            otel.status_message = tracing::field::Empty,
        )
    };
}

/// Joins the wave's trace and records what is known as the attempt starts.
fn trace_start(
    span: &tracing::Span,
    shared: &Shared,
    assignment: &Assignment,
    received_at: std::time::Instant,
) {
    venom_telemetry::set_parent(span, &assignment.traceparent);
    span.record("venom.wave.name", assignment.wave_name.as_str());
    span.record("venom.node", &*shared.node_name);
    span.record("venom.theta", shared.theta());
    if !assignment.mode.is_empty() {
        span.record("venom.mode", assignment.mode.as_str());
    }
    let queue_wait_ms = i64::try_from(received_at.elapsed().as_millis()).unwrap_or(i64::MAX);
    span.record("venom.queue_wait_ms", queue_wait_ms);
}

/// Records how the attempt ended; anything but exit code 0 is an error.
fn trace_outcome(span: &tracing::Span, outcome: &AttemptOutcome) {
    if let Some(code) = outcome.exit_code {
        span.record("process.exit.code", code);
    }
    if let Some(signal) = outcome.signal {
        span.record("venom.signal", signal);
    }
    span.record("venom.timed_out", outcome.timed_out);
    span.record("venom.cancelled", outcome.cancelled);
    let failure = if let Some(error) = &outcome.error {
        Some(format!("failed to start: {error}"))
    } else if outcome.timed_out {
        Some("timed out".to_owned())
    } else if outcome.cancelled {
        Some("cancelled".to_owned())
    } else if let Some(signal) = outcome.signal {
        Some(format!("killed by signal {signal}"))
    } else {
        match outcome.exit_code {
            Some(0) => None,
            Some(code) => Some(format!("exited with code {code}")),
            None => Some("no exit status".to_owned()),
        }
    };
    if let Some(message) = failure {
        span.record("otel.status_code", "ERROR");
        span.record("otel.status_message", message.as_str());
    }
}

/// Starts a runner for every attempt that may start now. Each runner is a pooled blocking
/// thread that, when its attempt ends, records the result and starts the next queued attempt
/// itself, so back-to-back tasks on a slot never wait for the agent loop.
fn start_runners(shared: &Arc<Shared>) {
    loop {
        let Some(next) = shared.state().start_next() else {
            return;
        };
        let shared = Arc::clone(shared);
        tokio::task::spawn_blocking(move || run_slot(shared, next));
    }
}

/// A runner: runs `first`, then whatever the queue offers, until nothing fits. When an
/// attempt frees more room than one (a wide task ended), the extra attempts get runners of
/// their own.
fn run_slot(shared: Arc<Shared>, first: NextAttempt) {
    let mut next = Some(first);
    while let Some(NextAttempt {
        assignment,
        cancel,
        received_at,
    }) = next
    {
        // Exported only when traces are and the wave has a trace to join; otherwise the span
        // only labels log lines.
        let traced = venom_telemetry::enabled()
            && venom_telemetry::is_valid_traceparent(&assignment.traceparent);
        let span = if traced {
            attempt_span!(venom_telemetry::TARGET, assignment)
        } else {
            attempt_span!(module_path!(), assignment)
        };
        if traced {
            trace_start(&span, &shared, &assignment, received_at);
        }
        let outcome = span.in_scope(|| execute(&shared, &assignment, cancel));
        if traced {
            trace_outcome(&span, &outcome);
        }
        drop(span);
        let mut state = shared.state();
        state.on_event(ExecEvent::Finished(outcome.into()));
        next = state.start_next();
        drop(state);
        shared.wake.notify_one();
        start_runners(&shared);
    }
}

/// Runs one attempt on this (blocking) thread, reporting its start.
fn execute(shared: &Shared, assignment: &Assignment, cancel: CancelToken) -> AttemptOutcome {
    let attempt = AttemptKey::from(assignment.attempt);
    if cancel.is_cancelled() {
        return AttemptOutcome::cancelled_before_start(attempt);
    }
    let started_ms = crate::unix_now_ms();
    let spawning = std::time::Instant::now();
    let outcome = match spawn_attempt(
        assignment,
        &shared.node_name,
        shared.max_output_bytes,
        cancel,
    ) {
        Ok(running) => {
            shared
                .metrics
                .spawn_seconds
                .observe(spawning.elapsed().as_secs_f64());
            let started = TaskStarted {
                attempt: Some(attempt.to_proto()),
                started_ms: running.started_ms(),
                pid: running.pid(),
            };
            shared.state().on_event(ExecEvent::Started(started));
            shared.wake.notify_one();
            running.wait_blocking()
        }
        Err(error) => {
            tracing::warn!(%error, "attempt failed to start");
            AttemptOutcome::failed_to_start(attempt, started_ms, &error)
        }
    };
    record_outcome(&shared.metrics, &outcome);
    tracing::debug!(
        exit_code = ?outcome.exit_code,
        signal = ?outcome.signal,
        timed_out = outcome.timed_out,
        cancelled = outcome.cancelled,
        "attempt finished"
    );
    outcome
}

/// Counts a finished attempt by outcome and records its run time.
fn record_outcome(metrics: &WorkerMetrics, outcome: &AttemptOutcome) {
    let label = outcome.label();
    metrics.attempts.with_label_values(&[label]).inc();
    if label != "not_started" {
        let run_ms = outcome.finished_ms.saturating_sub(outcome.started_ms);
        metrics.run_seconds.observe(run_ms as f64 / 1_000.0);
    }
}

/// Waits for room on the outbound channel; never completes without a channel.
async fn reserve(
    outbound: Option<mpsc::Sender<WorkerMessage>>,
) -> Result<mpsc::OwnedPermit<WorkerMessage>, mpsc::error::SendError<()>> {
    match outbound {
        Some(sender) => sender.reserve_owned().await,
        None => std::future::pending().await,
    }
}

/// Sleeps until `deadline`; never completes without one.
async fn sleep_until_some(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// The agent loop's owner of everything.
struct Agent {
    identity: Identity,
    shared: Arc<Shared>,
    /// Normalized coordinator URLs, tried round-robin.
    urls: Vec<String>,
    /// Index into `urls` of the next URL to try.
    next_url: usize,
    /// A leader named by a refusal; tried next, once.
    leader_hint: Option<String>,
    backoff: Backoff,
    /// Where the current connection goes (for logs).
    current_url: String,
    /// Sender of the stream being opened; becomes `outbound` once it is open.
    pending_outbound: Option<mpsc::Sender<WorkerMessage>>,
    /// Sender of the open stream.
    outbound: Option<mpsc::Sender<WorkerMessage>>,
    link: Link,
    /// When waiting start reports go out even without a result to carry them.
    started_deadline: Option<Instant>,
    theta: ThetaMonitor,
    /// θ from the start-up profile, until the monitor's first sample.
    fallback_theta: ThetaSnapshot,
}

impl Agent {
    fn state(&self) -> MutexGuard<'_, AgentState> {
        self.shared.state()
    }

    /// Begins connecting to the next coordinator.
    fn connect(&mut self) {
        let url = match self.leader_hint.take() {
            Some(hint) => hint,
            None => {
                let url = self.urls[self.next_url % self.urls.len()].clone();
                self.next_url = (self.next_url + 1) % self.urls.len();
                url
            }
        };
        tracing::debug!(%url, "connecting to coordinator");
        let register = self.state().register(&self.identity);
        let (sender, connecting) = open_stream(url.clone(), register);
        self.current_url = url;
        self.pending_outbound = Some(sender);
        self.link = Link::Connecting(connecting);
    }

    /// Drops the connection and schedules the next attempt. A coordinator that answered
    /// "not leader" is alive: with a leader named, go there at once; during an election,
    /// ask again shortly rather than backing off (a long wait would outlive the new
    /// leader's heartbeat grace and get this node marked down).
    fn disconnect(&mut self, reason: &str) {
        let not_leader = reason.to_ascii_lowercase().contains("not leader");
        let delay = if not_leader {
            if self.leader_hint.is_some() {
                // Not zero: two members with stale hints must not ping-pong in a busy loop.
                Duration::from_millis(10)
            } else {
                NOT_LEADER_RETRY
            }
        } else {
            self.backoff.next_delay()
        };
        // Read under one lock, before logging: the guard must not live through the macro.
        let (running, unacknowledged) = {
            let state = self.state();
            (state.n_running(), state.unacked.len())
        };
        let retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        if not_leader {
            tracing::debug!(url = %self.current_url, reason, retry_in_ms, "not the leader; asking again");
        } else {
            tracing::warn!(
                url = %self.current_url,
                reason,
                retry_in_ms,
                running,
                unacknowledged,
                "coordinator unavailable; will retry (running processes keep running)"
            );
        }
        self.outbound = None;
        self.pending_outbound = None;
        self.link = Link::idle_for(delay);
        self.shared.metrics.connected.set(0);
    }

    fn on_link_event(&mut self, event: LinkEvent) {
        match event {
            LinkEvent::RetryDue => self.connect(),
            LinkEvent::Connected(Ok(inbound)) => {
                tracing::debug!(url = %self.current_url, "stream open");
                self.outbound = self.pending_outbound.take();
                self.link = Link::Up(inbound);
            }
            LinkEvent::Connected(Err(error)) => {
                self.leader_hint = leader_hint(&error);
                self.disconnect(&error);
            }
            LinkEvent::Inbound(Some(Ok(message))) => {
                if !message.error.is_empty() {
                    self.leader_hint = leader_hint(&message.error);
                    let reason = format!("coordinator refused: {}", message.error);
                    self.disconnect(&reason);
                    return;
                }
                if message.registered {
                    self.backoff.reset();
                    self.shared.metrics.connected.set(1);
                    tracing::info!(
                        url = %self.current_url,
                        name = %self.identity.name,
                        slots = self.identity.slots,
                        "registered with coordinator"
                    );
                }
                self.state().on_coordinator_message(message);
                start_runners(&self.shared);
            }
            LinkEvent::Inbound(Some(Err(status))) => {
                self.leader_hint = leader_hint(status.message());
                let reason = format!("stream error: {status}");
                self.disconnect(&reason);
            }
            LinkEvent::Inbound(None) => self.disconnect("the coordinator closed the stream"),
        }
    }

    fn on_heartbeat_tick(&mut self) {
        let snapshot = self
            .theta
            .latest()
            .unwrap_or_else(|| self.fallback_theta.clone());
        self.shared
            .theta_bits
            .store(snapshot.theta.to_bits(), Ordering::Relaxed);
        self.shared.metrics.set_theta(&snapshot);
        if self.outbound.is_none() {
            return;
        }
        let running = u32::try_from(self.state().n_running()).unwrap_or(u32::MAX);
        self.state().set_heartbeat(Heartbeat {
            theta: snapshot.theta,
            h_cpu: snapshot.h_cpu,
            h_mem: snapshot.h_mem,
            h_term: snapshot.h_term,
            running,
            memory_available_bytes: snapshot.memory_available_bytes,
            cpu_usage_percent: snapshot.cpu_usage_percent,
        });
    }

    /// True when what waits should be sent now: a result or heartbeat at once, start reports
    /// alone once they have waited [`STARTED_COALESCE`].
    fn outbound_due(&mut self) -> bool {
        let state = self.shared.state();
        if state.has_urgent_outbound() {
            return true;
        }
        if !state.has_outbound() {
            drop(state);
            self.started_deadline = None;
            return false;
        }
        let deadline = *self
            .started_deadline
            .get_or_insert_with(|| Instant::now() + STARTED_COALESCE);
        Instant::now() >= deadline
    }

    /// Sends the next message on a reserved slot.
    fn send(&mut self, permit: mpsc::OwnedPermit<WorkerMessage>) {
        let message = self.state().take_message();
        if let Some(message) = message {
            permit.send(message);
        }
        self.started_deadline = None;
    }

    /// Sends what is due if the channel has room now; otherwise the loop waits for room.
    fn flush(&mut self) {
        let Some(outbound) = self.outbound.clone() else {
            return;
        };
        while self.outbound_due() {
            match outbound.clone().try_reserve_owned() {
                Ok(permit) => self.send(permit),
                Err(mpsc::error::TrySendError::Full(_)) => return,
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    self.disconnect("the outbound stream closed");
                    return;
                }
            }
        }
    }
}

/// θ computed from the start-up profile.
fn theta_from_profile(profile: &HardwareProfile) -> ThetaSnapshot {
    let hottest = profile
        .thermal_sensors
        .iter()
        .max_by(|a, b| a.celsius.total_cmp(&b.celsius));
    let h_cpu = crate::theta::h_cpu(profile.cpu_usage_percent);
    let total_bytes = profile.effective_memory_bytes.max(1);
    let available_bytes = profile.memory_available_bytes.min(total_bytes);
    let h_mem = crate::theta::h_mem(available_bytes, total_bytes);
    let h_term = crate::theta::h_term(
        hottest.map(|sensor| sensor.celsius),
        hottest
            .and_then(|sensor| sensor.critical_celsius)
            .unwrap_or(crate::theta::DEFAULT_T_CRIT_CELSIUS),
    );
    ThetaSnapshot {
        at_ms: crate::unix_now_ms(),
        theta: crate::theta::theta_from(h_cpu, h_mem, h_term),
        h_cpu,
        h_mem,
        h_term,
        cpu_usage_percent: profile.cpu_usage_percent,
        memory_available_bytes: available_bytes,
        memory_total_bytes: total_bytes,
        hottest_celsius: hottest.map(|sensor| sensor.celsius),
    }
}

/// Runs the agent until `shutdown` completes, then kills every running process group and
/// returns. Connection problems are retried forever; only a configuration that can never work
/// is an error.
pub async fn run(
    config: WorkerConfig,
    profile: HardwareProfile,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), AgentError> {
    if config.coordinators.iter().all(|url| url.trim().is_empty()) {
        return Err(AgentError::NoCoordinator);
    }
    let mut urls = Vec::new();
    for url in config
        .coordinators
        .iter()
        .filter(|url| !url.trim().is_empty())
    {
        let normalized = normalize_url(url);
        if let Err(error) = Endpoint::from_shared(normalized.clone()) {
            return Err(AgentError::InvalidCoordinatorUrl {
                url: url.clone(),
                reason: error.to_string(),
            });
        }
        urls.push(normalized);
    }

    let slots = config.slots.unwrap_or(profile.effective_cpus).max(1);
    let name: Arc<str> = config.node_name().into();
    let identity = Identity {
        name,
        profile: profile.to_proto(),
        slots,
        labels: config.labels.iter().cloned().collect(),
        throttle_policy: config.throttle.as_str().to_owned(),
        queue_depth: config.queue_depth,
    };
    tracing::info!(
        name = %identity.name,
        slots,
        coordinators = ?urls,
        policy = %identity.throttle_policy,
        "worker starting"
    );

    let fallback_theta = theta_from_profile(&profile);
    let metrics = Arc::new(WorkerMetrics::new());
    let shared = Arc::new(Shared {
        state: Mutex::new(AgentState::new(slots)),
        wake: Notify::new(),
        node_name: Arc::clone(&identity.name),
        max_output_bytes: config.max_output_bytes,
        theta_bits: AtomicU64::new(fallback_theta.theta.to_bits()),
        metrics: Arc::clone(&metrics),
    });
    let metrics_server = match config.metrics_listen {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| AgentError::MetricsListen { addr, source })?;
            tracing::info!(%addr, "metrics served at /metrics");
            let for_scrape = Arc::clone(&shared);
            Some(tokio::spawn(venom_telemetry::metrics::serve(
                listener,
                Arc::new(move || {
                    let state = for_scrape.state();
                    let m = &for_scrape.metrics;
                    m.running
                        .set(i64::try_from(state.n_running()).unwrap_or(i64::MAX));
                    m.queued
                        .set(i64::try_from(state.n_queued()).unwrap_or(i64::MAX));
                    m.slots_limit.set(i64::from(state.slots_limit()));
                    drop(state);
                    for_scrape.metrics.render()
                }),
                std::future::pending(),
            )))
        }
        None => None,
    };
    let mut heartbeat = tokio::time::interval(config.heartbeat_interval());
    heartbeat.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut agent = Agent {
        identity,
        shared,
        urls,
        next_url: 0,
        leader_hint: None,
        backoff: Backoff::new(),
        current_url: String::new(),
        pending_outbound: None,
        outbound: None,
        link: Link::idle_for(Duration::ZERO),
        started_deadline: None,
        theta: ThetaMonitor::start(DEFAULT_SAMPLE_INTERVAL),
        fallback_theta,
    };

    tokio::pin!(shutdown);
    loop {
        let due = agent.outbound_due();
        let coalescing_until = agent.started_deadline.filter(|_| !due);
        tokio::select! {
            () = &mut shutdown => break,
            // A runner started or finished an attempt; the flush below reports it.
            () = agent.shared.wake.notified() => {}
            event = agent.link.next() => agent.on_link_event(event),
            _ = heartbeat.tick() => agent.on_heartbeat_tick(),
            permit = reserve(agent.outbound.clone()), if due => match permit {
                Ok(permit) => agent.send(permit),
                Err(_) => agent.disconnect("the outbound stream closed"),
            },
            // Start reports waited long enough; the flush below sends them.
            () = sleep_until_some(coalescing_until), if coalescing_until.is_some() => {}
        }
        agent.flush();
    }

    if let Some(server) = metrics_server {
        server.abort();
    }
    // Shutdown: close the stream first (the coordinator re-queues this node's work when it
    // notices), then kill every process group and wait, bounded, for the attempts to end.
    let running = agent.state().n_running();
    tracing::info!(running, "worker shutting down");
    agent.outbound = None;
    agent.pending_outbound = None;
    agent.link = Link::idle_for(Duration::MAX);
    agent.state().cancel_all();
    let deadline = Instant::now() + SHUTDOWN_GRACE;
    loop {
        let running = agent.state().n_running();
        if running == 0 {
            break;
        }
        tokio::select! {
            () = agent.shared.wake.notified() => {}
            () = tokio::time::sleep_until(deadline) => {
                tracing::warn!(running, "attempts still ending at shutdown");
                break;
            }
        }
    }
    let Agent { theta, .. } = agent;
    // Joining the sampling thread may wait for one sample; keep it off the async threads.
    let _ = tokio::task::spawn_blocking(move || drop(theta)).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use venom_proto::AttemptRef;

    use super::*;

    fn assignment(micro: u32, cpus: u32) -> Assignment {
        Assignment {
            attempt: Some(AttemptRef {
                wave_id: 1,
                micro,
                attempt: 0,
            }),
            task_id: "t".to_owned(),
            shell: "true".to_owned(),
            cpus,
            ..Default::default()
        }
    }

    fn key(micro: u32) -> AttemptKey {
        AttemptKey {
            wave_id: 1,
            micro,
            attempt: 0,
        }
    }

    fn finished(micro: u32, exit_code: i32) -> TaskFinished {
        TaskFinished {
            attempt: Some(key(micro).to_proto()),
            exit_code: Some(exit_code),
            ..Default::default()
        }
    }

    fn identity() -> Identity {
        Identity {
            name: "n1".into(),
            profile: venom_proto::HardwareProfile {
                cpu_logical_cores: 4,
                ..Default::default()
            },
            slots: 4,
            labels: HashMap::from([("zone".to_owned(), "a".to_owned())]),
            throttle_policy: "adaptive".to_owned(),
            queue_depth: 4,
        }
    }

    fn start_all(state: &mut AgentState) -> Vec<u32> {
        std::iter::from_fn(|| state.start_next())
            .map(|next| next.assignment.attempt.map(|a| a.micro).unwrap_or(u32::MAX))
            .collect()
    }

    #[test]
    fn starts_fifo_while_cpus_fit_the_slots_limit() {
        let mut state = AgentState::new(3);
        for (micro, cpus) in [(0, 1), (1, 2), (2, 1), (3, 0)] {
            state.assign(assignment(micro, cpus));
        }
        assert_eq!(start_all(&mut state), vec![0, 1]);
        assert_eq!(state.running_cpus(), 3);
        state.on_event(ExecEvent::Finished(finished(1, 0)));
        assert_eq!(state.running_cpus(), 1);
        // cpus 0 counts as 1.
        assert_eq!(start_all(&mut state), vec![2, 3]);
        assert_eq!(state.running_cpus(), 3);
    }

    #[test]
    fn a_task_wider_than_the_limit_runs_alone() {
        let mut state = AgentState::new(2);
        state.assign(assignment(0, 1));
        state.assign(assignment(1, 8));
        assert_eq!(start_all(&mut state), vec![0]);
        state.on_event(ExecEvent::Finished(finished(0, 0)));
        assert_eq!(start_all(&mut state), vec![1]);
        state.assign(assignment(2, 1));
        assert!(
            start_all(&mut state).is_empty(),
            "nothing joins the wide task"
        );
    }

    #[test]
    fn slots_limit_updates_apply_and_zero_starts_nothing() {
        let mut state = AgentState::new(4);
        state.on_coordinator_message(CoordinatorMessage {
            slots_limit: Some(0),
            assign: vec![assignment(0, 1)],
            ..Default::default()
        });
        assert_eq!(state.slots_limit(), 0);
        assert!(start_all(&mut state).is_empty());
        state.on_coordinator_message(CoordinatorMessage {
            slots_limit: Some(1),
            ..Default::default()
        });
        assert_eq!(start_all(&mut state), vec![0]);
        // A message without slots_limit leaves it unchanged.
        state.on_coordinator_message(CoordinatorMessage::default());
        assert_eq!(state.slots_limit(), 1);
    }

    #[test]
    fn duplicate_assignments_are_ignored() {
        let mut state = AgentState::new(1);
        state.assign(assignment(0, 1));
        state.assign(assignment(1, 1));
        state.assign(assignment(1, 1));
        assert_eq!(state.n_queued(), 2);
        assert_eq!(start_all(&mut state), vec![0]);
        state.assign(assignment(0, 1));
        assert_eq!(state.n_queued(), 1);
        assert_eq!(state.n_running(), 1);
    }

    #[test]
    fn assigning_a_finished_attempt_resends_its_result() {
        let mut state = AgentState::new(1);
        state.assign(assignment(0, 1));
        start_all(&mut state);
        state.on_event(ExecEvent::Finished(finished(0, 5)));
        let _ = state.take_message();
        state.assign(assignment(0, 1));
        assert_eq!(state.n_queued(), 0);
        let message = state.take_message().expect("the result again");
        assert_eq!(message.finished, vec![finished(0, 5)]);
    }

    #[test]
    fn cancelling_a_queued_attempt_reports_it_cancelled() {
        let mut state = AgentState::new(1);
        state.assign(assignment(0, 1));
        state.assign(assignment(1, 1));
        start_all(&mut state);
        state.on_coordinator_message(CoordinatorMessage {
            cancel: vec![key(1).to_proto()],
            ..Default::default()
        });
        assert_eq!(state.n_queued(), 0);
        let message = state.take_message().expect("a cancelled result");
        assert_eq!(message.finished.len(), 1);
        assert!(message.finished[0].cancelled);
        assert_eq!(message.finished[0].attempt, Some(key(1).to_proto()));
        assert_eq!(state.unacked_keys(), vec![key(1)]);
        // Cancelling something unknown does nothing.
        state.cancel(key(9));
        assert!(state.take_message().is_none());
    }

    #[test]
    fn cancelling_a_running_attempt_signals_its_token() {
        let mut state = AgentState::new(1);
        state.assign(assignment(0, 1));
        let token = state.start_next().expect("starts").cancel;
        assert!(!token.is_cancelled());
        state.cancel(key(0));
        assert!(token.is_cancelled());
        // The result comes from the attempt itself, not from the cancel.
        assert!(state.take_message().is_none());
    }

    #[test]
    fn acks_drop_results_and_registration_resends_the_rest() {
        let mut state = AgentState::new(2);
        for micro in 0..3 {
            state.assign(assignment(micro, 1));
        }
        start_all(&mut state);
        state.on_event(ExecEvent::Started(TaskStarted {
            attempt: Some(key(0).to_proto()),
            started_ms: 1,
            pid: 42,
        }));
        state.on_event(ExecEvent::Finished(finished(0, 0)));
        state.on_event(ExecEvent::Finished(finished(1, 1)));
        start_all(&mut state);
        let batch = state.take_message().expect("events waiting");
        assert_eq!(batch.started.len(), 1);
        assert_eq!(batch.finished.len(), 2, "both results in one message");
        assert!(state.take_message().is_none());

        state.on_coordinator_message(CoordinatorMessage {
            ack: vec![key(0).to_proto()],
            ..Default::default()
        });
        assert_eq!(state.unacked_keys(), vec![key(1)]);

        state.assign(assignment(3, 1));
        let message = state.register(&identity());
        let register = message.register.expect("a registration");
        assert_eq!(register.name, "n1");
        assert_eq!(register.slots, 4);
        assert_eq!(register.queue_depth, 4);
        assert_eq!(register.labels.get("zone").map(String::as_str), Some("a"));
        assert_eq!(register.profile.map(|p| p.cpu_logical_cores), Some(4));
        assert_eq!(register.unacknowledged, vec![finished(1, 1)]);
        assert_eq!(register.running, vec![key(2).to_proto(), key(3).to_proto()]);
        assert!(
            !state.has_outbound(),
            "the registration supersedes what waited"
        );
    }

    #[test]
    fn large_results_are_split_across_messages() {
        let mut state = AgentState::new(8);
        let big = |micro| TaskFinished {
            stdout: vec![b'x'; 400 * 1024],
            ..finished(micro, 0)
        };
        for micro in 0..5 {
            state.assign(assignment(micro, 1));
        }
        start_all(&mut state);
        for micro in 0..5 {
            state.on_event(ExecEvent::Finished(big(micro)));
        }
        let mut sizes = Vec::new();
        while let Some(message) = state.take_message() {
            assert!(message.encoded_len() <= MESSAGE_BUDGET_BYTES);
            sizes.push(message.finished.len());
        }
        assert_eq!(sizes.iter().sum::<usize>(), 5);
        assert!(sizes.len() >= 3, "{sizes:?}");

        let message = state.register(&identity());
        assert!(message.encoded_len() <= MESSAGE_BUDGET_BYTES + 1024);
        let register = message.register.expect("registration");
        let rest: usize = std::iter::from_fn(|| state.take_message())
            .map(|m| m.finished.len())
            .sum();
        assert_eq!(register.unacknowledged.len() + rest, 5);
    }

    #[test]
    fn leader_hints_are_parsed_from_refusals() {
        assert_eq!(
            leader_hint("not leader: 10.0.0.2:7070"),
            Some("http://10.0.0.2:7070".to_owned())
        );
        assert_eq!(
            leader_hint("Not leader; try http://c2:7070."),
            None,
            "only the address right after the marker counts"
        );
        assert_eq!(
            leader_hint("not leader: http://c2:7070"),
            Some("http://c2:7070".to_owned())
        );
        assert_eq!(
            leader_hint("not leader: leader=http://127.0.0.1:7071"),
            Some("http://127.0.0.1:7071".to_owned()),
            "the coordinator's own refusal"
        );
        assert_eq!(leader_hint("not leader: "), None);
        assert_eq!(leader_hint("not leader: unknown"), None);
        assert_eq!(leader_hint("not leader: leader=unknown"), None);
        assert_eq!(leader_hint("permission denied"), None);
    }

    #[test]
    fn backoff_grows_to_its_cap_and_resets() {
        let mut backoff = Backoff::new();
        let delays: Vec<_> = (0..10).map(|_| backoff.next_delay()).collect();
        assert!(delays[0] <= Duration::from_millis(BACKOFF_MIN_MS));
        assert!(delays
            .iter()
            .all(|d| *d <= Duration::from_millis(BACKOFF_MAX_MS)));
        assert!(delays[9] >= Duration::from_millis(BACKOFF_MAX_MS / 2));
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_millis(BACKOFF_MIN_MS));
    }

    #[test]
    fn urls_without_scheme_get_http() {
        assert_eq!(normalize_url("127.0.0.1:7070"), "http://127.0.0.1:7070");
        assert_eq!(normalize_url(" https://c:1 "), "https://c:1");
    }
}
