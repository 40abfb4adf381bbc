//! From state to workers: the scheduling round the leader proposes, effects packed into
//! one message per node, the `schedule` trace spans, and the worker streams.

use super::*;

/// When the scheduling round in `command` was proposed, if it holds one.
pub(super) fn schedule_time_ms(command: &Command) -> Option<u64> {
    match command {
        Command::Schedule { now_ms, .. } => Some(*now_ms),
        Command::Batch(commands) => commands.iter().filter_map(schedule_time_ms).min(),
        _ => None,
    }
}

/// Adds to `nodes` those whose lease `command` may renew once applied: registrations and
/// heartbeats.
fn lease_renewals(command: &Command, nodes: &mut BTreeSet<String>) {
    match command {
        Command::RegisterNode { spec, .. } => {
            nodes.insert(spec.name.clone());
        }
        Command::Heartbeats { reports, .. } => {
            nodes.extend(reports.iter().map(|r| r.node.clone()));
        }
        Command::Batch(commands) => {
            for command in commands {
                lease_renewals(command, nodes);
            }
        }
        _ => {}
    }
}

impl<T: Transport> Replica<T> {
    /// Nodes with a registration or heartbeat proposed and not applied yet (queued, or in
    /// the log past the applied index); `None` if the log cannot be read. Applied, it grants
    /// a lease — counted from when the worker sent it — before any round proposed now
    /// applies, so such a round must not mark the node down: it would take back the work
    /// that lease covers (and that the same entry may dispatch).
    fn renewals_pending(&self) -> Option<BTreeSet<String>> {
        let mut nodes = BTreeSet::new();
        for (command, _) in &self.queued {
            lease_renewals(command, &mut nodes);
        }
        let log = &self.raw.raft.raft_log;
        let last = log.last_index();
        if self.applied < last {
            let entries = log
                .slice(
                    self.applied + 1,
                    last + 1,
                    None,
                    raft::GetEntriesContext::empty(false),
                )
                .ok()?;
            for entry in entries {
                if entry.get_entry_type() != EntryType::EntryNormal || entry.data.is_empty() {
                    continue;
                }
                if let Ok(command) = bincode::deserialize::<Command>(&entry.data) {
                    lease_renewals(&command, &mut nodes);
                }
            }
        }
        Some(nodes)
    }

    /// The scheduler's inputs that only the leader knows.
    pub(super) fn scheduler_config(&self) -> SchedulerConfig {
        let now_ms = self.clock.monotonic_ms();
        let (unreachable, mut lease_expired) = match self.shared.state.read() {
            Ok(state) => (
                state
                    .nodes
                    .keys()
                    .filter(|n| !self.workers.contains_key(*n))
                    .cloned()
                    .collect::<BTreeSet<_>>(),
                self.leases.expired(
                    state
                        .nodes
                        .values()
                        .filter(|n| n.state != NodeState::Down)
                        .map(|n| n.spec.name.as_str()),
                    now_ms,
                ),
            ),
            Err(_) => (BTreeSet::new(), BTreeSet::new()),
        };
        if !lease_expired.is_empty() {
            match self.renewals_pending() {
                Some(pending) => lease_expired.retain(|node| !pending.contains(node)),
                None => lease_expired.clear(),
            }
        }
        SchedulerConfig {
            lease_expired,
            max_placements: SchedulerConfig::MAX_PLACEMENTS,
            unreachable,
        }
    }

    /// On a tick: proposes a scheduling round if the plan would do anything (a node to
    /// mark down, or ready work that now fits), so an idle cluster writes nothing.
    pub(super) fn schedule_if_needed(&mut self) {
        let now = self.clock.now_ms();
        let config = self.scheduler_config();
        let plan = match self.shared.state.read() {
            Ok(state) => scheduler::schedule(&state, &config),
            Err(_) => return,
        };
        if plan.is_empty() {
            return;
        }
        let now_ms = self.clock.monotonic_ms();
        for node in &plan.mark_down {
            tracing::warn!(
                node = %node,
                lease_ms = self.leases.lease_ms(),
                margin_ms = crate::leases::margin_ms(self.leases.lease_ms()),
                silent_ms = self.leases.silent_ms(node, now_ms),
                "worker lease expired; marking the node down (its attempts go back to ready)"
            );
        }
        self.propose(
            Command::Schedule {
                now_ms: now,
                config,
            },
            vec![None],
        );
    }

    /// One `schedule` span per wave that this turn dispatches micro-tasks of to connected
    /// workers: a child of the wave's stored trace context, from when the round was proposed
    /// until its assignments leave. The wave's assignments carry the span's context instead,
    /// so each attempt's span on its worker hangs under the round that dispatched it.
    pub(super) fn schedule_spans(
        &self,
        state: &State,
        messages: &mut [(String, pb::CoordinatorMessage)],
        proposed_ms: u64,
    ) -> Vec<venom_telemetry::ManualSpan> {
        use venom_telemetry::KeyValue;

        struct Round {
            span: Option<venom_telemetry::ManualSpan>,
            traceparent: String,
            n_dispatched: i64,
            nodes: BTreeSet<String>,
        }
        let start = std::time::UNIX_EPOCH + Duration::from_millis(proposed_ms);
        let mut rounds: BTreeMap<u64, Round> = BTreeMap::new();
        for (node, message) in messages.iter_mut() {
            if message.assign.is_empty() || !self.workers.contains_key(node.as_str()) {
                continue;
            }
            for assignment in &mut message.assign {
                let Some(attempt) = assignment.attempt else {
                    continue;
                };
                let round = rounds.entry(attempt.wave_id).or_insert_with(|| {
                    let span = state.waves.get(&attempt.wave_id).and_then(|wave| {
                        venom_telemetry::start_span(
                            "schedule",
                            &wave.header.traceparent,
                            start,
                            vec![
                                KeyValue::new("venom.wave.id", attempt.wave_id as i64),
                                KeyValue::new("venom.wave.name", wave.header.spec.name.clone()),
                            ],
                        )
                    });
                    Round {
                        traceparent: span
                            .as_ref()
                            .map(venom_telemetry::ManualSpan::traceparent)
                            .unwrap_or_default(),
                        span,
                        n_dispatched: 0,
                        nodes: BTreeSet::new(),
                    }
                });
                if round.span.is_some() {
                    assignment.traceparent.clone_from(&round.traceparent);
                    round.n_dispatched += 1;
                    round.nodes.insert(node.clone());
                }
            }
        }
        rounds
            .into_values()
            .filter_map(|round| {
                let mut span = round.span?;
                span.set_attribute(KeyValue::new("venom.dispatched", round.n_dispatched));
                span.set_attribute(KeyValue::new(
                    "venom.nodes",
                    round.nodes.into_iter().collect::<Vec<_>>().join(","),
                ));
                Some(span)
            })
            .collect()
    }

    pub(super) fn send_to_worker(&mut self, node: &str, message: pb::CoordinatorMessage) {
        let Some((conn, tx)) = self.workers.get(node) else {
            return;
        };
        if self.registering.contains_key(node) {
            // What it needs of this arrives with its registration (see `registering`).
            tracing::debug!(
                node,
                conn,
                "worker stream not registered yet; message dropped"
            );
            if tx.is_closed() {
                // Its registration failed: nobody will detach it.
                self.workers.remove(node);
                self.registering.remove(node);
            }
            return;
        }
        if let Err(e) = tx.try_send(message) {
            // A worker that cannot keep up is cut off; it reconnects and reconciles.
            tracing::warn!(node, error = %e, "worker stream full or closed, detaching it");
            self.workers.remove(node);
            self.registering.remove(node);
        }
    }
}
