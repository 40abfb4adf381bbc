//! How waves, tasks, micro-tasks, attempts and nodes are named.
//!
//! A wave has a number the state machine assigns ([`WaveId`], from 1). Its tasks are named by
//! their `id` in the wave file and by their index in [`crate::wave::WaveSpec::tasks`]; its
//! micro-tasks by their flat index within the wave ([`MicroKey`]: the wave and that index). An
//! attempt is one dispatch of a micro-task ([`AttemptRef`]): attempt numbers start at 1 and
//! fence results, so a result counts only if it names the current attempt. A node is named by
//! the name its worker registered with ([`NodeName`]).

use std::fmt;

use serde::{Deserialize, Serialize};

/// Identifies a wave; assigned by the state machine, starting at 1.
pub type WaveId = u64;

/// Identifies one micro-task: its wave and its flat index within the wave.
pub type MicroKey = (WaveId, u32);

/// A worker node's registered name.
pub type NodeName = String;

/// One attempt of one micro-task.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
pub struct AttemptRef {
    pub wave_id: WaveId,
    /// Flat index of the micro-task within its wave.
    pub micro: u32,
    /// 1 for the first dispatch.
    pub attempt: u32,
}

impl AttemptRef {
    /// Attempt `attempt` of micro-task `key`.
    pub fn new(key: MicroKey, attempt: u32) -> AttemptRef {
        AttemptRef {
            wave_id: key.0,
            micro: key.1,
            attempt,
        }
    }

    /// The micro-task this is an attempt of.
    pub fn key(self) -> MicroKey {
        (self.wave_id, self.micro)
    }
}

impl fmt::Display for AttemptRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "wave {} micro {} attempt {}",
            self.wave_id, self.micro, self.attempt
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_attempt_names_its_micro_task() {
        let attempt = AttemptRef::new((7, 3), 2);
        assert_eq!(attempt.key(), (7, 3));
        assert_eq!(attempt.attempt, 2);
        assert_eq!(attempt.to_string(), "wave 7 micro 3 attempt 2");
    }
}
