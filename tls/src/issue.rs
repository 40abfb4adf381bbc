//! The cluster CA and certificates per role, as files in one directory (0700, keys 0600):
//!
//! ```text
//! ca.pem  ca-key.pem                      the cluster CA (keep ca-key.pem offline if you can)
//! member-1.pem  member-1-key.pem          coordinator member 1 (serverAuth + clientAuth)
//! worker-node-a.pem  worker-node-a-key.pem
//! client-alice.pem  client-alice-key.pem
//! admin-root.pem  admin-root-key.pem
//! ```

use std::io::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

use crate::{Peer, Role, TlsError};

/// The CA certificate's file name.
pub const CA_CERT: &str = "ca.pem";
/// The CA key's file name.
pub const CA_KEY: &str = "ca-key.pem";
/// Default lifetime of a certificate.
pub const DEFAULT_DAYS: u32 = 365;
/// Default lifetime of the CA.
pub const DEFAULT_CA_DAYS: u32 = 3_650;
/// Subject alternative names a member certificate gets when none are named: this machine.
pub const LOOPBACK_SANS: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

/// When a certificate is valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

impl Validity {
    /// From an hour ago (clocks differ a little) for `days` days.
    pub fn days(days: u32) -> Self {
        let now = OffsetDateTime::now_utc();
        Self {
            not_before: now - Duration::hours(1),
            not_after: now + Duration::days(i64::from(days)),
        }
    }
}

/// A certificate and its private key, PEM-encoded.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

/// The cluster's certificate authority.
pub struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca").finish_non_exhaustive()
    }
}

fn rcgen_err(what: &str) -> impl Fn(rcgen::Error) -> TlsError + '_ {
    move |e| TlsError::Certificate(format!("{what}: {e}"))
}

impl Ca {
    /// A new CA with a fresh P-256 key.
    pub fn generate(validity: Validity) -> Result<Self, TlsError> {
        let key = KeyPair::generate().map_err(rcgen_err("CA key"))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Venom");
        dn.push(DnType::CommonName, "Venom cluster CA");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = validity.not_before;
        params.not_after = validity.not_after;
        let cert = params.self_signed(&key).map_err(rcgen_err("CA"))?;
        Ok(Self { cert, key })
    }

    /// The CA of a directory made by [`init`].
    pub fn load(dir: &Path) -> Result<Self, TlsError> {
        let cert_path = dir.join(CA_CERT);
        let key_path = dir.join(CA_KEY);
        let cert_pem =
            std::fs::read_to_string(&cert_path).map_err(|e| TlsError::io(&cert_path, e))?;
        let key_pem = std::fs::read_to_string(&key_path).map_err(|e| TlsError::io(&key_path, e))?;
        let key = KeyPair::from_pem(&key_pem)
            .map_err(|e| TlsError::Certificate(format!("{}: {e}", key_path.display())))?;
        let der = pem_der(&cert_pem).ok_or_else(|| {
            TlsError::Certificate(format!("{}: no certificate", cert_path.display()))
        })?;
        let (_, parsed) = x509_parser::parse_x509_certificate(&der)
            .map_err(|e| TlsError::Certificate(format!("{}: {e}", cert_path.display())))?;
        if parsed.tbs_certificate.subject_pki.raw != key.public_key_der().as_slice() {
            return Err(TlsError::Certificate(format!(
                "{} does not belong to {}",
                key_path.display(),
                cert_path.display()
            )));
        }
        let params = CertificateParams::from_ca_cert_pem(&cert_pem)
            .map_err(|e| TlsError::Certificate(format!("{}: {e}", cert_path.display())))?;
        let cert = params.self_signed(&key).map_err(rcgen_err("CA"))?;
        Ok(Self { cert, key })
    }

    /// The CA certificate as written to `ca.pem`.
    pub fn cert_pem(&self) -> String {
        self.cert.pem()
    }

    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    /// A certificate for `peer`. Members are servers too: they get `serverAuth` and the
    /// host names and addresses in `sans` (this machine's loopback names when empty).
    pub fn issue(
        &self,
        peer: &Peer,
        sans: &[String],
        validity: Validity,
    ) -> Result<Issued, TlsError> {
        let key = KeyPair::generate().map_err(rcgen_err("key"))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Venom");
        dn.push(DnType::OrganizationalUnitName, peer.role.as_str());
        dn.push(DnType::CommonName, peer.name.as_str());
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        params.not_before = validity.not_before;
        params.not_after = validity.not_after;
        let uri = peer.uri().try_into().map_err(rcgen_err("identity URI"))?;
        params.subject_alt_names.push(SanType::URI(uri));
        if peer.role == Role::Member {
            params.extended_key_usages = vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ];
            let defaults: Vec<String> = LOOPBACK_SANS.iter().map(|s| s.to_string()).collect();
            let names = if sans.is_empty() { &defaults } else { sans };
            for name in names {
                params.subject_alt_names.push(san(name)?);
            }
        } else {
            if !sans.is_empty() {
                return Err(TlsError::Config(format!(
                    "--san: only member certificates name hosts ({} certificates are never servers)",
                    peer.role
                )));
            }
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        }
        let cert = params
            .signed_by(&key, &self.cert, &self.key)
            .map_err(rcgen_err("certificate"))?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// A host name or address as a subject alternative name.
fn san(name: &str) -> Result<SanType, TlsError> {
    let bare = name.trim().trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = bare.parse::<IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    let valid = !bare.is_empty()
        && bare.len() <= 253
        && bare.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        });
    if !valid {
        return Err(TlsError::Config(format!(
            "--san `{name}`: not a host name or an IP address"
        )));
    }
    Ok(SanType::DnsName(
        bare.try_into().map_err(rcgen_err("host name"))?,
    ))
}

/// The first certificate in `pem` (read as the listener and dialer read them).
fn pem_der(pem: &str) -> Option<Vec<u8>> {
    let der = rustls_pemfile::certs(&mut pem.as_bytes()).next()?.ok()?;
    Some(der.to_vec())
}

/// The certificate and key files of `peer` in `dir`.
pub fn paths(dir: &Path, peer: &Peer) -> (PathBuf, PathBuf) {
    let stem = format!("{}-{}", peer.role, peer.name);
    (
        dir.join(format!("{stem}.pem")),
        dir.join(format!("{stem}-key.pem")),
    )
}

/// Creates `dir` (0700) with a new CA in it. Refuses a directory that already holds one.
pub fn init(dir: &Path, validity: Validity) -> Result<Ca, TlsError> {
    make_private_dir(dir)?;
    let cert_path = dir.join(CA_CERT);
    if cert_path.exists() {
        return Err(TlsError::Config(format!(
            "{} already exists: this directory holds a CA (use `venomctl tls issue` to add \
             certificates, or choose another directory)",
            cert_path.display()
        )));
    }
    let ca = Ca::generate(validity)?;
    write_file(&dir.join(CA_KEY), ca.key_pem().as_bytes(), 0o600, false)?;
    write_file(&cert_path, ca.cert_pem().as_bytes(), 0o644, false)?;
    Ok(ca)
}

/// Issues a certificate for `peer` from the CA in `dir` and writes it there; `replace`
/// lets it take the place of an existing one (rotation).
pub fn issue_into(
    dir: &Path,
    peer: &Peer,
    sans: &[String],
    validity: Validity,
    replace: bool,
) -> Result<(PathBuf, PathBuf), TlsError> {
    let ca = Ca::load(dir)?;
    let issued = ca.issue(peer, sans, validity)?;
    let (cert, key) = paths(dir, peer);
    if !replace {
        for path in [&cert, &key] {
            if path.exists() {
                return Err(TlsError::Config(format!(
                    "{} already exists (add --replace to issue a new one in its place)",
                    path.display()
                )));
            }
        }
    }
    write_file(&key, issued.key_pem.as_bytes(), 0o600, replace)?;
    write_file(&cert, issued.cert_pem.as_bytes(), 0o644, replace)?;
    Ok((cert, key))
}

/// Creates `dir` and its parents; `dir` itself ends 0700.
pub fn make_private_dir(dir: &Path) -> Result<(), TlsError> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::create_dir_all(dir).map_err(|e| TlsError::io(dir, e))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| TlsError::io(dir, e))
}

/// Writes `bytes` to `path` with `mode`, all at once: a temporary file beside it, synced,
/// then renamed into place (a crash leaves the old file or the new one, never half).
pub fn write_file(path: &Path, bytes: &[u8], mode: u32, replace: bool) -> Result<(), TlsError> {
    use std::os::unix::fs::OpenOptionsExt as _;
    if !replace && path.exists() {
        return Err(TlsError::Config(format!(
            "{} already exists",
            path.display()
        )));
    }
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(|e| TlsError::io(&tmp, e))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(|e| TlsError::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| TlsError::io(path, e))?;
    if let Some(parent) = path.parent() {
        if let Ok(d) = std::fs::File::open(parent) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).expect("stat").permissions().mode() & 0o777
    }

    #[test]
    fn init_then_issue_writes_private_keys_and_readable_identities() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("certs");
        init(&dir, Validity::days(1)).expect("init");
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join(CA_KEY)), 0o600);
        assert!(
            init(&dir, Validity::days(1)).is_err(),
            "init twice must refuse"
        );

        let peer = Peer::new(Role::Member, "2").expect("peer");
        let (cert, key) = issue_into(
            &dir,
            &peer,
            &["10.0.0.2".into(), "coord-2".into()],
            Validity::days(1),
            false,
        )
        .expect("issue");
        assert_eq!(mode(&key), 0o600);
        let pem = std::fs::read_to_string(&cert).expect("read");
        let der = pem_der(&pem).expect("der");
        assert_eq!(Peer::from_der(&der).expect("identity"), peer);
        assert!(
            issue_into(&dir, &peer, &[], Validity::days(1), false).is_err(),
            "issuing over an existing certificate needs --replace"
        );
        issue_into(&dir, &peer, &[], Validity::days(1), true).expect("replace");

        let worker = Peer::new(Role::Worker, "node-a").expect("peer");
        assert!(issue_into(&dir, &worker, &["host".into()], Validity::days(1), false).is_err());
        assert!(san("bad host!").is_err());
    }

    #[test]
    fn a_ca_key_from_another_ca_is_refused() {
        let a = tempfile::tempdir().expect("tempdir");
        let b = tempfile::tempdir().expect("tempdir");
        init(a.path(), Validity::days(1)).expect("init a");
        init(b.path(), Validity::days(1)).expect("init b");
        std::fs::copy(b.path().join(CA_KEY), a.path().join(CA_KEY)).expect("copy");
        let err = Ca::load(a.path()).expect_err("mismatched key");
        assert!(err.to_string().contains("does not belong"), "{err}");
    }
}
