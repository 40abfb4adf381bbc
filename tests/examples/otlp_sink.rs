//! A minimal OTLP/gRPC trace receiver that counts what it is sent: a stand-in for Jaeger when
//! measuring what trace export costs, or checking that spans arrive at all.
//!
//! `cargo run -p venom-tests --example otlp_sink -- 127.0.0.1:4317` listens there (the default)
//! and prints, every second in which something arrived, the export requests, spans and distinct
//! trace ids received so far.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};

/// Running totals.
#[derive(Default)]
struct Totals {
    requests: u64,
    spans: u64,
    traces: BTreeSet<Vec<u8>>,
}

#[derive(Clone, Default)]
struct Sink {
    totals: Arc<Mutex<Totals>>,
}

#[tonic::async_trait]
impl TraceService for Sink {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let request = request.into_inner();
        let mut totals = self
            .totals
            .lock()
            .map_err(|_| tonic::Status::internal("poisoned"))?;
        totals.requests += 1;
        for span in request
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .flat_map(|s| &s.spans)
        {
            totals.spans += 1;
            if !totals.traces.contains(&span.trace_id) {
                totals.traces.insert(span.trace_id.clone());
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:4317".to_owned())
        .parse()?;
    let sink = Sink::default();
    let totals = Arc::clone(&sink.totals);
    tokio::spawn(async move {
        let mut last = 0;
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let Ok(t) = totals.lock() else { return };
            if t.requests != last {
                last = t.requests;
                println!(
                    "{} requests, {} spans, {} traces",
                    t.requests,
                    t.spans,
                    t.traces.len()
                );
            }
        }
    });
    eprintln!("OTLP trace sink on {addr}");
    tonic::transport::Server::builder()
        .add_service(TraceServiceServer::new(sink))
        .serve(addr)
        .await?;
    Ok(())
}
