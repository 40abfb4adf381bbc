//! Conversions between the state machine's domain types and `venom.v1` wire types.
//! Handlers and the replica call these; nothing else touches generated types.

use prost::Message as _;
use venom_proto::v1 as pb;

use crate::mobius;
use crate::state::{
    AttemptRef, AttemptResult, Counts, HeartbeatReport, MicroKey, Node, State, TaskState, Wave,
};
use crate::wave::CommandSpec;

pub fn attempt_to_pb(a: &AttemptRef) -> pb::AttemptRef {
    pb::AttemptRef {
        wave_id: a.wave_id,
        micro: a.micro,
        attempt: a.attempt,
    }
}

pub fn attempt_from_pb(a: &pb::AttemptRef) -> AttemptRef {
    AttemptRef {
        wave_id: a.wave_id,
        micro: a.micro,
        attempt: a.attempt,
    }
}

/// The assignment message for attempt `attempt` of micro-task `key`, dispatched to `node`.
pub fn assignment(
    state: &State,
    key: MicroKey,
    attempt: u32,
    node: &str,
) -> Option<pb::Assignment> {
    let wave = state.waves.get(&key.0)?;
    let task = wave.tasks.get(key.1 as usize)?;
    let spec = wave.header.spec.tasks.get(task.group as usize)?;
    let (shell, argv) = match &spec.command {
        CommandSpec::Shell(s) => (s.clone(), Vec::new()),
        CommandSpec::Argv(a) => (String::new(), a.clone()),
    };
    Some(pb::Assignment {
        attempt: Some(pb::AttemptRef {
            wave_id: key.0,
            micro: key.1,
            attempt,
        }),
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
            .map(|n| n.throttle.mode.as_str().to_owned())
            .unwrap_or_default(),
    })
}

pub fn result_from_pb(node: &str, f: pb::TaskFinished) -> Option<AttemptResult> {
    let attempt = attempt_from_pb(f.attempt.as_ref()?);
    Some(AttemptResult {
        attempt,
        node: node.to_string(),
        exit_code: f.exit_code,
        signal: f.signal,
        timed_out: f.timed_out,
        cancelled: f.cancelled,
        started_ms: f.started_ms,
        finished_ms: f.finished_ms,
        stdout: f.stdout,
        stderr: f.stderr,
        stdout_truncated: f.stdout_truncated,
        stderr_truncated: f.stderr_truncated,
        error: f.error,
    })
}

pub fn heartbeat_from_pb(node: &str, h: &pb::Heartbeat) -> HeartbeatReport {
    HeartbeatReport {
        node: node.to_string(),
        theta: h.theta.clamp(0.0, 1.0),
        h_cpu: h.h_cpu.clamp(0.0, 1.0),
        h_mem: h.h_mem.clamp(0.0, 1.0),
        h_term: h.h_term.clamp(0.0, 1.0),
        memory_available_bytes: h.memory_available_bytes,
    }
}

pub fn counts_to_pb(c: &Counts) -> pb::TaskCounts {
    pb::TaskCounts {
        pending: c.pending,
        ready: c.ready,
        assigned: c.assigned,
        running: c.running,
        succeeded: c.succeeded,
        failed: c.failed,
        skipped: c.skipped,
        cancelled: c.cancelled,
    }
}

fn count_state(counts: &mut Counts, state: TaskState) {
    match state {
        TaskState::Pending => counts.pending += 1,
        TaskState::Ready => counts.ready += 1,
        TaskState::Assigned => counts.assigned += 1,
        TaskState::Running => counts.running += 1,
        TaskState::Succeeded => counts.succeeded += 1,
        TaskState::Failed => counts.failed += 1,
        TaskState::Skipped => counts.skipped += 1,
        TaskState::Cancelled => counts.cancelled += 1,
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
                    count_state(&mut counts, task.state);
                }
            }
            pb::TaskGroupProgress {
                task_id: t.id.clone(),
                n_micro_tasks: t.n_micro_tasks(),
                counts: Some(counts_to_pb(&counts)),
            }
        })
        .collect();
    pb::WaveSummary {
        wave_id: h.id,
        name: h.spec.name.clone(),
        state: h.state.as_str().to_string(),
        n_micro_tasks: wave.tasks.len() as u64,
        counts: Some(counts_to_pb(&h.counts)),
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
        on_failure: h.spec.on_failure.as_str().to_string(),
    }
}

pub fn micro_task_info(wave: &Wave, micro: u32) -> Option<pb::MicroTaskInfo> {
    let task = wave.tasks.get(micro as usize)?;
    let spec = wave.header.spec.tasks.get(task.group as usize)?;
    Some(pb::MicroTaskInfo {
        task_id: spec.id.clone(),
        index: task.index,
        state: task.state.as_str().to_string(),
        attempt: task.attempt,
        node: task.node.clone().unwrap_or_default(),
        exit_code: task.exit_code,
        signal: task.signal,
        timed_out: task.timed_out,
        started_ms: task.started_ms,
        finished_ms: task.finished_ms,
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
        state: node.state.as_str().to_string(),
        slots: node.spec.slots,
        throttled_slots: node.usable_slots(),
        running,
        queued: (node.active.len() as u32).saturating_sub(running),
        theta: node.theta,
        theta_smoothed: node.throttle.ewma,
        h_cpu: node.h_cpu,
        h_mem: node.h_mem,
        h_term: node.h_term,
        mode: if node.throttle.paused {
            "PAUSED".to_string()
        } else {
            node.throttle.mode.as_str().to_string()
        },
        policy: node.spec.policy.as_str().to_string(),
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
