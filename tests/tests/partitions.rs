//! Partitions and freezes with the real binaries, each process at its own address in its
//! own network namespace ([`venom_tests::netns`]): three coordinators and two workers run a
//! wave of short micro-tasks while a fault hits the leader (cut off, frozen, cut off one
//! way), a worker (cut off for less, then for more than its lease), or every process
//! (SIGKILL, then restarted on the same data dirs).
//!
//! Every attempt records its start, a tick about every 50 ms and its end
//! ([`venom_tests::attempts`]), and each scenario ends with [`NetCluster::finish`]: every
//! micro-task ran; no two attempts of one micro-task overlapped in time; re-executions only
//! where the scenario allows, each explained; the leader lists each micro-task once,
//! succeeded; no acknowledged wave lost; every member answers identically. Each prints one
//! figures line (see it with `--nocapture`); docs/RELIABILITY.md reports them.
//!
//! Needs root (CI runs it as root); without it every test fails saying so. The scenarios
//! take turns ([`ONE_AT_A_TIME`]). `VENOM_KEEP_TEST_DIR=1` keeps the processes' logs, data
//! dirs and records.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::{Duration, Instant};

use venom_tests::attempts::{attempt_recording, read_attempts, Attempt, Reruns};
use venom_tests::netns::{freeze, thaw, unix_ns, FaultEvent, NetCluster, N_WORKERS};
use venom_tests::scenario::ONE_AT_A_TIME;
use venom_tests::toml_str;

/// Micro-tasks each worker may hold queued beyond its running ones.
const QUEUE_DEPTH: u32 = 2;
/// The body of most micro-tasks.
const SHORT_TASK: &str = "sleep 0.2";
/// Attempts started before a fault is made (the wave is running steadily).
const WARM_UP: usize = 20;

/// A wave of one array task, `n` micro-tasks of `body`, each recorded in `records`.
fn wave(name: &str, records: &Path, n: u32, body: &str) -> String {
    format!(
        "name = \"{name}\"\n[[task]]\nid = \"work\"\narray = {n}\nrun = {}\n",
        toml_str(&attempt_recording(records, body))
    )
}

/// Starts the cluster and submits a wave of `n` micro-tasks of `body`; returns once
/// [`WARM_UP`] attempts started.
async fn start_with_wave(
    name: &'static str,
    coordinator_args: &[&str],
    n: u32,
    body: &str,
) -> (NetCluster, std::path::PathBuf) {
    let mut c = NetCluster::start(name, coordinator_args, &[], QUEUE_DEPTH)
        .await
        .expect("three coordinators and two workers in network namespaces");
    let records = c.records_dir("work").unwrap();
    c.submit(
        &wave(name, &records, n, body),
        &records,
        &[("work", Some(n))],
    )
    .await
    .unwrap();
    c.wait_started(&records, WARM_UP, Duration::from_secs(60))
        .await;
    (c, records)
}

#[derive(Debug, Clone, Copy)]
enum LeaderFault {
    /// Its link down: nothing in or out.
    Cut,
    /// SIGSTOP.
    Freeze,
    /// It sends, but receives nothing.
    CutInbound,
}

impl LeaderFault {
    fn make(self, c: &NetCluster, id: u64) {
        match self {
            LeaderFault::Cut => c.net.cut(c.member_host(id)).unwrap(),
            LeaderFault::Freeze => freeze(c.member_proc(id)).unwrap(),
            LeaderFault::CutInbound => c.net.cut_inbound(c.member_host(id)).unwrap(),
        }
    }

    fn undo(self, c: &NetCluster, id: u64) {
        match self {
            LeaderFault::Cut => c.net.heal(c.member_host(id)).unwrap(),
            LeaderFault::Freeze => thaw(c.member_proc(id)).unwrap(),
            LeaderFault::CutInbound => c.net.heal_inbound(c.member_host(id)).unwrap(),
        }
    }
}

/// Micro-tasks for a wave that runs across a fault of `hold`: at the most the workers can
/// do (4 slots, 0.2 s each: 20 a second), it still lasts the whole fault and 3 s more.
fn across(hold: Duration) -> u32 {
    20 * (hold.as_secs() as u32 + 3)
}

/// `n_events` times: a fresh wave starts, the leader of the moment suffers `fault` for
/// `hold`, then recovers and catches up. No micro-task may run twice.
async fn leader_fault(name: &'static str, fault: LeaderFault, hold: Duration, n_events: usize) {
    let _turn = ONE_AT_A_TIME.lock().await;
    let mut c = NetCluster::start(name, &[], &[], QUEUE_DEPTH)
        .await
        .expect("three coordinators and two workers in network namespaces");
    let mut events = Vec::new();
    let mut history = Vec::new();
    for k in 0..n_events {
        let records = c.records_dir(&format!("work-{k}")).unwrap();
        let n = across(hold);
        let spec = wave(&format!("{name} {k}"), &records, n, SHORT_TASK);
        c.submit(&spec, &records, &[("work", Some(n))])
            .await
            .unwrap();
        c.wait_started(&records, WARM_UP, Duration::from_secs(60))
            .await;
        let leader = c.group.wait_leader(0, Duration::from_secs(20)).await;

        let at_ns = unix_ns();
        let t_fault = Instant::now();
        fault.make(&c, leader);
        let elected = c.wait_new_leader(leader, t_fault + hold).await;
        tokio::time::sleep_until((t_fault + hold).into()).await;
        fault.undo(&c, leader);
        let t_undo = Instant::now();
        let Some((new_leader, election_ns)) = elected else {
            panic!(
                "{name}: no other member led within {hold:?} of the fault; c{leader}'s \
                 log:\n{}",
                c.log_tail(&format!("c{leader}"), 20)
            );
        };
        c.group
            .wait_caught_up(leader, new_leader, Duration::from_secs(30))
            .await;
        history.push(format!(
            "c{leader} → c{new_leader}, c{leader} following {} ms after the fault ended",
            t_undo.elapsed().as_millis()
        ));
        events.push(FaultEvent {
            at_ns,
            election_ns: Some(election_ns),
            records,
        });
    }
    c.finish(
        Reruns::None,
        &events,
        &format!(
            "{fault:?} of the leader for {} s, {n_events} times: {}",
            hold.as_secs(),
            history.join("; ")
        ),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_cut_off_for_8_s() {
    leader_fault(
        "leader cut 8 s",
        LeaderFault::Cut,
        Duration::from_secs(8),
        2,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_frozen_for_7_s() {
    leader_fault(
        "leader frozen 7 s",
        LeaderFault::Freeze,
        Duration::from_secs(7),
        2,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_frozen_for_20_s() {
    leader_fault(
        "leader frozen 20 s",
        LeaderFault::Freeze,
        Duration::from_secs(20),
        1,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_that_sends_but_cannot_receive_for_8_s() {
    leader_fault(
        "leader one-way cut 8 s",
        LeaderFault::CutInbound,
        Duration::from_secs(8),
        2,
    )
    .await;
}

/// The first start on `node` after `after_ns`, milliseconds after it.
fn first_start_on(attempts: &[Attempt], node: &str, after_ns: u128) -> Option<u128> {
    attempts
        .iter()
        .filter(|a| a.node == node && a.start_ns > after_ns)
        .map(|a| (a.start_ns - after_ns) / 1_000_000)
        .min()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_cut_off_for_less_than_its_lease_costs_no_rerun() {
    const LEASE_MS: u64 = 10_000;
    const CUT: Duration = Duration::from_secs(5);
    let _turn = ONE_AT_A_TIME.lock().await;
    let lease = LEASE_MS.to_string();
    // Work enough to go on well after the heal (w1 may wait out a 2 s reconnect backoff).
    let (c, records) = start_with_wave(
        "worker cut 5 s, lease 10 s",
        &["--worker-lease-ms", &lease],
        across(CUT + Duration::from_secs(7)),
        SHORT_TASK,
    )
    .await;
    let at_ns = unix_ns();
    c.net.cut(c.worker_host(1)).unwrap();
    tokio::time::sleep(CUT).await;
    c.net.heal(c.worker_host(1)).unwrap();
    let healed_ns = unix_ns();
    let attempts = c
        .finish(
            Reruns::None,
            &[FaultEvent {
                at_ns,
                election_ns: None,
                records,
            }],
            "w1 cut off 5 s under a 10 s lease",
        )
        .await;
    let back_ms = first_start_on(&attempts, "w1", healed_ns);
    let last_ms = attempts
        .iter()
        .filter(|a| a.node == "w1" && a.start_ns > at_ns && a.start_ns <= healed_ns)
        .map(|a| (a.start_ns - at_ns) / 1_000_000)
        .max();
    eprintln!(
        "partitions worker cut 5 s: w1 started what it held until {last_ms:?} ms into the \
         cut, and new work {back_ms:?} ms after the heal"
    );
    assert!(
        back_ms.is_some(),
        "w1 never ran anything after its link came back; its log:\n{}",
        c.log_tail("w1", 20)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_cut_off_past_its_lease_is_fenced_before_its_work_runs_again() {
    const LEASE_MS: u64 = 3_000;
    const CUT: Duration = Duration::from_secs(8);
    let _turn = ONE_AT_A_TIME.lock().await;
    let lease = LEASE_MS.to_string();
    // On w1, micro-tasks 40 to 59 run 5 s, past the lease (w1 surely gets some of them:
    // it takes work as its slots free up); anywhere else, and every other one, are short.
    let body = format!(
        "case $VENOM_NODE:$VENOM_TASK_INDEX in w1:4?|w1:5?) sleep 5;; *) {SHORT_TASK};; esac"
    );
    let long =
        |a: &Attempt| a.node == "w1" && a.index.len() == 2 && matches!(&a.index[..1], "4" | "5");
    let (c, records) = start_with_wave(
        "worker cut 8 s, lease 3 s",
        &["--worker-lease-ms", &lease],
        200,
        &body,
    )
    .await;
    // Cut w1 off while it runs a long micro-task that started less than a second ago.
    let deadline = Instant::now() + Duration::from_secs(60);
    let long_on_w1 = loop {
        let now = unix_ns();
        let attempts = read_attempts(&records).unwrap();
        let fresh = attempts
            .iter()
            .find(|a| long(a) && a.end.is_none() && now.saturating_sub(a.start_ns) < 1_000_000_000);
        if let Some(a) = fresh {
            break a.index.clone();
        }
        assert!(
            Instant::now() < deadline,
            "w1 ran none of micro-tasks 40 to 59 within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let at_ns = unix_ns();
    c.net.cut(c.worker_host(1)).unwrap();
    tokio::time::sleep(CUT).await;
    c.net.heal(c.worker_host(1)).unwrap();
    let attempts = c
        .finish(
            Reruns::After(&["w1"]),
            &[FaultEvent {
                at_ns,
                election_ns: None,
                records,
            }],
            &format!("w1 cut off 8 s under a 3 s lease while running work[{long_on_w1}]"),
        )
        .await;
    // The long attempt w1 ran was killed by the fence, and given again only after that.
    let since = |ns: u128| (ns as f64 - at_ns as f64) / 1e9;
    let killed: Vec<&Attempt> = attempts
        .iter()
        .filter(|a| a.node == "w1" && a.end.is_none())
        .collect();
    let mut fenced = Vec::new();
    for k in &killed {
        let again = attempts
            .iter()
            .filter(|a| a.index == k.index && a.attempt > k.attempt)
            .map(|a| a.start_ns)
            .min();
        fenced.push(format!(
            "work[{}] #{} last seen {:+.2} s, run again {}",
            k.index,
            k.attempt,
            since(k.last_seen_ns),
            again.map_or("never".to_string(), |s| format!("{:+.2} s", since(s)))
        ));
    }
    eprintln!(
        "partitions worker cut 8 s: killed by the fence (times from the cut): {}",
        fenced.join("; ")
    );
    assert!(
        killed.iter().any(|k| k.index == long_on_w1),
        "work[{long_on_w1}], running on w1 when it was cut off for longer than its lease, \
         was not killed (killed: {fenced:?}); w1's log:\n{}",
        c.log_tail("w1", 20)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_killed_during_2000_micro_tasks_and_restarted() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let (mut c, records) = start_with_wave("worker killed", &[], 2_000, SHORT_TASK).await;
    // Well into the wave, then w1 dies with what it runs and holds, and comes back 1 s later
    // on its data dir.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let at_ns = unix_ns();
    c.kill_worker(1);
    tokio::time::sleep(Duration::from_secs(1)).await;
    c.restart_worker(1).unwrap();
    let restarted_ns = unix_ns();
    let attempts = c
        .finish(
            Reruns::After(&["w1"]),
            &[FaultEvent {
                at_ns,
                election_ns: None,
                records,
            }],
            "w1 SIGKILLed during 2,000 micro-tasks of `sleep 0.2`, restarted 1 s later",
        )
        .await;
    let killed: Vec<String> = attempts
        .iter()
        .filter(|a| a.node == "w1" && a.end.is_none())
        .map(|a| {
            format!(
                "work[{}] #{} last seen {} ms after the kill",
                a.index,
                a.attempt,
                (a.last_seen_ns.saturating_sub(at_ns)) / 1_000_000
            )
        })
        .collect();
    eprintln!(
        "partitions worker killed: attempts killed with it: {}; w1 ran again {:?} ms after \
         its restart",
        killed.join("; "),
        first_start_on(&attempts, "w1", restarted_ns)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_process_killed_and_restarted() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let (mut c, records) = start_with_wave(
        "all killed",
        &[],
        across(Duration::from_secs(3)),
        SHORT_TASK,
    )
    .await;
    let at_ns = unix_ns();
    let members: Vec<_> = c
        .group
        .ids()
        .into_iter()
        .map(|id| (id, c.kill_member(id)))
        .collect();
    for i in 1..=N_WORKERS {
        c.kill_worker(i);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let t_restart = Instant::now();
    for (id, member) in members {
        c.restart_member(id, member).unwrap();
    }
    for i in 1..=N_WORKERS {
        c.restart_worker(i).unwrap();
    }
    let elected = c
        .wait_new_leader(0, t_restart + Duration::from_secs(30))
        .await
        .map(|(_, ns)| ns);
    assert!(elected.is_some(), "no leader within 30 s of the restart");
    c.finish(
        Reruns::Any,
        &[FaultEvent {
            at_ns,
            election_ns: elected,
            records,
        }],
        "3 coordinators and 2 workers killed, restarted 500 ms later on the same data dirs",
    )
    .await;
}
