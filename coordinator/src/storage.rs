//! Durable storage in one sled database: the raft log and hard/conf state
//! (`raft::Storage`), and the state machine's keys with its applied index.
//!
//! Layout (trees):
//! - `raft_log`: entry index (big-endian u64) → protobuf-encoded `eraftpb::Entry`.
//! - `raft_meta`: `hard_state`, `snapshot_index`, `snapshot_term`, `log_last` (the last
//!   index this member appended), `initialized`.
//! - `state`: `m/applied`, `m/next_wave_id`, `m/stale_results` (u64), `w/<id>` → wave
//!   header, `t/<id><micro>` → micro-task, `n/<name>` → node, `s/<wave id>` → the
//!   remembered submission that created the wave (all bincode).
//!
//! Every value in every tree is framed: a 4-byte CRC32 (little-endian) of the record's key
//! and payload, then the payload. Every read checks it, so a damaged value — or a value
//! found under another key — is a [`StoreError::Corrupt`] naming the tree, the record and
//! the data dir, never a wrong value. [`Store::open_verified`] (what the coordinator opens
//! its data dir with) reads the whole store once before anything uses it: every record's
//! checksum, and a raft log that holds every entry from the first index up to the last
//! one this member appended or knew committed, so a log cut short or with a hole is found
//! at start rather than after this member voted. Three records say how far it went:
//! `log_last` (written in the same sled transaction as the entries), the hard state's
//! commit, and [`COMMIT_FILE`], a file outside sled — sled's recovery from a damaged log
//! rolls the first two back with the log, consistently and without an error. sled panics
//! on some damaged files instead of returning an error; those panics are caught there and
//! reported as corruption too. Nothing here ever repairs or truncates a damaged store: the
//! member refuses to start (see [`crate::datadir`]).
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

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use protobuf::Message as _;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};
use raft::{GetEntriesContext, RaftState, StorageError};
use sled::transaction::{ConflictableTransactionError, TransactionError, Transactional as _};
use thiserror::Error;

use venom_core::wave::WaveLimits;

use crate::datadir::{self, Identity};
use crate::durable::{self, SledFiles};
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
    /// A record failed its checksum or does not decode, or the raft log misses entries
    /// this member wrote: the files in `dir` were damaged.
    #[error("record `{key}` of sled tree `{tree}` in {dir} is corrupt: {problem}")]
    Corrupt {
        dir: PathBuf,
        tree: &'static str,
        key: String,
        problem: String,
    },
    /// The commit record beside sled's files does not read back.
    #[error("{file} in {dir} is damaged: {problem}", file = COMMIT_FILE)]
    CommitRecord { dir: PathBuf, problem: String },
    /// sled panicked while opening or reading `dir` (it does on some damaged files).
    #[error("sled panicked reading {dir} ({message}): its files are damaged")]
    SledPanicked { dir: PathBuf, message: String },
    #[error("raft snapshot at index {index} does not decode: {source}")]
    SnapshotData { index: u64, source: bincode::Error },
    #[error("syncing {dir}: {error}")]
    Sync { dir: PathBuf, error: std::io::Error },
}

impl StoreError {
    /// Whether this says the files on the disk are damaged (as opposed to a failing disk
    /// or a bug): a member that finds this must not take part as it is.
    pub fn is_corruption(&self) -> bool {
        matches!(
            self,
            StoreError::Corrupt { .. }
                | StoreError::CommitRecord { .. }
                | StoreError::SledPanicked { .. }
                | StoreError::Sled(sled::Error::Corruption { .. })
        )
    }

    /// What is wrong, in words for a refusal (sled's own corruption error prints an empty
    /// backtrace).
    pub fn problem(&self) -> String {
        match self {
            StoreError::Sled(sled::Error::Corruption { at: Some(at), .. }) => {
                format!("sled found a record of its own damaged (at {at})")
            }
            StoreError::Sled(sled::Error::Corruption { at: None, .. }) => {
                "sled found one of its own files damaged (a checksum of its own failed)".into()
            }
            other => other.to_string(),
        }
    }
}

/// Handle on the coordinator's sled database. Cloning is cheap (sled trees are shared).
#[derive(Clone)]
pub struct Store {
    dir: PathBuf,
    db: sled::Db,
    /// sled's files, synced after every flush of sled's buffers.
    files: Arc<Mutex<SledFiles>>,
    /// [`COMMIT_FILE`], rewritten after every flush that moved the commit index.
    commit_record: Arc<Mutex<CommitRecord>>,
    log: Framed,
    meta: Framed,
    state: Framed,
    /// Set when raft asked for a snapshot newer than the last checkpoint; the replica
    /// checkpoints at once when it sees it ([`Store::take_snapshot_wanted`]).
    snapshot_wanted: Arc<AtomicBool>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

/// The file beside sled's in the data dir recording the highest commit index this member
/// made durable (see [`Store::flush`]). sled's recovery rolls back, consistently and
/// without an error, to the last record it can read when a byte of its log is damaged —
/// the raft log, the hard state and `log_last` alike — so a record that must not roll back
/// with them has to live outside sled.
pub const COMMIT_FILE: &str = "venom-commit";

/// How often, at most, [`COMMIT_FILE`] is synced. It is rewritten in place after every
/// flush that moved the commit index (one `pwrite`, no sync), so a stop or a crash of the
/// process loses none of it; a power cut may take back what was written since its last
/// sync, which leaves a record lower than the truth (never higher: it is written after
/// sled's sync). A log that lost only entries committed that recently is found by the
/// leader's first heartbeat instead (see `replica::membership`).
const COMMIT_SYNC_EVERY: Duration = Duration::from_millis(200);

/// The record in [`COMMIT_FILE`] for `commit`: one fixed-width line (so an in-place
/// rewrite leaves nothing of the previous one, and it stays within one disk sector,
/// which a device writes whole) holding the index and a CRC32 of it.
fn commit_line(commit: u64) -> String {
    let value = format!("venom commit {commit:020}");
    format!("{value} crc32 {:08x}\n", crc32fast::hash(value.as_bytes()))
}

/// The commit index [`COMMIT_FILE`] in `dir` records (`None` without one or while it is
/// still empty), or why it does not read back.
fn read_commit_file(dir: &Path) -> Result<Option<u64>, String> {
    let text = match std::fs::read(dir.join(COMMIT_FILE)) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.to_string()),
    };
    if text.is_empty() {
        return Ok(None);
    }
    let text = String::from_utf8_lossy(&text);
    let parsed = text.strip_suffix('\n').and_then(|line| {
        let (value, crc) = line.split_once(" crc32 ")?;
        let crc = u32::from_str_radix(crc, 16).ok()?;
        let commit: u64 = value.strip_prefix("venom commit ")?.parse().ok()?;
        Some((value, crc, commit))
    });
    match parsed {
        None => Err(format!("`{}` is not a commit record", text.trim_end())),
        Some((value, crc, _)) if crc32fast::hash(value.as_bytes()) != crc => {
            Err("checksum mismatch".into())
        }
        Some((_, _, commit)) => Ok(Some(commit)),
    }
}

/// [`COMMIT_FILE`] as this process keeps it.
#[derive(Debug, Default)]
struct CommitRecord {
    /// Open once the file exists (created durably on first use).
    file: Option<std::fs::File>,
    /// The commit index written last (or read at open).
    commit: u64,
    /// Whether the last write has not been synced yet, and when the file last was.
    unsynced: bool,
    synced_at: Option<Instant>,
}

impl CommitRecord {
    /// Rewrites the record in place with `commit` (creating the file, and syncing it and
    /// its directory, the first time), then syncs it if the last sync is at least
    /// [`COMMIT_SYNC_EVERY`] old.
    fn write(&mut self, dir: &Path, commit: u64) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt as _;
        if commit > self.commit {
            let line = commit_line(commit);
            match &self.file {
                Some(file) => {
                    file.write_all_at(line.as_bytes(), 0)?;
                    self.unsynced = true;
                }
                None => {
                    let file = std::fs::OpenOptions::new()
                        .read(true)
                        .write(true)
                        .create(true)
                        .truncate(false)
                        .open(dir.join(COMMIT_FILE))?;
                    file.write_all_at(line.as_bytes(), 0)?;
                    file.sync_all()?;
                    durable::sync_dir(dir)?;
                    self.file = Some(file);
                    self.synced_at = Some(Instant::now());
                }
            }
            self.commit = commit;
        }
        let due = self
            .synced_at
            .is_none_or(|at| at.elapsed() >= COMMIT_SYNC_EVERY);
        if let (true, true, Some(file)) = (self.unsynced, due, &self.file) {
            file.sync_data()?;
            self.unsynced = false;
            self.synced_at = Some(Instant::now());
        }
        Ok(())
    }
}

// Tree names.
const LOG_TREE: &str = "raft_log";
const META_TREE: &str = "raft_meta";
const STATE_TREE: &str = "state";

// Keys of the `raft_meta` tree.
const HARD_STATE: &str = "hard_state";
const SNAPSHOT_INDEX: &str = "snapshot_index";
const SNAPSHOT_TERM: &str = "snapshot_term";
/// The index of the last entry this member appended (what it may have acknowledged).
const LOG_LAST: &str = "log_last";
/// Set once the store holds a cluster's initial state (or a joiner's empty one).
const INITIALIZED: &str = "initialized";

// Keys of the `state` tree. Each kind has its own prefix ending in `/`, so a prefix
// scan of one kind never meets another.
const APPLIED: &[u8] = b"m/applied";
const NEXT_WAVE_ID: &[u8] = b"m/next_wave_id";
const STALE_RESULTS: &[u8] = b"m/stale_results";
const MEMBERS: &[u8] = b"m/members";
const CLUSTER_ID: &[u8] = b"m/cluster_id";
const MEMBERS_STARTED: &[u8] = b"m/members_started";
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

// ----- framing: a checksum in front of every value -----

/// Bytes of the checksum in front of every stored value.
const CHECKSUM_BYTES: usize = 4;

/// The checksum of one record: CRC32 of its key, then its payload. Covering the key means
/// a value that ends up under another key (a damaged key) fails it too.
fn checksum(key: &[u8], payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(key);
    hasher.update(payload);
    hasher.finalize()
}

/// A value as stored: the checksum (little-endian), then the payload.
fn frame(key: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut value = Vec::with_capacity(CHECKSUM_BYTES + payload.len());
    value.extend_from_slice(&checksum(key, payload).to_le_bytes());
    value.extend_from_slice(payload);
    value
}

/// Adds `key` → framed `payload` to `batch`.
fn put(batch: &mut sled::Batch, key: impl AsRef<[u8]>, payload: &[u8]) {
    let key = key.as_ref();
    batch.insert(key, frame(key, payload));
}

/// A key as people read it: `entry 12` in the log, `t/3/7` for micro-task 7 of wave 3.
fn describe_key(tree: &str, key: &[u8]) -> String {
    let hex = || key.iter().map(|b| format!("{b:02x}")).collect::<String>();
    if tree == LOG_TREE {
        return match <[u8; 8]>::try_from(key) {
            Ok(index) => format!("entry {}", u64::from_be_bytes(index)),
            Err(_) => format!("key 0x{}", hex()),
        };
    }
    if key.len() == WAVE.len() + 8 && key.starts_with(WAVE) {
        return format!("w/{}", read_u64(&key[WAVE.len()..]));
    }
    if key.len() == TASK.len() + 12 && key.starts_with(TASK) {
        let micro = <[u8; 4]>::try_from(&key[TASK.len() + 8..]).map_or(0, u32::from_be_bytes);
        return format!("t/{}/{micro}", read_u64(&key[TASK.len()..TASK.len() + 8]));
    }
    match std::str::from_utf8(key) {
        Ok(text) if !text.chars().any(char::is_control) => text.to_string(),
        _ => format!("key 0x{}", hex()),
    }
}

/// One sled tree whose values carry a checksum, checked on every read.
#[derive(Clone)]
struct Framed {
    name: &'static str,
    tree: sled::Tree,
    dir: Arc<PathBuf>,
}

impl Framed {
    fn open(db: &sled::Db, name: &'static str, dir: &Path) -> Result<Self, StoreError> {
        Ok(Self {
            name,
            tree: db.open_tree(name)?,
            dir: Arc::new(dir.to_path_buf()),
        })
    }

    /// The corruption error for record `key` of this tree.
    fn corrupt(&self, key: &[u8], problem: impl Into<String>) -> StoreError {
        StoreError::Corrupt {
            dir: self.dir.as_ref().clone(),
            tree: self.name,
            key: describe_key(self.name, key),
            problem: problem.into(),
        }
    }

    /// The payload of the stored `value` of `key`, once its checksum matches.
    fn check(&self, key: &[u8], value: sled::IVec) -> Result<sled::IVec, StoreError> {
        let Some(stored) = value.get(..CHECKSUM_BYTES) else {
            return Err(self.corrupt(
                key,
                format!("{} bytes, shorter than its checksum", value.len()),
            ));
        };
        let mut expected = [0u8; CHECKSUM_BYTES];
        expected.copy_from_slice(stored);
        let payload = value.subslice(CHECKSUM_BYTES, value.len() - CHECKSUM_BYTES);
        if checksum(key, &payload) != u32::from_le_bytes(expected) {
            return Err(self.corrupt(key, "checksum mismatch"));
        }
        Ok(payload)
    }

    fn get(&self, key: impl AsRef<[u8]>) -> Result<Option<sled::IVec>, StoreError> {
        let key = key.as_ref();
        match self.tree.get(key)? {
            None => Ok(None),
            Some(value) => self.check(key, value).map(Some),
        }
    }

    /// A big-endian u64 record (`None` when absent).
    fn get_u64(&self, key: impl AsRef<[u8]>) -> Result<Option<u64>, StoreError> {
        let key = key.as_ref();
        match self.get(key)? {
            None => Ok(None),
            Some(payload) => match <[u8; 8]>::try_from(payload.as_ref()) {
                Ok(bytes) => Ok(Some(u64::from_be_bytes(bytes))),
                Err(_) => {
                    Err(self.corrupt(key, format!("{} bytes where a u64 belongs", payload.len())))
                }
            },
        }
    }

    fn insert(&self, key: impl AsRef<[u8]>, payload: &[u8]) -> Result<(), StoreError> {
        let key = key.as_ref();
        self.tree.insert(key, frame(key, payload))?;
        Ok(())
    }

    /// Checks one item of an iteration over the raw tree.
    fn checked(
        &self,
        item: sled::Result<(sled::IVec, sled::IVec)>,
    ) -> Result<(sled::IVec, sled::IVec), StoreError> {
        let (key, value) = item?;
        let payload = self.check(&key, value)?;
        Ok((key, payload))
    }

    fn scan_prefix<'a>(
        &'a self,
        prefix: &[u8],
    ) -> impl Iterator<Item = Result<(sled::IVec, sled::IVec), StoreError>> + 'a {
        self.tree
            .scan_prefix(prefix)
            .map(move |item| self.checked(item))
    }

    fn range<'a, R: std::ops::RangeBounds<[u8; 8]>>(
        &'a self,
        range: R,
    ) -> impl Iterator<Item = Result<(sled::IVec, sled::IVec), StoreError>> + 'a {
        self.tree.range(range).map(move |item| self.checked(item))
    }

    fn iter(&self) -> impl Iterator<Item = Result<(sled::IVec, sled::IVec), StoreError>> + '_ {
        self.tree.iter().map(move |item| self.checked(item))
    }
}

// ----- sled's panics -----

thread_local! {
    /// While [`catch_sled_panics`] runs on this thread: the slot for the message of a panic
    /// inside it (which the panic hook fills instead of printing it).
    static PANIC_SLOT: RefCell<Option<Option<String>>> = const { RefCell::new(None) };
}

/// Installs, once per process, a panic hook that stays quiet about panics inside
/// [`catch_sled_panics`] (they become one error; printing sled's message as well would
/// say the same thing twice, without the way out) and hands every other panic, on any
/// thread, to the hook that was there before.
fn install_quiet_panic_hook() {
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    INSTALLED.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let message = match info.payload().downcast_ref::<&str>() {
                Some(text) => (*text).to_string(),
                None => info
                    .payload()
                    .downcast_ref::<String>()
                    .cloned()
                    .unwrap_or_else(|| "no message".into()),
            };
            let message = match info.location() {
                Some(at) => format!("{message}, at {}:{}", at.file(), at.line()),
                None => message,
            };
            let caught = PANIC_SLOT.with(|slot| match slot.try_borrow_mut() {
                Ok(mut slot) => match slot.as_mut() {
                    Some(caught) => {
                        *caught = Some(message);
                        true
                    }
                    None => false,
                },
                Err(_) => false,
            });
            if !caught {
                previous(info);
            }
        }));
    });
}

/// Runs `read` (opening or reading the store in `dir`) and turns a panic inside it into
/// [`StoreError::SledPanicked`]. sled 0.34 panics on some damaged files (e.g. "tried to
/// serialize Uninitialized" while recovering a page table that points into a damaged
/// segment) instead of returning its corruption error.
///
/// Unwind safety: `read` only opens and reads, and after a panic nothing it touched is used
/// again — the caller refuses to start on this data dir. What `read` must not do is drop a
/// sled handle while unwinding (sled's drop flushes a database now in an unknown state and
/// could panic a second time, which aborts); [`Store::open_verified`] keeps its handle in a
/// `ManuallyDrop` for that reason, leaking it on a panic.
fn catch_sled_panics<R>(
    dir: &Path,
    read: impl FnOnce() -> Result<R, StoreError>,
) -> Result<R, StoreError> {
    install_quiet_panic_hook();
    let outer = PANIC_SLOT.with(|slot| slot.replace(Some(None)));
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(read));
    let caught = PANIC_SLOT.with(|slot| slot.replace(outer)).flatten();
    match outcome {
        Ok(result) => result,
        Err(_) => Err(StoreError::SledPanicked {
            dir: dir.to_path_buf(),
            message: caught.unwrap_or_else(|| "no message".into()),
        }),
    }
}

/// What [`Store::open_verified`] found in a whole store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verified {
    /// The log's first and last index (`first > last` when it holds no entry).
    pub first_index: u64,
    pub last_index: u64,
    /// Records checked, all trees together.
    pub n_records: u64,
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
        // A damaged record is reported by `verify`; until then it counts as none.
        let commit_record = CommitRecord {
            commit: read_commit_file(dir).ok().flatten().unwrap_or(0),
            ..CommitRecord::default()
        };
        Ok(Self {
            dir: dir.to_path_buf(),
            commit_record: Arc::new(Mutex::new(commit_record)),
            log: Framed::open(&db, LOG_TREE, dir)?,
            meta: Framed::open(&db, META_TREE, dir)?,
            state: Framed::open(&db, STATE_TREE, dir)?,
            snapshot_wanted: Arc::new(AtomicBool::new(false)),
            files: Arc::new(Mutex::new(files)),
            db,
        })
    }

    /// Opens the database in `dir` and reads all of it once ([`Store::verify`]) before
    /// anyone uses it, with sled's panics turned into [`StoreError::SledPanicked`]. Any
    /// error for which [`StoreError::is_corruption`] holds means the files are damaged.
    pub fn open_verified(dir: &Path) -> Result<(Self, Verified), StoreError> {
        catch_sled_panics(dir, || {
            // Not dropped if `verify` panics (see `catch_sled_panics`).
            let store = std::mem::ManuallyDrop::new(Self::open(dir)?);
            let verified = store.verify();
            let store = std::mem::ManuallyDrop::into_inner(store);
            verified.map(|verified| (store, verified))
        })
    }

    /// Reads the whole store and checks that it is whole: every record's checksum in every
    /// tree; the hard state and every log entry decode, each under its own index; the log
    /// is contiguous from the entry after the snapshot point; it reaches the last index
    /// this member appended, the hard state's commit and the commit in [`COMMIT_FILE`]
    /// (entries it may have acknowledged, and entries it knew committed); the checkpoint's
    /// applied index is not beyond the commit. Reads everything a start reads, so sled meets every damaged
    /// page here, inside [`Store::open_verified`]'s guard.
    pub fn verify(&self) -> Result<Verified, StoreError> {
        let mut n_records = 0u64;
        for item in self.meta.iter() {
            item?;
            n_records += 1;
        }
        let hs: HardState = self.meta_proto(HARD_STATE)?;
        let (snap_index, _) = self.snapshot_index_term()?;
        let appended = self.meta.get_u64(LOG_LAST)?.unwrap_or(0);
        let recorded = read_commit_file(&self.dir)
            .map_err(|problem| StoreError::CommitRecord {
                dir: self.dir.clone(),
                problem,
            })?
            .unwrap_or(0);
        let first_index = snap_index + 1;
        // The index the next entry must have.
        let mut next = first_index;
        for item in self.log.iter() {
            let (key, payload) = item?;
            n_records += 1;
            let index = match <[u8; 8]>::try_from(key.as_ref()) {
                Ok(bytes) => u64::from_be_bytes(bytes),
                Err(_) => return Err(self.log.corrupt(&key, "a key that is not an index")),
            };
            let entry = self.decode_entry(index, &payload)?;
            if entry.index != index {
                return Err(self
                    .log
                    .corrupt(&key, format!("holds entry {} instead", entry.index)));
            }
            if index < first_index {
                // Below the snapshot point: never read (raft treats it as compacted).
                continue;
            }
            if index != next {
                return Err(self.log.corrupt(
                    &u64_key(next),
                    format!(
                        "missing: the log jumps from index {} to {index} (entries lost)",
                        next - 1
                    ),
                ));
            }
            next = index + 1;
        }
        let last_index = next - 1;
        let required = appended.max(hs.commit).max(recorded);
        if required > last_index {
            return Err(self.log.corrupt(
                &u64_key(last_index + 1),
                format!(
                    "missing: the log ends at index {last_index}, but this member appended \
                     entries up to {appended}, its hard state says entries up to {} are \
                     committed, and {COMMIT_FILE} says it made entries up to {recorded} \
                     durable (entries it acknowledged were lost)",
                    hs.commit
                ),
            ));
        }
        for item in self.state.iter() {
            item?;
            n_records += 1;
        }
        let applied = self.persisted_applied()?;
        if !self.is_new()? && applied > hs.commit.max(snap_index) {
            return Err(self.state.corrupt(
                APPLIED,
                format!(
                    "the checkpoint covers index {applied}, beyond the commit index {} the \
                     raft state holds",
                    hs.commit
                ),
            ));
        }
        Ok(Verified {
            first_index,
            last_index,
            n_records,
        })
    }

    /// The directory the database lives in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Makes everything written so far durable: sled writes out its buffers, then its
    /// files are synced (see [`SledFiles`]). When this returns, a power cut loses none of it.
    /// Then the commit index now durable goes to [`COMMIT_FILE`] (see
    /// [`Store::record_commit`]).
    pub fn flush(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        {
            let mut files = match self.files.lock() {
                Ok(files) => files,
                Err(poisoned) => poisoned.into_inner(),
            };
            files.sync().map_err(|error| StoreError::Sync {
                dir: self.dir.clone(),
                error,
            })?;
        }
        self.record_commit()
    }

    /// Right after a flush: records the hard state's commit index in [`COMMIT_FILE`] when it
    /// moved (see [`CommitRecord::write`]). Everything up to that index is on the disk in
    /// sled by then, so the file never claims more than sled kept, and a commit index never
    /// moves back, so no later log may legitimately end before it: [`Store::verify`]
    /// refuses one that does.
    fn record_commit(&self) -> Result<(), StoreError> {
        let commit = self.hard_state()?.commit;
        let mut record = match self.commit_record.lock() {
            Ok(record) => record,
            Err(poisoned) => poisoned.into_inner(),
        };
        record
            .write(&self.dir, commit)
            .map_err(|error| StoreError::Sync {
                dir: self.dir.clone(),
                error,
            })
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
                .insert(SNAPSHOT_INDEX, &u64_key(BOOTSTRAP_INDEX))?;
            self.meta.insert(SNAPSHOT_TERM, &u64_key(BOOTSTRAP_INDEX))?;
        }
        self.meta.insert(INITIALIZED, &[1u8])?;
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
        Ok(self.state.get_u64(CLUSTER_ID)?.unwrap_or(0))
    }

    pub fn set_hard_state(&self, hs: &HardState) -> Result<(), StoreError> {
        self.meta
            .insert(HARD_STATE, &encode_proto(HARD_STATE, hs)?)?;
        Ok(())
    }

    pub fn hard_state(&self) -> Result<HardState, StoreError> {
        self.meta_proto(HARD_STATE)
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
            Some(payload) => self.decode_state(MEMBERS, &payload),
        }
    }

    /// Decodes a state-machine record whose checksum matched.
    fn decode_state<T: serde::de::DeserializeOwned>(
        &self,
        key: &[u8],
        payload: &[u8],
    ) -> Result<T, StoreError> {
        bincode::deserialize(payload).map_err(|source| {
            self.state
                .corrupt(key, format!("does not decode: {source}"))
        })
    }

    fn meta_proto<M: protobuf::Message + Default>(&self, key: &str) -> Result<M, StoreError> {
        match self.meta.get(key)? {
            None => Ok(M::default()),
            Some(bytes) => {
                let mut m = M::default();
                m.merge_from_bytes(&bytes).map_err(|source| {
                    self.meta
                        .corrupt(key.as_bytes(), format!("does not decode: {source}"))
                })?;
                Ok(m)
            }
        }
    }

    fn snapshot_index_term(&self) -> Result<(u64, u64), StoreError> {
        let index = self.meta.get_u64(SNAPSHOT_INDEX)?.unwrap_or(0);
        let term = self.meta.get_u64(SNAPSHOT_TERM)?.unwrap_or(0);
        Ok((index, term))
    }

    /// Appends entries, first dropping any conflicting suffix of the log, and records the
    /// new last index as `log_last` in the same sled transaction (so the record and the
    /// log it describes never disagree after a crash).
    pub fn append(&self, entries: &[Entry]) -> Result<(), StoreError> {
        let (Some(first), Some(last)) = (entries.first(), entries.last()) else {
            return Ok(());
        };
        let mut log_batch = sled::Batch::default();
        // Drop every stored entry at or after the first new index (a leader overwrote them).
        for key in self.log.tree.range(u64_key(first.index)..).keys() {
            log_batch.remove(key?);
        }
        for entry in entries {
            let bytes = entry
                .write_to_bytes()
                .map_err(|source| StoreError::Protobuf {
                    key: format!("entry {}", entry.index),
                    source,
                })?;
            put(&mut log_batch, u64_key(entry.index), &bytes);
        }
        let mut meta_batch = sled::Batch::default();
        put(&mut meta_batch, LOG_LAST, &u64_key(last.index));
        self.transact(None, &log_batch, &meta_batch)
    }

    /// Decodes the payload of log entry `index`.
    fn decode_entry(&self, index: u64, payload: &[u8]) -> Result<Entry, StoreError> {
        let mut entry = Entry::default();
        entry.merge_from_bytes(payload).map_err(|source| {
            self.log
                .corrupt(&u64_key(index), format!("does not decode: {source}"))
        })?;
        Ok(entry)
    }

    fn entry(&self, index: u64) -> Result<Option<Entry>, StoreError> {
        match self.log.get(u64_key(index))? {
            None => Ok(None),
            Some(payload) => self.decode_entry(index, &payload).map(Some),
        }
    }

    /// Index of the last entry in the log (the snapshot index when it is empty).
    pub fn last_log_index(&self) -> Result<u64, StoreError> {
        let snap_index = self.snapshot_index_term()?.0;
        match self.log.tree.last()? {
            Some((key, _)) => Ok(read_u64(&key).max(snap_index)),
            None => Ok(snap_index),
        }
    }

    /// Index of the first entry still in the log (`snapshot_index + 1` when it is empty).
    pub fn first_log_index(&self) -> Result<u64, StoreError> {
        let after_snapshot = self.snapshot_index_term()?.0 + 1;
        match self.log.tree.first()? {
            Some((key, _)) => Ok(read_u64(&key).max(after_snapshot)),
            None => Ok(after_snapshot),
        }
    }

    /// The applied index of the last checkpoint (0 before the first).
    pub fn persisted_applied(&self) -> Result<u64, StoreError> {
        Ok(self.state.get_u64(APPLIED)?.unwrap_or(0))
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
        for key in self.log.tree.range(..=u64_key(to_index)).keys() {
            log_batch.remove(key?);
        }
        let mut meta_batch = sled::Batch::default();
        put(&mut meta_batch, SNAPSHOT_INDEX, &u64_key(to_index));
        put(&mut meta_batch, SNAPSHOT_TERM, &u64_key(last_deleted.term));
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
            (&self.state.tree, &self.log.tree, &self.meta.tree).transaction(
                |(state, log, meta)| {
                    if let Some(batch) = state_batch {
                        state.apply_batch(batch)?;
                    }
                    log.apply_batch(log_batch)?;
                    meta.apply_batch(meta_batch)?;
                    Ok::<(), ConflictableTransactionError<std::convert::Infallible>>(())
                },
            );
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
        for key in self.state.tree.iter().keys() {
            state_batch.remove(key?);
        }
        // The batch is a map: the inserts below override the removals of live keys.
        self.fill_state_batch(&mut state_batch, state, index)?;
        let mut log_batch = sled::Batch::default();
        for key in self.log.tree.iter().keys() {
            log_batch.remove(key?);
        }
        let mut hs = self.hard_state()?;
        hs.commit = hs.commit.max(index);
        hs.term = hs.term.max(term);
        let mut meta_batch = sled::Batch::default();
        put(&mut meta_batch, SNAPSHOT_INDEX, &u64_key(index));
        put(&mut meta_batch, SNAPSHOT_TERM, &u64_key(term));
        // The log now ends at the snapshot point: nothing after it was kept.
        put(&mut meta_batch, LOG_LAST, &u64_key(index));
        put(&mut meta_batch, HARD_STATE, &encode_proto(HARD_STATE, &hs)?);
        self.transact(Some(&state_batch), &log_batch, &meta_batch)
    }

    // ----- state machine -----

    /// Writes the keys `state` marked dirty plus the applied index, atomically.
    pub fn persist_state(&self, state: &mut State, applied: u64) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        self.fill_state_batch(&mut batch, state, applied)?;
        self.state.tree.apply_batch(batch)?;
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
                    put(batch, key, &bytes);
                }
                None => batch.remove(key),
            }
        }
        for (id, micro) in dirty.tasks {
            let key = [TASK, &u64_key(id), &micro.to_be_bytes()].concat();
            if let Some(task) = state.task((id, micro)) {
                let bytes = bincode::serialize(task).map_err(|e| bincode_err(&key, e))?;
                put(batch, key, &bytes);
            }
        }
        for name in dirty.nodes {
            let key = [NODE, name.as_bytes()].concat();
            if let Some(node) = state.nodes.get(&name) {
                let bytes = bincode::serialize(node).map_err(|e| bincode_err(&key, e))?;
                put(batch, key, &bytes);
            }
        }
        for wave_id in dirty.submissions {
            let key = [SUBMISSION, &u64_key(wave_id)].concat();
            match state.submissions.get(wave_id) {
                Some(submission) => {
                    let bytes = bincode::serialize(submission).map_err(|e| bincode_err(&key, e))?;
                    put(batch, key, &bytes);
                }
                None => batch.remove(key),
            }
        }
        if dirty.members {
            let bytes = bincode::serialize(&state.members).map_err(|e| bincode_err(MEMBERS, e))?;
            put(batch, MEMBERS, &bytes);
            put(batch, CLUSTER_ID, &u64_key(state.cluster_id));
            let started = bincode::serialize(&state.members_started)
                .map_err(|e| bincode_err(MEMBERS_STARTED, e))?;
            put(batch, MEMBERS_STARTED, &started);
        }
        put(batch, APPLIED, &u64_key(applied));
        put(batch, NEXT_WAVE_ID, &u64_key(state.next_wave_id));
        put(batch, STALE_RESULTS, &u64_key(state.stale_results));
        Ok(())
    }

    /// Loads the state machine and its applied index.
    pub fn load_state(&self, state: &mut State) -> Result<u64, StoreError> {
        let applied = self.persisted_applied()?;
        state.next_wave_id = self.state.get_u64(NEXT_WAVE_ID)?.unwrap_or(1).max(1);
        state.stale_results = self.state.get_u64(STALE_RESULTS)?.unwrap_or(0);
        state.members = self.members()?;
        state.cluster_id = self.cluster_id()?;
        if let Some(payload) = self.state.get(MEMBERS_STARTED)? {
            state.members_started = self.decode_state(MEMBERS_STARTED, &payload)?;
        }
        for item in self.state.scan_prefix(WAVE) {
            let (key, payload) = item?;
            let header: WaveHeader = self.decode_state(&key, &payload)?;
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
            let (key, payload) = item?;
            if key.len() != TASK.len() + 12 {
                continue;
            }
            let id = read_u64(&key[TASK.len()..TASK.len() + 8]);
            let task: MicroTask = self.decode_state(&key, &payload)?;
            // Keys iterate in (wave, micro) order, so pushing rebuilds the flat vector.
            if let Some(wave) = state.waves.get_mut(&id) {
                wave.tasks.push(task);
            }
        }
        for item in self.state.scan_prefix(NODE) {
            let (key, payload) = item?;
            let node: Node = self.decode_state(&key, &payload)?;
            state.nodes.insert(node.spec.name.clone(), node);
        }
        let mut submissions = Vec::new();
        for item in self.state.scan_prefix(SUBMISSION) {
            let (key, payload) = item?;
            let submission: Submission = self.decode_state(&key, &payload)?;
            submissions.push(submission);
        }
        // Keys iterate in wave order, which is the order they were remembered in.
        state.submissions.restore(submissions);
        state.rebuild_indexes();
        Ok(applied)
    }
}

#[cfg(test)]
impl Store {
    /// Changes the stored bytes (checksum and payload) of `key` in `tree` the way damage
    /// on the disk would: below the framing, through sled, so sled's own checks pass.
    /// `change` gets `None` for a missing record; leaving `None` removes it.
    pub(crate) fn damage(&self, tree: &str, key: &[u8], change: impl FnOnce(&mut Option<Vec<u8>>)) {
        let tree = match tree {
            LOG_TREE => &self.log.tree,
            META_TREE => &self.meta.tree,
            _ => &self.state.tree,
        };
        let mut value = tree.get(key).expect("read raw").map(|v| v.to_vec());
        change(&mut value);
        match value {
            Some(value) => tree.insert(key, value).map(drop),
            None => tree.remove(key).map(drop),
        }
        .expect("write raw");
        self.flush().expect("flush");
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
            let (key, payload) = item.map_err(store_error)?;
            let entry = self
                .decode_entry(read_u64(&key), &payload)
                .map_err(store_error)?;
            size += payload.len() as u64;
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
        let (store, verified) = Store::open_verified(dir.path()).expect("reopen, verified");
        assert_eq!((verified.first_index, verified.last_index), (1, 2));
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
        let (store, verified) = Store::open_verified(dir.path()).expect("reopen, verified");
        assert_eq!((verified.first_index, verified.last_index), (16, 20));
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
        let (follower, verified) =
            Store::open_verified(follower_dir.path()).expect("reopen, verified");
        assert_eq!((verified.first_index, verified.last_index), (26, 25));
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

    // ----- integrity -----

    /// `(tree, key, problem)` of a corruption error; panics on any other error.
    fn corruption(e: StoreError) -> (&'static str, String, String) {
        match e {
            StoreError::Corrupt {
                tree, key, problem, ..
            } => (tree, key, problem),
            other => panic!("not a corruption error: {other}"),
        }
    }

    /// The corruption behind an error raft-rs got from the store.
    fn raft_corruption(e: raft::Error) -> (&'static str, String, String) {
        match e {
            raft::Error::Store(StorageError::Other(inner)) => {
                match inner.downcast::<StoreError>() {
                    Ok(e) => corruption(*e),
                    Err(other) => panic!("not a store error: {other}"),
                }
            }
            other => panic!("not a store error: {other}"),
        }
    }

    /// A store holding entries 1..=n (term 1), committed up to `commit`, flushed.
    fn log_of(dir: &Path, n: u64, commit: u64) -> Store {
        let store = Store::open(dir).expect("open");
        store.bootstrap(&BTreeMap::new(), 1).expect("bootstrap");
        let entries: Vec<Entry> = (1..=n).map(|i| entry(i, 1)).collect();
        store.append(&entries).expect("append");
        store
            .set_hard_state(&HardState {
                term: 1,
                commit,
                ..HardState::default()
            })
            .expect("hs");
        store.flush().expect("flush");
        store
    }

    #[test]
    fn every_flipped_bit_of_a_stored_entry_is_found_on_read_and_at_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = log_of(dir.path(), 3, 3);
        let key = u64_key(2);
        let good = store.log.tree.get(key).expect("raw").expect("entry 2");
        assert!(good.len() > CHECKSUM_BYTES, "a payload behind the checksum");
        for byte in 0..good.len() {
            for bit in 0..8 {
                store.damage(LOG_TREE, &key, |v| {
                    if let Some(v) = v {
                        v[byte] ^= 1 << bit;
                    }
                });
                let at = format!("byte {byte} bit {bit}");
                let read = store.entries(1, 4, None, GetEntriesContext::empty(false));
                let (tree, key_named, problem) = raft_corruption(read.expect_err(&at));
                assert_eq!((tree, key_named.as_str()), ("raft_log", "entry 2"), "{at}");
                assert_eq!(problem, "checksum mismatch", "{at}");
                assert!(store.term(2).is_err(), "{at}");
                assert!(store.term(1).is_ok(), "entry 1 is whole ({at})");
                let (_, named, _) = corruption(store.verify().expect_err(&at));
                assert_eq!(named, "entry 2", "{at}");
                store.damage(LOG_TREE, &key, |v| *v = Some(good.to_vec()));
            }
        }
        assert_eq!(store.verify().expect("whole again").last_index, 3);
        drop(store);
        // Through sled and back: the damage is found by a fresh open too.
        Store::open(dir.path())
            .expect("open")
            .damage(LOG_TREE, &key, |v| {
                if let Some(v) = v {
                    let last = v.len() - 1;
                    v[last] ^= 0x40;
                }
            });
        let err = Store::open_verified(dir.path()).expect_err("damaged");
        assert!(err.is_corruption(), "{err}");
        let text = err.to_string();
        assert!(
            text.contains("entry 2") && text.contains(&dir.path().display().to_string()),
            "{text}"
        );
    }

    #[test]
    fn a_value_found_under_another_key_fails_its_checksum() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = log_of(dir.path(), 3, 3);
        let two = store
            .log
            .tree
            .get(u64_key(2))
            .expect("raw")
            .expect("entry 2");
        store.damage(LOG_TREE, &u64_key(3), |v| *v = Some(two.to_vec()));
        let (_, key, problem) = raft_corruption(store.term(3).expect_err("moved value"));
        assert_eq!(
            (key.as_str(), problem.as_str()),
            ("entry 3", "checksum mismatch")
        );
    }

    #[test]
    fn a_flipped_byte_in_a_state_record_is_found_on_read_and_at_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let mut state = sample_state();
        store.persist_state(&mut state, 0).expect("persist");
        let task_key = [TASK, &u64_key(1), &1u32.to_be_bytes()].concat();
        let node_key = [NODE, b"next".as_slice()].concat();
        for (key, named, byte) in [
            (task_key.as_slice(), "t/1/1", 6),
            (node_key.as_slice(), "next", usize::MAX),
            (APPLIED, "m/applied", 0),
        ] {
            let good = store.state.tree.get(key).expect("raw").expect("record");
            store.damage(STATE_TREE, key, |v| {
                if let Some(v) = v {
                    let at = byte.min(v.len() - 1);
                    v[at] ^= 0x01;
                }
            });
            let (tree, key_named, problem) =
                corruption(store.load_state(&mut State::default()).expect_err(named));
            assert_eq!(tree, "state");
            assert!(key_named.ends_with(named), "{key_named} for {named}");
            assert_eq!(problem, "checksum mismatch");
            let (_, at_open, _) = corruption(store.verify().expect_err(named));
            assert!(at_open.ends_with(named), "{at_open}");
            store.damage(STATE_TREE, key, |v| *v = Some(good.to_vec()));
        }
        let mut loaded = State::new(WaveLimits::default());
        store.load_state(&mut loaded).expect("whole again");
        assert_eq!(loaded.waves, state.waves);
    }

    #[test]
    fn a_missing_entry_in_the_middle_of_the_log_is_found_at_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        log_of(dir.path(), 6, 4).damage(LOG_TREE, &u64_key(3), |v| *v = None);
        let (tree, key, problem) =
            corruption(Store::open_verified(dir.path()).expect_err("hole at 3"));
        assert_eq!((tree, key.as_str()), ("raft_log", "entry 3"));
        assert!(problem.contains("jumps from index 2 to 4"), "{problem}");
    }

    #[test]
    fn a_log_cut_short_at_the_tail_is_found_at_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        // The last appended entry is gone (it was never committed, but may have been
        // acknowledged).
        log_of(dir.path(), 6, 4).damage(LOG_TREE, &u64_key(6), |v| *v = None);
        let (_, key, problem) = corruption(Store::open_verified(dir.path()).expect_err("tail"));
        assert_eq!(key, "entry 6");
        assert!(
            problem.contains("ends at index 5") && problem.contains("appended entries up to 6"),
            "{problem}"
        );
        // Cut below the commit index, with the record of the last append cut with it.
        {
            let store = Store::open(dir.path()).expect("open");
            store.damage(LOG_TREE, &u64_key(5), |v| *v = None);
            store.damage(LOG_TREE, &u64_key(4), |v| *v = None);
            store.damage(META_TREE, LOG_LAST.as_bytes(), |v| {
                *v = Some(frame(LOG_LAST.as_bytes(), &u64_key(3)));
            });
        }
        let (_, key, problem) =
            corruption(Store::open_verified(dir.path()).expect_err("below commit"));
        assert_eq!(key, "entry 4");
        assert!(
            problem.contains("entries up to 4 are committed"),
            "{problem}"
        );
    }

    #[test]
    fn a_log_rolled_back_whole_is_found_against_the_commit_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = log_of(dir.path(), 6, 5);
        assert_eq!(
            read_commit_file(dir.path()),
            Ok(Some(5)),
            "written by the flush"
        );
        // What sled's recovery does when a byte of its log is damaged: everything after the
        // damage is gone, the raft log, the hard state and `log_last` together.
        store.damage(LOG_TREE, &u64_key(6), |v| *v = None);
        store.damage(LOG_TREE, &u64_key(5), |v| *v = None);
        store
            .set_hard_state(&HardState {
                term: 1,
                commit: 3,
                ..HardState::default()
            })
            .expect("hs");
        store.damage(META_TREE, LOG_LAST.as_bytes(), |v| {
            *v = Some(frame(LOG_LAST.as_bytes(), &u64_key(4)));
        });
        assert_eq!(
            read_commit_file(dir.path()),
            Ok(Some(5)),
            "never moves back"
        );
        drop(store);
        let (_, key, problem) =
            corruption(Store::open_verified(dir.path()).expect_err("rolled back"));
        assert_eq!(key, "entry 5");
        assert!(
            problem.contains("venom-commit says it made entries up to 5 durable"),
            "{problem}"
        );
        // The record itself is checked too.
        let path = dir.path().join(COMMIT_FILE);
        let text = std::fs::read_to_string(&path).expect("read");
        assert_eq!(text, commit_line(5));
        std::fs::write(&path, text.replace("005 crc32", "002 crc32")).expect("write");
        let err = Store::open_verified(dir.path()).expect_err("damaged record");
        assert!(
            matches!(&err, StoreError::CommitRecord { problem, .. } if problem == "checksum mismatch"),
            "{err}"
        );
        assert!(err.is_corruption());
    }

    #[test]
    fn every_flush_that_moves_the_commit_index_rewrites_the_record_and_none_moves_it_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let set_commit = |store: &Store, commit: u64| {
            store
                .set_hard_state(&HardState {
                    term: 1,
                    commit,
                    ..HardState::default()
                })
                .expect("hs");
            store.flush().expect("flush");
        };
        {
            let store = log_of(dir.path(), 6, 2);
            assert_eq!(read_commit_file(dir.path()), Ok(Some(2)));
            for commit in 3..=6 {
                set_commit(&store, commit);
                assert_eq!(read_commit_file(dir.path()), Ok(Some(commit)));
            }
        }
        let store = Store::open(dir.path()).expect("reopen");
        set_commit(&store, 4);
        assert_eq!(read_commit_file(dir.path()), Ok(Some(6)));
        let text = std::fs::read_to_string(dir.path().join(COMMIT_FILE)).expect("read");
        assert_eq!(
            text,
            commit_line(6),
            "one fixed-width line, nothing left over"
        );
    }

    #[test]
    fn overwritten_suffixes_compaction_and_snapshots_leave_a_log_that_verifies() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = log_of(dir.path(), 5, 2);
            // A new leader overwrites entries 3..=5 with one entry: the log ends at 3.
            store.append(&[entry(3, 2)]).expect("overwrite");
            store.flush().expect("flush");
        }
        let (store, verified) = Store::open_verified(dir.path()).expect("verified");
        assert_eq!((verified.first_index, verified.last_index), (1, 3));
        assert_eq!(store.meta.get_u64(LOG_LAST).expect("log_last"), Some(3));
    }

    #[test]
    fn a_checkpoint_beyond_the_commit_index_is_found_at_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = log_of(dir.path(), 6, 4);
            store
                .persist_state(&mut State::default(), 6)
                .expect("checkpoint");
            store.flush().expect("flush");
        }
        let (tree, key, _) = corruption(Store::open_verified(dir.path()).expect_err("applied"));
        assert_eq!((tree, key.as_str()), ("state", "m/applied"));
    }

    #[test]
    fn a_panic_inside_sled_becomes_a_corruption_error_and_later_panics_are_not_swallowed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let err = catch_sled_panics(dir.path(), || -> Result<(), StoreError> {
            panic!("tried to serialize Uninitialized")
        })
        .expect_err("panicked");
        assert!(err.is_corruption(), "{err}");
        let text = err.to_string();
        assert!(
            text.contains("tried to serialize Uninitialized")
                && text.contains("storage.rs")
                && text.contains(&dir.path().display().to_string()),
            "{text}"
        );
        // Outside the guard the slot is gone: a panic on this thread reaches the usual hook.
        assert!(PANIC_SLOT.with(|slot| slot.borrow().is_none()));
        assert_eq!(
            catch_sled_panics(dir.path(), || Ok::<_, StoreError>(7)).expect("no panic"),
            7
        );
    }
}
