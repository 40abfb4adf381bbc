//! The wave model: what a validated wave is made of, its limits and its errors.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// Longest wave name, in characters.
pub const MAX_NAME_CHARS: usize = 128;
/// Longest task id, in characters.
pub const MAX_ID_CHARS: usize = 128;
/// Most extra attempts a task may ask for.
pub const MAX_RETRIES: u32 = 100;
/// Most slots (CPUs) one micro-task may ask for.
pub const MAX_CPUS: u32 = 1024;
/// Most GPUs one micro-task may ask for.
pub const MAX_GPUS: u32 = 1024;
/// Largest memory request of one micro-task: 1 PiB.
pub const MAX_MEMORY_BYTES: u64 = 1 << 50;
/// Longest timeout: 366 days. Keeps `start + timeout` far from overflowing anywhere.
pub const MAX_TIMEOUT_MS: u64 = 366 * 24 * 3_600 * 1_000;
/// Longest `workdir`, in bytes: Linux's `PATH_MAX` less the terminating NUL.
pub const MAX_WORKDIR_BYTES: usize = 4095;
/// Environment variables every micro-task gets from its worker; a wave may not set them.
pub const RESERVED_ENV_NAMES: [&str; 6] = [
    "VENOM_WAVE_ID",
    "VENOM_TASK_ID",
    "VENOM_TASK_INDEX",
    "VENOM_ATTEMPT",
    "VENOM_NODE",
    "VENOM_WORKDIR",
];

pub(crate) const TOP_LEVEL_FIELDS: [&str; 4] = ["name", "on_failure", "defaults", "task"];
pub(crate) const DEFAULTS_FIELDS: [&str; 8] = [
    "timeout", "retries", "cpus", "memory", "gpus", "env", "labels", "workdir",
];
pub(crate) const TASK_FIELDS: [&str; 13] = [
    "id", "run", "cmd", "array", "deps", "timeout", "retries", "cpus", "memory", "gpus", "env",
    "labels", "workdir",
];

/// Why a wave was rejected. Every error names the field it is about and, when it is about one
/// task, that task.
///
/// `task` is the task's id; a task whose id is missing or unusable is named by its 1-based
/// position in the file, as `#3`. `field` is the field's name as written in the file
/// (`array`, `deps`, `defaults.timeout`, `name`), or [`WaveError::FILE`] for problems with the
/// file as a whole (empty, too large, not UTF-8, a syntax error).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WaveError {
    /// The task the error is about, or `None` for wave-level errors.
    pub task: Option<String>,
    /// The field the error is about.
    pub field: String,
    /// What is wrong, in words, without the task and field (Display adds them).
    pub message: String,
}

impl WaveError {
    /// The `field` of errors about the file as a whole.
    pub const FILE: &'static str = "file";

    pub(crate) fn file(message: impl Into<String>) -> WaveError {
        WaveError::wave(WaveError::FILE, message)
    }

    pub(crate) fn wave(field: impl Into<String>, message: impl Into<String>) -> WaveError {
        WaveError {
            task: None,
            field: field.into(),
            message: message.into(),
        }
    }

    pub(crate) fn at(
        task: Option<&str>,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> WaveError {
        WaveError {
            task: task.map(str::to_owned),
            field: field.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for WaveError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.task {
            Some(task) => write!(f, "task `{task}`, field `{}`: {}", self.field, self.message),
            None if self.field == WaveError::FILE => write!(f, "wave file: {}", self.message),
            None => write!(f, "field `{}`: {}", self.field, self.message),
        }
    }
}

impl std::error::Error for WaveError {}

/// The syntax a wave file is written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// TOML, the documented form.
    Toml,
    /// JSON with the same keys (`"task": [ … ]`).
    Json,
    /// JSON if the first non-whitespace character is `{`, TOML otherwise.
    Auto,
}

impl std::str::FromStr for Format {
    type Err = String;

    /// `toml`, `json`, or `auto` (also the empty string).
    fn from_str(s: &str) -> Result<Format, String> {
        match s {
            "" | "auto" => Ok(Format::Auto),
            "toml" => Ok(Format::Toml),
            "json" => Ok(Format::Json),
            other => Err(format!("unknown format {other:?} (toml, json)")),
        }
    }
}

/// Bounds on what a wave may ask for; the coordinator's are configurable.
#[derive(Debug, Clone)]
pub struct WaveLimits {
    /// Largest wave file accepted, checked before any parsing.
    pub max_spec_bytes: usize,
    /// Most micro-tasks in one wave (the sum over tasks of `array`, or 1).
    pub max_micro_tasks: u64,
    /// Largest `array` of one task.
    pub max_array: u32,
    /// Most `[[task]]` entries in one wave.
    pub max_tasks: usize,
}

impl WaveLimits {
    /// Default largest wave file: 1 MiB.
    pub const DEFAULT_MAX_SPEC_BYTES: usize = 1 << 20;
    /// Default most micro-tasks in one wave.
    pub const DEFAULT_MAX_MICRO_TASKS: u64 = 100_000;
    /// Default largest `array`.
    pub const DEFAULT_MAX_ARRAY: u32 = 100_000;
    /// Default most `[[task]]` entries.
    pub const DEFAULT_MAX_TASKS: usize = 10_000;
}

impl Default for WaveLimits {
    fn default() -> WaveLimits {
        WaveLimits {
            max_spec_bytes: WaveLimits::DEFAULT_MAX_SPEC_BYTES,
            max_micro_tasks: WaveLimits::DEFAULT_MAX_MICRO_TASKS,
            max_array: WaveLimits::DEFAULT_MAX_ARRAY,
            max_tasks: WaveLimits::DEFAULT_MAX_TASKS,
        }
    }
}

/// What happens to the rest of a wave when a task fails for good (its retries spent).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnFailure {
    /// Skip the failed task's dependents (transitively); independent branches go on.
    #[default]
    SkipDependents,
    /// Cancel everything still pending; the wave fails.
    FailWave,
}

impl OnFailure {
    /// The name used in wave files: `skip-dependents` or `fail-wave`.
    pub fn as_str(self) -> &'static str {
        match self {
            OnFailure::SkipDependents => "skip-dependents",
            OnFailure::FailWave => "fail-wave",
        }
    }
}

impl fmt::Display for OnFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A validated wave: what the coordinator stores and schedules.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WaveSpec {
    /// Human-readable name (not unique; the coordinator assigns wave ids).
    pub name: String,
    /// What a task failing for good does to the rest of the wave.
    pub on_failure: OnFailure,
    /// The tasks in file order; `TaskSpec::deps` index into this.
    pub tasks: Vec<TaskSpec>,
}

/// One validated task, defaults already applied.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskSpec {
    /// Unique within the wave; `[A-Za-z0-9_.-]+`, at most [`MAX_ID_CHARS`] characters.
    pub id: String,
    /// What each micro-task runs.
    pub command: CommandSpec,
    /// `Some(n)`: the task is an array of `n` micro-tasks (`VENOM_TASK_INDEX` 0..n).
    pub array: Option<u32>,
    /// Indices into [`WaveSpec::tasks`] of the tasks that must all succeed first.
    pub deps: Vec<usize>,
    /// Per-attempt time limit in milliseconds; 0 means none.
    pub timeout_ms: u64,
    /// Extra attempts after a failure.
    pub retries: u32,
    /// Slots one micro-task occupies on a node.
    pub cpus: u32,
    /// Free memory a node must have for one micro-task; 0 means no requirement. Where the
    /// worker runs attempts in cgroups, also each attempt's memory limit.
    pub memory_bytes: u64,
    /// GPUs one micro-task needs.
    pub gpus: u32,
    /// Extra environment variables (defaults merged in, the task's own win).
    pub env: BTreeMap<String, String>,
    /// Node labels a node must carry to run this task (defaults merged in).
    pub labels: BTreeMap<String, String>,
    /// An absolute directory, existing on the worker, that every attempt runs in; Venom
    /// neither creates nor removes it. `None`: each attempt gets a fresh directory of its own,
    /// made and removed by the worker. Last, and defaulted, so that a spec encoded before the
    /// field existed still decodes from JSON.
    #[serde(default)]
    pub workdir: Option<String>,
}

/// How a micro-task's process is started.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum CommandSpec {
    /// `run = "…"`: run with `sh -c`.
    Shell(String),
    /// `cmd = ["prog", "arg", …]`: exec'd directly.
    Argv(Vec<String>),
}

impl TaskSpec {
    /// How many micro-tasks this task decomposes into: `array`, or 1.
    pub fn n_micro_tasks(&self) -> u32 {
        self.array.unwrap_or(1)
    }
}
