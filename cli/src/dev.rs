//! `venomctl dev`: a whole Venom in one process, like `nomad agent -dev`.
//!
//! [`DevCluster`] starts a single-node coordinator (sled in a temporary directory unless
//! told otherwise) and a local worker named `dev` pointed at the coordinator's actual
//! address, both as tasks on this runtime sharing one shutdown signal. `benchmark --dev`
//! uses the same cluster. With a wave file, `dev` runs it to completion with live
//! progress and exits with its outcome; without one it stays up until Ctrl-C.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use serde::Serialize;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use venom_coordinator::CoordinatorConfig;
use venom_core::mobius::ThrottlePolicy;
use venom_core::NodeState;

use crate::args::DevArgs;
use crate::client::Client;
use crate::commands::remote::{list_nodes, new_submission_id, submit_file, Follow};
use crate::commands::wavefile::{submit_limits, WaveFile};
use crate::commands::Context;
use crate::output::print_json;

/// The embedded worker's name.
pub const DEV_WORKER_NAME: &str = "dev";
/// How long the worker may take to register before `dev` gives up.
const READY_TIMEOUT_MS: u64 = 30_000;
/// Pause between `ListNodes` polls while waiting for the worker.
const READY_POLL_MS: u64 = 50;
/// How long the coordinator and worker get to stop cleanly.
const SHUTDOWN_TIMEOUT_MS: u64 = 10_000;
/// Exit code after Ctrl-C or SIGTERM (128 + SIGINT), as shells expect.
const EXIT_INTERRUPTED: u8 = 130;

/// How to start a dev cluster.
#[derive(Debug, Clone)]
pub struct DevOptions {
    pub listen: SocketAddr,
    /// `None`: a temporary directory.
    pub data_dir: Option<PathBuf>,
    /// `None`: the worker's default (this machine's CPUs).
    pub slots: Option<u32>,
    /// Throttling policy of the local worker.
    pub throttle: ThrottlePolicy,
    /// Keep a temporary data directory on exit.
    pub keep: bool,
    /// Serve with mutual TLS: a CA and certificates (member 1, worker `dev`, admin `dev`)
    /// are made in `<data dir>/tls`.
    pub tls: bool,
}

/// A running coordinator plus worker in this process.
pub struct DevCluster {
    /// The address the coordinator actually bound (the port is real even for `:0`).
    pub addr: SocketAddr,
    /// The CA and certificates, when serving with mutual TLS.
    tls: Option<PathBuf>,
    pub data_dir: PathBuf,
    /// Owns the temporary data directory (removed on drop unless kept).
    temp_dir: Option<tempfile::TempDir>,
    keep: bool,
    /// Sending `true` (or dropping it) stops both components.
    stop: watch::Sender<bool>,
    coordinator: JoinHandle<anyhow::Result<()>>,
    worker: JoinHandle<anyhow::Result<()>>,
}

/// A future that resolves once `stop` turns true or its sender is dropped.
async fn stop_signal(mut stop: watch::Receiver<bool>) {
    // An error means the sender is gone, which also means stop.
    let _ = stop.wait_for(|stopped| *stopped).await;
}

/// The address a local client uses to reach a server bound to `addr`
/// (`0.0.0.0:P` is reached at `127.0.0.1:P`).
pub fn reachable(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        ip if ip.is_unspecified() && ip.is_ipv4() => {
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), addr.port())
        }
        ip if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V6(std::net::Ipv6Addr::LOCALHOST), addr.port())
        }
        _ => addr,
    }
}

impl DevCluster {
    /// Binds the listener and starts the coordinator and the worker.
    pub async fn start(options: DevOptions) -> anyhow::Result<Self> {
        let (data_dir, temp_dir) = match &options.data_dir {
            Some(dir) => {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("cannot create data directory {}", dir.display()))?;
                (dir.clone(), None)
            }
            None => {
                let temp = tempfile::Builder::new()
                    .prefix("venom-dev-")
                    .tempdir()
                    .context("cannot create a temporary data directory")?;
                (temp.path().to_owned(), Some(temp))
            }
        };
        let listener = tokio::net::TcpListener::bind(options.listen)
            .await
            .with_context(|| {
                format!(
                    "cannot listen on {} (is another coordinator running? try --listen 127.0.0.1:0)",
                    options.listen
                )
            })?;
        let addr = listener
            .local_addr()
            .context("the listener has no local address")?;
        let tls = if options.tls {
            Some(dev_certificates(&data_dir.join("tls"))?)
        } else {
            None
        };
        let (stop, stop_rx) = watch::channel(false);
        let mut config = CoordinatorConfig::single_node(addr, data_dir.join("coordinator"));
        if let Some(dir) = &tls {
            config.tls = tls_args(dir, &venom_tls::Peer::new(venom_tls::Role::Member, "1")?);
        }
        let coordinator = tokio::spawn(venom_coordinator::run(
            config,
            listener,
            stop_signal(stop_rx.clone()),
        ));
        let url = format!("http://{}", reachable(addr));
        let mut worker_config = embedded_worker::config(url, options.slots, options.throttle);
        worker_config.work_dir = Some(data_dir.join("work"));
        worker_config.data_dir = Some(data_dir.join("worker"));
        if let Some(dir) = &tls {
            worker_config.tls = tls_args(
                dir,
                &venom_tls::Peer::new(venom_tls::Role::Worker, DEV_WORKER_NAME)?,
            );
        }
        let worker = tokio::spawn(embedded_worker::run(worker_config, stop_signal(stop_rx)));
        Ok(Self {
            addr,
            tls,
            data_dir,
            temp_dir,
            keep: options.keep,
            stop,
            coordinator,
            worker,
        })
    }

    /// The URL clients (and the worker) use.
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", reachable(self.addr))
    }

    /// How a client reaches this cluster: with the `dev` admin certificate under TLS.
    pub fn dialer(&self) -> anyhow::Result<venom_tls::Dialer> {
        let files = match &self.tls {
            Some(dir) => Some(admin_files(dir)?),
            None => None,
        };
        Ok(venom_tls::Dialer::from_files(files.as_ref(), false)?)
    }

    /// The directory of the CA and certificates, under `--tls`.
    pub fn tls_dir(&self) -> Option<&std::path::Path> {
        self.tls.as_deref()
    }

    /// Waits until the worker has registered and is ready, failing early if either
    /// component stopped.
    pub async fn wait_ready(&self, client: &mut Client) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_millis(READY_TIMEOUT_MS);
        loop {
            if self.coordinator.is_finished() {
                bail!("the dev coordinator stopped during startup (see the log above)");
            }
            if self.worker.is_finished() {
                bail!("the dev worker stopped during startup (see the log above)");
            }
            let last_error = match list_nodes(client).await {
                Ok(nodes) => {
                    let ready = |node: &venom_proto::NodeInfo| {
                        node.name == DEV_WORKER_NAME
                            && NodeState::try_from(node.state()) == Ok(NodeState::Ready)
                    };
                    if nodes.iter().any(ready) {
                        return Ok(());
                    }
                    format!("{} node(s) registered, none ready named `dev`", nodes.len())
                }
                Err(err) => {
                    client.reset();
                    format!("{err:#}")
                }
            };
            if Instant::now() >= deadline {
                bail!(
                    "the dev worker did not register within {} s ({last_error})",
                    READY_TIMEOUT_MS / 1_000
                );
            }
            tokio::time::sleep(Duration::from_millis(READY_POLL_MS)).await;
        }
    }

    /// Stops both components and waits for them; reports the first failure.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        let _ = self.stop.send(true);
        let timeout = Duration::from_millis(SHUTDOWN_TIMEOUT_MS);
        let mut failures = Vec::new();
        for (what, handle) in [("worker", self.worker), ("coordinator", self.coordinator)] {
            match tokio::time::timeout(timeout, handle).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(err))) => failures.push(format!("the dev {what} failed: {err:#}")),
                Ok(Err(join)) => failures.push(format!("the dev {what} panicked: {join}")),
                Err(_) => failures.push(format!(
                    "the dev {what} did not stop within {} s",
                    SHUTDOWN_TIMEOUT_MS / 1_000
                )),
            }
        }
        if let Some(temp) = self.temp_dir {
            if self.keep {
                let path = temp.keep();
                eprintln!("kept the dev data in {}", path.display());
            }
        }
        match failures.first() {
            None => Ok(()),
            Some(_) => bail!("{}", failures.join("; ")),
        }
    }
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn interrupted() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = terminate.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[derive(Serialize)]
struct DevBanner {
    coordinator: String,
    data_dir: String,
    temporary: bool,
    worker: &'static str,
}

/// `venomctl dev [WAVE]`.
pub async fn run(ctx: &Context, args: DevArgs) -> anyhow::Result<u8> {
    // Read and check the wave before starting anything, so a typo fails fast.
    let wave = match &args.wave {
        Some(path) => {
            let file = WaveFile::read(path)?;
            file.parse(&submit_limits())
                .map_err(|err| anyhow::anyhow!("{}: {err}", path.display()))?;
            Some(file)
        }
        None => None,
    };
    let cluster = DevCluster::start(DevOptions {
        listen: args.listen,
        data_dir: args.data_dir.clone(),
        slots: args.slots,
        throttle: args.throttle,
        keep: args.keep,
        tls: args.tls,
    })
    .await?;
    let url = cluster.url();
    let mut client = Client::new(std::slice::from_ref(&url), cluster.dialer()?)?;
    let outcome = tokio::select! {
        outcome = serve(ctx, &cluster, &mut client, wave.as_ref()) => outcome,
        () = interrupted() => {
            eprintln!("interrupted: stopping the dev cluster");
            Ok(EXIT_INTERRUPTED)
        }
    };
    let stopped = cluster.shutdown().await;
    let code = outcome?;
    stopped?;
    Ok(code)
}

/// Waits for the worker, then runs the wave or stays up until interrupted.
async fn serve(
    ctx: &Context,
    cluster: &DevCluster,
    client: &mut Client,
    wave: Option<&WaveFile>,
) -> anyhow::Result<u8> {
    cluster.wait_ready(client).await?;
    if let Some(file) = wave {
        return submit_file(ctx, client, file, &new_submission_id(), Follow::Watch).await;
    }
    let url = cluster.url();
    if ctx.json() {
        print_json(&DevBanner {
            coordinator: url.clone(),
            data_dir: cluster.data_dir.display().to_string(),
            temporary: cluster.temp_dir.is_some(),
            worker: DEV_WORKER_NAME,
        })?;
    } else {
        let data_note = match (&cluster.temp_dir, cluster.keep) {
            (Some(_), false) => " (temporary: removed on exit; --keep keeps it)",
            (Some(_), true) => " (temporary, kept on exit)",
            (None, _) => "",
        };
        println!("Venom dev cluster: a single-node coordinator and a worker named `dev`, in this process.");
        println!();
        println!("  coordinator  {url}");
        println!("  data         {}{data_note}", cluster.data_dir.display());
        println!();
        println!("In another terminal:");
        println!();
        println!("  export VENOM_COORDINATOR={url}");
        if let Some(dir) = cluster.tls_dir() {
            if let Ok(admin) = admin_files(dir) {
                println!("  export VENOM_TLS_CA={}", admin.ca.display());
                println!("  export VENOM_TLS_CERT={}", admin.cert.display());
                println!("  export VENOM_TLS_KEY={}", admin.key.display());
            }
        }
        println!("  venomctl nodes");
        println!("  venomctl submit examples/hello.toml --watch");
        println!();
        println!("Press Ctrl-C to stop.");
    }
    // Stay up until interrupted (the caller selects on the signal), unless a component dies.
    loop {
        if cluster.coordinator.is_finished() {
            bail!("the dev coordinator stopped unexpectedly (see the log above)");
        }
        if cluster.worker.is_finished() {
            bail!("the dev worker stopped unexpectedly (see the log above)");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The embedded worker: the only place that knows how `venom_worker` is configured.
/// A CA and the certificates of the embedded cluster in `dir`: member 1 (loopback
/// names), worker `dev` and admin `dev`. Reused when `dir` already holds them.
fn dev_certificates(dir: &std::path::Path) -> anyhow::Result<PathBuf> {
    use venom_tls::issue::{self, Validity};
    use venom_tls::{Peer, Role};
    if !dir.join(issue::CA_CERT).exists() {
        issue::init(dir, Validity::days(issue::DEFAULT_DAYS))?;
    }
    for peer in [
        Peer::new(Role::Member, "1")?,
        Peer::new(Role::Worker, DEV_WORKER_NAME)?,
        Peer::new(Role::Admin, DEV_WORKER_NAME)?,
    ] {
        if !issue::paths(dir, &peer).0.exists() {
            issue::issue_into(dir, &peer, &[], Validity::days(issue::DEFAULT_DAYS), false)?;
        }
    }
    Ok(dir.to_owned())
}

fn tls_args(dir: &std::path::Path, peer: &venom_tls::Peer) -> venom_tls::TlsArgs {
    let files = venom_tls::TlsFiles::in_dir(dir, peer);
    venom_tls::TlsArgs {
        tls_ca: Some(files.ca),
        tls_cert: Some(files.cert),
        tls_key: Some(files.key),
    }
}

fn admin_files(dir: &std::path::Path) -> anyhow::Result<venom_tls::TlsFiles> {
    let admin = venom_tls::Peer::new(venom_tls::Role::Admin, DEV_WORKER_NAME)?;
    Ok(venom_tls::TlsFiles::in_dir(dir, &admin))
}

mod embedded_worker {
    use std::future::Future;

    use venom_core::mobius::ThrottlePolicy;
    use venom_worker::WorkerConfig;

    use super::DEV_WORKER_NAME;

    /// A worker named `dev` connecting to `coordinator_url`; its attempts' working
    /// directories go under the dev data dir.
    pub fn config(
        coordinator_url: String,
        slots: Option<u32>,
        throttle: ThrottlePolicy,
    ) -> WorkerConfig {
        let mut config = WorkerConfig::for_dev(coordinator_url, slots, DEV_WORKER_NAME.to_owned());
        config.throttle = throttle;
        config
    }

    pub async fn run(
        config: WorkerConfig,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        venom_worker::run(config, shutdown).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unspecified_addresses_are_reached_on_loopback() {
        let any: SocketAddr = "0.0.0.0:7070".parse().expect("literal");
        assert_eq!(reachable(any), "127.0.0.1:7070".parse().expect("literal"));
        let local: SocketAddr = "127.0.0.1:9".parse().expect("literal");
        assert_eq!(reachable(local), local);
        let any6: SocketAddr = "[::]:1".parse().expect("literal");
        assert_eq!(reachable(any6), "[::1]:1".parse().expect("literal"));
    }
}
