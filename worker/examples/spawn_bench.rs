//! Compares the executor with the physical floor: N `true` processes, P at a time, spawned
//! directly with `std::process::Command` + `wait` versus run through the executor the way the
//! agent's runners do (one blocking loop per slot, output captured, process group killed, and
//! isolated: clean environment and a fresh working directory per attempt, made and removed;
//! no cgroups, no `--run-as`).
//!
//! `cargo run --release -p venom-worker --example spawn_bench -- [N] [P] [floor|executor]`
//!
//! On a shared machine the spread between runs is large; compare the best of several runs.

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use venom_core::AttemptRef;
use venom_worker::executor::{cancel_pair, spawn_attempt, Assignment};
use venom_worker::isolation::{CgroupMode, Isolation, IsolationSettings};
use venom_worker::limits::DEFAULT_MAX_OUTPUT_BYTES;

/// The executor's isolation, with a work root under the system's temporary directory.
static ISOLATION: OnceLock<Arc<Isolation>> = OnceLock::new();
/// Gives every attempt its own number, so that their directories differ.
static NEXT_ATTEMPT: AtomicU32 = AtomicU32::new(0);

fn isolation() -> &'static Arc<Isolation> {
    ISOLATION.get_or_init(|| {
        let settings = IsolationSettings {
            work_dir: std::env::temp_dir().join("venom-spawn-bench"),
            keep_failed_workdirs_for: Duration::ZERO,
            run_as: None,
            run_as_uids: None,
            cgroups: CgroupMode::Off,
        };
        Arc::new(Isolation::prepare(&settings).expect("a usable work root"))
    })
}

/// Runs `task` `n_tasks` times on `parallelism` threads; returns the seconds taken.
fn on_threads(n_tasks: usize, parallelism: usize, task: fn()) -> f64 {
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let threads: Vec<_> = (0..parallelism)
        .map(|_| {
            let next = Arc::clone(&next);
            std::thread::spawn(move || {
                while next.fetch_add(1, Ordering::Relaxed) < n_tasks {
                    task();
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().expect("bench thread");
    }
    started.elapsed().as_secs_f64()
}

fn floor_task() {
    let status = Command::new("true")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .status()
        .expect("spawn true");
    assert!(status.success());
}

fn executor_task() {
    let assignment = Assignment {
        attempt: AttemptRef {
            wave_id: 1,
            micro: 0,
            attempt: NEXT_ATTEMPT.fetch_add(1, Ordering::Relaxed),
        },
        argv: vec!["true".to_owned()],
        ..Default::default()
    };
    let (_handle, token) = cancel_pair();
    let outcome = spawn_attempt(
        &assignment,
        "bench",
        DEFAULT_MAX_OUTPUT_BYTES,
        isolation(),
        token,
    )
    .expect("spawn true")
    .wait_blocking();
    assert_eq!(outcome.exit_code, Some(0), "{outcome:?}");
}

fn main() {
    let mut args = std::env::args().skip(1);
    let n_tasks: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(10_000);
    let parallelism: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(2);
    match args.next().as_deref() {
        Some("floor") => println!("floor {:.3}", on_threads(n_tasks, parallelism, floor_task)),
        Some("executor") => {
            println!(
                "executor {:.3}",
                on_threads(n_tasks, parallelism, executor_task)
            );
        }
        _ => {
            let floor_s = on_threads(n_tasks, parallelism, floor_task);
            let executor_s = on_threads(n_tasks, parallelism, executor_task);
            println!(
                "{n_tasks} × true, {parallelism} at a time: floor {floor_s:.2} s, \
                 executor {executor_s:.2} s, ratio {:.2}",
                executor_s / floor_s
            );
        }
    }
}
