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
//! [`spawn_attempt`] starts the process of an [`Assignment`] (the agent reports the start with
//! its pid), and [`RunningAttempt::wait_blocking`] drives it to the end. An attempt that never
//! ran ends as [`failed_to_start`] or [`cancelled_before_start`] says.

use std::collections::HashMap;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, ChildStderr, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use venom_core::mobius::Mode;
use venom_core::{AttemptOutcome, AttemptRef};

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
    /// Environment added to the worker's own.
    pub env: HashMap<String, String>,
    /// `None` = no timeout.
    pub timeout: Option<Duration>,
    /// Slots it occupies (0 counts as 1).
    pub cpus: u32,
    /// W3C trace context the attempt's span joins; empty when the wave is not traced.
    pub traceparent: String,
    /// This node's throttle mode when the attempt was dispatched, if the coordinator said.
    pub mode: Option<Mode>,
}

/// Why an attempt could not be started.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("the task has no command (neither a shell string nor an argv)")]
    EmptyCommand,
    #[error("cannot start `{program}`: {source}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
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

/// Starts an attempt's process: `sh -c <shell>` or `argv`, in a new process group, with the
/// assignment's environment plus the `VENOM_*` variables. `cancel` is bound to this attempt:
/// cancelling it from now on kills the process group.
pub fn spawn_attempt(
    assignment: &Assignment,
    node_name: &str,
    max_output_bytes: usize,
    cancel: CancelToken,
) -> Result<RunningAttempt, ExecError> {
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

    let mut command = Command::new(program);
    command
        .args(args)
        .envs(&assignment.env)
        .envs(venom_env(assignment, node_name))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let started_ms = crate::unix_now_ms();
    let mut child = command.spawn().map_err(|source| ExecError::Spawn {
        program: program.to_owned(),
        source,
    })?;
    let pid = child.id();
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
    })
}

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
    use super::*;
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
    /// and a process that cannot start is an outcome with `error` set.
    async fn run(
        assignment: &Assignment,
        node_name: &str,
        max_output_bytes: usize,
        cancel: CancelToken,
    ) -> AttemptOutcome {
        let assignment = assignment.clone();
        let node_name = node_name.to_owned();
        tokio::task::spawn_blocking(move || {
            let started_ms = crate::unix_now_ms();
            match spawn_attempt(&assignment, &node_name, max_output_bytes, cancel) {
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
        let running = spawn_attempt(&task, "node-a", 1024, token).expect("spawn");
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
        let running = spawn_attempt(&shell_task("sleep 30"), "node-a", 1024, token).expect("spawn");
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
        let outcome = spawn_attempt(&task, "node-a", 1024, uncancelled())
            .expect("spawn")
            .wait_blocking();
        let elapsed = started.elapsed();
        assert!(
            elapsed >= Duration::from_millis(100) && elapsed < Duration::from_secs(5),
            "{elapsed:?}"
        );
        assert!(outcome.timed_out && !outcome.cancelled);
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
