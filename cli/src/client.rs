//! Connecting to the coordinator cluster and following its leader.
//!
//! The user names any members (`--coordinator URL[,URL…]`). [`Client`] asks them all at
//! once and settles on the leader, or the first that answers (a dead or frozen member costs
//! nothing while another answers), and runs each RPC through [`Client::call`], which follows a
//! not-leader refusal ([`venom_proto::leader`]: its error detail, never its text) to the
//! leader it names, waits out an election (a refusal without a leader), and — for requests
//! that are safe to repeat — moves on to the next member when the current one stops
//! answering. Every failure names the URLs tried so that the one-line error a user sees
//! says where Venom looked.

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status};
use venom_proto::client_service_client::ClientServiceClient;
use venom_proto::leader::{is_not_leader, leader_hint};

/// A client stub with the trace context attached to every request.
pub type Rpc = ClientServiceClient<InterceptedService<Channel, TraceContext>>;

/// How long connecting to one member may take.
const CONNECT_TIMEOUT_MS: u64 = 3_000;
/// How long a member may take to answer the first question (members are asked at once).
const PROBE_TIMEOUT_MS: u64 = 2_000;
/// After the first member answered, how long to wait for the leader's answer.
const LEADER_GRACE_MS: u64 = 150;
/// Largest response accepted (task lists of big waves, captured output).
const MAX_DECODING_MESSAGE_BYTES: usize = 64 << 20;
/// Most leader redirects followed for one request (a chain longer than the cluster
/// means the members disagree; stop rather than bounce forever).
const MAX_REDIRECTS: u32 = 8;
/// How long to keep retrying while the cluster has no leader or members are down.
const RETRY_WINDOW_MS: u64 = 10_000;
/// Pause between retries while no leader is known.
const RETRY_PAUSE_MS: u64 = 200;

/// Whether a request may be sent again after an ambiguous transport failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Reads, watches and idempotent writes (cancel, drain, a submit with a submission
    /// id): any failure that looks like the member went away is retried on another member.
    Safe,
    /// Writes that must not be applied twice (membership changes): only refusals are
    /// retried ("not leader", failure to connect).
    RefusalsOnly,
}

/// Adds the current span's W3C trace context (`traceparent`) to every request when traces
/// are exported.
#[derive(Clone, Copy, Debug, Default)]
pub struct TraceContext;

impl tonic::service::Interceptor for TraceContext {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        venom_telemetry::inject_current(request.metadata_mut());
        Ok(request)
    }
}

/// A connection to whichever coordinator currently answers, following the leader.
pub struct Client {
    /// Members as the user named them, normalised to URLs.
    urls: Vec<String>,
    /// TLS or plaintext; a leader named in a refusal is reached the same way, so with TLS
    /// it must prove a member certificate of the cluster CA.
    dialer: venom_tls::Dialer,
    /// The member in use and its stub; `None` until the first request or after it failed.
    current: Option<(String, Rpc)>,
}

impl Client {
    /// Prepares a client for `urls` (nothing is contacted yet).
    pub fn new(urls: &[String], dialer: venom_tls::Dialer) -> anyhow::Result<Self> {
        let urls: Vec<String> = urls
            .iter()
            .map(|url| url.trim())
            .filter(|url| !url.is_empty())
            .map(|url| dialer.url(url))
            .collect::<Result<_, _>>()?;
        if urls.is_empty() {
            bail!("no coordinator URL given (use --coordinator or VENOM_COORDINATOR)");
        }
        Ok(Self {
            urls,
            dialer,
            current: None,
        })
    }

    /// The URL of the member last used, if any.
    pub fn current_url(&self) -> Option<&str> {
        self.current.as_ref().map(|(url, _)| url.as_str())
    }

    /// Forgets the current member so the next request connects afresh.
    pub fn reset(&mut self) {
        self.current = None;
    }

    /// Runs one RPC, following the leader and retrying according to `retry`.
    ///
    /// `rpc` is called once per attempt with a fresh stub and must build its request
    /// inside, so that every attempt sends the same thing.
    pub async fn call<T, F, Fut>(&mut self, retry: Retry, mut rpc: F) -> anyhow::Result<T>
    where
        F: FnMut(Rpc) -> Fut,
        Fut: Future<Output = Result<Response<T>, Status>>,
    {
        let deadline = Instant::now() + Duration::from_millis(RETRY_WINDOW_MS);
        let mut n_redirects = 0;
        loop {
            let (url, stub) = self.connected().await?;
            let status = match rpc(stub).await {
                Ok(response) => return Ok(response.into_inner()),
                Err(status) => status,
            };
            if is_not_leader(&status) {
                match leader_hint(&status).and_then(|leader| self.dialer.url(&leader).ok()) {
                    Some(leader) if n_redirects < MAX_REDIRECTS && leader != url => {
                        tracing::debug!(from = %url, to = %leader, "following the leader");
                        match self.switch_to(&leader).await {
                            Ok(()) => {
                                n_redirects += 1;
                                continue;
                            }
                            // The leader it names may just have died, and nothing was sent
                            // to it: ask again until the members elect another.
                            Err(err) if Instant::now() < deadline => {
                                tracing::debug!(%url, error = %format!("{err:#}"), "the named leader is unreachable; retrying");
                                self.rotate(&url);
                                tokio::time::sleep(Duration::from_millis(RETRY_PAUSE_MS)).await;
                                continue;
                            }
                            Err(err) => return Err(err),
                        }
                    }
                    _ if Instant::now() < deadline => {
                        // An election is under way (or the hint points back here):
                        // wait a little and ask the next member.
                        tracing::debug!(%url, "no leader known yet; retrying");
                        self.rotate(&url);
                        tokio::time::sleep(Duration::from_millis(RETRY_PAUSE_MS)).await;
                        continue;
                    }
                    _ => bail!("{url}: {} (gave up waiting for a leader)", status.message()),
                }
            }
            if retry == Retry::Safe && member_went_away(&status) && Instant::now() < deadline {
                tracing::debug!(%url, error = %status.message(), "member unavailable; retrying");
                self.rotate(&url);
                tokio::time::sleep(Duration::from_millis(RETRY_PAUSE_MS)).await;
                continue;
            }
            if member_went_away(&status) {
                self.current = None;
            }
            let error = status_error(&url, &status);
            let transport_failure = matches!(
                status.code(),
                Code::Cancelled | Code::Unavailable | Code::Unknown | Code::Internal
            );
            if transport_failure && !self.dialer.is_tls() {
                return Err(anyhow!(
                    "{error} (if the coordinator serves TLS, give --tls-ca, --tls-cert and --tls-key)"
                ));
            }
            return Err(error);
        }
    }

    /// The current stub; if there is none, every member is asked at once (a `ClusterStatus`
    /// of its own view, bounded by [`PROBE_TIMEOUT_MS`]) and the leader is used if it answers
    /// within [`LEADER_GRACE_MS`] of the first answer, else the member earliest in the list
    /// among those that answered by then.
    /// A dead or frozen member costs nothing while another answers.
    async fn connected(&mut self) -> anyhow::Result<(String, Rpc)> {
        use futures::StreamExt as _;

        if let Some((url, stub)) = &self.current {
            return Ok((url.clone(), stub.clone()));
        }
        let mut probes: futures::stream::FuturesUnordered<_> = self
            .urls
            .iter()
            .map(|url| {
                let url = url.clone();
                let dialer = self.dialer.clone();
                async move {
                    let outcome = tokio::time::timeout(
                        Duration::from_millis(PROBE_TIMEOUT_MS),
                        probe(&url, &dialer),
                    )
                    .await
                    .unwrap_or_else(|_| Err(anyhow!("no answer within {PROBE_TIMEOUT_MS} ms")));
                    (url, outcome)
                }
            })
            .collect();
        let mut failures = Vec::new();
        // Members that answered, ranked by the order the list prefers them.
        let mut answered: Vec<(usize, String, Rpc)> = Vec::new();
        let mut grace_until: Option<tokio::time::Instant> = None;
        loop {
            let next = match grace_until {
                Some(until) => match tokio::time::timeout_at(until, probes.next()).await {
                    Ok(next) => next,
                    Err(_) => break,
                },
                None => probes.next().await,
            };
            let Some((url, outcome)) = next else { break };
            match outcome {
                Ok((stub, true)) => {
                    self.current = Some((url.clone(), stub.clone()));
                    return Ok((url, stub));
                }
                Ok((stub, false)) => {
                    let rank = self
                        .urls
                        .iter()
                        .position(|u| *u == url)
                        .unwrap_or(usize::MAX);
                    answered.push((rank, url, stub));
                    grace_until.get_or_insert_with(|| {
                        tokio::time::Instant::now() + Duration::from_millis(LEADER_GRACE_MS)
                    });
                }
                Err(err) => failures.push(format!("{url} ({err:#})")),
            }
        }
        answered.sort_by_key(|(rank, _, _)| *rank);
        if let Some((_, url, stub)) = answered.into_iter().next() {
            self.current = Some((url.clone(), stub.clone()));
            return Ok((url, stub));
        }
        let hint = if self.dialer.is_tls() {
            ""
        } else {
            " (a coordinator serving TLS needs --tls-ca, --tls-cert and --tls-key)"
        };
        bail!(
            "cannot reach a coordinator; tried {}{hint}",
            failures.join(", ")
        )
    }

    /// Connects to `url` (a leader named in a refusal) and makes it current.
    async fn switch_to(&mut self, url: &str) -> anyhow::Result<()> {
        let stub = connect(url, &self.dialer)
            .await
            .with_context(|| format!("cannot reach the leader at {url}"))?;
        if !self.urls.iter().any(|known| known == url) {
            self.urls.push(url.to_owned());
        }
        self.current = Some((url.to_owned(), stub));
        Ok(())
    }

    /// Drops `failed` as current and moves it to the back of the list, so the next
    /// attempt starts with another member.
    fn rotate(&mut self, failed: &str) {
        self.current = None;
        if let Some(position) = self.urls.iter().position(|url| url == failed) {
            let url = self.urls.remove(position);
            self.urls.push(url);
        }
    }
}

/// Connects to `url` and asks for its own view of the cluster: the stub, and whether that
/// member is the leader.
async fn probe(url: &str, dialer: &venom_tls::Dialer) -> anyhow::Result<(Rpc, bool)> {
    let mut stub = connect(url, dialer).await?;
    let status = match stub
        .cluster_status(venom_proto::ClusterStatusRequest { all_members: false })
        .await
    {
        Ok(response) => response.into_inner(),
        // A refusal is an answer: the member is alive (the request itself will say more).
        Err(status) if std::error::Error::source(&status).is_none() => return Ok((stub, false)),
        Err(status) => return Err(status_error(url, &status)),
    };
    let leads = status.members.iter().any(|member| {
        member.id == status.leader_id
            && member.reported
            && member.role() == venom_proto::MemberRole::Leader
    });
    Ok((stub, leads))
}

/// Opens a channel to one member.
async fn connect(url: &str, dialer: &venom_tls::Dialer) -> anyhow::Result<Rpc> {
    let endpoint = dialer
        .endpoint(url)?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_millis(CONNECT_TIMEOUT_MS));
    let channel = endpoint.connect().await.map_err(|err| {
        // tonic's transport error hides the cause (connection refused, …) one level down.
        let mut message = err.to_string();
        let mut source = std::error::Error::source(&err);
        while let Some(cause) = source {
            let cause_text = cause.to_string();
            if !message.ends_with(&cause_text) {
                message = format!("{message}: {cause_text}");
            }
            source = cause.source();
        }
        anyhow!(message)
    })?;
    Ok(ClientServiceClient::with_interceptor(channel, TraceContext)
        .max_decoding_message_size(MAX_DECODING_MESSAGE_BYTES))
}

/// Whether a failure means the member itself is unreachable or went away mid-request (as
/// opposed to a refusal it answered with): `UNAVAILABLE`, or `UNKNOWN`, which is how a
/// connection that broke under a request reaches the client ("transport error").
fn member_went_away(status: &Status) -> bool {
    matches!(status.code(), Code::Unavailable | Code::Unknown) && !is_not_leader(status)
}

/// One line describing a failed RPC.
pub fn status_error(url: &str, status: &Status) -> anyhow::Error {
    let message = status.message().trim();
    match status.code() {
        // The coordinator's own words are the clearest: validation errors name the task
        // and field, lookups name the wave.
        Code::InvalidArgument
        | Code::NotFound
        | Code::FailedPrecondition
        | Code::AlreadyExists
        | Code::OutOfRange
            if !message.is_empty() =>
        {
            anyhow!("{message}")
        }
        Code::Unauthenticated => anyhow!("{url}: unauthenticated: {message}"),
        Code::PermissionDenied => anyhow!("{url}: permission denied: {message}"),
        Code::Unavailable => anyhow!("{url}: unavailable: {message}"),
        code if message.is_empty() => anyhow!("{url}: {code}"),
        code => anyhow!("{url}: {code}: {message}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use venom_core::url::normalize_url;
    use venom_proto as pb;
    use venom_proto::client_service_server::{ClientService, ClientServiceServer};

    /// A member that answers every request with `refusal`, or, without one, like a leader
    /// (`ListWaves` names wave [`LEADERS_WAVE`]; everything else is empty).
    #[derive(Clone)]
    struct FakeMember {
        refusal: Option<Status>,
    }

    const LEADERS_WAVE: u64 = 42;

    impl FakeMember {
        // The shape every tonic handler returns.
        #[allow(clippy::result_large_err)]
        fn answer<T: Default>(&self) -> Result<Response<T>, Status> {
            match &self.refusal {
                Some(status) => Err(status.clone()),
                None => Ok(Response::new(T::default())),
            }
        }
    }

    #[tonic::async_trait]
    impl ClientService for FakeMember {
        type WatchWaveStream = tokio_stream::Empty<Result<pb::WatchWaveEvent, Status>>;

        async fn submit_wave(
            &self,
            _: Request<pb::SubmitWaveRequest>,
        ) -> Result<Response<pb::SubmitWaveResponse>, Status> {
            self.answer()
        }

        async fn get_wave(
            &self,
            _: Request<pb::GetWaveRequest>,
        ) -> Result<Response<pb::WaveSummary>, Status> {
            self.answer()
        }

        async fn list_waves(
            &self,
            _: Request<pb::ListWavesRequest>,
        ) -> Result<Response<pb::ListWavesResponse>, Status> {
            self.answer::<pb::ListWavesResponse>().map(|_| {
                Response::new(pb::ListWavesResponse {
                    waves: vec![pb::WaveSummary {
                        wave_id: LEADERS_WAVE,
                        ..Default::default()
                    }],
                })
            })
        }

        async fn watch_wave(
            &self,
            _: Request<pb::WatchWaveRequest>,
        ) -> Result<Response<Self::WatchWaveStream>, Status> {
            self.answer::<pb::WatchWaveEvent>()
                .map(|_| Response::new(tokio_stream::empty()))
        }

        async fn cancel_wave(
            &self,
            _: Request<pb::CancelWaveRequest>,
        ) -> Result<Response<pb::CancelWaveResponse>, Status> {
            self.answer()
        }

        async fn list_tasks(
            &self,
            _: Request<pb::ListTasksRequest>,
        ) -> Result<Response<pb::ListTasksResponse>, Status> {
            self.answer()
        }

        async fn get_logs(
            &self,
            _: Request<pb::GetLogsRequest>,
        ) -> Result<Response<pb::GetLogsResponse>, Status> {
            self.answer()
        }

        async fn list_nodes(
            &self,
            _: Request<pb::ListNodesRequest>,
        ) -> Result<Response<pb::ListNodesResponse>, Status> {
            self.answer()
        }

        async fn drain_node(
            &self,
            _: Request<pb::DrainNodeRequest>,
        ) -> Result<Response<pb::DrainNodeResponse>, Status> {
            self.answer()
        }

        async fn cluster_status(
            &self,
            _: Request<pb::ClusterStatusRequest>,
        ) -> Result<Response<pb::ClusterStatusResponse>, Status> {
            self.answer()
        }

        async fn add_member(
            &self,
            _: Request<pb::AddMemberRequest>,
        ) -> Result<Response<pb::ClusterStatusResponse>, Status> {
            self.answer()
        }

        async fn remove_member(
            &self,
            _: Request<pb::RemoveMemberRequest>,
        ) -> Result<Response<pb::ClusterStatusResponse>, Status> {
            self.answer()
        }
    }

    /// Serves `member` on a free loopback port; returns its `HOST:PORT`.
    async fn serve(member: FakeMember) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = listener.local_addr().expect("addr").to_string();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(ClientServiceServer::new(member))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        address
    }

    /// Serves `member` with mutual TLS, presenting `cert` (whatever its role).
    async fn serve_tls(member: FakeMember, cert: venom_tls::TlsFiles) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = listener.local_addr().expect("addr").to_string();
        let material = std::sync::Arc::new(cert.load().expect("test certificate"));
        let incoming =
            venom_tls::listen::incoming(listener, venom_tls::ListenConfig::new(Some(material)))
                .expect("listener");
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(ClientServiceServer::new(member))
                .serve_with_incoming(incoming),
        );
        address
    }

    /// A CA in `dir` with certificates for `peers`; returns each one's files.
    fn certificates(dir: &std::path::Path, peers: &[venom_tls::Peer]) -> Vec<venom_tls::TlsFiles> {
        use venom_tls::issue::{self, Validity};
        issue::init(dir, Validity::days(1)).expect("CA");
        peers
            .iter()
            .map(|peer| {
                issue::issue_into(dir, peer, &[], Validity::days(1), false).expect("issue");
                venom_tls::TlsFiles::in_dir(dir, peer)
            })
            .collect()
    }

    #[tokio::test]
    async fn a_redirect_to_a_server_without_a_member_certificate_is_refused() {
        use venom_tls::{Peer, Role};
        let dir = tempfile::tempdir().expect("tempdir");
        let files = certificates(
            dir.path(),
            &[
                Peer::new(Role::Member, "1").expect("peer"),
                Peer::new(Role::Client, "impostor").expect("peer"),
                Peer::new(Role::Admin, "root").expect("peer"),
            ],
        );
        // The impostor answers with the leader's wave, if anyone ever gets to ask it.
        let impostor = serve_tls(FakeMember { refusal: None }, files[1].clone()).await;
        let member = serve_tls(
            FakeMember {
                refusal: Some(venom_proto::leader::not_leader(Some(&impostor))),
            },
            files[0].clone(),
        )
        .await;
        let dialer = venom_tls::Dialer::from_files(Some(&files[2]), false).expect("dialer");
        let mut client = Client::new(&[member], dialer).expect("valid client");
        let err = list_waves(&mut client, Retry::RefusalsOnly)
            .await
            .expect_err("a server holding a client certificate is no leader");
        let text = format!("{err:#}");
        assert!(text.contains("cannot reach the leader"), "{text}");
        assert_ne!(
            client.current_url(),
            Some(format!("https://{impostor}").as_str())
        );
    }

    async fn list_waves(client: &mut Client, retry: Retry) -> anyhow::Result<Vec<u64>> {
        let response = client
            .call(retry, |mut rpc| async move {
                rpc.list_waves(pb::ListWavesRequest {}).await
            })
            .await?;
        Ok(response.waves.iter().map(|wave| wave.wave_id).collect())
    }

    #[tokio::test]
    async fn the_client_follows_the_leader_a_refusal_names() {
        let leader = serve(FakeMember { refusal: None }).await;
        // The hint is `HOST:PORT`: the client normalises it like a URL the user typed.
        let follower = serve(FakeMember {
            refusal: Some(venom_proto::leader::not_leader(Some(&leader))),
        })
        .await;
        let mut client =
            Client::new(&[follower], venom_tls::Dialer::plaintext(false)).expect("valid client");
        let waves = list_waves(&mut client, Retry::RefusalsOnly)
            .await
            .expect("the leader answers");
        assert_eq!(waves, [LEADERS_WAVE]);
        assert_eq!(client.current_url(), Some(normalize_url(&leader).as_str()));
    }

    #[tokio::test]
    async fn refusal_text_alone_is_not_followed() {
        let leader = serve(FakeMember { refusal: None }).await;
        let impostor = serve(FakeMember {
            refusal: Some(Status::unavailable(format!(
                "not leader: leader=http://{leader}"
            ))),
        })
        .await;
        let mut client = Client::new(
            std::slice::from_ref(&impostor),
            venom_tls::Dialer::plaintext(false),
        )
        .expect("valid client");
        let err = list_waves(&mut client, Retry::RefusalsOnly)
            .await
            .expect_err("a plain UNAVAILABLE is no redirect");
        let text = format!("{err:#}");
        assert!(
            text.starts_with(&format!("http://{impostor}: unavailable")),
            "{text}"
        );
        assert_eq!(client.current_url(), None);
    }

    #[tokio::test]
    async fn a_frozen_first_member_costs_no_timeout() {
        // Accepts connections and never answers, like a member stopped with SIGSTOP.
        let frozen = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let frozen_url = frozen.local_addr().expect("addr").to_string();
        let leader = serve(FakeMember { refusal: None }).await;
        let started = Instant::now();
        let mut client = Client::new(
            &[frozen_url.clone(), leader.clone()],
            venom_tls::Dialer::plaintext(false),
        )
        .expect("valid client");
        let waves = list_waves(&mut client, Retry::RefusalsOnly)
            .await
            .expect("the live member answers");
        assert_eq!(waves, [LEADERS_WAVE]);
        assert_eq!(client.current_url(), Some(normalize_url(&leader).as_str()));
        assert!(
            started.elapsed() < Duration::from_millis(PROBE_TIMEOUT_MS),
            "took {:?}",
            started.elapsed()
        );
        drop(frozen);
    }

    #[tokio::test]
    async fn a_request_safe_to_repeat_moves_on_when_a_member_breaks_under_it() {
        // A connection that broke under a request reaches the client as UNKNOWN.
        let broken = serve(FakeMember {
            refusal: Some(Status::unknown("transport error")),
        })
        .await;
        let leader = serve(FakeMember { refusal: None }).await;
        let urls = [broken.clone(), leader.clone()];
        let mut client =
            Client::new(&urls, venom_tls::Dialer::plaintext(false)).expect("valid client");
        let err = list_waves(&mut client, Retry::RefusalsOnly)
            .await
            .expect_err("a request that must not be repeated is not");
        assert!(format!("{err:#}").contains("transport error"), "{err:#}");
        let waves = list_waves(&mut client, Retry::Safe)
            .await
            .expect("the next member answers");
        assert_eq!(waves, [LEADERS_WAVE]);
        assert_eq!(client.current_url(), Some(normalize_url(&leader).as_str()));
    }

    #[test]
    fn blank_urls_are_refused() {
        assert!(Client::new(&[" ".into()], venom_tls::Dialer::plaintext(false)).is_err());
        assert!(Client::new(&[], venom_tls::Dialer::plaintext(false)).is_err());
    }

    #[tokio::test]
    async fn unreachable_members_are_all_named() {
        // Bind then drop two listeners so their ports are (very likely) closed.
        let mut urls = Vec::new();
        for _ in 0..2 {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            urls.push(format!(
                "127.0.0.1:{}",
                listener.local_addr().expect("addr").port()
            ));
        }
        let mut client =
            Client::new(&urls, venom_tls::Dialer::plaintext(false)).expect("valid client");
        let err = list_waves(&mut client, Retry::Safe)
            .await
            .expect_err("nothing listens there");
        let text = format!("{err:#}");
        for url in &urls {
            assert!(text.contains(url.as_str()), "`{text}` should name {url}");
        }
        assert!(text.starts_with("cannot reach a coordinator"), "{text}");
    }
}
