//! The coordinator's listener: accepts TCP connections, runs the TLS handshake (demanding a
//! client certificate from the cluster CA) and hands tonic connections that carry the
//! caller's [`ConnInfo`], which every handler finds in its request's extensions.
//!
//! Bounded per source address and in total, so a flood from one address neither exhausts
//! the process nor keeps others out: open connections per address, handshakes in progress
//! per address and overall, and a deadline on each handshake. What is over a bound is
//! closed at once.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
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

    pub fn new(tls: Option<Arc<Material>>) -> Self {
        Self {
            tls,
            max_connections_per_address: Self::DEFAULT_MAX_CONNECTIONS_PER_ADDRESS,
            max_handshakes_per_address: Self::DEFAULT_MAX_HANDSHAKES_PER_ADDRESS,
            max_handshakes: Self::DEFAULT_MAX_HANDSHAKES,
            handshake_timeout: Self::DEFAULT_HANDSHAKE_TIMEOUT,
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
    let handshakes = Arc::new(tokio::sync::Semaphore::new(config.max_handshakes.max(1)));
    let mut last_error_log: Option<Instant> = None;
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
                if last_error_log.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                    tracing::error!(error = %e, "cannot accept a connection");
                    last_error_log = Some(Instant::now());
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
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
            };
            let _ = tx.send(Ok(conn)).await;
        });
    }
}
