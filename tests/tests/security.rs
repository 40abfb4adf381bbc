//! Adversarial cases against a secured cluster: three members and a worker with mutual TLS,
//! as `venomctl tls init` sets them up. Each case asserts the refusal AND that waves,
//! nodes, every member's term and leader, and the membership are unchanged afterwards.
//! The table of outcomes is printed (`--nocapture`) and kept in docs/SECURITY.md.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use protobuf::Message as _;
use tokio_stream::StreamExt as _;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::Code;
use venom_proto::v1 as pb;
use venom_proto::v1::client_service_client::ClientServiceClient;
use venom_proto::v1::raft_service_client::RaftServiceClient;
use venom_proto::v1::worker_service_client::WorkerServiceClient;
use venom_tests::pki::pki;
use venom_tests::*;
use venom_tls::issue::{self, Validity};
use venom_tls::{Dialer, Peer, Role, TlsFiles};

/// One member's view: its term, its leader, and the membership (id, address).
type MemberView = (u64, u64, Vec<(u64, String)>);

/// What must not change: every member's term, leader and membership; waves; nodes.
#[derive(Debug, Clone, PartialEq)]
struct Fingerprint {
    members: Vec<MemberView>,
    waves: Vec<(u64, i32, String, u64)>,
    nodes: Vec<(String, i32)>,
}

async fn fingerprint(group: &Group) -> Fingerprint {
    let mut members = Vec::new();
    for id in group.ids() {
        let status = cluster_status(group.url(id))
            .await
            .expect("a member answers");
        let mut list: Vec<(u64, String)> = status
            .members
            .iter()
            .map(|m| (m.id, m.address.clone()))
            .collect();
        list.sort();
        members.push((status.term, status.leader_id, list));
    }
    let mut c = client(group.url(1)).await.unwrap();
    let waves = c
        .list_waves(pb::ListWavesRequest {})
        .await
        .unwrap()
        .into_inner()
        .waves
        .into_iter()
        .map(|w| {
            let done = w.counts.map_or(0, |c| c.succeeded);
            (w.wave_id, w.state, w.owner, done)
        })
        .collect();
    let mut nodes: Vec<(String, i32)> = c
        .list_nodes(pb::ListNodesRequest {})
        .await
        .unwrap()
        .into_inner()
        .nodes
        .into_iter()
        .map(|n| (n.name, n.state))
        .collect();
    nodes.sort();
    Fingerprint {
        members,
        waves,
        nodes,
    }
}

async fn channel_as(dialer: &Dialer, url: &str) -> Result<Channel, String> {
    dialer
        .endpoint(url)
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(3))
        .timeout(Duration::from_secs(10))
        .connect()
        .await
        .map_err(|e| format!("{e:?}"))
}

async fn client_as(role: Role, name: &str, url: &str) -> ClientServiceClient<Channel> {
    let channel = channel_as(&pki().dialer(role, name), url).await.unwrap();
    ClientServiceClient::new(channel).max_decoding_message_size(64 << 20)
}

/// A refusal at the TLS layer: no answer from any handler.
fn transport_refusal(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable | Code::Unknown | Code::Cancelled | Code::Internal
    )
}

/// `ListWaves` through `dialer` is refused below gRPC, at connect or at the first call.
async fn refused_by_transport(dialer: &Dialer, url: &str, why: &str) {
    let status = match channel_as(dialer, url).await {
        Err(e) => tonic::Status::unavailable(e),
        Ok(channel) => ClientServiceClient::new(channel)
            .list_waves(pb::ListWavesRequest {})
            .await
            .expect_err(why),
    };
    assert!(transport_refusal(&status), "{why}: {status:?}");
}

fn write_issued(dir: &Path, peer: &Peer, issued: &issue::Issued, ca_pem: &str) -> TlsFiles {
    std::fs::create_dir_all(dir).unwrap();
    let (cert, key) = issue::paths(dir, peer);
    std::fs::write(&cert, &issued.cert_pem).unwrap();
    std::fs::write(&key, &issued.key_pem).unwrap();
    let ca = dir.join("ca.pem");
    std::fs::write(&ca, ca_pem).unwrap();
    TlsFiles { ca, cert, key }
}

/// A worker stream: the registration, then whatever else `rest` holds.
async fn connect_as(
    role: Role,
    cert_name: &str,
    url: &str,
    messages: Vec<pb::WorkerMessage>,
) -> Result<tonic::Streaming<pb::CoordinatorMessage>, tonic::Status> {
    let channel = channel_as(&pki().dialer(role, cert_name), url)
        .await
        .map_err(tonic::Status::unavailable)?;
    let mut worker = WorkerServiceClient::new(channel).max_encoding_message_size(64 << 20);
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    for m in messages {
        tx.send(m).await.unwrap();
    }
    // Keep the sending side open for the life of the test (dropping it ends the stream).
    std::mem::forget(tx);
    worker
        .connect(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map(|r| r.into_inner())
}

fn register(name: &str, slots: u32) -> pb::WorkerMessage {
    pb::WorkerMessage {
        register: Some(pb::Register {
            name: name.into(),
            slots,
            profile: Some(pb::HardwareProfile {
                cpu_physical_cores: 1,
                cpu_logical_cores: 1,
                memory_total_bytes: 1 << 30,
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// The leader's id, and a raft heartbeat from `from` to `to` at `term`.
fn heartbeat(from: u64, to: u64, term: u64) -> Vec<u8> {
    let mut m = raft::eraftpb::Message::default();
    m.set_msg_type(raft::eraftpb::MessageType::MsgHeartbeat);
    m.from = from;
    m.to = to;
    m.term = term;
    m.write_to_bytes().unwrap()
}

#[derive(Default)]
struct Table(Vec<(String, String)>);

impl Table {
    fn row(&mut self, case: &str, outcome: impl Into<String>) {
        let outcome = outcome.into();
        eprintln!("| {case} | {outcome} |");
        self.0.push((case.to_owned(), outcome));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_secured_cluster_refuses_every_adversarial_case_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let group = Group::start(dir.path(), 3, &[]).unwrap();
    let leader = group.wait_leader(0, Duration::from_secs(20)).await;
    let _w1 = start_worker(&group.all_urls(), "w1", 2, &[]).unwrap();
    wait_ready(group.url(leader), 1).await.unwrap();

    // Alice's wave (finished), and a node `evil` whose stream the test holds.
    let mut alice = client_as(Role::Client, "alice", group.url(leader)).await;
    let wave = alice
        .submit_wave(pb::SubmitWaveRequest {
            spec: b"name = \"alices\"\n[[task]]\nid = \"t\"\nrun = \"echo hi\"\n".to_vec(),
            format: "toml".into(),
            traceparent: String::new(),
            submission_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .wave_id;
    let deadline = Instant::now() + Duration::from_secs(30);
    while !group.wave(wave).await.is_some_and(|w| is_finished(&w)) {
        assert!(Instant::now() < deadline, "alice's wave did not finish");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let summary = group.wave(wave).await.unwrap();
    assert_eq!(summary.owner, "alice", "waves record who submitted them");
    let mut evil = connect_as(
        Role::Worker,
        "evil",
        group.url(leader),
        vec![register("evil", 1)],
    )
    .await
    .expect("a worker with its own certificate registers");
    assert!(evil.next().await.is_some(), "evil is registered");
    let deadline = Instant::now() + Duration::from_secs(10);
    while fingerprint(&group).await.nodes.len() < 2 {
        assert!(Instant::now() < deadline, "evil never appeared");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let before = fingerprint(&group).await;
    let url = group.url(leader).to_owned();
    let mut table = Table::default();
    let cases_run = Arc::new(AtomicUsize::new(0));
    let check = |case: &str| {
        let case = case.to_owned();
        let group = &group;
        let before = before.clone();
        let cases_run = cases_run.clone();
        async move {
            let after = fingerprint(group).await;
            assert_eq!(after, before, "case `{case}` changed the cluster");
            cases_run.fetch_add(1, Ordering::Relaxed);
        }
    };

    // 1. Plaintext to the TLS port.
    let plain = Endpoint::from_shared(url.clone())
        .unwrap()
        .connect_timeout(Duration::from_secs(3))
        .timeout(Duration::from_secs(5));
    let refused = match plain.connect().await {
        Err(e) => format!("connection failed: {e}"),
        Ok(channel) => {
            let status = ClientServiceClient::new(channel)
                .list_waves(pb::ListWavesRequest {})
                .await
                .expect_err("plaintext must not be served");
            assert!(transport_refusal(&status), "{status:?}");
            format!("no gRPC answer ({:?})", status.code())
        }
    };
    table.row("plaintext to the TLS port", refused);
    check("plaintext").await;

    // 2. TLS without a client certificate.
    let ca_pem = std::fs::read(pki().ca_cert()).unwrap();
    let anonymous = Endpoint::from_shared(url.replace("http://", "https://"))
        .unwrap()
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(&ca_pem))
                .domain_name("127.0.0.1"),
        )
        .unwrap()
        .timeout(Duration::from_secs(5));
    let outcome = match anonymous.connect().await {
        Err(e) => format!("handshake failed: {e}"),
        Ok(channel) => {
            let status = ClientServiceClient::new(channel)
                .list_waves(pb::ListWavesRequest {})
                .await
                .expect_err("no client certificate, no service");
            assert!(transport_refusal(&status), "{status:?}");
            format!("handshake failed ({:?})", status.code())
        }
    };
    table.row("TLS without a client certificate", outcome);
    check("no client certificate").await;

    // 3. A certificate from another CA.
    let other = issue::Ca::generate(Validity::days(1)).unwrap();
    let mallory = Peer::new(Role::Admin, "mallory").unwrap();
    let issued = other.issue(&mallory, &[], Validity::days(1)).unwrap();
    let mut files = write_issued(
        &dir.path().join("other-ca"),
        &mallory,
        &issued,
        &other.cert_pem(),
    );
    // Trust the real CA (so the server is accepted) but present the other CA's certificate.
    files.ca = pki().ca_cert();
    let dialer = Dialer::tls(Arc::new(files.load().unwrap()));
    refused_by_transport(&dialer, &url, "another CA's certificate").await;
    table.row("admin certificate from another CA", "handshake failed");
    check("another CA").await;

    // 4. An expired certificate from the cluster CA.
    let expired_peer = Peer::new(Role::Admin, "expired").unwrap();
    let now = time::OffsetDateTime::now_utc();
    let issued = pki().with_ca(|ca| {
        ca.issue(
            &expired_peer,
            &[],
            Validity {
                not_before: now - time::Duration::days(10),
                not_after: now - time::Duration::days(1),
            },
        )
        .unwrap()
    });
    let ca_text = std::fs::read_to_string(pki().ca_cert()).unwrap();
    let files = write_issued(
        &dir.path().join("expired"),
        &expired_peer,
        &issued,
        &ca_text,
    );
    let dialer = Dialer::tls(Arc::new(files.load().unwrap()));
    refused_by_transport(&dialer, &url, "an expired certificate").await;
    table.row("expired admin certificate", "handshake failed");
    check("expired").await;

    // 5–12. Wrong roles.
    let spec = b"name = \"x\"\n[[task]]\nid = \"t\"\nrun = \"true\"\n".to_vec();
    let submit = pb::SubmitWaveRequest {
        spec: spec.clone(),
        format: "toml".into(),
        traceparent: String::new(),
        submission_id: String::new(),
    };
    for (role, name) in [(Role::Worker, "w1"), (Role::Member, "2")] {
        let status = client_as(role, name, &url)
            .await
            .submit_wave(submit.clone())
            .await
            .expect_err("only clients and admins submit");
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
        table.row(
            &format!("{role} certificate calls SubmitWave"),
            "PermissionDenied",
        );
        check("wrong role submit").await;
    }
    let status = client_as(Role::Worker, "w1", &url)
        .await
        .list_waves(pb::ListWavesRequest {})
        .await
        .expect_err("workers do not read waves");
    assert_eq!(status.code(), Code::PermissionDenied);
    table.row("worker certificate calls ListWaves", "PermissionDenied");
    check("worker reads").await;

    let mut bob = client_as(Role::Client, "bob", &url).await;
    let status = bob
        .add_member(pb::AddMemberRequest {
            id: 9,
            address: "127.0.0.1:1".into(),
        })
        .await
        .expect_err("clients do not change membership");
    assert_eq!(status.code(), Code::PermissionDenied);
    table.row("client certificate calls AddMember", "PermissionDenied");
    check("add member").await;
    let status = bob
        .remove_member(pb::RemoveMemberRequest { id: 2 })
        .await
        .expect_err("clients do not change membership");
    assert_eq!(status.code(), Code::PermissionDenied);
    table.row("client certificate calls RemoveMember", "PermissionDenied");
    check("remove member").await;
    let status = bob
        .drain_node(pb::DrainNodeRequest {
            name: "w1".into(),
            drain: true,
        })
        .await
        .expect_err("clients do not drain");
    assert_eq!(status.code(), Code::PermissionDenied);
    table.row("client certificate calls DrainNode", "PermissionDenied");
    check("drain").await;
    let status = bob
        .cancel_wave(pb::CancelWaveRequest { wave_id: wave })
        .await
        .expect_err("bob cannot cancel alice's wave");
    assert_eq!(status.code(), Code::PermissionDenied);
    table.row("client bob cancels client alice's wave", "PermissionDenied");
    check("cancel another's wave").await;

    let status = connect_as(Role::Client, "bob", &url, vec![register("bob", 1)])
        .await
        .expect_err("clients are not workers");
    assert_eq!(status.code(), Code::PermissionDenied);
    table.row(
        "client certificate calls WorkerService.Connect",
        "PermissionDenied",
    );
    check("client connects").await;

    let channel = channel_as(&pki().dialer(Role::Client, "bob"), &url)
        .await
        .unwrap();
    let status = RaftServiceClient::new(channel)
        .send(pb::RaftBatch {
            from: 1,
            messages: vec![heartbeat(1, leader, 1_000)],
            from_address: String::new(),
            cluster_id: 0,
        })
        .await
        .expect_err("clients do not speak raft");
    assert_eq!(status.code(), Code::PermissionDenied);
    table.row(
        "client certificate calls RaftService.Send (high-term heartbeat)",
        "PermissionDenied",
    );
    check("client raft").await;

    // 13–14. Impersonation.
    let status = connect_as(Role::Worker, "w-a", &url, vec![register("w1", 1)])
        .await
        .expect_err("worker A cannot register as w1");
    assert_eq!(status.code(), Code::PermissionDenied);
    table.row(
        "worker A registers as w1 (w1 keeps its stream)",
        "PermissionDenied",
    );
    check("worker as another").await;
    let status = connect_as(Role::Worker, "w1", &url, vec![register("w1", 1)])
        .await
        .expect_err("w1's name is taken by the live worker");
    assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
    table.row(
        "a second worker with w1's own certificate (w1 keeps its stream)",
        "AlreadyExists",
    );
    check("second stream").await;

    let follower = group.ids().into_iter().find(|&id| id != leader).unwrap();
    let sender = group
        .ids()
        .into_iter()
        .find(|&id| id != leader && id != follower)
        .unwrap();
    let channel = channel_as(
        &pki().dialer(Role::Member, &sender.to_string()),
        group.url(follower),
    )
    .await
    .unwrap();
    let status = RaftServiceClient::new(channel)
        .send(pb::RaftBatch {
            from: leader,
            messages: vec![heartbeat(leader, follower, before.members[0].0 + 100)],
            from_address: String::new(),
            cluster_id: 0,
        })
        .await
        .expect_err("member certificates name their sender");
    assert_eq!(status.code(), Code::PermissionDenied);
    table.row(
        &format!("member {sender} sends a forged high-term heartbeat as leader {leader}"),
        "PermissionDenied",
    );
    check("forged heartbeat").await;

    // 15–17. Bounded input.
    let status = connect_as(Role::Worker, "big", &url, vec![register("big", u32::MAX)])
        .await
        .expect_err("u32::MAX slots");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    table.row("registration with slots = u32::MAX", "InvalidArgument");
    check("slots").await;
    let mut huge = register("big", 1);
    if let Some(r) = huge.register.as_mut() {
        if let Some(p) = r.profile.as_mut() {
            p.cpu_brand = "x".repeat(10 << 20);
        }
    }
    let status = connect_as(Role::Worker, "big", &url, vec![huge])
        .await
        .expect_err("a 10 MB profile");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    table.row("registration with a 10 MB profile", "InvalidArgument");
    check("profile").await;

    let big_output = pb::WorkerMessage {
        finished: vec![pb::TaskFinished {
            attempt: Some(pb::AttemptRef {
                wave_id: wave,
                micro: 0,
                attempt: 1,
            }),
            exit_code: Some(0),
            stdout: vec![b'x'; 15 << 20],
            ..Default::default()
        }],
        ..Default::default()
    };
    let logs_before = alice
        .get_logs(pb::GetLogsRequest {
            wave_id: wave,
            task_id: "t".into(),
            index: None,
        })
        .await
        .unwrap()
        .into_inner();
    let _evil_again = connect_as(Role::Worker, "evil", &url, vec![big_output]).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let logs_after = alice
        .get_logs(pb::GetLogsRequest {
            wave_id: wave,
            task_id: "t".into(),
            index: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        logs_after, logs_before,
        "a stranger's report changes no result"
    );
    table.row(
        "15 MB stdout report for another node's attempt",
        "ignored; stored output unchanged (the coordinator keeps at most 64 KiB per stream)",
    );
    check("big report").await;

    let status = alice
        .submit_wave(pb::SubmitWaveRequest {
            spec: vec![b'#'; 100 << 20],
            format: "toml".into(),
            traceparent: String::new(),
            submission_id: String::new(),
        })
        .await
        .expect_err("a 100 MB message");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    table.row("100 MB SubmitWave", "ResourceExhausted; still serving");
    check("100 MB").await;

    // 18. A flood of connections and stalled handshakes from other addresses while a
    // legitimate client keeps being served.
    let port: u16 = url.rsplit(':').next().unwrap().parse().unwrap();
    let mut flood = Vec::new();
    for i in 0..600u32 {
        let source = std::net::Ipv4Addr::new(127, 0, 1 + (i % 4) as u8, 2);
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        if socket.bind((source, 0).into()).is_err() {
            continue;
        }
        if let Ok(Ok(stream)) = tokio::time::timeout(
            Duration::from_millis(500),
            socket.connect(([127, 0, 0, 1], port).into()),
        )
        .await
        {
            flood.push(stream);
        }
    }
    let started = Instant::now();
    let mut served = 0;
    for _ in 0..5 {
        let mut fresh = client_as(Role::Client, "alice", &url).await;
        fresh.list_waves(pb::ListWavesRequest {}).await.unwrap();
        served += 1;
    }
    let took = started.elapsed();
    drop(flood);
    assert_eq!(served, 5);
    table.row(
        "600 connections from 4 other addresses that never finish a handshake",
        format!("5 fresh legitimate calls served in {} ms", took.as_millis()),
    );
    check("flood").await;

    eprintln!(
        "{} adversarial cases, all refused, cluster unchanged",
        table.0.len()
    );
    assert!(cases_run.load(Ordering::Relaxed) >= 20);
    drop(evil);
}

/// A coordinator refuses to serve beyond loopback without TLS, and says how to fix it.
#[test]
fn a_coordinator_refuses_a_plaintext_listen_beyond_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(bin_path("venom-coordinator"))
        .args([
            "--listen",
            &format!("0.0.0.0:{}", free_port()),
            "--bootstrap",
        ])
        .arg("--data-dir")
        .arg(dir.path().join("c"))
        .env_remove("VENOM_TLS_CA")
        .env_remove("VENOM_TLS_CERT")
        .env_remove("VENOM_TLS_KEY")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("refusing to serve beyond loopback without TLS"),
        "{stderr}"
    );
    assert!(
        !dir.path().join("c").exists(),
        "nothing is written before the refusal"
    );
}

/// venomctl and workers refuse plaintext to another machine before sending anything, and
/// never downgrade an https:// address.
#[test]
fn clients_and_workers_refuse_plaintext_beyond_loopback() {
    let out = std::process::Command::new(bin_path("venomctl"))
        .args(["--coordinator", "10.255.255.1:7070", "waves"])
        .env_remove("VENOM_TLS_CA")
        .env_remove("VENOM_TLS_CERT")
        .env_remove("VENOM_TLS_KEY")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("refusing plaintext"), "{stderr}");

    let out = std::process::Command::new(bin_path("venomctl"))
        .args(["--coordinator", "https://127.0.0.1:7070", "waves"])
        .env_remove("VENOM_TLS_CA")
        .env_remove("VENOM_TLS_CERT")
        .env_remove("VENOM_TLS_KEY")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("refusing to connect in plaintext"),
        "{stderr}"
    );

    let out = std::process::Command::new(bin_path("venom-worker"))
        .args(["--coordinator", "10.255.255.1:7070", "--name", "w"])
        .env_remove("VENOM_TLS_CA")
        .env_remove("VENOM_TLS_CERT")
        .env_remove("VENOM_TLS_KEY")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("refusing plaintext"), "{stderr}");
}

/// A server that presents a client certificate (from the cluster CA) is refused by venomctl
/// and by workers: only member certificates may serve.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_with_a_client_certificate_is_refused() {
    let alice = pki().files(Role::Client, "alice").load().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(alice.server_config().unwrap()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let completed = Arc::new(AtomicUsize::new(0));
    let attempts = Arc::new(AtomicUsize::new(0));
    {
        let (completed, attempts) = (completed.clone(), attempts.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                attempts.fetch_add(1, Ordering::Relaxed);
                if acceptor.accept(stream).await.is_ok() {
                    completed.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
    let url = format!("127.0.0.1:{port}");
    let (ok, _, stderr) = venomctl(&url, &["waves"]);
    assert!(!ok, "venomctl accepted a client certificate as a server");
    assert!(
        stderr.contains("certificate") || stderr.contains("tls") || stderr.contains("TLS"),
        "{stderr}"
    );
    let mut worker = start_worker(&url, "w-fake", 1, &[]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(3);
    while attempts.load(Ordering::Relaxed) < 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    worker.kill9();
    assert!(
        attempts.load(Ordering::Relaxed) >= 2,
        "both tried to connect"
    );
    assert_eq!(
        completed.load(Ordering::Relaxed),
        0,
        "no handshake with a server holding a client certificate may complete"
    );
}

/// `venomctl tls init` writes keys 0600 in a 0700 directory; the data dir a coordinator
/// creates is 0700 (it holds every wave's commands and environment).
#[test]
fn keys_and_data_dirs_are_private() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    let out = std::process::Command::new(bin_path("venomctl"))
        .arg("tls")
        .arg("init")
        .arg("--dir")
        .arg(&certs)
        .args(["--member", "1", "--worker", "n1", "--client", "alice"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&certs), 0o700);
    let mut keys = 0;
    for entry in std::fs::read_dir(&certs).unwrap() {
        let path = entry.unwrap().path();
        if path.to_string_lossy().ends_with("-key.pem") {
            assert_eq!(mode(&path), 0o600, "{}", path.display());
            keys += 1;
        }
    }
    assert_eq!(keys, 5, "CA, member, worker, client and the default admin");
    // A second init over the same directory is refused and changes nothing.
    let ca_before = std::fs::read(certs.join("ca.pem")).unwrap();
    let again = std::process::Command::new(bin_path("venomctl"))
        .args(["tls", "init", "--dir"])
        .arg(&certs)
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert_eq!(std::fs::read(certs.join("ca.pem")).unwrap(), ca_before);

    let coordinator = Coordinator::start(&dir.path().join("data"), &[]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !coordinator.data_dir.exists() {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(mode(&coordinator.data_dir), 0o700);
}

/// Rotation: a certificate issued from the same CA after the cluster started works at once;
/// a member restarted with a new certificate rejoins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_without_restarting_the_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let mut group = Group::start(dir.path(), 3, &[]).unwrap();
    let leader = group.wait_leader(0, Duration::from_secs(20)).await;
    let url = group.url(leader).to_owned();

    // A brand-new user, issued now by `venomctl tls issue` into the test CA's directory.
    let out = std::process::Command::new(bin_path("venomctl"))
        .args(["tls", "issue", "client", "carol", "--dir"])
        .arg(pki().dir())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let carol = TlsFiles::in_dir(pki().dir(), &Peer::new(Role::Client, "carol").unwrap());
    let dialer = Dialer::tls(Arc::new(carol.load().unwrap()));
    let mut c = ClientServiceClient::new(channel_as(&dialer, &url).await.unwrap());
    c.list_waves(pb::ListWavesRequest {}).await.unwrap();

    // A member gets a new certificate (`--replace`) and restarts: it takes part again.
    let follower = group.ids().into_iter().find(|&id| id != leader).unwrap();
    let out = std::process::Command::new(bin_path("venomctl"))
        .args([
            "tls",
            "issue",
            "member",
            &follower.to_string(),
            "--replace",
            "--dir",
        ])
        .arg(pki().dir())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let member = group.kill9(follower);
    group.restart(follower, member).unwrap();
    group
        .wait_caught_up(follower, leader, Duration::from_secs(20))
        .await;
}
