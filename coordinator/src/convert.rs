//! Conversions between the coordinator's domain types and `venom.v1` wire types. Handlers
//! and the replica call these; the shared vocabulary's own conversions (ids, states,
//! outcomes, counts) are `venom_proto::convert`.

use std::collections::BTreeMap;

use prost::Message as _;
use venom_proto::v1 as pb;

use venom_core::mobius;
use venom_core::wave::CommandSpec;

use venom_core::mobius::ThrottlePolicy;

use crate::state::{
    AttemptRef, AttemptResult, Command, Counts, Effect, HeartbeatReport, MicroTask, Node, NodeSpec,
    State, TaskState, Wave,
};

/// Longest node name: a DNS name's length.
pub const MAX_NODE_NAME_BYTES: usize = 253;
/// Most micro-tasks a node may ask to keep queued beyond its usable slots.
pub const MAX_QUEUE_DEPTH: u32 = 1_024;
/// Most slots a node may offer.
pub const MAX_SLOTS: u32 = 4_096;
/// Most labels a node may carry, and the longest key and value.
pub const MAX_LABELS: usize = 64;
pub const MAX_LABEL_KEY_BYTES: usize = 63;
pub const MAX_LABEL_VALUE_BYTES: usize = 256;
/// Largest hardware profile a node may register (encoded).
pub const MAX_PROFILE_BYTES: usize = 64 * 1024;
/// Most attempts a registration may report as running or finished.
pub const MAX_REGISTER_ATTEMPTS: usize = 65_536;
/// The most of each attempt's stdout and of its stderr the coordinator stores (the tail
/// is kept), whatever a worker sends.
pub const MAX_STORED_OUTPUT_BYTES: usize = 64 * 1024;

/// The node a worker's `Register` describes; the error names the bad field.
pub fn node_spec(register: &pb::Register) -> Result<NodeSpec, String> {
    if register.name.is_empty() || register.name.len() > MAX_NODE_NAME_BYTES {
        return Err(format!(
            "field `register.name`: must be 1 to {MAX_NODE_NAME_BYTES} characters"
        ));
    }
    if register.slots > MAX_SLOTS {
        return Err(format!(
            "field `register.slots`: {} is more than {MAX_SLOTS}",
            register.slots
        ));
    }
    if register.labels.len() > MAX_LABELS {
        return Err(format!(
            "field `register.labels`: {} labels, at most {MAX_LABELS}",
            register.labels.len()
        ));
    }
    for (key, value) in &register.labels {
        if key.is_empty() || key.len() > MAX_LABEL_KEY_BYTES || value.len() > MAX_LABEL_VALUE_BYTES
        {
            return Err(format!(
                "field `register.labels`: keys are 1 to {MAX_LABEL_KEY_BYTES} bytes and values \
                 at most {MAX_LABEL_VALUE_BYTES}"
            ));
        }
    }
    let profile_bytes = register.profile.as_ref().map_or(0, |p| p.encoded_len());
    if profile_bytes > MAX_PROFILE_BYTES {
        return Err(format!(
            "field `register.profile`: {profile_bytes} bytes, at most {MAX_PROFILE_BYTES}"
        ));
    }
    if register.running.len() + register.unacknowledged.len() > MAX_REGISTER_ATTEMPTS {
        return Err(format!(
            "fields `register.running` and `register.unacknowledged`: more than \
             {MAX_REGISTER_ATTEMPTS} attempts"
        ));
    }
    let policy = match register.throttle_policy() {
        pb::ThrottlePolicy::Unspecified => ThrottlePolicy::default(),
        policy => ThrottlePolicy::try_from(policy)
            .map_err(|e| format!("field `register.throttle_policy`: {e}"))?,
    };
    let profile = register.profile.clone().unwrap_or_default();
    let memory_total_bytes = if profile.effective_memory_bytes > 0 {
        profile.effective_memory_bytes
    } else {
        profile.memory_total_bytes
    };
    Ok(NodeSpec {
        name: register.name.clone(),
        slots: register.slots.max(1),
        labels: register.labels.clone().into_iter().collect(),
        policy,
        physical_cores: profile.cpu_physical_cores.max(1),
        logical_cores: profile.cpu_logical_cores.max(1),
        memory_total_bytes,
        gpus: profile.gpus.len() as u32,
        queue_depth: register.queue_depth.min(MAX_QUEUE_DEPTH),
        profile: profile.encode_to_vec(),
    })
}

/// The command that registers a worker: `spec` (decoded from `register`), what it still
/// runs and the results it kept.
/// A worker's registration as one command. Results it kept for another cluster (it names
/// the cluster it last registered with) are ignored: their wave ids mean other waves here.
pub fn registration(
    spec: NodeSpec,
    register: pb::Register,
    seq: u64,
    cluster_id: u64,
    now_ms: u64,
) -> Command {
    let ours = register.cluster_id == 0 || register.cluster_id == cluster_id;
    let unacknowledged = register
        .unacknowledged
        .into_iter()
        .filter(|_| ours)
        .filter_map(|f| result_from_pb(&spec.name, f))
        .collect();
    let running = register.running.into_iter().map(AttemptRef::from).collect();
    Command::register(spec, running, unacknowledged, seq, now_ms)
}

/// The one command a worker message amounts to (`None` for an empty message).
pub fn worker_report(node: &str, message: pb::WorkerMessage, now_ms: u64) -> Option<Command> {
    let started = message
        .started
        .into_iter()
        .filter_map(|s| Some((AttemptRef::from(s.attempt?), s.started_ms)))
        .collect();
    let results = message
        .finished
        .into_iter()
        .filter_map(|f| result_from_pb(node, f))
        .collect();
    let heartbeat = message
        .heartbeat
        .map(|h| heartbeat_from_pb(node, &h, message.seq));
    Command::worker_report(node, started, results, heartbeat, now_ms)
}

/// The effects of one turn as worker messages: every effect for one node packed into one
/// message, nodes in name order. A lease is granted for `lease_ms`. An assignment goes out
/// only if its attempt is still the micro-task's current one on that node once the turn's
/// entries are applied: one a later entry of the same turn took back (a registration that
/// did not list it, a lost node) must not run beside its successor.
pub fn worker_messages(
    state: &State,
    effects: Vec<Effect>,
    lease_ms: u64,
) -> Vec<(String, pb::CoordinatorMessage)> {
    let mut by_node: BTreeMap<String, pb::CoordinatorMessage> = BTreeMap::new();
    for effect in effects {
        match effect {
            Effect::Dispatch { node, attempts } => {
                let msg = by_node.entry(node.clone()).or_default();
                for attempt in attempts {
                    let current = state.task(attempt.key()).is_some_and(|task| {
                        task.attempt == attempt.attempt
                            && task.node.as_deref() == Some(node.as_str())
                            && matches!(task.state, TaskState::Assigned | TaskState::Running)
                    });
                    if !current {
                        continue;
                    }
                    if let Some(a) = assignment(state, attempt, &node) {
                        msg.assign.push(a);
                    }
                }
            }
            Effect::Cancel { node, attempts } => {
                by_node
                    .entry(node)
                    .or_default()
                    .cancel
                    .extend(attempts.into_iter().map(pb::AttemptRef::from));
            }
            Effect::Ack { node, attempts } => {
                by_node
                    .entry(node)
                    .or_default()
                    .ack
                    .extend(attempts.into_iter().map(pb::AttemptRef::from));
            }
            Effect::SlotsLimit { node, slots } => {
                by_node.entry(node).or_default().slots_limit = Some(slots);
            }
            Effect::Lease { node, seq } => {
                let lease = &mut by_node.entry(node).or_default().lease;
                // The latest message committed renews furthest.
                if lease.as_ref().is_none_or(|grant| grant.seq < seq) {
                    *lease = Some(pb::LeaseGrant { seq, lease_ms });
                }
            }
        }
    }
    by_node.into_iter().collect()
}

/// The assignment message for `attempt`, dispatched to `node`.
pub fn assignment(state: &State, attempt: AttemptRef, node: &str) -> Option<pb::Assignment> {
    let wave = state.waves.get(&attempt.wave_id)?;
    let task = wave.tasks.get(attempt.micro as usize)?;
    let spec = wave.header.spec.tasks.get(task.group as usize)?;
    let (shell, argv) = match &spec.command {
        CommandSpec::Shell(s) => (s.clone(), Vec::new()),
        CommandSpec::Argv(a) => (String::new(), a.clone()),
    };
    Some(pb::Assignment {
        attempt: Some(attempt.into()),
        wave_name: wave.header.spec.name.clone(),
        task_id: spec.id.clone(),
        index: task.index,
        shell,
        argv,
        env: spec.env.clone().into_iter().collect(),
        timeout_ms: spec.timeout_ms,
        cpus: spec.cpus,
        traceparent: wave.header.traceparent.clone(),
        mode: state
            .nodes
            .get(node)
            .map_or(pb::ThetaMode::Unspecified, |n| n.throttle.mode.into())
            .into(),
        workdir: spec.workdir.clone().unwrap_or_default(),
        memory_bytes: spec.memory_bytes,
    })
}

pub fn result_from_pb(node: &str, mut f: pb::TaskFinished) -> Option<AttemptResult> {
    for (output, truncated) in [
        (&mut f.stdout, &mut f.stdout_truncated),
        (&mut f.stderr, &mut f.stderr_truncated),
    ] {
        if output.len() > MAX_STORED_OUTPUT_BYTES {
            output.drain(..output.len() - MAX_STORED_OUTPUT_BYTES);
            *truncated = true;
        }
    }
    f.error
        .truncate(floor_char_boundary(&f.error, MAX_STORED_OUTPUT_BYTES));
    let (attempt, outcome) = venom_proto::convert::from_task_finished(f)?;
    Some(AttemptResult {
        attempt,
        node: node.to_string(),
        outcome,
    })
}

/// The largest index ≤ `max` that starts a character of `s`.
fn floor_char_boundary(s: &str, max: usize) -> usize {
    if s.len() <= max {
        return s.len();
    }
    (0..=max)
        .rev()
        .find(|&i| s.is_char_boundary(i))
        .unwrap_or(0)
}

pub fn heartbeat_from_pb(node: &str, h: &pb::Heartbeat, seq: u64) -> HeartbeatReport {
    HeartbeatReport {
        node: node.to_string(),
        seq,
        theta: h.theta.clamp(0.0, 1.0),
        h_cpu: h.h_cpu.clamp(0.0, 1.0),
        h_mem: h.h_mem.clamp(0.0, 1.0),
        h_term: h.h_term.clamp(0.0, 1.0),
        memory_available_bytes: h.memory_available_bytes,
    }
}

pub fn wave_summary(state: &State, wave: &Wave) -> pb::WaveSummary {
    let h = &wave.header;
    let groups = h
        .spec
        .tasks
        .iter()
        .enumerate()
        .map(|(g, t)| {
            let mut counts = Counts::default();
            for micro in h.group_range(g as u32) {
                if let Some(task) = wave.tasks.get(micro as usize) {
                    counts.add(task.state);
                }
            }
            pb::TaskGroupProgress {
                task_id: t.id.clone(),
                n_micro_tasks: t.n_micro_tasks(),
                counts: Some(counts.into()),
            }
        })
        .collect();
    pb::WaveSummary {
        wave_id: h.id,
        name: h.spec.name.clone(),
        owner: h.owner.clone(),
        state: pb::WaveState::from(h.state).into(),
        n_micro_tasks: wave.tasks.len() as u64,
        counts: Some(h.counts.into()),
        submitted_ms: h.submitted_ms,
        started_ms: h.started_ms,
        finished_ms: h.finished_ms,
        work_ms: h.work_ms,
        makespan_ms: h.makespan_ms(),
        measured_speedup: h.measured_speedup(),
        dag_bound: h.dag_bound(),
        model_s_total: if h.state.is_terminal() {
            h.model_s_total
        } else {
            state.cluster_s_total()
        },
        traceparent: h.traceparent.clone(),
        groups,
        on_failure: pb::OnFailure::from(h.spec.on_failure).into(),
    }
}

/// A `WatchWave` update: the wave and every node.
pub fn watch_event(state: &State, wave: &Wave) -> pb::WatchWaveEvent {
    pb::WatchWaveEvent {
        wave: Some(wave_summary(state, wave)),
        nodes: state.nodes.values().map(|n| node_info(state, n)).collect(),
    }
}

/// The output a micro-task's latest attempt left.
pub fn logs(task: &MicroTask) -> pb::GetLogsResponse {
    pb::GetLogsResponse {
        attempt: task.attempt,
        stdout: task.outcome.stdout.clone(),
        stderr: task.outcome.stderr.clone(),
        stdout_truncated: task.outcome.stdout_truncated,
        stderr_truncated: task.outcome.stderr_truncated,
        state: pb::TaskState::from(task.state).into(),
        node: task.node.clone().unwrap_or_default(),
    }
}

pub fn micro_task_info(wave: &Wave, micro: u32) -> Option<pb::MicroTaskInfo> {
    let task = wave.tasks.get(micro as usize)?;
    let spec = wave.header.spec.tasks.get(task.group as usize)?;
    Some(pb::MicroTaskInfo {
        task_id: spec.id.clone(),
        index: task.index,
        state: pb::TaskState::from(task.state).into(),
        attempt: task.attempt,
        node: task.node.clone().unwrap_or_default(),
        exit_code: task.outcome.exit_code,
        signal: task.outcome.signal,
        timed_out: task.outcome.timed_out,
        started_ms: task.outcome.started_ms,
        finished_ms: task.outcome.finished_ms,
        error: task.error.clone(),
        micro,
    })
}

pub fn node_info(state: &State, node: &Node) -> pb::NodeInfo {
    let model = mobius::node_model(&node.model_input());
    let running = node
        .active
        .iter()
        .filter(|&&key| {
            state
                .task(key)
                .is_some_and(|t| t.state == TaskState::Running)
        })
        .count() as u32;
    pb::NodeInfo {
        name: node.spec.name.clone(),
        state: pb::NodeState::from(node.state).into(),
        slots: node.spec.slots,
        throttled_slots: node.usable_slots(),
        running,
        queued: (node.active.len() as u32).saturating_sub(running),
        theta: node.theta,
        theta_smoothed: node.throttle.ewma,
        h_cpu: node.h_cpu,
        h_mem: node.h_mem,
        h_term: node.h_term,
        mode: pb::ThetaMode::from(node.throttle.mode).into(),
        paused: node.throttle.paused,
        policy: pb::ThrottlePolicy::from(node.spec.policy).into(),
        labels: node.spec.labels.clone().into_iter().collect(),
        memory_total_bytes: node.spec.memory_total_bytes,
        memory_available_bytes: node.memory_available_bytes,
        gpus: node.spec.gpus,
        lambda: model.lambda,
        s_total: model.s_total,
        last_heartbeat_ms: node.last_heartbeat_ms,
        profile: pb::HardwareProfile::decode(node.spec.profile.as_slice()).ok(),
    }
}
