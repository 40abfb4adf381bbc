//! The connection to the coordinators: [`Link`], the state of the one `WorkerService.Connect`
//! stream (waiting, racing, up), and [`Race`], which finds the leader.
//!
//! A worker does not walk its coordinator list one address at a time: a dead or frozen member
//! would cost a connect timeout each round. It races them. Every coordinator (and any leader a
//! refusal names) gets a candidate that opens a stream with the registration as its first
//! message and waits for the answer; a member that is not the leader refuses at once, and only
//! the leader answers, once it has committed the registration. The first candidate answered
//! wins and the others are dropped. Each candidate retries on its own: soon after a "not
//! leader" refusal (an election may be under way), with capped exponential backoff and jitter
//! after anything else.

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::stream::FuturesUnordered;
use futures::StreamExt;
use rand::Rng;
use tokio::sync::mpsc;
use tokio::time::{Instant, Sleep};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};
use venom_core::url::normalize_url;
use venom_proto::worker_service_client::WorkerServiceClient;
use venom_proto::{CoordinatorMessage, WorkerMessage};

use super::state::Instructions;
use crate::limits::{
    BACKOFF_MAX_MS, BACKOFF_MIN_MS, CONNECT_TIMEOUT, KEEP_ALIVE_INTERVAL, KEEP_ALIVE_TIMEOUT,
    MAX_INBOUND_MESSAGE_BYTES, NOT_LEADER_RETRY, OUTBOUND_CHANNEL_CAPACITY, REGISTER_TIMEOUT,
};

/// Builds a registration, numbered as sent now (each try sends a fresh one).
pub(super) type MakeRegistration = Arc<dyn Fn() -> WorkerMessage + Send + Sync>;

type Inbound = Box<Streaming<CoordinatorMessage>>;

/// A stream a coordinator accepted: it answered the registration.
pub(super) struct Accepted {
    /// The coordinator, as dialled.
    pub url: String,
    /// Where this worker's messages go.
    pub outbound: mpsc::Sender<WorkerMessage>,
    /// The coordinator's messages after the first.
    pub inbound: Inbound,
    /// The registration it accepted.
    pub register: WorkerMessage,
    /// Its answer.
    pub first: CoordinatorMessage,
}

/// The connection's state.
pub(super) enum Link {
    /// Waiting before the next race.
    Idle(Pin<Box<Sleep>>),
    /// Every coordinator is being tried.
    Racing(Race),
    /// Streaming to the leader since `since`.
    Up { inbound: Inbound, since: Instant },
}

/// What happened on the link.
pub(super) enum LinkEvent {
    /// Time to race again.
    RetryDue,
    /// A coordinator accepted the registration.
    Accepted(Box<Accepted>),
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
            Link::Racing(race) => LinkEvent::Accepted(Box::new(race.next().await)),
            Link::Up { inbound, .. } => match inbound.next().await {
                Some(Ok(message)) => LinkEvent::Message(crate::convert::instructions(message)),
                Some(Err(status)) => LinkEvent::Failed(status),
                None => LinkEvent::Closed,
            },
        }
    }
}

type Candidate = Pin<Box<dyn Future<Output = Accepted> + Send>>;

/// Every coordinator tried at once until one accepts the registration.
pub(super) struct Race {
    candidates: FuturesUnordered<Candidate>,
    /// Addresses with a candidate (as dialled).
    tried: HashSet<String>,
    /// Leaders named by refusals; those not tried yet get a candidate.
    hints: mpsc::UnboundedReceiver<String>,
    hints_tx: mpsc::UnboundedSender<String>,
    dialer: venom_tls::Dialer,
    make: MakeRegistration,
}

impl Race {
    /// Starts a candidate for each of `urls` (already as dialled).
    pub(super) fn start(
        urls: &[String],
        dialer: &venom_tls::Dialer,
        make: MakeRegistration,
    ) -> Self {
        let (hints_tx, hints) = mpsc::unbounded_channel();
        let mut race = Self {
            candidates: FuturesUnordered::new(),
            tried: HashSet::new(),
            hints,
            hints_tx,
            dialer: dialer.clone(),
            make,
        };
        for url in urls {
            race.add(url.clone());
        }
        race
    }

    fn add(&mut self, url: String) {
        if !self.tried.insert(url.clone()) {
            return;
        }
        self.candidates.push(Box::pin(candidate(
            url,
            self.dialer.clone(),
            Arc::clone(&self.make),
            self.hints_tx.clone(),
        )));
    }

    /// The first coordinator to accept. Never completes while none does.
    async fn next(&mut self) -> Accepted {
        loop {
            tokio::select! {
                Some(accepted) = self.candidates.next() => return accepted,
                Some(hint) = self.hints.recv() => {
                    let url = self.dialer.url(&hint).unwrap_or(hint);
                    if !self.tried.contains(&url) {
                        tracing::debug!(%url, "trying the leader a coordinator named");
                    }
                    self.add(url);
                }
            }
        }
    }
}

/// Tries `url` until it accepts a registration: soon again after "not leader", with backoff
/// after anything else. Leaders named by refusals go to `hints`.
async fn candidate(
    url: String,
    dialer: venom_tls::Dialer,
    make: MakeRegistration,
    hints: mpsc::UnboundedSender<String>,
) -> Accepted {
    let mut backoff = Backoff::new();
    let mut failures = 0_u32;
    loop {
        let error = match try_once(&url, make(), &dialer).await {
            Ok(accepted) => return accepted,
            Err(error) => error,
        };
        let refusal = error.refusal.as_deref();
        let not_leader = refusal.is_some_and(venom_proto::leader::is_not_leader);
        if let Some(hint) = refusal.and_then(venom_proto::leader::leader_hint) {
            let _ = hints.send(normalize_url(&hint));
        }
        let delay = if not_leader {
            NOT_LEADER_RETRY
        } else {
            backoff.next_delay()
        };
        let retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        if not_leader {
            tracing::debug!(%url, "not the leader; asking again");
        } else if failures == 0 {
            tracing::warn!(%url, reason = %error.reason, retry_in_ms, "coordinator unavailable; will retry");
        } else {
            tracing::debug!(%url, reason = %error.reason, retry_in_ms, "coordinator still unavailable");
        }
        failures = failures.saturating_add(1);
        tokio::time::sleep(delay).await;
    }
}

/// Why a try failed.
#[derive(Debug)]
struct ConnectError {
    /// For people.
    reason: String,
    /// The coordinator's refusal, when it answered with one.
    refusal: Option<Box<Status>>,
}

impl ConnectError {
    fn failed(reason: String) -> Self {
        Self {
            reason,
            refusal: None,
        }
    }
}

/// Opens a stream to `url` with `register` as its first message and waits for the answer.
async fn try_once(
    url: &str,
    register: WorkerMessage,
    dialer: &venom_tls::Dialer,
) -> Result<Accepted, ConnectError> {
    let (sender, receiver) = mpsc::channel(OUTBOUND_CHANNEL_CAPACITY);
    if sender.try_send(register.clone()).is_err() {
        // Unreachable: the channel is new, empty and its receiver is held here.
        return Err(ConnectError::failed(
            "cannot queue the registration on a new channel".to_owned(),
        ));
    }
    let opening = async {
        let endpoint = dialer
            .endpoint(url)
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
        let refused = |status: Status| ConnectError {
            reason: format!("{url} refused the stream: {}", status.message()),
            refusal: Some(Box::new(status)),
        };
        let mut inbound = client
            .connect(ReceiverStream::new(receiver))
            .await
            .map_err(refused)?
            .into_inner();
        match inbound.message().await {
            Ok(Some(first)) => Ok((Box::new(inbound), first)),
            Ok(None) => Err(ConnectError::failed(format!(
                "{url} closed the stream without answering the registration"
            ))),
            Err(status) => Err(refused(status)),
        }
    };
    let (inbound, first) = tokio::time::timeout(CONNECT_TIMEOUT + REGISTER_TIMEOUT, opening)
        .await
        .unwrap_or_else(|_| {
            Err(ConnectError::failed(format!(
                "{url} did not answer the registration in time"
            )))
        })?;
    Ok(Accepted {
        url: url.to_owned(),
        outbound: sender,
        inbound,
        register,
        first,
    })
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

/// Capped exponential backoff with jitter: [`BACKOFF_MIN_MS`] doubling to [`BACKOFF_MAX_MS`],
/// each delay drawn from the upper half of the current step so that many workers do not
/// reconnect in lockstep.
#[derive(Debug)]
pub(super) struct Backoff {
    step_ms: u64,
}

impl Backoff {
    pub(super) fn new() -> Self {
        Self {
            step_ms: BACKOFF_MIN_MS,
        }
    }

    pub(super) fn next_delay(&mut self) -> Duration {
        let step_ms = self.step_ms;
        self.step_ms = (step_ms * 2).min(BACKOFF_MAX_MS);
        Duration::from_millis(rand::thread_rng().gen_range(step_ms / 2..=step_ms))
    }

    pub(super) fn reset(&mut self) {
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
    fn urls_without_scheme_get_http() {
        assert_eq!(normalize_url("127.0.0.1:7070"), "http://127.0.0.1:7070");
        assert_eq!(normalize_url(" https://c:1 "), "https://c:1");
    }
}
