//! The raft replica: one tokio task owns the raft-rs `RawNode`, the sled [`Store`] and
//! the connections to workers, and consumes a closed set of [`Event`]s.
//!
//! Each loop turn: take every event already waiting (so many proposals share one raft
//! entry and one fsync — group commit), tick if due, run `on_ready` in raft-rs's order
//! (send → apply snapshot → apply committed → append → persist hard state → fsync →
//! send persisted messages → advance → apply light-ready commits → advance_apply), then,
//! on the leader, run the pure scheduler and propose its plan. Scheduling is driven by
//! events — a result arriving dispatches its dependents in the same turn — plus the
//! tick for heartbeat expiry.
//!
//! Between turns the applied state is checkpointed to sled, and the log is compacted up to
//! (never past) the checkpoint; a follower that needs a compacted entry receives a snapshot
//! of the checkpoint and installs it in `on_ready`.
//!
//! Proposals carry a reply channel; lost leadership or shutdown fails them at once, so
//! callers never hang.
//!
//! The loop, raft's `Ready` handling and apply live here; the rest along its seams:
//! [`handle`] (what the gRPC handlers hold and send), [`membership`] (conf changes, roles,
//! started members), [`persistence`] (checkpoints, compaction, snapshots) and [`dispatch`]
//! (scheduling rounds, effects to workers, their trace spans).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use protobuf::Message as _;
use raft::eraftpb::{ConfChange, ConfChangeType, Entry, EntryType, Message as RaftMessage};
use raft::{ProgressState, RawNode, SnapshotStatus, StateRole};
use thiserror::Error;
use tokio::sync::{mpsc, oneshot, watch};
use venom_proto::v1 as pb;

use crate::convert;
use crate::datadir::DataDirError;
use crate::metrics::Metrics;
use crate::scheduler::{self, SchedulerConfig};
use crate::state::{Command, NodeState, Observation, Outcome, State};
use crate::storage::{Store, StoreError, BOOTSTRAP_INDEX};
use crate::transport::Transport;

mod dispatch;
mod handle;
mod membership;
mod persistence;

use dispatch::schedule_time_ms;
use handle::Reply;
pub use handle::{now_ms, Clock, Event, Handle, ProposeError, RaftStatus, Shared, SystemClock};
use membership::step_down_if_removed;
pub use membership::MemberChange;
use persistence::blocking;

/// Replica settings.
#[derive(Debug, Clone)]
pub struct ReplicaConfig {
    pub id: u64,
    /// The founding members (a new data dir is bootstrapped with them), or, when `join`
    /// is set, the addresses of the cluster this coordinator is being added to.
    pub members: BTreeMap<u64, String>,
    /// Start empty and wait for the leader's snapshot (the coordinator was added with
    /// `venomctl cluster add`) instead of bootstrapping a new cluster.
    pub join: bool,
    /// Found a new cluster of `members` when the store is empty. Without it (or `join`),
    /// an empty store is an error: a coordinator never creates a cluster on its own.
    pub bootstrap: bool,
    /// Election timeout range in ticks, `[min, max)`: raft picks a random timeout in it
    /// after each election. The simulated cluster uses a one-tick range so runs repeat.
    pub election_ticks: (usize, usize),
    pub tick: Duration,
    /// How long a worker's lease lasts (`--worker-lease-ms`).
    pub worker_lease_ms: u64,
    /// Largest raft entry a group commit builds, in bytes (approximate).
    pub max_entry_bytes: usize,
    /// Compact the log once it holds more than this many entries at or below the
    /// checkpoint's applied index.
    pub compact_after_entries: u64,
}

/// Failures that stop the replica.
#[derive(Debug, Error)]
pub enum ReplicaError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0} holds no cluster state and neither bootstrap nor join was asked for")]
    Uninitialized(std::path::PathBuf),
    #[error(transparent)]
    DataDir(#[from] DataDirError),
    #[error("raft: {0}")]
    Raft(#[from] raft::Error),
}

struct Pending {
    replies: Vec<Option<Reply>>,
}

pub(crate) struct Replica<T: Transport> {
    raw: RawNode<Store>,
    store: Store,
    shared: Arc<Shared>,
    transport: T,
    config: ReplicaConfig,
    /// Current members' addresses (the replicated membership; before a joining replica
    /// receives its first snapshot, the addresses it was started with).
    members: BTreeMap<u64, String>,
    /// The replicated cluster identity as last handed to the transport.
    cluster_id: u64,
    /// Random per-boot prefix of proposal contexts, so ids never match entries of an
    /// earlier life of this replica.
    boot_nonce: u64,
    next_proposal: u64,
    pending: HashMap<u64, Pending>,
    queued: Vec<(Command, Option<Reply>)>,
    queued_bytes: usize,
    workers: HashMap<String, (u64, mpsc::Sender<pb::CoordinatorMessage>)>,
    /// Worker streams whose own registration is not applied yet: node → (stream, the
    /// lowest proposal id that registration can have). Nothing is sent on such a stream:
    /// the registration lists what the worker runs as of when it sent it, so an assignment
    /// applied before it would reach the worker after it and be returned to ready by it
    /// all the same — and then run twice.
    registering: HashMap<String, (u64, u64)>,
    was_leader: bool,
    /// When this leader granted each worker's lease.
    leases: crate::leases::Leases,
    applied: u64,
    /// The applied index last written to sled with the state it covers.
    persisted_applied: u64,
    clock: Arc<dyn Clock>,
    last_persist_us: u64,
    /// Loop turns and fsyncs so far (for the debug log of group-commit efficiency).
    n_turns: u64,
    n_flushes: u64,
    last_flush_us: u64,
    /// Followers the leader is sending a snapshot to, and since when (see
    /// `retry_lost_snapshots`).
    snapshot_since_us: BTreeMap<u64, u64>,
    /// ReadIndex requests sent to raft, by request id.
    reads_sent: HashMap<u64, oneshot::Sender<Result<(), ProposeError>>>,
    /// Reads whose index is known, waiting for `applied` to reach it.
    reads_waiting: Vec<(u64, oneshot::Sender<Result<(), ProposeError>>)>,
    /// Members this leader has proposed as started (see `propose_members_started`).
    started_proposed: BTreeSet<u64>,
    /// Set when a peer's message shows that this member lost acknowledged entries; the
    /// next turn stops the replica with it.
    lost_data: Option<DataDirError>,
    /// Followers (and the term) this leader has warned about for losing acknowledged
    /// entries (see `follower_lost_acknowledged`).
    lost_data_warned: BTreeSet<(u64, u64)>,
    /// Every applied entry as (index, term, hash of its data), when a test asks for it
    /// (the simulated cluster's checker compares these across replicas).
    #[cfg(test)]
    pub(crate) applied_trace: Option<Vec<(u64, u64, u64)>>,
}

/// Longest a group commit is held back to gather more results (see `should_pace`).
const COMMIT_PACE_US: u64 = 2_000;

/// Events (proposals, raft batches, worker streams) queued for the replica task; senders
/// wait when it is full.
const EVENT_QUEUE: usize = 16_384;

/// Restores state from `store` and spawns the replica task on the wall clock.
pub fn start<T: Transport + 'static>(
    config: ReplicaConfig,
    store: Store,
    state: State,
    transport: T,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(Handle, tokio::task::JoinHandle<Result<(), ReplicaError>>), ReplicaError> {
    let boot_nonce = now_ms() ^ u64::from(std::process::id()).rotate_left(40);
    let replica = Replica::new(
        config,
        store,
        state,
        transport,
        Arc::new(SystemClock),
        boot_nonce,
    )?;
    let shared = replica.shared.clone();
    let (tx, rx) = mpsc::channel(EVENT_QUEUE);
    let task = tokio::spawn(replica.run(rx, shutdown));
    Ok((Handle { tx, shared }, task))
}

impl<T: Transport> Replica<T> {
    /// Opens raft on `store` (an empty one is bootstrapped with `config.members`, or left
    /// empty for the leader's snapshot when joining) with the state checkpointed there.
    /// `boot_nonce` must differ between lives of the same replica (it tells this life's
    /// proposals from an earlier one's).
    pub(crate) fn new(
        config: ReplicaConfig,
        store: Store,
        mut state: State,
        mut transport: T,
        clock: Arc<dyn Clock>,
        boot_nonce: u64,
    ) -> Result<Self, ReplicaError> {
        if store.is_new()? {
            let founders = if config.join {
                BTreeMap::new()
            } else if config.bootstrap {
                config.members.clone()
            } else {
                return Err(ReplicaError::Uninitialized(store.dir().to_path_buf()));
            };
            store.bootstrap(&founders, config.id)?;
        }
        let applied = store.load_state(&mut state)?;
        let recorded = crate::datadir::read_identity(store.dir())
            .ok()
            .flatten()
            .map(|identity| identity.cluster_id);
        if state.cluster_id != 0 && recorded != Some(state.cluster_id) {
            // The identity file was not updated before a crash.
            store.record_cluster_id(config.id, state.cluster_id)?;
        }
        let raft_config = raft::Config {
            id: config.id,
            election_tick: 10,
            heartbeat_tick: 2,
            min_election_tick: config.election_ticks.0,
            max_election_tick: config.election_ticks.1,
            applied,
            max_size_per_msg: 4 << 20,
            max_inflight_msgs: 256,
            check_quorum: true,
            pre_vote: true,
            ..raft::Config::default()
        };
        raft_config.validate()?;
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let mut raw = RawNode::new(&raft_config, store.clone(), &logger)?;
        if state.members.len() == 1 && state.members.contains_key(&config.id) {
            // A group of one needs no election timeout.
            raw.campaign()?;
        }
        let members = if state.members.is_empty() {
            config.members.clone()
        } else {
            state.members.clone()
        };
        transport.set_members(&members);
        let cluster_id = state.cluster_id;
        transport.set_cluster_id(cluster_id);
        let (applied_tx, _) = watch::channel(applied);
        let shared = Arc::new(Shared {
            state: RwLock::new(state),
            status: RwLock::new(RaftStatus {
                id: config.id,
                members: members.clone(),
                applied,
                ..RaftStatus::default()
            }),
            applied: applied_tx,
            metrics: Metrics::new(),
        });
        let now_us = clock.now_us();
        Ok(Self {
            raw,
            store,
            shared,
            transport,
            members,
            cluster_id,
            boot_nonce,
            next_proposal: 1,
            pending: HashMap::new(),
            queued: Vec::new(),
            queued_bytes: 0,
            workers: HashMap::new(),
            registering: HashMap::new(),
            was_leader: false,
            leases: crate::leases::Leases::new(config.worker_lease_ms),
            applied,
            persisted_applied: applied,
            clock,
            last_persist_us: now_us,
            n_turns: 0,
            n_flushes: 0,
            last_flush_us: now_us,
            snapshot_since_us: BTreeMap::new(),
            reads_sent: HashMap::new(),
            reads_waiting: Vec::new(),
            started_proposed: BTreeSet::new(),
            lost_data: None,
            lost_data_warned: BTreeSet::new(),
            #[cfg(test)]
            applied_trace: None,
            config,
        })
    }

    /// Runs the loop until shutdown or a failure. After a storage failure (a write or sync
    /// the disk refused) the database is never touched again: a sync that failed may have
    /// lost the pages it was writing, so nothing may be acknowledged on top of them, and
    /// sled's own drop would sync once more (and panic on the same error). The process
    /// ends with the error; a restart recovers from what the disk kept.
    async fn run(
        self,
        rx: mpsc::Receiver<Event>,
        shutdown: impl std::future::Future<Output = ()> + Send,
    ) -> Result<(), ReplicaError> {
        let store = self.store.clone();
        let result = self.run_loop(rx, shutdown).await;
        match &result {
            Err(ReplicaError::Store(e)) => {
                tracing::error!(error = %e, "storage failed; stopping without touching it again");
                std::mem::forget(store);
            }
            _ => drop(store),
        }
        result
    }

    async fn run_loop(
        mut self,
        mut rx: mpsc::Receiver<Event>,
        shutdown: impl std::future::Future<Output = ()> + Send,
    ) -> Result<(), ReplicaError> {
        let mut ticker = tokio::time::interval(self.config.tick);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(shutdown);
        loop {
            let mut tick_due = false;
            tokio::select! {
                () = &mut shutdown => break,
                event = rx.recv() => {
                    let Some(event) = event else { break };
                    self.handle(event);
                    // Group commit: take whatever else is already waiting.
                    let mut n = 0;
                    while n < 8_192 {
                        match rx.try_recv() {
                            Ok(event) => self.handle(event),
                            Err(_) => break,
                        }
                        n += 1;
                    }
                }
                _ = ticker.tick() => tick_due = true,
            }
            if self.should_pace() {
                // Every busy worker has queued work, so nobody waits on this commit:
                // gather more events so one fsync covers them all.
                let wait_us = (self.last_flush_us + COMMIT_PACE_US)
                    .saturating_sub(self.clock.now_us())
                    .min(COMMIT_PACE_US);
                let deadline = tokio::time::Instant::now() + Duration::from_micros(wait_us);
                loop {
                    tokio::select! {
                        event = rx.recv() => match event {
                            Some(event) => self.handle(event),
                            None => break,
                        },
                        () = tokio::time::sleep_until(deadline) => break,
                    }
                }
            }
            self.turn(tick_due)?;
        }
        tracing::debug!(
            turns = self.n_turns,
            flushes = self.n_flushes,
            applied = self.applied,
            "replica stopped"
        );
        self.fail_pending(ProposeError::Stopped);
        self.checkpoint(true)?;
        blocking(|| self.store.flush())?;
        Ok(())
    }

    /// The state and status this replica publishes (read by the simulated cluster's checker).
    #[cfg(test)]
    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// The raft node (its role and term, for the simulated cluster's checker).
    #[cfg(test)]
    pub(crate) fn raft(&self) -> &RawNode<Store> {
        &self.raw
    }

    /// One loop turn after the events have been handled: tick if due, checkpoint,
    /// propose what is queued, process raft's `Ready`, and (on the leader, on a tick) run
    /// the time-driven scheduling. The simulated cluster drives replicas through this.
    pub(crate) fn turn(&mut self, tick_due: bool) -> Result<(), ReplicaError> {
        if let Some(lost) = self.lost_data.take() {
            return Err(lost.into());
        }
        if tick_due {
            self.raw.tick();
        }
        let snapshot_wanted = self.store.take_snapshot_wanted();
        self.checkpoint(snapshot_wanted)?;
        self.propose_queued();
        self.on_ready()?;
        self.track_role();
        for peer in self.transport.failed_snapshots() {
            if self.raw.raft.state == StateRole::Leader {
                self.raw.report_snapshot(peer, SnapshotStatus::Failure);
                self.snapshot_since_us.remove(&peer);
            }
        }
        if tick_due && self.raw.raft.state == StateRole::Leader {
            // Heartbeat expiry and anything else time alone changes.
            self.schedule_if_needed();
            self.propose_members_started();
            self.retry_lost_snapshots();
            self.on_ready()?;
        }
        self.publish_status();
        self.n_turns += 1;
        Ok(())
    }

    /// Whether to hold the queued commands back a little for a bigger group commit:
    /// only when no client waits for an answer, the last fsync was moments ago, and
    /// every node with work has more assigned than it can run (its queue hides the wait).
    fn should_pace(&self) -> bool {
        if self.queued.is_empty()
            || self.queued.iter().any(|(_, reply)| reply.is_some())
            || self.clock.now_us().saturating_sub(self.last_flush_us) >= COMMIT_PACE_US
            || self.raw.raft.state != StateRole::Leader
        {
            return false;
        }
        let Ok(state) = self.shared.state.read() else {
            return false;
        };
        let mut busy = state
            .nodes
            .values()
            .filter(|n| !n.active.is_empty())
            .peekable();
        busy.peek().is_some()
            && busy.all(|n| n.active.len() as u32 > n.usable_slots().saturating_add(2))
    }

    pub(crate) fn handle(&mut self, event: Event) {
        match event {
            Event::Propose { command, reply } => {
                self.queued_bytes += approx_size(&command);
                self.queued.push((command, reply));
                if self.queued_bytes >= self.config.max_entry_bytes {
                    self.propose_queued();
                }
            }
            Event::Raft(messages) => {
                for m in messages {
                    if self.lost_data.is_none() {
                        self.lost_data = self.check_acknowledged_log(&m);
                    }
                    if self.lost_data.is_some() || self.follower_lost_acknowledged(&m) {
                        continue;
                    }
                    if let Err(e) = self.raw.step(m) {
                        tracing::warn!(error = %e, "raft message rejected");
                    }
                }
            }
            Event::WorkerAttached { node, conn, tx } => {
                // Its registration is proposed after this event, so with an id from here on.
                self.registering
                    .insert(node.clone(), (conn, self.next_proposal));
                self.workers.insert(node, (conn, tx));
            }
            Event::ReadIndex { reply } => {
                let (id, ctx) = self.next_context();
                self.raw.read_index(ctx);
                self.reads_sent.insert(id, reply);
            }
            Event::WorkerDetached { node, conn } => {
                if self.workers.get(&node).is_some_and(|(c, _)| *c == conn) {
                    self.workers.remove(&node);
                    self.registering.remove(&node);
                }
            }
            Event::ChangeMembership { change, reply } => self.propose_member_change(change, reply),
        }
    }

    fn next_context(&mut self) -> (u64, Vec<u8>) {
        let id = self.next_proposal;
        self.next_proposal += 1;
        let mut ctx = Vec::with_capacity(16);
        ctx.extend_from_slice(&self.boot_nonce.to_be_bytes());
        ctx.extend_from_slice(&id.to_be_bytes());
        (id, ctx)
    }

    fn propose_queued(&mut self) {
        if self.queued.is_empty() {
            return;
        }
        // A replica that just won an election must count leases from now before its first
        // scheduling round: judged on the grants of an earlier term (or none), every node
        // would look silent for long and be marked down while its worker still holds the
        // lease the previous leader granted.
        self.track_role();
        let queued = std::mem::take(&mut self.queued);
        self.queued_bytes = 0;
        if self.raw.raft.state != StateRole::Leader {
            let err = self.not_leader();
            for (_, reply) in queued {
                if let Some(reply) = reply {
                    let _ = reply.send(Err(err.clone()));
                }
            }
            return;
        }
        let (mut commands, mut replies): (Vec<Command>, Vec<Option<Reply>>) =
            queued.into_iter().unzip();
        // Schedule in the same entry: what these commands free up is dispatched at once.
        commands.push(Command::Schedule {
            now_ms: self.clock.now_ms(),
            config: self.scheduler_config(),
        });
        replies.push(None);
        self.propose(Command::Batch(commands), replies);
    }

    fn propose(&mut self, command: Command, replies: Vec<Option<Reply>>) {
        let data = match bincode::serialize(&command) {
            Ok(data) => data,
            Err(e) => {
                let err = ProposeError::Raft(format!("encode: {e}"));
                for reply in replies.into_iter().flatten() {
                    let _ = reply.send(Err(err.clone()));
                }
                return;
            }
        };
        let (id, ctx) = self.next_context();
        match self.raw.propose(ctx, data) {
            Ok(()) => {
                self.pending.insert(id, Pending { replies });
            }
            Err(e) => {
                let err = match e {
                    raft::Error::ProposalDropped => self.not_leader(),
                    other => ProposeError::Raft(other.to_string()),
                };
                for reply in replies.into_iter().flatten() {
                    let _ = reply.send(Err(err.clone()));
                }
            }
        }
    }

    fn not_leader(&self) -> ProposeError {
        ProposeError::NotLeader {
            leader_addr: self.members.get(&self.raw.raft.leader_id).cloned(),
        }
    }

    fn fail_pending(&mut self, err: ProposeError) {
        for (_, reply) in self.reads_sent.drain() {
            let _ = reply.send(Err(err.clone()));
        }
        for (_, pending) in self.pending.drain() {
            for reply in pending.replies.into_iter().flatten() {
                let _ = reply.send(Err(err.clone()));
            }
        }
        for (_, reply) in self.queued.drain(..) {
            if let Some(reply) = reply {
                let _ = reply.send(Err(err.clone()));
            }
        }
    }

    fn send_messages(&mut self, messages: Vec<RaftMessage>) {
        if !messages.is_empty() {
            self.transport.send(messages);
        }
    }

    fn on_ready(&mut self) -> Result<(), ReplicaError> {
        if !self.raw.has_ready() {
            return Ok(());
        }
        let mut ready = self.raw.ready();
        self.send_messages(ready.take_messages());
        let has_snapshot = !ready.snapshot().is_empty();
        if has_snapshot {
            self.apply_snapshot(ready.snapshot())?;
        }
        for rs in ready.take_read_states() {
            self.on_read_state(&rs.request_ctx, rs.index);
        }
        let committed = ready.take_committed_entries();
        self.apply_entries(committed)?;
        let must_persist = has_snapshot || !ready.entries().is_empty() || ready.hs().is_some();
        self.store.append(ready.entries())?;
        if let Some(hs) = ready.hs() {
            self.store.set_hard_state(hs)?;
        }
        if must_persist {
            blocking(|| self.store.flush())?;
            self.n_flushes += 1;
            self.last_flush_us = self.clock.now_us();
        }
        self.send_messages(ready.take_persisted_messages());
        let mut light = self.raw.advance(ready);
        if let Some(commit) = light.commit_index() {
            let mut hs = self.store.hard_state()?;
            hs.commit = commit;
            self.store.set_hard_state(&hs)?;
        }
        self.send_messages(light.take_messages());
        let committed = light.take_committed_entries();
        self.apply_entries(committed)?;
        self.raw.advance_apply();
        self.answer_reads();
        Ok(())
    }

    fn on_read_state(&mut self, ctx: &[u8], index: u64) {
        if let Some(reply) = self
            .own_proposal(ctx)
            .and_then(|id| self.reads_sent.remove(&id))
        {
            self.reads_waiting.push((index, reply));
        }
    }

    /// Answers the reads whose index is applied.
    fn answer_reads(&mut self) {
        let applied = self.applied;
        let (ready, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.reads_waiting)
            .into_iter()
            .partition(|(index, _)| *index <= applied);
        self.reads_waiting = waiting;
        for (_, reply) in ready {
            let _ = reply.send(Ok(()));
        }
    }

    fn apply_entries(&mut self, entries: Vec<Entry>) -> Result<(), ReplicaError> {
        if entries.is_empty() {
            return Ok(());
        }
        let is_leader = self.raw.raft.state == StateRole::Leader;
        // Scheduling rounds get spans only on the leader and only while traces are exported.
        let trace_rounds = is_leader && venom_telemetry::enabled();
        // When the earliest scheduling round applied here was proposed (leader time).
        let mut round_proposed_ms: Option<u64> = None;
        let mut replies: Vec<(Reply, Outcome)> = Vec::new();
        let mut membership_changed = false;
        let mut effects;
        let mut round_spans = Vec::new();
        {
            let mut state = match self.shared.state.write() {
                Ok(s) => s,
                Err(poisoned) => poisoned.into_inner(),
            };
            for entry in entries {
                let index = entry.index;
                #[cfg(test)]
                if let Some(trace) = self.applied_trace.as_mut() {
                    trace.push((index, entry.term, data_hash(&entry.data)));
                }
                match entry.get_entry_type() {
                    EntryType::EntryConfChange => {
                        let mut cc = ConfChange::default();
                        if cc.merge_from_bytes(&entry.data).is_ok() {
                            self.raw.apply_conf_change(&cc)?;
                            step_down_if_removed(&mut self.raw, self.config.id);
                            let address = match cc.get_change_type() {
                                ConfChangeType::RemoveNode => None,
                                _ => Some(String::from_utf8_lossy(&cc.context).into_owned()),
                            };
                            tracing::info!(
                                index,
                                member = cc.node_id,
                                address = address.as_deref().unwrap_or("-"),
                                "membership changed"
                            );
                            if cc.node_id == self.config.id && address.is_none() {
                                tracing::warn!(
                                    "this coordinator was removed from the cluster; \
                                     it takes no further part"
                                );
                            }
                            state.change_member(cc.node_id, address);
                            membership_changed = true;
                        }
                        if let Some(id) = self.own_proposal(&entry.context) {
                            if let Some(pending) = self.pending.remove(&id) {
                                for reply in pending.replies.into_iter().flatten() {
                                    replies.push((reply, Outcome::Done));
                                }
                            }
                        }
                    }
                    EntryType::EntryNormal if !entry.data.is_empty() => {
                        let outcome = match bincode::deserialize::<Command>(&entry.data) {
                            Ok(command) => {
                                let id = self.own_proposal(&entry.context);
                                registered(&mut self.registering, &command, id);
                                if trace_rounds {
                                    if let Some(at) = schedule_time_ms(&command) {
                                        round_proposed_ms =
                                            Some(round_proposed_ms.map_or(at, |t| t.min(at)));
                                    }
                                }
                                state.apply(command)
                            }
                            Err(e) => {
                                tracing::error!(index, error = %e, "undecodable entry skipped");
                                Outcome::Rejected(format!("undecodable entry: {e}"))
                            }
                        };
                        if let Some(id) = self.own_proposal(&entry.context) {
                            if let Some(pending) = self.pending.remove(&id) {
                                let outcomes = match outcome {
                                    Outcome::Batch(o) => o,
                                    other => vec![other],
                                };
                                for (reply, outcome) in pending.replies.into_iter().zip(outcomes) {
                                    if let Some(reply) = reply {
                                        replies.push((reply, outcome));
                                    }
                                }
                            }
                        }
                    }
                    _ => {}
                }
                self.applied = index;
            }
            let observations = std::mem::take(&mut state.observations);
            if is_leader {
                for observation in &observations {
                    self.shared.metrics.observe(observation);
                    log_node_state(observation);
                }
            }
            let drained = std::mem::take(&mut state.effects);
            effects = if is_leader {
                convert::worker_messages(&state, drained, self.leases.lease_ms())
            } else {
                Vec::new()
            };
            if trace_rounds {
                let proposed_ms = round_proposed_ms.unwrap_or_else(|| self.clock.now_ms());
                round_spans = self.schedule_spans(&state, &mut effects, proposed_ms);
            }
            membership_changed |= state.cluster_id != self.cluster_id;
        }
        if membership_changed {
            self.refresh_members()?;
        }
        let now_ms = self.clock.monotonic_ms();
        for (node, message) in effects {
            if message.lease.is_some() {
                // Granted once committed, whether or not the worker is still attached: the
                // leader's reference is then later than the worker's.
                self.leases.granted(&node, now_ms);
            }
            self.send_to_worker(&node, message);
        }
        // A round's span ends once its assignments are on their way.
        drop(round_spans);
        for (reply, outcome) in replies {
            let _ = reply.send(Ok(outcome));
        }
        self.shared.applied.send_replace(self.applied);
        Ok(())
    }

    fn own_proposal(&self, context: &[u8]) -> Option<u64> {
        if context.len() != 16 {
            return None;
        }
        let nonce = u64::from_be_bytes(context[..8].try_into().ok()?);
        if nonce != self.boot_nonce {
            return None;
        }
        Some(u64::from_be_bytes(context[8..].try_into().ok()?))
    }

    fn publish_status(&self) {
        let raft = &self.raw.raft;
        let mut matched = BTreeMap::new();
        if raft.state == StateRole::Leader {
            for (id, pr) in raft.prs().iter() {
                matched.insert(*id, pr.matched);
            }
        }
        let status = RaftStatus {
            id: self.config.id,
            role: raft.state,
            term: raft.term,
            leader_id: raft.leader_id,
            commit: raft.raft_log.committed,
            applied: self.applied,
            last_index: raft.raft_log.last_index(),
            members: self.members.clone(),
            matched,
            cluster_id: self.cluster_id,
        };
        if let Ok(mut s) = self.shared.status.write() {
            log_role_change(&s, &status);
            *s = status;
        }
    }
}

/// One log line per change of a node's state (on the leader, as the change applies).
fn log_node_state(observation: &Observation) {
    if let Observation::NodeState { node, from, to } = observation {
        let from = from.map_or("unregistered", NodeState::as_str);
        match to {
            NodeState::Down => tracing::warn!(
                %node,
                from,
                "node marked down: no heartbeat within the heartbeat TTL; its attempts go back to ready"
            ),
            NodeState::Ready => tracing::info!(%node, from, "node ready"),
            NodeState::Draining => tracing::info!(%node, from, "node draining"),
        }
    }
}

/// One log line per change of this member's role or leader: an election started, the
/// leadership won or lost, a new leader followed.
fn log_role_change(before: &RaftStatus, now: &RaftStatus) {
    if before.role == now.role && before.leader_id == now.leader_id {
        return;
    }
    let term = now.term;
    match (before.role, now.role) {
        (StateRole::Leader, StateRole::Leader) => {}
        (_, StateRole::Leader) => tracing::info!(term, "became leader"),
        (StateRole::Leader, role) => tracing::warn!(
            term,
            ?role,
            leader = now.leader_id,
            "stepped down as leader"
        ),
        (StateRole::Candidate | StateRole::PreCandidate, StateRole::Candidate)
        | (StateRole::PreCandidate, StateRole::PreCandidate)
        | (StateRole::Candidate, StateRole::PreCandidate) => {}
        (_, StateRole::Candidate | StateRole::PreCandidate) => tracing::info!(
            term,
            last_leader = before.leader_id,
            "no leader heard within the election timeout: starting an election"
        ),
        (_, StateRole::Follower) if now.leader_id != 0 && now.leader_id != before.leader_id => {
            tracing::info!(term, leader = now.leader_id, "following a new leader")
        }
        _ => {}
    }
}

/// A stable hash of an entry's payload (for the simulated cluster's checker).
#[cfg(test)]
fn data_hash(data: &[u8]) -> u64 {
    use std::hash::{Hash as _, Hasher as _};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    data.hash(&mut hasher);
    hasher.finish()
}

/// `command`, this leader's proposal `id` (if it is one), is being applied: the streams it
/// holds the own registration of are registered from now on, so their workers hear
/// everything (this apply call's effects included).
fn registered(registering: &mut HashMap<String, (u64, u64)>, command: &Command, id: Option<u64>) {
    let Some(id) = id.filter(|_| !registering.is_empty()) else {
        return;
    };
    for node in registered_nodes(command) {
        if registering
            .get(node)
            .is_some_and(|&(_, first_id)| id >= first_id)
        {
            registering.remove(node);
        }
    }
}

/// The nodes whose registration `command` holds.
fn registered_nodes(command: &Command) -> Vec<&str> {
    match command {
        Command::RegisterNode { spec, .. } => vec![spec.name.as_str()],
        Command::Batch(commands) => commands.iter().flat_map(registered_nodes).collect(),
        _ => Vec::new(),
    }
}

/// Rough wire size of a command, to bound group-commit entries.
fn approx_size(command: &Command) -> usize {
    match command {
        Command::Finished { results, .. } => results
            .iter()
            .map(|r| 128 + r.outcome.stdout.len() + r.outcome.stderr.len())
            .sum(),
        Command::SubmitWave { spec, .. } => 256 + spec.tasks.len() * 256,
        Command::Batch(c) => c.iter().map(approx_size).sum(),
        _ => 128,
    }
}

#[cfg(test)]
mod tests {
    use venom_core::{AttemptOutcome, AttemptRef};

    use super::*;
    use crate::state::AttemptResult;

    fn finished(output_bytes: usize) -> Command {
        Command::Finished {
            results: vec![AttemptResult {
                attempt: AttemptRef::new((1, 0), 1),
                node: "n1".into(),
                outcome: AttemptOutcome {
                    stdout: vec![b'x'; output_bytes],
                    stderr: vec![b'y'; output_bytes],
                    ..AttemptOutcome::default()
                },
            }],
            now_ms: 1,
        }
    }

    fn schedule(now_ms: u64) -> Command {
        Command::Schedule {
            now_ms,
            config: SchedulerConfig::default(),
        }
    }

    #[test]
    fn a_group_commit_counts_the_output_its_results_carry() {
        assert_eq!(approx_size(&finished(0)), 128);
        assert_eq!(approx_size(&finished(1_000)), 2_128);
        // A worker's report is one batch: its results count as if proposed alone.
        let report = Command::Batch(vec![schedule(1), finished(1_000)]);
        assert_eq!(approx_size(&report), 128 + 2_128);
    }

    fn registration(node: &str) -> Command {
        let spec = crate::state::NodeSpec {
            name: node.to_owned(),
            slots: 1,
            labels: BTreeMap::new(),
            policy: venom_core::mobius::ThrottlePolicy::Adaptive,
            physical_cores: 1,
            logical_cores: 1,
            memory_total_bytes: 1 << 30,
            gpus: 0,
            queue_depth: 0,
            profile: Vec::new(),
        };
        Command::register(spec, Vec::new(), Vec::new(), 1, 1)
    }

    #[test]
    fn a_worker_stream_is_registered_by_its_own_registration_only() {
        // Stream 7 of `w1` attached when the next proposal id was 10.
        let mut registering = HashMap::from([("w1".to_owned(), (7, 10))]);
        // Proposed before the stream attached: an earlier stream's registration.
        registered(&mut registering, &registration("w1"), Some(9));
        // Not this leader's proposal, or another node's.
        registered(&mut registering, &registration("w1"), None);
        registered(&mut registering, &registration("w2"), Some(12));
        assert!(registering.contains_key("w1"));
        let batch = Command::Batch(vec![schedule(1), registration("w1")]);
        registered(&mut registering, &batch, Some(10));
        assert!(registering.is_empty());
    }

    #[test]
    fn a_round_is_timed_by_the_earliest_schedule_it_holds() {
        assert_eq!(schedule_time_ms(&finished(0)), None);
        assert_eq!(schedule_time_ms(&schedule(7)), Some(7));
        let nested = Command::Batch(vec![
            finished(0),
            Command::Batch(vec![schedule(9), schedule(4)]),
            schedule(6),
        ]);
        assert_eq!(schedule_time_ms(&nested), Some(4));
    }
}
