//! Venom's worker: it scans its machine, watches its health θ, runs the micro-tasks the
//! coordinator assigns as real processes, and keeps one stream open to the coordinator's leader.
//!
//! The modules follow that order: [`scan`] (hardware profile), [`theta`] (health monitor),
//! [`executor`] (one attempt as a process group), [`isolation`] (what each attempt may see and
//! use: a clean environment, its own directory, `--run-as`, cgroup limits), [`agent`] (the
//! connection, the queue and the runners), [`convert`] (the only module that builds or reads `venom_proto` messages),
//! [`datadir`] (what outlives the process: results not yet acknowledged, process groups
//! started), [`guard`] (the process that kills attempts when the worker cannot),
//! [`config`] (flags), [`limits`] (every limit and default) and [`metrics`] (Prometheus). The
//! shared vocabulary (attempts, outcomes, throttle policies, modes, URLs) is `venom-core`'s.
//! [`run`] ties them together for the `venom-worker` binary and for `venomctl dev`, which
//! embeds a worker.

pub mod agent;
pub mod config;
pub mod convert;
pub mod datadir;
pub mod executor;
pub mod guard;
pub mod isolation;
pub mod limits;
pub mod metrics;
pub mod scan;
pub mod theta;

use std::future::Future;

use anyhow::Context as _;

pub use config::WorkerConfig;

/// Scans the machine, then runs the agent until `shutdown` completes; on the way out every
/// running process group is killed.
pub async fn run(
    config: WorkerConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> anyhow::Result<()> {
    let profile = tokio::task::spawn_blocking(scan::scan)
        .await
        .context("scanning the hardware")?;
    agent::run(config, profile, shutdown)
        .await
        .context("running the worker agent")?;
    Ok(())
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub(crate) fn unix_now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| {
            u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX)
        })
}
