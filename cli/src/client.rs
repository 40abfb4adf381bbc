//! Connecting to the coordinator cluster and following its leader.
//!
//! The user names any members (`--coordinator URL[,URL…]`). [`Client`] connects to the
//! first one that answers and runs each RPC through [`Client::call`], which follows a
//! `not leader … leader=URL` refusal to the leader, waits out an election (a refusal
//! without a leader), and — for requests that are safe to repeat — moves on to the next
//! member when the current one stops answering. Every failure names the URLs tried so
//! that the one-line error a user sees says where Venom looked.

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Request, Response, Status};
use venom_proto::client_service_client::ClientServiceClient;

/// A client stub with the bearer token and the trace context attached to every request.
pub type Rpc = ClientServiceClient<InterceptedService<Channel, Outgoing>>;

/// How long connecting to one member may take before the next is tried.
const CONNECT_TIMEOUT_MS: u64 = 3_000;
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
    /// Reads, watches and idempotent writes (cancel, drain): any failure that looks
    /// like the member went away is retried on another member.
    Safe,
    /// Writes that must not be applied twice (submit): only refusals that prove the
    /// request was not applied ("not leader", failure to connect) are retried.
    RefusalsOnly,
}

/// Adds `authorization: Bearer TOKEN` to every request when a token is configured, and the
/// current span's W3C trace context (`traceparent`) when traces are exported.
#[derive(Clone, Debug)]
pub struct Outgoing {
    header: Option<MetadataValue<Ascii>>,
}

impl tonic::service::Interceptor for Outgoing {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(header) = &self.header {
            request
                .metadata_mut()
                .insert("authorization", header.clone());
        }
        venom_telemetry::inject_current(request.metadata_mut());
        Ok(request)
    }
}

/// A connection to whichever coordinator currently answers, following the leader.
pub struct Client {
    /// Members as the user named them, normalised to URLs.
    urls: Vec<String>,
    auth: Outgoing,
    /// The member in use and its stub; `None` until the first request or after it failed.
    current: Option<(String, Rpc)>,
}

impl Client {
    /// Prepares a client for `urls` (nothing is contacted yet).
    pub fn new(urls: &[String], token: Option<&str>) -> anyhow::Result<Self> {
        let urls: Vec<String> = urls
            .iter()
            .map(|url| url.trim())
            .filter(|url| !url.is_empty())
            .map(normalize_url)
            .collect();
        if urls.is_empty() {
            bail!("no coordinator URL given (use --coordinator or VENOM_COORDINATOR)");
        }
        let header = match token.map(str::trim).filter(|token| !token.is_empty()) {
            Some(token) => Some(
                format!("Bearer {token}")
                    .parse::<MetadataValue<Ascii>>()
                    .map_err(|_| {
                        anyhow!("the token contains characters not allowed in a header")
                    })?,
            ),
            None => None,
        };
        Ok(Self {
            urls,
            auth: Outgoing { header },
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
                match leader_hint(&status) {
                    Some(leader) if n_redirects < MAX_REDIRECTS && leader != url => {
                        n_redirects += 1;
                        tracing::debug!(from = %url, to = %leader, "following the leader");
                        self.switch_to(&leader).await?;
                        continue;
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
            return Err(status_error(&url, &status));
        }
    }

    /// The current stub, connecting to the first member that answers if needed.
    async fn connected(&mut self) -> anyhow::Result<(String, Rpc)> {
        if let Some((url, stub)) = &self.current {
            return Ok((url.clone(), stub.clone()));
        }
        let mut failures = Vec::new();
        for url in self.urls.clone() {
            match connect(&url, &self.auth).await {
                Ok(stub) => {
                    self.current = Some((url.clone(), stub.clone()));
                    return Ok((url, stub));
                }
                Err(err) => failures.push(format!("{url} ({err:#})")),
            }
        }
        bail!("cannot reach a coordinator; tried {}", failures.join(", "))
    }

    /// Connects to `url` (a leader named in a refusal) and makes it current.
    async fn switch_to(&mut self, url: &str) -> anyhow::Result<()> {
        let stub = connect(url, &self.auth)
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

/// Opens a channel to one member.
async fn connect(url: &str, auth: &Outgoing) -> anyhow::Result<Rpc> {
    let endpoint = Endpoint::from_shared(url.to_owned())
        .map_err(|err| anyhow!("invalid URL: {err}"))?
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
    Ok(ClientServiceClient::with_interceptor(channel, auth.clone())
        .max_decoding_message_size(MAX_DECODING_MESSAGE_BYTES))
}

/// `host:port` becomes `http://host:port`; URLs with a scheme are kept.
pub fn normalize_url(url: &str) -> String {
    let url = url.trim().trim_end_matches('/');
    if url.contains("://") {
        url.to_owned()
    } else {
        format!("http://{url}")
    }
}

/// Whether the coordinator refused because it is not the leader.
pub fn is_not_leader(status: &Status) -> bool {
    status.message().trim_start().starts_with("not leader")
}

/// The leader's URL from a `not leader … leader=URL` refusal, when it names one.
pub fn leader_hint(status: &Status) -> Option<String> {
    if !is_not_leader(status) {
        return None;
    }
    let message = status.message();
    let start = message.find("leader=")? + "leader=".len();
    let hint: String = message[start..]
        .chars()
        .take_while(|c| !c.is_whitespace() && !matches!(c, ',' | ';' | ')' | '(' | '"' | '\''))
        .collect();
    if hint.is_empty() || matches!(hint.as_str(), "unknown" | "none" | "?") {
        return None;
    }
    Some(normalize_url(&hint))
}

/// Whether a failure means the member itself is unreachable (as opposed to a
/// refusal it answered with).
fn member_went_away(status: &Status) -> bool {
    status.code() == Code::Unavailable && !is_not_leader(status)
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
        Code::Unauthenticated => {
            anyhow!("{url}: unauthenticated: {message} (set --token or VENOM_TOKEN)")
        }
        Code::PermissionDenied => anyhow!("{url}: permission denied: {message}"),
        Code::Unavailable => anyhow!("{url}: unavailable: {message}"),
        code if message.is_empty() => anyhow!("{url}: {code}"),
        code => anyhow!("{url}: {code}: {message}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leader_hints_are_extracted() {
        let status = Status::unavailable("not leader; leader=http://10.0.0.2:7070");
        assert_eq!(
            leader_hint(&status).as_deref(),
            Some("http://10.0.0.2:7070")
        );
        let status = Status::failed_precondition("not leader (leader=10.0.0.3:7070)");
        assert_eq!(
            leader_hint(&status).as_deref(),
            Some("http://10.0.0.3:7070")
        );
        let status = Status::unavailable("not leader: leader=unknown");
        assert_eq!(leader_hint(&status), None);
        let status = Status::unavailable("not leader");
        assert!(is_not_leader(&status));
        assert_eq!(leader_hint(&status), None);
        let status = Status::unavailable("overloaded, leader=http://x:1");
        assert!(!is_not_leader(&status));
        assert_eq!(leader_hint(&status), None);
    }

    #[test]
    fn urls_are_normalised() {
        assert_eq!(normalize_url("127.0.0.1:7070"), "http://127.0.0.1:7070");
        assert_eq!(
            normalize_url(" https://c.example:443/ "),
            "https://c.example:443"
        );
        assert!(Client::new(&[" ".into()], None).is_err());
        assert!(Client::new(&["a:1".into()], Some("bad\ntoken")).is_err());
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
        let mut client = Client::new(&urls, Some("secret")).expect("valid client");
        let err = client
            .call(Retry::Safe, |mut rpc| async move {
                rpc.list_waves(venom_proto::ListWavesRequest {}).await
            })
            .await
            .expect_err("nothing listens there");
        let text = format!("{err:#}");
        for url in &urls {
            assert!(text.contains(url.as_str()), "`{text}` should name {url}");
        }
        assert!(text.starts_with("cannot reach a coordinator"), "{text}");
    }
}
