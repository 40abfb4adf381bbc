//! The test clusters' certificates: one CA per test process, and a certificate per role
//! and name issued the first time a test asks for it. Every process the helpers start
//! runs with mutual TLS unless a test gives its own `VENOM_TLS_*` variables: the secure
//! path is the tested path.
//!
//! The CA lives in `target/<profile>/test-pki/<pid>`; directories of processes that have
//! exited are removed when the next test process creates its own.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use venom_tls::issue::{self, Ca, Validity};
use venom_tls::{Dialer, Peer, Role, TlsFiles};

/// The name of the admin certificate the helpers use.
pub const ADMIN: &str = "admin";

/// A CA and the certificates issued from it so far.
#[derive(Debug)]
pub struct Pki {
    dir: PathBuf,
    ca: Mutex<Ca>,
}

/// This test process's PKI.
pub fn pki() -> &'static Pki {
    static PKI: OnceLock<Pki> = OnceLock::new();
    PKI.get_or_init(|| {
        let root = crate::bin_path("venom-coordinator")
            .parent()
            .expect("target dir")
            .join("test-pki");
        remove_stale(&root);
        let dir = root.join(std::process::id().to_string());
        let _ = std::fs::remove_dir_all(&dir);
        let ca = issue::init(&dir, Validity::days(30)).expect("test CA");
        Pki {
            dir,
            ca: Mutex::new(ca),
        }
    })
}

/// Removes the PKI directories of test processes that are gone.
fn remove_stale(root: &Path) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let alive = entry
            .file_name()
            .to_str()
            .and_then(|name| name.parse::<u32>().ok())
            .is_some_and(|pid| Path::new(&format!("/proc/{pid}")).exists());
        if !alive {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

impl Pki {
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The CA's certificate file.
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join(issue::CA_CERT)
    }

    /// The CA itself (to issue certificates with unusual validity).
    pub fn with_ca<T>(&self, f: impl FnOnce(&Ca) -> T) -> T {
        let ca = self.ca.lock().unwrap_or_else(|e| e.into_inner());
        f(&ca)
    }

    /// The files of `role`/`name`, issued on first use.
    pub fn files(&self, role: Role, name: &str) -> TlsFiles {
        let peer = Peer::new(role, name).expect("a valid test name");
        let files = TlsFiles::in_dir(&self.dir, &peer);
        let ca = self.ca.lock().unwrap_or_else(|e| e.into_inner());
        if !files.cert.exists() {
            let issued = ca
                .issue(&peer, &[], Validity::days(30))
                .expect("issue a test certificate");
            issue::write_file(&files.key, issued.key_pem.as_bytes(), 0o600, true)
                .expect("write key");
            issue::write_file(&files.cert, issued.cert_pem.as_bytes(), 0o644, true)
                .expect("write certificate");
        }
        files
    }

    /// The `VENOM_TLS_*` variables that make a process present `role`/`name`.
    pub fn env(&self, role: Role, name: &str) -> Vec<(String, String)> {
        files_env(&self.files(role, name))
    }

    /// The files of member `name` reached at `hosts` (addresses or host names) rather than
    /// on loopback, issued on first use: its certificate names exactly those hosts, as
    /// `venomctl tls issue member ID --san HOST` does. They live in a directory of their own
    /// per host list, so the same member id can serve loopback tests and others.
    pub fn member_files_at(&self, name: &str, hosts: &[String]) -> TlsFiles {
        assert!(
            !hosts.is_empty(),
            "member {name}: name at least one host (empty means loopback: use `files`)"
        );
        let peer = Peer::new(Role::Member, name).expect("a valid test name");
        let dir = self.dir.join("hosts").join(hosts.join("+"));
        let (cert, key) = issue::paths(&dir, &peer);
        let files = TlsFiles {
            ca: self.ca_cert(),
            cert,
            key,
        };
        let ca = self.ca.lock().unwrap_or_else(|e| e.into_inner());
        if !files.cert.exists() {
            issue::make_private_dir(&dir).expect("a directory for host certificates");
            let issued = ca
                .issue(&peer, hosts, Validity::days(30))
                .expect("issue a member certificate naming its hosts");
            issue::write_file(&files.key, issued.key_pem.as_bytes(), 0o600, true)
                .expect("write key");
            issue::write_file(&files.cert, issued.cert_pem.as_bytes(), 0o644, true)
                .expect("write certificate");
        }
        files
    }

    /// The `VENOM_TLS_*` variables of [`Pki::member_files_at`].
    pub fn member_env_at(&self, name: &str, hosts: &[String]) -> Vec<(String, String)> {
        files_env(&self.member_files_at(name, hosts))
    }

    /// The same as flags.
    pub fn flags(&self, role: Role, name: &str) -> Vec<String> {
        let files = self.files(role, name);
        vec![
            "--tls-ca".into(),
            files.ca.display().to_string(),
            "--tls-cert".into(),
            files.cert.display().to_string(),
            "--tls-key".into(),
            files.key.display().to_string(),
        ]
    }

    /// A dialer presenting `role`/`name`.
    pub fn dialer(&self, role: Role, name: &str) -> Dialer {
        let files = self.files(role, name);
        Dialer::tls(Arc::new(files.load().expect("load a test certificate")))
    }

    /// The dialer the helpers use: the admin's.
    pub fn admin(&self) -> Dialer {
        static ADMIN_DIALER: OnceLock<Dialer> = OnceLock::new();
        ADMIN_DIALER
            .get_or_init(|| self.dialer(Role::Admin, ADMIN))
            .clone()
    }
}

/// The `VENOM_TLS_*` variables naming `files`.
fn files_env(files: &TlsFiles) -> Vec<(String, String)> {
    vec![
        ("VENOM_TLS_CA".into(), files.ca.display().to_string()),
        ("VENOM_TLS_CERT".into(), files.cert.display().to_string()),
        ("VENOM_TLS_KEY".into(), files.key.display().to_string()),
    ]
}

/// Whether `env` already chooses the process's TLS files (or plaintext).
pub fn chooses_tls(env: &[(String, String)], flags: &[String]) -> bool {
    env.iter()
        .any(|(k, _)| k.starts_with("VENOM_TLS_") || k == "VENOM_INSECURE")
        || flags
            .iter()
            .any(|f| f.starts_with("--tls-") || f == "--insecure")
}
