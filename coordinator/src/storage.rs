//! Durable storage in one sled database: the raft log and hard/conf state
//! (`raft::Storage`), and the state machine's keys with its applied index.
//!
//! Layout (trees):
//! - `raft_log`: entry index (big-endian u64) → protobuf-encoded `eraftpb::Entry`.
//! - `raft_meta`: `hard_state`, `conf_state`, `snapshot_index`, `snapshot_term`.
//! - `state`: `m/applied`, `m/next_wave_id`, `m/stale_results` (u64), `w/<id>` → wave
//!   header, `t/<id><micro>` → micro-task, `n/<name>` → node (all bincode).
//!
//! Writes are cheap (sled buffers them); durability comes from [`Store::flush`], which the
//! raft driver calls once per `Ready` — one fsync covers every entry of a group commit. The
//! applied index is written in the same atomic batch as the state-machine keys it covers,
//! so a restart resumes applying exactly after the last change it kept.

use protobuf::Message as _;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};
use raft::{GetEntriesContext, RaftState, StorageError};
use thiserror::Error;

use crate::state::{MicroTask, Node, State, Wave, WaveHeader};

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
}

/// Handle on the coordinator's sled database. Cloning is cheap (sled trees are shared).
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    log: sled::Tree,
    meta: sled::Tree,
    state: sled::Tree,
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
const WAVE: &[u8] = b"w/";
const TASK: &[u8] = b"t/";
const NODE: &[u8] = b"n/";

fn u64_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

fn read_u64(bytes: &[u8]) -> u64 {
    let mut buf = [0u8; 8];
    let n = bytes.len().min(8);
    buf[..n].copy_from_slice(&bytes[..n]);
    u64::from_be_bytes(buf)
}

fn bincode_err(key: &[u8], source: bincode::Error) -> StoreError {
    StoreError::Bincode {
        key: String::from_utf8_lossy(key).into_owned(),
        source,
    }
}

impl Store {
    /// Opens (or creates) the database in `dir`.
    pub fn open(dir: &std::path::Path) -> Result<Self, StoreError> {
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(16 << 20)
            .flush_every_ms(None)
            .open()?;
        Ok(Self {
            log: db.open_tree("raft_log")?,
            meta: db.open_tree("raft_meta")?,
            state: db.open_tree("state")?,
            db,
        })
    }

    /// Writes everything buffered to disk (fsync).
    pub fn flush(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }

    /// Whether this store has never been initialised.
    pub fn is_new(&self) -> Result<bool, StoreError> {
        Ok(self.meta.get("conf_state")?.is_none())
    }

    /// First boot: records the initial voters.
    pub fn bootstrap(&self, voters: Vec<u64>) -> Result<(), StoreError> {
        let cs = ConfState {
            voters,
            ..ConfState::default()
        };
        self.set_conf_state(&cs)?;
        self.flush()
    }

    pub fn set_conf_state(&self, cs: &ConfState) -> Result<(), StoreError> {
        let bytes = cs.write_to_bytes().map_err(|source| StoreError::Protobuf {
            key: "conf_state".into(),
            source,
        })?;
        self.meta.insert("conf_state", bytes)?;
        Ok(())
    }

    pub fn set_hard_state(&self, hs: &HardState) -> Result<(), StoreError> {
        let bytes = hs.write_to_bytes().map_err(|source| StoreError::Protobuf {
            key: "hard_state".into(),
            source,
        })?;
        self.meta.insert("hard_state", bytes)?;
        Ok(())
    }

    pub fn hard_state(&self) -> Result<HardState, StoreError> {
        self.meta_proto("hard_state")
    }

    pub fn conf_state(&self) -> Result<ConfState, StoreError> {
        self.meta_proto("conf_state")
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

    fn last_log_index(&self) -> Result<u64, StoreError> {
        match self.log.last()? {
            Some((key, _)) => Ok(read_u64(&key)),
            None => Ok(self.snapshot_index_term()?.0),
        }
    }

    // ----- state machine -----

    /// Writes the keys `state` marked dirty plus the applied index, atomically.
    pub fn persist_state(&self, state: &mut State, applied: u64) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
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
        batch.insert(APPLIED, &u64_key(applied));
        batch.insert(NEXT_WAVE_ID, &u64_key(state.next_wave_id));
        batch.insert(STALE_RESULTS, &u64_key(state.stale_results));
        self.state.apply_batch(batch)?;
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
        match self.log.first().map_err(|e| store_error(e.into()))? {
            Some((key, _)) => Ok(read_u64(&key)),
            None => Ok(self.snapshot_index_term().map_err(store_error)?.0 + 1),
        }
    }

    fn last_index(&self) -> raft::Result<u64> {
        self.last_log_index().map_err(store_error)
    }

    fn snapshot(&self, _request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        // State-machine snapshots for lagging followers arrive with cluster membership.
        Err(raft::Error::Store(
            StorageError::SnapshotTemporarilyUnavailable,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use raft::Storage;

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
            store.bootstrap(vec![1]).expect("bootstrap");
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
        assert_eq!(state.conf_state.voters, vec![1]);
    }

    #[test]
    fn empty_log_has_first_index_one_and_last_zero() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        assert_eq!(store.first_index().expect("first"), 1);
        assert_eq!(store.last_index().expect("last"), 0);
        assert_eq!(store.term(0).expect("term 0"), 0);
    }

    #[test]
    fn state_round_trips_through_sled_with_its_applied_index() {
        use crate::state::{Command, NodeSpec, State};
        use crate::wave::{parse_wave, Format, WaveLimits};

        let dir = tempfile::tempdir().expect("tempdir");
        let spec = parse_wave(
            b"name = \"w\"\n[[task]]\nid = \"a\"\narray = 3\nrun = \"true\"\n[[task]]\nid = \"b\"\ndeps = [\"a\"]\nrun = \"true\"\n",
            Format::Toml,
            &WaveLimits::default(),
        )
        .expect("wave");
        let mut state = State::new(WaveLimits::default());
        state.apply(Command::SubmitWave {
            spec,
            traceparent: String::new(),
            now_ms: 5,
        });
        // A node whose name shares a first letter with the metadata keys.
        state.apply(Command::RegisterNode {
            spec: NodeSpec {
                name: "next".into(),
                slots: 2,
                labels: Default::default(),
                policy: crate::mobius::ThrottlePolicy::Adaptive,
                physical_cores: 2,
                logical_cores: 2,
                memory_total_bytes: 1 << 30,
                gpus: 0,
                queue_depth: 4,
                profile: Vec::new(),
            },
            running: Vec::new(),
            now_ms: 6,
        });
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
}
