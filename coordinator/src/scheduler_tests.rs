//! Tests of the scheduler: resource fit (cpus window, memory, GPUs, labels), the preference
//! order, θ throttling through the state machine's heartbeats, excluded nodes, heartbeat
//! expired leases, the placement bound, group skipping and determinism.
//! States are built only through `State::apply`, and plans are applied as the replica does.

#![allow(clippy::unwrap_used)]

use venom_core::mobius::{Mode, ThrottlePolicy};
use venom_core::wave::{parse_wave, Format, WaveLimits};

use super::*;
use crate::state::{Command, HeartbeatReport, NodeSpec, Outcome, WaveId};

const GIB: u64 = 1 << 30;

/// No lease expired unless a test says otherwise.
fn config() -> SchedulerConfig {
    SchedulerConfig::default()
}

/// A node offering `slots` cpus and 16 GiB, no GPUs, no labels, no queue, adaptive throttling.
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

fn register(state: &mut State, spec: NodeSpec, now_ms: u64) {
    let outcome = state.apply(Command::RegisterNode {
        spec,
        running: Vec::new(),
        seq: 0,
        now_ms,
    });
    assert_eq!(outcome, Outcome::Done);
}

fn cluster(nodes: Vec<NodeSpec>) -> State {
    let mut state = State::new(WaveLimits::default());
    for spec in nodes {
        register(&mut state, spec, 0);
    }
    state
}

fn submit(state: &mut State, text: &str) -> WaveId {
    let spec = parse_wave(text.as_bytes(), Format::Toml, &WaveLimits::default()).unwrap();
    match state.apply(Command::SubmitWave {
        owner: String::new(),
        spec,
        traceparent: String::new(),
        submission_id: String::new(),
        now_ms: 0,
    }) {
        Outcome::WaveSubmitted { wave_id, .. } => wave_id,
        other => panic!("submit failed: {other:?}"),
    }
}

/// A wave of one task `t` with `array` micro-tasks and the given extra TOML fields.
fn array_wave(array: u32, fields: &str) -> String {
    format!("name = \"w\"\n[[task]]\nid = \"t\"\narray = {array}\nrun = \"x\"\n{fields}\n")
}

/// Applies the round that produced `plan` exactly as the replica proposes it: a
/// `Schedule` command under the default test configuration.
fn apply_plan(state: &mut State, plan: &Plan, now_ms: u64) {
    apply_plan_with(state, plan, now_ms, &config());
}

/// [`apply_plan`] under `config`; the plan computed inside apply must be `plan`.
fn apply_plan_with(state: &mut State, plan: &Plan, now_ms: u64, config: &SchedulerConfig) {
    assert_eq!(&schedule(state, config), plan, "the plan apply computes");
    state.apply(Command::Schedule {
        now_ms,
        config: config.clone(),
    });
}

/// The node of each placement, in plan order.
fn nodes_of(plan: &Plan) -> Vec<&str> {
    plan.placements.iter().map(|p| p.node.as_str()).collect()
}

fn heartbeat(state: &mut State, node: &str, theta: f64, memory_available_bytes: u64, now_ms: u64) {
    state.apply(Command::Heartbeats {
        reports: vec![HeartbeatReport {
            node: node.to_string(),
            seq: 0,
            theta,
            h_cpu: theta,
            h_mem: theta,
            h_term: theta,
            memory_available_bytes,
        }],
        now_ms,
    });
}

#[test]
fn cpus_window_is_usable_slots_plus_queue_depth() {
    // (slots, queue depth, cpus per micro-task, expected placements of 10)
    let cases = [
        (4, 0, 1, 4),
        (4, 2, 1, 6),
        (4, 2, 2, 3),
        (4, 0, 3, 1),
        (4, 0, 4, 1),
        (1, 0, 1, 1),
        // Larger than the window: runs alone on the idle node.
        (4, 0, 8, 1),
        (2, 3, 4, 1),
        // A node offering no slots gets nothing, queue or not.
        (0, 4, 1, 0),
    ];
    for (slots, queue_depth, cpus, expected) in cases {
        let mut spec = node_spec("n1", slots);
        spec.queue_depth = queue_depth;
        let mut state = cluster(vec![spec]);
        submit(&mut state, &array_wave(10, &format!("cpus = {cpus}")));
        let plan = schedule(&state, &config());
        assert_eq!(
            plan.placements.len(),
            expected,
            "slots {slots}, queue {queue_depth}, cpus {cpus}"
        );
        let keys: Vec<MicroKey> = plan.placements.iter().map(|p| p.key).collect();
        let in_order: Vec<MicroKey> = (0..expected as u32).map(|m| (1, m)).collect();
        assert_eq!(keys, in_order, "ready micro-tasks go in order");
        // Applied, the node is full: the next round places nothing more.
        apply_plan(&mut state, &plan, 1);
        assert!(schedule(&state, &config()).placements.is_empty());
    }
}

#[test]
fn oversized_task_runs_alone_and_only_on_an_idle_node() {
    let mut state = cluster(vec![node_spec("n1", 4)]);
    submit(&mut state, &array_wave(1, ""));
    let plan = schedule(&state, &config());
    apply_plan(&mut state, &plan, 1);
    let big = submit(&mut state, &array_wave(2, "cpus = 8"));
    assert!(
        schedule(&state, &config()).placements.is_empty(),
        "node busy"
    );

    let attempt = state.task((1, 0)).unwrap().attempt;
    state.apply(Command::Finished {
        results: vec![crate::state::AttemptResult {
            attempt: crate::state::AttemptRef {
                wave_id: 1,
                micro: 0,
                attempt,
            },
            node: "n1".into(),
            outcome: venom_core::AttemptOutcome {
                exit_code: Some(0),
                started_ms: 2,
                finished_ms: 3,
                ..venom_core::AttemptOutcome::default()
            },
        }],
        now_ms: 3,
    });
    let plan = schedule(&state, &config());
    assert_eq!(
        plan.placements,
        vec![Placement {
            key: (big, 0),
            node: "n1".into()
        }]
    );
    apply_plan(&mut state, &plan, 4);
    assert_eq!(state.nodes["n1"].used_cpus, 8);
    assert!(schedule(&state, &config()).placements.is_empty());
}

#[test]
fn memory_requests_fit_total_minus_reserved_and_reported_available() {
    // (memory per micro-task, memory the node reports available, expected placements of 10)
    let cases = [
        ("0", None, 10),
        ("\"1GiB\"", None, 4),
        ("\"3GiB\"", None, 1),
        ("\"4GiB\"", None, 1),
        ("\"5GiB\"", None, 0),
        ("\"3GiB\"", Some(2 * GIB), 0),
        ("\"3GiB\"", Some(3 * GIB), 1),
    ];
    for (memory, available, expected) in cases {
        let mut spec = node_spec("n1", 16);
        spec.memory_total_bytes = 4 * GIB;
        let mut state = cluster(vec![spec]);
        if let Some(available) = available {
            heartbeat(&mut state, "n1", 1.0, available, 1);
        }
        submit(&mut state, &array_wave(10, &format!("memory = {memory}")));
        let plan = schedule(&state, &config());
        assert_eq!(
            plan.placements.len(),
            expected,
            "memory {memory}, available {available:?}"
        );
        // What was reserved stays reserved in the next round.
        apply_plan(&mut state, &plan, 2);
        let next = schedule(&state, &config());
        assert!(next.placements.is_empty(), "memory {memory}: next round");
    }
}

#[test]
fn gpu_requests_fit_free_gpus() {
    // (node GPUs, GPUs per micro-task, expected placements of 5)
    let cases = [
        (2, 1, 2),
        (2, 2, 1),
        (2, 3, 0),
        (0, 1, 0),
        (0, 0, 5),
        (4, 0, 5),
    ];
    for (node_gpus, gpus, expected) in cases {
        let mut spec = node_spec("n1", 16);
        spec.gpus = node_gpus;
        let mut state = cluster(vec![spec]);
        submit(&mut state, &array_wave(5, &format!("gpus = {gpus}")));
        let plan = schedule(&state, &config());
        assert_eq!(
            plan.placements.len(),
            expected,
            "node gpus {node_gpus}, task gpus {gpus}"
        );
        apply_plan(&mut state, &plan, 1);
        assert_eq!(state.nodes["n1"].used_gpus, gpus * expected as u32);
    }
}

#[test]
fn labels_restrict_placement() {
    let labelled = |name: &str, labels: &[(&str, &str)]| {
        let mut spec = node_spec(name, 4);
        spec.labels = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        spec
    };
    let nodes = || {
        vec![
            labelled("n1", &[("arch", "x86_64")]),
            labelled("n2", &[("arch", "aarch64"), ("zone", "a")]),
        ]
    };
    // (labels field, expected nodes of 3 placements)
    let cases: [(&str, &[&str]); 4] = [
        ("labels = { arch = \"aarch64\" }", &["n2", "n2", "n2"]),
        (
            "labels = { arch = \"aarch64\", zone = \"a\" }",
            &["n2", "n2", "n2"],
        ),
        ("labels = { arch = \"aarch64\", zone = \"b\" }", &[]),
        ("", &["n1", "n2", "n1"]),
    ];
    for (labels, expected) in cases {
        let mut state = cluster(nodes());
        submit(&mut state, &array_wave(3, labels));
        assert_eq!(nodes_of(&schedule(&state, &config())), expected, "{labels}");
    }
}

#[test]
fn labels_match_requires_every_wanted_pair() {
    let map = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    let node = map(&[("arch", "x86_64"), ("zone", "a")]);
    let cases: [(&[(&str, &str)], bool); 6] = [
        (&[], true),
        (&[("arch", "x86_64")], true),
        (&[("arch", "x86_64"), ("zone", "a")], true),
        (&[("arch", "aarch64")], false),
        (&[("arch", "x86_64"), ("zone", "b")], false),
        (&[("gpu", "a100")], false),
    ];
    for (wanted, expected) in cases {
        assert_eq!(labels_match(&map(wanted), &node), expected, "{wanted:?}");
    }
    assert!(!labels_match(&map(&[("arch", "x86_64")]), &map(&[])));
}

#[test]
fn could_ever_run_checks_every_node_that_is_not_down() {
    let mut spec = node_spec("n1", 4);
    spec.memory_total_bytes = 4 * GIB;
    spec.gpus = 1;
    spec.labels.insert("arch".into(), "x86_64".into());
    let mut state = cluster(vec![spec]);
    let task = |fields: &str| {
        let text = array_wave(1, fields);
        parse_wave(text.as_bytes(), Format::Toml, &WaveLimits::default())
            .unwrap()
            .tasks
            .remove(0)
    };
    let cases = [
        ("", true),
        (
            "memory = \"4GiB\"\ngpus = 1\nlabels = { arch = \"x86_64\" }",
            true,
        ),
        // More cpus than slots still runs (alone).
        ("cpus = 64", true),
        ("memory = \"5GiB\"", false),
        ("gpus = 2", false),
        ("labels = { arch = \"aarch64\" }", false),
    ];
    for (fields, expected) in cases {
        assert_eq!(could_ever_run(&state, &task(fields)), expected, "{fields}");
    }
    state.apply(Command::Drain {
        node: "n1".into(),
        drain: true,
    });
    assert!(could_ever_run(&state, &task("")), "draining nodes count");
    state.mark_down("n1", 1);
    assert!(!could_ever_run(&state, &task("")), "down nodes do not");
}

#[test]
fn prefers_most_free_usable_slots_then_highest_theta_then_name() {
    // Equal nodes: alternate, ties to the smallest name.
    let mut state = cluster(vec![node_spec("n1", 4), node_spec("n2", 4)]);
    submit(&mut state, &array_wave(4, ""));
    assert_eq!(
        nodes_of(&schedule(&state, &config())),
        ["n1", "n2", "n1", "n2"]
    );

    // A healthier n2 wins the ties (both θ stay in OPTIMIZE: all slots usable).
    heartbeat(&mut state, "n1", 0.92, 16 * GIB, 1);
    heartbeat(&mut state, "n2", 0.95, 16 * GIB, 1);
    assert_eq!(state.nodes["n1"].usable_slots(), 4);
    assert_eq!(
        nodes_of(&schedule(&state, &config())),
        ["n2", "n1", "n2", "n1"]
    );

    // Free slots come before θ: n1 (θ higher) already runs two micro-tasks.
    let mut state = cluster(vec![node_spec("n1", 4), node_spec("n2", 4)]);
    heartbeat(&mut state, "n1", 0.95, 16 * GIB, 1);
    heartbeat(&mut state, "n2", 0.92, 16 * GIB, 1);
    submit(&mut state, &array_wave(2, "labels = {}"));
    let plan = schedule(&state, &config());
    assert_eq!(nodes_of(&plan), ["n1", "n2"]);
    // Put both on n1 by hand, then schedule three more.
    state.assign(
        plan.placements
            .iter()
            .map(|p| Placement {
                key: p.key,
                node: "n1".into(),
            })
            .collect(),
        2,
    );
    assert_eq!(state.nodes["n1"].used_cpus, 2);
    submit(&mut state, &array_wave(3, ""));
    assert_eq!(nodes_of(&schedule(&state, &config())), ["n2", "n2", "n1"]);
}

#[test]
fn throttling_from_heartbeats_limits_placements() {
    // (policy, θ reported 30 times, resulting mode, paused, usable slots of 8)
    let cases = [
        (ThrottlePolicy::Adaptive, 0.95, Mode::Optimize, false, 8),
        (ThrottlePolicy::Adaptive, 0.75, Mode::Wrap, false, 8),
        (ThrottlePolicy::Adaptive, 0.55, Mode::Balance, false, 6),
        (ThrottlePolicy::Adaptive, 0.35, Mode::Transition, false, 4),
        (ThrottlePolicy::Adaptive, 0.2, Mode::Unwrap, false, 2),
        (ThrottlePolicy::Adaptive, 0.0, Mode::Unwrap, true, 0),
        (
            ThrottlePolicy::Conservative,
            0.5,
            Mode::Transition,
            false,
            4,
        ),
        (ThrottlePolicy::Conservative, 0.15, Mode::Unwrap, true, 0),
        (ThrottlePolicy::Aggressive, 0.0, Mode::Unwrap, false, 4),
        (ThrottlePolicy::Off, 0.0, Mode::Unwrap, false, 8),
    ];
    for (policy, theta, mode, paused, usable) in cases {
        let what = format!("{policy} at θ {theta}");
        let mut spec = node_spec("n1", 8);
        spec.policy = policy;
        let mut state = cluster(vec![spec]);
        state.effects.clear();
        for i in 0..30 {
            heartbeat(&mut state, "n1", theta, 16 * GIB, 1 + i);
        }
        let node = &state.nodes["n1"];
        assert_eq!(node.throttle.mode, mode, "{what}");
        assert_eq!(node.throttle.paused, paused, "{what}");
        assert_eq!(node.usable_slots(), usable, "{what}");
        // The last slot limit announced is what the node may now use.
        let announced = state.effects.iter().rev().find_map(|e| match e {
            crate::state::Effect::SlotsLimit { slots, .. } => Some(*slots),
            _ => None,
        });
        let expected_announcement = (usable != 8).then_some(usable);
        assert_eq!(announced, expected_announcement, "{what}");

        submit(&mut state, &array_wave(10, ""));
        let plan = schedule(&state, &config());
        assert_eq!(plan.placements.len(), usable as usize, "{what}");
    }
}

#[test]
fn throttled_node_loses_placements_to_a_healthy_one() {
    let mut state = cluster(vec![node_spec("n1", 8), node_spec("n2", 8)]);
    for i in 0..30 {
        heartbeat(&mut state, "n1", 0.35, 16 * GIB, i);
    }
    assert_eq!(state.nodes["n1"].usable_slots(), 4);
    submit(&mut state, &array_wave(20, ""));
    let plan = schedule(&state, &config());
    let on = |name: &str| nodes_of(&plan).iter().filter(|&&n| n == name).count();
    assert_eq!((on("n1"), on("n2")), (4, 8));
    // The healthy node gets the first placements (more free usable slots).
    assert_eq!(nodes_of(&plan)[..4], ["n2", "n2", "n2", "n2"]);
}

#[test]
fn draining_down_and_unreachable_nodes_get_nothing() {
    let mut state = cluster(vec![
        node_spec("n1", 2),
        node_spec("n2", 2),
        node_spec("n3", 2),
        node_spec("n4", 2),
    ]);
    state.apply(Command::Drain {
        node: "n2".into(),
        drain: true,
    });
    state.mark_down("n3", 1);
    submit(&mut state, &array_wave(8, ""));
    let mut config = config();
    config.unreachable.insert("n4".into());
    let plan = schedule(&state, &config);
    assert_eq!(nodes_of(&plan), ["n1", "n1"]);
    assert!(plan.mark_down.is_empty());

    // Nothing reachable at all: an empty plan.
    config.unreachable.insert("n1".into());
    assert!(schedule(&state, &config).is_empty());
}

#[test]
fn nodes_whose_lease_expired_are_marked_down_once_and_get_nothing() {
    for expired in [false, true] {
        let what = format!("n1's lease expired: {expired}");
        let mut state = cluster(vec![node_spec("n1", 2), node_spec("n2", 2)]);
        submit(&mut state, &array_wave(3, ""));
        let mut config = config();
        if expired {
            config.lease_expired.insert("n1".into());
        }
        // A name the state does not know is ignored.
        config.lease_expired.insert("ghost".into());
        let plan = schedule(&state, &config);
        let expected_down: Vec<String> = if expired { vec!["n1".into()] } else { vec![] };
        assert_eq!(plan.mark_down, expected_down, "{what}");
        // A node marked down in this plan gets no placement in it.
        let expected_nodes: &[&str] = if expired {
            &["n2", "n2"]
        } else {
            &["n1", "n2", "n1"]
        };
        assert_eq!(nodes_of(&plan), expected_nodes, "{what}");

        apply_plan_with(&mut state, &plan, 10, &config);
        let expected_state = if expired {
            NodeState::Down
        } else {
            NodeState::Ready
        };
        assert_eq!(state.nodes["n1"].state, expected_state, "{what}");
        // A down node is not reported again.
        assert!(schedule(&state, &config).mark_down.is_empty(), "{what}");
    }
}

#[test]
fn max_placements_bounds_the_plan() {
    let mut state = cluster(vec![node_spec("n1", 16)]);
    submit(&mut state, &array_wave(10, ""));
    let config = SchedulerConfig {
        max_placements: 3,
        ..config()
    };
    let plan = schedule(&state, &config);
    let keys: Vec<MicroKey> = plan.placements.iter().map(|p| p.key).collect();
    assert_eq!(keys, vec![(1, 0), (1, 1), (1, 2)]);
    apply_plan_with(&mut state, &plan, 1, &config);
    let keys: Vec<MicroKey> = schedule(&state, &config)
        .placements
        .iter()
        .map(|p| p.key)
        .collect();
    assert_eq!(keys, vec![(1, 3), (1, 4), (1, 5)]);
}

#[test]
fn earlier_waves_go_first() {
    let mut state = cluster(vec![node_spec("n1", 3)]);
    let first = submit(&mut state, &array_wave(2, ""));
    let second = submit(&mut state, &array_wave(2, ""));
    let keys: Vec<MicroKey> = schedule(&state, &config())
        .placements
        .iter()
        .map(|p| p.key)
        .collect();
    assert_eq!(keys, vec![(first, 0), (first, 1), (second, 0)]);
}

#[test]
fn a_group_that_fits_nowhere_does_not_block_later_groups() {
    let mut spec = node_spec("n1", 4);
    spec.memory_total_bytes = 4 * GIB;
    let mut state = cluster(vec![spec]);
    // gpu[3] fits no node; mem[3] fits once (3 GiB of 4); plain[2] fits.
    // Flat: gpu 0..=2, mem 3..=5, plain 6..=7.
    submit(
        &mut state,
        r#"
name = "mixed"
[[task]]
id = "gpu"
array = 3
gpus = 1
run = "x"
[[task]]
id = "mem"
array = 3
memory = "3GiB"
run = "x"
[[task]]
id = "plain"
array = 2
run = "x"
"#,
    );
    let later = submit(&mut state, &array_wave(1, ""));
    let keys: Vec<MicroKey> = schedule(&state, &config())
        .placements
        .iter()
        .map(|p| p.key)
        .collect();
    assert_eq!(keys, vec![(1, 3), (1, 6), (1, 7), (later, 0)]);
}

#[test]
fn the_same_state_gives_the_same_plan() {
    let build = || {
        let mut state = cluster(vec![
            node_spec("a", 3),
            node_spec("b", 3),
            node_spec("c", 2),
        ]);
        heartbeat(&mut state, "a", 0.95, 16 * GIB, 1);
        heartbeat(&mut state, "b", 0.97, 16 * GIB, 1);
        heartbeat(&mut state, "c", 0.93, 16 * GIB, 1);
        submit(&mut state, &array_wave(5, ""));
        submit(&mut state, &array_wave(4, "cpus = 2"));
        state
    };
    let state = build();
    let plan = schedule(&state, &config());
    assert_eq!(plan.placements.len(), 5);
    for _ in 0..5 {
        assert_eq!(schedule(&state, &config()), plan);
    }
    assert_eq!(schedule(&build(), &config()), plan);
    // Free slots, then θ (b 0.97 > a 0.95 > c 0.93); the 2-cpu wave fits nowhere after.
    assert_eq!(nodes_of(&plan), ["b", "a", "b", "a", "c"]);
}

#[test]
fn a_full_cluster_gives_an_empty_plan() {
    let mut state = cluster(vec![node_spec("n1", 2), node_spec("n2", 1)]);
    submit(&mut state, &array_wave(5, ""));
    let plan = schedule(&state, &config());
    assert_eq!(nodes_of(&plan), ["n1", "n1", "n2"]);
    apply_plan(&mut state, &plan, 1);
    let next = schedule(&state, &config());
    assert!(next.is_empty());
    assert_eq!(next, Plan::default());
}
