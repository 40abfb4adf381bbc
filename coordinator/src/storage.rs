//! Durable storage in one sled database: the raft log and hard/conf state
//! (`raft::Storage`), and the state machine's keys with its applied index.
//!
//! Layout (trees):
//! - `raft_log`: entry index (big-endian u64) → protobuf-encoded `eraftpb::Entry`.
//! - `raft_meta`: `hard_state`, `conf_state`, `snapshot_index`, `snapshot_term`.
//! - `state`: `m/applied`, `m/next_wave_id`, `m/stale_results` (u64), `w/<id>` → wave
//!   header, `t/<id><micro>` → micro-task, `n/<name>` → node, `s/<wave id>` → the
//!   remembered submission that created the wave (all bincode).
//!
//! Writes are cheap (sled buffers them); durability comes from [`Store::flush`], which the
//! raft driver calls once per `Ready`: sled writes out its buffers, then [`SledFiles::sync`]
//! fdatasyncs its data file (plus any new blob file and changed directory), so one sync
//! covers every entry of a group commit and nothing acknowledged rests on the page cache.
//! The applied index is written in the same atomic batch as the state-machine keys it covers,
//! so a restart resumes applying exactly after the last change it kept.
//!
//! Compaction ([`Store::compact`]) deletes log entries up to an index no later than that
//! checkpointed applied index and records the last deleted entry as `snapshot_index` /
//! `snapshot_term`. A follower that needs a deleted entry gets a raft snapshot instead: its
//! metadata names the checkpoint's applied index and its data is the whole `state` tree as a
//! bincode [`StateSnapshot`] ([`Store::build_snapshot`]); the receiver installs it with
//! [`Store::apply_snapshot`]. Both multi-tree changes are single sled transactions, so a
//! crash leaves either the old or the new log/state, never a mix.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use protobuf::Message as _;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};
use raft::{GetEntriesContext, RaftState, StorageError};
use sled::transaction::{ConflictableTransactionError, TransactionError, Transactional as _};
use thiserror::Error;

use venom_core::wave::WaveLimits;

use crate::datadir::{self, Identity};
use crate::durable::SledFiles;
use crate::state::{MicroTask, Node, State, StateSnapshot, Submission, Wave, WaveHeader};

/// Storage failures (disk, corruption).
#[derive(Debug, Error)]
pub enum StoreError {
    #[error("sled: {0}")]
    Sled(#[from] sled::Error),
    #[error("corrupt raft record `{key}`: {source}")]
    Protobuf {
        key: String,
        source: protobuf::ProtobufError,
    },
    #[error("corrupt state record `{key}`: {source}")]
    Bincode { key: String, source: bincode::Error },
    #[error("raft snapshot at index {index} does not decode: {source}")]
    SnapshotData { index: u64, source: bincode::Error },
    #[error("syncing {dir}: {error}")]
    Sync { dir: PathBuf, error: std::io::Error },
}

/// Handle on the coordinator's sled database. Cloning is cheap (sled trees are shared).
#[derive(Clone)]
pub struct Store {
    dir: PathBuf,
    db: sled::Db,
    /// sled's files, synced after every flush of sled's buffers.
    files: Arc<Mutex<SledFiles>>,
    log: sled::Tree,
    meta: sled::Tree,
    state: sled::Tree,
    /// Set when raft asked for a snapshot newer than the last checkpoint; the replica
    /// checkpoints at once when it sees it ([`Store::take_snapshot_wanted`]).
    snapshot_wanted: Arc<AtomicBool>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

// Keys of the `state` tree. Each kind has its own prefix ending in `/`, so a prefix
// scan of one kind never meets another.
const APPLIED: &[u8] = b"m/applied";
const NEXT_WAVE_ID: &[u8] = b"m/next_wave_id";
const STALE_RESULTS: &[u8] = b"m/stale_results";
const MEMBERS: &[u8] = b"m/members";
const CLUSTER_ID: &[u8] = b"m/cluster_id";
const MEMBERS_STARTED: &[u8] = b"m/members_started";
/// Set once the store holds a cluster's initial state (or a joiner's empty one).
const INITIALIZED: &str = "initialized";
/// The index (and term) of the initial snapshot every bootstrapped member starts from. A
/// member added later starts with an empty log, so the leader can only catch it up by
/// sending a snapshot — which carries the membership and the state machine.
pub const BOOTSTRAP_INDEX: u64 = 1;
const WAVE: &[u8] = b"w/";
const TASK: &[u8] = b"t/";
const NODE: &[u8] = b"n/";
const SUBMISSION: &[u8] = b"s/";

fn u64_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

fn read_u64(bytes: &[u8]) -> u64 {
    let mut buf = [0u8; 8];
    let n = bytes.len().min(8);
    buf[..n].copy_from_slice(&bytes[..n]);
    u64::from_be_bytes(buf)
}

fn encode_proto(key: &str, message: &impl protobuf::Message) -> Result<Vec<u8>, StoreError> {
    message
        .write_to_bytes()
        .map_err(|source| StoreError::Protobuf {
            key: key.into(),
            source,
        })
}

fn bincode_err(key: &[u8], source: bincode::Error) -> StoreError {
    StoreError::Bincode {
        key: String::from_utf8_lossy(key).into_owned(),
        source,
    }
}

impl Store {
    /// Opens (or creates) the database in `dir`.
    ///
    /// sled releases its file lock only when the last reference to a closed database is
    /// gone, which its background threads can delay for a moment; a lock still held is
    /// waited for up to 2 s before it is reported (then another process uses `dir`).
    pub fn open(dir: &std::path::Path) -> Result<Self, StoreError> {
        let config = sled::Config::new()
            .path(dir)
            .cache_capacity(16 << 20)
            .flush_every_ms(None);
        let mut tries = 0;
        let db = loop {
            match config.open() {
                Ok(db) => break db,
                Err(sled::Error::Io(e))
                    if tries < 100 && e.to_string().contains("could not acquire lock") =>
                {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => return Err(e.into()),
            }
        };
        let files = SledFiles::open(dir).map_err(|error| StoreError::Sync {
            dir: dir.to_path_buf(),
            error,
        })?;
        Ok(Self {
            dir: dir.to_path_buf(),
            log: db.open_tree("raft_log")?,
            meta: db.open_tree("raft_meta")?,
            state: db.open_tree("state")?,
            snapshot_wanted: Arc::new(AtomicBool::new(false)),
            files: Arc::new(Mutex::new(files)),
            db,
        })
    }

    /// The directory the database lives in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Makes everything written so far durable: sled writes out its buffers, then its
    /// files are synced (see [`SledFiles`]). When this returns, a power cut loses none of it.
    pub fn flush(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        let mut files = match self.files.lock() {
            Ok(files) => files,
            Err(poisoned) => poisoned.into_inner(),
        };
        files.sync().map_err(|error| StoreError::Sync {
            dir: self.dir.clone(),
            error,
        })?;
        Ok(())
    }

    /// Whether this store has never been initialised.
    pub fn is_new(&self) -> Result<bool, StoreError> {
        Ok(self.meta.get(INITIALIZED)?.is_none())
    }

    /// First boot of a founding member: the state machine starts at
    /// [`BOOTSTRAP_INDEX`] holding the initial `members`, as if a snapshot had been
    /// installed there. With no members (a coordinator joining an existing cluster) the
    /// store stays empty until the leader's snapshot arrives. Once that is durable, the
    /// data directory's identity file records `member_id` (see [`crate::datadir`]).
    pub fn bootstrap(
        &self,
        members: &BTreeMap<u64, String>,
        member_id: u64,
    ) -> Result<(), StoreError> {
        if !members.is_empty() {
            let mut state = State::default();
            for (&id, address) in members {
                state.change_member(id, Some(address.clone()));
            }
            state.next_wave_id = 1;
            self.persist_state(&mut state, BOOTSTRAP_INDEX)?;
            let hs = HardState {
                term: BOOTSTRAP_INDEX,
                commit: BOOTSTRAP_INDEX,
                ..HardState::default()
            };
            self.set_hard_state(&hs)?;
            self.meta
                .insert("snapshot_index", &u64_key(BOOTSTRAP_INDEX))?;
            self.meta
                .insert("snapshot_term", &u64_key(BOOTSTRAP_INDEX))?;
        }
        self.meta.insert(INITIALIZED, &[1u8][..])?;
        self.flush()?;
        self.record_cluster_id(member_id, 0)
    }

    /// Records in the identity file which cluster this data directory belongs to.
    pub fn record_cluster_id(&self, member_id: u64, cluster_id: u64) -> Result<(), StoreError> {
        datadir::write_identity(
            &self.dir,
            Identity {
                member_id,
                cluster_id,
            },
        )
        .map_err(|error| StoreError::Sync {
            dir: self.dir.clone(),
            error,
        })
    }

    /// The cluster id as of the last checkpoint (0 before the first leader named it).
    pub fn cluster_id(&self) -> Result<u64, StoreError> {
        Ok(self.state.get(CLUSTER_ID)?.map_or(0, |b| read_u64(&b)))
    }

    pub fn set_hard_state(&self, hs: &HardState) -> Result<(), StoreError> {
        self.meta
            .insert("hard_state", encode_proto("hard_state", hs)?)?;
        Ok(())
    }

    pub fn hard_state(&self) -> Result<HardState, StoreError> {
        self.meta_proto("hard_state")
    }

    /// The membership as of the last checkpoint (raft re-applies the conf changes after it).
    pub fn conf_state(&self) -> Result<ConfState, StoreError> {
        Ok(ConfState {
            voters: self.members()?.into_keys().collect(),
            ..ConfState::default()
        })
    }

    /// The members (id → address) as of the last checkpoint.
    pub fn members(&self) -> Result<BTreeMap<u64, String>, StoreError> {
        match self.state.get(MEMBERS)? {
            None => Ok(BTreeMap::new()),
            Some(bytes) => bincode::deserialize(&bytes).map_err(|e| bincode_err(MEMBERS, e)),
        }
    }

    fn meta_proto<M: protobuf::Message + Default>(&self, key: &str) -> Result<M, StoreError> {
        match self.meta.get(key)? {
            None => Ok(M::default()),
            Some(bytes) => {
                let mut m = M::default();
                m.merge_from_bytes(&bytes)
                    .map_err(|source| StoreError::Protobuf {
                        key: key.into(),
                        source,
                    })?;
                Ok(m)
            }
        }
    }

    fn snapshot_index_term(&self) -> Result<(u64, u64), StoreError> {
        let index = self.meta.get("snapshot_index")?.map_or(0, |b| read_u64(&b));
        let term = self.meta.get("snapshot_term")?.map_or(0, |b| read_u64(&b));
        Ok((index, term))
    }

    /// Appends entries, first dropping any conflicting suffix of the log.
    pub fn append(&self, entries: &[Entry]) -> Result<(), StoreError> {
        let Some(first) = entries.first() else {
            return Ok(());
        };
        let mut batch = sled::Batch::default();
        // Drop every stored entry at or after the first new index (a leader overwrote them).
        for key in self.log.range(u64_key(first.index)..) {
            let (key, _) = key?;
            batch.remove(key);
        }
        for entry in entries {
            let bytes = entry
                .write_to_bytes()
                .map_err(|source| StoreError::Protobuf {
                    key: format!("entry {}", entry.index),
                    source,
                })?;
            batch.insert(&u64_key(entry.index), bytes);
        }
        self.log.apply_batch(batch)?;
        Ok(())
    }

    fn entry(&self, index: u64) -> Result<Option<Entry>, StoreError> {
        match self.log.get(u64_key(index))? {
            None => Ok(None),
            Some(bytes) => {
                let mut entry = Entry::default();
                entry
                    .merge_from_bytes(&bytes)
                    .map_err(|source| StoreError::Protobuf {
                        key: format!("entry {index}"),
                        source,
                    })?;
                Ok(Some(entry))
            }
        }
    }

    /// Index of the last entry in the log (the snapshot index when it is empty).
    pub fn last_log_index(&self) -> Result<u64, StoreError> {
        let snap_index = self.snapshot_index_term()?.0;
        match self.log.last()? {
            Some((key, _)) => Ok(read_u64(&key).max(snap_index)),
            None => Ok(snap_index),
        }
    }

    /// Index of the first entry still in the log (`snapshot_index + 1` when it is empty).
    pub fn first_log_index(&self) -> Result<u64, StoreError> {
        let after_snapshot = self.snapshot_index_term()?.0 + 1;
        match self.log.first()? {
            Some((key, _)) => Ok(read_u64(&key).max(after_snapshot)),
            None => Ok(after_snapshot),
        }
    }

    /// The applied index of the last checkpoint (0 before the first).
    pub fn persisted_applied(&self) -> Result<u64, StoreError> {
        Ok(self.state.get(APPLIED)?.map_or(0, |b| read_u64(&b)))
    }

    /// Deletes the log entries up to `to_index`, never past the checkpoint's applied
    /// index (a restart re-applies the log after it) nor past the last entry, and records
    /// the last deleted entry as the snapshot point. Deleting the entries and moving the
    /// snapshot point is one sled transaction. Returns the snapshot index afterwards.
    pub fn compact(&self, to_index: u64) -> Result<u64, StoreError> {
        let (snap_index, _) = self.snapshot_index_term()?;
        let to_index = to_index
            .min(self.persisted_applied()?)
            .min(self.last_log_index()?);
        if to_index <= snap_index {
            return Ok(snap_index);
        }
        let Some(last_deleted) = self.entry(to_index)? else {
            return Ok(snap_index);
        };
        let mut log_batch = sled::Batch::default();
        for key in self.log.range(..=u64_key(to_index)).keys() {
            log_batch.remove(key?);
        }
        let mut meta_batch = sled::Batch::default();
        meta_batch.insert("snapshot_index", &u64_key(to_index));
        meta_batch.insert("snapshot_term", &u64_key(last_deleted.term));
        self.transact(None, &log_batch, &meta_batch)?;
        Ok(to_index)
    }

    /// Applies the three batches in one sled transaction.
    fn transact(
        &self,
        state_batch: Option<&sled::Batch>,
        log_batch: &sled::Batch,
        meta_batch: &sled::Batch,
    ) -> Result<(), StoreError> {
        let result: Result<(), TransactionError<std::convert::Infallible>> =
            (&self.state, &self.log, &self.meta).transaction(|(state, log, meta)| {
                if let Some(batch) = state_batch {
                    state.apply_batch(batch)?;
                }
                log.apply_batch(log_batch)?;
                meta.apply_batch(meta_batch)?;
                Ok::<(), ConflictableTransactionError<std::convert::Infallible>>(())
            });
        match result {
            Ok(()) => Ok(()),
            Err(TransactionError::Storage(e)) => Err(StoreError::Sled(e)),
            Err(TransactionError::Abort(never)) => match never {},
        }
    }

    /// Whether raft asked for a snapshot newer than the last checkpoint since the last
    /// call (the caller should checkpoint now).
    pub fn take_snapshot_wanted(&self) -> bool {
        self.snapshot_wanted.swap(false, Ordering::Relaxed)
    }

    /// Builds a raft snapshot of the last checkpoint: metadata (applied index, its term,
    /// the conf state) and the whole state machine as a bincode [`StateSnapshot`].
    /// `None` before the first checkpoint or when the checkpoint's term is unknown.
    pub fn build_snapshot(&self) -> Result<Option<Snapshot>, StoreError> {
        let mut state = State::new(WaveLimits::default());
        let applied = self.load_state(&mut state)?;
        if applied == 0 {
            return Ok(None);
        }
        let (snap_index, snap_term) = self.snapshot_index_term()?;
        let term = if applied == snap_index {
            snap_term
        } else {
            match self.entry(applied)? {
                Some(entry) => entry.term,
                None => return Ok(None),
            }
        };
        let members: Vec<u64> = state.members.keys().copied().collect();
        let data = bincode::serialize(&state.into_snapshot()).map_err(|source| {
            StoreError::SnapshotData {
                index: applied,
                source,
            }
        })?;
        let mut snapshot = Snapshot::default();
        snapshot.set_data(data.into());
        let meta = snapshot.mut_metadata();
        meta.index = applied;
        meta.term = term;
        meta.set_conf_state(ConfState {
            voters: members,
            ..ConfState::default()
        });
        Ok(Some(snapshot))
    }

    /// Installs a snapshot received from the leader: replaces `state` (keeping its
    /// limits) and, in one sled transaction, rewrites the whole `state` tree with applied =
    /// the snapshot index, drops the entire log (raft restarts it after the snapshot),
    /// records the snapshot point and conf state, and moves the hard state's commit up to
    /// the snapshot. Durable after the next [`Store::flush`].
    pub fn apply_snapshot(&self, snapshot: &Snapshot, state: &mut State) -> Result<(), StoreError> {
        let meta = snapshot.get_metadata();
        let (index, term) = (meta.index, meta.term);
        let decoded: StateSnapshot = bincode::deserialize(snapshot.get_data())
            .map_err(|source| StoreError::SnapshotData { index, source })?;
        state.restore(decoded);
        let mut state_batch = sled::Batch::default();
        for key in self.state.iter().keys() {
            state_batch.remove(key?);
        }
        // The batch is a map: the inserts below override the removals of live keys.
        self.fill_state_batch(&mut state_batch, state, index)?;
        let mut log_batch = sled::Batch::default();
        for key in self.log.iter().keys() {
            log_batch.remove(key?);
        }
        let mut hs = self.hard_state()?;
        hs.commit = hs.commit.max(index);
        hs.term = hs.term.max(term);
        let mut meta_batch = sled::Batch::default();
        meta_batch.insert("snapshot_index", &u64_key(index));
        meta_batch.insert("snapshot_term", &u64_key(term));
        meta_batch.insert("hard_state", encode_proto("hard_state", &hs)?);
        self.transact(Some(&state_batch), &log_batch, &meta_batch)
    }

    // ----- state machine -----

    /// Writes the keys `state` marked dirty plus the applied index, atomically.
    pub fn persist_state(&self, state: &mut State, applied: u64) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        self.fill_state_batch(&mut batch, state, applied)?;
        self.state.apply_batch(batch)?;
        Ok(())
    }

    /// Adds the keys `state` marked dirty (clearing the marks) and the applied index.
    fn fill_state_batch(
        &self,
        batch: &mut sled::Batch,
        state: &mut State,
        applied: u64,
    ) -> Result<(), StoreError> {
        let dirty = std::mem::take(&mut state.dirty);
        for id in dirty.waves {
            let key = [WAVE, &u64_key(id)].concat();
            match state.waves.get(&id) {
                Some(wave) => {
                    let bytes =
                        bincode::serialize(&wave.header).map_err(|e| bincode_err(&key, e))?;
                    batch.insert(key, bytes);
                }
                None => batch.remove(key),
            }
        }
        for (id, micro) in dirty.tasks {
            let key = [TASK, &u64_key(id), &micro.to_be_bytes()].concat();
            if let Some(task) = state.task((id, micro)) {
                let bytes = bincode::serialize(task).map_err(|e| bincode_err(&key, e))?;
                batch.insert(key, bytes);
            }
        }
        for name in dirty.nodes {
            let key = [NODE, name.as_bytes()].concat();
            if let Some(node) = state.nodes.get(&name) {
                let bytes = bincode::serialize(node).map_err(|e| bincode_err(&key, e))?;
                batch.insert(key, bytes);
            }
        }
        for wave_id in dirty.submissions {
            let key = [SUBMISSION, &u64_key(wave_id)].concat();
            match state.submissions.get(wave_id) {
                Some(submission) => {
                    let bytes = bincode::serialize(submission).map_err(|e| bincode_err(&key, e))?;
                    batch.insert(key, bytes);
                }
                None => batch.remove(key),
            }
        }
        if dirty.members {
            let bytes = bincode::serialize(&state.members).map_err(|e| bincode_err(MEMBERS, e))?;
            batch.insert(MEMBERS, bytes);
            batch.insert(CLUSTER_ID, &u64_key(state.cluster_id));
            let started = bincode::serialize(&state.members_started)
                .map_err(|e| bincode_err(MEMBERS_STARTED, e))?;
            batch.insert(MEMBERS_STARTED, started);
        }
        batch.insert(APPLIED, &u64_key(applied));
        batch.insert(NEXT_WAVE_ID, &u64_key(state.next_wave_id));
        batch.insert(STALE_RESULTS, &u64_key(state.stale_results));
        Ok(())
    }

    /// Loads the state machine and its applied index.
    pub fn load_state(&self, state: &mut State) -> Result<u64, StoreError> {
        let applied = self.state.get(APPLIED)?.map_or(0, |b| read_u64(&b));
        state.next_wave_id = self
            .state
            .get(NEXT_WAVE_ID)?
            .map_or(1, |b| read_u64(&b))
            .max(1);
        state.stale_results = self.state.get(STALE_RESULTS)?.map_or(0, |b| read_u64(&b));
        state.members = self.members()?;
        state.cluster_id = self.state.get(CLUSTER_ID)?.map_or(0, |b| read_u64(&b));
        if let Some(bytes) = self.state.get(MEMBERS_STARTED)? {
            state.members_started =
                bincode::deserialize(&bytes).map_err(|e| bincode_err(MEMBERS_STARTED, e))?;
        }
        for item in self.state.scan_prefix(WAVE) {
            let (key, bytes) = item?;
            let header: WaveHeader =
                bincode::deserialize(&bytes).map_err(|e| bincode_err(&key, e))?;
            let n = usize::try_from(header.spec.n_micro_tasks()).unwrap_or(0);
            state.waves.insert(
                header.id,
                Wave {
                    header,
                    tasks: Vec::with_capacity(n),
                },
            );
        }
        for item in self.state.scan_prefix(TASK) {
            let (key, bytes) = item?;
            if key.len() != TASK.len() + 12 {
                continue;
            }
            let id = read_u64(&key[TASK.len()..TASK.len() + 8]);
            let task: MicroTask = bincode::deserialize(&bytes).map_err(|e| bincode_err(&key, e))?;
            // Keys iterate in (wave, micro) order, so pushing rebuilds the flat vector.
            if let Some(wave) = state.waves.get_mut(&id) {
                wave.tasks.push(task);
            }
        }
        for item in self.state.scan_prefix(NODE) {
            let (key, bytes) = item?;
            let node: Node = bincode::deserialize(&bytes).map_err(|e| bincode_err(&key, e))?;
            state.nodes.insert(node.spec.name.clone(), node);
        }
        let mut submissions = Vec::new();
        for item in self.state.scan_prefix(SUBMISSION) {
            let (key, bytes) = item?;
            let submission: Submission =
                bincode::deserialize(&bytes).map_err(|e| bincode_err(&key, e))?;
            submissions.push(submission);
        }
        // Keys iterate in wave order, which is the order they were remembered in.
        state.submissions.restore(submissions);
        state.rebuild_indexes();
        Ok(applied)
    }
}

fn store_error(e: StoreError) -> raft::Error {
    raft::Error::Store(StorageError::Other(Box::new(e)))
}

impl raft::Storage for Store {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState {
            hard_state: self.hard_state().map_err(store_error)?,
            conf_state: self.conf_state().map_err(store_error)?,
        })
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        let max_size = max_size.into();
        let (snap_index, _) = self.snapshot_index_term().map_err(store_error)?;
        if low <= snap_index {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        let mut out = Vec::with_capacity((high - low) as usize);
        let mut size = 0u64;
        for item in self.log.range(u64_key(low)..u64_key(high)) {
            let (key, bytes) = item.map_err(|e| store_error(e.into()))?;
            let mut entry = Entry::default();
            entry.merge_from_bytes(&bytes).map_err(|source| {
                store_error(StoreError::Protobuf {
                    key: format!("entry {}", read_u64(&key)),
                    source,
                })
            })?;
            size += bytes.len() as u64;
            if let Some(max) = max_size {
                if !out.is_empty() && size > max {
                    break;
                }
            }
            out.push(entry);
        }
        if out.is_empty() && low < high {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        Ok(out)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        let (snap_index, snap_term) = self.snapshot_index_term().map_err(store_error)?;
        if idx == snap_index {
            return Ok(snap_term);
        }
        if idx < snap_index {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        match self.entry(idx).map_err(store_error)? {
            Some(e) => Ok(e.term),
            None => Err(raft::Error::Store(StorageError::Unavailable)),
        }
    }

    fn first_index(&self) -> raft::Result<u64> {
        self.first_log_index().map_err(store_error)
    }

    fn last_index(&self) -> raft::Result<u64> {
        self.last_log_index().map_err(store_error)
    }

    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        // raft-rs treats any error but "temporarily unavailable" as fatal, so a failure to
        // build one is logged and retried on a later append.
        let unavailable = raft::Error::Store(StorageError::SnapshotTemporarilyUnavailable);
        match self.build_snapshot() {
            // A snapshot from before `to` joined would be refused by it (raft ignores a
            // snapshot whose membership leaves the receiver out): wait for the checkpoint
            // that covers the conf change.
            Ok(Some(snapshot))
                if snapshot.get_metadata().index >= request_index
                    && snapshot
                        .get_metadata()
                        .get_conf_state()
                        .voters
                        .contains(&to) =>
            {
                tracing::info!(
                    to,
                    index = snapshot.get_metadata().index,
                    bytes = snapshot.get_data().len(),
                    "sending state-machine snapshot"
                );
                Ok(snapshot)
            }
            Ok(_) => {
                self.snapshot_wanted.store(true, Ordering::Relaxed);
                Err(unavailable)
            }
            Err(e) => {
                tracing::error!(to, error = %e, "cannot build a snapshot");
                Err(unavailable)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use raft::Storage;

    fn compacted<T: std::fmt::Debug>(result: raft::Result<T>) -> bool {
        matches!(result, Err(raft::Error::Store(StorageError::Compacted)))
    }

    fn entry(index: u64, term: u64) -> Entry {
        Entry {
            index,
            term,
            data: vec![index as u8].into(),
            ..Entry::default()
        }
    }

    #[test]
    fn log_append_truncates_conflicting_suffix_and_survives_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = Store::open(dir.path()).expect("open");
            assert!(store.is_new().expect("is_new"));
            store.bootstrap(&BTreeMap::new(), 1).expect("bootstrap");
            store
                .append(&[entry(1, 1), entry(2, 1), entry(3, 1)])
                .expect("append");
            store.append(&[entry(2, 2)]).expect("append conflicting");
            store
                .set_hard_state(&HardState {
                    term: 2,
                    vote: 1,
                    commit: 2,
                    ..HardState::default()
                })
                .expect("hs");
            store.flush().expect("flush");
        }
        let store = Store::open(dir.path()).expect("reopen");
        assert!(!store.is_new().expect("is_new"));
        assert_eq!(store.first_index().expect("first"), 1);
        assert_eq!(store.last_index().expect("last"), 2);
        assert_eq!(store.term(2).expect("term"), 2);
        assert!(store.term(3).is_err());
        let entries = store
            .entries(1, 3, None, GetEntriesContext::empty(false))
            .expect("entries");
        assert_eq!(
            entries.iter().map(|e| e.term).collect::<Vec<_>>(),
            vec![1, 2]
        );
        let state = store.initial_state().expect("state");
        assert_eq!(state.hard_state.commit, 2);
        assert!(
            state.conf_state.voters.is_empty(),
            "no checkpointed membership"
        );
    }

    #[test]
    fn empty_log_has_first_index_one_and_last_zero() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        assert_eq!(store.first_index().expect("first"), 1);
        assert_eq!(store.last_index().expect("last"), 0);
        assert_eq!(store.term(0).expect("term 0"), 0);
    }

    /// A wave of 4 micro-tasks (one ready array of 3, one dependent) and one node.
    fn sample_state() -> State {
        use crate::state::{Command, NodeSpec};
        use venom_core::wave::{parse_wave, Format};

        let spec = parse_wave(
            b"name = \"w\"\n[[task]]\nid = \"a\"\narray = 3\nrun = \"true\"\n[[task]]\nid = \"b\"\ndeps = [\"a\"]\nrun = \"true\"\n",
            Format::Toml,
            &WaveLimits::default(),
        )
        .expect("wave");
        let mut state = State::new(WaveLimits::default());
        state.apply(Command::SubmitWave {
            owner: String::new(),
            spec,
            traceparent: String::new(),
            submission_id: String::new(),
            now_ms: 5,
        });
        // A node whose name shares a first letter with the metadata keys.
        state.apply(Command::RegisterNode {
            spec: NodeSpec {
                name: "next".into(),
                slots: 2,
                labels: Default::default(),
                policy: venom_core::mobius::ThrottlePolicy::Adaptive,
                physical_cores: 2,
                logical_cores: 2,
                memory_total_bytes: 1 << 30,
                gpus: 0,
                queue_depth: 4,
                profile: Vec::new(),
            },
            running: Vec::new(),
            seq: 0,
            now_ms: 6,
        });
        state
    }

    #[test]
    fn state_round_trips_through_sled_with_its_applied_index() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut state = sample_state();
        {
            let store = Store::open(dir.path()).expect("open");
            store.persist_state(&mut state, 42).expect("persist");
            store.flush().expect("flush");
        }
        let store = Store::open(dir.path()).expect("reopen");
        let mut loaded = State::new(WaveLimits::default());
        assert_eq!(store.load_state(&mut loaded).expect("load"), 42);
        assert_eq!(loaded.waves, state.waves);
        assert_eq!(loaded.ready, state.ready);
        assert_eq!(loaded.next_wave_id, 2);
        assert_eq!(loaded.nodes.keys().collect::<Vec<_>>(), vec!["next"]);
    }

    #[test]
    fn compaction_moves_first_index_and_term_and_survives_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = Store::open(dir.path()).expect("open");
            store.bootstrap(&BTreeMap::new(), 1).expect("bootstrap");
            let entries: Vec<Entry> = (1..=20)
                .map(|i| entry(i, if i <= 10 { 1 } else { 2 }))
                .collect();
            store.append(&entries).expect("append");
            let mut state = State::new(WaveLimits::default());
            store
                .persist_state(&mut state, 15)
                .expect("checkpoint at 15");
            // Asking past the checkpoint compacts only up to it.
            assert_eq!(store.compact(18).expect("compact"), 15);
            assert_eq!(store.first_index().expect("first"), 16);
            assert_eq!(store.last_index().expect("last"), 20);
            assert_eq!(store.term(15).expect("snapshot term"), 2);
            assert!(compacted(store.term(14)));
            assert!(compacted(store.entries(
                15,
                17,
                None,
                GetEntriesContext::empty(false)
            )));
            // Compacting again to an older point changes nothing.
            assert_eq!(store.compact(12).expect("compact again"), 15);
            store.flush().expect("flush");
        }
        let store = Store::open(dir.path()).expect("reopen");
        assert_eq!(store.first_index().expect("first"), 16);
        assert_eq!(store.last_index().expect("last"), 20);
        assert_eq!(store.term(15).expect("snapshot term"), 2);
        assert!(compacted(store.term(3)));
        let kept = store
            .entries(16, 21, None, GetEntriesContext::empty(false))
            .expect("entries above the compaction point");
        assert_eq!(
            kept.iter().map(|e| e.index).collect::<Vec<_>>(),
            vec![16, 17, 18, 19, 20]
        );
        assert_eq!(kept[0].data.as_ref(), &[16u8]);
        // New entries append after the kept ones as before.
        store
            .append(&[entry(21, 3)])
            .expect("append after compaction");
        assert_eq!(store.last_index().expect("last"), 21);
        assert_eq!(store.first_index().expect("first"), 16);
    }

    #[test]
    fn a_founding_member_starts_from_a_snapshot_point_a_joiner_can_only_reach_by_snapshot() {
        let members: BTreeMap<u64, String> = (1..=3)
            .map(|id| (id, format!("http://127.0.0.1:700{id}")))
            .collect();
        let dir = tempfile::tempdir().expect("tempdir");
        let founder = Store::open(dir.path()).expect("open");
        founder.bootstrap(&members, 1).expect("bootstrap");
        assert!(!founder.is_new().expect("is_new"));
        assert_eq!(founder.first_index().expect("first"), BOOTSTRAP_INDEX + 1);
        assert_eq!(founder.last_index().expect("last"), BOOTSTRAP_INDEX);
        assert_eq!(
            founder.term(BOOTSTRAP_INDEX).expect("term"),
            BOOTSTRAP_INDEX
        );
        let initial = founder.initial_state().expect("initial state");
        assert_eq!(initial.hard_state.commit, BOOTSTRAP_INDEX);
        assert_eq!(initial.conf_state.voters, vec![1, 2, 3]);
        let mut state = State::new(WaveLimits::default());
        assert_eq!(
            founder.load_state(&mut state).expect("load"),
            BOOTSTRAP_INDEX
        );
        assert_eq!(state.members, members);
        // Index 1 is below the founder's log: a joiner gets a snapshot carrying the members.
        assert!(compacted(founder.entries(
            1,
            2,
            None,
            GetEntriesContext::empty(false)
        )));
        // A snapshot whose membership leaves the receiver out would be refused by it:
        // none is built for member 4 until a checkpoint covers its joining.
        assert!(founder.snapshot(0, 4).is_err());
        assert!(founder.take_snapshot_wanted());
        let snapshot = founder.snapshot(0, 3).expect("snapshot");
        assert_eq!(snapshot.get_metadata().index, BOOTSTRAP_INDEX);
        assert_eq!(
            snapshot.get_metadata().get_conf_state().voters,
            vec![1, 2, 3]
        );

        let joiner_dir = tempfile::tempdir().expect("tempdir");
        let joiner = Store::open(joiner_dir.path()).expect("open");
        joiner.bootstrap(&BTreeMap::new(), 1).expect("bootstrap");
        assert!(!joiner.is_new().expect("is_new"));
        assert!(joiner
            .initial_state()
            .expect("initial")
            .conf_state
            .voters
            .is_empty());
        let mut joined = State::new(WaveLimits::default());
        joiner
            .apply_snapshot(&snapshot, &mut joined)
            .expect("install");
        assert_eq!(joined.members, members);
        assert_eq!(joiner.members().expect("members"), members);
        assert_eq!(
            joiner.initial_state().expect("initial").conf_state.voters,
            vec![1, 2, 3]
        );
    }

    #[test]
    fn compaction_without_a_checkpoint_deletes_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        store.append(&[entry(1, 1), entry(2, 1)]).expect("append");
        assert_eq!(store.compact(2).expect("compact"), 0);
        assert_eq!(store.first_index().expect("first"), 1);
        assert_eq!(store.term(1).expect("term"), 1);
    }

    #[test]
    fn snapshot_round_trips_from_a_checkpoint_into_a_fresh_store() {
        let leader_dir = tempfile::tempdir().expect("tempdir");
        let leader = Store::open(leader_dir.path()).expect("open");
        leader.bootstrap(&BTreeMap::new(), 1).expect("bootstrap");
        // No checkpoint yet: raft must be told to retry later, not handed an empty snapshot.
        assert!(matches!(
            leader.snapshot(0, 2),
            Err(raft::Error::Store(
                StorageError::SnapshotTemporarilyUnavailable
            ))
        ));
        assert!(
            leader.take_snapshot_wanted(),
            "no checkpoint yet: one is wanted"
        );
        let entries: Vec<Entry> = (1..=30).map(|i| entry(i, 4)).collect();
        leader.append(&entries).expect("append");
        let mut state = sample_state();
        state.stale_results = 7;
        for id in 1..=3 {
            state.change_member(id, Some(format!("http://127.0.0.1:700{id}")));
        }
        leader.persist_state(&mut state, 25).expect("checkpoint");
        leader.compact(20).expect("compact");
        let snapshot = leader.snapshot(0, 2).expect("snapshot");
        assert_eq!(snapshot.get_metadata().index, 25);
        assert_eq!(snapshot.get_metadata().term, 4);
        assert_eq!(
            snapshot.get_metadata().get_conf_state().voters,
            vec![1, 2, 3]
        );
        // A request newer than the checkpoint asks the replica for a checkpoint instead.
        assert!(!leader.take_snapshot_wanted());
        assert!(leader.snapshot(26, 2).is_err());
        assert!(leader.take_snapshot_wanted());

        let follower_dir = tempfile::tempdir().expect("tempdir");
        {
            let follower = Store::open(follower_dir.path()).expect("open");
            follower.bootstrap(&BTreeMap::new(), 1).expect("bootstrap");
            // A stale log and a stale key the snapshot must replace.
            follower
                .append(&[entry(1, 1), entry(2, 1), entry(3, 1)])
                .expect("append");
            let mut stale = State::new(WaveLimits::default());
            stale.apply(crate::state::Command::RegisterNode {
                spec: state.nodes["next"].spec.clone(),
                running: Vec::new(),
                seq: 0,
                now_ms: 1,
            });
            let mut renamed = stale.nodes["next"].spec.clone();
            renamed.name = "gone".into();
            stale.apply(crate::state::Command::RegisterNode {
                spec: renamed,
                running: Vec::new(),
                seq: 0,
                now_ms: 1,
            });
            follower
                .persist_state(&mut stale, 2)
                .expect("stale checkpoint");

            let mut live = State::new(WaveLimits::default());
            follower
                .apply_snapshot(&snapshot, &mut live)
                .expect("apply snapshot");
            assert_eq!(live.waves, state.waves);
            assert_eq!(live.ready, state.ready);
            assert_eq!(live.stale_results, 7);
            assert!(
                live.dirty.tasks.is_empty(),
                "the snapshot write took the dirty marks"
            );
            assert_eq!(follower.first_index().expect("first"), 26);
            assert_eq!(follower.last_index().expect("last"), 25);
            assert_eq!(follower.term(25).expect("snapshot term"), 4);
            assert_eq!(follower.hard_state().expect("hs").commit, 25);
            follower.flush().expect("flush");
        }
        let follower = Store::open(follower_dir.path()).expect("reopen");
        let mut loaded = State::new(WaveLimits::default());
        assert_eq!(follower.load_state(&mut loaded).expect("load"), 25);
        assert_eq!(loaded.waves, state.waves);
        assert_eq!(loaded.ready, state.ready);
        assert_eq!(loaded.next_wave_id, state.next_wave_id);
        assert_eq!(loaded.stale_results, 7);
        assert_eq!(loaded.nodes.keys().collect::<Vec<_>>(), vec!["next"]);
        assert_eq!(loaded.nodes["next"], state.nodes["next"]);
        assert_eq!(follower.first_index().expect("first"), 26);
        assert_eq!(follower.term(25).expect("snapshot term"), 4);
        assert_eq!(
            follower
                .initial_state()
                .expect("raft state")
                .conf_state
                .voters,
            vec![1, 2, 3]
        );
    }
}
