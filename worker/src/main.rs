//! `venom-worker`: parses flags, sets up logging, and runs the worker until Ctrl-C or SIGTERM.

use anyhow::Context as _;
use clap::{Parser, ValueEnum};
use venom_worker::WorkerConfig;

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// Venom worker: runs the micro-tasks a Venom coordinator assigns to this machine.
#[derive(Debug, Parser)]
#[command(name = "venom-worker", version, about)]
struct Cli {
    #[command(flatten)]
    worker: WorkerConfig,

    /// Log format.
    #[arg(long, env = "VENOM_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,

    /// OTLP/gRPC endpoint for traces (e.g. http://localhost:4317, Jaeger's OTLP port). Without
    /// it, OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or OTEL_EXPORTER_OTLP_ENDPOINT are used; with none
    /// of them, no traces are exported. The other OTEL_* variables apply as usual.
    #[arg(long, env = "VENOM_OTLP_ENDPOINT", value_name = "URL")]
    otlp_endpoint: Option<String>,
}

/// Completes on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::error!(%error, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        () = ctrl_c => tracing::info!("Ctrl-C received"),
        () = terminate => tracing::info!("SIGTERM received"),
    }
}

fn main() -> anyhow::Result<()> {
    // Started as this worker's guard (see `venom_worker::guard`): nothing else runs.
    if std::env::var_os(venom_worker::guard::GUARD_ENV).is_some() {
        venom_worker::guard::run_guard();
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(run())
}

async fn run() -> anyhow::Result<()> {
    let mut cli = Cli::parse();
    cli.worker.guard_program =
        Some(std::env::current_exe().context("finding this executable (to start its guard)")?);
    let telemetry = venom_telemetry::init(venom_telemetry::Config {
        service_name: "venom-worker",
        instance_id: Some(cli.worker.node_name()),
        otlp_endpoint: cli.otlp_endpoint.clone(),
        log_format: match cli.log_format {
            LogFormat::Text => venom_telemetry::LogFormat::Text,
            LogFormat::Json => venom_telemetry::LogFormat::Json,
        },
        default_log_filter: "info",
        ansi: std::io::IsTerminal::is_terminal(&std::io::stderr()),
    })
    .context("setting up telemetry")?;
    let result = venom_worker::run(cli.worker, shutdown_signal())
        .await
        .context("venom-worker failed");
    telemetry.shutdown();
    result
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn help_documents_every_environment_variable() {
        let help = Cli::command().render_long_help().to_string();
        for variable in [
            "VENOM_COORDINATOR",
            "VENOM_SLOTS",
            "VENOM_LABELS",
            "VENOM_NAME",
            "VENOM_THROTTLE",
            "VENOM_METRICS_LISTEN",
            "VENOM_QUEUE_DEPTH",
            "VENOM_MAX_OUTPUT_BYTES",
            "VENOM_HEARTBEAT_MS",
            "VENOM_LOG_FORMAT",
            "VENOM_OTLP_ENDPOINT",
            "OTEL_EXPORTER_OTLP_ENDPOINT",
        ] {
            assert!(
                help.contains(variable),
                "--help does not mention {variable}"
            );
        }
    }
}
