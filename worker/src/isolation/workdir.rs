//! Each attempt's working directory: where it is, who may enter it, and when it goes away.
//!
//! **Layout.** Under the work root (`--work-dir`), each worker process takes a directory of its
//! own, `worker-<n>` (the first one no running worker holds: it keeps an `flock` on it while
//! it runs, so several workers may share a root, and a restarted worker takes over what its
//! predecessor left). An attempt runs in
//!
//! ```text
//! <work-dir>/worker-<n>/w<wave id>/<task id>[@<index>].a<attempt>
//! ```
//!
//! e.g. `/tmp/venom-worker-0/worker-0/w7/shard@3.a2` for attempt 2 of `shard[3]` of wave 7.
//! One level per attempt, not a directory per micro-task with its attempts inside: making and
//! removing a directory is the expensive part (about 75 µs for a `mkdir` + `rmdir` on ext4),
//! and most micro-tasks have one attempt. The task id is sanitized ([`micro_dir_name`]):
//! anything but `[A-Za-z0-9_.-]` becomes `_`, a leading `.` gets a `_` before it, so no name is
//! `.`, `..` or hidden; `@` cannot appear in an id, so `a@1` never meets a task called `a-1`
//! or `a.1`, and the name ends in `.a<digits>`, which no other (micro-task, attempt) pair
//! gives. An assignment without a task id (never one from a wave file, whose ids are not
//! empty) is named by its micro-task number, `@<micro>`, so two micro-tasks never share a
//! directory.
//!
//! **Permissions.** Every directory the worker makes is mode 0700 and the worker's own, so
//! other local users can read none of them. With `--run-as USER` the attempt's directory is
//! USER's (0700), and the directories above it (the root included) are the worker's with
//! USER's primary group and mode 0710: USER can pass through them to its own directory but
//! cannot list them, create anything in them or rename them, and nobody outside that group
//! can even pass through. Tasks of one worker then all run as one user, so they can enter each
//! other's attempt directories when they guess the names.
//!
//! With `--run-as-uids` each wave has a uid and gid of its own ([`super::uids`]), so no one
//! group may pass through everything: the root and `worker-<n>` are the worker's, mode 0711
//! (anyone passes through, nobody but the worker lists or changes them); the wave's directory
//! `w<wave>` is the worker's with the wave's gid, 0710 (the wave's tasks pass through, other
//! waves cannot even do that, nor list it); the attempt's directory is the wave's uid's, 0700.
//! The wave's directory stays the worker's, not the wave's, for the reason it does with
//! `--run-as`: a task that owned it could rename or replace its entries while the worker (as
//! root) makes, times and removes them. When the worker starts, the wave directories its
//! predecessor left in its `worker-<n>` are given the owner and mode of the current flags (a
//! worker restarted from `--run-as` to `--run-as-uids` may get more attempts of those waves);
//! kept attempt directories keep the owner they had, and are swept by age.
//!
//! **Removal policy.** When an attempt ends:
//! - it succeeded: its directory is removed at once, and with it the directories this worker
//!   kept for its micro-task's earlier, failed attempts (a later success makes them
//!   uninteresting);
//! - it never started (the process could not be spawned), or it was cancelled (the wave was
//!   cancelled, the coordinator took the work elsewhere, the worker is shutting down): its
//!   directory is removed — nothing the task did is in question;
//! - otherwise (a non-zero exit, a signal, a timeout): its directory is kept for inspection, its
//!   modification time set to the end of the attempt, and [`WorkDirs::sweep`] (every
//!   [`WorkDirs::sweep_interval`], on a thread of its own) removes it once it is older than
//!   `--keep-failed-workdirs-for` (default 1 h; 0 removes failed attempts' directories at once
//!   too). Sweeps also clear what a worker that died left behind in its own `worker-<n>`
//!   (directories whose lock nobody holds), by the same age rule.
//!
//! A wave's directory stays (empty) while the wave may send more; sweeps remove it once empty,
//! as does the worker when it stops.
//!
//! Removal never follows a symbolic link a task left (std's `remove_dir_all` works on open
//! directory handles); a directory a task made unwritable is made writable first.
//!
//! A task given an explicit `workdir` by its wave runs there instead; the worker neither makes
//! nor removes that directory (see [`super::Isolation`]).

use std::collections::{HashMap, HashSet};
use std::fs::{DirBuilder, File};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use venom_core::AttemptRef;

use super::user::{effective_uid, TaskIds, TaskUsers};

/// Most worker directories (`worker-<n>`) looked at under one root: how many workers may
/// share a root at once.
pub const MAX_WORKERS_PER_ROOT: u32 = 64;
/// Longest sanitized task id in a directory name, in bytes (the wave format's own limit).
const MAX_TASK_NAME_BYTES: usize = venom_core::wave::MAX_ID_CHARS;
/// Sweeps happen every quarter of `--keep-failed-workdirs-for`, but not more often than this…
const MIN_SWEEP_INTERVAL: Duration = Duration::from_secs(10);
/// …nor less often than this.
const MAX_SWEEP_INTERVAL: Duration = Duration::from_secs(300);

/// The default `--work-dir`: `$TMPDIR/venom-worker-<uid>` (`/tmp/…` without `TMPDIR`).
///
/// Not `$XDG_RUNTIME_DIR`: that is a small tmpfs, systemd removes it when the user's last
/// session ends, and it is mode 0700, so a `--run-as` user could never reach its own
/// directory inside it.
pub fn default_work_root() -> PathBuf {
    std::env::temp_dir().join(format!("venom-worker-{}", effective_uid()))
}

/// How a micro-task is named in its attempts' directories: its task id, sanitized, then
/// `@<index>` for an array task's micro-task; without a task id, `@<micro>`.
pub fn micro_dir_name(task_id: &str, index: Option<u32>, micro: u32) -> String {
    if task_id.is_empty() {
        return format!("@{micro}");
    }
    let mut name: String = task_id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if name.starts_with('.') {
        name.insert(0, '_');
    }
    name.truncate(MAX_TASK_NAME_BYTES); // ASCII only by now: any byte is a char boundary
    match index {
        Some(index) => format!("{name}@{index}"),
        None => name,
    }
}

/// An attempt's directory below the worker's own: `w<wave>/<micro>.a<attempt>`.
pub fn attempt_dir_relative(attempt: AttemptRef, task_id: &str, index: Option<u32>) -> PathBuf {
    Path::new(&format!("w{}", attempt.wave_id)).join(format!(
        "{}.a{}",
        micro_dir_name(task_id, index, attempt.micro),
        attempt.attempt
    ))
}

/// How an attempt ended, as far as its directory is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// Exit code 0: remove it, and the micro-task's kept failures.
    Succeeded,
    /// The process never started, or was cancelled: remove it (the micro-task's kept
    /// failures stay).
    Discarded,
    /// Anything else: keep it for inspection, for `--keep-failed-workdirs-for`.
    Failed,
}

/// Why the work root cannot be used; the worker does not start.
#[derive(Debug, thiserror::Error)]
pub enum WorkRootError {
    #[error("--work-dir {path}: cannot create it: {source}")]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("--work-dir {path}: {problem}")]
    Unusable { path: PathBuf, problem: String },
    #[error(
        "--work-dir {path}: {who} cannot reach it: {blocking} is mode {mode:04o}, owned by uid \
         {owner_uid}, gid {owner_gid}; choose a --work-dir whose parent directories others may \
         pass through (like /tmp or /var/tmp)"
    )]
    Unreachable {
        path: PathBuf,
        /// Who tasks run as ([`TaskUsers`]'s `Display`).
        who: String,
        blocking: PathBuf,
        mode: u32,
        owner_uid: u32,
        owner_gid: u32,
    },
    #[error(
        "--work-dir {path}: every worker-<n> directory up to {MAX_WORKERS_PER_ROOT} is held by \
         another running worker"
    )]
    AllTaken { path: PathBuf },
}

/// The work root and this worker's directory in it; makes and removes the attempts'
/// directories.
#[derive(Debug)]
pub struct WorkDirs {
    /// `--work-dir`.
    root: PathBuf,
    /// `root/worker-<n>`, this worker's.
    own: PathBuf,
    /// Holds the `flock` that tells other workers `own` is taken; released when dropped.
    _own_lock: File,
    /// `--keep-failed-workdirs-for`.
    keep_failed_for: Duration,
    /// Who tasks run as: says who owns which directory (see the module docs).
    users: TaskUsers,
    /// Which attempts run and which failures are kept; held for bookkeeping only, but for a
    /// sweep removing one old directory.
    state: Mutex<DirState>,
}

/// [`WorkDirs`]' bookkeeping.
#[derive(Debug, Default)]
struct DirState {
    /// The directories of attempts that have not ended: never swept, never reused.
    live: HashSet<PathBuf>,
    /// The failed attempts' directories this worker keeps, by micro-task (`w<wave>/<micro>`
    /// under its directory), for the micro-task's next success to remove. Leftovers of
    /// earlier workers are not here: sweeps remove them by age.
    kept: HashMap<PathBuf, Vec<PathBuf>>,
}

/// The micro-task an attempt's directory belongs to: its path without `.a<attempt>`.
fn micro_key(attempt_dir: &Path) -> PathBuf {
    let name = attempt_dir
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default();
    let micro = name
        .rsplit_once(".a")
        .map_or(name.as_str(), |(micro, _)| micro);
    attempt_dir.with_file_name(micro)
}

/// Mode and group (when not the worker's) of the root and `worker-<n>` directories.
fn top_access(users: &TaskUsers) -> (u32, Option<u32>) {
    match users {
        TaskUsers::Worker => (0o700, None),
        TaskUsers::User(user) => (0o710, Some(user.gid)),
        TaskUsers::PerWave(_) => (0o711, None),
    }
}

/// The wave whose directory `dir` is (`w<wave id>`).
fn wave_of_dir(dir: &Path) -> Option<u64> {
    dir.file_name()?.to_str()?.strip_prefix('w')?.parse().ok()
}

impl WorkDirs {
    /// Creates and checks `root` (0700, or 0710 with USER's group for `--run-as`, or 0711 for
    /// `--run-as-uids`), and takes a `worker-<n>` directory in it.
    pub fn open(
        root: &Path,
        keep_failed_for: Duration,
        users: &TaskUsers,
    ) -> Result<WorkDirs, WorkRootError> {
        let root = absolute(root);
        let (shared_mode, shared_group) = top_access(users);
        if let Some(parent) = root.parent() {
            std::fs::create_dir_all(parent).map_err(|source| WorkRootError::Create {
                path: root.clone(),
                source,
            })?;
        }
        make_private_dir(&root, shared_mode, shared_group).map_err(|problem| match problem {
            DirProblem::Io(source) => WorkRootError::Create {
                path: root.clone(),
                source,
            },
            DirProblem::Unusable(problem) => WorkRootError::Unusable {
                path: root.clone(),
                problem,
            },
        })?;
        // Every uid of a range is an "other" to the directories above the root (no account
        // has one), so the first stands for all.
        if let Some(ids) = users.ids_for_wave(0) {
            check_reachable(&root, ids, users)?;
        }
        let (own, own_lock) = take_worker_dir(&root, shared_mode, shared_group)?;
        let dirs = WorkDirs {
            root,
            own,
            _own_lock: own_lock,
            keep_failed_for,
            users: users.clone(),
            state: Mutex::new(DirState::default()),
        };
        for wave_dir in subdirs(&dirs.own) {
            let Some(wave_id) = wave_of_dir(&wave_dir) else {
                continue;
            };
            if let Err(error) = dirs.set_wave_dir_access(&wave_dir, wave_id) {
                tracing::warn!(
                    dir = %wave_dir.display(),
                    %error,
                    "cannot give a left-over wave directory the current owner and mode"
                );
            }
        }
        Ok(dirs)
    }

    /// Gives a wave's directory its group and mode: the worker's and 0700; with `--run-as`,
    /// the user's group and 0710; with `--run-as-uids`, the wave's gid and 0710.
    fn set_wave_dir_access(&self, wave_dir: &Path, wave_id: u64) -> std::io::Result<()> {
        let mode = match self.users.ids_for_wave(wave_id) {
            Some(TaskIds { gid, .. }) => {
                std::os::unix::fs::lchown(wave_dir, None, Some(gid))?;
                0o710
            }
            None => 0o700,
        };
        std::fs::set_permissions(wave_dir, std::fs::Permissions::from_mode(mode))
    }

    /// `--work-dir`, absolute.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// This worker's directory under the root.
    pub fn own(&self) -> &Path {
        &self.own
    }

    fn state(&self) -> MutexGuard<'_, DirState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Makes a fresh, empty directory for `attempt` (0700, the `--run-as` user's), with its
    /// wave's directory; a leftover of an earlier worker at the same place is removed first.
    /// Fails when the same attempt already runs here.
    pub fn create(
        &self,
        attempt: AttemptRef,
        task_id: &str,
        index: Option<u32>,
    ) -> std::io::Result<PathBuf> {
        let dir = self.own.join(attempt_dir_relative(attempt, task_id, index));
        {
            let mut state = self.state();
            if !state.live.insert(dir.clone()) {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    "the same attempt already runs on this worker",
                ));
            }
            // The same attempt again where its failure was kept: that directory is replaced.
            if let Some(kept) = state.kept.get_mut(&micro_key(&dir)) {
                kept.retain(|kept| *kept != dir);
            }
        }
        let made = self.make_attempt_dir(&dir, attempt.wave_id);
        if made.is_err() {
            self.state().live.remove(&dir);
        }
        made.map(|()| dir)
    }

    /// Makes `dir` and, when missing, its wave's directory. A sweep may remove an empty wave
    /// directory at any moment: then it is made again.
    fn make_attempt_dir(&self, dir: &Path, wave_id: u64) -> std::io::Result<()> {
        /// Tries when a sweep keeps removing the wave's directory under us.
        const TRIES: u32 = 3;
        let wave_dir = dir.parent().expect("an attempt directory has a parent");
        let mut tries = 0;
        loop {
            tries += 1;
            // 0700, or stricter under an odd umask: private either way.
            match DirBuilder::new().mode(0o700).create(dir) {
                Ok(()) => break,
                Err(error) if error.kind() == std::io::ErrorKind::NotFound && tries < TRIES => {
                    // Nobody but the worker makes entries in its own directory (it is the
                    // worker's, at most passable for others).
                    match DirBuilder::new().mode(0o700).create(wave_dir) {
                        Ok(()) => self.set_wave_dir_access(wave_dir, wave_id)?,
                        Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {}
                        Err(error) => return Err(error),
                    }
                }
                Err(error)
                    if error.kind() == std::io::ErrorKind::AlreadyExists && tries < TRIES =>
                {
                    // A leftover of an earlier worker at the same place.
                    remove_tree(dir)?;
                }
                Err(error) => return Err(error),
            }
        }
        if let Some(TaskIds { uid, gid }) = self.users.ids_for_wave(wave_id) {
            std::os::unix::fs::lchown(dir, Some(uid), Some(gid))?;
        }
        Ok(())
    }

    /// Applies the removal policy to an attempt's directory as the attempt ends.
    pub fn finish(&self, dir: &Path, ending: Ending) {
        let ending = match ending {
            Ending::Failed if self.keep_failed_for.is_zero() => Ending::Discarded,
            ending => ending,
        };
        match ending {
            Ending::Succeeded => {
                remove_logged(dir);
                let kept = {
                    let mut state = self.state();
                    state.live.remove(dir);
                    let kept = state.kept.remove(&micro_key(dir)).unwrap_or_default();
                    kept.into_iter()
                        .filter(|kept| !state.live.contains(kept))
                        .collect::<Vec<_>>()
                };
                for failed in kept {
                    remove_logged(&failed);
                }
            }
            Ending::Discarded => {
                remove_logged(dir);
                self.state().live.remove(dir);
            }
            Ending::Failed => {
                let touched = File::open(dir).and_then(|dir| dir.set_modified(SystemTime::now()));
                if let Err(error) = touched {
                    tracing::debug!(dir = %dir.display(), %error, "cannot set the kept directory's time");
                }
                {
                    let mut state = self.state();
                    state.live.remove(dir);
                    state
                        .kept
                        .entry(micro_key(dir))
                        .or_default()
                        .push(dir.to_owned());
                }
                tracing::info!(
                    dir = %dir.display(),
                    keep_for_s = self.keep_failed_for.as_secs(),
                    "kept the failed attempt's working directory for inspection"
                );
            }
        }
        // The wave's directory stays while the wave may send more; sweeps remove it once empty.
    }

    /// How often [`WorkDirs::sweep`] should run: a quarter of the keep time, within bounds.
    pub fn sweep_interval(&self) -> Duration {
        (self.keep_failed_for / 4).clamp(MIN_SWEEP_INTERVAL, MAX_SWEEP_INTERVAL)
    }

    /// Removes the kept directories of failed attempts that are older than
    /// `--keep-failed-workdirs-for`, here and in the directories of workers that are gone
    /// (whose lock can be taken); those are removed too once empty. Returns how many attempt
    /// directories it removed.
    pub fn sweep(&self) -> usize {
        let now = SystemTime::now();
        let mut n_removed = 0;
        for dir in worker_dirs(&self.root) {
            if dir == self.own {
                n_removed += self.sweep_worker_dir(&dir, now);
                continue;
            }
            let Ok(handle) = File::open(&dir) else {
                continue;
            };
            if !try_lock(&handle) {
                continue; // another running worker's
            }
            n_removed += self.sweep_worker_dir(&dir, now);
            if std::fs::remove_dir(&dir).is_ok() {
                tracing::debug!(dir = %dir.display(), "removed a stopped worker's empty directory");
            }
        }
        n_removed
    }

    /// Sweeps `w*/*` under one worker directory.
    fn sweep_worker_dir(&self, worker_dir: &Path, now: SystemTime) -> usize {
        let mut n_removed = 0;
        for wave_dir in subdirs(worker_dir) {
            for attempt_dir in subdirs(&wave_dir) {
                // Held through the removal: an attempt given this very path meanwhile (a
                // leftover's) must find it gone, not lose its fresh directory.
                let mut state = self.state();
                if state.live.contains(&attempt_dir) {
                    continue;
                }
                let age = std::fs::symlink_metadata(&attempt_dir)
                    .and_then(|metadata| metadata.modified())
                    .map(|modified| now.duration_since(modified).unwrap_or(Duration::ZERO));
                if age.is_ok_and(|age| age >= self.keep_failed_for) {
                    remove_logged(&attempt_dir);
                    n_removed += 1;
                    let key = micro_key(&attempt_dir);
                    if let Some(kept) = state.kept.get_mut(&key) {
                        kept.retain(|dir| *dir != attempt_dir);
                        if kept.is_empty() {
                            state.kept.remove(&key);
                        }
                    }
                }
            }
            // Fails while anything is in it; an attempt being given a directory in it makes
            // it again.
            let _ = std::fs::remove_dir(&wave_dir);
        }
        n_removed
    }
}

impl Drop for WorkDirs {
    /// Removes this worker's directory if nothing is kept in it (the lock goes with the file).
    fn drop(&mut self) {
        for wave_dir in subdirs(&self.own) {
            let _ = std::fs::remove_dir(wave_dir);
        }
        let _ = std::fs::remove_dir(&self.own);
    }
}

/// `path` made absolute against the current directory, `.` and `..` resolved lexically.
fn absolute(path: &Path) -> PathBuf {
    let joined = if path.is_absolute() {
        path.to_owned()
    } else {
        std::env::current_dir()
            .unwrap_or_else(|_| PathBuf::from("/"))
            .join(path)
    };
    let mut clean = PathBuf::new();
    for component in joined.components() {
        match component {
            Component::ParentDir => {
                clean.pop();
            }
            Component::CurDir => {}
            other => clean.push(other),
        }
    }
    clean
}

/// Why a directory could not be made private.
enum DirProblem {
    Io(std::io::Error),
    Unusable(String),
}

impl From<std::io::Error> for DirProblem {
    fn from(error: std::io::Error) -> Self {
        DirProblem::Io(error)
    }
}

/// Makes `dir` (its parent must exist) or checks the one there: a real directory (not a
/// link), the worker's own; then sets `mode` and, when given, the group.
fn make_private_dir(dir: &Path, mode: u32, group: Option<u32>) -> Result<(), DirProblem> {
    match DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {
            let metadata = std::fs::symlink_metadata(dir)?;
            if metadata.file_type().is_symlink() {
                return Err(DirProblem::Unusable(format!(
                    "{} is a symbolic link; the worker only uses a real directory",
                    dir.display()
                )));
            }
            if !metadata.is_dir() {
                return Err(DirProblem::Unusable(format!(
                    "{} is not a directory",
                    dir.display()
                )));
            }
            let uid = effective_uid();
            if metadata.uid() != uid {
                return Err(DirProblem::Unusable(format!(
                    "{} belongs to uid {}, not to this worker (uid {uid}); another user could \
                     read or replace what tasks keep there",
                    dir.display(),
                    metadata.uid()
                )));
            }
        }
        Err(error) => return Err(DirProblem::Io(error)),
    }
    if let Some(gid) = group {
        std::os::unix::fs::lchown(dir, None, Some(gid))?;
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))?;
    Ok(())
}

/// Checks that a task running as `ids` can pass through every directory from `/` to `root`
/// (the root itself is made passable by the worker); `users` names them in the error.
fn check_reachable(root: &Path, ids: TaskIds, users: &TaskUsers) -> Result<(), WorkRootError> {
    if ids.uid == 0 {
        return Ok(());
    }
    for dir in root.ancestors() {
        let metadata = std::fs::metadata(dir).map_err(|source| WorkRootError::Create {
            path: root.to_owned(),
            source,
        })?;
        let mode = metadata.mode();
        let passable = if metadata.uid() == ids.uid {
            mode & 0o100 != 0
        } else if metadata.gid() == ids.gid {
            mode & 0o010 != 0
        } else {
            mode & 0o001 != 0
        };
        if !passable {
            return Err(WorkRootError::Unreachable {
                path: root.to_owned(),
                who: users.to_string(),
                blocking: dir.to_owned(),
                mode: mode & 0o7777,
                owner_uid: metadata.uid(),
                owner_gid: metadata.gid(),
            });
        }
    }
    Ok(())
}

/// Takes the first `root/worker-<n>` that no running worker holds.
fn take_worker_dir(
    root: &Path,
    mode: u32,
    group: Option<u32>,
) -> Result<(PathBuf, File), WorkRootError> {
    /// Tries at one name when its directory vanished under us (a sweep or a stopping worker
    /// removed it while empty).
    const TRIES_PER_NAME: u32 = 3;
    let unusable = |dir: &Path, error: std::io::Error| WorkRootError::Unusable {
        path: root.to_owned(),
        problem: format!("{}: {error}", dir.display()),
    };
    for n in 0..MAX_WORKERS_PER_ROOT {
        let dir = root.join(format!("worker-{n}"));
        for _ in 0..TRIES_PER_NAME {
            match make_private_dir(&dir, mode, group) {
                Ok(()) => {}
                // Not ours (or not a directory): leave it alone and look further.
                Err(DirProblem::Unusable(problem)) => {
                    tracing::warn!(%problem, "skipping a worker directory");
                    break;
                }
                Err(DirProblem::Io(error)) => return Err(unusable(&dir, error)),
            }
            let handle = match File::open(&dir) {
                Ok(handle) => handle,
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => continue,
                Err(error) => return Err(unusable(&dir, error)),
            };
            if !try_lock(&handle) {
                break; // another running worker's
            }
            // Locked; but is it still the directory at that name?
            let held = handle.metadata().map_err(|error| unusable(&dir, error))?;
            let same = std::fs::symlink_metadata(&dir)
                .is_ok_and(|now| (now.dev(), now.ino()) == (held.dev(), held.ino()));
            if same {
                return Ok((dir, handle));
            }
        }
    }
    Err(WorkRootError::AllTaken {
        path: root.to_owned(),
    })
}

/// The `worker-<n>` directories under `root`.
fn worker_dirs(root: &Path) -> Vec<PathBuf> {
    subdirs(root)
        .into_iter()
        .filter(|dir| {
            dir.file_name()
                .and_then(|name| name.to_str())
                .is_some_and(|name| name.starts_with("worker-"))
        })
        .collect()
}

/// The real directories (not links) directly in `dir`; none when it cannot be read.
fn subdirs(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter(|entry| entry.file_type().is_ok_and(|kind| kind.is_dir()))
        .map(|entry| entry.path())
        .collect()
}

/// Removes `path` and everything under it, never following links; a directory a task made
/// unreadable or unwritable is opened up first. Nothing there is fine.
fn remove_tree(path: &Path) -> std::io::Result<()> {
    // Most attempts leave their directory empty: one rmdir (which never follows a link).
    if std::fs::remove_dir(path).is_ok() {
        return Ok(());
    }
    let metadata = match std::fs::symlink_metadata(path) {
        Ok(metadata) => metadata,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(error) => return Err(error),
    };
    if !metadata.is_dir() {
        return std::fs::remove_file(path);
    }
    match std::fs::remove_dir_all(path) {
        Err(error) if error.kind() == std::io::ErrorKind::PermissionDenied => {
            open_up(path);
            std::fs::remove_dir_all(path)
        }
        result => result,
    }
}

/// Gives the owner rwx on every directory under `path` (iteratively: a task may nest deeply).
fn open_up(path: &Path) {
    let mut pending = vec![path.to_owned()];
    while let Some(dir) = pending.pop() {
        let Ok(metadata) = std::fs::symlink_metadata(&dir) else {
            continue;
        };
        if !metadata.is_dir() {
            continue;
        }
        let mode = metadata.mode() | 0o700;
        let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode & 0o7777));
        pending.extend(subdirs(&dir));
    }
}

/// [`remove_tree`], logging a failure (the next sweep tries again).
fn remove_logged(path: &Path) {
    if let Err(error) = remove_tree(path) {
        tracing::warn!(dir = %path.display(), %error, "cannot remove a working directory");
    }
}

/// Takes an exclusive `flock` on `file` without waiting; false when another process holds it.
/// The lock lasts as long as the file stays open.
#[allow(unsafe_code)]
fn try_lock(file: &File) -> bool {
    // SAFETY: flock(2) takes a descriptor, which `file` keeps open for the call, and flags;
    // it touches no memory of this process.
    unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) == 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attempt(wave_id: u64, attempt: u32) -> AttemptRef {
        AttemptRef {
            wave_id,
            micro: 0,
            attempt,
        }
    }

    fn mode_of(path: &Path) -> u32 {
        std::fs::symlink_metadata(path).expect("exists").mode() & 0o7777
    }

    #[test]
    fn names_are_sanitized_and_cannot_collide() {
        assert_eq!(micro_dir_name("shard", Some(3), 9), "shard@3");
        assert_eq!(micro_dir_name("shard", None, 9), "shard");
        assert_eq!(micro_dir_name("a-1", None, 0), "a-1");
        assert_ne!(
            micro_dir_name("a-1", None, 0),
            micro_dir_name("a", Some(1), 1)
        );
        assert_eq!(micro_dir_name("..", None, 0), "_..");
        assert_eq!(micro_dir_name(".hidden", None, 0), "_.hidden");
        assert_eq!(micro_dir_name("", None, 4), "@4");
        assert_ne!(micro_dir_name("", None, 4), micro_dir_name("", None, 5));
        assert_eq!(
            micro_dir_name("../../etc/passwd", Some(1), 0),
            "_.._.._etc_passwd@1"
        );
        assert_eq!(micro_dir_name("a/b c\u{e9}", None, 0), "a_b_c_");
        assert_eq!(micro_dir_name(&"x".repeat(500), None, 0).len(), 128);
        assert_eq!(
            attempt_dir_relative(
                AttemptRef {
                    wave_id: 7,
                    micro: 3,
                    attempt: 2
                },
                "shard",
                Some(3)
            ),
            PathBuf::from("w7/shard@3.a2")
        );
        // Task ids may contain `.a`: the micro-task is what precedes the last `.a<n>`.
        assert_eq!(
            micro_key(Path::new("/w/w7/x.a1.a2")),
            PathBuf::from("/w/w7/x.a1")
        );
        assert_eq!(
            micro_key(Path::new("/w/w7/shard@3.a2")),
            PathBuf::from("/w/w7/shard@3")
        );
    }

    #[test]
    fn the_root_and_every_directory_are_private() {
        let temp = tempfile::tempdir().expect("temp dir");
        let root = temp.path().join("nested").join("root");
        let dirs =
            WorkDirs::open(&root, Duration::from_secs(3600), &TaskUsers::Worker).expect("usable");
        assert_eq!(dirs.root(), root);
        assert_eq!(dirs.own(), root.join("worker-0"));
        assert_eq!(mode_of(&root), 0o700);
        assert_eq!(mode_of(dirs.own()), 0o700);
        let dir = dirs
            .create(attempt(7, 1), "shard", Some(3))
            .expect("created");
        assert_eq!(dir, root.join("worker-0/w7/shard@3.a1"));
        for path in [&dir, &root.join("worker-0/w7")] {
            assert_eq!(mode_of(path), 0o700, "{}", path.display());
        }
        // The same attempt cannot run twice at once.
        let again = dirs.create(attempt(7, 1), "shard", Some(3));
        assert_eq!(
            again.expect_err("already live").kind(),
            std::io::ErrorKind::AlreadyExists
        );
    }

    #[test]
    fn left_over_wave_directories_get_the_current_owner_and_mode() {
        let temp = tempfile::tempdir().expect("temp dir");
        let left_over = temp.path().join("worker-0/w5");
        std::fs::create_dir_all(&left_over).expect("a predecessor's wave directory");
        std::fs::set_permissions(&left_over, std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        std::fs::create_dir(temp.path().join("worker-0/not-a-wave")).expect("mkdir");
        let dirs = WorkDirs::open(temp.path(), Duration::ZERO, &TaskUsers::Worker).expect("usable");
        assert_eq!(dirs.own(), temp.path().join("worker-0"));
        assert_eq!(mode_of(&left_over), 0o700);
        drop(dirs);

        if effective_uid() != 0 {
            return; // giving directories other groups takes root
        }
        std::fs::create_dir_all(&left_over).expect("made again");
        let users = TaskUsers::PerWave("300000-300999".parse().expect("a range"));
        let dirs = WorkDirs::open(temp.path(), Duration::ZERO, &users).expect("usable");
        let owner = |path: &Path| {
            let metadata = std::fs::symlink_metadata(path).expect("exists");
            (metadata.uid(), metadata.gid(), metadata.mode() & 0o7777)
        };
        assert_eq!(owner(&left_over), (0, 300_005, 0o710));
        assert_eq!(owner(temp.path()).2, 0o711);
        assert_eq!(owner(dirs.own()).2, 0o711);
        let attempt_dir = dirs.create(attempt(1007, 1), "t", None).expect("made");
        assert_eq!(owner(&attempt_dir), (300_007, 300_007, 0o700));
        assert_eq!(owner(&dirs.own().join("w1007")), (0, 300_007, 0o710));
    }

    #[test]
    fn a_root_that_is_a_link_or_someone_elses_is_refused() {
        let temp = tempfile::tempdir().expect("temp dir");
        let target = temp.path().join("target");
        std::fs::create_dir(&target).expect("target");
        let link = temp.path().join("link");
        std::os::unix::fs::symlink(&target, &link).expect("link");
        let error = WorkDirs::open(&link, Duration::ZERO, &TaskUsers::Worker).expect_err("a link");
        assert!(error.to_string().contains("symbolic link"), "{error}");
        assert!(error.to_string().starts_with("--work-dir "), "{error}");

        let file = temp.path().join("file");
        std::fs::write(&file, "x").expect("file");
        let error = WorkDirs::open(&file, Duration::ZERO, &TaskUsers::Worker).expect_err("a file");
        assert!(error.to_string().contains("not a directory"), "{error}");

        if effective_uid() == 0 {
            let foreign = temp.path().join("foreign");
            std::fs::create_dir(&foreign).expect("foreign");
            std::os::unix::fs::chown(&foreign, Some(65534), None).expect("chown");
            let error =
                WorkDirs::open(&foreign, Duration::ZERO, &TaskUsers::Worker).expect_err("not ours");
            assert!(
                error.to_string().contains("belongs to uid 65534"),
                "{error}"
            );
        } else {
            let error =
                WorkDirs::open(Path::new("/proc/venom"), Duration::ZERO, &TaskUsers::Worker)
                    .expect_err("cannot create under /proc");
            assert!(error.to_string().contains("cannot create it"), "{error}");
        }
    }

    #[test]
    fn workers_sharing_a_root_get_their_own_directories() {
        let temp = tempfile::tempdir().expect("temp dir");
        let first = WorkDirs::open(temp.path(), Duration::ZERO, &TaskUsers::Worker).expect("first");
        let second =
            WorkDirs::open(temp.path(), Duration::ZERO, &TaskUsers::Worker).expect("second");
        assert_eq!(first.own(), temp.path().join("worker-0"));
        assert_eq!(second.own(), temp.path().join("worker-1"));
        drop(first);
        // The first worker's (empty) directory is gone and free again.
        assert!(!temp.path().join("worker-0").exists());
        let third = WorkDirs::open(temp.path(), Duration::ZERO, &TaskUsers::Worker).expect("third");
        assert_eq!(third.own(), temp.path().join("worker-0"));
    }

    #[test]
    fn success_removes_the_directory_and_earlier_failures_of_the_micro_task() {
        let temp = tempfile::tempdir().expect("temp dir");
        let dirs = WorkDirs::open(temp.path(), Duration::from_secs(3600), &TaskUsers::Worker)
            .expect("usable");
        let failed = dirs.create(attempt(1, 1), "t", Some(0)).expect("a1");
        std::fs::write(failed.join("core"), "dump").expect("write");
        dirs.finish(&failed, Ending::Failed);
        assert!(
            failed.join("core").exists(),
            "a failed attempt's directory is kept"
        );

        // Another micro-task's failure is not touched by this one's success.
        let other = dirs.create(attempt(1, 1), "t", Some(1)).expect("other");
        dirs.finish(&other, Ending::Failed);

        let succeeded = dirs.create(attempt(1, 2), "t", Some(0)).expect("a2");
        std::fs::write(succeeded.join("out"), "x").expect("write");
        dirs.finish(&succeeded, Ending::Succeeded);
        assert!(!succeeded.exists());
        assert!(
            !failed.exists(),
            "the later success removes the kept failure"
        );
        assert!(other.exists());

        let never = dirs.create(attempt(2, 1), "t", None).expect("never ran");
        dirs.finish(&never, Ending::Discarded);
        assert!(!never.exists());
        assert!(dirs.own().join("w2").exists(), "the wave may send more");
        assert_eq!(dirs.sweep(), 0);
        assert!(
            !dirs.own().join("w2").exists(),
            "a sweep removes it once empty"
        );
        // And the next attempt of that wave makes it again.
        let later = dirs.create(attempt(2, 2), "t", None).expect("made again");
        assert!(later.is_dir());
    }

    #[test]
    fn a_success_keeps_the_directory_of_a_sibling_that_still_runs() {
        let temp = tempfile::tempdir().expect("temp dir");
        let dirs = WorkDirs::open(temp.path(), Duration::from_secs(3600), &TaskUsers::Worker)
            .expect("usable");
        let running = dirs.create(attempt(1, 1), "t", None).expect("a1");
        let succeeded = dirs.create(attempt(1, 2), "t", None).expect("a2");
        dirs.finish(&succeeded, Ending::Succeeded);
        assert!(!succeeded.exists());
        assert!(
            running.exists(),
            "a running attempt's directory is never removed"
        );
    }

    #[test]
    fn a_discarded_attempt_leaves_the_micro_tasks_kept_failures() {
        let temp = tempfile::tempdir().expect("temp dir");
        let dirs = WorkDirs::open(temp.path(), Duration::from_secs(3600), &TaskUsers::Worker)
            .expect("usable");
        let failed = dirs.create(attempt(1, 1), "t", None).expect("a1");
        dirs.finish(&failed, Ending::Failed);
        let cancelled = dirs.create(attempt(1, 2), "t", None).expect("a2");
        dirs.finish(&cancelled, Ending::Discarded);
        assert!(!cancelled.exists());
        assert!(failed.exists());
    }

    #[test]
    fn failures_are_swept_once_older_than_the_keep_time() {
        let temp = tempfile::tempdir().expect("temp dir");
        let dirs = WorkDirs::open(temp.path(), Duration::from_secs(3600), &TaskUsers::Worker)
            .expect("usable");
        let old = dirs.create(attempt(1, 1), "old", None).expect("old");
        dirs.finish(&old, Ending::Failed);
        assert_eq!(dirs.state().kept.len(), 1);
        let recent = dirs.create(attempt(1, 1), "recent", None).expect("recent");
        dirs.finish(&recent, Ending::Failed);
        let running = dirs
            .create(attempt(1, 1), "running", None)
            .expect("running");
        let two_hours_ago = SystemTime::now() - Duration::from_secs(7200);
        for dir in [&old, &running] {
            File::open(dir)
                .and_then(|handle| handle.set_modified(two_hours_ago))
                .expect("set mtime");
        }
        assert_eq!(dirs.sweep(), 1);
        assert!(!old.exists());
        assert!(
            dirs.state().kept.keys().all(|key| !key.ends_with("old")),
            "a swept failure is forgotten"
        );
        assert!(recent.exists());
        assert!(
            running.exists(),
            "running attempts are never swept, however old"
        );
        assert_eq!(dirs.sweep_interval(), Duration::from_secs(300));
    }

    #[test]
    fn a_zero_keep_time_removes_failures_at_once() {
        let temp = tempfile::tempdir().expect("temp dir");
        let dirs = WorkDirs::open(temp.path(), Duration::ZERO, &TaskUsers::Worker).expect("usable");
        let failed = dirs.create(attempt(1, 1), "t", None).expect("a1");
        dirs.finish(&failed, Ending::Failed);
        assert!(!failed.exists());
        assert_eq!(dirs.sweep_interval(), MIN_SWEEP_INTERVAL);
    }

    #[test]
    fn a_stopped_workers_leftovers_are_swept_and_a_live_workers_are_not() {
        let temp = tempfile::tempdir().expect("temp dir");
        let keep = Duration::from_secs(60);
        let sweeper = WorkDirs::open(temp.path(), keep, &TaskUsers::Worker).expect("worker-0");
        let alive = WorkDirs::open(temp.path(), keep, &TaskUsers::Worker).expect("worker-1");
        let alive_kept = alive.create(attempt(1, 1), "t", None).expect("kept");
        alive.finish(&alive_kept, Ending::Failed);
        // A worker that died: its directory exists, nobody holds its lock.
        let dead_kept = temp.path().join("worker-5/w1/t.a1");
        std::fs::create_dir_all(&dead_kept).expect("leftover");
        let long_ago = SystemTime::now() - Duration::from_secs(3600);
        for dir in [&alive_kept, &dead_kept] {
            File::open(dir)
                .and_then(|handle| handle.set_modified(long_ago))
                .expect("set mtime");
        }
        assert_eq!(sweeper.sweep(), 1);
        assert!(!temp.path().join("worker-5").exists());
        assert!(alive_kept.exists(), "a running worker sweeps its own");
        assert_eq!(alive.sweep(), 1);
        assert!(!alive_kept.exists());
    }

    #[test]
    fn removal_copes_with_links_and_locked_directories() {
        let temp = tempfile::tempdir().expect("temp dir");
        let outside = temp.path().join("outside");
        std::fs::create_dir(&outside).expect("outside");
        std::fs::write(outside.join("precious"), "x").expect("precious");
        let root = temp.path().join("root");
        let dirs =
            WorkDirs::open(&root, Duration::from_secs(3600), &TaskUsers::Worker).expect("usable");
        let dir = dirs.create(attempt(1, 1), "t", None).expect("a1");
        std::os::unix::fs::symlink(&outside, dir.join("link")).expect("link");
        let locked = dir.join("locked");
        std::fs::create_dir_all(locked.join("inner")).expect("locked");
        std::fs::write(locked.join("inner/file"), "x").expect("file");
        std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o000)).expect("chmod");
        dirs.finish(&dir, Ending::Succeeded);
        assert!(!dir.exists());
        assert!(outside.join("precious").exists(), "links are not followed");
    }
}
