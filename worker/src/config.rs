//! The worker's configuration: one clap `Args` struct, every flag also read from a `VENOM_…`
//! environment variable, so the `venom-worker` binary parses it and `venomctl dev` can embed it
//! (or build one with [`WorkerConfig::for_dev`] without clap). Every default comes from
//! [`crate::limits`]; `--throttle` takes the shared [`ThrottlePolicy`] of `venom-core`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use venom_core::mobius::ThrottlePolicy;

use crate::isolation::{default_work_root, CgroupMode, IsolationSettings, UidRange};
use crate::limits::{
    DEFAULT_CGROUPS, DEFAULT_COORDINATOR, DEFAULT_HEARTBEAT_MS, DEFAULT_KEEP_FAILED_WORKDIRS_FOR,
    DEFAULT_KEEP_FAILED_WORKDIRS_FOR_DURATION, DEFAULT_MAX_OUTPUT_BYTES, DEFAULT_QUEUE_DEPTH,
    DEFAULT_THROTTLE, MIN_HEARTBEAT_MS,
};

/// Everything `venom-worker` can be told.
#[derive(Debug, Clone, Args)]
pub struct WorkerConfig {
    /// Coordinator URLs, comma-separated; any member works, the worker finds the leader.
    #[arg(
        long = "coordinator",
        env = "VENOM_COORDINATOR",
        value_delimiter = ',',
        default_value = DEFAULT_COORDINATOR,
        value_name = "URL[,URL…]"
    )]
    pub coordinators: Vec<String>,

    /// Mutual TLS: the cluster CA, and this worker's certificate (`venomctl tls issue worker
    /// NAME`), whose name becomes the node name. Required to reach a coordinator beyond
    /// loopback.
    #[command(flatten)]
    pub tls: venom_tls::TlsArgs,

    /// Reach coordinators beyond loopback in plaintext, unauthenticated (logged at every
    /// start): anyone on the path can read and alter this node's work.
    #[arg(long, env = "VENOM_INSECURE", conflicts_with_all = ["tls_ca", "tls_cert", "tls_key"])]
    pub insecure: bool,

    /// Slots (CPUs) this node offers [default: logical CPUs, or the cgroup CPU quota].
    #[arg(long, env = "VENOM_SLOTS", value_parser = clap::value_parser!(u32).range(1..))]
    pub slots: Option<u32>,

    /// Labels for placement constraints, `k=v` pairs, comma-separated.
    #[arg(long, env = "VENOM_LABELS", value_delimiter = ',', value_parser = parse_label, value_name = "K=V[,K=V…]")]
    pub labels: Vec<(String, String)>,

    /// This node's name [default: the name on its certificate, else the host name].
    #[arg(long, env = "VENOM_NAME")]
    pub name: Option<String>,

    /// Throttling policy the coordinator applies to this node.
    #[arg(long, env = "VENOM_THROTTLE", value_enum, default_value_t = DEFAULT_THROTTLE)]
    pub throttle: ThrottlePolicy,

    /// Address for the Prometheus `/metrics` endpoint.
    #[arg(long, env = "VENOM_METRICS_LISTEN", value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,

    /// Micro-tasks to keep queued here beyond the running ones, so the next one starts without
    /// a round trip to the coordinator.
    #[arg(long, env = "VENOM_QUEUE_DEPTH", default_value_t = DEFAULT_QUEUE_DEPTH)]
    pub queue_depth: u32,

    /// Output kept per stream of each attempt (the tail).
    #[arg(long, env = "VENOM_MAX_OUTPUT_BYTES", default_value_t = DEFAULT_MAX_OUTPUT_BYTES)]
    pub max_output_bytes: usize,

    /// Interval between heartbeats to the coordinator, milliseconds.
    #[arg(long, env = "VENOM_HEARTBEAT_MS", default_value_t = DEFAULT_HEARTBEAT_MS, value_parser = clap::value_parser!(u64).range(MIN_HEARTBEAT_MS..))]
    pub heartbeat_ms: u64,

    /// Where attempts' working directories are made (each attempt runs in a fresh, private
    /// directory under it, unless its wave names a `workdir`); created mode 0700 at start
    /// [default: $TMPDIR/venom-worker-UID, /tmp without TMPDIR].
    #[arg(long, env = "VENOM_WORK_DIR", value_name = "DIR")]
    pub work_dir: Option<PathBuf>,

    /// How long a failed attempt's working directory is kept for inspection ("30m", "2h";
    /// 0 removes it at once). A successful or cancelled attempt's is removed when it ends; a
    /// success also removes the kept directories of its micro-task's earlier failures.
    #[arg(long, env = "VENOM_KEEP_FAILED_WORKDIRS_FOR", default_value = DEFAULT_KEEP_FAILED_WORKDIRS_FOR, value_parser = parse_duration, value_name = "DURATION")]
    pub keep_failed_workdirs_for: Duration,

    /// Run tasks as this user (its uid and primary gid, no supplementary groups; HOME, USER,
    /// LOGNAME and SHELL from its passwd entry). Needs a worker running as root. Without it,
    /// tasks run as the worker's user and can read the worker's /proc/PID/environ.
    #[arg(long, env = "VENOM_RUN_AS", value_name = "USER")]
    pub run_as: Option<String>,

    /// Run each wave's tasks as a uid of its own: uid = FIRST + (wave id mod the range's size),
    /// gid the same number, no supplementary groups; HOME is the attempt's working directory,
    /// USER and LOGNAME venom-UID, SHELL /bin/sh. The wave's directory and its attempts' are
    /// closed to other uids, so a task can neither read another wave's files nor signal its
    /// processes, nor read the worker's /proc/PID/environ. Not protected: tasks of one wave
    /// share their uid, as do waves whose ids are congruent modulo the range's size (make the
    /// range larger than the number of waves alive at once); the network is not restricted.
    /// Needs a worker running as root; the range must lie within 1000-4294967294 and no
    /// account (uid or primary gid), group or /etc/subuid or /etc/subgid range may use an id
    /// of it (checked at start). A wave's own `workdir` is used as it is, not chowned.
    #[arg(
        long,
        env = "VENOM_RUN_AS_UIDS",
        value_name = "FIRST-LAST",
        conflicts_with = "run_as"
    )]
    pub run_as_uids: Option<UidRange>,

    /// Run each attempt in a cgroup v2 group of its own, with memory.max from the task's
    /// `memory` and cpu.max from its `cpus`: when the machine allows (auto, which logs at start
    /// which applies), never (off), or refuse to start without (required).
    #[arg(long, env = "VENOM_CGROUPS", value_enum, default_value_t = DEFAULT_CGROUPS)]
    pub cgroups: CgroupMode,

    /// This node's own state, kept across restarts (mode 0700): its node name, the results
    /// the leader has not acknowledged (synced to disk before they are reported, sent again
    /// after a crash) and the process groups it started (killed by the next start if a crash
    /// left them running). One worker process per directory
    /// [default: /var/lib/venom-worker/NAME as root, else ~/.local/state/venom-worker/NAME].
    #[arg(long, env = "VENOM_WORKER_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,

    /// The program started as this worker's guard (its own executable, set by `venom-worker`;
    /// none when a worker is embedded, as in `venomctl dev`). See [`crate::guard`].
    #[arg(skip)]
    pub guard_program: Option<PathBuf>,
}

/// The flags' defaults ([`crate::limits`]), coordinator included.
impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            coordinators: vec![DEFAULT_COORDINATOR.to_owned()],
            tls: venom_tls::TlsArgs::default(),
            insecure: false,
            slots: None,
            labels: Vec::new(),
            name: None,
            throttle: DEFAULT_THROTTLE,
            metrics_listen: None,
            queue_depth: DEFAULT_QUEUE_DEPTH,
            max_output_bytes: DEFAULT_MAX_OUTPUT_BYTES,
            heartbeat_ms: DEFAULT_HEARTBEAT_MS,
            work_dir: None,
            keep_failed_workdirs_for: DEFAULT_KEEP_FAILED_WORKDIRS_FOR_DURATION,
            run_as: None,
            run_as_uids: None,
            cgroups: DEFAULT_CGROUPS,
            data_dir: None,
            guard_program: None,
        }
    }
}

impl WorkerConfig {
    /// This node's name: `--name`, else the host name.
    pub fn node_name(&self) -> String {
        self.name
            .clone()
            .unwrap_or_else(crate::scan::local_hostname)
    }

    /// A configuration for a local worker beside an in-process coordinator: the flags'
    /// defaults but for the coordinator, the slots and the name.
    pub fn for_dev(coordinator: String, slots: Option<u32>, name: String) -> Self {
        Self {
            coordinators: vec![coordinator],
            slots,
            name: Some(name),
            ..Self::default()
        }
    }

    /// `--data-dir`, defaulted for node `name`.
    pub fn data_dir_for(&self, name: &str) -> PathBuf {
        if let Some(dir) = &self.data_dir {
            return dir.clone();
        }
        let base = if crate::isolation::effective_uid() == 0 {
            PathBuf::from("/var/lib/venom-worker")
        } else {
            std::env::var_os("XDG_STATE_HOME")
                .map(PathBuf::from)
                .or_else(|| {
                    std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".local/state"))
                })
                .unwrap_or_else(default_work_root)
                .join("venom-worker")
        };
        base.join(name)
    }

    /// The heartbeat interval.
    pub fn heartbeat_interval(&self) -> Duration {
        Duration::from_millis(self.heartbeat_ms.max(MIN_HEARTBEAT_MS))
    }

    /// The isolation flags, `--work-dir` defaulted.
    pub fn isolation_settings(&self) -> IsolationSettings {
        IsolationSettings {
            work_dir: self.work_dir.clone().unwrap_or_else(default_work_root),
            keep_failed_workdirs_for: self.keep_failed_workdirs_for,
            run_as: self.run_as.clone(),
            run_as_uids: self.run_as_uids,
            cgroups: self.cgroups,
        }
    }
}

/// Parses a duration the way wave files write them ("90s", "30m", "1h30m", "0").
fn parse_duration(text: &str) -> Result<Duration, String> {
    venom_core::wave::parse_duration_ms(text).map(Duration::from_millis)
}

/// Parses one `key=value` label.
fn parse_label(text: &str) -> Result<(String, String), String> {
    let (key, value) = text
        .split_once('=')
        .ok_or_else(|| format!("label `{text}` is not of the form key=value"))?;
    let key = key.trim();
    if key.is_empty() {
        return Err(format!("label `{text}` has an empty key"));
    }
    Ok((key.to_owned(), value.trim().to_owned()))
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    use super::*;

    #[derive(Debug, Parser)]
    struct TestCli {
        #[command(flatten)]
        worker: WorkerConfig,
    }

    #[test]
    fn clap_definition_is_consistent() {
        TestCli::command().debug_assert();
    }

    #[test]
    fn flags_parse_and_defaults_match_the_design() {
        let cli = TestCli::try_parse_from(["venom-worker"]).expect("defaults parse");
        assert_eq!(
            cli.worker.coordinators,
            vec![DEFAULT_COORDINATOR.to_owned()]
        );
        assert_eq!(cli.worker.queue_depth, 32);
        assert_eq!(cli.worker.max_output_bytes, 65_536);
        assert_eq!(cli.worker.heartbeat_ms, 1000);
        assert_eq!(cli.worker.throttle, ThrottlePolicy::Adaptive);
        assert_eq!(cli.worker.slots, None);

        let cli = TestCli::try_parse_from([
            "venom-worker",
            "--coordinator",
            "http://a:7070,http://b:7070",
            "--slots",
            "3",
            "--labels",
            "arch=x86_64,zone=eu",
            "--throttle",
            "aggressive",
            "--name",
            "n1",
        ])
        .expect("flags parse");
        assert_eq!(
            cli.worker.coordinators,
            vec!["http://a:7070", "http://b:7070"]
        );
        assert_eq!(cli.worker.slots, Some(3));
        assert_eq!(
            cli.worker.labels,
            vec![
                ("arch".to_owned(), "x86_64".to_owned()),
                ("zone".to_owned(), "eu".to_owned())
            ]
        );
        assert_eq!(cli.worker.throttle.as_str(), "aggressive");
        assert_eq!(cli.worker.name.as_deref(), Some("n1"));
    }

    #[test]
    fn bad_values_are_rejected() {
        assert!(TestCli::try_parse_from(["venom-worker", "--labels", "novalue"]).is_err());
        assert!(TestCli::try_parse_from(["venom-worker", "--slots", "0"]).is_err());
        assert!(TestCli::try_parse_from(["venom-worker", "--throttle", "max"]).is_err());
    }

    #[test]
    fn for_dev_fills_the_defaults() {
        let config = WorkerConfig::for_dev(
            "http://127.0.0.1:9999".to_owned(),
            Some(2),
            "dev".to_owned(),
        );
        assert_eq!(config.coordinators, vec!["http://127.0.0.1:9999"]);
        assert_eq!(config.slots, Some(2));
        assert_eq!(config.name.as_deref(), Some("dev"));
        assert_eq!(config.queue_depth, 32);
    }

    #[test]
    fn isolation_flags_parse_and_default() {
        let cli = TestCli::try_parse_from(["venom-worker"]).expect("defaults parse");
        let defaults = WorkerConfig::default();
        assert_eq!(
            cli.worker.keep_failed_workdirs_for,
            Duration::from_secs(3600)
        );
        assert_eq!(
            defaults.keep_failed_workdirs_for,
            cli.worker.keep_failed_workdirs_for
        );
        assert_eq!(cli.worker.cgroups, CgroupMode::Auto);
        assert_eq!(defaults.cgroups, CgroupMode::Auto);
        assert_eq!(cli.worker.run_as, None);
        assert_eq!(cli.worker.run_as_uids, None);
        assert_eq!(defaults.run_as_uids, None);
        let settings = defaults.isolation_settings();
        assert_eq!(settings.work_dir, default_work_root());
        let uid = crate::isolation::user::effective_uid();
        assert!(
            settings.work_dir.ends_with(format!("venom-worker-{uid}")),
            "{}",
            settings.work_dir.display()
        );

        let cli = TestCli::try_parse_from([
            "venom-worker",
            "--work-dir",
            "/srv/venom",
            "--keep-failed-workdirs-for",
            "1h30m",
            "--run-as",
            "nobody",
            "--cgroups",
            "required",
        ])
        .expect("flags parse");
        let settings = cli.worker.isolation_settings();
        assert_eq!(settings.work_dir, PathBuf::from("/srv/venom"));
        assert_eq!(settings.keep_failed_workdirs_for, Duration::from_secs(5400));
        assert_eq!(settings.run_as.as_deref(), Some("nobody"));
        assert_eq!(settings.cgroups, CgroupMode::Required);
        let zero = TestCli::try_parse_from(["venom-worker", "--keep-failed-workdirs-for", "0"])
            .expect("0 parses");
        assert_eq!(zero.worker.keep_failed_workdirs_for, Duration::ZERO);

        for bad in [
            ["--keep-failed-workdirs-for", "soon"],
            ["--cgroups", "maybe"],
        ] {
            let args = ["venom-worker", bad[0], bad[1]];
            assert!(TestCli::try_parse_from(args).is_err(), "{args:?}");
        }

        let cli = TestCli::try_parse_from(["venom-worker", "--run-as-uids", "200000-200999"])
            .expect("a range parses");
        let settings = cli.worker.isolation_settings();
        assert_eq!(
            settings.run_as_uids,
            Some(UidRange::new(200_000, 200_999).expect("a range"))
        );
        assert_eq!(settings.run_as, None);
        let both = TestCli::try_parse_from([
            "venom-worker",
            "--run-as",
            "nobody",
            "--run-as-uids",
            "200000-200999",
        ])
        .expect_err("--run-as and --run-as-uids conflict");
        assert_eq!(both.kind(), clap::error::ErrorKind::ArgumentConflict);
        for (bad, reason) in [
            (
                "200999-200000",
                "FIRST (200999) is greater than LAST (200000)",
            ),
            ("10-20", "10-20 reaches outside 1000-4294967294"),
            (
                "1000-4294967295",
                "1000-4294967295 reaches outside 1000-4294967294",
            ),
            ("200000", "is not of the form FIRST-LAST"),
        ] {
            let error = TestCli::try_parse_from(["venom-worker", "--run-as-uids", bad])
                .expect_err(bad)
                .to_string();
            assert!(
                error.contains(&format!(
                    "invalid value '{bad}' for '--run-as-uids <FIRST-LAST>'"
                )) && error.contains(reason),
                "{error}"
            );
        }

        let help = TestCli::command().render_long_help().to_string();
        for variable in [
            "VENOM_WORK_DIR",
            "VENOM_KEEP_FAILED_WORKDIRS_FOR",
            "VENOM_RUN_AS",
            "VENOM_RUN_AS_UIDS",
            "VENOM_CGROUPS",
        ] {
            assert!(
                help.contains(variable),
                "--help does not mention {variable}"
            );
        }
    }
}
