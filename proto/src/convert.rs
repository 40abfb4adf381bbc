//! The shared vocabulary (`venom-core`) in its wire form and back.
//!
//! Both ends of every service convert through these, so an id, a state or an attempt's
//! outcome has one wire shape. Enums travel as protobuf enums; `UNSPECIFIED` (or a value this
//! build does not know) becomes [`Unspecified`], which the receiver reports as a bad field.

use venom_core::mobius::{Mode, ThrottlePolicy};
use venom_core::wave::OnFailure;
use venom_core::{AttemptOutcome, AttemptRef, Counts, NodeState, TaskState, WaveState};

use crate::v1 as pb;

/// A wire enum field held no value this build knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unspecified(pub &'static str);

impl std::fmt::Display for Unspecified {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "field `{}`: unspecified or unknown value", self.0)
    }
}

impl std::error::Error for Unspecified {}

impl From<AttemptRef> for pb::AttemptRef {
    fn from(a: AttemptRef) -> Self {
        Self {
            wave_id: a.wave_id,
            micro: a.micro,
            attempt: a.attempt,
        }
    }
}

impl From<pb::AttemptRef> for AttemptRef {
    fn from(a: pb::AttemptRef) -> Self {
        Self {
            wave_id: a.wave_id,
            micro: a.micro,
            attempt: a.attempt,
        }
    }
}

/// The wire report of a finished attempt.
pub fn task_finished(attempt: AttemptRef, outcome: AttemptOutcome) -> pb::TaskFinished {
    pb::TaskFinished {
        attempt: Some(attempt.into()),
        exit_code: outcome.exit_code,
        signal: outcome.signal,
        timed_out: outcome.timed_out,
        cancelled: outcome.cancelled,
        started_ms: outcome.started_ms,
        finished_ms: outcome.finished_ms,
        stdout: outcome.stdout,
        stderr: outcome.stderr,
        stdout_truncated: outcome.stdout_truncated,
        stderr_truncated: outcome.stderr_truncated,
        error: outcome.error.unwrap_or_default(),
    }
}

/// The attempt and outcome a `TaskFinished` reports; `None` without an attempt reference.
pub fn from_task_finished(f: pb::TaskFinished) -> Option<(AttemptRef, AttemptOutcome)> {
    let attempt = AttemptRef::from(f.attempt?);
    let outcome = AttemptOutcome {
        exit_code: f.exit_code,
        signal: f.signal,
        timed_out: f.timed_out,
        cancelled: f.cancelled,
        started_ms: f.started_ms,
        finished_ms: f.finished_ms,
        stdout: f.stdout,
        stderr: f.stderr,
        stdout_truncated: f.stdout_truncated,
        stderr_truncated: f.stderr_truncated,
        error: (!f.error.is_empty()).then_some(f.error),
    };
    Some((attempt, outcome))
}

impl From<Counts> for pb::TaskCounts {
    fn from(c: Counts) -> Self {
        Self {
            pending: c.pending,
            ready: c.ready,
            assigned: c.assigned,
            running: c.running,
            succeeded: c.succeeded,
            failed: c.failed,
            skipped: c.skipped,
            cancelled: c.cancelled,
        }
    }
}

impl From<pb::TaskCounts> for Counts {
    fn from(c: pb::TaskCounts) -> Self {
        Self {
            pending: c.pending,
            ready: c.ready,
            assigned: c.assigned,
            running: c.running,
            succeeded: c.succeeded,
            failed: c.failed,
            skipped: c.skipped,
            cancelled: c.cancelled,
        }
    }
}

/// One domain enum ⇄ one wire enum, variant for variant; the wire's `UNSPECIFIED` has no
/// domain twin.
macro_rules! wire_enum {
    ($field:literal, $domain:ty, $wire:ty, { $($d:ident <=> $w:ident),+ $(,)? }) => {
        impl From<$domain> for $wire {
            fn from(value: $domain) -> Self {
                match value {
                    $(<$domain>::$d => <$wire>::$w,)+
                }
            }
        }

        impl TryFrom<$wire> for $domain {
            type Error = Unspecified;

            fn try_from(value: $wire) -> Result<Self, Unspecified> {
                match value {
                    $(<$wire>::$w => Ok(<$domain>::$d),)+
                    #[allow(unreachable_patterns)]
                    _ => Err(Unspecified($field)),
                }
            }
        }
    };
}

wire_enum!("state", TaskState, pb::TaskState, {
    Pending <=> Pending,
    Ready <=> Ready,
    Assigned <=> Assigned,
    Running <=> Running,
    Succeeded <=> Succeeded,
    Failed <=> Failed,
    Skipped <=> Skipped,
    Cancelled <=> Cancelled,
});

wire_enum!("state", WaveState, pb::WaveState, {
    Pending <=> Pending,
    Running <=> Running,
    Succeeded <=> Succeeded,
    Failed <=> Failed,
    Cancelled <=> Cancelled,
});

wire_enum!("state", NodeState, pb::NodeState, {
    Ready <=> Ready,
    Draining <=> Draining,
    Down <=> Down,
});

wire_enum!("mode", Mode, pb::ThetaMode, {
    Unwrap <=> Unwrap,
    Transition <=> Transition,
    Balance <=> Balance,
    Wrap <=> Wrap,
    Optimize <=> Optimize,
});

wire_enum!("throttle_policy", ThrottlePolicy, pb::ThrottlePolicy, {
    Off <=> Off,
    Conservative <=> Conservative,
    Adaptive <=> Adaptive,
    Aggressive <=> Aggressive,
});

wire_enum!("on_failure", OnFailure, pb::OnFailure, {
    SkipDependents <=> SkipDependents,
    FailWave <=> FailWave,
});

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_state_survives_the_wire() {
        for state in TaskState::ALL {
            assert_eq!(TaskState::try_from(pb::TaskState::from(state)), Ok(state));
        }
        for state in WaveState::ALL {
            assert_eq!(WaveState::try_from(pb::WaveState::from(state)), Ok(state));
        }
        for policy in ThrottlePolicy::ALL {
            assert_eq!(
                ThrottlePolicy::try_from(pb::ThrottlePolicy::from(policy)),
                Ok(policy)
            );
        }
        assert_eq!(
            ThrottlePolicy::try_from(pb::ThrottlePolicy::Unspecified),
            Err(Unspecified("throttle_policy"))
        );
    }

    #[test]
    fn a_finished_attempt_survives_the_wire() {
        let attempt = AttemptRef::new((4, 2), 3);
        let outcome = AttemptOutcome {
            exit_code: Some(1),
            started_ms: 10,
            finished_ms: 20,
            stdout: b"out".to_vec(),
            error: Some("boom".into()),
            ..AttemptOutcome::default()
        };
        let wire = task_finished(attempt, outcome.clone());
        assert_eq!(from_task_finished(wire), Some((attempt, outcome)));
    }
}
