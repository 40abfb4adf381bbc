//! Power loss, with the real binaries: each coordinator keeps its data dir on its own
//! [`PowerCutFs`] mount (a file system that keeps every write not yet fsynced in memory
//! and drops it on command), and a power cut is SIGKILL plus dropping what its disk had
//! not made durable. Scenarios:
//!
//! - one coordinator cut after N acknowledged waves (N = 1, 5, 50), its workers with it;
//! - all three members cut at once in the middle of a wave;
//! - only the leader cut;
//! - the power going in the middle of a sync, leaving a torn tail in the data file;
//! - a known member restarted on an empty data dir, and one on another cluster's data dir
//!   (must refuse; then brought back the documented way);
//! - a member restored from an old copy of its data dir (must stop; then brought back).
//!
//! Each checks what clients were told before the cut against what the cluster says after
//! it: acknowledged waves lost 0, results reported succeeded and lost (or recorded again)
//! 0, wave ids never handed out twice; and then the usual end of every reliability
//! scenario (every wave completes, nothing lost, nothing recorded twice, members agree).
//! Each prints a summary line (`--nocapture`); docs/RELIABILITY.md reports them.
//! `VENOM_POWER_LOSS_RUNS=N` repeats every scenario N times (default 1).

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use venom_proto::v1 as pb;
use venom_tests::powercut::{CutReport, PowerCutFs};
use venom_tests::scenario::*;
use venom_tests::*;

/// How many times each scenario runs (`VENOM_POWER_LOSS_RUNS`, default 1).
fn runs() -> u32 {
    std::env::var("VENOM_POWER_LOSS_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
        .max(1)
}

/// A scenario whose `n` coordinators keep their data on power-cut disks.
async fn start_on_disks(name: &'static str, n: u64, queue_depth: u32) -> Scenario {
    let dir = test_dir(name).unwrap();
    let mut disks = Vec::new();
    let mut data_dirs = Vec::new();
    for id in 1..=n {
        let mountpoint = dir.path.join(format!("disk{id}"));
        std::fs::create_dir_all(&mountpoint).unwrap();
        let disk = PowerCutFs::mount(&mountpoint).unwrap();
        // The data dir is the disk itself; the coordinator's log goes beside it, on the
        // test's own disk, and survives the cut.
        data_dirs.push(disk.path().to_path_buf());
        disks.push(disk);
    }
    let mut s = Scenario::start_in(name, dir, data_dirs, &[], &[], queue_depth).await;
    s.disks = disks;
    s
}

/// Waits for `coordinator`, which must refuse its data dir: exit 78 (EX_CONFIG) within
/// 20 s. Returns the refusal it printed last (its log is appended to across starts).
fn refusal(mut coordinator: Coordinator) -> String {
    let code = coordinator.wait_exit(Duration::from_secs(20));
    let log = std::fs::read_to_string(coordinator.log_path()).unwrap();
    assert_eq!(code, Some(78), "not refused with EX_CONFIG; log:\n{log}");
    assert!(!log.contains("panicked"), "{log}");
    log.lines()
        .rev()
        .find(|line| line.starts_with("venom-coordinator: "))
        .unwrap_or_else(|| panic!("no refusal printed; log:\n{log}"))
        .to_string()
}

/// Copies a directory tree.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// What clients were told: every acknowledged wave's name, and every micro-task a
/// linearizable read reported succeeded, with the attempt that succeeded.
#[derive(Debug, Default)]
struct Reported {
    waves: BTreeMap<u64, String>,
    succeeded: BTreeMap<(u64, String, Option<u32>), u32>,
}

impl Reported {
    /// Reads it from `url` (`GetWave` and `ListTasks` pass a raft read barrier); a wave
    /// the member does not know is left out.
    async fn read(url: &str, wave_ids: &[u64]) -> Reported {
        let mut reported = Reported::default();
        for &wave_id in wave_ids {
            let Some(wave) = get_wave(url, wave_id).await else {
                continue;
            };
            reported.waves.insert(wave_id, wave.name);
            for task in list_tasks(url, wave_id).await.unwrap_or_default() {
                if task.state() == pb::TaskState::Succeeded {
                    reported
                        .succeeded
                        .insert((wave_id, task.task_id, task.index), task.attempt);
                }
            }
        }
        reported
    }

    /// What `after` no longer says that this said: waves gone or renamed, and results
    /// gone or replaced by another attempt.
    fn lost_in(&self, after: &Reported) -> (Vec<u64>, Vec<String>) {
        let waves = self
            .waves
            .iter()
            .filter(|(id, name)| after.waves.get(id) != Some(name))
            .map(|(id, _)| *id)
            .collect();
        let results = self
            .succeeded
            .iter()
            .filter(|(key, attempt)| after.succeeded.get(key) != Some(attempt))
            .map(|((wave, task, index), attempt)| {
                format!(
                    "wave {wave} {task}{} #{attempt} → {:?}",
                    index.map_or(String::new(), |i| format!("[{i}]")),
                    after.succeeded.get(&(*wave, task.clone(), *index))
                )
            })
            .collect();
        (waves, results)
    }
}

/// A wave of `n` recorded micro-tasks taking `sleep` seconds each, plus one after them.
fn wave_spec(name: &str, n: u32, sleep: &str, records: &Path) -> String {
    format!(
        "name = \"{name}\"\n\
         [[task]]\nid = \"fan\"\narray = {n}\nrun = {}\n\
         [[task]]\nid = \"after\"\ndeps = [\"fan\"]\nrun = {}\n",
        toml_str(&recording(records, &format!("sleep {sleep}"))),
        toml_str(&recording(records, "true")),
    )
}

/// Submits `n_waves` waves of `array` micro-tasks each; returns their ids.
async fn submit_waves(s: &mut Scenario, n_waves: u32, array: u32, sleep: &str) -> Vec<u64> {
    let mut ids = Vec::new();
    for _ in 0..n_waves {
        let label = format!("w{}", s.waves.len());
        let records = s.records_dir(&label);
        let spec = wave_spec(&label, array, sleep, &records);
        ids.push(
            s.submit(&spec, &records, &[("fan", Some(array)), ("after", None)])
                .await,
        );
    }
    ids
}

/// Waits until at least `n` micro-tasks of `wave_ids` succeeded, as `leader` reports it.
async fn wait_total_succeeded(s: &Scenario, leader: u64, wave_ids: &[u64], n: u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut done = 0;
        for &id in wave_ids {
            if let Some(w) = get_wave(s.group.url(leader), id).await {
                done += w.counts.as_ref().map_or(0, |c| c.succeeded);
            }
        }
        if done >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "fewer than {n} succeeded in 60 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Power cut on coordinator `id`'s machine: SIGKILL, then its disk drops what it had not
/// made durable. Returns the process (to restart) and what the disk lost.
fn power_cut(s: &mut Scenario, id: u64) -> (Coordinator, CutReport) {
    let victim = s.group.kill9(id);
    let report = s.disks[(id - 1) as usize].cut();
    (victim, report)
}

/// The single coordinator's machine after its power went: its workers went with it (they
/// are killed now); the coordinator `victim` and the workers start again.
fn machine_back_up(s: &mut Scenario, victim: Coordinator) {
    for worker in s.workers.iter_mut().flatten() {
        worker.kill9();
    }
    s.group.restart(1, victim).unwrap();
    for i in 1..=N_WORKERS {
        s.restart_worker(i);
    }
}

/// After a cut: compares what clients were told with what the cluster says now, checks a
/// new wave gets an id above every acknowledged one, and returns the summary text.
async fn check_after_cut(s: &mut Scenario, before: &Reported, what: &str) -> String {
    let leader = s.group.wait_leader(0, Duration::from_secs(30)).await;
    let ids: Vec<u64> = before.waves.keys().copied().collect();
    let after = Reported::read(s.group.url(leader), &ids).await;
    let (waves_lost, results_lost) = before.lost_in(&after);
    let highest = ids.iter().copied().max().unwrap_or(0);
    let records = s.records_dir("after-cut");
    let next = s
        .submit(
            &wave_spec("after-cut", 2, "0", &records),
            &records,
            &[("fan", Some(2)), ("after", None)],
        )
        .await;
    assert!(
        waves_lost.is_empty(),
        "{what}: acknowledged waves lost or changed: {waves_lost:?}"
    );
    assert!(
        results_lost.is_empty(),
        "{what}: results reported succeeded, lost or replaced: {results_lost:?}"
    );
    assert!(
        next > highest,
        "{what}: a new wave got id {next}, not above the acknowledged {highest}"
    );
    format!(
        "{what}: {} waves acknowledged, {} results reported succeeded before the cut; \
         waves lost {}, results lost {}; next wave id {next} (highest acknowledged {highest})",
        before.waves.len(),
        before.succeeded.len(),
        waves_lost.len(),
        results_lost.len(),
    )
}

#[test]
fn sleds_own_flush_loses_data_and_the_stores_flush_keeps_it() {
    let dir = test_dir("sled flush").unwrap();
    let mountpoint = dir.path.join("disk");
    std::fs::create_dir_all(&mountpoint).unwrap();
    let disk = PowerCutFs::mount(&mountpoint).unwrap();

    // sled alone: insert, flush (sync_file_range), cut.
    let raw = disk.path().join("raw");
    {
        let db = sled::Config::new()
            .path(&raw)
            .flush_every_ms(None)
            .open()
            .unwrap();
        db.insert(b"wave", b"acknowledged".to_vec()).unwrap();
        db.flush().unwrap();
    }
    let raw_cut = disk.cut();
    let db = sled::Config::new().path(&raw).open().unwrap();
    assert_eq!(
        db.get(b"wave").unwrap(),
        None,
        "sled's flush alone was durable after all ({raw_cut})"
    );
    drop(db);

    // The coordinator's store: the same, through `Store::flush`.
    use venom_coordinator::datadir::{self, Contents};
    let data_dir = disk.path().join("coordinator");
    let members = BTreeMap::from([(1, "http://127.0.0.1:7070".to_string())]);
    {
        let (store, contents) = datadir::open(&data_dir, 1).unwrap();
        assert_eq!(contents, Contents::Empty);
        store.bootstrap(&members, 1).unwrap();
        let mut state = venom_coordinator::state::State {
            members: members.clone(),
            next_wave_id: 42,
            cluster_id: 7,
            ..Default::default()
        };
        state.dirty.members = true;
        // At the founding point: a checkpoint never covers more than the log commits.
        store.persist_state(&mut state, 1).unwrap();
        store.flush().unwrap();
    }
    let store_cut = disk.cut();
    let (store, contents) = datadir::open(&data_dir, 1).unwrap();
    assert_eq!(contents, Contents::Member { cluster_id: 7 });
    let mut state = venom_coordinator::state::State::default();
    assert_eq!(store.load_state(&mut state).unwrap(), 1);
    assert_eq!(state.next_wave_id, 42);
    assert_eq!(state.members.keys().copied().collect::<Vec<_>>(), vec![1]);
    eprintln!("power loss, sled flush alone: {raw_cut}; Store::flush: {store_cut}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_coordinator_loses_power_after_n_acknowledged_waves() {
    let _turn = ONE_AT_A_TIME.lock().await;
    for run in 1..=runs() {
        for n_waves in [1u32, 5, 50] {
            let mut s = start_on_disks("one coordinator", 1, 4).await;
            let (array, sleep) = if n_waves == 50 {
                (8, "0.02")
            } else {
                (10, "0.05")
            };
            let ids = submit_waves(&mut s, n_waves, array, sleep).await;
            let total = u64::from(n_waves * (array + 1));
            wait_total_succeeded(&s, 1, &ids, (total / 4).max(3)).await;
            let before = Reported::read(s.group.url(1), &ids).await;

            // The whole machine: the coordinator and both workers lose power.
            let (victim, report) = power_cut(&mut s, 1);
            machine_back_up(&mut s, victim);
            let what = format!("run {run}, {n_waves} waves");
            let summary = check_after_cut(&mut s, &before, &what).await;
            s.finish(1, &format!("{summary}; {report}"), "").await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_three_members_lose_power_mid_wave() {
    let _turn = ONE_AT_A_TIME.lock().await;
    for run in 1..=runs() {
        let mut s = start_on_disks("three members cut", 3, 4).await;
        let ids = submit_waves(&mut s, 1, 400, "0.02").await;
        let leader = s.group.wait_leader(0, Duration::from_secs(20)).await;
        wait_total_succeeded(&s, leader, &ids, 100).await;
        let before = Reported::read(s.group.url(leader), &ids).await;
        assert_eq!(
            get_wave(s.group.url(leader), ids[0]).await.unwrap().state(),
            pb::WaveState::Running,
            "the wave must still run when the power goes"
        );

        // The workers live on other machines and keep running what they hold.
        let cut: Vec<(u64, Coordinator, CutReport)> = s
            .group
            .ids()
            .into_iter()
            .map(|id| {
                let (victim, report) = power_cut(&mut s, id);
                (id, victim, report)
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut reports = Vec::new();
        for (id, victim, report) in cut {
            s.group.restart(id, victim).unwrap();
            reports.push(format!("c{id} {report}"));
        }
        let t_restart = Instant::now();
        let new_leader = s.group.wait_leader(0, Duration::from_secs(30)).await;
        let election_ms = t_restart.elapsed().as_millis();
        let summary = check_after_cut(&mut s, &before, &format!("run {run}")).await;
        s.finish(
            1,
            &format!(
                "{summary}; leader {new_leader} elected {election_ms} ms after the restart; {}",
                reports.join("; ")
            ),
            "",
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_leader_loses_power() {
    let _turn = ONE_AT_A_TIME.lock().await;
    for run in 1..=runs() {
        let mut s = start_on_disks("leader cut", 3, 4).await;
        let ids = submit_waves(&mut s, 1, 400, "0.02").await;
        let leader = s.group.wait_leader(0, Duration::from_secs(20)).await;
        wait_total_succeeded(&s, leader, &ids, 100).await;
        let before = Reported::read(s.group.url(leader), &ids).await;

        let (victim, report) = power_cut(&mut s, leader);
        let t_cut = Instant::now();
        let new_leader = s.group.wait_leader(leader, Duration::from_secs(20)).await;
        let failover_ms = t_cut.elapsed().as_millis();
        s.group.restart(leader, victim).unwrap();
        let t_restart = Instant::now();
        s.group
            .wait_caught_up(leader, new_leader, Duration::from_secs(30))
            .await;
        let catch_up_ms = t_restart.elapsed().as_millis();
        let summary = check_after_cut(&mut s, &before, &format!("run {run}")).await;
        // The restarted member came back with its own state, not as a new one: no member
        // saw a follower whose log had lost entries it acknowledged.
        for id in s.group.ids() {
            let log = std::fs::read_to_string(
                s.group.members[(id - 1) as usize]
                    .as_ref()
                    .unwrap()
                    .log_path(),
            )
            .unwrap_or_default();
            assert!(
                !log.contains("lost log entries it had acknowledged"),
                "member {id} saw a member that lost acknowledged entries:\n{log}"
            );
        }
        s.finish(
            1,
            &format!(
                "{summary}; leader {leader} cut, {new_leader} led {failover_ms} ms later; the cut \
                 member caught up {catch_up_ms} ms after its restart; {report}"
            ),
            "",
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_power_goes_during_a_sync_leaving_a_torn_tail() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let mut kept_torn = 0;
    for run in 1..=runs() {
        for seed in 1..=3u64 {
            let mut s = start_on_disks("torn tail", 1, 4).await;
            let ids = submit_waves(&mut s, 3, 40, "0.01").await;
            wait_total_succeeded(&s, 1, &ids, 20).await;
            let before = Reported::read(s.group.url(1), &ids).await;

            // The next sync (a group commit's) meets the power cut: part of what it was
            // about to sync is on the disk, torn; the sync fails.
            s.disks[0].cut_torn_at_next_sync(seed);
            let deadline = Instant::now() + Duration::from_secs(30);
            let report = loop {
                if let Some(report) = s.disks[0].armed_cut_report() {
                    break report;
                }
                assert!(Instant::now() < deadline, "no sync within 30 s");
                tokio::time::sleep(Duration::from_millis(5)).await;
            };
            kept_torn += report.bytes_kept_torn;
            // A coordinator whose sync failed stops by itself: it must not go on as if it
            // had persisted what it could not.
            let exited = s.group.members[0]
                .as_mut()
                .unwrap()
                .wait_exit(Duration::from_secs(10));
            assert!(
                matches!(exited, Some(code) if code != 0),
                "after a failed sync the coordinator kept running or exited 0: {exited:?}"
            );
            let victim = s.group.kill9(1);
            machine_back_up(&mut s, victim);
            let what = format!("run {run}, seed {seed}");
            let summary = check_after_cut(&mut s, &before, &what).await;
            s.finish(
                1,
                &format!(
                    "{summary}; {report}; the coordinator exited {exited:?} on the failed sync"
                ),
                "",
            )
            .await;
        }
    }
    assert!(
        kept_torn > 0,
        "no torn cut kept any of the writes in flight: the tail was never torn"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_known_member_on_an_empty_data_dir_refuses_and_rejoins_the_documented_way() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let mut s = Scenario::start("empty data dir", &[], &[], 4).await;
    let ids = submit_waves(&mut s, 1, 20, "0").await;
    s.group.wait_finished(ids[0], Duration::from_secs(60)).await;
    let leader = s.group.wait_leader(0, Duration::from_secs(20)).await;
    let victim_id = s.group.ids().into_iter().find(|&id| id != leader).unwrap();
    let victim = s.group.kill9(victim_id);
    let (port, data_dir) = (victim.port, victim.data_dir.clone());
    let peers = s.group.peers_arg();
    let wipe = |dir: &Path| {
        std::fs::remove_dir_all(dir).unwrap();
        std::fs::create_dir_all(dir).unwrap();
    };
    wipe(&data_dir);

    // Restarted as it always is (with --bootstrap): its peers know it took part.
    let log = refusal(Coordinator::start_member(victim_id, port, &peers, &data_dir, &[]).unwrap());
    for needle in [
        "already took part",
        &format!("venomctl cluster remove {victim_id}"),
        &format!("venomctl cluster add {victim_id}"),
        "--join",
    ] {
        assert!(log.contains(needle), "`{needle}` missing from:\n{log}");
    }
    // With --join (as if it had just been added): its peers still count it as a member
    // that took part, so it must be removed and added back first.
    let log = refusal(
        Coordinator::start_member(victim_id, port, &peers, &data_dir, &["--join"]).unwrap(),
    );
    assert!(log.contains("already took part"), "{log}");
    // Without --bootstrap or --join: refused as an empty data dir.
    let log =
        refusal(Coordinator::start_member_exact(victim_id, port, &peers, &data_dir, &[]).unwrap());
    assert!(log.contains("holds no cluster state"), "{log}");
    // Refusing wrote nothing.
    let left: Vec<PathBuf> = std::fs::read_dir(&data_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert!(left.is_empty(), "a refused start left {left:?}");

    // Another cluster's data dir (a single-member cluster whose member has the same id)
    // put in its place: its peers all belong to another cluster.
    let other_dir = s.root.join("other-cluster");
    let other_port = free_port();
    let mut other = Coordinator::start_member(
        victim_id,
        other_port,
        &format!("{victim_id}=127.0.0.1:{other_port}"),
        &other_dir,
        &[],
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while cluster_status(&other.url())
        .await
        .is_none_or(|c| c.cluster_id == 0)
    {
        assert!(
            Instant::now() < deadline,
            "the other cluster was never named"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    other.proc.kill9();
    copy_dir(&other_dir, &data_dir);
    let log = refusal(Coordinator::start_member(victim_id, port, &peers, &data_dir, &[]).unwrap());
    assert!(log.contains("belongs to cluster"), "{log}");
    assert!(log.contains("(every peer that answered)"), "{log}");

    // The way out: remove it, wipe, add it back, start it with --join.
    let urls = s.group.all_urls();
    let (ok, out, err) = venomctl(&urls, &["cluster", "remove", &victim_id.to_string()]);
    assert!(ok, "cluster remove: {out}{err}");
    wipe(&data_dir);
    let address = format!("127.0.0.1:{port}");
    let (ok, out, err) = venomctl(&urls, &["cluster", "add", &victim_id.to_string(), &address]);
    assert!(ok, "cluster add: {out}{err}");
    let joined =
        Coordinator::start_member(victim_id, port, &peers, &data_dir, &["--join"]).unwrap();
    let t_join = Instant::now();
    s.group.members[(victim_id - 1) as usize] = Some(joined);
    let leader = s.group.wait_leader(0, Duration::from_secs(20)).await;
    s.group
        .wait_caught_up(victim_id, leader, Duration::from_secs(30))
        .await;
    let caught_up_ms = t_join.elapsed().as_millis();
    submit_waves(&mut s, 1, 20, "0").await;
    s.finish(
        0,
        &format!(
            "member {victim_id} on an empty data dir refused with --bootstrap, with --join and \
             with neither, and on another cluster's data dir (exit 78 each); removed, wiped, \
             added back and joined: caught up in {caught_up_ms} ms"
        ),
        "",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_restored_from_an_old_copy_of_its_data_dir_stops_and_rejoins() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let mut s = Scenario::start("restored copy", &[], &[], 4).await;
    let first = submit_waves(&mut s, 1, 10, "0").await;
    s.group
        .wait_finished(first[0], Duration::from_secs(60))
        .await;
    let leader = s.group.wait_leader(0, Duration::from_secs(20)).await;
    let victim_id = s.group.ids().into_iter().find(|&id| id != leader).unwrap();

    // A copy of the follower's data dir, taken while it is stopped (a backup).
    let victim = s.group.kill9(victim_id);
    let backup = s.root.join("backup");
    copy_dir(&victim.data_dir, &backup);
    s.group.restart(victim_id, victim).unwrap();
    s.group
        .wait_caught_up(victim_id, leader, Duration::from_secs(30))
        .await;
    // It acknowledges more entries; then its disk is replaced with the old copy.
    let later = submit_waves(&mut s, 3, 10, "0").await;
    for id in &later {
        s.group.wait_finished(*id, Duration::from_secs(60)).await;
    }
    s.group
        .wait_caught_up(victim_id, leader, Duration::from_secs(30))
        .await;
    let victim = s.group.kill9(victim_id);
    std::fs::remove_dir_all(&victim.data_dir).unwrap();
    copy_dir(&backup, &victim.data_dir);
    let (port, data_dir) = (victim.port, victim.data_dir.clone());
    drop(victim);
    // The leader's heartbeat names a commit index beyond the restored log: the member stops.
    let log = refusal(
        Coordinator::start_member(victim_id, port, &s.group.peers_arg(), &data_dir, &[]).unwrap(),
    );
    assert!(
        log.contains("lost writes it had made durable")
            && log.contains(&format!("venomctl cluster remove {victim_id}")),
        "{log}"
    );

    // The way out brings it back.
    let urls = s.group.all_urls();
    let (ok, out, err) = venomctl(&urls, &["cluster", "remove", &victim_id.to_string()]);
    assert!(ok, "cluster remove: {out}{err}");
    std::fs::remove_dir_all(&data_dir).unwrap();
    let address = format!("127.0.0.1:{port}");
    let (ok, out, err) = venomctl(&urls, &["cluster", "add", &victim_id.to_string(), &address]);
    assert!(ok, "cluster add: {out}{err}");
    let joined = Coordinator::start_member(
        victim_id,
        port,
        &s.group.peers_arg(),
        &data_dir,
        &["--join"],
    )
    .unwrap();
    s.group.members[(victim_id - 1) as usize] = Some(joined);
    let leader = s.group.wait_leader(0, Duration::from_secs(20)).await;
    s.group
        .wait_caught_up(victim_id, leader, Duration::from_secs(30))
        .await;
    s.finish(
        0,
        &format!(
            "member {victim_id} restored from an older copy of its data dir stopped with exit \
             78 at the leader's first heartbeat; removed, wiped, added back and joined"
        ),
        "",
    )
    .await;
}
