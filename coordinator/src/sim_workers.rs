//! The simulated workers of the deterministic cluster simulation ([`super`]), and the
//! ledger that checks what they ran.
//!
//! A [`SimWorker`] plays both the worker agent and the server's side of its stream: it
//! attaches to the replica it believes leads (`Event::WorkerAttached` with a channel it
//! polls), registers with `Command::register` (its running attempts and every result not
//! acknowledged yet), then reports starts, results and heartbeats with
//! `Command::worker_report`, one proposal per message, as `server.rs` does. Attempts "run"
//! for a random virtual time and some exit non-zero. Everything is driven by the run's
//! seeded generator on its virtual clock.
//!
//! A worker holds a lease as the agent does (`worker/src/agent/state.rs`): registrations
//! and heartbeats are numbered and remembered with when they left on the worker's own
//! drifting clock ([`MachineClock`]); a grant counts from there; nothing starts without a
//! lease; when it runs out, what runs is killed at that very moment. Each turn plays the
//! worker's attempts in time order up to now before it reads what arrived, so ends, starts
//! and the lease's end happen at their exact virtual times.
//!
//! The [`Ledger`] replays the committed log, read entry by entry from the replicas' raft
//! logs right after the turn that first applied it, on a state of its own, and judges
//! every committed result against the fencing rule before applying it. [`Executions`]
//! records when every attempt ran and checks that no two of one micro-task overlap.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use protobuf::Message as _;
use raft::eraftpb::{ConfChange, ConfChangeType, Entry, EntryType};
use raft::{GetEntriesContext, StateRole};
use tokio::sync::oneshot::error::TryRecvError;
use tokio::sync::{mpsc, oneshot};
use venom_core::mobius::ThrottlePolicy;
use venom_core::wave::WaveLimits;
use venom_core::{AttemptOutcome, AttemptRef, MicroKey, NodeState, TaskState};
use venom_proto::v1 as pb;

use super::{hash_bytes, MachineClock, Sim, Stats};
use crate::replica::{Event, ProposeError};
use crate::state::{AttemptResult, Command, HeartbeatReport, NodeSpec, Outcome, State};
use crate::storage::BOOTSTRAP_INDEX;

/// Virtual time between two heartbeats of a worker.
const HEARTBEAT_US: u64 = 500_000;
/// How long a worker waits for its registration to be answered (the agent's connect
/// timeout).
const CONNECT_TIMEOUT_US: u64 = 5_000_000;
/// Reconnect backoff bounds (the agent's).
const BACKOFF_MIN_US: u64 = 50_000;
const BACKOFF_MAX_US: u64 = 2_000_000;
/// Retry delay after "not leader" with no leader named (an election is under way), and
/// with one named.
const NOT_LEADER_RETRY_US: u64 = 100_000;
const HINT_RETRY_US: u64 = 10_000;
/// Chance per step (‰) that a worker notices its stream died across a cut link (what
/// keep-alive does, faster).
const NOTICE_DEAD_LINK_PM: u64 = 20;
/// The server's channel towards one worker.
const WORKER_CHANNEL: usize = 4_096;
/// With no lease renewal for this long on its own clock, a worker gives up on its stream and
/// looks for the leader again (the agent's silence deadline: two heartbeat intervals and
/// 250 ms).
const SILENCE_US: u64 = 2 * HEARTBEAT_US + 250_000;
/// Registrations and heartbeats remembered until a grant covers them (the agent's).
const MAX_UNGRANTED_MESSAGES: usize = 64;
/// Worker pauses and cut-offs are either short — at most half the lease, which should cost
/// no re-execution — or longer than the lease (up to three leases: the leader re-dispatches
/// once the lease and its margin have passed).
const SHORT_FAULT_MS: (u64, u64) = (200, super::WORKER_LEASE_MS / 2);
const LONG_FAULT_MS: (u64, u64) = (super::WORKER_LEASE_MS + 200, 3 * super::WORKER_LEASE_MS);

/// A worker's stream to a coordinator.
enum Link {
    /// Not connected; the next attempt is due at `SimWorker::retry_at_us`.
    Idle,
    /// Attached, the registration proposed and not answered yet.
    Registering {
        replica: u64,
        life: u64,
        conn: u64,
        since_us: u64,
        rx: mpsc::Receiver<pb::CoordinatorMessage>,
        reply: oneshot::Receiver<Result<Outcome, ProposeError>>,
    },
    /// Registered: reports go to `replica`, its messages arrive on `rx`.
    Up {
        replica: u64,
        life: u64,
        conn: u64,
        rx: mpsc::Receiver<pb::CoordinatorMessage>,
    },
}

impl Link {
    fn name(&self) -> String {
        match self {
            Link::Idle => "disconnected".into(),
            Link::Registering { replica, .. } => format!("registering at replica {replica}"),
            Link::Up { replica, .. } => format!("attached to replica {replica}"),
        }
    }

    fn code(&self) -> u64 {
        match self {
            Link::Idle => 0,
            Link::Registering { replica, .. } => 100 + replica,
            Link::Up { replica, .. } => 200 + replica,
        }
    }
}

/// An attempt a worker runs.
struct Run {
    cpus: u32,
    started_ms: u64,
    ends_at_us: u64,
    exit_code: i32,
    /// Killed at the coordinator's request.
    cancelled: bool,
    /// Its execution, as the overlap check records it.
    execution: ExecutionId,
}

/// What befell a worker, worst last.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Blame {
    /// None of the below.
    NoWorkerFault,
    /// A pause or a cut-off of at most half the lease.
    ShortFault,
    /// The coordinators' doing: for more than half the lease, no leader it could reach
    /// (partitions, elections) or no entry committed.
    CoordinatorOutage,
    /// A pause or a cut-off longer than the lease.
    LongFault,
    /// A crash (a worker keeps nothing: it loses what it ran and its results).
    Crash,
}

/// Coordinator outages are blamed once they add up to more than this (half the lease);
/// nothing committed for this long is one.
const OUTAGE_US: u64 = super::WORKER_LEASE_MS * 1_000 / 2;

/// One worker fault (or coordinator outage), over `[from_us, until_us]` in virtual time.
#[derive(Debug, Clone, Copy)]
struct WorkerFault {
    blame: Blame,
    from_us: u64,
    until_us: u64,
}

/// The worst of `faults` that overlaps `[from_us, until_us]`; coordinator outages count
/// once they add up to more than [`OUTAGE_US`] in it.
fn blame(faults: &[WorkerFault], from_us: u64, until_us: u64) -> Blame {
    let overlapping = faults
        .iter()
        .filter(|f| f.from_us <= until_us && from_us <= f.until_us);
    let outage_us: u64 = overlapping
        .clone()
        .filter(|f| f.blame == Blame::CoordinatorOutage)
        .map(|f| f.until_us.min(until_us) - f.from_us.max(from_us))
        .sum();
    overlapping
        .map(|f| f.blame)
        .filter(|&b| b != Blame::CoordinatorOutage || outage_us > OUTAGE_US)
        .max()
        .unwrap_or(Blame::NoWorkerFault)
}

/// One simulated worker node. It has no disk: a crash loses what it runs and the results
/// it kept.
pub(super) struct SimWorker {
    pub(super) name: String,
    slots: u32,
    queue_depth: u32,
    /// Least time between two reports (results and starts coalesce meanwhile).
    report_gap_us: u64,
    /// Crashed: down until then.
    restart_at_us: Option<u64>,
    /// Frozen (the whole machine, its attempts too) since then until then (0: running).
    paused_since_us: u64,
    paused_until_us: u64,
    /// Cut off from every coordinator until then (0: not).
    isolated_until_us: u64,
    /// Partition side (like the replicas').
    pub(super) side: bool,
    link: Link,
    /// The replica named as leader by the last refusal.
    hint: Option<u64>,
    /// Round-robin position over the replicas, when no leader is named.
    next_target: u64,
    retry_at_us: u64,
    backoff_us: u64,
    slots_limit: u32,
    /// Accepted assignments not started yet, FIFO, with their cpus and when they arrived.
    queue: VecDeque<(AttemptRef, u32, u64)>,
    running: BTreeMap<AttemptRef, Run>,
    running_cpus: u32,
    /// Finished results the coordinator has not acknowledged.
    unacked: BTreeMap<AttemptRef, AttemptResult>,
    out_started: Vec<(AttemptRef, u64)>,
    out_finished: Vec<AttemptResult>,
    next_heartbeat_us: u64,
    next_report_us: u64,
    /// The machine's monotonic clock, on which leases are counted (another reading after
    /// every crash).
    clock: MachineClock,
    /// The number the next message gets: from 1 at every start, like the agent's.
    next_seq: u64,
    /// Registrations and heartbeats no grant covered yet: number, and when sent on `clock`.
    sent: VecDeque<(u64, u64)>,
    /// Until when (on `clock`, µs) it may run and start attempts; `None`: no lease.
    lease_until: Option<u64>,
    /// When (on `clock`, µs) a leader last renewed the lease or accepted the stream.
    last_renewal: u64,
    /// Virtual time up to which its attempts have been played.
    played_until_us: u64,
    /// Its crashes, pauses and cut-offs, and the coordinator outages it saw.
    faults: Vec<WorkerFault>,
    /// Since when it has had no leader to reach (see [`Blame::CoordinatorOutage`]).
    outage_since_us: Option<u64>,
}

impl SimWorker {
    pub(super) fn new(
        name: String,
        slots: u32,
        queue_depth: u32,
        report_gap_us: u64,
        clock: MachineClock,
    ) -> Self {
        Self {
            name,
            slots,
            queue_depth,
            report_gap_us,
            restart_at_us: None,
            paused_since_us: 0,
            paused_until_us: 0,
            isolated_until_us: 0,
            side: false,
            link: Link::Idle,
            hint: None,
            next_target: 0,
            retry_at_us: 0,
            backoff_us: BACKOFF_MIN_US,
            slots_limit: slots,
            queue: VecDeque::new(),
            running: BTreeMap::new(),
            running_cpus: 0,
            unacked: BTreeMap::new(),
            out_started: Vec::new(),
            out_finished: Vec::new(),
            next_heartbeat_us: 0,
            next_report_us: 0,
            clock,
            next_seq: 1,
            sent: VecDeque::new(),
            lease_until: None,
            last_renewal: 0,
            played_until_us: super::EPOCH_US,
            faults: Vec::new(),
            outage_since_us: None,
        }
    }

    /// Whether it holds a lease at virtual time `at` (judged on its own clock).
    fn has_lease(&self, at: u64) -> bool {
        self.lease_until
            .is_some_and(|until| self.clock.read_us(at) < until)
    }

    /// When, in virtual time, its lease runs out.
    fn lease_expiry_us(&self) -> Option<u64> {
        self.lease_until.map(|until| self.clock.reaches_at(until))
    }

    /// Numbers a message sent at `now`, remembering when it left if a leader may grant a
    /// lease by it (registrations and heartbeats), like `AgentState::stamp`.
    fn stamp(&mut self, now: u64, grantable: bool) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        if grantable {
            if self.sent.len() >= MAX_UNGRANTED_MESSAGES {
                self.sent.pop_front();
            }
            self.sent.push_back((seq, self.clock.read_us(now)));
        }
        seq
    }

    /// A leader committed message `seq`: the lease runs until `lease_ms` after it was sent
    /// (unless an earlier grant runs longer), like `AgentState::on_lease`. Returns whether the
    /// grant named a message it remembered.
    fn on_lease(&mut self, seq: u64, lease_ms: u64, now: u64) -> bool {
        self.last_renewal = self.clock.read_us(now);
        let mut sent_at = None;
        while let Some(&(number, at)) = self.sent.front() {
            if number > seq {
                break;
            }
            self.sent.pop_front();
            if number == seq {
                sent_at = Some(at);
            }
        }
        let Some(at) = sent_at else {
            return false;
        };
        let until = at + lease_ms * 1_000;
        if self.lease_until.is_none_or(|current| current < until) {
            self.lease_until = Some(until);
        }
        true
    }

    fn spec(&self) -> NodeSpec {
        NodeSpec {
            name: self.name.clone(),
            slots: self.slots,
            labels: BTreeMap::new(),
            policy: ThrottlePolicy::Adaptive,
            physical_cores: self.slots,
            logical_cores: self.slots,
            memory_total_bytes: 1 << 34,
            gpus: 0,
            queue_depth: self.queue_depth,
            profile: Vec::new(),
        }
    }

    fn healthy(&self) -> bool {
        self.restart_at_us.is_none() && self.paused_until_us == 0 && self.isolated_until_us == 0
    }

    /// Nothing queued, running or waiting to be sent or acknowledged.
    fn idle(&self) -> bool {
        self.queue.is_empty()
            && self.running.is_empty()
            && self.unacked.is_empty()
            && self.out_started.is_empty()
            && self.out_finished.is_empty()
    }

    fn record_finished(&mut self, result: AttemptResult) {
        self.unacked.insert(result.attempt, result.clone());
        self.out_finished.push(result);
    }

    /// A digest of the worker's position, for the step trace.
    pub(super) fn digest(&self) -> [u64; 7] {
        [
            self.link.code(),
            self.queue.len() as u64,
            self.running.len() as u64,
            self.unacked.len() as u64,
            u64::from(self.restart_at_us.is_some()) + 2 * u64::from(self.paused_until_us > 0),
            self.next_seq,
            self.lease_until.unwrap_or(0),
        ]
    }

    pub(super) fn describe(&self) -> String {
        let mut faults = String::new();
        if let Some(at) = self.restart_at_us {
            faults.push_str(&format!(", crashed until {at}"));
        }
        if self.paused_until_us > 0 {
            faults.push_str(&format!(", paused until {}", self.paused_until_us));
        }
        if self.isolated_until_us > 0 {
            faults.push_str(&format!(", cut off until {}", self.isolated_until_us));
        }
        let lease = match self.lease_expiry_us() {
            Some(at) => format!(
                "lease until {:.3} ms",
                at.saturating_sub(super::EPOCH_US) as f64 / 1e3
            ),
            None => "no lease".to_owned(),
        };
        format!(
            "worker {} ({} slots, limit {}, clock rate {} ppm){faults}: {}, {lease}, {} queued, \
             {} running {:?}, {} unacknowledged {:?}",
            self.name,
            self.slots,
            self.slots_limit,
            self.clock.rate_ppm(),
            self.link.name(),
            self.queue.len(),
            self.running.len(),
            self.running.keys().take(8).collect::<Vec<_>>(),
            self.unacked.len(),
            self.unacked.keys().take(8).collect::<Vec<_>>(),
        )
    }
}

/// How an execution of an attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ExecutionEnd {
    /// The process exited by itself (its result was kept, whatever became of it then).
    Exited,
    /// Killed at the coordinator's request.
    Cancelled,
    /// Killed because the worker's lease ran out.
    Fenced,
    /// Died with its worker.
    Crashed,
}

/// One run of one attempt on one worker, in virtual (true) time.
#[derive(Debug, Clone)]
pub(super) struct Execution {
    attempt: AttemptRef,
    node: String,
    began_us: u64,
    /// When it ran, as `[from, to)` intervals in order: a frozen machine's attempts are
    /// frozen with it, which splits the run.
    ran: Vec<(u64, u64)>,
    /// Running since then; `None` while frozen and once ended.
    running_since: Option<u64>,
    end: Option<(u64, ExecutionEnd)>,
}

impl Execution {
    /// When it ran up to `now`, counting a run still going as running until `now`.
    fn ran_until(&self, now: u64) -> Vec<(u64, u64)> {
        let mut ran = self.ran.clone();
        if let Some(since) = self.running_since {
            ran.push((since, now.max(since)));
        }
        ran
    }

    fn describe(&self, now: u64) -> String {
        let ms = |us: u64| format!("{:.3}", us.saturating_sub(super::EPOCH_US) as f64 / 1e3);
        let ran: Vec<String> = self
            .ran_until(now)
            .iter()
            .map(|(from, to)| format!("{}–{}", ms(*from), ms(*to)))
            .collect();
        let end = match self.end {
            Some((at, how)) => format!("{how:?} at {}", ms(at)),
            None if self.running_since.is_some() => "still running".to_owned(),
            None => "frozen".to_owned(),
        };
        format!(
            "{} on {} ran during [{}] ms ({end})",
            self.attempt,
            self.node,
            ran.join(", ")
        )
    }
}

/// Where one execution is kept: its micro-task and its place among that micro-task's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct ExecutionId {
    key: MicroKey,
    index: usize,
}

/// The first time two sets of `[from, to)` intervals overlap, as the overlapping interval.
fn overlap(a: &[(u64, u64)], b: &[(u64, u64)]) -> Option<(u64, u64)> {
    a.iter()
        .flat_map(|&(a_from, a_to)| {
            b.iter().filter_map(move |&(b_from, b_to)| {
                let from = a_from.max(b_from);
                let to = a_to.min(b_to);
                (from < to).then_some((from, to))
            })
        })
        .min()
}

/// Every execution of every attempt, by micro-task, and the check that no two executions of
/// one micro-task ever ran at the same time.
///
/// Each worker plays its attempts in time order up to the current virtual time in its turn,
/// so once every worker had its turn, an execution still running ran at least until now: the
/// check counts it so, and looks again at every micro-task touched since, and at those with
/// an execution still running, at the end of every step.
#[derive(Debug, Default)]
pub(super) struct Executions {
    by_micro: BTreeMap<MicroKey, Vec<Execution>>,
    /// Micro-tasks whose executions changed since the last check or still run.
    touched: BTreeSet<MicroKey>,
    /// Comparisons of two executions of one micro-task made (a pair is compared again at
    /// every check of its micro-task).
    pub(super) pairs_checked: u64,
}

impl Executions {
    /// `attempt` starts on `node` at `at`.
    pub(super) fn begin(&mut self, attempt: AttemptRef, node: &str, at: u64) -> ExecutionId {
        let key = attempt.key();
        let runs = self.by_micro.entry(key).or_default();
        runs.push(Execution {
            attempt,
            node: node.to_owned(),
            began_us: at,
            ran: Vec::new(),
            running_since: Some(at),
            end: None,
        });
        self.touched.insert(key);
        ExecutionId {
            key,
            index: runs.len() - 1,
        }
    }

    fn get(&mut self, id: ExecutionId) -> Option<&mut Execution> {
        self.touched.insert(id.key);
        self.by_micro.get_mut(&id.key)?.get_mut(id.index)
    }

    /// Its machine froze at `at`: it stops running.
    pub(super) fn freeze(&mut self, id: ExecutionId, at: u64) {
        if let Some(run) = self.get(id) {
            if let Some(since) = run.running_since.take() {
                run.ran.push((since, at.max(since)));
            }
        }
    }

    /// Its machine resumed at `at`: it runs again.
    pub(super) fn resume(&mut self, id: ExecutionId, at: u64) {
        if let Some(run) = self.get(id) {
            if run.end.is_none() && run.running_since.is_none() {
                run.running_since = Some(at);
            }
        }
    }

    /// It ended at `at` (a frozen one runs no more: it ends where it froze).
    pub(super) fn end(&mut self, id: ExecutionId, at: u64, how: ExecutionEnd) {
        self.freeze(id, at);
        if let Some(run) = self.get(id) {
            run.end.get_or_insert((at, how));
        }
    }

    /// Checks the micro-tasks touched since the last check, counting what still runs as
    /// running until `now`.
    pub(super) fn check(&mut self, now: u64) -> Result<(), String> {
        let touched = std::mem::take(&mut self.touched);
        for key in touched {
            self.check_micro(key, now)?;
            let running = self
                .by_micro
                .get(&key)
                .is_some_and(|runs| runs.iter().any(|r| r.running_since.is_some()));
            if running {
                self.touched.insert(key);
            }
        }
        Ok(())
    }

    /// Checks every micro-task.
    pub(super) fn check_all(&mut self, now: u64) -> Result<(), String> {
        let keys: Vec<MicroKey> = self.by_micro.keys().copied().collect();
        for key in keys {
            self.check_micro(key, now)?;
        }
        Ok(())
    }

    fn check_micro(&mut self, key: MicroKey, now: u64) -> Result<(), String> {
        let Some(runs) = self.by_micro.get(&key) else {
            return Ok(());
        };
        let ran: Vec<Vec<(u64, u64)>> = runs.iter().map(|r| r.ran_until(now)).collect();
        for i in 0..runs.len() {
            for j in i + 1..runs.len() {
                self.pairs_checked += 1;
                if let Some((from, to)) = overlap(&ran[i], &ran[j]) {
                    return Err(format!(
                        "micro-task {key:?} ran twice at once for {} µs from {:.3} ms: {}; {}",
                        to - from,
                        from.saturating_sub(super::EPOCH_US) as f64 / 1e3,
                        runs[i].describe(now),
                        runs[j].describe(now)
                    ));
                }
            }
        }
        Ok(())
    }

    /// How many executions there were.
    pub(super) fn count(&self) -> u64 {
        self.by_micro.values().map(|runs| runs.len() as u64).sum()
    }

    /// The executions that ran a micro-task again — each with the execution before it —
    /// leaving out retries: `retried` tells an accepted failure that sent the micro-task
    /// back to ready.
    pub(super) fn re_executions(
        &self,
        retried: impl Fn(&str, AttemptRef) -> bool,
    ) -> Vec<(&Execution, &Execution)> {
        let mut pairs = Vec::new();
        for runs in self.by_micro.values() {
            let mut runs: Vec<&Execution> = runs.iter().collect();
            runs.sort_by_key(|r| r.began_us);
            for pair in runs.windows(2) {
                if !retried(&pair[0].node, pair[0].attempt) {
                    pairs.push((pair[0], pair[1]));
                }
            }
        }
        pairs
    }
}

/// A result a worker saw acknowledged, with the acknowledging replica's applied index.
pub(super) struct PendingAck {
    pub(super) result: AttemptResult,
    pub(super) index: u64,
}

/// How one committed result was judged when the ledger applied it.
struct Verdict {
    outcome: AttemptOutcome,
    /// It named the micro-task's current attempt on the node that has it.
    accepted: bool,
    /// The micro-task's state right after it.
    after: TaskState,
}

/// The canonical apply stream: every committed entry, in index order, applied to a state
/// of the ledger's own (so the checks see each result against the state exactly at its
/// place in the log).
pub(super) struct Ledger {
    /// Committed entries read from a replica's log, until applied here.
    pub(super) entries: BTreeMap<u64, Entry>,
    /// The last index applied here.
    pub(super) applied: u64,
    pub(super) state: State,
    /// Every committed result by (node, attempt), in log order.
    results: BTreeMap<(String, AttemptRef), Vec<Verdict>>,
    /// The accepted result that ended each micro-task: its attempt, node and the state
    /// it left.
    terminal: BTreeMap<MicroKey, (u32, String, TaskState)>,
    /// (micro-task, attempt) of every accepted result.
    accepted: BTreeSet<(MicroKey, u32)>,
    /// Results judged stale by the fencing rule.
    pub(super) judged_stale: u64,
}

impl Ledger {
    /// Starts where a founder's store starts: the founders as members at the bootstrap
    /// index.
    pub(super) fn new(founders: &BTreeMap<u64, String>) -> Self {
        let mut state = State::new(WaveLimits::default());
        for (&id, address) in founders {
            state.change_member(id, Some(address.clone()));
        }
        state.dirty = Default::default();
        Self {
            entries: BTreeMap::new(),
            applied: BOOTSTRAP_INDEX,
            state,
            results: BTreeMap::new(),
            terminal: BTreeMap::new(),
            accepted: BTreeSet::new(),
            judged_stale: 0,
        }
    }

    /// Applies every entry read so far that follows the last one applied.
    fn advance(&mut self, stats: &mut Stats) -> Result<(), String> {
        while let Some(entry) = self.entries.remove(&(self.applied + 1)) {
            match entry.get_entry_type() {
                EntryType::EntryConfChange => {
                    let mut cc = ConfChange::default();
                    if cc.merge_from_bytes(&entry.data).is_ok() {
                        let address = match cc.get_change_type() {
                            ConfChangeType::RemoveNode => None,
                            _ => Some(String::from_utf8_lossy(&cc.context).into_owned()),
                        };
                        self.state.change_member(cc.node_id, address);
                    }
                }
                EntryType::EntryNormal if !entry.data.is_empty() => {
                    if let Ok(command) = bincode::deserialize::<Command>(&entry.data) {
                        self.apply(command, stats)
                            .map_err(|e| format!("at index {}: {e}", entry.index))?;
                    }
                }
                _ => {}
            }
            self.state.effects.clear();
            self.state.observations.clear();
            self.state.dirty = Default::default();
            self.applied = entry.index;
        }
        Ok(())
    }

    fn apply(&mut self, command: Command, stats: &mut Stats) -> Result<(), String> {
        match command {
            Command::Batch(commands) => {
                for command in commands {
                    self.apply(command, stats)?;
                }
            }
            Command::Finished { results, now_ms } => {
                for result in results {
                    self.apply_result(result, now_ms, stats)?;
                }
            }
            command @ (Command::Schedule { .. } | Command::RegisterNode { .. }) => {
                self.apply_returning(command, stats)?;
            }
            other => {
                self.state.apply(other);
            }
        }
        Ok(())
    }

    /// A scheduling round (which may mark lost nodes down) or a registration (which
    /// reconciles what the node runs): a micro-task they take off its node goes back to
    /// ready without using a retry, and a node marked down keeps nothing.
    fn apply_returning(&mut self, command: Command, stats: &mut Stats) -> Result<(), String> {
        let mut active = Vec::new();
        for node in self.state.nodes.values() {
            for &key in &node.active {
                if let Some(task) = self.state.task(key) {
                    active.push((key, node.spec.name.clone(), task.attempt, task.failures));
                }
            }
        }
        let down_before: BTreeSet<String> = self
            .state
            .nodes
            .values()
            .filter(|n| n.state == NodeState::Down)
            .map(|n| n.spec.name.clone())
            .collect();
        let what = match &command {
            Command::Schedule { .. } => "a scheduling round",
            _ => "a registration",
        };
        self.state.apply(command);
        for (key, node, attempt, failures) in active {
            let task = self
                .state
                .task(key)
                .ok_or_else(|| format!("micro-task {key:?} vanished in {what}"))?;
            if task.failures != failures {
                return Err(format!(
                    "{what} changed the failures of micro-task {key:?} (attempt {attempt} on \
                     {node}) from {failures} to {}: a lost node must not use a retry",
                    task.failures
                ));
            }
            let still_there = task.attempt == attempt
                && task.node.as_deref() == Some(node.as_str())
                && matches!(task.state, TaskState::Assigned | TaskState::Running);
            if !still_there {
                if task.state.is_terminal() || task.attempt < attempt {
                    return Err(format!(
                        "{what} took micro-task {key:?} (attempt {attempt} on {node}) to {:?} \
                         attempt {}",
                        task.state, task.attempt
                    ));
                }
                stats.returned_to_ready += 1;
            }
        }
        for node in self.state.nodes.values() {
            if node.state == NodeState::Down && !down_before.contains(&node.spec.name) {
                stats.nodes_marked_down += 1;
                if !node.active.is_empty() {
                    return Err(format!(
                        "node {} was marked down but keeps micro-tasks {:?}",
                        node.spec.name, node.active
                    ));
                }
            }
        }
        Ok(())
    }

    /// Whether `node`'s result of `attempt` was accepted as a failure that sent its
    /// micro-task back to ready (to be retried).
    pub(super) fn retried(&self, node: &str, attempt: AttemptRef) -> bool {
        self.results
            .get(&(node.to_owned(), attempt))
            .is_some_and(|verdicts| {
                verdicts
                    .iter()
                    .any(|v| v.accepted && v.after == TaskState::Ready)
            })
    }

    /// Judges one committed result by the fencing rule on the state at its place in the
    /// log, applies it, and checks that it was recorded (and not counted stale) exactly
    /// when it named the micro-task's current attempt on the node that has it.
    fn apply_result(
        &mut self,
        result: AttemptResult,
        now_ms: u64,
        stats: &mut Stats,
    ) -> Result<(), String> {
        let attempt = result.attempt;
        let key = attempt.key();
        let node = result.node.clone();
        let outcome = result.outcome.clone();
        let before = self.state.task(key).cloned().ok_or_else(|| {
            format!("a committed result of {attempt} from {node} names no micro-task")
        })?;
        if attempt.attempt > before.attempt {
            return Err(format!(
                "{node} reported {attempt}, but the micro-task was never dispatched past \
                 attempt {}",
                before.attempt
            ));
        }
        let current = before.attempt == attempt.attempt
            && before.node.as_deref() == Some(node.as_str())
            && matches!(before.state, TaskState::Assigned | TaskState::Running);
        let stale_before = self.state.stale_results;
        self.state.apply(Command::Finished {
            results: vec![result],
            now_ms,
        });
        let after = self
            .state
            .task(key)
            .cloned()
            .ok_or_else(|| format!("micro-task {key:?} vanished"))?;
        let counted = self.state.stale_results.wrapping_sub(stale_before);
        let result_name = format!("the result of {attempt} from {node} ({outcome:?})");
        if current {
            if counted != 0 {
                return Err(format!(
                    "{result_name} named the current attempt on its node, yet was counted stale"
                ));
            }
            if after.attempt != attempt.attempt {
                return Err(format!(
                    "{result_name} moved the micro-task to attempt {}",
                    after.attempt
                ));
            }
            let succeeded = outcome.succeeded();
            let consistent = match after.state {
                TaskState::Succeeded => succeeded,
                TaskState::Failed | TaskState::Ready => {
                    !succeeded && after.failures == before.failures + 1
                }
                TaskState::Cancelled => outcome.cancelled,
                _ => false,
            };
            if !consistent {
                return Err(format!(
                    "{result_name} was accepted and left the micro-task {:?} with {} failures \
                     (it had {})",
                    after.state, after.failures, before.failures
                ));
            }
            if !self.accepted.insert((key, attempt.attempt)) {
                return Err(format!("{result_name} was accepted twice"));
            }
            if after.state.is_terminal() {
                if let Some((a, n, s)) = self
                    .terminal
                    .insert(key, (attempt.attempt, node.clone(), after.state))
                {
                    return Err(format!(
                        "micro-task {key:?} recorded twice: {s:?} by attempt {a} from {n}, then \
                         {:?} by {result_name}",
                        after.state
                    ));
                }
            }
            stats.results_accepted += 1;
            if after.state == TaskState::Ready {
                stats.retries += 1;
            }
        } else {
            if counted != 1 {
                return Err(format!(
                    "{result_name} was stale (the micro-task was {:?} at attempt {} on {:?}) but \
                     was counted {counted} times",
                    before.state, before.attempt, before.node
                ));
            }
            if after != before {
                return Err(format!(
                    "{result_name} was stale, yet changed the micro-task from {before:?} to \
                     {after:?}"
                ));
            }
            self.judged_stale += 1;
            if before.attempt > attempt.attempt {
                stats.stale_superseded += 1;
            } else if before.state.is_terminal() {
                stats.stale_after_end += 1;
            } else {
                stats.stale_returned += 1;
            }
        }
        self.results
            .entry((node, attempt))
            .or_default()
            .push(Verdict {
                outcome,
                accepted: current,
                after: after.state,
            });
        Ok(())
    }

    /// An acknowledged result is in the committed log, as the worker produced it.
    fn check_acked(&self, result: &AttemptResult) -> Result<(), String> {
        let verdicts = self
            .results
            .get(&(result.node.clone(), result.attempt))
            .ok_or_else(|| {
                format!(
                    "{} saw its result of {} acknowledged, but it is not in the committed log \
                     (applied up to {})",
                    result.node, result.attempt, self.applied
                )
            })?;
        if verdicts.iter().any(|v| v.outcome == result.outcome) {
            Ok(())
        } else {
            Err(format!(
                "{} saw its result of {} acknowledged, but the log holds it with another \
                 outcome",
                result.node, result.attempt
            ))
        }
    }

    /// The end-of-run checks on the ledger's final state: every acknowledged result is
    /// recorded (or was stale when it committed), every micro-task that succeeded or
    /// failed shows the one result that ended it, and the stale count is exactly the
    /// results that were stale.
    pub(super) fn check_final(&self, acked: &[AttemptResult]) -> Result<(), String> {
        for result in acked {
            self.check_acked(result)?;
            let verdicts = &self.results[&(result.node.clone(), result.attempt)];
            let Some(v) = verdicts.iter().find(|v| v.accepted) else {
                continue;
            };
            let key = result.attempt.key();
            let task = self
                .state
                .task(key)
                .ok_or_else(|| format!("micro-task {key:?} is gone"))?;
            let kept = match v.after {
                // A failure that was retried: a later attempt exists (unless the wave
                // ended before it could run).
                TaskState::Ready => {
                    task.attempt > result.attempt.attempt
                        || matches!(task.state, TaskState::Cancelled | TaskState::Skipped)
                }
                ended => {
                    task.state == ended
                        && task.attempt == result.attempt.attempt
                        && task.node.as_deref() == Some(result.node.as_str())
                }
            };
            if !kept {
                return Err(format!(
                    "acknowledged result lost: {} reported {} ({:?}), which left the \
                     micro-task {:?}, but it ends {:?} at attempt {} on {:?}",
                    result.node,
                    result.attempt,
                    result.outcome,
                    v.after,
                    task.state,
                    task.attempt,
                    task.node
                ));
            }
        }
        for wave in self.state.waves.values() {
            for (micro, task) in wave.tasks.iter().enumerate() {
                let key = (wave.header.id, micro as u32);
                let recorded = self.terminal.get(&key);
                let ok = match task.state {
                    TaskState::Succeeded | TaskState::Failed => {
                        recorded.is_some_and(|(a, n, s)| {
                            *a == task.attempt
                                && task.node.as_deref() == Some(n)
                                && *s == task.state
                        })
                    }
                    _ => recorded.is_none_or(|(_, _, s)| *s == task.state),
                };
                if !ok {
                    return Err(format!(
                        "micro-task {key:?} ends {:?} at attempt {} on {:?}, but the result \
                         accepted for it was {recorded:?}",
                        task.state, task.attempt, task.node
                    ));
                }
            }
        }
        if self.state.stale_results != self.judged_stale {
            return Err(format!(
                "{} results counted stale, but {} were stale",
                self.state.stale_results, self.judged_stale
            ));
        }
        Ok(())
    }
}

impl Sim {
    fn worker_blocked(&self, w: usize, replica: u64) -> bool {
        let worker = &self.workers[w];
        worker.isolated_until_us > 0
            || worker.side
                != self
                    .side
                    .get((replica - 1) as usize)
                    .copied()
                    .unwrap_or(false)
    }

    /// Whether replica `id` is up in life `life`.
    fn same_life(&self, id: u64, life: u64) -> bool {
        let node = self.node(id);
        node.replica.is_some() && node.life == life
    }

    /// Hands `event` to replica `id`, if it is up in life `life`.
    fn send_to_replica(&mut self, id: u64, life: u64, event: Event) {
        if self.same_life(id, life) {
            let node = self.node_mut(id);
            if let Some(replica) = node.replica.as_mut() {
                replica.handle(event);
                node.needs_turn = true;
            }
        }
    }

    /// Reads the entries replica `id` applied in its last turn that no one applied before,
    /// for the ledger: from its raft log (they are still there, as a turn compacts only up
    /// to what an earlier turn applied), else from another replica's.
    pub(super) fn harvest(&mut self, id: u64) -> Result<(), String> {
        let Some(trace) = self
            .node(id)
            .replica
            .as_ref()
            .and_then(|r| r.applied_trace.as_ref())
        else {
            return Ok(());
        };
        let wanted: Vec<(u64, u64, u64)> = trace
            .iter()
            .copied()
            .filter(|(index, _, _)| {
                *index > self.ledger.applied && !self.ledger.entries.contains_key(index)
            })
            .collect();
        for (index, term, hash) in wanted {
            let mut sources = vec![id];
            sources.extend(self.live().into_iter().filter(|&other| other != id));
            let entry = sources.into_iter().find_map(|source| {
                let log = &self.node(source).replica.as_ref()?.raft().raft.raft_log;
                if index > log.last_index() {
                    return None;
                }
                log.slice(index, index + 1, None, GetEntriesContext::empty(false))
                    .ok()?
                    .into_iter()
                    .next()
                    .filter(|e| e.index == index && e.term == term && hash_bytes(&e.data) == hash)
            });
            let Some(entry) = entry else {
                return Err(format!(
                    "replica {id} applied (term {term}, hash {hash:016x}) at index {index}, \
                     which no replica's log holds any more: the ledger cannot follow"
                ));
            };
            self.ledger.entries.insert(index, entry);
        }
        Ok(())
    }

    /// Applies what the ledger can, then checks the acknowledgements it now covers.
    pub(super) fn advance_ledger(&mut self) -> Result<(), String> {
        self.ledger.advance(&mut self.stats)?;
        let applied = self.ledger.applied;
        let mut error = None;
        let ledger = &self.ledger;
        let done = &mut self.acked_results;
        self.pending_acks.retain(|ack| {
            if ack.index > applied || error.is_some() {
                return true;
            }
            if let Err(e) = ledger.check_acked(&ack.result) {
                error = Some(e);
            }
            done.push(ack.result.clone());
            false
        });
        error.map_or(Ok(()), Err)
    }

    /// Notes, for each worker, whether it could reach a leader that commits now: a replica
    /// leading in the highest term there is, on the worker's side of any partition, while
    /// entries commit (something was applied in the last [`OUTAGE_US`], or the work is done
    /// and the log quiet; if not, the outage began with the last commit). A worker's own
    /// faults do not count here.
    pub(super) fn track_outages(&mut self) {
        let now = self.now_us.load(std::sync::atomic::Ordering::Relaxed);
        if self.ledger.applied > self.outage_watch.0 {
            self.outage_watch = (self.ledger.applied, now);
        }
        let committing = self.quiet || now.saturating_sub(self.outage_watch.1) <= OUTAGE_US;
        let leader = self.leaders_now().into_iter().max_by_key(|&id| {
            self.node(id)
                .replica
                .as_ref()
                .map_or(0, |r| r.raft().raft.term)
        });
        for w in 0..self.workers.len() {
            let reachable = committing
                && leader.is_some_and(|id| {
                    self.side.get((id - 1) as usize).copied().unwrap_or(false)
                        == self.workers[w].side
                });
            let since = if committing { now } else { self.outage_watch.1 };
            let worker = &mut self.workers[w];
            match (reachable, worker.outage_since_us) {
                (false, None) => worker.outage_since_us = Some(since),
                (true, Some(since)) => {
                    worker.outage_since_us = None;
                    worker.faults.push(WorkerFault {
                        blame: Blame::CoordinatorOutage,
                        from_us: since,
                        until_us: now,
                    });
                }
                _ => {}
            }
        }
    }

    /// Checks that no two executions of one micro-task ran at once, up to now (every worker
    /// has played its attempts up to now).
    pub(super) fn check_executions(&mut self) -> Result<(), String> {
        let now = self.now_us.load(std::sync::atomic::Ordering::Relaxed);
        self.executions.check(now)
    }

    /// At the end of the run: every micro-task checked once more, and the executions and
    /// re-executions counted.
    pub(super) fn count_re_executions(&mut self) -> Result<(), String> {
        let now = self.now_us.load(std::sync::atomic::Ordering::Relaxed);
        self.executions.check_all(now)?;
        self.stats.executions = self.executions.count();
        self.stats.overlap_pairs_checked = self.executions.pairs_checked;
        let ledger = &self.ledger;
        let workers = &self.workers;
        let stats = &mut self.stats;
        for (before, again) in self
            .executions
            .re_executions(|node, attempt| ledger.retried(node, attempt))
        {
            let faults = workers
                .iter()
                .find(|w| w.name == before.node)
                .map_or(&[][..], |w| &w.faults[..]);
            match blame(faults, before.began_us, again.began_us) {
                Blame::Crash => stats.re_executions_crash += 1,
                Blame::LongFault => stats.re_executions_long_fault += 1,
                Blame::CoordinatorOutage => stats.re_executions_outage += 1,
                Blame::ShortFault => stats.re_executions_short_fault += 1,
                Blame::NoWorkerFault => stats.re_executions_no_worker_fault += 1,
            }
        }
        Ok(())
    }

    /// Every worker's turn.
    pub(super) fn workers_turn(&mut self) -> Result<(), String> {
        for w in 0..self.workers.len() {
            self.worker_turn(w)?;
        }
        Ok(())
    }

    /// One worker's turn at `now`: its attempts run up to now (its lease may run out
    /// meanwhile), then it reads what arrived, starts what it may, and talks.
    fn worker_turn(&mut self, w: usize) -> Result<(), String> {
        let now = self.now_us.load(std::sync::atomic::Ordering::Relaxed);
        if let Some(at) = self.workers[w].restart_at_us {
            if now < at {
                return Ok(());
            }
            // A new process: no lease, messages numbered from 1 again, and a monotonic
            // clock with another reading.
            let clock = MachineClock::start(self.workers[w].clock.rate_ppm(), &mut self.rng);
            let worker = &mut self.workers[w];
            worker.restart_at_us = None;
            worker.link = Link::Idle;
            worker.hint = None;
            worker.retry_at_us = now;
            worker.backoff_us = BACKOFF_MIN_US;
            worker.slots_limit = worker.slots;
            worker.clock = clock;
            worker.next_seq = 1;
            worker.sent.clear();
            worker.lease_until = None;
            worker.played_until_us = now;
            let name = worker.name.clone();
            self.event(format!("worker {name} restarted"));
        }
        let worker = &mut self.workers[w];
        if worker.paused_until_us > now {
            return Ok(());
        }
        if worker.paused_until_us > 0 {
            // Its attempts were frozen with it. Its clock was not: if the lease ran out
            // meanwhile, the agent (and its guard) kill them before they run any further.
            let frozen = now.saturating_sub(worker.paused_since_us);
            let leased = worker.has_lease(now);
            let mut thawed = Vec::new();
            for run in worker.running.values_mut() {
                run.ends_at_us += frozen;
                thawed.push(run.execution);
            }
            worker.paused_until_us = 0;
            worker.played_until_us = now;
            let name = worker.name.clone();
            if leased {
                for execution in thawed {
                    self.executions.resume(execution, now);
                }
            }
            self.event(format!("worker {name} resumed"));
        }
        let worker = &mut self.workers[w];
        if worker.isolated_until_us > 0 && worker.isolated_until_us <= now {
            worker.isolated_until_us = 0;
            let name = worker.name.clone();
            self.event(format!("worker {name} reachable again"));
        }
        self.worker_play(w, now);
        self.worker_link(w, now)?;
        self.worker_start(w, now);
        self.worker_check_silence(w, now);
        self.worker_connect(w, now);
        self.worker_send(w, now);
        Ok(())
    }

    /// Gives up on a stream that no lease renewal came on for [`SILENCE_US`] (on the
    /// worker's clock), like the agent's silence deadline: it looks for the leader again.
    fn worker_check_silence(&mut self, w: usize, now: u64) {
        let worker = &self.workers[w];
        let Link::Up {
            replica,
            life,
            conn,
            ..
        } = worker.link
        else {
            return;
        };
        if worker.clock.read_us(now) < worker.last_renewal + SILENCE_US {
            return;
        }
        self.stats.silence_reconnects += 1;
        self.worker_hang_up(w, replica, life, conn);
        self.worker_disconnect(w, now, "no lease renewal from the leader in time", false);
    }

    /// Closes the worker's side of its stream to `replica`: the server notices at once
    /// unless the link is down (then only when it next fails to send).
    fn worker_hang_up(&mut self, w: usize, replica: u64, life: u64, conn: u64) {
        if !self.worker_blocked(w, replica) {
            let node = self.workers[w].name.clone();
            self.send_to_replica(replica, life, Event::WorkerDetached { node, conn });
        }
    }

    /// Drops the worker's stream (if it has one: `reason` says why) and sets when it
    /// tries again.
    fn worker_disconnect(&mut self, w: usize, now: u64, reason: &str, not_leader: bool) {
        self.workers[w].link = Link::Idle;
        let delay = {
            let worker = &mut self.workers[w];
            if not_leader {
                if worker.hint.is_some() {
                    HINT_RETRY_US
                } else {
                    NOT_LEADER_RETRY_US
                }
            } else {
                let step = worker.backoff_us;
                worker.backoff_us = (step * 2).min(BACKOFF_MAX_US);
                step / 2 + self.rng.below(step / 2 + 1)
            }
        };
        self.workers[w].retry_at_us = now + delay;
        if !reason.is_empty() {
            self.stats.worker_disconnects += 1;
            let name = self.workers[w].name.clone();
            self.event(format!("worker {name} disconnected: {reason}"));
        }
    }

    /// The stream's health and what arrived on it.
    fn worker_link(&mut self, w: usize, now: u64) -> Result<(), String> {
        let link = std::mem::replace(&mut self.workers[w].link, Link::Idle);
        let (replica, life, conn) = match &link {
            Link::Idle => return Ok(()),
            Link::Registering {
                replica,
                life,
                conn,
                ..
            }
            | Link::Up {
                replica,
                life,
                conn,
                ..
            } => (*replica, *life, *conn),
        };
        let name = self.workers[w].name.clone();
        if !self.same_life(replica, life) {
            // The coordinator's process died with the stream.
            self.worker_disconnect(w, now, "its coordinator went down", false);
            return Ok(());
        }
        if self.worker_blocked(w, replica) {
            if self.rng.chance(NOTICE_DEAD_LINK_PM) {
                // Nobody on the other side hears of it: the server keeps its end until a
                // send fails.
                self.worker_disconnect(w, now, "the link to its coordinator is down", false);
            } else {
                self.workers[w].link = link;
            }
            return Ok(());
        }
        let rx = match link {
            Link::Registering {
                since_us,
                rx,
                mut reply,
                ..
            } => match reply.try_recv() {
                Err(TryRecvError::Empty) => {
                    if now.saturating_sub(since_us) >= CONNECT_TIMEOUT_US {
                        self.send_to_replica(
                            replica,
                            life,
                            Event::WorkerDetached { node: name, conn },
                        );
                        self.worker_disconnect(w, now, "registration timed out", false);
                    } else {
                        self.workers[w].link = Link::Registering {
                            replica,
                            life,
                            conn,
                            since_us,
                            rx,
                            reply,
                        };
                    }
                    return Ok(());
                }
                Ok(Ok(_)) => {
                    self.stats.worker_registrations += 1;
                    let worker = &mut self.workers[w];
                    worker.backoff_us = BACKOFF_MIN_US;
                    worker.next_heartbeat_us = now + HEARTBEAT_US;
                    worker.last_renewal = worker.clock.read_us(now);
                    self.event(format!("worker {name} registered at replica {replica}"));
                    rx
                }
                Ok(Err(e)) => {
                    let not_leader = matches!(e, ProposeError::NotLeader { .. });
                    if let ProposeError::NotLeader {
                        leader_addr: Some(addr),
                    } = &e
                    {
                        self.workers[w].hint =
                            addr.strip_prefix("sim://").and_then(|id| id.parse().ok());
                    }
                    self.send_to_replica(replica, life, Event::WorkerDetached { node: name, conn });
                    self.worker_disconnect(
                        w,
                        now,
                        &format!("registration failed: {e}"),
                        not_leader,
                    );
                    return Ok(());
                }
                Err(TryRecvError::Closed) => {
                    return Err(format!(
                        "replica {replica} dropped worker {name}'s registration without \
                         answering it"
                    ));
                }
            },
            Link::Up { rx, .. } => rx,
            Link::Idle => return Ok(()),
        };
        let mut rx = rx;
        loop {
            match rx.try_recv() {
                Ok(message) => self.worker_message(w, replica, now, message),
                Err(mpsc::error::TryRecvError::Empty) => {
                    self.workers[w].link = Link::Up {
                        replica,
                        life,
                        conn,
                        rx,
                    };
                    return Ok(());
                }
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    // The replica dropped its end: it stopped leading, or could not send.
                    self.worker_disconnect(w, now, "the coordinator closed the stream", false);
                    return Ok(());
                }
            }
        }
    }

    /// One coordinator message (as the agent applies it: the lease, then limit, acks,
    /// assignments, cancellations).
    fn worker_message(
        &mut self,
        w: usize,
        replica: u64,
        now: u64,
        message: pb::CoordinatorMessage,
    ) {
        let applied = self
            .node(replica)
            .replica
            .as_ref()
            .map_or(0, |r| r.shared().status.read().unwrap().applied);
        let worker = &mut self.workers[w];
        if let Some(grant) = message.lease {
            if worker.on_lease(grant.seq, grant.lease_ms, now) {
                self.stats.lease_grants += 1;
            } else {
                self.stats.lease_grants_unmatched += 1;
            }
        }
        if let Some(limit) = message.slots_limit {
            worker.slots_limit = limit;
        }
        for attempt in message.ack {
            if let Some(result) = worker.unacked.remove(&AttemptRef::from(attempt)) {
                self.stats.results_acked += 1;
                self.pending_acks.push(PendingAck {
                    result,
                    index: applied,
                });
            }
        }
        for assignment in message.assign {
            let Some(attempt) = assignment.attempt.map(AttemptRef::from) else {
                continue;
            };
            if worker.running.contains_key(&attempt)
                || worker.queue.iter().any(|(a, _, _)| *a == attempt)
            {
                continue;
            }
            if let Some(result) = worker.unacked.get(&attempt) {
                // Finished here already: its result again rather than a second run.
                let result = result.clone();
                worker.out_finished.push(result);
                continue;
            }
            self.stats.assignments += 1;
            worker
                .queue
                .push_back((attempt, assignment.cpus.max(1), now));
        }
        for attempt in message.cancel {
            let attempt = AttemptRef::from(attempt);
            if let Some(run) = worker.running.get_mut(&attempt) {
                // Killed from the agent's thread at once; the kill is played next turn.
                run.cancelled = true;
                run.ends_at_us = run.ends_at_us.min(now);
            } else if let Some(i) = worker.queue.iter().position(|(a, _, _)| *a == attempt) {
                worker.queue.remove(i);
                self.stats.attempts_cancelled += 1;
                let result = AttemptResult {
                    attempt,
                    node: worker.name.clone(),
                    outcome: AttemptOutcome {
                        cancelled: true,
                        finished_ms: now / 1_000,
                        ..AttemptOutcome::default()
                    },
                };
                worker.record_finished(result);
            }
        }
    }

    /// Plays the worker's slots from where they were up to `now`: attempts end in time
    /// order, each end starts the queued attempts that then fit at that very time (the
    /// agent's runners start the next one themselves, without waiting for its loop), and
    /// the lease running out kills what runs at that moment.
    fn worker_play(&mut self, w: usize, now: u64) {
        loop {
            let at = self.workers[w].played_until_us;
            self.worker_start(w, at);
            let worker = &self.workers[w];
            let next_end = worker
                .running
                .iter()
                .filter(|(_, run)| run.ends_at_us <= now)
                .map(|(a, run)| (run.ends_at_us, *a))
                .min();
            let expiry = worker.lease_expiry_us().filter(|&expiry| expiry <= now);
            match (next_end, expiry) {
                // An attempt ending when the lease has run out ends without it: killed.
                (next, Some(expiry)) if next.is_none_or(|(end, _)| end >= expiry) => {
                    self.worker_fence(w, expiry.max(at));
                }
                (Some((end, attempt)), _) => self.worker_finish(w, attempt, end),
                (None, _) => break,
            }
        }
        self.workers[w].played_until_us = now;
    }

    /// `attempt` exits (or dies of a cancellation) at `at`: its result is kept to be sent.
    fn worker_finish(&mut self, w: usize, attempt: AttemptRef, at: u64) {
        let worker = &mut self.workers[w];
        worker.played_until_us = at;
        let Some(run) = worker.running.remove(&attempt) else {
            return;
        };
        worker.running_cpus = worker.running_cpus.saturating_sub(run.cpus);
        let (outcome, how) = if run.cancelled {
            self.stats.attempts_cancelled += 1;
            let outcome = AttemptOutcome {
                signal: Some(9),
                cancelled: true,
                started_ms: run.started_ms,
                finished_ms: at / 1_000,
                ..AttemptOutcome::default()
            };
            (outcome, ExecutionEnd::Cancelled)
        } else {
            if run.exit_code != 0 {
                self.stats.attempts_failed += 1;
            }
            let outcome = AttemptOutcome {
                exit_code: Some(run.exit_code),
                started_ms: run.started_ms,
                finished_ms: at / 1_000,
                ..AttemptOutcome::default()
            };
            (outcome, ExecutionEnd::Exited)
        };
        let result = AttemptResult {
            attempt,
            node: worker.name.clone(),
            outcome,
        };
        worker.record_finished(result);
        self.executions.end(run.execution, at, how);
    }

    /// The lease ran out at `at`: like `AgentState::fence`, every running attempt is killed
    /// (its result dropped: the leader re-dispatches it once it sees the lease expired too),
    /// the queue and the unsent start reports are dropped, and nothing starts until a
    /// leader grants a lease again. The worker gives up its stream, or the registration on
    /// its way (which lists what it ran before), and registers again, so that the leader
    /// learns at once what it no longer runs.
    fn worker_fence(&mut self, w: usize, at: u64) {
        let worker = &mut self.workers[w];
        worker.played_until_us = at;
        worker.lease_until = None;
        let running = std::mem::take(&mut worker.running);
        worker.running_cpus = 0;
        let dropped = worker.queue.len() as u64;
        worker.queue.clear();
        worker.out_started.clear();
        let killed = running.len() as u64;
        let mut faults = worker.faults.clone();
        if let Some(since) = worker.outage_since_us.filter(|&since| since < at) {
            faults.push(WorkerFault {
                blame: Blame::CoordinatorOutage,
                from_us: since,
                until_us: at,
            });
        }
        let blamed = blame(
            &faults,
            at.saturating_sub(super::WORKER_LEASE_MS * 1_000),
            at,
        );
        let name = worker.name.clone();
        for run in running.into_values() {
            self.executions.end(run.execution, at, ExecutionEnd::Fenced);
        }
        self.stats.lease_expiries += 1;
        if killed + dropped > 0 {
            self.stats.fences += 1;
            self.stats.attempts_fenced += killed;
            self.stats.queued_dropped += dropped;
            match blamed {
                Blame::Crash | Blame::LongFault => self.stats.fences_long_fault += 1,
                Blame::CoordinatorOutage => self.stats.fences_outage += 1,
                Blame::ShortFault => self.stats.fences_short_fault += 1,
                Blame::NoWorkerFault => self.stats.fences_no_worker_fault += 1,
            }
            self.event(format!(
                "worker {name}'s lease ran out at {:.3} ms: killed {killed} attempts, dropped \
                 {dropped} queued",
                at.saturating_sub(super::EPOCH_US) as f64 / 1e3
            ));
        }
        if let Link::Up {
            replica,
            life,
            conn,
            ..
        }
        | Link::Registering {
            replica,
            life,
            conn,
            ..
        } = self.workers[w].link
        {
            let now = self.now_us.load(std::sync::atomic::Ordering::Relaxed);
            self.worker_hang_up(w, replica, life, conn);
            self.worker_disconnect(w, now, "its lease expired", false);
        }
    }

    /// Starts queued attempts while they fit the slots limit (anything may start when
    /// nothing runs) and the worker holds a lease, each at `at` or when it arrived, if later.
    fn worker_start(&mut self, w: usize, at: u64) {
        loop {
            let worker = &self.workers[w];
            let Some(&(attempt, cpus, arrived)) = worker.queue.front() else {
                return;
            };
            let at = at.max(arrived);
            if !worker.has_lease(at)
                || worker.slots_limit == 0
                || (worker.running_cpus > 0 && worker.running_cpus + cpus > worker.slots_limit)
            {
                return;
            }
            // Mostly short; some outlast a lease, so that work still runs when one ends.
            let run_ms = if self.rng.chance(30) {
                super::WORKER_LEASE_MS + self.rng.below(2 * super::WORKER_LEASE_MS)
            } else if self.rng.chance(20) {
                500 + self.rng.below(2_000)
            } else {
                5 + self.rng.below(145)
            };
            let exit_code = if self.rng.chance(self.params.task_fail_pm) {
                1 + self.rng.below(2) as i32
            } else {
                0
            };
            let name = self.workers[w].name.clone();
            let execution = self.executions.begin(attempt, &name, at);
            let worker = &mut self.workers[w];
            worker.queue.pop_front();
            worker.running.insert(
                attempt,
                Run {
                    cpus,
                    started_ms: at / 1_000,
                    ends_at_us: at + run_ms * 1_000,
                    exit_code,
                    cancelled: false,
                    execution,
                },
            );
            worker.running_cpus += cpus;
            worker.out_started.push((attempt, at / 1_000));
            self.stats.attempts_run += 1;
        }
    }

    /// A disconnected worker whose retry is due asks a coordinator: the one last named
    /// leader, else the next in turn. A leader takes its stream and its registration.
    fn worker_connect(&mut self, w: usize, now: u64) {
        let worker = &self.workers[w];
        if !matches!(worker.link, Link::Idle) || now < worker.retry_at_us {
            return;
        }
        let present = self.present();
        if present.is_empty() {
            return;
        }
        let hint = self.workers[w]
            .hint
            .take()
            .filter(|id| present.contains(id));
        let target = hint.unwrap_or_else(|| {
            let worker = &mut self.workers[w];
            let target = present[(worker.next_target % present.len() as u64) as usize];
            worker.next_target += 1;
            target
        });
        let reachable = self.node(target).replica.is_some() && !self.worker_blocked(w, target);
        if !reachable {
            self.worker_disconnect(w, now, "", false);
            return;
        }
        let node = self.node(target);
        let (role, leader_id) = {
            let status = node
                .replica
                .as_ref()
                .unwrap()
                .shared()
                .status
                .read()
                .unwrap();
            (status.role, status.leader_id)
        };
        if role != StateRole::Leader {
            self.stats.worker_refusals += 1;
            self.workers[w].hint = Some(leader_id).filter(|&l| l != 0 && l != target);
            self.worker_disconnect(w, now, "", true);
            return;
        }
        let life = node.life;
        let conn = self.next_conn;
        self.next_conn += 1;
        let (tx, rx) = mpsc::channel(WORKER_CHANNEL);
        let (reply, reply_rx) = oneshot::channel();
        let now_ms = now / 1_000;
        let worker = &mut self.workers[w];
        // The registration supersedes whatever waited to be sent.
        worker.out_started.clear();
        worker.out_finished.clear();
        let mut running: Vec<AttemptRef> = worker.running.keys().copied().collect();
        running.extend(worker.queue.iter().map(|(a, _, _)| *a));
        let seq = worker.stamp(now, true);
        let command = Command::register(
            worker.spec(),
            running,
            worker.unacked.values().cloned().collect(),
            seq,
            now_ms,
        );
        let name = worker.name.clone();
        worker.link = Link::Registering {
            replica: target,
            life,
            conn,
            since_us: now,
            rx,
            reply: reply_rx,
        };
        self.send_to_replica(
            target,
            life,
            Event::WorkerAttached {
                node: name,
                conn,
                tx,
            },
        );
        self.send_to_replica(
            target,
            life,
            Event::Propose {
                command,
                reply: Some(reply),
            },
        );
    }

    /// Sends a report when a heartbeat is due, or starts and results wait and the last
    /// report is old enough. Over a cut link nothing leaves (TCP holds it).
    fn worker_send(&mut self, w: usize, now: u64) {
        let Link::Up { replica, life, .. } = &self.workers[w].link else {
            return;
        };
        let (replica, life) = (*replica, *life);
        if self.worker_blocked(w, replica) {
            return;
        }
        let quiet = self.quiet;
        let worker = &mut self.workers[w];
        let heartbeat_due = now >= worker.next_heartbeat_us && !quiet;
        let waiting = !worker.out_started.is_empty() || !worker.out_finished.is_empty();
        let report_due = waiting && now >= worker.next_report_us;
        if !(heartbeat_due || report_due) {
            return;
        }
        let seq = worker.stamp(now, heartbeat_due);
        let heartbeat = heartbeat_due.then(|| HeartbeatReport {
            node: worker.name.clone(),
            seq,
            theta: 1.0,
            h_cpu: 1.0,
            h_mem: 1.0,
            h_term: 1.0,
            memory_available_bytes: 1 << 34,
        });
        if heartbeat_due {
            worker.next_heartbeat_us = now + HEARTBEAT_US;
        }
        worker.next_report_us = now + worker.report_gap_us;
        let command = Command::worker_report(
            &worker.name,
            std::mem::take(&mut worker.out_started),
            std::mem::take(&mut worker.out_finished),
            heartbeat,
            now / 1_000,
        );
        if let Some(command) = command {
            self.stats.worker_reports += 1;
            self.send_to_replica(
                replica,
                life,
                Event::Propose {
                    command,
                    reply: None,
                },
            );
        }
    }

    /// One worker fault: a crash (it comes back later with nothing), a pause of the whole
    /// machine, or a cut from every coordinator; a pause or a cut is short (at most half the
    /// lease) or longer than the lease. Returns a code for the step trace.
    pub(super) fn worker_fault(&mut self) -> u64 {
        let now = self.now_us.load(std::sync::atomic::Ordering::Relaxed);
        let healthy: Vec<usize> = (0..self.workers.len())
            .filter(|&w| self.workers[w].healthy())
            .collect();
        let Some(w) = self.rng.pick(&healthy) else {
            return 0;
        };
        let name = self.workers[w].name.clone();
        // What ran until this moment ran (and its lease may have run out meanwhile).
        self.worker_play(w, now);
        let roll = self.rng.below(100);
        if roll < 35 {
            let link = std::mem::replace(&mut self.workers[w].link, Link::Idle);
            if let Link::Registering {
                replica,
                life,
                conn,
                ..
            }
            | Link::Up {
                replica,
                life,
                conn,
                ..
            } = link
            {
                // The machine died (silence), or just the process (its socket closes).
                if !self.worker_blocked(w, replica) && self.rng.chance(500) {
                    self.send_to_replica(
                        replica,
                        life,
                        Event::WorkerDetached {
                            node: name.clone(),
                            conn,
                        },
                    );
                }
            }
            let down_ms = 300 + self.rng.below(3_700);
            let worker = &mut self.workers[w];
            self.stats.results_lost_in_worker_crashes += worker.unacked.len() as u64;
            let running = std::mem::take(&mut worker.running);
            worker.queue.clear();
            worker.running_cpus = 0;
            worker.unacked.clear();
            worker.out_started.clear();
            worker.out_finished.clear();
            worker.restart_at_us = Some(now + down_ms * 1_000);
            worker.faults.push(WorkerFault {
                blame: Blame::Crash,
                from_us: now,
                until_us: now + down_ms * 1_000,
            });
            for run in running.into_values() {
                self.executions
                    .end(run.execution, now, ExecutionEnd::Crashed);
            }
            self.stats.worker_crashes += 1;
            self.event(format!("worker {name} crashed for {down_ms} ms"));
            return 1;
        }
        let ((low, high), blame) = if self.rng.chance(500) {
            self.stats.worker_faults_short += 1;
            (SHORT_FAULT_MS, Blame::ShortFault)
        } else {
            self.stats.worker_faults_long += 1;
            (LONG_FAULT_MS, Blame::LongFault)
        };
        let fault_ms = low + self.rng.below(high - low + 1);
        let until = now + fault_ms * 1_000;
        self.workers[w].faults.push(WorkerFault {
            blame,
            from_us: now,
            until_us: until,
        });
        if roll < 70 {
            let worker = &mut self.workers[w];
            worker.paused_since_us = now;
            worker.paused_until_us = until;
            let frozen: Vec<ExecutionId> = worker.running.values().map(|r| r.execution).collect();
            for execution in frozen {
                self.executions.freeze(execution, now);
            }
            self.stats.worker_pauses += 1;
            self.event(format!("worker {name} paused for {fault_ms} ms"));
            return 2;
        }
        self.workers[w].isolated_until_us = until;
        self.stats.worker_isolations += 1;
        self.event(format!("worker {name} cut off for {fault_ms} ms"));
        3
    }

    /// Puts each worker on a side of a new partition (`minority_pm`: the chance of the
    /// side marked `true`).
    pub(super) fn partition_workers(&mut self, minority_pm: u64) {
        for w in 0..self.workers.len() {
            let side = self.rng.chance(minority_pm);
            self.workers[w].side = side;
        }
    }

    /// Ends every worker fault: the crashed restart, the paused resume, the cut reconnect.
    pub(super) fn heal_workers(&mut self) {
        let now = self.now_us.load(std::sync::atomic::Ordering::Relaxed);
        for worker in &mut self.workers {
            worker.side = false;
            for fault in &mut worker.faults {
                fault.until_us = fault.until_us.min(now);
            }
            if worker.restart_at_us.is_some() {
                worker.restart_at_us = Some(now);
            }
            if worker.paused_until_us > 0 {
                worker.paused_until_us = now;
            }
            if worker.isolated_until_us > 0 {
                worker.isolated_until_us = now;
            }
        }
    }

    /// The leader's state has every wave finished, and every worker is registered with
    /// nothing left to run, send or have acknowledged.
    pub(super) fn work_done(&self) -> bool {
        let leaders = self.leaders_now();
        let [leader] = leaders.as_slice() else {
            return false;
        };
        let Some(replica) = self.node(*leader).replica.as_ref() else {
            return false;
        };
        let state = replica.shared().state.read().unwrap();
        let finished = state.waves.values().all(|w| w.header.state.is_terminal());
        finished
            && self.workers.iter().all(|w| {
                matches!(w.link, Link::Up { replica, .. } if replica == *leader) && w.idle()
            })
    }

    /// Why the work is not done yet, for a settling that did not converge.
    pub(super) fn work_diagnosis(&self) -> String {
        let leaders = self.leaders_now();
        let [leader] = leaders.as_slice() else {
            return format!("no single leader (leaders {leaders:?})");
        };
        let Some(replica) = self.node(*leader).replica.as_ref() else {
            return String::new();
        };
        let state = replica.shared().state.read().unwrap();
        let unfinished = state
            .waves
            .values()
            .filter(|w| !w.header.state.is_terminal())
            .count();
        let mut out =
            format!("the work is not done: {unfinished} waves unfinished on leader {leader}");
        for w in &self.workers {
            let node = state.nodes.get(&w.name).map(|n| n.state);
            let attached = matches!(w.link, Link::Up { replica, .. } if replica == *leader);
            let held: Vec<AttemptRef> = w
                .unacked
                .keys()
                .copied()
                .filter(|a| {
                    state.task(a.key()).is_some_and(|t| {
                        t.attempt == a.attempt
                            && t.node.as_deref() == Some(w.name.as_str())
                            && matches!(t.state, TaskState::Assigned | TaskState::Running)
                    })
                })
                .collect();
            if attached && w.out_finished.is_empty() && !held.is_empty() {
                out.push_str(&format!(
                    "; worker {} is attached to the leader and holds {} results it sent but \
                     never saw acknowledged, e.g. {}, whose micro-tasks stay assigned to it: \
                     a report was lost while its stream stayed up, and it sends them again \
                     only when it registers again",
                    w.name,
                    held.len(),
                    held[0]
                ));
            } else if attached && node == Some(NodeState::Down) {
                out.push_str(&format!(
                    "; worker {} is attached to the leader while its node is marked down",
                    w.name
                ));
            } else if !attached {
                out.push_str(&format!("; worker {} is {}", w.name, w.link.name()));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attempt(attempt: u32) -> AttemptRef {
        AttemptRef {
            wave_id: 7,
            micro: 3,
            attempt,
        }
    }

    #[test]
    fn sim_intervals_overlap_only_when_they_share_time() {
        assert_eq!(overlap(&[(0, 100)], &[(100, 200)]), None);
        assert_eq!(overlap(&[(0, 100)], &[(50, 60)]), Some((50, 60)));
        assert_eq!(overlap(&[(0, 50), (150, 200)], &[(60, 140)]), None);
        assert_eq!(
            overlap(&[(0, 50), (150, 200)], &[(60, 151)]),
            Some((150, 151))
        );
        assert_eq!(overlap(&[(10, 10)], &[(0, 100)]), None);
    }

    #[test]
    fn sim_overlap_check_catches_two_runs_of_one_micro_task_at_once() {
        let mut runs = Executions::default();
        let first = runs.begin(attempt(1), "wk1", 1_000);
        runs.end(first, 2_000, ExecutionEnd::Fenced);
        let second = runs.begin(attempt(2), "wk2", 1_500);
        runs.end(second, 2_500, ExecutionEnd::Exited);
        let error = runs.check(3_000).unwrap_err();
        assert!(
            error.contains("micro-task (7, 3) ran twice at once for 500 µs"),
            "{error}"
        );
        assert!(error.contains("attempt 1 on wk1") && error.contains("attempt 2 on wk2"));
    }

    #[test]
    fn sim_overlap_check_counts_a_running_execution_until_now() {
        let mut runs = Executions::default();
        runs.begin(attempt(1), "wk1", 1_000);
        // Starting exactly at the time checked: no time shared yet.
        runs.begin(attempt(2), "wk2", 1_600);
        runs.check(1_600).unwrap();
        // Both still run a moment later: the micro-task is checked again though untouched.
        let error = runs.check(1_700).unwrap_err();
        assert!(error.contains("ran twice at once for 100 µs"), "{error}");
    }

    #[test]
    fn sim_overlap_check_leaves_out_the_time_a_machine_was_frozen() {
        let mut runs = Executions::default();
        let frozen = runs.begin(attempt(1), "wk1", 1_000);
        runs.freeze(frozen, 1_200);
        let other = runs.begin(attempt(2), "wk2", 1_300);
        runs.end(other, 1_900, ExecutionEnd::Exited);
        runs.check(1_900).unwrap();
        // Killed as it thawed: it ran no further.
        runs.end(frozen, 2_000, ExecutionEnd::Fenced);
        runs.check_all(2_000).unwrap();

        // Thawed while the other still ran: caught.
        let mut runs = Executions::default();
        let frozen = runs.begin(attempt(1), "wk1", 1_000);
        runs.freeze(frozen, 1_200);
        let other = runs.begin(attempt(2), "wk2", 1_300);
        runs.resume(frozen, 1_800);
        runs.end(other, 1_900, ExecutionEnd::Exited);
        assert!(runs.check(1_900).is_err());
    }

    #[test]
    fn sim_a_re_execution_is_blamed_on_the_worst_fault_in_its_window() {
        let faults = [
            WorkerFault {
                blame: Blame::ShortFault,
                from_us: 100,
                until_us: 200,
            },
            WorkerFault {
                blame: Blame::Crash,
                from_us: 500,
                until_us: 900,
            },
        ];
        assert_eq!(blame(&faults, 0, 99), Blame::NoWorkerFault);
        assert_eq!(blame(&faults, 150, 400), Blame::ShortFault);
        assert_eq!(blame(&faults, 150, 600), Blame::Crash);
        assert_eq!(blame(&faults, 901, 1_000), Blame::NoWorkerFault);

        // Coordinator outages count once they add up to more than half the lease.
        let outage = |from_us, until_us| WorkerFault {
            blame: Blame::CoordinatorOutage,
            from_us,
            until_us,
        };
        let second = 1_000_000;
        let faults = [outage(0, second), outage(2 * second, 3 * second)];
        assert_eq!(blame(&faults, 0, 3 * second), Blame::CoordinatorOutage);
        assert_eq!(blame(&faults, 0, 2 * second), Blame::NoWorkerFault);
        assert_eq!(
            blame(&faults, second / 2, 3 * second - second / 2),
            Blame::NoWorkerFault
        );
    }

    #[test]
    fn sim_machine_clocks_drift_and_invert() {
        let slow = MachineClock {
            rate_ppm: MachineClock::RATE_MIN_PPM,
            offset_us: 123,
        };
        let fast = MachineClock {
            rate_ppm: MachineClock::RATE_MAX_PPM,
            offset_us: 0,
        };
        let second = super::super::EPOCH_US + 1_000_000;
        assert_eq!(slow.read_us(second), 123 + 990_000);
        assert_eq!(fast.read_us(second), 1_010_000);
        for reading in [0, 1, 990_123, 1_234_567, 10_000_000_000] {
            let at = slow.reaches_at(reading);
            assert!(slow.read_us(at) >= reading);
            assert!(at == super::super::EPOCH_US || slow.read_us(at - 1) < reading);
        }
    }
}
