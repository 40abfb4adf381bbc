//! How one attempt of a micro-task ended: what the worker's executor observes, what it
//! reports, and what the state machine records.

use std::fmt;

use serde::{Deserialize, Serialize};

/// How an attempt ended.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttemptOutcome {
    /// The exit code, when the process exited by itself.
    pub exit_code: Option<i32>,
    /// The signal that ended the process, if one did.
    pub signal: Option<i32>,
    /// Killed because it ran past its timeout.
    pub timed_out: bool,
    /// Killed (or never started) because it was cancelled.
    pub cancelled: bool,
    /// When the process started, Unix milliseconds on the worker (0 if it never did).
    pub started_ms: u64,
    /// When the attempt ended, Unix milliseconds on the worker.
    pub finished_ms: u64,
    /// The last bytes of standard output (the worker's capture limit).
    pub stdout: Vec<u8>,
    /// The last bytes of standard error.
    pub stderr: Vec<u8>,
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
    /// Why the process could not be started; `None` when it ran.
    pub error: Option<String>,
}

/// An attempt's ending in one word.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OutcomeKind {
    /// Exit code 0, by itself.
    Succeeded,
    /// A non-zero exit code or a signal.
    Failed,
    /// Killed at its timeout.
    TimedOut,
    /// Killed, or never started, because it was cancelled.
    Cancelled,
    /// The process could not be started.
    NotStarted,
}

impl OutcomeKind {
    /// `succeeded`, `failed`, `timed_out`, `cancelled` or `not_started`.
    pub fn as_str(self) -> &'static str {
        match self {
            OutcomeKind::Succeeded => "succeeded",
            OutcomeKind::Failed => "failed",
            OutcomeKind::TimedOut => "timed_out",
            OutcomeKind::Cancelled => "cancelled",
            OutcomeKind::NotStarted => "not_started",
        }
    }
}

impl fmt::Display for OutcomeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl AttemptOutcome {
    /// True when the process exited with code 0 by itself.
    pub fn succeeded(&self) -> bool {
        self.exit_code == Some(0)
            && self.signal.is_none()
            && !self.timed_out
            && !self.cancelled
            && self.error.is_none()
    }

    /// How it ended, in one word.
    pub fn kind(&self) -> OutcomeKind {
        if self.cancelled {
            OutcomeKind::Cancelled
        } else if self.timed_out {
            OutcomeKind::TimedOut
        } else if self.error.is_some() && self.exit_code.is_none() && self.signal.is_none() {
            OutcomeKind::NotStarted
        } else if self.succeeded() {
            OutcomeKind::Succeeded
        } else {
            OutcomeKind::Failed
        }
    }

    /// Why the attempt did not succeed, in words (`None` when it did): "timed out",
    /// "killed by signal 9", "exited with code 2", …
    pub fn failure(&self) -> Option<String> {
        if let Some(error) = &self.error {
            Some(format!("failed to start: {error}"))
        } else if self.timed_out {
            Some("timed out".to_owned())
        } else if self.cancelled {
            Some("cancelled".to_owned())
        } else if let Some(signal) = self.signal {
            Some(format!("killed by signal {signal}"))
        } else {
            match self.exit_code {
                Some(0) => None,
                Some(code) => Some(format!("exited with code {code}")),
                None => Some("no exit status".to_owned()),
            }
        }
    }

    /// How long the process ran, in milliseconds (0 if it never started).
    pub fn run_ms(&self) -> u64 {
        if self.started_ms == 0 {
            0
        } else {
            self.finished_ms.saturating_sub(self.started_ms)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exited(code: i32) -> AttemptOutcome {
        AttemptOutcome {
            exit_code: Some(code),
            started_ms: 1_000,
            finished_ms: 1_250,
            ..AttemptOutcome::default()
        }
    }

    #[test]
    fn only_a_clean_exit_zero_succeeds() {
        assert!(exited(0).succeeded());
        assert_eq!(exited(0).kind(), OutcomeKind::Succeeded);
        assert_eq!(exited(0).failure(), None);
        assert_eq!(exited(0).run_ms(), 250);
        assert_eq!(exited(3).kind(), OutcomeKind::Failed);
        assert_eq!(exited(3).failure().as_deref(), Some("exited with code 3"));
        let timed_out = AttemptOutcome {
            timed_out: true,
            signal: Some(9),
            ..exited(0)
        };
        assert!(!timed_out.succeeded());
        assert_eq!(timed_out.kind(), OutcomeKind::TimedOut);
        let cancelled = AttemptOutcome {
            cancelled: true,
            ..AttemptOutcome::default()
        };
        assert_eq!(cancelled.kind(), OutcomeKind::Cancelled);
        let not_started = AttemptOutcome {
            error: Some("no such file".into()),
            ..AttemptOutcome::default()
        };
        assert_eq!(not_started.kind(), OutcomeKind::NotStarted);
        assert_eq!(not_started.run_ms(), 0);
        assert_eq!(
            not_started.failure().as_deref(),
            Some("failed to start: no such file")
        );
    }
}
