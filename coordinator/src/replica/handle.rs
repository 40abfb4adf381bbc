//! The replica's public face: the [`Handle`] the gRPC handlers hold (propose, read
//! barrier, membership changes, status), the [`Event`]s it sends, what the replica shares
//! with them, and the clock it reads time through.

use super::*;

/// Why a proposal did not commit.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum ProposeError {
    #[error("not leader: leader={}", .leader_addr.as_deref().unwrap_or("unknown"))]
    NotLeader { leader_addr: Option<String> },
    #[error("coordinator is shutting down")]
    Stopped,
    #[error("raft refused the proposal: {0}")]
    Raft(String),
    #[error("{0}")]
    Invalid(String),
}

pub(super) type Reply = oneshot::Sender<Result<Outcome, ProposeError>>;

/// Inputs of the replica task.
pub enum Event {
    Propose {
        command: Command,
        reply: Option<Reply>,
    },
    Raft(Vec<RaftMessage>),
    /// A worker stream opened; assignments for `node` go to `tx` from now on.
    WorkerAttached {
        node: String,
        conn: u64,
        tx: mpsc::Sender<pb::CoordinatorMessage>,
    },
    WorkerDetached {
        node: String,
        conn: u64,
    },
    /// Linearizable read barrier (raft ReadIndex): answered once this replica has applied
    /// everything the leader had committed when the read arrived.
    ReadIndex {
        reply: oneshot::Sender<Result<(), ProposeError>>,
    },
    /// Add or remove one coordinator (a raft conf change, one member at a time); answered
    /// once the change is committed and applied here.
    ChangeMembership {
        change: MemberChange,
        reply: Reply,
    },
}

/// This replica's view of raft, published after every turn.
#[derive(Debug, Clone, Default)]
pub struct RaftStatus {
    pub id: u64,
    pub role: StateRole,
    pub term: u64,
    pub leader_id: u64,
    pub commit: u64,
    pub applied: u64,
    pub last_index: u64,
    /// Peer id → address (this replica included).
    pub members: BTreeMap<u64, String>,
    /// Peer id → matched index (known on the leader only).
    pub matched: BTreeMap<u64, u64>,
    /// The cluster's identity (0 until its first leader set it).
    pub cluster_id: u64,
}

/// State shared with the gRPC handlers (read-only for them).
pub struct Shared {
    pub state: RwLock<State>,
    pub status: RwLock<RaftStatus>,
    /// Bumped after every applied batch; watchers wake on it.
    pub applied: watch::Sender<u64>,
    pub metrics: Metrics,
}

impl Shared {
    /// The replicated state as last applied, for reading (a panic elsewhere while it was
    /// held does not hide it: the state is only ever changed whole by apply).
    pub fn read_state(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// This replica's raft status as last published.
    pub fn status(&self) -> RaftStatus {
        self.status.read().map(|s| s.clone()).unwrap_or_default()
    }
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").finish_non_exhaustive()
    }
}

/// Handle to a running replica.
#[derive(Clone, Debug)]
pub struct Handle {
    pub tx: mpsc::Sender<Event>,
    pub shared: Arc<Shared>,
}

impl Handle {
    /// Proposes a command and waits for it to be applied.
    pub async fn propose(&self, command: Command) -> Result<Outcome, ProposeError> {
        let started = std::time::Instant::now();
        let outcome = self.propose_untimed(command).await;
        if outcome.is_ok() {
            self.shared
                .metrics
                .observe_proposal(started.elapsed().as_secs_f64());
        }
        outcome
    }

    async fn propose_untimed(&self, command: Command) -> Result<Outcome, ProposeError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Event::Propose {
                command,
                reply: Some(reply),
            })
            .await
            .map_err(|_| ProposeError::Stopped)?;
        rx.await.map_err(|_| ProposeError::Stopped)?
    }

    /// Proposes a command without waiting for its outcome.
    pub async fn submit(&self, command: Command) -> Result<(), ProposeError> {
        self.tx
            .send(Event::Propose {
                command,
                reply: None,
            })
            .await
            .map_err(|_| ProposeError::Stopped)
    }

    /// Waits until this replica's state includes every write committed before the call
    /// (raft ReadIndex, confirmed with a quorum), so a read after it is current. Fails
    /// with `NotLeader` when no leader answers within `READ_INDEX_TIMEOUT`.
    pub async fn read_barrier(&self) -> Result<(), ProposeError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Event::ReadIndex { reply })
            .await
            .map_err(|_| ProposeError::Stopped)?;
        match tokio::time::timeout(READ_INDEX_TIMEOUT, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(ProposeError::Stopped),
            Err(_) => Err(ProposeError::NotLeader {
                leader_addr: self.leader_addr(),
            }),
        }
    }

    /// Adds or removes a coordinator and waits until the change is applied here.
    pub async fn change_membership(&self, change: MemberChange) -> Result<(), ProposeError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Event::ChangeMembership { change, reply })
            .await
            .map_err(|_| ProposeError::Stopped)?;
        rx.await.map_err(|_| ProposeError::Stopped)?.map(|_| ())
    }

    /// The replicated state as this replica has applied it, for reading.
    pub fn read_state(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.shared.read_state()
    }

    pub fn status(&self) -> RaftStatus {
        self.shared.status()
    }

    pub fn is_leader(&self) -> bool {
        self.status().role == StateRole::Leader
    }

    /// The leader's client address, when known.
    pub fn leader_addr(&self) -> Option<String> {
        let status = self.status();
        status.members.get(&status.leader_id).cloned()
    }
}

/// Unix time in milliseconds (the leader stamps this into commands).
pub fn now_ms() -> u64 {
    SystemClock.now_us() / 1_000
}

/// Time as the replica sees it. The replica reads time only through this, so the
/// simulated cluster can run it on a virtual clock; the state machine never reads it (the
/// leader stamps time into commands).
pub trait Clock: Send + Sync {
    /// Microseconds since the Unix epoch (or since a simulation started).
    fn now_us(&self) -> u64;

    fn now_ms(&self) -> u64 {
        self.now_us() / 1_000
    }

    /// Milliseconds on a clock that never jumps (leases are measured on it).
    fn monotonic_ms(&self) -> u64;
}

/// The wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_us(&self) -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64)
    }

    fn monotonic_ms(&self) -> u64 {
        static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
        let start = *START.get_or_init(std::time::Instant::now);
        u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
}

/// Longest a read waits for the leader to confirm its ReadIndex.
pub(super) const READ_INDEX_TIMEOUT: Duration = Duration::from_secs(3);
