//! The scheduler: reads an immutable [`State`] and the leader's inputs, writes a [`Plan`].
//!
//! It holds only business logic — placement, resource fit, per-node throttling and
//! failure detection — and no plumbing: the plan goes through raft as commands and
//! `State::apply` re-checks every placement, so a stale plan can never double-book.
//!
//! The leader appends `Command::Schedule` to every group commit; `State::apply` calls
//! [`schedule`] at that point of the log and applies the plan (re-checking each
//! placement), so every replica reaches the same assignments.
//!
//! Placement: ready micro-tasks are taken in submission order (wave id, then flat index).
//! Each goes to a node that is ready, whose labels match, whose free memory and GPUs fit,
//! and whose window — usable (throttled) slots plus the node's queue depth — still has
//! room. Among those it prefers the node with the most free usable slots, then the
//! highest θ, which spreads load and favours the healthiest machine. A task whose request
//! fits no node is skipped together with the rest of its task this round.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use venom_core::wave::{TaskSpec, WaveSpec};

use crate::state::{MicroKey, Node, NodeState, Placement, State};

/// Inputs of one scheduling round besides the state: the leader's view of its worker
/// connections and its timers. Carried inside `Command::Schedule` so every replica
/// computes the same plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SchedulerConfig {
    /// Nodes whose worker lease the leader let expire (plus the safety margin) on its own
    /// monotonic clock: they are marked down and their attempts go back to ready. The leader
    /// judges leases, not the state machine, because only it knows when it granted them.
    pub lease_expired: BTreeSet<String>,
    /// Upper bound on placements in one plan (bounds the raft entry size).
    pub max_placements: usize,
    /// Nodes with no open stream to this leader: nothing is placed there.
    pub unreachable: BTreeSet<String>,
}

impl SchedulerConfig {
    /// Most placements in one plan.
    pub const MAX_PLACEMENTS: usize = 4_096;
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            lease_expired: BTreeSet::new(),
            max_placements: SchedulerConfig::MAX_PLACEMENTS,
            unreachable: BTreeSet::new(),
        }
    }
}

/// What the scheduler decided in one round.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub placements: Vec<Placement>,
    /// Nodes whose lease expired.
    pub mark_down: Vec<String>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.placements.is_empty() && self.mark_down.is_empty()
    }
}

/// Capacity of one node during a round.
struct Room<'a> {
    node: &'a Node,
    /// Usable (throttled) slots.
    usable: u32,
    /// Cpus in use, including what this round placed.
    used_cpus: u32,
    used_memory_bytes: u64,
    used_gpus: u32,
}

impl Room<'_> {
    fn window(&self) -> u32 {
        if self.usable == 0 {
            0
        } else {
            self.usable.saturating_add(self.node.spec.queue_depth)
        }
    }

    fn fits(&self, task: &TaskSpec) -> bool {
        if self.usable == 0 {
            return false;
        }
        // A task larger than the window still runs alone on an idle node.
        let cpus_fit =
            self.used_cpus + task.cpus <= self.window() || (self.used_cpus == 0 && task.cpus > 0);
        let memory_free = self
            .node
            .spec
            .memory_total_bytes
            .saturating_sub(self.used_memory_bytes);
        cpus_fit
            && task.memory_bytes <= memory_free
            && (task.memory_bytes == 0 || task.memory_bytes <= self.node.memory_available_bytes)
            && self.used_gpus + task.gpus <= self.node.spec.gpus
            && labels_match(&task.labels, &self.node.spec.labels)
    }

    fn free_usable(&self) -> i64 {
        i64::from(self.usable) - i64::from(self.used_cpus)
    }
}

/// Whether a node with `labels` satisfies a task's label constraint.
pub fn labels_match(wanted: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    wanted.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// Whether any registered node could ever run `task` (for submit-time warnings).
pub fn could_ever_run(state: &State, task: &TaskSpec) -> bool {
    state.nodes.values().any(|n| {
        n.state != NodeState::Down
            && task.memory_bytes <= n.spec.memory_total_bytes
            && task.gpus <= n.spec.gpus
            && labels_match(&task.labels, &n.spec.labels)
    })
}

/// One warning per task of `spec` that no registered node could ever run (none when no node
/// is registered yet): the wave is accepted and the task waits for such a node.
pub fn unplaceable_warnings(state: &State, spec: &WaveSpec) -> Vec<String> {
    if state.nodes.is_empty() {
        return Vec::new();
    }
    spec.tasks
        .iter()
        .filter(|t| !could_ever_run(state, t))
        .map(|t| {
            format!(
                "task `{}`: no registered node could ever satisfy its request \
                 (memory {} B, gpus {}, labels {:?}); it waits for one",
                t.id, t.memory_bytes, t.gpus, t.labels
            )
        })
        .collect()
}

/// Computes one scheduling round.
pub fn schedule(state: &State, config: &SchedulerConfig) -> Plan {
    let mut plan = Plan::default();
    for name in &config.lease_expired {
        if state
            .nodes
            .get(name)
            .is_some_and(|node| node.state != NodeState::Down)
        {
            plan.mark_down.push(name.clone());
        }
    }

    let mut rooms: Vec<Room<'_>> = state
        .nodes
        .values()
        .filter(|n| {
            n.state == NodeState::Ready
                && !plan.mark_down.contains(&n.spec.name)
                && !config.unreachable.contains(&n.spec.name)
        })
        .map(|node| Room {
            node,
            usable: node.usable_slots(),
            used_cpus: node.used_cpus,
            used_memory_bytes: node.used_memory_bytes,
            used_gpus: node.used_gpus,
        })
        .collect();
    if rooms.iter().all(|r| r.used_cpus >= r.window()) {
        return plan;
    }

    let mut cursor: Option<MicroKey> = None;
    loop {
        let next = match cursor {
            None => state.ready.iter().next(),
            Some(after) => state
                .ready
                .range((std::ops::Bound::Excluded(after), std::ops::Bound::Unbounded))
                .next(),
        };
        let Some(&key) = next else { break };
        cursor = Some(key);
        let Some(wave) = state.waves.get(&key.0) else {
            continue;
        };
        let Some(task) = wave.tasks.get(key.1 as usize) else {
            continue;
        };
        let spec = &wave.header.spec.tasks[task.group as usize];
        let best = rooms.iter_mut().filter(|r| r.fits(spec)).max_by(|a, b| {
            a.free_usable()
                .cmp(&b.free_usable())
                .then(a.node.theta.total_cmp(&b.node.theta))
                // Deterministic tie-break: the lexicographically smallest name wins.
                .then(b.node.spec.name.cmp(&a.node.spec.name))
        });
        match best {
            Some(room) => {
                room.used_cpus += spec.cpus;
                room.used_memory_bytes += spec.memory_bytes;
                room.used_gpus += spec.gpus;
                plan.placements.push(Placement {
                    key,
                    node: room.node.spec.name.clone(),
                });
                if plan.placements.len() >= config.max_placements
                    || rooms.iter().all(|r| r.used_cpus >= r.window())
                {
                    break;
                }
            }
            None => {
                // Nothing fits this task now; its siblings ask for the same, so skip them.
                let range = wave.header.group_range(task.group);
                cursor = Some((key.0, range.end.saturating_sub(1).max(key.1)));
            }
        }
    }
    plan
}

#[cfg(test)]
#[path = "scheduler_tests.rs"]
mod tests;
