//! Field checks, shared by parsing (with the field's own name) and [`WaveSpec::validate`],
//! which re-checks a built spec as a whole.

use std::collections::{BTreeMap, HashMap};

use super::spec::*;

pub(crate) fn check_name(name: &str) -> Result<(), String> {
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

pub(crate) fn check_id(id: &str) -> Result<(), String> {
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

pub(crate) fn check_n_tasks(n_tasks: usize, limits: &WaveLimits) -> Result<(), String> {
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
pub(crate) fn check_command(command: &CommandSpec) -> Result<(), (&'static str, String)> {
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

pub(crate) fn check_array(array: Option<u32>, limits: &WaveLimits) -> Result<(), String> {
    match array {
        Some(0) => Err("must be at least 1".into()),
        Some(n) if n > limits.max_array => {
            Err(format!("is {n}, above the limit of {}", limits.max_array))
        }
        _ => Ok(()),
    }
}

pub(crate) fn check_timeout_ms(timeout_ms: u64) -> Result<(), String> {
    if timeout_ms > MAX_TIMEOUT_MS {
        return Err(format!(
            "is {timeout_ms} ms, above the limit of {MAX_TIMEOUT_MS} ms (366 days)"
        ));
    }
    Ok(())
}

pub(crate) fn check_retries(retries: u32) -> Result<(), String> {
    if retries > MAX_RETRIES {
        return Err(format!("is {retries}, above the limit of {MAX_RETRIES}"));
    }
    Ok(())
}

pub(crate) fn check_cpus(cpus: u32) -> Result<(), String> {
    if cpus == 0 {
        return Err("must be at least 1".into());
    }
    if cpus > MAX_CPUS {
        return Err(format!("is {cpus}, above the limit of {MAX_CPUS}"));
    }
    Ok(())
}

pub(crate) fn check_memory_bytes(memory_bytes: u64) -> Result<(), String> {
    if memory_bytes > MAX_MEMORY_BYTES {
        return Err(format!("is {memory_bytes} bytes, above the limit of 1 PiB"));
    }
    Ok(())
}

pub(crate) fn check_gpus(gpus: u32) -> Result<(), String> {
    if gpus > MAX_GPUS {
        return Err(format!("is {gpus}, above the limit of {MAX_GPUS}"));
    }
    Ok(())
}

pub(crate) fn check_env(env: &BTreeMap<String, String>) -> Result<(), String> {
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

pub(crate) fn check_workdir(workdir: &str) -> Result<(), String> {
    if workdir.is_empty() {
        return Err("must not be empty (leave it out for a fresh directory per attempt)".into());
    }
    if !workdir.starts_with('/') {
        return Err(format!(
            "{workdir:?} must be an absolute path (starting with `/`)"
        ));
    }
    if workdir.contains('\0') {
        return Err("must not contain NUL characters".into());
    }
    if workdir.len() > MAX_WORKDIR_BYTES {
        return Err(format!(
            "is {} bytes, above the limit of {MAX_WORKDIR_BYTES}",
            workdir.len()
        ));
    }
    Ok(())
}

pub(crate) fn check_labels(labels: &BTreeMap<String, String>) -> Result<(), String> {
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
            if let Some(workdir) = &task.workdir {
                check_workdir(workdir).map_err(|m| at("workdir", m))?;
            }
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
}
