//! `venomctl`: the command line for Venom. Parses flags, sets up logging and the tokio
//! runtime, runs one command and turns its result into an exit code; every error is
//! printed as one `error: …` line on stderr.

mod args;
mod bench;
mod client;
mod commands;
mod dev;
mod output;
mod watch;

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;

use crate::args::{Cli, Command};

/// Exit code for errors (connection failures, bad input, a coordinator refusal).
const EXIT_ERROR: u8 = 1;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::from(EXIT_ERROR);
        }
    };
    // Trace export runs on the runtime, so telemetry starts inside it.
    let telemetry = match runtime.block_on(async { init_telemetry(&cli) }) {
        Ok(guard) => guard,
        Err(err) => {
            eprintln!("error: {err}");
            return ExitCode::from(EXIT_ERROR);
        }
    };
    let result = runtime.block_on(commands::run(cli));
    // Spans still buffered leave now (bounded wait), while the runtime still runs.
    telemetry.shutdown();
    // Do not wait for stray blocking tasks (a monitor sampling) once the command is done.
    runtime.shutdown_timeout(std::time::Duration::from_millis(100));
    match result {
        Ok(code) => ExitCode::from(code),
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(EXIT_ERROR)
        }
    }
}

/// Logs go to stderr, filtered by `RUST_LOG`. `venomctl dev` without a wave is a
/// long-running server, so it logs at `info`; everything else only warns. Traces are
/// exported when an OTLP endpoint is configured (`venomctl dev` included: its embedded
/// coordinator and worker report under this process).
fn init_telemetry(cli: &Cli) -> Result<venom_telemetry::Guard, venom_telemetry::TelemetryError> {
    let default_log_filter = match &cli.command {
        Command::Dev(args) if args.wave.is_none() => "info",
        _ => "warn",
    };
    venom_telemetry::init(venom_telemetry::Config {
        service_name: "venomctl",
        instance_id: None,
        otlp_endpoint: cli.global.otlp_endpoint.clone(),
        log_format: venom_telemetry::LogFormat::Text,
        default_log_filter,
        ansi: std::io::stderr().is_terminal(),
    })
}
