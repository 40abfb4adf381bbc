//! Venom's coordinator: a raft-replicated state machine of waves, micro-tasks and
//! nodes persisted in sled, a pure scheduler, the Möbius model, and the gRPC services
//! for clients, workers and raft peers — all served on one port.

pub mod config;
pub mod convert;
pub mod metrics;
pub mod mobius;
pub mod replica;
pub mod scheduler;
pub mod server;
pub mod state;
pub mod storage;
pub mod transport;
pub mod wave;

#[cfg(test)]
mod sim;

pub use config::CoordinatorConfig;

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_stream::wrappers::TcpListenerStream;
use venom_proto::v1::client_service_server::ClientServiceServer;
use venom_proto::v1::raft_service_server::RaftServiceServer;
use venom_proto::v1::worker_service_server::WorkerServiceServer;

use crate::replica::ReplicaConfig;
use crate::state::State;
use crate::storage::Store;
use crate::transport::GrpcTransport;
use crate::wave::WaveLimits;

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
        members.insert(pid, transport::peer_url(addr));
    }
    members.entry(id).or_insert_with(|| own_addr.to_string());
    Ok(members)
}

/// Binds the configured listen address.
pub async fn bind(config: &CoordinatorConfig) -> anyhow::Result<TcpListener> {
    TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))
}

/// Runs a coordinator serving on `listener` until `shutdown` resolves.
pub async fn run(
    config: CoordinatorConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    anyhow::ensure!(config.id >= 1, "--id must be at least 1");
    let local = listener.local_addr().context("listener address")?;
    let data_dir = config.data_dir();
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("cannot create data dir {}", data_dir.display()))?;
    let store = Store::open(&data_dir)
        .with_context(|| format!("cannot open sled database in {}", data_dir.display()))?;
    let members = parse_members(config.id, &format!("http://{local}"), &config.peers)?;
    let limits = WaveLimits {
        max_spec_bytes: config.max_spec_bytes,
        max_micro_tasks: config.max_micro_tasks,
        ..WaveLimits::default()
    };
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = shutdown_tx.send(true);
    });
    // Peers come and go with membership changes, so even a group of one has a transport.
    let transport = GrpcTransport::start(config.id, &members);
    let routes = transport.routes();
    let replica_config = ReplicaConfig {
        id: config.id,
        members,
        join: config.join,
        election_ticks: (10, 20),
        tick: Duration::from_millis(config.tick_ms.max(1)),
        heartbeat_ttl_ms: config.heartbeat_ttl_ms,
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
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(venom_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("reflection service")?;
    let reflection_alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(venom_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .context("reflection service")?;

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
    };
    let router = tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .add_service(health_service)
        .add_service(reflection)
        .add_service(reflection_alpha)
        .add_service(
            ClientServiceServer::new(client_api)
                .max_decoding_message_size(max)
                .max_encoding_message_size(max),
        )
        .add_service(
            WorkerServiceServer::new(server::WorkerApi {
                handle: handle.clone(),
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
    tracing::info!(addr = %local, id = config.id, data_dir = %data_dir.display(), "coordinator serving");
    let mut server_shutdown = shutdown_rx.clone();
    // `Server::tcp_nodelay` only covers listeners tonic binds itself; set it on every
    // accepted socket here (delayed ACKs would otherwise cost ~40 ms per dependency link).
    let incoming = tokio_stream::StreamExt::map(TcpListenerStream::new(listener), |conn| {
        conn.inspect(|s| {
            let _ = s.set_nodelay(true);
        })
    });
    let server = tokio::spawn(router.serve_with_incoming_shutdown(incoming, async move {
        let _ = server_shutdown.wait_for(|s| *s).await;
    }));
    drop(handle);
    let replica_result = replica_task.await.context("replica task panicked")?;
    // Long-lived worker streams end with the replica; give connections a moment to close.
    match tokio::time::timeout(Duration::from_secs(3), server).await {
        Ok(Ok(Err(e))) => tracing::warn!(error = %e, "gRPC server error"),
        Ok(_) => {}
        Err(_) => tracing::info!("gRPC server did not drain in 3 s; closing"),
    }
    replica_result.context("raft replica failed")?;
    Ok(())
}
