//! Every attempt's own account of when it ran, and the checker that judges a scenario by it.
//!
//! [`attempt_recording`] wraps a micro-task's shell body: the attempt appends a `start` line
//! (task, index, attempt number, node, time) to a file of its own in a shared directory, a
//! `tick` line about every [`TICK_MS`] while the body runs, and an `end` line with the exit
//! status when it returns. An attempt killed with SIGKILL (its whole process group, ticker
//! included) leaves no `end` line, but its last tick says until when it was seen alive, so
//! the interval it may have run in is known to within a tick. Times are `date +%s%N`: the
//! processes under test all run on this machine (in network namespaces, not containers), so
//! they share the test's real-time clock. Only `sh`, `date` and `sleep` are used.
//!
//! [`check`] is a pure function of the records and of the leader's `ListTasks`, so it is
//! tested on hand-made records: every micro-task ran to an end; no two attempts of one
//! micro-task overlapped in time; re-executions happen only where the scenario allows, each
//! explained (attempt numbers, nodes, killed or finished); the coordinator lists each
//! micro-task once, succeeded, on an attempt that ran and finished with status 0.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context as _;
use venom_proto::v1 as pb;

/// Interval between an attempt's progress ticks, milliseconds.
pub const TICK_MS: u64 = 50;

/// One attempt, as its record file tells it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    pub task: String,
    /// `VENOM_TASK_INDEX` as the attempt saw it (`0` for a task without `array`).
    pub index: String,
    pub attempt: u32,
    pub node: String,
    /// Unix nanoseconds.
    pub start_ns: u128,
    /// The last tick, or the start when no tick came.
    pub last_seen_ns: u128,
    /// When the body returned, and its exit status; `None` when it never did (killed).
    pub end: Option<(u128, i32)>,
}

impl Attempt {
    /// Until when it is known to have run: its end, else its last tick.
    pub fn until_ns(&self) -> u128 {
        self.end.map_or(self.last_seen_ns, |(end, _)| end)
    }

    /// `#2 on w1`.
    pub fn label(&self) -> String {
        format!("#{} on {}", self.attempt, self.node)
    }
}

/// Shell snippet that runs `body` as one recorded attempt in `dir` (see the module doc).
/// The body runs in a subshell (an `exit` in it still lets the end line be written); the
/// attempt exits with the body's status.
pub fn attempt_recording(dir: &Path, body: &str) -> String {
    let d = dir.display();
    let tick_s = TICK_MS as f64 / 1000.0;
    format!(
        "f={d}/att.$VENOM_TASK_ID.${{VENOM_TASK_INDEX:-x}}.$VENOM_ATTEMPT.$VENOM_NODE.$$\n\
         echo \"start $VENOM_TASK_ID ${{VENOM_TASK_INDEX:--}} $VENOM_ATTEMPT $VENOM_NODE \
         $(date +%s%N)\" >> \"$f\"\n\
         (while :; do sleep {tick_s}; echo \"tick $(date +%s%N)\" >> \"$f\"; done) \
         </dev/null >/dev/null 2>&1 &\n\
         ticker=$!\n\
         (\n{body}\n)\n\
         status=$?\n\
         kill $ticker 2>/dev/null; wait $ticker 2>/dev/null\n\
         echo \"end $(date +%s%N) $status\" >> \"$f\"\n\
         exit $status"
    )
}

/// Reads every attempt [`attempt_recording`] wrote in `dir`.
pub fn read_attempts(dir: &Path) -> anyhow::Result<Vec<Attempt>> {
    let mut out = Vec::new();
    let entries =
        std::fs::read_dir(dir).with_context(|| format!("read records in {}", dir.display()))?;
    for entry in entries {
        let path = entry?.path();
        let is_record = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("att."));
        if !is_record {
            continue;
        }
        let text =
            std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
        match parse_attempt(&text) {
            Ok(Some(attempt)) => out.push(attempt),
            // Created, start line not written yet: an attempt starting right now.
            Ok(None) => {}
            Err(e) => anyhow::bail!("record {}: {e}: {text:?}", path.display()),
        }
    }
    Ok(out)
}

/// One record file's text; `None` while it is still empty.
pub fn parse_attempt(text: &str) -> Result<Option<Attempt>, String> {
    let mut lines = text.lines();
    let Some(first) = lines.next() else {
        return Ok(None);
    };
    let f: Vec<&str> = first.split(' ').collect();
    let [kind, task, index, attempt, node, start] = f.as_slice() else {
        return Err(format!(
            "first line {first:?} is not `start TASK INDEX ATTEMPT NODE NS`"
        ));
    };
    if *kind != "start" {
        return Err(format!("first line {first:?} is not a start line"));
    }
    let number = |what: &str, s: &str| -> Result<u128, String> {
        s.parse()
            .map_err(|_| format!("{what} {s:?} is not a number"))
    };
    let start_ns = number("start time", start)?;
    let mut attempt = Attempt {
        task: task.to_string(),
        index: index.to_string(),
        attempt: attempt
            .parse()
            .map_err(|_| format!("attempt {attempt:?} is not a number"))?,
        node: node.to_string(),
        start_ns,
        last_seen_ns: start_ns,
        end: None,
    };
    for line in lines {
        if attempt.end.is_some() {
            return Err(format!("{line:?} after the end line"));
        }
        let f: Vec<&str> = line.split(' ').collect();
        match f.as_slice() {
            ["tick", at] => attempt.last_seen_ns = attempt.last_seen_ns.max(number("tick", at)?),
            ["end", at, status] => {
                let at = number("end time", at)?;
                let status = status
                    .parse()
                    .map_err(|_| format!("exit status {status:?} is not a number"))?;
                attempt.last_seen_ns = attempt.last_seen_ns.max(at);
                attempt.end = Some((at, status));
            }
            _ => return Err(format!("line {line:?} is neither a tick nor an end")),
        }
    }
    Ok(Some(attempt))
}

/// When work went on after a fault at `at_ns`: the first start, after it, of an attempt
/// that must have been dispatched after it (Unix nanoseconds; `None` if there was none).
///
/// Workers keep running what they hold (at most `held_max` micro-tasks, running plus
/// queued) without a leader, so a start after the fault proves nothing by itself. Two kinds
/// of start do: a micro-task of one array whose index is above the highest index started by
/// `at_ns` plus `held_max` (the scheduler dispatches an array in index order, so anything
/// that far on was not held at the fault), and a later attempt of a micro-task whose
/// earlier attempt was still running at `at_ns` (it is given again only once that one is
/// taken to be lost).
pub fn resumed_at(attempts: &[Attempt], at_ns: u128, held_max: u32) -> Option<u128> {
    let index = |a: &Attempt| a.index.parse::<u64>().ok();
    let horizon = attempts
        .iter()
        .filter(|a| a.start_ns <= at_ns)
        .filter_map(index)
        .max()
        .map_or(0, |m| m + 1)
        + u64::from(held_max);
    let running_at_fault: Vec<&Attempt> = attempts
        .iter()
        .filter(|a| a.start_ns <= at_ns && at_ns <= a.until_ns())
        .collect();
    attempts
        .iter()
        .filter(|a| a.start_ns > at_ns)
        .filter(|a| {
            index(a).is_some_and(|i| i >= horizon)
                || running_at_fault
                    .iter()
                    .any(|r| r.task == a.task && r.index == a.index && r.attempt < a.attempt)
        })
        .map(|a| a.start_ns)
        .min()
}

/// Which re-executions (more than one attempt of a micro-task) a scenario allows.
#[derive(Debug, Clone, Copy)]
pub enum Reruns<'a> {
    /// None: the fault cost no re-run.
    None,
    /// Those whose earlier attempts all ran on these nodes (the nodes the fault hit).
    After(&'a [&'a str]),
    /// Any (every process was killed).
    Any,
}

/// A micro-task run more than once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rerun {
    /// `task[index]`.
    pub micro: String,
    /// Its attempts in the order they started: `#1 on w1 killed`, `#2 on w2 finished`.
    pub attempts: Vec<String>,
    /// Whether the scenario allows it.
    pub allowed: bool,
}

impl std::fmt::Display for Rerun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.micro, self.attempts.join(" → "))?;
        if !self.allowed {
            write!(f, " (not allowed)")?;
        }
        Ok(())
    }
}

/// What the records and the leader's task list say about one scenario's waves.
#[derive(Debug, Default)]
pub struct Check {
    pub n_micro_tasks: usize,
    pub n_attempts: usize,
    /// Micro-tasks with no attempt that ran to its end.
    pub never_ended: Vec<String>,
    /// Two attempts of one micro-task whose intervals intersect.
    pub overlaps: Vec<String>,
    /// One attempt number recorded twice for a micro-task (one dispatch run twice).
    pub duplicate_attempts: Vec<String>,
    pub reruns: Vec<Rerun>,
    /// Listed more than once by the leader.
    pub recorded_twice: Vec<String>,
    /// Not listed by the leader, listed but not succeeded, or kept on an attempt that did
    /// not run and finish with status 0.
    pub lost: Vec<String>,
    /// Recorded or listed but not in the waves.
    pub unexpected: Vec<String>,
    /// The shortest time from one attempt's end (or last tick) to the next attempt's start,
    /// over every micro-task run more than once, milliseconds (negative: an overlap).
    pub closest_ms: Option<f64>,
}

impl Check {
    /// Attempts beyond one per micro-task.
    pub fn n_reexecutions(&self) -> usize {
        self.n_attempts.saturating_sub(self.n_micro_tasks)
    }

    /// Every breach of the rules, one line each; empty when the scenario passed.
    pub fn violations(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut add = |what: &str, items: Vec<String>| {
            if !items.is_empty() {
                out.push(format!("{what}: {}", items.join("; ")));
            }
        };
        add("never ran to an end", self.never_ended.clone());
        add("overlapping attempts", self.overlaps.clone());
        add("one attempt run twice", self.duplicate_attempts.clone());
        add(
            "re-executions the scenario does not allow",
            self.reruns
                .iter()
                .filter(|r| !r.allowed)
                .map(Rerun::to_string)
                .collect(),
        );
        add(
            "listed more than once by the leader",
            self.recorded_twice.clone(),
        );
        add("lost", self.lost.clone());
        add("not in the waves", self.unexpected.clone());
        out
    }
}

/// `task` or `task[index]`.
fn micro_name(task: &str, index: &str) -> String {
    if index == "-" {
        task.to_string()
    } else {
        format!("{task}[{index}]")
    }
}

/// Judges one wave: `expected` is `(task id, array size)` (`None` for a task without
/// `array`), `tasks` the leader's `ListTasks`, `attempts` the records the wave's micro-tasks
/// wrote. Checks accumulate into `check` (call once per wave).
pub fn check(
    check: &mut Check,
    expected: &[(&str, Option<u32>)],
    tasks: &[pb::MicroTaskInfo],
    attempts: &[Attempt],
    reruns: Reruns<'_>,
) {
    let mut want: Vec<(String, String)> = Vec::new();
    for (task, size) in expected {
        match size {
            Some(n) => want.extend((0..*n).map(|i| (task.to_string(), i.to_string()))),
            None => want.push((task.to_string(), "-".to_string())),
        }
    }
    check.n_micro_tasks += want.len();
    check.n_attempts += attempts.len();
    let single = |task: &str| expected.iter().any(|(t, n)| *t == task && n.is_none());
    let mut runs: BTreeMap<(String, String), Vec<&Attempt>> = BTreeMap::new();
    for a in attempts {
        let index = if single(&a.task) {
            "-".to_string()
        } else {
            a.index.clone()
        };
        runs.entry((a.task.clone(), index)).or_default().push(a);
    }
    let mut listed: BTreeMap<(String, String), Vec<&pb::MicroTaskInfo>> = BTreeMap::new();
    for t in tasks {
        let index = t.index.map_or("-".to_string(), |i| i.to_string());
        listed
            .entry((t.task_id.clone(), index))
            .or_default()
            .push(t);
    }
    for key in &want {
        let name = micro_name(&key.0, &key.1);
        let mut ran: Vec<&Attempt> = runs.get(key).cloned().unwrap_or_default();
        ran.sort_by_key(|a| (a.start_ns, a.attempt));
        if !ran.iter().any(|a| a.end.is_some()) {
            check
                .never_ended
                .push(format!("{name} ({} attempts recorded)", ran.len()));
        }
        judge_intervals(check, &name, &ran);
        let mut numbers: Vec<u32> = ran.iter().map(|a| a.attempt).collect();
        numbers.sort_unstable();
        if numbers.windows(2).any(|w| w[0] == w[1]) {
            let all: Vec<String> = ran.iter().map(|a| a.label()).collect();
            check
                .duplicate_attempts
                .push(format!("{name}: {}", all.join(", ")));
        }
        if ran.len() > 1 {
            let allowed = match reruns {
                Reruns::None => false,
                Reruns::Any => true,
                Reruns::After(nodes) => ran[..ran.len() - 1]
                    .iter()
                    .all(|a| nodes.contains(&a.node.as_str())),
            };
            let attempts = ran
                .iter()
                .map(|a| match a.end {
                    Some((_, status)) => format!("{} finished (exit {status})", a.label()),
                    None => format!("{} killed", a.label()),
                })
                .collect();
            check.reruns.push(Rerun {
                micro: name.clone(),
                attempts,
                allowed,
            });
        }
        let entries = listed.get(key).map(Vec::as_slice).unwrap_or(&[]);
        if entries.len() > 1 {
            check.recorded_twice.push(name.clone());
        }
        match entries.first() {
            None => check.lost.push(format!("{name} (not listed)")),
            Some(t) if t.state() != pb::TaskState::Succeeded => {
                check.lost.push(format!("{name} ({:?})", t.state()));
            }
            Some(t) => {
                let kept = ran
                    .iter()
                    .any(|a| a.attempt == t.attempt && a.end.is_some_and(|(_, s)| s == 0));
                if !kept {
                    check.lost.push(format!(
                        "{name} (succeeded on #{} on {}, which no record shows finished)",
                        t.attempt, t.node
                    ));
                }
            }
        }
    }
    let want: std::collections::BTreeSet<_> = want.into_iter().collect();
    for key in listed.keys().chain(runs.keys()) {
        if !want.contains(key) {
            check.unexpected.push(micro_name(&key.0, &key.1));
        }
    }
}

/// Overlaps among `ran` (sorted by start) and the closest gap between successive attempts.
fn judge_intervals(check: &mut Check, name: &str, ran: &[&Attempt]) {
    let mut latest: Option<&Attempt> = None;
    for a in ran {
        if let Some(before) = latest {
            let gap_ms = (a.start_ns as f64 - before.until_ns() as f64) / 1e6;
            check.closest_ms = Some(check.closest_ms.map_or(gap_ms, |c| c.min(gap_ms)));
            if a.start_ns <= before.until_ns() {
                let how = if before.end.is_some() {
                    "ended"
                } else {
                    "was last seen (killed)"
                };
                check.overlaps.push(format!(
                    "{name}: {} started {:.0} ms before {} {how}",
                    a.label(),
                    -gap_ms,
                    before.label(),
                ));
            }
        }
        if latest.is_none_or(|l| a.until_ns() > l.until_ns()) {
            latest = Some(a);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    const MS: u128 = 1_000_000;

    fn ran(index: u32, attempt: u32, node: &str, start_ms: u128, until_ms: u128) -> Attempt {
        Attempt {
            task: "work".into(),
            index: index.to_string(),
            attempt,
            node: node.into(),
            start_ns: start_ms * MS,
            last_seen_ns: until_ms * MS,
            end: Some((until_ms * MS, 0)),
        }
    }

    fn killed(index: u32, attempt: u32, node: &str, start_ms: u128, last_ms: u128) -> Attempt {
        Attempt {
            end: None,
            ..ran(index, attempt, node, start_ms, last_ms)
        }
    }

    fn listed(index: u32, attempt: u32, node: &str) -> pb::MicroTaskInfo {
        let mut t = pb::MicroTaskInfo {
            task_id: "work".into(),
            index: Some(index),
            attempt,
            node: node.into(),
            micro: index,
            ..Default::default()
        };
        t.set_state(pb::TaskState::Succeeded);
        t
    }

    fn judge(attempts: &[Attempt], tasks: &[pb::MicroTaskInfo], reruns: Reruns<'_>) -> Check {
        let mut c = Check::default();
        check(&mut c, &[("work", Some(2))], tasks, attempts, reruns);
        c
    }

    #[test]
    fn one_finished_attempt_per_micro_task_passes() {
        let c = judge(
            &[ran(0, 1, "w1", 0, 200), ran(1, 1, "w2", 0, 200)],
            &[listed(0, 1, "w1"), listed(1, 1, "w2")],
            Reruns::None,
        );
        assert!(c.violations().is_empty(), "{:?}", c.violations());
        assert_eq!((c.n_micro_tasks, c.n_reexecutions()), (2, 0));
        assert_eq!(c.closest_ms, None);
    }

    #[test]
    fn a_killed_attempt_counts_until_its_last_tick() {
        // Killed on w1, last seen at 3,000 ms; the next attempt starts after that: fine.
        let after = [
            killed(0, 1, "w1", 0, 3_000),
            ran(0, 2, "w2", 4_300, 4_500),
            ran(1, 1, "w2", 0, 200),
        ];
        let tasks = [listed(0, 2, "w2"), listed(1, 1, "w2")];
        let c = judge(&after, &tasks, Reruns::After(&["w1"]));
        assert!(c.violations().is_empty(), "{:?}", c.violations());
        assert_eq!(c.n_reexecutions(), 1);
        assert_eq!(
            c.reruns[0].to_string(),
            "work[0]: #1 on w1 killed → #2 on w2 finished (exit 0)"
        );
        assert_eq!(c.closest_ms, Some(1_300.0));
        // Starting before the killed one's last tick is an overlap.
        let during = [
            killed(0, 1, "w1", 0, 3_000),
            ran(0, 2, "w2", 2_900, 3_100),
            ran(1, 1, "w2", 0, 200),
        ];
        let c = judge(&during, &tasks, Reruns::After(&["w1"]));
        assert_eq!(
            c.overlaps,
            ["work[0]: #2 on w2 started 100 ms before #1 on w1 was last seen (killed)"]
        );
        assert_eq!(c.closest_ms, Some(-100.0));
    }

    #[test]
    fn overlap_is_found_against_any_earlier_attempt_not_just_the_previous_one() {
        // #1 runs long; #2 starts and ends inside it; #3 starts while #1 still runs.
        let attempts = [
            ran(0, 1, "w1", 0, 1_000),
            ran(0, 2, "w2", 100, 200),
            ran(0, 3, "w2", 500, 600),
            ran(1, 1, "w2", 0, 200),
        ];
        let c = judge(
            &attempts,
            &[listed(0, 3, "w2"), listed(1, 1, "w2")],
            Reruns::Any,
        );
        assert_eq!(c.overlaps.len(), 2, "{:?}", c.overlaps);
    }

    #[test]
    fn reruns_are_allowed_only_as_the_scenario_says() {
        let attempts = [
            ran(0, 1, "w2", 0, 200),
            ran(0, 2, "w1", 1_000, 1_200),
            ran(1, 1, "w2", 0, 200),
        ];
        let tasks = [listed(0, 2, "w1"), listed(1, 1, "w2")];
        // The first attempt ran on w2, which the fault did not hit.
        let c = judge(&attempts, &tasks, Reruns::After(&["w1"]));
        assert_eq!(c.violations().len(), 1, "{:?}", c.violations());
        assert!(!c.reruns[0].allowed);
        assert_eq!(judge(&attempts, &tasks, Reruns::None).violations().len(), 1);
        assert!(judge(&attempts, &tasks, Reruns::Any)
            .violations()
            .is_empty());
    }

    #[test]
    fn missing_ends_double_listings_and_unfinished_kept_attempts_are_lost_results() {
        let attempts = [killed(0, 1, "w1", 0, 150), ran(1, 1, "w2", 0, 200)];
        let mut failed = listed(1, 1, "w2");
        failed.set_state(pb::TaskState::Failed);
        let c = judge(
            &attempts,
            &[listed(0, 1, "w1"), failed.clone(), failed],
            Reruns::None,
        );
        assert_eq!(c.never_ended, ["work[0] (1 attempts recorded)"]);
        assert_eq!(c.recorded_twice, ["work[1]"]);
        assert_eq!(
            c.lost,
            [
                "work[0] (succeeded on #1 on w1, which no record shows finished)",
                "work[1] (Failed)"
            ]
        );
        // Not listed at all, and a micro-task outside the wave.
        let c = judge(
            &[
                ran(0, 1, "w1", 0, 1),
                ran(1, 1, "w1", 0, 1),
                ran(7, 1, "w1", 0, 1),
            ],
            &[listed(0, 1, "w1")],
            Reruns::None,
        );
        assert_eq!(c.lost, ["work[1] (not listed)"]);
        assert_eq!(c.unexpected, ["work[7]"]);
    }

    #[test]
    fn one_attempt_number_run_twice_is_flagged_even_without_overlap() {
        let attempts = [
            ran(0, 1, "w1", 0, 200),
            ran(0, 1, "w1", 500, 700),
            ran(1, 1, "w2", 0, 200),
        ];
        let c = judge(
            &attempts,
            &[listed(0, 1, "w1"), listed(1, 1, "w2")],
            Reruns::Any,
        );
        assert_eq!(c.duplicate_attempts, ["work[0]: #1 on w1, #1 on w1"]);
    }

    #[test]
    fn a_task_without_array_is_one_micro_task_whatever_index_it_saw() {
        let mut only = ran(0, 1, "w1", 0, 10);
        only.task = "after".into();
        let mut t = listed(0, 1, "w1");
        t.task_id = "after".into();
        t.index = None;
        let mut c = Check::default();
        check(&mut c, &[("after", None)], &[t], &[only], Reruns::None);
        assert!(c.violations().is_empty(), "{:?}", c.violations());
    }

    #[test]
    fn progress_after_a_fault_is_new_work_or_a_retaken_attempt() {
        // Indices 0..=3 started by the fault at 1,000 ms; workers hold at most 2 more.
        let mut attempts = vec![
            ran(0, 1, "w1", 0, 200),
            ran(1, 1, "w2", 0, 200),
            ran(2, 1, "w1", 800, 1_000),
            killed(3, 1, "w2", 900, 3_000),
            // Held at the fault (indices 4 and 5): no proof of progress.
            ran(4, 1, "w1", 1_050, 1_250),
            ran(5, 1, "w1", 1_300, 1_500),
            // Dispatched after the fault.
            ran(6, 1, "w1", 5_000, 5_200),
        ];
        assert_eq!(resumed_at(&attempts, 1_000 * MS, 2), Some(5_000 * MS));
        // Index 3, running at the fault, given again.
        attempts.push(ran(3, 2, "w1", 4_300, 4_500));
        assert_eq!(resumed_at(&attempts, 1_000 * MS, 2), Some(4_300 * MS));
        // Nothing after the fault.
        assert_eq!(resumed_at(&attempts, 10_000 * MS, 2), None);
        // With no attempt before the fault, the held work is the first indices.
        let fresh = [
            ran(0, 1, "w1", 100, 300),
            ran(1, 1, "w2", 150, 350),
            ran(2, 1, "w1", 300, 500),
        ];
        assert_eq!(resumed_at(&fresh, 0, 2), Some(300 * MS));
    }

    #[test]
    fn record_files_parse_strictly() {
        let text = "start work 3 2 w1 100\ntick 150\ntick 200\nend 230 0\n";
        let a = parse_attempt(text).unwrap().unwrap();
        assert_eq!(
            (a.index.as_str(), a.attempt, a.node.as_str()),
            ("3", 2, "w1")
        );
        assert_eq!(
            (a.start_ns, a.last_seen_ns, a.end),
            (100, 230, Some((230, 0)))
        );
        let killed = parse_attempt("start work 3 2 w1 100\ntick 150\n")
            .unwrap()
            .unwrap();
        assert_eq!((killed.until_ns(), killed.end), (150, None));
        assert_eq!(parse_attempt("").unwrap(), None);
        for bad in [
            "tick 150\n",
            "start work 3 w1 100\n",
            "start work 3 2 w1 100\nend 230 0\ntick 240\n",
            "start work 3 2 w1 100\ntick soon\n",
            "start work 3 2 w1 100\nbegin 120\n",
        ] {
            assert!(parse_attempt(bad).is_err(), "{bad:?} parsed");
        }
    }

    /// The shell snippet itself: a finished attempt has ticks and an end; one whose process
    /// group is killed has ticks and no end.
    #[test]
    fn the_recording_snippet_ticks_while_it_runs_and_ends_only_when_its_body_returns() {
        use std::os::unix::process::CommandExt as _;
        let dir = tempfile::tempdir().unwrap();
        let run = |index: &str, body: &str| {
            std::process::Command::new("sh")
                .arg("-c")
                .arg(attempt_recording(dir.path(), body))
                .env("VENOM_TASK_ID", "work")
                .env("VENOM_TASK_INDEX", index)
                .env("VENOM_ATTEMPT", "1")
                .env("VENOM_NODE", "w1")
                .process_group(0)
                .spawn()
                .unwrap()
        };
        let mut finished = run("0", "sleep 0.3; exit 3");
        let mut doomed = run("1", "sleep 30");
        assert_eq!(finished.wait().unwrap().code(), Some(3));
        // SAFETY: signals our own child's process group (ticker and body included).
        #[allow(unsafe_code)]
        unsafe {
            libc::kill(-(doomed.id() as i32), libc::SIGKILL);
        }
        doomed.wait().unwrap();
        let mut attempts = read_attempts(dir.path()).unwrap();
        attempts.sort_by(|a, b| a.index.cmp(&b.index));
        let [done, killed] = attempts.as_slice() else {
            panic!("two records expected: {attempts:?}");
        };
        let (end, status) = done.end.unwrap();
        assert_eq!(status, 3);
        assert!(end - done.start_ns >= 300 * MS, "{done:?}");
        assert_eq!(killed.end, None);
        assert!(killed.last_seen_ns > killed.start_ns, "no tick: {killed:?}");
        let text = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
            .collect::<String>();
        assert!(text.matches("tick").count() >= 3, "{text}");
    }
}
