//! Malformed wave files against a real coordinator: each is rejected with a message that
//! names the task and the field, `venomctl submit` exits non-zero, and the coordinator
//! keeps no trace of it.

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::Command;

use venom_proto::v1 as pb;
use venom_tests::*;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("bad-waves")
}

struct Case {
    file: PathBuf,
    task: Option<String>,
    field: String,
}

fn cases() -> Vec<Case> {
    let dir = fixtures();
    let table = std::fs::read_to_string(dir.join("expected.tsv")).unwrap();
    let mut cases: Vec<Case> = table
        .lines()
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let cols: Vec<&str> = line.split('\t').collect();
            assert_eq!(cols.len(), 3, "bad expected.tsv line {line:?}");
            Case {
                file: dir.join(cols[0]),
                task: (cols[1] != "-").then(|| cols[1].to_string()),
                field: cols[2].to_string(),
            }
        })
        .collect();
    // A 10 MB file, made here rather than committed.
    let big = std::env::temp_dir().join(format!("venom-10mb-{}.toml", std::process::id()));
    let mut text = String::from("name = \"big\"\n[[task]]\nid = \"a\"\nrun = \"true\"\n");
    while text.len() < 10 << 20 {
        text.push_str("# padding padding padding padding padding padding padding padding\n");
    }
    std::fs::write(&big, text).unwrap();
    cases.push(Case {
        file: big,
        task: None,
        field: "file".into(),
    });
    cases
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_waves_are_rejected_naming_task_and_field_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator =
        Coordinator::start(&dir.path().join("c"), &["--max-message-bytes", "33554432"]).unwrap();
    let mut c = wait_ready(&coordinator.url(), 0).await.unwrap();
    let cases = cases();
    assert!(cases.len() >= 15, "at least 15 malformed files");
    for case in &cases {
        let name = case.file.file_name().unwrap().to_string_lossy().to_string();
        let bytes = std::fs::read(&case.file).unwrap();

        // The coordinator's own validation (authoritative), straight over gRPC.
        let format = if name.ends_with(".json") {
            "json"
        } else {
            "toml"
        };
        let status = c
            .submit_wave(pb::SubmitWaveRequest {
                spec: bytes,
                format: format.into(),
                traceparent: String::new(),
                submission_id: String::new(),
            })
            .await
            .expect_err(&format!("{name} was accepted"));
        assert_eq!(
            status.code(),
            tonic::Code::InvalidArgument,
            "{name}: {status:?}"
        );
        let msg = status.message();
        assert!(
            msg.contains(&format!("`{}`", case.field)) || case.field == "file",
            "{name}: {msg}"
        );
        if let Some(task) = &case.task {
            assert!(
                msg.contains(task.as_str()),
                "{name}: message does not name task {task}: {msg}"
            );
        }

        // And through venomctl, which validates first and exits non-zero.
        let out = Command::new(bin_path("venomctl"))
            .envs(venom_tests::pki::pki().env(venom_tls::Role::Admin, venom_tests::pki::ADMIN))
            .args(["--coordinator", &coordinator.url(), "submit"])
            .arg(&case.file)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{name}: venomctl submit succeeded");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(&format!("`{}`", case.field)) || case.field == "file",
            "{name}: venomctl's error does not name field {}: {stderr}",
            case.field
        );
        if let Some(task) = &case.task {
            assert!(
                stderr.contains(task.as_str()),
                "{name}: venomctl's error does not name task {task}: {stderr}"
            );
        }
        assert_eq!(
            stderr.trim().lines().count(),
            1,
            "{name}: one clear line, got {stderr}"
        );
    }
    let waves = c
        .list_waves(pb::ListWavesRequest {})
        .await
        .unwrap()
        .into_inner()
        .waves;
    assert!(waves.is_empty(), "nothing stored: {waves:?}");
    let status = c
        .cluster_status(pb::ClusterStatusRequest::default())
        .await
        .unwrap()
        .into_inner();
    // A single node's log holds only its election entry, the cluster identity its first
    // leader set and the record that this member started, after the bootstrap snapshot
    // point: no wave was ever proposed.
    let bootstrap = venom_coordinator::storage::BOOTSTRAP_INDEX;
    assert!(status.commit_index <= bootstrap + 3, "{status:?}");
}
