//! Prometheus plumbing shared by the coordinator and the worker: registering metrics,
//! encoding them in the text format, and serving `GET /metrics`. What each process measures
//! lives with it (`coordinator/src/metrics.rs`, `worker/src/metrics.rs`).

use std::sync::Arc;

use prometheus::core::Collector;
use prometheus::proto::MetricFamily;
use prometheus::{Encoder as _, Registry, TextEncoder};

/// Renders the exposition at scrape time (refreshing gauges first if needed).
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// The content type of the Prometheus text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Registers `collector` in `registry` and hands it back. Metric names are fixed in the
/// code, so a clash is a programming error.
pub fn register<C: Collector + Clone + 'static>(registry: &Registry, collector: C) -> C {
    registry
        .register(Box::new(collector.clone()))
        .expect("metric names are unique within a registry");
    collector
}

/// `families` in the text format, sorted by name.
pub fn encode(mut families: Vec<MetricFamily>) -> String {
    families.sort_by(|a, b| a.get_name().cmp(b.get_name()));
    let mut out = Vec::new();
    if let Err(e) = TextEncoder::new().encode(&families, &mut out) {
        tracing::warn!(error = %e, "cannot encode metrics");
    }
    String::from_utf8(out).unwrap_or_default()
}

/// Serves `GET /metrics` on `listener` until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    render: Render,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let render = render.clone();
            async move { ([(axum::http::header::CONTENT_TYPE, CONTENT_TYPE)], render()) }
        }),
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}
