//! The replicated state machine: waves, their micro-tasks and the worker nodes.
//!
//! Every replica applies the same committed [`Command`]s in the same order and so holds
//! the same [`State`]. `apply` is pure: no I/O, no clock (the leader stamps `now_ms` into
//! each command), no randomness. What the leader must do as a consequence (send
//! assignments, cancellations, acknowledgements, new slot limits to a worker) is queued
//! as [`Effect`]s that the raft driver drains; followers drop them.
//!
//! Persistence is incremental: `apply` records which waves, micro-tasks and nodes it
//! touched (the dirty sets) so that the driver writes just those keys, together with the
//! applied index, in one atomic sled batch.
//!
//! Execution is at-least-once and fenced: a dispatch carries an attempt number and only
//! a result for the micro-task's current attempt, from the node it was given to, is
//! recorded. Anything else is a stale result: ignored and counted.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use venom_core::mobius::{self, NodeModelInput, Throttle, ThrottlePolicy};
use venom_core::wave::{OnFailure, WaveLimits, WaveSpec};
// The shared vocabulary the state is made of (one type each, defined in venom-core).
pub use venom_core::{
    AttemptOutcome, AttemptRef, Counts, MicroKey, NodeState, OutcomeKind, TaskState, WaveId,
    WaveState,
};

use crate::scheduler::SchedulerConfig;
pub use crate::submissions::{Submission, Submissions};

/// One micro-task: a task of the wave file, or one element of an array task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MicroTask {
    /// Index of its task in `WaveSpec::tasks`.
    pub group: u32,
    /// Array index, for array tasks.
    pub index: Option<u32>,
    pub state: TaskState,
    /// Current attempt (1 for the first dispatch; 0 before any).
    pub attempt: u32,
    /// Failed attempts so far (a lost node does not count).
    pub failures: u32,
    /// Node of the current (or last) attempt.
    pub node: Option<String>,
    /// Leader time the micro-task became ready (for dispatch latency).
    pub ready_ms: u64,
    /// Why the last attempt failed to start, or why the task was skipped/cancelled.
    pub error: String,
    /// How the latest attempt ended, once it has (its start time as soon as the worker
    /// reports it). Its `error` stays `None`: the text is in `error`.
    pub outcome: AttemptOutcome,
}

impl MicroTask {
    /// Keeps how its latest attempt ended.
    fn record(&mut self, mut outcome: AttemptOutcome) {
        self.error = outcome.error.take().unwrap_or_default();
        self.outcome = outcome;
    }

    fn new(group: u32, index: Option<u32>) -> Self {
        Self {
            group,
            index,
            state: TaskState::Pending,
            attempt: 0,
            failures: 0,
            node: None,
            ready_ms: 0,
            error: String::new(),
            outcome: AttemptOutcome::default(),
        }
    }
}

/// Everything about a wave except its micro-tasks (persisted under one key).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WaveHeader {
    pub id: WaveId,
    pub spec: WaveSpec,
    /// Who submitted it: the name on their certificate ("" when anonymous).
    pub owner: String,
    pub state: WaveState,
    pub traceparent: String,
    pub submitted_ms: u64,
    /// Earliest start of any attempt (worker time), 0 before.
    pub started_ms: u64,
    /// Latest end of any attempt (worker time), 0 before.
    pub finished_ms: u64,
    pub cancel_requested: bool,
    pub counts: Counts,
    /// First flat micro-task index of each task.
    pub group_offsets: Vec<u32>,
    /// Dependencies of each task not yet succeeded.
    pub group_unmet_deps: Vec<u32>,
    /// Micro-tasks of each task not yet succeeded.
    pub group_remaining: Vec<u32>,
    /// Tasks that depend on each task.
    pub group_dependents: Vec<Vec<u32>>,
    /// Σ run time of every attempt of each task.
    pub group_work_ms: Vec<u64>,
    /// Longest single attempt of each task.
    pub group_longest_ms: Vec<u64>,
    /// Σ run time of every attempt.
    pub work_ms: u64,
    /// The Möbius cluster S_Total when the wave finished.
    pub model_s_total: f64,
}

impl WaveHeader {
    /// Measured speed-up: Σ run time / makespan.
    pub fn measured_speedup(&self) -> f64 {
        let makespan = self.makespan_ms();
        if makespan == 0 {
            0.0
        } else {
            self.work_ms as f64 / makespan as f64
        }
    }

    /// First start to last end (worker time); 0 while no attempt has started.
    pub fn makespan_ms(&self) -> u64 {
        if self.started_ms == 0 {
            0
        } else {
            self.finished_ms.saturating_sub(self.started_ms)
        }
    }

    /// DAG bound from the measured run times: total work / critical-path work.
    pub fn dag_bound(&self) -> f64 {
        let (work, span) = self
            .spec
            .work_and_span(&self.group_work_ms, &self.group_longest_ms);
        if span == 0 {
            0.0
        } else {
            work as f64 / span as f64
        }
    }

    /// Flat micro-task range of task `group`.
    pub fn group_range(&self, group: u32) -> std::ops::Range<u32> {
        let start = self.group_offsets[group as usize];
        let end = self
            .group_offsets
            .get(group as usize + 1)
            .copied()
            .unwrap_or_else(|| start + self.spec.tasks[group as usize].n_micro_tasks());
        start..end
    }
}

/// A wave and its micro-tasks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Wave {
    pub header: WaveHeader,
    pub tasks: Vec<MicroTask>,
}

/// What a node told the coordinator about itself when it registered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeSpec {
    pub name: String,
    pub slots: u32,
    pub labels: BTreeMap<String, String>,
    pub policy: ThrottlePolicy,
    pub physical_cores: u32,
    pub logical_cores: u32,
    pub memory_total_bytes: u64,
    pub gpus: u32,
    /// Micro-tasks to keep queued on the node beyond its usable slots.
    pub queue_depth: u32,
    /// The full hardware profile, wire-encoded (for display only).
    pub profile: Vec<u8>,
}

/// Why a micro-task named by task id and array index is not in a wave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MicroLookupError {
    /// No task has this id.
    NoSuchTask,
    /// The task is an array of `n` and the index is not below `n`.
    IndexOutOfRange { index: u32, n: u32 },
    /// The task is an array and no index was given.
    IndexMissing,
}

impl Wave {
    /// The flat index of micro-task `task_id[index]` (`index` is ignored for a task that
    /// is not an array).
    pub fn micro_named(&self, task_id: &str, index: Option<u32>) -> Result<u32, MicroLookupError> {
        let group = self
            .header
            .spec
            .tasks
            .iter()
            .position(|t| t.id == task_id)
            .ok_or(MicroLookupError::NoSuchTask)?;
        let range = self.header.group_range(group as u32);
        match (self.header.spec.tasks[group].array, index) {
            (Some(n), Some(i)) if i < n => Ok(range.start + i),
            (Some(n), Some(i)) => Err(MicroLookupError::IndexOutOfRange { index: i, n }),
            (Some(_), None) => Err(MicroLookupError::IndexMissing),
            (None, Some(_)) | (None, None) => Ok(range.start),
        }
    }
}

/// A worker node as the state machine sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Node {
    pub spec: NodeSpec,
    pub state: NodeState,
    pub draining: bool,
    pub theta: f64,
    pub h_cpu: f64,
    pub h_mem: f64,
    pub h_term: f64,
    pub memory_available_bytes: u64,
    pub throttle: Throttle,
    pub last_heartbeat_ms: u64,
    /// Micro-tasks assigned to or running on this node (derived, rebuilt on load).
    #[serde(skip)]
    pub active: BTreeSet<MicroKey>,
    /// Σ cpus of `active` (derived).
    #[serde(skip)]
    pub used_cpus: u32,
    /// Σ memory of `active` (derived).
    #[serde(skip)]
    pub used_memory_bytes: u64,
    /// Σ gpus of `active` (derived).
    #[serde(skip)]
    pub used_gpus: u32,
}

impl Node {
    /// Slots the node may fill at once now: its slots throttled by θ and policy.
    pub fn usable_slots(&self) -> u32 {
        match self.state {
            NodeState::Ready => self
                .throttle
                .usable_slots(self.spec.slots, self.spec.policy),
            NodeState::Draining | NodeState::Down => 0,
        }
    }

    pub fn model_input(&self) -> NodeModelInput {
        NodeModelInput {
            physical_cores: self.spec.physical_cores.max(1),
            logical_cores: self.spec.logical_cores.max(1),
            memory_gib: self.spec.memory_total_bytes as f64 / (1u64 << 30) as f64,
            gpus: self.spec.gpus,
            theta: self.theta,
        }
    }
}

/// A finished attempt as the state machine records it: which attempt, the node that reported
/// it, and how it ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttemptResult {
    pub attempt: AttemptRef,
    pub node: String,
    pub outcome: AttemptOutcome,
}

/// A node's periodic health report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeartbeatReport {
    pub node: String,
    /// The worker's number for the message that carried it: committed, it renews the
    /// worker's lease from when the worker sent it (`Effect::Lease`).
    pub seq: u64,
    pub theta: f64,
    pub h_cpu: f64,
    pub h_mem: f64,
    pub h_term: f64,
    pub memory_available_bytes: u64,
}

/// A scheduling decision: run `key` on `node`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    pub key: MicroKey,
    pub node: String,
}

/// Everything that can change the state; the only input of `apply`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Command {
    SubmitWave {
        /// Who submitted it: the name on their certificate ("" when anonymous).
        owner: String,
        spec: WaveSpec,
        traceparent: String,
        /// The client's id for this submission: a remembered one (same owner) answers the
        /// wave it created and creates nothing. Empty: not idempotent.
        submission_id: String,
        now_ms: u64,
    },
    CancelWave {
        wave_id: WaveId,
        now_ms: u64,
    },
    /// A worker (re)connected. `running` are the attempts it still runs.
    RegisterNode {
        spec: NodeSpec,
        running: Vec<AttemptRef>,
        /// The registration's message number (the first lease of the stream).
        seq: u64,
        now_ms: u64,
    },
    Heartbeats {
        reports: Vec<HeartbeatReport>,
        now_ms: u64,
    },
    Started {
        node: String,
        attempts: Vec<(AttemptRef, u64)>,
    },
    Finished {
        results: Vec<AttemptResult>,
        now_ms: u64,
    },
    Drain {
        node: String,
        drain: bool,
    },
    /// Run the scheduler on the state as it is at this point of the log and apply its
    /// plan. The leader appends this to every group commit, so a result and the
    /// dispatch of the work it unblocked share one raft entry (and one fsync). Every
    /// replica computes the same plan: the scheduler is pure and all its inputs are here.
    Schedule {
        now_ms: u64,
        config: SchedulerConfig,
    },
    /// Group commit: several commands in one raft entry, applied in order.
    Batch(Vec<Command>),
    /// The cluster's identity, proposed by its first leader; later ones change nothing.
    SetClusterId {
        cluster_id: u64,
    },
    /// These members have made this cluster's log durable past its founding point (the
    /// leader proposes it when it first sees one acknowledge such an entry).
    MembersStarted {
        ids: Vec<u64>,
    },
}

impl Command {
    /// Everything one worker message reports, as one command (so one proposal): the
    /// attempts it started, those it finished and its health. An attempt that started and
    /// finished since the worker's last message needs no `Started`; starts apply before
    /// results, results before the heartbeat.
    pub fn worker_report(
        node: &str,
        started: Vec<(AttemptRef, u64)>,
        results: Vec<AttemptResult>,
        heartbeat: Option<HeartbeatReport>,
        now_ms: u64,
    ) -> Option<Command> {
        let finished: BTreeSet<AttemptRef> = results.iter().map(|r| r.attempt).collect();
        let started: Vec<_> = started
            .into_iter()
            .filter(|(attempt, _)| !finished.contains(attempt))
            .collect();
        let mut commands = Vec::new();
        if !started.is_empty() {
            commands.push(Command::Started {
                node: node.to_string(),
                attempts: started,
            });
        }
        if !results.is_empty() {
            commands.push(Command::Finished { results, now_ms });
        }
        if let Some(report) = heartbeat {
            commands.push(Command::Heartbeats {
                reports: vec![report],
                now_ms,
            });
        }
        match commands.len() {
            0 => None,
            1 => commands.pop(),
            _ => Some(Command::Batch(commands)),
        }
    }

    /// A worker (re)registering: the results it kept while cut off first, then the
    /// registration, so a kept result is recorded before its absence from `running` could
    /// mark it lost.
    pub fn register(
        spec: NodeSpec,
        running: Vec<AttemptRef>,
        unacknowledged: Vec<AttemptResult>,
        seq: u64,
        now_ms: u64,
    ) -> Command {
        let register = Command::RegisterNode {
            spec,
            running,
            seq,
            now_ms,
        };
        if unacknowledged.is_empty() {
            Command::Batch(vec![register])
        } else {
            Command::Batch(vec![
                Command::Finished {
                    results: unacknowledged,
                    now_ms,
                },
                register,
            ])
        }
    }
}

/// What applying one command produced, for the proposer.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Done,
    WaveSubmitted { wave_id: WaveId, n_micro_tasks: u64 },
    WaveCancelled { n_cancelled: u64 },
    Rejected(String),
    Batch(Vec<Outcome>),
}

/// Something the leader must tell a worker.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    Dispatch {
        node: String,
        attempts: Vec<AttemptRef>,
    },
    Cancel {
        node: String,
        attempts: Vec<AttemptRef>,
    },
    Ack {
        node: String,
        attempts: Vec<AttemptRef>,
    },
    SlotsLimit {
        node: String,
        slots: u32,
    },
    /// The node's message `seq` is committed: its lease runs from when it sent it.
    Lease {
        node: String,
        seq: u64,
    },
}

/// Keys `apply` touched since the driver last persisted.
#[derive(Debug, Default)]
pub struct Dirty {
    pub waves: BTreeSet<WaveId>,
    pub tasks: BTreeSet<MicroKey>,
    pub nodes: BTreeSet<String>,
    /// The raft membership changed.
    pub members: bool,
    /// Remembered submissions added or forgotten, by the wave they created.
    pub submissions: BTreeSet<WaveId>,
}

/// The whole replicated state.
#[derive(Debug, Default)]
pub struct State {
    /// Raft members (coordinator id → client address). Changed only by raft conf-change
    /// entries, so every replica's membership at an index is part of its state there:
    /// checkpoints, snapshots and restarts carry it with everything else.
    pub members: BTreeMap<u64, String>,
    /// Random identity of this cluster, set once by its first leader (0 until then). Raft
    /// batches carry it, so a coordinator never takes messages meant for another cluster.
    pub cluster_id: u64,
    /// Members that have acknowledged entries of this cluster's log: one of them found
    /// with an empty data dir lost its data, and must not found the cluster again.
    pub members_started: BTreeSet<u64>,
    pub waves: BTreeMap<WaveId, Wave>,
    pub nodes: BTreeMap<String, Node>,
    pub next_wave_id: WaveId,
    /// Results ignored because they named a stale attempt.
    pub stale_results: u64,
    /// Recent submission ids and the waves they created (bounded; see `submissions.rs`).
    pub submissions: Submissions,
    /// Ready micro-tasks in dispatch order (derived).
    pub ready: BTreeSet<MicroKey>,
    pub limits: WaveLimitsState,
    pub dirty: Dirty,
    pub effects: Vec<Effect>,
    /// What applying measured, for the leader's metrics (drained after every apply).
    pub observations: Vec<Observation>,
}

/// A measurement made while applying a command (times from the commands themselves).
#[derive(Debug, Clone, PartialEq)]
pub enum Observation {
    /// An attempt's process started `dispatch_ms` after its micro-task became ready.
    Started { dispatch_ms: u64 },
    /// An attempt finished, `end_to_end_ms` after its micro-task became ready.
    AttemptFinished {
        outcome: OutcomeKind,
        end_to_end_ms: u64,
    },
    /// A wave reached a final state `duration_ms` after it was submitted.
    WaveFinished { state: WaveState, duration_ms: u64 },
    /// A node registered (`from` is `None` the first time), came back, was marked down or
    /// started or stopped draining.
    NodeState {
        node: String,
        from: Option<NodeState>,
        to: NodeState,
    },
}

/// Limits the state machine enforces on apply (set from configuration, same on every replica).
#[derive(Debug, Clone, Default)]
pub struct WaveLimitsState(pub WaveLimits);

/// The whole replicated state at one applied index, as shipped to a follower that fell
/// behind the leader's compacted log. Derived indexes are not included: the receiver
/// rebuilds them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StateSnapshot {
    pub members: BTreeMap<u64, String>,
    pub cluster_id: u64,
    pub members_started: BTreeSet<u64>,
    pub waves: Vec<Wave>,
    pub nodes: Vec<Node>,
    pub next_wave_id: WaveId,
    pub stale_results: u64,
    /// Remembered submissions, oldest first.
    pub submissions: Vec<Submission>,
}

impl State {
    pub fn new(limits: WaveLimits) -> Self {
        Self {
            next_wave_id: 1,
            limits: WaveLimitsState(limits),
            ..Self::default()
        }
    }

    /// Rebuilds the derived indexes (ready queue, node usage) after loading from disk.
    pub fn rebuild_indexes(&mut self) {
        self.ready.clear();
        for node in self.nodes.values_mut() {
            node.active.clear();
            node.used_cpus = 0;
            node.used_memory_bytes = 0;
            node.used_gpus = 0;
        }
        for wave in self.waves.values() {
            for (micro, task) in wave.tasks.iter().enumerate() {
                let key = (wave.header.id, micro as u32);
                match task.state {
                    TaskState::Ready => {
                        self.ready.insert(key);
                    }
                    TaskState::Assigned | TaskState::Running => {
                        if let Some(node) = task.node.as_ref().and_then(|n| self.nodes.get_mut(n)) {
                            let spec = &wave.header.spec.tasks[task.group as usize];
                            node.active.insert(key);
                            node.used_cpus += spec.cpus;
                            node.used_memory_bytes += spec.memory_bytes;
                            node.used_gpus += spec.gpus;
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    /// Moves the replicated part of the state into a snapshot (limits, dirty sets and
    /// pending effects stay behind).
    pub fn into_snapshot(self) -> StateSnapshot {
        StateSnapshot {
            members: self.members,
            cluster_id: self.cluster_id,
            members_started: self.members_started,
            waves: self.waves.into_values().collect(),
            nodes: self.nodes.into_values().collect(),
            next_wave_id: self.next_wave_id,
            stale_results: self.stale_results,
            submissions: self.submissions.iter().cloned().collect(),
        }
    }

    /// Replaces everything replicated with `snapshot`, keeping this replica's limits.
    /// Pending effects are dropped (they belonged to entries the snapshot supersedes) and
    /// every key is marked dirty, so the next checkpoint rewrites the whole state.
    pub fn restore(&mut self, snapshot: StateSnapshot) {
        self.members = snapshot.members;
        self.cluster_id = snapshot.cluster_id;
        self.members_started = snapshot.members_started;
        self.waves = snapshot
            .waves
            .into_iter()
            .map(|wave| (wave.header.id, wave))
            .collect();
        self.nodes = snapshot
            .nodes
            .into_iter()
            .map(|node| (node.spec.name.clone(), node))
            .collect();
        self.next_wave_id = snapshot.next_wave_id.max(1);
        self.stale_results = snapshot.stale_results;
        self.submissions.restore(snapshot.submissions);
        self.effects.clear();
        self.mark_all_dirty();
        self.rebuild_indexes();
    }

    /// Marks every wave, micro-task and node dirty (a full checkpoint follows).
    pub fn mark_all_dirty(&mut self) {
        self.dirty = Dirty::default();
        for wave in self.waves.values() {
            self.dirty.waves.insert(wave.header.id);
            for micro in 0..wave.tasks.len() {
                self.dirty.tasks.insert((wave.header.id, micro as u32));
            }
        }
        self.dirty.nodes.extend(self.nodes.keys().cloned());
        self.dirty.members = true;
        self.dirty
            .submissions
            .extend(self.submissions.iter().map(|s| s.wave_id));
    }

    /// A committed raft conf change: `address` `Some` adds (or re-addresses) member `id`,
    /// `None` removes it.
    pub fn change_member(&mut self, id: u64, address: Option<String>) {
        match address {
            Some(address) => {
                self.members.insert(id, address);
            }
            None => {
                self.members.remove(&id);
                // Added back later, it starts from an empty data dir with --join.
                self.members_started.remove(&id);
            }
        }
        self.dirty.members = true;
    }

    pub fn task(&self, key: MicroKey) -> Option<&MicroTask> {
        self.waves.get(&key.0)?.tasks.get(key.1 as usize)
    }

    /// Applies one committed command.
    pub fn apply(&mut self, command: Command) -> Outcome {
        match command {
            Command::SubmitWave {
                owner,
                spec,
                traceparent,
                submission_id,
                now_ms,
            } => self.on_submit(owner, spec, traceparent, submission_id, now_ms),
            Command::CancelWave { wave_id, now_ms } => self.on_cancel(wave_id, now_ms),
            Command::RegisterNode {
                spec,
                running,
                seq,
                now_ms,
            } => self.on_register(spec, running, seq, now_ms),
            Command::Heartbeats { reports, now_ms } => {
                for report in reports {
                    self.on_heartbeat(report, now_ms);
                }
                Outcome::Done
            }
            Command::Started { node, attempts } => {
                for (attempt, started_ms) in attempts {
                    self.on_started(&node, attempt, started_ms);
                }
                Outcome::Done
            }
            Command::Finished { results, now_ms } => {
                let mut acks: BTreeMap<String, Vec<AttemptRef>> = BTreeMap::new();
                for result in results {
                    acks.entry(result.node.clone())
                        .or_default()
                        .push(result.attempt);
                    self.on_finished(result, now_ms);
                }
                for (node, attempts) in acks {
                    self.effects.push(Effect::Ack { node, attempts });
                }
                Outcome::Done
            }
            Command::Drain { node, drain } => self.on_drain(&node, drain),
            Command::SetClusterId { cluster_id } => {
                if self.cluster_id == 0 && cluster_id != 0 {
                    self.cluster_id = cluster_id;
                    self.dirty.members = true;
                }
                Outcome::Done
            }
            Command::MembersStarted { ids } => {
                for id in ids {
                    if self.members.contains_key(&id) && self.members_started.insert(id) {
                        self.dirty.members = true;
                    }
                }
                Outcome::Done
            }
            Command::Schedule { now_ms, config } => {
                let plan = crate::scheduler::schedule(self, &config);
                for node in plan.mark_down {
                    self.on_mark_down(&node, now_ms);
                }
                if !plan.placements.is_empty() {
                    self.on_assign(plan.placements, now_ms);
                }
                Outcome::Done
            }
            Command::Batch(commands) => {
                Outcome::Batch(commands.into_iter().map(|c| self.apply(c)).collect())
            }
        }
    }

    /// A submit: answers the wave a remembered `submission_id` of the same owner created,
    /// else validates and creates the wave (remembering the id, when there is one).
    fn on_submit(
        &mut self,
        owner: String,
        spec: WaveSpec,
        traceparent: String,
        submission_id: String,
        now_ms: u64,
    ) -> Outcome {
        let forgotten = self.submissions.expire(now_ms);
        self.dirty.submissions.extend(forgotten);
        let known = match submission_id.as_str() {
            "" => None,
            id => self.submissions.find(&owner, id),
        };
        if let Some(known) = known {
            return Outcome::WaveSubmitted {
                wave_id: known.wave_id,
                n_micro_tasks: known.n_micro_tasks,
            };
        }
        if let Err(error) = spec.validate(&self.limits.0) {
            return Outcome::Rejected(error.to_string());
        }
        let id = self.next_wave_id;
        self.next_wave_id += 1;
        let n_groups = spec.tasks.len();
        let mut group_offsets = Vec::with_capacity(n_groups);
        let mut group_dependents = vec![Vec::new(); n_groups];
        let mut tasks = Vec::with_capacity(usize::try_from(spec.n_micro_tasks()).unwrap_or(0));
        for (g, task) in spec.tasks.iter().enumerate() {
            group_offsets.push(tasks.len() as u32);
            for &dep in &task.deps {
                group_dependents[dep].push(g as u32);
            }
            match task.array {
                Some(n) => tasks.extend((0..n).map(|i| MicroTask::new(g as u32, Some(i)))),
                None => tasks.push(MicroTask::new(g as u32, None)),
            }
        }
        let group_unmet_deps = spec.tasks.iter().map(|t| t.deps.len() as u32).collect();
        let group_remaining = spec.tasks.iter().map(|t| t.n_micro_tasks()).collect();
        let counts = Counts {
            pending: tasks.len() as u64,
            ..Counts::default()
        };
        let n_micro_tasks = tasks.len() as u64;
        if !submission_id.is_empty() {
            let changed = self.submissions.insert(Submission {
                owner: owner.clone(),
                id: submission_id,
                wave_id: id,
                n_micro_tasks,
                submitted_ms: now_ms,
            });
            self.dirty.submissions.extend(changed);
        }
        let header = WaveHeader {
            id,
            spec,
            owner,
            state: WaveState::Pending,
            traceparent,
            submitted_ms: now_ms,
            started_ms: 0,
            finished_ms: 0,
            cancel_requested: false,
            counts,
            group_offsets,
            group_unmet_deps,
            group_remaining,
            group_dependents,
            group_work_ms: vec![0; n_groups],
            group_longest_ms: vec![0; n_groups],
            work_ms: 0,
            model_s_total: 0.0,
        };
        self.waves.insert(id, Wave { header, tasks });
        self.dirty.waves.insert(id);
        // Every micro-task is new: persist them all.
        for micro in 0..n_micro_tasks as u32 {
            self.dirty.tasks.insert((id, micro));
        }
        for g in 0..n_groups as u32 {
            if self.waves[&id].header.group_unmet_deps[g as usize] == 0 {
                self.make_group_ready(id, g, now_ms);
            }
        }
        Outcome::WaveSubmitted {
            wave_id: id,
            n_micro_tasks,
        }
    }

    fn make_group_ready(&mut self, wave_id: WaveId, group: u32, now_ms: u64) {
        let Some(wave) = self.waves.get_mut(&wave_id) else {
            return;
        };
        for micro in wave.header.group_range(group) {
            let task = &mut wave.tasks[micro as usize];
            if task.state == TaskState::Pending {
                task.state = TaskState::Ready;
                task.ready_ms = now_ms;
                wave.header
                    .counts
                    .move_one(TaskState::Pending, TaskState::Ready);
                self.ready.insert((wave_id, micro));
                self.dirty.tasks.insert((wave_id, micro));
            }
        }
        self.dirty.waves.insert(wave_id);
    }

    fn on_cancel(&mut self, wave_id: WaveId, now_ms: u64) -> Outcome {
        let Some(wave) = self.waves.get_mut(&wave_id) else {
            return Outcome::Rejected(format!("wave {wave_id} not found"));
        };
        if wave.header.state.is_terminal() {
            return Outcome::WaveCancelled { n_cancelled: 0 };
        }
        wave.header.cancel_requested = true;
        let n_cancelled = self.cancel_open_tasks(wave_id, "wave cancelled");
        self.maybe_finish_wave(wave_id, now_ms);
        Outcome::WaveCancelled { n_cancelled }
    }

    /// Moves every non-terminal micro-task of the wave to `Cancelled`, telling nodes to kill
    /// what they run. Returns how many were cancelled.
    fn cancel_open_tasks(&mut self, wave_id: WaveId, reason: &str) -> u64 {
        let Some(wave) = self.waves.get_mut(&wave_id) else {
            return 0;
        };
        let mut kills: BTreeMap<String, Vec<AttemptRef>> = BTreeMap::new();
        let mut n = 0;
        for (micro, task) in wave.tasks.iter_mut().enumerate() {
            if task.state.is_terminal() {
                continue;
            }
            let key = (wave_id, micro as u32);
            let from = task.state;
            if matches!(from, TaskState::Assigned | TaskState::Running) {
                if let Some(node) = task.node.clone() {
                    kills.entry(node).or_default().push(AttemptRef {
                        wave_id,
                        micro: micro as u32,
                        attempt: task.attempt,
                    });
                }
            }
            task.state = TaskState::Cancelled;
            task.error = reason.to_string();
            wave.header.counts.move_one(from, TaskState::Cancelled);
            self.ready.remove(&key);
            self.dirty.tasks.insert(key);
            n += 1;
        }
        self.dirty.waves.insert(wave_id);
        for (node_name, attempts) in kills {
            if let Some(node) = self.nodes.get_mut(&node_name) {
                for a in &attempts {
                    release(node, &wave.header.spec, &wave.tasks, (a.wave_id, a.micro));
                }
            }
            self.effects.push(Effect::Cancel {
                node: node_name,
                attempts,
            });
        }
        n
    }

    fn on_register(
        &mut self,
        spec: NodeSpec,
        running: Vec<AttemptRef>,
        seq: u64,
        now_ms: u64,
    ) -> Outcome {
        let name = spec.name.clone();
        let before = self.nodes.get(&name).map(|n| n.state);
        let node = self.nodes.entry(name.clone()).or_insert_with(|| Node {
            spec: spec.clone(),
            state: NodeState::Ready,
            draining: false,
            theta: 1.0,
            h_cpu: 1.0,
            h_mem: 1.0,
            h_term: 1.0,
            memory_available_bytes: spec.memory_total_bytes,
            throttle: Throttle::new(1.0),
            last_heartbeat_ms: now_ms,
            active: BTreeSet::new(),
            used_cpus: 0,
            used_memory_bytes: 0,
            used_gpus: 0,
        });
        node.spec = spec;
        node.state = if node.draining {
            NodeState::Draining
        } else {
            NodeState::Ready
        };
        node.last_heartbeat_ms = now_ms;
        if before != Some(node.state) {
            self.observations.push(Observation::NodeState {
                node: name.clone(),
                from: before,
                to: node.state,
            });
        }
        self.dirty.nodes.insert(name.clone());

        // Reconcile: what we think runs there against what the node says runs there.
        let claimed: BTreeSet<AttemptRef> = running.iter().copied().collect();
        let ours: Vec<MicroKey> = node.active.iter().copied().collect();
        let mut lost = Vec::new();
        for key in ours {
            let Some(task) = self.task(key) else { continue };
            let current = AttemptRef {
                wave_id: key.0,
                micro: key.1,
                attempt: task.attempt,
            };
            if !claimed.contains(&current) {
                lost.push(key);
            }
        }
        for key in lost {
            self.return_to_ready(key, now_ms, "node restarted without it");
        }
        let mut stale = Vec::new();
        for attempt in running {
            let current = self
                .task((attempt.wave_id, attempt.micro))
                .is_some_and(|t| {
                    t.attempt == attempt.attempt
                        && t.node.as_deref() == Some(name.as_str())
                        && matches!(t.state, TaskState::Assigned | TaskState::Running)
                });
            if !current {
                stale.push(attempt);
            }
        }
        if !stale.is_empty() {
            self.effects.push(Effect::Cancel {
                node: name.clone(),
                attempts: stale,
            });
        }
        let slots = self.nodes[&name].usable_slots();
        self.effects.push(Effect::Lease {
            node: name.clone(),
            seq,
        });
        self.effects.push(Effect::SlotsLimit { node: name, slots });
        Outcome::Done
    }

    fn on_heartbeat(&mut self, report: HeartbeatReport, now_ms: u64) {
        let Some(node) = self.nodes.get_mut(&report.node) else {
            return;
        };
        let before = node.usable_slots();
        node.theta = report.theta;
        node.h_cpu = report.h_cpu;
        node.h_mem = report.h_mem;
        node.h_term = report.h_term;
        node.memory_available_bytes = report.memory_available_bytes;
        node.last_heartbeat_ms = now_ms;
        node.throttle.observe(report.theta, node.spec.policy);
        let after = node.usable_slots();
        self.dirty.nodes.insert(report.node.clone());
        // A node marked down stays down (no new work, no lease) until it registers again:
        // without a lease its worker kills what it still runs and reconnects.
        if node.state != NodeState::Down {
            self.effects.push(Effect::Lease {
                node: report.node.clone(),
                seq: report.seq,
            });
        }
        if after != before {
            self.effects.push(Effect::SlotsLimit {
                node: report.node,
                slots: after,
            });
        }
    }

    fn on_assign(&mut self, placements: Vec<Placement>, now_ms: u64) -> Outcome {
        let mut dispatch: BTreeMap<String, Vec<AttemptRef>> = BTreeMap::new();
        for Placement {
            key,
            node: node_name,
        } in placements
        {
            let Some(node) = self.nodes.get_mut(&node_name) else {
                continue;
            };
            if node.state != NodeState::Ready {
                continue;
            }
            let Some(wave) = self.waves.get_mut(&key.0) else {
                continue;
            };
            let Some(task) = wave.tasks.get_mut(key.1 as usize) else {
                continue;
            };
            if task.state != TaskState::Ready || wave.header.cancel_requested {
                continue;
            }
            task.state = TaskState::Assigned;
            task.attempt += 1;
            task.node = Some(node_name.clone());
            let attempt = task.attempt;
            wave.header
                .counts
                .move_one(TaskState::Ready, TaskState::Assigned);
            if wave.header.state == WaveState::Pending {
                wave.header.state = WaveState::Running;
            }
            let spec = &wave.header.spec.tasks[task.group as usize];
            node.active.insert(key);
            node.used_cpus += spec.cpus;
            node.used_memory_bytes += spec.memory_bytes;
            node.used_gpus += spec.gpus;
            self.ready.remove(&key);
            self.dirty.tasks.insert(key);
            self.dirty.waves.insert(key.0);
            dispatch
                .entry(node_name)
                .or_default()
                .push(AttemptRef::new(key, attempt));
        }
        let _ = now_ms;
        for (node, attempts) in dispatch {
            self.effects.push(Effect::Dispatch { node, attempts });
        }
        Outcome::Done
    }

    fn on_started(&mut self, node: &str, attempt: AttemptRef, started_ms: u64) {
        let key = (attempt.wave_id, attempt.micro);
        let Some(wave) = self.waves.get_mut(&key.0) else {
            return;
        };
        let Some(task) = wave.tasks.get_mut(key.1 as usize) else {
            return;
        };
        if task.attempt != attempt.attempt
            || task.node.as_deref() != Some(node)
            || task.state != TaskState::Assigned
        {
            return;
        }
        task.state = TaskState::Running;
        task.outcome.started_ms = started_ms;
        self.observations.push(Observation::Started {
            dispatch_ms: started_ms.saturating_sub(task.ready_ms),
        });
        wave.header
            .counts
            .move_one(TaskState::Assigned, TaskState::Running);
        if wave.header.started_ms == 0 || started_ms < wave.header.started_ms {
            wave.header.started_ms = started_ms;
        }
        self.dirty.tasks.insert(key);
        self.dirty.waves.insert(key.0);
    }

    fn on_finished(&mut self, result: AttemptResult, now_ms: u64) {
        let key = (result.attempt.wave_id, result.attempt.micro);
        let current = self.task(key).is_some_and(|t| {
            t.attempt == result.attempt.attempt
                && t.node.as_deref() == Some(result.node.as_str())
                && matches!(t.state, TaskState::Assigned | TaskState::Running)
        });
        if !current {
            self.stale_results += 1;
            return;
        }
        let Some(wave) = self.waves.get_mut(&key.0) else {
            return;
        };
        if let Some(node) = self.nodes.get_mut(&result.node) {
            release(node, &wave.header.spec, &wave.tasks, key);
        }
        let task = &mut wave.tasks[key.1 as usize];
        let group = task.group;
        let from = task.state;
        let retries = wave.header.spec.tasks[group as usize].retries;
        let outcome = result.outcome;
        let run_ms = outcome.run_ms();
        if outcome.started_ms > 0 {
            // Times come from workers: absurd ones must not overflow (or differ by build).
            wave.header.work_ms = wave.header.work_ms.saturating_add(run_ms);
            let group_work = &mut wave.header.group_work_ms[group as usize];
            *group_work = group_work.saturating_add(run_ms);
            let longest = &mut wave.header.group_longest_ms[group as usize];
            *longest = (*longest).max(run_ms);
            if wave.header.started_ms == 0 || outcome.started_ms < wave.header.started_ms {
                wave.header.started_ms = outcome.started_ms;
            }
        }
        wave.header.finished_ms = wave.header.finished_ms.max(outcome.finished_ms);
        let succeeded = outcome.succeeded();
        if from == TaskState::Assigned && outcome.started_ms > 0 {
            // Its start was reported together with its end.
            self.observations.push(Observation::Started {
                dispatch_ms: outcome.started_ms.saturating_sub(task.ready_ms),
            });
        }
        self.observations.push(Observation::AttemptFinished {
            outcome: outcome.kind(),
            end_to_end_ms: outcome.finished_ms.saturating_sub(task.ready_ms),
        });
        let cancelled = outcome.cancelled;
        task.record(outcome);
        self.dirty.tasks.insert(key);
        self.dirty.waves.insert(key.0);
        let mut newly_ready = Vec::new();
        let mut failed_for_good = false;
        if succeeded {
            task.state = TaskState::Succeeded;
            wave.header.counts.move_one(from, TaskState::Succeeded);
            let remaining = &mut wave.header.group_remaining[group as usize];
            *remaining = remaining.saturating_sub(1);
            if *remaining == 0 {
                for &d in &wave.header.group_dependents[group as usize] {
                    let unmet = &mut wave.header.group_unmet_deps[d as usize];
                    *unmet = unmet.saturating_sub(1);
                    if *unmet == 0 {
                        newly_ready.push(d);
                    }
                }
            }
        } else if cancelled && wave.header.cancel_requested {
            task.state = TaskState::Cancelled;
            wave.header.counts.move_one(from, TaskState::Cancelled);
        } else if task.failures < retries {
            task.failures += 1;
            task.state = TaskState::Ready;
            task.ready_ms = now_ms;
            wave.header.counts.move_one(from, TaskState::Ready);
            self.ready.insert(key);
        } else {
            task.failures += 1;
            task.state = TaskState::Failed;
            wave.header.counts.move_one(from, TaskState::Failed);
            failed_for_good = true;
        }
        let on_failure = wave.header.spec.on_failure;
        for d in newly_ready {
            self.make_group_ready(key.0, d, now_ms);
        }
        if failed_for_good {
            match on_failure {
                OnFailure::SkipDependents => self.skip_dependents(key.0, group),
                OnFailure::FailWave => {
                    self.cancel_open_tasks(key.0, "another task failed (on_failure = fail-wave)");
                }
            }
        }
        self.maybe_finish_wave(key.0, now_ms);
    }

    /// Skips every micro-task of every task that (transitively) depends on `group`.
    fn skip_dependents(&mut self, wave_id: WaveId, group: u32) {
        let Some(wave) = self.waves.get_mut(&wave_id) else {
            return;
        };
        let failed_id = wave.header.spec.tasks[group as usize].id.clone();
        let mut stack = wave.header.group_dependents[group as usize].clone();
        let mut seen = BTreeSet::new();
        while let Some(g) = stack.pop() {
            if !seen.insert(g) {
                continue;
            }
            stack.extend(wave.header.group_dependents[g as usize].iter().copied());
            for micro in wave.header.group_range(g) {
                let task = &mut wave.tasks[micro as usize];
                if task.state.is_terminal() {
                    continue;
                }
                let from = task.state;
                task.state = TaskState::Skipped;
                task.error = format!("dependency `{failed_id}` failed");
                wave.header.counts.move_one(from, TaskState::Skipped);
                self.ready.remove(&(wave_id, micro));
                self.dirty.tasks.insert((wave_id, micro));
            }
        }
    }

    fn maybe_finish_wave(&mut self, wave_id: WaveId, now_ms: u64) {
        let model = self.cluster_s_total();
        let Some(wave) = self.waves.get_mut(&wave_id) else {
            return;
        };
        let h = &mut wave.header;
        if h.state.is_terminal() || h.counts.terminal() < wave.tasks.len() as u64 {
            return;
        }
        h.state = if h.cancel_requested {
            WaveState::Cancelled
        } else if h.counts.succeeded == wave.tasks.len() as u64 {
            WaveState::Succeeded
        } else {
            WaveState::Failed
        };
        if h.finished_ms == 0 {
            h.finished_ms = now_ms;
        }
        h.model_s_total = model;
        self.observations.push(Observation::WaveFinished {
            state: h.state,
            duration_ms: h.finished_ms.saturating_sub(h.submitted_ms),
        });
        self.dirty.waves.insert(wave_id);
    }

    /// Sends a micro-task whose node was lost back to ready; the next dispatch is a new
    /// attempt. This does not consume a retry.
    fn return_to_ready(&mut self, key: MicroKey, now_ms: u64, reason: &str) {
        let Some(wave) = self.waves.get_mut(&key.0) else {
            return;
        };
        let Some(task) = wave.tasks.get(key.1 as usize) else {
            return;
        };
        if !matches!(task.state, TaskState::Assigned | TaskState::Running) {
            return;
        }
        if let Some(node) = task.node.as_ref().and_then(|n| self.nodes.get_mut(n)) {
            release(node, &wave.header.spec, &wave.tasks, key);
        }
        let task = &mut wave.tasks[key.1 as usize];
        let from = task.state;
        task.state = TaskState::Ready;
        task.ready_ms = now_ms;
        task.error = format!("lost: {reason}");
        wave.header.counts.move_one(from, TaskState::Ready);
        self.ready.insert(key);
        self.dirty.tasks.insert(key);
        self.dirty.waves.insert(key.0);
    }

    fn on_mark_down(&mut self, name: &str, now_ms: u64) -> Outcome {
        let Some(node) = self.nodes.get_mut(name) else {
            return Outcome::Rejected(format!("node `{name}` not found"));
        };
        if node.state != NodeState::Down {
            self.observations.push(Observation::NodeState {
                node: name.to_string(),
                from: Some(node.state),
                to: NodeState::Down,
            });
        }
        node.state = NodeState::Down;
        let active: Vec<MicroKey> = node.active.iter().copied().collect();
        self.dirty.nodes.insert(name.to_string());
        for key in active {
            self.return_to_ready(key, now_ms, "node down");
        }
        Outcome::Done
    }

    fn on_drain(&mut self, name: &str, drain: bool) -> Outcome {
        let Some(node) = self.nodes.get_mut(name) else {
            return Outcome::Rejected(format!("node `{name}` not found"));
        };
        node.draining = drain;
        if node.state != NodeState::Down {
            let to = if drain {
                NodeState::Draining
            } else {
                NodeState::Ready
            };
            if node.state != to {
                self.observations.push(Observation::NodeState {
                    node: name.to_string(),
                    from: Some(node.state),
                    to,
                });
            }
            node.state = to;
        }
        self.dirty.nodes.insert(name.to_string());
        let slots = node.usable_slots();
        self.effects.push(Effect::SlotsLimit {
            node: name.to_string(),
            slots,
        });
        Outcome::Done
    }

    /// The Möbius model's cluster S_Total over ready nodes (0 when there are none).
    /// Applies placements chosen by hand, as a `Schedule` would apply its plan's (tests).
    #[cfg(test)]
    pub(crate) fn assign(&mut self, placements: Vec<Placement>, now_ms: u64) -> Outcome {
        self.on_assign(placements, now_ms)
    }

    /// Marks a node down as if its heartbeats had expired in a `Schedule` (tests).
    #[cfg(test)]
    pub(crate) fn mark_down(&mut self, node: &str, now_ms: u64) -> Outcome {
        self.on_mark_down(node, now_ms)
    }

    pub fn cluster_s_total(&self) -> f64 {
        let inputs: Vec<NodeModelInput> = self
            .nodes
            .values()
            .filter(|n| n.state == NodeState::Ready)
            .map(Node::model_input)
            .collect();
        mobius::cluster_model(&inputs).map_or(0.0, |m| m.s_total)
    }
}

/// Frees the node capacity held by micro-task `key`.
fn release(node: &mut Node, spec: &WaveSpec, tasks: &[MicroTask], key: MicroKey) {
    if node.active.remove(&key) {
        if let Some(task) = tasks.get(key.1 as usize) {
            let t = &spec.tasks[task.group as usize];
            node.used_cpus = node.used_cpus.saturating_sub(t.cpus);
            node.used_memory_bytes = node.used_memory_bytes.saturating_sub(t.memory_bytes);
            node.used_gpus = node.used_gpus.saturating_sub(t.gpus);
        }
    }
}

#[cfg(test)]
#[path = "state_tests.rs"]
mod tests;
