//! Wave files: parsing and validation, the one authority on what a valid wave is.
//!
//! A wave is a DAG of shell-command tasks written as TOML (JSON is accepted too). The coordinator
//! parses a submitted file with [`parse_wave`], the state machine re-checks the built
//! [`WaveSpec`] with [`WaveSpec::validate`] when it applies it, and `venomctl validate` runs the
//! same code locally, so a wave is judged the same way everywhere.
//!
//! Parsing goes in three steps so that every error can name the task and the field it is about
//! ([`WaveError`]): the text is first read into a generic tree (syntax errors carry line and
//! column), then the tree is walked key by key against the closed list of known fields (an
//! unknown key or a value of the wrong type is reported with its own field name, which a derived
//! `deny_unknown_fields` struct cannot do), and finally the built spec is checked as a whole:
//! ids, dependencies, cycles (the message prints the cycle's path) and the configured
//! [`WaveLimits`]. Everything here is bounded: the input size is checked before any parsing, and
//! every count and size has a limit. No I/O, no clock.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::fmt;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

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
/// Environment variables every micro-task gets from its worker; a wave may not set them.
pub const RESERVED_ENV_NAMES: [&str; 5] = [
    "VENOM_WAVE_ID",
    "VENOM_TASK_ID",
    "VENOM_TASK_INDEX",
    "VENOM_ATTEMPT",
    "VENOM_NODE",
];

const TOP_LEVEL_FIELDS: [&str; 4] = ["name", "on_failure", "defaults", "task"];
const DEFAULTS_FIELDS: [&str; 7] = [
    "timeout", "retries", "cpus", "memory", "gpus", "env", "labels",
];
const TASK_FIELDS: [&str; 12] = [
    "id", "run", "cmd", "array", "deps", "timeout", "retries", "cpus", "memory", "gpus", "env",
    "labels",
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

    fn file(message: impl Into<String>) -> WaveError {
        WaveError::wave(WaveError::FILE, message)
    }

    fn wave(field: impl Into<String>, message: impl Into<String>) -> WaveError {
        WaveError {
            task: None,
            field: field.into(),
            message: message.into(),
        }
    }

    fn at(task: Option<&str>, field: impl Into<String>, message: impl Into<String>) -> WaveError {
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

impl Default for WaveLimits {
    fn default() -> WaveLimits {
        WaveLimits {
            max_spec_bytes: 1 << 20,
            max_micro_tasks: 100_000,
            max_array: 100_000,
            max_tasks: 10_000,
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
    /// Free memory a node must have for one micro-task; 0 means no requirement.
    pub memory_bytes: u64,
    /// GPUs one micro-task needs.
    pub gpus: u32,
    /// Extra environment variables (defaults merged in, the task's own win).
    pub env: BTreeMap<String, String>,
    /// Node labels a node must carry to run this task (defaults merged in).
    pub labels: BTreeMap<String, String>,
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

/// Parses and validates a wave file.
///
/// The size limit is checked before anything else, then UTF-8, then syntax, then every field,
/// then the wave as a whole ([`WaveSpec::validate`]). The first problem found is returned.
pub fn parse_wave(
    bytes: &[u8],
    format: Format,
    limits: &WaveLimits,
) -> Result<WaveSpec, WaveError> {
    if bytes.len() > limits.max_spec_bytes {
        return Err(WaveError::file(format!(
            "is {} bytes, above the limit of {} bytes",
            bytes.len(),
            limits.max_spec_bytes
        )));
    }
    let text = std::str::from_utf8(bytes).map_err(|e| {
        let (line, column) = line_column(&bytes[..e.valid_up_to()]);
        WaveError::file(format!("is not valid UTF-8 (line {line}, column {column})"))
    })?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    if text.trim().is_empty() {
        return Err(WaveError::file("is empty"));
    }
    let tree = match format {
        Format::Json => json_tree(text)?,
        Format::Toml => toml_tree(text)?,
        Format::Auto if text.trim_start().starts_with('{') => json_tree(text)?,
        Format::Auto => toml_tree(text)?,
    };
    let spec = build_spec(&tree, limits)?;
    spec.validate(limits)?;
    Ok(spec)
}

/// 1-based line and column (in characters) of the end of `prefix`.
fn line_column(prefix: &[u8]) -> (usize, usize) {
    let text = String::from_utf8_lossy(prefix);
    let line = text.matches('\n').count() + 1;
    let last_line = text.rsplit('\n').next().unwrap_or("");
    (line, last_line.chars().count() + 1)
}

fn toml_tree(text: &str) -> Result<Value, WaveError> {
    let table: toml::Table = toml::from_str(text).map_err(|e| {
        let offset = e.span().map_or(0, |span| span.start).min(text.len());
        let (line, column) = line_column(&text.as_bytes()[..offset]);
        WaveError::file(format!(
            "TOML syntax error at line {line}, column {column}: {}",
            e.message().trim().replace('\n', "; ")
        ))
    })?;
    Ok(toml_to_json(toml::Value::Table(table)))
}

/// Converts a TOML tree into the generic tree the walker reads. Dates and times (which no wave
/// field takes) become their text, so they are then judged like any string.
fn toml_to_json(value: toml::Value) -> Value {
    match value {
        toml::Value::String(s) => Value::String(s),
        toml::Value::Integer(i) => Value::from(i),
        toml::Value::Float(f) => serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number),
        toml::Value::Boolean(b) => Value::Bool(b),
        toml::Value::Datetime(d) => Value::String(d.to_string()),
        toml::Value::Array(items) => Value::Array(items.into_iter().map(toml_to_json).collect()),
        toml::Value::Table(table) => Value::Object(
            table
                .into_iter()
                .map(|(key, value)| (key, toml_to_json(value)))
                .collect(),
        ),
    }
}

fn json_tree(text: &str) -> Result<Value, WaveError> {
    serde_json::from_str(text).map_err(|e| {
        let full = e.to_string();
        let message = full
            .rsplit_once(" at line ")
            .map_or(full.as_str(), |(m, _)| m);
        WaveError::file(format!(
            "JSON syntax error at line {}, column {}: {message}",
            e.line(),
            e.column()
        ))
    })
}

/// Fields shared by `[defaults]` and `[[task]]`, each `None` when not written.
#[derive(Debug, Default)]
struct RawResources {
    timeout_ms: Option<u64>,
    retries: Option<u32>,
    cpus: Option<u32>,
    memory_bytes: Option<u64>,
    gpus: Option<u32>,
    env: Option<BTreeMap<String, String>>,
    labels: Option<BTreeMap<String, String>>,
}

/// One `[[task]]` as written, types checked, dependencies still names.
#[derive(Debug)]
struct RawTask {
    id: String,
    command: CommandSpec,
    array: Option<u32>,
    deps: Vec<String>,
    resources: RawResources,
}

fn build_spec(tree: &Value, limits: &WaveLimits) -> Result<WaveSpec, WaveError> {
    let Value::Object(top) = tree else {
        return Err(WaveError::file(
            "must be a table with `name`, `task` and optionally `on_failure`, `defaults`",
        ));
    };
    reject_unknown_fields(top, &TOP_LEVEL_FIELDS, None, "")?;

    let name: String = match top.get("name") {
        Some(value) => typed(value, None, "name")?,
        None => return Err(WaveError::wave("name", "is required")),
    };
    check_name(&name).map_err(|m| WaveError::wave("name", m))?;

    let on_failure = match top.get("on_failure") {
        None => OnFailure::default(),
        Some(value) => match typed::<String>(value, None, "on_failure")?.as_str() {
            "skip-dependents" => OnFailure::SkipDependents,
            "fail-wave" => OnFailure::FailWave,
            other => {
                return Err(WaveError::wave(
                    "on_failure",
                    format!("must be \"skip-dependents\" or \"fail-wave\", not {other:?}"),
                ))
            }
        },
    };

    let defaults = match top.get("defaults") {
        None => RawResources::default(),
        Some(Value::Object(table)) => {
            reject_unknown_fields(table, &DEFAULTS_FIELDS, None, "defaults.")?;
            read_resources(table, None, "defaults.")?
        }
        Some(_) => return Err(WaveError::wave("defaults", "must be a table")),
    };

    let raw_tasks = match top.get("task") {
        None => {
            return Err(WaveError::wave(
                "task",
                "is required: a wave needs at least one [[task]]",
            ))
        }
        Some(Value::Array(items)) => {
            check_n_tasks(items.len(), limits).map_err(|m| WaveError::wave("task", m))?;
            items
                .iter()
                .enumerate()
                .map(|(position, item)| read_task(position, item))
                .collect::<Result<Vec<RawTask>, WaveError>>()?
        }
        Some(_) => {
            return Err(WaveError::wave(
                "task",
                "must be an array of tables ([[task]] in TOML)",
            ))
        }
    };

    let mut index_of: HashMap<&str, usize> = HashMap::with_capacity(raw_tasks.len());
    for (index, raw) in raw_tasks.iter().enumerate() {
        if let Some(first) = index_of.insert(raw.id.as_str(), index) {
            return Err(WaveError::at(
                Some(&raw.id),
                "id",
                format!("duplicate id: task #{} already uses it", first + 1),
            ));
        }
    }

    let mut tasks = Vec::with_capacity(raw_tasks.len());
    for raw in &raw_tasks {
        let mut deps = Vec::with_capacity(raw.deps.len());
        for dep in &raw.deps {
            if *dep == raw.id {
                return Err(WaveError::at(
                    Some(&raw.id),
                    "deps",
                    "a task cannot depend on itself",
                ));
            }
            match index_of.get(dep.as_str()) {
                Some(&index) => deps.push(index),
                None => {
                    return Err(WaveError::at(
                        Some(&raw.id),
                        "deps",
                        format!("unknown task `{dep}`"),
                    ))
                }
            }
        }
        tasks.push(merge_defaults(raw, deps, &defaults));
    }
    Ok(WaveSpec {
        name,
        on_failure,
        tasks,
    })
}

fn merge_defaults(raw: &RawTask, deps: Vec<usize>, defaults: &RawResources) -> TaskSpec {
    let own = &raw.resources;
    let merged_map = |own: &Option<BTreeMap<String, String>>,
                      default: &Option<BTreeMap<String, String>>| {
        let mut map = default.clone().unwrap_or_default();
        map.extend(own.iter().flatten().map(|(k, v)| (k.clone(), v.clone())));
        map
    };
    TaskSpec {
        id: raw.id.clone(),
        command: raw.command.clone(),
        array: raw.array,
        deps,
        timeout_ms: own.timeout_ms.or(defaults.timeout_ms).unwrap_or(0),
        retries: own.retries.or(defaults.retries).unwrap_or(0),
        cpus: own.cpus.or(defaults.cpus).unwrap_or(1),
        memory_bytes: own.memory_bytes.or(defaults.memory_bytes).unwrap_or(0),
        gpus: own.gpus.or(defaults.gpus).unwrap_or(0),
        env: merged_map(&own.env, &defaults.env),
        labels: merged_map(&own.labels, &defaults.labels),
    }
}

/// Errors on the first key (in sorted order) that is not in `known`.
fn reject_unknown_fields(
    table: &Map<String, Value>,
    known: &[&str],
    task: Option<&str>,
    prefix: &str,
) -> Result<(), WaveError> {
    let mut unknown: Vec<&String> = table
        .keys()
        .filter(|key| !known.contains(&key.as_str()))
        .collect();
    unknown.sort();
    match unknown.first() {
        None => Ok(()),
        Some(key) => Err(WaveError::at(
            task,
            format!("{prefix}{key}"),
            format!("unknown field; expected one of: {}", known.join(", ")),
        )),
    }
}

/// Deserializes one field's value, naming the field if its type is wrong.
fn typed<T: DeserializeOwned>(
    value: &Value,
    task: Option<&str>,
    field: &str,
) -> Result<T, WaveError> {
    T::deserialize(value).map_err(|e| WaveError::at(task, field, e.to_string()))
}

fn read_task(position: usize, item: &Value) -> Result<RawTask, WaveError> {
    let label = format!("#{}", position + 1);
    let Value::Object(table) = item else {
        return Err(WaveError::at(Some(&label), "task", "must be a table"));
    };
    let id: String = match table.get("id") {
        Some(value) => typed(value, Some(&label), "id")?,
        None => return Err(WaveError::at(Some(&label), "id", "is required")),
    };
    check_id(&id).map_err(|m| WaveError::at(Some(&label), "id", m))?;
    let task = Some(id.as_str());
    reject_unknown_fields(table, &TASK_FIELDS, task, "")?;

    let run: Option<String> = table
        .get("run")
        .map(|v| typed(v, task, "run"))
        .transpose()?;
    let cmd: Option<Vec<String>> = table
        .get("cmd")
        .map(|v| typed(v, task, "cmd"))
        .transpose()?;
    let command = match (run, cmd) {
        (Some(run), None) => CommandSpec::Shell(run),
        (None, Some(argv)) => CommandSpec::Argv(argv),
        (Some(_), Some(_)) => {
            return Err(WaveError::at(
                task,
                "run",
                "set either `run` (a shell string) or `cmd` (an argv array), not both",
            ))
        }
        (None, None) => {
            return Err(WaveError::at(
                task,
                "run",
                "a task needs `run` (a shell string) or `cmd` (an argv array)",
            ))
        }
    };
    let array: Option<u32> = table
        .get("array")
        .map(|v| typed(v, task, "array"))
        .transpose()?;
    let deps: Vec<String> = table
        .get("deps")
        .map(|v| typed(v, task, "deps"))
        .transpose()?
        .unwrap_or_default();
    Ok(RawTask {
        id: id.clone(),
        command,
        array,
        deps,
        resources: read_resources(table, Some(&id), "")?,
    })
}

/// Reads the resource fields of `[defaults]` (prefix `defaults.`) or of a task (no prefix),
/// checking each against its limit.
fn read_resources(
    table: &Map<String, Value>,
    task: Option<&str>,
    prefix: &str,
) -> Result<RawResources, WaveError> {
    let field = |name: &str| format!("{prefix}{name}");
    let checked = |name: &str, result: Result<(), String>| {
        result.map_err(|m| WaveError::at(task, field(name), m))
    };
    let mut resources = RawResources::default();
    if let Some(value) = table.get("timeout") {
        let timeout_ms = match value {
            Value::String(s) => parse_duration_ms(s),
            Value::Number(n) => n
                .as_u64()
                .and_then(|secs| secs.checked_mul(1_000))
                .ok_or_else(|| format!("{n} is not a whole, non-negative number of seconds")),
            _ => Err("must be a duration like \"30s\", \"10m\", \"1h30m\" or whole seconds".into()),
        }
        .map_err(|m| WaveError::at(task, field("timeout"), m))?;
        checked("timeout", check_timeout_ms(timeout_ms))?;
        resources.timeout_ms = Some(timeout_ms);
    }
    if let Some(value) = table.get("retries") {
        let retries = typed(value, task, &field("retries"))?;
        checked("retries", check_retries(retries))?;
        resources.retries = Some(retries);
    }
    if let Some(value) = table.get("cpus") {
        let cpus = typed(value, task, &field("cpus"))?;
        checked("cpus", check_cpus(cpus))?;
        resources.cpus = Some(cpus);
    }
    if let Some(value) = table.get("memory") {
        let memory_bytes = match value {
            Value::String(s) => parse_memory_bytes(s),
            Value::Number(n) => n
                .as_u64()
                .ok_or_else(|| format!("{n} is not a whole, non-negative number of bytes")),
            _ => Err("must be a size like \"256MiB\", \"1GiB\" or whole bytes".into()),
        }
        .map_err(|m| WaveError::at(task, field("memory"), m))?;
        checked("memory", check_memory_bytes(memory_bytes))?;
        resources.memory_bytes = Some(memory_bytes);
    }
    if let Some(value) = table.get("gpus") {
        let gpus = typed(value, task, &field("gpus"))?;
        checked("gpus", check_gpus(gpus))?;
        resources.gpus = Some(gpus);
    }
    if let Some(value) = table.get("env") {
        let env = read_string_map(value, task, &field("env"))?;
        checked("env", check_env(&env))?;
        resources.env = Some(env);
    }
    if let Some(value) = table.get("labels") {
        let labels = read_string_map(value, task, &field("labels"))?;
        checked("labels", check_labels(&labels))?;
        resources.labels = Some(labels);
    }
    Ok(resources)
}

/// A table of string values, naming the key whose value is not a string.
fn read_string_map(
    value: &Value,
    task: Option<&str>,
    field: &str,
) -> Result<BTreeMap<String, String>, WaveError> {
    let Value::Object(table) = value else {
        return Err(WaveError::at(task, field, "must be a table of strings"));
    };
    table
        .iter()
        .map(|(key, value)| match value {
            Value::String(s) => Ok((key.clone(), s.clone())),
            _ => Err(WaveError::at(
                task,
                field,
                format!("the value of `{key}` must be a string"),
            )),
        })
        .collect()
}

// Field checks, shared by parsing (with the field's own name) and `WaveSpec::validate`.

fn check_name(name: &str) -> Result<(), String> {
    if name.trim().is_empty() {
        return Err("must not be empty".into());
    }
    let n_chars = name.chars().count();
    if n_chars > MAX_NAME_CHARS {
        return Err(format!(
            "is {n_chars} characters, above the limit of {MAX_NAME_CHARS}"
        ));
    }
    if name.chars().any(char::is_control) {
        return Err("must not contain control characters".into());
    }
    Ok(())
}

fn check_id(id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err("must not be empty".into());
    }
    let n_chars = id.chars().count();
    if n_chars > MAX_ID_CHARS {
        return Err(format!(
            "is {n_chars} characters, above the limit of {MAX_ID_CHARS}"
        ));
    }
    if !id
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
    {
        return Err(format!(
            "{id:?} may only contain letters, digits, `_`, `.` and `-`"
        ));
    }
    Ok(())
}

fn check_n_tasks(n_tasks: usize, limits: &WaveLimits) -> Result<(), String> {
    if n_tasks == 0 {
        return Err("a wave needs at least one task".into());
    }
    if n_tasks > limits.max_tasks {
        return Err(format!(
            "{n_tasks} tasks, above the limit of {}",
            limits.max_tasks
        ));
    }
    Ok(())
}

/// Checks a command, returning the field (`run` or `cmd`) and the problem.
fn check_command(command: &CommandSpec) -> Result<(), (&'static str, String)> {
    match command {
        CommandSpec::Shell(script) => {
            if script.trim().is_empty() {
                return Err(("run", "must not be empty".into()));
            }
            if script.contains('\0') {
                return Err(("run", "must not contain NUL characters".into()));
            }
        }
        CommandSpec::Argv(argv) => {
            let Some(program) = argv.first() else {
                return Err(("cmd", "must not be empty: give at least the program".into()));
            };
            if program.trim().is_empty() {
                return Err((
                    "cmd",
                    "the program (first element) must not be empty".into(),
                ));
            }
            if argv.iter().any(|arg| arg.contains('\0')) {
                return Err(("cmd", "must not contain NUL characters".into()));
            }
        }
    }
    Ok(())
}

fn check_array(array: Option<u32>, limits: &WaveLimits) -> Result<(), String> {
    match array {
        Some(0) => Err("must be at least 1".into()),
        Some(n) if n > limits.max_array => {
            Err(format!("is {n}, above the limit of {}", limits.max_array))
        }
        _ => Ok(()),
    }
}

fn check_timeout_ms(timeout_ms: u64) -> Result<(), String> {
    if timeout_ms > MAX_TIMEOUT_MS {
        return Err(format!(
            "is {timeout_ms} ms, above the limit of {MAX_TIMEOUT_MS} ms (366 days)"
        ));
    }
    Ok(())
}

fn check_retries(retries: u32) -> Result<(), String> {
    if retries > MAX_RETRIES {
        return Err(format!("is {retries}, above the limit of {MAX_RETRIES}"));
    }
    Ok(())
}

fn check_cpus(cpus: u32) -> Result<(), String> {
    if cpus == 0 {
        return Err("must be at least 1".into());
    }
    if cpus > MAX_CPUS {
        return Err(format!("is {cpus}, above the limit of {MAX_CPUS}"));
    }
    Ok(())
}

fn check_memory_bytes(memory_bytes: u64) -> Result<(), String> {
    if memory_bytes > MAX_MEMORY_BYTES {
        return Err(format!("is {memory_bytes} bytes, above the limit of 1 PiB"));
    }
    Ok(())
}

fn check_gpus(gpus: u32) -> Result<(), String> {
    if gpus > MAX_GPUS {
        return Err(format!("is {gpus}, above the limit of {MAX_GPUS}"));
    }
    Ok(())
}

fn check_env(env: &BTreeMap<String, String>) -> Result<(), String> {
    for (name, value) in env {
        let mut chars = name.chars();
        let valid_start = chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
        if !valid_start || !chars.all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!(
                "{name:?} is not a valid environment variable name \
                 (letters, digits and `_`, not starting with a digit)"
            ));
        }
        if RESERVED_ENV_NAMES.contains(&name.as_str()) {
            return Err(format!(
                "`{name}` is set by Venom itself and cannot be overridden"
            ));
        }
        if value.contains('\0') {
            return Err(format!(
                "the value of `{name}` must not contain NUL characters"
            ));
        }
    }
    Ok(())
}

fn check_labels(labels: &BTreeMap<String, String>) -> Result<(), String> {
    for (key, value) in labels {
        let valid_key = !key.is_empty()
            && key
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-' | '/'));
        if !valid_key {
            return Err(format!(
                "label {key:?} may only contain letters, digits, `_`, `.`, `-` and `/`"
            ));
        }
        if value
            .chars()
            .any(|c| c.is_control() || c.is_whitespace() || matches!(c, ',' | '='))
        {
            return Err(format!(
                "the value of `{key}` must not contain whitespace, `,` or `=`"
            ));
        }
    }
    Ok(())
}

/// Parses a duration into milliseconds: `"250ms"`, `"30s"`, `"10m"`, `"1h30m"`, `"2d"`,
/// fractions such as `"1.5h"`, or a bare number of seconds (`"90"`, `"0"`). `"0"` and `"none"`
/// mean no timeout (0). Fractions of a millisecond are dropped.
pub fn parse_duration_ms(s: &str) -> Result<u64, String> {
    let text = s.trim();
    let invalid = || {
        format!(
            "{s:?} is not a duration; write e.g. \"30s\", \"10m\", \"1h30m\", \"250ms\" \
             or whole seconds"
        )
    };
    if text.is_empty() {
        return Err(invalid());
    }
    if text == "none" {
        return Ok(0);
    }
    if text.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return scaled(text, 1_000).ok_or_else(invalid);
    }
    let mut total_ms: u64 = 0;
    let mut rest = text;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (number, after) = rest.split_at(number_len);
        let unit_len = after
            .find(|c: char| !c.is_ascii_alphabetic())
            .unwrap_or(after.len());
        let (unit, after) = after.split_at(unit_len);
        let unit_ms = match unit {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => return Err(invalid()),
        };
        let part_ms = scaled(number, unit_ms).ok_or_else(invalid)?;
        total_ms = total_ms
            .checked_add(part_ms)
            .ok_or_else(|| format!("{s:?} is too long"))?;
        rest = after;
    }
    Ok(total_ms)
}

/// Parses a memory size into bytes: a whole number of bytes (`"1048576"`), or a number with a
/// unit, binary (`KiB`, `MiB`, `GiB`, `TiB`, `PiB`) or decimal (`B`, `KB`, `MB`, `GB`, `TB`,
/// `PB`), case-insensitive, optionally with one space before the unit and a fraction
/// (`"1.5GiB"`). At most 1 PiB.
pub fn parse_memory_bytes(s: &str) -> Result<u64, String> {
    let text = s.trim();
    let invalid = || {
        format!("{s:?} is not a memory size; write e.g. \"256MiB\", \"1GiB\", \"512MB\" or bytes")
    };
    let number_len = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(number_len);
    let unit = unit.strip_prefix(' ').unwrap_or(unit);
    let unit_bytes: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        "pb" => 1_000_000_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        "pib" => 1 << 50,
        _ => return Err(invalid()),
    };
    let bytes = scaled(number, unit_bytes).ok_or_else(invalid)?;
    check_memory_bytes(bytes).map_err(|m| format!("{s:?} {m}"))?;
    Ok(bytes)
}

/// `number × unit` for a decimal `number` ("12", "1.5", ".5"), truncated; `None` if malformed or
/// too large for u64.
fn scaled(number: &str, unit: u64) -> Option<u64> {
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() && fraction.is_empty() {
        return None;
    }
    let all_digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if !all_digits(whole) || !all_digits(fraction) {
        return None;
    }
    let whole_value: u128 = if whole.is_empty() {
        0
    } else {
        whole.parse().ok()?
    };
    // Digits past the 18th cannot change a result that is at most u64::MAX units of 1.
    let fraction = &fraction[..fraction.len().min(18)];
    let fraction_value: u128 = if fraction.is_empty() {
        0
    } else {
        fraction.parse().ok()?
    };
    let denominator = 10u128.pow(u32::try_from(fraction.len()).ok()?);
    let total = whole_value
        .checked_mul(u128::from(unit))?
        .checked_add(fraction_value * u128::from(unit) / denominator)?;
    u64::try_from(total).ok()
}

impl WaveSpec {
    /// Total micro-tasks in the wave.
    pub fn n_micro_tasks(&self) -> u64 {
        self.tasks
            .iter()
            .map(|task| u64::from(task.n_micro_tasks()))
            .sum()
    }

    /// Re-checks an already-built spec (one decoded from the raft log, say): every field within
    /// its limits, ids unique, dependencies in range and acyclic, counts within `limits`.
    pub fn validate(&self, limits: &WaveLimits) -> Result<(), WaveError> {
        check_name(&self.name).map_err(|m| WaveError::wave("name", m))?;
        check_n_tasks(self.tasks.len(), limits).map_err(|m| WaveError::wave("task", m))?;
        let mut index_of: HashMap<&str, usize> = HashMap::with_capacity(self.tasks.len());
        for (index, task) in self.tasks.iter().enumerate() {
            let label = format!("#{}", index + 1);
            check_id(&task.id).map_err(|m| WaveError::at(Some(&label), "id", m))?;
            let at = |field: &str, message: String| WaveError::at(Some(&task.id), field, message);
            if let Some(first) = index_of.insert(task.id.as_str(), index) {
                return Err(at(
                    "id",
                    format!("duplicate id: task #{} already uses it", first + 1),
                ));
            }
            check_command(&task.command).map_err(|(field, m)| at(field, m))?;
            check_array(task.array, limits).map_err(|m| at("array", m))?;
            check_timeout_ms(task.timeout_ms).map_err(|m| at("timeout", m))?;
            check_retries(task.retries).map_err(|m| at("retries", m))?;
            check_cpus(task.cpus).map_err(|m| at("cpus", m))?;
            check_memory_bytes(task.memory_bytes).map_err(|m| at("memory", m))?;
            check_gpus(task.gpus).map_err(|m| at("gpus", m))?;
            check_env(&task.env).map_err(|m| at("env", m))?;
            check_labels(&task.labels).map_err(|m| at("labels", m))?;
            for (position, &dep) in task.deps.iter().enumerate() {
                if dep >= self.tasks.len() {
                    return Err(at(
                        "deps",
                        format!("dependency index {dep} is out of range"),
                    ));
                }
                if dep == index {
                    return Err(at("deps", "a task cannot depend on itself".into()));
                }
                if task.deps[..position].contains(&dep) {
                    return Err(at(
                        "deps",
                        format!("`{}` is listed twice", self.tasks[dep].id),
                    ));
                }
            }
        }
        let n_micro_tasks = self.n_micro_tasks();
        if n_micro_tasks > limits.max_micro_tasks {
            let largest = self
                .tasks
                .iter()
                .rev() // the first of equals in file order
                .max_by_key(|task| task.n_micro_tasks())
                .map_or(String::new(), |task| {
                    format!(" (largest: `{}` with {})", task.id, task.n_micro_tasks())
                });
            return Err(WaveError::wave(
                "task",
                format!(
                    "the wave has {n_micro_tasks} micro-tasks in total, above the limit of {}{largest}",
                    limits.max_micro_tasks
                ),
            ));
        }
        if let Some(cycle) = self.find_cycle() {
            let path: Vec<&str> = cycle.iter().map(|&i| self.tasks[i].id.as_str()).collect();
            return Err(WaveError::at(
                path.first().copied(),
                "deps",
                format!(
                    "dependency cycle: {} (each task depends on the next)",
                    path.join(" -> ")
                ),
            ));
        }
        Ok(())
    }

    /// A dependency cycle as task indices, first task repeated at the end (`a -> b -> a`),
    /// rotated to start at the task that comes first in the file; `None` if acyclic.
    /// Iterative depth-first search, so a 10,000-task chain cannot overflow the stack.
    fn find_cycle(&self) -> Option<Vec<usize>> {
        #[derive(Clone, Copy, PartialEq)]
        enum Visit {
            New,
            OnPath,
            Done,
        }
        let n_tasks = self.tasks.len();
        let mut visit = vec![Visit::New; n_tasks];
        // The current path: (task, how many of its deps were already followed).
        let mut path: Vec<(usize, usize)> = Vec::new();
        for root in 0..n_tasks {
            if visit[root] != Visit::New {
                continue;
            }
            visit[root] = Visit::OnPath;
            path.push((root, 0));
            while let Some(top) = path.last_mut() {
                let (task, next_dep) = *top;
                let Some(&dep) = self.tasks[task].deps.get(next_dep) else {
                    visit[task] = Visit::Done;
                    path.pop();
                    continue;
                };
                top.1 += 1;
                if dep >= n_tasks {
                    continue;
                }
                match visit[dep] {
                    Visit::Done => {}
                    Visit::New => {
                        visit[dep] = Visit::OnPath;
                        path.push((dep, 0));
                    }
                    Visit::OnPath => {
                        let start = path.iter().position(|&(t, _)| t == dep)?;
                        let mut cycle: Vec<usize> = path[start..].iter().map(|&(t, _)| t).collect();
                        let first = cycle
                            .iter()
                            .enumerate()
                            .min_by_key(|&(_, &t)| t)
                            .map_or(0, |(position, _)| position);
                        cycle.rotate_left(first);
                        cycle.push(cycle[0]);
                        return Some(cycle);
                    }
                }
            }
        }
        None
    }

    /// Task indices with every task after all its dependencies; among tasks whose dependencies
    /// are done, file order first. Tasks on a cycle (which `validate` rejects) are left out.
    pub fn topological_order(&self) -> Vec<usize> {
        let n_tasks = self.tasks.len();
        let mut n_pending_deps = vec![0usize; n_tasks];
        let mut dependents: Vec<Vec<usize>> = vec![Vec::new(); n_tasks];
        for (index, task) in self.tasks.iter().enumerate() {
            for &dep in task.deps.iter().filter(|&&dep| dep < n_tasks) {
                n_pending_deps[index] += 1;
                dependents[dep].push(index);
            }
        }
        let mut ready: BinaryHeap<Reverse<usize>> = (0..n_tasks)
            .filter(|&i| n_pending_deps[i] == 0)
            .map(Reverse)
            .collect();
        let mut order = Vec::with_capacity(n_tasks);
        while let Some(Reverse(index)) = ready.pop() {
            order.push(index);
            for &dependent in &dependents[index] {
                n_pending_deps[dependent] -= 1;
                if n_pending_deps[dependent] == 0 {
                    ready.push(Reverse(dependent));
                }
            }
        }
        order
    }

    /// The work–span bound of the DAG: `(total work, span)` in milliseconds.
    ///
    /// `group_work_ms[i]` is the work of task `i` (the sum of its micro-tasks' run times) and
    /// `group_longest_ms[i]` its longest micro-task: the micro-tasks of one task can at best
    /// run side by side, so a task adds its longest micro-task to any path through it. The span
    /// is the heaviest dependency path by that weight; `work / span` bounds the speed-up any
    /// number of nodes could reach. Missing entries count as 0; sums saturate.
    pub fn work_and_span(&self, group_work_ms: &[u64], group_longest_ms: &[u64]) -> (u64, u64) {
        let work_ms = (0..self.tasks.len())
            .map(|index| group_work_ms.get(index).copied().unwrap_or(0))
            .fold(0u64, u64::saturating_add);
        let mut finish_ms = vec![0u64; self.tasks.len()];
        let mut span_ms = 0;
        for index in self.topological_order() {
            let ready_ms = self.tasks[index]
                .deps
                .iter()
                .filter_map(|&dep| finish_ms.get(dep).copied())
                .max()
                .unwrap_or(0);
            let longest_ms = group_longest_ms.get(index).copied().unwrap_or(0);
            finish_ms[index] = ready_ms.saturating_add(longest_ms);
            span_ms = span_ms.max(finish_ms[index]);
        }
        (work_ms, span_ms)
    }

    /// The DAG in Graphviz DOT: one box per task (labelled `id [N]` for an array of N), an edge
    /// from each dependency to its dependent.
    pub fn to_dot(&self) -> String {
        let mut dot = format!("digraph \"{}\" {{\n", dot_escape(&self.name));
        dot.push_str("  rankdir=LR;\n  node [shape=box];\n");
        for task in &self.tasks {
            let label = match task.array {
                Some(n) => format!("{} [{n}]", task.id),
                None => task.id.clone(),
            };
            dot.push_str(&format!(
                "  \"{}\" [label=\"{}\"];\n",
                dot_escape(&task.id),
                dot_escape(&label)
            ));
        }
        for task in &self.tasks {
            for dep in task.deps.iter().filter_map(|&dep| self.tasks.get(dep)) {
                dot.push_str(&format!(
                    "  \"{}\" -> \"{}\";\n",
                    dot_escape(&dep.id),
                    dot_escape(&task.id)
                ));
            }
        }
        dot.push_str("}\n");
        dot
    }
}

fn dot_escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '"' => escaped.push_str("\\\""),
            '\\' => escaped.push_str("\\\\"),
            '\n' => escaped.push_str("\\n"),
            c if c.is_control() => {}
            c => escaped.push(c),
        }
    }
    escaped
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<WaveSpec, WaveError> {
        parse_wave(text.as_bytes(), Format::Auto, &WaveLimits::default())
    }

    fn parse_ok(text: &str) -> WaveSpec {
        match parse(text) {
            Ok(spec) => spec,
            Err(e) => panic!("expected a valid wave, got: {e}\n{text}"),
        }
    }

    /// One task with `fields` added to a minimal valid task.
    fn one_task(fields: &str) -> TaskSpec {
        let spec = parse_ok(&format!("name = \"w\"\n[[task]]\nid = \"t\"\n{fields}\n"));
        spec.tasks.into_iter().next().expect("one task")
    }

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    const DESIGN_EXAMPLE: &str = r#"
name = "nightly-etl"
on_failure = "skip-dependents"   # or "fail-wave"

[defaults]
timeout = "10m"
retries = 2
cpus = 1
memory = "256MiB"
env = { RUST_LOG = "info" }

[[task]]
id = "prepare"
run = "mkdir -p /tmp/etl && echo ready"

[[task]]
id = "shard"
array = 100
deps = ["prepare"]
cmd = ["python3", "process.py", "--all"]

[[task]]
id = "merge"
deps = ["shard"]
run = "cat /tmp/etl/*.out > /tmp/etl/result"
gpus = 0
labels = { arch = "x86_64" }
"#;

    #[test]
    fn the_design_example_parses_with_defaults_applied() {
        let spec = parse_ok(DESIGN_EXAMPLE);
        assert_eq!(spec.name, "nightly-etl");
        assert_eq!(spec.on_failure, OnFailure::SkipDependents);
        let ids: Vec<&str> = spec.tasks.iter().map(|t| t.id.as_str()).collect();
        assert_eq!(ids, ["prepare", "shard", "merge"]);
        let [prepare, shard, merge] = &spec.tasks[..] else {
            panic!("three tasks")
        };
        assert_eq!(
            prepare.command,
            CommandSpec::Shell("mkdir -p /tmp/etl && echo ready".into())
        );
        assert_eq!(prepare.array, None);
        assert!(prepare.deps.is_empty());
        assert_eq!(
            shard.command,
            CommandSpec::Argv(vec!["python3".into(), "process.py".into(), "--all".into()])
        );
        assert_eq!(shard.array, Some(100));
        assert_eq!(shard.deps, [0]);
        assert_eq!(merge.deps, [1]);
        for task in &spec.tasks {
            assert_eq!(task.timeout_ms, 600_000, "{}", task.id);
            assert_eq!(task.retries, 2);
            assert_eq!(task.cpus, 1);
            assert_eq!(task.memory_bytes, 256 << 20);
            assert_eq!(task.gpus, 0);
            assert_eq!(task.env, map(&[("RUST_LOG", "info")]));
        }
        assert_eq!(merge.labels, map(&[("arch", "x86_64")]));
        assert!(prepare.labels.is_empty());
        assert_eq!(spec.n_micro_tasks(), 102);
    }

    #[test]
    fn built_in_defaults_apply_without_a_defaults_table() {
        let task = one_task("run = \"true\"");
        assert_eq!(task.command, CommandSpec::Shell("true".into()));
        assert_eq!(task.array, None);
        assert_eq!(task.n_micro_tasks(), 1);
        assert!(task.deps.is_empty());
        assert_eq!(task.timeout_ms, 0);
        assert_eq!(task.retries, 0);
        assert_eq!(task.cpus, 1);
        assert_eq!(task.memory_bytes, 0);
        assert_eq!(task.gpus, 0);
        assert!(task.env.is_empty());
        assert!(task.labels.is_empty());
        let spec = parse_ok("name = \"w\"\n[[task]]\nid = \"t\"\nrun = \"true\"\n");
        assert_eq!(spec.on_failure, OnFailure::SkipDependents);
    }

    #[test]
    fn on_failure_reads_both_values() {
        for (text, expected) in [
            ("skip-dependents", OnFailure::SkipDependents),
            ("fail-wave", OnFailure::FailWave),
        ] {
            let spec = parse_ok(&format!(
                "name = \"w\"\non_failure = \"{text}\"\n[[task]]\nid = \"t\"\nrun = \"x\"\n"
            ));
            assert_eq!(spec.on_failure, expected);
            assert_eq!(expected.as_str(), text);
        }
    }

    #[test]
    fn each_task_field_is_read() {
        let base = "run = \"true\"\n";
        assert_eq!(one_task(&format!("{base}array = 7")).array, Some(7));
        assert_eq!(one_task(&format!("{base}array = 7")).n_micro_tasks(), 7);
        assert_eq!(one_task(&format!("{base}array = 1")).array, Some(1));
        assert_eq!(
            one_task(&format!("{base}timeout = \"1h30m\"")).timeout_ms,
            5_400_000
        );
        assert_eq!(one_task(&format!("{base}timeout = 45")).timeout_ms, 45_000);
        assert_eq!(one_task(&format!("{base}timeout = \"0\"")).timeout_ms, 0);
        assert_eq!(one_task(&format!("{base}timeout = 0")).timeout_ms, 0);
        assert_eq!(one_task(&format!("{base}retries = 100")).retries, 100);
        assert_eq!(one_task(&format!("{base}cpus = 1024")).cpus, 1024);
        assert_eq!(
            one_task(&format!("{base}memory = \"1GiB\"")).memory_bytes,
            1 << 30
        );
        assert_eq!(one_task(&format!("{base}memory = 4096")).memory_bytes, 4096);
        assert_eq!(
            one_task(&format!("{base}memory = \"1PiB\"")).memory_bytes,
            1 << 50
        );
        assert_eq!(one_task(&format!("{base}gpus = 2")).gpus, 2);
        assert_eq!(
            one_task(&format!("{base}env = {{ A_1 = \"x\", _b = \"\" }}")).env,
            map(&[("A_1", "x"), ("_b", "")])
        );
        assert_eq!(
            one_task(&format!(
                "{base}labels = {{ arch = \"arm64\", \"zone.io/rack\" = \"r1\" }}"
            ))
            .labels,
            map(&[("arch", "arm64"), ("zone.io/rack", "r1")])
        );
        assert_eq!(
            one_task("cmd = [\"echo\", \"a b\", \"\"]").command,
            CommandSpec::Argv(vec!["echo".into(), "a b".into(), String::new()])
        );
        let id = "A-z_0.9";
        let spec = parse_ok(&format!(
            "name = \"w\"\n[[task]]\nid = \"{id}\"\nrun = \"x\""
        ));
        assert_eq!(spec.tasks[0].id, id);
    }

    #[test]
    fn a_task_value_overrides_its_default_and_maps_merge() {
        let spec = parse_ok(
            r#"
name = "w"
[defaults]
timeout = "10m"
retries = 3
cpus = 2
memory = "1GiB"
gpus = 1
env = { A = "default", B = "default" }
labels = { arch = "x86_64", zone = "a" }

[[task]]
id = "own"
run = "true"
timeout = "30s"
retries = 0
cpus = 4
memory = "512MB"
gpus = 0
env = { B = "task", C = "task" }
labels = { zone = "b" }

[[task]]
id = "inherits"
run = "true"
"#,
        );
        let own = &spec.tasks[0];
        assert_eq!(own.timeout_ms, 30_000);
        assert_eq!(own.retries, 0);
        assert_eq!(own.cpus, 4);
        assert_eq!(own.memory_bytes, 512_000_000);
        assert_eq!(own.gpus, 0);
        assert_eq!(
            own.env,
            map(&[("A", "default"), ("B", "task"), ("C", "task")])
        );
        assert_eq!(own.labels, map(&[("arch", "x86_64"), ("zone", "b")]));
        let inherits = &spec.tasks[1];
        assert_eq!(inherits.timeout_ms, 600_000);
        assert_eq!(inherits.retries, 3);
        assert_eq!(inherits.cpus, 2);
        assert_eq!(inherits.memory_bytes, 1 << 30);
        assert_eq!(inherits.gpus, 1);
        assert_eq!(inherits.env, map(&[("A", "default"), ("B", "default")]));
        assert_eq!(inherits.labels, map(&[("arch", "x86_64"), ("zone", "a")]));
    }

    #[test]
    fn deps_become_indices_in_the_order_written() {
        let spec = parse_ok(
            r#"
name = "w"
[[task]]
id = "late"
run = "x"
deps = ["b", "a"]
[[task]]
id = "a"
run = "x"
[[task]]
id = "b"
run = "x"
"#,
        );
        assert_eq!(spec.tasks[0].deps, [2, 1]);
        assert_eq!(spec.topological_order(), [1, 2, 0]);
    }

    #[test]
    fn the_json_form_gives_the_same_spec_as_the_toml_form() {
        let json = r#"
  {
    "name": "nightly-etl",
    "on_failure": "skip-dependents",
    "defaults": { "timeout": "10m", "retries": 2, "cpus": 1, "memory": "256MiB",
                  "env": { "RUST_LOG": "info" } },
    "task": [
      { "id": "prepare", "run": "mkdir -p /tmp/etl && echo ready" },
      { "id": "shard", "array": 100, "deps": ["prepare"],
        "cmd": ["python3", "process.py", "--all"] },
      { "id": "merge", "deps": ["shard"], "run": "cat /tmp/etl/*.out > /tmp/etl/result",
        "gpus": 0, "labels": { "arch": "x86_64" } }
    ]
  }"#;
        let from_toml = parse_ok(DESIGN_EXAMPLE);
        let limits = WaveLimits::default();
        let from_json = parse_wave(json.as_bytes(), Format::Json, &limits).expect("valid JSON");
        assert_eq!(from_json, from_toml);
        assert_eq!(
            parse_ok(json),
            from_toml,
            "Auto detects JSON by its leading `{{`"
        );
        let err = parse_wave(DESIGN_EXAMPLE.as_bytes(), Format::Json, &limits)
            .expect_err("TOML is not JSON");
        assert_eq!(err.field, WaveError::FILE);
        assert!(
            err.message.starts_with("JSON syntax error at line "),
            "{err}"
        );
        let err = parse_wave(json.as_bytes(), Format::Toml, &limits).expect_err("JSON is not TOML");
        assert!(
            err.message.starts_with("TOML syntax error at line "),
            "{err}"
        );
        let err = parse_wave(b"[1, 2]", Format::Json, &limits).expect_err("not an object");
        assert_eq!((err.task, err.field.as_str()), (None, WaveError::FILE));
        assert!(
            err.message.starts_with("must be a table"),
            "{}",
            err.message
        );
    }

    #[test]
    fn a_spec_survives_a_serde_round_trip() {
        let spec = parse_ok(DESIGN_EXAMPLE);
        let encoded = serde_json::to_string(&spec).expect("serializable");
        assert!(
            encoded.contains("\"on_failure\":\"skip-dependents\""),
            "{encoded}"
        );
        let decoded: WaveSpec = serde_json::from_str(&encoded).expect("decodable");
        assert_eq!(decoded, spec);
        assert_eq!(decoded.validate(&WaveLimits::default()), Ok(()));
    }

    /// (what, input, expected task, expected field, text the message must contain)
    type BadCase = (
        &'static str,
        Vec<u8>,
        Option<&'static str>,
        &'static str,
        &'static str,
    );

    fn task_file(fields: &str) -> Vec<u8> {
        format!("name = \"w\"\n[[task]]\nid = \"t\"\n{fields}\n").into_bytes()
    }

    fn bad_cases() -> Vec<BadCase> {
        let t = Some("t");
        vec![
            (
                "cycle",
                b"name = \"w\"\n[[task]]\nid = \"x\"\nrun = \"1\"\n\
                  [[task]]\nid = \"a\"\nrun = \"1\"\ndeps = [\"b\"]\n\
                  [[task]]\nid = \"b\"\nrun = \"1\"\ndeps = [\"c\", \"x\"]\n\
                  [[task]]\nid = \"c\"\nrun = \"1\"\ndeps = [\"a\"]\n"
                    .to_vec(),
                Some("a"),
                "deps",
                "dependency cycle: a -> b -> c -> a",
            ),
            (
                "cycle found from outside it",
                b"name = \"w\"\n[[task]]\nid = \"in\"\nrun = \"1\"\ndeps = [\"q\"]\n\
                  [[task]]\nid = \"p\"\nrun = \"1\"\ndeps = [\"q\"]\n\
                  [[task]]\nid = \"q\"\nrun = \"1\"\ndeps = [\"p\"]\n"
                    .to_vec(),
                Some("p"),
                "deps",
                "p -> q -> p",
            ),
            (
                "self-dependency",
                task_file("run = \"1\"\ndeps = [\"t\"]"),
                t,
                "deps",
                "itself",
            ),
            (
                "unknown dependency",
                task_file("run = \"1\"\ndeps = [\"nope\"]"),
                t,
                "deps",
                "unknown task `nope`",
            ),
            (
                "dependency listed twice",
                b"name = \"w\"\n[[task]]\nid = \"a\"\nrun = \"1\"\n\
                  [[task]]\nid = \"b\"\nrun = \"1\"\ndeps = [\"a\", \"a\"]\n"
                    .to_vec(),
                Some("b"),
                "deps",
                "listed twice",
            ),
            (
                "duplicate id",
                b"name = \"w\"\n[[task]]\nid = \"a\"\nrun = \"1\"\n\
                  [[task]]\nid = \"a\"\nrun = \"2\"\n"
                    .to_vec(),
                Some("a"),
                "id",
                "task #1 already uses it",
            ),
            ("run and cmd", task_file("run = \"1\"\ncmd = [\"1\"]"), t, "run", "not both"),
            ("neither run nor cmd", task_file("retries = 1"), t, "run", "needs `run`"),
            ("empty run", task_file("run = \"\""), t, "run", "must not be empty"),
            ("whitespace run", task_file("run = \" \\n\\t \""), t, "run", "must not be empty"),
            ("empty cmd", task_file("cmd = []"), t, "cmd", "at least the program"),
            ("empty program", task_file("cmd = [\" \", \"x\"]"), t, "cmd", "program"),
            ("array 0", task_file("run = \"1\"\narray = 0"), t, "array", "must be at least 1"),
            (
                "array above the cap",
                task_file("run = \"1\"\narray = 100001"),
                t,
                "array",
                "above the limit of 100000",
            ),
            ("negative array", task_file("run = \"1\"\narray = -1"), t, "array", "integer"),
            (
                "bad duration",
                task_file("run = \"1\"\ntimeout = \"10x\""),
                t,
                "timeout",
                "not a duration",
            ),
            (
                "negative timeout",
                task_file("run = \"1\"\ntimeout = -5"),
                t,
                "timeout",
                "non-negative",
            ),
            (
                "timeout above the cap",
                task_file("run = \"1\"\ntimeout = \"400d\""),
                t,
                "timeout",
                "above the limit",
            ),
            (
                "bad memory",
                task_file("run = \"1\"\nmemory = \"12 parsecs\""),
                t,
                "memory",
                "not a memory size",
            ),
            (
                "memory above 1 PiB",
                task_file("run = \"1\"\nmemory = \"2PiB\""),
                t,
                "memory",
                "1 PiB",
            ),
            ("retries above 100", task_file("run = \"1\"\nretries = 101"), t, "retries", "100"),
            ("cpus 0", task_file("run = \"1\"\ncpus = 0"), t, "cpus", "at least 1"),
            ("cpus above 1024", task_file("run = \"1\"\ncpus = 1025"), t, "cpus", "1024"),
            ("gpus above 1024", task_file("run = \"1\"\ngpus = 5000"), t, "gpus", "1024"),
            (
                "wrong type",
                task_file("run = \"1\"\nretries = \"x\""),
                t,
                "retries",
                "invalid type: string \"x\"",
            ),
            (
                "wrong type of env value",
                task_file("run = \"1\"\nenv = { A = 5 }"),
                t,
                "env",
                "`A` must be a string",
            ),
            (
                "invalid env name",
                task_file("run = \"1\"\nenv = { \"1BAD\" = \"x\" }"),
                t,
                "env",
                "not a valid environment variable name",
            ),
            (
                "env name with a dash",
                task_file("run = \"1\"\nenv = { \"A-B\" = \"x\" }"),
                t,
                "env",
                "not a valid environment variable name",
            ),
            (
                "reserved env name",
                task_file("run = \"1\"\nenv = { VENOM_ATTEMPT = \"9\" }"),
                t,
                "env",
                "set by Venom",
            ),
            (
                "label with a comma",
                task_file("run = \"1\"\nlabels = { arch = \"a,b\" }"),
                t,
                "labels",
                "must not contain",
            ),
            (
                "unknown task field",
                task_file("run = \"1\"\ndepends = [\"a\"]"),
                t,
                "depends",
                "unknown field",
            ),
            (
                "unknown top-level field",
                b"name = \"w\"\npriority = 1\n[[task]]\nid = \"t\"\nrun = \"1\"\n".to_vec(),
                None,
                "priority",
                "unknown field",
            ),
            (
                "unknown defaults field",
                b"name = \"w\"\n[defaults]\ncpu = 2\n[[task]]\nid = \"t\"\nrun = \"1\"\n".to_vec(),
                None,
                "defaults.cpu",
                "unknown field",
            ),
            (
                "bad default duration",
                b"name = \"w\"\n[defaults]\ntimeout = \"soon\"\n[[task]]\nid = \"t\"\nrun = \"1\"\n"
                    .to_vec(),
                None,
                "defaults.timeout",
                "not a duration",
            ),
            (
                "bad on_failure",
                b"name = \"w\"\non_failure = \"ignore\"\n[[task]]\nid = \"t\"\nrun = \"1\"\n"
                    .to_vec(),
                None,
                "on_failure",
                "\"ignore\"",
            ),
            (
                "missing name",
                b"[[task]]\nid = \"t\"\nrun = \"1\"\n".to_vec(),
                None,
                "name",
                "is required",
            ),
            (
                "blank name",
                b"name = \"  \"\n[[task]]\nid = \"t\"\nrun = \"1\"\n".to_vec(),
                None,
                "name",
                "must not be empty",
            ),
            (
                "name too long",
                format!("name = \"{}\"\n[[task]]\nid = \"t\"\nrun = \"1\"\n", "n".repeat(129))
                    .into_bytes(),
                None,
                "name",
                "129 characters",
            ),
            (
                "missing id",
                b"name = \"w\"\n[[task]]\nid = \"a\"\nrun = \"1\"\n[[task]]\nrun = \"1\"\n".to_vec(),
                Some("#2"),
                "id",
                "is required",
            ),
            (
                "bad id",
                b"name = \"w\"\n[[task]]\nid = \"a b\"\nrun = \"1\"\n".to_vec(),
                Some("#1"),
                "id",
                "may only contain",
            ),
            (
                "id too long",
                format!("name = \"w\"\n[[task]]\nid = \"{}\"\nrun = \"1\"\n", "i".repeat(129))
                    .into_bytes(),
                Some("#1"),
                "id",
                "129 characters",
            ),
            ("no tasks", b"name = \"w\"\n".to_vec(), None, "task", "at least one"),
            (
                "task is not an array",
                b"name = \"w\"\ntask = 5\n".to_vec(),
                None,
                "task",
                "array of tables",
            ),
            (
                "total micro-tasks above the cap",
                b"name = \"w\"\n[[task]]\nid = \"l\"\narray = 60000\nrun = \"1\"\n\
                  [[task]]\nid = \"r\"\narray = 60000\nrun = \"1\"\n"
                    .to_vec(),
                None,
                "task",
                "120000 micro-tasks in total, above the limit of 100000",
            ),
            (
                "non-UTF-8 bytes",
                b"name = \"caf\xe9\"\n[[task]]\nid = \"t\"\nrun = \"1\"\n".to_vec(),
                None,
                WaveError::FILE,
                "not valid UTF-8 (line 1, column 12)",
            ),
            ("empty file", Vec::new(), None, WaveError::FILE, "is empty"),
            ("whitespace-only file", b" \n\t\n".to_vec(), None, WaveError::FILE, "is empty"),
            (
                "10 MB file",
                vec![b'#'; 10_000_000],
                None,
                WaveError::FILE,
                "10000000 bytes, above the limit of 1048576 bytes",
            ),
            (
                "TOML syntax error",
                b"name = \"w\"\n\n[[task]]\nid = \"a\nrun = \"1\"\n".to_vec(),
                None,
                WaveError::FILE,
                "TOML syntax error at line 4, column 8: invalid basic string",
            ),
            (
                "JSON syntax error",
                b"{\n  \"name\": \"w\",\n  \"task\": [ }\n".to_vec(),
                None,
                WaveError::FILE,
                "JSON syntax error at line 3",
            ),
            (
                "JSON unknown task field",
                br#"{"name": "w", "task": [{"id": "j", "run": "1", "arrays": 2}]}"#.to_vec(),
                Some("j"),
                "arrays",
                "unknown field",
            ),
        ]
    }

    #[test]
    fn malformed_waves_name_the_task_and_the_field() {
        let cases = bad_cases();
        assert!(cases.len() >= 18);
        for (what, input, task, field, contains) in cases {
            let err = match parse_wave(&input, Format::Auto, &WaveLimits::default()) {
                Ok(spec) => panic!("{what}: accepted as {spec:?}"),
                Err(err) => err,
            };
            assert_eq!(err.task.as_deref(), task, "{what}: task of `{err}`");
            assert_eq!(err.field, field, "{what}: field of `{err}`");
            assert!(
                err.message.contains(contains),
                "{what}: `{err}` should contain {contains:?}"
            );
            assert!(
                !err.to_string().contains('\n'),
                "{what}: one line, not `{err}`"
            );
        }
    }

    #[test]
    fn the_bad_wave_fixtures_fail_as_expected_tsv_says() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/bad-waves");
        let table = std::fs::read_to_string(dir.join("expected.tsv")).expect("expected.tsv");
        let mut lines = table.lines();
        assert_eq!(lines.next(), Some("file\ttask\tfield"));
        let mut listed = Vec::new();
        for line in lines {
            let columns: Vec<&str> = line.split('\t').collect();
            let [file, task, field] = columns[..] else {
                panic!("malformed row {line:?}")
            };
            let bytes = std::fs::read(dir.join(file)).expect(file);
            let err = match parse_wave(&bytes, Format::Auto, &WaveLimits::default()) {
                Ok(_) => panic!("{file} was accepted"),
                Err(err) => err,
            };
            let expected_task = (task != "-").then_some(task);
            assert_eq!(err.task.as_deref(), expected_task, "{file}: `{err}`");
            assert_eq!(err.field, field, "{file}: `{err}`");
            listed.push(file.to_owned());
        }
        let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
            .expect("tests/bad-waves")
            .map(|entry| {
                entry
                    .expect("dir entry")
                    .file_name()
                    .to_string_lossy()
                    .into_owned()
            })
            .filter(|name| name != "README.md" && name != "expected.tsv")
            .collect();
        on_disk.sort();
        listed.sort();
        assert_eq!(on_disk, listed, "every fixture has exactly one row");
        assert!(listed.len() >= 18);
        let readme = std::fs::read_to_string(dir.join("README.md")).expect("README.md");
        for file in &listed {
            assert!(readme.contains(&format!("`{file}`")), "README lists {file}");
        }
    }

    #[test]
    fn every_example_parses() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
        let mut n_examples = 0;
        for entry in std::fs::read_dir(&dir).expect("examples/") {
            let path = entry.expect("dir entry").path();
            if path.extension().and_then(|e| e.to_str()) != Some("toml") {
                continue;
            }
            let bytes = std::fs::read(&path).expect("readable example");
            if let Err(e) = parse_wave(&bytes, Format::Toml, &WaveLimits::default()) {
                panic!("{}: {e}", path.display());
            }
            n_examples += 1;
        }
        assert!(n_examples >= 4, "found {n_examples} examples");
        let pipeline = std::fs::read(dir.join("pipeline.toml")).expect("pipeline.toml");
        let pipeline = parse_wave(&pipeline, Format::Toml, &WaveLimits::default()).expect("valid");
        assert_eq!(pipeline.n_micro_tasks(), 22);
        assert_eq!(pipeline.tasks[1].array, Some(20));
    }

    #[test]
    fn the_size_limit_is_checked_before_parsing() {
        let limits = WaveLimits {
            max_spec_bytes: 64,
            ..WaveLimits::default()
        };
        // Not even UTF-8, but too large first.
        let err = parse_wave(&[0xff; 65], Format::Auto, &limits).expect_err("too large");
        assert_eq!(err.field, WaveError::FILE);
        assert!(err.message.contains("65 bytes"), "{err}");
        let exactly = format!(
            "name = \"w\"\n[[task]]\nid = \"t\"\nrun = \"{}\"\n",
            "x".repeat(26)
        );
        assert_eq!(exactly.len(), 64);
        assert!(parse_wave(exactly.as_bytes(), Format::Auto, &limits).is_ok());
    }

    #[test]
    fn task_count_and_array_limits_are_configurable() {
        let limits = WaveLimits {
            max_spec_bytes: 1 << 20,
            max_micro_tasks: 10,
            max_array: 8,
            max_tasks: 2,
        };
        let three = "name = \"w\"\n[[task]]\nid = \"a\"\nrun = \"1\"\n[[task]]\nid = \"b\"\n\
                     run = \"1\"\n[[task]]\nid = \"c\"\nrun = \"1\"\n";
        let err = parse_wave(three.as_bytes(), Format::Toml, &limits).expect_err("3 > 2 tasks");
        assert_eq!((err.task, err.field.as_str()), (None, "task"));
        assert!(
            err.message.contains("above the limit of 2"),
            "{}",
            err.message
        );
        let err = parse_wave(&task_file("run = \"1\"\narray = 9"), Format::Toml, &limits)
            .expect_err("9 > 8");
        assert_eq!(
            (err.task.as_deref(), err.field.as_str()),
            (Some("t"), "array")
        );
        let two =
            "name = \"w\"\n[[task]]\nid = \"a\"\narray = 6\nrun = \"1\"\n[[task]]\nid = \"b\"\n\
                   array = 5\nrun = \"1\"\n";
        let err = parse_wave(two.as_bytes(), Format::Toml, &limits).expect_err("11 > 10");
        assert_eq!((err.task, err.field.as_str()), (None, "task"));
        assert!(
            err.message.contains("largest: `a` with 6"),
            "{}",
            err.message
        );
    }

    #[test]
    fn errors_display_the_task_and_the_field() {
        let err = parse(&String::from_utf8(task_file("run = \"1\"\narray = 0")).expect("utf8"))
            .expect_err("array 0");
        assert_eq!(
            err.to_string(),
            "task `t`, field `array`: must be at least 1"
        );
        let err = parse("[[task]]\nid = \"t\"\nrun = \"1\"\n").expect_err("no name");
        assert_eq!(err.to_string(), "field `name`: is required");
        let err = parse("").expect_err("empty");
        assert_eq!(err.to_string(), "wave file: is empty");
        let boxed: Box<dyn std::error::Error> = Box::new(err);
        assert!(boxed.to_string().contains("empty"));
    }

    #[test]
    fn durations_parse() {
        for (text, expected_ms) in [
            ("250ms", 250),
            ("30s", 30_000),
            ("10m", 600_000),
            ("1h", 3_600_000),
            ("1h30m", 5_400_000),
            ("2d", 172_800_000),
            ("1m30s500ms", 90_500),
            ("1.5h", 5_400_000),
            ("0.25s", 250),
            (" 45 ", 45_000),
            ("90", 90_000),
            ("0", 0),
            ("0s", 0),
            ("none", 0),
        ] {
            assert_eq!(parse_duration_ms(text), Ok(expected_ms), "{text:?}");
        }
        for text in [
            "",
            " ",
            "10x",
            "m",
            "10 m",
            "1h 30m",
            "-5s",
            "1..5s",
            ".",
            "s10",
            "10M",
            "1e3s",
            "99999999999999999999s",
        ] {
            assert!(
                parse_duration_ms(text).is_err(),
                "{text:?} should be rejected"
            );
        }
    }

    #[test]
    fn memory_sizes_parse() {
        for (text, expected_bytes) in [
            ("0", 0),
            ("1048576", 1 << 20),
            ("100KiB", 100 << 10),
            ("256MiB", 256 << 20),
            ("1GiB", 1 << 30),
            ("2TiB", 2 << 40),
            ("1PiB", 1 << 50),
            ("512MB", 512_000_000),
            ("1kb", 1_000),
            ("3GB", 3_000_000_000),
            ("1.5GiB", 3 << 29),
            ("1 GiB", 1 << 30),
            ("7B", 7),
            ("64mib", 64 << 20),
        ] {
            assert_eq!(parse_memory_bytes(text), Ok(expected_bytes), "{text:?}");
        }
        for text in [
            "",
            "lots",
            "GiB",
            "1 2GiB",
            "1  GiB",
            "-1GiB",
            "1XB",
            "2PiB",
            "1.0.0MiB",
            "99999999999999999999",
        ] {
            assert!(
                parse_memory_bytes(text).is_err(),
                "{text:?} should be rejected"
            );
        }
    }

    fn chain(n_tasks: usize) -> WaveSpec {
        let task = |index: usize| TaskSpec {
            id: format!("t{index}"),
            command: CommandSpec::Shell("true".into()),
            array: None,
            deps: if index == 0 { vec![] } else { vec![index - 1] },
            timeout_ms: 0,
            retries: 0,
            cpus: 1,
            memory_bytes: 0,
            gpus: 0,
            env: BTreeMap::new(),
            labels: BTreeMap::new(),
        };
        WaveSpec {
            name: "chain".into(),
            on_failure: OnFailure::SkipDependents,
            tasks: (0..n_tasks).map(task).collect(),
        }
    }

    #[test]
    fn validate_rechecks_a_built_spec() {
        let limits = WaveLimits::default();
        let mut spec = chain(3);
        assert_eq!(spec.validate(&limits), Ok(()));

        spec.tasks[0].deps = vec![2];
        let err = spec.validate(&limits).expect_err("cycle");
        assert_eq!(
            (err.task.as_deref(), err.field.as_str()),
            (Some("t0"), "deps")
        );
        assert!(err.message.contains("t0 -> t2 -> t1 -> t0"), "{err}");

        let mut spec = chain(3);
        spec.tasks[1].deps = vec![7];
        let err = spec.validate(&limits).expect_err("out of range");
        assert_eq!(
            (err.task.as_deref(), err.field.as_str()),
            (Some("t1"), "deps")
        );

        let mut spec = chain(3);
        spec.tasks[1].deps = vec![1];
        let err = spec.validate(&limits).expect_err("self");
        assert_eq!(
            (err.task.as_deref(), err.field.as_str()),
            (Some("t1"), "deps")
        );

        let mut spec = chain(3);
        spec.tasks[2].id = "t0".into();
        let err = spec.validate(&limits).expect_err("duplicate");
        assert_eq!(
            (err.task.as_deref(), err.field.as_str()),
            (Some("t0"), "id")
        );

        let mut spec = chain(3);
        spec.tasks[2].command = CommandSpec::Argv(vec![]);
        let err = spec.validate(&limits).expect_err("empty argv");
        assert_eq!(
            (err.task.as_deref(), err.field.as_str()),
            (Some("t2"), "cmd")
        );

        let mut spec = chain(3);
        spec.tasks[2].array = Some(0);
        let err = spec.validate(&limits).expect_err("array 0");
        assert_eq!(
            (err.task.as_deref(), err.field.as_str()),
            (Some("t2"), "array")
        );

        let mut spec = chain(3);
        spec.tasks[1].cpus = 0;
        let err = spec.validate(&limits).expect_err("cpus 0");
        assert_eq!(
            (err.task.as_deref(), err.field.as_str()),
            (Some("t1"), "cpus")
        );

        let mut spec = chain(3);
        spec.tasks.clear();
        let err = spec.validate(&limits).expect_err("no tasks");
        assert_eq!((err.task, err.field.as_str()), (None, "task"));
    }

    #[test]
    fn a_long_chain_validates_and_orders_without_recursion() {
        let spec = chain(10_000);
        assert_eq!(spec.validate(&WaveLimits::default()), Ok(()));
        let order = spec.topological_order();
        assert_eq!(order, (0..10_000).collect::<Vec<_>>());
        let mut cyclic = chain(10_000);
        cyclic.tasks[0].deps = vec![9_999];
        let err = cyclic.validate(&WaveLimits::default()).expect_err("cycle");
        assert!(err
            .message
            .starts_with("dependency cycle: t0 -> t9999 -> t9998"));
        assert!(cyclic.topological_order().is_empty());
    }

    fn diamond() -> WaveSpec {
        parse_ok(
            r#"
name = "diamond"
[[task]]
id = "merge"
deps = ["left", "right"]
run = "1"
[[task]]
id = "left"
deps = ["top"]
array = 4
run = "1"
[[task]]
id = "right"
deps = ["top"]
run = "1"
[[task]]
id = "top"
run = "1"
"#,
        )
    }

    #[test]
    fn topological_order_puts_deps_first_then_file_order() {
        let spec = diamond();
        assert_eq!(spec.topological_order(), [3, 1, 2, 0]);
    }

    #[test]
    fn work_and_span_follow_the_heaviest_path() {
        let spec = diamond();
        // merge, left (4 micro-tasks of up to 30 ms), right, top.
        let work_ms = [5, 100, 50, 10];
        let longest_ms = [5, 30, 50, 10];
        // top 10 -> right 50 -> merge 5 = 65 beats top 10 -> left 30 -> merge 5 = 45.
        assert_eq!(spec.work_and_span(&work_ms, &longest_ms), (165, 65));
        let longest_ms = [5, 80, 50, 10];
        assert_eq!(spec.work_and_span(&work_ms, &longest_ms), (165, 95));
        assert_eq!(
            spec.work_and_span(&[], &[]),
            (0, 0),
            "missing entries count as 0"
        );
        assert_eq!(
            chain(3).work_and_span(&[u64::MAX, 1, 1], &[u64::MAX, 1, 1]),
            (u64::MAX, u64::MAX),
            "sums saturate"
        );
    }

    #[test]
    fn dot_has_a_node_per_task_and_an_edge_per_dependency() {
        let mut spec = diamond();
        spec.name = "say \"hi\"".into();
        let dot = spec.to_dot();
        assert!(dot.starts_with("digraph \"say \\\"hi\\\"\" {\n"), "{dot}");
        for line in [
            "  \"left\" [label=\"left [4]\"];\n",
            "  \"right\" [label=\"right\"];\n",
            "  \"top\" -> \"left\";\n",
            "  \"top\" -> \"right\";\n",
            "  \"left\" -> \"merge\";\n",
            "  \"right\" -> \"merge\";\n",
        ] {
            assert!(dot.contains(line), "missing {line:?} in\n{dot}");
        }
        assert_eq!(dot.matches(" -> ").count(), 4);
        assert_eq!(dot.matches("[label=").count(), 4);
        assert!(dot.ends_with("}\n"));
    }
}
