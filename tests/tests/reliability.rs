//! Reliability scenarios with the real binaries on loopback: each starts three
//! `venom-coordinator` processes (one raft group) and two `venom-worker` processes, runs
//! a wave and delivers crashes with SIGKILL: the leader killed three times during a
//! 10,000-micro-task wave, a worker killed mid-task, all three coordinators killed at
//! once and restarted, and a follower restarted after the leader compacted its log past
//! everything the follower holds.
//!
//! Every scenario checks the same things: each wave succeeds; the leader's `ListTasks`
//! lists every micro-task exactly once, `succeeded`; every micro-task ran at least once
//! (each run writes a record file); every wave a submit acknowledged is listed by every
//! member; and every member answers `ListWaves`, `GetWave` and `ListTasks` identically.
//! Execution is at-least-once, so runs beyond one per micro-task are counted, explained
//! by their attempt numbers, and bounded by what can be in flight per disruption
//! (workers × (slots + queue depth)). Each scenario prints one summary line (see it
//! with `--nocapture`); docs/RELIABILITY.md reports those figures.
//!
//! The scenarios take turns (one lock): run side by side they would overload a small
//! machine and slow each other's elections. Set `VENOM_KEEP_TEST_DIR=1` to keep the
//! coordinators' data dirs and logs.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use venom_coordinator::storage::Store;
use venom_proto::v1 as pb;
use venom_tests::*;

const N_WORKERS: u32 = 2;
const SLOTS: u32 = 2;

/// Held by the running scenario.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// One scenario's processes and files.
struct Scenario {
    name: &'static str,
    started: Instant,
    root: PathBuf,
    group: Group,
    /// `w1`, `w2`; `None` once killed.
    workers: Vec<Option<Proc>>,
    queue_depth: u32,
    /// Every wave id a submit returned, with its record dir and expected micro-tasks.
    waves: Vec<Submitted>,
    /// Dropped last, after every process is gone.
    _dir: TestDir,
}

struct Submitted {
    wave_id: u64,
    records: PathBuf,
    /// `(task id, array size)`; `None` for a single task.
    expected: Vec<(&'static str, Option<u32>)>,
}

impl Scenario {
    async fn start(
        name: &'static str,
        coordinator_args: &[&str],
        worker_args: &[&str],
        queue_depth: u32,
    ) -> Scenario {
        let dir = test_dir(name).unwrap();
        let root = dir.path.clone();
        let group = Group::start(&root, 3, coordinator_args).unwrap();
        let queue = queue_depth.to_string();
        let mut args = vec!["--throttle", "off", "--queue-depth", &queue];
        args.extend_from_slice(worker_args);
        let workers = (1..=N_WORKERS)
            .map(|i| Some(start_worker(&group.all_urls(), &format!("w{i}"), SLOTS, &args).unwrap()))
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
            queue_depth,
            waves: Vec::new(),
            _dir: dir,
        }
    }

    /// Most micro-tasks the workers can hold at once (running plus queued): what one
    /// disruption can cause to run again.
    fn in_flight_bound(&self) -> usize {
        (N_WORKERS * (SLOTS + self.queue_depth)) as usize
    }

    /// A fresh directory for one wave's records.
    fn records_dir(&self, label: &str) -> PathBuf {
        let dir = self.root.join("records").join(label);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// Submits through a live member (following "not leader" to the leader) and remembers
    /// the acknowledged wave.
    async fn submit(
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
    async fn finish(&self, disruptions: usize, figures: &str, note: &str) {
        let leader = self.group.wait_leader(0, Duration::from_secs(30)).await;
        let mut tally = Tally::default();
        for wave in &self.waves {
            let summary = self
                .group
                .wait_finished(wave.wave_id, Duration::from_secs(60))
                .await;
            assert_eq!(summary.state, "succeeded", "{summary:?}");
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

/// What the waves' micro-tasks came to, from the leader's `ListTasks` and the records.
#[derive(Default)]
struct Tally {
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
                Some(t) if t.state == "succeeded" && !ran.is_empty() => {}
                Some(t) => {
                    self.lost
                        .push(format!("{} ({}, {} runs)", name(key), t.state, ran.len()))
                }
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
fn brief_list(items: &[String]) -> String {
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
fn ms_figures(values: &[u128]) -> String {
    let mut sorted = values.to_vec();
    sorted.sort_unstable();
    match (sorted.get((sorted.len().max(1) - 1) / 2), sorted.last()) {
        (Some(p50), Some(max)) => format!("{values:?} ms (p50 {p50}, max {max})"),
        _ => "none".to_string(),
    }
}

/// `(member, wave)` for every acknowledged wave a live member does not list.
async fn acknowledged_waves_lost(group: &Group, wave_ids: &[u64]) -> Vec<(u64, u64)> {
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
async fn members_agree(group: &Group, leader: u64, wave_ids: &[u64]) -> Result<(), String> {
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

/// `(first_index, last_index)` of the raft log stored in `dir` (the member must be down).
fn log_bounds(dir: &Path) -> (u64, u64) {
    let store = Store::open(dir).expect("open a stopped member's store");
    (
        store.first_log_index().expect("first index"),
        store.last_log_index().expect("last index"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_killed_three_times_during_a_10000_micro_task_wave() {
    const N_MICRO_TASKS: u32 = 10_000;
    /// Succeeded micro-tasks at which the leader is killed.
    const KILL_AT: [u64; 3] = [1_500, 4_000, 6_500];
    let _turn = ONE_AT_A_TIME.lock().await;
    let mut s = Scenario::start("leader kills", &[], &[], 8).await;
    let records = s.records_dir("fan");
    let spec = format!(
        "name = \"leader-kills\"\n[[task]]\nid = \"fan\"\narray = {N_MICRO_TASKS}\nrun = {}\n",
        toml_str(&record_only(&records))
    );
    let wave_id = s
        .submit(&spec, &records, &[("fan", Some(N_MICRO_TASKS))])
        .await;

    let mut leader = s.group.wait_leader(0, Duration::from_secs(20)).await;
    let mut killed = Vec::new();
    let mut progress_at_kill = Vec::new();
    let mut failover_ms = Vec::new();
    let mut catch_up_ms = Vec::new();
    let mut resume_ms = Vec::new();
    for at in KILL_AT {
        s.group
            .wait_succeeded(leader, wave_id, at, Duration::from_secs(120))
            .await;
        // Whoever leads now (normally still `leader`) is the one to kill.
        leader = s.group.wait_leader(0, Duration::from_secs(20)).await;
        let summary = get_wave(s.group.url(leader), wave_id).await.unwrap();
        assert_eq!(
            summary.state, "running",
            "the wave must still be running when its leader dies: {summary:?}"
        );
        let at_kill = summary.counts.as_ref().map_or(0, |c| c.succeeded);
        progress_at_kill.push(at_kill);

        let victim = s.group.kill9(leader);
        let t_kill = Instant::now();
        killed.push(leader);
        let new_leader = s.group.wait_leader(leader, Duration::from_secs(20)).await;
        failover_ms.push(t_kill.elapsed().as_millis());

        s.group.restart(leader, victim).unwrap();
        let t_restart = Instant::now();
        let bound = s.in_flight_bound() as u64;
        let group = &s.group;
        tokio::join!(
            async {
                group
                    .wait_caught_up(leader, new_leader, Duration::from_secs(30))
                    .await;
                catch_up_ms.push(t_restart.elapsed().as_millis());
            },
            async {
                // More results than could have been in flight when the leader died.
                group
                    .wait_succeeded(
                        new_leader,
                        wave_id,
                        at_kill + bound + 1,
                        Duration::from_secs(60),
                    )
                    .await;
                resume_ms.push(t_kill.elapsed().as_millis());
            }
        );
        leader = new_leader;
    }
    let summary = s
        .group
        .wait_finished(wave_id, Duration::from_secs(180))
        .await;
    assert_eq!(summary.state, "succeeded", "{summary:?}");
    assert_eq!(summary.n_micro_tasks, u64::from(N_MICRO_TASKS));
    let makespan_s = summary.makespan_ms as f64 / 1000.0;

    s.finish(
        KILL_AT.len(),
        &format!(
            "killed leaders {killed:?} at {progress_at_kill:?} succeeded; failover {}; \
             killed member caught up {}; work resumed {}; makespan {makespan_s:.1} s",
            ms_figures(&failover_ms),
            ms_figures(&catch_up_ms),
            ms_figures(&resume_ms),
        ),
        "",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_killed_mid_task_has_its_micro_tasks_redone_elsewhere() {
    const N_MICRO_TASKS: u32 = 12;
    let _turn = ONE_AT_A_TIME.lock().await;
    // A short TTL so the dead worker is noticed quickly; live workers beat 5× as often.
    let mut s = Scenario::start(
        "worker kill",
        &["--heartbeat-ttl-ms", "1500"],
        &["--heartbeat-ms", "300"],
        2,
    )
    .await;
    let records = s.records_dir("work");
    let spec = format!(
        "name = \"worker-kill\"\n[[task]]\nid = \"work\"\narray = {N_MICRO_TASKS}\nrun = {}\n",
        toml_str(&recording(&records, "sleep 1"))
    );
    let wave_id = s
        .submit(&spec, &records, &[("work", Some(N_MICRO_TASKS))])
        .await;

    // Kill w1 once it runs something; note what it held (running or queued).
    let leader = s.group.wait_leader(0, Duration::from_secs(20)).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let held_by_w1: Vec<u32> = loop {
        if let Some(tasks) = list_tasks(s.group.url(leader), wave_id).await {
            if tasks.iter().any(|t| t.node == "w1" && t.state == "running") {
                break tasks
                    .iter()
                    .filter(|t| {
                        t.node == "w1" && matches!(t.state.as_str(), "assigned" | "running")
                    })
                    .filter_map(|t| t.index)
                    .collect();
            }
        }
        assert!(Instant::now() < deadline, "w1 never ran a micro-task");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    s.workers[0].take().unwrap().kill9();
    let t_kill = Instant::now();

    // w1 is marked down after the TTL.
    let deadline = Instant::now() + Duration::from_secs(30);
    let down_ms = loop {
        let mut c = client(s.group.url(leader)).await.unwrap();
        if let Ok(nodes) = c.list_nodes(pb::ListNodesRequest {}).await {
            if nodes
                .into_inner()
                .nodes
                .iter()
                .any(|n| n.name == "w1" && n.state == "down")
            {
                break t_kill.elapsed().as_millis();
            }
        }
        assert!(Instant::now() < deadline, "w1 never marked down");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let summary = s
        .group
        .wait_finished(wave_id, Duration::from_secs(60))
        .await;
    assert_eq!(summary.state, "succeeded", "{summary:?}");

    // What w1 held was redone on w2 with a later attempt.
    let tasks = list_tasks(s.group.url(leader), wave_id).await.unwrap();
    for index in &held_by_w1 {
        let t = tasks.iter().find(|t| t.index == Some(*index)).unwrap();
        assert!(
            t.node == "w2" && t.attempt > 1,
            "work[{index}] was on w1 when it died, yet ended {t:?}"
        );
    }
    // The killed worker's micro-tasks run in their own process groups, so the ones it was
    // running outlive it, finish and write their records: extra executions by design.
    let orphans = read_records(&records)
        .unwrap()
        .iter()
        .filter(|r| r.node == "w1")
        .filter(|r| {
            tasks
                .iter()
                .any(|t| t.index.map(|i| i.to_string()) == Some(r.index.clone()) && t.node != "w1")
        })
        .count();
    s.finish(
        1,
        &format!("w1 held {held_by_w1:?} when killed; marked down {down_ms} ms after the kill"),
        &format!(
            "{orphans} of them by the killed worker's orphaned children (own process group, \
             outlive a SIGKILL of the worker, finish their attempt #1)"
        ),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_three_coordinators_killed_mid_wave_and_restarted() {
    const N_MICRO_TASKS: u32 = 300;
    let _turn = ONE_AT_A_TIME.lock().await;
    let mut s = Scenario::start("full-cluster restart", &[], &[], 4).await;
    let records = s.records_dir("fan");
    let spec = format!(
        "name = \"full-restart\"\n\
         [[task]]\nid = \"fan\"\narray = {N_MICRO_TASKS}\nrun = {}\n\
         [[task]]\nid = \"after\"\ndeps = [\"fan\"]\nrun = {}\n",
        toml_str(&recording(&records, "sleep 0.05")),
        toml_str(&recording(&records, "true")),
    );
    let wave_id = s
        .submit(
            &spec,
            &records,
            &[("fan", Some(N_MICRO_TASKS)), ("after", None)],
        )
        .await;
    let leader = s.group.wait_leader(0, Duration::from_secs(20)).await;
    s.group
        .wait_succeeded(leader, wave_id, 80, Duration::from_secs(60))
        .await;
    let summary = get_wave(s.group.url(leader), wave_id).await.unwrap();
    assert_eq!(summary.state, "running", "{summary:?}");
    let at_kill = summary.counts.as_ref().map_or(0, |c| c.succeeded);

    let victims: Vec<(u64, Coordinator)> = s
        .group
        .ids()
        .into_iter()
        .map(|id| (id, s.group.kill9(id)))
        .collect();
    // The workers keep running what they hold; their results wait for a leader.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for (id, victim) in victims {
        s.group.restart(id, victim).unwrap();
    }
    let t_restart = Instant::now();
    let new_leader = s.group.wait_leader(0, Duration::from_secs(30)).await;
    let election_ms = t_restart.elapsed().as_millis();
    let bound = s.in_flight_bound() as u64;
    s.group
        .wait_succeeded(
            new_leader,
            wave_id,
            at_kill + bound + 1,
            Duration::from_secs(60),
        )
        .await;
    let resume_ms = t_restart.elapsed().as_millis();
    let summary = s
        .group
        .wait_finished(wave_id, Duration::from_secs(90))
        .await;
    assert_eq!(summary.state, "succeeded", "{summary:?}");

    s.finish(
        1,
        &format!(
            "all members killed at {at_kill} succeeded, down 500 ms; a leader {election_ms} ms \
             after the restart; work resumed {resume_ms} ms after the restart"
        ),
        "",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follower_restarted_after_compaction_catches_up_by_snapshot() {
    const COMPACT_AFTER_ENTRIES: u64 = 50;
    /// How far the leader's commit index must move past the stopped follower's log.
    const LEAD_ENTRIES: u64 = 300;
    let _turn = ONE_AT_A_TIME.lock().await;
    let compact = COMPACT_AFTER_ENTRIES.to_string();
    let mut s = Scenario::start(
        "follower after compaction",
        &["--compact-after-entries", &compact],
        &[],
        4,
    )
    .await;
    let wave = |name: &str, n: u32, dir: &Path| {
        format!(
            "name = \"{name}\"\n[[task]]\nid = \"fan\"\narray = {n}\nrun = {}\n",
            toml_str(&record_only(dir))
        )
    };
    let records = s.records_dir("before");
    let first = s
        .submit(
            &wave("before", 50, &records),
            &records,
            &[("fan", Some(50))],
        )
        .await;
    s.group.wait_finished(first, Duration::from_secs(60)).await;

    let leader = s.group.wait_leader(0, Duration::from_secs(20)).await;
    let follower = s.group.ids().into_iter().find(|&id| id != leader).unwrap();
    let mut victim = s.group.kill9(follower);
    let (_, follower_last) = log_bounds(&victim.data_dir);

    // Work while the follower is down, until the leader's log is far past the follower's.
    let mut n_waves_while_down = 0;
    loop {
        let label = format!("down-{n_waves_while_down}");
        let records = s.records_dir(&label);
        let id = s
            .submit(
                &wave(&label, 200, &records),
                &records,
                &[("fan", Some(200))],
            )
            .await;
        s.group.wait_finished(id, Duration::from_secs(60)).await;
        n_waves_while_down += 1;
        let leader = s.group.wait_leader(0, Duration::from_secs(20)).await;
        let commit = cluster_status(s.group.url(leader))
            .await
            .map_or(0, |c| c.commit_index);
        if commit >= follower_last + LEAD_ENTRIES {
            break;
        }
        assert!(
            n_waves_while_down < 30,
            "the leader's commit index stays below {}",
            follower_last + LEAD_ENTRIES
        );
    }
    // Let the leader checkpoint (every 200 ms) and compact behind its last entries.
    tokio::time::sleep(Duration::from_millis(1_000)).await;

    // The restarted follower logs the snapshot it installs.
    victim.log_filter = format!("{},venom_coordinator::replica=info", test_log_filter());
    let log_path = victim.log_path();
    let log_before = std::fs::read_to_string(&log_path).unwrap_or_default().len();
    s.group.restart(follower, victim).unwrap();
    let t_restart = Instant::now();
    let leader = s.group.wait_leader(follower, Duration::from_secs(20)).await;
    s.group
        .wait_caught_up(follower, leader, Duration::from_secs(60))
        .await;
    let catch_up_ms = t_restart.elapsed().as_millis();
    let log = std::fs::read_to_string(&log_path).unwrap();
    let installed = log[log_before..].contains("installed state-machine snapshot");
    assert!(
        installed,
        "follower {follower} (log ending at {follower_last}) caught up without a snapshot; \
         its log: {}",
        &log[log_before..]
    );
    let commit = cluster_status(s.group.url(leader))
        .await
        .unwrap()
        .commit_index;

    s.finish(
        1,
        &format!(
            "follower {follower} stopped at log index {follower_last}, {n_waves_while_down} \
             waves while down, leader commit {commit}; caught up by snapshot in {catch_up_ms} ms"
        ),
        "",
    )
    .await;
}
