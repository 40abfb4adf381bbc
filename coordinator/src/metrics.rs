//! Prometheus metrics of a coordinator, served as text on `--metrics-listen` (`/metrics`).
//!
//! Two kinds: what the replicated state says right now (waves and micro-tasks by state,
//! the ready queue, every node's θ, health components, mode, slots and S_Total, the
//! cluster's S_Total, raft indexes) is read from the state at scrape time, so every member
//! reports the same figures for the same applied index; what happens over time (proposal
//! latency, dispatch latency ready → started, micro-task and wave end-to-end durations,
//! attempt outcomes) is recorded as it is applied, on the leader only, so summing over
//! members never counts anything twice.

use prometheus::{
    GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};
use venom_telemetry::metrics::{encode, register};

use venom_core::mobius::{self, Mode};
use venom_core::OutcomeKind;

use crate::replica::RaftStatus;
use crate::state::{NodeState, Observation, State, WaveState};

/// Latency buckets in seconds: 1 ms … 5 min.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];
/// Wave duration buckets in seconds: 100 ms … 1 day.
const WAVE_BUCKETS: &[f64] = &[
    0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3_600.0, 14_400.0, 86_400.0,
];

/// Metrics recorded as things happen (the scrape-time gauges are built per scrape).
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    proposal_seconds: Histogram,
    dispatch_seconds: Histogram,
    micro_task_seconds: HistogramVec,
    wave_seconds: HistogramVec,
    attempts: IntCounterVec,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let latency = |name: &str, help: &str| {
            HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec())
        };
        let proposal_seconds = register(
            &registry,
            Histogram::with_opts(latency(
                "venom_raft_proposal_duration_seconds",
                "Time from a client proposal to its commit and apply on the leader.",
            ))
            .expect("static histogram options are valid"),
        );
        let dispatch_seconds = register(
            &registry,
            Histogram::with_opts(latency(
                "venom_dispatch_latency_seconds",
                "Time from a micro-task becoming ready to its process starting \
                 (leader clock to worker clock).",
            ))
            .expect("static histogram options are valid"),
        );
        let micro_task_seconds = register(
            &registry,
            HistogramVec::new(
                latency(
                    "venom_micro_task_duration_seconds",
                    "End to end per finished attempt: ready to finished, by outcome.",
                ),
                &["outcome"],
            )
            .expect("static histogram options are valid"),
        );
        let wave_seconds = register(
            &registry,
            HistogramVec::new(
                HistogramOpts::new(
                    "venom_wave_duration_seconds",
                    "End to end per wave: submitted to finished, by final state.",
                )
                .buckets(WAVE_BUCKETS.to_vec()),
                &["state"],
            )
            .expect("static histogram options are valid"),
        );
        let attempts = register(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "venom_micro_task_attempts_total",
                    "Finished micro-task attempts recorded by this leader, by outcome.",
                ),
                &["outcome"],
            )
            .expect("static counter options are valid"),
        );
        Self {
            registry,
            proposal_seconds,
            dispatch_seconds,
            micro_task_seconds,
            wave_seconds,
            attempts,
        }
    }

    /// A proposal committed and applied after `seconds`.
    pub fn observe_proposal(&self, seconds: f64) {
        self.proposal_seconds.observe(seconds);
    }

    /// Something the state machine applied (called on the leader only).
    pub fn observe(&self, observation: &Observation) {
        let seconds = |ms: u64| ms as f64 / 1_000.0;
        match observation {
            Observation::Started { dispatch_ms } => {
                self.dispatch_seconds.observe(seconds(*dispatch_ms));
            }
            Observation::AttemptFinished {
                outcome,
                end_to_end_ms,
            } => {
                let outcome = outcome_label(*outcome);
                self.attempts.with_label_values(&[outcome]).inc();
                self.micro_task_seconds
                    .with_label_values(&[outcome])
                    .observe(seconds(*end_to_end_ms));
            }
            // Logged by the replica; the node gauges are read from the state.
            Observation::NodeState { .. } => {}
            Observation::WaveFinished { state, duration_ms } => {
                self.wave_seconds
                    .with_label_values(&[state.as_str()])
                    .observe(seconds(*duration_ms));
            }
        }
    }

    /// The whole exposition: recorded metrics plus gauges read from `state` and `status`.
    pub fn render(&self, state: &State, status: &RaftStatus) -> String {
        let mut families = self.registry.gather();
        families.extend(state_gauges(state, status).gather());
        encode(families)
    }
}

fn gauge_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> GaugeVec {
    register(
        registry,
        GaugeVec::new(Opts::new(name, help), labels).expect("valid gauge options"),
    )
}

fn int_gauge_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    register(
        registry,
        IntGaugeVec::new(Opts::new(name, help), labels).expect("valid gauge options"),
    )
}

fn int_gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    register(
        registry,
        IntGauge::new(name, help).expect("valid gauge options"),
    )
}

fn as_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Gauges (and the replicated stale-result counter) read from the state as it is now.
fn state_gauges(state: &State, status: &RaftStatus) -> Registry {
    let r = Registry::new();

    let waves = int_gauge_vec(&r, "venom_waves", "Waves by state.", &["state"]);
    for wave_state in [
        WaveState::Pending,
        WaveState::Running,
        WaveState::Succeeded,
        WaveState::Failed,
        WaveState::Cancelled,
    ] {
        let n = state
            .waves
            .values()
            .filter(|w| w.header.state == wave_state)
            .count();
        waves
            .with_label_values(&[wave_state.as_str()])
            .set(as_i64(n as u64));
    }

    let micro = int_gauge_vec(
        &r,
        "venom_micro_tasks",
        "Micro-tasks of all kept waves by state.",
        &["state"],
    );
    let mut counts = crate::state::Counts::default();
    for wave in state.waves.values() {
        let c = &wave.header.counts;
        counts.pending += c.pending;
        counts.ready += c.ready;
        counts.assigned += c.assigned;
        counts.running += c.running;
        counts.succeeded += c.succeeded;
        counts.failed += c.failed;
        counts.skipped += c.skipped;
        counts.cancelled += c.cancelled;
    }
    for (name, n) in [
        ("pending", counts.pending),
        ("ready", counts.ready),
        ("assigned", counts.assigned),
        ("running", counts.running),
        ("succeeded", counts.succeeded),
        ("failed", counts.failed),
        ("skipped", counts.skipped),
        ("cancelled", counts.cancelled),
    ] {
        micro.with_label_values(&[name]).set(as_i64(n));
    }
    int_gauge(
        &r,
        "venom_ready_queue_depth",
        "Micro-tasks ready and waiting for a node.",
    )
    .set(as_i64(state.ready.len() as u64));
    register(
        &r,
        prometheus::IntCounter::new(
            "venom_stale_results_total",
            "Results ignored because they named an attempt that was no longer current.",
        )
        .expect("valid counter options"),
    )
    .inc_by(state.stale_results);

    let node_theta = gauge_vec(&r, "venom_node_theta", "Node health θ (0..1).", &["node"]);
    let node_health = gauge_vec(
        &r,
        "venom_node_health",
        "θ's components: H_cpu, H_mem, H_term.",
        &["node", "component"],
    );
    let node_mode = int_gauge_vec(
        &r,
        "venom_node_mode",
        "1 for the node's current throttle mode.",
        &["node", "mode"],
    );
    let node_slots = int_gauge_vec(&r, "venom_node_slots", "Slots a node offers.", &["node"]);
    let node_usable = int_gauge_vec(
        &r,
        "venom_node_usable_slots",
        "Slots usable now (throttled by θ and policy; 0 when down or draining).",
        &["node"],
    );
    let node_active = int_gauge_vec(
        &r,
        "venom_node_active_micro_tasks",
        "Micro-tasks assigned to or running on a node.",
        &["node"],
    );
    let node_up = int_gauge_vec(
        &r,
        "venom_node_up",
        "1 when the node is ready or draining, 0 when down.",
        &["node"],
    );
    let node_s_total = gauge_vec(
        &r,
        "venom_node_s_total",
        "Möbius model speed-up S_Total of the node.",
        &["node"],
    );
    let mut ready_inputs = Vec::new();
    for (name, node) in &state.nodes {
        let labels = [name.as_str()];
        node_theta.with_label_values(&labels).set(node.theta);
        for (component, value) in [
            ("cpu", node.h_cpu),
            ("mem", node.h_mem),
            ("term", node.h_term),
        ] {
            node_health
                .with_label_values(&[name.as_str(), component])
                .set(value);
        }
        for mode in [
            Mode::Unwrap,
            Mode::Transition,
            Mode::Balance,
            Mode::Wrap,
            Mode::Optimize,
        ] {
            let current = i64::from(node.throttle.mode == mode);
            node_mode
                .with_label_values(&[name.as_str(), mode.as_str()])
                .set(current);
        }
        node_slots
            .with_label_values(&labels)
            .set(i64::from(node.spec.slots));
        node_usable
            .with_label_values(&labels)
            .set(i64::from(node.usable_slots()));
        node_active
            .with_label_values(&labels)
            .set(as_i64(node.active.len() as u64));
        node_up
            .with_label_values(&labels)
            .set(i64::from(node.state != NodeState::Down));
        let input = node.model_input();
        node_s_total
            .with_label_values(&labels)
            .set(mobius::node_model(&input).s_total);
        if node.state == NodeState::Ready {
            ready_inputs.push(input);
        }
    }
    let cluster = gauge_vec(
        &r,
        "venom_cluster_model",
        "Möbius aggregate over ready nodes: theta, lambda, n, s_total.",
        &["figure"],
    );
    if let Some(model) = mobius::cluster_model(&ready_inputs) {
        cluster.with_label_values(&["theta"]).set(model.theta);
        cluster.with_label_values(&["lambda"]).set(model.lambda);
        cluster.with_label_values(&["n"]).set(f64::from(model.n));
        cluster.with_label_values(&["s_total"]).set(model.s_total);
    }

    for (name, help, value) in [
        (
            "venom_raft_term",
            "Raft term this member is in.",
            as_i64(status.term),
        ),
        (
            "venom_raft_leader_id",
            "Raft id of the leader this member follows (0: none known).",
            as_i64(status.leader_id),
        ),
        (
            "venom_raft_is_leader",
            "1 on the leader.",
            i64::from(status.role == raft::StateRole::Leader),
        ),
        (
            "venom_raft_commit_index",
            "Highest committed raft index known here.",
            as_i64(status.commit),
        ),
        (
            "venom_raft_applied_index",
            "Highest raft index applied here.",
            as_i64(status.applied),
        ),
        (
            "venom_raft_members",
            "Members of the raft group.",
            as_i64(status.members.len() as u64),
        ),
    ] {
        int_gauge(&r, name, help).set(value);
    }
    r
}

/// The text exposition of `shared`'s metrics (what `/metrics` answers).
pub fn render_shared(shared: &crate::replica::Shared) -> String {
    let status = shared.status();
    shared.metrics.render(&shared.read_state(), &status)
}

/// The coordinator's `outcome` label: `succeeded`, `timed_out`, or `failed` for every other
/// ending (a cancelled or unstartable attempt is a failed one from the wave's point of view).
fn outcome_label(kind: OutcomeKind) -> &'static str {
    match kind {
        OutcomeKind::Succeeded | OutcomeKind::TimedOut => kind.as_str(),
        OutcomeKind::Failed | OutcomeKind::Cancelled | OutcomeKind::NotStarted => "failed",
    }
}
