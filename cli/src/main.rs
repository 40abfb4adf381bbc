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
use tracing_subscriber::EnvFilter;

use crate::args::{Cli, Command};

/// Exit code for errors (connection failures, bad input, a coordinator refusal).
const EXIT_ERROR: u8 = 1;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli.command);
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
    let result = runtime.block_on(commands::run(cli));
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
/// long-running server, so it logs at `info`; everything else only warns.
fn init_logging(command: &Command) {
    let default = match command {
        Command::Dev(args) if args.wave.is_none() => "info",
        _ => "warn",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .try_init();
}
