//! The runners: attempts run on pooled blocking threads (see the executor for why not async).
//! When an attempt ends, its runner records the outcome in the [`AgentState`], starts the next
//! queued attempt itself, and only wakes the agent loop to report, so back-to-back micro-tasks
//! on a slot never wait for the loop or the network.
//!
//! Each attempt runs under a span, exported to the wave's trace when traces are on and the
//! assignment carries a trace context; its outcome is counted in the worker's metrics.
//!
//! [`AgentState`]: super::AgentState

use std::sync::Arc;

use venom_core::{AttemptOutcome, OutcomeKind};

use super::state::{ExecEvent, NextAttempt, Started};
use super::Shared;
use crate::executor::{
    cancelled_before_start, failed_to_start, spawn_attempt, Assignment, CancelToken,
};
use crate::metrics::WorkerMetrics;

/// The span of one attempt, under `$target` (which decides whether it is exported). The fields
/// left empty are recorded only on exported spans. Integers are recorded as `i64`, the type
/// OpenTelemetry attributes have.
macro_rules! attempt_span {
    ($target:expr, $assignment:expr) => {
        tracing::info_span!(
            target: $target,
            "attempt",
            venom.wave.id = $assignment.attempt.wave_id as i64,
            venom.task.id = %$assignment.task_id,
            venom.task.index = $assignment.index.map(i64::from),
            venom.attempt = i64::from($assignment.attempt.attempt),
            venom.wave.name = tracing::field::Empty,
            venom.node = tracing::field::Empty,
            venom.theta = tracing::field::Empty,
            venom.mode = tracing::field::Empty,
            venom.queue_wait_ms = tracing::field::Empty,
            process.exit.code = tracing::field::Empty,
            venom.signal = tracing::field::Empty,
            venom.timed_out = tracing::field::Empty,
            venom.cancelled = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
            otel.status_message = tracing::field::Empty,
        )
    };
}

/// Joins the wave's trace and records what is known as the attempt starts.
fn trace_start(
    span: &tracing::Span,
    shared: &Shared,
    assignment: &Assignment,
    received_at: std::time::Instant,
) {
    venom_telemetry::set_parent(span, &assignment.traceparent);
    span.record("venom.wave.name", assignment.wave_name.as_str());
    span.record("venom.node", &*shared.node_name);
    span.record("venom.theta", shared.theta());
    if let Some(mode) = assignment.mode {
        span.record("venom.mode", mode.as_str());
    }
    let queue_wait_ms = i64::try_from(received_at.elapsed().as_millis()).unwrap_or(i64::MAX);
    span.record("venom.queue_wait_ms", queue_wait_ms);
}

/// Records how the attempt ended; anything but exit code 0 is an error.
fn trace_outcome(span: &tracing::Span, outcome: &AttemptOutcome) {
    if let Some(code) = outcome.exit_code {
        span.record("process.exit.code", code);
    }
    if let Some(signal) = outcome.signal {
        span.record("venom.signal", signal);
    }
    span.record("venom.timed_out", outcome.timed_out);
    span.record("venom.cancelled", outcome.cancelled);
    if let Some(message) = outcome.failure() {
        span.record("otel.status_code", "ERROR");
        span.record("otel.status_message", message.as_str());
    }
}

/// Starts a runner for every attempt that may start now. Each runner is a pooled blocking
/// thread that, when its attempt ends, records the result and starts the next queued attempt
/// itself, so back-to-back tasks on a slot never wait for the agent loop.
pub(super) fn start_runners(shared: &Arc<Shared>) {
    loop {
        let Some(next) = shared.state().start_next() else {
            return;
        };
        let shared = Arc::clone(shared);
        tokio::task::spawn_blocking(move || run_slot(shared, next));
    }
}

/// A runner: runs `first`, then whatever the queue offers, until nothing fits. When an
/// attempt frees more room than one (a wide task ended), the extra attempts get runners of
/// their own.
fn run_slot(shared: Arc<Shared>, first: NextAttempt) {
    let mut next = Some(first);
    while let Some(NextAttempt {
        assignment,
        cancel,
        received_at,
    }) = next
    {
        // Exported only when traces are and the wave has a trace to join; otherwise the span
        // only labels log lines.
        let traced = venom_telemetry::enabled()
            && venom_telemetry::is_valid_traceparent(&assignment.traceparent);
        let span = if traced {
            attempt_span!(venom_telemetry::TARGET, assignment)
        } else {
            attempt_span!(module_path!(), assignment)
        };
        if traced {
            trace_start(&span, &shared, &assignment, received_at);
        }
        let outcome = span.in_scope(|| execute(&shared, &assignment, cancel));
        if traced {
            trace_outcome(&span, &outcome);
        }
        drop(span);
        let mut state = shared.state();
        if let Some((key, outcome)) =
            state.on_event(ExecEvent::Finished(assignment.attempt, outcome))
        {
            // Spooled before the state lock is released, so before any message carries it.
            if let Some(mut disk) = shared.disk() {
                if let Err(error) = disk.spool.add(key, outcome) {
                    tracing::error!(%error, "cannot spool a result; it is reported anyway");
                }
            }
        }
        next = state.start_next();
        drop(state);
        shared.wake.notify_one();
        start_runners(&shared);
    }
}

/// Runs one attempt on this (blocking) thread, reporting its start. An attempt cancelled
/// before it starts never spawns; one that cannot start is an outcome with `error` set.
fn execute(shared: &Shared, assignment: &Assignment, cancel: CancelToken) -> AttemptOutcome {
    if cancel.is_cancelled() {
        return cancelled_before_start();
    }
    let started_ms = crate::unix_now_ms();
    let spawning = std::time::Instant::now();
    let outcome = match spawn_attempt(
        assignment,
        &shared.node_name,
        shared.max_output_bytes,
        &shared.isolation,
        cancel,
    ) {
        Ok(running) => {
            shared
                .metrics
                .spawn_seconds
                .observe(spawning.elapsed().as_secs_f64());
            let started = Started {
                attempt: assignment.attempt,
                started_ms: running.started_ms(),
                pid: running.pid(),
            };
            shared.process_started(started.pid);
            shared.state().on_event(ExecEvent::Started(started));
            shared.wake.notify_one();
            let outcome = running.wait_blocking();
            shared.process_ended(started.pid);
            outcome
        }
        Err(error) => {
            tracing::warn!(%error, "attempt failed to start");
            failed_to_start(started_ms, &error)
        }
    };
    record_outcome(&shared.metrics, &outcome);
    tracing::debug!(
        exit_code = ?outcome.exit_code,
        signal = ?outcome.signal,
        timed_out = outcome.timed_out,
        cancelled = outcome.cancelled,
        "attempt finished"
    );
    outcome
}

/// Counts a finished attempt by outcome and records its run time.
fn record_outcome(metrics: &WorkerMetrics, outcome: &AttemptOutcome) {
    let kind = outcome.kind();
    metrics.attempts.with_label_values(&[kind.as_str()]).inc();
    if kind != OutcomeKind::NotStarted {
        metrics
            .run_seconds
            .observe(outcome.run_ms() as f64 / 1_000.0);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU64;
    use std::sync::Mutex;

    use tokio::sync::Notify;

    use super::*;
    use crate::agent::AgentState;
    use crate::executor::cancel_pair;

    fn shared(work_root: &std::path::Path) -> Shared {
        Shared {
            state: Mutex::new(AgentState::new(1)),
            wake: Notify::new(),
            node_name: "node-a".into(),
            max_output_bytes: 1024,
            isolation: crate::isolation::Isolation::for_tests(work_root),
            metrics: Arc::new(WorkerMetrics::new()),
            theta_bits: AtomicU64::new(1.0_f64.to_bits()),
            disk: None,
            guard: None,
        }
    }

    #[test]
    fn a_token_cancelled_before_start_never_spawns() {
        let work_root = tempfile::tempdir().expect("temp dir");
        let shared = shared(work_root.path());
        let (handle, token) = cancel_pair();
        handle.cancel();
        let assignment = Assignment {
            shell: "exit 1".to_owned(),
            ..Default::default()
        };
        let finished = execute(&shared, &assignment, token);
        assert!(finished.cancelled);
        assert_eq!(finished.exit_code, None);
    }

    #[test]
    fn an_attempt_runs_isolated_and_its_start_is_recorded() {
        let work_root = tempfile::tempdir().expect("temp dir");
        let shared = shared(work_root.path());
        let assignment = Assignment {
            attempt: venom_core::AttemptRef {
                wave_id: 4,
                micro: 0,
                attempt: 1,
            },
            task_id: "t".to_owned(),
            shell: "echo \"$VENOM_WORKDIR\"; pwd".to_owned(),
            ..Default::default()
        };
        let finished = execute(&shared, &assignment, cancel_pair().1);
        assert_eq!(finished.exit_code, Some(0), "{finished:?}");
        let dir = shared.isolation.work_dirs().own().join("w4/t.a1");
        let expected = format!("{}\n{}\n", dir.display(), dir.display());
        assert_eq!(String::from_utf8_lossy(&finished.stdout), expected);
        assert!(!dir.exists(), "a successful attempt's directory is removed");
        let metrics = shared.metrics.render();
        assert!(metrics.contains("outcome=\"succeeded\""), "{metrics}");
    }
}
