//! Prometheus metrics of a worker, served as text on `--metrics-listen` (`/metrics`):
//! attempts by outcome, process spawn latency, what runs and waits here, the slots the
//! coordinator allows, θ and its components, and whether the stream to the leader is up.
//! Counters and histograms are recorded as attempts run; gauges are set when they change.

use std::sync::Arc;

use prometheus::core::Collector;
use prometheus::{
    Encoder as _, Gauge, GaugeVec, Histogram, HistogramOpts, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
};

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
        let attempts = IntCounterVec::new(
            Opts::new(
                "venom_worker_attempts_total",
                "Attempts this worker finished, by outcome (succeeded, failed, timed_out, \
                 cancelled, not_started).",
            ),
            &["outcome"],
        )
        .expect("valid counter options");
        let spawn_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "venom_worker_spawn_latency_seconds",
                "Time to start an attempt's process (fork/exec and pipes).",
            )
            .buckets(SPAWN_BUCKETS.to_vec()),
        )
        .expect("valid histogram options");
        let run_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "venom_worker_attempt_duration_seconds",
                "Run time of finished attempts, process start to end.",
            )
            .buckets(RUN_BUCKETS.to_vec()),
        )
        .expect("valid histogram options");
        let running = IntGauge::new(
            "venom_worker_running_micro_tasks",
            "Attempts running here now.",
        )
        .expect("valid gauge options");
        let queued = IntGauge::new(
            "venom_worker_queued_micro_tasks",
            "Attempts assigned here and waiting for a slot.",
        )
        .expect("valid gauge options");
        let slots_limit = IntGauge::new(
            "venom_worker_slots_limit",
            "Slots the coordinator lets this worker fill now (throttled by θ).",
        )
        .expect("valid gauge options");
        let connected = IntGauge::new(
            "venom_worker_connected",
            "1 while the stream to the coordinator's leader is open.",
        )
        .expect("valid gauge options");
        let theta = Gauge::new("venom_worker_theta", "This machine's health θ (0..1).")
            .expect("valid gauge options");
        let health = GaugeVec::new(
            Opts::new(
                "venom_worker_health",
                "θ's components: H_cpu, H_mem, H_term.",
            ),
            &["component"],
        )
        .expect("valid gauge options");
        let collectors: [Box<dyn Collector>; 9] = [
            Box::new(attempts.clone()),
            Box::new(spawn_seconds.clone()),
            Box::new(run_seconds.clone()),
            Box::new(running.clone()),
            Box::new(queued.clone()),
            Box::new(slots_limit.clone()),
            Box::new(connected.clone()),
            Box::new(theta.clone()),
            Box::new(health.clone()),
        ];
        for collector in collectors {
            registry
                .register(collector)
                .expect("metric names are unique");
        }
        Self {
            registry,
            attempts,
            spawn_seconds,
            run_seconds,
            running,
            queued,
            slots_limit,
            connected,
            theta,
            health,
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
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::warn!(error = %e, "cannot encode metrics");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}

/// Renders the exposition at scrape time (refreshing gauges first).
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// Serves `GET /metrics` (Prometheus text format 0.0.4) on `listener` until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    render: Render,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let render = render.clone();
            async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )],
                    render(),
                )
            }
        }),
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}
