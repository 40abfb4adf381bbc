//! Thin gRPC handlers: decode → validate/propose/read → encode. Domain errors become
//! `tonic::Status` here and nowhere else; "not leader" carries the leader's address as
//! `leader=URL` so clients and workers can retry there.

// `tonic::Status` is large, and it is what every handler returns.
#![allow(clippy::result_large_err)]

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::Stream;
use prost::Message as _;
use protobuf::Message as _;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument as _;
use venom_proto::v1 as pb;
use venom_proto::v1::client_service_server::ClientService;
use venom_proto::v1::raft_service_server::RaftService;
use venom_proto::v1::worker_service_server::WorkerService;

use crate::convert;
use crate::mobius::{self, ThrottlePolicy};
use crate::replica::{now_ms, Event, Handle, MemberChange, ProposeError};
use crate::scheduler;
use crate::state::{Command, NodeSpec, Outcome, State, WaveId};
use crate::wave::{self, Format, WaveLimits};

fn propose_status(e: ProposeError) -> Status {
    match e {
        ProposeError::NotLeader { .. } => Status::unavailable(e.to_string()),
        ProposeError::Stopped => Status::unavailable(e.to_string()),
        ProposeError::Raft(_) => Status::internal(e.to_string()),
        ProposeError::Invalid(_) => Status::failed_precondition(e.to_string()),
    }
}

fn read_state(handle: &Handle) -> std::sync::RwLockReadGuard<'_, State> {
    match handle.shared.state.read() {
        Ok(s) => s,
        Err(poisoned) => poisoned.into_inner(),
    }
}

fn not_leader(handle: &Handle) -> Status {
    propose_status(ProposeError::NotLeader {
        leader_addr: handle.leader_addr(),
    })
}

/// The client-facing API.
#[derive(Debug, Clone)]
pub struct ClientApi {
    pub handle: Handle,
    pub limits: WaveLimits,
    pub shutdown: watch::Receiver<bool>,
}

impl ClientApi {
    /// `SubmitWave` under its span: validate (a `validate` span), then propose and wait for
    /// the commit (a `raft.commit` span).
    async fn submit(
        &self,
        req: pb::SubmitWaveRequest,
        traceparent: String,
    ) -> Result<pb::SubmitWaveResponse, Status> {
        let (spec, warnings) = {
            let span = tracing::info_span!(
                target: venom_telemetry::TARGET,
                "validate",
                venom.spec_bytes = req.spec.len() as i64,
                otel.status_code = tracing::field::Empty,
                otel.status_message = tracing::field::Empty,
            );
            let _entered = span.enter();
            let validated = self.validate(&req);
            if let Err(status) = &validated {
                span.record("otel.status_code", "ERROR");
                span.record("otel.status_message", status.message());
            }
            validated?
        };
        tracing::Span::current().record("venom.wave.name", spec.name.as_str());
        let outcome = self
            .handle
            .propose(Command::SubmitWave {
                spec,
                traceparent,
                now_ms: now_ms(),
            })
            .instrument(tracing::info_span!(
                target: venom_telemetry::TARGET,
                "raft.commit"
            ))
            .await
            .map_err(propose_status)?;
        match outcome {
            Outcome::WaveSubmitted {
                wave_id,
                n_micro_tasks,
            } => Ok(pb::SubmitWaveResponse {
                wave_id,
                n_micro_tasks,
                warnings,
            }),
            Outcome::Rejected(reason) => Err(Status::invalid_argument(reason)),
            other => Err(Status::internal(format!("unexpected outcome {other:?}"))),
        }
    }

    /// Parses and checks a submitted wave; the warnings name tasks no node could ever run.
    fn validate(
        &self,
        req: &pb::SubmitWaveRequest,
    ) -> Result<(wave::WaveSpec, Vec<String>), Status> {
        let format = match req.format.as_str() {
            "" | "auto" => Format::Auto,
            "toml" => Format::Toml,
            "json" => Format::Json,
            other => {
                return Err(Status::invalid_argument(format!(
                    "field `format`: unknown format {other:?} (toml, json)"
                )))
            }
        };
        let spec = wave::parse_wave(&req.spec, format, &self.limits)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let warnings = {
            let state = read_state(&self.handle);
            spec.tasks
                .iter()
                .filter(|t| !state.nodes.is_empty() && !scheduler::could_ever_run(&state, t))
                .map(|t| {
                    format!(
                        "task `{}`: no registered node could ever satisfy its request \
                         (memory {} B, gpus {}, labels {:?}); it waits for one",
                        t.id, t.memory_bytes, t.gpus, t.labels
                    )
                })
                .collect()
        };
        Ok((spec, warnings))
    }

    /// Makes the read that follows current (raft ReadIndex through the leader).
    async fn read_barrier(&self) -> Result<(), Status> {
        self.handle.read_barrier().await.map_err(propose_status)
    }

    fn wave_summary(&self, wave_id: WaveId) -> Result<pb::WaveSummary, Status> {
        let state = read_state(&self.handle);
        let wave = state
            .waves
            .get(&wave_id)
            .ok_or_else(|| Status::not_found(format!("wave {wave_id} not found")))?;
        Ok(convert::wave_summary(&state, wave))
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl ClientService for ClientApi {
    async fn submit_wave(
        &self,
        request: Request<pb::SubmitWaveRequest>,
    ) -> Result<Response<pb::SubmitWaveResponse>, Status> {
        // The caller's context: gRPC metadata first, else the request field.
        let caller = venom_telemetry::traceparent_from_metadata(request.metadata());
        let req = request.into_inner();
        let caller = caller.unwrap_or_else(|| req.traceparent.clone());
        let span = tracing::info_span!(
            target: venom_telemetry::TARGET,
            "SubmitWave",
            otel.kind = "server",
            rpc.system = "grpc",
            rpc.service = "venom.v1.ClientService",
            rpc.method = "SubmitWave",
            venom.wave.name = tracing::field::Empty,
            venom.wave.id = tracing::field::Empty,
            venom.micro_tasks = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
            otel.status_message = tracing::field::Empty,
        );
        venom_telemetry::set_parent(&span, &caller);
        // The wave keeps this span's context (so its trace shows the coordinator's part even
        // when the client exports nothing), or the caller's when this coordinator exports none.
        let traceparent = venom_telemetry::traceparent(&span).unwrap_or_else(|| {
            if venom_telemetry::is_valid_traceparent(&caller) {
                caller.trim().to_owned()
            } else {
                String::new()
            }
        });
        let result = self.submit(req, traceparent).instrument(span.clone()).await;
        match &result {
            Ok(response) => {
                // As i64: OpenTelemetry attributes have no unsigned integers.
                span.record("venom.wave.id", response.wave_id as i64);
                span.record("venom.micro_tasks", response.n_micro_tasks as i64);
            }
            Err(status) => {
                span.record("otel.status_code", "ERROR");
                span.record("otel.status_message", status.message());
            }
        }
        result.map(Response::new)
    }

    async fn get_wave(
        &self,
        request: Request<pb::GetWaveRequest>,
    ) -> Result<Response<pb::WaveSummary>, Status> {
        self.read_barrier().await?;
        self.wave_summary(request.into_inner().wave_id)
            .map(Response::new)
    }

    async fn list_waves(
        &self,
        _request: Request<pb::ListWavesRequest>,
    ) -> Result<Response<pb::ListWavesResponse>, Status> {
        self.read_barrier().await?;
        let state = read_state(&self.handle);
        let waves = state
            .waves
            .values()
            .map(|w| convert::wave_summary(&state, w))
            .collect();
        Ok(Response::new(pb::ListWavesResponse { waves }))
    }

    type WatchWaveStream = BoxStream<pb::WatchWaveEvent>;

    async fn watch_wave(
        &self,
        request: Request<pb::WatchWaveRequest>,
    ) -> Result<Response<Self::WatchWaveStream>, Status> {
        let wave_id = request.into_inner().wave_id;
        self.wave_summary(wave_id)?;
        let (tx, rx) = mpsc::channel(16);
        let api = self.clone();
        tokio::spawn(async move {
            let mut applied = api.handle.shared.applied.subscribe();
            let mut shutdown = api.shutdown.clone();
            let mut last: Option<pb::WatchWaveEvent> = None;
            loop {
                let event = {
                    let state = read_state(&api.handle);
                    let Some(wave) = state.waves.get(&wave_id) else {
                        break;
                    };
                    pb::WatchWaveEvent {
                        wave: Some(convert::wave_summary(&state, wave)),
                        nodes: state
                            .nodes
                            .values()
                            .map(|n| convert::node_info(&state, n))
                            .collect(),
                    }
                };
                let done = event.wave.as_ref().is_some_and(|w| {
                    matches!(w.state.as_str(), "succeeded" | "failed" | "cancelled")
                });
                if last.as_ref() != Some(&event) {
                    if tx.send(Ok(event.clone())).await.is_err() {
                        break;
                    }
                    last = Some(event);
                }
                if done {
                    break;
                }
                // At most ~10 updates a second; wake on the next apply or after a second
                // (so node θ stays fresh).
                tokio::time::sleep(Duration::from_millis(100)).await;
                tokio::select! {
                    r = applied.changed() => if r.is_err() { break },
                    _ = shutdown.changed() => break,
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn cancel_wave(
        &self,
        request: Request<pb::CancelWaveRequest>,
    ) -> Result<Response<pb::CancelWaveResponse>, Status> {
        let wave_id = request.into_inner().wave_id;
        self.wave_summary(wave_id)?;
        let outcome = self
            .handle
            .propose(Command::CancelWave {
                wave_id,
                now_ms: now_ms(),
            })
            .await
            .map_err(propose_status)?;
        match outcome {
            Outcome::WaveCancelled { n_cancelled } => {
                Ok(Response::new(pb::CancelWaveResponse { n_cancelled }))
            }
            Outcome::Rejected(reason) => Err(Status::failed_precondition(reason)),
            other => Err(Status::internal(format!("unexpected outcome {other:?}"))),
        }
    }

    async fn list_tasks(
        &self,
        request: Request<pb::ListTasksRequest>,
    ) -> Result<Response<pb::ListTasksResponse>, Status> {
        let wave_id = request.into_inner().wave_id;
        self.read_barrier().await?;
        let state = read_state(&self.handle);
        let wave = state
            .waves
            .get(&wave_id)
            .ok_or_else(|| Status::not_found(format!("wave {wave_id} not found")))?;
        let tasks = (0..wave.tasks.len() as u32)
            .filter_map(|m| convert::micro_task_info(wave, m))
            .collect();
        Ok(Response::new(pb::ListTasksResponse { tasks }))
    }

    async fn get_logs(
        &self,
        request: Request<pb::GetLogsRequest>,
    ) -> Result<Response<pb::GetLogsResponse>, Status> {
        let req = request.into_inner();
        self.read_barrier().await?;
        let state = read_state(&self.handle);
        let wave = state
            .waves
            .get(&req.wave_id)
            .ok_or_else(|| Status::not_found(format!("wave {} not found", req.wave_id)))?;
        let group = wave
            .header
            .spec
            .tasks
            .iter()
            .position(|t| t.id == req.task_id)
            .ok_or_else(|| {
                Status::not_found(format!(
                    "task `{}` not found in wave {}",
                    req.task_id, req.wave_id
                ))
            })?;
        let range = wave.header.group_range(group as u32);
        let micro = match (wave.header.spec.tasks[group].array, req.index) {
            (Some(n), Some(i)) if i < n => range.start + i,
            (Some(n), Some(i)) => {
                return Err(Status::out_of_range(format!(
                    "task `{}`, field `index`: {i} is outside 0..{n}",
                    req.task_id
                )))
            }
            (Some(_), None) => {
                return Err(Status::invalid_argument(format!(
                    "task `{}` is an array: name an index, e.g. {}[0]",
                    req.task_id, req.task_id
                )))
            }
            (None, Some(_)) | (None, None) => range.start,
        };
        let task = &wave.tasks[micro as usize];
        Ok(Response::new(pb::GetLogsResponse {
            attempt: task.attempt,
            stdout: task.stdout.clone(),
            stderr: task.stderr.clone(),
            stdout_truncated: task.stdout_truncated,
            stderr_truncated: task.stderr_truncated,
            state: task.state.as_str().to_string(),
            node: task.node.clone().unwrap_or_default(),
        }))
    }

    async fn list_nodes(
        &self,
        _request: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        let state = read_state(&self.handle);
        let nodes = state
            .nodes
            .values()
            .map(|n| convert::node_info(&state, n))
            .collect();
        Ok(Response::new(pb::ListNodesResponse { nodes }))
    }

    async fn drain_node(
        &self,
        request: Request<pb::DrainNodeRequest>,
    ) -> Result<Response<pb::DrainNodeResponse>, Status> {
        let req = request.into_inner();
        let outcome = self
            .handle
            .propose(Command::Drain {
                node: req.name,
                drain: req.drain,
            })
            .await
            .map_err(propose_status)?;
        match outcome {
            Outcome::Rejected(reason) => Err(Status::not_found(reason)),
            _ => Ok(Response::new(pb::DrainNodeResponse {})),
        }
    }

    async fn cluster_status(
        &self,
        request: Request<pb::ClusterStatusRequest>,
    ) -> Result<Response<pb::ClusterStatusResponse>, Status> {
        let mut view = self.own_view();
        if request.into_inner().all_members {
            gather_member_views(&mut view).await;
        }
        Ok(Response::new(view))
    }

    async fn add_member(
        &self,
        request: Request<pb::AddMemberRequest>,
    ) -> Result<Response<pb::ClusterStatusResponse>, Status> {
        let request = request.into_inner();
        let address = request.address.trim();
        if request.id == 0 {
            return Err(Status::invalid_argument("id: coordinator ids start at 1"));
        }
        let authority = address
            .strip_prefix("http://")
            .or_else(|| address.strip_prefix("https://"))
            .unwrap_or(address);
        let valid = authority.rsplit_once(':').is_some_and(|(host, port)| {
            !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0)
        });
        if !valid {
            return Err(Status::invalid_argument(format!(
                "address: `{address}` is not HOST:PORT"
            )));
        }
        let url = crate::transport::peer_url(address);
        self.handle
            .change_membership(MemberChange::Add {
                id: request.id,
                address: url,
            })
            .await
            .map_err(propose_status)?;
        Ok(Response::new(self.own_view()))
    }

    async fn remove_member(
        &self,
        request: Request<pb::RemoveMemberRequest>,
    ) -> Result<Response<pb::ClusterStatusResponse>, Status> {
        let id = request.into_inner().id;
        self.handle
            .change_membership(MemberChange::Remove { id })
            .await
            .map_err(propose_status)?;
        Ok(Response::new(self.own_view()))
    }
}

impl ClientApi {
    /// This member's view of the cluster: its own row first-hand, the others as far as it
    /// knows them (the leader knows each follower's matched index).
    fn own_view(&self) -> pb::ClusterStatusResponse {
        let status = self.handle.status();
        let state = read_state(&self.handle);
        let inputs: Vec<mobius::NodeModelInput> = state
            .nodes
            .values()
            .filter(|n| n.state == crate::state::NodeState::Ready)
            .map(crate::state::Node::model_input)
            .collect();
        let started = state.members_started.clone();
        drop(state);
        let model = mobius::cluster_model(&inputs);
        let leader_matched = status.matched.clone();
        let members = status
            .members
            .iter()
            .map(|(&id, addr)| {
                let is_self = id == status.id;
                let matched = leader_matched.get(&id).copied();
                pb::ClusterMember {
                    id,
                    address: addr.clone(),
                    role: if is_self {
                        status.role.clone()
                    } else if id == status.leader_id {
                        "leader".to_string()
                    } else {
                        "follower".to_string()
                    },
                    term: status.term,
                    commit_index: if is_self { status.commit } else { 0 },
                    applied_index: if is_self {
                        status.applied
                    } else {
                        matched.unwrap_or(0)
                    },
                    lag: if is_self {
                        status.commit.saturating_sub(status.applied)
                    } else {
                        matched.map_or(0, |m| status.last_index.saturating_sub(m))
                    },
                    reported: is_self,
                    leader_id: if is_self { status.leader_id } else { 0 },
                    started: started.contains(&id),
                }
            })
            .collect();
        pb::ClusterStatusResponse {
            leader_id: status.leader_id,
            term: status.term,
            members,
            theta_cluster: model.map_or(0.0, |m| m.theta),
            lambda_cluster: model.map_or(0.0, |m| m.lambda),
            n_cluster: model.map_or(0, |m| m.n),
            s_total_cluster: model.map_or(0.0, |m| m.s_total),
            n_nodes_ready: inputs.len() as u32,
            commit_index: status.commit,
            applied_index: status.applied,
            cluster_id: status.cluster_id,
        }
    }
}

/// How long `ClusterStatus { all_members }` waits for each member's own view.
const MEMBER_VIEW_TIMEOUT: Duration = Duration::from_millis(800);

/// Replaces every other member's row with the member's own view (asked concurrently);
/// a member that does not answer is shown `unreachable`. Lag is then measured against
/// the highest commit index any member reported.
async fn gather_member_views(view: &mut pb::ClusterStatusResponse) {
    let asks = view
        .members
        .iter()
        .filter(|m| !m.reported)
        .map(|m| {
            let (id, address) = (m.id, m.address.clone());
            async move { (id, ask_member(&address).await) }
        })
        .collect::<Vec<_>>();
    let answers: std::collections::BTreeMap<u64, Option<pb::ClusterMember>> =
        futures::future::join_all(asks).await.into_iter().collect();
    for row in &mut view.members {
        match answers.get(&row.id) {
            Some(Some(own)) if own.id == row.id => {
                *row = pb::ClusterMember {
                    address: row.address.clone(),
                    started: row.started,
                    ..own.clone()
                };
            }
            Some(_) => {
                row.role = "unreachable".to_string();
                row.reported = false;
            }
            None => {}
        }
    }
    let commit = view
        .members
        .iter()
        .filter(|m| m.reported)
        .map(|m| m.commit_index)
        .max()
        .unwrap_or(0);
    for row in view.members.iter_mut().filter(|m| m.reported) {
        row.lag = commit.saturating_sub(row.applied_index);
    }
}

/// One member's own row, or `None` when it does not answer in time.
async fn ask_member(address: &str) -> Option<pb::ClusterMember> {
    let view = member_view(address, MEMBER_VIEW_TIMEOUT).await?;
    view.members.into_iter().find(|m| m.reported)
}

/// A coordinator's own view of the cluster (`ClusterStatus` without asking the others),
/// or `None` when it does not answer within `timeout` (connecting included).
pub async fn member_view(address: &str, timeout: Duration) -> Option<pb::ClusterStatusResponse> {
    let endpoint = tonic::transport::Endpoint::from_shared(address.to_string())
        .ok()?
        .connect_timeout(timeout)
        .timeout(timeout);
    let ask = async {
        let channel = endpoint.connect().await.ok()?;
        let mut client = venom_proto::v1::client_service_client::ClientServiceClient::new(channel);
        let reply = client
            .cluster_status(pb::ClusterStatusRequest { all_members: false })
            .await
            .ok()?;
        Some(reply.into_inner())
    };
    tokio::time::timeout(timeout, ask).await.ok().flatten()
}

/// The worker-facing API: one bidirectional stream per worker.
#[derive(Debug, Clone)]
pub struct WorkerApi {
    pub handle: Handle,
}

static NEXT_CONN: AtomicU64 = AtomicU64::new(1);

fn node_spec(register: &pb::Register) -> Result<NodeSpec, Status> {
    if register.name.is_empty() || register.name.len() > 253 {
        return Err(Status::invalid_argument(
            "field `register.name`: must be 1 to 253 characters",
        ));
    }
    let policy = if register.throttle_policy.is_empty() {
        ThrottlePolicy::Adaptive
    } else {
        register
            .throttle_policy
            .parse::<ThrottlePolicy>()
            .map_err(|e| {
                Status::invalid_argument(format!("field `register.throttle_policy`: {e}"))
            })?
    };
    let profile = register.profile.clone().unwrap_or_default();
    let memory_total_bytes = if profile.effective_memory_bytes > 0 {
        profile.effective_memory_bytes
    } else {
        profile.memory_total_bytes
    };
    Ok(NodeSpec {
        name: register.name.clone(),
        slots: register.slots.max(1),
        labels: register.labels.clone().into_iter().collect(),
        policy,
        physical_cores: profile.cpu_physical_cores.max(1),
        logical_cores: profile.cpu_logical_cores.max(1),
        memory_total_bytes,
        gpus: profile.gpus.len() as u32,
        queue_depth: register.queue_depth.min(1_024),
        profile: profile.encode_to_vec(),
    })
}

#[tonic::async_trait]
impl WorkerService for WorkerApi {
    type ConnectStream = BoxStream<pb::CoordinatorMessage>;

    async fn connect(
        &self,
        request: Request<Streaming<pb::WorkerMessage>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        if !self.handle.is_leader() {
            return Err(not_leader(&self.handle));
        }
        let mut inbound = request.into_inner();
        let first = inbound
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("stream closed before `register`"))?;
        let register = first.register.ok_or_else(|| {
            Status::invalid_argument("field `register`: the first message must register")
        })?;
        let spec = node_spec(&register)?;
        let name = spec.name.clone();
        let conn = NEXT_CONN.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(4_096);
        self.handle
            .tx
            .send(Event::WorkerAttached {
                node: name.clone(),
                conn,
                tx: tx.clone(),
            })
            .await
            .map_err(|_| Status::unavailable("coordinator is shutting down"))?;
        // Results first, then reconciliation: a result the worker kept while it was cut
        // off must be recorded before its absence from `running` could mark it lost.
        let results: Vec<_> = register
            .unacknowledged
            .into_iter()
            .filter_map(|f| convert::result_from_pb(&name, f))
            .collect();
        let running = register
            .running
            .iter()
            .map(convert::attempt_from_pb)
            .collect();
        let now = now_ms();
        let mut commands = Vec::new();
        if !results.is_empty() {
            commands.push(Command::Finished {
                results,
                now_ms: now,
            });
        }
        commands.push(Command::RegisterNode {
            spec,
            running,
            now_ms: now,
        });
        self.handle
            .propose(Command::Batch(commands))
            .await
            .map_err(propose_status)?;
        let _ = tx
            .send(pb::CoordinatorMessage {
                registered: true,
                ..pb::CoordinatorMessage::default()
            })
            .await;
        tracing::info!(node = %name, conn, "worker registered");

        let handle = self.handle.clone();
        tokio::spawn(async move {
            loop {
                let message = match inbound.message().await {
                    Ok(Some(m)) => m,
                    Ok(None) => break,
                    Err(e) => {
                        tracing::info!(node = %name, error = %e, "worker stream ended");
                        break;
                    }
                };
                if let Err(e) = on_worker_message(&handle, &name, message).await {
                    tracing::info!(node = %name, error = %e, "dropping worker stream");
                    break;
                }
            }
            let _ = handle
                .tx
                .send(Event::WorkerDetached { node: name, conn })
                .await;
        });
        let stream = tokio_stream::StreamExt::map(ReceiverStream::new(rx), Ok::<_, Status>);
        Ok(Response::new(Box::pin(stream)))
    }
}

async fn on_worker_message(
    handle: &Handle,
    node: &str,
    message: pb::WorkerMessage,
) -> Result<(), ProposeError> {
    let now = now_ms();
    let mut commands = Vec::new();
    // An attempt that started and finished since the last message needs no `Started`.
    let finished: std::collections::HashSet<(u64, u32, u32)> = message
        .finished
        .iter()
        .filter_map(|f| f.attempt.as_ref().map(|a| (a.wave_id, a.micro, a.attempt)))
        .collect();
    let started: Vec<_> = message
        .started
        .iter()
        .filter_map(|s| {
            let a = s.attempt.as_ref()?;
            (!finished.contains(&(a.wave_id, a.micro, a.attempt)))
                .then(|| (convert::attempt_from_pb(a), s.started_ms))
        })
        .collect();
    if !message.finished.is_empty() {
        let results = message
            .finished
            .into_iter()
            .filter_map(|f| convert::result_from_pb(node, f))
            .collect();
        commands.push(Command::Finished {
            results,
            now_ms: now,
        });
    }
    if !started.is_empty() {
        commands.push(Command::Started {
            node: node.to_string(),
            attempts: started,
        });
    }
    if let Some(h) = &message.heartbeat {
        commands.push(Command::Heartbeats {
            reports: vec![convert::heartbeat_from_pb(node, h)],
            now_ms: now,
        });
    }
    // Started before finished would be more natural, but a task can start and finish
    // in the same batch; `Started` for a finished attempt is simply ignored, so apply
    // starts first.
    commands.sort_by_key(|c| match c {
        Command::Started { .. } => 0,
        Command::Finished { .. } => 1,
        _ => 2,
    });
    for command in commands {
        handle.submit(command).await?;
    }
    Ok(())
}

/// Raft messages from peer coordinators.
#[derive(Debug, Clone)]
pub struct RaftApi {
    pub handle: Handle,
    /// Where a sender outside the membership is recorded, so the transport can answer it.
    pub routes: crate::transport::Routes,
}

#[tonic::async_trait]
impl RaftService for RaftApi {
    async fn send(&self, request: Request<pb::RaftBatch>) -> Result<Response<pb::RaftAck>, Status> {
        let batch = request.into_inner();
        let status = self.handle.status();
        if batch.cluster_id != 0 && status.cluster_id != 0 && batch.cluster_id != status.cluster_id
        {
            tracing::warn!(
                from = batch.from,
                address = %batch.from_address,
                "raft batch from another cluster rejected"
            );
            return Err(Status::permission_denied(format!(
                "node {} belongs to another cluster ({:x}, this one is {:x})",
                batch.from, batch.cluster_id, status.cluster_id
            )));
        }
        let members = status.members;
        let stranger = !members.contains_key(&batch.from);
        let refuse = || {
            tracing::warn!(from = batch.from, "raft batch from unknown node rejected");
            Err(Status::permission_denied(format!(
                "node {} is not a member",
                batch.from
            )))
        };
        if stranger && batch.from_address.is_empty() {
            return refuse();
        }
        let mut messages = Vec::with_capacity(batch.messages.len());
        for bytes in &batch.messages {
            let mut m = raft::eraftpb::Message::default();
            if let Err(e) = m.merge_from_bytes(bytes) {
                tracing::warn!(from = batch.from, error = %e, "garbage raft payload rejected");
                return Err(Status::invalid_argument(format!(
                    "undecodable raft message: {e}"
                )));
            }
            if m.from != batch.from {
                return Err(Status::invalid_argument(
                    "raft message `from` does not match the batch",
                ));
            }
            messages.push(m);
        }
        if stranger {
            // A member added after the last change this coordinator applied: only its
            // leader traffic is taken (this coordinator is behind and must catch up);
            // anything else from outside the membership — a vote request from a removed
            // coordinator — is refused.
            let leader_traffic = messages.iter().all(|m| {
                matches!(
                    m.get_msg_type(),
                    raft::eraftpb::MessageType::MsgAppend
                        | raft::eraftpb::MessageType::MsgHeartbeat
                        | raft::eraftpb::MessageType::MsgSnapshot
                )
            });
            if !leader_traffic {
                return refuse();
            }
            self.routes.learn(batch.from, batch.from_address.clone());
        }
        self.handle
            .tx
            .send(Event::Raft(messages))
            .await
            .map_err(|_| Status::unavailable("coordinator is shutting down"))?;
        Ok(Response::new(pb::RaftAck {}))
    }
}
