//! Fuzzing of what peers and workers can send a coordinator.
//!
//! Two doors are fuzzed here (the third, wave files, is `core/tests/fuzz_wave.rs`):
//!
//! - **Raft batches** reach [`transport::admit`] from anyone who can open the port. Batches
//!   are random (sender, cluster id, address, membership) and carry random bytes, valid raft
//!   messages of every type with random fields, and byte mutations of valid ones. `admit`
//!   must never panic, must refuse another cluster, must hand on only messages sent under the
//!   batch's own `from`, and must take from a stranger only leader traffic; it must also admit
//!   every batch those rules allow (so a fix cannot refuse everything).
//! - **Worker messages** are turned into commands exactly as `server.rs` does
//!   ([`convert::node_spec`] and [`convert::registration`] for a `Register`,
//!   [`convert::worker_report`] for the rest) and applied to a [`State`] that holds two waves
//!   and two registered nodes, interleaved with the `Schedule` commands the leader proposes.
//!   Messages are generated (registrations with odd names, slots, labels and profiles; starts
//!   and results naming current, stale or made-up attempts; heartbeats with NaN and
//!   infinities; outputs up to 200 KB), decoded from random or mutated bytes, or both. After
//!   every command the state's invariants are checked ([`check_state`]), every transition is
//!   checked against the one before ([`check_transition`]), every result is acknowledged to
//!   the node that sent it, and finally the same commands applied to a fresh state must give
//!   the same state, outcomes, effects and observations (every replica computes the same
//!   state), and a snapshot of it must restore to the same state.
//!
//! The case count is `VENOM_FUZZ_CASES` (default [`DEFAULT_CASES`]); failures are never
//! persisted into the tree: a crash found here becomes a plain `#[test]` at the end.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use prost::Message as _;
use protobuf::Message as _;
use raft::eraftpb::{ConfState, Entry, EntryType, Message as RaftMessage, MessageType, Snapshot};
use venom_coordinator::convert;
use venom_coordinator::scheduler::SchedulerConfig;
use venom_coordinator::state::{
    AttemptRef, Command, Counts, Effect, MicroKey, MicroTask, NodeState, Observation, Outcome,
    State, StateSnapshot, TaskState, WaveState,
};
use venom_coordinator::transport::{self, Refusal};
use venom_core::wave::{parse_wave, Format, OnFailure, WaveLimits};
use venom_proto::v1 as pb;

/// Cases per property when `VENOM_FUZZ_CASES` is not set: this file then takes about 6 s in
/// a debug build on two cores (a history is up to 60 steps, each checked in full).
const DEFAULT_CASES: u32 = 256;

fn config() -> ProptestConfig {
    let cases = std::env::var("VENOM_FUZZ_CASES")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(DEFAULT_CASES);
    ProptestConfig {
        cases,
        // Never write `proptest-regressions/` into the tree.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

// =======================================================================================
// Raft batch admission.

const ALL_MESSAGE_TYPES: [MessageType; 19] = [
    MessageType::MsgHup,
    MessageType::MsgBeat,
    MessageType::MsgPropose,
    MessageType::MsgAppend,
    MessageType::MsgAppendResponse,
    MessageType::MsgRequestVote,
    MessageType::MsgRequestVoteResponse,
    MessageType::MsgSnapshot,
    MessageType::MsgHeartbeat,
    MessageType::MsgHeartbeatResponse,
    MessageType::MsgUnreachable,
    MessageType::MsgSnapStatus,
    MessageType::MsgCheckQuorum,
    MessageType::MsgTransferLeader,
    MessageType::MsgTimeoutNow,
    MessageType::MsgReadIndex,
    MessageType::MsgReadIndexResp,
    MessageType::MsgRequestPreVote,
    MessageType::MsgRequestPreVoteResponse,
];

fn leader_traffic(t: MessageType) -> bool {
    matches!(
        t,
        MessageType::MsgAppend | MessageType::MsgHeartbeat | MessageType::MsgSnapshot
    )
}

/// Node ids: the members' (1–3), a stranger (9), 0, the largest, or any.
fn node_id() -> BoxedStrategy<u64> {
    prop_oneof![
        6 => 1u64..4,
        2 => Just(9u64),
        1 => Just(0u64),
        1 => Just(u64::MAX),
        1 => any::<u64>(),
    ]
    .boxed()
}

fn cluster_id() -> BoxedStrategy<u64> {
    prop_oneof![3 => Just(7u64), 1 => Just(0u64), 1 => Just(8u64), 1 => any::<u64>()].boxed()
}

fn small_bytes(max: usize) -> BoxedStrategy<Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..max).boxed()
}

fn big_u64() -> BoxedStrategy<u64> {
    prop_oneof![3 => 0u64..100, 1 => Just(u64::MAX), 1 => any::<u64>()].boxed()
}

/// A raft message of any type with random fields. `from` is the batch's sender most of
/// the time.
fn raft_message(batch_from: u64) -> BoxedStrategy<RaftMessage> {
    let entry = (
        0..3i32,
        big_u64(),
        big_u64(),
        small_bytes(64),
        small_bytes(8),
    )
        .prop_map(|(kind, term, index, data, context)| {
            let mut e = Entry::default();
            e.set_entry_type(match kind {
                0 => EntryType::EntryNormal,
                1 => EntryType::EntryConfChange,
                _ => EntryType::EntryConfChangeV2,
            });
            e.term = term;
            e.index = index;
            e.set_data(data.into());
            e.set_context(context.into());
            e
        });
    let snapshot = prop::option::weighted(
        0.2,
        (
            small_bytes(256),
            big_u64(),
            big_u64(),
            prop::collection::vec(any::<u64>(), 0..4),
        )
            .prop_map(|(data, index, term, voters)| {
                let mut s = Snapshot::default();
                s.set_data(data.into());
                let metadata = s.mut_metadata();
                metadata.index = index;
                metadata.term = term;
                let mut conf = ConfState::default();
                conf.set_voters(voters);
                metadata.set_conf_state(conf);
                s
            }),
    );
    let from = prop_oneof![8 => Just(batch_from), 1 => node_id()];
    let header = (
        prop::sample::select(&ALL_MESSAGE_TYPES[..]),
        from,
        node_id(),
        (big_u64(), big_u64(), big_u64(), big_u64(), big_u64()),
    );
    let body = (
        prop::collection::vec(entry, 0..4),
        snapshot,
        any::<bool>(),
        small_bytes(16),
        any::<i64>(),
    );
    (header, body)
        .prop_map(
            |((msg_type, from, to, (term, log_term, index, commit, hint)), body)| {
                let (entries, snapshot, reject, context, priority) = body;
                let mut m = RaftMessage::default();
                m.set_msg_type(msg_type);
                m.from = from;
                m.to = to;
                m.term = term;
                m.log_term = log_term;
                m.index = index;
                m.commit = commit;
                m.commit_term = term;
                m.reject = reject;
                m.reject_hint = hint;
                m.set_entries(entries.into());
                if let Some(snapshot) = snapshot {
                    m.set_snapshot(snapshot);
                }
                m.set_context(context.into());
                m.priority = priority;
                m
            },
        )
        .boxed()
}

/// One message of a batch, as bytes: a valid raft message, a mutation of one, or noise.
fn message_bytes(batch_from: u64) -> BoxedStrategy<Vec<u8>> {
    let valid = raft_message(batch_from)
        .prop_map(|m| m.write_to_bytes().expect("encodes"))
        .boxed();
    prop_oneof![
        6 => valid.clone(),
        2 => (valid, prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4))
            .prop_map(|(mut bytes, edits)| {
                for (at, byte) in edits {
                    if !bytes.is_empty() {
                        let i = at.index(bytes.len());
                        bytes[i] = byte;
                    }
                }
                bytes
            }),
        1 => small_bytes(64),
        1 => Just(Vec::new()),
    ]
    .boxed()
}

fn raft_batch() -> BoxedStrategy<pb::RaftBatch> {
    let address = prop_oneof![
        2 => Just(String::new()),
        2 => Just("http://c:3".to_string()),
        1 => any::<String>(),
    ];
    (node_id(), cluster_id(), address)
        .prop_flat_map(|(from, cluster_id, from_address)| {
            prop::collection::vec(message_bytes(from), 0..5).prop_map(move |messages| {
                pb::RaftBatch {
                    from,
                    messages,
                    from_address: from_address.clone(),
                    cluster_id,
                }
            })
        })
        .boxed()
}

fn members() -> BoxedStrategy<BTreeMap<u64, String>> {
    prop::collection::btree_set(1u64..4, 0..4)
        .prop_map(|ids| {
            ids.into_iter()
                .map(|id| (id, format!("http://m{id}:1")))
                .collect()
        })
        .boxed()
}

/// Checks `admit`'s answer against the rules it documents, in both directions.
fn check_admission(
    batch: &pb::RaftBatch,
    ours: u64,
    members: &BTreeMap<u64, String>,
) -> Result<(), TestCaseError> {
    let answer = transport::admit(batch, ours, members);
    let other_cluster = batch.cluster_id != 0 && ours != 0 && batch.cluster_id != ours;
    let stranger = !members.contains_key(&batch.from);
    let decoded: Vec<Option<RaftMessage>> = batch
        .messages
        .iter()
        .map(|bytes| {
            let mut m = RaftMessage::default();
            m.merge_from_bytes(bytes).ok().map(|()| m)
        })
        .collect();
    let all_decode = decoded.iter().all(Option::is_some);
    let all_from_sender = decoded.iter().flatten().all(|m| m.from == batch.from);
    let all_leader_traffic = decoded
        .iter()
        .flatten()
        .all(|m| leader_traffic(m.get_msg_type()));
    match answer {
        Ok(admitted) => {
            prop_assert!(!other_cluster, "admitted a batch from another cluster");
            prop_assert_eq!(admitted.messages.len(), batch.messages.len());
            for (m, original) in admitted.messages.iter().zip(&decoded) {
                prop_assert_eq!(
                    m.from,
                    batch.from,
                    "admitted a message under another sender"
                );
                prop_assert_eq!(Some(m), original.as_ref(), "admitted message differs");
            }
            if stranger {
                prop_assert!(!batch.from_address.is_empty());
                prop_assert!(
                    admitted
                        .messages
                        .iter()
                        .all(|m| leader_traffic(m.get_msg_type())),
                    "admitted a stranger's non-leader traffic"
                );
                prop_assert_eq!(
                    admitted.learn,
                    Some((batch.from, batch.from_address.clone()))
                );
            } else {
                prop_assert_eq!(admitted.learn, None);
            }
        }
        Err(refusal) => {
            prop_assert!(!refusal.to_string().is_empty());
            if other_cluster {
                prop_assert_eq!(
                    refusal,
                    Refusal::OtherCluster {
                        from: batch.from,
                        theirs: batch.cluster_id,
                        ours,
                    }
                );
            } else {
                // Refused: one of the rules must say so.
                let allowed = all_decode
                    && all_from_sender
                    && (!stranger || (!batch.from_address.is_empty() && all_leader_traffic));
                prop_assert!(!allowed, "refused a batch the rules allow: {refusal}");
            }
        }
    }
    Ok(())
}

// =======================================================================================
// Worker messages applied to the state.

/// Two waves: a diamond with arrays and retries (skip-dependents), and a fail-wave one.
const WAVES: [&str; 2] = [
    r#"
name = "diamond"
[[task]]
id = "a"
run = "true"
array = 3
retries = 1
[[task]]
id = "b"
run = "true"
deps = ["a"]
[[task]]
id = "c"
run = "true"
deps = ["a"]
array = 2
retries = 2
cpus = 2
[[task]]
id = "d"
run = "true"
deps = ["b", "c"]
"#,
    r#"
name = "fragile"
on_failure = "fail-wave"
[[task]]
id = "x"
run = "true"
array = 2
[[task]]
id = "y"
run = "true"
deps = ["x"]
[[task]]
id = "z"
cmd = ["true"]
memory = "1MiB"
"#,
];

/// Names workers use: the two registered nodes, one never registered.
const NODE_NAMES: [&str; 3] = ["n1", "n2", "ghost"];

fn registered(name: &str, slots: u32) -> pb::Register {
    pb::Register {
        name: name.to_string(),
        profile: Some(pb::HardwareProfile {
            cpu_physical_cores: slots,
            cpu_logical_cores: slots,
            memory_total_bytes: 16 << 30,
            ..pb::HardwareProfile::default()
        }),
        slots,
        queue_depth: 1,
        ..pb::Register::default()
    }
}

/// The starting state every case builds its commands on: the commands that made it.
fn setup_commands(now_ms: u64) -> Vec<Command> {
    let limits = WaveLimits::default();
    let mut commands: Vec<Command> = WAVES
        .iter()
        .map(|text| Command::SubmitWave {
            owner: String::new(),
            spec: parse_wave(text.as_bytes(), Format::Toml, &limits).expect("a valid wave"),
            traceparent: String::new(),
            submission_id: String::new(),
            now_ms,
        })
        .collect();
    for (name, slots) in [("n1", 2), ("n2", 1)] {
        let register = registered(name, slots);
        let spec = convert::node_spec(&register).expect("a valid registration");
        commands.push(convert::registration(spec, register, 0, 0, now_ms));
    }
    commands
}

/// Which attempt a start or result names.
#[derive(Debug, Clone)]
enum AttemptPick {
    /// The current attempt of the `n`-th assigned or running micro-task (when there is
    /// one), from its own node if `own_node`.
    Current { n: usize, own_node: bool },
    /// The current attempt of the `n`-th micro-task in any state.
    AnyCurrent { n: usize },
    /// An attempt spelled out: usually near the real ones, sometimes absurd.
    Raw {
        wave_id: u64,
        micro: u32,
        attempt: u32,
    },
}

fn attempt_pick() -> BoxedStrategy<AttemptPick> {
    let raw = (
        prop_oneof![8 => 1u64..3, 1 => Just(0u64), 1 => Just(3u64), 1 => Just(u64::MAX)],
        prop_oneof![8 => 0u32..8, 1 => Just(u32::MAX), 1 => any::<u32>()],
        prop_oneof![8 => 0u32..4, 1 => Just(u32::MAX)],
    )
        .prop_map(|(wave_id, micro, attempt)| AttemptPick::Raw {
            wave_id,
            micro,
            attempt,
        });
    prop_oneof![
        12 => (0usize..16, prop::bool::weighted(0.9))
            .prop_map(|(n, own_node)| AttemptPick::Current { n, own_node }),
        1 => (0usize..16).prop_map(|n| AttemptPick::AnyCurrent { n }),
        3 => raw,
    ]
    .boxed()
}

/// Times a worker reports: ordinary ones, 0, the extremes.
fn worker_time_ms() -> BoxedStrategy<u64> {
    prop_oneof![
        8 => 1_000_000u64..1_100_000,
        1 => Just(0u64),
        1 => Just(1u64),
        1 => Just(u64::MAX),
        1 => any::<u64>(),
    ]
    .boxed()
}

fn output_bytes() -> BoxedStrategy<Vec<u8>> {
    prop_oneof![
        40 => small_bytes(32),
        1 => (1usize..200_000).prop_map(|n| vec![b'x'; n]),
    ]
    .boxed()
}

/// A `TaskFinished` with every field random; the attempt is resolved when applied.
#[derive(Debug, Clone)]
struct Finish {
    attempt: Option<AttemptPick>,
    report: pb::TaskFinished,
}

fn finish() -> BoxedStrategy<Finish> {
    let code = prop_oneof![
        12 => Just(Some(0)),
        3 => Just(Some(1)),
        1 => Just(None),
        1 => any::<i32>().prop_map(Some),
    ];
    let signal = prop_oneof![8 => Just(None), 1 => Just(Some(9)), 1 => any::<i32>().prop_map(Some)];
    let error = prop_oneof![
        10 => Just(String::new()),
        1 => ".{0,20}",
        1 => (60_000usize..70_000).prop_map(|n| "é".repeat(n / 2)),
    ];
    (
        prop::option::weighted(0.97, attempt_pick()),
        (
            code,
            signal,
            prop::bool::weighted(0.05),
            prop::bool::weighted(0.05),
        ),
        (worker_time_ms(), worker_time_ms()),
        (output_bytes(), output_bytes(), any::<bool>(), error),
    )
        .prop_map(
            |(
                attempt,
                (exit_code, signal, timed_out, cancelled),
                (started_ms, finished_ms),
                rest,
            )| {
                let (stdout, stderr, stdout_truncated, error) = rest;
                Finish {
                    attempt,
                    report: pb::TaskFinished {
                        attempt: None,
                        exit_code,
                        signal,
                        timed_out,
                        cancelled,
                        started_ms,
                        finished_ms,
                        stdout,
                        stderr,
                        stdout_truncated,
                        stderr_truncated: false,
                        error,
                    },
                }
            },
        )
        .boxed()
}

fn odd_f64() -> BoxedStrategy<f64> {
    prop_oneof![
        6 => 0.0f64..=1.0,
        1 => Just(f64::NAN),
        1 => Just(f64::INFINITY),
        1 => Just(f64::NEG_INFINITY),
        1 => Just(-1.0),
        1 => Just(2.0),
        1 => any::<f64>(),
    ]
    .boxed()
}

fn heartbeat() -> BoxedStrategy<pb::Heartbeat> {
    (
        (odd_f64(), odd_f64(), odd_f64(), odd_f64()),
        any::<u32>(),
        prop_oneof![3 => Just(16u64 << 30), 1 => Just(0u64), 1 => any::<u64>()],
    )
        .prop_map(
            |((theta, h_cpu, h_mem, h_term), running, memory)| pb::Heartbeat {
                theta,
                h_cpu,
                h_mem,
                h_term,
                running,
                memory_available_bytes: memory,
                cpu_usage_percent: theta * 100.0,
            },
        )
        .boxed()
}

/// A registration: mostly of the two known nodes with sensible fields, sometimes with odd
/// names, slots, labels, profiles and attempt lists.
#[derive(Debug, Clone)]
struct Registration {
    register: pb::Register,
    running: Vec<AttemptPick>,
    unacknowledged: Vec<Finish>,
}

fn node_name() -> BoxedStrategy<String> {
    prop_oneof![
        12 => prop::sample::select(&NODE_NAMES[..]).prop_map(String::from),
        1 => Just(String::new()),
        1 => Just("n".repeat(253)),
        1 => Just("n".repeat(254)),
        1 => any::<String>(),
    ]
    .boxed()
}

fn labels() -> BoxedStrategy<std::collections::HashMap<String, String>> {
    prop_oneof![
        8 => prop::collection::hash_map("[a-z]{1,8}", "[a-z0-9]{0,8}", 0..4),
        1 => prop::collection::hash_map("[a-z]{1,8}", "[a-z]{0,4}", 60..70),
        1 => prop::collection::hash_map(".{0,80}", ".{0,300}", 0..3),
    ]
    .boxed()
}

fn profile() -> BoxedStrategy<Option<pb::HardwareProfile>> {
    let gpu = (".{0,8}", any::<u64>()).prop_map(|(name, memory)| pb::GpuInfo {
        backend: "cuda".into(),
        name,
        memory_total_bytes: memory,
        index: 0,
    });
    let gpus = prop_oneof![
        8 => prop::collection::vec(gpu.clone(), 0..3),
        1 => prop::collection::vec(gpu, 1_000..1_200),
    ];
    prop::option::weighted(
        0.9,
        (
            (any::<u32>(), any::<u32>()),
            (
                prop_oneof![3 => Just(16u64 << 30), 1 => any::<u64>()],
                any::<u64>(),
            ),
            gpus,
            prop_oneof![8 => ".{0,16}", 1 => (60_000usize..70_000).prop_map(|n| "h".repeat(n))],
        )
            .prop_map(
                |((physical, logical), (memory, effective), gpus, hostname)| pb::HardwareProfile {
                    cpu_physical_cores: physical,
                    cpu_logical_cores: logical,
                    memory_total_bytes: memory,
                    effective_memory_bytes: effective,
                    gpus,
                    hostname,
                    cpu_usage_percent: f64::NAN,
                    ..pb::HardwareProfile::default()
                },
            ),
    )
    .boxed()
}

fn registration() -> BoxedStrategy<Registration> {
    let slots = prop_oneof![
        8 => 0u32..5,
        1 => Just(4_096u32),
        1 => Just(4_097u32),
        1 => Just(u32::MAX),
    ];
    let queue_depth = prop_oneof![8 => 0u32..3, 1 => Just(1_025u32), 1 => Just(u32::MAX)];
    (
        (
            node_name(),
            slots,
            queue_depth,
            any::<i32>().prop_map(|p| p.rem_euclid(6)),
        ),
        labels(),
        profile(),
        prop::collection::vec(attempt_pick(), 0..4),
        prop::collection::vec(finish(), 0..3),
    )
        .prop_map(
            |((name, slots, queue_depth, policy), labels, profile, running, unacknowledged)| {
                Registration {
                    register: pb::Register {
                        name,
                        profile,
                        slots,
                        labels,
                        throttle_policy: policy,
                        running: Vec::new(),
                        unacknowledged: Vec::new(),
                        queue_depth,
                        cluster_id: 0,
                    },
                    running,
                    unacknowledged,
                }
            },
        )
        .boxed()
}

/// One worker message before its attempts are resolved.
#[derive(Debug, Clone)]
struct Report {
    /// The sender: a fixed name, or (`None`) a node that runs some attempt now.
    node: Option<usize>,
    started: Vec<(Option<AttemptPick>, u64)>,
    finished: Vec<Finish>,
    heartbeat: Option<pb::Heartbeat>,
    /// A `register` the server ignores after the first message.
    register: Option<pb::Register>,
}

fn report() -> BoxedStrategy<Report> {
    (
        prop_oneof![
            8 => Just(None),
            2 => Just(Some(0usize)),
            1 => Just(Some(1usize)),
            1 => Just(Some(2usize)),
        ],
        prop::collection::vec(
            (
                prop::option::weighted(0.97, attempt_pick()),
                worker_time_ms(),
            ),
            0..2,
        ),
        prop::collection::vec(finish(), 0..4),
        prop::option::weighted(0.4, heartbeat()),
        prop::option::weighted(0.05, registration().prop_map(|r| r.register)),
    )
        .prop_map(|(node, started, finished, heartbeat, register)| Report {
            node,
            started,
            finished,
            heartbeat,
            register,
        })
        .boxed()
}

/// What happens next, in the order the leader's log would have it.
#[derive(Debug, Clone)]
enum Step {
    /// A message on an established worker stream.
    Report(Report),
    /// The same, sent as bytes with some of them changed (or cut short).
    Garbled {
        report: Report,
        edits: Vec<(prop::sample::Index, u8)>,
        cut: Option<prop::sample::Index>,
    },
    /// Noise on a worker stream.
    Noise {
        node: usize,
        bytes: Vec<u8>,
    },
    /// The first message of a new stream.
    Register(Registration),
    /// The leader's scheduling round.
    Schedule {
        lease_expired: Vec<usize>,
        unreachable: Vec<usize>,
    },
    /// A client cancels a wave or drains a node (rarer; these race with worker reports).
    Cancel {
        wave_id: u64,
    },
    Drain {
        node: usize,
        drain: bool,
    },
}

fn step() -> BoxedStrategy<Step> {
    prop_oneof![
        30 => report().prop_map(Step::Report),
        6 => (
            report(),
            prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
            prop::option::weighted(0.3, any::<prop::sample::Index>()),
        )
            .prop_map(|(report, edits, cut)| Step::Garbled { report, edits, cut }),
        3 => (0usize..3, small_bytes(128)).prop_map(|(node, bytes)| Step::Noise { node, bytes }),
        6 => registration().prop_map(Step::Register),
        24 => (
            prop_oneof![18 => Just(Vec::new()), 2 => prop::collection::vec(0usize..3, 1..3)],
            prop::collection::vec(0usize..3, 0..2),
        )
            .prop_map(|(lease_expired, unreachable)| Step::Schedule {
                lease_expired,
                unreachable,
            }),
        1 => prop_oneof![Just(1u64), Just(2u64), Just(3u64)].prop_map(|wave_id| Step::Cancel { wave_id }),
        2 => (0usize..3, any::<bool>()).prop_map(|(node, drain)| Step::Drain { node, drain }),
    ]
    .boxed()
}

/// A step and how much later it happens.
fn timed_step() -> BoxedStrategy<(u64, Step)> {
    (prop_oneof![4 => 0u64..50, 1 => 0u64..10_000], step()).boxed()
}

/// Resolves a pick, for a message from `node`, against the state as it is now.
fn resolve(state: &State, pick: &AttemptPick, node: &str) -> pb::AttemptRef {
    let keys = |filter: &dyn Fn(&MicroTask) -> bool| -> Vec<MicroKey> {
        state
            .waves
            .iter()
            .flat_map(|(&wave_id, wave)| {
                wave.tasks
                    .iter()
                    .enumerate()
                    .filter(|(_, t)| filter(t))
                    .map(move |(micro, _)| (wave_id, micro as u32))
            })
            .collect()
    };
    let current = |key: MicroKey| pb::AttemptRef {
        wave_id: key.0,
        micro: key.1,
        attempt: state.task(key).map_or(0, |t| t.attempt),
    };
    let active = |t: &MicroTask| matches!(t.state, TaskState::Assigned | TaskState::Running);
    match pick {
        AttemptPick::Current { n, own_node } => {
            let mine = keys(&|t| active(t) && t.node.as_deref() == Some(node));
            let any = keys(&active);
            match (own_node, mine.is_empty(), any.is_empty()) {
                (true, false, _) => current(mine[n % mine.len()]),
                (_, _, false) => current(any[n % any.len()]),
                _ => resolve(state, &AttemptPick::AnyCurrent { n: *n }, node),
            }
        }
        AttemptPick::AnyCurrent { n } => {
            let all = keys(&|_| true);
            current(all[n % all.len()])
        }
        AttemptPick::Raw {
            wave_id,
            micro,
            attempt,
        } => pb::AttemptRef {
            wave_id: *wave_id,
            micro: *micro,
            attempt: *attempt,
        },
    }
}

fn resolve_finish(state: &State, finish: &Finish, node: &str) -> pb::TaskFinished {
    pb::TaskFinished {
        attempt: finish.attempt.as_ref().map(|p| resolve(state, p, node)),
        ..finish.report.clone()
    }
}

/// The wire message of `report` and the node it comes from, attempts resolved now.
fn wire_report(state: &State, report: &Report) -> (String, pb::WorkerMessage) {
    let runner = |n: usize| {
        let nodes: Vec<&str> = state
            .waves
            .values()
            .flat_map(|w| &w.tasks)
            .filter(|t| matches!(t.state, TaskState::Assigned | TaskState::Running))
            .filter_map(|t| t.node.as_deref())
            .collect();
        if nodes.is_empty() {
            NODE_NAMES[0]
        } else {
            nodes[n % nodes.len()]
        }
    };
    let node = match report.node {
        Some(i) => NODE_NAMES[i],
        None => runner(report.finished.len() + report.started.len()),
    };
    let message = pb::WorkerMessage {
        seq: 0,
        register: report.register.clone(),
        heartbeat: report.heartbeat,
        started: report
            .started
            .iter()
            .map(|(pick, started_ms)| pb::TaskStarted {
                attempt: pick.as_ref().map(|p| resolve(state, p, node)),
                started_ms: *started_ms,
                pid: 1,
            })
            .collect(),
        finished: report
            .finished
            .iter()
            .map(|f| resolve_finish(state, f, node))
            .collect(),
    };
    (node.to_string(), message)
}

/// `message` with every NaN replaced, so that it can be compared (NaN is not equal to itself).
fn without_nan(mut message: pb::WorkerMessage) -> pb::WorkerMessage {
    let fix = |x: &mut f64| {
        if x.is_nan() {
            *x = -0.125;
        }
    };
    if let Some(h) = &mut message.heartbeat {
        for x in [
            &mut h.theta,
            &mut h.h_cpu,
            &mut h.h_mem,
            &mut h.h_term,
            &mut h.cpu_usage_percent,
        ] {
            fix(x);
        }
    }
    if let Some(p) = message.register.as_mut().and_then(|r| r.profile.as_mut()) {
        fix(&mut p.cpu_usage_percent);
        fix(&mut p.cgroup_cpu_quota);
    }
    message
}

/// The commands a step amounts to, as the server and the replica would propose them.
fn commands_of(state: &State, now_ms: u64, step: &Step) -> Result<Vec<Command>, TestCaseError> {
    let mut commands = Vec::new();
    match step {
        Step::Report(report) => {
            let (node, message) = wire_report(state, report);
            let bytes = message.encode_to_vec();
            let decoded = pb::WorkerMessage::decode(bytes.as_slice())
                .map_err(|e| TestCaseError::fail(format!("own encoding does not decode: {e}")))?;
            prop_assert_eq!(without_nan(decoded), without_nan(message.clone()));
            commands.extend(convert::worker_report(&node, message, now_ms));
        }
        Step::Garbled { report, edits, cut } => {
            let (node, message) = wire_report(state, report);
            let mut bytes = message.encode_to_vec();
            for (at, byte) in edits {
                if !bytes.is_empty() {
                    let i = at.index(bytes.len());
                    bytes[i] = *byte;
                }
            }
            if let Some(cut) = cut {
                let len = cut.index(bytes.len() + 1);
                bytes.truncate(len);
            }
            if let Ok(message) = pb::WorkerMessage::decode(bytes.as_slice()) {
                commands.extend(convert::worker_report(&node, message, now_ms));
            }
        }
        Step::Noise { node, bytes } => {
            if let Ok(message) = pb::WorkerMessage::decode(bytes.as_slice()) {
                // As a stream's first message, then as a later one.
                if let Some(register) = &message.register {
                    match convert::node_spec(register) {
                        Ok(spec) => commands.push(convert::registration(
                            spec,
                            register.clone(),
                            0,
                            0,
                            now_ms,
                        )),
                        Err(e) => prop_assert!(!e.is_empty()),
                    }
                }
                commands.extend(convert::worker_report(NODE_NAMES[*node], message, now_ms));
            }
        }
        Step::Register(registration) => {
            let mut register = registration.register.clone();
            let name = register.name.clone();
            for pick in &registration.running {
                register.running.push(resolve(state, pick, &name));
            }
            for finish in &registration.unacknowledged {
                register
                    .unacknowledged
                    .push(resolve_finish(state, finish, &name));
            }
            match convert::node_spec(&register) {
                Ok(spec) => {
                    prop_assert_eq!(&spec.name, &name);
                    prop_assert!(spec.slots >= 1 && spec.slots <= convert::MAX_SLOTS);
                    prop_assert!(spec.queue_depth <= convert::MAX_QUEUE_DEPTH);
                    prop_assert!(spec.profile.len() <= convert::MAX_PROFILE_BYTES);
                    commands.push(convert::registration(spec, register, 0, 0, now_ms));
                }
                Err(e) => prop_assert!(e.starts_with("field"), "unnamed field: {e}"),
            }
        }
        Step::Schedule {
            lease_expired,
            unreachable,
        } => commands.push(Command::Schedule {
            now_ms,
            config: SchedulerConfig {
                lease_expired: lease_expired
                    .iter()
                    .map(|&n| NODE_NAMES[n].to_string())
                    .collect(),
                unreachable: unreachable
                    .iter()
                    .map(|&n| NODE_NAMES[n].to_string())
                    .collect(),
                ..SchedulerConfig::default()
            },
        }),
        Step::Cancel { wave_id } => commands.push(Command::CancelWave {
            wave_id: *wave_id,
            now_ms,
        }),
        Step::Drain { node, drain } => commands.push(Command::Drain {
            node: NODE_NAMES[*node].to_string(),
            drain: *drain,
        }),
    }
    Ok(commands)
}

/// Everything `apply` handed out for one command.
#[derive(Debug, PartialEq)]
struct Applied {
    outcome: Outcome,
    effects: Vec<Effect>,
    observations: Vec<Observation>,
}

fn apply(state: &mut State, command: Command) -> Applied {
    let outcome = state.apply(command);
    Applied {
        outcome,
        effects: std::mem::take(&mut state.effects),
        observations: std::mem::take(&mut state.observations),
    }
}

/// The replicated part of `state`, without consuming it.
fn snapshot_of(state: &State) -> StateSnapshot {
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

/// Bytes that say whether two states are the same, NaN and all.
fn fingerprint(state: &State) -> Vec<u8> {
    bincode::serialize(&snapshot_of(state)).expect("a state serializes")
}

/// The results a command carries, as (node, attempt).
fn results_in(command: &Command, out: &mut Vec<(String, AttemptRef)>) {
    match command {
        Command::Finished { results, .. } => {
            out.extend(results.iter().map(|r| (r.node.clone(), r.attempt)));
        }
        Command::Batch(commands) => commands.iter().for_each(|c| results_in(c, out)),
        _ => {}
    }
}

/// The state's invariants.
fn check_state(state: &State) -> Result<(), TestCaseError> {
    let limits = WaveLimits::default();
    let mut ready = BTreeSet::new();
    for (&wave_id, wave) in &state.waves {
        let h = &wave.header;
        let spec = &h.spec;
        prop_assert_eq!(h.id, wave_id);
        prop_assert!(wave_id < state.next_wave_id);
        prop_assert_eq!(wave.tasks.len() as u64, spec.n_micro_tasks());
        prop_assert!(spec.n_micro_tasks() <= limits.max_micro_tasks);
        let mut counts = Counts::default();
        let mut remaining = vec![0u32; spec.tasks.len()];
        let mut has_failed = vec![false; spec.tasks.len()];
        for (micro, task) in wave.tasks.iter().enumerate() {
            let key = (wave_id, micro as u32);
            let group = task.group as usize;
            prop_assert!(h.group_range(task.group).contains(&(micro as u32)));
            counts.add(task.state);
            if task.state != TaskState::Succeeded {
                remaining[group] += 1;
            }
            has_failed[group] |= task.state == TaskState::Failed;
            // Whatever a worker sends, what is kept (and replicated) of it is bounded.
            for output in [&task.outcome.stdout, &task.outcome.stderr] {
                prop_assert!(output.len() <= convert::MAX_STORED_OUTPUT_BYTES);
            }
            prop_assert!(task.error.len() <= convert::MAX_STORED_OUTPUT_BYTES + 64);
            let retries = spec.tasks[group].retries;
            prop_assert!(
                task.failures <= retries + 1,
                "{key:?}: {} failures",
                task.failures
            );
            if task.state == TaskState::Failed {
                prop_assert_eq!(task.failures, retries + 1, "{:?} failed early", key);
            }
            match task.state {
                TaskState::Ready => {
                    ready.insert(key);
                }
                TaskState::Assigned | TaskState::Running => {
                    prop_assert!(task.attempt >= 1);
                    let node = task.node.as_deref().unwrap_or_default();
                    prop_assert!(state.nodes.contains_key(node), "{key:?} on unknown node");
                    prop_assert!(!h.cancel_requested, "{key:?} runs in a cancelled wave");
                }
                _ => {}
            }
            let unmet = h.group_unmet_deps[group];
            match task.state {
                TaskState::Pending => prop_assert!(unmet > 0, "{key:?} pending, deps met"),
                TaskState::Ready
                | TaskState::Assigned
                | TaskState::Running
                | TaskState::Succeeded => prop_assert_eq!(unmet, 0, "{:?} ran early", key),
                _ => {}
            }
        }
        prop_assert_eq!(h.counts, counts, "wave {} counts", wave_id);
        prop_assert_eq!(counts.total(), wave.tasks.len() as u64);
        prop_assert_eq!(&h.group_remaining, &remaining, "wave {} remaining", wave_id);
        for (g, task) in spec.tasks.iter().enumerate() {
            let unmet = task.deps.iter().filter(|&&d| remaining[d] > 0).count() as u32;
            prop_assert_eq!(
                h.group_unmet_deps[g],
                unmet,
                "wave {} group {} unmet",
                wave_id,
                g
            );
        }
        // A task that failed for good: with skip-dependents every dependent ended without
        // running; with fail-wave the whole wave ended.
        for g in (0..spec.tasks.len()).filter(|&g| has_failed[g]) {
            match spec.on_failure {
                OnFailure::FailWave => {
                    prop_assert_eq!(counts.terminal(), wave.tasks.len() as u64)
                }
                OnFailure::SkipDependents => {
                    let mut stack = h.group_dependents[g].clone();
                    let mut seen = BTreeSet::new();
                    while let Some(d) = stack.pop() {
                        if !seen.insert(d) {
                            continue;
                        }
                        stack.extend(&h.group_dependents[d as usize]);
                        for micro in h.group_range(d) {
                            let s = wave.tasks[micro as usize].state;
                            prop_assert!(
                                matches!(s, TaskState::Skipped | TaskState::Cancelled),
                                "dependent {micro} of a failed task is {s:?}"
                            );
                        }
                    }
                }
            }
        }
        let all_terminal = counts.terminal() == wave.tasks.len() as u64;
        prop_assert_eq!(
            h.state.is_terminal(),
            all_terminal,
            "wave {} state {:?}",
            wave_id,
            h.state
        );
        match h.state {
            WaveState::Succeeded => prop_assert_eq!(counts.succeeded, wave.tasks.len() as u64),
            WaveState::Cancelled => prop_assert!(h.cancel_requested),
            WaveState::Failed => prop_assert!(!h.cancel_requested),
            _ => {}
        }
    }
    prop_assert_eq!(&state.ready, &ready, "the ready queue");

    // The derived indexes are what a restart would rebuild.
    let mut rebuilt = State::new(WaveLimits::default());
    rebuilt.restore(snapshot_of(state));
    prop_assert_eq!(&rebuilt.ready, &state.ready);
    for (name, node) in &state.nodes {
        let again = &rebuilt.nodes[name];
        prop_assert_eq!(&node.active, &again.active, "node {} active", name);
        prop_assert_eq!(node.used_cpus, again.used_cpus, "node {} cpus", name);
        prop_assert_eq!(node.used_memory_bytes, again.used_memory_bytes);
        prop_assert_eq!(node.used_gpus, again.used_gpus);
        prop_assert!(node.usable_slots() <= node.spec.slots);
        prop_assert!(node.spec.queue_depth <= convert::MAX_QUEUE_DEPTH);
        if node.draining {
            prop_assert!(
                node.state != NodeState::Ready,
                "node {} drains but is ready",
                name
            );
        }
    }
    Ok(())
}

/// What may never change from one state to the next: a micro-task that ended stays ended
/// as it ended (so no attempt finishes twice), attempts only grow, a finished wave stays
/// finished, stale results only add up.
fn check_transition(before: &StateSnapshot, after: &State) -> Result<(), TestCaseError> {
    prop_assert!(after.stale_results >= before.stale_results);
    prop_assert!(after.next_wave_id >= before.next_wave_id);
    for old in &before.waves {
        let Some(new) = after.waves.get(&old.header.id) else {
            return Err(TestCaseError::fail("a wave vanished"));
        };
        if old.header.state.is_terminal() {
            prop_assert_eq!(new.header.state, old.header.state);
        }
        for (micro, (was, is)) in old.tasks.iter().zip(&new.tasks).enumerate() {
            prop_assert!(
                is.attempt >= was.attempt,
                "micro {micro}: attempt went back"
            );
            if was.state.is_terminal() {
                prop_assert_eq!(is, was, "micro {} changed after it ended", micro);
            }
        }
    }
    for old in &before.nodes {
        prop_assert!(after.nodes.contains_key(&old.spec.name), "a node vanished");
    }
    Ok(())
}

/// Every result is acknowledged, stale or not, to the node that sent it, so that no
/// worker keeps re-sending one.
fn check_acks(command: &Command, applied: &Applied) -> Result<(), TestCaseError> {
    let mut results = Vec::new();
    results_in(command, &mut results);
    let mut acked: Vec<(String, AttemptRef)> = applied
        .effects
        .iter()
        .filter_map(|e| match e {
            Effect::Ack { node, attempts } => {
                Some(attempts.iter().map(move |a| (node.clone(), *a)))
            }
            _ => None,
        })
        .flatten()
        .collect();
    results.sort();
    acked.sort();
    prop_assert_eq!(acked, results, "acknowledgements");
    Ok(())
}

/// Runs `steps` on a fresh state, checking everything after each command; returns the
/// commands applied and what each gave.
fn run(steps: &[(u64, Step)]) -> Result<(Vec<Command>, Vec<Applied>, State), TestCaseError> {
    let mut now_ms = 1_000_000;
    let mut state = State::new(WaveLimits::default());
    let mut log = Vec::new();
    let mut answers = Vec::new();
    for command in setup_commands(now_ms) {
        let applied = apply(&mut state, command.clone());
        prop_assert!(!matches!(applied.outcome, Outcome::Rejected(_)));
        log.push(command);
        answers.push(applied);
    }
    check_state(&state)?;
    for (advance_ms, step) in steps {
        now_ms += advance_ms;
        for command in commands_of(&state, now_ms, step)? {
            let before = snapshot_of(&state);
            let applied = apply(&mut state, command.clone());
            check_state(&state)?;
            check_transition(&before, &state)?;
            check_acks(&command, &applied)?;
            log.push(command);
            answers.push(applied);
        }
    }
    Ok((log, answers, state))
}

/// The same commands on another replica give the same state and the same answers; the
/// state survives a snapshot (as shipped to a follower) unchanged.
fn check_replicas_agree(
    log: Vec<Command>,
    answers: &[Applied],
    state: &State,
) -> Result<(), TestCaseError> {
    // What the leader proposes travels as bytes: decode the log as a follower would.
    let mut follower = State::new(WaveLimits::default());
    for (command, answer) in log.into_iter().zip(answers) {
        let bytes = bincode::serialize(&command).expect("a command serializes");
        let command: Command = bincode::deserialize(&bytes).expect("a command deserializes");
        let applied = apply(&mut follower, command);
        prop_assert_eq!(&applied, answer, "replicas disagree");
    }
    prop_assert!(
        fingerprint(&follower) == fingerprint(state),
        "replica states differ"
    );

    let bytes = bincode::serialize(&snapshot_of(state)).expect("a snapshot serializes");
    let snapshot: StateSnapshot = bincode::deserialize(&bytes).expect("a snapshot deserializes");
    let mut restored = State::new(WaveLimits::default());
    restored.restore(snapshot);
    prop_assert!(
        fingerprint(&restored) == fingerprint(state),
        "snapshot changes the state"
    );
    check_state(&restored)?;
    Ok(())
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn raft_batches_are_admitted_by_the_rules(
        batch in raft_batch(),
        ours in cluster_id(),
        members in members(),
    ) {
        check_admission(&batch, ours, &members)?;
    }

    #[test]
    fn worker_messages_keep_the_state_sound(steps in prop::collection::vec(timed_step(), 1..60)) {
        let (log, answers, state) = run(&steps)?;
        check_replicas_agree(log, &answers, &state)?;
    }

    /// Random bytes on a worker stream: decoded as the server does and, when they decode,
    /// turned into commands (a registration first when they carry one).
    #[test]
    fn random_bytes_on_a_worker_stream(
        chunks in prop::collection::vec((0usize..3, small_bytes(512)), 1..8),
    ) {
        let steps: Vec<(u64, Step)> = chunks
            .into_iter()
            .flat_map(|(node, bytes)| {
                [
                    (10, Step::Noise { node, bytes }),
                    (10, Step::Schedule { lease_expired: Vec::new(), unreachable: Vec::new() }),
                ]
            })
            .collect();
        let (log, answers, state) = run(&steps)?;
        check_replicas_agree(log, &answers, &state)?;
    }
}

/// The generated batches reach every answer `admit` can give. Fixed seed.
#[test]
fn generated_batches_reach_every_answer() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::{Config, TestRng, TestRunner};
    let mut runner = TestRunner::new_with_rng(
        Config::default(),
        TestRng::from_seed(Default::default(), &[5; 32]),
    );
    let strategy = (raft_batch(), cluster_id(), members());
    let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
    for _ in 0..2_000 {
        let (batch, ours, members) = strategy.new_tree(&mut runner).expect("a value").current();
        let answer = match transport::admit(&batch, ours, &members) {
            Ok(admitted) if admitted.learn.is_some() => "stranger's leader traffic",
            Ok(admitted) if admitted.messages.is_empty() => "member, empty",
            Ok(_) => "member",
            Err(Refusal::OtherCluster { .. }) => "other cluster",
            Err(Refusal::NotMember { .. }) => "not a member",
            Err(Refusal::Undecodable(_)) => "undecodable",
            Err(Refusal::SenderMismatch) => "sender mismatch",
        };
        *seen.entry(answer).or_default() += 1;
    }
    assert_eq!(seen.len(), 7, "{seen:?}");
    assert!(seen.values().all(|&n| n >= 20), "{seen:?}");
}

/// The generated histories reach the interesting places: waves finish, results are fenced,
/// retries happen. Fixed seed, so the figures are stable.
#[test]
fn generated_histories_get_somewhere() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::{Config, TestRng, TestRunner};
    let mut runner = TestRunner::new_with_rng(
        Config::default(),
        TestRng::from_seed(Default::default(), &[11; 32]),
    );
    let strategy = prop::collection::vec(timed_step(), 50..60);
    let (mut n_finished_waves, mut n_stale, mut n_retried, mut n_succeeded) = (0, 0, 0, 0);
    for _ in 0..40 {
        let steps = strategy.new_tree(&mut runner).expect("a value").current();
        let (_, _, state) = run(&steps).expect("a sound history");
        for wave in state.waves.values() {
            n_finished_waves += usize::from(wave.header.state.is_terminal());
            n_succeeded += wave.header.counts.succeeded;
            n_retried += wave.tasks.iter().filter(|t| t.attempt > 1).count();
        }
        n_stale += state.stale_results;
    }
    // Seen with this seed: 70 of 80 waves finished, 110 micro-tasks succeeded, 83 ran
    // more than one attempt, 1,202 stale results.
    assert!(n_finished_waves >= 20, "{n_finished_waves} waves finished");
    assert!(n_succeeded >= 50, "{n_succeeded} micro-tasks succeeded");
    assert!(n_retried >= 20, "{n_retried} micro-tasks retried");
    assert!(n_stale >= 50, "{n_stale} stale results");
}

/// Found by `worker_messages_keep_the_state_sound`: a worker reporting attempts that ran
/// from 1 ms to `u64::MAX` ms overflowed the wave's summed run time in `State::on_finished`
/// (`work_ms += run_ms`): a panic in debug builds on every replica applying the entry, a
/// wrapped total in release. The sums now saturate.
#[test]
fn absurd_run_times_saturate_the_wave_work() {
    let now_ms = 1_000_000;
    let mut state = State::new(WaveLimits::default());
    for command in setup_commands(now_ms) {
        apply(&mut state, command);
    }
    apply(
        &mut state,
        Command::Schedule {
            now_ms,
            config: SchedulerConfig::default(),
        },
    );
    // Two micro-tasks of `a` (wave 1) run on n1; each reports an endless run.
    let on_n1: Vec<pb::AttemptRef> = state.waves[&1]
        .tasks
        .iter()
        .enumerate()
        .filter(|(_, t)| t.node.as_deref() == Some("n1"))
        .map(|(micro, t)| pb::AttemptRef {
            wave_id: 1,
            micro: micro as u32,
            attempt: t.attempt,
        })
        .collect();
    assert!(on_n1.len() >= 2, "{on_n1:?}");
    let finished = on_n1
        .iter()
        .map(|&attempt| pb::TaskFinished {
            attempt: Some(attempt),
            exit_code: Some(0),
            started_ms: 1,
            finished_ms: u64::MAX,
            ..pb::TaskFinished::default()
        })
        .collect();
    let message = pb::WorkerMessage {
        finished,
        ..pb::WorkerMessage::default()
    };
    let command = convert::worker_report("n1", message, now_ms).expect("a report");
    apply(&mut state, command);
    let header = &state.waves[&1].header;
    assert_eq!(header.work_ms, u64::MAX);
    assert_eq!(header.group_work_ms[0], u64::MAX);
    assert_eq!(header.counts.succeeded, 2);
    check_state(&state).expect("a sound state");
}
