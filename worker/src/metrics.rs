//! Prometheus metrics of a worker, served as text on `--metrics-listen` (`/metrics`):
//! attempts by outcome, process spawn latency, what runs and waits here, the slots the
//! coordinator allows, θ and its components, and whether the stream to the leader is up.
//! Counters and histograms are recorded as attempts run; gauges are set when they change.

use prometheus::{
    Gauge, GaugeVec, Histogram, HistogramOpts, IntCounterVec, IntGauge, Opts, Registry,
};
use venom_telemetry::metrics::{encode, register};

use crate::theta::ThetaSnapshot;

/// Spawn latency buckets in seconds: 100 µs … 1 s.
const SPAWN_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];
/// Run time buckets in seconds: 1 ms … 1 h.
const RUN_BUCKETS: &[f64] = &[
    0.001, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 60.0, 300.0, 900.0, 3_600.0,
];

/// The worker's metrics (cheap to clone: every metric is shared).
#[derive(Debug, Clone)]
pub struct WorkerMetrics {
    registry: Registry,
    pub attempts: IntCounterVec,
    pub spawn_seconds: Histogram,
    pub run_seconds: Histogram,
    pub running: IntGauge,
    pub queued: IntGauge,
    pub slots_limit: IntGauge,
    pub connected: IntGauge,
    pub theta: Gauge,
    pub health: GaugeVec,
}

impl Default for WorkerMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl WorkerMetrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let r = &registry;
        let int_gauge = |name: &str, help: &str| {
            register(r, IntGauge::new(name, help).expect("valid gauge options"))
        };
        Self {
            attempts: register(
                r,
                IntCounterVec::new(
                    Opts::new(
                        "venom_worker_attempts_total",
                        "Attempts this worker finished, by outcome (succeeded, failed, \
                         timed_out, cancelled, not_started).",
                    ),
                    &["outcome"],
                )
                .expect("valid counter options"),
            ),
            spawn_seconds: register(
                r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "venom_worker_spawn_latency_seconds",
                        "Time to start an attempt's process (fork/exec and pipes).",
                    )
                    .buckets(SPAWN_BUCKETS.to_vec()),
                )
                .expect("valid histogram options"),
            ),
            run_seconds: register(
                r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "venom_worker_attempt_duration_seconds",
                        "Run time of finished attempts, process start to end.",
                    )
                    .buckets(RUN_BUCKETS.to_vec()),
                )
                .expect("valid histogram options"),
            ),
            running: int_gauge(
                "venom_worker_running_micro_tasks",
                "Attempts running here now.",
            ),
            queued: int_gauge(
                "venom_worker_queued_micro_tasks",
                "Attempts assigned here and waiting for a slot.",
            ),
            slots_limit: int_gauge(
                "venom_worker_slots_limit",
                "Slots the coordinator lets this worker fill now (throttled by θ).",
            ),
            connected: int_gauge(
                "venom_worker_connected",
                "1 while the stream to the coordinator's leader is open.",
            ),
            theta: register(
                r,
                Gauge::new("venom_worker_theta", "This machine's health θ (0..1).")
                    .expect("valid gauge options"),
            ),
            health: register(
                r,
                GaugeVec::new(
                    Opts::new(
                        "venom_worker_health",
                        "θ's components: H_cpu, H_mem, H_term.",
                    ),
                    &["component"],
                )
                .expect("valid gauge options"),
            ),
            registry,
        }
    }

    /// Records the latest θ sample.
    pub fn set_theta(&self, snapshot: &ThetaSnapshot) {
        self.theta.set(snapshot.theta);
        self.health.with_label_values(&["cpu"]).set(snapshot.h_cpu);
        self.health.with_label_values(&["mem"]).set(snapshot.h_mem);
        self.health
            .with_label_values(&["term"])
            .set(snapshot.h_term);
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        encode(self.registry.gather())
    }
}
