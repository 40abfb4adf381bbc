//! The agent's bookkeeping, [`AgentState`]: the FIFO queue of assignments, the running attempts
//! and the slots they fill, the results the coordinator has not acknowledged, and what waits to
//! be sent. It does no I/O and reads no clock beyond time stamps (results, assignment arrival),
//! so it is tested directly. It speaks the worker's own types; [`crate::convert`] builds the
//! messages it hands out.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;

use venom_core::mobius::ThrottlePolicy;
use venom_core::{AttemptOutcome, AttemptRef};
use venom_proto::WorkerMessage;

use crate::convert::Outgoing;
use crate::executor::{cancel_pair, cancelled_before_start, Assignment, CancelHandle, CancelToken};
use crate::limits::{MAX_COALESCED_RESULTS, MAX_QUEUED_ASSIGNMENTS};
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
        }
    }

    pub fn slots_limit(&self) -> u32 {
        self.slots_limit
    }

    pub fn n_running(&self) -> usize {
        self.running.len()
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

    /// Records an event from an attempt.
    pub fn on_event(&mut self, event: ExecEvent) {
        match event {
            ExecEvent::Started(started) => {
                if self.running.contains_key(&started.attempt) {
                    self.out_started.push(started);
                }
            }
            ExecEvent::Finished(key, outcome) => {
                if let Some(slot) = self.running.remove(&key) {
                    self.running_cpus = self.running_cpus.saturating_sub(slot.cpus);
                }
                self.record_finished(key, outcome);
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
        Some(message.into_message())
    }

    /// The registration for a new connection. It lists every running or queued attempt and
    /// every unacknowledged result (those beyond the message budget follow as ordinary
    /// results), so everything waiting to be sent before is superseded and dropped.
    pub fn register(&mut self, identity: &Identity) -> WorkerMessage {
        self.out_started.clear();
        self.out_finished.clear();
        let mut running: Vec<_> = self.running.keys().copied().collect();
        running.sort();
        running.extend(self.queue.iter().map(|(assignment, _)| assignment.attempt));
        let mut message = Outgoing::registration(identity, &running);
        for (key, outcome) in &self.unacked {
            if let Some(result) = message.add_result(*key, outcome.clone()) {
                self.out_finished.push_back(result);
            }
        }
        message.into_message()
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

    fn start_all(state: &mut AgentState) -> Vec<u32> {
        std::iter::from_fn(|| state.start_next())
            .map(|next| next.assignment.attempt.micro)
            .collect()
    }

    #[test]
    fn starts_fifo_while_cpus_fit_the_slots_limit() {
        let mut state = AgentState::new(3);
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
        let mut state = AgentState::new(2);
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
        let mut state = AgentState::new(4);
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
        let mut state = AgentState::new(1);
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
        let mut state = AgentState::new(1);
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
        let mut state = AgentState::new(1);
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
        let mut state = AgentState::new(1);
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
        let mut state = AgentState::new(2);
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
        let register = message.register.expect("a registration");
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
        let mut state = AgentState::new(8);
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
        assert!(message.encoded_len() <= MESSAGE_BUDGET_BYTES + 1024);
        let register = message.register.expect("registration");
        let rest: usize = std::iter::from_fn(|| state.take_message())
            .map(|m| m.finished.len())
            .sum();
        assert_eq!(register.unacknowledged.len() + rest, 5);
    }
}
