//! The environment a task starts with: never the worker's own, which may hold keys, tokens and
//! the paths of its TLS material, but an allow-list of harmless variables read from it
//! ([`TASK_ENV_ALLOW_LIST`]), then, with `--run-as-uids`, the attempt's identity
//! ([`per_wave_identity_env`]), then the wave's `env`, then the `VENOM_*` variables (added by
//! the executor). The allow-list is computed once, when the worker starts, from the
//! environment it was given: [`task_base_env`] takes that environment as a parameter, so it
//! is tested without touching the test process's own.
//!
//! Because the task's `PATH` is set explicitly, a bare program name (`cmd = ["python3", …]`)
//! is looked up here, in the task's `PATH` ([`resolve_program`]): std only uses the fast
//! `posix_spawn` path when the program is a path or `PATH` is left alone.

use std::ffi::{OsStr, OsString};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::user::TaskUsers;

/// The variables a task inherits from the worker's environment, when the worker has them;
/// nothing else of the worker's environment reaches a task. `PATH` is always set
/// ([`DEFAULT_TASK_PATH`] when the worker has none). With `--run-as`, the variables of
/// [`RUN_AS_ENV_FROM_PASSWD`] come from that user's passwd entry instead; with
/// `--run-as-uids`, from [`per_wave_identity_env`].
pub const TASK_ENV_ALLOW_LIST: [&str; 11] = [
    "PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TERM", "USER", "LOGNAME", "SHELL",
    "TMPDIR",
];

/// A task's `PATH` when the worker has none.
pub const DEFAULT_TASK_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// With `--run-as USER`, these describe USER (from its passwd entry), not the worker's user;
/// with `--run-as-uids`, the attempt's uid ([`per_wave_identity_env`]).
pub const RUN_AS_ENV_FROM_PASSWD: [&str; 4] = ["HOME", "USER", "LOGNAME", "SHELL"];

/// The environment every task of this worker starts from: the variables of
/// [`TASK_ENV_ALLOW_LIST`] found in `parent` (the worker's environment), in that order, with
/// `PATH` defaulted and, for `--run-as`, `HOME`, `USER`, `LOGNAME` and `SHELL` taken from the
/// user's passwd entry (an empty `pw_shell` means `/bin/sh`, as login(1) reads it). For
/// `--run-as-uids` those four are left out: each attempt gets its own
/// ([`per_wave_identity_env`]).
pub fn task_base_env(
    parent: impl IntoIterator<Item = (OsString, OsString)>,
    users: &TaskUsers,
) -> Vec<(OsString, OsString)> {
    let parent: Vec<(OsString, OsString)> = parent.into_iter().collect();
    let from_parent = |name: &str| {
        parent
            .iter()
            .rev() // the last of duplicates wins, as getenv's callers usually see it
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.clone())
    };
    let from_user = |name: &str| -> Option<OsString> {
        let user = users.run_as()?;
        Some(match name {
            "HOME" => user.home.clone(),
            "USER" | "LOGNAME" => OsString::from(&user.name),
            "SHELL" if user.shell.is_empty() => OsString::from("/bin/sh"),
            "SHELL" => user.shell.clone(),
            _ => return None,
        })
    };
    TASK_ENV_ALLOW_LIST
        .iter()
        .filter_map(|&name| {
            let value = if *users != TaskUsers::Worker && RUN_AS_ENV_FROM_PASSWD.contains(&name) {
                from_user(name)
            } else {
                from_parent(name)
            };
            let value = match (name, value) {
                ("PATH", None) => Some(OsString::from(DEFAULT_TASK_PATH)),
                (_, value) => value,
            };
            value.map(|value| (OsString::from(name), value))
        })
        .collect()
}

/// With `--run-as-uids`, who an attempt running as `uid` in `workdir` is, as the variables of
/// [`RUN_AS_ENV_FROM_PASSWD`] say it (the uid has no passwd entry): `HOME` is the attempt's
/// working directory (the one place it may write to), `USER` and `LOGNAME` are `venom-<uid>`,
/// `SHELL` is `/bin/sh`. They come before the wave's `env`, which may override them.
pub fn per_wave_identity_env(uid: u32, workdir: &Path) -> [(&'static str, OsString); 4] {
    let name = OsString::from(format!("venom-{uid}"));
    [
        ("HOME", workdir.as_os_str().to_owned()),
        ("USER", name.clone()),
        ("LOGNAME", name),
        ("SHELL", OsString::from("/bin/sh")),
    ]
}

/// Where `program` is, looked up the way `execvp` does in `path` (the task's `PATH`; an empty
/// entry, or a relative one, is relative to `cwd`, the task's working directory): the first
/// regular file with an execute bit. A program naming a path (with a `/`) is returned as is.
/// `None` when no entry has it.
pub fn resolve_program(program: &str, path: &OsStr, cwd: &Path) -> Option<PathBuf> {
    if program.contains('/') {
        return Some(PathBuf::from(program));
    }
    if program.is_empty() {
        return None;
    }
    std::env::split_paths(path).find_map(|dir| {
        let dir = if dir.is_absolute() {
            dir
        } else {
            cwd.join(dir)
        };
        let candidate = dir.join(program);
        let metadata = std::fs::metadata(&candidate).ok()?;
        (metadata.is_file() && metadata.permissions().mode() & 0o111 != 0).then_some(candidate)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::isolation::user::RunAs;

    fn os_pairs(pairs: &[(&str, &str)]) -> Vec<(OsString, OsString)> {
        pairs
            .iter()
            .map(|(key, value)| (OsString::from(key), OsString::from(value)))
            .collect()
    }

    #[test]
    fn only_the_allow_list_passes_in_its_order() {
        let parent = os_pairs(&[
            ("VENOM_TEST_SECRET", "hunter2"),
            ("AWS_SECRET_ACCESS_KEY", "key"),
            ("VENOM_TLS_KEY", "/etc/venom/worker.key"),
            ("TZ", "UTC"),
            ("HOME", "/root"),
            ("LD_PRELOAD", "/tmp/evil.so"),
            ("PATH", "/opt/bin:/usr/bin"),
            ("LANG", "C.UTF-8"),
        ]);
        assert_eq!(
            task_base_env(parent, &TaskUsers::Worker),
            os_pairs(&[
                ("PATH", "/opt/bin:/usr/bin"),
                ("HOME", "/root"),
                ("LANG", "C.UTF-8"),
                ("TZ", "UTC"),
            ])
        );
    }

    #[test]
    fn path_defaults_when_the_worker_has_none() {
        assert_eq!(
            task_base_env(os_pairs(&[("SECRET", "x")]), &TaskUsers::Worker),
            os_pairs(&[("PATH", DEFAULT_TASK_PATH)])
        );
        // An empty PATH is the worker's choice, kept as it is.
        assert_eq!(
            task_base_env(os_pairs(&[("PATH", "")]), &TaskUsers::Worker),
            os_pairs(&[("PATH", "")])
        );
    }

    #[test]
    fn run_as_takes_the_identity_variables_from_the_passwd_entry_and_run_as_uids_per_attempt() {
        let user = RunAs {
            name: "builder".to_owned(),
            uid: 1234,
            gid: 1234,
            home: OsString::from("/home/builder"),
            shell: OsString::new(),
        };
        let parent = os_pairs(&[
            ("HOME", "/root"),
            ("USER", "root"),
            ("LOGNAME", "root"),
            ("SHELL", "/bin/zsh"),
            ("TERM", "xterm"),
            ("TMPDIR", "/var/tmp"),
        ]);
        assert_eq!(
            task_base_env(parent.clone(), &TaskUsers::User(user)),
            os_pairs(&[
                ("PATH", DEFAULT_TASK_PATH),
                ("HOME", "/home/builder"),
                ("TERM", "xterm"),
                ("USER", "builder"),
                ("LOGNAME", "builder"),
                ("SHELL", "/bin/sh"),
                ("TMPDIR", "/var/tmp"),
            ])
        );

        // With a uid per wave, the four are the attempt's, not the worker's.
        let per_wave = TaskUsers::PerWave("200000-200999".parse().expect("a range"));
        assert_eq!(
            task_base_env(parent, &per_wave),
            os_pairs(&[
                ("PATH", DEFAULT_TASK_PATH),
                ("TERM", "xterm"),
                ("TMPDIR", "/var/tmp"),
            ])
        );
        let identity: Vec<(String, String)> =
            per_wave_identity_env(200_007, Path::new("/w/worker-0/w7/t.a1"))
                .into_iter()
                .map(|(key, value)| (key.to_owned(), value.to_string_lossy().into_owned()))
                .collect();
        assert_eq!(
            identity,
            [
                ("HOME", "/w/worker-0/w7/t.a1"),
                ("USER", "venom-200007"),
                ("LOGNAME", "venom-200007"),
                ("SHELL", "/bin/sh"),
            ]
            .map(|(key, value)| (key.to_owned(), value.to_owned()))
        );
    }

    #[test]
    fn programs_are_found_in_the_task_path_like_execvp() {
        let dir = tempfile::tempdir().expect("temp dir");
        let bin = dir.path().join("bin");
        std::fs::create_dir(&bin).expect("bin");
        let tool = bin.join("tool");
        std::fs::write(&tool, "#!/bin/sh\n").expect("tool");
        let not_executable = bin.join("data");
        std::fs::write(&not_executable, "x").expect("data");
        std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        std::fs::create_dir(bin.join("subdir")).expect("subdir");

        let path =
            std::env::join_paths(["/nonexistent", bin.to_str().expect("utf-8")]).expect("joinable");
        assert_eq!(
            resolve_program("tool", &path, dir.path()),
            Some(tool.clone())
        );
        assert_eq!(resolve_program("data", &path, dir.path()), None);
        assert_eq!(resolve_program("subdir", &path, dir.path()), None);
        assert_eq!(resolve_program("missing", &path, dir.path()), None);
        assert_eq!(resolve_program("", &path, dir.path()), None);
        // A relative entry is relative to the working directory.
        assert_eq!(
            resolve_program("tool", OsStr::new("bin"), dir.path()),
            Some(dir.path().join("bin").join("tool"))
        );
        // A path is not looked up.
        assert_eq!(
            resolve_program("./x/y", &path, dir.path()),
            Some(PathBuf::from("./x/y"))
        );
    }
}
