//! Rendering results for people (aligned tables) and for scripts (JSON).
//!
//! The wire types are converted once into the `…View` structs below. Those are the JSON
//! schema of `--output json`: their field names and order are part of venomctl's
//! interface, so they are spelled out here rather than derived from the protobuf
//! messages (whose evolution must not silently change what scripts read). States, modes
//! and policies arrive as protobuf enums and become `venom-core`'s enums here
//! ([`venom_proto::convert`]); both outputs spell them with their `as_str` word. A value
//! this build does not know (or `UNSPECIFIED`) makes the conversion fail: the answer is
//! reported as bad rather than shown wrong. The table renderers take the same views, so
//! both outputs always show the same facts.

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};

use serde::{Serialize, Serializer};
use venom_core::mobius::{Mode, ThrottlePolicy};
use venom_core::wave::OnFailure;
use venom_core::{Counts, NodeState, TaskState, WaveState};
use venom_proto as pb;
use venom_proto::convert::Unspecified;

/// Prints `value` as one pretty JSON document on stdout.
pub fn print_json<T: Serialize + ?Sized>(value: &T) -> anyhow::Result<()> {
    println!("{}", to_json(value)?);
    Ok(())
}

/// `value` as pretty JSON.
pub fn to_json<T: Serialize + ?Sized>(value: &T) -> anyhow::Result<String> {
    Ok(serde_json::to_string_pretty(value)?)
}

/// Serialises a state, mode, policy or role as the word people see (its `Display`), so
/// JSON and tables spell it the same way.
pub fn as_word<T: fmt::Display, S: Serializer>(
    value: &T,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.collect_str(value)
}

// ---------------------------------------------------------------------------
// Tables
// ---------------------------------------------------------------------------

/// A plain-text table: a header row and left-aligned columns two spaces apart,
/// numbers right-aligned.
#[derive(Debug, Default)]
pub struct Table {
    headers: Vec<String>,
    rows: Vec<Vec<String>>,
    right_aligned: Vec<bool>,
}

impl Table {
    /// A table with these column headers; a header starting with `>` marks a
    /// right-aligned (numeric) column and the `>` is not printed.
    pub fn new(headers: &[&str]) -> Self {
        Self {
            headers: headers
                .iter()
                .map(|header| header.trim_start_matches('>').to_owned())
                .collect(),
            right_aligned: headers
                .iter()
                .map(|header| header.starts_with('>'))
                .collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    pub fn render(&self) -> String {
        let n_columns = self.headers.len();
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (column, cell) in row.iter().enumerate().take(n_columns) {
                widths[column] = widths[column].max(cell.chars().count());
            }
        }
        let mut out = String::new();
        let mut line = |cells: &[String]| {
            let mut text = String::new();
            for (column, width) in widths.iter().enumerate() {
                let cell = cells.get(column).map(String::as_str).unwrap_or("");
                let pad = width.saturating_sub(cell.chars().count());
                if column > 0 {
                    text.push_str("  ");
                }
                if self.right_aligned[column] {
                    text.push_str(&" ".repeat(pad));
                    text.push_str(cell);
                } else {
                    text.push_str(cell);
                    text.push_str(&" ".repeat(pad));
                }
            }
            out.push_str(text.trim_end());
            out.push('\n');
        };
        line(&self.headers);
        for row in &self.rows {
            line(row);
        }
        out
    }
}

/// `key  value` lines with the values aligned.
fn render_fields(fields: &[(&str, String)]) -> String {
    let width = fields
        .iter()
        .map(|(key, _)| key.chars().count())
        .max()
        .unwrap_or(0);
    let mut out = String::new();
    for (key, value) in fields {
        let pad = width - key.chars().count();
        // Writing to a String cannot fail.
        let _ = writeln!(out, "  {key}{}  {value}", " ".repeat(pad));
    }
    out
}

// ---------------------------------------------------------------------------
// Number, duration and time formatting
// ---------------------------------------------------------------------------

/// A speed-up or model factor: `1.86×`, `151×`, `31,322×`; `-` when unknown (0 or NaN).
pub fn fmt_factor(value: f64) -> String {
    if !value.is_finite() || value <= 0.0 {
        return "-".to_owned();
    }
    if value < 100.0 {
        format!("{value:.2}×")
    } else {
        format!("{}×", fmt_thousands(value.round() as u64))
    }
}

/// `31322` → `31,322`.
pub fn fmt_thousands(value: u64) -> String {
    let digits = value.to_string();
    let mut groups: Vec<&str> = Vec::new();
    let mut end = digits.len();
    while end > 3 {
        groups.push(&digits[end - 3..end]);
        end -= 3;
    }
    groups.push(&digits[..end]);
    groups.reverse();
    groups.join(",")
}

/// A duration in milliseconds for people: `850 ms`, `1.234 s`, `2m 03s`, `1h 02m`.
pub fn fmt_ms(ms: u64) -> String {
    if ms < 1_000 {
        format!("{ms} ms")
    } else if ms < 60_000 {
        format!("{:.3} s", ms as f64 / 1_000.0)
    } else if ms < 3_600_000 {
        format!("{}m {:02}s", ms / 60_000, (ms / 1_000) % 60)
    } else {
        format!("{}h {:02}m", ms / 3_600_000, (ms / 60_000) % 60)
    }
}

/// A Unix time in milliseconds as UTC `YYYY-MM-DD HH:MM:SS.mmmZ`; `-` for 0 (not yet).
pub fn fmt_time(unix_ms: u64) -> String {
    if unix_ms == 0 {
        return "-".to_owned();
    }
    let seconds = unix_ms / 1_000;
    let days = (seconds / 86_400) as i64;
    let second_of_day = seconds % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}.{:03}Z",
        second_of_day / 3_600,
        (second_of_day / 60) % 60,
        second_of_day % 60,
        unix_ms % 1_000
    )
}

/// Bytes for people: `512 B`, `1.5 KiB`, `15.6 GiB`.
pub fn fmt_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// `value` trimmed, if it is a valid W3C `traceparent`.
pub fn checked_traceparent(value: &str) -> Option<String> {
    venom_telemetry::is_valid_traceparent(value).then(|| value.trim().to_owned())
}

/// The trace id (second field) of a valid `traceparent`.
pub fn trace_id(traceparent: &str) -> Option<String> {
    venom_telemetry::trace_id(traceparent).map(str::to_owned)
}

// ---------------------------------------------------------------------------
// Waves
// ---------------------------------------------------------------------------

/// Counts on the wire (absent: none yet) as `venom-core` counts.
fn counts(wire: Option<&pb::TaskCounts>) -> Counts {
    wire.copied().map(Counts::from).unwrap_or_default()
}

/// Micro-tasks placed on a node: assigned (queued there) or running.
pub fn placed(counts: &Counts) -> u64 {
    counts.assigned + counts.running
}

/// Progress of one spec task (all micro-tasks of an array).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct GroupView {
    pub task_id: String,
    pub n_micro_tasks: u32,
    pub counts: Counts,
}

/// One wave's summary.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct WaveView {
    pub wave_id: u64,
    pub name: String,
    /// Who submitted it (the name on their certificate); empty when anonymous.
    pub owner: String,
    #[serde(serialize_with = "as_word")]
    pub state: WaveState,
    #[serde(serialize_with = "as_word")]
    pub on_failure: OnFailure,
    pub n_micro_tasks: u64,
    pub counts: Counts,
    pub submitted_ms: u64,
    pub started_ms: u64,
    pub finished_ms: u64,
    /// Σ run time of every attempt.
    pub work_ms: u64,
    /// First start to last finish.
    pub makespan_ms: u64,
    /// Σ run time / makespan: what the wave really achieved.
    pub measured_speedup: f64,
    /// Total work / critical-path work (work–span law).
    pub dag_bound: f64,
    /// The Möbius model's cluster S_Total: the model's figure, not a measurement.
    pub model_s_total: f64,
    pub traceparent: String,
    pub trace_id: Option<String>,
    pub groups: Vec<GroupView>,
}

impl TryFrom<&pb::WaveSummary> for WaveView {
    type Error = Unspecified;

    fn try_from(w: &pb::WaveSummary) -> Result<Self, Unspecified> {
        Ok(Self {
            wave_id: w.wave_id,
            name: w.name.clone(),
            owner: w.owner.clone(),
            state: w.state().try_into()?,
            on_failure: w.on_failure().try_into()?,
            n_micro_tasks: w.n_micro_tasks,
            counts: counts(w.counts.as_ref()),
            submitted_ms: w.submitted_ms,
            started_ms: w.started_ms,
            finished_ms: w.finished_ms,
            work_ms: w.work_ms,
            makespan_ms: w.makespan_ms,
            measured_speedup: w.measured_speedup,
            dag_bound: w.dag_bound,
            model_s_total: w.model_s_total,
            traceparent: w.traceparent.clone(),
            trace_id: trace_id(&w.traceparent),
            groups: w
                .groups
                .iter()
                .map(|g| GroupView {
                    task_id: g.task_id.clone(),
                    n_micro_tasks: g.n_micro_tasks,
                    counts: counts(g.counts.as_ref()),
                })
                .collect(),
        })
    }
}

#[cfg(test)]
impl WaveView {
    /// A wave of `groups` in `state` with nothing counted, timed or measured, for tests.
    pub fn for_tests(wave_id: u64, name: &str, state: WaveState, groups: Vec<GroupView>) -> Self {
        Self {
            wave_id,
            name: name.to_owned(),
            owner: String::new(),
            state,
            on_failure: OnFailure::default(),
            n_micro_tasks: groups.iter().map(|g| u64::from(g.n_micro_tasks)).sum(),
            counts: Counts::default(),
            submitted_ms: 0,
            started_ms: 0,
            finished_ms: 0,
            work_ms: 0,
            makespan_ms: 0,
            measured_speedup: 0.0,
            dag_bound: 0.0,
            model_s_total: 0.0,
            traceparent: String::new(),
            trace_id: None,
            groups,
        }
    }
}

/// The labels shown beside every speed-up figure; the model's number never appears
/// without what the wave measured.
pub const LABEL_MEASURED: &str = "measured speed-up (Σ run time / makespan)";
pub const LABEL_DAG_BOUND: &str = "DAG bound (work / span)";
pub const LABEL_MODEL: &str = "model S_Total (Möbius)";

/// The makespan, or `-` for a wave where nothing started (it has none).
fn fmt_makespan(wave: &WaveView) -> String {
    if wave.started_ms == 0 {
        "-".to_owned()
    } else {
        fmt_ms(wave.makespan_ms)
    }
}

/// The full summary of one wave: header, fields, and a per-task table.
pub fn render_wave(wave: &WaveView) -> String {
    let c = &wave.counts;
    let mut out = format!(
        "wave {} \"{}\": {}\n",
        wave.wave_id,
        wave.name,
        wave.state.as_str()
    );
    let owner = if wave.owner.is_empty() {
        "- (submitted without a certificate)".to_owned()
    } else {
        wave.owner.clone()
    };
    let mut fields: Vec<(&str, String)> = vec![
        ("owner", owner),
        ("on failure", wave.on_failure.as_str().to_owned()),
        (
            "micro-tasks",
            format!(
                "{} ({} succeeded, {} failed, {} skipped, {} cancelled)",
                wave.n_micro_tasks, c.succeeded, c.failed, c.skipped, c.cancelled
            ),
        ),
    ];
    if !wave.state.is_terminal() || c.terminal() < wave.n_micro_tasks {
        fields.push((
            "in progress",
            format!(
                "{} running, {} assigned, {} ready, {} pending",
                c.running, c.assigned, c.ready, c.pending
            ),
        ));
    }
    fields.extend([
        ("submitted", fmt_time(wave.submitted_ms)),
        ("started", fmt_time(wave.started_ms)),
        ("finished", fmt_time(wave.finished_ms)),
        ("makespan", fmt_makespan(wave)),
        ("work (Σ run time)", fmt_ms(wave.work_ms)),
        (LABEL_MEASURED, fmt_factor(wave.measured_speedup)),
        (LABEL_DAG_BOUND, fmt_factor(wave.dag_bound)),
        (LABEL_MODEL, fmt_factor(wave.model_s_total)),
    ]);
    if let Some(trace_id) = &wave.trace_id {
        fields.push(("trace id", trace_id.clone()));
    }
    out.push_str(&render_fields(&fields));
    if !wave.groups.is_empty() {
        out.push('\n');
        out.push_str(&render_groups(&wave.groups));
    }
    out
}

/// Per spec task progress.
pub fn render_groups(groups: &[GroupView]) -> String {
    let mut table = Table::new(&[
        "TASK",
        ">MICRO",
        ">DONE",
        ">SUCCEEDED",
        ">FAILED",
        ">SKIPPED",
        ">CANCELLED",
        ">RUNNING",
        ">WAITING",
    ]);
    for group in groups {
        let c = &group.counts;
        table.row(vec![
            group.task_id.clone(),
            group.n_micro_tasks.to_string(),
            c.terminal().to_string(),
            c.succeeded.to_string(),
            c.failed.to_string(),
            c.skipped.to_string(),
            c.cancelled.to_string(),
            placed(c).to_string(),
            (c.pending + c.ready).to_string(),
        ]);
    }
    table.render()
}

/// One line per wave.
pub fn render_waves(waves: &[WaveView]) -> String {
    if waves.is_empty() {
        return "no waves\n".to_owned();
    }
    let mut table = Table::new(&[
        ">ID",
        "NAME",
        "OWNER",
        "STATE",
        ">MICRO",
        ">DONE",
        ">FAILED",
        ">RUNNING",
        "SUBMITTED",
        ">MAKESPAN",
        ">MEASURED",
    ]);
    for wave in waves {
        table.row(vec![
            wave.wave_id.to_string(),
            wave.name.clone(),
            if wave.owner.is_empty() {
                "-".to_owned()
            } else {
                wave.owner.clone()
            },
            wave.state.as_str().to_owned(),
            wave.n_micro_tasks.to_string(),
            wave.counts.terminal().to_string(),
            wave.counts.failed.to_string(),
            placed(&wave.counts).to_string(),
            fmt_time(wave.submitted_ms),
            fmt_makespan(wave),
            fmt_factor(wave.measured_speedup),
        ]);
    }
    table.render()
}

// ---------------------------------------------------------------------------
// Micro-tasks
// ---------------------------------------------------------------------------

/// One micro-task.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TaskView {
    /// `task` or `task[index]`, as `venomctl logs` accepts it.
    pub name: String,
    pub task_id: String,
    pub index: Option<u32>,
    pub micro: u32,
    #[serde(serialize_with = "as_word")]
    pub state: TaskState,
    pub attempt: u32,
    pub node: String,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub timed_out: bool,
    pub started_ms: u64,
    pub finished_ms: u64,
    pub run_ms: Option<u64>,
    pub error: String,
}

impl TryFrom<&pb::MicroTaskInfo> for TaskView {
    type Error = Unspecified;

    fn try_from(t: &pb::MicroTaskInfo) -> Result<Self, Unspecified> {
        let name = match t.index {
            Some(index) => format!("{}[{index}]", t.task_id),
            None => t.task_id.clone(),
        };
        let run_ms = (t.started_ms > 0 && t.finished_ms >= t.started_ms)
            .then(|| t.finished_ms - t.started_ms);
        Ok(Self {
            name,
            task_id: t.task_id.clone(),
            index: t.index,
            micro: t.micro,
            state: t.state().try_into()?,
            attempt: t.attempt,
            node: t.node.clone(),
            exit_code: t.exit_code,
            signal: t.signal,
            timed_out: t.timed_out,
            started_ms: t.started_ms,
            finished_ms: t.finished_ms,
            run_ms,
            error: t.error.clone(),
        })
    }
}

/// How a finished attempt ended: `exit 0`, `signal 9`, `timed out`.
fn fmt_ending(task: &TaskView) -> String {
    if task.timed_out {
        "timed out".to_owned()
    } else if let Some(signal) = task.signal {
        format!("signal {signal}")
    } else if let Some(code) = task.exit_code {
        format!("exit {code}")
    } else {
        "-".to_owned()
    }
}

pub fn render_tasks(tasks: &[TaskView]) -> String {
    if tasks.is_empty() {
        return "no micro-tasks\n".to_owned();
    }
    let mut table = Table::new(&[
        "TASK",
        "STATE",
        ">ATTEMPT",
        "NODE",
        "RESULT",
        ">RUN TIME",
        "ERROR",
    ]);
    for task in tasks {
        table.row(vec![
            task.name.clone(),
            task.state.as_str().to_owned(),
            task.attempt.to_string(),
            if task.node.is_empty() {
                "-".to_owned()
            } else {
                task.node.clone()
            },
            fmt_ending(task),
            task.run_ms.map(fmt_ms).unwrap_or_else(|| "-".to_owned()),
            task.error.clone(),
        ]);
    }
    table.render()
}

// ---------------------------------------------------------------------------
// Nodes
// ---------------------------------------------------------------------------

/// The parts of a node's hardware profile worth showing in a listing.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct NodeProfileView {
    pub hostname: String,
    pub cpu_arch: String,
    pub cpu_brand: String,
    pub cpu_physical_cores: u32,
    pub cpu_logical_cores: u32,
    pub effective_cpus: u32,
    pub has_thermal_sensor: bool,
    pub os_name: String,
}

/// A node's throttle mode as shown: its mode, or `PAUSED` while it gets no new work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShownMode {
    Paused,
    Mode(Mode),
}

impl ShownMode {
    pub fn as_str(self) -> &'static str {
        match self {
            ShownMode::Paused => "PAUSED",
            ShownMode::Mode(mode) => mode.as_str(),
        }
    }
}

impl fmt::Display for ShownMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One worker node as the coordinator sees it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct NodeView {
    pub name: String,
    #[serde(serialize_with = "as_word")]
    pub state: NodeState,
    pub slots: u32,
    pub throttled_slots: u32,
    pub running: u32,
    pub queued: u32,
    pub theta: f64,
    pub theta_smoothed: f64,
    pub h_cpu: f64,
    pub h_mem: f64,
    pub h_term: f64,
    #[serde(serialize_with = "as_word")]
    pub mode: ShownMode,
    #[serde(serialize_with = "as_word")]
    pub policy: ThrottlePolicy,
    pub labels: BTreeMap<String, String>,
    pub memory_total_bytes: u64,
    pub memory_available_bytes: u64,
    pub gpus: u32,
    pub lambda: f64,
    pub s_total: f64,
    pub last_heartbeat_ms: u64,
    pub profile: Option<NodeProfileView>,
}

impl TryFrom<&pb::NodeInfo> for NodeView {
    type Error = Unspecified;

    fn try_from(n: &pb::NodeInfo) -> Result<Self, Unspecified> {
        Ok(Self {
            name: n.name.clone(),
            state: n.state().try_into()?,
            slots: n.slots,
            throttled_slots: n.throttled_slots,
            running: n.running,
            queued: n.queued,
            theta: n.theta,
            theta_smoothed: n.theta_smoothed,
            h_cpu: n.h_cpu,
            h_mem: n.h_mem,
            h_term: n.h_term,
            mode: if n.paused {
                ShownMode::Paused
            } else {
                ShownMode::Mode(n.mode().try_into()?)
            },
            policy: n.policy().try_into()?,
            labels: n
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            memory_total_bytes: n.memory_total_bytes,
            memory_available_bytes: n.memory_available_bytes,
            gpus: n.gpus,
            lambda: n.lambda,
            s_total: n.s_total,
            last_heartbeat_ms: n.last_heartbeat_ms,
            profile: n.profile.as_ref().map(|p| NodeProfileView {
                hostname: p.hostname.clone(),
                cpu_arch: p.cpu_arch.clone(),
                cpu_brand: p.cpu_brand.clone(),
                cpu_physical_cores: p.cpu_physical_cores,
                cpu_logical_cores: p.cpu_logical_cores,
                effective_cpus: p.effective_cpus,
                has_thermal_sensor: p.has_thermal_sensor,
                os_name: p.os_name.clone(),
            }),
        })
    }
}

/// One line describing a node's load, as `--watch` shows it.
pub fn node_line(node: &NodeView) -> String {
    format!(
        "θ {:.2} {:<10} running {}/{} slots{}, {} queued  {}",
        node.theta_smoothed,
        node.mode.as_str(),
        node.running,
        node.throttled_slots,
        if node.throttled_slots < node.slots {
            format!(" (throttled from {})", node.slots)
        } else {
            String::new()
        },
        node.queued,
        node.state.as_str()
    )
}

pub fn render_nodes(nodes: &[NodeView]) -> String {
    if nodes.is_empty() {
        return "no nodes registered\n".to_owned();
    }
    let mut table = Table::new(&[
        "NAME",
        "STATE",
        ">θ",
        "MODE",
        ">SLOTS",
        ">RUNNING",
        ">QUEUED",
        ">MEM FREE",
        "POLICY",
        ">S_TOTAL (model)",
        "LABELS",
    ]);
    for node in nodes {
        let labels: Vec<String> = node
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        table.row(vec![
            node.name.clone(),
            node.state.as_str().to_owned(),
            format!("{:.2}", node.theta_smoothed),
            node.mode.as_str().to_owned(),
            format!("{}/{}", node.throttled_slots, node.slots),
            node.running.to_string(),
            node.queued.to_string(),
            fmt_bytes(node.memory_available_bytes),
            node.policy.as_str().to_owned(),
            fmt_factor(node.s_total),
            labels.join(","),
        ]);
    }
    let mut out = table.render();
    out.push_str("SLOTS is usable (throttled) / offered.\n");
    out
}

// ---------------------------------------------------------------------------
// Cluster
// ---------------------------------------------------------------------------

/// A coordinator's raft role, as people read it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Leader,
    Follower,
    Candidate,
    PreCandidate,
    /// The member did not answer the status round.
    Unreachable,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Leader => "leader",
            Role::Follower => "follower",
            Role::Candidate => "candidate",
            Role::PreCandidate => "pre-candidate",
            Role::Unreachable => "unreachable",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl TryFrom<pb::MemberRole> for Role {
    type Error = Unspecified;

    fn try_from(role: pb::MemberRole) -> Result<Self, Unspecified> {
        match role {
            pb::MemberRole::Leader => Ok(Role::Leader),
            pb::MemberRole::Follower => Ok(Role::Follower),
            pb::MemberRole::Candidate => Ok(Role::Candidate),
            pb::MemberRole::PreCandidate => Ok(Role::PreCandidate),
            pb::MemberRole::Unreachable => Ok(Role::Unreachable),
            pb::MemberRole::Unspecified => Err(Unspecified("role")),
        }
    }
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct MemberView {
    pub id: u64,
    pub address: String,
    #[serde(serialize_with = "as_word")]
    pub role: Role,
    pub term: u64,
    pub commit_index: u64,
    pub applied_index: u64,
    pub lag: u64,
}

/// The Möbius aggregate over ready nodes.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct AggregateView {
    pub n_nodes_ready: u32,
    pub theta_cluster: f64,
    pub lambda_cluster: f64,
    pub n_cluster: u32,
    pub s_total_cluster: f64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ClusterView {
    /// The cluster's identity, hexadecimal as in data dirs' identity files ("" until named).
    pub cluster_id: String,
    pub leader_id: u64,
    pub term: u64,
    pub commit_index: u64,
    pub applied_index: u64,
    pub members: Vec<MemberView>,
    pub aggregate: AggregateView,
}

impl TryFrom<&pb::ClusterStatusResponse> for ClusterView {
    type Error = Unspecified;

    fn try_from(c: &pb::ClusterStatusResponse) -> Result<Self, Unspecified> {
        Ok(Self {
            cluster_id: if c.cluster_id == 0 {
                String::new()
            } else {
                format!("{:016x}", c.cluster_id)
            },
            leader_id: c.leader_id,
            term: c.term,
            commit_index: c.commit_index,
            applied_index: c.applied_index,
            members: c
                .members
                .iter()
                .map(|m| {
                    Ok(MemberView {
                        id: m.id,
                        address: m.address.clone(),
                        role: m.role().try_into()?,
                        term: m.term,
                        commit_index: m.commit_index,
                        applied_index: m.applied_index,
                        lag: m.lag,
                    })
                })
                .collect::<Result<_, Unspecified>>()?,
            aggregate: AggregateView {
                n_nodes_ready: c.n_nodes_ready,
                theta_cluster: c.theta_cluster,
                lambda_cluster: c.lambda_cluster,
                n_cluster: c.n_cluster,
                s_total_cluster: c.s_total_cluster,
            },
        })
    }
}

pub fn render_cluster(cluster: &ClusterView) -> String {
    let leader = if cluster.leader_id == 0 {
        "none (election in progress)".to_owned()
    } else {
        let address = cluster
            .members
            .iter()
            .find(|m| m.id == cluster.leader_id)
            .map(|m| format!(" ({})", m.address))
            .unwrap_or_default();
        format!("{}{address}", cluster.leader_id)
    };
    let a = &cluster.aggregate;
    let mut out = String::from("cluster\n");
    let id = if cluster.cluster_id.is_empty() {
        "(not named yet)".to_owned()
    } else {
        cluster.cluster_id.clone()
    };
    out.push_str(&render_fields(&[
        ("cluster id", id),
        ("leader", leader),
        ("term", cluster.term.to_string()),
        ("commit index", cluster.commit_index.to_string()),
        ("applied index", cluster.applied_index.to_string()),
        ("ready nodes", a.n_nodes_ready.to_string()),
        ("θ_c (core-weighted)", format!("{:.3}", a.theta_cluster)),
        ("Λ_c", format!("{:.1}", a.lambda_cluster)),
        ("N_c", a.n_cluster.to_string()),
        (LABEL_MODEL, fmt_factor(a.s_total_cluster)),
    ]));
    out.push('\n');
    let mut table = Table::new(&[
        "ID", "ADDRESS", "ROLE", ">TERM", ">COMMIT", ">APPLIED", ">LAG",
    ]);
    for m in &cluster.members {
        table.row(vec![
            m.id.to_string(),
            m.address.clone(),
            m.role.as_str().to_owned(),
            m.term.to_string(),
            m.commit_index.to_string(),
            m.applied_index.to_string(),
            m.lag.to_string(),
        ]);
    }
    out.push_str(&table.render());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(succeeded: u64, failed: u64, skipped: u64, running: u64, pending: u64) -> Counts {
        Counts {
            pending,
            running,
            succeeded,
            failed,
            skipped,
            ..Counts::default()
        }
    }

    fn sample_wave() -> WaveView {
        WaveView {
            on_failure: OnFailure::SkipDependents,
            n_micro_tasks: 102,
            counts: counts(100, 1, 1, 0, 0),
            submitted_ms: 1_700_000_000_000,
            started_ms: 1_700_000_000_250,
            finished_ms: 1_700_000_002_750,
            work_ms: 4_600,
            makespan_ms: 2_500,
            measured_speedup: 1.84,
            dag_bound: 33.5,
            model_s_total: 2_900.4,
            traceparent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
            trace_id: trace_id("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            ..WaveView::for_tests(
                3,
                "nightly-etl",
                WaveState::Failed,
                vec![
                    GroupView {
                        task_id: "prepare".into(),
                        n_micro_tasks: 1,
                        counts: counts(1, 0, 0, 0, 0),
                    },
                    GroupView {
                        task_id: "shard".into(),
                        n_micro_tasks: 100,
                        counts: counts(99, 1, 0, 0, 0),
                    },
                    GroupView {
                        task_id: "merge".into(),
                        n_micro_tasks: 1,
                        counts: counts(0, 0, 1, 0, 0),
                    },
                ],
            )
        }
    }

    #[test]
    fn wave_summary_shows_labelled_figures() {
        let text = render_wave(&sample_wave());
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "wave 3 \"nightly-etl\": failed");
        assert!(
            text.contains("102 (100 succeeded, 1 failed, 1 skipped, 0 cancelled)"),
            "{text}"
        );
        // Every figure carries its label, and the model's figure sits beside the measured ones.
        let value_of = |label: &str| {
            lines
                .iter()
                .find(|line| line.trim_start().starts_with(label))
                .map(|line| line.trim_start()[label.len()..].trim().to_owned())
                .unwrap_or_else(|| panic!("no `{label}` line in\n{text}"))
        };
        assert_eq!(value_of(LABEL_MEASURED), "1.84×");
        assert_eq!(value_of(LABEL_DAG_BOUND), "33.50×");
        assert_eq!(value_of(LABEL_MODEL), "2,900×");
        assert_eq!(value_of("makespan"), "2.500 s");
        assert_eq!(value_of("trace id"), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(value_of("submitted"), "2023-11-14 22:13:20.000Z");
        // A finished wave with every micro-task done has no "in progress" line.
        assert!(!text.contains("in progress"));
        // The per-task table is aligned: every data row has the header's width or less,
        // and the numeric columns end in the same place.
        let header = lines
            .iter()
            .position(|l| l.starts_with("TASK"))
            .expect("table header");
        let table = &lines[header..];
        assert_eq!(table.len(), 4);
        assert!(table[2].starts_with("shard"));
        let end = table[0].len();
        for row in table {
            assert_eq!(row.len(), end, "misaligned row `{row}`");
        }
        assert!(
            table[2].contains(" 100 ") && table[2].contains("  99  "),
            "{}",
            table[2]
        );
    }

    #[test]
    fn wave_json_is_stable() {
        let json = to_json(&sample_wave()).expect("serialisable");
        let value: serde_json::Value = serde_json::from_str(&json).expect("valid JSON");
        assert_eq!(value["wave_id"], 3);
        assert_eq!(value["counts"]["failed"], 1);
        assert_eq!(value["groups"][1]["task_id"], "shard");
        assert_eq!(value["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
        // Field order is the struct's order (scripts diffing output rely on it).
        let wave_id_at = json.find("\"wave_id\"").expect("field");
        let groups_at = json.find("\"groups\"").expect("field");
        assert!(wave_id_at < groups_at);
        assert!(json.contains('\n'), "pretty-printed");
    }

    #[test]
    fn running_wave_shows_progress_and_unknown_figures() {
        let mut wave = sample_wave();
        wave.state = WaveState::Running;
        wave.counts = counts(10, 0, 0, 2, 90);
        wave.makespan_ms = 0;
        wave.measured_speedup = 0.0;
        wave.traceparent = String::new();
        wave.trace_id = None;
        let text = render_wave(&wave);
        assert!(
            text.contains("2 running, 0 assigned, 0 ready, 90 pending"),
            "{text}"
        );
        assert!(!text.contains("trace id"));
        let measured = text
            .lines()
            .find(|l| l.contains(LABEL_MEASURED))
            .expect("measured line");
        assert!(measured.trim_end().ends_with(" -"), "{measured}");
    }

    #[test]
    fn formatting_helpers() {
        assert_eq!(fmt_factor(151.2), "151×");
        assert_eq!(fmt_factor(31_322.0), "31,322×");
        assert_eq!(fmt_factor(0.0), "-");
        assert_eq!(fmt_factor(f64::NAN), "-");
        assert_eq!(fmt_thousands(1_000_000), "1,000,000");
        assert_eq!(fmt_thousands(999), "999");
        assert_eq!(fmt_ms(850), "850 ms");
        assert_eq!(fmt_ms(123_000), "2m 03s");
        assert_eq!(fmt_ms(3_720_000), "1h 02m");
        assert_eq!(fmt_time(0), "-");
        assert_eq!(fmt_time(951_782_400_000), "2000-02-29 00:00:00.000Z");
        assert_eq!(fmt_bytes(512), "512 B");
        assert_eq!(fmt_bytes(1536), "1.5 KiB");
        assert_eq!(
            trace_id("00-00000000000000000000000000000000-00f067aa0ba902b7-01"),
            None
        );
        assert_eq!(trace_id("garbage"), None);
    }

    #[test]
    fn wire_enums_keep_their_words() {
        let summary = pb::WaveSummary {
            wave_id: 1,
            state: pb::WaveState::Succeeded.into(),
            on_failure: pb::OnFailure::FailWave.into(),
            ..Default::default()
        };
        let wave = WaveView::try_from(&summary).expect("valid summary");
        let json: serde_json::Value =
            serde_json::from_str(&to_json(&wave).expect("serialisable")).expect("JSON");
        assert_eq!(json["state"], "succeeded");
        assert_eq!(json["on_failure"], "fail-wave");
        assert_eq!(json["counts"]["cancelled"], 0);

        let mut node = pb::NodeInfo {
            name: "n1".into(),
            state: pb::NodeState::Draining.into(),
            mode: pb::ThetaMode::Balance.into(),
            policy: pb::ThrottlePolicy::Conservative.into(),
            ..Default::default()
        };
        let view = NodeView::try_from(&node).expect("valid node");
        let json = serde_json::to_value(&view).expect("serialisable");
        assert_eq!(json["state"], "draining");
        assert_eq!(json["mode"], "BALANCE");
        assert_eq!(json["policy"], "conservative");
        // A paused node shows PAUSED instead of its mode, in both outputs.
        node.paused = true;
        let view = NodeView::try_from(&node).expect("valid node");
        assert_eq!(serde_json::to_value(&view).expect("JSON")["mode"], "PAUSED");
        assert!(
            node_line(&view).contains(" PAUSED "),
            "{}",
            node_line(&view)
        );
        assert!(render_nodes(&[view]).contains("  PAUSED  "));

        let status = pb::ClusterStatusResponse {
            members: vec![pb::ClusterMember {
                id: 2,
                role: pb::MemberRole::PreCandidate.into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let cluster = ClusterView::try_from(&status).expect("valid status");
        assert_eq!(
            serde_json::to_value(&cluster).expect("JSON")["members"][0]["role"],
            "pre-candidate"
        );
        assert!(render_cluster(&cluster).contains("pre-candidate"));

        let task = pb::MicroTaskInfo {
            task_id: "shard".into(),
            index: Some(7),
            state: pb::TaskState::Skipped.into(),
            ..Default::default()
        };
        let task = TaskView::try_from(&task).expect("valid task");
        assert_eq!(
            serde_json::to_value(&task).expect("JSON")["state"],
            "skipped"
        );
        assert!(render_tasks(&[task]).contains("shard[7]  skipped"));
    }

    #[test]
    fn unspecified_enums_are_refused() {
        let err = WaveView::try_from(&pb::WaveSummary::default()).expect_err("no state");
        assert_eq!(err, Unspecified("state"));
        let node = pb::NodeInfo {
            state: pb::NodeState::Ready.into(),
            mode: pb::ThetaMode::Optimize.into(),
            ..Default::default()
        };
        assert_eq!(
            NodeView::try_from(&node).expect_err("no policy"),
            Unspecified("throttle_policy")
        );
        let status = pb::ClusterStatusResponse {
            members: vec![pb::ClusterMember::default()],
            ..Default::default()
        };
        assert_eq!(
            ClusterView::try_from(&status).expect_err("no role"),
            Unspecified("role")
        );
    }

    #[test]
    fn tables_align_multibyte_headers() {
        let mut table = Table::new(&["NAME", ">θ"]);
        table.row(vec!["dev".into(), "0.85".into()]);
        let text = table.render();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "NAME     θ");
        assert_eq!(lines[1], "dev   0.85");
    }
}
