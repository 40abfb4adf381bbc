//! Every limit and default of the worker, in one place: the flags' defaults (which clap, the
//! [`Default`] of [`crate::WorkerConfig`] and [`crate::WorkerConfig::for_dev`] all read from
//! here), and the fixed limits of the connection, the messages, the queue, the executor and the
//! θ monitor.
//!
//! Not here: the constants of θ's formula (weights and temperatures, in [`crate::theta`]),
//! facts about the machine the scanner reads (in [`crate::scan`]) and the metrics' histogram
//! buckets (in [`crate::metrics`]).

use std::time::Duration;

use venom_core::mobius::ThrottlePolicy;

use crate::isolation::CgroupMode;

// --- Flag defaults -----------------------------------------------------------------------

/// `--coordinator`: the coordinator a worker looks for when told none.
pub const DEFAULT_COORDINATOR: &str = venom_core::url::DEFAULT_COORDINATOR_URL;
/// `--throttle`.
pub const DEFAULT_THROTTLE: ThrottlePolicy = ThrottlePolicy::Adaptive;
/// `--queue-depth`: micro-tasks kept queued here beyond the running ones.
pub const DEFAULT_QUEUE_DEPTH: u32 = 32;
/// `--max-output-bytes`: output kept per stream of each attempt, the last 64 KiB.
pub const DEFAULT_MAX_OUTPUT_BYTES: usize = 64 * 1024;
/// `--heartbeat-ms`: interval between heartbeats, milliseconds.
pub const DEFAULT_HEARTBEAT_MS: u64 = 1000;
/// The shortest heartbeat interval accepted, milliseconds.
pub const MIN_HEARTBEAT_MS: u64 = 10;
// `--work-dir` depends on the machine: see `crate::isolation::default_work_root`.
/// `--keep-failed-workdirs-for`: how long a failed attempt's working directory is kept for
/// inspection (as clap reads it, and as a duration).
pub const DEFAULT_KEEP_FAILED_WORKDIRS_FOR: &str = "1h";
pub const DEFAULT_KEEP_FAILED_WORKDIRS_FOR_DURATION: Duration = Duration::from_secs(3600);
/// `--cgroups`: use them where the machine allows.
pub const DEFAULT_CGROUPS: CgroupMode = CgroupMode::Auto;

// --- The connection to the coordinator ---------------------------------------------------

/// Messages buffered towards the coordinator; when full, events accumulate in the agent's
/// state and leave together in the next message.
pub const OUTBOUND_CHANNEL_CAPACITY: usize = 8;
/// Time allowed to open a connection and the stream.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// HTTP/2 keep-alive: how a silently dead coordinator is noticed.
pub const KEEP_ALIVE_INTERVAL: Duration = Duration::from_secs(5);
/// How long a keep-alive ping may go unanswered.
pub const KEEP_ALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// How soon to ask again when a coordinator says it is not the leader and knows none yet
/// (an election is under way).
pub const NOT_LEADER_RETRY: Duration = Duration::from_millis(100);
/// How soon to go to the leader a refusal named. Not zero: two members with stale views must
/// not send a worker back and forth in a busy loop.
pub const LEADER_HINT_RETRY: Duration = Duration::from_millis(10);
/// Reconnect backoff: the first step, milliseconds.
pub const BACKOFF_MIN_MS: u64 = 50;
/// Reconnect backoff: the cap, milliseconds.
pub const BACKOFF_MAX_MS: u64 = 2_000;
/// Registrations and heartbeats remembered until a lease grant covers them (one leaves
/// about every second; a minute's worth without a grant means the lease ran out anyway).
pub const MAX_UNGRANTED_MESSAGES: usize = 64;
/// How long a coordinator may take to answer a registration (a leader answers once it has
/// committed it; a frozen or cut-off one never does).
pub const REGISTER_TIMEOUT: Duration = Duration::from_secs(5);
/// A leader renews the lease about once a heartbeat interval. With no renewal for twice the
/// interval plus this, the worker stops waiting on that leader and races every coordinator
/// again (the lease itself lasts much longer, so its attempts keep running meanwhile).
pub const SILENCE_SLACK: Duration = Duration::from_millis(250);
/// A stream that ends sooner than this after it was accepted is followed by a backoff before
/// the next race (a coordinator that accepts and drops at once must not cause a busy loop).
pub const MIN_STREAM_LIFE: Duration = Duration::from_secs(1);
/// On shutdown, how long to wait for killed attempts to be reaped.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

// --- Messages ----------------------------------------------------------------------------

/// Soft limit on one `WorkerMessage`; more results than fit go in the following messages.
/// Well under tonic's default 4 MiB decoding limit.
pub const MESSAGE_BUDGET_BYTES: usize = 1024 * 1024;
/// Largest `CoordinatorMessage` accepted.
pub const MAX_INBOUND_MESSAGE_BYTES: usize = 64 * 1024 * 1024;

// --- The queue and what waits to be reported ---------------------------------------------

/// Assignments queued beyond this are refused with an error result: the coordinator sends at
/// most slots + queue depth, so only a misbehaving one gets here.
pub const MAX_QUEUED_ASSIGNMENTS: usize = 10_000;
/// Results held back while work is queued here are sent once this many wait.
pub const MAX_COALESCED_RESULTS: usize = 64;
/// How long a start report may wait for company. Nothing waits on a start report, so it rides
/// along with the next result or heartbeat when one comes soon, halving the messages for short
/// tasks. Results wait the same way, but only while work is queued here (see
/// `AgentState::has_urgent_outbound`).
pub const STARTED_COALESCE: Duration = Duration::from_millis(5);

// --- The executor ------------------------------------------------------------------------

/// After the main process ends and its group is killed, how long to wait for the pipes to
/// close. Only a process that left the group (`setsid`) can hold them open longer; its output
/// is abandoned rather than blocking the slot forever.
pub const PIPE_CLOSE_GRACE: Duration = Duration::from_millis(500);
/// Bytes read from a pipe at a time (the buffer is zeroed once per attempt, so not too big).
pub const READ_CHUNK_BYTES: usize = 16 * 1024;
/// Without a pidfd (kernels before 5.3), how often to check whether the process has exited.
pub const REAP_POLL_INTERVAL: Duration = Duration::from_millis(5);

// --- The θ monitor -----------------------------------------------------------------------

/// How often the worker samples θ.
pub const DEFAULT_SAMPLE_INTERVAL: Duration = Duration::from_secs(1);
/// Snapshots a θ monitor keeps.
pub const HISTORY_CAPACITY: usize = 100;
