//! How raft messages travel between coordinators.
//!
//! The replica only sees the [`Transport`] trait: the gRPC implementation sends batches
//! to each peer's `RaftService` from one task per peer (so a slow peer never blocks the
//! replica), reconnecting as needed; tests can supply a simulated network instead.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use protobuf::Message as _;
use raft::eraftpb::{Message as RaftMessage, MessageType};
use tokio::sync::mpsc;
use venom_proto::v1 as pb;
use venom_proto::v1::raft_service_client::RaftServiceClient;

/// Batches queued for one peer before new ones are dropped (raft resends what is lost).
const PEER_QUEUE_BATCHES: usize = 1_024;
/// How long connecting to a peer may take.
const PEER_CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// How long one batch to a peer may take.
const PEER_RPC_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a batch of raft messages from a peer is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("node {from} belongs to another cluster ({theirs:x}, this one is {ours:x})")]
    OtherCluster { from: u64, theirs: u64, ours: u64 },
    #[error("node {from} is not a member")]
    NotMember { from: u64 },
    #[error("undecodable raft message: {0}")]
    Undecodable(String),
    #[error("raft message `from` does not match the batch")]
    SenderMismatch,
}

/// A batch this coordinator takes: its messages, and the route back to a sender outside
/// the membership (a leader added since the last change applied here) to remember.
#[derive(Debug)]
pub struct Admitted {
    pub messages: Vec<RaftMessage>,
    pub learn: Option<(u64, String)>,
}

/// Who a coordinator listens to: batches from members; from a coordinator outside its
/// applied membership only leader traffic (appends, heartbeats, snapshots), since this
/// coordinator may be behind and must catch up from a leader added since; never anything
/// from another cluster (`cluster_id` 0 on either side means not yet known) and never
/// undecodable messages or messages whose sender differs from the batch's.
pub fn admit(
    batch: &pb::RaftBatch,
    cluster_id: u64,
    members: &BTreeMap<u64, String>,
) -> Result<Admitted, Refusal> {
    if batch.cluster_id != 0 && cluster_id != 0 && batch.cluster_id != cluster_id {
        return Err(Refusal::OtherCluster {
            from: batch.from,
            theirs: batch.cluster_id,
            ours: cluster_id,
        });
    }
    let stranger = !members.contains_key(&batch.from);
    if stranger && batch.from_address.is_empty() {
        return Err(Refusal::NotMember { from: batch.from });
    }
    let mut messages = Vec::with_capacity(batch.messages.len());
    for bytes in &batch.messages {
        let mut m = RaftMessage::default();
        m.merge_from_bytes(bytes)
            .map_err(|e| Refusal::Undecodable(e.to_string()))?;
        if m.from != batch.from {
            return Err(Refusal::SenderMismatch);
        }
        messages.push(m);
    }
    if !stranger {
        return Ok(Admitted {
            messages,
            learn: None,
        });
    }
    let leader_traffic = messages.iter().all(|m| {
        matches!(
            m.get_msg_type(),
            MessageType::MsgAppend | MessageType::MsgHeartbeat | MessageType::MsgSnapshot
        )
    });
    if !leader_traffic {
        return Err(Refusal::NotMember { from: batch.from });
    }
    Ok(Admitted {
        messages,
        learn: Some((batch.from, batch.from_address.clone())),
    })
}

/// Delivers raft messages to peers. Must not block.
pub trait Transport: Send {
    fn send(&mut self, messages: Vec<RaftMessage>);

    /// The membership changed: `members` (id → address, this replica included) is who
    /// messages may be sent to from now on.
    fn set_members(&mut self, _members: &BTreeMap<u64, String>) {}

    /// The cluster's identity, sent with every batch (0: not known yet).
    fn set_cluster_id(&mut self, _cluster_id: u64) {}

    /// Peers a snapshot could not be delivered to since the last call (the replica tells
    /// raft, which sends another once the peer answers again).
    fn failed_snapshots(&mut self) -> Vec<u64> {
        Vec::new()
    }
}

/// Addresses of coordinators that are not (yet) in this one's applied membership, learned
/// from their raft batches: a coordinator behind on the membership changes answers a
/// leader added since through them, and so catches up.
#[derive(Debug, Clone, Default)]
pub struct Routes(Arc<Mutex<BTreeMap<u64, String>>>);

impl Routes {
    pub fn learn(&self, id: u64, address: String) {
        if let Ok(mut routes) = self.0.lock() {
            routes.insert(id, address);
        }
    }

    fn get(&self, id: u64) -> Option<String> {
        self.0.lock().ok()?.get(&id).cloned()
    }
}

/// Raft over gRPC: one bounded queue and one sender task per peer. A peer's task ends
/// when its queue is dropped (the peer left, or its address changed).
#[derive(Debug)]
pub struct GrpcTransport {
    from: u64,
    /// This coordinator's address, sent with every batch.
    own_address: String,
    peers: BTreeMap<u64, (String, mpsc::Sender<Vec<RaftMessage>>)>,
    /// Routes to senders outside the membership (filled by the raft service).
    routes: Routes,
    /// The cluster's identity, read by the sender tasks for every batch.
    cluster_id: Arc<AtomicU64>,
    /// Peers whose snapshot was lost on the way, filled by the sender tasks.
    failed_snapshots: Arc<Mutex<BTreeSet<u64>>>,
    /// How peers are reached (mutual TLS with this member's certificate, or plaintext).
    dialer: venom_tls::Dialer,
}

impl GrpcTransport {
    /// Starts a sender task for every peer except `from`.
    pub fn start(from: u64, members: &BTreeMap<u64, String>, dialer: venom_tls::Dialer) -> Self {
        let mut transport = Self {
            dialer,
            from,
            own_address: members.get(&from).cloned().unwrap_or_default(),
            peers: BTreeMap::new(),
            routes: Routes::default(),
            cluster_id: Arc::default(),
            failed_snapshots: Arc::default(),
        };
        transport.set_members(members);
        transport
    }

    /// Where the raft service records the senders it does not know.
    pub fn routes(&self) -> Routes {
        self.routes.clone()
    }

    fn spawn_peer(&mut self, id: u64, addr: String) {
        let (tx, rx) = mpsc::channel(PEER_QUEUE_BATCHES);
        let sender = Sender {
            from: self.from,
            from_address: self.own_address.clone(),
            cluster_id: self.cluster_id.clone(),
            failed_snapshots: self.failed_snapshots.clone(),
            dialer: self.dialer.clone(),
        };
        tokio::spawn(peer_sender(sender, id, addr.clone(), rx));
        self.peers.insert(id, (addr, tx));
    }
}

impl Transport for GrpcTransport {
    fn set_cluster_id(&mut self, cluster_id: u64) {
        self.cluster_id.store(cluster_id, Ordering::Relaxed);
    }

    fn set_members(&mut self, members: &BTreeMap<u64, String>) {
        if let Some(own) = members.get(&self.from) {
            self.own_address.clone_from(own);
        }
        self.peers
            .retain(|id, (addr, _)| members.get(id).is_some_and(|a| a == addr));
        for (&id, addr) in members {
            if id == self.from || self.peers.contains_key(&id) {
                continue;
            }
            self.spawn_peer(id, addr.clone());
        }
    }

    fn failed_snapshots(&mut self) -> Vec<u64> {
        match self.failed_snapshots.lock() {
            Ok(mut failed) => std::mem::take(&mut *failed).into_iter().collect(),
            Err(_) => Vec::new(),
        }
    }

    fn send(&mut self, messages: Vec<RaftMessage>) {
        let mut by_peer: BTreeMap<u64, Vec<RaftMessage>> = BTreeMap::new();
        for m in messages {
            by_peer.entry(m.to).or_default().push(m);
        }
        for (to, batch) in by_peer {
            if !self.peers.contains_key(&to) && to != self.from {
                if let Some(addr) = self.routes.get(to) {
                    self.spawn_peer(to, addr);
                }
            }
            match self.peers.get(&to) {
                // Raft retries lost messages, so a full queue may drop.
                Some((_, tx)) => {
                    if let Err(e) = tx.try_send(batch) {
                        let batch = match e {
                            mpsc::error::TrySendError::Full(b)
                            | mpsc::error::TrySendError::Closed(b) => b,
                        };
                        if has_snapshot(&batch) {
                            self.note_failed_snapshot(to);
                        }
                    }
                }
                None => tracing::warn!(from = self.from, to, "raft message for unknown peer"),
            }
        }
    }
}

impl GrpcTransport {
    fn note_failed_snapshot(&self, to: u64) {
        if let Ok(mut failed) = self.failed_snapshots.lock() {
            failed.insert(to);
        }
    }
}

fn has_snapshot(batch: &[RaftMessage]) -> bool {
    batch
        .iter()
        .any(|m| m.get_msg_type() == MessageType::MsgSnapshot)
}

/// What every peer's sender task shares: who sends, and how peers are reached.
struct Sender {
    from: u64,
    /// This coordinator's address, sent with every batch.
    from_address: String,
    cluster_id: Arc<AtomicU64>,
    failed_snapshots: Arc<Mutex<BTreeSet<u64>>>,
    dialer: venom_tls::Dialer,
}

async fn peer_sender(
    sender: Sender,
    to: u64,
    addr: String,
    mut rx: mpsc::Receiver<Vec<RaftMessage>>,
) {
    let Sender {
        from,
        from_address,
        cluster_id,
        failed_snapshots,
        dialer,
    } = sender;
    let note_failure = |batch: &[RaftMessage]| {
        if has_snapshot(batch) {
            tracing::debug!(to, "snapshot not delivered");
            if let Ok(mut failed) = failed_snapshots.lock() {
                failed.insert(to);
            }
        }
    };
    let mut client: Option<RaftServiceClient<tonic::transport::Channel>> = None;
    while let Some(mut batch) = rx.recv().await {
        while let Ok(more) = rx.try_recv() {
            batch.extend(more);
        }
        if client.is_none() {
            let endpoint = match dialer.endpoint(&addr) {
                Ok(endpoint) => endpoint,
                Err(e) => {
                    tracing::error!(to, error = %e, "cannot reach this peer");
                    return;
                }
            };
            let endpoint = endpoint
                .tcp_nodelay(true)
                .connect_timeout(PEER_CONNECT_TIMEOUT)
                .timeout(PEER_RPC_TIMEOUT);
            client = endpoint.connect().await.ok().map(RaftServiceClient::new);
        }
        let Some(c) = client.as_mut() else {
            note_failure(&batch);
            continue;
        };
        let messages = batch
            .iter()
            .filter_map(|m| m.write_to_bytes().ok())
            .collect();
        let batch_out = pb::RaftBatch {
            from,
            messages,
            from_address: from_address.clone(),
            cluster_id: cluster_id.load(Ordering::Relaxed),
        };
        if c.send(batch_out).await.is_err() {
            note_failure(&batch);
            client = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(from: u64, cluster_id: u64, address: &str, types: &[MessageType]) -> pb::RaftBatch {
        pb::RaftBatch {
            from,
            messages: types
                .iter()
                .map(|&t| {
                    let mut m = RaftMessage::default();
                    m.set_msg_type(t);
                    m.from = from;
                    m.write_to_bytes().expect("encodes")
                })
                .collect(),
            from_address: address.to_string(),
            cluster_id,
        }
    }

    fn members() -> BTreeMap<u64, String> {
        BTreeMap::from([(1, "http://a:1".into()), (2, "http://b:2".into())])
    }

    #[test]
    fn members_are_heard() {
        let admitted = admit(
            &batch(2, 7, "", &[MessageType::MsgRequestVote]),
            7,
            &members(),
        )
        .expect("admitted");
        assert_eq!(admitted.messages.len(), 1);
        assert_eq!(admitted.learn, None);
        // Either side not knowing the cluster id yet is no reason to refuse.
        assert!(admit(&batch(2, 0, "", &[MessageType::MsgAppend]), 7, &members()).is_ok());
        assert!(admit(&batch(2, 7, "", &[MessageType::MsgAppend]), 0, &members()).is_ok());
    }

    #[test]
    fn another_cluster_is_refused() {
        assert_eq!(
            admit(&batch(2, 8, "", &[MessageType::MsgAppend]), 7, &members()).err(),
            Some(Refusal::OtherCluster {
                from: 2,
                theirs: 8,
                ours: 7
            })
        );
    }

    #[test]
    fn strangers_are_heard_only_as_a_leader_that_says_where_it_is() {
        let append = [MessageType::MsgAppend, MessageType::MsgHeartbeat];
        let admitted = admit(&batch(9, 7, "http://c:3", &append), 7, &members()).expect("leader");
        assert_eq!(admitted.learn, Some((9, "http://c:3".to_string())));
        assert_eq!(
            admit(&batch(9, 7, "", &append), 7, &members()).err(),
            Some(Refusal::NotMember { from: 9 })
        );
        // A removed coordinator asking for votes is not heard.
        assert_eq!(
            admit(
                &batch(9, 7, "http://c:3", &[MessageType::MsgRequestVote]),
                7,
                &members()
            )
            .err(),
            Some(Refusal::NotMember { from: 9 })
        );
    }

    #[test]
    fn garbage_and_forged_senders_are_refused() {
        let mut garbage = batch(2, 7, "", &[]);
        garbage.messages.push(vec![0xff, 0xff, 0xff]);
        assert!(matches!(
            admit(&garbage, 7, &members()),
            Err(Refusal::Undecodable(_))
        ));
        let mut forged = batch(2, 7, "", &[MessageType::MsgAppend]);
        forged.from = 1;
        assert_eq!(
            admit(&forged, 7, &members()).err(),
            Some(Refusal::SenderMismatch)
        );
    }
}
