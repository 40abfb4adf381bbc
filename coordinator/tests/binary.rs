//! The `venom-coordinator` binary: flags and their errors.

#![allow(clippy::unwrap_used)]

use std::process::Command;

fn coordinator() -> Command {
    Command::new(env!("CARGO_BIN_EXE_venom-coordinator"))
}

#[test]
fn help_documents_flags_and_their_env_vars() {
    let out = coordinator().arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for needle in [
        "--listen",
        "VENOM_LISTEN",
        "--data-dir",
        "VENOM_DATA_DIR",
        "--peers",
        "VENOM_PEERS",
    ] {
        assert!(help.contains(needle), "--help lacks {needle}:\n{help}");
    }
}

#[test]
fn malformed_peers_fail_with_one_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = coordinator()
        .args(["--listen", "127.0.0.1:0", "--peers", "two=127.0.0.1:1"])
        .arg("--data-dir")
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--peers"), "{err}");
}

#[test]
fn unusable_listen_address_is_rejected() {
    let out = coordinator()
        .args(["--listen", "not-an-address"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--listen"));
}
