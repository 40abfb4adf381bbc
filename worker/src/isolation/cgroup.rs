//! cgroup v2 limits for attempts, where the machine lets the worker have them (`--cgroups`).
//!
//! **What is needed.** A cgroup v2 hierarchy (found in `/proc/self/mountinfo`: the unified
//! `/sys/fs/cgroup`, or `/sys/fs/cgroup/unified` on a hybrid host), this process's group in it
//! (the `0::` line of `/proc/self/cgroup`), the `memory` and `cpu` controllers offered there
//! (`cgroup.controllers`), and the right to write in it: root, or a delegated subtree
//! (systemd's `Delegate=yes`). On a hybrid host the memory and cpu controllers belong to the
//! v1 hierarchies, so v2 cannot limit anything and attempts run without cgroups.
//!
//! **What the worker does with it.** cgroup v2 lets a group hand controllers to its children
//! only while it holds no process itself, and the worker is in its own group. So, when the
//! controllers are not already enabled for children, the worker moves itself into a leaf
//! `venom-worker` under its group and enables `+memory +cpu` there; when other processes share
//! the group that fails, the worker moves back, and cgroups are unavailable. It then makes
//! `venom-attempts-<pid>-<n>` beside it, and under that one group per attempt, named after
//! the attempt, with:
//! - `cpu.max` = the task's `cpus` × 100 ms per 100 ms (`cpus` defaults to 1 in the wave
//!   format, so every attempt has a CPU limit);
//! - `memory.max` = the task's `memory` when it has one (no limit otherwise),
//!   `memory.swap.max` = 0 (the limit covers the task's whole footprint, not just what stays
//!   in RAM) and `memory.oom.group` = 1 (an OOM kill takes the whole attempt, not one of its
//!   processes).
//!
//! **No window.** Without a `pre_exec` hook (which would cost the `posix_spawn` fast path) a
//! process cannot start inside its group: it starts in the worker's and is moved (its pid
//! written to `cgroup.procs`) once the spawn returns. On a busy machine the spawning thread can
//! wait milliseconds for a CPU in between, and a task would run — and fork children that stay
//! outside the group — meanwhile. So an attempt with a group is held at a gate
//! ([`crate::executor::CGROUP_GATE`]): its shell first waits for a line on stdin, which the
//! worker writes only after the move; an argv task goes through `sh -c` for that (one more
//! `exec`). `clone3(CLONE_INTO_CGROUP)` would do without the gate but needs a hand-written
//! spawn path.
//!
//! **The end.** When the attempt ends, `memory.events` says whether the kernel's OOM killer
//! fired (the outcome's stderr then says so), then `cgroup.kill` ends whatever is left in the
//! group (also processes that left the process group with `setsid`) and the group is
//! removed.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use venom_core::AttemptRef;

/// `--cgroups`: whether attempts run in cgroups of their own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CgroupMode {
    /// Use cgroups when the machine allows (logged at start either way).
    Auto,
    /// Never.
    Off,
    /// Refuse to start without them.
    Required,
}

impl CgroupMode {
    /// `auto`, `off` or `required`.
    pub fn as_str(self) -> &'static str {
        match self {
            CgroupMode::Auto => "auto",
            CgroupMode::Off => "off",
            CgroupMode::Required => "required",
        }
    }
}

impl std::fmt::Display for CgroupMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The controllers attempts' groups need.
pub const REQUIRED_CONTROLLERS: [&str; 2] = ["memory", "cpu"];
/// `cpu.max`'s period, microseconds.
const CPU_PERIOD_US: u64 = 100_000;
/// How long to wait for a killed group to empty before removing it.
const EMPTY_WAIT: Duration = Duration::from_millis(500);
/// How often to retry removing a group that is not empty yet.
const EMPTY_POLL: Duration = Duration::from_millis(2);

/// Names the parent groups of this process apart.
static NEXT_PARENT: AtomicU64 = AtomicU64::new(0);

/// Where the cgroup v2 hierarchy is mounted, from `/proc/self/mountinfo`: (the path inside the
/// hierarchy that is mounted, the mount point). `None` without a `cgroup2` mount.
pub fn cgroup2_mount(mountinfo: &str) -> Option<(String, PathBuf)> {
    mountinfo.lines().find_map(|line| {
        let (before, after) = line.split_once(" - ")?;
        if after.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        let mut fields = before.split_whitespace();
        let root = fields.nth(3)?;
        let mount_point = fields.next()?;
        Some((
            unescape_mountinfo(root),
            PathBuf::from(unescape_mountinfo(mount_point)),
        ))
    })
}

/// Undoes mountinfo's octal escapes (`\040` for a space, …).
fn unescape_mountinfo(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).filter(|digits| {
            bytes[i] == b'\\' && digits.iter().all(|digit| (b'0'..=b'7').contains(digit))
        });
        match octal {
            Some(digits) => {
                let value = digits
                    .iter()
                    .fold(0u32, |value, digit| value * 8 + u32::from(digit - b'0'));
                out.push(u8::try_from(value).unwrap_or(b'?'));
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// This process's group in the v2 hierarchy: the path of the `0::` line of
/// `/proc/self/cgroup`.
pub fn unified_group(proc_self_cgroup: &str) -> Option<String> {
    proc_self_cgroup
        .lines()
        .find_map(|line| line.strip_prefix("0::"))
        .map(|path| path.trim().to_owned())
}

/// The directory of group `group` when the hierarchy's `mount_root` is mounted at
/// `mount_point`; `None` when the group is outside what is mounted.
pub fn group_dir(mount_point: &Path, mount_root: &str, group: &str) -> Option<PathBuf> {
    let relative = Path::new(group).strip_prefix(mount_root).ok()?;
    Some(mount_point.join(relative))
}

/// The controllers of [`REQUIRED_CONTROLLERS`] missing from a `cgroup.controllers` (or
/// `cgroup.subtree_control`) line.
pub fn missing_controllers(listed: &str) -> Vec<&'static str> {
    let listed: Vec<&str> = listed.split_whitespace().collect();
    REQUIRED_CONTROLLERS
        .into_iter()
        .filter(|controller| !listed.contains(controller))
        .collect()
}

/// `cpu.max` for `cpus` slots (0 counts as 1).
pub fn cpu_max(cpus: u32) -> String {
    let quota_us = u64::from(cpus.max(1)) * CPU_PERIOD_US;
    format!("{quota_us} {CPU_PERIOD_US}")
}

/// How many times the OOM killer fired in a group, from its `memory.events`.
pub fn oom_kills(memory_events: &str) -> u64 {
    memory_events
        .lines()
        .find_map(|line| line.strip_prefix("oom_kill "))
        .and_then(|count| count.trim().parse().ok())
        .unwrap_or(0)
}

/// The group under which attempts' groups are made, with the controllers enabled for them.
/// Removed (when empty) when dropped.
#[derive(Debug)]
pub struct CgroupParent {
    dir: PathBuf,
    /// `memory.max` and friends are written (the memory controller is on for children).
    memory: bool,
    /// `cpu.max` is written.
    cpu: bool,
}

impl CgroupParent {
    /// Sets up attempts' cgroups under this process's own group, as the module docs say.
    /// The error says why it is impossible here.
    pub fn for_this_process() -> Result<CgroupParent, String> {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
            .map_err(|error| format!("cannot read /proc/self/mountinfo: {error}"))?;
        let (mount_root, mount_point) = cgroup2_mount(&mountinfo)
            .ok_or_else(|| "no cgroup v2 file system is mounted".to_owned())?;
        let proc_self_cgroup = std::fs::read_to_string("/proc/self/cgroup")
            .map_err(|error| format!("cannot read /proc/self/cgroup: {error}"))?;
        let group = unified_group(&proc_self_cgroup)
            .ok_or_else(|| "/proc/self/cgroup has no cgroup v2 (0::) line".to_owned())?;
        let base = group_dir(&mount_point, &mount_root, &group).ok_or_else(|| {
            format!(
                "this process's cgroup {group} is outside the mounted part ({mount_root}) of \
                 the v2 hierarchy"
            )
        })?;
        let controllers = read_trimmed(&base.join("cgroup.controllers"))
            .map_err(|error| format!("{}: {error}", base.display()))?;
        let missing = missing_controllers(&controllers);
        if !missing.is_empty() {
            let hybrid = if mount_point == Path::new("/sys/fs/cgroup") {
                ""
            } else {
                "; this host mounts cgroup v2 beside v1 (hybrid), and those controllers \
                 belong to v1"
            };
            return Err(format!(
                "{}: the cgroup v2 {} controller{} not available (cgroup.controllers: \
                 {controllers:?}){hybrid}",
                base.display(),
                missing.join(" and "),
                if missing.len() == 1 { " is" } else { "s are" },
            ));
        }
        enable_for_children(&base)?;
        let parent = CgroupParent::create(&base, true, true).map_err(|error| {
            format!(
                "cannot make a cgroup for attempts under {}: {error}",
                base.display()
            )
        })?;
        Ok(parent)
    }

    /// Makes `venom-attempts-<pid>-<n>` under `base` and enables, for its children, the
    /// controllers asked for (`base` must have them enabled for its own children).
    pub(crate) fn create(base: &Path, memory: bool, cpu: bool) -> std::io::Result<CgroupParent> {
        let dir = base.join(format!(
            "venom-attempts-{}-{}",
            std::process::id(),
            NEXT_PARENT.fetch_add(1, Ordering::Relaxed)
        ));
        if dir.exists() {
            kill_and_remove(&dir); // a leftover of a process with the same pid
        }
        std::fs::create_dir(&dir)?;
        let parent = CgroupParent { dir, memory, cpu };
        let enable: Vec<String> = [("memory", memory), ("cpu", cpu)]
            .into_iter()
            .filter(|(_, on)| *on)
            .map(|(controller, _)| format!("+{controller}"))
            .collect();
        if !enable.is_empty() {
            std::fs::write(parent.dir.join("cgroup.subtree_control"), enable.join(" "))?;
        }
        Ok(parent)
    }

    /// The group attempts' groups go in.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Makes the group of one attempt with its limits (`memory_bytes` 0 = none). The process
    /// joins it with [`AttemptCgroup::attach`].
    pub fn create_attempt(
        &self,
        attempt: AttemptRef,
        cpus: u32,
        memory_bytes: u64,
    ) -> std::io::Result<AttemptCgroup> {
        let dir = self.dir.join(format!(
            "w{}-m{}-a{}",
            attempt.wave_id, attempt.micro, attempt.attempt
        ));
        if dir.exists() {
            kill_and_remove(&dir);
        }
        std::fs::create_dir(&dir)?;
        let group = AttemptCgroup {
            dir,
            memory_bytes,
            finished: false,
        };
        if self.memory {
            let max = if memory_bytes > 0 {
                memory_bytes.to_string()
            } else {
                "max".to_owned()
            };
            std::fs::write(group.dir.join("memory.max"), max)?;
            if memory_bytes > 0 {
                write_if_present(&group.dir.join("memory.swap.max"), "0")?;
            }
            write_if_present(&group.dir.join("memory.oom.group"), "1")?;
        }
        if self.cpu {
            std::fs::write(group.dir.join("cpu.max"), cpu_max(cpus))?;
        }
        Ok(group)
    }
}

impl Drop for CgroupParent {
    fn drop(&mut self) {
        if let Err(error) = std::fs::remove_dir(&self.dir) {
            tracing::debug!(dir = %self.dir.display(), %error, "cannot remove the attempts' cgroup");
        }
    }
}

/// One attempt's group; killed and removed by [`AttemptCgroup::finish`] or when dropped.
#[derive(Debug)]
pub struct AttemptCgroup {
    dir: PathBuf,
    /// Its `memory.max` (0 = none), for the OOM message.
    memory_bytes: u64,
    finished: bool,
}

/// What an attempt's group saw.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CgroupReport {
    /// Processes the OOM killer ended in the group.
    pub oom_kills: u64,
    /// The group's `memory.max` (0 = none).
    pub memory_bytes: u64,
}

impl AttemptCgroup {
    /// The group's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Moves process `pid` into the group. A process that already exited cannot be moved
    /// (`ESRCH`), which is fine: it no longer uses anything.
    pub fn attach(&self, pid: u32) -> std::io::Result<()> {
        match std::fs::write(self.dir.join("cgroup.procs"), pid.to_string()) {
            Err(error) if error.raw_os_error() == Some(libc::ESRCH) => Ok(()),
            result => result,
        }
    }

    /// Reads whether the OOM killer fired, kills what is left and removes the group.
    pub fn finish(mut self) -> CgroupReport {
        self.finished = true;
        let oom_kills = std::fs::read_to_string(self.dir.join("memory.events"))
            .map(|events| oom_kills(&events))
            .unwrap_or(0);
        kill_and_remove(&self.dir);
        CgroupReport {
            oom_kills,
            memory_bytes: self.memory_bytes,
        }
    }
}

impl Drop for AttemptCgroup {
    fn drop(&mut self) {
        if !self.finished {
            kill_and_remove(&self.dir);
        }
    }
}

/// Enables the required controllers for `base`'s children, moving this process into a leaf
/// `venom-worker` under it when `base` must first be emptied of processes.
fn enable_for_children(base: &Path) -> Result<(), String> {
    let subtree_control = base.join("cgroup.subtree_control");
    let enabled = read_trimmed(&subtree_control)
        .map_err(|error| format!("{}: {error}", subtree_control.display()))?;
    if missing_controllers(&enabled).is_empty() {
        return Ok(());
    }
    let enable = REQUIRED_CONTROLLERS
        .map(|controller| format!("+{controller}"))
        .join(" ");
    let busy = match std::fs::write(&subtree_control, &enable) {
        Ok(()) => return Ok(()),
        Err(error) if error.raw_os_error() == Some(libc::EBUSY) => error,
        Err(error) => {
            return Err(format!(
                "cannot enable the memory and cpu controllers in {}: {error}",
                subtree_control.display()
            ))
        }
    };
    // No internal processes: the worker's own group must hold none to hand controllers down.
    let leaf = base.join("venom-worker");
    let pid = std::process::id().to_string();
    let moved = match std::fs::create_dir(&leaf) {
        Err(error) if error.kind() != std::io::ErrorKind::AlreadyExists => Err(error),
        _ => std::fs::write(leaf.join("cgroup.procs"), &pid),
    };
    if let Err(error) = moved {
        return Err(format!(
            "{} holds processes ({busy}) and the worker cannot move itself into {}: {error}",
            base.display(),
            leaf.display()
        ));
    }
    match std::fs::write(&subtree_control, &enable) {
        Ok(()) => {
            tracing::info!(
                cgroup = %leaf.display(),
                "moved the worker into a cgroup of its own, so that its parent can limit attempts"
            );
            Ok(())
        }
        Err(error) => {
            let _ = std::fs::write(base.join("cgroup.procs"), &pid);
            let _ = std::fs::remove_dir(&leaf);
            Err(format!(
                "{} holds other processes than this worker ({error}); give the worker a cgroup \
                 of its own (systemd: Delegate=yes)",
                base.display()
            ))
        }
    }
}

/// Kills every process in the group at `dir` and removes it, waiting up to [`EMPTY_WAIT`] for
/// it to empty. Logs what cannot be done.
fn kill_and_remove(dir: &Path) {
    if let Err(error) = std::fs::write(dir.join("cgroup.kill"), "1") {
        // Before Linux 5.14 there is no cgroup.kill: signal the members one by one.
        tracing::debug!(dir = %dir.display(), %error, "cgroup.kill failed; killing members one by one");
        for pid in std::fs::read_to_string(dir.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|pid| pid.trim().parse::<u32>().ok())
        {
            let _ = crate::executor::kill_process(pid);
        }
    }
    let deadline = std::time::Instant::now() + EMPTY_WAIT;
    loop {
        match std::fs::remove_dir(dir) {
            Ok(()) => return,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return,
            Err(error) if std::time::Instant::now() >= deadline => {
                tracing::warn!(dir = %dir.display(), %error, "cannot remove an attempt's cgroup");
                return;
            }
            Err(_) => std::thread::sleep(EMPTY_POLL),
        }
    }
}

/// Writes `value` to a cgroup file, unless the kernel does not have that file.
fn write_if_present(file: &Path, value: &str) -> std::io::Result<()> {
    match std::fs::write(file, value) {
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
        result => result,
    }
}

fn read_trimmed(file: &Path) -> std::io::Result<String> {
    std::fs::read_to_string(file).map(|text| text.trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This host's mountinfo lines, shortened: a hybrid layout and a unified one.
    const HYBRID_MOUNTINFO: &str = "\
35 24 0:30 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
36 35 0:31 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw,nsdelegate
38 35 0:33 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime shared:12 - cgroup cgroup rw,memory
";
    const CONTAINER_MOUNTINFO: &str = "\
612 611 0:26 /docker/abc /sys/fs/cgroup ro,nosuid,nodev,noexec,relatime - cgroup2 cgroup rw
613 611 0:27 / /mnt/with\\040space rw - ext4 /dev/sda1 rw
";

    #[test]
    fn the_v2_mount_is_found_in_mountinfo() {
        assert_eq!(
            cgroup2_mount(HYBRID_MOUNTINFO),
            Some(("/".to_owned(), PathBuf::from("/sys/fs/cgroup/unified")))
        );
        assert_eq!(
            cgroup2_mount(CONTAINER_MOUNTINFO),
            Some(("/docker/abc".to_owned(), PathBuf::from("/sys/fs/cgroup")))
        );
        assert_eq!(cgroup2_mount("1 0 0:1 / / rw - ext4 /dev/sda1 rw\n"), None);
        assert_eq!(unescape_mountinfo("/mnt/with\\040space"), "/mnt/with space");
        assert_eq!(unescape_mountinfo("trailing\\04"), "trailing\\04");
    }

    #[test]
    fn the_own_group_and_its_directory() {
        let hybrid = "9:name=systemd:/\n4:memory:/process_api/07\n0::/\n";
        assert_eq!(unified_group(hybrid).as_deref(), Some("/"));
        assert_eq!(
            unified_group("0::/system.slice/venom-worker.service\n").as_deref(),
            Some("/system.slice/venom-worker.service")
        );
        assert_eq!(unified_group("4:memory:/x\n"), None);
        assert_eq!(
            group_dir(Path::new("/sys/fs/cgroup"), "/", "/system.slice/w.service"),
            Some(PathBuf::from("/sys/fs/cgroup/system.slice/w.service"))
        );
        // A container that mounts only its own part of the hierarchy.
        assert_eq!(
            group_dir(
                Path::new("/sys/fs/cgroup"),
                "/docker/abc",
                "/docker/abc/sub"
            ),
            Some(PathBuf::from("/sys/fs/cgroup/sub"))
        );
        assert_eq!(
            group_dir(Path::new("/sys/fs/cgroup"), "/docker/abc", "/elsewhere"),
            None
        );
    }

    #[test]
    fn controllers_limits_and_events_parse() {
        assert_eq!(missing_controllers("hugetlb"), vec!["memory", "cpu"]);
        assert_eq!(
            missing_controllers("cpuset cpu io memory pids"),
            Vec::<&str>::new()
        );
        assert_eq!(missing_controllers("cpuset cpu io pids"), vec!["memory"]);
        assert_eq!(missing_controllers(""), vec!["memory", "cpu"]);
        assert_eq!(cpu_max(0), "100000 100000");
        assert_eq!(cpu_max(4), "400000 100000");
        let events = "low 0\nhigh 0\nmax 12\noom 1\noom_kill 1\noom_group_kill 1\n";
        assert_eq!(oom_kills(events), 1);
        assert_eq!(oom_kills("low 0\n"), 0);
    }

    #[test]
    fn modes_read_as_written() {
        use clap::ValueEnum;
        for mode in [CgroupMode::Auto, CgroupMode::Off, CgroupMode::Required] {
            assert_eq!(
                CgroupMode::from_str(mode.as_str(), false),
                Ok(mode),
                "{mode}"
            );
        }
    }
}
