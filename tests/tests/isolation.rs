//! Task isolation with the real binaries: a coordinator and a worker started with a secret in
//! its environment, waves whose tasks try to reach that secret and each other's files.
//!
//! - With `--run-as-uids` (the test process is root): a task of wave B sees neither the
//!   worker's secret in its environment nor the worker's `/proc/<pid>/environ`, and can neither
//!   list wave A's kept directory nor read the file A left there; it runs as the uid its wave
//!   maps to, with no supplementary groups.
//! - As any user, `--run-as-uids` is refused at start, with an error naming the flag, by a
//!   worker that is not root (run as `nobody` when the test is root).
//! - Without it, the environment allow-list alone keeps the secret out of a task's `env`, but
//!   not out of the worker's `/proc/<pid>/environ`, which a task of the worker's uid reads:
//!   the gap `--run-as`/`--run-as-uids` close.

#![allow(clippy::unwrap_used)]

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use venom_proto::v1 as pb;
use venom_tests::*;

const WAIT: Duration = Duration::from_secs(60);
/// The range the worker under test gets; nothing on a test machine uses it.
const RANGE: &str = "1900200000-1900200999";
const RANGE_FIRST: u64 = 1_900_200_000;
const RANGE_SIZE: u64 = 1000;

#[allow(unsafe_code)]
fn effective_uid() -> u32 {
    // SAFETY: geteuid(2) takes nothing, touches no memory and cannot fail.
    unsafe { libc::geteuid() }
}

fn is_root() -> bool {
    effective_uid() == 0
}

/// A secret no other test or process uses.
fn unique_secret(label: &str) -> String {
    let now_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{label}-{}-{now_ns}", std::process::id())
}

/// One finished micro-task: its exit code and output.
#[derive(Debug)]
struct Ran {
    exit_code: Option<i32>,
    stdout: String,
    stderr: String,
}

/// The exit code and logs of every (non-array) task of a finished wave, by task id.
async fn ran(url: &str, wave_id: u64) -> std::collections::BTreeMap<String, Ran> {
    let tasks = list_tasks(url, wave_id).await.expect("ListTasks answers");
    let mut c = client(url).await.unwrap();
    let mut ran = std::collections::BTreeMap::new();
    for task in tasks {
        let logs = c
            .get_logs(pb::GetLogsRequest {
                wave_id,
                task_id: task.task_id.clone(),
                index: None,
            })
            .await
            .unwrap()
            .into_inner();
        ran.insert(
            task.task_id.clone(),
            Ran {
                exit_code: task.exit_code,
                stdout: String::from_utf8_lossy(&logs.stdout).into_owned(),
                stderr: String::from_utf8_lossy(&logs.stderr).into_owned(),
            },
        );
    }
    ran
}

/// A test directory whose path other uids may pass through (not list), as `--run-as-uids`
/// needs of `--work-dir`'s parents.
fn passable_test_dir(name: &str) -> TestDir {
    let dir = test_dir(name).unwrap();
    std::fs::set_permissions(&dir.path, std::fs::Permissions::from_mode(0o711)).unwrap();
    dir
}

fn owner_group_mode(path: &Path) -> (u32, u32, u32) {
    let metadata = std::fs::symlink_metadata(path).unwrap();
    (metadata.uid(), metadata.gid(), metadata.mode() & 0o7777)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_as_uids_keeps_a_wave_from_another_waves_files_and_the_worker_environment() {
    if !is_root() {
        // Not root: the flag is refused at start (checked as such below for root too).
        let refusal = refusal_of_a_worker_not_root(None);
        eprintln!("not root: refused with {refusal:?}");
        return;
    }
    let started = Instant::now();
    let dir = passable_test_dir("run_as_uids");
    let work_dir = dir.path.join("work");
    let coordinator = Coordinator::start(&dir.path.join("coordinator"), &[]).unwrap();
    let url = coordinator.url();
    let secret = unique_secret("venom-test-secret");
    let worker = start_worker_with_env(
        &url,
        "iso-uids",
        2,
        &[
            "--run-as-uids",
            RANGE,
            "--work-dir",
            work_dir.to_str().unwrap(),
        ],
        &[("VENOM_TEST_SECRET".to_owned(), secret.clone())],
    )
    .unwrap();
    let worker_pid = worker.child.id();
    let mut c = wait_ready(&url, 1).await.unwrap();

    // Wave A leaves a file in its directory and fails, so that the directory is kept.
    let wave_a = submit(
        &mut c,
        r#"
name = "iso-a"
[[task]]
id = "keep"
retries = 0
run = 'echo a-private > "$VENOM_WORKDIR/private"; echo "$VENOM_WORKDIR"; id -u; exit 1'
"#,
    )
    .await
    .unwrap();
    wait_wave(&url, wave_a, WAIT).await.unwrap();
    let a = ran(&url, wave_a).await;
    let keep = &a["keep"];
    assert_eq!(keep.exit_code, Some(1), "{keep:?}");
    let mut lines = keep.stdout.lines();
    let a_dir = PathBuf::from(lines.next().expect("wave A printed its directory"));
    let uid_a = RANGE_FIRST + wave_a % RANGE_SIZE;
    assert_eq!(lines.next(), Some(uid_a.to_string().as_str()), "{keep:?}");
    // Kept, the wave's uid's, closed to everyone else; its wave directory passable only for
    // the wave's group.
    let uid_a = u32::try_from(uid_a).unwrap();
    assert_eq!(owner_group_mode(&a_dir), (uid_a, uid_a, 0o700));
    assert_eq!(owner_group_mode(&a_dir.join("private")).0, uid_a);
    let a_wave_dir = a_dir.parent().unwrap();
    assert_eq!(owner_group_mode(a_wave_dir), (0, uid_a, 0o710));

    // Wave B tries to reach the worker's secret and wave A's files.
    let a_dir_text = a_dir.display().to_string();
    let spec_b = format!(
        r#"
name = "iso-b"
[defaults]
retries = 0
[[task]]
id = "env"
run = 'env'
[[task]]
id = "environ"
env = {{ WORKER_PID = "{worker_pid}" }}
run = 'echo "ppid=$PPID"; cat /proc/$WORKER_PID/environ'
[[task]]
id = "list"
run = {list}
[[task]]
id = "read"
run = {read}
[[task]]
id = "whoami"
run = 'id -u; id -g; id -G; echo "$HOME|$USER|$LOGNAME|$SHELL|$VENOM_WORKDIR"'
"#,
        list = toml_str(&format!("ls '{a_dir_text}'")),
        read = toml_str(&format!("cat '{a_dir_text}/private'")),
    );
    let wave_b = submit(&mut c, &spec_b).await.unwrap();
    wait_wave(&url, wave_b, WAIT).await.unwrap();
    let b = ran(&url, wave_b).await;
    let uid_b = RANGE_FIRST + wave_b % RANGE_SIZE;
    assert_ne!(uid_a, u32::try_from(uid_b).unwrap(), "consecutive waves");
    let observed = |task: &str| {
        let ran = &b[task];
        eprintln!(
            "wave {wave_b} task {task}: exit {:?}, stdout {:?}, stderr {:?}",
            ran.exit_code, ran.stdout, ran.stderr
        );
        ran
    };

    let env = observed("env");
    assert_eq!(env.exit_code, Some(0));
    assert!(!env.stdout.contains(&secret), "the secret leaked: {env:?}");
    assert!(!env.stdout.contains("VENOM_TEST_SECRET"), "{env:?}");
    let user_line = format!("USER=venom-{uid_b}");
    assert!(env.stdout.lines().any(|line| line == user_line), "{env:?}");

    let environ = observed("environ");
    assert_eq!(
        environ.stdout.trim(),
        format!("ppid={worker_pid}"),
        "a task's parent is the worker (std forks when a uid is set)"
    );
    assert_ne!(environ.exit_code, Some(0), "{environ:?}");
    assert!(
        environ
            .stderr
            .contains(&format!("/proc/{worker_pid}/environ: Permission denied")),
        "{environ:?}"
    );
    assert!(!environ.stdout.contains(&secret) && !environ.stderr.contains(&secret));

    let list = observed("list");
    assert_ne!(list.exit_code, Some(0), "{list:?}");
    assert!(list.stdout.is_empty(), "{list:?}");
    assert!(list.stderr.contains("Permission denied"), "{list:?}");

    let read = observed("read");
    assert_ne!(read.exit_code, Some(0), "{read:?}");
    assert!(!read.stdout.contains("a-private"), "{read:?}");
    assert!(read.stderr.contains("Permission denied"), "{read:?}");

    let whoami = observed("whoami");
    assert_eq!(whoami.exit_code, Some(0), "{whoami:?}");
    let lines: Vec<&str> = whoami.stdout.lines().collect();
    let uid_b_text = uid_b.to_string();
    assert_eq!(
        lines[..3],
        [uid_b_text.as_str(); 3],
        "uid, gid, groups: {whoami:?}"
    );
    let fields: Vec<&str> = lines[3].split('|').collect();
    assert_eq!(
        fields[1..4],
        [
            format!("venom-{uid_b}").as_str(),
            format!("venom-{uid_b}").as_str(),
            "/bin/sh"
        ],
        "{whoami:?}"
    );
    assert_eq!(fields[0], fields[4], "HOME is the attempt's directory");
    assert!(
        fields[4].contains(&format!("/w{wave_b}/whoami.a")),
        "{whoami:?}"
    );
    eprintln!(
        "wave A {wave_a} ran as {uid_a}, wave B {wave_b} as {uid_b}; {:.1} s",
        started.elapsed().as_secs_f64()
    );
    drop(worker);
}

/// Runs `venom-worker --run-as-uids` as a user that is not root (`nobody`, when the test is
/// root: a copy of the binary in a directory it can reach) and returns what it printed
/// after asserting that it refused at start, naming the flag. `as_uid` is `None` when the
/// test itself is not root.
fn refusal_of_a_worker_not_root(as_uid: Option<u32>) -> String {
    let dir = passable_test_dir("run_as_uids_refused");
    let binary = match as_uid {
        None => bin_path("venom-worker"),
        Some(_) => {
            let copy = dir.path.join("venom-worker");
            std::fs::copy(bin_path("venom-worker"), &copy).unwrap();
            std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).unwrap();
            copy
        }
    };
    let mut command = Command::new(&binary);
    command
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("RUST_LOG", "warn")
        .args(["--coordinator", "http://127.0.0.1:1", "--name", "refused"])
        .args(["--run-as-uids", RANGE, "--work-dir"])
        .arg(dir.path.join("work"))
        .current_dir(&dir.path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(uid) = as_uid {
        std::os::unix::process::CommandExt::uid(&mut command, uid);
        std::os::unix::process::CommandExt::gid(&mut command, uid);
    }
    let mut child = command.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("a worker that is not root ran with --run-as-uids instead of refusing");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(!output.status.success(), "{stderr}");
    let uid = as_uid.unwrap_or_else(effective_uid);
    assert!(
        stderr.contains(&format!(
            "--run-as-uids {RANGE}: the worker must run as root to run each wave's tasks as a \
             uid of its own (it runs as uid {uid}); start it as root, or leave --run-as-uids out"
        )),
        "{stderr}"
    );
    assert!(
        !dir.path.join("work").exists(),
        "refused before making anything"
    );
    stderr
}

#[test]
fn a_worker_that_is_not_root_refuses_run_as_uids() {
    let as_uid = is_root().then_some(65534);
    let refusal = refusal_of_a_worker_not_root(as_uid);
    eprintln!("refused as uid {as_uid:?}: {}", refusal.trim());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_allow_list_alone_keeps_the_secret_out_of_env_but_not_out_of_proc() {
    let dir = test_dir("allow_list").unwrap();
    let coordinator = Coordinator::start(&dir.path.join("coordinator"), &[]).unwrap();
    let url = coordinator.url();
    let secret = unique_secret("venom-test-secret");
    let work_dir = dir.path.join("work");
    let worker = start_worker_with_env(
        &url,
        "iso-plain",
        1,
        &["--work-dir", work_dir.to_str().unwrap()],
        &[("VENOM_TEST_SECRET".to_owned(), secret.clone())],
    )
    .unwrap();
    let worker_pid = worker.child.id();
    let mut c = wait_ready(&url, 1).await.unwrap();
    let spec = format!(
        r#"
name = "plain"
[defaults]
retries = 0
[[task]]
id = "env"
run = 'env'
[[task]]
id = "environ"
env = {{ WORKER_PID = "{worker_pid}" }}
run = 'tr "\0" "\n" < /proc/$WORKER_PID/environ | grep -c "^VENOM_TEST_SECRET="'
"#
    );
    let wave = submit(&mut c, &spec).await.unwrap();
    wait_wave(&url, wave, WAIT).await.unwrap();
    let ran = ran(&url, wave).await;
    let env = &ran["env"];
    eprintln!("env: exit {:?}, {} bytes", env.exit_code, env.stdout.len());
    assert_eq!(env.exit_code, Some(0), "{env:?}");
    assert!(env.stdout.contains("VENOM_WORKDIR="), "{env:?}");
    assert!(!env.stdout.contains(&secret), "the secret leaked: {env:?}");
    assert!(!env.stdout.contains("VENOM_TEST_SECRET"), "{env:?}");
    assert!(!env.stdout.contains("VENOM_TLS_"), "{env:?}");
    // As the worker's own uid, the task reads the worker's whole environment from /proc:
    // what --run-as and --run-as-uids are for.
    let environ = &ran["environ"];
    eprintln!("environ as the worker's uid: {environ:?}");
    assert_eq!(environ.exit_code, Some(0), "{environ:?}");
    assert_eq!(environ.stdout.trim(), "1", "{environ:?}");
    drop(worker);
}
