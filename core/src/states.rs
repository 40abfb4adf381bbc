//! The life of a micro-task, a wave and a node, and micro-tasks counted by state.
//!
//! These are the state machine's own enums; the wire carries them as protobuf enums and each
//! side converts in one place. [`TaskState::as_str`] and friends give the one spelling users
//! see in tables, JSON and metrics labels.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The life of one micro-task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Hash, PartialOrd, Ord)]
pub enum TaskState {
    /// Waiting for its dependencies.
    Pending,
    /// Dependencies done; waiting for a node.
    Ready,
    /// Sent to a node (possibly queued there).
    Assigned,
    /// The node reported the process started.
    Running,
    Succeeded,
    Failed,
    /// A dependency failed.
    Skipped,
    Cancelled,
}

impl TaskState {
    /// Every state, in the order of a micro-task's life.
    pub const ALL: [TaskState; 8] = [
        TaskState::Pending,
        TaskState::Ready,
        TaskState::Assigned,
        TaskState::Running,
        TaskState::Succeeded,
        TaskState::Failed,
        TaskState::Skipped,
        TaskState::Cancelled,
    ];

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            TaskState::Succeeded | TaskState::Failed | TaskState::Skipped | TaskState::Cancelled
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Pending => "pending",
            TaskState::Ready => "ready",
            TaskState::Assigned => "assigned",
            TaskState::Running => "running",
            TaskState::Succeeded => "succeeded",
            TaskState::Failed => "failed",
            TaskState::Skipped => "skipped",
            TaskState::Cancelled => "cancelled",
        }
    }
}

impl fmt::Display for TaskState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The life of a wave.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum WaveState {
    Pending,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl WaveState {
    /// Every state.
    pub const ALL: [WaveState; 5] = [
        WaveState::Pending,
        WaveState::Running,
        WaveState::Succeeded,
        WaveState::Failed,
        WaveState::Cancelled,
    ];

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            WaveState::Succeeded | WaveState::Failed | WaveState::Cancelled
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            WaveState::Pending => "pending",
            WaveState::Running => "running",
            WaveState::Succeeded => "succeeded",
            WaveState::Failed => "failed",
            WaveState::Cancelled => "cancelled",
        }
    }
}

impl fmt::Display for WaveState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A worker node's standing with the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeState {
    Ready,
    Draining,
    Down,
}

impl NodeState {
    /// Every state.
    pub const ALL: [NodeState; 3] = [NodeState::Ready, NodeState::Draining, NodeState::Down];

    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Ready => "ready",
            NodeState::Draining => "draining",
            NodeState::Down => "down",
        }
    }
}

impl fmt::Display for NodeState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Micro-tasks counted by state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub pending: u64,
    pub ready: u64,
    pub assigned: u64,
    pub running: u64,
    pub succeeded: u64,
    pub failed: u64,
    pub skipped: u64,
    pub cancelled: u64,
}

impl Counts {
    fn slot(&mut self, state: TaskState) -> &mut u64 {
        match state {
            TaskState::Pending => &mut self.pending,
            TaskState::Ready => &mut self.ready,
            TaskState::Assigned => &mut self.assigned,
            TaskState::Running => &mut self.running,
            TaskState::Succeeded => &mut self.succeeded,
            TaskState::Failed => &mut self.failed,
            TaskState::Skipped => &mut self.skipped,
            TaskState::Cancelled => &mut self.cancelled,
        }
    }

    /// How many micro-tasks are in `state`.
    pub fn get(&self, state: TaskState) -> u64 {
        let mut copy = *self;
        *copy.slot(state)
    }

    /// Counts one more micro-task in `state`.
    pub fn add(&mut self, state: TaskState) {
        *self.slot(state) += 1;
    }

    /// One micro-task moved from `from` to `to`.
    pub fn move_one(&mut self, from: TaskState, to: TaskState) {
        let f = self.slot(from);
        *f = f.saturating_sub(1);
        *self.slot(to) += 1;
    }

    /// Micro-tasks that reached a final state.
    pub fn terminal(&self) -> u64 {
        self.succeeded + self.failed + self.skipped + self.cancelled
    }

    /// Every micro-task counted.
    pub fn total(&self) -> u64 {
        TaskState::ALL.iter().map(|&state| self.get(state)).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_follow_moves_between_states() {
        let mut counts = Counts::default();
        counts.add(TaskState::Pending);
        counts.add(TaskState::Pending);
        counts.move_one(TaskState::Pending, TaskState::Ready);
        counts.move_one(TaskState::Ready, TaskState::Succeeded);
        assert_eq!(counts.get(TaskState::Pending), 1);
        assert_eq!(counts.get(TaskState::Ready), 0);
        assert_eq!(counts.succeeded, 1);
        assert_eq!(counts.terminal(), 1);
        assert_eq!(counts.total(), 2);
    }

    #[test]
    fn terminal_states_are_the_final_ones() {
        let terminal: Vec<_> = TaskState::ALL
            .into_iter()
            .filter(|state| state.is_terminal())
            .collect();
        assert_eq!(
            terminal,
            [
                TaskState::Succeeded,
                TaskState::Failed,
                TaskState::Skipped,
                TaskState::Cancelled
            ]
        );
        assert!(WaveState::Cancelled.is_terminal());
        assert!(!WaveState::Running.is_terminal());
    }
}
