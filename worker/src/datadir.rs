//! The worker's data dir (`--data-dir`): what must outlive the worker process.
//!
//! - `lock`: an `flock` held for the process's life, so two workers never share a data dir.
//! - `node`: the node name the directory belongs to; a worker started on it under another
//!   name is refused (its results and process groups are another node's).
//! - `cluster`: the cluster id of the last leader that accepted this worker. A registration
//!   carries it, and a coordinator of another cluster ignores the results it brings.
//! - `spool`: finished results the leader has not acknowledged ([`Spool`]). A result is
//!   appended when its attempt ends and made durable (`fdatasync`) before any message carries
//!   it, so a result the leader may have seen survives a crash or a power cut of the worker;
//!   acknowledgements are appended without a sync (losing one only sends a result again).
//! - `groups`: the process groups this worker started and has not seen end
//!   ([`ProcessGroups`]), appended without a sync: after a crash of the worker alone the page
//!   cache still holds them, and a power cut ends the processes too. A restarted worker kills
//!   every group still alive (checked by the leader process's start time, so a reused pid is
//!   never hit) before it registers, so no attempt of its predecessor runs beside the
//!   leader's next one.
//!
//! Every record is `[u32 length][u32 CRC-32][payload]`, little-endian; a torn or corrupt tail
//! is dropped at load with a warning (the records before it are kept).

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::io::{self, Read as _, Write as _};
use std::os::fd::AsRawFd as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

use prost::Message as _;
use venom_core::{AttemptOutcome, AttemptRef};
use venom_proto::v1 as pb;

/// Compact the spool once it is this large and holds few live results.
const SPOOL_COMPACT_BYTES: u64 = 8 << 20;
/// Compact the groups file once it is this large.
const GROUPS_COMPACT_BYTES: u64 = 1 << 20;
/// Longest record accepted at load (a result is bounded by the worker's output limits).
const MAX_RECORD_BYTES: usize = 64 << 20;

/// Why the data dir cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    #[error("--data-dir {dir}: {action}: {source}")]
    Io {
        dir: PathBuf,
        action: &'static str,
        source: io::Error,
    },
    #[error(
        "--data-dir {dir}: another worker process uses this data dir; give each worker a \
         data dir of its own"
    )]
    Locked { dir: PathBuf },
    #[error(
        "--data-dir {dir}: it belongs to node `{stored}`, not `{name}`; start this worker \
         with --name {stored}, or give it another data dir"
    )]
    OtherNode {
        dir: PathBuf,
        stored: String,
        name: String,
    },
}

/// The open data dir.
#[derive(Debug)]
pub struct DataDir {
    dir: PathBuf,
    /// Holds the `flock` while open.
    _lock: File,
    /// The cluster the last leader that accepted this worker belongs to (0: none yet).
    cluster_id: u64,
}

impl DataDir {
    /// Opens (creating, mode 0700) the data dir of node `name`.
    pub fn open(dir: &Path, name: &str) -> Result<Self, DataDirError> {
        let io = |action| {
            let dir = dir.to_path_buf();
            move |source| DataDirError::Io {
                dir,
                action,
                source,
            }
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io("cannot create it"))?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(dir.join("lock"))
            .map_err(io("cannot open its lock file"))?;
        // A process forked by another thread holds a copy of the descriptor until it execs:
        // a lock just released may look taken for a moment.
        let mut tries = 0;
        let locked = loop {
            match lock_exclusive(&lock) {
                Err(error) if error.raw_os_error() == Some(libc::EWOULDBLOCK) && tries < 50 => {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                other => break other,
            }
        };
        if let Err(error) = locked {
            if error.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return Err(DataDirError::Locked {
                    dir: dir.to_path_buf(),
                });
            }
            return Err(io("cannot lock it")(error));
        }
        let node_file = dir.join("node");
        match std::fs::read_to_string(&node_file) {
            Ok(stored) if stored.trim() != name => {
                return Err(DataDirError::OtherNode {
                    dir: dir.to_path_buf(),
                    stored: stored.trim().to_owned(),
                    name: name.to_owned(),
                });
            }
            Ok(_) => {}
            Err(error) if error.kind() == io::ErrorKind::NotFound => {
                write_atomically(dir, "node", format!("{name}\n").as_bytes())
                    .map_err(io("cannot record its node name"))?;
            }
            Err(error) => return Err(io("cannot read its node file")(error)),
        }
        let cluster_id = std::fs::read_to_string(dir.join("cluster"))
            .ok()
            .and_then(|text| text.trim().parse().ok())
            .unwrap_or(0);
        Ok(Self {
            dir: dir.to_path_buf(),
            _lock: lock,
            cluster_id,
        })
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// The cluster of the last leader that accepted this worker (0: none yet).
    pub fn cluster_id(&self) -> u64 {
        self.cluster_id
    }

    /// Records the cluster a leader accepted this worker into.
    pub fn set_cluster_id(&mut self, cluster_id: u64) -> io::Result<()> {
        if cluster_id == self.cluster_id || cluster_id == 0 {
            return Ok(());
        }
        write_atomically(&self.dir, "cluster", format!("{cluster_id}\n").as_bytes())?;
        self.cluster_id = cluster_id;
        Ok(())
    }

    /// Opens the spool and the results it holds.
    pub fn spool(&self) -> io::Result<(Spool, BTreeMap<AttemptRef, AttemptOutcome>)> {
        Spool::open(&self.dir)
    }

    /// Opens the process-group record, returning the groups a previous life left.
    pub fn groups(&self) -> io::Result<(ProcessGroups, Vec<Group>)> {
        ProcessGroups::open(&self.dir)
    }
}

/// Replaces `dir/name` with `bytes`, durably.
fn write_atomically(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, dir.join(name))?;
    File::open(dir)?.sync_all()
}

fn frame(payload: &[u8]) -> Vec<u8> {
    let mut record = Vec::with_capacity(payload.len() + 8);
    record.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    record.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    record.extend_from_slice(payload);
    record
}

/// Splits `bytes` into records; the second value is the length of the valid prefix (less than
/// `bytes.len()` when the tail is torn or corrupt).
fn records(bytes: &[u8]) -> (Vec<&[u8]>, usize) {
    let mut out = Vec::new();
    let mut at = 0;
    while bytes.len() - at >= 8 {
        let len =
            u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]) as usize;
        let crc = u32::from_le_bytes([bytes[at + 4], bytes[at + 5], bytes[at + 6], bytes[at + 7]]);
        if len > MAX_RECORD_BYTES || bytes.len() - at - 8 < len {
            break;
        }
        let payload = &bytes[at + 8..at + 8 + len];
        if crc32fast::hash(payload) != crc {
            break;
        }
        out.push(payload);
        at += 8 + len;
    }
    (out, at)
}

/// Reads `path`'s records, cutting a torn or corrupt tail off the file (with a warning).
fn load(path: &Path) -> io::Result<(File, Vec<Vec<u8>>)> {
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .append(true)
        .mode(0o600)
        .open(path)?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    let (found, valid) = records(&bytes);
    let found: Vec<Vec<u8>> = found.into_iter().map(<[u8]>::to_vec).collect();
    if valid < bytes.len() {
        tracing::warn!(
            file = %path.display(),
            kept_records = found.len(),
            dropped_bytes = bytes.len() - valid,
            "dropping a torn or corrupt tail"
        );
        file.set_len(valid as u64)?;
        file.sync_data()?;
    }
    Ok((file, found))
}

/// Kinds of spool records (the payload's first byte).
const RESULT: u8 = 1;
const ACK: u8 = 2;

/// Finished results not yet acknowledged, on disk.
#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    file: File,
    /// Bytes in the file.
    len: u64,
    /// Bytes appended since the last sync.
    unsynced: bool,
    /// Results in the file not acknowledged (to know when compaction pays).
    live: BTreeSet<AttemptRef>,
}

impl Spool {
    fn path(dir: &Path) -> PathBuf {
        dir.join("spool")
    }

    fn open(dir: &Path) -> io::Result<(Self, BTreeMap<AttemptRef, AttemptOutcome>)> {
        let path = Self::path(dir);
        let (file, found) = load(&path)?;
        let len = file.metadata()?.len();
        let mut results = BTreeMap::new();
        for payload in found {
            let Some((&kind, body)) = payload.split_first() else {
                continue;
            };
            match kind {
                RESULT => {
                    let decoded = pb::TaskFinished::decode(body)
                        .ok()
                        .and_then(venom_proto::convert::from_task_finished);
                    if let Some((attempt, outcome)) = decoded {
                        results.insert(attempt, outcome);
                    }
                }
                ACK => {
                    if let Ok(attempt) = pb::AttemptRef::decode(body) {
                        results.remove(&AttemptRef::from(attempt));
                    }
                }
                _ => {}
            }
        }
        let spool = Self {
            dir: dir.to_path_buf(),
            file,
            len,
            unsynced: false,
            live: results.keys().copied().collect(),
        };
        Ok((spool, results))
    }

    fn append(&mut self, kind: u8, body: &[u8]) -> io::Result<()> {
        let mut payload = Vec::with_capacity(body.len() + 1);
        payload.push(kind);
        payload.extend_from_slice(body);
        let record = frame(&payload);
        self.file.write_all(&record)?;
        self.len += record.len() as u64;
        self.unsynced = true;
        Ok(())
    }

    /// Appends a finished attempt's result (durable at the next [`Spool::sync`]).
    pub fn add(&mut self, attempt: AttemptRef, outcome: &AttemptOutcome) -> io::Result<()> {
        let body = venom_proto::convert::task_finished(attempt, outcome.clone()).encode_to_vec();
        self.append(RESULT, &body)?;
        self.live.insert(attempt);
        Ok(())
    }

    /// Makes every result appended so far durable. Cheap when nothing was appended.
    pub fn sync(&mut self) -> io::Result<()> {
        if self.unsynced {
            self.file.sync_data()?;
            self.unsynced = false;
        }
        Ok(())
    }

    /// The leader recorded these results: forget them (no sync needed).
    pub fn acknowledged(&mut self, attempts: &[AttemptRef]) -> io::Result<()> {
        for attempt in attempts {
            if self.live.remove(attempt) {
                self.append(ACK, &pb::AttemptRef::from(*attempt).encode_to_vec())?;
            }
        }
        if self.len > SPOOL_COMPACT_BYTES && self.live.len() < 1_000 {
            self.compact()?;
        }
        Ok(())
    }

    /// Rewrites the spool with only the live results (atomically, durably).
    fn compact(&mut self) -> io::Result<()> {
        self.sync()?;
        let (_, results) = Self::open(&self.dir)?;
        let mut bytes = Vec::new();
        for (attempt, outcome) in &results {
            let mut payload = vec![RESULT];
            payload.extend(
                venom_proto::convert::task_finished(*attempt, outcome.clone()).encode_to_vec(),
            );
            bytes.extend(frame(&payload));
        }
        write_atomically(&self.dir, "spool", &bytes)?;
        self.file = OpenOptions::new()
            .append(true)
            .read(true)
            .open(Self::path(&self.dir))?;
        self.len = bytes.len() as u64;
        self.live = results.keys().copied().collect();
        Ok(())
    }
}

/// A process group an attempt runs in: its id (the leader's pid) and the leader's start time
/// (clock ticks after boot, `/proc/PID/stat` field 22), which tells a reused pid apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Group {
    pub pgid: u32,
    pub start_ticks: u64,
}

/// The start time of process `pid`, if it exists.
pub fn process_start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// The process groups this worker started and has not seen end, on disk.
#[derive(Debug)]
pub struct ProcessGroups {
    dir: PathBuf,
    file: File,
    len: u64,
    live: BTreeMap<u32, u64>,
}

impl ProcessGroups {
    fn open(dir: &Path) -> io::Result<(Self, Vec<Group>)> {
        let path = dir.join("groups");
        let (_, found) = load(&path)?;
        let mut live = BTreeMap::new();
        for payload in found {
            match payload.as_slice() {
                [b'+', rest @ ..] if rest.len() == 12 => {
                    let pgid = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]);
                    let mut ticks = [0u8; 8];
                    ticks.copy_from_slice(&rest[4..12]);
                    live.insert(pgid, u64::from_le_bytes(ticks));
                }
                [b'-', a, b, c, d] => {
                    live.remove(&u32::from_le_bytes([*a, *b, *c, *d]));
                }
                _ => {}
            }
        }
        let left = live
            .iter()
            .map(|(&pgid, &start_ticks)| Group { pgid, start_ticks })
            .collect();
        // A fresh file for this life: what the predecessor left is handed back to be killed.
        write_atomically(dir, "groups", &[])?;
        let file = OpenOptions::new().append(true).open(&path)?;
        Ok((
            Self {
                dir: dir.to_path_buf(),
                file,
                len: 0,
                live: BTreeMap::new(),
            },
            left,
        ))
    }

    /// An attempt's process group started.
    pub fn started(&mut self, group: Group) -> io::Result<()> {
        let mut payload = vec![b'+'];
        payload.extend_from_slice(&group.pgid.to_le_bytes());
        payload.extend_from_slice(&group.start_ticks.to_le_bytes());
        self.write(&payload)?;
        self.live.insert(group.pgid, group.start_ticks);
        Ok(())
    }

    /// An attempt's process group ended (its leader was reaped).
    pub fn ended(&mut self, pgid: u32) -> io::Result<()> {
        if self.live.remove(&pgid).is_none() {
            return Ok(());
        }
        let mut payload = vec![b'-'];
        payload.extend_from_slice(&pgid.to_le_bytes());
        self.write(&payload)?;
        if self.len > GROUPS_COMPACT_BYTES {
            let mut bytes = Vec::new();
            for (&pgid, &ticks) in &self.live {
                let mut payload = vec![b'+'];
                payload.extend_from_slice(&pgid.to_le_bytes());
                payload.extend_from_slice(&ticks.to_le_bytes());
                bytes.extend(frame(&payload));
            }
            write_atomically(&self.dir, "groups", &bytes)?;
            self.file = OpenOptions::new()
                .append(true)
                .open(self.dir.join("groups"))?;
            self.len = bytes.len() as u64;
        }
        Ok(())
    }

    fn write(&mut self, payload: &[u8]) -> io::Result<()> {
        let record = frame(payload);
        self.file.write_all(&record)?;
        self.len += record.len() as u64;
        Ok(())
    }
}

/// Kills the process groups a previous life of this worker left running (those whose leader
/// is gone are killed too: their other members may live; a leader that is another process now
/// is left alone), then waits, bounded, until they are gone. Returns how many were killed.
pub fn kill_orphans(groups: &[Group], wait: std::time::Duration) -> usize {
    let mut killed = Vec::new();
    for group in groups {
        match process_start_ticks(group.pgid) {
            Some(ticks) if ticks != group.start_ticks => continue,
            _ => {}
        }
        let Ok(pgid) = i32::try_from(group.pgid) else {
            continue;
        };
        if signal_group(pgid, libc::SIGKILL) {
            killed.push(pgid);
        }
    }
    let deadline = std::time::Instant::now() + wait;
    // Signal 0 only checks whether the group still exists.
    while killed.iter().any(|&pgid| signal_group(pgid, 0)) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    killed.len()
}

/// Takes an exclusive `flock` on `file` without waiting.
#[allow(unsafe_code)]
fn lock_exclusive(file: &File) -> io::Result<()> {
    // SAFETY: flock on a descriptor `file` owns for the duration of the call; no memory is
    // involved.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Sends `signal` to process group `pgid`; whether it was delivered.
#[allow(unsafe_code)]
pub(crate) fn signal_group(pgid: i32, signal: i32) -> bool {
    // SAFETY: kill(2) takes plain integers; no memory is involved.
    unsafe { libc::kill(-pgid, signal) == 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attempt(micro: u32) -> AttemptRef {
        AttemptRef {
            wave_id: 3,
            micro,
            attempt: 1,
        }
    }

    fn outcome(code: i32) -> AttemptOutcome {
        AttemptOutcome {
            exit_code: Some(code),
            stdout: b"out".to_vec(),
            started_ms: 5,
            finished_ms: 9,
            ..AttemptOutcome::default()
        }
    }

    #[test]
    fn a_data_dir_belongs_to_one_node_and_one_process() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("w");
        let open = DataDir::open(&dir, "n1").expect("opens");
        let mode = std::fs::metadata(&dir).expect("dir").permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o700
        );
        let error = DataDir::open(&dir, "n1").expect_err("locked");
        assert!(
            error.to_string().contains("another worker process"),
            "{error}"
        );
        drop(open);
        let error = DataDir::open(&dir, "n2").expect_err("another node's");
        assert!(
            error.to_string().contains("belongs to node `n1`"),
            "{error}"
        );
        let mut again = DataDir::open(&dir, "n1").expect("reopens");
        assert_eq!(again.cluster_id(), 0);
        again.set_cluster_id(77).expect("records");
        drop(again);
        assert_eq!(DataDir::open(&dir, "n1").expect("opens").cluster_id(), 77);
    }

    #[test]
    fn spooled_results_survive_until_acknowledged_and_a_torn_tail_is_dropped() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let data = DataDir::open(tmp.path(), "n1").expect("opens");
        let (mut spool, found) = data.spool().expect("spool");
        assert!(found.is_empty());
        for micro in 0..3 {
            spool
                .add(attempt(micro), &outcome(micro as i32))
                .expect("add");
        }
        spool.sync().expect("sync");
        spool.acknowledged(&[attempt(1)]).expect("ack");
        drop(spool);
        let (_, found) = data.spool().expect("reopen");
        assert_eq!(
            found.keys().copied().collect::<Vec<_>>(),
            [attempt(0), attempt(2)]
        );
        assert_eq!(found[&attempt(2)], outcome(2));

        // A torn last record: the ones before it are kept, the tail is cut off.
        let path = tmp.path().join("spool");
        let full = std::fs::metadata(&path).expect("spool").len();
        let file = OpenOptions::new().write(true).open(&path).expect("open");
        file.set_len(full - 3).expect("tear");
        let (_, found) = data.spool().expect("reopen torn");
        assert_eq!(
            found.len(),
            3,
            "the torn record was the ack: its result is back"
        );
        assert!(std::fs::metadata(&path).expect("spool").len() < full - 3);

        // A flipped byte in the first record: nothing after it is trusted.
        let mut bytes = std::fs::read(&path).expect("read");
        bytes[10] ^= 0xff;
        std::fs::write(&path, &bytes).expect("write");
        let (_, found) = data.spool().expect("reopen corrupt");
        assert!(found.is_empty());
    }

    #[test]
    fn the_spool_compacts_to_its_live_results() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let data = DataDir::open(tmp.path(), "n1").expect("opens");
        let (mut spool, _) = data.spool().expect("spool");
        let big = AttemptOutcome {
            stdout: vec![b'x'; 64 * 1024],
            ..outcome(0)
        };
        for micro in 0..200 {
            spool.add(attempt(micro), &big).expect("add");
            if micro > 0 {
                spool.acknowledged(&[attempt(micro - 1)]).expect("ack");
            }
        }
        spool.sync().expect("sync");
        let len = std::fs::metadata(tmp.path().join("spool"))
            .expect("spool")
            .len();
        assert!(len < SPOOL_COMPACT_BYTES, "compacted: {len} bytes");
        drop(spool);
        let (_, found) = data.spool().expect("reopen");
        assert_eq!(found.keys().copied().collect::<Vec<_>>(), [attempt(199)]);
    }

    #[test]
    fn a_restart_kills_the_groups_its_predecessor_left_and_spares_reused_pids() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let data = DataDir::open(tmp.path(), "n1").expect("opens");
        let (mut groups, left) = data.groups().expect("groups");
        assert!(left.is_empty());
        let spawn = || {
            let mut command = std::process::Command::new("sleep");
            std::os::unix::process::CommandExt::process_group(&mut command, 0);
            command.arg("30").spawn().expect("sleep")
        };
        let mut orphan = spawn();
        let mut ended = spawn();
        let mut reused = spawn();
        for child in [&orphan, &ended, &reused] {
            let ticks = process_start_ticks(child.id()).expect("start time");
            groups
                .started(Group {
                    pgid: child.id(),
                    start_ticks: ticks + u64::from(child.id() == reused.id()),
                })
                .expect("started");
        }
        groups.ended(ended.id()).expect("ended");
        drop(groups);
        let (_, left) = data.groups().expect("reopen");
        assert_eq!(left.len(), 2);
        assert_eq!(kill_orphans(&left, std::time::Duration::from_secs(5)), 1);
        let status = orphan.wait().expect("wait");
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(9)
        );
        assert!(
            ended.try_wait().expect("try_wait").is_none(),
            "an ended group is spared"
        );
        assert!(
            reused.try_wait().expect("try_wait").is_none(),
            "a reused pid is spared"
        );
        let (_, left) = data.groups().expect("reopen again");
        assert!(left.is_empty(), "each life starts a fresh record");
        for mut child in [ended, reused] {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
