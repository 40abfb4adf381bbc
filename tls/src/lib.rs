//! Mutual TLS for Venom: who a caller is, proven by a certificate from the cluster's CA.
//!
//! - [`issue`]: the cluster CA and one certificate per role (`venomctl tls init/issue`).
//! - [`files`]: the three PEM files every daemon and `venomctl` take (`--tls-ca`,
//!   `--tls-cert`, `--tls-key`).
//! - [`dial`]: how a process reaches a coordinator — TLS when it has certificates, plaintext
//!   only to loopback (or with `--insecure`), never plaintext for an `https://` address.
//! - [`listen`]: the coordinator's listener — the TLS handshake, the caller's [`Peer`]
//!   identity attached to every request, and bounds on connections and handshakes per address.
//!
//! A certificate says who holds it in one URI subject alternative name,
//! `venom://ROLE/NAME` ([`Peer::uri`]). Only member certificates carry the `serverAuth`
//! extended key usage, so a client or worker refuses any server that is not a member,
//! whatever else it presents; every certificate carries `clientAuth`.
//!
//! One crypto provider: ring, through tonic's and rcgen's features (rustls panics when it
//! finds two and none is chosen).

use std::fmt;
use std::str::FromStr;

pub mod dial;
pub mod files;
pub mod issue;
pub mod listen;

pub use dial::{DialError, Dialer};
#[cfg(feature = "clap")]
pub use files::TlsArgs;
pub use files::TlsFiles;
pub use listen::{ConnInfo, ListenConfig};

/// The URI scheme of the subject alternative name that carries a [`Peer`].
pub const URI_SCHEME: &str = "venom://";

/// What a certificate allows its holder to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// A coordinator: raft traffic, serving clients and workers. Its name is its member id.
    Member,
    /// A worker: `WorkerService.Connect` under its node name.
    Worker,
    /// A user: reads, submit, cancel of their own waves.
    Client,
    /// An operator: everything a client may, plus drain, membership changes and
    /// cancelling anyone's waves.
    Admin,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Member, Role::Worker, Role::Client, Role::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Member => "member",
            Role::Worker => "worker",
            Role::Client => "client",
            Role::Admin => "admin",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| format!("unknown role `{s}` (one of member, worker, client, admin)"))
    }
}

/// Who holds a certificate: its role and name (a member's name is its id).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Peer {
    pub role: Role,
    pub name: String,
}

/// Longest name a certificate may carry.
pub const MAX_NAME_BYTES: usize = 128;

impl Peer {
    pub fn new(role: Role, name: impl Into<String>) -> Result<Self, TlsError> {
        let name = name.into();
        check_name(role, &name)?;
        Ok(Self { role, name })
    }

    /// The subject alternative name that carries this identity.
    pub fn uri(&self) -> String {
        format!("{URI_SCHEME}{}/{}", self.role, self.name)
    }

    /// Reads `venom://ROLE/NAME`.
    pub fn from_uri(uri: &str) -> Option<Self> {
        let rest = uri.strip_prefix(URI_SCHEME)?;
        let (role, name) = rest.split_once('/')?;
        Peer::new(role.parse().ok()?, name).ok()
    }

    /// The member id of a member certificate.
    pub fn member_id(&self) -> Option<u64> {
        match self.role {
            Role::Member => self.name.parse().ok(),
            _ => None,
        }
    }

    /// The identity in a DER certificate (the first `venom://` URI it names).
    pub fn from_der(der: &[u8]) -> Result<Self, TlsError> {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| TlsError::Certificate(format!("unreadable certificate: {e}")))?;
        let san = cert
            .subject_alternative_name()
            .map_err(|e| TlsError::Certificate(format!("subject alternative names: {e}")))?;
        san.into_iter()
            .flat_map(|ext| ext.value.general_names.iter())
            .find_map(|name| match name {
                x509_parser::extensions::GeneralName::URI(uri) => Peer::from_uri(uri),
                _ => None,
            })
            .ok_or_else(|| {
                TlsError::Certificate(format!(
                    "the certificate names no Venom identity (a `{URI_SCHEME}ROLE/NAME` URI)"
                ))
            })
    }
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.role, self.name)
    }
}

/// Names are what node names and user names may be: letters, digits, `-`, `_`, `.`, `@`.
fn check_name(role: Role, name: &str) -> Result<(), TlsError> {
    let bad = |why: &str| TlsError::Name {
        role,
        name: name.to_owned(),
        why: why.to_owned(),
    };
    if name.is_empty() {
        return Err(bad("it is empty"));
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(bad(&format!("it is longer than {MAX_NAME_BYTES} bytes")));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@'))
    {
        return Err(bad("use letters, digits, `-`, `_`, `.` and `@` only"));
    }
    if role == Role::Member && name.parse::<u64>().map_or(true, |id| id == 0) {
        return Err(bad("a member's name is its id, a number ≥ 1"));
    }
    Ok(())
}

/// Everything that can go wrong with certificates and keys.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{role} name `{name}`: {why}")]
    Name {
        role: Role,
        name: String,
        why: String,
    },
    #[error("{0}")]
    Certificate(String),
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Config(String),
}

impl TlsError {
    pub(crate) fn io(path: &std::path::Path, source: std::io::Error) -> Self {
        TlsError::Io {
            path: path.display().to_string(),
            source,
        }
    }
}

/// Whether `host` (a name or an address, brackets allowed) is this machine's loopback.
pub fn is_loopback_host(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_uri_round_trips_and_refuses_bad_names() {
        let p = Peer::new(Role::Worker, "node-a").expect("valid");
        assert_eq!(p.uri(), "venom://worker/node-a");
        assert_eq!(Peer::from_uri(&p.uri()), Some(p));
        assert_eq!(
            Peer::from_uri("venom://member/3").and_then(|p| p.member_id()),
            Some(3)
        );
        assert!(Peer::from_uri("venom://member/0").is_none());
        assert!(Peer::from_uri("venom://member/x").is_none());
        assert!(Peer::from_uri("venom://root/x").is_none());
        assert!(Peer::from_uri("https://client/x").is_none());
        assert!(Peer::new(Role::Client, "a/b").is_err());
        assert!(Peer::new(Role::Client, "").is_err());
        assert!(Peer::new(Role::Client, "x".repeat(MAX_NAME_BYTES + 1)).is_err());
    }

    #[test]
    fn loopback_hosts() {
        for host in ["127.0.0.1", "127.1.2.3", "localhost", "[::1]", "::1"] {
            assert!(is_loopback_host(host), "{host}");
        }
        for host in ["0.0.0.0", "10.0.0.1", "example.com", "[::]"] {
            assert!(!is_loopback_host(host), "{host}");
        }
    }
}
