//! The three PEM files a process proves itself with: the cluster CA, its certificate and
//! its key. Read once at start; a certificate that does not load is refused with the file
//! and the reason, before anything listens or connects.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::{Peer, TlsError};

/// Where a process's CA, certificate and key live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The `--tls-ca`, `--tls-cert` and `--tls-key` flags (all three or none).
#[cfg(feature = "clap")]
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TlsArgs {
    /// The cluster CA certificate (PEM): peers must present a certificate it signed.
    #[arg(long, global = true, env = "VENOM_TLS_CA", value_name = "PEM", requires_all = ["tls_cert", "tls_key"])]
    pub tls_ca: Option<PathBuf>,
    /// This process's certificate (PEM), from `venomctl tls init` or `tls issue`.
    #[arg(long, global = true, env = "VENOM_TLS_CERT", value_name = "PEM", requires_all = ["tls_ca", "tls_key"])]
    pub tls_cert: Option<PathBuf>,
    /// This process's private key (PEM).
    #[arg(long, global = true, env = "VENOM_TLS_KEY", value_name = "PEM", requires_all = ["tls_ca", "tls_cert"])]
    pub tls_key: Option<PathBuf>,
}

#[cfg(feature = "clap")]
impl TlsArgs {
    /// The files, when TLS is configured.
    pub fn files(&self) -> Option<TlsFiles> {
        match (&self.tls_ca, &self.tls_cert, &self.tls_key) {
            (Some(ca), Some(cert), Some(key)) => Some(TlsFiles {
                ca: ca.clone(),
                cert: cert.clone(),
                key: key.clone(),
            }),
            _ => None,
        }
    }
}

impl TlsFiles {
    /// `DIR/ca.pem` and the certificate of `peer` that `venomctl tls` wrote into `DIR`.
    pub fn in_dir(dir: &Path, peer: &Peer) -> Self {
        let (cert, key) = crate::issue::paths(dir, peer);
        Self {
            ca: dir.join(crate::issue::CA_CERT),
            cert,
            key,
        }
    }

    /// Reads and checks all three files.
    pub fn load(&self) -> Result<Material, TlsError> {
        let ca_pem = read(&self.ca)?;
        let cert_pem = read(&self.cert)?;
        let key_pem = read(&self.key)?;
        let ca = certs(&self.ca, &ca_pem)?;
        let chain = certs(&self.cert, &cert_pem)?;
        let key = rustls_pemfile::private_key(&mut key_pem.as_slice())
            .map_err(|e| TlsError::Certificate(format!("{}: {e}", self.key.display())))?
            .ok_or_else(|| {
                TlsError::Certificate(format!("{}: no private key in it", self.key.display()))
            })?;
        let peer = Peer::from_der(&chain[0])
            .map_err(|e| TlsError::Certificate(format!("{}: {e}", self.cert.display())))?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in &ca {
            roots
                .add(cert.clone())
                .map_err(|e| TlsError::Certificate(format!("{}: {e}", self.ca.display())))?;
        }
        let material = Material {
            files: self.clone(),
            ca_pem,
            cert_pem,
            key_pem,
            roots: Arc::new(roots),
            chain,
            key: Arc::new(key),
            peer,
        };
        // A key that is not the certificate's fails here, not at the first handshake.
        material.server_config()?;
        Ok(material)
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError::io(path, e))
}

fn certs(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = rustls_pemfile::certs(&mut &pem[..])
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Certificate(format!("{}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(TlsError::Certificate(format!(
            "{}: no certificate in it",
            path.display()
        )));
    }
    Ok(certs)
}

/// The loaded files: what the listener and the dialer are built from.
pub struct Material {
    pub files: TlsFiles,
    pub ca_pem: Vec<u8>,
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    roots: Arc<rustls::RootCertStore>,
    chain: Vec<CertificateDer<'static>>,
    key: Arc<PrivateKeyDer<'static>>,
    /// Who this process's own certificate says it is.
    pub peer: Peer,
}

impl std::fmt::Debug for Material {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Material")
            .field("files", &self.files)
            .field("peer", &self.peer)
            .finish_non_exhaustive()
    }
}

/// The one crypto provider.
pub(crate) fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl Material {
    /// A server that demands a client certificate signed by the CA (with `clientAuth`).
    pub fn server_config(&self) -> Result<rustls::ServerConfig, TlsError> {
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            self.roots.clone(),
            provider(),
        )
        .build()
        .map_err(|e| TlsError::Certificate(format!("{}: {e}", self.files.ca.display())))?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())
            .map_err(|e| {
                TlsError::Certificate(format!(
                    "{} with {}: {e}",
                    self.files.cert.display(),
                    self.files.key.display()
                ))
            })?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(config)
    }

    /// tonic's client configuration: trust only the CA, present this certificate.
    pub fn client_config(&self) -> tonic::transport::ClientTlsConfig {
        tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(&self.ca_pem))
            .identity(tonic::transport::Identity::from_pem(
                &self.cert_pem,
                &self.key_pem,
            ))
    }
}
