//! The coordinator's port serves gRPC health checking and reflection, so standard tools
//! (`grpcurl`, `grpc_health_probe`) work against it.

#![allow(clippy::unwrap_used)]

use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
use tonic_reflection::pb::v1::ServerReflectionRequest;
use venom_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_reflection_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::start(&dir.path().join("c"), &[]).unwrap();
    wait_ready(&coordinator.url(), 0).await.unwrap();
    let channel = endpoint(&coordinator.url())
        .unwrap()
        .connect()
        .await
        .unwrap();

    let mut health = HealthClient::new(channel.clone());
    for service in [
        "venom.v1.ClientService",
        "venom.v1.WorkerService",
        "venom.v1.RaftService",
    ] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32, "{service}");
    }
    let unknown = health
        .check(HealthCheckRequest {
            service: "no.such.Service".into(),
        })
        .await;
    assert_eq!(unknown.unwrap_err().code(), tonic::Code::NotFound);

    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = reflection
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection answer {response:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for service in [
        "venom.v1.ClientService",
        "venom.v1.WorkerService",
        "venom.v1.RaftService",
        "grpc.health.v1.Health",
    ] {
        assert!(
            names.iter().any(|n| n == service),
            "{service} not listed: {names:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raft_batches_from_unknown_peers_or_with_garbage_are_rejected_and_change_nothing() {
    use venom_proto::v1 as pb;
    use venom_proto::v1::raft_service_client::RaftServiceClient;

    let dir = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::start(&dir.path().join("c"), &[]).unwrap();
    let mut c = wait_ready(&coordinator.url(), 0).await.unwrap();
    let before = c
        .cluster_status(pb::ClusterStatusRequest::default())
        .await
        .unwrap()
        .into_inner();
    // The batches below come with member certificates (the test stands in for a member):
    // what refuses them is the admission of raft traffic, not the roles.
    let member = |id: &str| {
        let dialer = venom_tests::pki::pki().dialer(venom_tls::Role::Member, id);
        let url = coordinator.url();
        async move { RaftServiceClient::new(dialer.endpoint(&url).unwrap().connect().await.unwrap()) }
    };
    let mut raft = member("1").await;
    let mut stranger = member("99").await;

    let unknown = stranger
        .send(pb::RaftBatch {
            from: 99,
            messages: vec![Vec::new()],
            from_address: String::new(),
            cluster_id: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::PermissionDenied, "{unknown:?}");

    let garbage = raft
        .send(pb::RaftBatch {
            from: 1,
            messages: vec![vec![0xff, 0xff, 0xff, 0xff, 0x0f, 0x01]],
            from_address: String::new(),
            cluster_id: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(garbage.code(), tonic::Code::InvalidArgument, "{garbage:?}");

    // A batch from a member id of another cluster (its first leader named it differently)
    // is refused once this cluster has its identity (set by its first leader at once).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let other_cluster = loop {
        let result = raft
            .send(pb::RaftBatch {
                from: 1,
                messages: Vec::new(),
                from_address: "http://127.0.0.1:1".into(),
                cluster_id: 0x5eed_5eed_5eed_5eed,
            })
            .await;
        match result {
            Err(status) => break status,
            Ok(_) => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "the cluster never got its identity"
                );
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        }
    };
    assert_eq!(other_cluster.code(), tonic::Code::PermissionDenied);
    assert!(
        other_cluster.message().contains("another cluster"),
        "{other_cluster:?}"
    );

    // The coordinator keeps working: same leader and term, and it still takes waves.
    let after = c
        .cluster_status(pb::ClusterStatusRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (after.leader_id, after.term),
        (before.leader_id, before.term)
    );
    let id = submit(
        &mut c,
        "name = \"after-garbage\"\n[[task]]\nid = \"a\"\nrun = \"true\"\n",
    )
    .await
    .unwrap();
    let wave = c
        .get_wave(pb::GetWaveRequest { wave_id: id })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(wave.name, "after-garbage");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_can_be_turned_off() {
    let dir = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::start(&dir.path().join("c"), &["--no-reflection"]).unwrap();
    wait_ready(&coordinator.url(), 0).await.unwrap();
    let channel = endpoint(&coordinator.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let refused = ServerReflectionClient::new(channel.clone())
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await
        .expect_err("no reflection service");
    assert_eq!(refused.code(), tonic::Code::Unimplemented, "{refused:?}");
    // Health still answers.
    let status = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: "venom.v1.ClientService".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(status, ServingStatus::Serving as i32);
}
