//! Prometheus `/metrics` of a real coordinator and two real workers: scraped while a wave
//! runs and after it finished, each exposition must parse strictly as the text format, and
//! its figures must match what the run did — micro-tasks by state, attempts by outcome on
//! the coordinator and summed over the workers, one dispatch latency per attempt, every
//! node's θ and components, the raft gauges. `venomctl monitor --cluster` streams the
//! nodes' θ from the same coordinator.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use venom_proto::v1 as pb;
use venom_tests::*;

const N_OK: u32 = 6;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_and_match_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("work");
    std::fs::create_dir_all(&work).unwrap();
    let coordinator_metrics = format!("127.0.0.1:{}", free_port());
    let coordinator = Coordinator::start(
        &dir.path().join("coordinator"),
        &["--metrics-listen", &coordinator_metrics],
    )
    .unwrap();
    let worker_metrics: Vec<String> = (0..2)
        .map(|_| format!("127.0.0.1:{}", free_port()))
        .collect();
    let _workers: Vec<Proc> = worker_metrics
        .iter()
        .enumerate()
        .map(|(i, addr)| {
            start_worker(
                &coordinator.url(),
                &format!("w{}", i + 1),
                2,
                &["--metrics-listen", addr, "--throttle", "off"],
            )
            .unwrap()
        })
        .collect();
    let mut client = wait_ready(&coordinator.url(), 2).await.unwrap();

    let spec = format!(
        "name = \"metrics\"\n\
         [[task]]\nid = \"ok\"\narray = {N_OK}\nrun = 'sleep 0.4'\n\
         [[task]]\nid = \"bad\"\nrun = 'exit 3'\nretries = 0\n"
    );
    let wave_id = submit(&mut client, &spec).await.unwrap();

    // During the run: parses, and shows work in flight.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let during = parse_prometheus(&scrape(&coordinator_metrics).unwrap()).unwrap();
        let running = sample_value(&during, "venom_micro_tasks", &[("state", "running")]);
        let assigned = sample_value(&during, "venom_micro_tasks", &[("state", "assigned")]);
        if running.unwrap_or(0.0) + assigned.unwrap_or(0.0) > 0.0 {
            assert_eq!(
                sample_value(&during, "venom_waves", &[("state", "running")]),
                Some(1.0)
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never saw a micro-task in flight"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let worker_during: f64 = worker_metrics
        .iter()
        .map(|addr| {
            let s = parse_prometheus(&scrape(addr).unwrap()).unwrap();
            sample_value(&s, "venom_worker_running_micro_tasks", &[]).unwrap()
        })
        .sum();
    assert!(
        worker_during <= 4.0,
        "{worker_during} running on 2 × 2 slots"
    );

    let summary = wait_wave(&coordinator.url(), wave_id, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(summary.state(), pb::WaveState::Failed);

    // After: the coordinator's figures match the run.
    let after = parse_prometheus(&scrape(&coordinator_metrics).unwrap()).unwrap();
    let v = |name: &str, labels: &[(&str, &str)]| {
        sample_value(&after, name, labels).unwrap_or_else(|| panic!("no {name}{labels:?}"))
    };
    assert_eq!(
        v("venom_micro_tasks", &[("state", "succeeded")]),
        f64::from(N_OK)
    );
    assert_eq!(v("venom_micro_tasks", &[("state", "failed")]), 1.0);
    assert_eq!(v("venom_micro_tasks", &[("state", "running")]), 0.0);
    assert_eq!(v("venom_waves", &[("state", "failed")]), 1.0);
    assert_eq!(
        v(
            "venom_micro_task_attempts_total",
            &[("outcome", "succeeded")]
        ),
        f64::from(N_OK)
    );
    assert_eq!(
        v("venom_micro_task_attempts_total", &[("outcome", "failed")]),
        1.0
    );
    assert_eq!(
        v("venom_dispatch_latency_seconds_count", &[]),
        f64::from(N_OK + 1)
    );
    assert_eq!(
        v("venom_wave_duration_seconds_count", &[("state", "failed")]),
        1.0
    );
    assert!(v("venom_raft_proposal_duration_seconds_count", &[]) >= 1.0);
    assert_eq!(v("venom_raft_is_leader", &[]), 1.0);
    assert_eq!(v("venom_raft_members", &[]), 1.0);
    assert!(v("venom_raft_applied_index", &[]) >= 2.0);
    assert_eq!(v("venom_stale_results_total", &[]), 0.0);
    assert_eq!(v("venom_ready_queue_depth", &[]), 0.0);
    for node in ["w1", "w2"] {
        let theta = v("venom_node_theta", &[("node", node)]);
        assert!((0.0..=1.0).contains(&theta), "θ of {node}: {theta}");
        for component in ["cpu", "mem", "term"] {
            let h = v(
                "venom_node_health",
                &[("node", node), ("component", component)],
            );
            assert!((0.0..=1.0).contains(&h), "{component} of {node}: {h}");
        }
        assert_eq!(v("venom_node_slots", &[("node", node)]), 2.0);
        assert_eq!(v("venom_node_up", &[("node", node)]), 1.0);
        assert!(v("venom_node_s_total", &[("node", node)]) > 0.0);
        let modes: f64 = after
            .iter()
            .filter(|s| s.name == "venom_node_mode" && s.labels["node"] == node)
            .map(|s| s.value)
            .sum();
        assert_eq!(modes, 1.0, "{node} is in exactly one mode");
    }
    assert!(v("venom_cluster_model", &[("figure", "s_total")]) > 0.0);

    // The workers' figures add up to the same run.
    let mut succeeded = 0.0;
    let mut failed = 0.0;
    let mut spawned = 0.0;
    for addr in &worker_metrics {
        let s = parse_prometheus(&scrape(addr).unwrap()).unwrap();
        succeeded += sample_value(
            &s,
            "venom_worker_attempts_total",
            &[("outcome", "succeeded")],
        )
        .unwrap_or(0.0);
        failed += sample_value(&s, "venom_worker_attempts_total", &[("outcome", "failed")])
            .unwrap_or(0.0);
        spawned += sample_value(&s, "venom_worker_spawn_latency_seconds_count", &[]).unwrap();
        assert_eq!(
            sample_value(&s, "venom_worker_running_micro_tasks", &[]),
            Some(0.0)
        );
        assert_eq!(sample_value(&s, "venom_worker_connected", &[]), Some(1.0));
        let theta = sample_value(&s, "venom_worker_theta", &[]).unwrap();
        assert!((0.0..=1.0).contains(&theta));
    }
    assert_eq!(succeeded, f64::from(N_OK));
    assert_eq!(failed, 1.0);
    assert_eq!(spawned, f64::from(N_OK + 1));

    // `venomctl monitor --cluster` streams every node's θ from the coordinator.
    let out = std::process::Command::new(bin_path("venomctl"))
        .envs(venom_tests::pki::pki().env(venom_tls::Role::Admin, venom_tests::pki::ADMIN))
        .args(["--coordinator", &coordinator.url(), "--output", "json"])
        .args(["monitor", "--cluster", "2s"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "one sample a second for 2 s: {lines:?}");
    for line in &lines {
        let nodes = line["nodes"].as_array().unwrap();
        let names: Vec<&str> = nodes.iter().map(|n| n["name"].as_str().unwrap()).collect();
        assert_eq!(names, ["w1", "w2"]);
        for n in nodes {
            let theta = n["theta"].as_f64().unwrap();
            assert!((0.0..=1.0).contains(&theta), "{n}");
            assert!(!n["mode"].as_str().unwrap().is_empty());
        }
    }
}

#[test]
fn the_parser_rejects_what_prometheus_would() {
    let good = "# HELP a_total things\n# TYPE a_total counter\na_total{x=\"q\\\"uote\"} 3\n\
                # TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_bucket{le=\"+Inf\"} 2\nh_sum 3.5\nh_count 2\n";
    let samples = parse_prometheus(good).unwrap();
    assert_eq!(
        sample_value(&samples, "a_total", &[("x", "q\"uote")]),
        Some(3.0)
    );
    for bad in [
        "a_total 3\n",                         // no TYPE
        "# TYPE a counter\na{x=unquoted} 1\n", // unquoted value
        "# TYPE a counter\na one\n",           // not a number
        "# TYPE 1a counter\n",                 // bad name
        "# TYPE h histogram\nh_bucket{le=\"1\"} 3\nh_bucket{le=\"+Inf\"} 2\nh_count 2\n", // not cumulative
        "# TYPE h histogram\nh_bucket{le=\"+Inf\"} 2\nh_count 3\n", // +Inf != count
    ] {
        assert!(parse_prometheus(bad).is_err(), "accepted {bad:?}");
    }
}
