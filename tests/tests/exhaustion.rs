//! Resource exhaustion with the real binaries (plaintext on loopback, where idle
//! connections cost the coordinator a descriptor each without a TLS handshake deadline):
//!
//! - a coordinator limited to 1,024 descriptors (`prlimit`) is sent 1,100 idle connections
//!   from five source addresses: it takes connections up to the bound its descriptor limit
//!   leaves room for and refuses the rest, says so about once a second (not once per
//!   connection), keeps descriptors for its database (it still syncs), keeps serving the
//!   connections it has, serves new ones as soon as some idle ones close, runs a wave to
//!   completion with a worker, and never exits (without the bound, it ran out of
//!   descriptors and its replica stopped on a failed sync);
//! - one source address gets at most 256 open connections: the 257th is closed at once,
//!   while another address is still served.

#![allow(clippy::unwrap_used)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt as _;
use tokio::net::{TcpSocket, TcpStream};
use venom_proto::v1 as pb;
use venom_proto::v1::client_service_client::ClientServiceClient;
use venom_tests::*;

/// The coordinator's descriptor limit (soft and hard).
const COORDINATOR_MAX_FILES: u64 = 1_024;
/// Idle connections sent to it: more than it has descriptors for.
const N_IDLE: usize = 1_100;
/// Source addresses they come from (each under the 256-per-address bound).
const N_SOURCES: u8 = 5;
/// Idle connections closed to let it breathe again.
const N_CLOSED: usize = 500;
/// Open connections one source address may hold (the listener's default).
const MAX_PER_ADDRESS: usize = venom_tls::ListenConfig::DEFAULT_MAX_CONNECTIONS_PER_ADDRESS;
/// What the listener logs when an accept fails.
const ACCEPT_FAILED: &str = "cannot accept a connection";
/// What the listener logs when it refuses connections beyond its bound in all.
const AT_BOUND: &str = "refusing new connections";

/// Raises this test process's own descriptor limit (it holds more than a thousand sockets).
fn raise_own_file_limit(n: u64) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    #[allow(unsafe_code)]
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        if limit.rlim_cur < n {
            limit.rlim_cur = n;
            limit.rlim_max = limit.rlim_max.max(n);
            assert_eq!(
                libc::setrlimit(libc::RLIMIT_NOFILE, &limit),
                0,
                "raising RLIMIT_NOFILE to {n}: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

/// Starts a plaintext single-node coordinator on `port`, under `prlimit --nofile=N:N`
/// when `max_files` is given; its log goes to `log`.
fn start_coordinator(dir: &Path, port: u16, max_files: Option<u64>, log: &Path) -> Proc {
    let binary = bin_path("venom-coordinator");
    let mut command = match max_files {
        Some(n) => {
            let mut command = Command::new("prlimit");
            command
                .arg(format!("--nofile={n}:{n}"))
                .arg("--")
                .arg(binary);
            command
        }
        None => Command::new(binary),
    };
    let log = std::fs::File::create(log).unwrap();
    let child = with_env(&mut command, &[])
        .args(["--listen", &format!("127.0.0.1:{port}"), "--bootstrap"])
        .arg("--data-dir")
        .arg(dir)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    Proc {
        child,
        name: "coordinator".into(),
    }
}

/// `venomctl` in plaintext; (success, stdout, stderr).
fn plain_venomctl(url: &str, args: &[&str]) -> (bool, String, String) {
    let mut command = Command::new(bin_path("venomctl"));
    let out = with_env(&mut command, &[])
        .args(["--coordinator", url])
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A plaintext gRPC client, once the coordinator has a leader.
async fn plain_client(url: &str) -> ClientServiceClient<tonic::transport::Channel> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(channel) = tonic::transport::Endpoint::from_shared(url.to_owned())
            .unwrap()
            .connect()
            .await
        {
            let mut client = ClientServiceClient::new(channel);
            if let Ok(status) = client
                .cluster_status(pb::ClusterStatusRequest::default())
                .await
            {
                if status.into_inner().leader_id != 0 {
                    return client;
                }
            }
        }
        assert!(Instant::now() < deadline, "{url} has no leader after 30 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A TCP connection to `to` from `from` (any port), or `None` if it is not established
/// within 3 s (a full accept queue drops the handshake).
async fn connect_from(from: Ipv4Addr, to: SocketAddr) -> Option<TcpStream> {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(IpAddr::V4(from), 0)).unwrap();
    tokio::time::timeout(Duration::from_secs(3), socket.connect(to))
        .await
        .ok()?
        .ok()
}

/// Whether the other end closed `stream` within `within` (EOF or reset).
async fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 64];
    matches!(
        tokio::time::timeout(within, stream.read(&mut buf)).await,
        Ok(Ok(0) | Err(_))
    )
}

/// Whether the other end has closed `stream` already (without waiting).
fn closed_now(stream: &TcpStream) -> bool {
    let mut buf = [0u8; 64];
    match stream.try_read(&mut buf) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
    }
}

/// Descriptors process `pid` holds.
fn open_files(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|entries| entries.count())
        .unwrap_or(0)
}

/// Lines of `log` that hold `needle`.
fn log_lines(log: &Path, needle: &str) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|line| line.contains(needle))
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_idle_connections_leaves_the_coordinator_serving_and_saying_so_sparingly() {
    raise_own_file_limit(4 * N_IDLE as u64);
    let dir = test_dir("exhaustion").unwrap();
    let log = dir.path.join("coordinator.log");
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let address = SocketAddr::from(([127, 0, 0, 1], port));
    let mut coordinator =
        start_coordinator(&dir.path.join("c"), port, Some(COORDINATOR_MAX_FILES), &log);
    let pid = coordinator.child.id();
    // Once it serves, prlimit has become the coordinator (same process).
    let mut client = plain_client(&url).await;
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let files_line = limits
        .lines()
        .find(|line| line.starts_with("Max open files"))
        .unwrap();
    assert_eq!(
        files_line
            .split_whitespace()
            .filter(|w| *w == "1024")
            .count(),
        2,
        "the coordinator runs with 1024 descriptors: {files_line}"
    );
    let _worker = start_worker_with_env(
        &url,
        "w1",
        2,
        &[],
        &[("VENOM_INSECURE".into(), "false".into())],
    )
    .unwrap();
    wait_for_node(&mut client).await;
    let files_before = open_files(pid);

    // 1. More idle connections than it has descriptors, from five addresses, one after
    // the other (a burst would overflow the accept queue, and the kernel would drop
    // handshakes the client believes complete).
    let flood_at = Instant::now();
    let mut idle = Vec::new();
    for i in 0..N_IDLE {
        let from = Ipv4Addr::new(127, 0, 0, 2 + (i % N_SOURCES as usize) as u8);
        idle.extend(connect_from(from, address).await);
    }
    assert!(
        idle.len() as u64 > COORDINATOR_MAX_FILES,
        "only {} of {N_IDLE} connections were established",
        idle.len()
    );
    // It reaches its bound and says so.
    let deadline = Instant::now() + Duration::from_secs(15);
    while log_lines(&log, AT_BOUND).is_empty() {
        assert!(
            Instant::now() < deadline,
            "no `{AT_BOUND}` logged with {} idle connections ({} descriptors open)",
            idle.len(),
            open_files(pid)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let files_flooded = open_files(pid);
    let reserve = COORDINATOR_MAX_FILES - files_flooded as u64;
    assert!(
        reserve >= venom_tls::ListenConfig::RESERVED_DESCRIPTORS / 2,
        "connections left only {reserve} descriptors to the rest of the coordinator"
    );
    // Connections it already has are still served, and the database still syncs (a
    // checkpoint every 200 ms), for a while; new ones are refused at once.
    for _ in 0..3 {
        let status = client
            .cluster_status(pb::ClusterStatusRequest::default())
            .await
            .expect("an established connection is served during the flood");
        assert_eq!(status.into_inner().leader_id, 1);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let (ok, _, _) = plain_venomctl(&url, &["cluster"]);
    assert!(
        !ok,
        "a new client got in although every connection is taken"
    );

    // 2. Idle connections close (the first ones, which it had taken): new clients get in.
    idle.drain(..N_CLOSED);
    let closed_at = Instant::now();
    let deadline = closed_at + Duration::from_secs(30);
    let served_after = loop {
        let (ok, _, stderr) = plain_venomctl(&url, &["cluster"]);
        if ok {
            break closed_at.elapsed();
        }
        assert!(
            Instant::now() < deadline,
            "venomctl still refused 30 s after {N_CLOSED} connections closed: {stderr}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let wave = dir.path.join("after.toml");
    std::fs::write(
        &wave,
        "name = \"after-flood\"\n[[task]]\nid = \"t\"\narray = 4\nrun = \"true\"\n",
    )
    .unwrap();
    let (ok, stdout, stderr) = plain_venomctl(&url, &["submit", wave.to_str().unwrap(), "--wait"]);
    assert!(ok, "the wave did not succeed: {stdout}{stderr}");

    // 3. Said about once a second, not once per refused connection; nothing failed; up.
    let lines = log_lines(&log, AT_BOUND);
    let seconds = flood_at.elapsed().as_secs() as usize;
    assert!(
        lines.len() <= seconds + 2,
        "{} `{AT_BOUND}` lines in {seconds} s",
        lines.len()
    );
    let text = std::fs::read_to_string(&log).unwrap();
    for failure in [ACCEPT_FAILED, "storage failed", "ERROR"] {
        assert!(!text.contains(failure), "`{failure}` logged:\n{text}");
    }
    assert!(
        coordinator.child.try_wait().unwrap().is_none(),
        "the coordinator exited:\n{text}"
    );
    drop(idle);
    eprintln!(
        "descriptors: {files_before} before the flood, {files_flooded} during it (limit \
         {COORDINATOR_MAX_FILES}); {} `{AT_BOUND}` lines in {seconds} s; a new client \
         served {} ms after {N_CLOSED} idle connections closed",
        lines.len(),
        served_after.as_millis()
    );
    coordinator.kill9();
}

/// Waits until a worker node is ready on the coordinator behind `client`.
async fn wait_for_node(client: &mut ClientServiceClient<tonic::transport::Channel>) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let nodes = client.list_nodes(pb::ListNodesRequest {}).await.unwrap();
        if nodes
            .into_inner()
            .nodes
            .iter()
            .any(|n| n.state() == pb::NodeState::Ready)
        {
            return;
        }
        assert!(Instant::now() < deadline, "no worker registered in 30 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_gets_256_connections_and_others_are_still_served() {
    raise_own_file_limit(4 * MAX_PER_ADDRESS as u64);
    let dir = test_dir("per_address").unwrap();
    let log = dir.path.join("coordinator.log");
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let address = SocketAddr::from(([127, 0, 0, 1], port));
    let mut coordinator = start_coordinator(&dir.path.join("c"), port, None, &log);
    plain_client(&url).await;

    let crowd = Ipv4Addr::new(127, 0, 0, 2);
    let mut held = Vec::new();
    for _ in 0..MAX_PER_ADDRESS {
        held.push(connect_from(crowd, address).await.unwrap());
    }
    // The listener takes connections in order, so it has all 256 when it meets this one.
    let mut one_too_many = connect_from(crowd, address).await.unwrap();
    let started = Instant::now();
    assert!(
        closed_within(&mut one_too_many, Duration::from_secs(5)).await,
        "connection {} from {crowd} is still open after 5 s",
        MAX_PER_ADDRESS + 1
    );
    let closed_after = started.elapsed();
    let n_closed = held.iter().filter(|stream| closed_now(stream)).count();
    assert_eq!(n_closed, 0, "the first {MAX_PER_ADDRESS} stay open");

    // Another address (127.0.0.1, venomctl's) is served as usual.
    let (ok, stdout, stderr) = plain_venomctl(&url, &["cluster"]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("leader"), "{stdout}");
    assert!(
        coordinator.child.try_wait().unwrap().is_none(),
        "the coordinator exited"
    );
    eprintln!(
        "connection {} from {crowd} closed after {} ms; {MAX_PER_ADDRESS} kept",
        MAX_PER_ADDRESS + 1,
        closed_after.as_millis()
    );
    coordinator.kill9();
}
