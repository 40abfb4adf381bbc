//! Reliability scenarios shared by the crash and power-loss tests: a raft group of
//! `venom-coordinator` processes and two `venom-worker` processes running waves whose
//! micro-tasks record every run, and the checks every scenario ends with.
//!
//! The checks: each wave succeeds; the leader's `ListTasks` lists every micro-task
//! exactly once, `succeeded`; every micro-task ran at least once (each run writes a record
//! file); every wave a submit acknowledged is listed by every member; and every member
//! answers `ListWaves`, `GetWave` and `ListTasks` identically. Execution is
//! at-least-once, so runs beyond one per micro-task are counted, explained by their
//! attempt numbers, and bounded by what can be in flight per disruption (workers × (slots
//! + queue depth)). Each scenario prints one summary line (see it with `--nocapture`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use venom_proto::v1 as pb;

use crate::*;

pub const N_WORKERS: u32 = 2;
pub const SLOTS: u32 = 2;

/// Held by the running scenario: run side by side, scenarios would overload a small
/// machine and slow each other's elections.
pub static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// One scenario's processes and files.
pub struct Scenario {
    pub name: &'static str,
    pub started: Instant,
    pub root: PathBuf,
    pub group: Group,
    /// `w1`, `w2`; `None` once killed.
    pub workers: Vec<Option<Proc>>,
    pub worker_args: Vec<String>,
    pub queue_depth: u32,
    /// Every wave id a submit returned, with its record dir and expected micro-tasks.
    pub waves: Vec<Submitted>,
    /// Power-cut file systems holding the coordinators' data dirs, if any: unmounted after
    /// every process is gone.
    pub disks: Vec<crate::powercut::PowerCutFs>,
    /// Dropped last, after every process is gone and every disk unmounted.
    _dir: TestDir,
}

pub struct Submitted {
    pub wave_id: u64,
    pub records: PathBuf,
    /// `(task id, array size)`; `None` for a single task.
    pub expected: Vec<(&'static str, Option<u32>)>,
}

impl Scenario {
    /// Three coordinators with their data in the scenario's directory, and the workers.
    pub async fn start(
        name: &'static str,
        coordinator_args: &[&str],
        worker_args: &[&str],
        queue_depth: u32,
    ) -> Scenario {
        let dir = test_dir(name).unwrap();
        let data_dirs = (1..=3).map(|id| dir.path.join(format!("c{id}"))).collect();
        Self::start_in(
            name,
            dir,
            data_dirs,
            coordinator_args,
            worker_args,
            queue_depth,
        )
        .await
    }

    /// One coordinator per data dir (their ids in order from 1), and the workers; `dir`
    /// holds the records and is removed when the scenario is dropped.
    pub async fn start_in(
        name: &'static str,
        dir: TestDir,
        data_dirs: Vec<PathBuf>,
        coordinator_args: &[&str],
        worker_args: &[&str],
        queue_depth: u32,
    ) -> Scenario {
        let root = dir.path.clone();
        let group = Group::start_in(&data_dirs, coordinator_args).unwrap();
        let queue = queue_depth.to_string();
        let worker_args: Vec<String> = ["--throttle", "off", "--queue-depth", &queue]
            .iter()
            .chain(worker_args)
            .map(|s| s.to_string())
            .collect();
        let workers = (1..=N_WORKERS)
            .map(|i| Some(start_scenario_worker(&group, i, &worker_args)))
            .collect();
        let leader = group.wait_leader(0, Duration::from_secs(30)).await;
        wait_ready(group.url(leader), N_WORKERS as usize)
            .await
            .unwrap();
        Scenario {
            name,
            started: Instant::now(),
            root,
            group,
            workers,
            worker_args,
            queue_depth,
            waves: Vec::new(),
            disks: Vec::new(),
            _dir: dir,
        }
    }

    /// Starts worker `w<i>` again (after it was killed).
    pub fn restart_worker(&mut self, i: u32) {
        let worker = start_scenario_worker(&self.group, i, &self.worker_args);
        self.workers[(i - 1) as usize] = Some(worker);
    }

    /// Most micro-tasks the workers can hold at once (running plus queued): what one
    /// disruption can cause to run again.
    pub fn in_flight_bound(&self) -> usize {
        (N_WORKERS * (SLOTS + self.queue_depth)) as usize
    }

    /// A fresh directory for one wave's records.
    pub fn records_dir(&self, label: &str) -> PathBuf {
        let dir = self.root.join("records").join(label);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// Submits through a live member (following "not leader" to the leader) and remembers
    /// the acknowledged wave.
    pub async fn submit(
        &mut self,
        spec: &str,
        records: &Path,
        expected: &[(&'static str, Option<u32>)],
    ) -> u64 {
        let via = self.group.live_ids()[0];
        let (wave_id, _) =
            submit_following_leader(self.group.url(via), spec, Duration::from_secs(30))
                .await
                .unwrap();
        self.waves.push(Submitted {
            wave_id,
            records: records.to_path_buf(),
            expected: expected.to_vec(),
        });
        wave_id
    }

    /// The common checks; prints the summary line, then asserts. `disruptions` scales the
    /// bound on extra executions; `figures` and `note` go into the summary line.
    pub async fn finish(&self, disruptions: usize, figures: &str, note: &str) {
        let leader = self.group.wait_leader(0, Duration::from_secs(30)).await;
        let mut tally = Tally::default();
        for wave in &self.waves {
            let summary = self
                .group
                .wait_finished(wave.wave_id, Duration::from_secs(60))
                .await;
            assert_eq!(summary.state(), pb::WaveState::Succeeded, "{summary:?}");
            let tasks = list_tasks(self.group.url(leader), wave.wave_id)
                .await
                .unwrap();
            tally.add(
                &wave.expected,
                &tasks,
                &read_records(&wave.records).unwrap(),
            );
        }
        let ids: Vec<u64> = self.waves.iter().map(|w| w.wave_id).collect();
        let waves_lost = acknowledged_waves_lost(&self.group, &ids).await;
        let agreement = members_agree(&self.group, leader, &ids).await;
        let bound = disruptions * self.in_flight_bound();
        eprintln!(
            "reliability {}: {} micro-tasks; lost {}, recorded twice {}, acknowledged waves \
             lost {}; {figures}; extra executions {} (bound {bound}){}{}; re-dispatched {}{}; \
             members agree: {}; {:.1} s",
            self.name,
            tally.n_micro_tasks,
            tally.lost.len(),
            tally.recorded_twice.len(),
            waves_lost.len(),
            tally.extra_executions,
            tally.extra_detail(),
            if note.is_empty() {
                String::new()
            } else {
                format!(" [{note}]")
            },
            tally.redispatched.len(),
            tally.redispatch_detail(),
            if agreement.is_ok() { "yes" } else { "NO" },
            self.started.elapsed().as_secs_f64(),
        );
        assert!(tally.lost.is_empty(), "micro-tasks lost: {:?}", tally.lost);
        assert!(
            tally.recorded_twice.is_empty(),
            "listed more than once by the coordinator: {:?}",
            tally.recorded_twice
        );
        assert!(
            tally.unexpected.is_empty(),
            "unexpected micro-tasks: {:?}",
            tally.unexpected
        );
        assert!(
            waves_lost.is_empty(),
            "acknowledged waves missing (member, wave): {waves_lost:?}"
        );
        if let Err(e) = agreement {
            panic!("{e}");
        }
        assert!(
            tally.extra_executions <= bound,
            "{} extra executions after {disruptions} disruption(s); at most {bound} \
             micro-tasks can be in flight per disruption",
            tally.extra_executions
        );
    }
}

/// Starts worker `w<i>` with `args`, reaching the group through all its members.
fn start_scenario_worker(group: &Group, i: u32, args: &[String]) -> Proc {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    start_worker(&group.all_urls(), &format!("w{i}"), SLOTS, &args).unwrap()
}

/// What the waves' micro-tasks came to, from the leader's `ListTasks` and the records.
#[derive(Default)]
pub struct Tally {
    n_micro_tasks: usize,
    /// Not `succeeded` on the leader, missing from its list, or never ran.
    lost: Vec<String>,
    /// Listed more than once by the coordinator.
    recorded_twice: Vec<String>,
    /// Listed or recorded but not in the wave.
    unexpected: Vec<String>,
    /// Runs beyond one per micro-task.
    extra_executions: usize,
    /// `task[index]: attempts of its runs (on which node) → the attempt the coordinator kept`.
    extras: Vec<String>,
    /// Micro-tasks whose recorded attempt is above 1: `task[index] #attempt on node`.
    redispatched: Vec<String>,
}

impl Tally {
    fn add(
        &mut self,
        expected: &[(&'static str, Option<u32>)],
        tasks: &[pb::MicroTaskInfo],
        records: &[Record],
    ) {
        let mut want: Vec<(String, String)> = Vec::new();
        for (task, size) in expected {
            match size {
                Some(n) => want.extend((0..*n).map(|i| (task.to_string(), i.to_string()))),
                None => want.push((task.to_string(), "-".to_string())),
            }
        }
        self.n_micro_tasks += want.len();
        let mut listed: BTreeMap<(String, String), Vec<&pb::MicroTaskInfo>> = BTreeMap::new();
        for t in tasks {
            let index = t.index.map_or("-".to_string(), |i| i.to_string());
            listed
                .entry((t.task_id.clone(), index))
                .or_default()
                .push(t);
        }
        // A task that is not an array sees `VENOM_TASK_INDEX=0`; its micro-task has no index.
        let single = |task: &str| expected.iter().any(|(t, n)| *t == task && n.is_none());
        let mut runs: BTreeMap<(String, String), Vec<&Record>> = BTreeMap::new();
        for r in records {
            let index = if single(&r.task) {
                "-".to_string()
            } else {
                r.index.clone()
            };
            runs.entry((r.task.clone(), index)).or_default().push(r);
        }
        let name = |(task, index): &(String, String)| {
            if index == "-" {
                task.clone()
            } else {
                format!("{task}[{index}]")
            }
        };
        for key in &want {
            let entries = listed.get(key).map(Vec::as_slice).unwrap_or(&[]);
            let ran = runs.get(key).map(Vec::as_slice).unwrap_or(&[]);
            if entries.len() > 1 {
                self.recorded_twice.push(name(key));
            }
            match entries.first() {
                Some(t) if t.state() == pb::TaskState::Succeeded && !ran.is_empty() => {}
                Some(t) => self.lost.push(format!(
                    "{} ({:?}, {} runs)",
                    name(key),
                    t.state(),
                    ran.len()
                )),
                None => self.lost.push(format!("{} (not listed)", name(key))),
            }
            if let Some(t) = entries.first() {
                if t.attempt > 1 {
                    self.redispatched
                        .push(format!("{} #{} on {}", name(key), t.attempt, t.node));
                }
            }
            if ran.len() > 1 {
                self.extra_executions += ran.len() - 1;
                let mut attempts: Vec<String> = ran
                    .iter()
                    .map(|r| format!("#{} on {}", r.attempt, r.node))
                    .collect();
                attempts.sort();
                let kept = entries
                    .first()
                    .map_or("none".to_string(), |t| format!("#{}", t.attempt));
                self.extras.push(format!(
                    "{} ran {} → kept {kept}",
                    name(key),
                    attempts.join(", ")
                ));
            }
        }
        let want: std::collections::BTreeSet<_> = want.into_iter().collect();
        for key in listed.keys().chain(runs.keys()) {
            if !want.contains(key) {
                self.unexpected.push(name(key));
            }
        }
    }

    fn extra_detail(&self) -> String {
        brief_list(&self.extras)
    }

    fn redispatch_detail(&self) -> String {
        brief_list(&self.redispatched)
    }
}

/// `: a; b; …` with at most eight items, or nothing for an empty list.
pub fn brief_list(items: &[String]) -> String {
    if items.is_empty() {
        return String::new();
    }
    let shown: Vec<&str> = items.iter().take(8).map(String::as_str).collect();
    let more = items.len().saturating_sub(shown.len());
    format!(
        ": {}{}",
        shown.join("; "),
        if more > 0 {
            format!("; … {more} more")
        } else {
            String::new()
        }
    )
}

/// `[a, b, c] ms (p50 x, max y)`.
pub fn ms_figures(values: &[u128]) -> String {
    let mut sorted = values.to_vec();
    sorted.sort_unstable();
    match (sorted.get((sorted.len().max(1) - 1) / 2), sorted.last()) {
        (Some(p50), Some(max)) => format!("{values:?} ms (p50 {p50}, max {max})"),
        _ => "none".to_string(),
    }
}

/// `(member, wave)` for every acknowledged wave a live member does not list.
pub async fn acknowledged_waves_lost(group: &Group, wave_ids: &[u64]) -> Vec<(u64, u64)> {
    let mut missing = Vec::new();
    for id in group.live_ids() {
        let deadline = Instant::now() + Duration::from_secs(20);
        let listed = loop {
            if let Some(waves) = list_waves(group.url(id)).await {
                break waves;
            }
            assert!(
                Instant::now() < deadline,
                "member {id} did not answer ListWaves within 20 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        for &wave_id in wave_ids {
            if !listed.iter().any(|w| w.wave_id == wave_id) {
                missing.push((id, wave_id));
            }
        }
    }
    missing
}

/// Whether every member answers `ListWaves`, and `GetWave` and `ListTasks` for each wave,
/// exactly as the leader does (waiting up to 20 s for a member still catching up).
pub async fn members_agree(group: &Group, leader: u64, wave_ids: &[u64]) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut differing = Vec::new();
        let reference_waves = list_waves(group.url(leader)).await;
        for &wave_id in wave_ids {
            let reference = (
                get_wave(group.url(leader), wave_id).await,
                list_tasks(group.url(leader), wave_id).await,
            );
            if reference.0.is_none() || reference.1.is_none() {
                differing.push(format!("leader {leader} did not answer for wave {wave_id}"));
                continue;
            }
            for id in group.ids() {
                let view = (
                    get_wave(group.url(id), wave_id).await,
                    list_tasks(group.url(id), wave_id).await,
                );
                if view.0 != reference.0 {
                    differing.push(format!(
                        "member {id} GetWave({wave_id}) = {:?}, leader {:?}",
                        view.0, reference.0
                    ));
                }
                if view.1 != reference.1 {
                    differing.push(format!(
                        "member {id} ListTasks({wave_id}) differs from the leader's"
                    ));
                }
            }
        }
        for id in group.ids() {
            if reference_waves.is_none() || list_waves(group.url(id)).await != reference_waves {
                differing.push(format!("member {id} ListWaves differs from the leader's"));
            }
        }
        if differing.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "members disagree after 20 s: {}",
                differing.join("; ")
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
