//! End-to-end tests of the `venomctl` binary: its exit codes, its one-line errors, and
//! every cluster command against a real embedded dev cluster (`venomctl dev`), driven
//! the way a user or a script would drive it.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const VENOMCTL: &str = env!("CARGO_BIN_EXE_venomctl");
/// Longest any single command may take before the test fails instead of hanging.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);

fn venomctl() -> Command {
    let mut command = Command::new(VENOMCTL);
    // The tests name every coordinator explicitly; the caller's settings must not leak in.
    for var in [
        "VENOM_COORDINATOR",
        "VENOM_OUTPUT",
        "TRACEPARENT",
        "RUST_LOG",
        "VENOM_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ] {
        command.env_remove(var);
    }
    command.stdin(Stdio::null());
    command
}

/// Runs `command` to completion, failing the test if it takes longer than the timeout.
fn run(command: &mut Command) -> Output {
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("venomctl starts");
    let mut stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    let out_reader = std::thread::spawn(move || {
        let mut buffer = Vec::new();
        let _ = stdout.read_to_end(&mut buffer);
        buffer
    });
    let err_reader = std::thread::spawn(move || {
        let mut buffer = Vec::new();
        let _ = stderr.read_to_end(&mut buffer);
        buffer
    });
    let deadline = Instant::now() + COMMAND_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait works") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{command:?} did not finish within {COMMAND_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: out_reader.join().expect("reader thread"),
        stderr: err_reader.join().expect("reader thread"),
    }
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn write_wave(dir: &Path, name: &str, body: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, body).expect("write wave file");
    path
}

const HELLO: &str = r#"
name = "hello"

[[task]]
id = "hello"
run = 'echo "hello from $VENOM_NODE"'

[[task]]
id = "shard"
array = 3
deps = ["hello"]
cmd = ["sh", "-c", "echo shard $VENOM_TASK_INDEX; echo oops >&2"]

[[task]]
id = "goodbye"
deps = ["shard"]
run = "echo goodbye"
"#;

const FAILING: &str = r#"
name = "doomed"

[[task]]
id = "boom"
run = "exit 3"

[[task]]
id = "after"
deps = ["boom"]
run = "echo never"
"#;

#[test]
fn validate_reports_ok_and_names_the_field_on_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let good = write_wave(dir.path(), "hello.toml", HELLO);
    let out = run(venomctl().arg("validate").arg(&good));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout).trim(),
        "ok: hello, 3 tasks, 5 micro-tasks"
    );

    let bad = write_wave(
        dir.path(),
        "bad.toml",
        "name = \"x\"\n[[task]]\nid = \"a\"\nrun = \"true\"\ndeps = [\"missing\"]\n",
    );
    let out = run(venomctl().arg("validate").arg(&bad));
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    assert!(stderr.starts_with("error: "), "{stderr}");
    assert!(stderr.contains("task `a`, field `deps`"), "{stderr}");

    let out = run(venomctl().args(["--output", "json", "validate"]).arg(&bad));
    assert_eq!(out.status.code(), Some(1));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON document");
    assert_eq!(report["ok"], false);
    assert_eq!(report["error"]["field"], "deps");
}

#[test]
fn unreachable_coordinators_are_named_in_one_line() {
    // Ports bound then released: nothing listens there.
    let ports: Vec<u16> = (0..2)
        .map(|_| {
            std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("free port")
                .port()
        })
        .collect();
    let urls = format!("127.0.0.1:{},http://127.0.0.1:{}", ports[0], ports[1]);
    let out = run(venomctl().args(["--coordinator", &urls, "waves"]));
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    assert!(
        stderr.starts_with("error: cannot reach a coordinator; tried"),
        "{stderr}"
    );
    for port in ports {
        assert!(
            stderr.contains(&format!("http://127.0.0.1:{port}")),
            "{stderr}"
        );
    }
    // Bad input never reaches the network and is a usage error.
    let out = run(venomctl().args(["--coordinator", &urls, "logs", "1", "shard[x]"]));
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn completions_are_generated() {
    let out = run(venomctl().args(["completions", "bash"]));
    assert!(out.status.success());
    let script = text(&out.stdout);
    assert!(
        script.contains("venomctl") && script.contains("benchmark"),
        "{script}"
    );
}

#[test]
fn dev_runs_a_wave_and_exits_with_its_outcome() {
    let dir = tempfile::tempdir().expect("tempdir");
    let hello = write_wave(dir.path(), "hello.toml", HELLO);
    let out = run(venomctl()
        .args(["dev", "--listen", "127.0.0.1:0", "--slots", "2"])
        .arg(&hello));
    let stdout = text(&out.stdout);
    assert!(
        out.status.success(),
        "stdout:\n{stdout}\nstderr:\n{}",
        text(&out.stderr)
    );
    assert!(stdout.contains("\"hello\": succeeded"), "{stdout}");
    assert!(
        stdout.contains("5 (5 succeeded, 0 failed, 0 skipped, 0 cancelled)"),
        "{stdout}"
    );
    for label in [
        "measured speed-up (Σ run time / makespan)",
        "DAG bound (work / span)",
        "model S_Total (Möbius)",
    ] {
        assert!(stdout.contains(label), "missing `{label}` in {stdout}");
    }

    let failing = write_wave(dir.path(), "doomed.toml", FAILING);
    let out = run(venomctl()
        .args(["--output", "json", "dev", "--listen", "127.0.0.1:0"])
        .arg(&failing));
    assert_eq!(out.status.code(), Some(1), "stderr:\n{}", text(&out.stderr));
    let summary: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("one JSON document");
    assert_eq!(summary["state"], "failed");
    assert_eq!(summary["counts"]["failed"], 1);
    assert_eq!(summary["counts"]["skipped"], 1);
}

/// A `venomctl dev` process without a wave, stopped with SIGTERM when dropped.
struct DevProcess {
    child: Child,
    url: String,
}

impl DevProcess {
    fn start(data_dir: &Path) -> DevProcess {
        let mut child = venomctl()
            .args([
                "--output",
                "json",
                "dev",
                "--listen",
                "127.0.0.1:0",
                "--slots",
                "2",
            ])
            .arg("--data-dir")
            .arg(data_dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("venomctl dev starts");
        let stdout = child.stdout.take().expect("piped");
        // The banner is one pretty JSON document; it ends with a line holding only `}`.
        let (sender, receiver) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut document = String::new();
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                document.push_str(&line);
                document.push('\n');
                if line == "}" {
                    let _ = sender.send(document.clone());
                }
            }
        });
        let banner = match receiver.recv_timeout(Duration::from_secs(60)) {
            Ok(banner) => banner,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("venomctl dev printed no banner within 60 s");
            }
        };
        let banner: serde_json::Value = serde_json::from_str(&banner).expect("banner is JSON");
        let url = banner["coordinator"]
            .as_str()
            .expect("coordinator URL")
            .to_owned();
        assert_eq!(banner["worker"], "dev");
        DevProcess { child, url }
    }

    fn command(&self) -> Command {
        let mut command = venomctl();
        command.args(["--coordinator", &self.url]);
        command
    }

    fn json(&self, args: &[&str]) -> serde_json::Value {
        let out = run(self.command().args(["--output", "json"]).args(args));
        assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap_or_else(|err| {
            panic!(
                "{args:?}: not one JSON document ({err}): {}",
                text(&out.stdout)
            )
        })
    }

    /// Sends SIGTERM and returns the exit code.
    fn stop(mut self) -> Option<i32> {
        assert!(send_sigterm(self.child.id()), "SIGTERM delivered");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait works") {
                return status.code();
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("venomctl dev did not stop within 30 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// SIGTERM through the `kill` utility (the workspace denies `unsafe`, which a direct
/// `libc::kill` would need).
fn send_sigterm(pid: u32) -> bool {
    Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .is_ok_and(|status| status.success())
}

impl Drop for DevProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

#[test]
fn every_cluster_command_works_against_a_dev_cluster() {
    let dir = tempfile::tempdir().expect("tempdir");
    let dev = DevProcess::start(&dir.path().join("data"));
    let hello = write_wave(dir.path(), "hello.toml", HELLO);

    // Nodes: the dev worker, ready, with its slots.
    let nodes = dev.json(&["nodes"]);
    let node = &nodes[0];
    assert_eq!(node["name"], "dev");
    assert_eq!(node["state"], "ready");
    assert_eq!(node["slots"], 2);

    // Submit and wait: one JSON document with the final summary, exit 0.
    let out = run(dev
        .command()
        .args(["--output", "json", "submit", "--wait"])
        .arg(&hello));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(summary["state"], "succeeded");
    let wave_id = summary["wave_id"].as_u64().expect("wave id");
    let wave = wave_id.to_string();

    // Plain submit prints the id alone on stdout.
    let out = run(dev.command().arg("submit").arg(&hello));
    assert!(out.status.success(), "{}", text(&out.stderr));
    let second: u64 = text(&out.stdout).trim().parse().expect("the id alone");
    assert!(second > wave_id);
    let out = run(dev.command().args(["wait", &second.to_string()]));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));

    let status = dev.json(&["status", &wave]);
    assert_eq!(status["n_micro_tasks"], 5);
    assert_eq!(status["groups"][1]["task_id"], "shard");
    let out = run(dev.command().args(["status", &wave]));
    assert!(text(&out.stdout).contains("DAG bound (work / span)"));

    let tasks = dev.json(&["tasks", &wave]);
    let names: Vec<&str> = tasks
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|t| t["name"].as_str())
        .collect();
    assert_eq!(
        names,
        ["hello", "shard[0]", "shard[1]", "shard[2]", "goodbye"]
    );

    let logs = dev.json(&["logs", &wave, "shard[2]"]);
    assert_eq!(logs["stdout"], "shard 2\n");
    assert_eq!(logs["stderr"], "oops\n");
    let out = run(dev.command().args(["logs", &wave, "hello"]));
    assert!(
        text(&out.stdout).contains("hello from dev"),
        "{}",
        text(&out.stdout)
    );

    let waves = dev.json(&["waves"]);
    assert_eq!(waves.as_array().map(Vec::len), Some(2));

    let cluster = dev.json(&["cluster"]);
    assert_eq!(cluster["leader_id"], 1);
    assert_eq!(cluster["aggregate"]["n_nodes_ready"], 1);

    let out = run(dev.command().args(["graph", &wave]));
    assert!(
        text(&out.stdout).starts_with("digraph \"hello\""),
        "{}",
        text(&out.stdout)
    );

    // Drain and undo.
    let drained = dev.json(&["drain", "dev"]);
    assert_eq!(drained["draining"], true);
    assert_eq!(dev.json(&["nodes"])[0]["state"], "draining");
    dev.json(&["drain", "dev", "--undo"]);
    assert_eq!(dev.json(&["nodes"])[0]["state"], "ready");

    // Cancel a long wave; `wait` then exits 1.
    let sleepy = write_wave(
        dir.path(),
        "sleepy.toml",
        "name = \"sleepy\"\n[[task]]\nid = \"nap\"\narray = 4\nrun = \"sleep 30\"\n",
    );
    let out = run(dev.command().arg("submit").arg(&sleepy));
    let sleepy_id = text(&out.stdout).trim().to_owned();
    let cancelled = dev.json(&["cancel", &sleepy_id]);
    assert_eq!(
        cancelled["wave_id"].as_u64().map(|id| id.to_string()),
        Some(sleepy_id.clone())
    );
    let out = run(dev.command().args(["wait", &sleepy_id]));
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    assert!(text(&out.stdout).contains("cancelled"));

    // Unknown things are one-line errors.
    let out = run(dev.command().args(["status", "999"]));
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr).trim().lines().count(),
        1,
        "{}",
        text(&out.stderr)
    );

    assert_eq!(dev.stop(), Some(130));
}
