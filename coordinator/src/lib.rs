//! Venom's coordinator: a raft-replicated state machine of waves, micro-tasks and
//! nodes persisted in sled, a pure scheduler, the Möbius model, and the gRPC services
//! for clients, workers and raft peers — all served on one port.

pub mod auth;
pub mod cluster_view;
pub mod config;
pub mod convert;
pub mod datadir;
pub mod durable;
pub mod leases;
pub mod metrics;
pub mod replica;
pub mod scheduler;
pub mod server;
pub mod state;
pub mod storage;
pub mod submissions;
pub mod transport;
mod wire_limits;

#[cfg(test)]
mod sim;

pub use config::CoordinatorConfig;

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use anyhow::Context as _;
use futures::StreamExt as _;
use tokio::net::TcpListener;
use tokio::sync::watch;
use venom_core::wave::WaveLimits;
use venom_proto::v1::client_service_server::ClientServiceServer;
use venom_proto::v1::raft_service_server::RaftServiceServer;
use venom_proto::v1::worker_service_server::WorkerServiceServer;

use crate::datadir::{Contents, DataDirError, Found};
use crate::replica::{ReplicaConfig, ReplicaError};
use crate::state::State;
use crate::storage::Store;
use crate::transport::GrpcTransport;

/// Parses `--peers` entries (`ID=HOST:PORT`) into id → URL, adding this node.
pub fn parse_members(
    id: u64,
    own_addr: &str,
    peers: &[String],
) -> anyhow::Result<BTreeMap<u64, String>> {
    let mut members = BTreeMap::new();
    for peer in peers.iter().filter(|p| !p.trim().is_empty()) {
        let (pid, addr) = peer
            .split_once('=')
            .with_context(|| format!("--peers: `{peer}` is not ID=HOST:PORT"))?;
        let pid: u64 = pid
            .trim()
            .parse()
            .with_context(|| format!("--peers: `{pid}` in `{peer}` is not a node id"))?;
        anyhow::ensure!(pid >= 1, "--peers: node ids start at 1 (`{peer}`)");
        members.insert(pid, venom_core::url::normalize_url(addr));
    }
    members.entry(id).or_insert_with(|| own_addr.to_string());
    Ok(members)
}

/// How long the startup checks wait for each peer's view of the cluster.
/// How long after the start a member keeps asking its peers which cluster they belong to.
const PEER_CLUSTER_CHECK_FOR: Duration = Duration::from_secs(30);
/// How often it asks while no peer has answered with a cluster.
const PEER_CLUSTER_CHECK_EVERY: Duration = Duration::from_secs(1);
/// How long worker and client streams get to close after the replica stopped.
const SERVER_DRAIN_TIMEOUT: Duration = Duration::from_secs(3);
const PEER_CHECK_TIMEOUT: Duration = Duration::from_secs(1);

/// Opens this coordinator's data directory and decides whether it may start on it
/// (see [`datadir`]): an empty directory needs `--bootstrap` or `--join`, and is refused
/// before anything is written to it; a member whose peers record it as having taken part
/// already (it acknowledged entries) lost its data, whichever flag it has — it must be
/// removed and added back first. Returns the store and its cluster id (0 if none yet).
async fn open_data_dir(
    config: &CoordinatorConfig,
    data_dir: &std::path::Path,
    members: &BTreeMap<u64, String>,
    dialer: &venom_tls::Dialer,
) -> anyhow::Result<(Store, u64)> {
    let empty = || DataDirError::Empty {
        dir: data_dir.to_path_buf(),
    };
    let configured_peers: BTreeMap<u64, String> = members
        .iter()
        .filter(|(&id, _)| id != config.id)
        .map(|(&id, address)| (id, address.clone()))
        .collect();
    if datadir::inspect(data_dir, config.id)? == Found::Nothing {
        if !config.bootstrap && !config.join {
            return Err(empty().into());
        }
        let views = peer_views(&configured_peers, dialer).await;
        let took_part = views
            .iter()
            .find(|(_, view)| view.members.iter().any(|m| m.id == config.id && m.started));
        if let Some((peer, view)) = took_part {
            return Err(DataDirError::AlreadyStarted {
                dir: data_dir.to_path_buf(),
                member_id: config.id,
                peer: *peer,
                cluster_id: view.cluster_id,
            }
            .into());
        }
    }
    let (store, contents) = datadir::open(data_dir, config.id)?;
    match contents {
        Contents::Empty if !config.bootstrap && !config.join => Err(empty().into()),
        Contents::Empty => Ok((store, 0)),
        Contents::Member { cluster_id } => Ok((store, cluster_id)),
    }
}

/// A member whose every peer that answers belongs to another cluster holds another
/// cluster's data dir. Checked beside the start, not before it (peers that are starting
/// too may take a moment to answer, and until then nothing can mix: raft batches carry
/// the cluster id and each side refuses the other's).
async fn check_peers_cluster(
    member_id: u64,
    data_dir: std::path::PathBuf,
    cluster_id: u64,
    peers: BTreeMap<u64, String>,
    dialer: venom_tls::Dialer,
) -> Result<(), DataDirError> {
    let deadline = tokio::time::Instant::now() + PEER_CLUSTER_CHECK_FOR;
    loop {
        let views = peer_views(&peers, &dialer).await;
        let named: Vec<&(u64, venom_proto::v1::ClusterStatusResponse)> =
            views.iter().filter(|(_, v)| v.cluster_id != 0).collect();
        match named.first() {
            Some(_) if named.iter().any(|(_, v)| v.cluster_id == cluster_id) => return Ok(()),
            Some((peer, view)) => {
                return Err(DataDirError::OtherCluster {
                    dir: data_dir,
                    member_id,
                    recorded: cluster_id,
                    other: view.cluster_id,
                    source_of_other: format!("coordinator {peer} (every peer that answered)"),
                })
            }
            // Nobody answered with a cluster yet: ask again for a while.
            None if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(PEER_CLUSTER_CHECK_EVERY).await;
            }
            None => return Ok(()),
        }
    }
}

/// The views of the peers that answer within [`PEER_CHECK_TIMEOUT`] (asked at once).
async fn peer_views(
    peers: &BTreeMap<u64, String>,
    dialer: &venom_tls::Dialer,
) -> Vec<(u64, venom_proto::v1::ClusterStatusResponse)> {
    let asks = peers.iter().map(|(&id, address)| async move {
        (
            id,
            cluster_view::member_view(address, PEER_CHECK_TIMEOUT, dialer).await,
        )
    });
    futures::future::join_all(asks)
        .await
        .into_iter()
        .filter_map(|(id, view)| Some((id, view?)))
        .collect()
}

/// Binds the configured listen address.
pub async fn bind(config: &CoordinatorConfig) -> anyhow::Result<TcpListener> {
    TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))
}

/// Streams one connection may carry at once.
const MAX_STREAMS_PER_CONNECTION: u32 = 1_024;
/// HTTP/2 pings find connections whose peer vanished (and free their worker names).
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// This member's certificate, checked against `--id`; without one, plaintext is allowed
/// on loopback, or anywhere with `--insecure` (said loudly at every start).
fn security(
    config: &CoordinatorConfig,
    local: std::net::SocketAddr,
) -> anyhow::Result<Option<std::sync::Arc<venom_tls::files::Material>>> {
    if let Some(files) = config.tls.files() {
        let material = files.load().context("TLS")?;
        anyhow::ensure!(
            material.peer.member_id() == Some(config.id),
            "--tls-cert: {} is the certificate of {}, not of member {} (issue one with \
             `venomctl tls issue member {}`)",
            files.cert.display(),
            material.peer,
            config.id,
            config.id
        );
        return Ok(Some(std::sync::Arc::new(material)));
    }
    if config.insecure {
        tracing::warn!(
            listen = %local,
            "--insecure: serving plaintext without authentication; anyone who can reach this \
             port can run commands on every worker"
        );
    } else if !local.ip().is_loopback() {
        anyhow::bail!(
            "--listen {local}: refusing to serve beyond loopback without TLS; give \
             --tls-ca, --tls-cert and --tls-key (see `venomctl tls init`), or --insecure to \
             let anyone who reaches this port run commands on every worker"
        );
    }
    Ok(None)
}

/// The accepted connections the gRPC server takes (see `venom_tls::listen`).
type Incoming = tokio_stream::wrappers::ReceiverStream<std::io::Result<venom_tls::listen::Conn>>;

/// Runs a coordinator serving on `listener` until `shutdown` resolves.
///
/// The raft replica and the gRPC server are watched together: whichever stops first
/// without a shutdown having been asked for (the server's task returned or panicked, the
/// listener stopped handing it connections, the replica failed or lost every handle) stops
/// the other and makes this an error, so a coordinator never lingers as a member nobody
/// can reach, nor ends with success after such a failure.
pub async fn run(
    config: CoordinatorConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    run_with_incoming(config, listener, |incoming| incoming, shutdown).await
}

/// [`run`], with the listener's stream of connections passed through `incoming` before the
/// gRPC server takes it (the identity in production; tests end it early).
async fn run_with_incoming<S>(
    config: CoordinatorConfig,
    listener: TcpListener,
    wrap_incoming: impl FnOnce(Incoming) -> S,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()>
where
    S: futures::Stream<Item = std::io::Result<venom_tls::listen::Conn>> + Send + 'static,
{
    anyhow::ensure!(config.id >= 1, "--id must be at least 1");
    let local = listener.local_addr().context("listener address")?;
    let tls = security(&config, local)?;
    let dialer = match &tls {
        Some(material) => venom_tls::Dialer::tls(material.clone()),
        None => venom_tls::Dialer::plaintext(config.insecure),
    };
    let data_dir = config.data_dir();
    let members = parse_members(config.id, &format!("http://{local}"), &config.peers)?;
    for (id, address) in members.iter().filter(|(&id, _)| id != config.id) {
        dialer
            .url(address)
            .with_context(|| format!("--peers: member {id}"))?;
    }
    let (store, cluster_id) = open_data_dir(&config, &data_dir, &members, &dialer).await?;
    // Everyone this member could be clustered with: its recorded membership and --peers.
    let mut known_peers = store.members()?;
    known_peers.extend(members.iter().map(|(&id, a)| (id, a.clone())));
    known_peers.remove(&config.id);
    let limits = WaveLimits {
        max_spec_bytes: config.max_spec_bytes,
        max_micro_tasks: config.max_micro_tasks,
        ..WaveLimits::default()
    };
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    // Set by the shutdown request, by a refusal, or by a part that stopped unasked.
    let shutdown_tx = std::sync::Arc::new(shutdown_tx);
    // A refusal found after the start (see `check_peers_cluster`) stops the coordinator
    // and becomes its error.
    let refusal: std::sync::Arc<std::sync::Mutex<Option<DataDirError>>> = Default::default();
    let refused = std::sync::Arc::new(tokio::sync::Notify::new());
    {
        let (refused, shutdown_tx) = (refused.clone(), shutdown_tx.clone());
        tokio::spawn(async move {
            tokio::select! {
                () = shutdown => {}
                () = refused.notified() => {}
            }
            let _ = shutdown_tx.send(true);
        });
    }
    if cluster_id != 0 && !known_peers.is_empty() {
        let (refusal, refused) = (refusal.clone(), refused.clone());
        let (id, dir, dialer) = (config.id, data_dir.clone(), dialer.clone());
        tokio::spawn(async move {
            if let Err(e) = check_peers_cluster(id, dir, cluster_id, known_peers, dialer).await {
                tracing::error!("{e}");
                if let Ok(mut slot) = refusal.lock() {
                    *slot = Some(e);
                }
                refused.notify_one();
            }
        });
    }
    // Peers come and go with membership changes, so even a group of one has a transport.
    let transport = GrpcTransport::start(config.id, &members, dialer.clone());
    let routes = transport.routes();
    let replica_config = ReplicaConfig {
        id: config.id,
        members,
        join: config.join,
        bootstrap: config.bootstrap,
        election_ticks: (10, 20),
        tick: Duration::from_millis(config.tick_ms.max(1)),
        worker_lease_ms: config.worker_lease_ms,
        max_entry_bytes: 4 << 20,
        compact_after_entries: config.compact_after_entries,
    };
    let mut replica_shutdown = shutdown_rx.clone();
    let (handle, replica_task) = replica::start(
        replica_config,
        store,
        State::new(limits.clone()),
        transport,
        async move {
            let _ = replica_shutdown.wait_for(|s| *s).await;
        },
    )
    .map_err(|e| refusal_if_damaged(e, &data_dir, config.id))
    .context("cannot start the raft replica")?;

    let (mut health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<ClientServiceServer<server::ClientApi>>()
        .await;
    health_reporter
        .set_serving::<WorkerServiceServer<server::WorkerApi>>()
        .await;
    health_reporter
        .set_serving::<RaftServiceServer<server::RaftApi>>()
        .await;
    // Reflection in both versions grpcurl and friends ask for, unless turned off.
    let reflection_builder = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(venom_proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let (reflection, reflection_alpha) = if config.no_reflection {
        (None, None)
    } else {
        (
            Some(
                reflection_builder()
                    .build_v1()
                    .context("reflection service")?,
            ),
            Some(
                reflection_builder()
                    .build_v1alpha()
                    .context("reflection service")?,
            ),
        )
    };

    if let Some(addr) = config.metrics_listen {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("--metrics-listen: cannot listen on {addr}"))?;
        let mut metrics_shutdown = shutdown_rx.clone();
        tracing::info!(%addr, "metrics served at /metrics");
        let shared = handle.shared.clone();
        tokio::spawn(venom_telemetry::metrics::serve(
            listener,
            std::sync::Arc::new(move || metrics::render_shared(&shared)),
            async move {
                let _ = metrics_shutdown.wait_for(|s| *s).await;
            },
        ));
    }

    let max = config.max_message_bytes;
    let client_api = server::ClientApi {
        handle: handle.clone(),
        limits,
        shutdown: shutdown_rx.clone(),
        dialer,
    };
    let router = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        // Bounds per connection; the listener bounds connections per address.
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION)
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .layer(wire_limits::ResourceExhaustedLayer)
        .add_service(health_service)
        .add_optional_service(reflection)
        .add_optional_service(reflection_alpha)
        .add_service(
            ClientServiceServer::new(client_api)
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
        )
        .add_service(
            WorkerServiceServer::new(server::WorkerApi {
                handle: handle.clone(),
                live: server::LiveStreams::default(),
            })
            .max_decoding_message_size(max)
            .max_encoding_message_size(max),
        )
        .add_service(
            RaftServiceServer::new(server::RaftApi {
                handle: handle.clone(),
                routes,
            })
            .max_decoding_message_size(max)
            .max_encoding_message_size(max),
        );
    tracing::info!(
        addr = %local,
        id = config.id,
        data_dir = %data_dir.display(),
        tls = tls.is_some(),
        "coordinator serving"
    );
    let mut server_shutdown = shutdown_rx.clone();
    // The listener runs the handshakes, attaches each caller's identity and bounds
    // connections per address (and sets TCP_NODELAY: delayed ACKs would otherwise cost
    // ~40 ms per dependency link).
    let incoming = venom_tls::listen::incoming(listener, venom_tls::ListenConfig::new(tls))
        .context("TLS listener")?;
    // The server itself only returns once every connection has closed (long-lived worker
    // streams included), so the end of its connections is watched here. The listener
    // deals with accept errors itself (it logs them and backs off), so an error in its
    // stream means it failed: the stream ends there, and says why.
    let (listener_ended_tx, listener_ended) = tokio::sync::oneshot::channel::<String>();
    let incoming = wrap_incoming(incoming)
        .map(Some)
        .chain(futures::stream::iter([None]))
        .scan(Some(listener_ended_tx), |ended, item| {
            let why = match item {
                Some(Ok(conn)) => {
                    return futures::future::ready(Some(Ok::<_, std::io::Error>(conn)))
                }
                Some(Err(e)) => format!("the listener failed: {e}"),
                None => "the listener stopped accepting connections".to_owned(),
            };
            if let Some(ended) = ended.take() {
                let _ = ended.send(why);
            }
            futures::future::ready(None)
        });
    let mut server = tokio::spawn(router.serve_with_incoming_shutdown(incoming, async move {
        let _ = server_shutdown.wait_for(|s| *s).await;
    }));
    drop(handle);
    let mut replica_task = replica_task;
    // In the order causes come: the listener's end makes the server return, and the
    // server's end drops the replica's last handles.
    let first = tokio::select! {
        biased;
        Ok(why) = listener_ended => Stopped::Listener(why),
        server = &mut server => Stopped::Server(server),
        replica = &mut replica_task => Stopped::Replica(replica),
    };
    let unasked = first.unasked_failure(*shutdown_rx.borrow());
    if let Some(failure) = &unasked {
        tracing::error!("{failure}; stopping the coordinator");
    }
    // Whatever stopped first, the rest stops now (drained, checkpointed).
    let _ = shutdown_tx.send(true);
    let (replica_result, server) = match first {
        Stopped::Replica(replica) => (replica, Some(server)),
        Stopped::Server(_) => (replica_task.await, None),
        Stopped::Listener(_) => (replica_task.await, Some(server)),
    };
    let replica_result = replica_result.context("replica task panicked")?;
    // Long-lived worker streams end with the replica; give connections a moment to close.
    if let Some(server) = server {
        match tokio::time::timeout(SERVER_DRAIN_TIMEOUT, server).await {
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "gRPC server error"),
            Ok(_) => {}
            Err(_) => tracing::info!(
                "gRPC server did not drain in {} s; closing",
                SERVER_DRAIN_TIMEOUT.as_secs()
            ),
        }
    }
    if let Some(refusal) = refusal.lock().ok().and_then(|mut slot| slot.take()) {
        return Err(refusal.into());
    }
    match replica_result {
        Err(ReplicaError::DataDir(refusal)) => Err(refusal.into()),
        // The replica's own failure is the cause; the server's end followed from it.
        Err(e) => Err(refusal_if_damaged(e, &data_dir, config.id).context("raft replica failed")),
        Ok(()) => match unasked {
            Some(failure) => Err(anyhow::anyhow!(failure)),
            None => Ok(()),
        },
    }
}

/// The part of a running coordinator that stopped first.
enum Stopped {
    /// The raft replica's task ended (with its result, or its panic).
    Replica(Result<Result<(), ReplicaError>, tokio::task::JoinError>),
    /// The gRPC server's task ended (with its result, or its panic).
    Server(Result<Result<(), tonic::transport::Error>, tokio::task::JoinError>),
    /// The listener stopped handing connections to the gRPC server (why).
    Listener(String),
}

impl Stopped {
    /// Why stopping first is a failure, when no shutdown had been asked for (`asked`): any
    /// end of the server or the listener; a replica that ends without an error only after
    /// a shutdown (it fails with its own error otherwise).
    fn unasked_failure(&self, asked: bool) -> Option<String> {
        if asked {
            return None;
        }
        match self {
            Stopped::Replica(Ok(Ok(()))) => Some(
                "the raft replica stopped although no shutdown was asked (nothing serves it \
                 any more)"
                    .to_owned(),
            ),
            Stopped::Replica(_) => None,
            Stopped::Server(Ok(Ok(()))) => {
                Some("the gRPC server stopped although no shutdown was asked".to_owned())
            }
            Stopped::Server(Ok(Err(e))) => Some(format!("the gRPC server failed: {e}")),
            Stopped::Server(Err(e)) => Some(format!("the gRPC server task failed: {e}")),
            Stopped::Listener(why) => Some(format!("{why} although no shutdown was asked")),
        }
    }
}

/// A replica failure that found the store damaged becomes the data dir's refusal (exit 78,
/// the way out); any other stays as it is.
fn refusal_if_damaged(
    e: ReplicaError,
    data_dir: &std::path::Path,
    member_id: u64,
) -> anyhow::Error {
    match e {
        ReplicaError::Store(e) if e.is_corruption() => {
            datadir::refuse_damaged(data_dir, member_id, &e).into()
        }
        e => e.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    use venom_proto::v1 as pb;
    use venom_proto::v1::client_service_client::ClientServiceClient;

    /// A client of the plaintext coordinator at `addr`.
    async fn connect(
        addr: std::net::SocketAddr,
    ) -> anyhow::Result<ClientServiceClient<tonic::transport::Channel>> {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
            .connect()
            .await?;
        Ok(ClientServiceClient::new(channel))
    }

    /// Waits until the coordinator at `addr` answers `ClusterStatus` with itself as leader.
    async fn wait_leader(addr: std::net::SocketAddr) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let status = async {
                let mut client = connect(addr).await?;
                let status = client
                    .cluster_status(pb::ClusterStatusRequest::default())
                    .await?;
                anyhow::Ok(status.into_inner().leader_id)
            };
            if let Ok(1) = status.await {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the coordinator at {addr} elected no leader in 30 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Starts a single-node coordinator whose listener's connections pass through `wrap`,
    /// waits until it leads, then calls `fail` and returns what `run` returned (it must
    /// return within 30 s, with no shutdown ever asked for).
    async fn run_until_it_stops<S>(
        wrap: impl FnOnce(Incoming) -> S + Send + 'static,
        fail: impl FnOnce(),
    ) -> anyhow::Result<()>
    where
        S: futures::Stream<Item = std::io::Result<venom_tls::listen::Conn>> + Send + 'static,
    {
        let dir = tempfile::tempdir().expect("tempdir");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let config = CoordinatorConfig::single_node(addr, dir.path().join("coordinator"));
        let coordinator = tokio::spawn(run_with_incoming(
            config,
            listener,
            wrap,
            std::future::pending(),
        ));
        wait_leader(addr).await;
        // A stream stays open, as a worker's does (no worker runs this wave): the server
        // cannot return while it lasts, and the coordinator must not wait for that.
        let mut client = connect(addr).await.expect("connect");
        let submitted = client
            .submit_wave(pb::SubmitWaveRequest {
                spec: b"name = \"w\"\n[[task]]\nid = \"t\"\nrun = \"true\"\n".to_vec(),
                format: "toml".into(),
                traceparent: String::new(),
                submission_id: String::new(),
            })
            .await
            .expect("submit")
            .into_inner();
        let mut watch = client
            .watch_wave(pb::WatchWaveRequest {
                wave_id: submitted.wave_id,
            })
            .await
            .expect("watch")
            .into_inner();
        watch.message().await.expect("a first progress event");
        fail();
        let ended = tokio::time::timeout(Duration::from_secs(30), coordinator).await;
        drop(watch);
        ended
            .expect("the coordinator lingered after its gRPC server stopped")
            .expect("the coordinator task panicked")
    }

    #[tokio::test]
    async fn a_listener_that_stops_ends_run_with_an_error() {
        let (close, closed) = tokio::sync::oneshot::channel::<()>();
        let result = run_until_it_stops(
            move |incoming| incoming.take_until(closed),
            move || {
                let _ = close.send(());
            },
        )
        .await;
        let err = result.expect_err("a coordinator whose listener stopped must fail");
        let text = format!("{err:#}");
        assert!(
            text.contains("the listener stopped accepting connections"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn a_listener_error_ends_run_with_an_error() {
        // The listener handles accept errors itself; one in its stream means it failed.
        let (fail, failed) = tokio::sync::oneshot::channel::<()>();
        let error = futures::stream::once(async move {
            let _ = failed.await;
            Err(std::io::Error::from_raw_os_error(libc_emfile()))
        });
        let result = run_until_it_stops(
            move |incoming| futures::stream::select(incoming, error),
            move || {
                let _ = fail.send(());
            },
        )
        .await;
        let err = result.expect_err("a coordinator whose listener failed must fail");
        let text = format!("{err:#}");
        let emfile = std::io::Error::from_raw_os_error(libc_emfile()).to_string();
        assert!(
            text.contains(&format!("the listener failed: {emfile}")),
            "{text}"
        );
    }

    /// EMFILE ("too many open files") on Linux and the BSDs alike.
    fn libc_emfile() -> i32 {
        24
    }
}
