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
//! looks for the leader, and finished results stay unacknowledged (and spooled in the data
//! dir) until the coordinator acknowledges them, so a leader change or a crash loses nothing.
//! Attempts run only under a lease the leader renews with every committed heartbeat: with no
//! renewal for two heartbeat intervals the agent looks for the leader again, and when the
//! lease itself runs out it kills its attempts (the guard process does it if the agent is dead
//! or frozen), so the leader can run them elsewhere without two copies alive.
//!
//! The parts:
//! - `state`: [`AgentState`], all bookkeeping behind one mutex, with no I/O (tested
//!   directly);
//! - `link`: the connection: the stream's state and the race that finds the leader (every
//!   coordinator tried at once, each with its own backoff, "not leader" refusals followed);
//! - `runner`: the runners, pooled blocking threads that run attempts back to back, trace
//!   them and record their outcomes;
//! - this module: [`run`], the loop that owns the connection, the heartbeat and shutdown.
//!
//! Messages are built and read in [`crate::convert`] only.

mod link;
mod runner;
mod state;

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::{mpsc, Notify};
use tokio::time::{Instant, MissedTickBehavior};
use venom_proto::WorkerMessage;

use self::link::{Accepted, Backoff, Link, LinkEvent, MakeRegistration, Race};
use self::runner::start_runners;
pub use self::state::{
    AgentState, ExecEvent, Heartbeat, Identity, Instructions, NextAttempt, Started,
};
use crate::config::WorkerConfig;
use crate::datadir::{DataDir, DataDirError, ProcessGroups, Spool};
use crate::guard::Guard;
use crate::isolation::{Isolation, IsolationError, Sweeper};
use crate::limits::{
    DEFAULT_SAMPLE_INTERVAL, MIN_STREAM_LIFE, SHUTDOWN_GRACE, SILENCE_SLACK, STARTED_COALESCE,
};
use crate::metrics::WorkerMetrics;
use crate::scan::HardwareProfile;
use crate::theta::{ThetaMonitor, ThetaSnapshot};

/// Why the agent cannot run at all. Everything after start-up is retried, never returned.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("no coordinator URL given")]
    NoCoordinator,
    #[error("coordinator `{url}`: {reason}")]
    InvalidCoordinatorUrl { url: String, reason: String },
    #[error("TLS: {0}")]
    Tls(String),
    /// Task isolation cannot be set up (`--work-dir`, `--run-as`, `--cgroups required`).
    #[error(transparent)]
    Isolation(#[from] IsolationError),
    #[error("cannot start the working directories' sweeper thread: {0}")]
    Sweeper(std::io::Error),
    #[error(transparent)]
    DataDir(#[from] DataDirError),
    #[error("--data-dir {dir}: cannot read {what}: {source}")]
    DataDirRead {
        dir: std::path::PathBuf,
        what: &'static str,
        source: std::io::Error,
    },
    #[error("cannot start the guard process ({program}): {source}")]
    Guard {
        program: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("--metrics-listen: cannot listen on {addr}: {source}")]
    MetricsListen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

/// What the agent loop and the attempt runners share.
struct Shared {
    /// All bookkeeping; held only briefly, never across an await.
    state: Mutex<AgentState>,
    /// Wakes the agent loop when a runner changed the state (a start or a result to report).
    wake: Notify,
    node_name: Arc<str>,
    max_output_bytes: usize,
    /// What every attempt runs inside: clean environment, own directory, user, cgroup.
    isolation: Arc<Isolation>,
    metrics: Arc<WorkerMetrics>,
    /// The latest θ sample (`f64` bits), recorded on attempt spans.
    theta_bits: AtomicU64,
    /// The data dir's spool and process-group record. Lock order: `state`, then `disk`.
    disk: Option<Mutex<Disk>>,
    /// Kills the attempts if this process dies or freezes past its lease.
    guard: Option<Guard>,
}

/// What the worker keeps in its data dir.
struct Disk {
    data: DataDir,
    spool: Spool,
    groups: ProcessGroups,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, AgentState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn disk(&self) -> Option<MutexGuard<'_, Disk>> {
        self.disk
            .as_ref()
            .map(|disk| disk.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// An attempt's process group started: recorded for the guard and the next start.
    fn process_started(&self, pgid: u32) {
        if let Some(guard) = &self.guard {
            guard.started(pgid);
        }
        if let Some(mut disk) = self.disk() {
            let start_ticks = crate::datadir::process_start_ticks(pgid).unwrap_or(0);
            let group = crate::datadir::Group { pgid, start_ticks };
            if let Err(error) = disk.groups.started(group) {
                tracing::error!(%error, pgid, "cannot record a process group in the data dir");
            }
        }
    }

    /// An attempt's process group ended.
    fn process_ended(&self, pgid: u32) {
        if let Some(guard) = &self.guard {
            guard.ended(pgid);
        }
        if let Some(mut disk) = self.disk() {
            if let Err(error) = disk.groups.ended(pgid) {
                tracing::error!(%error, pgid, "cannot record a process group's end in the data dir");
            }
        }
    }

    /// Makes every spooled result durable (before a message carries any).
    fn sync_spool(&self) {
        if let Some(mut disk) = self.disk() {
            if let Err(error) = disk.spool.sync() {
                tracing::error!(%error, "cannot sync the result spool; results are reported anyway");
            }
        }
    }

    /// Tells the guard when the lease ends now.
    fn lease_changed(&self, until: Option<std::time::Instant>) {
        if let Some(guard) = &self.guard {
            guard.lease(until);
        }
    }

    fn theta(&self) -> f64 {
        f64::from_bits(self.theta_bits.load(Ordering::Relaxed))
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
    /// How coordinators are reached: mutual TLS, or plaintext (loopback or `--insecure`).
    dialer: venom_tls::Dialer,
    /// The coordinators, as dialled.
    urls: Vec<String>,
    /// Builds this worker's registration for each try.
    make_register: MakeRegistration,
    /// Where the current connection goes (for logs).
    current_url: String,
    /// Sender of the open stream.
    outbound: Option<mpsc::Sender<WorkerMessage>>,
    link: Link,
    /// Delays a new race after streams that ended right after they were accepted.
    backoff: Backoff,
    /// When a leader last renewed the lease (or accepted the stream).
    last_renewal: Instant,
    /// With no renewal for this long, the worker races every coordinator again.
    silence: Duration,
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

    /// Races every coordinator for the one that accepts this worker (the leader).
    fn connect(&mut self) {
        tracing::debug!(coordinators = ?self.urls, "looking for the leader");
        self.link = Link::Racing(Race::start(
            &self.urls,
            &self.dialer,
            Arc::clone(&self.make_register),
        ));
    }

    /// Drops the stream and races again: at once, unless the stream ended right after it
    /// was accepted (then after a backoff).
    fn disconnect(&mut self, reason: &str) {
        // Read under one lock, before logging: the guard must not live through the macro.
        let (running, unacknowledged) = {
            let state = self.state();
            (state.n_running(), state.n_unacked())
        };
        let short_lived = match &self.link {
            Link::Up { since, .. } => since.elapsed() < MIN_STREAM_LIFE,
            _ => false,
        };
        tracing::warn!(
            url = %self.current_url,
            reason,
            running,
            unacknowledged,
            "lost the leader; looking for it again (running processes keep running)"
        );
        self.outbound = None;
        self.shared.metrics.connected.set(0);
        if short_lived {
            self.link = Link::idle_for(self.backoff.next_delay());
        } else {
            self.connect();
        }
    }

    fn on_accepted(&mut self, accepted: Accepted) {
        let Accepted {
            url,
            outbound,
            inbound,
            register,
            first,
        } = accepted;
        self.state().registered(&register);
        self.current_url = url;
        self.outbound = Some(outbound);
        self.link = Link::Up {
            inbound,
            since: Instant::now(),
        };
        self.last_renewal = Instant::now();
        self.shared.metrics.connected.set(1);
        tracing::info!(
            url = %self.current_url,
            name = %self.identity.name,
            slots = self.identity.slots,
            "registered with coordinator"
        );
        self.on_message(crate::convert::instructions(first));
    }

    fn on_message(&mut self, message: Instructions) {
        if let Some((seq, lease)) = message.lease {
            self.last_renewal = Instant::now();
            let now = std::time::Instant::now();
            let (gained, until) = {
                let mut state = self.state();
                (state.on_lease(seq, lease, now), state.lease_until())
            };
            self.shared.lease_changed(until);
            if gained {
                tracing::info!(
                    lease_ms = u64::try_from(lease.as_millis()).unwrap_or(u64::MAX),
                    "holding a lease; attempts may start"
                );
            }
        }
        if message.registered {
            self.backoff.reset();
        }
        if let Some(cluster_id) = message.cluster_id {
            if let Some(mut disk) = self.shared.disk() {
                if let Err(error) = disk.data.set_cluster_id(cluster_id) {
                    tracing::error!(%error, "cannot record the cluster id in the data dir");
                }
            }
        }
        if !message.ack.is_empty() {
            if let Some(mut disk) = self.shared.disk() {
                if let Err(error) = disk.spool.acknowledged(&message.ack) {
                    tracing::error!(%error, "cannot record acknowledgements in the result spool");
                }
            }
        }
        self.state().on_coordinator_message(message);
        start_runners(&self.shared);
    }

    fn on_link_event(&mut self, event: LinkEvent) {
        match event {
            LinkEvent::RetryDue => self.connect(),
            LinkEvent::Accepted(accepted) => self.on_accepted(*accepted),
            LinkEvent::Message(message) => self.on_message(message),
            LinkEvent::Failed(status) => {
                let reason = format!("stream error: {status}");
                self.disconnect(&reason);
            }
            LinkEvent::Closed => self.disconnect("the coordinator closed the stream"),
        }
    }

    /// When to give up on a silent leader (only while streaming).
    fn silence_deadline(&self) -> Option<Instant> {
        matches!(self.link, Link::Up { .. }).then(|| self.last_renewal + self.silence)
    }

    /// No leader renewed the lease in time: kill every running attempt and start nothing
    /// until a leader grants one again; register afresh so the leader reconciles.
    fn on_lease_expired(&mut self) {
        let (killed, dropped) = self.state().fence();
        self.shared.lease_changed(None);
        tracing::warn!(
            killed,
            dropped_queued = dropped,
            "lease expired: no leader renewed it in time; killed the running attempts and \
             start nothing until a leader grants a new one"
        );
        match self.link {
            Link::Up { .. } => self.disconnect("the lease expired"),
            // The registrations of a race under way list the attempts just killed: a leader
            // that accepted one would keep them assigned here for good. Race again, with
            // registrations made now.
            Link::Racing(_) => self.connect(),
            Link::Idle(_) => {}
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
            theta: snapshot,
            running,
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

    /// Sends the next message on a reserved slot; the results it carries are durable first.
    fn send(&mut self, permit: mpsc::OwnedPermit<WorkerMessage>) {
        let message = self.state().take_message();
        if let Some(message) = message {
            if !message.finished.is_empty() {
                self.shared.sync_spool();
            }
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

/// Opens the data dir: kills what a previous life of this worker left running, and returns
/// the results it spooled and nobody acknowledged.
fn open_data_dir(
    config: &WorkerConfig,
    name: &str,
) -> Result<
    (
        Disk,
        std::collections::BTreeMap<venom_core::AttemptRef, venom_core::AttemptOutcome>,
    ),
    AgentError,
> {
    let path = config.data_dir_for(name);
    let data = DataDir::open(&path, name)?;
    let read = |what| {
        let dir = path.clone();
        move |source| AgentError::DataDirRead { dir, what, source }
    };
    let (groups, left) = data.groups().map_err(read("its process groups"))?;
    if !left.is_empty() {
        let killed = crate::datadir::kill_orphans(&left, SHUTDOWN_GRACE);
        tracing::warn!(
            recorded = left.len(),
            killed,
            "killed the attempts a previous run of this worker left running"
        );
    }
    let (spool, kept) = data.spool().map_err(read("its result spool"))?;
    tracing::info!(
        data_dir = %path.display(),
        kept_results = kept.len(),
        "data dir open"
    );
    Ok((
        Disk {
            data,
            spool,
            groups,
        },
        kept,
    ))
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
    let dialer = venom_tls::Dialer::from_files(config.tls.files().as_ref(), config.insecure)
        .map_err(|e| AgentError::Tls(e.to_string()))?;
    let certified_name = match dialer.material() {
        Some(material) if material.peer.role != venom_tls::Role::Worker => {
            return Err(AgentError::Tls(format!(
                "--tls-cert: {} is the certificate of {}, not of a worker (issue one with \
                 `venomctl tls issue worker NAME`)",
                material.files.cert.display(),
                material.peer
            )));
        }
        Some(material) => Some(material.peer.name.clone()),
        None => None,
    };
    if let (Some(certified), Some(name)) = (&certified_name, &config.name) {
        if certified != name {
            return Err(AgentError::Tls(format!(
                "--name {name}: this worker's certificate is for node `{certified}`"
            )));
        }
    }
    if config.insecure {
        tracing::warn!(
            "--insecure: talking to coordinators in plaintext without authentication; \
             anyone on the path can read and alter this node's work"
        );
    }
    let mut urls = Vec::new();
    for url in config
        .coordinators
        .iter()
        .filter(|url| !url.trim().is_empty())
    {
        let normalized = dialer
            .url(url)
            .map_err(|error| AgentError::InvalidCoordinatorUrl {
                url: url.clone(),
                reason: error.to_string(),
            })?;
        urls.push(normalized);
    }

    let slots = config.slots.unwrap_or(profile.effective_cpus).max(1);
    let name: Arc<str> = certified_name.unwrap_or_else(|| config.node_name()).into();
    let fallback_theta = theta_from_profile(&profile);
    let identity = Identity {
        name,
        profile,
        slots,
        labels: config.labels.iter().cloned().collect(),
        throttle_policy: config.throttle,
        queue_depth: config.queue_depth,
    };
    tracing::info!(
        name = %identity.name,
        slots,
        coordinators = ?urls,
        policy = %identity.throttle_policy,
        "worker starting"
    );

    let isolation = Arc::new(Isolation::prepare(&config.isolation_settings())?);
    // Stops (at its next wake-up) when dropped, as `run` returns.
    let _sweeper = Sweeper::start(Arc::clone(&isolation)).map_err(AgentError::Sweeper)?;
    let metrics = Arc::new(WorkerMetrics::new());
    let (disk, kept) = open_data_dir(&config, &identity.name)?;
    let guard = match &config.guard_program {
        Some(program) => Some(Guard::spawn(program).map_err(|source| AgentError::Guard {
            program: program.clone(),
            source,
        })?),
        None => None,
    };
    let mut state = AgentState::new(slots);
    state.restore(kept);
    let shared = Arc::new(Shared {
        state: Mutex::new(state),
        wake: Notify::new(),
        node_name: Arc::clone(&identity.name),
        max_output_bytes: config.max_output_bytes,
        isolation,
        theta_bits: AtomicU64::new(fallback_theta.theta.to_bits()),
        metrics: Arc::clone(&metrics),
        disk: Some(Mutex::new(disk)),
        guard,
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
    let make_register: MakeRegistration = {
        let shared = Arc::clone(&shared);
        let identity = identity.clone();
        Arc::new(move || {
            let mut register = shared.state().register(&identity);
            // The results it carries are durable first.
            shared.sync_spool();
            if let (Some(body), Some(disk)) = (register.register.as_mut(), shared.disk()) {
                body.cluster_id = disk.data.cluster_id();
            }
            register
        })
    };
    let mut agent = Agent {
        identity,
        shared,
        dialer,
        urls,
        make_register,
        current_url: String::new(),
        outbound: None,
        link: Link::idle_for(Duration::ZERO),
        backoff: Backoff::new(),
        last_renewal: Instant::now(),
        silence: config.heartbeat_interval() * 2 + SILENCE_SLACK,
        started_deadline: None,
        theta: ThetaMonitor::start(DEFAULT_SAMPLE_INTERVAL),
        fallback_theta,
    };

    tokio::pin!(shutdown);
    loop {
        let due = agent.outbound_due();
        let coalescing_until = agent.started_deadline.filter(|_| !due);
        let silence_deadline = agent.silence_deadline();
        let lease_until = agent.state().lease_until().map(Instant::from_std);
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
            () = sleep_until_some(silence_deadline), if silence_deadline.is_some() => {
                agent.disconnect("no lease renewal from the leader in time");
            }
            () = sleep_until_some(lease_until), if lease_until.is_some() => agent.on_lease_expired(),
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
