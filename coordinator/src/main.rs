//! `venom-coordinator`: parses flags and runs the coordinator until Ctrl-C or SIGTERM.

use anyhow::Context as _;
use clap::Parser;
use venom_coordinator::CoordinatorConfig;

/// Venom coordinator: raft-replicated scheduler of waves (DAGs of shell micro-tasks).
#[derive(Debug, Parser)]
#[command(name = "venom-coordinator", version, about)]
struct Cli {
    #[command(flatten)]
    config: CoordinatorConfig,

    /// Log format.
    #[arg(long, env = "VENOM_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,

    /// OTLP/gRPC endpoint for traces (e.g. http://localhost:4317, Jaeger's OTLP port). Without
    /// it, OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or OTEL_EXPORTER_OTLP_ENDPOINT are used; with none
    /// of them, no traces are exported. The other OTEL_* variables apply as usual.
    #[arg(long, env = "VENOM_OTLP_ENDPOINT", value_name = "URL")]
    otlp_endpoint: Option<String>,
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// Exit status when the data dir may not be used (sysexits' EX_CONFIG): the process must
/// not be restarted as it is (systemd: `RestartPreventExitStatus=78`).
const EXIT_DATA_DIR_REFUSED: u8 = 78;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match run().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("venom-coordinator: {e:#}");
            let refused = e
                .downcast_ref::<venom_coordinator::datadir::DataDirError>()
                .is_some();
            std::process::ExitCode::from(if refused { EXIT_DATA_DIR_REFUSED } else { 1 })
        }
    }
}

async fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let telemetry = venom_telemetry::init(venom_telemetry::Config {
        service_name: "venom-coordinator",
        instance_id: Some(cli.config.id.to_string()),
        otlp_endpoint: cli.otlp_endpoint.clone(),
        log_format: if cli.log_format == "json" {
            venom_telemetry::LogFormat::Json
        } else {
            venom_telemetry::LogFormat::Text
        },
        default_log_filter: "info",
        ansi: std::io::IsTerminal::is_terminal(&std::io::stderr()),
    })
    .context("setting up telemetry")?;
    let listener = venom_coordinator::bind(&cli.config).await?;
    let result = venom_coordinator::run(cli.config, listener, shutdown_signal()).await;
    telemetry.shutdown();
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_valid() {
        Cli::command().debug_assert();
    }
}
