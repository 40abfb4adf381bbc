//! Coordinator configuration: every flag also reads a `VENOM_…` environment variable.
//!
//! `CoordinatorConfig` is a clap `Args` struct so that the `venom-coordinator` binary and
//! `venomctl dev` (which embeds a coordinator) share one definition.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Args;
use venom_core::wave::WaveLimits;

/// Defaults of the flags below, named once: clap's defaults and
/// [`CoordinatorConfig::single_node`] both take them from here.
pub mod defaults {
    use super::WaveLimits;

    pub const ID: u64 = 1;
    pub const LISTEN: &str = venom_core::url::DEFAULT_LISTEN;
    /// 10 s: a leader change (an election, then workers finding the new leader) fits well
    /// inside it, so it costs no re-run.
    pub const WORKER_LEASE_MS: u64 = 10_000;
    pub const MAX_MICRO_TASKS: u64 = WaveLimits::DEFAULT_MAX_MICRO_TASKS;
    pub const MAX_SPEC_BYTES: usize = WaveLimits::DEFAULT_MAX_SPEC_BYTES;
    /// 16 MiB: also bounds a snapshot, which travels as one message.
    pub const MAX_MESSAGE_BYTES: usize = 16 << 20;
    pub const TICK_MS: u64 = 100;
    pub const COMPACT_AFTER_ENTRIES: u64 = 10_000;
}

/// How a coordinator is run.
#[derive(Debug, Clone, Args)]
pub struct CoordinatorConfig {
    /// Raft id of this coordinator (unique within the cluster, ≥ 1).
    #[arg(long, env = "VENOM_ID", default_value_t = defaults::ID)]
    pub id: u64,

    /// Address serving clients, workers and raft peers.
    #[arg(long, env = "VENOM_LISTEN", default_value = defaults::LISTEN)]
    pub listen: SocketAddr,

    /// Directory for the sled database (raft log and state machine).
    /// Default: ./venom-data/coordinator-<id>.
    #[arg(long, env = "VENOM_DATA_DIR")]
    pub data_dir: Option<PathBuf>,

    /// Raft peers as `ID=HOST:PORT,…`; none means a single-node cluster.
    #[arg(long, env = "VENOM_PEERS", value_delimiter = ',')]
    pub peers: Vec<String>,

    /// Found a new cluster (this coordinator and `--peers`) if the data dir holds no
    /// cluster state yet; ignored once it does. Without it, or `--join`, a coordinator
    /// refuses to start on an empty data dir: it never creates a cluster on its own. A
    /// member whose peers say it already took part refuses an empty data dir either way
    /// (it lost its data: remove it, add it back, then `--join`).
    #[arg(long, env = "VENOM_BOOTSTRAP", conflicts_with = "join")]
    pub bootstrap: bool,

    /// Join an existing cluster instead of founding one: start with an empty data dir and
    /// wait for the leader to send a snapshot. Run `venomctl cluster add ID ADDR` first;
    /// `--peers` must name the current members so this coordinator accepts their messages.
    #[arg(long, env = "VENOM_JOIN")]
    pub join: bool,

    /// Mutual TLS (`venomctl tls init`): this member's certificate must name member `--id`.
    /// Required to listen on, or reach peers at, an address beyond loopback.
    #[command(flatten)]
    pub tls: venom_tls::TlsArgs,

    /// Serve and reach peers in plaintext beyond loopback, with no authentication: anyone
    /// who can reach the port can run commands on every worker. Logged at every start.
    #[arg(long, env = "VENOM_INSECURE", conflicts_with_all = ["tls_ca", "tls_cert", "tls_key"])]
    pub insecure: bool,

    /// Do not serve gRPC reflection (`grpcurl list` and friends).
    #[arg(long, env = "VENOM_NO_REFLECTION")]
    pub no_reflection: bool,

    /// Address for the Prometheus `/metrics` endpoint (off when unset; give a loopback
    /// address unless the scraper is elsewhere: it is plain HTTP without authentication).
    #[arg(long, env = "VENOM_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,

    /// How long a worker's lease lasts. Each committed heartbeat renews it; a worker that
    /// cannot renew it within this time kills its attempts and starts nothing, and the leader
    /// re-dispatches the node's attempts once the lease plus a margin (a tenth of it plus
    /// 1 s) has passed since its last renewal. A fault shorter than the lease costs no re-run.
    #[arg(long, env = "VENOM_WORKER_LEASE_MS", default_value_t = defaults::WORKER_LEASE_MS,
          value_parser = clap::value_parser!(u64).range(1_000..=86_400_000))]
    pub worker_lease_ms: u64,

    /// Most micro-tasks a single wave may expand to.
    #[arg(long, env = "VENOM_MAX_MICRO_TASKS", default_value_t = defaults::MAX_MICRO_TASKS)]
    pub max_micro_tasks: u64,

    /// Largest wave file accepted, in bytes.
    #[arg(long, env = "VENOM_MAX_SPEC_BYTES", default_value_t = defaults::MAX_SPEC_BYTES)]
    pub max_spec_bytes: usize,

    /// Largest gRPC message accepted, in bytes.
    #[arg(long, env = "VENOM_MAX_MESSAGE_BYTES", default_value_t = defaults::MAX_MESSAGE_BYTES)]
    pub max_message_bytes: usize,

    /// Raft tick interval.
    #[arg(long, env = "VENOM_TICK_MS", default_value_t = defaults::TICK_MS)]
    pub tick_ms: u64,

    /// Compact the raft log once it holds more than this many applied and checkpointed
    /// entries; a follower that falls further behind is caught up by snapshot.
    #[arg(long, env = "VENOM_COMPACT_AFTER_ENTRIES", default_value_t = defaults::COMPACT_AFTER_ENTRIES)]
    pub compact_after_entries: u64,
}

impl CoordinatorConfig {
    /// A single-node coordinator on `listen` storing its data in `data_dir` (founding its
    /// cluster there if it is empty), with every other setting at its default (used by
    /// `venomctl dev` and tests).
    pub fn single_node(listen: SocketAddr, data_dir: PathBuf) -> Self {
        Self {
            id: defaults::ID,
            listen,
            data_dir: Some(data_dir),
            peers: Vec::new(),
            bootstrap: true,
            join: false,
            tls: venom_tls::TlsArgs::default(),
            insecure: false,
            no_reflection: false,
            metrics_listen: None,
            worker_lease_ms: defaults::WORKER_LEASE_MS,
            max_micro_tasks: defaults::MAX_MICRO_TASKS,
            max_spec_bytes: defaults::MAX_SPEC_BYTES,
            max_message_bytes: defaults::MAX_MESSAGE_BYTES,
            tick_ms: defaults::TICK_MS,
            compact_after_entries: defaults::COMPACT_AFTER_ENTRIES,
        }
    }

    /// The data directory actually used.
    pub fn data_dir(&self) -> PathBuf {
        self.data_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(format!("venom-data/coordinator-{}", self.id)))
    }
}
