//! The coordinator's listener: accepts TCP connections, runs the TLS handshake (demanding a
//! client certificate from the cluster CA) and hands tonic connections that carry the
//! caller's [`ConnInfo`], which every handler finds in its request's extensions.
//!
//! Bounded per source address and in total, so a flood from one address neither exhausts
//! the process nor keeps others out: open connections per address and in all, handshakes
//! in progress per address and overall, and a deadline on each handshake. What is over a
//! bound is closed at once.
//!
//! The bound on open connections in all keeps [`ListenConfig::RESERVED_DESCRIPTORS`] of the
//! process's descriptor limit free: connections cost a descriptor each, and a coordinator
//! whose descriptors all went to (possibly idle) connections could no longer sync its
//! database or reach its peers. Reaching that bound, or failing to accept at all (out of
//! descriptors or memory anyway), is logged at most once a second, never once per
//! connection; connections already open keep being served.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;

use crate::files::Material;
use crate::Peer;

/// Bounds of a listener.
#[derive(Debug, Clone)]
pub struct ListenConfig {
    /// The server's certificate; `None` serves plaintext.
    pub tls: Option<Arc<Material>>,
    /// Open connections from one source address.
    pub max_connections_per_address: usize,
    /// Open connections in all (see [`ListenConfig::max_connections_for`]).
    pub max_connections: usize,
    /// TLS handshakes in progress from one source address.
    pub max_handshakes_per_address: usize,
    /// TLS handshakes in progress in all.
    pub max_handshakes: usize,
    /// Longest a handshake may take.
    pub handshake_timeout: Duration,
}

impl ListenConfig {
    pub const DEFAULT_MAX_CONNECTIONS_PER_ADDRESS: usize = 256;
    pub const DEFAULT_MAX_HANDSHAKES_PER_ADDRESS: usize = 32;
    pub const DEFAULT_MAX_HANDSHAKES: usize = 512;
    pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
    /// Descriptors of the process's limit that connections may not take: the database,
    /// its syncs, peers, metrics and the runtime need some too.
    pub const RESERVED_DESCRIPTORS: u64 = 128;
    /// Fewest connections allowed in all, however low the descriptor limit.
    pub const MIN_MAX_CONNECTIONS: usize = 16;
    /// Open connections in all when the descriptor limit is unlimited or unknown.
    pub const UNLIMITED_MAX_CONNECTIONS: usize = 65_536;

    pub fn new(tls: Option<Arc<Material>>) -> Self {
        Self {
            tls,
            max_connections_per_address: Self::DEFAULT_MAX_CONNECTIONS_PER_ADDRESS,
            max_connections: Self::max_connections_for(descriptor_limit()),
            max_handshakes_per_address: Self::DEFAULT_MAX_HANDSHAKES_PER_ADDRESS,
            max_handshakes: Self::DEFAULT_MAX_HANDSHAKES,
            handshake_timeout: Self::DEFAULT_HANDSHAKE_TIMEOUT,
        }
    }

    /// Open connections in all for a process allowed `descriptor_limit` descriptors
    /// (`None`: unlimited or unknown): all but [`Self::RESERVED_DESCRIPTORS`], and at least
    /// [`Self::MIN_MAX_CONNECTIONS`].
    pub fn max_connections_for(descriptor_limit: Option<u64>) -> usize {
        match descriptor_limit {
            Some(limit) => usize::try_from(limit.saturating_sub(Self::RESERVED_DESCRIPTORS))
                .unwrap_or(Self::UNLIMITED_MAX_CONNECTIONS)
                .clamp(Self::MIN_MAX_CONNECTIONS, Self::UNLIMITED_MAX_CONNECTIONS),
            None => Self::UNLIMITED_MAX_CONNECTIONS,
        }
    }
}

/// This process's soft limit on open descriptors (`ulimit -n`); `None` when unlimited or
/// unknown.
pub fn descriptor_limit() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct it is given, which lives across the call.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    if rc != 0 || limit.rlim_cur == libc::RLIM_INFINITY {
        return None;
    }
    // rlim_t is narrower than u64 on some targets.
    #[allow(clippy::useless_conversion)]
    Some(u64::from(limit.rlim_cur))
}

/// How often at most a lasting condition (out of descriptors, connections at their bound)
/// is logged.
const LOG_EVERY: Duration = Duration::from_secs(1);

/// One log line per [`LOG_EVERY`] for a condition that may repeat thousands of times a
/// second, with the number of repeats not logged in between.
#[derive(Debug, Default)]
struct Sparse {
    last: Option<Instant>,
    repeats: u64,
}

impl Sparse {
    /// `Some(repeats since the last line)` when a line is due now.
    fn due(&mut self) -> Option<u64> {
        if self.last.is_none_or(|t| t.elapsed() >= LOG_EVERY) {
            self.last = Some(Instant::now());
            Some(std::mem::take(&mut self.repeats))
        } else {
            self.repeats += 1;
            None
        }
    }
}

/// Who is at the other end of a connection.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub remote: Option<SocketAddr>,
    /// Whether the connection is TLS.
    pub tls: bool,
    /// The identity its certificate names (`None` in plaintext, or when a certificate of
    /// the cluster CA names no Venom identity).
    pub peer: Option<Arc<Peer>>,
}

#[derive(Debug, Default)]
struct PerAddress {
    open: usize,
    handshaking: usize,
}

type Table = Arc<Mutex<HashMap<IpAddr, PerAddress>>>;

/// Holds one of an address's open connections (or handshakes) until dropped.
#[derive(Debug)]
struct Slot {
    table: Table,
    ip: IpAddr,
    handshake: bool,
}

impl Slot {
    fn take(table: &Table, ip: IpAddr, handshake: bool, max: usize) -> Option<Self> {
        let mut t = table.lock().ok()?;
        let entry = t.entry(ip).or_default();
        let count = if handshake {
            &mut entry.handshaking
        } else {
            &mut entry.open
        };
        if *count >= max {
            return None;
        }
        *count += 1;
        Some(Self {
            table: table.clone(),
            ip,
            handshake,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Ok(mut t) = self.table.lock() {
            if let Some(entry) = t.get_mut(&self.ip) {
                if self.handshake {
                    entry.handshaking = entry.handshaking.saturating_sub(1);
                } else {
                    entry.open = entry.open.saturating_sub(1);
                }
                if entry.open == 0 && entry.handshaking == 0 {
                    t.remove(&self.ip);
                }
            }
        }
    }
}

enum Io {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

/// One accepted connection, handed to tonic.
pub struct Conn {
    io: Io,
    info: ConnInfo,
    _slot: Slot,
    /// One of the connections allowed in all, until dropped.
    _open: OwnedSemaphorePermit,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn").field("info", &self.info).finish()
    }
}

impl tonic::transport::server::Connected for Conn {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        self.info.clone()
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// The connections accepted on `listener`, for `Server::serve_with_incoming`. Accepting
/// stops when the stream is dropped.
pub fn incoming(
    listener: TcpListener,
    config: ListenConfig,
) -> Result<ReceiverStream<io::Result<Conn>>, crate::TlsError> {
    let acceptor = match &config.tls {
        Some(material) => Some(TlsAcceptor::from(Arc::new(material.server_config()?))),
        None => None,
    };
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(accept_loop(listener, config, acceptor, tx));
    Ok(ReceiverStream::new(rx))
}

async fn accept_loop(
    listener: TcpListener,
    config: ListenConfig,
    acceptor: Option<TlsAcceptor>,
    tx: mpsc::Sender<io::Result<Conn>>,
) {
    let table: Table = Arc::default();
    let handshakes = Arc::new(Semaphore::new(config.max_handshakes.max(1)));
    let max_connections = config.max_connections.max(1);
    let connections = Arc::new(Semaphore::new(max_connections));
    let (mut accept_failed, mut at_bound) = (Sparse::default(), Sparse::default());
    loop {
        let accepted = tokio::select! {
            () = tx.closed() => return,
            accepted = listener.accept() => accepted,
        };
        let (stream, remote) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of descriptors or memory: say so (at most once a second) and back
                // off instead of spinning; established connections keep being served.
                if let Some(repeats) = accept_failed.due() {
                    tracing::error!(
                        error = %e,
                        failures_not_logged = repeats,
                        "cannot accept a connection"
                    );
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let Ok(open) = connections.clone().try_acquire_owned() else {
            if let Some(repeats) = at_bound.due() {
                tracing::warn!(
                    open = max_connections,
                    descriptor_limit = ?descriptor_limit(),
                    refusals_not_logged = repeats,
                    "refusing new connections: as many are open as the descriptor limit \
                     leaves room for (raise it: `ulimit -n`, systemd's LimitNOFILE)"
                );
            }
            continue;
        };
        let ip = remote.ip();
        let Some(slot) = Slot::take(&table, ip, false, config.max_connections_per_address) else {
            tracing::debug!(%remote, "refused: too many connections from this address");
            continue;
        };
        let Some(acceptor) = acceptor.clone() else {
            let conn = Conn {
                io: Io::Plain(stream),
                info: ConnInfo {
                    remote: Some(remote),
                    tls: false,
                    peer: None,
                },
                _slot: slot,
                _open: open,
            };
            if tx.send(Ok(conn)).await.is_err() {
                return;
            }
            continue;
        };
        let Some(handshake_slot) = Slot::take(&table, ip, true, config.max_handshakes_per_address)
        else {
            tracing::debug!(%remote, "refused: too many handshakes from this address");
            continue;
        };
        let Ok(permit) = handshakes.clone().try_acquire_owned() else {
            tracing::debug!(%remote, "refused: too many handshakes in progress");
            continue;
        };
        let (tx, timeout) = (tx.clone(), config.handshake_timeout);
        tokio::spawn(async move {
            let result = tokio::time::timeout(timeout, acceptor.accept(stream)).await;
            drop((permit, handshake_slot));
            let tls = match result {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::debug!(%remote, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%remote, "TLS handshake timed out");
                    return;
                }
            };
            let peer = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|chain| chain.first())
                .and_then(|der| Peer::from_der(der).ok())
                .map(Arc::new);
            let conn = Conn {
                io: Io::Tls(Box::new(tls)),
                info: ConnInfo {
                    remote: Some(remote),
                    tls: true,
                    peer,
                },
                _slot: slot,
                _open: open,
            };
            let _ = tx.send(Ok(conn)).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncReadExt as _;
    use tokio_stream::StreamExt as _;

    use super::*;

    #[test]
    fn connections_in_all_leave_descriptors_to_the_rest_of_the_process() {
        assert_eq!(ListenConfig::max_connections_for(Some(1_024)), 896);
        assert_eq!(ListenConfig::max_connections_for(Some(100)), 16);
        assert_eq!(ListenConfig::max_connections_for(Some(u64::MAX)), 65_536);
        assert_eq!(ListenConfig::max_connections_for(None), 65_536);
    }

    /// Whether the other end closed `stream` within 5 s (EOF or reset).
    async fn closed(stream: &mut TcpStream) -> bool {
        let mut buf = [0u8; 16];
        let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await;
        matches!(read, Ok(Ok(0) | Err(_)))
    }

    #[tokio::test]
    async fn beyond_the_bound_in_all_a_connection_is_closed_until_another_closes() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        let mut config = ListenConfig::new(None);
        config.max_connections = 3;
        let mut incoming = incoming(listener, config).expect("listener");
        let mut clients = Vec::new();
        let mut open = Vec::new();
        for _ in 0..3 {
            clients.push(TcpStream::connect(address).await.expect("connect"));
            let conn = incoming
                .next()
                .await
                .expect("a connection")
                .expect("accepted");
            open.push(conn);
        }
        let mut one_too_many = TcpStream::connect(address).await.expect("connect");
        assert!(
            closed(&mut one_too_many).await,
            "a 4th connection is closed"
        );
        // One closes: the next is served again.
        open.pop();
        let next = TcpStream::connect(address).await.expect("connect");
        let conn = tokio::time::timeout(Duration::from_secs(5), incoming.next())
            .await
            .expect("the next connection is handed over")
            .expect("a connection")
            .expect("accepted");
        assert_eq!(conn.info.remote, next.local_addr().ok());
    }
}
