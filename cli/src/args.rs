//! The command line of `venomctl`, declared with clap derive.
//!
//! Only declarations live here (plus the small value parsers they need), so that
//! `Command::debug_assert()` can check the whole tree in a unit test and the command
//! modules receive plain, already-validated values.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use venom_core::mobius::ThrottlePolicy;

/// Where `venomctl` looks for a coordinator when told nothing else: a coordinator on its
/// default address ([`DEFAULT_DEV_LISTEN`]; a test checks that they agree).
pub const DEFAULT_COORDINATOR: &str = venom_core::url::DEFAULT_COORDINATOR_URL;
/// Where `venomctl dev` serves by default: the embedded coordinator's own default.
pub const DEFAULT_DEV_LISTEN: &str = venom_coordinator::config::defaults::LISTEN;
/// Throttling policy of the embedded worker of `dev` and `benchmark --dev`.
pub const DEFAULT_DEV_THROTTLE: ThrottlePolicy = ThrottlePolicy::Adaptive;
/// How long `monitor` samples when told nothing else.
pub const DEFAULT_MONITOR_DURATION: &str = "10s";
/// Longest duration [`parse_duration`] accepts: a week, far beyond any sensible monitoring
/// run, which keeps the value finite.
pub const MAX_DURATION_S: f64 = 7.0 * 86_400.0;
/// Micro-tasks in the benchmark's array wave by default.
pub const DEFAULT_BENCH_MICRO_TASKS: u32 = 10_000;
/// Tasks in the benchmark's dependency chain by default.
pub const DEFAULT_BENCH_CHAIN: u32 = 1_000;
/// Processes in flight for the benchmark's spawn floor by default.
pub const DEFAULT_BENCH_SLOTS: u32 = 2;

/// Submit, watch and inspect Venom waves; run an embedded dev cluster.
#[derive(Debug, Parser)]
#[command(name = "venomctl", version, about, propagate_version = true)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,

    #[command(subcommand)]
    pub command: Command,
}

/// Flags every subcommand accepts.
#[derive(Debug, Clone, Args)]
pub struct GlobalArgs {
    /// Coordinator URLs, comma-separated. Any member works: each is tried in turn and
    /// requests follow the leader.
    #[arg(
        long,
        global = true,
        env = "VENOM_COORDINATOR",
        value_delimiter = ',',
        default_value = DEFAULT_COORDINATOR,
        value_name = "URL[,URL…]"
    )]
    pub coordinator: Vec<String>,

    /// Output format: aligned tables for people, one pretty JSON document for scripts.
    #[arg(long, global = true, env = "VENOM_OUTPUT", value_enum, default_value_t = OutputFormat::Table)]
    pub output: OutputFormat,

    /// OTLP/gRPC endpoint for traces (e.g. http://localhost:4317, Jaeger's OTLP port). Without
    /// it, OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or OTEL_EXPORTER_OTLP_ENDPOINT are used; with none
    /// of them, no traces are exported.
    #[arg(long, global = true, env = "VENOM_OTLP_ENDPOINT", value_name = "URL")]
    pub otlp_endpoint: Option<String>,

    /// Mutual TLS: the cluster CA, and your client or admin certificate (from `venomctl tls`).
    /// Needed for a coordinator beyond loopback.
    #[command(flatten)]
    pub tls: venom_tls::TlsArgs,

    /// Talk to coordinators beyond loopback in plaintext, unauthenticated (only a coordinator
    /// started `--insecure` answers).
    #[arg(long, global = true, env = "VENOM_INSECURE", conflicts_with_all = ["tls_ca", "tls_cert", "tls_key"])]
    pub insecure: bool,
}

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Table,
    Json,
}

impl OutputFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            OutputFormat::Table => "table",
            OutputFormat::Json => "json",
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a single-node coordinator and a local worker in this process; with WAVE,
    /// run that wave to completion and exit with its outcome.
    Dev(DevArgs),

    /// Validate a wave file locally, then submit it.
    Submit(SubmitArgs),

    /// Validate a wave file locally (no coordinator needed).
    Validate {
        /// Wave file (.toml or .json).
        file: PathBuf,
    },

    /// Print a wave as Graphviz DOT. A file gives the full dependency graph; a wave id
    /// gives its tasks and their progress, without edges (the coordinator does not
    /// serve dependencies).
    Graph {
        /// Wave file, or the id of a submitted wave.
        #[arg(value_name = "FILE|WAVE")]
        target: String,
    },

    /// List waves.
    Waves,

    /// Show one wave: counts, timings, measured speed-up beside the model's figure.
    Status {
        /// Wave id.
        wave: u64,
    },

    /// List a wave's micro-tasks.
    Tasks {
        /// Wave id.
        wave: u64,
    },

    /// Print the captured stdout and stderr of a micro-task's latest attempt.
    Logs {
        /// Wave id.
        wave: u64,
        /// Task id, with `[INDEX]` for one micro-task of an array task (e.g. `shard[7]`).
        #[arg(value_name = "TASK[INDEX]", value_parser = parse_task_ref)]
        task: TaskRef,
    },

    /// Wait until a wave finishes; the exit code is its outcome (0 succeeded, 1 not).
    Wait {
        /// Wave id.
        wave: u64,
    },

    /// Cancel a wave: pending micro-tasks are dropped, running ones are killed.
    Cancel {
        /// Wave id.
        wave: u64,
    },

    /// List worker nodes with their health, mode and load.
    Nodes,

    /// Stop placing new work on a node (running work finishes).
    Drain {
        /// Node name.
        node: String,
        /// Undo a drain: the node takes new work again.
        #[arg(long)]
        undo: bool,
    },

    /// Show the coordinator cluster (every member's id, address, role, term, commit and
    /// applied index, lag; aggregate S_Total), or change its membership.
    Cluster {
        #[command(subcommand)]
        action: Option<ClusterAction>,
    },

    /// Create the cluster's CA and certificates (mutual TLS with roles), or issue more.
    Tls {
        #[command(subcommand)]
        action: TlsAction,
    },

    /// Scan this machine's hardware and show its Möbius model figures.
    Scan,

    /// Compress HOURS of sequential work with this machine's model figures
    /// (and the three reference profiles').
    Compress {
        /// Sequential hours of work.
        #[arg(value_parser = parse_hours)]
        hours: f64,
    },

    /// Sample this machine's health θ every second.
    Monitor {
        /// How long to sample (e.g. `10s`, `2m`, `500ms`; a bare number is seconds).
        #[arg(default_value = DEFAULT_MONITOR_DURATION, value_parser = parse_duration)]
        duration: Duration,
        /// Every node's θ, components, mode and load as the coordinator sees them, instead
        /// of this machine's.
        #[arg(long)]
        cluster: bool,
    },

    /// Print the effective configuration.
    Config,

    /// Measure Venom against the physical spawn floor on this machine.
    Benchmark(BenchArgs),

    /// Print a shell completion script.
    Completions {
        /// Target shell.
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Clone, Args)]
pub struct DevArgs {
    /// Wave file to run; without it the dev cluster stays up until Ctrl-C.
    pub wave: Option<PathBuf>,

    /// Keep the coordinator's and worker's data here (default: a temporary directory).
    #[arg(long, env = "VENOM_DEV_DATA_DIR")]
    pub data_dir: Option<PathBuf>,

    /// Address to serve on (`127.0.0.1:0` picks a free port).
    #[arg(long, env = "VENOM_DEV_LISTEN", default_value = DEFAULT_DEV_LISTEN)]
    pub listen: SocketAddr,

    /// Slots of the local worker (default: this machine's CPUs).
    #[arg(long, env = "VENOM_DEV_SLOTS", value_parser = clap::value_parser!(u32).range(1..))]
    pub slots: Option<u32>,

    /// Throttling policy of the local worker (`conservative` backs off earlier).
    #[arg(long, env = "VENOM_DEV_THROTTLE", value_enum, default_value_t = DEFAULT_DEV_THROTTLE)]
    pub throttle: ThrottlePolicy,

    /// Keep the temporary data directory on exit (its path is printed).
    #[arg(long)]
    pub keep: bool,

    /// Serve with mutual TLS, as a cluster on a network does: a CA and certificates
    /// (member 1, worker `dev`, admin `dev`) are made in `<data dir>/tls`.
    #[arg(long)]
    pub tls: bool,
}

#[derive(Debug, Clone, Args)]
pub struct SubmitArgs {
    /// Wave file (.toml or .json; other names are detected from the content).
    pub file: PathBuf,

    /// Block until the wave finishes; the exit code is its outcome.
    #[arg(long, conflicts_with = "watch")]
    pub wait: bool,

    /// Show live progress bars until the wave finishes; the exit code is its outcome.
    #[arg(long)]
    pub watch: bool,

    /// The id this submission is known by (at most 64 printable ASCII characters, no
    /// spaces). venomctl resends it on every retry, so a submit that seemed to fail while
    /// a leader crashed is not run twice. Give the same id to a later `venomctl submit` to
    /// retry across invocations: a coordinator that already has it (from the same user,
    /// within 24 hours) answers the wave it created and creates none. Default: 16 random
    /// bytes as 32 hex characters, new for every invocation.
    #[arg(long, value_name = "ID", value_parser = parse_submission_id)]
    pub submission_id: Option<String>,
}

#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Micro-tasks in the array wave (and processes in its spawn floor).
    #[arg(long, default_value_t = DEFAULT_BENCH_MICRO_TASKS, value_parser = clap::value_parser!(u32).range(1..))]
    pub n: u32,

    /// Tasks in the dependency chain (0 skips the chain).
    #[arg(long, default_value_t = DEFAULT_BENCH_CHAIN)]
    pub chain: u32,

    /// Processes in flight for the spawn floor, and the dev worker's slots with `--dev`.
    #[arg(long, default_value_t = DEFAULT_BENCH_SLOTS, value_parser = clap::value_parser!(u32).range(1..))]
    pub slots: u32,

    /// Do not measure the spawn floors.
    #[arg(long)]
    pub skip_floor: bool,

    /// Start an embedded dev cluster (coordinator plus one worker) instead of using
    /// `--coordinator`.
    #[arg(long)]
    pub dev: bool,

    /// With `--dev`: run the embedded cluster with mutual TLS (to measure its cost).
    #[arg(long, requires = "dev")]
    pub tls: bool,
}

/// One micro-task named on the command line: `task` or `task[index]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskRef {
    pub task_id: String,
    pub index: Option<u32>,
}

impl std::fmt::Display for TaskRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.index {
            Some(index) => write!(f, "{}[{}]", self.task_id, index),
            None => f.write_str(&self.task_id),
        }
    }
}

/// Checks a `--submission-id` as the coordinator will.
pub fn parse_submission_id(text: &str) -> Result<String, String> {
    use venom_coordinator::submissions::{
        check_submission_id, SubmissionIdError, MAX_SUBMISSION_ID_BYTES,
    };
    match check_submission_id(text) {
        Ok(()) if text.is_empty() => Err("the id is empty (leave the flag out for a random one)".to_owned()),
        Ok(()) => Ok(text.to_owned()),
        Err(SubmissionIdError::TooLong { n_bytes }) => Err(format!(
            "{n_bytes} bytes; at most {MAX_SUBMISSION_ID_BYTES} are allowed"
        )),
        Err(SubmissionIdError::NotPrintable { position }) => Err(format!(
            "byte {position} is not printable ASCII (use letters, digits and punctuation, no spaces)"
        )),
    }
}

/// Parses `TASK` or `TASK[INDEX]`.
pub fn parse_task_ref(text: &str) -> Result<TaskRef, String> {
    let text = text.trim();
    let Some(open) = text.find('[') else {
        if text.is_empty() {
            return Err("the task id is empty".to_owned());
        }
        if text.contains(']') {
            return Err(format!("`{text}`: `]` without `[`"));
        }
        return Ok(TaskRef {
            task_id: text.to_owned(),
            index: None,
        });
    };
    let task_id = &text[..open];
    let rest = &text[open + 1..];
    if task_id.is_empty() {
        return Err(format!("`{text}`: the task id before `[` is empty"));
    }
    let Some(digits) = rest.strip_suffix(']') else {
        return Err(format!("`{text}`: expected TASK[INDEX], ending with `]`"));
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "`{text}`: the index must be a non-negative integer"
        ));
    }
    let index = digits
        .parse::<u32>()
        .map_err(|err| format!("`{text}`: index {digits}: {err}"))?;
    Ok(TaskRef {
        task_id: task_id.to_owned(),
        index: Some(index),
    })
}

/// Parses a duration such as `10s`, `1.5m`, `250ms`, `1h`, or a bare number of seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("`{text}`: expected a number with an optional unit (ms, s, m, h)"))?;
    let seconds_per_unit = match unit.trim() {
        "" | "s" | "sec" | "secs" => 1.0,
        "ms" => 0.001,
        "m" | "min" | "mins" => 60.0,
        "h" | "hr" | "hrs" => 3_600.0,
        other => {
            return Err(format!(
                "`{text}`: unknown unit `{other}` (use ms, s, m or h)"
            ))
        }
    };
    let seconds = value * seconds_per_unit;
    if !seconds.is_finite() || seconds <= 0.0 || seconds > MAX_DURATION_S {
        return Err(format!("`{text}`: must be above zero and at most a week"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

/// Parses a positive, finite number of hours.
pub fn parse_hours(text: &str) -> Result<f64, String> {
    let hours: f64 = text
        .trim()
        .parse()
        .map_err(|_| format!("`{text}`: expected a number of hours"))?;
    if !hours.is_finite() || hours < 0.0 {
        return Err(format!("`{text}`: hours must be a finite number ≥ 0"));
    }
    Ok(hours)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn command_tree_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn submission_ids_are_checked_as_the_coordinator_does() {
        let id = "0123456789abcdef0123456789abcdef";
        assert_eq!(parse_submission_id(id), Ok(id.to_owned()));
        for (bad, says) in [
            ("", "empty"),
            ("two words", "byte 3 is not printable ASCII"),
            (&"x".repeat(65)[..], "65 bytes; at most 64"),
        ] {
            let err = parse_submission_id(bad).expect_err(bad);
            assert!(err.contains(says), "`{bad}`: {err}");
        }
        let cli = Cli::try_parse_from(["venomctl", "submit", "w.toml", "--submission-id", id])
            .expect("valid command line");
        match cli.command {
            Command::Submit(args) => assert_eq!(args.submission_id.as_deref(), Some(id)),
            other => panic!("parsed as {other:?}"),
        }
    }

    #[test]
    fn task_refs_parse() {
        assert_eq!(
            parse_task_ref("shard[7]"),
            Ok(TaskRef {
                task_id: "shard".into(),
                index: Some(7)
            })
        );
        assert_eq!(
            parse_task_ref("prepare"),
            Ok(TaskRef {
                task_id: "prepare".into(),
                index: None
            })
        );
        assert_eq!(
            parse_task_ref("a-b_c.d[0]"),
            Ok(TaskRef {
                task_id: "a-b_c.d".into(),
                index: Some(0)
            })
        );
        for bad in [
            "",
            "[3]",
            "shard[",
            "shard[]",
            "shard[x]",
            "shard[-1]",
            "shard[1]x",
            "shard]",
            "shard[1][2]",
            "shard[99999999999]",
        ] {
            assert!(parse_task_ref(bad).is_err(), "`{bad}` should be rejected");
        }
        assert_eq!(
            parse_task_ref("shard[7]").map(|r| r.to_string()),
            Ok("shard[7]".into())
        );
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("5"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1_500)));
        for bad in ["", "s", "0", "10x", "-1s", "1e999", "9999h"] {
            assert!(parse_duration(bad).is_err(), "`{bad}` should be rejected");
        }
    }

    #[test]
    fn global_flags_split_coordinator_lists() {
        let cli = Cli::try_parse_from([
            "venomctl",
            "--coordinator",
            "http://a:1,http://b:2",
            "--output",
            "json",
            "waves",
        ])
        .expect("valid command line");
        assert_eq!(cli.global.coordinator, vec!["http://a:1", "http://b:2"]);
        assert_eq!(cli.global.output, OutputFormat::Json);
        assert!(matches!(cli.command, Command::Waves));
    }

    #[test]
    fn defaults_agree_and_no_token_flag_exists() {
        // `venomctl dev` with no flags is reached by every other command with no flags.
        assert_eq!(
            venom_core::url::normalize_url(DEFAULT_DEV_LISTEN),
            DEFAULT_COORDINATOR
        );
        assert!(parse_duration(DEFAULT_MONITOR_DURATION).is_ok());
        // Nothing checks client tokens, so venomctl offers no flag that suggests otherwise.
        assert!(Cli::try_parse_from(["venomctl", "--token", "t", "waves"]).is_err());
    }

    #[test]
    fn submit_wait_and_watch_conflict() {
        let both = Cli::try_parse_from(["venomctl", "submit", "w.toml", "--wait", "--watch"]);
        assert!(both.is_err());
        let logs = Cli::try_parse_from(["venomctl", "logs", "3", "shard[7]"]).expect("valid");
        match logs.command {
            Command::Logs { wave, task } => {
                assert_eq!(wave, 3);
                assert_eq!(task.index, Some(7));
            }
            other => panic!("parsed as {other:?}"),
        }
    }
}

/// Membership changes (raft conf changes, one member at a time).
#[derive(Debug, Subcommand)]
pub enum ClusterAction {
    /// Add coordinator ID reachable at ADDRESS (HOST:PORT). Start it afterwards with
    /// `venom-coordinator --id ID --listen ADDRESS --peers <current members> --join`;
    /// the leader catches it up with a snapshot.
    Add {
        /// Raft id of the new member (unused in this cluster, ≥ 1).
        id: u64,
        /// Address the other members and clients reach it at.
        address: String,
    },
    /// Remove coordinator ID (removing the leader hands leadership over first).
    Remove {
        /// Raft id of the member to remove.
        id: u64,
    },
}

/// `venomctl tls …`.
#[derive(Debug, Subcommand)]
pub enum TlsAction {
    /// Create DIR (0700) with a new cluster CA, and certificates for the members, workers,
    /// clients and admins named (keys 0600). Refuses a DIR that already holds a CA.
    Init {
        /// Where the CA and certificates go.
        #[arg(long, env = "VENOM_TLS_DIR", value_name = "DIR")]
        dir: std::path::PathBuf,
        /// A coordinator member: its id, then the host names and addresses it is reached at
        /// (`1=10.0.0.1,coord-1.example`; this machine's loopback names when none). Repeat
        /// for every member.
        #[arg(long = "member", value_name = "ID[=HOST,…]")]
        members: Vec<String>,
        /// A worker, by node name (repeat for each).
        #[arg(long = "worker", value_name = "NAME")]
        workers: Vec<String>,
        /// A user who may submit, read and cancel their own waves (repeat for each).
        #[arg(long = "client", value_name = "NAME")]
        clients: Vec<String>,
        /// An operator who may also drain nodes, change membership and cancel any wave.
        #[arg(long = "admin", value_name = "NAME", default_value = "admin")]
        admins: Vec<String>,
        /// Lifetime of each certificate, days.
        #[arg(long, default_value_t = venom_tls::issue::DEFAULT_DAYS, value_parser = clap::value_parser!(u32).range(1..))]
        days: u32,
        /// Lifetime of the CA, days.
        #[arg(long, default_value_t = venom_tls::issue::DEFAULT_CA_DAYS, value_parser = clap::value_parser!(u32).range(1..))]
        ca_days: u32,
    },
    /// Issue one more certificate from the CA in DIR (a new worker, user or member, or a
    /// replacement for one about to expire).
    Issue {
        /// member, worker, client or admin.
        role: venom_tls::Role,
        /// Node name, user name, or a member's id.
        name: String,
        #[arg(long, env = "VENOM_TLS_DIR", value_name = "DIR")]
        dir: std::path::PathBuf,
        /// Host names and addresses a member is reached at (repeat; members only).
        #[arg(long = "san", value_name = "HOST")]
        sans: Vec<String>,
        /// Lifetime, days.
        #[arg(long, default_value_t = venom_tls::issue::DEFAULT_DAYS, value_parser = clap::value_parser!(u32).range(1..))]
        days: u32,
        /// Replace an existing certificate of the same role and name (rotation).
        #[arg(long)]
        replace: bool,
    },
}
