//! Thin gRPC handlers: decode (convert.rs) → propose or read → encode (convert.rs). Domain
//! errors become `tonic::Status` here and nowhere else; "not leader" carries the leader's
//! address as an error detail (`venom_proto::leader`) so clients and workers can retry there.

// `tonic::Status` is large, and it is what every handler returns.
#![allow(clippy::result_large_err)]

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::Stream;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument as _;
use venom_proto::v1 as pb;
use venom_proto::v1::client_service_server::ClientService;
use venom_proto::v1::raft_service_server::RaftService;
use venom_proto::v1::worker_service_server::WorkerService;

use venom_core::url::{check_host_port, normalize_url};
use venom_core::wave::{self, Format, WaveLimits};

use crate::auth::{self, Caller};
use crate::cluster_view;
use crate::convert;
use crate::replica::{now_ms, Event, Handle, MemberChange, ProposeError};
use crate::scheduler;
use crate::state::{Command, MicroLookupError, Outcome, WaveId};
use crate::submissions::check_submission_id;
use crate::transport::{self, Refusal};

fn propose_status(e: ProposeError) -> Status {
    match e {
        ProposeError::NotLeader { leader_addr } => {
            venom_proto::leader::not_leader(leader_addr.as_deref())
        }
        ProposeError::Stopped => Status::unavailable(e.to_string()),
        ProposeError::Raft(_) => Status::internal(e.to_string()),
        ProposeError::Invalid(_) => Status::failed_precondition(e.to_string()),
    }
}

fn not_leader(handle: &Handle) -> Status {
    propose_status(ProposeError::NotLeader {
        leader_addr: handle.leader_addr(),
    })
}

/// Messages queued for one worker stream.
const WORKER_STREAM_QUEUE: usize = 4_096;
/// `WatchWave` sends at most one update per this interval…
const WATCH_MIN_INTERVAL: Duration = Duration::from_millis(100);
/// …and at least one per this one while anything (θ included) changes.
const WATCH_MAX_INTERVAL: Duration = Duration::from_secs(1);

/// The client-facing API.
#[derive(Debug, Clone)]
pub struct ClientApi {
    pub handle: Handle,
    pub limits: WaveLimits,
    pub shutdown: watch::Receiver<bool>,
    /// How this coordinator reaches the other members (for `ClusterStatus`).
    pub dialer: venom_tls::Dialer,
}

impl ClientApi {
    /// `SubmitWave` under its span: validate (a `validate` span), then propose and wait for
    /// the commit (a `raft.commit` span).
    async fn submit(
        &self,
        owner: String,
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
                owner,
                spec,
                traceparent,
                submission_id: req.submission_id,
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

    /// Checks the submission id, parses and checks a submitted wave; the warnings name
    /// tasks no node could ever run.
    fn validate(
        &self,
        req: &pb::SubmitWaveRequest,
    ) -> Result<(wave::WaveSpec, Vec<String>), Status> {
        check_submission_id(&req.submission_id)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let format: Format = req
            .format
            .parse()
            .map_err(|e| Status::invalid_argument(format!("field `format`: {e}")))?;
        let spec = wave::parse_wave(&req.spec, format, &self.limits)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let warnings = scheduler::unplaceable_warnings(&self.handle.read_state(), &spec);
        Ok((spec, warnings))
    }

    /// Makes the read that follows current (raft ReadIndex through the leader).
    async fn read_barrier(&self) -> Result<(), Status> {
        self.handle.read_barrier().await.map_err(propose_status)
    }

    fn wave_summary(&self, wave_id: WaveId) -> Result<pb::WaveSummary, Status> {
        let state = self.handle.read_state();
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
        let owner = Caller::require(&request, auth::USERS, "SubmitWave")?.owner();
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
        let result = self
            .submit(owner, req, traceparent)
            .instrument(span.clone())
            .await;
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
        Caller::require(&request, auth::USERS, "GetWave")?;
        self.read_barrier().await?;
        self.wave_summary(request.into_inner().wave_id)
            .map(Response::new)
    }

    async fn list_waves(
        &self,
        request: Request<pb::ListWavesRequest>,
    ) -> Result<Response<pb::ListWavesResponse>, Status> {
        Caller::require(&request, auth::USERS, "ListWaves")?;
        self.read_barrier().await?;
        let state = self.handle.read_state();
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
        Caller::require(&request, auth::USERS, "WatchWave")?;
        let wave_id = request.into_inner().wave_id;
        self.wave_summary(wave_id)?;
        let (tx, rx) = mpsc::channel(16);
        let api = self.clone();
        tokio::spawn(async move {
            let mut applied = api.handle.shared.applied.subscribe();
            let mut shutdown = api.shutdown.clone();
            let mut last: Option<pb::WatchWaveEvent> = None;
            loop {
                let (event, done) = {
                    let state = api.handle.read_state();
                    let Some(wave) = state.waves.get(&wave_id) else {
                        break;
                    };
                    let event = convert::watch_event(&state, wave);
                    (event, wave.header.state.is_terminal())
                };
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
                tokio::time::sleep(WATCH_MIN_INTERVAL).await;
                tokio::select! {
                    r = applied.changed() => if r.is_err() { break },
                    _ = shutdown.changed() => break,
                    () = tokio::time::sleep(WATCH_MAX_INTERVAL) => {}
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn cancel_wave(
        &self,
        request: Request<pb::CancelWaveRequest>,
    ) -> Result<Response<pb::CancelWaveResponse>, Status> {
        let caller = Caller::require(&request, auth::USERS, "CancelWave")?;
        let wave_id = request.into_inner().wave_id;
        let owner = self.wave_summary(wave_id)?.owner;
        if !caller.may_cancel(&owner) {
            return Err(Status::permission_denied(format!(
                "wave {wave_id} belongs to `{owner}`: a client cancels only its own waves \
                 (an admin certificate cancels any)"
            )));
        }
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
        Caller::require(&request, auth::USERS, "ListTasks")?;
        let wave_id = request.into_inner().wave_id;
        self.read_barrier().await?;
        let state = self.handle.read_state();
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
        Caller::require(&request, auth::USERS, "GetLogs")?;
        let req = request.into_inner();
        self.read_barrier().await?;
        let state = self.handle.read_state();
        let wave = state
            .waves
            .get(&req.wave_id)
            .ok_or_else(|| Status::not_found(format!("wave {} not found", req.wave_id)))?;
        let micro = wave
            .micro_named(&req.task_id, req.index)
            .map_err(|e| match e {
                MicroLookupError::NoSuchTask => Status::not_found(format!(
                    "task `{}` not found in wave {}",
                    req.task_id, req.wave_id
                )),
                MicroLookupError::IndexOutOfRange { index, n } => Status::out_of_range(format!(
                    "task `{}`, field `index`: {index} is outside 0..{n}",
                    req.task_id
                )),
                MicroLookupError::IndexMissing => Status::invalid_argument(format!(
                    "task `{}` is an array: name an index, e.g. {}[0]",
                    req.task_id, req.task_id
                )),
            })?;
        Ok(Response::new(convert::logs(&wave.tasks[micro as usize])))
    }

    async fn list_nodes(
        &self,
        request: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        Caller::require(&request, auth::USERS, "ListNodes")?;
        let state = self.handle.read_state();
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
        Caller::require(&request, auth::ADMINS, "DrainNode")?;
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
        Caller::require(&request, auth::STATUS_READERS, "ClusterStatus")?;
        let mut view = cluster_view::own_view(&self.handle);
        if request.into_inner().all_members {
            cluster_view::gather_member_views(&mut view, &self.dialer).await;
        }
        Ok(Response::new(view))
    }

    async fn add_member(
        &self,
        request: Request<pb::AddMemberRequest>,
    ) -> Result<Response<pb::ClusterStatusResponse>, Status> {
        Caller::require(&request, auth::ADMINS, "AddMember")?;
        let request = request.into_inner();
        let address = request.address.trim();
        if request.id == 0 {
            return Err(Status::invalid_argument("id: coordinator ids start at 1"));
        }
        check_host_port(address).map_err(|e| Status::invalid_argument(format!("address: {e}")))?;
        let url = normalize_url(address);
        self.handle
            .change_membership(MemberChange::Add {
                id: request.id,
                address: url,
            })
            .await
            .map_err(propose_status)?;
        Ok(Response::new(cluster_view::own_view(&self.handle)))
    }

    async fn remove_member(
        &self,
        request: Request<pb::RemoveMemberRequest>,
    ) -> Result<Response<pb::ClusterStatusResponse>, Status> {
        Caller::require(&request, auth::ADMINS, "RemoveMember")?;
        let id = request.into_inner().id;
        self.handle
            .change_membership(MemberChange::Remove { id })
            .await
            .map_err(propose_status)?;
        Ok(Response::new(cluster_view::own_view(&self.handle)))
    }
}

/// The worker-facing API: one bidirectional stream per worker.
#[derive(Debug, Clone)]
pub struct WorkerApi {
    pub handle: Handle,
    /// The node names with a live stream here, and which connection holds each.
    pub live: LiveStreams,
}

/// One live worker stream per node name: a second worker under a taken name is refused
/// (instead of the two taking the name from each other) until the first stream ends.
#[derive(Debug, Clone, Default)]
pub struct LiveStreams(std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, u64>>>);

impl LiveStreams {
    fn claim(&self, name: &str, conn: u64) -> bool {
        match self.0.lock() {
            Ok(mut live) => match live.entry(name.to_owned()) {
                std::collections::hash_map::Entry::Occupied(_) => false,
                std::collections::hash_map::Entry::Vacant(slot) => {
                    slot.insert(conn);
                    true
                }
            },
            Err(_) => false,
        }
    }

    fn release(&self, name: &str, conn: u64) {
        if let Ok(mut live) = self.0.lock() {
            if live.get(name) == Some(&conn) {
                live.remove(name);
            }
        }
    }
}

/// Gives a claimed name back when the stream's task ends, however it ends.
struct Claim {
    live: LiveStreams,
    name: String,
    conn: u64,
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.live.release(&self.name, self.conn);
    }
}

static NEXT_CONN: AtomicU64 = AtomicU64::new(1);

#[tonic::async_trait]
impl WorkerService for WorkerApi {
    type ConnectStream = BoxStream<pb::CoordinatorMessage>;

    async fn connect(
        &self,
        request: Request<Streaming<pb::WorkerMessage>>,
    ) -> Result<Response<Self::ConnectStream>, Status> {
        let caller = Caller::require(&request, &[venom_tls::Role::Worker], "Connect")?;
        if !self.handle.is_leader() {
            return Err(not_leader(&self.handle));
        }
        let remote = request
            .extensions()
            .get::<venom_tls::ConnInfo>()
            .and_then(|info| info.remote);
        let mut inbound = request.into_inner();
        let first = inbound
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("stream closed before `register`"))?;
        let register = first.register.ok_or_else(|| {
            Status::invalid_argument("field `register`: the first message must register")
        })?;
        let spec = convert::node_spec(&register).map_err(Status::invalid_argument)?;
        caller.check_worker_name(&spec.name)?;
        let name = spec.name.clone();
        let conn = NEXT_CONN.fetch_add(1, Ordering::Relaxed);
        if !self.live.claim(&name, conn) {
            tracing::warn!(node = %name, ?remote, "refused a second worker stream for a taken name");
            return Err(Status::already_exists(format!(
                "node name `{name}` already has a live worker stream here: give each worker a \
                 name of its own (--name), or wait for the other one's stream to end"
            )));
        }
        let claim = Claim {
            live: self.live.clone(),
            name: name.clone(),
            conn,
        };
        let (tx, rx) = mpsc::channel(WORKER_STREAM_QUEUE);
        self.handle
            .tx
            .send(Event::WorkerAttached {
                node: name.clone(),
                conn,
                tx: tx.clone(),
            })
            .await
            .map_err(|_| Status::unavailable("coordinator is shutting down"))?;
        let cluster_id = self.handle.status().cluster_id;
        if register.cluster_id != 0 && register.cluster_id != cluster_id {
            tracing::warn!(
                node = %name,
                its_cluster = register.cluster_id,
                cluster_id,
                dropped = register.unacknowledged.len(),
                "worker registered with results kept for another cluster; ignoring them"
            );
        }
        let command = convert::registration(spec, register, first.seq, cluster_id, now_ms());
        self.handle.propose(command).await.map_err(propose_status)?;
        let _ = tx
            .send(pb::CoordinatorMessage {
                registered: true,
                cluster_id,
                ..pb::CoordinatorMessage::default()
            })
            .await;
        tracing::info!(node = %name, conn, "worker registered");

        let handle = self.handle.clone();
        tokio::spawn(async move {
            let _claim = claim;
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

/// One worker message, one proposal.
async fn on_worker_message(
    handle: &Handle,
    node: &str,
    message: pb::WorkerMessage,
) -> Result<(), ProposeError> {
    match convert::worker_report(node, message, now_ms()) {
        Some(command) => handle.submit(command).await,
        None => Ok(()),
    }
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
        let caller = Caller::require(&request, &[venom_tls::Role::Member], "RaftService.Send")?;
        let batch = request.into_inner();
        caller.check_member_id(batch.from)?;
        let status = self.handle.status();
        let admitted = transport::admit(&batch, status.cluster_id, &status.members)
            .map_err(|refusal| {
                tracing::warn!(from = batch.from, address = %batch.from_address, %refusal, "raft batch rejected");
                match refusal {
                    Refusal::OtherCluster { .. } | Refusal::NotMember { .. } => {
                        Status::permission_denied(refusal.to_string())
                    }
                    Refusal::Undecodable(_) | Refusal::SenderMismatch => {
                        Status::invalid_argument(refusal.to_string())
                    }
                }
            })?;
        if let Some((id, address)) = admitted.learn {
            self.routes.learn(id, address);
        }
        let messages = admitted.messages;
        self.handle
            .tx
            .send(Event::Raft(messages))
            .await
            .map_err(|_| Status::unavailable("coordinator is shutting down"))?;
        Ok(Response::new(pb::RaftAck {}))
    }
}
