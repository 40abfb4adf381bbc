//! Tests of the replicated state machine: submission, dependency order, retries, failure
//! policies, cancellation, fencing of stale attempts, node loss and reconciliation, draining,
//! wave statistics and index rebuilding. The state is driven only through `apply`, with the
//! scheduler's plans turned into commands the way the replica does it.

#![allow(clippy::unwrap_used)]

use venom_core::wave::{parse_wave, Format};

use super::*;
use crate::scheduler::{schedule, SchedulerConfig};
use TaskState::{Assigned, Cancelled, Failed, Pending, Ready, Running, Skipped, Succeeded};

const GIB: u64 = 1 << 30;

/// Parses a TOML wave file.
fn spec(text: &str) -> WaveSpec {
    parse_wave(text.as_bytes(), Format::Toml, &WaveLimits::default()).unwrap()
}

/// A node offering `slots` cpus, 16 GiB, no GPUs, no labels, adaptive throttling.
fn node_spec(name: &str, slots: u32) -> NodeSpec {
    NodeSpec {
        name: name.to_string(),
        slots,
        labels: BTreeMap::new(),
        policy: ThrottlePolicy::Adaptive,
        physical_cores: slots,
        logical_cores: slots,
        memory_total_bytes: 16 * GIB,
        gpus: 0,
        queue_depth: 0,
        profile: Vec::new(),
    }
}

fn register(state: &mut State, spec: NodeSpec, running: Vec<AttemptRef>, now_ms: u64) {
    let outcome = state.apply(Command::RegisterNode {
        spec,
        running,
        seq: 0,
        now_ms,
    });
    assert_eq!(outcome, Outcome::Done);
}

/// A state with the named nodes (name, slots) registered at time 0, effects and dirty sets
/// cleared.
fn cluster(nodes: &[(&str, u32)]) -> State {
    let mut state = State::new(WaveLimits::default());
    for &(name, slots) in nodes {
        register(&mut state, node_spec(name, slots), Vec::new(), 0);
    }
    state.effects.clear();
    state.dirty = Dirty::default();
    state
}

fn submit(state: &mut State, text: &str, now_ms: u64) -> WaveId {
    match state.apply(Command::SubmitWave {
        owner: String::new(),
        spec: spec(text),
        traceparent: String::new(),
        submission_id: String::new(),
        now_ms,
    }) {
        Outcome::WaveSubmitted { wave_id, .. } => wave_id,
        other => panic!("submit failed: {other:?}"),
    }
}

fn take_effects(state: &mut State) -> Vec<Effect> {
    std::mem::take(&mut state.effects)
}

/// One scheduling round applied exactly as the replica proposes it: a `Schedule` command
/// (the plan is computed inside apply). No lease expires here. Returns the plan's
/// placements.
fn schedule_and_assign(state: &mut State, now_ms: u64) -> Vec<Placement> {
    let config = SchedulerConfig::default();
    let plan = schedule(state, &config);
    assert_eq!(
        state.apply(Command::Schedule { now_ms, config }),
        Outcome::Done
    );
    plan.placements
}

/// The attempt a micro-task is currently on.
fn current(state: &State, key: MicroKey) -> AttemptRef {
    AttemptRef {
        wave_id: key.0,
        micro: key.1,
        attempt: state.task(key).unwrap().attempt,
    }
}

/// A result for an explicit attempt.
fn result(
    attempt: AttemptRef,
    node: &str,
    exit_code: i32,
    started_ms: u64,
    finished_ms: u64,
) -> AttemptResult {
    AttemptResult {
        attempt,
        node: node.to_string(),
        outcome: AttemptOutcome {
            exit_code: Some(exit_code),
            started_ms,
            finished_ms,
            ..AttemptOutcome::default()
        },
    }
}

/// A result for the micro-task's current attempt from its current node.
fn current_result(
    state: &State,
    key: MicroKey,
    exit_code: i32,
    started_ms: u64,
    finished_ms: u64,
) -> AttemptResult {
    let node = state.task(key).unwrap().node.clone().unwrap();
    result(
        current(state, key),
        &node,
        exit_code,
        started_ms,
        finished_ms,
    )
}

fn finish(state: &mut State, results: Vec<AttemptResult>, now_ms: u64) {
    assert_eq!(
        state.apply(Command::Finished { results, now_ms }),
        Outcome::Done
    );
}

/// Finishes the current attempt of `key` with `exit_code` at `now_ms` (ran 1 ms before it).
fn finish_current(state: &mut State, key: MicroKey, exit_code: i32, now_ms: u64) {
    let r = current_result(state, key, exit_code, now_ms - 1, now_ms);
    finish(state, vec![r], now_ms);
}

fn task_state(state: &State, key: MicroKey) -> TaskState {
    state.task(key).unwrap().state
}

fn states(state: &State, wave_id: WaveId) -> Vec<TaskState> {
    state.waves[&wave_id]
        .tasks
        .iter()
        .map(|t| t.state)
        .collect()
}

fn header(state: &State, wave_id: WaveId) -> &WaveHeader {
    &state.waves[&wave_id].header
}

/// Runs everything to the end: schedule → assign → finish every placement, each attempt's
/// exit code from `exit_code(task id, array index, attempt)`. Each round takes 10 ms.
/// Returns the time after the last round.
fn simulate(
    state: &mut State,
    mut now_ms: u64,
    exit_code: impl Fn(&str, Option<u32>, u32) -> i32,
) -> u64 {
    for _ in 0..1_000 {
        let placements = schedule_and_assign(state, now_ms);
        if placements.is_empty() {
            return now_ms;
        }
        let results = placements
            .iter()
            .map(|p| {
                let task = state.task(p.key).unwrap();
                let id = &state.waves[&p.key.0].header.spec.tasks[task.group as usize].id;
                let code = exit_code(id, task.index, task.attempt);
                result(
                    current(state, p.key),
                    &p.node,
                    code,
                    now_ms + 1,
                    now_ms + 10,
                )
            })
            .collect();
        now_ms += 10;
        finish(state, results, now_ms);
    }
    panic!("the simulation did not converge");
}

/// Everything `apply` may change, for "state unchanged" checks.
#[derive(Debug, PartialEq)]
struct Snapshot {
    waves: BTreeMap<WaveId, Wave>,
    nodes: BTreeMap<String, Node>,
    ready: BTreeSet<MicroKey>,
    next_wave_id: WaveId,
}

fn snapshot(state: &State) -> Snapshot {
    Snapshot {
        waves: state.waves.clone(),
        nodes: state.nodes.clone(),
        ready: state.ready.clone(),
        next_wave_id: state.next_wave_id,
    }
}

/// prepare → shard[3] → merge, plus an independent root `side`.
/// Flat indices: prepare 0, shard 1..=3, merge 4, side 5.
const ETL: &str = r#"
name = "etl"

[[task]]
id = "prepare"
run = "true"

[[task]]
id = "shard"
array = 3
deps = ["prepare"]
retries = 1
run = "true"

[[task]]
id = "merge"
deps = ["shard"]
run = "true"

[[task]]
id = "side"
cmd = ["true"]
"#;

#[test]
fn submit_expands_arrays_marks_roots_ready_and_fills_dirty_sets() {
    let mut state = cluster(&[]);
    let outcome = state.apply(Command::SubmitWave {
        owner: String::new(),
        spec: spec(ETL),
        traceparent: "00-trace-01".into(),
        submission_id: String::new(),
        now_ms: 42,
    });
    assert_eq!(
        outcome,
        Outcome::WaveSubmitted {
            wave_id: 1,
            n_micro_tasks: 6
        }
    );
    let wave = &state.waves[&1];
    assert_eq!(
        states(&state, 1),
        vec![Ready, Pending, Pending, Pending, Pending, Ready]
    );
    let groups: Vec<(u32, Option<u32>)> = wave.tasks.iter().map(|t| (t.group, t.index)).collect();
    assert_eq!(
        groups,
        vec![
            (0, None),
            (1, Some(0)),
            (1, Some(1)),
            (1, Some(2)),
            (2, None),
            (3, None)
        ]
    );
    assert!(wave.tasks.iter().all(|t| t.attempt == 0 && t.failures == 0));
    assert_eq!(wave.tasks[0].ready_ms, 42);
    assert_eq!(wave.tasks[1].ready_ms, 0);
    let h = &wave.header;
    assert_eq!(h.id, 1);
    assert_eq!(h.state, WaveState::Pending);
    assert_eq!(h.traceparent, "00-trace-01");
    assert_eq!(h.submitted_ms, 42);
    assert_eq!(h.group_offsets, vec![0, 1, 4, 5]);
    assert_eq!(h.group_unmet_deps, vec![0, 1, 1, 0]);
    assert_eq!(h.group_remaining, vec![1, 3, 1, 1]);
    assert_eq!(h.group_dependents, vec![vec![1], vec![2], vec![], vec![]]);
    assert_eq!(h.group_range(1), 1..4);
    assert_eq!(h.group_range(3), 5..6);
    assert_eq!(
        h.counts,
        Counts {
            pending: 4,
            ready: 2,
            ..Counts::default()
        }
    );
    assert_eq!(state.ready, BTreeSet::from([(1, 0), (1, 5)]));
    assert_eq!(state.dirty.waves, BTreeSet::from([1]));
    assert_eq!(state.dirty.tasks, (0..6).map(|m| (1, m)).collect());
    assert!(state.dirty.nodes.is_empty());
    assert!(state.effects.is_empty());

    // The next wave gets the next id.
    assert_eq!(submit(&mut state, ETL, 50), 2);
    assert_eq!(state.next_wave_id, 3);
    assert_eq!(state.ready.len(), 4);
}

#[test]
fn submit_rejects_a_spec_over_the_limits_and_stores_nothing() {
    let mut state = State::new(WaveLimits {
        max_micro_tasks: 5,
        ..WaveLimits::default()
    });
    let outcome = state.apply(Command::SubmitWave {
        owner: String::new(),
        spec: spec(ETL),
        traceparent: String::new(),
        submission_id: String::new(),
        now_ms: 1,
    });
    let Outcome::Rejected(message) = outcome else {
        panic!("expected a rejection, got {outcome:?}");
    };
    assert!(message.contains("above the limit of 5"), "{message}");
    assert!(state.waves.is_empty());
    assert!(state.ready.is_empty());
    assert_eq!(state.next_wave_id, 1);
    assert!(state.dirty.waves.is_empty() && state.dirty.tasks.is_empty());
}

#[test]
fn dependent_becomes_ready_only_when_every_array_element_succeeded() {
    let mut state = cluster(&[("n1", 8)]);
    submit(&mut state, ETL, 0);
    // (micro-task finished, exit code, expected states of all six micro-tasks after it)
    let steps: [(u32, i32, [TaskState; 6]); 6] = [
        (0, 0, [Succeeded, Ready, Ready, Ready, Pending, Assigned]),
        (
            1,
            0,
            [Succeeded, Succeeded, Assigned, Assigned, Pending, Assigned],
        ),
        (
            2,
            0,
            [Succeeded, Succeeded, Succeeded, Assigned, Pending, Assigned],
        ),
        // The last shard fails once (retries = 1): merge still waits.
        (
            3,
            1,
            [Succeeded, Succeeded, Succeeded, Ready, Pending, Assigned],
        ),
        (
            3,
            0,
            [Succeeded, Succeeded, Succeeded, Succeeded, Ready, Assigned],
        ),
        (
            4,
            0,
            [
                Succeeded, Succeeded, Succeeded, Succeeded, Succeeded, Assigned,
            ],
        ),
    ];
    let mut now_ms = 10;
    schedule_and_assign(&mut state, now_ms);
    for (micro, exit_code, expected) in steps {
        now_ms += 10;
        if task_state(&state, (1, micro)) == Ready {
            schedule_and_assign(&mut state, now_ms);
        }
        finish_current(&mut state, (1, micro), exit_code, now_ms);
        assert_eq!(
            states(&state, 1),
            expected,
            "after micro {micro} exited {exit_code}"
        );
        if micro == 0 {
            // The whole array became ready at once and is dispatched in one message.
            assert_eq!(
                state.ready,
                BTreeSet::from([(1, 1), (1, 2), (1, 3)]),
                "shard ready"
            );
            schedule_and_assign(&mut state, now_ms);
        }
    }
    assert_eq!(header(&state, 1).state, WaveState::Running);
    assert_eq!(header(&state, 1).group_unmet_deps, vec![0, 0, 0, 0]);
    assert_eq!(header(&state, 1).group_remaining, vec![0, 0, 0, 1]);
    assert_eq!(state.task((1, 4)).unwrap().ready_ms, 60);
}

#[test]
fn a_dependent_on_several_tasks_waits_for_all_of_them() {
    let mut state = cluster(&[("n1", 8)]);
    let wave = submit(
        &mut state,
        r#"
name = "join"
[[task]]
id = "a"
run = "true"
[[task]]
id = "b"
array = 2
run = "true"
[[task]]
id = "join"
deps = ["a", "b"]
run = "true"
"#,
        0,
    );
    schedule_and_assign(&mut state, 1);
    finish_current(&mut state, (wave, 1), 0, 2);
    finish_current(&mut state, (wave, 2), 0, 3);
    assert_eq!(task_state(&state, (wave, 3)), Pending);
    assert_eq!(header(&state, wave).group_unmet_deps, vec![0, 0, 1]);
    finish_current(&mut state, (wave, 0), 0, 4);
    assert_eq!(task_state(&state, (wave, 3)), Ready);
    assert_eq!(state.ready, BTreeSet::from([(wave, 3)]));
}

#[test]
fn retries_dispatch_the_next_attempt_and_count_failures() {
    // (exit codes of successive attempts, final state, final attempt, final failures)
    let cases: [(&[i32], TaskState, u32, u32); 4] = [
        (&[0], Succeeded, 1, 0),
        (&[1, 0], Succeeded, 2, 1),
        (&[1, 1, 0], Succeeded, 3, 2),
        (&[1, 1, 1], Failed, 3, 3),
    ];
    for (exits, final_state, final_attempt, final_failures) in cases {
        let mut state = cluster(&[("n1", 2)]);
        submit(
            &mut state,
            "name = \"r\"\n[[task]]\nid = \"t\"\nrun = \"false\"\nretries = 2\n",
            0,
        );
        for (i, &exit_code) in exits.iter().enumerate() {
            let attempt = i as u32 + 1;
            let now_ms = 100 * u64::from(attempt);
            take_effects(&mut state);
            let placements = schedule_and_assign(&mut state, now_ms);
            assert_eq!(placements.len(), 1, "{exits:?}");
            assert_eq!(
                take_effects(&mut state),
                vec![Effect::Dispatch {
                    node: "n1".into(),
                    attempts: vec![AttemptRef::new((1, 0), attempt)]
                }],
                "{exits:?} attempt {attempt}"
            );
            finish_current(&mut state, (1, 0), exit_code, now_ms + 50);
            let task = state.task((1, 0)).unwrap();
            assert_eq!(task.attempt, attempt);
            assert_eq!(
                task.failures,
                exits[..=i].iter().filter(|&&c| c != 0).count() as u32
            );
            assert_eq!(task.outcome.exit_code, Some(exit_code));
            if exit_code != 0 && i + 1 < exits.len() {
                assert_eq!(task.state, Ready);
                assert_eq!(task.ready_ms, now_ms + 50);
                assert_eq!(state.ready, BTreeSet::from([(1, 0)]));
                assert_eq!(state.nodes["n1"].used_cpus, 0);
            }
        }
        let task = state.task((1, 0)).unwrap();
        assert_eq!(
            (task.state, task.attempt, task.failures),
            (final_state, final_attempt, final_failures),
            "{exits:?}"
        );
        let expected_wave = if final_state == Succeeded {
            WaveState::Succeeded
        } else {
            WaveState::Failed
        };
        assert_eq!(header(&state, 1).state, expected_wave, "{exits:?}");
        assert!(schedule_and_assign(&mut state, 10_000).is_empty());
    }
}

#[test]
fn results_are_classified_and_recorded() {
    // (how the result differs from a clean exit 0, whether it counts as success)
    type Tweak = fn(&mut AttemptResult);
    let cases: [(&str, Tweak, TaskState); 7] = [
        ("exit 0", |_| {}, Succeeded),
        ("exit 3", |r| r.outcome.exit_code = Some(3), Failed),
        (
            "killed by a signal",
            |r| {
                r.outcome.exit_code = None;
                r.outcome.signal = Some(9);
            },
            Failed,
        ),
        ("timed out", |r| r.outcome.timed_out = true, Failed),
        (
            "failed to start",
            |r| r.outcome.error = Some("spawn: no such file".into()),
            Failed,
        ),
        (
            "cancelled without a wave cancel",
            |r| r.outcome.cancelled = true,
            Failed,
        ),
        ("no exit code", |r| r.outcome.exit_code = None, Failed),
    ];
    for (what, tweak, expected) in cases {
        let mut state = cluster(&[("n1", 1)]);
        submit(
            &mut state,
            "name = \"c\"\n[[task]]\nid = \"t\"\nrun = \"x\"\n",
            0,
        );
        schedule_and_assign(&mut state, 1);
        let mut r = current_result(&state, (1, 0), 0, 5, 9);
        r.outcome.stdout = b"out".to_vec();
        r.outcome.stderr = b"err".to_vec();
        r.outcome.stderr_truncated = true;
        tweak(&mut r);
        let sent = r.clone();
        finish(&mut state, vec![r], 10);
        let task = state.task((1, 0)).unwrap();
        assert_eq!(task.state, expected, "{what}");
        assert_eq!(task.outcome.exit_code, sent.outcome.exit_code, "{what}");
        assert_eq!(task.outcome.signal, sent.outcome.signal, "{what}");
        assert_eq!(task.outcome.timed_out, sent.outcome.timed_out, "{what}");
        assert_eq!(
            task.error,
            sent.outcome.error.clone().unwrap_or_default(),
            "{what}"
        );
        assert_eq!(
            (task.outcome.started_ms, task.outcome.finished_ms),
            (5, 9),
            "{what}"
        );
        assert_eq!(task.outcome.stdout, b"out", "{what}");
        assert_eq!(task.outcome.stderr, b"err", "{what}");
        assert!(
            !task.outcome.stdout_truncated && task.outcome.stderr_truncated,
            "{what}"
        );
        let wave_state = if expected == Succeeded {
            WaveState::Succeeded
        } else {
            WaveState::Failed
        };
        assert_eq!(header(&state, 1).state, wave_state, "{what}");
        assert_eq!(state.stale_results, 0, "{what}");
    }
}

/// a (fails for good) → b[2] → c, a → z ← x → y; x and y are independent of a.
/// Flat: a 0, b 1..=2, c 3, x 4, y 5, z 6.
const SKIP: &str = r#"
name = "skip"

[[task]]
id = "a"
run = "false"
retries = 1

[[task]]
id = "b"
array = 2
deps = ["a"]
run = "true"

[[task]]
id = "c"
deps = ["b"]
run = "true"

[[task]]
id = "x"
run = "true"

[[task]]
id = "y"
deps = ["x"]
run = "true"

[[task]]
id = "z"
deps = ["a", "x"]
run = "true"
"#;

#[test]
fn exhausted_retries_skip_all_transitive_dependents_while_independent_branch_runs() {
    let mut state = cluster(&[("n1", 4)]);
    submit(&mut state, SKIP, 0);
    assert_eq!(schedule_and_assign(&mut state, 1).len(), 2); // a and x
    finish_current(&mut state, (1, 0), 1, 10);
    assert_eq!(task_state(&state, (1, 0)), Ready);
    assert_eq!(schedule_and_assign(&mut state, 11).len(), 1);
    assert_eq!(state.task((1, 0)).unwrap().attempt, 2);
    state.dirty = Dirty::default();
    finish_current(&mut state, (1, 0), 1, 20);

    assert_eq!(
        states(&state, 1),
        vec![Failed, Skipped, Skipped, Skipped, Assigned, Pending, Skipped]
    );
    let wave = &state.waves[&1];
    assert_eq!(wave.tasks[0].failures, 2);
    for micro in [1, 2, 3, 6] {
        assert_eq!(
            wave.tasks[micro].error, "dependency `a` failed",
            "micro {micro}"
        );
    }
    assert_eq!(
        wave.header.state,
        WaveState::Running,
        "x's branch still runs"
    );
    assert_eq!(
        state.dirty.tasks,
        BTreeSet::from([(1, 0), (1, 1), (1, 2), (1, 3), (1, 6)])
    );
    assert!(state.dirty.waves.contains(&1));

    // The independent branch goes on to the end; the wave then fails.
    finish_current(&mut state, (1, 4), 0, 30);
    assert_eq!(task_state(&state, (1, 5)), Ready);
    assert_eq!(task_state(&state, (1, 6)), Skipped, "z stays skipped");
    assert_eq!(schedule_and_assign(&mut state, 31).len(), 1);
    finish_current(&mut state, (1, 5), 0, 40);
    assert_eq!(
        states(&state, 1),
        vec![Failed, Skipped, Skipped, Skipped, Succeeded, Succeeded, Skipped]
    );
    let h = header(&state, 1);
    assert_eq!(h.state, WaveState::Failed);
    assert_eq!(
        h.counts,
        Counts {
            succeeded: 2,
            failed: 1,
            skipped: 4,
            ..Counts::default()
        }
    );
    assert!(state.ready.is_empty());
}

#[test]
fn simulated_run_of_a_wave_with_a_flaky_array_element_succeeds() {
    let mut state = cluster(&[("n1", 2), ("n2", 2)]);
    submit(&mut state, ETL, 0);
    let end_ms = simulate(&mut state, 100, |id, index, attempt| {
        i32::from(id == "shard" && index == Some(1) && attempt == 1)
    });
    let wave = &state.waves[&1];
    assert_eq!(wave.header.state, WaveState::Succeeded);
    let attempts: Vec<u32> = wave.tasks.iter().map(|t| t.attempt).collect();
    assert_eq!(attempts, vec![1, 1, 2, 1, 1, 1]);
    let failures: Vec<u32> = wave.tasks.iter().map(|t| t.failures).collect();
    assert_eq!(failures, vec![0, 0, 1, 0, 0, 0]);
    // Rounds: prepare+side, shard×3, shard[1] again, merge.
    assert_eq!(end_ms, 140);
    assert!(state
        .nodes
        .values()
        .all(|n| n.active.is_empty() && n.used_cpus == 0));
}

#[test]
fn fail_wave_cancels_everything_open_and_kills_what_runs() {
    let mut state = cluster(&[("n1", 2)]);
    submit(
        &mut state,
        r#"
name = "fw"
on_failure = "fail-wave"
[[task]]
id = "a"
run = "false"
[[task]]
id = "b"
run = "sleep 100"
[[task]]
id = "c"
deps = ["b"]
run = "true"
[[task]]
id = "d"
deps = ["a"]
run = "true"
"#,
        0,
    );
    assert_eq!(schedule_and_assign(&mut state, 1).len(), 2);
    state.apply(Command::Started {
        node: "n1".into(),
        attempts: vec![(current(&state, (1, 1)), 3)],
    });
    assert_eq!(task_state(&state, (1, 1)), Running);
    take_effects(&mut state);
    let a = current(&state, (1, 0));
    finish(&mut state, vec![result(a, "n1", 1, 2, 5)], 6);

    assert_eq!(
        states(&state, 1),
        vec![Failed, Cancelled, Cancelled, Cancelled]
    );
    let reason = "another task failed (on_failure = fail-wave)";
    for micro in 1..4 {
        assert_eq!(state.waves[&1].tasks[micro].error, reason);
    }
    assert_eq!(
        take_effects(&mut state),
        vec![
            Effect::Cancel {
                node: "n1".into(),
                attempts: vec![AttemptRef {
                    wave_id: 1,
                    micro: 1,
                    attempt: 1
                }]
            },
            Effect::Ack {
                node: "n1".into(),
                attempts: vec![a]
            },
        ]
    );
    let h = header(&state, 1);
    assert_eq!(h.state, WaveState::Failed);
    assert!(!h.cancel_requested);
    assert_eq!(
        h.counts,
        Counts {
            failed: 1,
            cancelled: 3,
            ..Counts::default()
        }
    );
    let n1 = &state.nodes["n1"];
    assert!(n1.active.is_empty());
    assert_eq!(n1.used_cpus, 0);

    // The killed process reports back later: stale.
    let mut late = result(
        AttemptRef {
            wave_id: 1,
            micro: 1,
            attempt: 1,
        },
        "n1",
        -1,
        3,
        7,
    );
    late.outcome.cancelled = true;
    finish(&mut state, vec![late], 8);
    assert_eq!(state.stale_results, 1);
    assert_eq!(task_state(&state, (1, 1)), Cancelled);
}

#[test]
fn cancelling_a_wave_cancels_its_tasks_and_kills_per_node() {
    let mut state = cluster(&[("n1", 1), ("n2", 1)]);
    let other = submit(
        &mut state,
        "name = \"o\"\n[[task]]\nid = \"o\"\nrun = \"x\"\n",
        0,
    );
    let wave = submit(
        &mut state,
        "name = \"w\"\n[[task]]\nid = \"a\"\narray = 3\nrun = \"x\"\n[[task]]\nid = \"b\"\ndeps = [\"a\"]\nrun = \"x\"\n",
        0,
    );
    // The other wave takes n1 first, so take it off again before the real test.
    let placements = schedule_and_assign(&mut state, 1);
    assert_eq!(
        placements,
        vec![
            Placement {
                key: (other, 0),
                node: "n1".into()
            },
            Placement {
                key: (wave, 0),
                node: "n2".into()
            },
        ]
    );
    finish_current(&mut state, (other, 0), 0, 2);
    assert_eq!(
        schedule_and_assign(&mut state, 3),
        vec![Placement {
            key: (wave, 1),
            node: "n1".into()
        }]
    );
    state.apply(Command::Started {
        node: "n2".into(),
        attempts: vec![(current(&state, (wave, 0)), 100)],
    });
    take_effects(&mut state);
    state.dirty = Dirty::default();

    let outcome = state.apply(Command::CancelWave {
        wave_id: wave,
        now_ms: 500,
    });
    assert_eq!(outcome, Outcome::WaveCancelled { n_cancelled: 4 });
    assert_eq!(states(&state, wave), vec![Cancelled; 4]);
    assert!(state.waves[&wave]
        .tasks
        .iter()
        .all(|t| t.error == "wave cancelled"));
    assert_eq!(
        take_effects(&mut state),
        vec![
            Effect::Cancel {
                node: "n1".into(),
                attempts: vec![AttemptRef {
                    wave_id: wave,
                    micro: 1,
                    attempt: 1
                }]
            },
            Effect::Cancel {
                node: "n2".into(),
                attempts: vec![AttemptRef {
                    wave_id: wave,
                    micro: 0,
                    attempt: 1
                }]
            },
        ]
    );
    let h = header(&state, wave);
    assert_eq!(h.state, WaveState::Cancelled);
    assert!(h.cancel_requested);
    assert_eq!((h.started_ms, h.finished_ms), (100, 500));
    assert_eq!(h.counts.cancelled, 4);
    assert!(state.ready.is_empty());
    assert!(state
        .nodes
        .values()
        .all(|n| n.active.is_empty() && n.used_cpus == 0));
    assert_eq!(state.dirty.tasks, (0..4).map(|m| (wave, m)).collect());
    assert_eq!(state.dirty.waves, BTreeSet::from([wave]));
    // The other wave is untouched.
    assert_eq!(header(&state, other).state, WaveState::Succeeded);

    // The killed attempts report back: stale; nothing is dispatched any more.
    let mut late = result(
        AttemptRef {
            wave_id: wave,
            micro: 0,
            attempt: 1,
        },
        "n2",
        -1,
        100,
        600,
    );
    late.outcome.cancelled = true;
    late.outcome.signal = Some(15);
    finish(&mut state, vec![late], 600);
    assert_eq!(state.stale_results, 1);
    assert_eq!(header(&state, wave).finished_ms, 500);
    assert!(schedule_and_assign(&mut state, 601).is_empty());

    // Cancelling again, or an unknown wave.
    assert_eq!(
        state.apply(Command::CancelWave {
            wave_id: wave,
            now_ms: 700
        }),
        Outcome::WaveCancelled { n_cancelled: 0 }
    );
    assert_eq!(
        state.apply(Command::CancelWave {
            wave_id: 99,
            now_ms: 700
        }),
        Outcome::Rejected("wave 99 not found".into())
    );
}

#[test]
fn stale_results_are_ignored_counted_and_acknowledged() {
    // One task with a label only n1 carries, now on its second attempt on n1.
    let build = || {
        let mut state = State::new(WaveLimits::default());
        let mut n1 = node_spec("n1", 2);
        n1.labels.insert("pool".into(), "a".into());
        register(&mut state, n1, Vec::new(), 0);
        register(&mut state, node_spec("n2", 2), Vec::new(), 0);
        submit(
            &mut state,
            "name = \"f\"\n[[task]]\nid = \"t\"\narray = 2\nretries = 3\nlabels = { pool = \"a\" }\nrun = \"x\"\n",
            0,
        );
        schedule_and_assign(&mut state, 1);
        finish_current(&mut state, (1, 0), 1, 2);
        schedule_and_assign(&mut state, 3);
        assert_eq!(current(&state, (1, 0)).attempt, 2);
        assert_eq!(task_state(&state, (1, 0)), Assigned);
        state.effects.clear();
        state.dirty = Dirty::default();
        state
    };
    let at = |wave_id, micro, attempt| AttemptRef {
        wave_id,
        micro,
        attempt,
    };
    let cases = [
        ("older attempt", at(1, 0, 1), "n1"),
        ("future attempt", at(1, 0, 3), "n1"),
        ("wrong node", at(1, 0, 2), "n2"),
        ("unknown node", at(1, 0, 2), "n9"),
        ("unknown wave", at(9, 0, 1), "n1"),
        ("micro-task out of range", at(1, 7, 1), "n1"),
        ("never dispatched attempt 0", at(1, 0, 0), "n1"),
    ];
    for (what, attempt, node) in cases {
        for exit_code in [0, 1] {
            let mut state = build();
            let before = snapshot(&state);
            finish(&mut state, vec![result(attempt, node, exit_code, 5, 6)], 7);
            assert_eq!(state.stale_results, 1, "{what}");
            assert_eq!(snapshot(&state), before, "{what}: state changed");
            assert!(
                state.dirty.tasks.is_empty() && state.dirty.waves.is_empty(),
                "{what}"
            );
            assert_eq!(
                state.effects,
                vec![Effect::Ack {
                    node: node.into(),
                    attempts: vec![attempt]
                }],
                "{what}"
            );
        }
    }

    // A duplicate of a recorded result, and any result after the task finished.
    let mut state = build();
    let done = current_result(&state, (1, 0), 0, 5, 6);
    finish(&mut state, vec![done.clone()], 7);
    assert_eq!(state.stale_results, 0);
    assert_eq!(task_state(&state, (1, 0)), Succeeded);
    let before = snapshot(&state);
    let mut failed_late = done.clone();
    failed_late.outcome.exit_code = Some(1);
    failed_late.outcome.finished_ms = 60;
    finish(&mut state, vec![done.clone()], 8);
    finish(&mut state, vec![failed_late], 9);
    assert_eq!(state.stale_results, 2);
    assert_eq!(snapshot(&state), before);
    assert_eq!(state.task((1, 0)).unwrap().outcome.finished_ms, 6);
}

#[test]
fn started_is_fenced_and_records_the_start() {
    let mut state = cluster(&[("n1", 2)]);
    submit(
        &mut state,
        "name = \"s\"\n[[task]]\nid = \"t\"\nrun = \"x\"\n",
        0,
    );
    schedule_and_assign(&mut state, 1);
    let attempt = current(&state, (1, 0));
    let before = snapshot(&state);
    // Wrong node, wrong attempt, unknown micro-task: ignored.
    state.apply(Command::Started {
        node: "n2".into(),
        attempts: vec![(attempt, 5)],
    });
    state.apply(Command::Started {
        node: "n1".into(),
        attempts: vec![
            (
                AttemptRef {
                    attempt: 2,
                    ..attempt
                },
                5,
            ),
            (
                AttemptRef {
                    micro: 3,
                    ..attempt
                },
                5,
            ),
        ],
    });
    assert_eq!(snapshot(&state), before);
    state.apply(Command::Started {
        node: "n1".into(),
        attempts: vec![(attempt, 5)],
    });
    let task = state.task((1, 0)).unwrap();
    assert_eq!((task.state, task.outcome.started_ms), (Running, 5));
    let h = header(&state, 1);
    assert_eq!(h.started_ms, 5);
    assert_eq!((h.counts.assigned, h.counts.running), (0, 1));
    // A repeated Started does not move the start.
    state.apply(Command::Started {
        node: "n1".into(),
        attempts: vec![(attempt, 9)],
    });
    assert_eq!(state.task((1, 0)).unwrap().outcome.started_ms, 5);
    assert_eq!(state.stale_results, 0, "Started never counts as a result");
}

#[test]
fn mark_down_returns_work_to_ready_without_consuming_a_retry() {
    let mut state = cluster(&[("n1", 2), ("n2", 1)]);
    submit(
        &mut state,
        "name = \"m\"\n[[task]]\nid = \"t\"\narray = 3\nretries = 1\nrun = \"x\"\n",
        0,
    );
    let placements = schedule_and_assign(&mut state, 1);
    let on: Vec<(u32, &str)> = placements
        .iter()
        .map(|p| (p.key.1, p.node.as_str()))
        .collect();
    // Most free slots first, ties to the smallest name.
    assert_eq!(on, vec![(0, "n1"), (1, "n1"), (2, "n2")]);
    state.apply(Command::Started {
        node: "n1".into(),
        attempts: vec![(current(&state, (1, 0)), 2)],
    });
    state.dirty = Dirty::default();
    take_effects(&mut state);

    let outcome = state.mark_down("n1", 50);
    assert_eq!(outcome, Outcome::Done);
    assert_eq!(states(&state, 1), vec![Ready, Ready, Assigned]);
    for micro in [0, 1] {
        let task = state.task((1, micro)).unwrap();
        assert_eq!(task.attempt, 1);
        assert_eq!(task.failures, 0);
        assert_eq!(task.ready_ms, 50);
        assert_eq!(task.error, "lost: node down");
    }
    let n1 = &state.nodes["n1"];
    assert_eq!(n1.state, NodeState::Down);
    assert_eq!(n1.usable_slots(), 0);
    assert!(n1.active.is_empty());
    assert_eq!((n1.used_cpus, n1.used_memory_bytes), (0, 0));
    assert_eq!(state.ready, BTreeSet::from([(1, 0), (1, 1)]));
    assert_eq!(state.dirty.nodes, BTreeSet::from(["n1".to_string()]));
    assert_eq!(state.dirty.tasks, BTreeSet::from([(1, 0), (1, 1)]));
    assert_eq!(header(&state, 1).counts.ready, 2);
    assert!(state.effects.is_empty());

    // n2 frees up and takes (1, 0) as attempt 2; the old attempt's late result is stale.
    finish_current(&mut state, (1, 2), 0, 60);
    assert_eq!(
        schedule_and_assign(&mut state, 61),
        vec![Placement {
            key: (1, 0),
            node: "n2".into()
        }]
    );
    assert_eq!(current(&state, (1, 0)).attempt, 2);
    let old = |micro| AttemptRef {
        wave_id: 1,
        micro,
        attempt: 1,
    };
    let before = snapshot(&state);
    finish(
        &mut state,
        vec![
            result(old(0), "n1", 0, 2, 70),
            result(old(1), "n1", 0, 2, 70),
        ],
        70,
    );
    assert_eq!(state.stale_results, 2);
    assert_eq!(snapshot(&state), before);

    // The retry budget is intact: the first real failure still gets a retry.
    finish_current(&mut state, (1, 0), 1, 80);
    let task = state.task((1, 0)).unwrap();
    assert_eq!((task.state, task.failures), (Ready, 1));

    assert_eq!(
        state.mark_down("n9", 90),
        Outcome::Rejected("node `n9` not found".into())
    );
}

#[test]
fn reregistering_node_reconciles_what_it_runs() {
    let mut state = cluster(&[("n1", 4), ("n2", 4)]);
    // Keep everything on n1: n2 is drained while the wave is placed.
    state.apply(Command::Drain {
        node: "n2".into(),
        drain: true,
    });
    submit(
        &mut state,
        "name = \"r\"\n[[task]]\nid = \"t\"\narray = 3\nrun = \"x\"\n",
        0,
    );
    assert_eq!(schedule_and_assign(&mut state, 1).len(), 3);
    state.apply(Command::Started {
        node: "n1".into(),
        attempts: vec![(current(&state, (1, 0)), 2)],
    });
    take_effects(&mut state);
    state.dirty = Dirty::default();

    let at = |micro, attempt| AttemptRef {
        wave_id: 1,
        micro,
        attempt,
    };
    // n1 comes back running (1,0) attempt 1, plus an unknown micro-task and a stale attempt
    // of (1,1); it does not report (1,2).
    register(
        &mut state,
        node_spec("n1", 4),
        vec![at(0, 1), at(5, 1), at(1, 7)],
        100,
    );
    assert_eq!(states(&state, 1), vec![Running, Ready, Ready]);
    assert_eq!(
        state.task((1, 1)).unwrap().error,
        "lost: node restarted without it"
    );
    assert_eq!(state.task((1, 1)).unwrap().failures, 0);
    assert_eq!(state.task((1, 2)).unwrap().ready_ms, 100);
    assert_eq!(
        take_effects(&mut state),
        vec![
            Effect::Cancel {
                node: "n1".into(),
                attempts: vec![at(5, 1), at(1, 7)]
            },
            Effect::Lease {
                node: "n1".into(),
                seq: 0
            },
            Effect::SlotsLimit {
                node: "n1".into(),
                slots: 4
            },
        ]
    );
    let n1 = &state.nodes["n1"];
    assert_eq!(n1.active, BTreeSet::from([(1, 0)]));
    assert_eq!(n1.used_cpus, 1);
    assert_eq!(n1.last_heartbeat_ms, 100);
    assert_eq!(state.ready, BTreeSet::from([(1, 1), (1, 2)]));
    assert!(state.dirty.nodes.contains("n1"));
    assert_eq!(state.dirty.tasks, BTreeSet::from([(1, 1), (1, 2)]));

    // Another node claiming n1's attempt is told to kill it; n1 keeps it.
    register(&mut state, node_spec("n2", 4), vec![at(0, 1)], 101);
    assert_eq!(
        take_effects(&mut state),
        vec![
            Effect::Cancel {
                node: "n2".into(),
                attempts: vec![at(0, 1)]
            },
            Effect::Lease {
                node: "n2".into(),
                seq: 0
            },
            Effect::SlotsLimit {
                node: "n2".into(),
                slots: 0
            },
        ]
    );
    assert_eq!(
        state.nodes["n2"].state,
        NodeState::Draining,
        "drain survives"
    );
    assert_eq!(task_state(&state, (1, 0)), Running);
    assert_eq!(state.task((1, 0)).unwrap().node.as_deref(), Some("n1"));

    // A node marked down re-registers: Ready again, and what it still runs is stale.
    state.mark_down("n1", 200);
    assert_eq!(task_state(&state, (1, 0)), Ready);
    register(&mut state, node_spec("n1", 4), vec![at(0, 1)], 300);
    assert_eq!(state.nodes["n1"].state, NodeState::Ready);
    assert_eq!(
        take_effects(&mut state),
        vec![
            Effect::Cancel {
                node: "n1".into(),
                attempts: vec![at(0, 1)]
            },
            Effect::Lease {
                node: "n1".into(),
                seq: 0
            },
            Effect::SlotsLimit {
                node: "n1".into(),
                slots: 4
            },
        ]
    );
    assert_eq!(state.ready, BTreeSet::from([(1, 0), (1, 1), (1, 2)]));
}

#[test]
fn registering_a_new_node_records_it() {
    let mut state = State::new(WaveLimits::default());
    let mut spec = node_spec("n1", 6);
    spec.gpus = 2;
    register(&mut state, spec.clone(), Vec::new(), 7);
    let n1 = &state.nodes["n1"];
    assert_eq!(n1.spec, spec);
    assert_eq!(n1.state, NodeState::Ready);
    assert!(!n1.draining);
    assert_eq!(n1.theta, 1.0);
    assert_eq!(n1.memory_available_bytes, 16 * GIB);
    assert_eq!(n1.last_heartbeat_ms, 7);
    assert_eq!(n1.usable_slots(), 6);
    assert_eq!(
        state.effects,
        vec![
            Effect::Lease {
                node: "n1".into(),
                seq: 0
            },
            Effect::SlotsLimit {
                node: "n1".into(),
                slots: 6
            }
        ]
    );
    assert_eq!(state.dirty.nodes, BTreeSet::from(["n1".to_string()]));
    assert!(state.cluster_s_total() > 0.0);
}

#[test]
fn every_result_is_acknowledged_to_its_node_stale_ones_included() {
    let mut state = cluster(&[("n1", 1), ("n2", 1)]);
    submit(
        &mut state,
        "name = \"a\"\n[[task]]\nid = \"t\"\narray = 2\nrun = \"x\"\n",
        0,
    );
    schedule_and_assign(&mut state, 1);
    let good0 = current_result(&state, (1, 0), 0, 2, 3);
    let good1 = current_result(&state, (1, 1), 0, 2, 3);
    assert_eq!((good0.node.as_str(), good1.node.as_str()), ("n1", "n2"));
    let stale = result(
        AttemptRef {
            wave_id: 1,
            micro: 1,
            attempt: 4,
        },
        "n1",
        0,
        2,
        3,
    );
    take_effects(&mut state);
    finish(
        &mut state,
        vec![good1.clone(), stale.clone(), good0.clone()],
        4,
    );
    assert_eq!(
        take_effects(&mut state),
        vec![
            Effect::Ack {
                node: "n1".into(),
                attempts: vec![stale.attempt, good0.attempt]
            },
            Effect::Ack {
                node: "n2".into(),
                attempts: vec![good1.attempt]
            },
        ]
    );
    assert_eq!(state.stale_results, 1);
    assert_eq!(header(&state, 1).state, WaveState::Succeeded);
}

#[test]
fn drain_stops_new_work_but_lets_running_work_finish() {
    let mut state = cluster(&[("n1", 4)]);
    submit(
        &mut state,
        "name = \"d\"\n[[task]]\nid = \"t\"\narray = 3\nrun = \"x\"\n",
        0,
    );
    assert_eq!(schedule_and_assign(&mut state, 1).len(), 3);
    finish_current(&mut state, (1, 0), 1, 2); // no retries: fails for good
    submit(
        &mut state,
        "name = \"e\"\n[[task]]\nid = \"u\"\nrun = \"x\"\n",
        3,
    );
    take_effects(&mut state);
    state.dirty = Dirty::default();

    assert_eq!(
        state.apply(Command::Drain {
            node: "n1".into(),
            drain: true
        }),
        Outcome::Done
    );
    let n1 = &state.nodes["n1"];
    assert_eq!(n1.state, NodeState::Draining);
    assert!(n1.draining);
    assert_eq!(n1.usable_slots(), 0);
    assert_eq!(
        take_effects(&mut state),
        vec![Effect::SlotsLimit {
            node: "n1".into(),
            slots: 0
        }]
    );
    assert_eq!(state.dirty.nodes, BTreeSet::from(["n1".to_string()]));
    assert!(schedule_and_assign(&mut state, 4).is_empty());
    // A placement on a draining node is refused by apply too.
    state.assign(
        vec![Placement {
            key: (2, 0),
            node: "n1".into(),
        }],
        5,
    );
    assert_eq!(task_state(&state, (2, 0)), Ready);
    assert!(state.effects.is_empty());
    // Running work still finishes normally.
    finish_current(&mut state, (1, 1), 0, 6);
    assert_eq!(task_state(&state, (1, 1)), Succeeded);
    assert_eq!(state.stale_results, 0);

    take_effects(&mut state);
    state.apply(Command::Drain {
        node: "n1".into(),
        drain: false,
    });
    assert_eq!(state.nodes["n1"].state, NodeState::Ready);
    assert_eq!(
        take_effects(&mut state),
        vec![Effect::SlotsLimit {
            node: "n1".into(),
            slots: 4
        }]
    );
    assert_eq!(
        schedule_and_assign(&mut state, 7),
        vec![Placement {
            key: (2, 0),
            node: "n1".into()
        }]
    );

    // Draining a node that is down keeps it down.
    state.mark_down("n1", 8);
    state.apply(Command::Drain {
        node: "n1".into(),
        drain: true,
    });
    assert_eq!(state.nodes["n1"].state, NodeState::Down);
    assert_eq!(
        state.apply(Command::Drain {
            node: "n9".into(),
            drain: true
        }),
        Outcome::Rejected("node `n9` not found".into())
    );
}

#[test]
fn finished_wave_records_work_makespan_speedup_and_dag_bound() {
    let mut state = cluster(&[("n1", 4)]);
    submit(
        &mut state,
        r#"
name = "stats"
[[task]]
id = "a"
run = "x"
[[task]]
id = "b"
deps = ["a"]
run = "x"
[[task]]
id = "c"
deps = ["a"]
retries = 1
run = "x"
"#,
        500,
    );
    assert_eq!(header(&state, 1).state, WaveState::Pending);
    schedule_and_assign(&mut state, 1_000);
    assert_eq!(header(&state, 1).state, WaveState::Running);
    let a = current_result(&state, (1, 0), 0, 1_000, 2_000);
    finish(&mut state, vec![a], 2_000);
    schedule_and_assign(&mut state, 2_000);
    let c1 = current_result(&state, (1, 2), 1, 2_000, 2_500);
    finish(&mut state, vec![c1], 2_500);
    schedule_and_assign(&mut state, 2_500);
    let c2 = current_result(&state, (1, 2), 0, 2_500, 3_500);
    finish(&mut state, vec![c2], 3_500);
    assert_eq!(header(&state, 1).state, WaveState::Running);
    // b started late (worker time 2 500) and ran 3 000 ms.
    let b = current_result(&state, (1, 1), 0, 2_500, 5_500);
    finish(&mut state, vec![b], 5_600);

    let h = header(&state, 1);
    assert_eq!(h.state, WaveState::Succeeded);
    assert_eq!(h.counts.succeeded, 3);
    assert_eq!(h.work_ms, 1_000 + 500 + 1_000 + 3_000);
    assert_eq!(h.group_work_ms, vec![1_000, 3_000, 1_500]);
    assert_eq!(h.group_longest_ms, vec![1_000, 3_000, 1_000]);
    assert_eq!((h.started_ms, h.finished_ms), (1_000, 5_500));
    assert_eq!(h.makespan_ms(), 4_500);
    assert!((h.measured_speedup() - 5_500.0 / 4_500.0).abs() < 1e-12);
    // Critical path a → b: 1 000 + 3 000.
    assert!((h.dag_bound() - 5_500.0 / 4_000.0).abs() < 1e-12);
    assert_eq!(h.model_s_total, state.cluster_s_total());
    assert!(h.model_s_total > 0.0);
    assert_eq!(h.submitted_ms, 500);
}

#[test]
fn an_unfinished_wave_has_zero_speedup_figures() {
    let mut state = cluster(&[]);
    submit(
        &mut state,
        "name = \"z\"\n[[task]]\nid = \"t\"\nrun = \"x\"\n",
        0,
    );
    let h = header(&state, 1);
    assert_eq!(h.makespan_ms(), 0);
    assert_eq!(h.measured_speedup(), 0.0);
    assert_eq!(h.dag_bound(), 0.0);
}

#[test]
fn a_wave_that_ends_without_any_process_starting_has_no_makespan() {
    const NOW_MS: u64 = 1_700_000_000_000;
    // Cancelled before anything was dispatched.
    let mut state = cluster(&[("n1", 1)]);
    submit(
        &mut state,
        "name = \"c\"\n[[task]]\nid = \"t\"\nrun = \"x\"\n",
        0,
    );
    state.apply(Command::CancelWave {
        wave_id: 1,
        now_ms: NOW_MS,
    });
    let h = header(&state, 1);
    assert_eq!(h.state, WaveState::Cancelled);
    assert_eq!((h.started_ms, h.finished_ms), (0, NOW_MS));
    assert_eq!(h.makespan_ms(), 0);
    assert_eq!(h.measured_speedup(), 0.0);

    // Every attempt failed to start (no start time).
    let mut state = cluster(&[("n1", 1)]);
    submit(
        &mut state,
        "name = \"s\"\n[[task]]\nid = \"t\"\nrun = \"x\"\n",
        0,
    );
    schedule_and_assign(&mut state, 1);
    let mut r = current_result(&state, (1, 0), 0, 0, NOW_MS);
    r.outcome.exit_code = None;
    r.outcome.error = Some("spawn: no such file".into());
    finish(&mut state, vec![r], NOW_MS);
    let h = header(&state, 1);
    assert_eq!(h.state, WaveState::Failed);
    assert_eq!(h.work_ms, 0);
    assert_eq!(h.makespan_ms(), 0);
    assert_eq!(h.measured_speedup(), 0.0);
}

#[test]
fn batch_applies_in_order_and_returns_each_outcome() {
    let mut state = cluster(&[("n1", 1)]);
    let outcome = state.apply(Command::Batch(vec![
        Command::SubmitWave {
            owner: String::new(),
            spec: spec("name = \"b\"\n[[task]]\nid = \"t\"\nrun = \"x\"\n"),
            traceparent: String::new(),
            submission_id: String::new(),
            now_ms: 0,
        },
        Command::Schedule {
            now_ms: 1,
            config: SchedulerConfig::default(),
        },
        Command::Drain {
            node: "nope".into(),
            drain: true,
        },
    ]));
    assert_eq!(
        outcome,
        Outcome::Batch(vec![
            Outcome::WaveSubmitted {
                wave_id: 1,
                n_micro_tasks: 1
            },
            Outcome::Done,
            Outcome::Rejected("node `nope` not found".into()),
        ])
    );
    assert_eq!(task_state(&state, (1, 0)), Assigned);
}

#[test]
fn assign_rechecks_every_placement() {
    let mut state = cluster(&[("n1", 4)]);
    submit(&mut state, "name = \"x\"\n[[task]]\nid = \"t\"\narray = 2\nrun = \"x\"\n[[task]]\nid = \"u\"\ndeps = [\"t\"]\nrun = \"x\"\n", 0);
    take_effects(&mut state);
    let place = |key, node: &str| Placement {
        key,
        node: node.into(),
    };
    state.assign(
        vec![
            place((1, 0), "n1"),
            place((1, 0), "n1"), // the same task twice: second ignored
            place((1, 1), "n9"), // unknown node
            place((1, 2), "n1"), // still pending
            place((7, 0), "n1"), // unknown wave
            place((1, 9), "n1"), // unknown micro-task
        ],
        1,
    );
    assert_eq!(states(&state, 1), vec![Assigned, Ready, Pending]);
    assert_eq!(
        take_effects(&mut state),
        vec![Effect::Dispatch {
            node: "n1".into(),
            attempts: vec![AttemptRef::new((1, 0), 1)]
        }]
    );
    assert_eq!(state.nodes["n1"].used_cpus, 1);
    assert_eq!(state.ready, BTreeSet::from([(1, 1)]));
}

#[test]
fn rebuild_indexes_after_reload_reproduces_ready_set_and_node_usage() {
    let mut state = cluster(&[("n1", 2), ("n2", 3)]);
    submit(&mut state, ETL, 0);
    submit(
        &mut state,
        "name = \"big\"\n[[task]]\nid = \"m\"\narray = 6\nmemory = \"1GiB\"\nrun = \"x\"\n",
        0,
    );
    schedule_and_assign(&mut state, 1);
    finish_current(&mut state, (1, 0), 0, 2);
    state.apply(Command::Started {
        node: "n2".into(),
        attempts: vec![(current(&state, (2, 0)), 2)],
    });
    assert!(!state.ready.is_empty());
    assert!(state.nodes.values().all(|n| !n.active.is_empty()));

    // Reload through the same encoding the store uses: derived fields come back empty.
    let mut fresh = State::new(WaveLimits::default());
    fresh.next_wave_id = state.next_wave_id;
    fresh.stale_results = state.stale_results;
    for (id, wave) in &state.waves {
        let bytes = bincode::serialize(wave).unwrap();
        fresh
            .waves
            .insert(*id, bincode::deserialize(&bytes).unwrap());
    }
    for (name, node) in &state.nodes {
        let bytes = bincode::serialize(node).unwrap();
        let loaded: Node = bincode::deserialize(&bytes).unwrap();
        assert!(loaded.active.is_empty() && loaded.used_cpus == 0);
        fresh.nodes.insert(name.clone(), loaded);
    }
    fresh.rebuild_indexes();
    assert_eq!(fresh.ready, state.ready);
    assert_eq!(fresh.nodes, state.nodes);
    assert_eq!(fresh.waves, state.waves);
    let config = SchedulerConfig::default();
    assert_eq!(schedule(&fresh, &config), schedule(&state, &config));

    // Rebuilding twice is idempotent.
    fresh.rebuild_indexes();
    assert_eq!(fresh.nodes, state.nodes);
}

#[test]
fn committed_registrations_and_heartbeats_grant_leases_but_not_to_a_down_node() {
    let mut state = State::default();
    state.apply(Command::register(node_spec("n1", 2), vec![], vec![], 3, 1));
    let leases = |state: &mut State| -> Vec<u64> {
        take_effects(state)
            .into_iter()
            .filter_map(|effect| match effect {
                Effect::Lease { node, seq } if node == "n1" => Some(seq),
                _ => None,
            })
            .collect()
    };
    assert_eq!(leases(&mut state), [3], "the registration's message");
    let beat = |seq| Command::Heartbeats {
        reports: vec![HeartbeatReport {
            node: "n1".into(),
            seq,
            theta: 1.0,
            h_cpu: 1.0,
            h_mem: 1.0,
            h_term: 1.0,
            memory_available_bytes: GIB,
        }],
        now_ms: 2,
    };
    state.apply(beat(4));
    assert_eq!(leases(&mut state), [4]);
    state.mark_down("n1", 3);
    take_effects(&mut state);
    state.apply(beat(5));
    assert!(
        leases(&mut state).is_empty(),
        "a node marked down gets no lease until it registers again"
    );
    state.apply(Command::register(node_spec("n1", 2), vec![], vec![], 6, 4));
    assert_eq!(leases(&mut state), [6]);
    assert_eq!(state.nodes["n1"].state, NodeState::Ready);
}

#[test]
fn heartbeats_update_health_and_announce_slot_changes() {
    let mut state = cluster(&[("n1", 8)]);
    let beat = |theta: f64| HeartbeatReport {
        node: "n1".into(),
        seq: 0,
        theta,
        h_cpu: 0.5,
        h_mem: 0.25,
        h_term: 1.0,
        memory_available_bytes: 3 * GIB,
    };
    state.apply(Command::Heartbeats {
        reports: vec![
            beat(0.95),
            HeartbeatReport {
                node: "ghost".into(),
                ..beat(0.0)
            },
        ],
        now_ms: 10,
    });
    let n1 = &state.nodes["n1"];
    assert_eq!(
        (n1.theta, n1.h_cpu, n1.h_mem, n1.h_term),
        (0.95, 0.5, 0.25, 1.0)
    );
    assert_eq!(n1.memory_available_bytes, 3 * GIB);
    assert_eq!(n1.last_heartbeat_ms, 10);
    assert!(!state.nodes.contains_key("ghost"));
    assert_eq!(
        state.effects,
        vec![Effect::Lease {
            node: "n1".into(),
            seq: 0
        }],
        "no slot change: only the lease"
    );
    assert_eq!(state.dirty.nodes, BTreeSet::from(["n1".to_string()]));

    let mut limits = Vec::new();
    for i in 0..30 {
        state.apply(Command::Heartbeats {
            reports: vec![beat(0.0)],
            now_ms: 20 + i,
        });
        for effect in take_effects(&mut state) {
            match effect {
                Effect::SlotsLimit { node, slots } => {
                    assert_eq!(node, "n1");
                    limits.push(slots);
                }
                Effect::Lease { .. } => {}
                other => panic!("unexpected effect {other:?}"),
            }
        }
    }
    // Slots only ever shrink while θ stays at 0, one announcement per change, ending paused.
    assert!(limits.windows(2).all(|w| w[0] > w[1]), "{limits:?}");
    assert_eq!(limits.last(), Some(&0));
    assert_eq!(
        limits.last().copied(),
        Some(state.nodes["n1"].usable_slots())
    );
    assert!(state.nodes["n1"].throttle.paused);
}

#[test]
fn members_started_records_current_members_once_and_removal_forgets_them() {
    let mut state = State::new(WaveLimits::default());
    for id in 1..=3 {
        state.change_member(id, Some(format!("http://127.0.0.1:700{id}")));
    }
    state.dirty = Default::default();
    // Member 9 is not a member: ignored.
    assert_eq!(
        state.apply(Command::MembersStarted { ids: vec![1, 2, 9] }),
        Outcome::Done
    );
    assert_eq!(state.members_started, BTreeSet::from([1, 2]));
    assert!(state.dirty.members, "the checkpoint must carry it");
    // Again: nothing changes, nothing to write.
    state.dirty = Default::default();
    state.apply(Command::MembersStarted { ids: vec![2, 1] });
    assert_eq!(state.members_started, BTreeSet::from([1, 2]));
    assert!(!state.dirty.members);
    // Removing member 2 forgets that it started: added back, it starts empty with --join.
    state.change_member(2, None);
    assert_eq!(state.members_started, BTreeSet::from([1]));
    state.change_member(2, Some("http://127.0.0.1:7002".into()));
    assert!(!state.members_started.contains(&2));
    // Snapshots carry it.
    let mut copy = State::new(WaveLimits::default());
    copy.restore(State::new(WaveLimits::default()).into_snapshot());
    assert!(copy.members_started.is_empty());
    let started = state.members_started.clone();
    copy.restore(std::mem::take(&mut state).into_snapshot());
    assert_eq!(copy.members_started, started);
}

/// Attempt `attempt` of micro-task `micro` of wave 1.
fn at(micro: u32, attempt: u32) -> AttemptRef {
    AttemptRef::new((1, micro), attempt)
}

#[test]
fn a_worker_message_is_one_command_starts_before_results_before_health() {
    let heartbeat = HeartbeatReport {
        node: "n1".into(),
        seq: 0,
        theta: 0.9,
        h_cpu: 0.9,
        h_mem: 0.9,
        h_term: 0.9,
        memory_available_bytes: GIB,
    };
    assert_eq!(Command::worker_report("n1", vec![], vec![], None, 5), None);
    // One part alone is not wrapped in a batch.
    assert_eq!(
        Command::worker_report("n1", vec![], vec![], Some(heartbeat.clone()), 5),
        Some(Command::Heartbeats {
            reports: vec![heartbeat.clone()],
            now_ms: 5
        })
    );
    // An attempt that started and finished since the last message needs no `Started`.
    let done = result(at(0, 1), "n1", 0, 10, 20);
    let command = Command::worker_report(
        "n1",
        vec![(at(0, 1), 10), (at(1, 1), 11)],
        vec![done.clone()],
        Some(heartbeat.clone()),
        30,
    );
    assert_eq!(
        command,
        Some(Command::Batch(vec![
            Command::Started {
                node: "n1".into(),
                attempts: vec![(at(1, 1), 11)],
            },
            Command::Finished {
                results: vec![done],
                now_ms: 30,
            },
            Command::Heartbeats {
                reports: vec![heartbeat],
                now_ms: 30,
            },
        ]))
    );
}

#[test]
fn a_registration_applies_kept_results_before_reconciling() {
    let kept = result(at(0, 1), "n1", 0, 10, 20);
    assert_eq!(
        Command::register(
            node_spec("n1", 2),
            vec![at(1, 1)],
            vec![kept.clone()],
            7,
            40
        ),
        Command::Batch(vec![
            Command::Finished {
                results: vec![kept],
                now_ms: 40,
            },
            Command::RegisterNode {
                spec: node_spec("n1", 2),
                running: vec![at(1, 1)],
                seq: 7,
                now_ms: 40,
            },
        ])
    );
    assert_eq!(
        Command::register(node_spec("n1", 2), vec![], vec![], 0, 40),
        Command::Batch(vec![Command::RegisterNode {
            spec: node_spec("n1", 2),
            running: vec![],
            seq: 0,
            now_ms: 40,
        }])
    );
}

#[test]
fn effects_for_one_node_leave_as_one_message() {
    let mut state = cluster(&[("n1", 2), ("n2", 1)]);
    submit(
        &mut state,
        "name = \"p\"\n[[task]]\nid = \"t\"\narray = 3\nrun = \"x\"\n",
        0,
    );
    schedule_and_assign(&mut state, 1);
    let mut effects = take_effects(&mut state);
    effects.push(Effect::Ack {
        node: "n1".into(),
        attempts: vec![at(7, 1)],
    });
    effects.push(Effect::SlotsLimit {
        node: "n2".into(),
        slots: 1,
    });
    for seq in [9, 12, 10] {
        effects.push(Effect::Lease {
            node: "n1".into(),
            seq,
        });
    }
    let messages = crate::convert::worker_messages(&state, effects, 10_000);
    let nodes: Vec<&str> = messages.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(nodes, ["n1", "n2"]);
    let (_, n1) = &messages[0];
    assert_eq!(n1.assign.len(), 2);
    assert_eq!(n1.ack.len(), 1);
    assert_eq!(n1.slots_limit, None);
    assert_eq!(
        n1.lease,
        Some(venom_proto::LeaseGrant {
            seq: 12,
            lease_ms: 10_000
        }),
        "the latest message committed renews the lease"
    );
    let (_, n2) = &messages[1];
    assert_eq!(n2.assign.len(), 1);
    assert_eq!(n2.slots_limit, Some(1));
    assert_eq!(n2.lease, None);
    let mut assigned: Vec<u32> = messages
        .iter()
        .flat_map(|(_, m)| m.assign.iter())
        .map(|a| a.attempt.expect("attempt").micro)
        .collect();
    assigned.sort_unstable();
    assert_eq!(assigned, [0, 1, 2]);
}
