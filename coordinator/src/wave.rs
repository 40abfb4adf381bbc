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
            Some(task) => write!(
                f,
                "task `{task}`, field `{}`: {}",
                self.field, self.message
            ),
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
pub fn parse_wave(bytes: &[u8], format: Format, limits: &WaveLimits) -> Result<WaveSpec, WaveError> {
    if bytes.len() > limits.max_spec_bytes {
        return Err(WaveError::file(format!(
            "is {} bytes, above the limit of {} bytes",
            bytes.len(),
            limits.max_spec_bytes
        )));
    }
    let text = std::str::from_utf8(bytes).map_err(|e| {
        let (line, column) = line_column(&bytes[..e.valid_up_to()]);
        WaveError::file(format!(
            "is not valid UTF-8 (line {line}, column {column})"
        ))
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
            e.message().trim()
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
        let message = full.rsplit_once(" at line ").map_or(full.as_str(), |(m, _)| m);
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
fn typed<T: DeserializeOwned>(value: &Value, task: Option<&str>, field: &str) -> Result<T, WaveError> {
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

    let run: Option<String> = table.get("run").map(|v| typed(v, task, "run")).transpose()?;
    let cmd: Option<Vec<String>> = table.get("cmd").map(|v| typed(v, task, "cmd")).transpose()?;
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
    let array: Option<u32> = table.get("array").map(|v| typed(v, task, "array")).transpose()?;
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
                return Err(("cmd", "the program (first element) must not be empty".into()));
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
        Some(n) if n > limits.max_array => Err(format!(
            "is {n}, above the limit of {}",
            limits.max_array
        )),
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
        return Err(format!(
            "is {memory_bytes} bytes, above the limit of 1 PiB"
        ));
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
            return Err(format!("`{name}` is set by Venom itself and cannot be overridden"));
        }
        if value.contains('\0') {
            return Err(format!("the value of `{name}` must not contain NUL characters"));
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
    let whole_value: u128 = if whole.is_empty() { 0 } else { whole.parse().ok()? };
    // Digits past the 18th cannot change a result that is at most u64::MAX units of 1.
    let fraction = &fraction[..fraction.len().min(18)];
    let fraction_value: u128 = if fraction.is_empty() { 0 } else { fraction.parse().ok()? };
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
        let work_ms = self
            .tasks
            .iter()
            .enumerate()
            .map(|(index, _)| group_work_ms.get(index).copied().unwrap_or(0))
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
