//! The connection to the coordinator: [`Link`], the state of the one `WorkerService.Connect`
//! stream (waiting to reconnect, opening, up), [`open_stream`], which opens it with the
//! registration as its first message, and [`Targets`], which picks where to connect next:
//! the coordinator URLs round-robin with capped exponential backoff and jitter, except that a
//! member refusing as "not leader" sends the worker to the leader it names
//! (`venom_proto::leader`, the refusal's error detail, never its text).

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use futures::StreamExt;
use rand::Rng;
use tokio::sync::mpsc;
use tokio::time::Sleep;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};
use venom_core::url::normalize_url;
use venom_proto::worker_service_client::WorkerServiceClient;
use venom_proto::{CoordinatorMessage, WorkerMessage};

use super::state::Instructions;
use crate::limits::{
    BACKOFF_MAX_MS, BACKOFF_MIN_MS, CONNECT_TIMEOUT, KEEP_ALIVE_INTERVAL, KEEP_ALIVE_TIMEOUT,
    LEADER_HINT_RETRY, MAX_INBOUND_MESSAGE_BYTES, NOT_LEADER_RETRY, OUTBOUND_CHANNEL_CAPACITY,
};

/// Why the stream could not be opened.
#[derive(Debug)]
pub(super) struct ConnectError {
    /// For people.
    pub reason: String,
    /// The coordinator's refusal, when it answered with one.
    pub refusal: Option<Box<Status>>,
}

impl ConnectError {
    fn failed(reason: String) -> Self {
        Self {
            reason,
            refusal: None,
        }
    }
}

type Inbound = Box<Streaming<CoordinatorMessage>>;

type ConnectFuture = Pin<Box<dyn Future<Output = Result<Inbound, ConnectError>> + Send>>;

/// The connection's state.
pub(super) enum Link {
    /// Waiting to (re)connect.
    Idle(Pin<Box<Sleep>>),
    /// Opening the stream; the registration is already queued on it.
    Connecting(ConnectFuture),
    /// Streaming; the coordinator's messages arrive here.
    Up(Inbound),
}

/// What happened on the link.
pub(super) enum LinkEvent {
    /// Time to connect again.
    RetryDue,
    /// The stream opened, or could not be.
    Connected(Result<Inbound, ConnectError>),
    /// The coordinator sent a message.
    Message(Instructions),
    /// The stream failed.
    Failed(Status),
    /// The coordinator closed the stream.
    Closed,
}

impl Link {
    pub(super) fn idle_for(delay: Duration) -> Self {
        Link::Idle(Box::pin(tokio::time::sleep(delay)))
    }

    /// The next event; cancel-safe (every future lives in `self`).
    pub(super) async fn next(&mut self) -> LinkEvent {
        match self {
            Link::Idle(sleep) => {
                sleep.as_mut().await;
                LinkEvent::RetryDue
            }
            Link::Connecting(connecting) => LinkEvent::Connected(connecting.as_mut().await),
            Link::Up(inbound) => match inbound.next().await {
                Some(Ok(message)) => LinkEvent::Message(crate::convert::instructions(message)),
                Some(Err(status)) => LinkEvent::Failed(status),
                None => LinkEvent::Closed,
            },
        }
    }
}

/// Opens the stream to `url` with `register` as its first message. Returns the sender for the
/// messages that follow and the future that completes once the stream is open.
pub(super) fn open_stream(
    url: String,
    register: WorkerMessage,
    dialer: &venom_tls::Dialer,
) -> (mpsc::Sender<WorkerMessage>, ConnectFuture) {
    let (sender, receiver) = mpsc::channel(OUTBOUND_CHANNEL_CAPACITY);
    if sender.try_send(register).is_err() {
        // Unreachable: the channel is new, empty and its receiver is held below.
        tracing::error!("cannot queue the registration on a new channel");
    }
    let endpoint = dialer.endpoint(&url);
    let connecting = async move {
        let endpoint = endpoint
            .map_err(|error| ConnectError::failed(format!("cannot connect to {url}: {error}")))?
            .tcp_nodelay(true)
            .connect_timeout(CONNECT_TIMEOUT)
            .http2_keep_alive_interval(KEEP_ALIVE_INTERVAL)
            .keep_alive_timeout(KEEP_ALIVE_TIMEOUT)
            .keep_alive_while_idle(true);
        let channel = endpoint.connect().await.map_err(|error| {
            ConnectError::failed(format!("cannot connect to {url}: {}", error_chain(&error)))
        })?;
        let mut client =
            WorkerServiceClient::new(channel).max_decoding_message_size(MAX_INBOUND_MESSAGE_BYTES);
        let response = client
            .connect(ReceiverStream::new(receiver))
            .await
            .map_err(|status| ConnectError {
                reason: format!("{url} refused the stream: {}", status.message()),
                refusal: Some(Box::new(status)),
            })?;
        Ok(Box::new(response.into_inner()))
    };
    let bounded = async move {
        tokio::time::timeout(CONNECT_TIMEOUT, connecting)
            .await
            .unwrap_or_else(|_| {
                Err(ConnectError::failed(
                    "timed out opening the stream".to_owned(),
                ))
            })
    };
    (sender, Box::pin(bounded))
}

/// An error and its sources, "outer: inner: innermost".
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    text
}

/// When to try again after the link went down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Retry {
    pub delay: Duration,
    /// The coordinator refused as not the leader (it is alive; nothing is wrong).
    pub not_leader: bool,
}

/// Where to connect next: the coordinator URLs round-robin, except that a leader named by a
/// not-leader refusal is tried next, once.
#[derive(Debug)]
pub(super) struct Targets {
    /// Normalized coordinator URLs.
    urls: Vec<String>,
    /// Index into `urls` of the next URL to try.
    next_url: usize,
    /// A leader named by a refusal.
    leader_hint: Option<String>,
    backoff: Backoff,
}

impl Targets {
    /// `urls` must not be empty.
    pub(super) fn new(urls: Vec<String>) -> Self {
        Self {
            urls,
            next_url: 0,
            leader_hint: None,
            backoff: Backoff::new(),
        }
    }

    /// The URL to connect to now.
    pub(super) fn next(&mut self) -> String {
        match self.leader_hint.take() {
            Some(hint) => hint,
            None => {
                let url = self.urls[self.next_url % self.urls.len()].clone();
                self.next_url = (self.next_url + 1) % self.urls.len();
                url
            }
        }
    }

    /// The link went down, refused by `refusal` if the coordinator answered with one. A
    /// coordinator that answered "not leader" is alive: with a leader named, go there at once;
    /// during an election, ask again shortly rather than backing off (a long wait would outlive
    /// the new leader's heartbeat grace and get this node marked down). Anything else backs
    /// off.
    pub(super) fn after_failure(&mut self, refusal: Option<&Status>) -> Retry {
        let not_leader = refusal.is_some_and(venom_proto::leader::is_not_leader);
        self.leader_hint = refusal
            .and_then(venom_proto::leader::leader_hint)
            .map(|url| normalize_url(&url));
        let delay = if not_leader {
            if self.leader_hint.is_some() {
                LEADER_HINT_RETRY
            } else {
                NOT_LEADER_RETRY
            }
        } else {
            self.backoff.next_delay()
        };
        Retry { delay, not_leader }
    }

    /// The coordinator accepted the registration: the next failure backs off from the start.
    pub(super) fn registered(&mut self) {
        self.backoff.reset();
    }
}

/// Capped exponential backoff with jitter: [`BACKOFF_MIN_MS`] doubling to [`BACKOFF_MAX_MS`],
/// each delay drawn from the upper half of the current step so that many workers do not
/// reconnect in lockstep.
#[derive(Debug)]
struct Backoff {
    step_ms: u64,
}

impl Backoff {
    fn new() -> Self {
        Self {
            step_ms: BACKOFF_MIN_MS,
        }
    }

    fn next_delay(&mut self) -> Duration {
        let step_ms = self.step_ms;
        self.step_ms = (step_ms * 2).min(BACKOFF_MAX_MS);
        Duration::from_millis(rand::thread_rng().gen_range(step_ms / 2..=step_ms))
    }

    fn reset(&mut self) {
        self.step_ms = BACKOFF_MIN_MS;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_its_cap_and_resets() {
        let mut backoff = Backoff::new();
        let delays: Vec<_> = (0..10).map(|_| backoff.next_delay()).collect();
        assert!(delays[0] <= Duration::from_millis(BACKOFF_MIN_MS));
        assert!(delays
            .iter()
            .all(|d| *d <= Duration::from_millis(BACKOFF_MAX_MS)));
        assert!(delays[9] >= Duration::from_millis(BACKOFF_MAX_MS / 2));
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_millis(BACKOFF_MIN_MS));
    }

    #[test]
    fn a_not_leader_refusal_is_followed_to_the_leader_it_names() {
        use venom_proto::leader::not_leader;

        let mut targets = Targets::new(vec!["http://a:1".to_owned(), "http://b:1".to_owned()]);
        assert_eq!(targets.next(), "http://a:1");
        let retry = targets.after_failure(Some(&not_leader(Some("c:1"))));
        assert_eq!(
            retry,
            Retry {
                delay: LEADER_HINT_RETRY,
                not_leader: true
            }
        );
        assert_eq!(
            targets.next(),
            "http://c:1",
            "the named leader, with a scheme"
        );
        assert_eq!(targets.next(), "http://b:1", "a hint is used once");

        let retry = targets.after_failure(Some(&not_leader(None)));
        assert_eq!(
            retry,
            Retry {
                delay: NOT_LEADER_RETRY,
                not_leader: true
            },
            "during an election, ask again soon"
        );
        assert_eq!(targets.next(), "http://a:1");

        let text_only = Status::unavailable("not leader: leader=http://c:1");
        let retry = targets.after_failure(Some(&text_only));
        assert!(!retry.not_leader, "only the error detail counts");
        assert!(retry.delay <= Duration::from_millis(BACKOFF_MIN_MS));
        assert_eq!(targets.next(), "http://b:1");
    }

    #[test]
    fn urls_without_scheme_get_http() {
        assert_eq!(normalize_url("127.0.0.1:7070"), "http://127.0.0.1:7070");
        assert_eq!(normalize_url(" https://c:1 "), "https://c:1");
    }
}
