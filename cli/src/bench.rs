//! `venomctl benchmark`: Venom against the physical floor on this machine.
//!
//! Performance is judged as a ratio on one machine: the time Venom takes, from submit to
//! done, to run N no-op processes against the time to spawn the same processes directly
//! with the same parallelism (the spawn floor). The floor is measured here with the same
//! spawn path a worker uses (`Command::process_group(0)`, no `pre_exec` hook), `slots`
//! processes in flight for the array and one at a time for the chain (a chain can do no
//! better than sequential spawns). With `--dev` it also measures the disk under the dev
//! cluster's data: the latency of one `fdatasync` after a small write, the least each
//! durable group commit costs (a chain commits at least once per link).

use std::io;
use std::os::unix::process::CommandExt as _;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use std::net::{Ipv4Addr, SocketAddr};

use anyhow::Context as _;
use serde::Serialize;
use venom_core::WaveState;
use venom_proto as pb;

use crate::args::{BenchArgs, DEFAULT_DEV_THROTTLE};
use crate::client::{Client, Retry};
use crate::commands::remote::new_submission_id;
use crate::commands::Context;
use crate::dev::{DevCluster, DevOptions};
use crate::output::{as_word, print_json, Table, WaveView};
use crate::watch;

/// The no-op every benchmark task runs (argv, no shell).
const NOOP_PROGRAM: &str = "true";
/// `fdatasync` samples taken for the sync floor.
const SYNC_SAMPLES: u32 = 200;

/// One measured spawn floor.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FloorRun {
    pub n_spawned: u32,
    pub elapsed: Duration,
}

/// Spawns `program` `n` times keeping `slots` in flight (one thread per slot, each
/// spawning and waiting in turn) and returns the wall time. Fails if any run fails.
pub fn spawn_floor(program: &str, n: u32, slots: u32) -> io::Result<FloorRun> {
    let next = AtomicU32::new(0);
    let n_spawned = AtomicU32::new(0);
    let started = Instant::now();
    std::thread::scope(|scope| -> io::Result<()> {
        let spawners: Vec<_> = (0..slots.clamp(1, n.max(1)))
            .map(|_| {
                scope.spawn(|| -> io::Result<()> {
                    while next.fetch_add(1, Ordering::Relaxed) < n {
                        let status = Command::new(program)
                            .process_group(0)
                            .stdin(Stdio::null())
                            .stdout(Stdio::null())
                            .stderr(Stdio::null())
                            .status()?;
                        n_spawned.fetch_add(1, Ordering::Relaxed);
                        if !status.success() {
                            return Err(io::Error::other(format!(
                                "`{program}` ended with {status}"
                            )));
                        }
                    }
                    Ok(())
                })
            })
            .collect();
        for spawner in spawners {
            spawner
                .join()
                .map_err(|_| io::Error::other("a spawner thread panicked"))??;
        }
        Ok(())
    })?;
    Ok(FloorRun {
        n_spawned: n_spawned.into_inner(),
        elapsed: started.elapsed(),
    })
}

/// The latency of `fdatasync` after a 4 KiB append, on the disk holding `dir`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct SyncFloor {
    pub n_samples: u32,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

/// Appends 4 KiB and fdatasyncs it `n` times in a scratch file in `dir` (removed after).
pub fn sync_floor(dir: &std::path::Path, n: u32) -> io::Result<SyncFloor> {
    use std::io::Write as _;

    let scratch = tempfile::tempfile_in(dir)?;
    let mut file = io::BufWriter::new(scratch);
    let block = [0x5a_u8; 4096];
    let mut samples = Vec::with_capacity(n as usize);
    for _ in 0..n.max(1) {
        let started = Instant::now();
        file.write_all(&block)?;
        file.flush()?;
        file.get_ref().sync_data()?;
        samples.push(started.elapsed().as_secs_f64() * 1_000.0);
    }
    samples.sort_by(f64::total_cmp);
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    Ok(SyncFloor {
        n_samples: samples.len() as u32,
        p50_ms: at(0.5),
        p99_ms: at(0.99),
    })
}

/// An array wave of `n` no-ops.
pub fn array_wave(n: u32) -> String {
    format!(
        "name = \"bench-array-{n}\"\non_failure = \"fail-wave\"\n\n[defaults]\nretries = 0\n\n\
         [[task]]\nid = \"noop\"\narray = {n}\ncmd = [\"{NOOP_PROGRAM}\"]\n"
    )
}

/// A chain of `n` no-ops, each depending on the one before.
pub fn chain_wave(n: u32) -> String {
    let mut text = format!(
        "name = \"bench-chain-{n}\"\non_failure = \"fail-wave\"\n\n[defaults]\nretries = 0\n"
    );
    for i in 0..n {
        text.push_str(&format!(
            "\n[[task]]\nid = \"t{i}\"\ncmd = [\"{NOOP_PROGRAM}\"]\n"
        ));
        if i > 0 {
            text.push_str(&format!("deps = [\"t{}\"]\n", i - 1));
        }
    }
    text
}

/// One line of the result.
#[derive(Debug, Clone, Serialize)]
pub struct BenchRow {
    pub work: String,
    pub n_micro_tasks: u32,
    pub wave_id: u64,
    #[serde(serialize_with = "as_word")]
    pub state: WaveState,
    /// Submit to done, as this client saw it.
    pub venom_s: f64,
    /// The wave's own makespan (first start to last finish).
    pub makespan_s: f64,
    pub floor_s: Option<f64>,
    /// venom_s / floor_s.
    pub ratio: Option<f64>,
}

#[derive(Debug, Serialize)]
struct BenchReport {
    coordinator: String,
    dev: bool,
    slots: u32,
    rows: Vec<BenchRow>,
    /// With `--dev`: the disk under the dev cluster's data.
    sync_floor: Option<SyncFloor>,
}

/// Submits `spec` and waits for it; returns the summary and the submit-to-done time.
async fn time_wave(client: &mut Client, spec: String) -> anyhow::Result<(WaveView, Duration)> {
    let request = pb::SubmitWaveRequest {
        spec: spec.into_bytes(),
        format: "toml".to_owned(),
        traceparent: String::new(),
        // One id per wave: retries of this submit resend it and cannot add a second wave.
        submission_id: new_submission_id(),
    };
    let started = Instant::now();
    let response = client
        .call(Retry::Safe, |mut rpc| {
            let request = request.clone();
            async move { rpc.submit_wave(request).await }
        })
        .await?;
    let summary = watch::follow(client, response.wave_id, |_| {}).await?;
    Ok((summary, started.elapsed()))
}

async fn floor(program: &'static str, n: u32, slots: u32) -> anyhow::Result<FloorRun> {
    tokio::task::spawn_blocking(move || spawn_floor(program, n, slots))
        .await
        .context("the spawn floor thread failed")?
        .with_context(|| format!("measuring the spawn floor (`{program}` × {n})"))
}

/// `venomctl benchmark`.
pub async fn run(ctx: &Context, args: &BenchArgs) -> anyhow::Result<u8> {
    let mut dev = None;
    let mut client = if args.dev {
        let cluster = DevCluster::start(DevOptions {
            // Any free port.
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            data_dir: None,
            slots: Some(args.slots),
            throttle: DEFAULT_DEV_THROTTLE,
            keep: false,
            tls: args.tls,
        })
        .await?;
        let mut client = Client::new(&[cluster.url()], cluster.dialer()?)?;
        let ready = cluster.wait_ready(&mut client).await;
        dev = Some(cluster);
        if let Err(err) = ready {
            if let Some(cluster) = dev.take() {
                let _ = cluster.shutdown().await;
            }
            return Err(err);
        }
        client
    } else {
        ctx.client()?
    };
    let result = measure(ctx, &mut client, args).await;
    let sync = match &dev {
        Some(_) => {
            let dir = std::env::temp_dir();
            let measured = tokio::task::spawn_blocking(move || sync_floor(&dir, SYNC_SAMPLES))
                .await
                .context("the sync floor thread failed")?
                .context("measuring fdatasync latency in the temporary directory")?;
            Some(measured)
        }
        None => None,
    };
    let coordinator = client.current_url().unwrap_or("-").to_owned();
    if let Some(cluster) = dev {
        cluster.shutdown().await?;
    }
    let rows = result?;
    let all_succeeded = rows.iter().all(|row| row.state == WaveState::Succeeded);
    let report = BenchReport {
        coordinator,
        dev: args.dev,
        slots: args.slots,
        rows,
        sync_floor: sync,
    };
    if ctx.json() {
        print_json(&report)?;
    } else {
        print!("{}", render(&report));
    }
    Ok(if all_succeeded { 0 } else { 1 })
}

async fn measure(
    ctx: &Context,
    client: &mut Client,
    args: &BenchArgs,
) -> anyhow::Result<Vec<BenchRow>> {
    let mut rows = Vec::new();
    let mut plan = vec![(
        format!("{} × {NOOP_PROGRAM}, {} at a time", args.n, args.slots),
        args.n,
        args.slots,
        array_wave(args.n),
    )];
    if args.chain > 0 {
        plan.push((
            format!("chain of {} × {NOOP_PROGRAM}", args.chain),
            args.chain,
            1,
            chain_wave(args.chain),
        ));
    }
    for (work, n, floor_slots, spec) in plan {
        let floor_run = if args.skip_floor {
            None
        } else {
            if !ctx.json() {
                eprintln!("measuring the spawn floor: {work}…");
            }
            Some(floor(NOOP_PROGRAM, n, floor_slots).await?)
        };
        if !ctx.json() {
            eprintln!("running through Venom: {work}…");
        }
        let (summary, elapsed) = time_wave(client, spec).await?;
        let venom_s = elapsed.as_secs_f64();
        let floor_s = floor_run.map(|run| run.elapsed.as_secs_f64());
        rows.push(BenchRow {
            work,
            n_micro_tasks: n,
            wave_id: summary.wave_id,
            state: summary.state,
            venom_s,
            makespan_s: summary.makespan_ms as f64 / 1_000.0,
            floor_s,
            ratio: floor_s.filter(|&s| s > 0.0).map(|s| venom_s / s),
        });
    }
    Ok(rows)
}

fn render(report: &BenchReport) -> String {
    let mut table = Table::new(&[
        "WORK",
        ">VENOM (s)",
        ">FLOOR (s)",
        ">RATIO",
        ">MAKESPAN (s)",
        "WAVE",
    ]);
    for row in &report.rows {
        table.row(vec![
            row.work.clone(),
            format!("{:.3}", row.venom_s),
            row.floor_s.map_or("-".to_owned(), |s| format!("{s:.3}")),
            row.ratio.map_or("-".to_owned(), |r| format!("{r:.2}×")),
            format!("{:.3}", row.makespan_s),
            format!("{} ({})", row.wave_id, row.state.as_str()),
        ]);
    }
    let mut out = table.render();
    out.push_str(&format!(
        "VENOM is submit → done as seen by this client ({}{}); FLOOR is spawning the same \
         processes directly with the same parallelism; RATIO = VENOM / FLOOR.\n",
        report.coordinator,
        if report.dev {
            ", embedded dev cluster"
        } else {
            ""
        }
    ));
    if let Some(sync) = report.sync_floor {
        out.push_str(&format!(
            "Disk under the dev cluster's data: fdatasync after a 4 KiB write p50 {:.2} ms, \
             p99 {:.2} ms ({} samples); every durable group commit costs at least one.\n",
            sync.p50_ms, sync.p99_ms, sync.n_samples
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::args::{DEFAULT_BENCH_CHAIN, DEFAULT_BENCH_MICRO_TASKS};
    use venom_core::wave::{parse_wave, Format, WaveLimits};

    #[test]
    fn floor_spawns_every_process() {
        let run = spawn_floor(NOOP_PROGRAM, 50, 2).expect("`true` runs");
        assert_eq!(run.n_spawned, 50);
        assert!(run.elapsed > Duration::ZERO);
        let sequential = spawn_floor(NOOP_PROGRAM, 50, 1).expect("`true` runs");
        assert_eq!(sequential.n_spawned, 50);
        // More slots than processes is fine.
        assert_eq!(spawn_floor(NOOP_PROGRAM, 3, 8).expect("runs").n_spawned, 3);
    }

    #[test]
    fn floor_reports_failures() {
        let err = spawn_floor("false", 5, 2).expect_err("`false` fails");
        assert!(err.to_string().contains("false"), "{err}");
        assert!(spawn_floor("/nonexistent/venom-no-such-program", 1, 1).is_err());
    }

    #[test]
    fn sync_floor_measures_every_sample() {
        let dir = tempfile::tempdir().expect("tempdir");
        let floor = sync_floor(dir.path(), 5).expect("fdatasync works here");
        assert_eq!(floor.n_samples, 5);
        assert!(
            floor.p50_ms > 0.0 && floor.p99_ms >= floor.p50_ms,
            "{floor:?}"
        );
        // The scratch file is gone.
        assert_eq!(std::fs::read_dir(dir.path()).expect("list").count(), 0);
    }

    #[test]
    fn benchmark_waves_are_valid() {
        // The default sizes pass a coordinator's default limits.
        let limits = WaveLimits::default();
        let n = DEFAULT_BENCH_MICRO_TASKS;
        let array = parse_wave(array_wave(n).as_bytes(), Format::Toml, &limits).expect("valid");
        assert_eq!(array.n_micro_tasks(), u64::from(n));
        let n = DEFAULT_BENCH_CHAIN as usize;
        let chain = parse_wave(
            chain_wave(DEFAULT_BENCH_CHAIN).as_bytes(),
            Format::Toml,
            &limits,
        )
        .expect("valid");
        assert_eq!(chain.tasks.len(), n);
        assert_eq!(chain.tasks[n - 1].deps, vec![n - 2]);
        assert!(chain.tasks[0].deps.is_empty());
    }
}
