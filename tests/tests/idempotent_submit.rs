//! Idempotent submit with the real binaries: a submission id given twice makes one wave,
//! and a submit whose leader is SIGKILLed right after it was sent, retried by `venomctl`
//! with the same id, leaves exactly one wave whatever the kill interrupted (before the
//! request arrived, mid-commit, or after the commit but before the answer).
//!
//! Set `VENOM_KEEP_TEST_DIR=1` to keep the coordinators' data dirs and logs.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use venom_proto::v1 as pb;
use venom_tests::*;

/// A wave file named `name` (one task; no worker is needed to submit it).
fn wave_file(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(
        &path,
        format!("name = \"{name}\"\n[[task]]\nid = \"t\"\nrun = \"true\"\n"),
    )
    .unwrap();
    path
}

/// `venomctl submit FILE --submission-id ID`; the wave id it printed.
fn submit_as(urls: &str, file: &Path, id: &str) -> Result<u64, String> {
    let (ok, stdout, stderr) = venomctl(
        urls,
        &["submit", file.to_str().unwrap(), "--submission-id", id],
    );
    if !ok {
        return Err(stderr);
    }
    stdout
        .trim()
        .parse()
        .map_err(|e| format!("`{stdout}` is no wave id ({e}); stderr: {stderr}"))
}

/// The waves `venomctl waves --output json` lists: name → wave ids.
fn waves_by_name(urls: &str) -> BTreeMap<String, Vec<u64>> {
    let (ok, stdout, stderr) = venomctl(urls, &["waves", "--output", "json"]);
    assert!(ok, "venomctl waves: {stderr}");
    let waves: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let mut by_name: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for wave in waves.as_array().unwrap() {
        by_name
            .entry(wave["name"].as_str().unwrap().to_owned())
            .or_default()
            .push(wave["wave_id"].as_u64().unwrap());
    }
    by_name
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submission_id_given_twice_makes_one_wave() {
    let dir = test_dir("idempotent_submit").unwrap();
    let coordinator = Coordinator::start(&dir.path.join("c"), &[]).unwrap();
    let url = coordinator.url();
    let mut client = wait_ready(&url, 0).await.unwrap();
    let file = wave_file(&dir.path, "nightly");

    let id = "0123456789abcdef0123456789abcdef";
    let first = submit_as(&url, &file, id).unwrap();
    let again = submit_as(&url, &file, id).unwrap();
    assert_eq!(again, first, "the same submission id answers the same wave");
    assert_eq!(waves_by_name(&url)["nightly"], [first], "one wave");

    // Another id, or none (a random one per invocation), is another submission.
    let other = submit_as(&url, &file, "nightly-2").unwrap();
    let (ok, stdout, stderr) = venomctl(&url, &["submit", file.to_str().unwrap()]);
    assert!(ok, "{stderr}");
    let fresh: u64 = stdout.trim().parse().unwrap();
    assert_eq!(
        waves_by_name(&url)["nightly"],
        [first, other, fresh],
        "three submissions, three waves"
    );

    // A bad id: venomctl refuses it before sending, the coordinator refuses it too.
    let (ok, _, stderr) = venomctl(
        &url,
        &[
            "submit",
            file.to_str().unwrap(),
            "--submission-id",
            "two words",
        ],
    );
    assert!(!ok);
    assert!(stderr.contains("--submission-id"), "{stderr}");
    let status = client
        .submit_wave(pb::SubmitWaveRequest {
            spec: std::fs::read(&file).unwrap(),
            format: "toml".into(),
            traceparent: String::new(),
            submission_id: "x".repeat(65),
        })
        .await
        .expect_err("a 65-byte submission id");
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("submission_id"), "{status:?}");
    assert_eq!(waves_by_name(&url)["nightly"].len(), 3, "nothing more");
}

/// What one round of the leader-kill test saw.
#[derive(Debug)]
struct Round {
    delay_us: u64,
    /// The first attempt's answer: the wave id, or the error code.
    first: Result<u64, tonic::Code>,
    /// The wave the new leader already held before the retry (the first attempt committed).
    committed: Option<u64>,
    /// What `venomctl submit` with the same id answered after the kill.
    retried: u64,
    took: Duration,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_submit_retried_with_its_id_across_a_leader_kill_makes_one_wave() {
    let dir = test_dir("idempotent_submit_kill").unwrap();
    let mut group = Group::start(&dir.path, 3, &[]).unwrap();
    let urls = group.all_urls();
    // From "killed before the request arrived" to "killed after the commit".
    let delays_us = [0, 300, 1_000, 2_000, 5_000, 20_000];
    let mut rounds = Vec::new();
    let mut leader = group.wait_leader(0, Duration::from_secs(30)).await;
    for (round, &delay_us) in delays_us.iter().enumerate() {
        let name = format!("kill-{round}");
        let file = wave_file(&dir.path, &name);
        let id = format!("{name}-0123456789abcdef");
        // An open connection to the leader, so the request goes out at once.
        let mut c = client(group.url(leader)).await.unwrap();
        c.cluster_status(pb::ClusterStatusRequest::default())
            .await
            .unwrap();
        let request = pb::SubmitWaveRequest {
            spec: std::fs::read(&file).unwrap(),
            format: "toml".into(),
            traceparent: String::new(),
            submission_id: id.clone(),
        };
        let sent = tokio::spawn(async move { c.submit_wave(request).await });
        tokio::time::sleep(Duration::from_micros(delay_us)).await;
        let killed_at = Instant::now();
        let down = group.kill9(leader);
        let first = match sent.await.unwrap() {
            Ok(response) => Ok(response.into_inner().wave_id),
            Err(status) => Err(status.code()),
        };
        // Whether the first attempt was committed, as the new leader sees it.
        let next = group.wait_leader(leader, Duration::from_secs(30)).await;
        let committed = waves_by_name(group.url(next))
            .get(&name)
            .and_then(|ids| ids.first().copied());
        // venomctl finds the leader (past the dead member) and resends the same id.
        let retried = submit_as(&urls, &file, &id)
            .unwrap_or_else(|stderr| panic!("round {round}: the retry failed: {stderr}"));
        let took = killed_at.elapsed();
        if let Ok(first) = first {
            assert_eq!(
                retried, first,
                "round {round}: the retry answers the first wave"
            );
        }
        if let Some(committed) = committed {
            assert_eq!(
                retried, committed,
                "round {round}: the retry answers the committed wave"
            );
        }
        let by_name = waves_by_name(&urls);
        assert_eq!(
            by_name.get(&name).map(Vec::as_slice),
            Some(&[retried][..]),
            "round {round} (kill {delay_us} µs after sending, first attempt {first:?}): \
             exactly one wave"
        );
        rounds.push(Round {
            delay_us,
            first,
            committed,
            retried,
            took,
        });
        // The killed member comes back and catches up, so the next kill leaves a quorum.
        group.restart(leader, down).unwrap();
        group
            .wait_caught_up(leader, next, Duration::from_secs(30))
            .await;
        leader = next;
    }
    // Every round's wave is still there once, on every member's view through the leader.
    let by_name = waves_by_name(&urls);
    for (round, r) in rounds.iter().enumerate() {
        assert_eq!(
            by_name[&format!("kill-{round}")],
            [r.retried],
            "{rounds:#?}"
        );
    }
    eprintln!(
        "kill delay µs | first attempt | committed anyway | retry's wave | kill → retry answered"
    );
    for r in &rounds {
        eprintln!(
            "{:>13} | {:>13} | {:>16} | {:>12} | {:>6} ms",
            r.delay_us,
            match r.first {
                Ok(wave) => format!("wave {wave}"),
                Err(code) => format!("{code:?}"),
            },
            match (r.first, r.committed) {
                (Err(_), Some(wave)) => format!("yes: wave {wave}"),
                (Err(_), None) => "no".to_owned(),
                (Ok(_), _) => "-".to_owned(),
            },
            r.retried,
            r.took.as_millis()
        );
    }
}
