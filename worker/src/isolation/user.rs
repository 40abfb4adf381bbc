//! Who tasks run as ([`TaskUsers`]): the worker's own user, `--run-as USER` (its passwd
//! entry, read with `getpwnam_r`), or a uid per wave (`--run-as-uids`, [`super::uids`]); and
//! who the worker itself runs as.
//!
//! Tasks get their uid and gid through std's `CommandExt::uid`/`gid`. What std does with them,
//! and so what a task really gets: setting either makes std leave the `posix_spawn` path for
//! fork + exec (posix_spawn cannot change ids; the task's parent is still the worker), and in
//! the child it calls `setgroups(0, NULL)` before `setgid` and `setuid`, because no explicit
//! group list was given (`Command::groups` is unstable). A task therefore runs with that uid
//! and gid and **no supplementary groups** — with `--run-as`, not the groups `/etc/group`
//! lists for the user; a task that needs a group's files must own them through its primary
//! group. (The executor's tests check it: `id -G` prints the one gid.)

use std::ffi::{CStr, CString, OsString};
use std::os::unix::ffi::OsStringExt;

use super::uids::UidRange;

/// Largest passwd buffer tried (`getpwnam_r` answers `ERANGE` while the buffer is too small).
const MAX_PASSWD_BUFFER_BYTES: usize = 1 << 20;

/// The user tasks run as (`--run-as`), from its passwd entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunAs {
    /// The name given to `--run-as`; the tasks' `USER` and `LOGNAME`.
    pub name: String,
    pub uid: u32,
    /// The primary group: the tasks' only group (see the module docs).
    pub gid: u32,
    /// `pw_dir`: the tasks' `HOME`.
    pub home: OsString,
    /// `pw_shell`: the tasks' `SHELL` (`/bin/sh` when empty).
    pub shell: OsString,
}

/// Who the tasks of this worker run as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskUsers {
    /// The worker's own user (neither `--run-as` nor `--run-as-uids`).
    Worker,
    /// `--run-as USER`: every task as USER.
    User(RunAs),
    /// `--run-as-uids`: each wave's tasks as a uid (and gid) of the wave's own.
    PerWave(UidRange),
}

/// The uid and gid an attempt's process gets when it does not run as the worker's user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TaskIds {
    pub uid: u32,
    pub gid: u32,
}

impl TaskUsers {
    /// The ids the attempts of `wave_id` run as; `None` for the worker's own.
    pub fn ids_for_wave(&self, wave_id: u64) -> Option<TaskIds> {
        match self {
            TaskUsers::Worker => None,
            TaskUsers::User(user) => Some(TaskIds {
                uid: user.uid,
                gid: user.gid,
            }),
            TaskUsers::PerWave(range) => {
                let (uid, gid) = range.ids_for_wave(wave_id);
                Some(TaskIds { uid, gid })
            }
        }
    }

    /// `--run-as`'s user, if that is who tasks run as.
    pub fn run_as(&self) -> Option<&RunAs> {
        match self {
            TaskUsers::User(user) => Some(user),
            TaskUsers::Worker | TaskUsers::PerWave(_) => None,
        }
    }
}

impl std::fmt::Display for TaskUsers {
    /// For the start-up log line and error messages.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TaskUsers::Worker => f.write_str("the worker's user"),
            TaskUsers::User(user) => write!(f, "user {} (--run-as)", user.name),
            TaskUsers::PerWave(range) => write!(f, "uids {range}, one per wave (--run-as-uids)"),
        }
    }
}

/// The passwd entry of `name`; `None` when there is no such user.
pub fn lookup_user(name: &str) -> std::io::Result<Option<RunAs>> {
    let c_name = CString::new(name).map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "a user name cannot contain NUL",
        )
    })?;
    let mut buffer_bytes = 1024;
    loop {
        match getpwnam(&c_name, buffer_bytes) {
            Err(error)
                if error.raw_os_error() == Some(libc::ERANGE)
                    && buffer_bytes < MAX_PASSWD_BUFFER_BYTES =>
            {
                buffer_bytes *= 2;
            }
            Err(error) => return Err(error),
            Ok(entry) => {
                return Ok(entry.map(|(uid, gid, home, shell)| RunAs {
                    name: name.to_owned(),
                    uid,
                    gid,
                    home,
                    shell,
                }))
            }
        }
    }
}

/// `getpwnam_r(name)` with a buffer of `buffer_bytes`: `(uid, gid, home, shell)`, `None` when
/// there is no such user, `ERANGE` when the buffer is too small.
#[allow(unsafe_code)]
fn getpwnam(
    name: &CStr,
    buffer_bytes: usize,
) -> std::io::Result<Option<(u32, u32, OsString, OsString)>> {
    let mut buffer: Vec<libc::c_char> = vec![0; buffer_bytes];
    // SAFETY: `passwd` is a plain C struct of integers and pointers, for which all zeros is a
    // valid value (null pointers); getpwnam_r overwrites it before we read it.
    let mut entry: libc::passwd = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the whole call: `name` is NUL-terminated, `entry` and
    // `found` are live locals, and `buffer` is a live allocation of `buffer.len()` bytes that
    // getpwnam_r fills and points `entry`'s strings into.
    let rc = unsafe {
        libc::getpwnam_r(
            name.as_ptr(),
            &mut entry,
            buffer.as_mut_ptr(),
            buffer.len(),
            &mut found,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::from_raw_os_error(rc));
    }
    if found.is_null() {
        return Ok(None);
    }
    let c_string = |pointer: *const libc::c_char| {
        if pointer.is_null() {
            return OsString::new();
        }
        // SAFETY: on success getpwnam_r points `entry`'s strings at NUL-terminated strings
        // inside `buffer`, which is still alive and not written to until it is dropped.
        OsString::from_vec(unsafe { CStr::from_ptr(pointer) }.to_bytes().to_vec())
    };
    Ok(Some((
        entry.pw_uid,
        entry.pw_gid,
        c_string(entry.pw_dir),
        c_string(entry.pw_shell),
    )))
}

/// The worker's effective uid.
#[allow(unsafe_code)]
pub fn effective_uid() -> u32 {
    // SAFETY: geteuid(2) takes nothing, touches no memory and cannot fail.
    unsafe { libc::geteuid() }
}

/// The worker's effective gid.
#[allow(unsafe_code)]
pub fn effective_gid() -> u32 {
    // SAFETY: getegid(2) takes nothing, touches no memory and cannot fail.
    unsafe { libc::getegid() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_is_found_and_a_missing_user_is_none() {
        let root = lookup_user("root")
            .expect("the lookup works")
            .expect("every Linux system has root");
        assert_eq!((root.uid, root.gid), (0, 0));
        assert!(!root.home.is_empty());
        assert_eq!(root.name, "root");

        assert_eq!(
            lookup_user("venom-no-such-user-7f3a").expect("the lookup works"),
            None
        );
        assert!(lookup_user("bad\0name").is_err());
    }

    #[test]
    fn the_effective_ids_match_what_proc_says() {
        let status = std::fs::read_to_string("/proc/self/status").expect("procfs");
        let ids = |field: &str| -> Vec<u32> {
            status
                .lines()
                .find_map(|line| line.strip_prefix(field))
                .expect("the field is there")
                .split_whitespace()
                .map(|id| id.parse().expect("a number"))
                .collect()
        };
        // Real, effective, saved, file system.
        assert_eq!(ids("Uid:")[1], effective_uid());
        assert_eq!(ids("Gid:")[1], effective_gid());
    }
}
