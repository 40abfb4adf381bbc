//! A worker that dies: its attempts die with it (its guard kills their process groups), so
//! the leader's next attempt never runs beside them; a result it finished while no leader
//! listened survives its crash in its data dir and is recorded when it is back, without a
//! re-run.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::{Duration, Instant};

use venom_tests::*;

/// Waits until `dir` holds `n` files starting with `prefix`; returns their contents.
fn wait_files(dir: &Path, prefix: &str, n: usize, timeout: Duration) -> Vec<String> {
    let deadline = Instant::now() + timeout;
    loop {
        let found: Vec<String> = std::fs::read_dir(dir)
            .map(|entries| {
                entries
                    .filter_map(Result::ok)
                    .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
                    .filter_map(|e| std::fs::read_to_string(e.path()).ok())
                    .filter(|text| text.ends_with('\n'))
                    .collect()
            })
            .unwrap_or_default();
        if found.len() >= n {
            return found;
        }
        assert!(
            Instant::now() < deadline,
            "{n} `{prefix}` files never appeared in {}",
            dir.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_workers_attempts_die_with_it_and_run_again_only_after() {
    let dir = test_dir("worker_crash_orphans").unwrap();
    let records = dir.path.join("records");
    std::fs::create_dir_all(&records).unwrap();
    let coordinator = Coordinator::start(&dir.path.join("c"), &[]).unwrap();
    let url = coordinator.url();
    let mut worker = start_worker(&url, "w1", 2, &[]).unwrap();
    let mut client = wait_ready(&url, 1).await.unwrap();

    // First attempts sleep long and record their pid; later ones end at once.
    let r = records.display();
    let script = format!(
        "n=$(ls {r} | grep -c \"^pid\\.$VENOM_TASK_INDEX\\.\"); \
         echo \"$$ $(date +%s%N)\" > {r}/pid.$VENOM_TASK_INDEX.$VENOM_ATTEMPT; \
         if [ \"$n\" -eq 0 ]; then sleep 30; fi"
    );
    let wave = format!(
        "name = \"orphans\"\n[[task]]\nid = \"t\"\narray = 2\nrun = {}\n",
        toml_str(&script)
    );
    let wave_id = submit(&mut client, &wave).await.unwrap();
    let first: Vec<i32> = wait_files(&records, "pid.", 2, Duration::from_secs(30))
        .iter()
        .map(|line| line.split_whitespace().next().unwrap().parse().unwrap())
        .collect();
    assert!(first.iter().all(|&pid| pid_alive(pid)));

    worker.kill9();
    let killed = Instant::now();
    while first.iter().any(|&pid| pid_alive(pid)) {
        assert!(
            killed.elapsed() < Duration::from_secs(5),
            "the attempts outlived their worker: {first:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let all_dead_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    eprintln!(
        "attempts of a SIGKILLed worker gone {} ms after the kill",
        killed.elapsed().as_millis()
    );

    // Back with the same data dir: the leader dispatches the micro-tasks again.
    let _worker = start_worker(&url, "w1", 2, &[]).unwrap();
    let done = wait_wave(&url, wave_id, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(done.state(), venom_proto::v1::WaveState::Succeeded);
    let starts = wait_files(&records, "pid.", 4, Duration::from_secs(5));
    let mut second_starts: Vec<u128> = starts
        .iter()
        .map(|line| line.split_whitespace().nth(1).unwrap().parse().unwrap())
        .filter(|&ns| ns > all_dead_ns)
        .collect();
    second_starts.sort_unstable();
    assert_eq!(
        second_starts.len(),
        2,
        "each micro-task ran again once, after its first attempt was dead: {starts:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_no_leader_heard_survives_a_worker_crash_without_a_rerun() {
    let dir = test_dir("worker_crash_spool").unwrap();
    let records = dir.path.join("records");
    std::fs::create_dir_all(&records).unwrap();
    let mut coordinator = Coordinator::start(&dir.path.join("c"), &[]).unwrap();
    let url = coordinator.url();
    let mut worker = start_worker(&url, "w1", 1, &[]).unwrap();
    let mut client = wait_ready(&url, 1).await.unwrap();

    let r = records.display();
    let script = format!(
        "echo start > {r}/start.$VENOM_ATTEMPT; sleep 1.5; echo ran >> {r}/runs; \
         echo done > {r}/done.$VENOM_ATTEMPT"
    );
    let wave = format!(
        "name = \"spooled\"\n[[task]]\nid = \"t\"\nrun = {}\n",
        toml_str(&script)
    );
    let wave_id = submit(&mut client, &wave).await.unwrap();
    drop(client);
    wait_files(&records, "start.", 1, Duration::from_secs(30));

    // No leader hears the result: the coordinator is gone before the attempt ends.
    coordinator.proc.kill9();
    wait_files(&records, "done.", 1, Duration::from_secs(10));
    // The worker has the result (spooled as the attempt ended); then it dies too.
    std::thread::sleep(Duration::from_millis(300));
    worker.kill9();

    coordinator.kill9_and_restart().unwrap();
    let _worker = start_worker(&url, "w1", 1, &[]).unwrap();
    let done = wait_wave(&url, wave_id, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(done.state(), venom_proto::v1::WaveState::Succeeded);
    let runs = std::fs::read_to_string(records.join("runs")).unwrap();
    assert_eq!(
        runs.lines().count(),
        1,
        "the micro-task ran once: its result came from the spool"
    );
}
