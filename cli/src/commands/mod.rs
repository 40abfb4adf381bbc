//! One function per `venomctl` subcommand, grouped by what they talk to.
//!
//! - [`remote`]: commands that ask the coordinator cluster (submit, status, nodes, …).
//! - [`wavefile`]: commands on a local wave file (validate, graph), no coordinator needed.
//! - [`machine`]: the prototype's commands measuring this machine (scan, compress,
//!   monitor, config).
//!
//! Every command returns the process exit code (0 success, 1 a wave that did not
//! succeed or a file that did not validate); errors propagate as `anyhow` errors and
//! `main` prints them as one line.

pub mod machine;
pub mod remote;
pub mod tls;
pub mod wavefile;

use clap::CommandFactory;

use crate::args::{Cli, Command, GlobalArgs, OutputFormat};
use crate::client::Client;

/// What every command may need from the global flags.
pub struct Context {
    pub global: GlobalArgs,
}

impl Context {
    /// A client for the configured coordinators (connects on first use).
    pub fn client(&self) -> anyhow::Result<Client> {
        Client::new(&self.global.coordinator, self.dialer()?)
    }

    /// How coordinators are reached: mutual TLS with `--tls-*`, else plaintext (loopback
    /// only, unless `--insecure`).
    pub fn dialer(&self) -> anyhow::Result<venom_tls::Dialer> {
        Ok(venom_tls::Dialer::from_files(
            self.global.tls.files().as_ref(),
            self.global.insecure,
        )?)
    }

    /// Whether `--output json` was asked for.
    pub fn json(&self) -> bool {
        self.global.output == OutputFormat::Json
    }
}

/// Runs the parsed command line; returns the exit code.
pub async fn run(cli: Cli) -> anyhow::Result<u8> {
    let ctx = Context { global: cli.global };
    match cli.command {
        Command::Dev(args) => crate::dev::run(&ctx, args).await,
        Command::Submit(args) => remote::submit(&ctx, &args).await,
        Command::Validate { file } => wavefile::validate(&ctx, &file),
        Command::Graph { target } => remote::graph(&ctx, &target).await,
        Command::Waves => remote::waves(&ctx).await,
        Command::Status { wave } => remote::status(&ctx, wave).await,
        Command::Tasks { wave } => remote::tasks(&ctx, wave).await,
        Command::Logs { wave, task } => remote::logs(&ctx, wave, &task).await,
        Command::Wait { wave } => remote::wait(&ctx, wave).await,
        Command::Cancel { wave } => remote::cancel(&ctx, wave).await,
        Command::Nodes => remote::nodes(&ctx).await,
        Command::Drain { node, undo } => remote::drain(&ctx, &node, !undo).await,
        Command::Cluster { action } => remote::cluster(&ctx, action).await,
        Command::Tls { action } => tls::run(&ctx, action),
        Command::Scan => machine::scan(&ctx).await,
        Command::Compress { hours } => machine::compress(&ctx, hours).await,
        Command::Monitor {
            duration,
            cluster: false,
        } => machine::monitor(&ctx, duration).await,
        Command::Monitor {
            duration,
            cluster: true,
        } => remote::monitor_cluster(&ctx, duration).await,
        Command::Config => machine::config(&ctx).await,
        Command::Benchmark(args) => crate::bench::run(&ctx, &args).await,
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "venomctl",
                &mut std::io::stdout(),
            );
            Ok(0)
        }
    }
}
