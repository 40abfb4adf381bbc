//! The guard: a small process beside the worker that kills the worker's attempts when the
//! worker cannot.
//!
//! Attempts run in process groups of their own, so they outlive a worker killed with SIGKILL,
//! and a frozen worker (SIGSTOP, a stalled machine) cannot kill them when its lease runs out.
//! Either way the leader re-dispatches them once the lease and its margin have passed, and two
//! attempts of one micro-task would run at once. The guard closes both gaps. The worker starts
//! it (its own executable, with [`GUARD_ENV`] set) in a process group and session of its own,
//! and tells it on a pipe, one line each:
//!
//! - `+PGID`: an attempt's process group started; `-PGID`: it ended;
//! - `LMS`: the lease now ends at `MS` on `CLOCK_MONOTONIC` (milliseconds; `L0`: no lease).
//!
//! When the pipe closes (the worker is gone, however it died) or the lease ends, the guard
//! sends SIGKILL to every group it knows. After the worker is gone it exits. The guard itself
//! touches no file and no network.

use std::collections::BTreeSet;
use std::io::{self, Read as _, Write as _};
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Mutex;
use std::time::Instant;

/// Set in the guard's environment: the executable runs [`run_guard`] instead of a worker.
pub const GUARD_ENV: &str = "VENOM_WORKER_GUARD";

/// Milliseconds on `CLOCK_MONOTONIC`, the clock `Instant` reads (shared by all processes).
#[allow(unsafe_code)]
fn monotonic_ms() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid, writable timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    u64::try_from(now.tv_sec).unwrap_or(0) * 1_000
        + u64::try_from(now.tv_nsec).unwrap_or(0) / 1_000_000
}

/// The worker's end of the guard.
#[derive(Debug)]
pub struct Guard {
    stdin: Mutex<Option<ChildStdin>>,
    child: Mutex<Child>,
}

impl Guard {
    /// Starts `program` as the guard.
    pub fn spawn(program: &Path) -> io::Result<Self> {
        let mut command = Command::new(program);
        command
            .env(GUARD_ENV, "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        let mut child = command.spawn()?;
        let stdin = child.stdin.take();
        Ok(Self {
            stdin: Mutex::new(stdin),
            child: Mutex::new(child),
        })
    }

    fn send(&self, line: &str) {
        let mut stdin = self
            .stdin
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(pipe) = stdin.as_mut() else {
            return;
        };
        // One short line is one atomic pipe write.
        if let Err(error) = pipe.write_all(line.as_bytes()) {
            tracing::error!(%error, "the guard process is gone; attempts of a crashed worker are killed only when it restarts");
            *stdin = None;
        }
    }

    pub fn started(&self, pgid: u32) {
        self.send(&format!("+{pgid}\n"));
    }

    pub fn ended(&self, pgid: u32) {
        self.send(&format!("-{pgid}\n"));
    }

    /// The lease now ends at `until` (`None`: no lease).
    pub fn lease(&self, until: Option<Instant>) {
        let at = until.map_or(0, |until| {
            let left = until.saturating_duration_since(Instant::now());
            monotonic_ms() + u64::try_from(left.as_millis()).unwrap_or(u64::MAX / 2)
        });
        self.send(&format!("L{}\n", at.max(u64::from(until.is_some()))));
    }
}

impl Drop for Guard {
    /// A clean stop: the worker killed its attempts itself; closing the pipe lets the guard
    /// exit, and it is reaped here.
    fn drop(&mut self) {
        if let Ok(mut stdin) = self.stdin.lock() {
            stdin.take();
        }
        if let Ok(mut child) = self.child.lock() {
            let _ = child.wait();
        }
    }
}

/// What the guard knows.
#[derive(Debug, Default)]
struct Watch {
    groups: BTreeSet<u32>,
    /// `CLOCK_MONOTONIC` ms at which the lease ends; 0: none.
    lease_end_ms: u64,
}

impl Watch {
    fn line(&mut self, line: &str) {
        let (kind, value) = line.split_at(line.len().min(1));
        let Ok(value) = value.trim().parse::<u64>() else {
            return;
        };
        match kind {
            "+" => {
                if let Ok(pgid) = u32::try_from(value) {
                    self.groups.insert(pgid);
                }
            }
            "-" => {
                if let Ok(pgid) = u32::try_from(value) {
                    self.groups.remove(&pgid);
                }
            }
            "L" => self.lease_end_ms = value,
            _ => {}
        }
    }

    fn kill_all(&mut self, why: &str) {
        if self.groups.is_empty() {
            return;
        }
        eprintln!(
            "venom-worker guard: {why}: killing {} process group(s)",
            self.groups.len()
        );
        for &pgid in &self.groups {
            if let Ok(pgid) = i32::try_from(pgid) {
                crate::datadir::signal_group(pgid, libc::SIGKILL);
            }
        }
    }
}

/// The guard's life: follows the worker's lines until the pipe closes, killing every known
/// group whenever the lease runs out, and once more at the end. Never returns.
pub fn run_guard() -> ! {
    new_session();
    let mut watch = Watch::default();
    let mut stdin = io::stdin().lock();
    let mut pending = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        let timeout_ms = match watch.lease_end_ms {
            0 => -1,
            end => i32::try_from(end.saturating_sub(monotonic_ms())).unwrap_or(i32::MAX),
        };
        let ready = poll_stdin(timeout_ms);
        if ready == 0 {
            watch.kill_all("the worker's lease ran out");
            watch.lease_end_ms = 0;
            continue;
        }
        if ready < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            break;
        }
        match stdin.read(&mut buffer) {
            Ok(0) | Err(_) => break,
            Ok(n) => pending.extend_from_slice(&buffer[..n]),
        }
        while let Some(end) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            watch.line(String::from_utf8_lossy(&line).trim_end());
        }
        if watch.lease_end_ms != 0 && monotonic_ms() >= watch.lease_end_ms {
            watch.kill_all("the worker's lease ran out");
            watch.lease_end_ms = 0;
        }
    }
    watch.kill_all("the worker is gone");
    std::process::exit(0)
}

/// Leaves the worker's session and process group: a signal to the worker's group or
/// terminal spares the guard.
#[allow(unsafe_code)]
fn new_session() {
    // SAFETY: setsid has no memory effects; failing (already a leader) is harmless.
    unsafe { libc::setsid() };
}

/// Waits up to `timeout_ms` (-1: forever) for stdin to be readable: 1 ready, 0 timed out,
/// -1 failed.
#[allow(unsafe_code)]
fn poll_stdin(timeout_ms: i32) -> i32 {
    let mut poll = libc::pollfd {
        fd: 0,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd that outlives the call.
    unsafe { libc::poll(&mut poll, 1, timeout_ms) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guard_follows_starts_ends_and_leases() {
        let mut watch = Watch::default();
        for line in ["+10", "+11", "-10", "L1234", "garbage", "+", "-x"] {
            watch.line(line);
        }
        assert_eq!(watch.groups, BTreeSet::from([11]));
        assert_eq!(watch.lease_end_ms, 1234);
        watch.line("L0");
        assert_eq!(watch.lease_end_ms, 0);
    }
}
