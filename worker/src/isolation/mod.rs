//! Task isolation: what stands between a task and the worker's secrets, other attempts' files
//! and more of the machine than the task asked for. Set up once when the worker starts
//! ([`Isolation::prepare`], which refuses to start with an error naming the flag at fault),
//! then applied to every attempt by the executor ([`Isolation::begin`]).
//!
//! - **A clean environment** ([`env`](mod@env)): a task never inherits the worker's
//!   environment, only the variables of [`TASK_ENV_ALLOW_LIST`] (with `--run-as-uids`, the
//!   attempt's own `HOME`, `USER`, `LOGNAME` and `SHELL` instead of the worker's), then the
//!   wave's `env`, then `VENOM_*` (`VENOM_WORKDIR` among them).
//! - **A working directory per attempt** ([`workdir`]): fresh, 0700, under `--work-dir`, and
//!   removed by a documented policy (`--keep-failed-workdirs-for`); or, when the wave names a
//!   `workdir`, that existing directory, which the worker neither makes nor removes.
//! - **Another user** ([`user`], `--run-as USER`, only for a worker running as root): tasks
//!   get USER's uid and primary gid (and no supplementary groups), and their directories
//!   belong to USER. This is what keeps a task away from the worker's own process: a task
//!   running as the worker's uid can read `/proc/<worker pid>/environ` (the worker's whole
//!   environment, however clean its own environment is) and every other attempt's directory.
//! - **A user per wave** ([`uids`], `--run-as-uids FIRST-LAST`, only for a worker running as
//!   root, instead of `--run-as`): each wave's tasks run as uid = gid = FIRST + (wave id mod
//!   the range's size), ids no account, group or subordinate id range may hold (checked at
//!   start), with `HOME` the attempt's directory, `USER` and `LOGNAME` `venom-<uid>` and
//!   `SHELL` `/bin/sh`; the wave's directory and its attempts' are closed to every other uid.
//!   On top of what `--run-as` gives, this keeps waves from each other: a task cannot list or
//!   read another wave's directories, nor signal (or ptrace) its processes. Not from the
//!   tasks of its own wave, which share the uid, nor from a wave whose id is congruent modulo
//!   the range's size (make the range larger than the number of waves alive at once); and
//!   nothing here restricts the network.
//! - **cgroup v2 limits** ([`cgroup`], `--cgroups auto|off|required`): `memory.max` from the
//!   task's `memory`, `cpu.max` from its `cpus`, the OOM killer reported in the outcome.
//!
//! All of it keeps the executor's fast `posix_spawn` path (no `pre_exec` hook), except that
//! std itself leaves that path for fork + exec when a uid or gid is set (`--run-as`,
//! `--run-as-uids`). What it costs: a directory made and removed per attempt (one `mkdir` and
//! one `rmdir`, about 75 µs on ext4), and for an argv task with a cgroup one more `exec` (the
//! gate).

pub mod cgroup;
pub mod env;
pub mod uids;
pub mod user;
pub mod workdir;

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use venom_core::AttemptOutcome;

pub use self::cgroup::{CgroupMode, CgroupParent};
pub use self::env::{task_base_env, DEFAULT_TASK_PATH, TASK_ENV_ALLOW_LIST};
pub use self::uids::UidRange;
pub use self::user::{effective_uid, RunAs, TaskIds, TaskUsers};
pub use self::workdir::{default_work_root, WorkDirs};

use self::cgroup::AttemptCgroup;
use self::workdir::Ending;
use crate::executor::Assignment;

/// The isolation flags, as [`crate::WorkerConfig::isolation_settings`] resolves them.
#[derive(Debug, Clone, PartialEq)]
pub struct IsolationSettings {
    /// `--work-dir`.
    pub work_dir: PathBuf,
    /// `--keep-failed-workdirs-for`.
    pub keep_failed_workdirs_for: Duration,
    /// `--run-as`.
    pub run_as: Option<String>,
    /// `--run-as-uids` (never together with `run_as`).
    pub run_as_uids: Option<UidRange>,
    /// `--cgroups`.
    pub cgroups: CgroupMode,
}

/// Why the worker cannot start with these isolation settings; every message names the flag.
#[derive(Debug, thiserror::Error)]
pub enum IsolationError {
    #[error(transparent)]
    WorkDir(#[from] workdir::WorkRootError),
    #[error("--run-as {user}: there is no such user")]
    NoSuchUser { user: String },
    #[error("--run-as {user}: cannot look the user up: {source}")]
    UserLookup {
        user: String,
        source: std::io::Error,
    },
    #[error(
        "--run-as {user}: the worker must run as root to run tasks as another user (it runs as \
         uid {uid}); start it as root, or leave --run-as out"
    )]
    NotRoot { user: String, uid: u32 },
    #[error("--run-as {user} and --run-as-uids {range} cannot be used together: choose one")]
    RunAsConflict { user: String, range: UidRange },
    #[error(
        "--run-as-uids {range}: the worker must run as root to run each wave's tasks as a uid \
         of its own (it runs as uid {uid}); start it as root, or leave --run-as-uids out"
    )]
    UidsNotRoot { range: UidRange, uid: u32 },
    #[error(
        "--run-as-uids {range}: {taken}, inside the range, and tasks would run as (or with the \
         group of) whoever has it; choose a range that no account, group or subordinate id range \
         (/etc/subuid, /etc/subgid) uses"
    )]
    UidsTaken {
        range: UidRange,
        taken: uids::TakenIds,
    },
    #[error(
        "--run-as-uids {range}: cannot read the accounts and groups to check that the range is \
         free: {source}"
    )]
    UidsLookup {
        range: UidRange,
        source: std::io::Error,
    },
    #[error("--cgroups required: {reason}")]
    CgroupsRequired { reason: String },
}

/// Why one attempt could not be given its place to run; the attempt fails to start.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("cannot make the attempt's working directory under {root}: {source}")]
    WorkDir {
        root: PathBuf,
        source: std::io::Error,
    },
    #[error("the task's workdir `{path}` cannot be used on this worker: {problem}")]
    GivenWorkDir { path: PathBuf, problem: String },
    #[error("cannot set up the attempt's cgroup under {parent}: {source}")]
    Cgroup {
        parent: PathBuf,
        source: std::io::Error,
    },
}

/// Everything the executor applies to each attempt, set up once at start.
#[derive(Debug)]
pub struct Isolation {
    /// The allow-listed part of the worker's environment every task starts from.
    base_env: Vec<(OsString, OsString)>,
    /// `--run-as` or `--run-as-uids`.
    users: TaskUsers,
    /// The per-attempt directories.
    work_dirs: WorkDirs,
    /// Where attempts' cgroups go; `None` when attempts run without.
    cgroups: Option<CgroupParent>,
}

impl Isolation {
    /// Sets isolation up from `settings` and the worker's environment, logging once what
    /// applies.
    pub fn prepare(settings: &IsolationSettings) -> Result<Isolation, IsolationError> {
        let isolation = Isolation::prepare_with_env(settings, std::env::vars_os())?;
        tracing::info!(
            work_dir = %isolation.work_dirs.own().display(),
            run_as = %isolation.users,
            cgroups = %isolation.cgroups.as_ref().map_or_else(
                || "off".to_owned(),
                |parent| format!("memory.max and cpu.max under {}", parent.dir().display())
            ),
            "task isolation"
        );
        Ok(isolation)
    }

    /// [`Isolation::prepare`] with the worker's environment given (`parent_env`), and without
    /// the log line.
    pub fn prepare_with_env(
        settings: &IsolationSettings,
        parent_env: impl IntoIterator<Item = (OsString, OsString)>,
    ) -> Result<Isolation, IsolationError> {
        let users = match (&settings.run_as, settings.run_as_uids) {
            (Some(user), Some(range)) => {
                return Err(IsolationError::RunAsConflict {
                    user: user.clone(),
                    range,
                })
            }
            (Some(name), None) => {
                let uid = user::effective_uid();
                if uid != 0 {
                    return Err(IsolationError::NotRoot {
                        user: name.clone(),
                        uid,
                    });
                }
                match user::lookup_user(name) {
                    Ok(Some(user)) => TaskUsers::User(user),
                    Ok(None) => return Err(IsolationError::NoSuchUser { user: name.clone() }),
                    Err(source) => {
                        return Err(IsolationError::UserLookup {
                            user: name.clone(),
                            source,
                        })
                    }
                }
            }
            (None, Some(range)) => {
                let uid = user::effective_uid();
                if uid != 0 {
                    return Err(IsolationError::UidsNotRoot { range, uid });
                }
                match uids::find_taken(range) {
                    Ok(None) => TaskUsers::PerWave(range),
                    Ok(Some(taken)) => return Err(IsolationError::UidsTaken { range, taken }),
                    Err(source) => return Err(IsolationError::UidsLookup { range, source }),
                }
            }
            (None, None) => TaskUsers::Worker,
        };
        let work_dirs = WorkDirs::open(
            &settings.work_dir,
            settings.keep_failed_workdirs_for,
            &users,
        )?;
        let cgroups = match settings.cgroups {
            CgroupMode::Off => None,
            mode => match CgroupParent::for_this_process() {
                Ok(parent) => Some(parent),
                Err(reason) if mode == CgroupMode::Required => {
                    return Err(IsolationError::CgroupsRequired { reason })
                }
                Err(reason) => {
                    tracing::info!(%reason, "cgroups unavailable: attempts run without memory and cpu limits");
                    None
                }
            },
        };
        Ok(Isolation {
            base_env: task_base_env(parent_env, &users),
            users,
            work_dirs,
            cgroups,
        })
    }

    /// The environment every task starts from (before the wave's `env` and `VENOM_*`).
    pub fn base_env(&self) -> &[(OsString, OsString)] {
        &self.base_env
    }

    /// The user all tasks run as with `--run-as`.
    pub fn run_as(&self) -> Option<&RunAs> {
        self.users.run_as()
    }

    /// Who tasks run as.
    pub fn users(&self) -> &TaskUsers {
        &self.users
    }

    /// The attempts' directories.
    pub fn work_dirs(&self) -> &WorkDirs {
        &self.work_dirs
    }

    /// Where attempts' cgroups go, when they have them.
    pub fn cgroups(&self) -> Option<&CgroupParent> {
        self.cgroups.as_ref()
    }

    /// Isolation for tests: `work_root`, no `--run-as`, no cgroups, failed directories kept
    /// for an hour, and an empty worker environment (so `PATH` is [`DEFAULT_TASK_PATH`]).
    #[cfg(test)]
    pub(crate) fn for_tests(work_root: &Path) -> Arc<Isolation> {
        let settings = IsolationSettings {
            work_dir: work_root.to_owned(),
            keep_failed_workdirs_for: Duration::from_secs(3600),
            run_as: None,
            run_as_uids: None,
            cgroups: CgroupMode::Off,
        };
        Arc::new(Isolation::prepare_with_env(&settings, []).expect("a usable work root"))
    }

    /// Uses `parent` for attempts' cgroups (tests, which set one up by hand).
    #[cfg(test)]
    pub(crate) fn set_cgroups(&mut self, parent: Option<CgroupParent>) {
        self.cgroups = parent;
    }

    /// The `PATH` tasks start with (before the wave's `env`).
    pub fn base_path(&self) -> &OsStr {
        self.base_env
            .iter()
            .find(|(key, _)| key == "PATH")
            .map_or(OsStr::new(DEFAULT_TASK_PATH), |(_, value)| {
                value.as_os_str()
            })
    }

    /// Gives an attempt its working directory, cgroup and user.
    pub fn begin(
        self: &Arc<Self>,
        assignment: &Assignment,
    ) -> Result<AttemptIsolation, SetupError> {
        let (workdir, owned_dir) = match &assignment.workdir {
            Some(given) => {
                check_given_workdir(given)?;
                (given.clone(), false)
            }
            None => {
                let dir = self
                    .work_dirs
                    .create(assignment.attempt, &assignment.task_id, assignment.index)
                    .map_err(|source| SetupError::WorkDir {
                        root: self.work_dirs.own().to_owned(),
                        source,
                    })?;
                (dir, true)
            }
        };
        let mut place = AttemptIsolation {
            isolation: Arc::clone(self),
            ids: self.users.ids_for_wave(assignment.attempt.wave_id),
            workdir,
            owned_dir,
            cgroup: None,
            done: false,
        };
        if let Some(parent) = &self.cgroups {
            let cgroup = parent
                .create_attempt(assignment.attempt, assignment.cpus, assignment.memory_bytes)
                .map_err(|source| SetupError::Cgroup {
                    parent: parent.dir().to_owned(),
                    source,
                });
            match cgroup {
                Ok(cgroup) => place.cgroup = Some(cgroup),
                Err(error) => {
                    place.discard();
                    return Err(error);
                }
            }
        }
        Ok(place)
    }

    /// Removes old kept directories ([`WorkDirs::sweep`]).
    pub fn sweep(&self) -> usize {
        self.work_dirs.sweep()
    }
}

/// A wave's `workdir` must be an existing directory, named by an absolute path.
fn check_given_workdir(path: &Path) -> Result<(), SetupError> {
    let problem = |problem: String| SetupError::GivenWorkDir {
        path: path.to_owned(),
        problem,
    };
    if !path.is_absolute() {
        return Err(problem("it is not an absolute path".to_owned()));
    }
    match std::fs::metadata(path) {
        Ok(metadata) if metadata.is_dir() => Ok(()),
        Ok(_) => Err(problem("it is not a directory".to_owned())),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            Err(problem("it does not exist".to_owned()))
        }
        Err(error) => Err(problem(error.to_string())),
    }
}

/// One attempt's place: its working directory and cgroup, given back by
/// [`AttemptIsolation::finish`] (or, if the attempt is abandoned, when dropped: the cgroup is
/// removed and the directory kept as a failure's).
#[derive(Debug)]
pub struct AttemptIsolation {
    isolation: Arc<Isolation>,
    /// Who the attempt's process runs as; `None`: the worker's user.
    ids: Option<TaskIds>,
    workdir: PathBuf,
    /// The worker made `workdir` (and so removes it); false for a wave's own `workdir`.
    owned_dir: bool,
    cgroup: Option<AttemptCgroup>,
    /// Given back already.
    done: bool,
}

impl AttemptIsolation {
    /// Where the attempt runs.
    pub fn workdir(&self) -> &Path {
        &self.workdir
    }

    /// The uid and gid the attempt's process gets; `None` when it runs as the worker's user.
    pub fn ids(&self) -> Option<TaskIds> {
        self.ids
    }

    /// With `--run-as-uids`, the variables that say who the attempt is
    /// ([`env::per_wave_identity_env`]), to come after the base environment and before the
    /// wave's `env`; nothing otherwise (the base environment has them).
    pub fn identity_env(&self) -> Option<[(&'static str, OsString); 4]> {
        match (&self.isolation.users, self.ids) {
            (TaskUsers::PerWave(_), Some(ids)) => {
                Some(env::per_wave_identity_env(ids.uid, &self.workdir))
            }
            _ => None,
        }
    }

    /// True when the attempt runs in a cgroup of its own.
    pub fn has_cgroup(&self) -> bool {
        self.cgroup.is_some()
    }

    /// Moves the attempt's process into its cgroup, if it has one.
    pub fn attach(&self, pid: u32) -> Result<(), SetupError> {
        let Some(cgroup) = &self.cgroup else {
            return Ok(());
        };
        cgroup.attach(pid).map_err(|source| SetupError::Cgroup {
            parent: cgroup.dir().to_owned(),
            source,
        })
    }

    /// Gives back the place of an attempt whose process never started (or was killed before
    /// it could be confined): cgroup and directory are removed.
    pub fn discard(mut self) {
        self.release(Ending::Discarded);
    }

    /// Gives back the place of a finished attempt: ends its cgroup (saying in `outcome`'s
    /// stderr when the OOM killer fired) and applies the directory removal policy.
    pub fn finish(mut self, outcome: &mut AttemptOutcome) {
        if let Some(report) = self.cgroup.take().map(AttemptCgroup::finish) {
            if report.oom_kills > 0 {
                tracing::warn!(
                    memory_bytes = report.memory_bytes,
                    oom_kills = report.oom_kills,
                    "the kernel's OOM killer ended the attempt"
                );
                outcome
                    .stderr
                    .extend_from_slice(oom_message(report.memory_bytes).as_bytes());
            }
        }
        let ending = if outcome.succeeded() {
            Ending::Succeeded
        } else if outcome.cancelled {
            Ending::Discarded
        } else {
            Ending::Failed
        };
        self.release(ending);
    }

    fn release(&mut self, ending: Ending) {
        if self.done {
            return;
        }
        self.done = true;
        drop(self.cgroup.take()); // kills and removes it
        if self.owned_dir {
            self.isolation.work_dirs.finish(&self.workdir, ending);
        }
    }
}

impl Drop for AttemptIsolation {
    fn drop(&mut self) {
        self.release(Ending::Failed);
    }
}

/// The line added to an attempt's stderr when the OOM killer ended it.
pub fn oom_message(memory_bytes: u64) -> String {
    if memory_bytes > 0 {
        format!(
            "\nvenom: the kernel's OOM killer ended this attempt: it reached its memory limit \
             of {memory_bytes} bytes (the task's `memory`)\n"
        )
    } else {
        "\nvenom: the kernel's OOM killer ended this attempt\n".to_owned()
    }
}

/// Runs [`Isolation::sweep`] at start and then every [`WorkDirs::sweep_interval`], on a
/// thread of its own (removing a big directory must not hold up an async thread); stops when
/// dropped.
#[derive(Debug)]
pub struct Sweeper {
    /// Dropping it wakes the thread, which then ends.
    _stop: std::sync::mpsc::Sender<()>,
}

impl Sweeper {
    /// Starts the sweeping thread.
    pub fn start(isolation: Arc<Isolation>) -> std::io::Result<Sweeper> {
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let interval = isolation.work_dirs.sweep_interval();
        std::thread::Builder::new()
            .name("venom-workdir-sweeper".to_owned())
            .spawn(move || loop {
                let n_removed = isolation.sweep();
                if n_removed > 0 {
                    tracing::info!(
                        n_removed,
                        "removed failed attempts' working directories past their keep time"
                    );
                }
                match stopped.recv_timeout(interval) {
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                    _ => return,
                }
            })?;
        Ok(Sweeper { _stop: stop })
    }
}
