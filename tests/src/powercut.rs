//! A FUSE file system that loses power on command, for Venom's power-loss tests.
//!
//! A real disk keeps what a program wrote in the page cache until `fsync` (or `fdatasync`)
//! forces it out, and a directory entry (a create, rename, unlink or mkdir) is only
//! guaranteed to survive a crash once the directory itself has been fsynced. Killing a
//! process does not exercise any of that: the kernel still holds its writes. This module
//! mounts an in-memory file system (the model is LazyFS, the FUSE file system Jepsen
//! uses) in which every regular file keeps two copies of its contents, `current` (what
//! reads see) and `durable` (what the last sync made safe), plus the ordered list of
//! operations since that sync, and every directory keeps a `current` and a `durable`
//! set of entries. [`PowerCutFs::cut`] throws away everything that was never synced, the
//! way a power failure would; [`PowerCutFs::cut_torn`] instead keeps a random prefix of
//! each file's unsynced writes, the last one torn at a sector boundary, like a disk that
//! had written part of its queue. The shape follows from what must stay true for the
//! tests to mean anything: the kernel may not cache data or names (all TTLs are zero and
//! files are opened with `FOPEN_DIRECT_IO`), so every read and write reaches this code;
//! only an explicit fsync moves data to `durable`, at a cost proportional to the unsynced
//! bytes rather than the file size; and a process that held a file open across a cut
//! cannot keep writing as if nothing happened (its handles answer `EIO`). Everything
//! lives in memory behind one mutex, served by a background FUSE session, so the test
//! process can cut power while its child processes use the mount.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{mpsc, Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context as _};
use fuser::{
    AccessFlags, BackgroundSession, BsdFileFlags, Config, Errno, FileAttr, FileHandle, FileType,
    Filesystem, FopenFlags, Generation, INodeNo, LockOwner, MountOption, OpenFlags, RenameFlags,
    ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen,
    ReplyStatfs, ReplyWrite, Request, SessionACL, TimeOrNow, WriteFlags,
};

/// Attribute and entry lifetime handed to the kernel: zero, so that after a cut nothing
/// stale is served from the kernel's caches.
const TTL: Duration = Duration::ZERO;
/// Inode number of the root directory (fixed by the FUSE protocol).
const ROOT: u64 = 1;
/// Granularity at which `cut_torn` tears a write: one disk sector.
const SECTOR: u64 = 512;
/// Largest file size accepted (`EFBIG` beyond): everything lives in memory.
const MAX_FILE_SIZE: u64 = 16 << 30;
/// Longest name accepted in a directory.
const MAX_NAME: usize = 255;
/// Block size reported by `stat` and `statfs`.
const BLOCK: u32 = 4096;
/// Total size reported by `statfs`, in blocks (16 TiB): "plenty of free space".
const REPORTED_BLOCKS: u64 = 1 << 32;
/// How long `Drop` waits for the session thread after unmounting.
const UNMOUNT_WAIT: Duration = Duration::from_secs(5);
/// Name shown as the source of the mount in `/proc/mounts`.
const FS_NAME: &str = "venom-powercut";

type Res<T> = Result<T, Errno>;

/// What a power cut did, returned by [`PowerCutFs::cut`] and [`PowerCutFs::cut_torn`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CutReport {
    /// The seed of a torn cut; `None` for a clean cut.
    pub torn_seed: Option<u64>,
    /// Regular files that had unsynced changes (their contents went back to the last sync).
    pub files_reverted: u64,
    /// Bytes of unsynced writes thrown away.
    pub bytes_dropped: u64,
    /// Bytes of unsynced writes that a torn cut kept (the written part of the queue).
    pub bytes_kept_torn: u64,
    /// Directory entries that differed from their directory's last sync and were undone.
    pub entries_reverted: u64,
    /// Inodes that no durable entry named any more, and so are gone.
    pub inodes_removed: u64,
    /// Open file and directory handles that now answer `EIO`.
    pub handles_invalidated: u64,
}

impl fmt::Display for CutReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.torn_seed {
            Some(seed) => write!(f, "torn power cut (seed {seed}): ")?,
            None => write!(f, "power cut: ")?,
        }
        write!(
            f,
            "{} files reverted, {} bytes dropped, {} bytes kept torn, \
             {} directory entries reverted, {} inodes removed, {} handles invalidated",
            self.files_reverted,
            self.bytes_dropped,
            self.bytes_kept_torn,
            self.entries_reverted,
            self.inodes_removed,
            self.handles_invalidated
        )
    }
}

/// Counters since mount, returned by [`PowerCutFs::stats`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// `fsync` and `fdatasync` calls on regular files.
    pub file_syncs: u64,
    /// `fsync` calls on directories.
    pub dir_syncs: u64,
    /// Bytes accepted by `write`.
    pub bytes_written: u64,
    /// Bytes of writes made durable by file syncs.
    pub bytes_synced: u64,
}

/// A mounted power-cut file system. Dropping it unmounts it.
pub struct PowerCutFs {
    state: Arc<Mutex<State>>,
    mountpoint: PathBuf,
    session: Option<BackgroundSession>,
}

impl fmt::Debug for PowerCutFs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PowerCutFs")
            .field("mountpoint", &self.mountpoint)
            .field("mounted", &self.session.is_some())
            .finish()
    }
}

impl PowerCutFs {
    /// Mounts an empty file system on `mountpoint` (an existing empty directory).
    ///
    /// The mount goes through `fusermount3`, with `auto_unmount` (so it disappears even if
    /// the process dies without running `Drop`) when the process may use `allow_other`:
    /// as root, or with `user_allow_other` in `/etc/fuse.conf`. It needs `/dev/fuse` and
    /// the right to mount (root, or a setuid-root `fusermount3`).
    pub fn mount(mountpoint: &Path) -> anyhow::Result<Self> {
        let meta = std::fs::metadata(mountpoint)
            .with_context(|| format!("mount point {} is not accessible", mountpoint.display()))?;
        if !meta.is_dir() {
            bail!("mount point {} is not a directory", mountpoint.display());
        }
        if !Path::new("/dev/fuse").exists() {
            bail!(
                "cannot mount {FS_NAME}: /dev/fuse is missing (load the fuse module, or give \
                 the container the device)"
            );
        }
        let Some(helper) = fusermount() else {
            bail!(
                "cannot mount {FS_NAME}: neither fusermount3 nor fusermount is on PATH \
                 (Debian/Ubuntu: apt-get install fuse3)"
            );
        };
        let mountpoint = mountpoint
            .canonicalize()
            .with_context(|| format!("resolving mount point {}", mountpoint.display()))?;
        let state = Arc::new(Mutex::new(State::new()));
        let mut config = Config::default();
        config.mount_options = vec![
            MountOption::FSName(FS_NAME.to_string()),
            MountOption::Subtype("powercut".to_string()),
            MountOption::NoAtime,
        ];
        // auto_unmount needs allow_other; without the right to it the mount is still
        // made, only a crashed process leaves it behind (`fusermount3 -u` clears it).
        if allow_other_permitted() {
            config.mount_options.push(MountOption::AutoUnmount);
            config.acl = SessionACL::All;
        }
        config.n_threads = Some(2);
        let ops = Ops {
            state: Arc::clone(&state),
        };
        let session = fuser::spawn_mount(ops, &mountpoint, &config).with_context(|| {
            format!(
                "mounting {FS_NAME} on {} through {} failed (it needs /dev/fuse and the \
                 right to mount: root, or a setuid-root fusermount helper)",
                mountpoint.display(),
                helper.display()
            )
        })?;
        Ok(Self {
            state,
            mountpoint,
            session: Some(session),
        })
    }

    /// The mount point (canonicalised).
    pub fn path(&self) -> &Path {
        &self.mountpoint
    }

    /// Power cut: every file's contents and size go back to what the last fsync/fdatasync
    /// of that file made durable; every directory's entries go back to what the last fsync
    /// of that directory made durable (creations, renames, unlinks, mkdirs not yet synced
    /// are undone; an inode no durable entry names is gone). File handles opened before
    /// the cut fail with EIO afterwards.
    pub fn cut(&self) -> CutReport {
        self.lock().cut(None)
    }

    /// Like `cut`, but each file with unsynced writes keeps a seeded-random prefix of them
    /// in the order they were made, the last kept write torn at a random 512-byte boundary
    /// inside it (a disk that wrote part of the queue when the power went). Directory
    /// changes are dropped as in `cut`. The same seed on the same history gives the same
    /// result.
    pub fn cut_torn(&self, seed: u64) -> CutReport {
        self.lock().cut(Some(seed))
    }

    /// Arms a torn cut (as [`PowerCutFs::cut_torn`]) that happens when the next sync
    /// request arrives, before that sync makes anything durable; the request fails with
    /// `EIO`. The power goes while the writes a program is about to sync are in flight,
    /// so some of them reach the disk and the last one is torn. See
    /// [`PowerCutFs::armed_cut_report`].
    pub fn cut_torn_at_next_sync(&self, seed: u64) {
        let mut state = self.lock();
        state.armed = Some(seed);
        state.armed_report = None;
    }

    /// The report of the armed cut, once a sync request has set it off.
    pub fn armed_cut_report(&self) -> Option<CutReport> {
        self.lock().armed_report.clone()
    }

    /// Makes everything durable at once, as if every file and directory had been fsynced
    /// (a clean shutdown); useful to fix a starting state before a test. Not counted in
    /// [`Stats`].
    pub fn persist_all(&self) {
        self.lock().persist_all();
    }

    /// Counters since mount: file fsyncs (data-only and full), directory fsyncs, bytes
    /// written, bytes made durable.
    pub fn stats(&self) -> Stats {
        self.lock().stats.clone()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for PowerCutFs {
    fn drop(&mut self) {
        let Some(session) = self.session.take() else {
            return;
        };
        // Detach the mount right away (lazily, so open files elsewhere cannot make this
        // fail), so the directory is an ordinary empty directory again when Drop returns.
        let detached = fusermount().is_some_and(|helper| {
            quiet(
                Command::new(helper)
                    .arg("-u")
                    .arg("-z")
                    .arg(&self.mountpoint),
            )
        });
        if !detached {
            quiet(Command::new("umount").arg("-l").arg(&self.mountpoint));
        }
        // End the session; its thread leaves once the kernel closes the connection. Wait
        // for that in a helper thread so a connection kept alive by a stray open file
        // cannot hang Drop.
        let (done_tx, done_rx) = mpsc::channel();
        let joiner = std::thread::Builder::new()
            .name("powercut-unmount".to_string())
            .spawn(move || {
                // A failure here means the mount was already gone.
                let _ = session.umount_and_join();
                let _ = done_tx.send(());
            });
        if joiner.is_ok() {
            let _ = done_rx.recv_timeout(UNMOUNT_WAIT);
        }
    }
}

/// Runs a helper command with no output; true if it succeeded.
fn quiet(cmd: &mut Command) -> bool {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

/// Whether this process may use `allow_other` (root, or `user_allow_other` in
/// `/etc/fuse.conf`).
fn allow_other_permitted() -> bool {
    use std::os::unix::fs::MetadataExt as _;
    // /proc/self belongs to the effective user of the process.
    let root = std::fs::metadata("/proc/self").is_ok_and(|meta| meta.uid() == 0);
    root || std::fs::read_to_string("/etc/fuse.conf")
        .is_ok_and(|conf| conf.lines().any(|line| line.trim() == "user_allow_other"))
}

/// The fusermount helper that the mount goes through, found the way `fuser` finds it.
fn fusermount() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("FUSERMOUNT_PATH") {
        return Some(PathBuf::from(path));
    }
    let dirs = std::env::var_os("PATH")?;
    ["fusermount3", "fusermount"].iter().find_map(|name| {
        std::env::split_paths(&dirs)
            .map(|dir| dir.join(name))
            .find(|candidate| candidate.is_file())
    })
}

/// The seeded generator of torn cuts: the same seed on the same history tears the same way.
type TornRng = rand::rngs::StdRng;

/// A value in `0..=max`.
fn pick_up_to(rng: &mut TornRng, max: u64) -> u64 {
    use rand::Rng as _;
    rng.gen_range(0..=max)
}

/// Writes `data` at `offset` into `buf`, growing it (with zeros in any gap) as needed.
fn write_at(buf: &mut Vec<u8>, offset: u64, data: &[u8]) -> Res<()> {
    let end = offset
        .checked_add(data.len() as u64)
        .filter(|&end| end <= MAX_FILE_SIZE)
        .ok_or(Errno::EFBIG)?;
    let start = usize::try_from(offset).map_err(|_| Errno::EFBIG)?;
    let end = usize::try_from(end).map_err(|_| Errno::EFBIG)?;
    if end > buf.len() {
        buf.try_reserve(end - buf.len())
            .map_err(|_| Errno::from_i32(libc::ENOSPC))?;
    }
    if start > buf.len() {
        buf.resize(start, 0);
    }
    let overlap = (buf.len() - start).min(data.len());
    let (inside, beyond) = data.split_at(overlap);
    if let Some(dst) = buf.get_mut(start..start + overlap) {
        dst.copy_from_slice(inside);
    }
    buf.extend_from_slice(beyond);
    Ok(())
}

/// Truncates or zero-extends `buf` to `len` bytes.
fn set_len(buf: &mut Vec<u8>, len: u64) -> Res<()> {
    if len > MAX_FILE_SIZE {
        return Err(Errno::EFBIG);
    }
    let len = usize::try_from(len).map_err(|_| Errno::EFBIG)?;
    if len > buf.len() {
        buf.try_reserve(len - buf.len())
            .map_err(|_| Errno::from_i32(libc::ENOSPC))?;
    }
    buf.resize(len, 0);
    Ok(())
}

/// A change to a file since its last sync, in the order it was made.
enum Pending {
    Write { offset: u64, data: Vec<u8> },
    SetLen(u64),
}

impl Pending {
    fn write_len(&self) -> u64 {
        match self {
            Pending::Write { data, .. } => data.len() as u64,
            Pending::SetLen(_) => 0,
        }
    }

    /// Applies this change to `buf`, keeping only the first `limit` bytes of a write;
    /// returns the bytes of data applied.
    fn apply(&self, buf: &mut Vec<u8>, limit: Option<u64>) -> u64 {
        match self {
            Pending::Write { offset, data } => {
                let keep = limit.map_or(data.len(), |limit| {
                    usize::try_from(limit).map_or(data.len(), |l| l.min(data.len()))
                });
                let part = data.get(..keep).unwrap_or(data);
                // `current` already holds this write, so the same size fits here.
                let _ = write_at(buf, *offset, part);
                part.len() as u64
            }
            Pending::SetLen(len) => {
                let _ = set_len(buf, *len);
                0
            }
        }
    }
}

/// How many bytes of a write at `offset` of `len` bytes a torn cut keeps: a random sector
/// boundary strictly inside the write, or the whole write.
fn tear_point(offset: u64, len: u64, rng: &mut TornRng) -> u64 {
    let end = offset.saturating_add(len);
    let first = (offset / SECTOR + 1) * SECTOR;
    let inside = if first < end {
        (end - 1 - first) / SECTOR + 1
    } else {
        0
    };
    let pick = pick_up_to(rng, inside);
    if pick == inside {
        len
    } else {
        first + pick * SECTOR - offset
    }
}

/// Contents of a regular file.
#[derive(Default)]
struct FileBody {
    /// What reads see.
    current: Vec<u8>,
    /// What the last fsync made durable.
    durable: Vec<u8>,
    /// Changes since the last fsync; replayed on `durable` they give `current`.
    pending: Vec<Pending>,
}

impl FileBody {
    fn write(&mut self, offset: u64, data: &[u8]) -> Res<()> {
        write_at(&mut self.current, offset, data)?;
        self.pending.push(Pending::Write {
            offset,
            data: data.to_vec(),
        });
        Ok(())
    }

    fn truncate(&mut self, len: u64) -> Res<()> {
        if len == self.current.len() as u64 {
            return Ok(());
        }
        set_len(&mut self.current, len)?;
        self.pending.push(Pending::SetLen(len));
        Ok(())
    }

    /// fsync: makes every pending change durable; returns the bytes of data synced.
    fn sync(&mut self) -> u64 {
        let mut synced = 0;
        for op in self.pending.drain(..) {
            synced += op.apply(&mut self.durable, None);
        }
        synced
    }

    /// Power cut: keeps a random prefix of the pending changes when `rng` is given (the
    /// last kept write torn), none otherwise; returns (bytes kept, bytes dropped).
    fn revert(&mut self, rng: Option<TornRng>) -> (u64, u64) {
        let ops = std::mem::take(&mut self.pending);
        let total: u64 = ops.iter().map(Pending::write_len).sum();
        let mut kept = 0;
        if let Some(mut rng) = rng {
            let count = usize::try_from(pick_up_to(&mut rng, ops.len() as u64)).unwrap_or(0);
            for (i, op) in ops.iter().take(count).enumerate() {
                let limit = match op {
                    Pending::Write { offset, data } if i + 1 == count => {
                        Some(tear_point(*offset, data.len() as u64, &mut rng))
                    }
                    _ => None,
                };
                kept += op.apply(&mut self.durable, limit);
            }
        }
        self.current.clone_from(&self.durable);
        (kept, total - kept)
    }
}

/// Entries of a directory.
struct DirBody {
    /// What lookups and listings see.
    current: BTreeMap<OsString, u64>,
    /// What the last fsync of this directory made durable.
    durable: BTreeMap<OsString, u64>,
    /// The directory that names this one (itself for the root).
    parent: u64,
    /// Whether `current` may differ from `durable`.
    dirty: bool,
}

impl DirBody {
    fn new(parent: u64) -> Self {
        Self {
            current: BTreeMap::new(),
            durable: BTreeMap::new(),
            parent,
            dirty: false,
        }
    }

    /// Names whose entry differs between `current` and `durable`.
    fn differences(&self) -> u64 {
        let changed = self
            .current
            .iter()
            .filter(|(name, ino)| self.durable.get(*name) != Some(ino))
            .count();
        let removed = self
            .durable
            .keys()
            .filter(|name| !self.current.contains_key(*name))
            .count();
        (changed + removed) as u64
    }
}

enum Body {
    File(FileBody),
    Dir(DirBody),
}

/// Metadata kept in memory only (it is not subject to power cuts).
struct Meta {
    perm: u16,
    uid: u32,
    gid: u32,
    atime: SystemTime,
    mtime: SystemTime,
    ctime: SystemTime,
    crtime: SystemTime,
}

impl Meta {
    fn new(perm: u32, uid: u32, gid: u32) -> Self {
        let now = SystemTime::now();
        Self {
            perm: (perm & 0o7777) as u16,
            uid,
            gid,
            atime: now,
            mtime: now,
            ctime: now,
            crtime: now,
        }
    }

    fn modified(&mut self) {
        let now = SystemTime::now();
        self.mtime = now;
        self.ctime = now;
    }
}

struct Node {
    meta: Meta,
    body: Body,
    /// Entries in `current` maps that name this inode.
    links: u32,
    /// Entries in `durable` maps that name this inode.
    durable_links: u32,
    /// Open handles from the current epoch.
    open: u32,
}

impl Node {
    fn is_dir(&self) -> bool {
        matches!(self.body, Body::Dir(_))
    }

    fn kind(&self) -> FileType {
        match self.body {
            Body::File(_) => FileType::RegularFile,
            Body::Dir(_) => FileType::Directory,
        }
    }
}

/// An open file or directory. A handle from before the last cut is stale: it answers EIO.
struct Handle {
    ino: u64,
    epoch: u64,
    /// A directory listing, taken when a directory stream starts.
    listing: Option<Vec<(u64, FileType, OsString)>>,
}

/// The whole file system.
struct State {
    nodes: BTreeMap<u64, Node>,
    handles: HashMap<u64, Handle>,
    next_ino: u64,
    next_fh: u64,
    /// Number of power cuts so far; handles carry the epoch they were opened in.
    epoch: u64,
    stats: Stats,
    /// A torn cut (its seed) waiting for the next sync request, and the report of the
    /// last one that happened.
    armed: Option<u64>,
    armed_report: Option<CutReport>,
}

impl State {
    fn new() -> Self {
        let root = Node {
            meta: Meta::new(0o755, 0, 0),
            body: Body::Dir(DirBody::new(ROOT)),
            links: 1,
            durable_links: 1,
            open: 0,
        };
        Self {
            nodes: BTreeMap::from([(ROOT, root)]),
            handles: HashMap::new(),
            next_ino: ROOT + 1,
            next_fh: 1,
            epoch: 0,
            stats: Stats::default(),
            armed: None,
            armed_report: None,
        }
    }

    /// Performs an armed cut, if any: the sync request that found it fails with `EIO`,
    /// like a sync cut short by the power going.
    fn fire_armed_cut(&mut self) -> Res<()> {
        match self.armed.take() {
            Some(seed) => {
                self.armed_report = Some(self.cut(Some(seed)));
                Err(Errno::EIO)
            }
            None => Ok(()),
        }
    }

    fn node(&self, ino: u64) -> Res<&Node> {
        self.nodes.get(&ino).ok_or(Errno::ENOENT)
    }

    fn node_mut(&mut self, ino: u64) -> Res<&mut Node> {
        self.nodes.get_mut(&ino).ok_or(Errno::ENOENT)
    }

    fn dir(&self, ino: u64) -> Res<&DirBody> {
        match &self.node(ino)?.body {
            Body::Dir(dir) => Ok(dir),
            Body::File(_) => Err(Errno::ENOTDIR),
        }
    }

    fn dir_mut(&mut self, ino: u64) -> Res<&mut DirBody> {
        match &mut self.node_mut(ino)?.body {
            Body::Dir(dir) => Ok(dir),
            Body::File(_) => Err(Errno::ENOTDIR),
        }
    }

    fn file_mut(&mut self, ino: u64) -> Res<&mut FileBody> {
        match &mut self.node_mut(ino)?.body {
            Body::File(file) => Ok(file),
            Body::Dir(_) => Err(Errno::EISDIR),
        }
    }

    fn attr(&self, ino: u64) -> Res<FileAttr> {
        let node = self.node(ino)?;
        let (size, nlink) = match &node.body {
            Body::File(file) => (file.current.len() as u64, node.links),
            Body::Dir(dir) => {
                let subdirs = dir
                    .current
                    .values()
                    .filter(|child| self.nodes.get(child).is_some_and(Node::is_dir))
                    .count();
                (
                    u64::from(BLOCK),
                    2 + u32::try_from(subdirs).unwrap_or(u32::MAX - 2),
                )
            }
        };
        Ok(FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: node.meta.atime,
            mtime: node.meta.mtime,
            ctime: node.meta.ctime,
            crtime: node.meta.crtime,
            kind: node.kind(),
            perm: node.meta.perm,
            nlink,
            uid: node.meta.uid,
            gid: node.meta.gid,
            rdev: 0,
            blksize: BLOCK,
            flags: 0,
        })
    }

    /// The handle `fh` on `ino`, if it is from the current epoch.
    fn live_handle(&mut self, fh: u64, ino: u64) -> Res<&mut Handle> {
        let epoch = self.epoch;
        let handle = self.handles.get_mut(&fh).ok_or(Errno::EBADF)?;
        if handle.epoch != epoch {
            return Err(Errno::EIO);
        }
        if handle.ino != ino {
            return Err(Errno::EBADF);
        }
        Ok(handle)
    }

    fn open_handle(&mut self, ino: u64) -> Res<u64> {
        self.node_mut(ino)?.open += 1;
        let fh = self.next_fh;
        self.next_fh += 1;
        self.handles.insert(
            fh,
            Handle {
                ino,
                epoch: self.epoch,
                listing: None,
            },
        );
        Ok(fh)
    }

    fn release(&mut self, fh: u64) {
        let Some(handle) = self.handles.remove(&fh) else {
            return;
        };
        if handle.epoch == self.epoch {
            if let Some(node) = self.nodes.get_mut(&handle.ino) {
                node.open = node.open.saturating_sub(1);
            }
            self.maybe_free(handle.ino);
        }
    }

    fn new_node(&mut self, body: Body, perm: u32, uid: u32, gid: u32) -> u64 {
        let ino = self.next_ino;
        self.next_ino += 1;
        self.nodes.insert(
            ino,
            Node {
                meta: Meta::new(perm, uid, gid),
                body,
                links: 0,
                durable_links: 0,
                open: 0,
            },
        );
        ino
    }

    fn add_entry(&mut self, parent: u64, name: &OsStr, ino: u64) -> Res<()> {
        let dir = self.dir_mut(parent)?;
        dir.current.insert(name.to_os_string(), ino);
        dir.dirty = true;
        self.node_mut(parent)?.meta.modified();
        self.node_mut(ino)?.links += 1;
        Ok(())
    }

    /// Removes an entry from `current`; the caller frees the inode when it is done.
    fn remove_entry(&mut self, parent: u64, name: &OsStr) -> Res<u64> {
        let dir = self.dir_mut(parent)?;
        let ino = dir.current.remove(name).ok_or(Errno::ENOENT)?;
        dir.dirty = true;
        self.node_mut(parent)?.meta.modified();
        if let Some(node) = self.nodes.get_mut(&ino) {
            node.links = node.links.saturating_sub(1);
            node.meta.ctime = SystemTime::now();
        }
        Ok(ino)
    }

    /// Drops `ino` (and what only it kept alive) once no entry, durable entry or open
    /// handle refers to it.
    fn maybe_free(&mut self, ino: u64) {
        let mut work = vec![ino];
        while let Some(ino) = work.pop() {
            let unused = self
                .nodes
                .get(&ino)
                .is_some_and(|node| node.links == 0 && node.durable_links == 0 && node.open == 0);
            if ino == ROOT || !unused {
                continue;
            }
            let Some(node) = self.nodes.remove(&ino) else {
                continue;
            };
            if let Body::Dir(dir) = node.body {
                for child in dir.current.values() {
                    if let Some(child_node) = self.nodes.get_mut(child) {
                        child_node.links = child_node.links.saturating_sub(1);
                    }
                    work.push(*child);
                }
                for child in dir.durable.values() {
                    if let Some(child_node) = self.nodes.get_mut(child) {
                        child_node.durable_links = child_node.durable_links.saturating_sub(1);
                    }
                    work.push(*child);
                }
            }
        }
    }

    fn lookup(&self, parent: u64, name: &OsStr) -> Res<FileAttr> {
        let ino = *self.dir(parent)?.current.get(name).ok_or(Errno::ENOENT)?;
        self.attr(ino)
    }

    #[allow(clippy::too_many_arguments)]
    fn setattr(
        &mut self,
        ino: u64,
        fh: Option<u64>,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
    ) -> Res<FileAttr> {
        if let Some(fh) = fh {
            self.live_handle(fh, ino)?;
        }
        if let Some(size) = size {
            self.file_mut(ino)?.truncate(size)?;
            self.node_mut(ino)?.meta.modified();
        }
        let meta = &mut self.node_mut(ino)?.meta;
        let resolve = |time: TimeOrNow| match time {
            TimeOrNow::SpecificTime(time) => time,
            TimeOrNow::Now => SystemTime::now(),
        };
        if let Some(mode) = mode {
            meta.perm = (mode & 0o7777) as u16;
        }
        if let Some(uid) = uid {
            meta.uid = uid;
        }
        if let Some(gid) = gid {
            meta.gid = gid;
        }
        if let Some(atime) = atime {
            meta.atime = resolve(atime);
        }
        if let Some(mtime) = mtime {
            meta.mtime = resolve(mtime);
        }
        meta.ctime = SystemTime::now();
        self.attr(ino)
    }

    /// Creates a regular file (or opens the existing one when `O_EXCL` is not given);
    /// returns its attributes and, when `open`, a handle.
    #[allow(clippy::too_many_arguments)]
    fn create(
        &mut self,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        uid: u32,
        gid: u32,
        open: bool,
    ) -> Res<(FileAttr, Option<u64>)> {
        check_name(name)?;
        let existing = self.dir(parent)?.current.get(name).copied();
        let ino = match existing {
            Some(_) if flags & libc::O_EXCL != 0 => return Err(Errno::EEXIST),
            Some(ino) => {
                if self.node(ino)?.is_dir() {
                    return Err(Errno::EISDIR);
                }
                if flags & libc::O_TRUNC != 0 && flags & libc::O_ACCMODE != libc::O_RDONLY {
                    self.file_mut(ino)?.truncate(0)?;
                }
                ino
            }
            None => {
                let ino = self.new_node(Body::File(FileBody::default()), mode & !umask, uid, gid);
                self.add_entry(parent, name, ino)?;
                ino
            }
        };
        let fh = if open {
            Some(self.open_handle(ino)?)
        } else {
            None
        };
        Ok((self.attr(ino)?, fh))
    }

    fn mkdir(
        &mut self,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        uid: u32,
        gid: u32,
    ) -> Res<FileAttr> {
        check_name(name)?;
        if self.dir(parent)?.current.contains_key(name) {
            return Err(Errno::EEXIST);
        }
        let ino = self.new_node(Body::Dir(DirBody::new(parent)), mode & !umask, uid, gid);
        self.add_entry(parent, name, ino)?;
        self.attr(ino)
    }

    fn unlink(&mut self, parent: u64, name: &OsStr) -> Res<()> {
        let ino = *self.dir(parent)?.current.get(name).ok_or(Errno::ENOENT)?;
        if self.node(ino)?.is_dir() {
            return Err(Errno::EISDIR);
        }
        self.remove_entry(parent, name)?;
        self.maybe_free(ino);
        Ok(())
    }

    fn rmdir(&mut self, parent: u64, name: &OsStr) -> Res<()> {
        let ino = *self.dir(parent)?.current.get(name).ok_or(Errno::ENOENT)?;
        if !self.dir(ino)?.current.is_empty() {
            return Err(Errno::ENOTEMPTY);
        }
        if ino == ROOT {
            return Err(Errno::EBUSY);
        }
        self.remove_entry(parent, name)?;
        self.maybe_free(ino);
        Ok(())
    }

    fn rename(
        &mut self,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        flags: RenameFlags,
    ) -> Res<()> {
        if !(flags - RenameFlags::RENAME_NOREPLACE).is_empty() {
            // RENAME_EXCHANGE and RENAME_WHITEOUT are not supported.
            return Err(Errno::EINVAL);
        }
        check_name(newname)?;
        let src = *self.dir(parent)?.current.get(name).ok_or(Errno::ENOENT)?;
        let target = self.dir(newparent)?.current.get(newname).copied();
        let src_is_dir = self.node(src)?.is_dir();
        if src_is_dir {
            // A directory cannot move inside itself.
            let mut at = newparent;
            for _ in 0..=self.nodes.len() {
                if at == src {
                    return Err(Errno::EINVAL);
                }
                if at == ROOT {
                    break;
                }
                at = self.dir(at)?.parent;
            }
        }
        if let Some(target) = target {
            if flags.contains(RenameFlags::RENAME_NOREPLACE) {
                return Err(Errno::EEXIST);
            }
            if target == src {
                return Ok(());
            }
            match (src_is_dir, self.node(target)?.is_dir()) {
                (true, false) => return Err(Errno::ENOTDIR),
                (false, true) => return Err(Errno::EISDIR),
                (true, true) if !self.dir(target)?.current.is_empty() => {
                    return Err(Errno::ENOTEMPTY)
                }
                _ => {}
            }
            self.remove_entry(newparent, newname)?;
        }
        self.remove_entry(parent, name)?;
        self.add_entry(newparent, newname, src)?;
        if src_is_dir {
            self.dir_mut(src)?.parent = newparent;
        }
        if let Some(target) = target {
            self.maybe_free(target);
        }
        Ok(())
    }

    fn open(&mut self, ino: u64, flags: i32) -> Res<u64> {
        let file = self.file_mut(ino)?;
        if flags & libc::O_TRUNC != 0 && flags & libc::O_ACCMODE != libc::O_RDONLY {
            file.truncate(0)?;
        }
        self.open_handle(ino)
    }

    fn read(&mut self, ino: u64, fh: u64, offset: u64, size: u32) -> Res<Vec<u8>> {
        self.live_handle(fh, ino)?;
        let file = self.file_mut(ino)?;
        let len = file.current.len();
        let start = usize::try_from(offset).unwrap_or(usize::MAX).min(len);
        let end = start
            .saturating_add(usize::try_from(size).unwrap_or(usize::MAX))
            .min(len);
        Ok(file.current.get(start..end).unwrap_or_default().to_vec())
    }

    fn write(&mut self, ino: u64, fh: u64, offset: u64, data: &[u8], flags: i32) -> Res<u32> {
        self.live_handle(fh, ino)?;
        let written = u32::try_from(data.len()).map_err(|_| Errno::EINVAL)?;
        let file = self.file_mut(ino)?;
        let offset = if flags & libc::O_APPEND != 0 {
            file.current.len() as u64
        } else {
            offset
        };
        file.write(offset, data)?;
        self.node_mut(ino)?.meta.modified();
        self.stats.bytes_written += u64::from(written);
        Ok(written)
    }

    fn fsync(&mut self, ino: u64, fh: u64) -> Res<()> {
        self.live_handle(fh, ino)?;
        self.fire_armed_cut()?;
        let synced = self.file_mut(ino)?.sync();
        self.stats.file_syncs += 1;
        self.stats.bytes_synced += synced;
        Ok(())
    }

    fn fallocate(&mut self, ino: u64, fh: u64, offset: u64, length: u64, mode: i32) -> Res<()> {
        self.live_handle(fh, ino)?;
        if mode & !libc::FALLOC_FL_KEEP_SIZE != 0 {
            return Err(Errno::from_i32(libc::EOPNOTSUPP));
        }
        let end = offset.checked_add(length).ok_or(Errno::EFBIG)?;
        let file = self.file_mut(ino)?;
        if mode & libc::FALLOC_FL_KEEP_SIZE == 0 && end > file.current.len() as u64 {
            file.truncate(end)?;
            self.node_mut(ino)?.meta.modified();
        }
        Ok(())
    }

    fn opendir(&mut self, ino: u64) -> Res<u64> {
        self.dir(ino)?;
        self.open_handle(ino)
    }

    /// The listing of directory stream `fh` from `offset` on (taken afresh at offset 0).
    fn readdir(&mut self, ino: u64, fh: u64, offset: u64) -> Res<&[(u64, FileType, OsString)]> {
        let needs_listing = offset == 0 || self.live_handle(fh, ino)?.listing.is_none();
        if needs_listing {
            let dir = self.dir(ino)?;
            let mut listing = vec![
                (ino, FileType::Directory, OsString::from(".")),
                (dir.parent, FileType::Directory, OsString::from("..")),
            ];
            for (name, child) in &dir.current {
                let kind = self
                    .nodes
                    .get(child)
                    .map_or(FileType::RegularFile, Node::kind);
                listing.push((*child, kind, name.clone()));
            }
            self.live_handle(fh, ino)?.listing = Some(listing);
        }
        let listing = self
            .live_handle(fh, ino)?
            .listing
            .as_deref()
            .unwrap_or_default();
        let start = usize::try_from(offset)
            .unwrap_or(usize::MAX)
            .min(listing.len());
        Ok(listing.get(start..).unwrap_or_default())
    }

    fn fsyncdir(&mut self, ino: u64, fh: u64) -> Res<()> {
        self.live_handle(fh, ino)?;
        self.fire_armed_cut()?;
        self.sync_dir(ino)?;
        self.stats.dir_syncs += 1;
        Ok(())
    }

    /// Makes a directory's current entries durable.
    fn sync_dir(&mut self, ino: u64) -> Res<()> {
        let dir = self.dir_mut(ino)?;
        if !dir.dirty {
            return Ok(());
        }
        dir.dirty = false;
        let old = std::mem::replace(&mut dir.durable, dir.current.clone());
        let new: Vec<u64> = dir.durable.values().copied().collect();
        for child in new {
            if let Some(node) = self.nodes.get_mut(&child) {
                node.durable_links += 1;
            }
        }
        for child in old.values() {
            if let Some(node) = self.nodes.get_mut(child) {
                node.durable_links = node.durable_links.saturating_sub(1);
            }
        }
        for child in old.values() {
            self.maybe_free(*child);
        }
        Ok(())
    }

    fn persist_all(&mut self) {
        let inos: Vec<u64> = self.nodes.keys().copied().collect();
        for ino in inos {
            match self.nodes.get_mut(&ino).map(|node| &mut node.body) {
                Some(Body::File(file)) => {
                    file.sync();
                }
                Some(Body::Dir(_)) => {
                    let _ = self.sync_dir(ino);
                }
                None => {}
            }
        }
    }

    fn statfs(&self) -> (u64, u64) {
        let used: u64 =
            self.nodes
                .values()
                .map(|node| match &node.body {
                    Body::File(file) => (file.current.len().max(file.durable.len()) as u64)
                        .div_ceil(u64::from(BLOCK)),
                    Body::Dir(_) => 1,
                })
                .sum();
        (
            REPORTED_BLOCKS.saturating_sub(used),
            REPORTED_BLOCKS.saturating_sub(self.nodes.len() as u64),
        )
    }

    /// The power cut itself; `seed` selects a torn cut.
    fn cut(&mut self, seed: Option<u64>) -> CutReport {
        let mut report = CutReport {
            torn_seed: seed,
            ..CutReport::default()
        };
        report.handles_invalidated = self
            .handles
            .values()
            .filter(|handle| handle.epoch == self.epoch)
            .count() as u64;
        self.epoch += 1;

        // Contents and entries go back to their durable state.
        for (ino, node) in &mut self.nodes {
            node.open = 0;
            match &mut node.body {
                Body::File(file) if !file.pending.is_empty() => {
                    let rng = seed.map(|seed| {
                        rand::SeedableRng::seed_from_u64(
                            seed ^ ino.wrapping_mul(0x9E37_79B9_7F4A_7C15),
                        )
                    });
                    let (kept, dropped) = file.revert(rng);
                    report.files_reverted += 1;
                    report.bytes_kept_torn += kept;
                    report.bytes_dropped += dropped;
                }
                Body::File(_) => {}
                Body::Dir(dir) => {
                    if dir.dirty {
                        report.entries_reverted += dir.differences();
                        dir.current.clone_from(&dir.durable);
                        dir.dirty = false;
                    }
                }
            }
        }

        // What the root reaches through durable entries survives. A directory reached a
        // second time (moved, with both old and new parents synced in between) keeps only
        // its first name, since directories cannot have two.
        let mut reached = BTreeSet::from([ROOT]);
        let mut queue = vec![ROOT];
        while let Some(dir_ino) = queue.pop() {
            let entries: Vec<(OsString, u64)> = match self.dir(dir_ino) {
                Ok(dir) => dir.current.iter().map(|(n, i)| (n.clone(), *i)).collect(),
                Err(_) => continue,
            };
            let mut dropped_names = Vec::new();
            for (name, child) in entries {
                match self.nodes.get_mut(&child) {
                    None => dropped_names.push(name),
                    Some(node) => match &mut node.body {
                        Body::Dir(_) if reached.contains(&child) => dropped_names.push(name),
                        Body::Dir(dir) => {
                            dir.parent = dir_ino;
                            reached.insert(child);
                            queue.push(child);
                        }
                        Body::File(_) => {
                            reached.insert(child);
                        }
                    },
                }
            }
            if let Ok(dir) = self.dir_mut(dir_ino) {
                for name in dropped_names {
                    dir.current.remove(&name);
                    dir.durable.remove(&name);
                }
            }
        }
        let before = self.nodes.len();
        self.nodes.retain(|ino, _| reached.contains(ino));
        report.inodes_removed = (before - self.nodes.len()) as u64;

        // Link counts from scratch: current and durable entries are now the same.
        let mut counts: HashMap<u64, u32> = HashMap::new();
        for node in self.nodes.values() {
            if let Body::Dir(dir) = &node.body {
                for child in dir.current.values() {
                    *counts.entry(*child).or_default() += 1;
                }
            }
        }
        for (ino, node) in &mut self.nodes {
            let links = if *ino == ROOT {
                1
            } else {
                counts.get(ino).copied().unwrap_or(0)
            };
            node.links = links;
            node.durable_links = links;
        }
        report
    }
}

fn check_name(name: &OsStr) -> Res<()> {
    if name.len() > MAX_NAME {
        return Err(Errno::ENAMETOOLONG);
    }
    if name.is_empty() || name == "." || name == ".." {
        return Err(Errno::EINVAL);
    }
    Ok(())
}

/// The FUSE request handlers; every one takes the state lock for the whole request.
struct Ops {
    state: Arc<Mutex<State>>,
}

impl Ops {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn reply_empty(reply: ReplyEmpty, result: Res<()>) {
    match result {
        Ok(()) => reply.ok(),
        Err(errno) => reply.error(errno),
    }
}

fn reply_entry(reply: ReplyEntry, result: Res<FileAttr>) {
    match result {
        Ok(attr) => reply.entry(&TTL, &attr, Generation(0)),
        Err(errno) => reply.error(errno),
    }
}

fn reply_open(reply: ReplyOpen, result: Res<u64>, flags: FopenFlags) {
    match result {
        Ok(fh) => reply.opened(FileHandle(fh), flags),
        Err(errno) => reply.error(errno),
    }
}

impl Filesystem for Ops {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        reply_entry(reply, self.lock().lookup(parent.0, name));
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.lock().attr(ino.0) {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(errno) => reply.error(errno),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let result =
            self.lock()
                .setattr(ino.0, fh.map(|fh| fh.0), mode, uid, gid, size, atime, mtime);
        match result {
            Ok(attr) => reply.attr(&TTL, &attr),
            Err(errno) => reply.error(errno),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        let kind = mode & libc::S_IFMT;
        if kind != libc::S_IFREG && kind != 0 {
            reply.error(Errno::ENOSYS);
            return;
        }
        let result = self
            .lock()
            .create(
                parent.0,
                name,
                mode,
                umask,
                libc::O_EXCL,
                req.uid(),
                req.gid(),
                false,
            )
            .map(|(attr, _)| attr);
        reply_entry(reply, result);
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let result = self
            .lock()
            .mkdir(parent.0, name, mode, umask, req.uid(), req.gid());
        reply_entry(reply, result);
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply_empty(reply, self.lock().unlink(parent.0, name));
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        reply_empty(reply, self.lock().rmdir(parent.0, name));
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let result = self
            .lock()
            .rename(parent.0, name, newparent.0, newname, flags);
        reply_empty(reply, result);
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let result = self.lock().open(ino.0, flags.0);
        reply_open(reply, result, FopenFlags::FOPEN_DIRECT_IO);
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let result = self.lock().read(ino.0, fh.0, offset, size);
        match result {
            Ok(data) => reply.data(&data),
            Err(errno) => reply.error(errno),
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.lock().write(ino.0, fh.0, offset, data, flags.0) {
            Ok(written) => reply.written(written),
            Err(errno) => reply.error(errno),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // Closing is not a sync: nothing becomes durable here.
        let result = self.lock().live_handle(fh.0, ino.0).map(|_| ());
        reply_empty(reply, result);
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.lock().release(fh.0);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply_empty(reply, self.lock().fsync(ino.0, fh.0));
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let result = self.lock().opendir(ino.0);
        reply_open(reply, result, FopenFlags::empty());
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let mut state = self.lock();
        match state.readdir(ino.0, fh.0, offset) {
            Ok(entries) => {
                for (next, (child, kind, name)) in (offset + 1..).zip(entries) {
                    if reply.add(INodeNo(*child), next, *kind, name) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(errno) => reply.error(errno),
        }
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.lock().release(fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply_empty(reply, self.lock().fsyncdir(ino.0, fh.0));
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let (free_blocks, free_inodes) = self.lock().statfs();
        reply.statfs(
            REPORTED_BLOCKS,
            free_blocks,
            free_blocks,
            REPORTED_BLOCKS,
            free_inodes,
            BLOCK,
            MAX_NAME as u32,
            BLOCK,
        );
    }

    fn access(&self, _req: &Request, ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        reply_empty(reply, self.lock().node(ino.0).map(|_| ()));
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let result = self.lock().create(
            parent.0,
            name,
            mode,
            umask,
            flags,
            req.uid(),
            req.gid(),
            true,
        );
        match result {
            Ok((attr, Some(fh))) => reply.created(
                &TTL,
                &attr,
                Generation(0),
                FileHandle(fh),
                FopenFlags::FOPEN_DIRECT_IO,
            ),
            Ok((_, None)) => reply.error(Errno::EIO),
            Err(errno) => reply.error(errno),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        reply_empty(
            reply,
            self.lock().fallocate(ino.0, fh.0, offset, length, mode),
        );
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::fs::{self, File, OpenOptions};
    use std::io::{ErrorKind, Read, Seek, SeekFrom, Write};
    use std::time::Instant;

    struct Mounted {
        fs: PowerCutFs,
        _dir: tempfile::TempDir,
    }

    impl Mounted {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let fs = PowerCutFs::mount(dir.path()).unwrap();
            Self { fs, _dir: dir }
        }

        fn path(&self, name: &str) -> PathBuf {
            self.fs.path().join(name)
        }

        fn root(&self) -> &Path {
            self.fs.path()
        }
    }

    fn sync_dir(dir: &Path) {
        File::open(dir).unwrap().sync_all().unwrap();
    }

    /// Creates `path` with `data`, fsyncs it and its directory.
    fn durable_file(path: &Path, data: &[u8]) {
        let mut f = File::create(path).unwrap();
        f.write_all(data).unwrap();
        f.sync_all().unwrap();
        sync_dir(path.parent().unwrap());
    }

    #[test]
    fn unsynced_write_to_new_file_is_lost_synced_is_kept() {
        let m = Mounted::new();
        let mut a = File::create(m.path("a")).unwrap();
        a.write_all(b"hello").unwrap();
        let mut b = File::create(m.path("b")).unwrap();
        b.write_all(b"full sync").unwrap();
        b.sync_all().unwrap();
        let mut c = File::create(m.path("c")).unwrap();
        c.write_all(b"data sync").unwrap();
        c.sync_data().unwrap();
        sync_dir(m.root());
        assert_eq!(fs::read(m.path("a")).unwrap(), b"hello");

        let report = m.fs.cut();
        eprintln!("{report}");
        assert_eq!(report.files_reverted, 1);
        assert_eq!(report.bytes_dropped, 5);
        assert_eq!(fs::metadata(m.path("a")).unwrap().len(), 0);
        assert_eq!(fs::read(m.path("a")).unwrap(), b"");
        assert_eq!(fs::read(m.path("b")).unwrap(), b"full sync");
        assert_eq!(fs::read(m.path("c")).unwrap(), b"data sync");
        let stats = m.fs.stats();
        assert_eq!(stats.file_syncs, 2);
        assert_eq!(stats.dir_syncs, 1);
        assert_eq!(stats.bytes_written, 5 + 9 + 9);
        assert_eq!(stats.bytes_synced, 18);
    }

    #[test]
    fn overwrite_and_extension_without_sync_are_reverted() {
        let m = Mounted::new();
        let p = m.path("data");
        durable_file(&p, b"0123456789");
        let mut f = OpenOptions::new().write(true).open(&p).unwrap();
        f.write_all(b"abcdefghijklmnopqrstuvwxyz").unwrap();
        drop(f);
        assert_eq!(fs::read(&p).unwrap(), b"abcdefghijklmnopqrstuvwxyz");
        m.fs.cut();
        assert_eq!(fs::read(&p).unwrap(), b"0123456789");
        assert_eq!(fs::metadata(&p).unwrap().len(), 10);
    }

    #[test]
    fn new_file_needs_directory_sync() {
        let m = Mounted::new();
        let mut f = File::create(m.path("lost")).unwrap();
        f.write_all(b"synced data").unwrap();
        f.sync_all().unwrap();
        drop(f);
        let report = m.fs.cut();
        assert_eq!(report.entries_reverted, 1);
        assert_eq!(report.inodes_removed, 1);
        assert_eq!(
            fs::metadata(m.path("lost")).unwrap_err().kind(),
            ErrorKind::NotFound
        );

        durable_file(&m.path("kept"), b"synced data");
        m.fs.cut();
        assert_eq!(fs::read(m.path("kept")).unwrap(), b"synced data");
        let names: Vec<_> = fs::read_dir(m.root())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![OsString::from("kept")]);
    }

    #[test]
    fn rename_over_existing_needs_directory_sync() {
        let m = Mounted::new();
        durable_file(&m.path("target"), b"old");
        durable_file(&m.path("tmp"), b"new");
        fs::rename(m.path("tmp"), m.path("target")).unwrap();
        assert_eq!(fs::read(m.path("target")).unwrap(), b"new");
        let report = m.fs.cut();
        assert_eq!(report.entries_reverted, 2);
        assert_eq!(fs::read(m.path("target")).unwrap(), b"old");
        assert_eq!(fs::read(m.path("tmp")).unwrap(), b"new");

        fs::rename(m.path("tmp"), m.path("target")).unwrap();
        sync_dir(m.root());
        m.fs.cut();
        assert_eq!(fs::read(m.path("target")).unwrap(), b"new");
        assert!(!m.path("tmp").exists());
    }

    #[test]
    fn rename_across_directories() {
        let m = Mounted::new();
        fs::create_dir(m.path("a")).unwrap();
        fs::create_dir(m.path("b")).unwrap();
        sync_dir(m.root());
        durable_file(&m.path("a/f"), b"payload");
        fs::rename(m.path("a/f"), m.path("b/f")).unwrap();
        sync_dir(&m.path("b"));
        sync_dir(&m.path("a"));
        m.fs.cut();
        assert!(!m.path("a/f").exists());
        assert_eq!(fs::read(m.path("b/f")).unwrap(), b"payload");
    }

    #[test]
    fn unlink_without_directory_sync_is_undone() {
        let m = Mounted::new();
        durable_file(&m.path("f"), b"durable");
        let mut f = OpenOptions::new().append(true).open(m.path("f")).unwrap();
        f.write_all(b" and not").unwrap();
        drop(f);
        fs::remove_file(m.path("f")).unwrap();
        assert!(!m.path("f").exists());
        m.fs.cut();
        assert_eq!(fs::read(m.path("f")).unwrap(), b"durable");

        fs::remove_file(m.path("f")).unwrap();
        sync_dir(m.root());
        m.fs.cut();
        assert!(!m.path("f").exists());
    }

    #[test]
    fn shrink_without_sync_is_reverted() {
        let m = Mounted::new();
        let p = m.path("f");
        durable_file(&p, &[7u8; 10_000]);
        let f = OpenOptions::new().write(true).open(&p).unwrap();
        f.set_len(100).unwrap();
        assert_eq!(fs::metadata(&p).unwrap().len(), 100);
        drop(f);
        m.fs.cut();
        assert_eq!(fs::read(&p).unwrap(), vec![7u8; 10_000]);

        let f = OpenOptions::new().write(true).open(&p).unwrap();
        f.set_len(100).unwrap();
        f.sync_all().unwrap();
        drop(f);
        m.fs.cut();
        assert_eq!(fs::read(&p).unwrap(), vec![7u8; 100]);
    }

    #[allow(unsafe_code)]
    fn sync_file_range(f: &File, len: u64) -> std::io::Result<()> {
        use std::os::fd::AsRawFd;
        let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE
            | libc::SYNC_FILE_RANGE_WRITE
            | libc::SYNC_FILE_RANGE_WAIT_AFTER;
        // SAFETY: the descriptor is owned by `f`, which outlives the call, and the call
        // reads no memory of ours.
        let rc = unsafe { libc::sync_file_range(f.as_raw_fd(), 0, len as libc::off64_t, flags) };
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }

    #[test]
    fn sync_file_range_does_not_make_data_durable() {
        let m = Mounted::new();
        let p = m.path("wal");
        durable_file(&p, b"");
        let mut f = OpenOptions::new().write(true).open(&p).unwrap();
        f.write_all(&[1u8; 8192]).unwrap();
        sync_file_range(&f, 8192).unwrap();
        drop(f);
        let report = m.fs.cut();
        assert_eq!(report.bytes_dropped, 8192);
        assert_eq!(fs::metadata(&p).unwrap().len(), 0);
        assert_eq!(m.fs.stats().file_syncs, 1);
    }

    /// Resets `p` to 4 KiB of durable data, appends three unsynced 64 KiB writes and cuts
    /// with `seed`; returns the contents afterwards and the expected full contents.
    fn torn_round(m: &Mounted, p: &Path, seed: u64) -> (Vec<u8>, Vec<u8>, CutReport) {
        let mut f = OpenOptions::new().write(true).open(p).unwrap();
        f.set_len(4096).unwrap();
        f.sync_all().unwrap();
        f.seek(SeekFrom::Start(4096)).unwrap();
        let mut expected = vec![b'h'; 4096];
        for i in 0..3u8 {
            let chunk: Vec<u8> = (0..65536u32).map(|j| (j % 251) as u8 ^ (i + 1)).collect();
            f.write_all(&chunk).unwrap();
            expected.extend_from_slice(&chunk);
        }
        drop(f);
        let report = m.fs.cut_torn(seed);
        (fs::read(p).unwrap(), expected, report)
    }

    #[test]
    fn torn_cut_keeps_a_sector_aligned_prefix() {
        let m = Mounted::new();
        let p = m.path("log");
        durable_file(&p, &[b'h'; 4096]);
        let mut lengths = BTreeSet::new();
        for seed in 0..24 {
            let (got, expected, report) = torn_round(&m, &p, seed);
            let len = got.len();
            assert!((4096..=4096 + 3 * 65536).contains(&len), "length {len}");
            assert_eq!((len - 4096) % 512, 0, "length {len}");
            assert_eq!(got[..], expected[..len], "seed {seed}");
            assert_eq!(report.bytes_kept_torn, len as u64 - 4096);
            assert_eq!(report.bytes_kept_torn + report.bytes_dropped, 3 * 65536);
            lengths.insert(len);
        }
        assert!(lengths.len() > 1, "every seed gave {lengths:?}");
        let first = torn_round(&m, &p, 7).0;
        let second = torn_round(&m, &p, 7).0;
        assert_eq!(first, second);
    }

    #[test]
    fn an_armed_cut_happens_at_the_next_sync_which_fails() {
        let m = Mounted::new();
        let p = m.path("log");
        durable_file(&p, &[b'h'; 4096]);
        let mut f = OpenOptions::new().append(true).open(&p).unwrap();
        f.write_all(&[b'a'; 8192]).unwrap();
        m.fs.cut_torn_at_next_sync(3);
        assert!(m.fs.armed_cut_report().is_none(), "no sync yet");
        // Writes go on until the sync: they are part of the torn queue.
        f.write_all(&[b'b'; 8192]).unwrap();
        let err = f.sync_data().unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EIO));
        let report = m.fs.armed_cut_report().expect("the sync set it off");
        assert_eq!(report.torn_seed, Some(3));
        assert_eq!(report.bytes_kept_torn + report.bytes_dropped, 16384);
        // The old handle is dead; the file holds the synced part and a torn prefix.
        assert!(f.write_all(b"c").is_err());
        let got = fs::read(&p).unwrap();
        assert_eq!(got.len() as u64, 4096 + report.bytes_kept_torn);
        assert!(got[..4096].iter().all(|&b| b == b'h'));
        // Disarmed: the next sync works.
        let mut f = OpenOptions::new().append(true).open(&p).unwrap();
        f.write_all(b"d").unwrap();
        f.sync_data().unwrap();
    }

    #[test]
    fn mkdir_needs_parent_sync() {
        let m = Mounted::new();
        fs::create_dir(m.path("lost")).unwrap();
        fs::create_dir(m.path("kept")).unwrap();
        sync_dir(m.root());
        fs::create_dir(m.path("kept/inner")).unwrap();
        durable_file(&m.path("kept/inner/f"), b"x");
        fs::create_dir(m.path("late")).unwrap();
        let report = m.fs.cut();
        assert_eq!(report.entries_reverted, 2);
        assert!(!m.path("late").exists());
        assert!(m.path("kept").is_dir());
        assert!(m.path("lost").is_dir());
        // `inner` was never synced into `kept`, so neither it nor its file survive.
        assert!(!m.path("kept/inner").exists());
        assert_eq!(report.inodes_removed, 3);

        fs::remove_dir(m.path("lost")).unwrap();
        m.fs.cut();
        assert!(m.path("lost").is_dir());
    }

    #[test]
    fn handle_from_before_the_cut_fails() {
        let m = Mounted::new();
        let p = m.path("f");
        durable_file(&p, &[b'a'; 8192]);
        let mut old = OpenOptions::new().read(true).write(true).open(&p).unwrap();
        let mut page = vec![0u8; 4096];
        old.read_exact(&mut page).unwrap();
        let report = m.fs.cut();
        // `release` of earlier handles travels in the background, so more may be counted.
        assert!(report.handles_invalidated >= 1, "{report}");
        // What the old handle read before the cut is not served again from a page cache:
        // the read reaches the file system, which refuses the old handle.
        old.seek(SeekFrom::Start(0)).unwrap();
        assert_eq!(
            old.read_exact(&mut page).unwrap_err().raw_os_error(),
            Some(libc::EIO)
        );
        let err = old.write_all(b"2").unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EIO));
        assert_eq!(old.sync_all().unwrap_err().raw_os_error(), Some(libc::EIO));
        drop(old);
        // A fresh handle works.
        let mut fresh = OpenOptions::new().append(true).open(&p).unwrap();
        fresh.write_all(b"b").unwrap();
        assert_eq!(fs::metadata(&p).unwrap().len(), 8193);
    }

    #[test]
    fn two_mounts_are_independent() {
        let one = Mounted::new();
        let two = Mounted::new();
        durable_file(&one.path("f"), b"one");
        durable_file(&two.path("f"), b"two");
        fs::write(one.path("g"), b"unsynced").unwrap();
        fs::write(two.path("g"), b"unsynced").unwrap();
        one.fs.cut();
        assert!(!one.path("g").exists());
        assert_eq!(fs::read(two.path("g")).unwrap(), b"unsynced");
        assert_eq!(fs::read(one.path("f")).unwrap(), b"one");
        assert_eq!(fs::read(two.path("f")).unwrap(), b"two");
        assert_eq!(two.fs.stats().bytes_written, 3 + 8);
    }

    #[allow(unsafe_code)]
    fn rename_noreplace(from: &Path, to: &Path) -> std::io::Result<()> {
        use std::os::unix::ffi::OsStrExt as _;
        let from = std::ffi::CString::new(from.as_os_str().as_bytes())?;
        let to = std::ffi::CString::new(to.as_os_str().as_bytes())?;
        // SAFETY: both pointers are NUL-terminated strings that live across the call.
        let rc = unsafe {
            libc::renameat2(
                libc::AT_FDCWD,
                from.as_ptr(),
                libc::AT_FDCWD,
                to.as_ptr(),
                libc::RENAME_NOREPLACE,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }

    #[test]
    fn posix_errors() {
        let m = Mounted::new();
        fs::write(m.path("f"), b"x").unwrap();
        fs::create_dir(m.path("d")).unwrap();
        fs::write(m.path("d/inner"), b"y").unwrap();
        let err = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(m.path("f"))
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::AlreadyExists);
        assert_eq!(
            fs::remove_dir(m.path("d")).unwrap_err().raw_os_error(),
            Some(libc::ENOTEMPTY)
        );
        assert_eq!(
            fs::remove_dir(m.path("f")).unwrap_err().raw_os_error(),
            Some(libc::ENOTDIR)
        );
        assert!(fs::remove_file(m.path("d")).is_err());
        assert_eq!(
            fs::read(m.path("missing")).unwrap_err().kind(),
            ErrorKind::NotFound
        );
        assert_eq!(
            fs::rename(m.path("d"), m.path("d/inner/x"))
                .unwrap_err()
                .raw_os_error(),
            Some(libc::ENOTDIR)
        );
        fs::create_dir(m.path("d/sub")).unwrap();
        assert_eq!(
            fs::rename(m.path("d"), m.path("d/sub/x"))
                .unwrap_err()
                .raw_os_error(),
            Some(libc::EINVAL)
        );
        let mut names: Vec<_> = fs::read_dir(m.path("d"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        assert_eq!(names, vec![OsString::from("inner"), OsString::from("sub")]);
        fs::write(m.path("g"), b"g").unwrap();
        assert_eq!(
            rename_noreplace(&m.path("g"), &m.path("f"))
                .unwrap_err()
                .raw_os_error(),
            Some(libc::EEXIST)
        );
        rename_noreplace(&m.path("g"), &m.path("h")).unwrap();
        assert_eq!(fs::read(m.path("h")).unwrap(), b"g");
        // O_TRUNC on an existing file.
        fs::write(m.path("f"), b"z").unwrap();
        assert_eq!(fs::read(m.path("f")).unwrap(), b"z");
        let stat = m.root().metadata().unwrap();
        assert!(stat.is_dir());
    }

    #[test]
    fn mount_errors_say_why() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing");
        let err = PowerCutFs::mount(&missing).unwrap_err();
        assert!(format!("{err:#}").contains("not accessible"), "{err:#}");
        let file = dir.path().join("file");
        fs::write(&file, b"").unwrap();
        let err = PowerCutFs::mount(&file).unwrap_err();
        assert!(format!("{err:#}").contains("not a directory"), "{err:#}");
    }

    #[test]
    fn unmounts_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let fs = PowerCutFs::mount(dir.path()).unwrap();
        let mounted = |path: &Path| {
            let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap();
            let path = path.to_str().unwrap().to_string();
            mounts
                .lines()
                .any(|line| line.split(' ').nth(4) == Some(path.as_str()) && line.contains(FS_NAME))
        };
        let path = fs.path().to_path_buf();
        assert!(mounted(&path));
        fs::write(path.join("f"), b"x").unwrap();
        let start = Instant::now();
        drop(fs);
        assert!(!mounted(&path));
        assert!(!path.join("f").exists());
        eprintln!("unmount took {:?}", start.elapsed());
    }

    #[test]
    fn throughput_64_mib_with_periodic_fsync() {
        let m = Mounted::new();
        let p = m.path("big");
        let chunk = vec![0x5au8; 1 << 20];
        let start = Instant::now();
        let mut f = File::create(&p).unwrap();
        for i in 1..=64 {
            f.write_all(&chunk).unwrap();
            if i % 4 == 0 {
                f.sync_data().unwrap();
            }
        }
        drop(f);
        let secs = start.elapsed().as_secs_f64();
        eprintln!(
            "powercut throughput: 64 MiB in {secs:.2} s = {:.0} MB/s",
            64.0 * 1.048_576 / secs
        );
        assert_eq!(fs::metadata(&p).unwrap().len(), 64 << 20);
        let stats = m.fs.stats();
        assert_eq!(stats.file_syncs, 16);
        assert_eq!(stats.bytes_synced, 64 << 20);
    }
}
