//! How raft messages travel between coordinators.
//!
//! The replica only sees the [`Transport`] trait: the gRPC implementation sends batches
//! to each peer's `RaftService` from one task per peer (so a slow peer never blocks the
//! replica), reconnecting as needed; tests can supply a simulated network instead.

use std::collections::BTreeMap;
use std::time::Duration;

use protobuf::Message as _;
use raft::eraftpb::Message as RaftMessage;
use tokio::sync::mpsc;
use venom_proto::v1 as pb;
use venom_proto::v1::raft_service_client::RaftServiceClient;

/// Delivers raft messages to peers. Must not block.
pub trait Transport: Send {
    fn send(&mut self, messages: Vec<RaftMessage>);

    /// The membership changed: `members` (id → address, this replica included) is who
    /// messages may be sent to from now on.
    fn set_members(&mut self, _members: &BTreeMap<u64, String>) {}
}

/// Raft over gRPC: one bounded queue and one sender task per peer. A peer's task ends
/// when its queue is dropped (the peer left, or its address changed).
#[derive(Debug)]
pub struct GrpcTransport {
    from: u64,
    peers: BTreeMap<u64, (String, mpsc::Sender<Vec<RaftMessage>>)>,
}

impl GrpcTransport {
    /// Starts a sender task for every peer except `from`.
    pub fn start(from: u64, members: &BTreeMap<u64, String>) -> Self {
        let mut transport = Self {
            from,
            peers: BTreeMap::new(),
        };
        transport.set_members(members);
        transport
    }
}

impl Transport for GrpcTransport {
    fn set_members(&mut self, members: &BTreeMap<u64, String>) {
        self.peers
            .retain(|id, (addr, _)| members.get(id).is_some_and(|a| a == addr));
        for (&id, addr) in members {
            if id == self.from || self.peers.contains_key(&id) {
                continue;
            }
            let (tx, rx) = mpsc::channel(1_024);
            tokio::spawn(peer_sender(self.from, id, addr.clone(), rx));
            self.peers.insert(id, (addr.clone(), tx));
        }
    }

    fn send(&mut self, messages: Vec<RaftMessage>) {
        let mut by_peer: BTreeMap<u64, Vec<RaftMessage>> = BTreeMap::new();
        for m in messages {
            by_peer.entry(m.to).or_default().push(m);
        }
        for (to, batch) in by_peer {
            match self.peers.get(&to) {
                // Raft retries lost messages, so a full queue may drop.
                Some((_, tx)) => {
                    let _ = tx.try_send(batch);
                }
                None => tracing::warn!(from = self.from, to, "raft message for unknown peer"),
            }
        }
    }
}

async fn peer_sender(from: u64, to: u64, addr: String, mut rx: mpsc::Receiver<Vec<RaftMessage>>) {
    let url = if addr.starts_with("http") {
        addr
    } else {
        format!("http://{addr}")
    };
    let mut client: Option<RaftServiceClient<tonic::transport::Channel>> = None;
    while let Some(mut batch) = rx.recv().await {
        while let Ok(more) = rx.try_recv() {
            batch.extend(more);
        }
        if client.is_none() {
            let Ok(endpoint) = tonic::transport::Endpoint::from_shared(url.clone()) else {
                tracing::error!(to, url, "bad peer address");
                return;
            };
            let endpoint = endpoint
                .tcp_nodelay(true)
                .connect_timeout(Duration::from_millis(500))
                .timeout(Duration::from_secs(5));
            client = endpoint.connect().await.ok().map(RaftServiceClient::new);
        }
        let Some(c) = client.as_mut() else { continue };
        let messages = batch
            .iter()
            .filter_map(|m| m.write_to_bytes().ok())
            .collect();
        if c.send(pb::RaftBatch { from, messages }).await.is_err() {
            client = None;
        }
    }
}
