//! How a process reaches a coordinator. With certificates every connection is TLS, whatever
//! scheme an address was written with (`http://` addresses recorded by older members are
//! upgraded, never the other way). Without them only loopback is reached in plaintext,
//! unless the process was started `--insecure`; an `https://` address is refused outright.

use std::sync::Arc;

use tonic::transport::Endpoint;

use crate::files::Material;
use crate::{is_loopback_host, TlsError, TlsFiles};

/// Why an address cannot be dialled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DialError {
    #[error("`{address}` is https:// but no certificates were given (--tls-ca, --tls-cert, --tls-key): refusing to connect in plaintext")]
    HttpsWithoutTls { address: String },
    #[error("`{address}` is not on this machine and no certificates were given: refusing plaintext (give --tls-ca/--tls-cert/--tls-key, or --insecure to send everything in the clear)")]
    PlaintextToRemote { address: String },
    #[error("`{address}` is not a coordinator address ({reason})")]
    BadAddress { address: String, reason: String },
}

/// Plaintext or mutual TLS, decided once per process.
#[derive(Clone, Default)]
pub struct Dialer {
    tls: Option<Arc<Material>>,
    insecure: bool,
}

impl std::fmt::Debug for Dialer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dialer")
            .field("tls", &self.tls.as_ref().map(|m| &m.peer))
            .field("insecure", &self.insecure)
            .finish()
    }
}

impl Dialer {
    /// Plaintext: loopback only unless `insecure`.
    pub fn plaintext(insecure: bool) -> Self {
        Self {
            tls: None,
            insecure,
        }
    }

    /// Mutual TLS with this certificate.
    pub fn tls(material: Arc<Material>) -> Self {
        Self {
            tls: Some(material),
            insecure: false,
        }
    }

    /// TLS when `files` are given, else plaintext.
    pub fn from_files(files: Option<&TlsFiles>, insecure: bool) -> Result<Self, TlsError> {
        match files {
            Some(files) => Ok(Self::tls(Arc::new(files.load()?))),
            None => Ok(Self::plaintext(insecure)),
        }
    }

    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// This process's certificate, when it has one.
    pub fn material(&self) -> Option<&Arc<Material>> {
        self.tls.as_ref()
    }

    /// The URL this dialer would connect to for `address` (`HOST:PORT` or a URL).
    pub fn url(&self, address: &str) -> Result<String, DialError> {
        Ok(self.parse(address)?.0)
    }

    /// `(url, host)` for `address`, after the checks above.
    fn parse(&self, address: &str) -> Result<(String, String), DialError> {
        let trimmed = address.trim().trim_end_matches('/');
        let (scheme, authority) = match trimmed.split_once("://") {
            Some((scheme, rest)) => (Some(scheme), rest),
            None => (None, trimmed),
        };
        let bad = |reason: &str| DialError::BadAddress {
            address: address.to_owned(),
            reason: reason.to_owned(),
        };
        match scheme {
            None | Some("http") | Some("https") => {}
            Some(other) => return Err(bad(&format!("unknown scheme `{other}`"))),
        }
        if authority.contains('/') {
            return Err(bad("a coordinator address has no path"));
        }
        let (host, port) = authority
            .rsplit_once(':')
            .ok_or_else(|| bad("expected HOST:PORT"))?;
        if host.is_empty() || !port.parse::<u16>().is_ok_and(|p| p > 0) {
            return Err(bad("expected HOST:PORT with a port from 1 to 65535"));
        }
        let bare_host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        if self.tls.is_some() {
            return Ok((format!("https://{authority}"), bare_host));
        }
        if scheme == Some("https") {
            return Err(DialError::HttpsWithoutTls {
                address: address.to_owned(),
            });
        }
        if !self.insecure && !is_loopback_host(host) {
            return Err(DialError::PlaintextToRemote {
                address: address.to_owned(),
            });
        }
        Ok((format!("http://{authority}"), bare_host))
    }

    /// A tonic endpoint for `address`; with TLS, the server must present a member
    /// certificate from the cluster CA naming `address`'s host.
    pub fn endpoint(&self, address: &str) -> Result<Endpoint, DialError> {
        let (url, host) = self.parse(address)?;
        let endpoint = Endpoint::from_shared(url).map_err(|e| DialError::BadAddress {
            address: address.to_owned(),
            reason: e.to_string(),
        })?;
        match &self.tls {
            None => Ok(endpoint),
            Some(material) => endpoint
                .tls_config(material.client_config().domain_name(host))
                .map_err(|e| DialError::BadAddress {
                    address: address.to_owned(),
                    reason: e.to_string(),
                }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plaintext_reaches_loopback_only_and_never_https() {
        let d = Dialer::plaintext(false);
        assert_eq!(
            d.url("127.0.0.1:7070").as_deref(),
            Ok("http://127.0.0.1:7070")
        );
        assert_eq!(
            d.url("http://localhost:7/").as_deref(),
            Ok("http://localhost:7")
        );
        assert!(matches!(
            d.url("10.0.0.1:7070"),
            Err(DialError::PlaintextToRemote { .. })
        ));
        assert!(matches!(
            d.url("https://127.0.0.1:7070"),
            Err(DialError::HttpsWithoutTls { .. })
        ));
        assert!(matches!(
            d.url("127.0.0.1"),
            Err(DialError::BadAddress { .. })
        ));
        assert!(matches!(
            d.url("ftp://127.0.0.1:1"),
            Err(DialError::BadAddress { .. })
        ));
        let insecure = Dialer::plaintext(true);
        assert_eq!(
            insecure.url("10.0.0.1:7070").as_deref(),
            Ok("http://10.0.0.1:7070")
        );
        assert!(insecure.url("https://10.0.0.1:7070").is_err());
    }
}
