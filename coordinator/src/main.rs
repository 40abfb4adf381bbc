//! `venom-coordinator`: parses flags and runs the coordinator until Ctrl-C or SIGTERM.

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

fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging(&cli.log_format);
    let listener = venom_coordinator::bind(&cli.config).await?;
    venom_coordinator::run(cli.config, listener, shutdown_signal()).await
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
