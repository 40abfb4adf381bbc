//! Compares the executor with the physical floor: N `true` processes, P at a time, spawned
//! directly with `std::process::Command` versus run through `executor::run_attempt`.
//!
//! `cargo run --release -p venom-worker --example spawn_bench -- [N] [P]`

use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use venom_worker::executor::{run_attempt, CancelToken};

fn raw_floor(n_tasks: usize, parallelism: usize) -> f64 {
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let threads: Vec<_> = (0..parallelism)
        .map(|_| {
            let next = Arc::clone(&next);
            std::thread::spawn(move || {
                while next.fetch_add(1, Ordering::Relaxed) < n_tasks {
                    let status = Command::new("true")
                        .stdin(Stdio::null())
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .process_group(0)
                        .status()
                        .expect("spawn true");
                    assert!(status.success());
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().expect("spawner thread");
    }
    started.elapsed().as_secs_f64()
}

async fn executor(n_tasks: usize, parallelism: usize) -> f64 {
    let next = Arc::new(AtomicUsize::new(0));
    let assignment = venom_proto::Assignment {
        argv: vec!["true".to_owned()],
        ..Default::default()
    };
    let started = Instant::now();
    let workers: Vec<_> = (0..parallelism)
        .map(|_| {
            let next = Arc::clone(&next);
            let assignment = assignment.clone();
            tokio::spawn(async move {
                while next.fetch_add(1, Ordering::Relaxed) < n_tasks {
                    let finished =
                        run_attempt(&assignment, "bench", 65_536, CancelToken::never()).await;
                    assert_eq!(finished.exit_code, Some(0), "{finished:?}");
                }
            })
        })
        .collect();
    for worker in workers {
        worker.await.expect("executor task");
    }
    started.elapsed().as_secs_f64()
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let n_tasks: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(10_000);
    let parallelism: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(2);
    let mode = args.next().unwrap_or_default();
    if mode == "floor" {
        println!("floor {:.3}", raw_floor(n_tasks, parallelism));
        return;
    }
    if mode.starts_with("tokio") {
        let piped = mode.contains("piped");
        let with_env = mode.contains("env");
        let next = Arc::new(AtomicUsize::new(0));
        let started = Instant::now();
        let workers: Vec<_> = (0..parallelism)
            .map(|_| {
                let next = Arc::clone(&next);
                tokio::spawn(async move {
                    while next.fetch_add(1, Ordering::Relaxed) < n_tasks {
                        let mut command = tokio::process::Command::new("true");
                        command.stdin(Stdio::null()).process_group(0);
                        if with_env {
                            command.env("VENOM_WAVE_ID", "1").env("VENOM_TASK_ID", "t").env("VENOM_TASK_INDEX", "0").env("VENOM_ATTEMPT", "0").env("VENOM_NODE", "n");
                        }
                        if piped {
                            command.stdout(Stdio::piped()).stderr(Stdio::piped());
                        } else {
                            command.stdout(Stdio::null()).stderr(Stdio::null());
                        }
                        let output = command
                            .spawn()
                            .expect("spawn")
                            .wait_with_output()
                            .await
                            .expect("wait");
                        assert!(output.status.success());
                    }
                })
            })
            .collect();
        for worker in workers {
            worker.await.expect("task");
        }
        println!("{mode} {:.3}", started.elapsed().as_secs_f64());
        return;
    }
    if mode == "executor" {
        println!("executor {:.3}", executor(n_tasks, parallelism).await);
        return;
    }
    let floor_s = raw_floor(n_tasks, parallelism);
    let executor_s = executor(n_tasks, parallelism).await;
    println!(
        "{n_tasks} × true, {parallelism} at a time: floor {floor_s:.2} s, executor {executor_s:.2} s, ratio {:.2}",
        executor_s / floor_s
    );
}
