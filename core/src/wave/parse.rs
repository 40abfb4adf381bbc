//! Reading a wave file: text → generic tree (syntax errors with line and column) → fields,
//! walked key by key against the closed list of known ones → [`WaveSpec`], then validated.

use std::collections::{BTreeMap, HashMap};

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use super::check::*;
use super::spec::*;
use super::units::{parse_duration_ms, parse_memory_bytes};

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
    workdir: Option<String>,
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
        workdir: own.workdir.clone().or_else(|| defaults.workdir.clone()),
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
    if let Some(value) = table.get("workdir") {
        let workdir: String = typed(value, task, &field("workdir"))?;
        checked("workdir", check_workdir(&workdir))?;
        resources.workdir = Some(workdir);
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
