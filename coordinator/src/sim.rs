//! Deterministic simulation of a coordinator cluster inside one process: three or five
//! [`Replica`]s, each on its own sled directory, exchange raft messages over a simulated
//! network and are driven turn by turn from one seeded random generator on a virtual
//! clock — no threads, no sleeps, no wall clock, so a seed replays exactly.
//!
//! The network loses, reorders and duplicates messages; faults split the cluster (at
//! random, or with the leader in the minority), cut single links one way, and crash
//! replicas (the value is dropped with no shutdown; its directory stays) to restart them
//! later from disk. A minority of the voters at most is down at a time. In a third of the
//! seeds the leader is also asked, now and then, to add a coordinator (a new replica
//! started empty with `join`, which catches up by snapshot) or to remove one (the leader
//! itself included: it hands leadership over first and the request is retried on the next
//! leader), keeping three to five voters; a removed replica keeps running for a while.
//!
//! Two or three simulated workers (see `sim_workers.rs`) run the submitted waves (arrays,
//! and small DAGs with retries) on the same clock and generator. Each attaches to the
//! replica it believes leads (`Event::WorkerAttached`, a channel it polls), registers
//! (`Command::register`: what it runs and every result not acknowledged yet), and sends
//! starts, results and heartbeats as one `Command::worker_report` proposal per message;
//! an attempt "runs" for a random virtual time (mostly under 150 ms, 3 % of them one to
//! three leases) and some exit non-zero, so retries happen.
//! A worker follows whoever leads: when its replica crashes, stops leading, or is cut off
//! from it by a partition, it reconnects (following "not leader" hints, with backoff) and
//! registers again. Worker faults: a crash (it has no disk, so it loses what it ran and
//! its unacknowledged results), a pause of the whole machine, and a cut from every
//! coordinator; a pause or a cut lasts at most half the lease or longer than it.
//!
//! Leases are judged under clock drift. Every replica's monotonic clock (`Clock::
//! monotonic_ms`, on which the leader counts leases) and every worker's runs at a rate of
//! its machine's, drawn in [0.99, 1.01] of the virtual time (the bounds a third of the
//! time each), from an arbitrary reading of its own that changes at every restart. A
//! worker behaves as the agent does: it numbers its messages from 1 in every process life,
//! remembers when it sent each registration and heartbeat on its own clock, and applies a
//! lease grant (`CoordinatorMessage.lease`) as `AgentState::on_lease` does; it starts
//! nothing without a lease; when the lease runs out it kills what runs (its results are
//! dropped), drops its queue and registers again (abandoning a registration on its way);
//! with no renewal for two heartbeats and 250 ms it gives up on its stream.
//!
//! After every step a checker asserts at most one leader per term, that a replica that
//! applied its own removal never leads again in a later term (raft-rs counts a membership
//! change once applied, so one whose removal is only in its log may still win a later term
//! from voters that have not applied it either, and steps down when it applies it), and that every replica applies the same entry at
//! each index (across restarts and removals too). The ledger reads each committed entry
//! from the log of the replica that first applied it and replays the log in order on a
//! state of its own; before applying a result it judges it by the fencing rule on the
//! state at that point (current: it names the micro-task's current attempt on the node
//! that has it), and asserts that a current result is recorded (success, failure,
//! retry, cancellation as its outcome says) and not counted stale, that a stale one is
//! counted once and changes nothing, that no micro-task is ended by two results, that a
//! lost node (marked down, or registering without it) gives its micro-tasks back to
//! ready without using a retry, and that every result a worker saw acknowledged is in
//! the log as the worker produced it. Every attempt's execution is recorded in virtual
//! time, from its start until it exits or is killed (a frozen machine's attempts are
//! frozen with it), and after every step no two executions of one micro-task may have
//! overlapped: that is what leases guarantee (`leases.rs`).
//!
//! At the end the faults heal (workers too), the cluster (joiners included) must
//! converge with every wave finished and every worker idle, every acknowledged wave must
//! be present on every member, all members must hold the same replicated state — the
//! ledger's too — and their membership must be the founders changed by the committed
//! changes in order (every acknowledged one among them); every acknowledged result must
//! be recorded in the final state (the micro-task ends with that attempt, or a later one
//! exists because it was a retried failure, or it was stale when committed), every
//! micro-task that succeeded or failed must show the one result that ended it, and the
//! stale count must be exactly the results that were stale. All this is checked once
//! after the faults and once more after every replica was crashed and restarted
//! together. Then the executions are counted: a micro-task run again other than to retry
//! an accepted failure is a re-execution, put down to the worst the earlier run's worker
//! saw in between: a crash, a pause or cut-off longer than the lease, a coordinator outage
//! (more than half a lease in all without a committing leader it could reach), a short
//! pause or cut-off, or none of these.
//!
//! `VENOM_SIM_SEEDS=<n>` sets how many seeds each test runs; `VENOM_SIM_SEED=<seed>`
//! runs exactly that seed (a failure prints the command that replays it);
//! `VENOM_SIM_STEPS=<n>` lengthens (or shortens) the faulty phase of every seed.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use raft::eraftpb::{Message as RaftMessage, MessageType};
use raft::StateRole;
use tokio::sync::oneshot;
use tokio::sync::oneshot::error::TryRecvError;

use venom_core::mobius::ThrottlePolicy;
use venom_core::wave::{parse_wave, Format, WaveLimits};

use crate::replica::{Clock, Event, MemberChange, ProposeError, Replica, ReplicaConfig};
use crate::state::{Command, NodeSpec, Outcome, State, StateSnapshot, WaveId};
use crate::storage::Store;
use crate::transport::Transport;

#[path = "sim_workers.rs"]
mod workers;

use workers::{Executions, Ledger, PendingAck, SimWorker};

/// Virtual time per step of the faulty phase.
const STEP_US: u64 = 10_000;
/// Virtual time per round of the settling phase (one tick of every replica).
const SETTLE_ROUND_US: u64 = 100_000;
/// Rounds the healed cluster gets to converge (a lost snapshot is resent after 10 s).
const SETTLE_MAX_ROUNDS: u64 = 1_500;
/// Where the virtual clock starts (µs since the epoch: 2023-11-14).
const EPOCH_US: u64 = 1_700_000_000_000_000;
/// How long a worker's lease lasts (`--worker-lease-ms`): six heartbeat intervals of the
/// simulated workers (the defaults make it ten: 10 s, heartbeats every second), so that
/// leases run out many times within a seed's 30 s of faults.
const WORKER_LEASE_MS: u64 = 3_000;

/// splitmix64: small, fast, and the same on every platform.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (0 when `n` is 0).
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }

    /// True with probability `per_mille` / 1000.
    fn chance(&mut self, per_mille: u64) -> bool {
        self.below(1_000) < per_mille
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> Option<T> {
        if items.is_empty() {
            None
        } else {
            Some(items[self.below(items.len() as u64) as usize])
        }
    }
}

/// A machine's monotonic clock: it runs at `rate_ppm` millionths of the virtual time's rate
/// — between 0.99 and 1.01, the timing assumption of `leases.rs` — from an offset of its own,
/// so no two clocks agree on the time, nor on how long anything lasted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct MachineClock {
    rate_ppm: u64,
    offset_us: u64,
}

impl MachineClock {
    /// The slowest and fastest rates a clock may run at, in millionths of the virtual rate.
    const RATE_MIN_PPM: u64 = 990_000;
    const RATE_MAX_PPM: u64 = 1_010_000;

    /// A new machine's rate: a third of the time each bound (the worst cases for leases: a
    /// slow worker and a fast leader), else anywhere between.
    fn draw_rate(rng: &mut Rng) -> u64 {
        match rng.below(3) {
            0 => Self::RATE_MIN_PPM,
            1 => Self::RATE_MAX_PPM,
            _ => Self::RATE_MIN_PPM + rng.below(Self::RATE_MAX_PPM - Self::RATE_MIN_PPM + 1),
        }
    }

    /// The clock of a machine running at `rate_ppm`, started afresh (any reading at all).
    fn start(rate_ppm: u64, rng: &mut Rng) -> Self {
        Self {
            rate_ppm,
            offset_us: rng.below(1 << 40),
        }
    }

    /// How fast it runs, in millionths of the virtual rate.
    fn rate_ppm(&self) -> u64 {
        self.rate_ppm
    }

    /// The reading at virtual time `true_us`, in microseconds.
    pub(super) fn read_us(&self, true_us: u64) -> u64 {
        let elapsed = u128::from(true_us.saturating_sub(EPOCH_US));
        self.offset_us + (elapsed * u128::from(self.rate_ppm) / 1_000_000) as u64
    }

    /// The first virtual time at which the reading is at least `reading_us`.
    pub(super) fn reaches_at(&self, reading_us: u64) -> u64 {
        let ahead = u128::from(reading_us.saturating_sub(self.offset_us));
        EPOCH_US + (ahead * 1_000_000).div_ceil(u128::from(self.rate_ppm)) as u64
    }
}

/// Time as the harness sets it, read on one replica's machine: the wall clock is the
/// virtual time, the monotonic clock (leases are measured on it) is the machine's.
struct VirtualClock {
    now_us: Arc<AtomicU64>,
    monotonic: MachineClock,
}

impl Clock for VirtualClock {
    fn now_us(&self) -> u64 {
        self.now_us.load(Ordering::Relaxed)
    }

    fn monotonic_ms(&self) -> u64 {
        self.monotonic.read_us(self.now_us()) / 1_000
    }
}

/// Messages in flight, shared by every replica's transport.
type Wire = Arc<Mutex<Vec<RaftMessage>>>;

/// Like the gRPC transport, sends only to the replica's current members and to the
/// senders it learned a route to (a message for anyone else is dropped at the sender).
struct SimTransport {
    wire: Wire,
    members: BTreeSet<u64>,
    /// Senders whose address the replica learned from their batches.
    learned: Arc<Mutex<BTreeSet<u64>>>,
}

impl Transport for SimTransport {
    fn send(&mut self, messages: Vec<RaftMessage>) {
        let members = &self.members;
        let learned = self.learned.lock().unwrap();
        self.wire.lock().unwrap().extend(
            messages
                .into_iter()
                .filter(|m| members.contains(&m.to) || learned.contains(&m.to)),
        );
    }

    fn set_members(&mut self, members: &BTreeMap<u64, String>) {
        self.members = members.keys().copied().collect();
    }
}

/// How one seed's run behaves (drawn from the seed).
#[derive(Debug, Clone)]
struct Params {
    steps: u64,
    compact_after: u64,
    max_entry_bytes: usize,
    drop_pm: u64,
    dup_pm: u64,
    fault_pm: u64,
    propose_pm: u64,
    tick_pm: u64,
    /// Chance per step of asking the leader for a membership change (0 in most seeds).
    member_change_pm: u64,
    /// Simulated workers.
    workers: u64,
    /// Chance per step of a worker fault.
    worker_fault_pm: u64,
    /// Chance that an attempt exits non-zero.
    task_fail_pm: u64,
}

/// What a run did, summed over seeds for the printed summary.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Stats {
    seeds: u64,
    steps: u64,
    settle_rounds: u64,
    /// Terms in which some replica was leader.
    leaders: u64,
    crashes: u64,
    partitions: u64,
    one_way_cuts: u64,
    heals: u64,
    messages_delivered: u64,
    messages_dropped: u64,
    messages_duplicated: u64,
    snapshots_delivered: u64,
    snapshots_installed: u64,
    proposed: u64,
    acknowledged: u64,
    refused_by_followers: u64,
    failed: u64,
    lost_in_crash: u64,
    rejected: u64,
    final_applied: u64,
    member_changes_proposed: u64,
    member_changes_acknowledged: u64,
    /// Refused at once by a leader (leadership handed over, another change pending).
    member_changes_refused: u64,
    /// Asked of a replica that does not lead, which refused at once.
    member_changes_refused_by_followers: u64,
    /// Failed after raft took them (leadership lost, crash): decided later from the log.
    member_changes_unanswered: u64,
    /// Unanswered changes that turned out committed.
    member_changes_committed_unanswered: u64,
    joiners_caught_up: u64,
    removed_dropped: u64,
    workers: u64,
    worker_crashes: u64,
    worker_pauses: u64,
    worker_isolations: u64,
    worker_registrations: u64,
    worker_disconnects: u64,
    /// Connections refused by a replica that does not lead.
    worker_refusals: u64,
    worker_reports: u64,
    assignments: u64,
    attempts_run: u64,
    attempts_failed: u64,
    attempts_cancelled: u64,
    results_acked: u64,
    results_lost_in_worker_crashes: u64,
    /// Committed results that named the current attempt (the ledger's count).
    results_accepted: u64,
    /// Accepted failures that sent their micro-task back to ready.
    retries: u64,
    /// Stale results: a later attempt existed.
    stale_superseded: u64,
    /// Stale results: the micro-task had been taken off the node (lost, re-registered).
    stale_returned: u64,
    /// Stale results: the micro-task had ended (recorded already, or cancelled).
    stale_after_end: u64,
    nodes_marked_down: u64,
    /// Micro-tasks taken off a lost node (or one that registered without them).
    returned_to_ready: u64,
    /// Micro-tasks not finished when the faults ended.
    backlog: u64,
    /// Micro-tasks and finished waves in the final state.
    micro_tasks: u64,
    waves_finished: u64,
    /// Worker pauses and cut-offs shorter than half the lease, and longer than the lease and
    /// its margin.
    worker_faults_short: u64,
    worker_faults_long: u64,
    /// Lease grants a worker applied, and grants naming no message it remembered.
    lease_grants: u64,
    lease_grants_unmatched: u64,
    /// Leases that ran out on a worker.
    lease_expiries: u64,
    /// Expiries that killed running attempts or dropped queued ones, and how many.
    fences: u64,
    attempts_fenced: u64,
    queued_dropped: u64,
    /// Fences within a lease after the start of the worst of: a worker crash, pause or
    /// cut-off longer than the lease; a coordinator outage (no leader the worker could
    /// reach, or nothing committed, for more than half the lease); a worker pause or cut-off
    /// shorter than half the lease; none of these.
    fences_long_fault: u64,
    fences_outage: u64,
    fences_short_fault: u64,
    fences_no_worker_fault: u64,
    /// Streams given up because no lease renewal came for the silence deadline.
    silence_reconnects: u64,
    /// Attempt executions (a start on a worker until its end), and the comparisons of two
    /// executions of one micro-task made to find an overlap.
    executions: u64,
    overlap_pairs_checked: u64,
    /// Executions that ran a micro-task again (not a retry after an accepted failure), by
    /// the worst fault the worker of the execution before saw between that execution's
    /// start and the new one's: a crash, a pause or cut-off longer than the lease, a
    /// coordinator outage, a short pause or cut-off, none.
    re_executions_crash: u64,
    re_executions_long_fault: u64,
    re_executions_outage: u64,
    re_executions_short_fault: u64,
    re_executions_no_worker_fault: u64,
}

impl Stats {
    fn add(&mut self, o: &Stats) {
        self.seeds += o.seeds;
        self.steps += o.steps;
        self.settle_rounds += o.settle_rounds;
        self.leaders += o.leaders;
        self.crashes += o.crashes;
        self.partitions += o.partitions;
        self.one_way_cuts += o.one_way_cuts;
        self.heals += o.heals;
        self.messages_delivered += o.messages_delivered;
        self.messages_dropped += o.messages_dropped;
        self.messages_duplicated += o.messages_duplicated;
        self.snapshots_delivered += o.snapshots_delivered;
        self.snapshots_installed += o.snapshots_installed;
        self.proposed += o.proposed;
        self.acknowledged += o.acknowledged;
        self.refused_by_followers += o.refused_by_followers;
        self.failed += o.failed;
        self.lost_in_crash += o.lost_in_crash;
        self.rejected += o.rejected;
        self.final_applied += o.final_applied;
        self.member_changes_proposed += o.member_changes_proposed;
        self.member_changes_acknowledged += o.member_changes_acknowledged;
        self.member_changes_refused += o.member_changes_refused;
        self.member_changes_refused_by_followers += o.member_changes_refused_by_followers;
        self.member_changes_unanswered += o.member_changes_unanswered;
        self.member_changes_committed_unanswered += o.member_changes_committed_unanswered;
        self.joiners_caught_up += o.joiners_caught_up;
        self.removed_dropped += o.removed_dropped;
        self.workers += o.workers;
        self.worker_crashes += o.worker_crashes;
        self.worker_pauses += o.worker_pauses;
        self.worker_isolations += o.worker_isolations;
        self.worker_registrations += o.worker_registrations;
        self.worker_disconnects += o.worker_disconnects;
        self.worker_refusals += o.worker_refusals;
        self.worker_reports += o.worker_reports;
        self.assignments += o.assignments;
        self.attempts_run += o.attempts_run;
        self.attempts_failed += o.attempts_failed;
        self.attempts_cancelled += o.attempts_cancelled;
        self.results_acked += o.results_acked;
        self.results_lost_in_worker_crashes += o.results_lost_in_worker_crashes;
        self.results_accepted += o.results_accepted;
        self.retries += o.retries;
        self.stale_superseded += o.stale_superseded;
        self.stale_returned += o.stale_returned;
        self.stale_after_end += o.stale_after_end;
        self.nodes_marked_down += o.nodes_marked_down;
        self.returned_to_ready += o.returned_to_ready;
        self.backlog += o.backlog;
        self.micro_tasks += o.micro_tasks;
        self.waves_finished += o.waves_finished;
        self.worker_faults_short += o.worker_faults_short;
        self.worker_faults_long += o.worker_faults_long;
        self.lease_grants += o.lease_grants;
        self.lease_grants_unmatched += o.lease_grants_unmatched;
        self.lease_expiries += o.lease_expiries;
        self.fences += o.fences;
        self.attempts_fenced += o.attempts_fenced;
        self.queued_dropped += o.queued_dropped;
        self.fences_long_fault += o.fences_long_fault;
        self.fences_outage += o.fences_outage;
        self.fences_short_fault += o.fences_short_fault;
        self.fences_no_worker_fault += o.fences_no_worker_fault;
        self.silence_reconnects += o.silence_reconnects;
        self.executions += o.executions;
        self.overlap_pairs_checked += o.overlap_pairs_checked;
        self.re_executions_crash += o.re_executions_crash;
        self.re_executions_long_fault += o.re_executions_long_fault;
        self.re_executions_outage += o.re_executions_outage;
        self.re_executions_short_fault += o.re_executions_short_fault;
        self.re_executions_no_worker_fault += o.re_executions_no_worker_fault;
    }
}

/// A proposal whose answer has not arrived yet.
struct Pending {
    node: u64,
    life: u64,
    /// The wave's name, for a submission.
    wave: Option<String>,
    rx: oneshot::Receiver<Result<Outcome, ProposeError>>,
}

struct SimNode {
    id: u64,
    dir: PathBuf,
    replica: Option<Replica<SimTransport>>,
    /// Events were handled since the last turn.
    needs_turn: bool,
    /// Incremented at every start.
    life: u64,
    /// The applied index as of the last check, in this life.
    applied: u64,
    /// This life's election timeout, in ticks.
    election_ticks: usize,
    /// For a replica added by a membership change: the addresses it starts with (the
    /// members when it was added, itself included). `None` for a founder.
    join: Option<BTreeMap<u64, String>>,
    /// A joiner has installed its first snapshot.
    caught_up: bool,
    /// Stopped for good: removed from the cluster, or added by a change that never
    /// committed.
    gone: bool,
    /// This life's transport's learned senders.
    learned: Arc<Mutex<BTreeSet<u64>>>,
    /// The rate of its machine's monotonic clock (each life starts it at another reading).
    clock_rate_ppm: u64,
}

impl SimNode {
    fn new(
        id: u64,
        dir: PathBuf,
        join: Option<BTreeMap<u64, String>>,
        clock_rate_ppm: u64,
    ) -> Self {
        Self {
            id,
            dir,
            clock_rate_ppm,
            replica: None,
            needs_turn: false,
            life: 0,
            applied: 0,
            election_ticks: 0,
            join,
            caught_up: false,
            gone: false,
            learned: Arc::default(),
        }
    }
}

/// A membership change raft took, until the cluster's log decides it.
struct ChangeInFlight {
    change: MemberChange,
    /// The replica it was proposed on, and that replica's life then.
    node: u64,
    life: u64,
    /// The proposer's term: the change's entry, if it commits, is of this term.
    term: u64,
    /// The answer, until it comes. `None` once the proposer failed it (it lost leadership
    /// or crashed): whether the change committed is then read from the applied state of a
    /// leader of a later term once that leader committed an entry of its own term — by
    /// then the change's entry is in its log (and applied) or can never commit.
    rx: Option<oneshot::Receiver<Result<Outcome, ProposeError>>>,
}

/// A replica whose removal committed.
struct Removed {
    /// It may be leader in no term above this: the removal's term, or a later one it was
    /// already seen leading before the removal was known to be committed.
    last_term: u64,
    /// The faulty-phase step after which it is stopped for good.
    drop_at_step: u64,
}

/// The result of one run: what it did, a digest of every step and of the final state.
#[derive(Debug, PartialEq, Eq)]
struct Report {
    stats: Stats,
    trace: Vec<u64>,
    final_digest: u64,
}

struct Sim {
    seed: u64,
    n: u64,
    rng: Rng,
    params: Params,
    now_us: Arc<AtomicU64>,
    wire: Wire,
    /// The founding members (replicas `1..=n`).
    founders: BTreeMap<u64, String>,
    /// The current voters: the founders changed by every committed membership change in
    /// order (exact while no change is in flight).
    members: BTreeMap<u64, String>,
    /// Every replica ever started, at index `id - 1` (joiners get the next ids).
    nodes: Vec<SimNode>,
    /// Partition side of each replica (index `id - 1`, missing: `false`); links between
    /// sides are down.
    side: Vec<bool>,
    /// One-way cuts: messages `from → to` are lost.
    cuts: BTreeSet<(u64, u64)>,
    /// Every applied index → (term, data hash, first replica seen applying it).
    applied_log: BTreeMap<u64, (u64, u64, u64)>,
    /// Term → the replica that was leader in it.
    leaders: BTreeMap<u64, u64>,
    pending: Vec<Pending>,
    /// Acknowledged submissions: wave name → wave id.
    acked: BTreeMap<String, WaveId>,
    /// The membership change raft took and the cluster has not decided yet (one at a time).
    change: Option<ChangeInFlight>,
    /// A removal the leader answered by handing leadership over: asked again next time.
    retry: Option<MemberChange>,
    /// The committed membership changes, in order.
    committed_changes: Vec<MemberChange>,
    /// Removed replicas, by id.
    removed: BTreeMap<u64, Removed>,
    /// Crashes, restarts and membership events with their step, for a failure report.
    events: Vec<String>,
    next_wave: u64,
    stats: Stats,
    trace: Vec<u64>,
    /// The simulated workers.
    workers: Vec<SimWorker>,
    /// The committed log replayed in order, and the checks on it.
    ledger: Ledger,
    /// Results workers saw acknowledged, until the ledger has applied that far.
    pending_acks: Vec<PendingAck>,
    /// Acknowledged results the ledger found in the log.
    acked_results: Vec<crate::state::AttemptResult>,
    /// When each attempt ran, in virtual time: no two of one micro-task may overlap.
    executions: Executions,
    /// The ledger's applied index when it last advanced, and the virtual time it did.
    outage_watch: (u64, u64),
    /// The next worker stream id.
    next_conn: u64,
    /// Settling: the work is done and workers are idle, so they stop heartbeating while
    /// the cluster converges.
    quiet: bool,
    /// Holds every replica's directory; removed with the run.
    root: tempfile::TempDir,
}

fn mix(h: u64, v: u64) -> u64 {
    (h ^ v).wrapping_mul(0x0000_0100_0000_01B3).rotate_left(17)
}

fn hash_bytes(bytes: &[u8]) -> u64 {
    use std::hash::{Hash as _, Hasher as _};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut hasher);
    hasher.finish()
}

/// The sled directories live in memory when possible (an fsync per raft `Ready` is free).
fn sim_dir() -> tempfile::TempDir {
    let shm = std::path::Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(dir) = tempfile::Builder::new()
            .prefix("venom-sim-")
            .tempdir_in(shm)
        {
            return dir;
        }
    }
    tempfile::Builder::new()
        .prefix("venom-sim-")
        .tempdir()
        .unwrap()
}

/// Copies a directory tree (a sled database) file by file.
fn copy_dir(from: &std::path::Path, to: &std::path::Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

/// A replica's client address (the simulated transport routes by id).
fn address(id: u64) -> String {
    format!("sim://{id}")
}

fn role_name(role: StateRole) -> &'static str {
    match role {
        StateRole::Leader => "leader",
        StateRole::Follower => "follower",
        StateRole::Candidate => "candidate",
        StateRole::PreCandidate => "pre-candidate",
    }
}

/// The replicated part of a replica's state, as a snapshot would carry it.
fn replicated(state: &State) -> StateSnapshot {
    StateSnapshot {
        members: state.members.clone(),
        cluster_id: state.cluster_id,
        members_started: state.members_started.clone(),
        waves: state.waves.values().cloned().collect(),
        nodes: state.nodes.values().cloned().collect(),
        next_wave_id: state.next_wave_id,
        stale_results: state.stale_results,
        submissions: state.submissions.iter().cloned().collect(),
    }
}

impl Sim {
    fn new(n: u64, seed: u64, steps: u64) -> Self {
        let mut rng = Rng::new(seed.wrapping_mul(0xD1B5_4A32_D192_ED03) ^ n);
        let compact_after = if rng.chance(600) {
            20 + rng.below(31)
        } else {
            100_000
        };
        let max_entry_bytes = if rng.chance(250) { 1_000 } else { 4 << 20 };
        let params = Params {
            steps,
            compact_after,
            max_entry_bytes,
            drop_pm: rng.below(150),
            dup_pm: rng.below(20),
            fault_pm: 5 + rng.below(25),
            propose_pm: 100 + rng.below(300),
            tick_pm: 100,
            member_change_pm: if rng.chance(333) { 4 + rng.below(8) } else { 0 },
            workers: 0,
            worker_fault_pm: 0,
            task_fail_pm: 0,
        };
        // Drawn after the rest, so every seed keeps the settings it had before workers
        // (the runs differ all the same: workers propose, and draw from the generator).
        let params = Params {
            workers: 2 + rng.below(2),
            worker_fault_pm: 1 + rng.below(3),
            task_fail_pm: 30 + rng.below(120),
            ..params
        };
        let workers = (1..=params.workers)
            .map(|i| {
                let slots = 2 + rng.below(3) as u32;
                let queue_depth = 2 + rng.below(5) as u32;
                let report_gap_us = (20 + rng.below(80)) * 1_000;
                let rate = MachineClock::draw_rate(&mut rng);
                let clock = MachineClock::start(rate, &mut rng);
                SimWorker::new(format!("wk{i}"), slots, queue_depth, report_gap_us, clock)
            })
            .collect();
        let n_workers = params.workers;
        let dir = sim_dir();
        let members: BTreeMap<u64, String> = (1..=n).map(|id| (id, address(id))).collect();
        let ledger = Ledger::new(&members);
        let nodes = (1..=n)
            .map(|id| {
                let rate = MachineClock::draw_rate(&mut rng);
                SimNode::new(id, dir.path().join(id.to_string()), None, rate)
            })
            .collect();
        Self {
            seed,
            n,
            rng,
            params,
            now_us: Arc::new(AtomicU64::new(EPOCH_US)),
            wire: Arc::new(Mutex::new(Vec::new())),
            founders: members.clone(),
            members,
            nodes,
            side: vec![false; n as usize],
            cuts: BTreeSet::new(),
            applied_log: BTreeMap::new(),
            leaders: BTreeMap::new(),
            pending: Vec::new(),
            acked: BTreeMap::new(),
            change: None,
            retry: None,
            committed_changes: Vec::new(),
            removed: BTreeMap::new(),
            events: Vec::new(),
            next_wave: 0,
            stats: Stats {
                seeds: 1,
                workers: n_workers,
                ..Stats::default()
            },
            trace: Vec::new(),
            workers,
            ledger,
            pending_acks: Vec::new(),
            acked_results: Vec::new(),
            executions: Executions::default(),
            outage_watch: (0, EPOCH_US),
            next_conn: 1,
            quiet: false,
            root: dir,
        }
    }

    /// The whole run; returns the digest of the final state.
    fn run(&mut self) -> Result<u64, String> {
        for id in 1..=self.n {
            self.start(id)?;
        }
        for _ in 0..self.params.steps {
            self.step()?;
        }
        self.stats.backlog = self
            .ledger
            .state
            .waves
            .values()
            .flat_map(|w| &w.tasks)
            .filter(|t| !t.state.is_terminal())
            .count() as u64;
        self.settle("after the faults")?;
        let digest = self.check_states()?;
        self.check_work(digest, false)?;
        // Every replica loses power at once, then all come back from disk.
        for id in self.present() {
            self.crash(id, true)?;
        }
        for id in self.present() {
            self.start(id)?;
        }
        self.settle("after every replica restarted at once")?;
        let digest = self.check_states()?;
        self.check_work(digest, true)?;
        self.count_re_executions()?;
        self.stats.final_applied = self
            .members
            .keys()
            .map(|&id| self.node(id).applied)
            .max()
            .unwrap_or(0);
        Ok(digest)
    }

    /// Notes an event for the failure report.
    fn event(&mut self, what: String) {
        let phase = if self.stats.settle_rounds > 0 {
            format!("settling round {}", self.stats.settle_rounds)
        } else {
            format!("step {}", self.stats.steps)
        };
        self.events.push(format!("{phase}: {what}"));
    }

    fn node(&self, id: u64) -> &SimNode {
        &self.nodes[(id - 1) as usize]
    }

    fn node_mut(&mut self, id: u64) -> &mut SimNode {
        &mut self.nodes[(id - 1) as usize]
    }

    /// Every replica not stopped for good, running or down.
    fn present(&self) -> Vec<u64> {
        self.nodes
            .iter()
            .filter(|n| !n.gone)
            .map(|n| n.id)
            .collect()
    }

    /// The present replicas that are down.
    fn down(&self) -> BTreeSet<u64> {
        self.nodes
            .iter()
            .filter(|n| !n.gone && n.replica.is_none())
            .map(|n| n.id)
            .collect()
    }

    fn now_ms(&self) -> u64 {
        self.now_us.load(Ordering::Relaxed) / 1_000
    }

    fn live(&self) -> Vec<u64> {
        self.nodes
            .iter()
            .filter(|n| n.replica.is_some())
            .map(|n| n.id)
            .collect()
    }

    fn role(&self, id: u64) -> Option<StateRole> {
        self.node(id).replica.as_ref().map(|r| r.raft().raft.state)
    }

    /// The live replicas that think they lead.
    fn leaders_now(&self) -> Vec<u64> {
        self.live()
            .into_iter()
            .filter(|&id| self.role(id) == Some(StateRole::Leader))
            .collect()
    }

    /// Opens replica `id` on its directory (a new founder bootstraps the founding
    /// members; a new joiner starts empty and waits for the leader's snapshot).
    fn start(&mut self, id: u64) -> Result<(), String> {
        let idx = (id - 1) as usize;
        let store = Store::open(&self.nodes[idx].dir)
            .map_err(|e| format!("replica {id}: cannot open its store: {e}"))?;
        // raft draws the election timeout from [min, max) with its own random generator:
        // a one-tick range keeps the run reproducible. Live replicas get different
        // timeouts, or equal ones could split the vote in lockstep forever.
        let taken: BTreeSet<usize> = self
            .nodes
            .iter()
            .filter(|n| n.replica.is_some() && n.id != id)
            .map(|n| n.election_ticks)
            .collect();
        let free: Vec<usize> = (10..20).filter(|t| !taken.contains(t)).collect();
        let ticks = self.rng.pick(&free).unwrap_or(10);
        let join = self.nodes[idx].join.clone();
        let config = ReplicaConfig {
            id,
            join: join.is_some(),
            // A founder founds only on its first start; later starts must find its state.
            bootstrap: join.is_none() && self.nodes[idx].life == 0,
            members: join.unwrap_or_else(|| self.founders.clone()),
            election_ticks: (ticks, ticks + 1),
            tick: Duration::from_millis(100),
            worker_lease_ms: WORKER_LEASE_MS,
            max_entry_bytes: self.params.max_entry_bytes,
            compact_after_entries: self.params.compact_after,
        };
        let monotonic = MachineClock::start(self.nodes[idx].clock_rate_ppm, &mut self.rng);
        let clock: Arc<dyn Clock> = Arc::new(VirtualClock {
            now_us: self.now_us.clone(),
            monotonic,
        });
        let learned: Arc<Mutex<BTreeSet<u64>>> = Arc::default();
        self.nodes[idx].learned = learned.clone();
        let transport = SimTransport {
            wire: self.wire.clone(),
            members: BTreeSet::new(),
            learned,
        };
        let mut replica = Replica::new(
            config,
            store,
            State::new(WaveLimits::default()),
            transport,
            clock,
            self.rng.next(),
        )
        .map_err(|e| format!("replica {id}: cannot start: {e}"))?;
        replica.applied_trace = Some(Vec::new());
        let applied = replica.shared().status.read().unwrap().applied;
        let node = &mut self.nodes[idx];
        node.replica = Some(replica);
        node.needs_turn = true;
        node.life += 1;
        node.applied = applied;
        node.election_ticks = ticks;
        Ok(())
    }

    /// Drops replica `id` with no shutdown (what it applied is checked first).
    ///
    /// Dropping a sled database writes out what it buffered, as if the process died just
    /// after the operating system took every write. A `hard` crash instead restarts from
    /// a copy of the directory taken before the drop: only what sled had written by
    /// then survives — everything since the last flush is lost, as when the process is
    /// killed.
    fn crash(&mut self, id: u64, hard: bool) -> Result<(), String> {
        self.check_replica(id)?;
        if self.node(id).gone {
            return Ok(());
        }
        let node = &mut self.nodes[(id - 1) as usize];
        if hard && node.replica.is_some() {
            let copy = self.root.path().join(format!("{id}.{}", node.life));
            copy_dir(&node.dir, &copy)
                .map_err(|e| format!("replica {id}: cannot copy its directory: {e}"))?;
            node.replica = None;
            let old = std::mem::replace(&mut node.dir, copy);
            std::fs::remove_dir_all(&old)
                .map_err(|e| format!("replica {id}: cannot remove {}: {e}", old.display()))?;
        }
        node.replica = None;
        Ok(())
    }

    fn turn(&mut self, id: u64, tick: bool) -> Result<(), String> {
        let node = &mut self.nodes[(id - 1) as usize];
        if let Some(replica) = node.replica.as_mut() {
            replica
                .turn(tick)
                .map_err(|e| format!("replica {id} failed a turn: {e}"))?;
            node.needs_turn = false;
        }
        self.harvest(id)
    }

    fn blocked(&self, from: u64, to: u64) -> bool {
        let side = |id: u64| self.side.get((id - 1) as usize).copied().unwrap_or(false);
        side(from) != side(to) || self.cuts.contains(&(from, to))
    }

    /// Hands one message to its destination, unless the network loses it or (like the
    /// gRPC raft service) the destination refuses it: a sender not among the members it
    /// publishes gets only its leader traffic through (appends, heartbeats, snapshots),
    /// and the destination learns the route back to it.
    fn deliver(&mut self, msg: RaftMessage, lossy: bool) {
        let to = msg.to;
        let from = msg.from;
        let accepted = to >= 1
            && to <= self.nodes.len() as u64
            && self.nodes[(to - 1) as usize]
                .replica
                .as_ref()
                .is_some_and(|r| {
                    r.shared()
                        .status
                        .read()
                        .unwrap()
                        .members
                        .contains_key(&from)
                        || matches!(
                            msg.get_msg_type(),
                            MessageType::MsgAppend
                                | MessageType::MsgHeartbeat
                                | MessageType::MsgSnapshot
                        )
                });
        if !accepted || (lossy && (self.blocked(from, to) || self.rng.chance(self.params.drop_pm)))
        {
            self.stats.messages_dropped += 1;
            return;
        }
        if lossy && self.rng.chance(self.params.dup_pm) {
            self.wire.lock().unwrap().push(msg.clone());
            self.stats.messages_duplicated += 1;
        }
        if msg.get_msg_type() == MessageType::MsgSnapshot {
            self.stats.snapshots_delivered += 1;
        }
        let node = &mut self.nodes[(to - 1) as usize];
        node.learned.lock().unwrap().insert(from);
        if let Some(replica) = node.replica.as_mut() {
            replica.handle(Event::Raft(vec![msg]));
            node.needs_turn = true;
            self.stats.messages_delivered += 1;
        }
    }

    /// Takes one random message off the wire.
    fn take_random(&mut self) -> Option<RaftMessage> {
        let mut wire = self.wire.lock().unwrap();
        if wire.is_empty() {
            return None;
        }
        let i = self.rng.below(wire.len() as u64) as usize;
        Some(wire.swap_remove(i))
    }

    fn step(&mut self) -> Result<(), String> {
        self.stats.steps += 1;
        self.now_us.fetch_add(STEP_US, Ordering::Relaxed);
        let mut action = 0;
        if self.rng.chance(self.params.fault_pm) {
            action = self.fault()?;
            match action {
                1 => self.partition_workers(500),
                2 => self.partition_workers(300),
                4 => self.partition_workers(0),
                _ => {}
            }
        }
        if self.rng.chance(self.params.worker_fault_pm) {
            action += 64 * self.worker_fault();
        }
        self.drop_removed()?;
        let queued = self.wire.lock().unwrap().len() as u64;
        let count = self.rng.below(2 * self.n + 1) + queued / 50;
        for _ in 0..count {
            let Some(msg) = self.take_random() else { break };
            self.deliver(msg, true);
        }
        for id in self.live() {
            if self.rng.chance(self.params.tick_pm) {
                self.turn(id, true)?;
            } else if self.node(id).needs_turn && self.rng.chance(800) {
                self.turn(id, false)?;
            }
        }
        self.workers_turn()?;
        if self.rng.chance(self.params.propose_pm) {
            self.propose()?;
        }
        if self.params.member_change_pm > 0 && self.rng.chance(self.params.member_change_pm) {
            action += 8 * self.change_membership()?;
        }
        self.observe()?;
        self.track_outages();
        self.check_executions()?;
        self.record(action);
        Ok(())
    }

    /// The voter sets the cluster may have: the members, and the members after the change
    /// in flight, if any.
    fn configs(&self) -> Vec<BTreeSet<u64>> {
        let members: BTreeSet<u64> = self.members.keys().copied().collect();
        let mut configs = vec![members.clone()];
        if let Some(c) = &self.change {
            configs.push(voters_after(&members, &c.change));
        }
        configs
    }

    /// Whether a majority of each of `configs` is up while `down` are down.
    fn majority_up(down: &BTreeSet<u64>, configs: &[BTreeSet<u64>]) -> bool {
        configs
            .iter()
            .all(|voters| voters.intersection(down).count() <= voters.len().saturating_sub(1) / 2)
    }

    /// Whether replica `id` may crash now: a majority of every voter set the cluster may
    /// have stays up.
    fn may_crash(&self, id: u64) -> bool {
        let mut down = self.down();
        down.insert(id);
        Self::majority_up(&down, &self.configs())
    }

    /// One fault (or repair); returns a code for the step trace.
    fn fault(&mut self) -> Result<u64, String> {
        let present = self.present();
        let roll = self.rng.below(100);
        if roll < 15 {
            self.side = (0..self.nodes.len())
                .map(|_| self.rng.chance(500))
                .collect();
            self.stats.partitions += 1;
            self.event(format!("partition {}", self.sides()));
            return Ok(1);
        }
        if roll < 30 {
            // The leader (when there is one) ends up in a minority.
            let Some(leader) = self.rng.pick(&self.leaders_now()) else {
                return Ok(0);
            };
            let max_down = (self.members.len() as u64).saturating_sub(1) / 2;
            let size = 1 + self.rng.below(max_down);
            let mut minority = BTreeSet::from([leader]);
            while (minority.len() as u64) < size {
                minority.insert(self.rng.pick(&present).unwrap_or(leader));
            }
            self.side = self
                .nodes
                .iter()
                .map(|n| minority.contains(&n.id))
                .collect();
            self.stats.partitions += 1;
            self.event(format!("leader {leader} in a minority: {}", self.sides()));
            return Ok(2);
        }
        if roll < 45 {
            // One direction of one link, often one of the leader's.
            let a = match self.rng.pick(&self.leaders_now()) {
                Some(leader) if self.rng.chance(600) => leader,
                _ => self.rng.pick(&present).unwrap_or(1),
            };
            let others: Vec<u64> = present.iter().copied().filter(|&b| b != a).collect();
            let Some(b) = self.rng.pick(&others) else {
                return Ok(0);
            };
            let (from, to) = if self.rng.chance(500) { (a, b) } else { (b, a) };
            self.cuts.insert((from, to));
            self.stats.one_way_cuts += 1;
            self.event(format!("link {from} → {to} cut"));
            return Ok(3);
        }
        if roll < 65 {
            self.side = vec![false; self.nodes.len()];
            self.cuts.clear();
            self.stats.heals += 1;
            self.event("network healed".into());
            return Ok(4);
        }
        if roll < 83 {
            let allowed: Vec<u64> = self
                .live()
                .into_iter()
                .filter(|&id| self.may_crash(id))
                .collect();
            // Prefer the leader now and then.
            let victim = match self.rng.pick(&self.leaders_now()) {
                Some(leader) if allowed.contains(&leader) && self.rng.chance(400) => leader,
                _ => match self.rng.pick(&allowed) {
                    Some(id) => id,
                    None => return Ok(0),
                },
            };
            let hard = self.rng.chance(500);
            self.crash(victim, hard)?;
            self.stats.crashes += 1;
            let how = if hard { "hard crash" } else { "crash" };
            self.event(format!("{how} of replica {victim}"));
            return Ok(5);
        }
        let down: Vec<u64> = self.down().into_iter().collect();
        if let Some(id) = self.rng.pick(&down) {
            self.start(id)?;
            self.event(format!("replica {id} restarted"));
            return Ok(6);
        }
        Ok(0)
    }

    /// The two sides of the current partition, present replicas only.
    fn sides(&self) -> String {
        let (a, b): (Vec<u64>, Vec<u64>) = self
            .present()
            .into_iter()
            .partition(|id| self.side.get((id - 1) as usize).copied().unwrap_or(false));
        format!("{a:?} | {b:?}")
    }

    /// Stops for good the removed replicas whose time is up.
    fn drop_removed(&mut self) -> Result<(), String> {
        let steps = self.stats.steps;
        let due: Vec<u64> = self
            .removed
            .iter()
            .filter(|(&id, r)| r.drop_at_step <= steps && !self.node(id).gone)
            .map(|(&id, _)| id)
            .collect();
        for id in due {
            self.crash(id, false)?;
            self.node_mut(id).gone = true;
            self.stats.removed_dropped += 1;
            self.event(format!("removed replica {id} stopped for good"));
        }
        Ok(())
    }

    /// Whether `change` keeps three to five voters and a majority of them up.
    fn change_allowed(&self, change: &MemberChange) -> bool {
        match change {
            MemberChange::Add { .. } => self.members.len() < 5,
            MemberChange::Remove { id } => {
                let members: BTreeSet<u64> = self.members.keys().copied().collect();
                members.len() > 3
                    && members.contains(id)
                    && Self::majority_up(&self.down(), &[voters_after(&members, change)])
            }
        }
    }

    /// The next change to ask `leader` for: a removal it handed leadership over for, else
    /// a new replica or the removal of a member (now and then the leader itself).
    fn next_change(&mut self, leader: u64) -> Option<MemberChange> {
        if let Some(change) = self.retry.take() {
            if self.change_allowed(&change) {
                return Some(change);
            }
        }
        let removable: Vec<u64> = self
            .members
            .keys()
            .copied()
            .filter(|&id| self.change_allowed(&MemberChange::Remove { id }))
            .collect();
        if self.members.len() < 5 && (removable.is_empty() || self.rng.chance(500)) {
            let id = self.nodes.len() as u64 + 1;
            return Some(MemberChange::Add {
                id,
                address: address(id),
            });
        }
        let id = if removable.contains(&leader) && self.rng.chance(300) {
            leader
        } else {
            self.rng.pick(&removable)?
        };
        Some(MemberChange::Remove { id })
    }

    /// Asks the replica that thinks it leads for one membership change (now and then a
    /// follower instead, which must refuse it at once); a new replica is started empty
    /// once raft took its addition. Returns a code for the step trace.
    fn change_membership(&mut self) -> Result<u64, String> {
        if self.change.is_some() {
            return Ok(0);
        }
        let leaders = self.leaders_now();
        let to_follower = leaders.is_empty() || self.rng.chance(100);
        let (id, change) = if to_follower {
            let followers: Vec<u64> = self
                .live()
                .into_iter()
                .filter(|id| !leaders.contains(id))
                .collect();
            let members: Vec<u64> = self.members.keys().copied().collect();
            match (self.rng.pick(&followers), self.rng.pick(&members)) {
                (Some(id), Some(member)) => (id, MemberChange::Remove { id: member }),
                _ => return Ok(0),
            }
        } else {
            let Some(leader) = self.rng.pick(&leaders) else {
                return Ok(0);
            };
            match self.next_change(leader) {
                Some(change) => (leader, change),
                None => return Ok(0),
            }
        };
        let (reply, mut rx) = oneshot::channel();
        let node = self.node_mut(id);
        let life = node.life;
        let Some(replica) = node.replica.as_mut() else {
            return Ok(0);
        };
        let term = replica.raft().raft.term;
        let role = role_name(replica.raft().raft.state);
        replica.handle(Event::ChangeMembership {
            change: change.clone(),
            reply,
        });
        node.needs_turn = true;
        self.stats.member_changes_proposed += 1;
        let answer = rx.try_recv();
        if !to_follower {
            self.event(format!(
                "{change:?} asked of replica {id} ({role}, term {term}): {}",
                match &answer {
                    Err(TryRecvError::Empty) => "taken".to_string(),
                    other => format!("{other:?}"),
                }
            ));
        }
        match answer {
            Err(TryRecvError::Empty) if !to_follower => {}
            Ok(Err(ProposeError::NotLeader { .. })) if to_follower => {
                self.stats.member_changes_refused_by_followers += 1;
                return Ok(1);
            }
            Ok(Err(ProposeError::NotLeader { .. })) => {
                // Leadership handed over (asked to remove itself) or moving: a client asks
                // again later, at whichever replica leads then.
                self.stats.member_changes_refused += 1;
                if change == (MemberChange::Remove { id }) {
                    self.retry = Some(change);
                }
                return Ok(1);
            }
            Ok(Err(ProposeError::Invalid(_))) if !to_follower => {
                // Another change is still being committed (a new leader's log may hold one).
                self.stats.member_changes_refused += 1;
                return Ok(1);
            }
            other => {
                return Err(format!(
                    "replica {id} ({role}) answered membership change {change:?} with \
                     {other:?}: a leader answers only once the change is applied, anyone \
                     else refuses it at once as not leader"
                ))
            }
        }
        if let MemberChange::Add { id: joiner, .. } = &change {
            let mut join = self.members.clone();
            join.insert(*joiner, address(*joiner));
            let dir = self.root.path().join(joiner.to_string());
            let rate = MachineClock::draw_rate(&mut self.rng);
            self.nodes
                .push(SimNode::new(*joiner, dir, Some(join), rate));
            self.start(*joiner)?;
        }
        self.change = Some(ChangeInFlight {
            change,
            node: id,
            life,
            term,
            rx: Some(rx),
        });
        Ok(2)
    }

    /// Follows the membership change in flight: its answer, or, once the proposer failed
    /// it, the applied state of a leader of a later term.
    fn follow_change(&mut self) -> Result<(), String> {
        let Some(mut c) = self.change.take() else {
            return Ok(());
        };
        if let Some(rx) = c.rx.as_mut() {
            match rx.try_recv() {
                Err(TryRecvError::Empty) => {
                    self.change = Some(c);
                    return Ok(());
                }
                Ok(Ok(Outcome::Done)) => {
                    self.stats.member_changes_acknowledged += 1;
                    self.event(format!("{:?} acknowledged by replica {}", c.change, c.node));
                    self.commit_change(c);
                    return Ok(());
                }
                Ok(Ok(other)) => {
                    return Err(format!(
                        "replica {} answered membership change {:?} with {other:?}",
                        c.node, c.change
                    ))
                }
                Ok(Err(_)) => {}
                Err(TryRecvError::Closed) => {
                    let node = self.node(c.node);
                    if node.replica.is_some() && node.life == c.life {
                        return Err(format!(
                            "replica {} dropped membership change {:?} without answering it",
                            c.node, c.change
                        ));
                    }
                }
            }
            c.rx = None;
            self.stats.member_changes_unanswered += 1;
            self.event(format!(
                "{:?} failed on replica {}: undecided",
                c.change, c.node
            ));
        }
        let decided = self.live().into_iter().find_map(|id| {
            let node = self.node(id);
            let replica = node.replica.as_ref()?;
            let raft = &replica.raft().raft;
            if raft.state != StateRole::Leader
                || raft.term <= c.term
                || !raft.commit_to_current_term()
                || node.applied < raft.raft_log.committed
            {
                return None;
            }
            let state = replica.shared().state.read().unwrap();
            Some(match &c.change {
                MemberChange::Add { id, .. } => state.members.contains_key(id),
                MemberChange::Remove { id } => !state.members.contains_key(id),
            })
        });
        match decided {
            None => self.change = Some(c),
            Some(true) => {
                self.stats.member_changes_committed_unanswered += 1;
                self.event(format!("{:?} found committed", c.change));
                self.commit_change(c);
            }
            Some(false) => {
                self.event(format!("{:?} found never committed", c.change));
                if let MemberChange::Add { id, .. } = c.change {
                    // Never a member: its replica has nothing to do.
                    self.crash(id, false)?;
                    self.node_mut(id).gone = true;
                }
            }
        }
        Ok(())
    }

    /// Records a committed membership change.
    fn commit_change(&mut self, c: ChangeInFlight) {
        match &c.change {
            MemberChange::Add { id, address } => {
                self.members.insert(*id, address.clone());
            }
            MemberChange::Remove { id } => {
                self.members.remove(id);
                let led = self
                    .leaders
                    .iter()
                    .filter(|(_, &leader)| leader == *id)
                    .map(|(&term, _)| term)
                    .max()
                    .unwrap_or(0);
                let drop_at_step = self.stats.steps + 200 + self.rng.below(3_000);
                self.removed.insert(
                    *id,
                    Removed {
                        last_term: led.max(c.term),
                        drop_at_step,
                    },
                );
            }
        }
        self.committed_changes.push(c.change);
    }

    /// A command for replica `id`: a new wave (an array and its dependent, now and then a
    /// diamond, with retries), a cancellation, or a node with no worker behind it.
    fn command(&mut self, id: u64) -> Result<(Command, Option<String>), String> {
        let now_ms = self.now_ms();
        let roll = self.rng.below(100);
        if roll < 45 {
            let name = format!("w{}", self.next_wave);
            self.next_wave += 1;
            let array = 1 + self.rng.below(3);
            let retries_a = self.rng.below(3);
            let retries_b = self.rng.below(2);
            let on_failure = if self.rng.chance(200) {
                "on_failure = \"fail-wave\"\n"
            } else {
                ""
            };
            let mut text = format!(
                "name = \"{name}\"\n{on_failure}[[task]]\nid = \"a\"\narray = {array}\n\
                 retries = {retries_a}\nrun = \"true\"\n\
                 [[task]]\nid = \"b\"\ndeps = [\"a\"]\nretries = {retries_b}\nrun = \"true\"\n"
            );
            if self.rng.chance(250) {
                // A diamond: a → b, a → c, b and c → d.
                text.push_str(
                    "[[task]]\nid = \"c\"\ndeps = [\"a\"]\nrun = \"true\"\n\
                     [[task]]\nid = \"d\"\ndeps = [\"b\", \"c\"]\nretries = 1\nrun = \"true\"\n",
                );
            }
            let spec = parse_wave(text.as_bytes(), Format::Toml, &WaveLimits::default())
                .map_err(|e| format!("wave spec: {e}"))?;
            let command = Command::SubmitWave {
                owner: String::new(),
                spec,
                traceparent: String::new(),
                // Unique per wave, so nothing is deduplicated, but every replica must
                // remember the same submissions through restarts and snapshots.
                submission_id: name.clone(),
                now_ms,
            };
            return Ok((command, Some(name)));
        }
        if roll < 70 {
            let next = self.nodes[(id - 1) as usize]
                .replica
                .as_ref()
                .map_or(1, |r| r.shared().state.read().unwrap().next_wave_id);
            let wave_id = 1 + self.rng.below(next);
            return Ok((Command::CancelWave { wave_id, now_ms }, None));
        }
        let slots = 1 + self.rng.below(4) as u32;
        let spec = NodeSpec {
            name: format!("n{}", self.rng.below(3)),
            slots,
            labels: BTreeMap::new(),
            policy: ThrottlePolicy::Adaptive,
            physical_cores: slots,
            logical_cores: slots,
            memory_total_bytes: 1 << 34,
            gpus: 0,
            queue_depth: 0,
            profile: Vec::new(),
        };
        let command = Command::RegisterNode {
            spec,
            running: Vec::new(),
            seq: 0,
            now_ms,
        };
        Ok((command, None))
    }

    /// Proposes one to three commands on a leader (or, sometimes, on a follower, which
    /// must refuse them within the turn).
    fn propose(&mut self) -> Result<(), String> {
        let leaders = self.leaders_now();
        if leaders.is_empty() && self.rng.chance(700) {
            return Ok(());
        }
        let id = match self.rng.pick(&leaders) {
            Some(leader) if self.rng.chance(800) => leader,
            _ => match self.rng.pick(&self.live()) {
                Some(id) => id,
                None => return Ok(()),
            },
        };
        let was_leader = self.role(id) == Some(StateRole::Leader);
        let count = 1 + self.rng.below(3);
        let mut sent = Vec::new();
        for _ in 0..count {
            let (command, wave) = self.command(id)?;
            let (reply, rx) = oneshot::channel();
            if let Some(replica) = self.nodes[(id - 1) as usize].replica.as_mut() {
                replica.handle(Event::Propose {
                    command,
                    reply: Some(reply),
                });
            }
            self.stats.proposed += 1;
            sent.push((wave, rx));
        }
        self.turn(id, false)?;
        let life = self.nodes[(id - 1) as usize].life;
        for (wave, mut rx) in sent {
            if was_leader {
                self.pending.push(Pending {
                    node: id,
                    life,
                    wave,
                    rx,
                });
                continue;
            }
            match rx.try_recv() {
                Ok(Err(ProposeError::NotLeader { .. })) => self.stats.refused_by_followers += 1,
                other => {
                    return Err(format!(
                        "replica {id} is not leader, yet answered a proposal with {other:?} \
                         instead of refusing it at once"
                    ))
                }
            }
        }
        Ok(())
    }

    /// The per-step checks: leaders per term (a replica that applied its own removal never
    /// leads in a later term), applied entries, answers to proposals and to the membership change.
    fn observe(&mut self) -> Result<(), String> {
        for id in self.live() {
            let raft = &self.nodes[(id - 1) as usize]
                .replica
                .as_ref()
                .unwrap()
                .raft()
                .raft;
            if raft.state == StateRole::Leader {
                let term = raft.term;
                match self.leaders.get(&term) {
                    None => {
                        self.leaders.insert(term, id);
                        self.stats.leaders += 1;
                    }
                    Some(&other) if other != id => {
                        return Err(format!(
                            "election safety violated: replicas {other} and {id} were both \
                             leader in term {term}"
                        ));
                    }
                    Some(_) => {}
                }
                if let Some(removed) = self.removed.get(&id) {
                    // raft-rs takes a membership change into account when it applies it. A
                    // replica whose removal is in its log but not yet applied (by it, nor by
                    // the voters that elect it) may still win a later term; it steps down as
                    // soon as it applies its removal (`step_down_if_removed`). Once it has
                    // applied it, it must never lead again.
                    let applied_own_removal = !self.nodes[(id - 1) as usize]
                        .replica
                        .as_ref()
                        .unwrap()
                        .shared()
                        .state
                        .read()
                        .unwrap()
                        .members
                        .contains_key(&id);
                    if term > removed.last_term && applied_own_removal {
                        return Err(format!(
                            "replica {id} applied its own removal from the cluster (of term \
                             {} or it led until then) yet leads in term {term}",
                            removed.last_term
                        ));
                    }
                }
            }
            self.check_replica(id)?;
        }
        self.poll_proposals()?;
        self.follow_change()?;
        self.advance_ledger()
    }

    /// Checks the entries replica `id` applied since the last check against what every
    /// other replica (and earlier lives of this one) applied at the same indexes.
    fn check_replica(&mut self, id: u64) -> Result<(), String> {
        let node = &mut self.nodes[(id - 1) as usize];
        let Some(replica) = node.replica.as_mut() else {
            return Ok(());
        };
        let trace = replica
            .applied_trace
            .replace(Vec::new())
            .unwrap_or_default();
        let applied = replica.shared().status.read().unwrap().applied;
        let mut last = node.applied;
        for (index, term, hash) in trace {
            if index <= last {
                return Err(format!(
                    "replica {id} applied index {index} again (it had applied up to {last})"
                ));
            }
            if index > last + 1 {
                // Indexes skipped: a snapshot was installed in between.
                self.stats.snapshots_installed += 1;
            }
            match self.applied_log.get(&index) {
                None => {
                    self.applied_log.insert(index, (term, hash, id));
                }
                Some(&(t, h, first)) if (t, h) != (term, hash) => {
                    return Err(format!(
                        "state machine safety violated at index {index}: replica {first} \
                         applied (term {t}, data hash {h:016x}), replica {id} applied \
                         (term {term}, data hash {hash:016x})"
                    ));
                }
                Some(_) => {}
            }
            last = index;
        }
        if applied < last {
            return Err(format!(
                "replica {id} reports applied index {applied} below the {last} it applied"
            ));
        }
        if applied > last {
            // Applied moved with no entries: a snapshot was installed.
            self.stats.snapshots_installed += 1;
        }
        if node.join.is_some() && !node.caught_up && applied > 0 {
            node.caught_up = true;
            self.stats.joiners_caught_up += 1;
        }
        node.applied = applied;
        Ok(())
    }

    fn poll_proposals(&mut self) -> Result<(), String> {
        let mut error = None;
        let nodes = &self.nodes;
        let stats = &mut self.stats;
        let acked = &mut self.acked;
        self.pending.retain_mut(|p| match p.rx.try_recv() {
            Err(TryRecvError::Empty) => true,
            Err(TryRecvError::Closed) => {
                let node = &nodes[(p.node - 1) as usize];
                if node.replica.is_some() && node.life == p.life {
                    error = Some(format!(
                        "replica {} dropped a proposal without answering it",
                        p.node
                    ));
                }
                stats.lost_in_crash += 1;
                false
            }
            Ok(Ok(Outcome::WaveSubmitted { wave_id, .. })) if p.wave.is_some() => {
                let name = p.wave.take().unwrap_or_default();
                acked.insert(name, wave_id);
                stats.acknowledged += 1;
                false
            }
            Ok(Ok(Outcome::Rejected(_))) => {
                stats.rejected += 1;
                false
            }
            Ok(Ok(_)) => {
                stats.acknowledged += 1;
                false
            }
            Ok(Err(_)) => {
                stats.failed += 1;
                false
            }
        });
        match error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Appends a digest of this step (the action, every replica's raft position, the
    /// wire) to the run's trace.
    fn record(&mut self, action: u64) {
        let mut h = mix(0, action);
        for node in &self.nodes {
            match node.replica.as_ref() {
                None => h = mix(h, u64::MAX),
                Some(r) => {
                    let raft = &r.raft().raft;
                    h = mix(h, raft.state as u64);
                    h = mix(h, raft.term);
                    h = mix(h, raft.leader_id);
                    h = mix(h, raft.raft_log.committed);
                    h = mix(h, raft.raft_log.last_index());
                    h = mix(h, node.applied);
                }
            }
        }
        h = mix(h, self.wire.lock().unwrap().len() as u64);
        for worker in &self.workers {
            for v in worker.digest() {
                h = mix(h, v);
            }
        }
        h = mix(h, self.ledger.applied);
        self.trace.push(h);
    }

    /// Whether one leader, a member, has committed its whole log and every member applied
    /// it, with no proposal left unanswered and no membership change undecided.
    fn converged(&self) -> bool {
        if !self.pending.is_empty()
            || self.change.is_some()
            || self
                .members
                .keys()
                .any(|&id| self.node(id).replica.is_none())
        {
            return false;
        }
        let leaders = self.leaders_now();
        let [leader] = leaders.as_slice() else {
            return false;
        };
        if !self.members.contains_key(leader) {
            return false;
        }
        let raft = &self.node(*leader).replica.as_ref().unwrap().raft().raft;
        let commit = raft.raft_log.committed;
        commit == raft.raft_log.last_index()
            && self
                .members
                .keys()
                .all(|&id| self.node(id).applied == commit)
    }

    fn describe(&self) -> String {
        let mut out = String::new();
        for node in &self.nodes {
            let what = if node.gone {
                " (stopped for good)"
            } else if self.removed.contains_key(&node.id) {
                " (removed)"
            } else if node.join.is_some() {
                " (joiner)"
            } else {
                ""
            };
            match node.replica.as_ref() {
                None => out.push_str(&format!("\n  replica {}{what}: down", node.id)),
                Some(r) => {
                    let raft = &r.raft().raft;
                    out.push_str(&format!(
                        "\n  replica {}{what}: {} term {} leader {} commit {} last {} applied {} \
                         members {:?}",
                        node.id,
                        role_name(raft.state),
                        raft.term,
                        raft.leader_id,
                        raft.raft_log.committed,
                        raft.raft_log.last_index(),
                        node.applied,
                        // A replica that panicked may have poisoned the lock.
                        match r.shared().status.read() {
                            Ok(status) => status.members.keys().copied().collect::<Vec<_>>(),
                            Err(poisoned) =>
                                poisoned.into_inner().members.keys().copied().collect(),
                        }
                    ));
                    if raft.state == StateRole::Leader {
                        for (id, pr) in raft.prs().iter().collect::<BTreeMap<_, _>>() {
                            out.push_str(&format!(
                                "\n    progress of {id}: {:?} matched {} next {} pending \
                                 snapshot {} paused {} recently active {}",
                                pr.state,
                                pr.matched,
                                pr.next_idx,
                                pr.pending_snapshot,
                                pr.is_paused(),
                                pr.recent_active
                            ));
                        }
                    }
                }
            }
        }
        out.push_str(&format!(
            "\n  {} proposals unanswered, {} messages in flight",
            self.pending.len(),
            self.wire.lock().unwrap().len()
        ));
        for worker in &self.workers {
            out.push_str(&format!("\n  {}", worker.describe()));
        }
        let unfinished: Vec<String> = self
            .ledger
            .state
            .waves
            .values()
            .filter(|w| !w.header.state.is_terminal())
            .take(5)
            .map(|w| {
                let open: Vec<String> = w
                    .tasks
                    .iter()
                    .enumerate()
                    .filter(|(_, t)| !t.state.is_terminal())
                    .take(4)
                    .map(|(micro, t)| {
                        format!(
                            "{micro}: {:?} attempt {} on {:?}",
                            t.state, t.attempt, t.node
                        )
                    })
                    .collect();
                format!("wave {} ({})", w.header.id, open.join(", "))
            })
            .collect();
        out.push_str(&format!(
            "\n  ledger applied up to {} ({} entries read ahead); unfinished waves there: {}",
            self.ledger.applied,
            self.ledger.entries.len(),
            unfinished.join("; ")
        ));
        for (name, node) in &self.ledger.state.nodes {
            out.push_str(&format!(
                "\n  node {name}: {:?}, last heartbeat {}, active {:?}",
                node.state,
                node.last_heartbeat_ms,
                node.active.iter().take(8).collect::<Vec<_>>()
            ));
        }
        out.push_str(&format!(
            "\n  members {:?}; committed changes {:?}",
            self.members.keys().collect::<Vec<_>>(),
            self.committed_changes
        ));
        if let Some(c) = &self.change {
            out.push_str(&format!(
                "\n  change {:?} proposed on replica {} in term {}, {}",
                c.change,
                c.node,
                c.term,
                if c.rx.is_some() {
                    "unanswered"
                } else {
                    "failed, not decided yet"
                }
            ));
        }
        out
    }

    /// Heals the network, restarts every replica that is down and runs lossless rounds
    /// (every message delivered, every replica ticked) until the cluster converges.
    fn settle(&mut self, when: &str) -> Result<(), String> {
        self.event(format!("settling {when}"));
        self.side = vec![false; self.nodes.len()];
        self.cuts.clear();
        self.heal_workers();
        self.quiet = false;
        for id in self.down() {
            self.start(id)?;
        }
        for _ in 0..SETTLE_MAX_ROUNDS {
            self.stats.settle_rounds += 1;
            self.now_us.fetch_add(SETTLE_ROUND_US, Ordering::Relaxed);
            let mut batch = std::mem::take(&mut *self.wire.lock().unwrap());
            // Random order (Fisher–Yates).
            for i in (1..batch.len()).rev() {
                let j = self.rng.below(i as u64 + 1) as usize;
                batch.swap(i, j);
            }
            for msg in batch {
                self.deliver(msg, false);
            }
            for id in self.present() {
                // Clocks drift a little: now and then a replica misses a tick.
                let tick = self.rng.chance(900);
                self.turn(id, tick)?;
            }
            // Once the work is done, workers stop heartbeating so the log can settle.
            self.quiet = self.work_done();
            self.workers_turn()?;
            self.observe()?;
            self.track_outages();
            self.check_executions()?;
            self.record(7);
            if self.quiet && self.converged() {
                return Ok(());
            }
        }
        let work = if self.quiet {
            String::new()
        } else {
            format!("\n  {}", self.work_diagnosis())
        };
        Err(format!(
            "the cluster did not converge {when} within {SETTLE_MAX_ROUNDS} rounds:{work}{}",
            self.describe()
        ))
    }

    /// Every member holds the same replicated state, which contains every acknowledged
    /// wave, and whose members (raft's voters too) are the founders changed by the
    /// committed membership changes in order; returns its digest.
    fn check_states(&self) -> Result<u64, String> {
        let mut expected = self.founders.clone();
        for change in &self.committed_changes {
            match change {
                MemberChange::Add { id, address } => expected.insert(*id, address.clone()),
                MemberChange::Remove { id } => expected.remove(id),
            };
        }
        let voters: BTreeSet<u64> = expected.keys().copied().collect();
        let mut first: Option<(u64, StateSnapshot, u64)> = None;
        for &id in expected.keys() {
            let node = self.node(id);
            let replica = node
                .replica
                .as_ref()
                .ok_or_else(|| format!("replica {} is down at the end", node.id))?;
            let raft_voters: BTreeSet<u64> = replica
                .raft()
                .raft
                .prs()
                .conf()
                .voters()
                .ids()
                .iter()
                .collect();
            if raft_voters != voters {
                return Err(format!(
                    "replica {id}: raft's voters are {raft_voters:?}, but the committed \
                     membership changes {:?} give {voters:?}",
                    self.committed_changes
                ));
            }
            let state = replica.shared().state.read().unwrap();
            if state.members != expected {
                return Err(format!(
                    "replica {id} has members {:?}, but the committed membership changes \
                     {:?} applied to the founders give {expected:?}",
                    state.members, self.committed_changes
                ));
            }
            for (name, wave_id) in &self.acked {
                match state.waves.get(wave_id) {
                    Some(w) if &w.header.spec.name == name => {}
                    Some(w) => {
                        return Err(format!(
                            "acknowledged wave {name} (id {wave_id}) lost on replica {}: that \
                             id holds wave {}",
                            node.id, w.header.spec.name
                        ))
                    }
                    None => {
                        return Err(format!(
                            "acknowledged wave {name} (id {wave_id}) is missing on replica {}",
                            node.id
                        ))
                    }
                }
            }
            let snapshot = replicated(&state);
            let bytes = bincode::serialize(&snapshot).map_err(|e| format!("bincode: {e}"))?;
            let digest = hash_bytes(&bytes);
            match &first {
                None => first = Some((node.id, snapshot, digest)),
                Some((id, other, d)) if *d != digest => {
                    return Err(format!(
                        "replicas {id} and {} applied up to {} but hold different states: {}",
                        node.id,
                        node.applied,
                        state_difference(other, &snapshot)
                    ));
                }
                Some(_) => {}
            }
        }
        Ok(first.map_or(0, |(_, _, d)| d))
    }

    /// The checks on the work once the cluster converged, whose members hold the state of
    /// digest `digest`: the ledger replayed exactly what they applied (and holds the same
    /// state), every acknowledged result is recorded, and every wave finished on every
    /// member (a node marked down while its worker stays attached gets no lease, so its
    /// worker registers again). After the `last` settling the work is counted.
    fn check_work(&mut self, digest: u64, last: bool) -> Result<(), String> {
        self.advance_ledger()?;
        let applied = self
            .members
            .keys()
            .map(|&id| self.node(id).applied)
            .max()
            .unwrap_or(0);
        if self.ledger.applied != applied {
            return Err(format!(
                "the ledger replayed the log up to index {}, but the members applied up to \
                 {applied}",
                self.ledger.applied
            ));
        }
        if let Some(ack) = self.pending_acks.first() {
            return Err(format!(
                "{} saw its result of {} acknowledged at index {}, past everything applied",
                ack.result.node, ack.result.attempt, ack.index
            ));
        }
        let replayed = replicated(&self.ledger.state);
        let bytes = bincode::serialize(&replayed).map_err(|e| format!("bincode: {e}"))?;
        if hash_bytes(&bytes) != digest {
            let id = *self.members.keys().next().unwrap_or(&1);
            let member = match self.node(id).replica.as_ref() {
                Some(r) => replicated(&r.shared().state.read().unwrap()),
                None => return Err(format!("replica {id} is down at the end")),
            };
            return Err(format!(
                "replaying the committed log gives another state than the members hold: {}",
                state_difference(&replayed, &member)
            ));
        }
        self.ledger.check_final(&self.acked_results)?;
        let mut unfinished = Vec::new();
        for &id in self.members.keys() {
            let Some(replica) = self.node(id).replica.as_ref() else {
                return Err(format!("replica {id} is down at the end"));
            };
            let state = replica.shared().state.read().unwrap();
            for wave in state.waves.values() {
                let open = wave.tasks.iter().filter(|t| !t.state.is_terminal()).count();
                if !wave.header.state.is_terminal() || open > 0 {
                    unfinished.push(format!(
                        "replica {id}: wave {} ({}) is {:?} with {open} micro-tasks open",
                        wave.header.id, wave.header.spec.name, wave.header.state
                    ));
                }
            }
        }
        if let Some(first) = unfinished.first() {
            return Err(format!(
                "{} waves unfinished after settling, e.g. {first}",
                unfinished.len()
            ));
        }
        if last {
            let state = &self.ledger.state;
            self.stats.micro_tasks = state.waves.values().map(|w| w.tasks.len() as u64).sum();
            self.stats.waves_finished = state
                .waves
                .values()
                .filter(|w| w.header.state.is_terminal())
                .count() as u64;
        }
        Ok(())
    }

    /// Summarises the step history for a failure message.
    fn context(&self) -> String {
        const SHOWN: usize = 40;
        let skipped = self.events.len().saturating_sub(SHOWN);
        let mut events = String::new();
        if skipped > 0 {
            events.push_str(&format!("\n  ({skipped} earlier events)"));
        }
        for e in &self.events[skipped..] {
            events.push_str(&format!("\n  {e}"));
        }
        format!(
            "seed {} on {} replicas, {:?}\nafter {} steps and {} settling rounds:{}\n\
             crashes, restarts and membership changes:{events}",
            self.seed,
            self.n,
            self.params,
            self.stats.steps,
            self.stats.settle_rounds,
            self.describe()
        )
    }
}

/// The voters after `change`.
fn voters_after(voters: &BTreeSet<u64>, change: &MemberChange) -> BTreeSet<u64> {
    let mut after = voters.clone();
    match change {
        MemberChange::Add { id, .. } => after.insert(*id),
        MemberChange::Remove { id } => after.remove(id),
    };
    after
}

/// Names what differs between two replicated states.
fn state_difference(a: &StateSnapshot, b: &StateSnapshot) -> String {
    let mut out = Vec::new();
    if a.members != b.members {
        out.push(format!("members {:?} vs {:?}", a.members, b.members));
    }
    if a.next_wave_id != b.next_wave_id {
        out.push(format!(
            "next_wave_id {} vs {}",
            a.next_wave_id, b.next_wave_id
        ));
    }
    if a.stale_results != b.stale_results {
        out.push(format!(
            "stale_results {} vs {}",
            a.stale_results, b.stale_results
        ));
    }
    if a.submissions != b.submissions {
        out.push(format!(
            "{} vs {} remembered submissions",
            a.submissions.len(),
            b.submissions.len()
        ));
    }
    let waves = |s: &StateSnapshot| -> BTreeMap<WaveId, String> {
        s.waves
            .iter()
            .map(|w| (w.header.id, format!("{w:?}")))
            .collect()
    };
    let (wa, wb) = (waves(a), waves(b));
    for id in wa.keys().chain(wb.keys()).collect::<BTreeSet<_>>() {
        match (wa.get(id), wb.get(id)) {
            (Some(x), Some(y)) if x == y => {}
            (x, y) => out.push(format!("wave {id}: {x:?} vs {y:?}")),
        }
    }
    let nodes = |s: &StateSnapshot| -> BTreeMap<String, String> {
        s.nodes
            .iter()
            .map(|n| (n.spec.name.clone(), format!("{n:?}")))
            .collect()
    };
    let (na, nb) = (nodes(a), nodes(b));
    for name in na.keys().chain(nb.keys()).collect::<BTreeSet<_>>() {
        match (na.get(name), nb.get(name)) {
            (Some(x), Some(y)) if x == y => {}
            (x, y) => out.push(format!("node {name}: {x:?} vs {y:?}")),
        }
    }
    let n = out.len();
    let mut shown: Vec<String> = out
        .into_iter()
        .take(3)
        .map(|d| d.chars().take(800).collect())
        .collect();
    if n > 3 {
        shown.push(format!("and {} more differences", n - 3));
    }
    shown.join("\n  ")
}

/// Runs one seed; a failure (or a panic inside the replica) is reported with the seed and
/// the command that replays it.
fn run_seed(test: &str, n: u64, seed: u64, steps: u64) -> Report {
    let steps_var = if steps == STEPS {
        String::new()
    } else {
        format!("VENOM_SIM_STEPS={steps} ")
    };
    let replay = format!(
        "replay: VENOM_SIM_SEED={seed} {steps_var}cargo test -p venom-coordinator --lib {test} \
         -- --nocapture"
    );
    let mut sim = Sim::new(n, seed, steps);
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| sim.run()));
    match outcome {
        Ok(Ok(final_digest)) => Report {
            stats: sim.stats.clone(),
            trace: std::mem::take(&mut sim.trace),
            final_digest,
        },
        Ok(Err(failure)) => panic!(
            "{test} seed {seed} failed: {failure}\n{}\n{replay}",
            sim.context()
        ),
        Err(panic) => {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_string()))
                .unwrap_or_default();
            panic!(
                "{test} seed {seed} panicked: {message}\n{}\n{replay}",
                sim.context()
            )
        }
    }
}

/// The seeds to run: `VENOM_SIM_SEED` alone, else `0..VENOM_SIM_SEEDS` (or `default`).
fn seeds(default: u64) -> Vec<u64> {
    if let Some(seed) = std::env::var("VENOM_SIM_SEED")
        .ok()
        .filter(|s| !s.trim().is_empty())
    {
        let seed = seed
            .trim()
            .parse()
            .expect("VENOM_SIM_SEED must be a number");
        return vec![seed];
    }
    let n = std::env::var("VENOM_SIM_SEEDS")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(default);
    (0..n).collect()
}

fn run_cluster(test: &str, n: u64, default_seeds: u64) {
    let steps = std::env::var("VENOM_SIM_STEPS")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(STEPS);
    let started = std::time::Instant::now();
    let mut total = Stats::default();
    for seed in seeds(default_seeds) {
        total.add(&run_seed(test, n, seed, steps).stats);
    }
    let s = &total;
    println!(
        "{test}: {} seeds, {} steps + {} settling rounds, {} terms with a leader, {} crashes, \
         {} partitions, {} one-way cuts, {} heals, {} snapshots delivered / {} installed, \
         messages {} delivered / {} dropped / {} duplicated, {} proposals: {} acknowledged, \
         {} refused by followers, {} failed, {} lost in crashes, {} rejected; \
         membership changes: {} proposed, {} acknowledged, {} refused by the leader, {} \
         refused by followers, {} unanswered ({} of them committed), {} joiners caught up, \
         {} removed replicas stopped; \
         final applied index {} on average; {:.1} s",
        s.seeds,
        s.steps,
        s.settle_rounds,
        s.leaders,
        s.crashes,
        s.partitions,
        s.one_way_cuts,
        s.heals,
        s.snapshots_delivered,
        s.snapshots_installed,
        s.messages_delivered,
        s.messages_dropped,
        s.messages_duplicated,
        s.proposed,
        s.acknowledged,
        s.refused_by_followers,
        s.failed,
        s.lost_in_crash,
        s.rejected,
        s.member_changes_proposed,
        s.member_changes_acknowledged,
        s.member_changes_refused,
        s.member_changes_refused_by_followers,
        s.member_changes_unanswered,
        s.member_changes_committed_unanswered,
        s.joiners_caught_up,
        s.removed_dropped,
        s.final_applied / s.seeds.max(1),
        started.elapsed().as_secs_f64()
    );
    println!(
        "{test} workers: {} workers, {} crashes, {} pauses, {} cut off, {} registrations, \
         {} disconnects, {} refused as not leader, {} reports; {} assignments, {} attempts \
         run ({} failed, {} cancelled); results: {} acknowledged, {} lost in worker crashes, \
         {} accepted ({} retried), stale: {} superseded / {} taken off their node / {} after \
         the end; {} nodes marked down, {} micro-tasks returned to ready; {} waves finished \
         of {} micro-tasks ({} open when the faults ended)",
        s.workers,
        s.worker_crashes,
        s.worker_pauses,
        s.worker_isolations,
        s.worker_registrations,
        s.worker_disconnects,
        s.worker_refusals,
        s.worker_reports,
        s.assignments,
        s.attempts_run,
        s.attempts_failed,
        s.attempts_cancelled,
        s.results_acked,
        s.results_lost_in_worker_crashes,
        s.results_accepted,
        s.retries,
        s.stale_superseded,
        s.stale_returned,
        s.stale_after_end,
        s.nodes_marked_down,
        s.returned_to_ready,
        s.waves_finished,
        s.micro_tasks,
        s.backlog
    );
    println!(
        "{test} leases: clocks at 0.99–1.01 of virtual time; {} short and {} long worker \
         pauses or cut-offs; {} grants applied ({} naming no message the worker remembered), \
         {} leases ran out, {} of them fencing work ({} attempts killed, {} queued dropped; \
         {} after a long worker fault or a crash, {} in a coordinator outage, {} after a \
         short worker fault, {} otherwise), {} silent streams given up; {} executions, 0 \
         overlapping ({} pairwise comparisons); re-executions: {} after a worker crash, {} \
         after a long worker fault, {} in a coordinator outage, {} after a short worker \
         fault, {} otherwise",
        s.worker_faults_short,
        s.worker_faults_long,
        s.lease_grants,
        s.lease_grants_unmatched,
        s.lease_expiries,
        s.fences,
        s.attempts_fenced,
        s.queued_dropped,
        s.fences_long_fault,
        s.fences_outage,
        s.fences_short_fault,
        s.fences_no_worker_fault,
        s.silence_reconnects,
        s.executions,
        s.overlap_pairs_checked,
        s.re_executions_crash,
        s.re_executions_long_fault,
        s.re_executions_outage,
        s.re_executions_short_fault,
        s.re_executions_no_worker_fault
    );
}

/// Steps of the faulty phase per seed.
const STEPS: u64 = 3_000;

#[test]
fn sim_three_nodes() {
    run_cluster("sim_three_nodes", 3, 30);
}

#[test]
fn sim_five_nodes() {
    run_cluster("sim_five_nodes", 5, 20);
}

/// A seed whose run adds and removes replicas, so the determinism check covers joiners.
const DETERMINISM_SEED: u64 = 2;

#[test]
fn sim_same_seed_same_run() {
    let seed = DETERMINISM_SEED;
    let a = run_seed("sim_same_seed_same_run", 3, seed, STEPS);
    let b = run_seed("sim_same_seed_same_run", 3, seed, STEPS);
    if let Some(step) = a.trace.iter().zip(&b.trace).position(|(x, y)| x != y) {
        panic!("the runs of seed {seed} diverged at step {step}");
    }
    assert_eq!(a, b, "two runs of seed {seed} differ");
    assert!(
        a.stats.member_changes_acknowledged > 0 && a.stats.joiners_caught_up > 0,
        "seed {seed} no longer changes membership ({:?}): pick another for this test",
        a.stats
    );
}
