//! Logs, OpenTelemetry traces and Prometheus plumbing ([`metrics`]) for Venom's three binaries (`venom-coordinator`,
//! `venom-worker`, `venomctl`), set up in one place.
//!
//! [`init`] installs the `tracing` subscriber: log lines on stderr (text or JSON, filtered by
//! `RUST_LOG`) and, only when an OTLP endpoint is configured (`--otlp-endpoint`,
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or `OTEL_EXPORTER_OTLP_ENDPOINT`), a
//! `tracing-opentelemetry` layer whose spans leave in batches over OTLP/gRPC (tonic). The
//! standard `OTEL_*` variables keep their meaning (`OTEL_SERVICE_NAME`,
//! `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER`, `OTEL_BSP_*`, `OTEL_EXPORTER_OTLP_HEADERS`,
//! `…_TIMEOUT`, `OTEL_SDK_DISABLED`, `OTEL_TRACES_EXPORTER=none`). The returned [`Guard`] flushes
//! what is still buffered when dropped, within [`SHUTDOWN_TIMEOUT`], so even a command that exits
//! at once (`venomctl submit`) delivers its spans.
//!
//! Only spans whose target is [`TARGET`] are exported: the ones Venom designs for a wave's trace
//! (see `docs/OBSERVABILITY.md`), never the libraries' internals. With export off no
//! OpenTelemetry layer exists and [`enabled`] is false; code on hot paths (a span per micro-task
//! attempt, per scheduling round) checks it before doing any tracing work, so tracing costs
//! nothing when nobody collects traces.
//!
//! Context travels as a W3C `traceparent`: in gRPC metadata between processes
//! ([`inject_current`], [`traceparent_from_metadata`]) and, where a message outlives the call
//! that carried it (a wave, an assignment), as a plain string ([`traceparent`], [`set_parent`],
//! [`start_span`]).

pub mod metrics;

use std::collections::HashMap;
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{Span as _, Status, TraceContextExt, Tracer as _, TracerProvider as _};
use opentelemetry::Context;
use opentelemetry_otlp::WithTonicConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::TracerProvider;
use opentelemetry_sdk::Resource;
use tonic::metadata::MetadataMap;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry};

pub use opentelemetry::KeyValue;

/// The `tracing` target of every span meant for export: `info_span!(target: TARGET, …)`.
pub const TARGET: &str = "venom_otel";

/// The longest [`Guard`] waits for buffered spans to leave on shutdown.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(2);

/// The OTLP export timeout when `OTEL_EXPORTER_OTLP_TIMEOUT` says nothing (the spec's default).
const DEFAULT_EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// The tracer of the installed provider; set once, by the first [`init`] with export on.
static TRACER: OnceLock<opentelemetry_sdk::trace::Tracer> = OnceLock::new();

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// What [`init`] sets up.
#[derive(Debug, Clone)]
pub struct Config {
    /// `service.name` unless `OTEL_SERVICE_NAME` (or `OTEL_RESOURCE_ATTRIBUTES`) names another.
    pub service_name: &'static str,
    /// `service.instance.id`: the coordinator id or the worker's node name.
    pub instance_id: Option<String>,
    /// `--otlp-endpoint`; overrides the `OTEL_EXPORTER_OTLP_*ENDPOINT` variables.
    pub otlp_endpoint: Option<String>,
    pub log_format: LogFormat,
    /// The log filter when `RUST_LOG` is unset or invalid (`info`, `warn`, …).
    pub default_log_filter: &'static str,
    /// Colours in text logs.
    pub ansi: bool,
}

/// Why telemetry could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("invalid OTLP endpoint {endpoint:?}: {reason}")]
    Endpoint { endpoint: String, reason: String },
    #[error("cannot build the OTLP trace exporter: {0}")]
    Exporter(String),
}

/// Keeps trace export alive; dropping it (or [`Guard::shutdown`]) flushes and stops it.
#[must_use = "dropping the guard stops trace export"]
#[derive(Debug)]
pub struct Guard {
    provider: Option<TracerProvider>,
    endpoint: Option<String>,
}

impl Guard {
    /// The OTLP endpoint spans go to; `None` when export is off.
    pub fn endpoint(&self) -> Option<&str> {
        self.endpoint.as_deref()
    }

    /// Flushes buffered spans and stops export, waiting at most [`SHUTDOWN_TIMEOUT`].
    pub fn shutdown(mut self) {
        self.finish();
    }

    fn finish(&mut self) {
        let Some(provider) = self.provider.take() else {
            return;
        };
        // The SDK's shutdown blocks until the batch task (on the tokio runtime) has exported;
        // a thread of its own keeps that wait bounded and off the runtime's workers.
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let spawned = std::thread::Builder::new()
            .name("otel-shutdown".into())
            .spawn(move || {
                let _ = done_tx.send(provider.shutdown());
            });
        if spawned.is_err() {
            tracing::warn!("cannot start a thread to flush traces; buffered spans are lost");
            return;
        }
        match done_rx.recv_timeout(SHUTDOWN_TIMEOUT) {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::warn!(%error, "flushing traces failed"),
            Err(_) => tracing::warn!(
                timeout_ms = SHUTDOWN_TIMEOUT.as_millis() as u64,
                "traces not flushed in time; the rest are dropped"
            ),
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.finish();
    }
}

/// Installs the global `tracing` subscriber (logs, plus OTLP export when an endpoint is
/// configured). With export on it must run inside a tokio runtime, which must outlive the
/// [`Guard`]'s shutdown. A second call leaves the first subscriber in place.
pub fn init(config: Config) -> Result<Guard, TelemetryError> {
    let log_filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(config.default_log_filter));
    let log_layer = match config.log_format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(config.ansi)
            .with_filter(log_filter)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .with_filter(log_filter)
            .boxed(),
    };
    let mut layers: Vec<Box<dyn Layer<Registry> + Send + Sync>> = vec![log_layer];

    let endpoint = resolve_endpoint(config.otlp_endpoint.as_deref(), |name| {
        std::env::var(name).ok()
    });
    let mut provider = None;
    if let Some(endpoint) = &endpoint {
        let built = build_provider(endpoint, &config)?;
        let tracer = built.tracer("venom");
        if TRACER.set(tracer.clone()).is_ok() {
            opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
            opentelemetry::global::set_tracer_provider(built.clone());
            let otel_layer = tracing_opentelemetry::layer()
                .with_tracer(tracer)
                .with_tracked_inactivity(false)
                .with_threads(false)
                .with_filter(tracing_subscriber::filter::filter_fn(exported))
                .boxed();
            layers.push(otel_layer);
            provider = Some(built);
        }
    }
    let _ = tracing_subscriber::registry().with(layers).try_init();
    if let Some(endpoint) = &endpoint {
        tracing::debug!(%endpoint, service = config.service_name, "exporting traces over OTLP/gRPC");
    }
    Ok(Guard {
        provider,
        endpoint: endpoint.filter(|_| TRACER.get().is_some()),
    })
}

/// What reaches the OpenTelemetry layer: Venom's designed spans, and warnings and errors
/// logged inside them (they become span events).
fn exported(metadata: &tracing::Metadata<'_>) -> bool {
    metadata.target() == TARGET
        || (metadata.is_event()
            && metadata.target().starts_with("venom")
            && *metadata.level() <= tracing::Level::WARN)
}

/// The OTLP endpoint: the flag, else `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, else
/// `OTEL_EXPORTER_OTLP_ENDPOINT`; `None` (export off) when none is set or the SDK is disabled
/// (`OTEL_SDK_DISABLED=true`, `OTEL_TRACES_EXPORTER=none`). A bare `host:port` gets `http://`.
fn resolve_endpoint(flag: Option<&str>, env: impl Fn(&str) -> Option<String>) -> Option<String> {
    let set = |value: Option<String>| value.filter(|v| !v.trim().is_empty());
    if set(env("OTEL_SDK_DISABLED")).is_some_and(|v| v.trim().eq_ignore_ascii_case("true"))
        || set(env("OTEL_TRACES_EXPORTER")).is_some_and(|v| v.trim().eq_ignore_ascii_case("none"))
    {
        return None;
    }
    let endpoint = set(flag.map(str::to_owned))
        .or_else(|| set(env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")))
        .or_else(|| set(env("OTEL_EXPORTER_OTLP_ENDPOINT")))?;
    let endpoint = endpoint.trim();
    Some(if endpoint.contains("://") {
        endpoint.to_owned()
    } else {
        format!("http://{endpoint}")
    })
}

/// The export timeout from `OTEL_EXPORTER_OTLP_TRACES_TIMEOUT` / `OTEL_EXPORTER_OTLP_TIMEOUT`
/// (milliseconds, as the specification says).
fn export_timeout(env: impl Fn(&str) -> Option<String>) -> Duration {
    [
        "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT",
        "OTEL_EXPORTER_OTLP_TIMEOUT",
    ]
    .into_iter()
    .find_map(|name| env(name)?.trim().parse::<u64>().ok())
    .map_or(DEFAULT_EXPORT_TIMEOUT, Duration::from_millis)
}

/// The resource: our `service.name` and `service.instance.id`, under whatever
/// `OTEL_RESOURCE_ATTRIBUTES` and `OTEL_SERVICE_NAME` say.
fn resource(config: &Config) -> Resource {
    let detected = Resource::default();
    let service_name = match detected.get(opentelemetry::Key::new("service.name")) {
        Some(name) if !name.as_str().starts_with("unknown_service") => name.as_str().into_owned(),
        _ => config.service_name.to_owned(),
    };
    let ours = match &config.instance_id {
        Some(id) => Resource::new([KeyValue::new("service.instance.id", id.clone())]),
        None => Resource::empty(),
    };
    ours.merge(&detected).merge(&Resource::new([KeyValue::new(
        "service.name",
        service_name,
    )]))
}

fn build_provider(endpoint: &str, config: &Config) -> Result<TracerProvider, TelemetryError> {
    // The channel is built here, not by the SDK, so that the flag wins over the environment.
    let channel = tonic::transport::Channel::from_shared(endpoint.to_owned())
        .map_err(|error| TelemetryError::Endpoint {
            endpoint: endpoint.to_owned(),
            reason: error.to_string(),
        })?
        .tcp_nodelay(true)
        .timeout(export_timeout(|name| std::env::var(name).ok()))
        .connect_lazy();
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_channel(channel)
        .build()
        .map_err(|error| TelemetryError::Exporter(error.to_string()))?;
    Ok(TracerProvider::builder()
        .with_batch_exporter(exporter, opentelemetry_sdk::runtime::Tokio)
        .with_resource(resource(config))
        .build())
}

/// Whether spans are being exported (an endpoint was configured).
pub fn enabled() -> bool {
    TRACER.get().is_some()
}

/// The `traceparent` of a context's span, if it has a valid one.
fn traceparent_of(cx: &Context) -> Option<String> {
    let span = cx.span();
    let sc = span.span_context();
    sc.is_valid().then(|| {
        format!(
            "00-{}-{}-{:02x}",
            sc.trace_id(),
            sc.span_id(),
            sc.trace_flags().to_u8()
        )
    })
}

/// The W3C `traceparent` naming `span`, when export is on (`None` otherwise).
pub fn traceparent(span: &tracing::Span) -> Option<String> {
    if !enabled() {
        return None;
    }
    traceparent_of(&span.context())
}

/// A context whose remote parent is `traceparent`, if it is a valid one.
fn context_from_traceparent(traceparent: &str) -> Option<Context> {
    let mut carrier = HashMap::with_capacity(1);
    carrier.insert("traceparent".to_owned(), traceparent.trim().to_owned());
    let cx = TraceContextPropagator::new().extract_with_context(&Context::new(), &carrier);
    cx.span().span_context().is_valid().then_some(cx)
}

/// Makes `traceparent` the parent of `span` (export on and a valid value); returns whether it did.
pub fn set_parent(span: &tracing::Span, traceparent: &str) -> bool {
    if !enabled() {
        return false;
    }
    match context_from_traceparent(traceparent) {
        Some(cx) => {
            span.set_parent(cx);
            true
        }
        None => false,
    }
}

/// Whether `traceparent` is a well-formed W3C `traceparent` (version, 32-hex-digit trace id,
/// 16-hex-digit parent id, flags) with non-zero ids.
pub fn is_valid_traceparent(traceparent: &str) -> bool {
    let lengths: Vec<usize> = traceparent.trim().split('-').map(str::len).collect();
    lengths == [2, 32, 16, 2] && context_from_traceparent(traceparent).is_some()
}

/// The trace id (the second field) of a valid `traceparent`: what finds the trace in Jaeger.
pub fn trace_id(traceparent: &str) -> Option<&str> {
    if !is_valid_traceparent(traceparent) {
        return None;
    }
    traceparent.trim().split('-').nth(1)
}

struct MetadataInjector<'a>(&'a mut MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(key), Ok(value)) = (
            tonic::metadata::MetadataKey::from_bytes(key.as_bytes()),
            value.parse::<tonic::metadata::AsciiMetadataValue>(),
        ) {
            self.0.insert(key, value);
        }
    }
}

struct MetadataExtractor<'a>(&'a MetadataMap);

impl Extractor for MetadataExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|key| match key {
                tonic::metadata::KeyRef::Ascii(key) => Some(key.as_str()),
                tonic::metadata::KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

/// Puts the current span's context (`traceparent`, `tracestate`) into outgoing gRPC metadata;
/// does nothing with export off or outside an exported span. For client interceptors.
pub fn inject_current(metadata: &mut MetadataMap) {
    if !enabled() {
        return;
    }
    let cx = tracing::Span::current().context();
    if cx.span().span_context().is_valid() {
        TraceContextPropagator::new().inject_context(&cx, &mut MetadataInjector(metadata));
    }
}

/// The valid `traceparent` of incoming gRPC metadata, if any (read even with export off, so
/// a wave keeps its caller's trace when only the caller exports).
pub fn traceparent_from_metadata(metadata: &MetadataMap) -> Option<String> {
    let cx = TraceContextPropagator::new()
        .extract_with_context(&Context::new(), &MetadataExtractor(metadata));
    traceparent_of(&cx)
}

/// A span built directly on the OpenTelemetry API, for spans whose start lies before the code
/// that records them (a scheduling round that began when it was proposed). Ends when dropped.
#[derive(Debug)]
pub struct ManualSpan {
    span: opentelemetry_sdk::trace::Span,
}

impl ManualSpan {
    /// This span's `traceparent`, for work it hands on.
    pub fn traceparent(&self) -> String {
        let sc = self.span.span_context();
        format!(
            "00-{}-{}-{:02x}",
            sc.trace_id(),
            sc.span_id(),
            sc.trace_flags().to_u8()
        )
    }

    pub fn set_attribute(&mut self, attribute: KeyValue) {
        self.span.set_attribute(attribute);
    }

    /// Marks the span failed.
    pub fn set_error(&mut self, message: impl Into<String>) {
        self.span.set_status(Status::error(message.into()));
    }

    /// Ends the span now.
    pub fn end(mut self) {
        self.span.end();
    }
}

/// Starts a span named `name` as a child of `parent_traceparent` at `start`. `None` with export
/// off or without a valid parent: such spans only exist inside a wave's trace.
pub fn start_span(
    name: &'static str,
    parent_traceparent: &str,
    start: SystemTime,
    attributes: Vec<KeyValue>,
) -> Option<ManualSpan> {
    let tracer = TRACER.get()?;
    let parent = context_from_traceparent(parent_traceparent)?;
    let span = tracer
        .span_builder(name)
        .with_start_time(start)
        .with_attributes(attributes)
        .start_with_context(tracer, &parent);
    Some(ManualSpan { span })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| {
            pairs
                .iter()
                .find(|(key, _)| *key == name)
                .map(|(_, value)| (*value).to_owned())
        }
    }

    #[test]
    fn endpoint_precedence_and_opt_outs() {
        assert_eq!(resolve_endpoint(None, env_of(&[])), None);
        assert_eq!(
            resolve_endpoint(None, env_of(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "  ")])),
            None
        );
        let both = [
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://generic:4317"),
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://traces:4317"),
        ];
        assert_eq!(
            resolve_endpoint(None, env_of(&both)).as_deref(),
            Some("http://traces:4317")
        );
        assert_eq!(
            resolve_endpoint(Some("flag:4317"), env_of(&both)).as_deref(),
            Some("http://flag:4317")
        );
        assert_eq!(
            resolve_endpoint(
                None,
                env_of(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "https://collector:4317")])
            )
            .as_deref(),
            Some("https://collector:4317")
        );
        for opt_out in [
            ("OTEL_SDK_DISABLED", "TRUE"),
            ("OTEL_TRACES_EXPORTER", "none"),
        ] {
            let env = [opt_out, ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://x:4317")];
            assert_eq!(resolve_endpoint(Some("http://y:4317"), env_of(&env)), None);
        }
    }

    #[test]
    fn export_timeout_is_in_milliseconds() {
        assert_eq!(export_timeout(env_of(&[])), DEFAULT_EXPORT_TIMEOUT);
        assert_eq!(
            export_timeout(env_of(&[("OTEL_EXPORTER_OTLP_TIMEOUT", "1500")])),
            Duration::from_millis(1500)
        );
        assert_eq!(
            export_timeout(env_of(&[
                ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "250"),
                ("OTEL_EXPORTER_OTLP_TIMEOUT", "1500")
            ])),
            Duration::from_millis(250)
        );
    }

    #[test]
    fn traceparents_round_trip_through_metadata() {
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert!(is_valid_traceparent(good));
        assert!(!is_valid_traceparent(
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01"
        ));
        assert!(!is_valid_traceparent("garbage"));
        assert!(!is_valid_traceparent(""));
        assert!(!is_valid_traceparent("00-abc-def-01"), "short fields");
        assert_eq!(
            trace_id(&format!(" {good} ")),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        assert_eq!(trace_id("00-abc-def-01"), None);

        let mut metadata = MetadataMap::new();
        metadata.insert("traceparent", good.parse().expect("ascii"));
        assert_eq!(traceparent_from_metadata(&metadata).as_deref(), Some(good));
        assert_eq!(traceparent_from_metadata(&MetadataMap::new()), None);

        let cx = context_from_traceparent(good).expect("valid");
        let mut out = MetadataMap::new();
        TraceContextPropagator::new().inject_context(&cx, &mut MetadataInjector(&mut out));
        assert_eq!(
            out.get("traceparent").and_then(|v| v.to_str().ok()),
            Some(good)
        );
    }

    #[test]
    fn nothing_is_traced_before_export_is_configured() {
        assert!(!enabled());
        let span = tracing::info_span!(target: TARGET, "x");
        assert_eq!(traceparent(&span), None);
        assert!(!set_parent(
            &span,
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        ));
        assert!(start_span(
            "x",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            SystemTime::now(),
            Vec::new()
        )
        .is_none());
    }
}
