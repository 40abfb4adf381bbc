//! The task executor: runs one attempt of a micro-task as a real process and reports how it
//! ended, as the shared [`AttemptOutcome`].
//!
//! Every attempt runs in its own process group (`Command::process_group(0)`, which keeps the
//! fast `posix_spawn` path; a `pre_exec` hook would force fork+exec), so a timeout, a cancel or
//! the end of the main process can kill everything the task started with one
//! `kill(-pgid, SIGKILL)`. Output is read from both pipes into bounded in-memory buffers that
//! keep the last `max_output_bytes` of each — no files.
//!
//! An attempt is driven by one `poll(2)` loop on a pooled blocking thread, watching the two
//! pipes and a pidfd for the exit. That is deliberately not async: registering every short-lived
//! child and pipe with the tokio reactor costs a measurable share of the spawn rate (the raw
//! `spawn` + `wait` floor is the benchmark), while a slot's thread is reused from task to task.
//! Cancelling kills the group directly from the canceller's thread; the loop then sees the exit.
//!
//! Every attempt is isolated as [`crate::isolation`] describes: a clean environment (the
//! allow-list of [`TASK_ENV_ALLOW_LIST`](crate::isolation::TASK_ENV_ALLOW_LIST), the wave's
//! `env`, then the `VENOM_*` variables), a working directory of its own (or the wave's
//! `workdir`), optionally another user (`--run-as`, or a uid per wave with `--run-as-uids`)
//! and a cgroup with its limits. None of it needs a `pre_exec` hook: the environment, the
//! directory (`posix_spawn_file_actions_addchdir`) and the process group are all things
//! `posix_spawn` does, a bare program name is looked up in the task's `PATH` here (std leaves the fast path when `PATH` is set and the program is
//! not a path), and the cgroup is joined right after the spawn. Only `--run-as` and
//! `--run-as-uids` cost the fast path: std spawns with fork + exec when a uid or gid is set.
//!
//! [`spawn_attempt`] starts the process of an [`Assignment`] (the agent reports the start with
//! its pid), and [`RunningAttempt::wait_blocking`] drives it to the end. An attempt that never
//! ran ends as [`failed_to_start`] or [`cancelled_before_start`] says.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{Child, ChildStderr, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use venom_core::mobius::Mode;
use venom_core::{AttemptOutcome, AttemptRef};

use crate::isolation::env::resolve_program;
use crate::isolation::{AttemptIsolation, Isolation, SetupError};
use crate::limits::{PIPE_CLOSE_GRACE, READ_CHUNK_BYTES, REAP_POLL_INTERVAL};

/// One attempt the coordinator assigned to this worker: what to run, and what the agent needs
/// to queue, place and trace it. [`crate::convert::assignment`] reads it off the wire.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Assignment {
    /// The attempt; all zeros when the coordinator named none.
    pub attempt: AttemptRef,
    pub wave_name: String,
    pub task_id: String,
    /// Index within an array task; `None` for a task without `array`.
    pub index: Option<u32>,
    /// Run with `sh -c` when not empty; otherwise `argv` is run.
    pub shell: String,
    pub argv: Vec<String>,
    /// The wave's environment, added to the allow-listed variables of the worker's (and
    /// followed by `VENOM_*`).
    pub env: HashMap<String, String>,
    /// `None` = no timeout.
    pub timeout: Option<Duration>,
    /// Slots it occupies (0 counts as 1).
    pub cpus: u32,
    /// W3C trace context the attempt's span joins; empty when the wave is not traced.
    pub traceparent: String,
    /// This node's throttle mode when the attempt was dispatched, if the coordinator said.
    pub mode: Option<Mode>,
    /// The wave's `workdir`: run there, without making or removing it. `None`: a fresh
    /// directory of the attempt's own.
    pub workdir: Option<PathBuf>,
    /// The task's `memory`, bytes (0 = none): the attempt's cgroup memory limit.
    pub memory_bytes: u64,
}

/// Why an attempt could not be started.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("the task has no command (neither a shell string nor an argv)")]
    EmptyCommand,
    #[error("cannot start `{program}`: it is not in the task's PATH ({path})")]
    NotInPath { program: String, path: String },
    #[error("cannot start `{program}` in {dir}: {source}")]
    Spawn {
        program: String,
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Setup(#[from] SetupError),
}

/// The outcome of an attempt that could not be started (tried at `started_ms`).
pub fn failed_to_start(started_ms: u64, error: &ExecError) -> AttemptOutcome {
    AttemptOutcome {
        started_ms,
        finished_ms: crate::unix_now_ms(),
        error: Some(error.to_string()),
        ..AttemptOutcome::default()
    }
}

/// The outcome of an attempt cancelled before it started.
pub fn cancelled_before_start() -> AttemptOutcome {
    let now_ms = crate::unix_now_ms();
    AttemptOutcome {
        cancelled: true,
        started_ms: now_ms,
        finished_ms: now_ms,
        ..AttemptOutcome::default()
    }
}

/// What a [`CancelHandle`] and the attempt's runner share.
#[derive(Debug, Default)]
struct CancelShared {
    state: Mutex<CancelState>,
}

#[derive(Debug, Default)]
struct CancelState {
    cancelled: bool,
    /// The attempt's process group while it may be signalled; 0 before the spawn and once the
    /// runner has killed the group for the last time (just before reaping the leader).
    pgid: u32,
}

impl CancelShared {
    fn lock(&self) -> std::sync::MutexGuard<'_, CancelState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records the spawned group; kills it at once if the cancel came first.
    fn register_group(&self, pgid: u32) {
        let mut state = self.lock();
        state.pgid = pgid;
        if state.cancelled {
            kill_group_logged(pgid);
        }
    }

    fn cancel(&self) {
        let mut state = self.lock();
        state.cancelled = true;
        kill_group_logged(state.pgid);
    }

    /// Kills the group one last time and forgets it, so no later cancel can signal a group id
    /// that the kernel may reuse once the leader is reaped.
    fn kill_group_and_forget(&self) {
        let mut state = self.lock();
        kill_group_logged(state.pgid);
        state.pgid = 0;
    }

    fn kill_group(&self) {
        kill_group_logged(self.lock().pgid);
    }

    fn is_cancelled(&self) -> bool {
        self.lock().cancelled
    }
}

/// Cancels one attempt: kills its process group (at once, from the caller's thread) and makes
/// the attempt report `cancelled`. Dropping it without calling [`CancelHandle::cancel`] never
/// cancels.
#[derive(Debug)]
pub struct CancelHandle {
    shared: Arc<CancelShared>,
}

/// The attempt's side of a [`CancelHandle`]; one token per attempt.
#[derive(Debug)]
pub struct CancelToken {
    shared: Arc<CancelShared>,
}

/// A connected handle and token.
pub fn cancel_pair() -> (CancelHandle, CancelToken) {
    let shared = Arc::new(CancelShared::default());
    (
        CancelHandle {
            shared: Arc::clone(&shared),
        },
        CancelToken { shared },
    )
}

impl CancelHandle {
    /// Kills the attempt's process group (or, before it starts, makes sure it is killed as
    /// soon as it does); the attempt then reports `cancelled`.
    pub fn cancel(&self) {
        self.shared.cancel();
    }
}

impl CancelToken {
    /// True once cancelled.
    pub fn is_cancelled(&self) -> bool {
        self.shared.is_cancelled()
    }
}

/// An attempt whose process is running.
pub struct RunningAttempt {
    /// For log lines.
    attempt: AttemptRef,
    child: Child,
    /// Cancellation state, which also owns the right to signal the process group.
    cancel: CancelToken,
    /// Kills the group if this attempt is dropped before it ends (a panic, an abandoned
    /// runner).
    guard: GroupGuard,
    pid: u32,
    started_ms: u64,
    /// `None` = no timeout.
    timeout: Option<Duration>,
    stdout: Option<ChildStdout>,
    stderr: Option<ChildStderr>,
    max_output_bytes: usize,
    /// Its working directory and cgroup, given back when it ends. Declared after `guard`, so
    /// an abandoned attempt's group is killed before its cgroup and directory go.
    place: AttemptIsolation,
}

impl RunningAttempt {
    /// The main process's pid, which is also its process group id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// When the process was started, Unix milliseconds.
    pub fn started_ms(&self) -> u64 {
        self.started_ms
    }

    /// Drives the attempt to its end, blocking this thread: by itself, by its timeout or by a
    /// cancel. Whichever way, the whole process group is killed before this returns (while
    /// the leader is still an unreaped zombie, so its id cannot have been reused), so nothing
    /// the task started in the background outlives it.
    ///
    /// One `poll(2)` loop watches both pipes and a pidfd for the exit, so a slot costs one
    /// (pooled) thread and no async machinery: spawning and reaping stay as cheap as the raw
    /// `spawn` + `wait` floor.
    pub fn wait_blocking(mut self) -> AttemptOutcome {
        let mut stdout_tail = TailBuffer::new(self.max_output_bytes);
        let mut stderr_tail = TailBuffer::new(self.max_output_bytes);
        let mut stdout = self.stdout.take();
        let mut stderr = self.stderr.take();
        let deadline = self.timeout.map(|timeout| Instant::now() + timeout);
        let pidfd = i32::try_from(self.pid).ok().and_then(pidfd_open);
        let mut chunk = [0u8; READ_CHUNK_BYTES];

        let mut timed_out = false;
        let mut cancelled = false;
        let mut reaped: Option<std::io::Result<ExitStatus>> = None;
        // Set once the main process has exited: how long the pipes may stay open after it.
        let mut pipes_deadline: Option<Instant> = None;

        loop {
            let now = Instant::now();
            let exited = pipes_deadline.is_some();
            if !exited && !timed_out && deadline.is_some_and(|deadline| now >= deadline) {
                timed_out = true;
                self.cancel.shared.kill_group();
            }
            if exited && stdout.is_none() && stderr.is_none() {
                break;
            }
            if pipes_deadline.is_some_and(|pipes_deadline| now >= pipes_deadline) {
                tracing::debug!(attempt = %self.attempt, "output pipes still open after the task ended; abandoned");
                break;
            }

            let mut fds = [libc::pollfd {
                fd: -1,
                events: libc::POLLIN,
                revents: 0,
            }; 3];
            if let Some(pipe) = &stdout {
                fds[0].fd = pipe.as_raw_fd();
            }
            if let Some(pipe) = &stderr {
                fds[1].fd = pipe.as_raw_fd();
            }
            if let (false, Some(pidfd)) = (exited, &pidfd) {
                fds[2].fd = pidfd.as_raw_fd();
            }
            let wake_at = if exited {
                pipes_deadline
            } else {
                let fallback_tick = pidfd.is_none().then(|| now + REAP_POLL_INTERVAL);
                [deadline.filter(|_| !timed_out), fallback_tick]
                    .into_iter()
                    .flatten()
                    .min()
            };
            if let Err(error) = poll_fds(
                &mut fds,
                wake_at.map(|at| at.saturating_duration_since(now)),
            ) {
                tracing::warn!(%error, "poll failed; waiting for the process without its output");
                break;
            }

            if fds[0].revents != 0 && !read_once(&mut stdout, &mut chunk, &mut stdout_tail) {
                stdout = None;
            }
            if fds[1].revents != 0 && !read_once(&mut stderr, &mut chunk, &mut stderr_tail) {
                stderr = None;
            }
            let leader_exited = if exited {
                false
            } else if pidfd.is_some() {
                fds[2].revents != 0
            } else {
                // No pidfd (old kernel): reap to learn about the exit.
                match self.child.try_wait() {
                    Ok(Some(status)) => {
                        reaped = Some(Ok(status));
                        true
                    }
                    Ok(None) => false,
                    Err(error) => {
                        reaped = Some(Err(error));
                        true
                    }
                }
            };
            if leader_exited {
                cancelled = !timed_out && self.cancel.is_cancelled();
                // Take the group's background children with it, so none holds the pipes open
                // or outlives the task.
                self.cancel.shared.kill_group_and_forget();
                pipes_deadline = Some(Instant::now() + PIPE_CLOSE_GRACE);
            }
        }

        if pipes_deadline.is_none() {
            // Left the loop early (poll failed): end the attempt regardless.
            self.cancel.shared.kill_group_and_forget();
        }
        self.guard.disarm();
        let status = reaped.unwrap_or_else(|| self.child.wait());
        let (stdout, stdout_truncated) = stdout_tail.into_parts();
        let (stderr, stderr_truncated) = stderr_tail.into_parts();
        let mut outcome = AttemptOutcome {
            timed_out,
            cancelled,
            started_ms: self.started_ms,
            finished_ms: crate::unix_now_ms(),
            stdout,
            stderr,
            stdout_truncated,
            stderr_truncated,
            ..AttemptOutcome::default()
        };
        match status {
            Ok(status) => {
                outcome.exit_code = status.code();
                outcome.signal = status.signal();
            }
            Err(error) => outcome.error = Some(format!("waiting for the process failed: {error}")),
        }
        self.place.finish(&mut outcome);
        outcome
    }
}

/// Reads what a ready pipe holds into `tail`; false once the pipe is finished (end of file or
/// an error).
fn read_once<R: Read>(pipe: &mut Option<R>, chunk: &mut [u8], tail: &mut TailBuffer) -> bool {
    let Some(reader) = pipe else {
        return false;
    };
    match reader.read(chunk) {
        Ok(0) => false,
        Ok(n) => {
            tail.push(&chunk[..n]);
            true
        }
        Err(error)
            if matches!(
                error.kind(),
                std::io::ErrorKind::Interrupted | std::io::ErrorKind::WouldBlock
            ) =>
        {
            true
        }
        Err(error) => {
            tracing::debug!(%error, "reading task output failed");
            false
        }
    }
}

/// Starts an attempt's process: `sh -c <shell>` or `argv`, in a new process group, isolated by
/// `isolation` (its own directory and cgroup, the user of `--run-as` or its wave's uid of
/// `--run-as-uids`) with the allow-listed environment, the attempt's identity
/// (`--run-as-uids`), the assignment's and the `VENOM_*` variables. `cancel` is bound to this
/// attempt: cancelling it from now on kills the process group.
pub fn spawn_attempt(
    assignment: &Assignment,
    node_name: &str,
    max_output_bytes: usize,
    isolation: &Arc<Isolation>,
    cancel: CancelToken,
) -> Result<RunningAttempt, ExecError> {
    let script = (!assignment.shell.is_empty()).then_some(assignment.shell.as_str());
    let (program, args): (&str, Vec<&str>) = if !assignment.shell.is_empty() {
        ("/bin/sh", vec!["-c", assignment.shell.as_str()])
    } else if let Some((program, args)) = assignment.argv.split_first() {
        (program.as_str(), args.iter().map(String::as_str).collect())
    } else {
        return Err(ExecError::EmptyCommand);
    };
    if program.is_empty() {
        return Err(ExecError::EmptyCommand);
    }

    let place = isolation.begin(assignment)?;
    let workdir = place.workdir();
    let path = assignment
        .env
        .get("PATH")
        .map_or_else(|| isolation.base_path(), OsStr::new);
    let Some(executable) = resolve_program(program, path, workdir) else {
        let error = ExecError::NotInPath {
            program: program.to_owned(),
            path: path.to_string_lossy().into_owned(),
        };
        place.discard();
        return Err(error);
    };

    // An attempt with a cgroup waits at its gate until it is inside (see [`CGROUP_GATE`]).
    let gated = place.has_cgroup();
    let gated_script;
    let mut command = match (gated, script) {
        (false, _) => {
            let mut command = Command::new(executable);
            command.arg0(program).args(args);
            command
        }
        (true, Some(script)) => {
            gated_script = format!("{CGROUP_GATE}{script}");
            let mut command = Command::new("/bin/sh");
            command.args(["-c", gated_script.as_str()]);
            command
        }
        (true, None) => {
            let mut command = Command::new("/bin/sh");
            command.args(["-c", GATED_EXEC, program]).args(args);
            command
        }
    };
    command
        .env_clear()
        .envs(isolation.base_env().iter().map(|(key, value)| (key, value)))
        .envs(place.identity_env().into_iter().flatten())
        .envs(&assignment.env)
        .envs(venom_env(assignment, node_name))
        .env("VENOM_WORKDIR", workdir)
        .current_dir(workdir)
        .stdin(if gated { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    if let Some(ids) = place.ids() {
        command.uid(ids.uid).gid(ids.gid);
    }
    let started_ms = crate::unix_now_ms();
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(source) => {
            let error = ExecError::Spawn {
                program: program.to_owned(),
                dir: workdir.to_owned(),
                source,
            };
            place.discard();
            return Err(error);
        }
    };
    let pid = child.id();
    if let Err(error) = place.attach(pid) {
        // Never run a task outside the limits it was given.
        kill_group_logged(pid);
        let _ = child.wait();
        place.discard();
        return Err(error.into());
    }
    if let Some(mut gate) = child.stdin.take() {
        // In its cgroup now: let it go. A write that fails means the process already died,
        // which its outcome will say.
        let _ = std::io::Write::write_all(&mut gate, b"\n");
    }
    cancel.shared.register_group(pid);
    Ok(RunningAttempt {
        attempt: assignment.attempt,
        stdout: child.stdout.take(),
        stderr: child.stderr.take(),
        child,
        guard: GroupGuard {
            shared: Arc::clone(&cancel.shared),
            armed: true,
        },
        cancel,
        pid,
        started_ms,
        timeout: assignment.timeout,
        max_output_bytes,
        place,
    })
}

/// What a shell task with a cgroup runs before its script, on the same line (so the script's
/// line numbers do not change): it waits for one line on stdin, which the worker writes once
/// the process is in its cgroup, then puts stdin back to /dev/null. Without it a task could
/// run — and fork children that stay outside the group — for as long as the spawning thread
/// waits for a CPU between the spawn and the write to `cgroup.procs` (milliseconds on a busy
/// machine); with it, nothing of the task runs outside its group. The worker dying before
/// the line comes ends the task (end of file: exit 125).
pub const CGROUP_GATE: &str = "read -r venom_gate || exit 125; unset venom_gate; exec </dev/null; ";

/// The same gate for an argv task: `sh -c GATED_EXEC program args…` waits, then execs the
/// program (found in the task's `PATH`) in its place, argv unchanged. It costs one more
/// `exec` per attempt, only for attempts with a cgroup.
pub const GATED_EXEC: &str =
    "read -r venom_gate || exit 125; unset venom_gate; exec \"$0\" \"$@\" </dev/null";

/// The variables every micro-task sees besides the assignment's own environment: its wave,
/// its task's id, its index within an array task (0 for a task without `array`), the attempt
/// number and the node it runs on.
fn venom_env(assignment: &Assignment, node_name: &str) -> [(&'static str, String); 5] {
    let attempt = assignment.attempt;
    [
        ("VENOM_WAVE_ID", attempt.wave_id.to_string()),
        ("VENOM_TASK_ID", assignment.task_id.clone()),
        (
            "VENOM_TASK_INDEX",
            assignment.index.unwrap_or(0).to_string(),
        ),
        ("VENOM_ATTEMPT", attempt.attempt.to_string()),
        ("VENOM_NODE", node_name.to_owned()),
    ]
}

/// Keeps the last `max_bytes` bytes written to it, and whether anything was dropped.
#[derive(Debug)]
struct TailBuffer {
    bytes: Vec<u8>,
    max_bytes: usize,
    total_bytes: u64,
}

impl TailBuffer {
    fn new(max_bytes: usize) -> Self {
        Self {
            bytes: Vec::new(),
            max_bytes,
            total_bytes: 0,
        }
    }

    /// Appends a chunk; amortised O(1) per byte (the front is cut only once the buffer holds
    /// twice the limit).
    fn push(&mut self, chunk: &[u8]) {
        self.total_bytes = self.total_bytes.saturating_add(chunk.len() as u64);
        if chunk.len() >= self.max_bytes {
            self.bytes.clear();
            self.bytes
                .extend_from_slice(&chunk[chunk.len() - self.max_bytes..]);
            return;
        }
        self.bytes.extend_from_slice(chunk);
        if self.bytes.len() >= self.max_bytes.saturating_mul(2) {
            self.cut_front();
        }
    }

    fn cut_front(&mut self) {
        if self.bytes.len() > self.max_bytes {
            let excess = self.bytes.len() - self.max_bytes;
            self.bytes.drain(..excess);
        }
    }

    /// The kept bytes and whether earlier bytes were dropped.
    fn into_parts(mut self) -> (Vec<u8>, bool) {
        self.cut_front();
        self.bytes.shrink_to_fit();
        let truncated = self.total_bytes > self.bytes.len() as u64;
        (self.bytes, truncated)
    }
}

/// Kills the attempt's process group when dropped while armed: an attempt abandoned mid-run
/// (a panic in its runner) leaves nothing behind.
struct GroupGuard {
    shared: Arc<CancelShared>,
    armed: bool,
}

impl GroupGuard {
    fn disarm(&mut self) {
        self.armed = false;
    }
}

impl Drop for GroupGuard {
    fn drop(&mut self) {
        if self.armed {
            self.shared.kill_group_and_forget();
        }
    }
}

/// Kills a process group, logging (not failing) when that is impossible.
fn kill_group_logged(pgid: u32) {
    if let Err(error) = kill_process_group(pgid) {
        tracing::warn!(pgid, %error, "cannot kill a task's process group");
    }
}

/// Sends SIGKILL to every process in group `pgid`; a group that no longer exists is fine.
/// Group ids 0 and 1 are refused: `kill(0)` would hit the worker's own group and `kill(-1)`
/// every process it may signal.
pub(crate) fn kill_process_group(pgid: u32) -> std::io::Result<()> {
    let Ok(pgid) = libc::pid_t::try_from(pgid) else {
        return Ok(());
    };
    if pgid <= 1 {
        return Ok(());
    }
    if signal_group(pgid) == 0 {
        return Ok(());
    }
    let error = std::io::Error::last_os_error();
    if error.raw_os_error() == Some(libc::ESRCH) {
        Ok(())
    } else {
        Err(error)
    }
}

/// Sends SIGKILL to process `pid`; a process that no longer exists is fine.
pub(crate) fn kill_process(pid: u32) -> std::io::Result<()> {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return Ok(());
    };
    if pid <= 1 {
        return Ok(());
    }
    if signal_process(pid) == 0 {
        return Ok(());
    }
    let error = std::io::Error::last_os_error();
    if error.raw_os_error() == Some(libc::ESRCH) {
        Ok(())
    } else {
        Err(error)
    }
}

/// `kill(pid, SIGKILL)`; returns kill(2)'s result.
#[allow(unsafe_code)]
fn signal_process(pid: libc::pid_t) -> libc::c_int {
    // SAFETY: kill(2) takes two integers and touches no memory of this process; `pid` is
    // above 1 (checked by the caller), so it names exactly one process.
    unsafe { libc::kill(pid, libc::SIGKILL) }
}

/// `kill(-pgid, SIGKILL)`; returns kill(2)'s result.
#[allow(unsafe_code)]
fn signal_group(pgid: libc::pid_t) -> libc::c_int {
    // SAFETY: kill(2) takes two integers and touches no memory of this process; `pgid` is
    // above 1 (checked by the caller), so the negation names exactly one process group.
    unsafe { libc::kill(-pgid, libc::SIGKILL) }
}

/// A pidfd for `pid` (Linux 5.3+): readable once the process exits, without reaping it.
/// `None` where unsupported; the caller then polls with `try_wait`.
#[allow(unsafe_code)]
fn pidfd_open(pid: i32) -> Option<OwnedFd> {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: pidfd_open(2) takes a pid and flags and returns a new descriptor or -1; it
        // reads and writes no memory of this process.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        let fd = std::os::fd::RawFd::try_from(fd)
            .ok()
            .filter(|fd| *fd >= 0)?;
        // SAFETY: `fd` was just returned by the kernel, is open, and nothing else owns it.
        Some(unsafe { OwnedFd::from_raw_fd(fd) })
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = pid;
        None
    }
}

/// poll(2) on `fds` (entries with `fd == -1` are ignored) until one is ready or `timeout`
/// passes (`None` = no limit). Retries when interrupted by a signal.
#[allow(unsafe_code)]
fn poll_fds(fds: &mut [libc::pollfd], timeout: Option<Duration>) -> std::io::Result<()> {
    let timeout_ms = timeout.map_or(-1, |timeout| {
        // Round up so that a wake-up never comes before the deadline.
        let ms = timeout.as_micros().div_ceil(1000);
        libc::c_int::try_from(ms).unwrap_or(libc::c_int::MAX)
    });
    let n_fds = libc::nfds_t::try_from(fds.len()).unwrap_or(libc::nfds_t::MAX);
    loop {
        for entry in fds.iter_mut() {
            entry.revents = 0;
        }
        // SAFETY: `fds` is a valid, exclusively borrowed slice of `pollfd` for the whole call,
        // and `n_fds` is its length.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), n_fds, timeout_ms) };
        if rc >= 0 {
            return Ok(());
        }
        let error = std::io::Error::last_os_error();
        if error.kind() != std::io::ErrorKind::Interrupted {
            return Err(error);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;
    use crate::isolation::{CgroupMode, IsolationSettings, DEFAULT_TASK_PATH, TASK_ENV_ALLOW_LIST};
    use crate::limits::DEFAULT_MAX_OUTPUT_BYTES;

    fn shell_task(shell: &str) -> Assignment {
        Assignment {
            attempt: AttemptRef {
                wave_id: 7,
                micro: 3,
                attempt: 2,
            },
            wave_name: "test".to_owned(),
            task_id: "shard".to_owned(),
            index: Some(3),
            shell: shell.to_owned(),
            ..Default::default()
        }
    }

    /// A token nobody cancels.
    fn uncancelled() -> CancelToken {
        cancel_pair().1
    }

    /// Runs an attempt to its end as the agent's runners do: spawn, wait on a blocking thread,
    /// and a process that cannot start is an outcome with `error` set. The attempt gets a work
    /// root of its own, removed afterwards.
    async fn run(
        assignment: &Assignment,
        node_name: &str,
        max_output_bytes: usize,
        cancel: CancelToken,
    ) -> AttemptOutcome {
        let work_root = tempfile::tempdir().expect("temp dir");
        let isolation = Isolation::for_tests(work_root.path());
        run_isolated(assignment, node_name, max_output_bytes, &isolation, cancel).await
    }

    /// [`run`] under a given isolation.
    async fn run_isolated(
        assignment: &Assignment,
        node_name: &str,
        max_output_bytes: usize,
        isolation: &Arc<Isolation>,
        cancel: CancelToken,
    ) -> AttemptOutcome {
        let assignment = assignment.clone();
        let node_name = node_name.to_owned();
        let isolation = Arc::clone(isolation);
        tokio::task::spawn_blocking(move || {
            let started_ms = crate::unix_now_ms();
            match spawn_attempt(
                &assignment,
                &node_name,
                max_output_bytes,
                &isolation,
                cancel,
            ) {
                Ok(running) => running.wait_blocking(),
                Err(error) => failed_to_start(started_ms, &error),
            }
        })
        .await
        .expect("the attempt's thread did not panic")
    }

    /// True when `pid` no longer runs: gone, or a zombie nobody has reaped yet (a container's
    /// init may not reap orphans).
    fn process_is_dead(pid: i32) -> bool {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => true,
            Ok(stat) => stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                .is_some_and(|state| state == "Z" || state == "X"),
        }
    }

    async fn wait_until_dead(pid: i32) -> bool {
        for _ in 0..100 {
            if process_is_dead(pid) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    #[test]
    fn tail_buffer_keeps_the_last_bytes_and_marks_truncation() {
        let mut tail = TailBuffer::new(4);
        tail.push(b"ab");
        tail.push(b"cd");
        let (bytes, truncated) = tail.into_parts();
        assert_eq!(bytes, b"abcd");
        assert!(!truncated);

        let mut tail = TailBuffer::new(4);
        for chunk in [&b"abc"[..], b"def", b"g", b"hij"] {
            tail.push(chunk);
        }
        let (bytes, truncated) = tail.into_parts();
        assert_eq!(bytes, b"ghij");
        assert!(truncated);

        let mut tail = TailBuffer::new(4);
        tail.push(b"0123456789");
        assert_eq!(tail.into_parts(), (b"6789".to_vec(), true));

        let mut tail = TailBuffer::new(0);
        tail.push(b"x");
        assert_eq!(tail.into_parts(), (Vec::new(), true));
    }

    #[tokio::test]
    async fn exit_codes_and_output_are_reported() {
        let finished = run(
            &shell_task("echo out; echo err >&2; exit 3"),
            "node-a",
            DEFAULT_MAX_OUTPUT_BYTES,
            uncancelled(),
        )
        .await;
        assert_eq!(finished.exit_code, Some(3));
        assert_eq!(finished.signal, None);
        assert_eq!(finished.stdout, b"out\n");
        assert_eq!(finished.stderr, b"err\n");
        assert!(!finished.timed_out && !finished.cancelled && !finished.stdout_truncated);
        assert!(finished.error.is_none());
        assert!(finished.started_ms > 0 && finished.finished_ms >= finished.started_ms);

        let ok = run(&shell_task("true"), "node-a", 1024, uncancelled()).await;
        assert_eq!(ok.exit_code, Some(0));

        let killed = run(&shell_task("kill -TERM $$"), "node-a", 1024, uncancelled()).await;
        assert_eq!(killed.exit_code, None);
        assert_eq!(killed.signal, Some(libc::SIGTERM));
    }

    #[tokio::test]
    async fn argv_tasks_run_without_a_shell() {
        let mut task = shell_task("");
        task.argv = vec![
            "printf".to_owned(),
            "%s-%s".to_owned(),
            "a b".to_owned(),
            "c".to_owned(),
        ];
        let finished = run(&task, "node-a", 1024, uncancelled()).await;
        assert_eq!(finished.exit_code, Some(0), "{finished:?}");
        assert_eq!(finished.stdout, b"a b-c");
    }

    #[tokio::test]
    async fn environment_carries_the_assignment_and_venom_variables() {
        let mut task = shell_task(
            "echo \"$VENOM_WAVE_ID|$VENOM_TASK_ID|$VENOM_TASK_INDEX|$VENOM_ATTEMPT|$VENOM_NODE|$GREETING\"",
        );
        task.env
            .insert("GREETING".to_owned(), "hello there".to_owned());
        let finished = run(&task, "node-a", 1024, uncancelled()).await;
        assert_eq!(
            String::from_utf8_lossy(&finished.stdout),
            "7|shard|3|2|node-a|hello there\n"
        );

        task.index = None;
        let finished = run(&task, "node-b", 1024, uncancelled()).await;
        assert_eq!(
            String::from_utf8_lossy(&finished.stdout),
            "7|shard|0|2|node-b|hello there\n"
        );
    }

    #[tokio::test]
    async fn long_output_keeps_the_tail_and_marks_truncation() {
        // 20,000 numbered lines on stdout; a short stderr.
        let task = shell_task(
            "i=0; while [ $i -lt 20000 ]; do echo line-$i; i=$((i+1)); done; echo short >&2",
        );
        let finished = run(&task, "node-a", 1000, uncancelled()).await;
        assert_eq!(finished.exit_code, Some(0));
        assert_eq!(finished.stdout.len(), 1000);
        assert!(finished.stdout_truncated);
        assert!(finished.stdout.ends_with(b"line-19998\nline-19999\n"));
        assert_eq!(finished.stderr, b"short\n");
        assert!(!finished.stderr_truncated);
    }

    #[tokio::test]
    async fn timeout_kills_the_whole_process_group() {
        let dir = tempfile::tempdir().expect("temp dir");
        let pid_file = dir.path().join("child.pid");
        let mut task = shell_task(&format!(
            "sleep 30 & echo $! > {}; sleep 30",
            pid_file.display()
        ));
        task.timeout = Some(Duration::from_millis(300));
        let started = std::time::Instant::now();
        let finished = run(&task, "node-a", 1024, uncancelled()).await;
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "took {:?}",
            started.elapsed()
        );
        assert!(finished.timed_out);
        assert!(!finished.cancelled);
        assert_eq!(finished.exit_code, None);
        assert_eq!(finished.signal, Some(libc::SIGKILL));

        let child_pid: i32 = std::fs::read_to_string(&pid_file)
            .expect("the task wrote its background child's pid")
            .trim()
            .parse()
            .expect("a pid");
        assert!(
            wait_until_dead(child_pid).await,
            "background child {child_pid} survived the timeout"
        );
    }

    #[tokio::test]
    async fn cancel_kills_the_group_and_reports_cancelled() {
        let dir = tempfile::tempdir().expect("temp dir");
        let pid_file = dir.path().join("child.pid");
        let task = shell_task(&format!(
            "sleep 30 & echo $! > {}; wait",
            pid_file.display()
        ));
        let (handle, token) = cancel_pair();
        let isolation = Isolation::for_tests(dir.path());
        let running = spawn_attempt(&task, "node-a", 1024, &isolation, token).expect("spawn");
        let leader = i32::try_from(running.pid()).expect("pid fits");
        let waiter = tokio::task::spawn_blocking(move || running.wait_blocking());
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !pid_file.exists()
            || std::fs::read_to_string(&pid_file).map_or(true, |s| !s.ends_with('\n'))
        {
            assert!(
                std::time::Instant::now() < deadline,
                "the task never wrote its child's pid"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        handle.cancel();
        let outcome = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("cancel ends the attempt promptly")
            .expect("the attempt task did not panic");
        assert!(outcome.cancelled);
        assert!(!outcome.timed_out);
        assert_eq!(outcome.signal, Some(libc::SIGKILL));
        let child_pid: i32 = std::fs::read_to_string(&pid_file)
            .expect("pid")
            .trim()
            .parse()
            .expect("pid");
        assert!(
            wait_until_dead(child_pid).await,
            "background child survived the cancel"
        );
        assert!(
            wait_until_dead(leader).await,
            "the main process survived the cancel"
        );
        assert!(
            !isolation.work_dirs().own().join("w7/shard@3.a2").exists(),
            "a cancelled attempt's directory is removed"
        );
    }

    #[tokio::test]
    async fn background_children_do_not_outlive_a_finished_task() {
        let dir = tempfile::tempdir().expect("temp dir");
        let pid_file = dir.path().join("child.pid");
        // The background child inherits stdout; without the group kill the pipe would stay
        // open for 30 s.
        let task = shell_task(&format!(
            "sleep 30 & echo $! > {}; echo done",
            pid_file.display()
        ));
        let started = std::time::Instant::now();
        let finished = run(&task, "node-a", 1024, uncancelled()).await;
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "took {:?}",
            started.elapsed()
        );
        assert_eq!(finished.exit_code, Some(0));
        assert_eq!(finished.stdout, b"done\n");
        let child_pid: i32 = std::fs::read_to_string(&pid_file)
            .expect("pid")
            .trim()
            .parse()
            .expect("pid");
        assert!(
            wait_until_dead(child_pid).await,
            "background child outlived its task"
        );
    }

    #[tokio::test]
    async fn a_missing_binary_is_an_error_result() {
        let mut task = shell_task("");
        task.argv = vec!["/nonexistent/venom-no-such-binary".to_owned()];
        let finished = run(&task, "node-a", 1024, uncancelled()).await;
        assert!(
            finished
                .error
                .as_deref()
                .is_some_and(|error| error.contains("venom-no-such-binary")),
            "{:?}",
            finished.error
        );
        assert_eq!(finished.exit_code, None);
        assert!(finished.finished_ms >= finished.started_ms);

        let empty = run(&shell_task(""), "node-a", 1024, uncancelled()).await;
        assert!(
            empty
                .error
                .as_deref()
                .is_some_and(|error| error.contains("no command")),
            "{:?}",
            empty.error
        );
    }

    #[tokio::test]
    async fn a_process_that_escapes_the_group_cannot_hold_the_result_back() {
        let dir = tempfile::tempdir().expect("temp dir");
        let pid_file = dir.path().join("escaped.pid");
        // `setsid` leaves the process group; the escaped sleep keeps stdout open.
        let task = shell_task(&format!(
            "setsid sh -c 'echo $$ > {}; exec sleep 30' & sleep 0.2; echo main done",
            pid_file.display()
        ));
        let started = std::time::Instant::now();
        let finished = run(&task, "node-a", 1024, uncancelled()).await;
        let escaped: Option<i32> = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|text| text.trim().parse().ok());
        if let Some(pid) = escaped {
            let _ = kill_process_group(u32::try_from(pid).expect("positive pid"));
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "took {:?}",
            started.elapsed()
        );
        assert_eq!(finished.exit_code, Some(0), "{finished:?}");
        assert_eq!(finished.stdout, b"main done\n");
        assert!(escaped.is_some(), "the escaped process never started");
    }

    #[test]
    fn a_cancel_before_the_spawn_kills_the_process_as_soon_as_it_starts() {
        let (handle, token) = cancel_pair();
        handle.cancel();
        let started = std::time::Instant::now();
        let work_root = tempfile::tempdir().expect("temp dir");
        let isolation = Isolation::for_tests(work_root.path());
        let running = spawn_attempt(&shell_task("sleep 30"), "node-a", 1024, &isolation, token)
            .expect("spawn");
        let outcome = running.wait_blocking();
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(outcome.cancelled);
        assert_eq!(outcome.signal, Some(libc::SIGKILL));
    }

    #[test]
    fn a_timeout_without_output_still_fires() {
        let mut task = shell_task("exec sleep 30");
        task.timeout = Some(Duration::from_millis(100));
        let started = std::time::Instant::now();
        let work_root = tempfile::tempdir().expect("temp dir");
        let isolation = Isolation::for_tests(work_root.path());
        let outcome = spawn_attempt(&task, "node-a", 1024, &isolation, uncancelled())
            .expect("spawn")
            .wait_blocking();
        let elapsed = started.elapsed();
        assert!(
            elapsed >= Duration::from_millis(100) && elapsed < Duration::from_secs(5),
            "{elapsed:?}"
        );
        assert!(outcome.timed_out && !outcome.cancelled);
        assert!(
            isolation.work_dirs().own().join("w7/shard@3.a2").is_dir(),
            "a timed-out attempt's directory is kept for inspection"
        );
    }

    // --- Isolation ---------------------------------------------------------------------

    /// Isolation with `work_root`, no cgroups, and the test process's environment as the
    /// worker's.
    fn isolation_with_env(work_root: &std::path::Path, run_as: Option<&str>) -> Arc<Isolation> {
        let settings = IsolationSettings {
            work_dir: work_root.to_owned(),
            keep_failed_workdirs_for: Duration::from_secs(3600),
            run_as: run_as.map(str::to_owned),
            run_as_uids: None,
            cgroups: CgroupMode::Off,
        };
        Arc::new(
            Isolation::prepare_with_env(&settings, std::env::vars_os()).expect("usable settings"),
        )
    }

    /// The lines of a task's stdout.
    fn lines(outcome: &AttemptOutcome) -> Vec<String> {
        String::from_utf8_lossy(&outcome.stdout)
            .lines()
            .map(str::to_owned)
            .collect()
    }

    #[tokio::test]
    async fn tasks_see_the_allow_list_the_wave_env_and_venom_variables_only() {
        // Cargo sets these for test binaries: here they stand for the worker's own secrets.
        for variable in ["CARGO_MANIFEST_DIR", "CARGO_PKG_NAME"] {
            assert!(
                std::env::var_os(variable).is_some(),
                "{variable} is not set"
            );
        }
        let work_root = tempfile::tempdir().expect("temp dir");
        let isolation = isolation_with_env(work_root.path(), None);
        let mut task = shell_task("");
        task.argv = vec!["env".to_owned()];
        task.env.insert("GREETING".to_owned(), "hello".to_owned());
        let finished = run_isolated(&task, "node-a", 1 << 20, &isolation, uncancelled()).await;
        assert_eq!(finished.exit_code, Some(0), "{finished:?}");
        let seen: std::collections::BTreeMap<String, String> = lines(&finished)
            .iter()
            .filter_map(|line| line.split_once('='))
            .map(|(key, value)| (key.to_owned(), value.to_owned()))
            .collect();
        assert!(!seen.contains_key("CARGO_MANIFEST_DIR"), "{seen:?}");
        assert!(!seen.contains_key("CARGO_PKG_NAME"), "{seen:?}");

        let mut expected: std::collections::BTreeSet<&str> = TASK_ENV_ALLOW_LIST
            .into_iter()
            .filter(|name| *name == "PATH" || std::env::var_os(name).is_some())
            .collect();
        expected.extend([
            "GREETING",
            "VENOM_WAVE_ID",
            "VENOM_TASK_ID",
            "VENOM_TASK_INDEX",
            "VENOM_ATTEMPT",
            "VENOM_NODE",
            "VENOM_WORKDIR",
        ]);
        let seen_names: std::collections::BTreeSet<&str> =
            seen.keys().map(String::as_str).collect();
        assert_eq!(seen_names, expected);
        let worker_path = std::env::var("PATH").unwrap_or_else(|_| DEFAULT_TASK_PATH.to_owned());
        assert_eq!(seen["PATH"], worker_path);
        assert_eq!(seen["GREETING"], "hello");
    }

    #[tokio::test]
    async fn a_task_running_as_the_workers_user_can_read_the_workers_environ() {
        // Why `--run-as` matters: a clean environment does not stop a task of the same uid
        // from reading the worker's through /proc.
        let mut task = shell_task("tr '\\0' '\\n' < /proc/$WORKER_PID/environ");
        task.env
            .insert("WORKER_PID".to_owned(), std::process::id().to_string());
        let finished = run(&task, "node-a", 1 << 20, uncancelled()).await;
        assert_eq!(finished.exit_code, Some(0), "{finished:?}");
        assert!(
            lines(&finished)
                .iter()
                .any(|line| line.starts_with("CARGO_MANIFEST_DIR=")),
            "{finished:?}"
        );
    }

    #[tokio::test]
    async fn each_attempt_runs_in_a_fresh_private_directory_kept_only_after_a_failure() {
        let work_root = tempfile::tempdir().expect("temp dir");
        let isolation = Isolation::for_tests(work_root.path());
        let script = "printf '%s\\n' \"$(pwd -P)\" \"$VENOM_WORKDIR\" \"$(stat -c %a .)\" \
                      \"$(ls -A | wc -l)\"; touch left-behind; exit $CODE";
        let mut task = shell_task(script);
        task.env.insert("CODE".to_owned(), "3".to_owned());
        let dir = isolation
            .work_dirs()
            .own()
            .canonicalize()
            .expect("the worker's directory exists")
            .join("w7/shard@3.a2");
        let expected = |dir: &std::path::Path| {
            vec![
                dir.display().to_string(),
                dir.display().to_string(),
                "700".to_owned(),
                "0".to_owned(),
            ]
        };

        let failed = run_isolated(&task, "node-a", 1024, &isolation, uncancelled()).await;
        assert_eq!(failed.exit_code, Some(3), "{failed:?}");
        assert_eq!(lines(&failed), expected(&dir));
        assert!(
            dir.join("left-behind").exists(),
            "a failed attempt's directory is kept"
        );

        // The same attempt again (a leftover at its place): it still starts empty.
        let again = run_isolated(&task, "node-a", 1024, &isolation, uncancelled()).await;
        assert_eq!(lines(&again), expected(&dir));

        // The micro-task's next attempt succeeds: its directory and the kept one go.
        task.attempt.attempt = 3;
        task.env.insert("CODE".to_owned(), "0".to_owned());
        let next = dir.with_file_name("shard@3.a3");
        let succeeded = run_isolated(&task, "node-a", 1024, &isolation, uncancelled()).await;
        assert_eq!(succeeded.exit_code, Some(0), "{succeeded:?}");
        assert_eq!(lines(&succeeded), expected(&next));
        assert!(!next.exists() && !dir.exists());
        let wave_dir = dir.parent().expect("the wave's directory");
        assert_eq!(std::fs::read_dir(wave_dir).expect("kept").count(), 0);
    }

    #[tokio::test]
    async fn a_wave_workdir_is_used_as_it_is_and_left_alone() {
        let work_root = tempfile::tempdir().expect("temp dir");
        let isolation = Isolation::for_tests(work_root.path());
        let place = tempfile::tempdir().expect("temp dir");
        let place_path = place.path().canonicalize().expect("canonical");
        std::fs::write(place_path.join("input"), "data\n").expect("input");
        let mut task = shell_task("pwd -P; echo \"$VENOM_WORKDIR\"; cat input; echo out > output");
        task.workdir = Some(place_path.clone());
        let finished = run_isolated(&task, "node-a", 1024, &isolation, uncancelled()).await;
        assert_eq!(finished.exit_code, Some(0), "{finished:?}");
        let place_text = place_path.display().to_string();
        assert_eq!(lines(&finished), [place_text.as_str(), &place_text, "data"]);
        assert!(place_path.join("output").exists(), "the directory stays");
        assert!(
            !isolation.work_dirs().own().join("w7").exists(),
            "no directory of the worker's own was made"
        );

        let file = place_path.join("input");
        for (workdir, problem) in [
            (place_path.join("missing"), "does not exist"),
            (file, "not a directory"),
            (PathBuf::from("relative/dir"), "not an absolute path"),
        ] {
            task.workdir = Some(workdir.clone());
            let finished = run_isolated(&task, "node-a", 1024, &isolation, uncancelled()).await;
            let error = finished.error.clone().unwrap_or_default();
            assert!(
                error.contains("the task's workdir") && error.contains(problem),
                "{workdir:?}: {error}"
            );
            assert_eq!(finished.exit_code, None);
            assert_eq!(finished.kind(), venom_core::OutcomeKind::NotStarted);
        }
    }

    #[tokio::test]
    async fn bare_program_names_are_looked_up_in_the_tasks_path() {
        let bin = tempfile::tempdir().expect("temp dir");
        let tool = bin.path().join("venom-test-tool");
        std::fs::write(&tool, "#!/bin/sh\necho \"tool $0 ran\"\n").expect("tool");
        std::fs::set_permissions(&tool, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .expect("chmod");
        let mut task = shell_task("");
        task.argv = vec!["venom-test-tool".to_owned()];
        task.env.insert(
            "PATH".to_owned(),
            format!("{}:/usr/bin:/bin", bin.path().display()),
        );
        let finished = run(&task, "node-a", 1024, uncancelled()).await;
        assert_eq!(finished.exit_code, Some(0), "{finished:?}");
        assert_eq!(lines(&finished), [format!("tool {} ran", tool.display())]);

        task.env.remove("PATH");
        let finished = run(&task, "node-a", 1024, uncancelled()).await;
        let error = finished.error.unwrap_or_default();
        assert!(
            error.contains("`venom-test-tool`") && error.contains("not in the task's PATH"),
            "{error}"
        );
    }

    #[tokio::test]
    async fn run_as_confines_tasks_to_another_user() {
        // A work root that another user may pass through (temp dirs are 0700).
        let work_root = tempfile::tempdir().expect("temp dir");
        std::fs::set_permissions(
            work_root.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o711),
        )
        .expect("chmod");
        let settings = IsolationSettings {
            work_dir: work_root.path().to_owned(),
            keep_failed_workdirs_for: Duration::from_secs(3600),
            run_as: Some("nobody".to_owned()),
            run_as_uids: None,
            cgroups: CgroupMode::Off,
        };
        if crate::isolation::user::effective_uid() != 0 {
            let error = Isolation::prepare_with_env(&settings, []).expect_err("not root");
            assert!(
                error
                    .to_string()
                    .starts_with("--run-as nobody: the worker must run as root"),
                "{error}"
            );
            return;
        }
        let nobody = crate::isolation::user::lookup_user("nobody")
            .expect("the lookup works")
            .expect("the system has a `nobody` user");

        // Wave 1 ran as the worker's own user and kept a failed attempt's directory.
        let as_worker = isolation_with_env(work_root.path(), None);
        let mut secret_task = shell_task("echo s3cret > secret; exit 1");
        secret_task.attempt.wave_id = 1;
        let kept = run_isolated(&secret_task, "node-a", 1024, &as_worker, uncancelled()).await;
        assert_eq!(kept.exit_code, Some(1), "{kept:?}");
        let other_wave = as_worker.work_dirs().own().join("w1/shard@3.a2");
        assert!(other_wave.join("secret").exists());

        // Wave 2 runs as nobody.
        let as_nobody = isolation_with_env(work_root.path(), Some("nobody"));
        let mut task = shell_task(
            r#"id -u; id -g; id -G; echo "$HOME|$USER|$LOGNAME"
pwd -P; echo "$VENOM_WORKDIR"; stat -c '%u %a' .
touch mine && echo can-write-own
cat /proc/$WORKER_PID/environ > /dev/null 2>&1 && echo environ-readable || echo environ-denied
ls "$OTHER_WAVE" > /dev/null 2>&1 && echo other-listable || echo other-denied
cat "$OTHER_WAVE/secret" > /dev/null 2>&1 && echo secret-readable || echo secret-denied
ls "$WORK_ROOT" > /dev/null 2>&1 && echo root-listable || echo root-denied"#,
        );
        task.attempt.wave_id = 2;
        task.env
            .insert("WORKER_PID".to_owned(), std::process::id().to_string());
        task.env
            .insert("OTHER_WAVE".to_owned(), other_wave.display().to_string());
        task.env.insert(
            "WORK_ROOT".to_owned(),
            work_root.path().display().to_string(),
        );
        let finished = run_isolated(&task, "node-a", 1024, &as_nobody, uncancelled()).await;
        assert_eq!(finished.exit_code, Some(0), "{finished:?}");
        let dir = as_nobody
            .work_dirs()
            .own()
            .canonicalize()
            .expect("exists")
            .join("w2/shard@3.a2");
        let (uid, gid) = (nobody.uid.to_string(), nobody.gid.to_string());
        let home = nobody.home.to_string_lossy();
        assert_eq!(
            lines(&finished),
            [
                uid.clone(),
                gid.clone(),
                gid, // no supplementary groups
                format!("{home}|nobody|nobody"),
                dir.display().to_string(),
                dir.display().to_string(),
                format!("{uid} 700"),
                "can-write-own".to_owned(),
                "environ-denied".to_owned(),
                "other-denied".to_owned(),
                "secret-denied".to_owned(),
                "root-denied".to_owned(),
            ]
        );
        assert!(
            !dir.exists(),
            "removed as root after the success, though nobody's"
        );
    }

    /// `--run-as-uids 300000-300999` over `work_root`, with the test process's environment.
    fn per_wave_settings(work_root: &std::path::Path) -> IsolationSettings {
        IsolationSettings {
            work_dir: work_root.to_owned(),
            keep_failed_workdirs_for: Duration::from_secs(3600),
            run_as: None,
            run_as_uids: Some("300000-300999".parse().expect("a range")),
            cgroups: CgroupMode::Off,
        }
    }

    #[tokio::test]
    async fn run_as_uids_keeps_each_wave_from_the_others_but_congruent_ones() {
        let work_root = tempfile::tempdir().expect("temp dir");
        std::fs::set_permissions(
            work_root.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o711),
        )
        .expect("chmod");
        let settings = per_wave_settings(work_root.path());
        if crate::isolation::user::effective_uid() != 0 {
            let error = Isolation::prepare_with_env(&settings, []).expect_err("not root");
            assert!(
                error.to_string().starts_with(
                    "--run-as-uids 300000-300999: the worker must run as root to run each \
                     wave's tasks as a uid of its own"
                ),
                "{error}"
            );
            return;
        }
        let isolation =
            Arc::new(Isolation::prepare_with_env(&settings, std::env::vars_os()).expect("usable"));
        let own = isolation.work_dirs().own().canonicalize().expect("exists");
        assert_eq!(
            std::fs::metadata(&own).expect("exists").mode() & 0o7777,
            0o711,
            "every wave's uid passes through the worker's directory"
        );

        // Wave 1 keeps a failed attempt's directory with a secret in it.
        let mut secret_task = shell_task("echo s3cret > secret; exit 1");
        secret_task.attempt.wave_id = 1;
        let kept = run_isolated(&secret_task, "node-a", 1024, &isolation, uncancelled()).await;
        assert_eq!(kept.exit_code, Some(1), "{kept:?}");
        let wave_1 = own.join("w1");
        let secret = wave_1.join("shard@3.a2/secret");
        assert!(secret.exists());
        let owner = |path: &std::path::Path| {
            let metadata = std::fs::symlink_metadata(path).expect("exists");
            (metadata.uid(), metadata.gid(), metadata.mode() & 0o7777)
        };
        assert_eq!(owner(&wave_1), (0, 300_001, 0o710));
        assert_eq!(owner(&wave_1.join("shard@3.a2")), (300_001, 300_001, 0o700));
        assert_eq!(owner(&secret).0, 300_001, "the task wrote it as its uid");

        // Wave 3 runs while wave 2 looks at it.
        let (sleeper_handle, sleeper_token) = cancel_pair();
        let mut sleeper_task = shell_task("exec sleep 30");
        sleeper_task.attempt.wave_id = 3;
        let sleeper =
            spawn_attempt(&sleeper_task, "node-a", 1024, &isolation, sleeper_token).expect("spawn");
        let sleeper_pid = sleeper.pid();
        let sleeper = tokio::task::spawn_blocking(move || sleeper.wait_blocking());

        let probe = r#"id -u; id -g; id -G; echo "$HOME|$USER|$LOGNAME|$SHELL"
pwd -P; stat -c '%u %g %a' . ..
touch mine && echo can-write-own
cat /proc/$WORKER_PID/environ > /dev/null 2>&1 && echo environ-readable || echo environ-denied
kill -0 $WORKER_PID 2> /dev/null && echo worker-signalable || echo worker-signal-denied
kill -0 $SLEEPER_PID 2> /dev/null && echo other-wave-signalable || echo other-wave-signal-denied
ls "$OTHER_WAVE" > /dev/null 2>&1 && echo other-listable || echo other-denied
cat "$OTHER_WAVE/shard@3.a2/secret" 2> /dev/null || echo secret-denied
ls "$OTHER_WAVE/.." > /dev/null 2>&1 && echo worker-dir-listable || echo worker-dir-denied"#;
        let probe_as = |wave_id: u64| {
            let mut task = shell_task(probe);
            task.attempt.wave_id = wave_id;
            for (key, value) in [
                ("WORKER_PID", std::process::id().to_string()),
                ("SLEEPER_PID", sleeper_pid.to_string()),
                ("OTHER_WAVE", wave_1.display().to_string()),
            ] {
                task.env.insert(key.to_owned(), value);
            }
            task
        };
        let finished = run_isolated(&probe_as(2), "node-a", 4096, &isolation, uncancelled()).await;
        assert_eq!(finished.exit_code, Some(0), "{finished:?}");
        let dir = own.join("w2/shard@3.a2").display().to_string();
        assert_eq!(
            lines(&finished),
            [
                "300002",
                "300002",
                "300002", // no supplementary groups
                &format!("{dir}|venom-300002|venom-300002|/bin/sh"),
                &dir,
                "300002 300002 700",
                "0 300002 710",
                "can-write-own",
                "environ-denied",
                "worker-signal-denied",
                "other-wave-signal-denied",
                "other-denied",
                "secret-denied",
                "worker-dir-denied",
            ]
        );
        assert!(
            !own.join("w2/shard@3.a2").exists(),
            "removed by the worker after the success, though the wave's uid's"
        );

        // Wave 1001 ≡ 1 (mod 1000): the same uid as wave 1, and so its files (documented).
        let congruent =
            run_isolated(&probe_as(1001), "node-a", 4096, &isolation, uncancelled()).await;
        let congruent = lines(&congruent);
        assert_eq!(congruent[0], "300001");
        assert!(congruent.contains(&"s3cret".to_owned()), "{congruent:?}");

        sleeper_handle.cancel();
        let ended = tokio::time::timeout(Duration::from_secs(5), sleeper)
            .await
            .expect("the cancel ends it")
            .expect("no panic");
        assert!(ended.cancelled);
    }

    #[test]
    fn run_as_uids_refuses_a_range_someone_has_and_the_company_of_run_as() {
        let work_root = tempfile::tempdir().expect("temp dir");
        let mut settings = per_wave_settings(work_root.path());
        settings.run_as = Some("nobody".to_owned());
        let both = Isolation::prepare_with_env(&settings, []).expect_err("both");
        assert_eq!(
            both.to_string(),
            "--run-as nobody and --run-as-uids 300000-300999 cannot be used together: choose one"
        );

        let nobody = crate::isolation::user::lookup_user("nobody")
            .expect("the lookup works")
            .expect("the system has a `nobody` user");
        let range = crate::isolation::UidRange::new(nobody.uid, nobody.uid).expect("above 1000");
        let settings = IsolationSettings {
            run_as_uids: Some(range),
            ..per_wave_settings(work_root.path())
        };
        let taken = Isolation::prepare_with_env(&settings, []).expect_err("nobody's uid");
        if crate::isolation::user::effective_uid() == 0 {
            // `nobody`, or an account whose primary group is `nogroup` (Debian's `sync`),
            // whichever the passwd database lists first.
            let message = taken.to_string();
            assert!(
                message.starts_with(&format!("--run-as-uids {range}: account `"))
                    && message.contains(&format!(
                        " {}, inside the range, and tasks would run as (or with the group of) \
                         whoever has it",
                        nobody.uid
                    )),
                "{message}"
            );
        } else {
            assert!(taken.to_string().contains("must run as root"), "{taken}");
        }
    }

    #[test]
    fn run_as_refuses_a_user_that_does_not_exist_and_an_unreachable_work_root() {
        let work_root = tempfile::tempdir().expect("temp dir");
        // Others cannot pass through the work root's parent.
        std::fs::set_permissions(
            work_root.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )
        .expect("chmod");
        let settings = |user: &str| IsolationSettings {
            work_dir: work_root.path().join("root"),
            keep_failed_workdirs_for: Duration::ZERO,
            run_as: Some(user.to_owned()),
            run_as_uids: None,
            cgroups: CgroupMode::Off,
        };
        let missing = Isolation::prepare_with_env(&settings("venom-no-such-user-7f3a"), [])
            .expect_err("no such user");
        let unreachable =
            Isolation::prepare_with_env(&settings("nobody"), []).expect_err("cannot reach");
        if crate::isolation::user::effective_uid() == 0 {
            assert_eq!(
                missing.to_string(),
                "--run-as venom-no-such-user-7f3a: there is no such user"
            );
            let message = unreachable.to_string();
            assert!(
                message.starts_with(&format!(
                    "--work-dir {}",
                    work_root.path().join("root").display()
                )) && message.contains("user nobody (--run-as) cannot reach it")
                    && message.contains(&format!("{} is mode 0700", work_root.path().display())),
                "{message}"
            );
        } else {
            for error in [missing, unreachable] {
                assert!(error.to_string().contains("must run as root"), "{error}");
            }
        }
    }

    /// This process's cgroup v2 directory, if it may make groups under it.
    fn writable_own_cgroup() -> Option<PathBuf> {
        use crate::isolation::cgroup::{cgroup2_mount, group_dir, unified_group};
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
        let (mount_root, mount_point) = cgroup2_mount(&mountinfo)?;
        let group = unified_group(&std::fs::read_to_string("/proc/self/cgroup").ok()?)?;
        let base = group_dir(&mount_point, &mount_root, &group)?;
        let probe = base.join(format!("venom-probe-{}", std::process::id()));
        std::fs::create_dir(&probe).ok()?;
        std::fs::remove_dir(&probe).ok()?;
        Some(base)
    }

    /// Serializes the tests that may move this process between cgroups.
    static CGROUP_TESTS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

    #[tokio::test]
    async fn attempts_run_in_a_cgroup_of_their_own_which_kills_and_goes_at_the_end() {
        let _serial = CGROUP_TESTS.lock().await;
        let work_root = tempfile::tempdir().expect("temp dir");
        let Some(base) = writable_own_cgroup() else {
            // No cgroup v2 this process may write: `--cgroups required` refuses to start.
            let settings = IsolationSettings {
                work_dir: work_root.path().to_owned(),
                keep_failed_workdirs_for: Duration::ZERO,
                run_as: None,
                run_as_uids: None,
                cgroups: CgroupMode::Required,
            };
            let error = Isolation::prepare_with_env(&settings, []).expect_err("refused");
            assert!(
                error.to_string().starts_with("--cgroups required: "),
                "{error}"
            );
            return;
        };
        // Without the memory and cpu controllers no limit is written, but moving the process,
        // killing the group and removing it work the same.
        let parent = crate::isolation::CgroupParent::create(&base, false, false)
            .expect("a parent group for attempts");
        let parent_dir = parent.dir().to_owned();
        let mut isolation = Isolation::prepare_with_env(
            &IsolationSettings {
                work_dir: work_root.path().to_owned(),
                keep_failed_workdirs_for: Duration::ZERO,
                run_as: None,
                run_as_uids: None,
                cgroups: CgroupMode::Off,
            },
            [],
        )
        .expect("usable settings");
        isolation.set_cgroups(Some(parent));
        let isolation = Arc::new(isolation);
        let pid_file = work_root.path().join("escaped.pid");
        // The escaped process leaves the process group (setsid) and its pipes: only the
        // cgroup can still take it.
        let task = shell_task(&format!(
            "grep '^0::' /proc/self/cgroup; \
             setsid sh -c 'echo $$ > {}; exec sleep 30' > /dev/null 2>&1 & sleep 0.2",
            pid_file.display()
        ));
        let finished = run_isolated(&task, "node-a", 1024, &isolation, uncancelled()).await;
        assert_eq!(finished.exit_code, Some(0), "{finished:?}");
        let attempt_dir = parent_dir.join("w7-m3-a2");
        let membership = lines(&finished).concat();
        let expected_suffix = format!(
            "/{}/w7-m3-a2",
            parent_dir.file_name().expect("named").to_string_lossy()
        );
        assert!(membership.ends_with(&expected_suffix), "{membership}");
        // An argv task is held at the same gate, then runs as itself.
        let mut argv_task = shell_task("");
        argv_task.argv = ["grep", "^0::", "/proc/self/cgroup"]
            .map(str::to_owned)
            .to_vec();
        argv_task.attempt.attempt = 5;
        let finished = run_isolated(&argv_task, "node-a", 1024, &isolation, uncancelled()).await;
        assert_eq!(finished.exit_code, Some(0), "{finished:?}");
        assert!(
            lines(&finished)
                .concat()
                .ends_with(&expected_suffix.replace("-a2", "-a5")),
            "{finished:?}"
        );
        let escaped: i32 = std::fs::read_to_string(&pid_file)
            .expect("the escaped process wrote its pid")
            .trim()
            .parse()
            .expect("a pid");
        let dead = wait_until_dead(escaped).await;
        if !dead {
            let _ = kill_process(u32::try_from(escaped).expect("positive"));
        }
        assert!(dead, "the escaped process outlived its attempt's cgroup");
        assert!(!attempt_dir.exists(), "the attempt's cgroup is removed");
        drop(isolation);
        assert!(
            !parent_dir.exists(),
            "the parent group goes with the worker"
        );
    }

    #[tokio::test]
    async fn memory_limits_apply_where_cgroups_allow_and_required_refuses_otherwise() {
        let _serial = CGROUP_TESTS.lock().await;
        let work_root = tempfile::tempdir().expect("temp dir");
        let settings = |cgroups| IsolationSettings {
            work_dir: work_root.path().to_owned(),
            keep_failed_workdirs_for: Duration::ZERO,
            run_as: None,
            run_as_uids: None,
            cgroups,
        };
        let off = Isolation::prepare_with_env(&settings(CgroupMode::Off), []).expect("off");
        assert!(off.cgroups().is_none());
        drop(off);
        match crate::isolation::CgroupParent::for_this_process() {
            Err(reason) => {
                let error = Isolation::prepare_with_env(&settings(CgroupMode::Required), [])
                    .expect_err("required without cgroups");
                assert_eq!(error.to_string(), format!("--cgroups required: {reason}"));
                let auto =
                    Isolation::prepare_with_env(&settings(CgroupMode::Auto), []).expect("auto");
                assert!(auto.cgroups().is_none(), "auto degrades: {reason}");
            }
            Ok(parent) => {
                let enabled = std::fs::read_to_string(parent.dir().join("cgroup.subtree_control"))
                    .expect("readable");
                assert!(
                    enabled.contains("memory") && enabled.contains("cpu"),
                    "{enabled}"
                );
                drop(parent);
                let isolation = Arc::new(
                    Isolation::prepare_with_env(&settings(CgroupMode::Required), [])
                        .expect("required with cgroups"),
                );
                let mut task = shell_task(
                    "cat memory.max 2>/dev/null; x=$(head -c 268435456 /dev/zero | tr '\\0' a); \
                     echo survived",
                );
                task.memory_bytes = 32 << 20;
                let finished = run_isolated(&task, "node-a", 1024, &isolation, uncancelled()).await;
                assert_eq!(finished.signal, Some(libc::SIGKILL), "{finished:?}");
                assert!(!lines(&finished).contains(&"survived".to_owned()));
                assert!(
                    String::from_utf8_lossy(&finished.stderr).contains("OOM killer"),
                    "{finished:?}"
                );
            }
        }
    }

    #[tokio::test]
    async fn dropping_the_handle_does_not_cancel() {
        let (handle, token) = cancel_pair();
        drop(handle);
        let finished = run(&shell_task("sleep 0.1; exit 4"), "node-a", 1024, token).await;
        assert_eq!(finished.exit_code, Some(4));
        assert!(!finished.cancelled);
    }
}
