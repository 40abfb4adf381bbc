//! A test network of Linux network namespaces, and a Venom cluster spread over it, so that
//! partitions and freezes hit real processes at real addresses.
//!
//! [`TestNet`] is one Linux bridge in the host's namespace and one network namespace per
//! process, joined to the bridge by a veth pair, addressed in a private /24
//! (`10.213.X.0/24`, X free on this machine, the bridge at `.254` so the test process can
//! reach every member). Docker's FORWARD policy is DROP and bridged frames pass through it,
//! so the net adds `-i BRIDGE` and `-o BRIDGE` ACCEPT rules. Everything is removed when the
//! net is dropped (also while a test panics); a stale set left by a crashed run with the
//! same names, or by any test process that is gone, is removed before a new one is made.
//!
//! The faults, each undone by the test that makes it: [`TestNet::cut`] / [`TestNet::heal`]
//! take a namespace's link down and up (on the host side: nothing in or out);
//! [`TestNet::cut_inbound`] / [`TestNet::heal_inbound`] drop every packet arriving in the
//! namespace except on loopback (it still sends: an asymmetric partition); [`freeze`] /
//! [`thaw`] stop and continue a process (SIGSTOP / SIGCONT); [`Proc::kill9`] kills one.
//!
//! [`NetCluster`] runs three coordinators and two workers, each in its own namespace, with
//! mutual TLS (member certificates name the member's address). A process is started as
//! `ip netns exec NS BINARY ARGS…`: `ip` execs the binary, so the child's pid is the
//! process's own and signals reach it. Micro-tasks record every attempt with
//! [`crate::attempts::attempt_recording`] in a directory all namespaces share (they share
//! the file system), and [`NetCluster::finish`] judges the scenario with
//! [`crate::attempts::check`] and the end checks of [`crate::scenario`].
//!
//! Needs root (namespaces, a bridge, iptables), iproute2 and iptables. Without them every
//! test using this fails with a message saying so: nothing is skipped.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _};
use venom_proto::v1 as pb;

use crate::attempts::{check, read_attempts, resumed_at, Attempt, Check, Reruns};
use crate::scenario::{acknowledged_waves_lost, brief_list, members_agree, ms_figures};
use crate::{
    bin_path, cluster_status, list_tasks, pki, submit_following_leader, test_dir, test_log_filter,
    wait_ready, with_env, Coordinator, Group, Proc, TestDir,
};

/// Every test network is `10.213.X.0/24`.
const NET_PREFIX: [u8; 2] = [10, 213];
/// The bridge's own address in its /24: the test process reaches the namespaces through it.
const BRIDGE_HOST: u8 = 254;
/// The port every coordinator listens on (each has its own address).
pub const COORDINATOR_PORT: u16 = 7070;
/// Workers in a [`NetCluster`], and the slots each offers.
pub const N_WORKERS: u32 = 2;
pub const SLOTS: u32 = 2;

/// Runs `program args…` to completion; its stdout, or an error with its stderr.
fn run(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let shown = format!("{program} {}", args.join(" "));
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| {
            format!("cannot run `{shown}` (the network-namespace tests need iproute2 and iptables)")
        })?;
    if !out.status.success() {
        bail!(
            "`{shown}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Fails unless this process runs as root.
fn require_root() -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    #[allow(unsafe_code)]
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        bail!(
            "the network-namespace tests need root (they create network namespaces, a bridge \
             and iptables rules; euid is {euid}): run them as root, as CI does"
        );
    }
    Ok(())
}

/// One process's place on a [`TestNet`].
#[derive(Debug, Clone)]
pub struct NetHost {
    /// What the test calls it (`c1`, `w2`).
    pub label: String,
    /// Its network namespace.
    pub ns: String,
    pub ip: Ipv4Addr,
    /// The host end of its veth pair, a port of the bridge.
    veth: String,
}

/// A bridge with one namespace per process (see the module doc). Dropping it removes
/// namespaces, veths, bridge and iptables rules.
#[derive(Debug)]
pub struct TestNet {
    /// `vb<pid % 10000><n>`, also the prefix of every name this net creates.
    bridge: String,
    /// X of `10.213.X.0/24`.
    subnet: u8,
    hosts: Vec<NetHost>,
}

impl TestNet {
    /// A new bridge and subnet, with no namespaces yet.
    pub fn new() -> anyhow::Result<Self> {
        require_root()?;
        static SEQUENCE: AtomicU32 = AtomicU32::new(0);
        let sequence = SEQUENCE.fetch_add(1, Ordering::Relaxed) % 10;
        let pid = std::process::id();
        let bridge = format!("vb{}{sequence}", pid % 10_000);
        remove_orphaned();
        remove_stale(&bridge);
        let subnet = free_subnet((pid * 10 + sequence) % 250)?;
        let net = TestNet {
            bridge,
            subnet,
            hosts: Vec::new(),
        };
        // From here on, dropping `net` removes whatever was made.
        let br = net.bridge.as_str();
        run(
            "ip",
            &["link", "add", br, "type", "bridge", "forward_delay", "0"],
        )
        .context("cannot create the test bridge (root with CAP_NET_ADMIN needed)")?;
        run(
            "ip",
            &[
                "addr",
                "add",
                &format!("{}/24", net.address(BRIDGE_HOST)),
                "dev",
                br,
            ],
        )?;
        run("ip", &["link", "set", br, "up"])?;
        for direction in ["-i", "-o"] {
            run(
                "iptables",
                &["-I", "FORWARD", direction, br, "-j", "ACCEPT"],
            )
            .context("cannot let bridged traffic through iptables' FORWARD chain")?;
        }
        Ok(net)
    }

    fn address(&self, host: u8) -> Ipv4Addr {
        Ipv4Addr::new(NET_PREFIX[0], NET_PREFIX[1], self.subnet, host)
    }

    /// A new namespace called `label` on the bridge, with the next address and loopback up.
    pub fn add_host(&mut self, label: &str) -> anyhow::Result<NetHost> {
        let n = self.hosts.len() + 1;
        if n >= usize::from(BRIDGE_HOST) {
            bail!("a test net holds at most {} hosts", BRIDGE_HOST - 1);
        }
        let host = NetHost {
            label: label.to_owned(),
            ns: format!("{}-{}-{label}", self.bridge, std::process::id()),
            ip: self.address(n as u8),
            veth: format!("{}v{n}", self.bridge),
        };
        run("ip", &["netns", "add", &host.ns]).with_context(|| {
            format!(
                "`ip netns` is not usable here: the network-namespace tests need root with \
                 CAP_SYS_ADMIN (namespace {})",
                host.ns
            )
        })?;
        self.hosts.push(host.clone());
        let ns = host.ns.as_str();
        run(
            "ip",
            &[
                "link", "add", &host.veth, "type", "veth", "peer", "name", "eth0", "netns", ns,
            ],
        )?;
        run("ip", &["link", "set", &host.veth, "master", &self.bridge])?;
        run("ip", &["link", "set", &host.veth, "up"])?;
        let cidr = format!("{}/24", host.ip);
        run("ip", &["-n", ns, "addr", "add", &cidr, "dev", "eth0"])?;
        run("ip", &["-n", ns, "link", "set", "eth0", "up"])?;
        run("ip", &["-n", ns, "link", "set", "lo", "up"])?;
        Ok(host)
    }

    /// `program` to be run inside `host`'s namespace (`ip netns exec`, which execs it).
    pub fn command(&self, host: &NetHost, program: &Path) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &host.ns]).arg(program);
        command
    }

    /// Cuts `host` off: its link goes down, nothing gets in or out.
    pub fn cut(&self, host: &NetHost) -> anyhow::Result<()> {
        run("ip", &["link", "set", &host.veth, "down"]).map(drop)
    }

    /// Undoes [`TestNet::cut`].
    pub fn heal(&self, host: &NetHost) -> anyhow::Result<()> {
        run("ip", &["link", "set", &host.veth, "up"]).map(drop)
    }

    /// `host` still sends but receives nothing (loopback aside).
    pub fn cut_inbound(&self, host: &NetHost) -> anyhow::Result<()> {
        self.inbound_rule(host, "-A")
    }

    /// Undoes [`TestNet::cut_inbound`].
    pub fn heal_inbound(&self, host: &NetHost) -> anyhow::Result<()> {
        self.inbound_rule(host, "-D")
    }

    fn inbound_rule(&self, host: &NetHost, action: &str) -> anyhow::Result<()> {
        run(
            "ip",
            &[
                "netns", "exec", &host.ns, "iptables", action, "INPUT", "!", "-i", "lo", "-j",
                "DROP",
            ],
        )
        .map(drop)
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        for host in &self.hosts {
            let _ = run("ip", &["link", "del", &host.veth]);
            let _ = run("ip", &["netns", "del", &host.ns]);
        }
        remove_bridge(&self.bridge);
    }
}

/// Removes the sets of test processes that are gone: their namespaces are named
/// `BRIDGE-PID-LABEL`.
fn remove_orphaned() {
    let Ok(list) = run("ip", &["netns", "list"]) else {
        return;
    };
    for ns in list.lines().filter_map(|l| l.split_whitespace().next()) {
        let mut parts = ns.splitn(3, '-');
        let (Some(bridge), Some(pid), Some(_)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        let ours = bridge.starts_with("vb") && bridge[2..].bytes().all(|b| b.is_ascii_digit());
        let gone = pid
            .parse::<u32>()
            .is_ok_and(|pid| !Path::new(&format!("/proc/{pid}")).exists());
        if ours && gone {
            remove_stale(bridge);
        }
    }
}

/// Removes what a crashed earlier run left under the name `bridge`.
fn remove_stale(bridge: &str) {
    let ns_prefix = format!("{bridge}-");
    if let Ok(list) = run("ip", &["netns", "list"]) {
        for ns in list.lines().filter_map(|l| l.split_whitespace().next()) {
            if ns.starts_with(&ns_prefix) {
                let _ = run("ip", &["netns", "del", ns]);
            }
        }
    }
    let veth_prefix = format!("{bridge}v");
    if let Ok(links) = run("ip", &["-o", "link", "show"]) {
        for line in links.lines() {
            // `7: NAME@PEER: <FLAGS> …`
            let name = line
                .split(": ")
                .nth(1)
                .and_then(|n| n.split('@').next())
                .unwrap_or_default();
            if name.starts_with(&veth_prefix) {
                let _ = run("ip", &["link", "del", name]);
            }
        }
    }
    remove_bridge(bridge);
}

/// Deletes `bridge` and its FORWARD rules (each as often as it was added).
fn remove_bridge(bridge: &str) {
    let _ = run("ip", &["link", "del", bridge]);
    for direction in ["-i", "-o"] {
        for _ in 0..8 {
            let deleted = run(
                "iptables",
                &["-D", "FORWARD", direction, bridge, "-j", "ACCEPT"],
            );
            if deleted.is_err() {
                break;
            }
        }
    }
}

/// X for a `10.213.X.0/24` no interface of this machine uses, trying from `1 + start`.
fn free_subnet(start: u32) -> anyhow::Result<u8> {
    let used = run("ip", &["-o", "-4", "addr", "show"])?;
    (0..250)
        .map(|i| ((start + i) % 250 + 1) as u8)
        .find(|x| !used.contains(&format!("inet {}.{}.{x}.", NET_PREFIX[0], NET_PREFIX[1])))
        .context("every 10.213.X.0/24 is in use on this machine")
}

/// Sends `signal` to process `pid`.
fn signal(pid: u32, signal: i32) -> anyhow::Result<()> {
    let pid = i32::try_from(pid).context("pid out of range")?;
    // SAFETY: plain signal delivery to a process this test started.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::kill(pid, signal) };
    if rc != 0 {
        bail!("kill({pid}, {signal}): {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// Stops `proc` (SIGSTOP); [`thaw`] continues it.
pub fn freeze(proc: &Proc) -> anyhow::Result<()> {
    signal(proc.child.id(), libc::SIGSTOP)
}

/// Continues a process [`freeze`] stopped (SIGCONT).
pub fn thaw(proc: &Proc) -> anyhow::Result<()> {
    signal(proc.child.id(), libc::SIGCONT)
}

/// Unix nanoseconds now (the clock `date +%s%N` reads in the micro-tasks).
pub fn unix_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

/// One wave a submit acknowledged.
#[derive(Debug)]
pub struct NetWave {
    pub wave_id: u64,
    pub records: PathBuf,
    /// `(task id, array size)`; `None` for a task without `array`.
    pub expected: Vec<(&'static str, Option<u32>)>,
}

/// One fault, for the figures: when it began and when a new leader was seen, if any.
#[derive(Debug, Clone)]
pub struct FaultEvent {
    /// Unix nanoseconds.
    pub at_ns: u128,
    /// When the test first saw another member lead (Unix nanoseconds).
    pub election_ns: Option<u128>,
    /// The records of the wave running across it (progress is looked for there).
    pub records: PathBuf,
}

/// How a process is started again: the command line after `ip netns exec NS`, its
/// environment and its log.
#[derive(Debug, Clone)]
struct Launch {
    host: NetHost,
    program: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    log: PathBuf,
    name: String,
}

/// Three coordinators and two workers, each in its own namespace (see the module doc).
pub struct NetCluster {
    pub name: &'static str,
    pub started: Instant,
    /// Members as a [`Group`] (URLs `https://ADDRESS:7070`), for the shared end checks and
    /// the waits. Restart members with [`NetCluster::restart_member`]: `Group::restart`
    /// would start them on loopback, outside their namespace.
    pub group: Group,
    /// `w1`, `w2`; `None` while killed.
    pub workers: Vec<Option<Proc>>,
    pub member_hosts: Vec<NetHost>,
    pub worker_hosts: Vec<NetHost>,
    members_launch: Vec<Launch>,
    workers_launch: Vec<Launch>,
    pub queue_depth: u32,
    pub waves: Vec<NetWave>,
    pub root: PathBuf,
    /// Dropped after the processes above (fields drop in order).
    pub net: TestNet,
    /// Dropped last.
    _dir: TestDir,
}

impl NetCluster {
    /// Starts the net, three coordinators (`coordinator_args` added) and two workers
    /// (`--throttle off --queue-depth QUEUE_DEPTH`, then `worker_args`); returns once a leader
    /// has both workers ready.
    pub async fn start(
        name: &'static str,
        coordinator_args: &[&str],
        worker_args: &[&str],
        queue_depth: u32,
    ) -> anyhow::Result<NetCluster> {
        let dir = test_dir(name)?;
        let root = dir.path.clone();
        let mut net = TestNet::new()?;
        let member_hosts = (1..=3)
            .map(|id| net.add_host(&format!("c{id}")))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let worker_hosts = (1..=N_WORKERS)
            .map(|i| net.add_host(&format!("w{i}")))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let log_filter = format!(
            "{},venom_coordinator=info,venom_worker=info",
            test_log_filter()
        );
        let addresses: Vec<String> = member_hosts
            .iter()
            .map(|h| format!("{}:{COORDINATOR_PORT}", h.ip))
            .collect();
        let peers = addresses
            .iter()
            .enumerate()
            .map(|(i, a)| format!("{}={a}", i + 1))
            .collect::<Vec<_>>()
            .join(",");
        let urls: Vec<String> = addresses.iter().map(|a| format!("https://{a}")).collect();
        let mut members_launch = Vec::new();
        let mut members = Vec::new();
        for (i, host) in member_hosts.iter().enumerate() {
            let id = (i + 1).to_string();
            let data_dir = root.join(format!("c{id}"));
            let mut args: Vec<String> = [
                "--id",
                &id,
                "--peers",
                &peers,
                "--listen",
                &addresses[i],
                "--data-dir",
                &data_dir.display().to_string(),
                "--bootstrap",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            args.extend(coordinator_args.iter().map(|s| s.to_string()));
            let mut env = pki::pki().member_env_at(&id, &[host.ip.to_string()]);
            env.push(("RUST_LOG".into(), log_filter.clone()));
            let launch = Launch {
                host: host.clone(),
                program: bin_path("venom-coordinator"),
                args,
                env,
                log: root.join(format!("c{id}.log")),
                name: format!("c{id}"),
            };
            let proc = net_spawn(&net, &launch)?;
            members.push(Some(Coordinator {
                proc,
                port: COORDINATOR_PORT,
                data_dir,
                extra: launch.args.clone(),
                log_filter: log_filter.clone(),
                env: launch.env.clone(),
            }));
            members_launch.push(launch);
        }
        let group = Group {
            members,
            urls: urls.clone(),
        };
        let queue = queue_depth.to_string();
        let slots = SLOTS.to_string();
        let mut workers_launch = Vec::new();
        let mut workers = Vec::new();
        for (i, host) in worker_hosts.iter().enumerate() {
            let name = format!("w{}", i + 1);
            let mut args: Vec<String> = [
                "--coordinator",
                &urls.join(","),
                "--name",
                &name,
                "--slots",
                &slots,
                "--throttle",
                "off",
                "--queue-depth",
                &queue,
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            args.extend(worker_args.iter().map(|s| s.to_string()));
            let mut env = pki::pki().env(venom_tls::Role::Worker, &name);
            env.push(("RUST_LOG".into(), log_filter.clone()));
            // Its own data dir in the scenario's directory, kept across its restarts.
            env.push((
                "VENOM_WORKER_DATA_DIR".into(),
                root.join(format!("{name}-data")).display().to_string(),
            ));
            let launch = Launch {
                host: host.clone(),
                program: bin_path("venom-worker"),
                args,
                env,
                log: root.join(format!("{name}.log")),
                name,
            };
            workers.push(Some(net_spawn(&net, &launch)?));
            workers_launch.push(launch);
        }
        let cluster = NetCluster {
            name,
            started: Instant::now(),
            group,
            workers,
            member_hosts,
            worker_hosts,
            members_launch,
            workers_launch,
            queue_depth,
            waves: Vec::new(),
            root,
            net,
            _dir: dir,
        };
        let leader = cluster.group.wait_leader(0, Duration::from_secs(30)).await;
        wait_ready(cluster.group.url(leader), N_WORKERS as usize)
            .await
            .with_context(|| format!("{name}: the workers did not register"))?;
        Ok(cluster)
    }

    /// Member `id`'s namespace.
    pub fn member_host(&self, id: u64) -> &NetHost {
        &self.member_hosts[(id - 1) as usize]
    }

    /// Worker `w<i>`'s namespace.
    pub fn worker_host(&self, i: u32) -> &NetHost {
        &self.worker_hosts[(i - 1) as usize]
    }

    /// Member `id`'s process (it must be running).
    pub fn member_proc(&self, id: u64) -> &Proc {
        &self.group.members[(id - 1) as usize]
            .as_ref()
            .unwrap_or_else(|| panic!("member {id} is down"))
            .proc
    }

    /// Kills member `id` (SIGKILL); it stays down until [`NetCluster::restart_member`].
    pub fn kill_member(&mut self, id: u64) -> Coordinator {
        self.group.kill9(id)
    }

    /// Starts a killed member again in its namespace, on its data dir.
    pub fn restart_member(&mut self, id: u64, mut member: Coordinator) -> anyhow::Result<()> {
        member.proc = net_spawn(&self.net, &self.members_launch[(id - 1) as usize])?;
        self.group.members[(id - 1) as usize] = Some(member);
        Ok(())
    }

    /// Kills worker `w<i>` (SIGKILL); its guard kills its attempts' process groups.
    pub fn kill_worker(&mut self, i: u32) {
        if let Some(mut worker) = self.workers[(i - 1) as usize].take() {
            worker.kill9();
        }
    }

    /// Starts worker `w<i>` again in its namespace.
    pub fn restart_worker(&mut self, i: u32) -> anyhow::Result<()> {
        let worker = net_spawn(&self.net, &self.workers_launch[(i - 1) as usize])?;
        self.workers[(i - 1) as usize] = Some(worker);
        Ok(())
    }

    /// A fresh directory for one wave's records.
    pub fn records_dir(&self, label: &str) -> anyhow::Result<PathBuf> {
        let dir = self.root.join("records").join(label);
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        Ok(dir)
    }

    /// Most micro-tasks the workers hold at once (running plus queued).
    pub fn held_max(&self) -> u32 {
        N_WORKERS * (SLOTS + self.queue_depth)
    }

    /// Submits through a member (following "not leader") and remembers the wave.
    pub async fn submit(
        &mut self,
        spec: &str,
        records: &Path,
        expected: &[(&'static str, Option<u32>)],
    ) -> anyhow::Result<u64> {
        let via = self.group.live_ids()[0];
        let (wave_id, _) =
            submit_following_leader(self.group.url(via), spec, Duration::from_secs(30)).await?;
        self.waves.push(NetWave {
            wave_id,
            records: records.to_path_buf(),
            expected: expected.to_vec(),
        });
        Ok(wave_id)
    }

    /// The member among `ids` that says it leads, asking them all at once (a member that
    /// does not answer within `per_call` counts as not leading).
    pub async fn leader_among(&self, ids: &[u64], per_call: Duration) -> Option<u64> {
        let mut asks = tokio::task::JoinSet::new();
        for &id in ids {
            let url = self.group.url(id).to_owned();
            asks.spawn(async move {
                let status = tokio::time::timeout(per_call, cluster_status(&url))
                    .await
                    .ok()
                    .flatten()?;
                let own = status.members.iter().find(|m| m.id == id).map(|m| m.role());
                (status.leader_id == id && own == Some(pb::MemberRole::Leader)).then_some(id)
            });
        }
        let mut leader = None;
        while let Some(answer) = asks.join_next().await {
            if let Ok(Some(id)) = answer {
                leader = Some(id);
            }
        }
        leader
    }

    /// Waits until a member other than `not` leads; when it was seen (Unix nanoseconds), or
    /// `None` if none did by `deadline`.
    pub async fn wait_new_leader(&self, not: u64, deadline: Instant) -> Option<(u64, u128)> {
        let others: Vec<u64> = self
            .group
            .live_ids()
            .into_iter()
            .filter(|&id| id != not)
            .collect();
        while Instant::now() < deadline {
            if let Some(id) = self.leader_among(&others, Duration::from_millis(500)).await {
                return Some((id, unix_ns()));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }

    /// Waits until `n` attempts of the wave recording in `records` have started.
    pub async fn wait_started(&self, records: &Path, n: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let started = read_attempts(records).map_or(0, |a| a.len());
            if started >= n {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{}: only {started} of {n} attempts started within {timeout:?}",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The end of every scenario: waits for each wave to finish, judges the records
    /// ([`check`], re-executions as `reruns` allows), checks that no acknowledged wave is
    /// lost and that every member agrees, computes the time from each fault in `events` to
    /// progress ([`resumed_at`] over the records of the wave running across it), prints one
    /// figures line (with `figures` appended) and asserts. Returns the first wave's attempts
    /// for scenario-specific checks.
    pub async fn finish(
        &self,
        reruns: Reruns<'_>,
        events: &[FaultEvent],
        figures: &str,
    ) -> Vec<Attempt> {
        let leader = self.group.wait_leader(0, Duration::from_secs(30)).await;
        let mut verdict = Check::default();
        let mut first_wave = Vec::new();
        for wave in &self.waves {
            // Two minutes, or more for a big wave: a tenth of a second per micro-task (the
            // workers run about twenty `sleep 0.2` a second with nothing else on the machine).
            let n: u64 = wave
                .expected
                .iter()
                .map(|(_, size)| u64::from(size.unwrap_or(1)))
                .sum();
            let timeout = Duration::from_secs(120).max(Duration::from_millis(100 * n));
            let summary = self.group.wait_finished(wave.wave_id, timeout).await;
            assert_eq!(summary.state(), pb::WaveState::Succeeded, "{summary:?}");
            let deadline = Instant::now() + Duration::from_secs(20);
            let tasks = loop {
                if let Some(tasks) = list_tasks(self.group.url(leader), wave.wave_id).await {
                    break tasks;
                }
                assert!(
                    Instant::now() < deadline,
                    "leader {leader} did not answer ListTasks"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            };
            let attempts = read_attempts(&wave.records).expect("read the attempt records");
            check(&mut verdict, &wave.expected, &tasks, &attempts, reruns);
            if first_wave.is_empty() {
                first_wave = attempts;
            }
        }
        let ids: Vec<u64> = self.waves.iter().map(|w| w.wave_id).collect();
        let waves_lost = acknowledged_waves_lost(&self.group, &ids).await;
        let agreement = members_agree(&self.group, leader, &ids).await;

        let ms = |from: u128, to: u128| to.saturating_sub(from) / 1_000_000;
        let resumed: Vec<Option<u128>> = events
            .iter()
            .map(|e| {
                let attempts = read_attempts(&e.records).expect("read the attempt records");
                resumed_at(&attempts, e.at_ns, self.held_max())
            })
            .collect();
        let to_progress: Vec<u128> = events
            .iter()
            .zip(&resumed)
            .filter_map(|(e, r)| r.map(|r| ms(e.at_ns, r)))
            .collect();
        let to_election: Vec<u128> = events
            .iter()
            .filter_map(|e| e.election_ns.map(|el| ms(e.at_ns, el)))
            .collect();
        let election_to_progress: Vec<u128> = events
            .iter()
            .zip(&resumed)
            .filter_map(|(e, r)| Some(ms(e.election_ns?, (*r)?)))
            .collect();
        let reruns_shown: Vec<String> = verdict.reruns.iter().map(|r| r.to_string()).collect();
        let elections = if to_election.is_empty() {
            String::new()
        } else {
            format!(
                "; fault → new leader {}; new leader → progress {}",
                ms_figures(&to_election),
                ms_figures(&election_to_progress)
            )
        };
        eprintln!(
            "partitions {}: {} micro-tasks, {} attempts; fault → progress {}{elections}; \
             re-executions {}{}; overlapping executions {}; lost {}; recorded twice {}; \
             acknowledged waves lost {}; closest successive attempts {}; {figures}; members \
             agree: {}; {:.1} s",
            self.name,
            verdict.n_micro_tasks,
            verdict.n_attempts,
            ms_figures(&to_progress),
            verdict.n_reexecutions(),
            brief_list(&reruns_shown),
            verdict.overlaps.len(),
            verdict.lost.len() + verdict.never_ended.len(),
            verdict.recorded_twice.len(),
            waves_lost.len(),
            verdict
                .closest_ms
                .map_or("none".to_string(), |c| format!("{c:.0} ms")),
            if agreement.is_ok() { "yes" } else { "NO" },
            self.started.elapsed().as_secs_f64(),
        );
        let violations = verdict.violations();
        assert!(
            violations.is_empty(),
            "{}: {}",
            self.name,
            violations.join("\n")
        );
        assert!(
            waves_lost.is_empty(),
            "acknowledged waves missing (member, wave): {waves_lost:?}"
        );
        if let Err(e) = agreement {
            panic!("{e}");
        }
        assert!(
            resumed.iter().all(Option::is_some),
            "{}: no new work started after a fault ({} events, progress after {:?}): the \
             wave ended first or the cluster never resumed",
            self.name,
            events.len(),
            resumed
        );
        first_wave
    }

    /// The last `lines` lines of process `name`'s log (`c1`, `w2`), for failure messages.
    pub fn log_tail(&self, name: &str, lines: usize) -> String {
        let text =
            std::fs::read_to_string(self.root.join(format!("{name}.log"))).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for NetCluster {
    /// Workers first, by SIGTERM: they kill their attempts' process groups on the way out.
    fn drop(&mut self) {
        for worker in self.workers.iter_mut().flatten() {
            if !worker.terminate(Duration::from_secs(5)) {
                worker.kill9();
            }
        }
    }
}

/// Starts `launch` inside its namespace, its stderr appended to its log.
fn net_spawn(net: &TestNet, launch: &Launch) -> anyhow::Result<Proc> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&launch.log)
        .with_context(|| format!("open {}", launch.log.display()))?;
    let mut command = net.command(&launch.host, &launch.program);
    let child = with_env(&mut command, &launch.env)
        .args(&launch.args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .with_context(|| format!("start {} in namespace {}", launch.name, launch.host.ns))?;
    Ok(Proc {
        child,
        name: launch.name.clone(),
    })
}
