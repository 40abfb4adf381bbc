//! The agent's bookkeeping, [`AgentState`]: the FIFO queue of assignments, the running attempts
//! and the slots they fill, the results the coordinator has not acknowledged, and what waits to
//! be sent. It does no I/O and reads no clock beyond time stamps (results, assignment arrival),
//! so it is tested directly. It speaks the worker's own types; [`crate::convert`] builds the
//! messages it hands out.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use venom_core::mobius::ThrottlePolicy;
use venom_core::{AttemptOutcome, AttemptRef};
use venom_proto::WorkerMessage;

use crate::convert::Outgoing;
use crate::executor::{cancel_pair, cancelled_before_start, Assignment, CancelHandle, CancelToken};
use crate::limits::{MAX_COALESCED_RESULTS, MAX_QUEUED_ASSIGNMENTS, MAX_UNGRANTED_MESSAGES};
use crate::scan::HardwareProfile;
use crate::theta::ThetaSnapshot;

/// What the worker says about itself in every registration.
#[derive(Debug, Clone)]
pub struct Identity {
    pub name: Arc<str>,
    pub profile: HardwareProfile,
    pub slots: u32,
    pub labels: HashMap<String, String>,
    pub throttle_policy: ThrottlePolicy,
    pub queue_depth: u32,
}

/// What one coordinator message asks of this worker.
#[derive(Debug, Default)]
pub struct Instructions {
    /// The answer to this stream's registration.
    pub registered: bool,
    /// Slots this worker may fill at once from now on; `None` = unchanged.
    pub slots_limit: Option<u32>,
    /// Results now durably recorded: forget them.
    pub ack: Vec<AttemptRef>,
    pub assign: Vec<Assignment>,
    pub cancel: Vec<AttemptRef>,
    /// The leader committed this worker's message `seq`: the lease runs for the duration
    /// from when that message was sent.
    pub lease: Option<(u64, Duration)>,
    /// With the answer to a registration: the leader's cluster.
    pub cluster_id: Option<u64>,
}

/// An attempt's process started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Started {
    pub attempt: AttemptRef,
    /// Unix milliseconds.
    pub started_ms: u64,
    pub pid: u32,
}

/// What a heartbeat reports: the latest θ and how many attempts run here.
#[derive(Debug, Clone)]
pub struct Heartbeat {
    pub theta: ThetaSnapshot,
    pub running: u32,
}

/// What an attempt's runner records in the [`AgentState`].
#[derive(Debug)]
pub enum ExecEvent {
    Started(Started),
    Finished(AttemptRef, AttemptOutcome),
}

/// An attempt [`AgentState::start_next`] marked running, for a runner to start.
#[derive(Debug)]
pub struct NextAttempt {
    pub assignment: Assignment,
    /// Signalled when the coordinator cancels the attempt.
    pub cancel: CancelToken,
    /// When the assignment arrived here.
    pub received_at: std::time::Instant,
}

/// A running (or starting) attempt.
#[derive(Debug)]
struct RunningSlot {
    /// Kills the attempt's process group.
    cancel: CancelHandle,
    /// Slots it occupies (its `cpus`, at least 1).
    cpus: u32,
}

/// The agent's bookkeeping: queue, running attempts, unacknowledged results and what is waiting
/// to be sent. No I/O and no clock beyond time stamps (results, assignment arrival).
#[derive(Debug)]
pub struct AgentState {
    /// Slots this worker may fill at once now (the coordinator's throttled view).
    slots_limit: u32,
    /// Accepted assignments not yet started, FIFO, with when each arrived (for the queue wait
    /// an attempt's span records).
    queue: VecDeque<(Assignment, std::time::Instant)>,
    /// Attempts in `queue`, for duplicate detection.
    queued: HashSet<AttemptRef>,
    running: HashMap<AttemptRef, RunningSlot>,
    /// Sum of `cpus` over `running`.
    running_cpus: u32,
    /// Finished results the coordinator has not acknowledged, re-sent on every registration.
    unacked: BTreeMap<AttemptRef, AttemptOutcome>,
    /// Waiting to be sent.
    out_started: Vec<Started>,
    out_finished: VecDeque<(AttemptRef, AttemptOutcome)>,
    out_heartbeat: Option<Heartbeat>,
    /// The number the next message gets.
    next_seq: u64,
    /// Messages sent and not yet covered by a grant, oldest first: their number and when
    /// they left (a lease counts from there).
    sent: VecDeque<(u64, Instant)>,
    /// Until when this worker may run and start attempts; `None`: no lease (not registered
    /// yet, or fenced).
    lease_until: Option<Instant>,
    /// Attempts killed because the lease ran out: their results are dropped (the leader
    /// re-dispatches them once it, too, sees the lease expired).
    fenced: HashSet<AttemptRef>,
}

impl AgentState {
    pub fn new(slots_limit: u32) -> Self {
        Self {
            slots_limit,
            queue: VecDeque::new(),
            queued: HashSet::new(),
            running: HashMap::new(),
            running_cpus: 0,
            unacked: BTreeMap::new(),
            out_started: Vec::new(),
            out_finished: VecDeque::new(),
            out_heartbeat: None,
            next_seq: 1,
            sent: VecDeque::new(),
            lease_until: None,
            fenced: HashSet::new(),
        }
    }

    pub fn slots_limit(&self) -> u32 {
        self.slots_limit
    }

    pub fn n_running(&self) -> usize {
        self.running.len()
    }

    /// Results a previous run of this worker finished and nobody acknowledged (from its data
    /// dir): reported with the first registration.
    pub fn restore(&mut self, kept: BTreeMap<AttemptRef, AttemptOutcome>) {
        self.unacked.extend(kept);
    }

    /// Until when this worker holds a lease.
    pub fn lease_until(&self) -> Option<Instant> {
        self.lease_until
    }

    /// Whether this worker holds a lease at `now`.
    pub fn has_lease(&self, now: Instant) -> bool {
        self.lease_until.is_some_and(|until| now < until)
    }

    /// Numbers `message`, and remembers when it left if a leader may grant a lease by it
    /// (registrations and heartbeats: about one a second).
    fn stamp(&mut self, message: &mut WorkerMessage, now: Instant) {
        message.seq = self.next_seq;
        self.next_seq += 1;
        if message.register.is_none() && message.heartbeat.is_none() {
            return;
        }
        if self.sent.len() >= MAX_UNGRANTED_MESSAGES {
            self.sent.pop_front();
        }
        self.sent.push_back((message.seq, now));
    }

    /// The leader committed message `seq`: the lease runs until `lease` after it was sent,
    /// unless an earlier grant already runs longer. Returns whether this worker holds a
    /// lease at `now` that it did not hold before (queued work may start).
    pub fn on_lease(&mut self, seq: u64, lease: Duration, now: Instant) -> bool {
        let had = self.has_lease(now);
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
        if let Some(until) = sent_at.and_then(|at| at.checked_add(lease)) {
            if self.lease_until.is_none_or(|current| current < until) {
                self.lease_until = Some(until);
            }
        }
        !had && self.has_lease(now)
    }

    /// The lease ran out: kill every running attempt (their results are dropped) and forget
    /// the queue; nothing starts until a leader grants a lease again. Returns how many
    /// attempts were killed and how many queued ones dropped.
    pub fn fence(&mut self) -> (usize, usize) {
        self.lease_until = None;
        for (key, slot) in &self.running {
            slot.cancel.cancel();
            self.fenced.insert(*key);
        }
        let dropped = self.queue.len();
        self.queue.clear();
        self.queued.clear();
        self.out_started.clear();
        (self.running.len(), dropped)
    }

    pub fn n_queued(&self) -> usize {
        self.queue.len()
    }

    pub fn n_unacked(&self) -> usize {
        self.unacked.len()
    }

    pub fn running_cpus(&self) -> u32 {
        self.running_cpus
    }

    /// The attempts whose results are unacknowledged.
    pub fn unacked_keys(&self) -> Vec<AttemptRef> {
        self.unacked.keys().copied().collect()
    }

    /// Applies one coordinator message (everything but `registered` and `refused`, which the
    /// loop handles).
    pub fn on_coordinator_message(&mut self, message: Instructions) {
        if let Some(limit) = message.slots_limit {
            self.slots_limit = limit;
        }
        for attempt in message.ack {
            self.unacked.remove(&attempt);
        }
        for assignment in message.assign {
            self.assign(assignment);
        }
        for attempt in message.cancel {
            self.cancel(attempt);
        }
    }

    /// Queues an assignment, ignoring one already queued or running. One that already finished
    /// here has its result sent again instead of running twice.
    pub fn assign(&mut self, assignment: Assignment) {
        let key = assignment.attempt;
        if self.running.contains_key(&key) || self.queued.contains(&key) {
            tracing::debug!(%key, "duplicate assignment ignored");
            return;
        }
        if let Some(result) = self.unacked.get(&key) {
            tracing::debug!(%key, "assignment of a finished attempt; sending its result again");
            self.out_finished.push_back((key, result.clone()));
            return;
        }
        if self.queue.len() >= MAX_QUEUED_ASSIGNMENTS {
            tracing::warn!(%key, "assignment queue full; refusing");
            let outcome = AttemptOutcome {
                started_ms: crate::unix_now_ms(),
                finished_ms: crate::unix_now_ms(),
                error: Some(format!(
                    "worker queue full ({MAX_QUEUED_ASSIGNMENTS} assignments)"
                )),
                ..AttemptOutcome::default()
            };
            self.record_finished(key, outcome);
            return;
        }
        self.queued.insert(key);
        self.queue
            .push_back((assignment, std::time::Instant::now()));
    }

    /// Cancels a running attempt (its result follows with `cancelled`) or drops a queued one
    /// (reported as cancelled at once).
    pub fn cancel(&mut self, key: AttemptRef) {
        if let Some(slot) = self.running.get(&key) {
            slot.cancel.cancel();
        } else if self.queued.remove(&key) {
            self.queue
                .retain(|(assignment, _)| assignment.attempt != key);
            self.record_finished(key, cancelled_before_start());
        }
    }

    /// Cancels everything running and forgets the queue (shutdown).
    pub fn cancel_all(&mut self) {
        for slot in self.running.values() {
            slot.cancel.cancel();
        }
        self.queue.clear();
        self.queued.clear();
    }

    /// The next assignment that may start now, marked running. FIFO: a head that does not fit
    /// waits for capacity, except that anything may start when nothing runs (a task asking for
    /// more cpus than the limit runs alone). A limit of 0 starts nothing.
    pub fn start_next(&mut self) -> Option<NextAttempt> {
        if !self.has_lease(Instant::now()) {
            return None;
        }
        let (front, _) = self.queue.front()?;
        let cpus = front.cpus.max(1);
        if self.slots_limit == 0
            || (self.running_cpus > 0 && self.running_cpus.saturating_add(cpus) > self.slots_limit)
        {
            return None;
        }
        let (assignment, received_at) = self.queue.pop_front()?;
        let key = assignment.attempt;
        self.queued.remove(&key);
        let (cancel, token) = cancel_pair();
        self.running.insert(key, RunningSlot { cancel, cpus });
        self.running_cpus = self.running_cpus.saturating_add(cpus);
        Some(NextAttempt {
            assignment,
            cancel: token,
            received_at,
        })
    }

    /// Records an event from an attempt. Returns the result to keep when a finished attempt's
    /// result is to be reported (not when the attempt was fenced or the lease is gone).
    pub fn on_event(&mut self, event: ExecEvent) -> Option<(AttemptRef, &AttemptOutcome)> {
        match event {
            ExecEvent::Started(started) => {
                if self.running.contains_key(&started.attempt)
                    && !self.fenced.contains(&started.attempt)
                {
                    self.out_started.push(started);
                }
                None
            }
            ExecEvent::Finished(key, outcome) => {
                if let Some(slot) = self.running.remove(&key) {
                    self.running_cpus = self.running_cpus.saturating_sub(slot.cpus);
                }
                // Ended after the lease (killed by the guard while this process was frozen,
                // or just late): the leader may run it again, so its result is not reported.
                if self.fenced.remove(&key) || !self.has_lease(Instant::now()) {
                    tracing::debug!(%key, "attempt ended without a lease; its result is dropped");
                    return None;
                }
                self.record_finished(key, outcome);
                self.unacked.get(&key).map(|outcome| (key, outcome))
            }
        }
    }

    fn record_finished(&mut self, key: AttemptRef, outcome: AttemptOutcome) {
        self.unacked.insert(key, outcome.clone());
        self.out_finished.push_back((key, outcome));
    }

    /// Sets the heartbeat to send with the next message (replacing an unsent one).
    pub fn set_heartbeat(&mut self, heartbeat: Heartbeat) {
        self.out_heartbeat = Some(heartbeat);
    }

    /// True when a result or a heartbeat waits: send at once.
    ///
    /// A result is urgent unless this worker still has queued work: then nothing waits on
    /// the coordinator's answer, and results coalesce like start reports (fewer messages,
    /// bigger group commits), up to [`MAX_COALESCED_RESULTS`].
    pub fn has_urgent_outbound(&self) -> bool {
        self.out_heartbeat.is_some()
            || (!self.out_finished.is_empty()
                && (self.queue.is_empty() || self.out_finished.len() >= MAX_COALESCED_RESULTS))
    }

    /// True when something waits to be sent.
    pub fn has_outbound(&self) -> bool {
        !self.out_started.is_empty()
            || !self.out_finished.is_empty()
            || self.out_heartbeat.is_some()
    }

    /// The next message: the heartbeat, every start, and as many results as fit the message
    /// budget (always at least one). `None` when nothing waits.
    pub fn take_message(&mut self) -> Option<WorkerMessage> {
        if !self.has_outbound() {
            return None;
        }
        let mut message = Outgoing::report(
            self.out_heartbeat.take(),
            std::mem::take(&mut self.out_started),
        );
        while let Some((key, outcome)) = self.out_finished.pop_front() {
            if let Some(result) = message.add_result(key, outcome) {
                self.out_finished.push_front(result);
                break;
            }
        }
        let mut message = message.into_message();
        self.stamp(&mut message, Instant::now());
        Some(message)
    }

    /// A registration for a new connection, numbered as sent now. It lists every running
    /// (and not fenced) or queued attempt and as many unacknowledged results as fit the
    /// message budget. It changes nothing else: a worker tries every coordinator at once,
    /// and [`AgentState::registered`] settles what the one that accepted still needs.
    pub fn register(&mut self, identity: &Identity) -> WorkerMessage {
        let mut running: Vec<_> = self
            .running
            .keys()
            .filter(|key| !self.fenced.contains(key))
            .copied()
            .collect();
        running.sort();
        running.extend(self.queue.iter().map(|(assignment, _)| assignment.attempt));
        let mut message = Outgoing::registration(identity, &running);
        for (key, outcome) in &self.unacked {
            if message.add_result(*key, outcome.clone()).is_some() {
                break;
            }
        }
        let mut message = message.into_message();
        self.stamp(&mut message, Instant::now());
        message
    }

    /// `register` was accepted: what waited to be sent before is superseded by it, and the
    /// unacknowledged results it could not carry follow as ordinary results.
    pub fn registered(&mut self, register: &WorkerMessage) {
        let carried: HashSet<AttemptRef> = register
            .register
            .iter()
            .flat_map(|r| r.unacknowledged.iter())
            .filter_map(|f| f.attempt.map(AttemptRef::from))
            .collect();
        self.out_started.clear();
        self.out_finished = self
            .unacked
            .iter()
            .filter(|(key, _)| !carried.contains(key))
            .map(|(key, outcome)| (*key, outcome.clone()))
            .collect();
    }
}

#[cfg(test)]
mod tests {
    use prost::Message as _;
    use venom_proto::convert::task_finished;
    use venom_proto::TaskFinished;

    use super::*;
    use crate::limits::MESSAGE_BUDGET_BYTES;

    fn assignment(micro: u32, cpus: u32) -> Assignment {
        Assignment {
            attempt: key(micro),
            task_id: "t".to_owned(),
            shell: "true".to_owned(),
            cpus,
            ..Default::default()
        }
    }

    fn key(micro: u32) -> AttemptRef {
        AttemptRef {
            wave_id: 1,
            micro,
            attempt: 0,
        }
    }

    fn exited(exit_code: i32) -> AttemptOutcome {
        AttemptOutcome {
            exit_code: Some(exit_code),
            ..Default::default()
        }
    }

    fn finished(micro: u32, exit_code: i32) -> ExecEvent {
        ExecEvent::Finished(key(micro), exited(exit_code))
    }

    /// The result as the coordinator receives it.
    fn wire(micro: u32, exit_code: i32) -> TaskFinished {
        task_finished(key(micro), exited(exit_code))
    }

    fn identity() -> Identity {
        Identity {
            name: "n1".into(),
            profile: HardwareProfile {
                cpu_logical_cores: 4,
                ..Default::default()
            },
            slots: 4,
            labels: HashMap::from([("zone".to_owned(), "a".to_owned())]),
            throttle_policy: ThrottlePolicy::Adaptive,
            queue_depth: 4,
        }
    }

    /// A worker holding an hour's lease.
    fn leased(slots: u32) -> AgentState {
        let mut state = AgentState::new(slots);
        let register = state.register(&identity());
        let now = Instant::now();
        assert!(state.on_lease(register.seq, Duration::from_secs(3600), now));
        state.registered(&register);
        state
    }

    fn start_all(state: &mut AgentState) -> Vec<u32> {
        std::iter::from_fn(|| state.start_next())
            .map(|next| next.assignment.attempt.micro)
            .collect()
    }

    #[test]
    fn starts_fifo_while_cpus_fit_the_slots_limit() {
        let mut state = leased(3);
        for (micro, cpus) in [(0, 1), (1, 2), (2, 1), (3, 0)] {
            state.assign(assignment(micro, cpus));
        }
        assert_eq!(start_all(&mut state), vec![0, 1]);
        assert_eq!(state.running_cpus(), 3);
        state.on_event(finished(1, 0));
        assert_eq!(state.running_cpus(), 1);
        // cpus 0 counts as 1.
        assert_eq!(start_all(&mut state), vec![2, 3]);
        assert_eq!(state.running_cpus(), 3);
    }

    #[test]
    fn a_task_wider_than_the_limit_runs_alone() {
        let mut state = leased(2);
        state.assign(assignment(0, 1));
        state.assign(assignment(1, 8));
        assert_eq!(start_all(&mut state), vec![0]);
        state.on_event(finished(0, 0));
        assert_eq!(start_all(&mut state), vec![1]);
        state.assign(assignment(2, 1));
        assert!(
            start_all(&mut state).is_empty(),
            "nothing joins the wide task"
        );
    }

    #[test]
    fn slots_limit_updates_apply_and_zero_starts_nothing() {
        let mut state = leased(4);
        state.on_coordinator_message(Instructions {
            slots_limit: Some(0),
            assign: vec![assignment(0, 1)],
            ..Default::default()
        });
        assert_eq!(state.slots_limit(), 0);
        assert!(start_all(&mut state).is_empty());
        state.on_coordinator_message(Instructions {
            slots_limit: Some(1),
            ..Default::default()
        });
        assert_eq!(start_all(&mut state), vec![0]);
        // A message without slots_limit leaves it unchanged.
        state.on_coordinator_message(Instructions::default());
        assert_eq!(state.slots_limit(), 1);
    }

    #[test]
    fn duplicate_assignments_are_ignored() {
        let mut state = leased(1);
        state.assign(assignment(0, 1));
        state.assign(assignment(1, 1));
        state.assign(assignment(1, 1));
        assert_eq!(state.n_queued(), 2);
        assert_eq!(start_all(&mut state), vec![0]);
        state.assign(assignment(0, 1));
        assert_eq!(state.n_queued(), 1);
        assert_eq!(state.n_running(), 1);
    }

    #[test]
    fn assigning_a_finished_attempt_resends_its_result() {
        let mut state = leased(1);
        state.assign(assignment(0, 1));
        start_all(&mut state);
        state.on_event(finished(0, 5));
        let _ = state.take_message();
        state.assign(assignment(0, 1));
        assert_eq!(state.n_queued(), 0);
        let message = state.take_message().expect("the result again");
        assert_eq!(message.finished, vec![wire(0, 5)]);
    }

    #[test]
    fn cancelling_a_queued_attempt_reports_it_cancelled() {
        let mut state = leased(1);
        state.assign(assignment(0, 1));
        state.assign(assignment(1, 1));
        start_all(&mut state);
        state.on_coordinator_message(Instructions {
            cancel: vec![key(1)],
            ..Default::default()
        });
        assert_eq!(state.n_queued(), 0);
        let message = state.take_message().expect("a cancelled result");
        assert_eq!(message.finished.len(), 1);
        assert!(message.finished[0].cancelled);
        assert_eq!(message.finished[0].attempt, Some(key(1).into()));
        assert_eq!(state.unacked_keys(), vec![key(1)]);
        // Cancelling something unknown does nothing.
        state.cancel(key(9));
        assert!(state.take_message().is_none());
    }

    #[test]
    fn cancelling_a_running_attempt_signals_its_token() {
        let mut state = leased(1);
        state.assign(assignment(0, 1));
        let token = state.start_next().expect("starts").cancel;
        assert!(!token.is_cancelled());
        state.cancel(key(0));
        assert!(token.is_cancelled());
        // The result comes from the attempt itself, not from the cancel.
        assert!(state.take_message().is_none());
    }

    #[test]
    fn acks_drop_results_and_registration_resends_the_rest() {
        let mut state = leased(2);
        for micro in 0..3 {
            state.assign(assignment(micro, 1));
        }
        start_all(&mut state);
        state.on_event(ExecEvent::Started(Started {
            attempt: key(0),
            started_ms: 1,
            pid: 42,
        }));
        state.on_event(finished(0, 0));
        state.on_event(finished(1, 1));
        start_all(&mut state);
        let batch = state.take_message().expect("events waiting");
        assert_eq!(batch.started.len(), 1);
        assert_eq!(batch.finished.len(), 2, "both results in one message");
        assert!(state.take_message().is_none());

        state.on_coordinator_message(Instructions {
            ack: vec![key(0)],
            ..Default::default()
        });
        assert_eq!(state.unacked_keys(), vec![key(1)]);

        state.assign(assignment(3, 1));
        let message = state.register(&identity());
        state.registered(&message);
        let register = message.register.clone().expect("a registration");
        assert_eq!(register.name, "n1");
        assert_eq!(register.slots, 4);
        assert_eq!(register.queue_depth, 4);
        assert_eq!(register.labels.get("zone").map(String::as_str), Some("a"));
        assert_eq!(register.profile.map(|p| p.cpu_logical_cores), Some(4));
        assert_eq!(register.unacknowledged, vec![wire(1, 1)]);
        assert_eq!(register.running, vec![key(2).into(), key(3).into()]);
        assert!(
            !state.has_outbound(),
            "the registration supersedes what waited"
        );
    }

    #[test]
    fn large_results_are_split_across_messages() {
        let mut state = leased(8);
        let big = |micro| {
            ExecEvent::Finished(
                key(micro),
                AttemptOutcome {
                    stdout: vec![b'x'; 400 * 1024],
                    ..exited(0)
                },
            )
        };
        for micro in 0..5 {
            state.assign(assignment(micro, 1));
        }
        start_all(&mut state);
        for micro in 0..5 {
            state.on_event(big(micro));
        }
        let mut sizes = Vec::new();
        while let Some(message) = state.take_message() {
            assert!(message.encoded_len() <= MESSAGE_BUDGET_BYTES);
            sizes.push(message.finished.len());
        }
        assert_eq!(sizes.iter().sum::<usize>(), 5);
        assert!(sizes.len() >= 3, "{sizes:?}");

        let message = state.register(&identity());
        state.registered(&message);
        assert!(message.encoded_len() <= MESSAGE_BUDGET_BYTES + 1024);
        let register = message.register.expect("registration");
        let rest: usize = std::iter::from_fn(|| state.take_message())
            .map(|m| m.finished.len())
            .sum();
        assert_eq!(register.unacknowledged.len() + rest, 5);
    }

    #[test]
    fn nothing_starts_without_a_lease_and_a_grant_runs_from_when_its_message_left() {
        let mut state = AgentState::new(2);
        state.assign(assignment(0, 1));
        assert!(state.start_next().is_none(), "no lease yet");
        let t0 = Instant::now();
        let register = state.register(&identity());
        state.set_heartbeat(Heartbeat {
            theta: ThetaSnapshot {
                at_ms: 0,
                theta: 1.0,
                h_cpu: 1.0,
                h_mem: 1.0,
                h_term: 1.0,
                cpu_usage_percent: 0.0,
                memory_available_bytes: 1,
                memory_total_bytes: 1,
                hottest_celsius: None,
            },
            running: 0,
        });
        let heartbeat = state.take_message().expect("the heartbeat");
        assert!(heartbeat.seq > register.seq, "numbers increase");
        // A grant for a message this worker never sent (or no longer remembers) gives nothing.
        assert!(!state.on_lease(0, Duration::from_secs(10), t0));
        assert!(state.lease_until().is_none());
        // The registration's grant: the lease counts from when it was sent, not received.
        assert!(state.on_lease(register.seq, Duration::from_secs(10), t0));
        let until = state.lease_until().expect("a lease");
        assert!(until <= Instant::now() + Duration::from_secs(10));
        assert!(until >= t0 + Duration::from_secs(10) - Duration::from_secs(1));
        assert_eq!(start_all(&mut state), vec![0]);
        // A later message's grant extends it; an older one never shortens it.
        assert!(!state.on_lease(heartbeat.seq, Duration::from_secs(20), Instant::now()));
        let extended = state.lease_until().expect("a lease");
        assert!(extended > until);
        assert!(!state.on_lease(register.seq, Duration::from_secs(1), Instant::now()));
        assert_eq!(state.lease_until(), Some(extended));
        // The lease is over at its end.
        assert!(!state.has_lease(extended));
    }

    #[test]
    fn fencing_kills_running_attempts_drops_the_queue_and_their_results() {
        let mut state = leased(1);
        for micro in 0..3 {
            state.assign(assignment(micro, 1));
        }
        let running = state.start_next().expect("starts");
        assert_eq!(running.assignment.attempt, key(0));
        state.on_event(ExecEvent::Started(Started {
            attempt: key(0),
            started_ms: 1,
            pid: 42,
        }));
        assert_eq!(state.fence(), (1, 2));
        assert!(
            running.cancel.is_cancelled(),
            "the running attempt is killed"
        );
        assert!(!state.has_lease(Instant::now()));
        assert_eq!(state.n_queued(), 0);
        assert!(
            state.take_message().is_none(),
            "its start report is dropped too"
        );
        // A new assignment waits for a new lease.
        state.assign(assignment(5, 1));
        assert!(state.start_next().is_none());
        // The killed attempt is not claimed as running by a registration...
        let register = state.register(&identity());
        let claimed = &register.register.as_ref().expect("registration").running;
        assert_eq!(claimed, &vec![key(5).into()]);
        // ...and its result, when its process ends, is dropped: the leader runs it again.
        state.on_event(finished(0, 137));
        assert_eq!(state.n_running(), 0);
        assert!(state.unacked_keys().is_empty());
        assert!(state.take_message().is_none());
        // A lease again: work starts.
        assert!(state.on_lease(register.seq, Duration::from_secs(60), Instant::now()));
        assert_eq!(start_all(&mut state), vec![5]);
    }

    #[test]
    fn the_accepted_registration_decides_which_results_follow_it() {
        let mut state = leased(4);
        for micro in 0..3 {
            state.assign(assignment(micro, 1));
        }
        start_all(&mut state);
        state.on_event(finished(0, 0));
        // Built for one coordinator before result 1 existed; another try carries both.
        let early = state.register(&identity());
        state.on_event(finished(1, 0));
        let late = state.register(&identity());
        assert_eq!(late.register.as_ref().expect("r").unacknowledged.len(), 2);
        // The early one was accepted: result 1 follows as an ordinary result.
        state.registered(&early);
        let next = state.take_message().expect("the result it lacked");
        assert_eq!(next.finished, vec![wire(1, 0)]);
        assert!(state.take_message().is_none());
    }
}
