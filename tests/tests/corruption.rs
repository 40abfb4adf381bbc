//! Storage integrity with the real binaries: a three-member cluster runs a wave, one
//! follower is stopped (SIGTERM) and one byte of its sled files is flipped — at the head,
//! the middle and the tail of the data file `db`, of sled's newest page-table snapshot
//! `snap.*`, and of a blob file when sled wrote any — one position per restart, starting
//! from a copy of the untouched data dir each time. Every restart must either refuse with
//! exit 78 and a message naming the damage and the way out, or (the byte was in space sled
//! does not read) start on a log no shorter than the one it had acknowledged, catch up and
//! answer exactly as the leader does. Then the documented way out: `venomctl cluster
//! remove`, wipe, `venomctl cluster add`, start with `--join`; it catches up by snapshot
//! and the wave's results are there. Prints one line per restart and a summary
//! (`--nocapture`); docs/RELIABILITY.md reports them.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use venom_coordinator::storage::Store;
use venom_tests::scenario::*;
use venom_tests::*;

/// Where in a file the flipped byte goes.
#[derive(Debug, Clone, Copy)]
enum Position {
    Head,
    Middle,
    Tail,
}

impl Position {
    fn offset(self, len: u64) -> u64 {
        match self {
            Position::Head => 0,
            Position::Middle => len / 2,
            Position::Tail => len - 1,
        }
    }
}

/// Which of sled's files gets the flipped byte.
#[derive(Debug, Clone, Copy)]
enum Target {
    /// The data file.
    Db,
    /// The newest page-table snapshot (`snap.<lsn>`).
    Snapshot,
    /// The first large-value file under `blobs/`.
    Blob,
}

impl Target {
    /// The file in `data_dir`, if sled has one of this kind there.
    fn file(self, data_dir: &Path) -> Option<PathBuf> {
        match self {
            Target::Db => Some(data_dir.join("db")),
            Target::Snapshot => {
                let mut snaps: Vec<PathBuf> = files_in(data_dir)
                    .into_iter()
                    .filter(|p| file_name(p).starts_with("snap."))
                    .collect();
                snaps.sort();
                snaps.pop()
            }
            Target::Blob => files_in(&data_dir.join("blobs")).into_iter().min(),
        }
    }
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The plain files directly in `dir` (none when it does not exist).
fn files_in(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect()
}

/// Replaces `to` with a copy of the directory tree `from`.
fn restore(from: &Path, to: &Path) {
    if to.exists() {
        std::fs::remove_dir_all(to).unwrap();
    }
    copy_dir(from, to);
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// Flips every bit of the byte at `position` of `file`; returns its offset.
fn flip_byte(file: &Path, position: Position) -> u64 {
    use std::io::{Read as _, Seek as _, SeekFrom, Write as _};
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(file)
        .unwrap();
    let len = f.metadata().unwrap().len();
    assert!(len > 0, "{} is empty", file.display());
    let offset = position.offset(len);
    let mut byte = [0u8];
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.read_exact(&mut byte).unwrap();
    byte[0] ^= 0xff;
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.write_all(&byte).unwrap();
    f.sync_all().unwrap();
    offset
}

/// The part of a coordinator's log written since it was `before` bytes long.
fn log_since(coordinator: &Coordinator, before: u64) -> String {
    let log = std::fs::read(coordinator.log_path()).unwrap_or_default();
    let start = usize::try_from(before).unwrap().min(log.len());
    String::from_utf8_lossy(&log[start..]).into_owned()
}

fn log_len(coordinator: &Coordinator) -> u64 {
    std::fs::metadata(coordinator.log_path()).map_or(0, |m| m.len())
}

/// The last index of the log the coordinator verified at its start (its `data dir
/// verified` line).
fn verified_last_index(log: &str) -> Option<u64> {
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains("data dir verified"))?;
    let value = line.split("last_index=").nth(1)?;
    value
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// What one start of the follower came to.
enum Outcome {
    /// Exit 78 with this refusal (it is stopped).
    Refused(String),
    /// Started on a log ending at this index, caught up and agreed with the leader; still
    /// running (in the group).
    CaughtUp(u64),
}

/// The follower under test.
struct Follower {
    id: u64,
    port: u16,
    data_dir: PathBuf,
    /// While it is stopped (in the group while it runs).
    stopped: Option<Coordinator>,
    /// The commit index it reported just before it was last stopped: it had acknowledged
    /// at least the entries up to there.
    acknowledged: u64,
}

impl Follower {
    fn slot(&self) -> usize {
        (self.id - 1) as usize
    }
}

/// Starts the stopped follower on whatever its data dir holds. It must refuse within 3 s
/// with exit 78 and the way out, or run on a log no shorter than it acknowledged (its
/// start line says which log it verified), catch up and answer as the leader does.
async fn start(s: &mut Scenario, f: &mut Follower, wave_id: u64, what: &str) -> Outcome {
    let mut coordinator = f.stopped.take().expect("the follower is stopped");
    let before = log_len(&coordinator);
    coordinator.kill9_and_restart().unwrap();
    let code = coordinator.wait_exit(Duration::from_secs(3));
    let log = log_since(&coordinator, before);
    let opened = verified_last_index(&log);
    match code {
        Some(78) => {
            f.stopped = Some(coordinator);
            let refusal = log
                .lines()
                .rev()
                .find(|l| l.starts_with("venom-coordinator: "))
                .unwrap_or_else(|| panic!("{what}: no refusal printed; log:\n{log}"))
                .to_string();
            assert!(!log.contains("panicked at"), "{what}: {log}");
            for needle in [
                format!("venomctl cluster remove {}", f.id),
                format!("venomctl cluster add {}", f.id),
                "--join".to_string(),
            ] {
                assert!(
                    refusal.contains(&needle),
                    "{what}: `{needle}` missing: {refusal}"
                );
            }
            Outcome::Refused(refusal)
        }
        Some(code) => panic!("{what}: exit {code}; log:\n{log}"),
        None => {
            let opened =
                opened.unwrap_or_else(|| panic!("{what}: no `data dir verified` line:\n{log}"));
            assert!(
                opened >= f.acknowledged,
                "{what}: runs on a log ending at {opened}, but it had acknowledged entries up \
                 to {}",
                f.acknowledged
            );
            s.group.members[f.slot()] = Some(coordinator);
            let leader = s.group.wait_leader(0, Duration::from_secs(20)).await;
            s.group
                .wait_caught_up(f.id, leader, Duration::from_secs(30))
                .await;
            members_agree(&s.group, leader, &[wave_id])
                .await
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            Outcome::CaughtUp(opened)
        }
    }
}

/// Stops the running follower (SIGTERM) after reading the commit index it reports.
async fn stop(s: &mut Scenario, f: &mut Follower) {
    let status = cluster_status(s.group.url(f.id)).await.unwrap();
    f.acknowledged = status.commit_index;
    let mut coordinator = s.group.members[f.slot()].take().unwrap();
    assert!(
        coordinator.proc.child.try_wait().unwrap().is_none(),
        "member {} stopped by itself",
        f.id
    );
    assert!(
        coordinator.proc.terminate(Duration::from_secs(15)),
        "no clean stop"
    );
    f.stopped = Some(coordinator);
}

/// The documented way out for the stopped follower: `venomctl cluster remove`, wipe its
/// data dir, `venomctl cluster add`, start it with `--join`. Returns once it caught up
/// (it runs, in the group), with how long that took.
async fn rejoin(s: &mut Scenario, f: &mut Follower) -> Duration {
    let urls = s.group.all_urls();
    let id = f.id.to_string();
    let (ok, out, err) = venomctl(&urls, &["cluster", "remove", &id]);
    assert!(ok, "cluster remove: {out}{err}");
    std::fs::remove_dir_all(&f.data_dir).unwrap();
    let address = format!("127.0.0.1:{}", f.port);
    let (ok, out, err) = venomctl(&urls, &["cluster", "add", &id, &address]);
    assert!(ok, "cluster add: {out}{err}");
    let t_join = Instant::now();
    let mut joined =
        Coordinator::start_member(f.id, f.port, &s.group.peers_arg(), &f.data_dir, &["--join"])
            .unwrap();
    // Later restarts keep the start line that says which log it verified.
    if let Some(old) = f.stopped.take() {
        joined.log_filter = old.log_filter.clone();
    }
    s.group.members[f.slot()] = Some(joined);
    let leader = s.group.wait_leader(0, Duration::from_secs(20)).await;
    s.group
        .wait_caught_up(f.id, leader, Duration::from_secs(30))
        .await;
    t_join.elapsed()
}

/// The start of a refusal, up to where the way out begins.
fn brief(refusal: &str) -> &str {
    let cut = refusal
        .find(". Venom does not")
        .or_else(|| refusal.find(". It must not"))
        .unwrap_or(refusal.len().min(300));
    &refusal[..cut]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_with_a_flipped_byte_refuses_or_catches_up_and_rejoins_the_documented_way() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let mut s = Scenario::start("corruption", &[], &[], 4).await;
    let records = s.records_dir("w");
    let spec = format!(
        "name = \"w\"\n[[task]]\nid = \"t\"\narray = 20\nrun = '''{}'''\n",
        record_only(&records)
    );
    let wave_id = s.submit(&spec, &records, &[("t", Some(20))]).await;
    s.group
        .wait_finished(wave_id, Duration::from_secs(60))
        .await;
    let leader = s.group.wait_leader(0, Duration::from_secs(20)).await;
    let id = s.group.ids().into_iter().find(|&id| id != leader).unwrap();
    s.group
        .wait_caught_up(id, leader, Duration::from_secs(30))
        .await;
    let slot = (id - 1) as usize;
    let member = s.group.members[slot].as_mut().unwrap();
    // Its start line says which log it verified.
    member.log_filter = format!("{},venom_coordinator::datadir=info", test_log_filter());
    let mut f = Follower {
        id,
        port: member.port,
        data_dir: member.data_dir.clone(),
        stopped: None,
        acknowledged: 0,
    };
    stop(&mut s, &mut f).await;
    let data_dir = f.data_dir.clone();
    let untouched = s.root.join("untouched");
    restore(&data_dir, &untouched);
    // A data dir found damaged, as the refusal left it (with its marker).
    let refused_copy = s.root.join("refused");

    let mut lines = Vec::new();
    let (mut n_refused, mut n_ran, mut n_refused_later) = (0, 0, 0);
    for target in [Target::Db, Target::Snapshot, Target::Blob] {
        for position in [Position::Head, Position::Middle, Position::Tail] {
            restore(&untouched, &data_dir);
            let Some(file) = target.file(&data_dir) else {
                lines.push(format!("{target:?}: sled wrote no such file"));
                break;
            };
            let len = std::fs::metadata(&file).unwrap().len();
            let offset = flip_byte(&file, position);
            let what = format!(
                "{target:?} {position:?} ({} byte {offset} of {len})",
                file_name(&file)
            );
            match start(&mut s, &mut f, wave_id, &what).await {
                Outcome::Refused(refusal) => {
                    n_refused += 1;
                    if refusal.contains(" is damaged: ") {
                        restore(&data_dir, &refused_copy);
                    }
                    lines.push(format!("{what}: refused, exit 78: {}", brief(&refusal)));
                }
                Outcome::CaughtUp(opened) => {
                    n_ran += 1;
                    // What it wrote while running sits beside the flipped byte: it must
                    // hold at the next start too (or be refused).
                    stop(&mut s, &mut f).await;
                    let again = format!("{what}, started again");
                    let next = match start(&mut s, &mut f, wave_id, &again).await {
                        Outcome::CaughtUp(_) => {
                            stop(&mut s, &mut f).await;
                            "started again and caught up again".to_string()
                        }
                        Outcome::Refused(refusal) => {
                            n_refused_later += 1;
                            rejoin(&mut s, &mut f).await;
                            stop(&mut s, &mut f).await;
                            format!(
                                "refused at the next start, exit 78: {}; removed, wiped, added \
                                 back and joined",
                                brief(&refusal)
                            )
                        }
                    };
                    lines.push(format!(
                        "{what}: started on a log ending at {opened}, caught up, agreed with \
                         the leader; {next}"
                    ));
                    // The copy to damage next holds what it acknowledged since.
                    restore(&data_dir, &untouched);
                }
            }
        }
    }
    for line in &lines {
        eprintln!("corruption: {line}");
    }
    assert!(
        refused_copy.exists(),
        "no flipped byte was found damaged at open: the test damaged nothing sled reads"
    );

    // The refusal stands at the next start (sled's recovery may have rewritten the damaged
    // part meanwhile): the refused copy is refused again.
    restore(&refused_copy, &data_dir);
    match start(&mut s, &mut f, wave_id, "the refused copy again").await {
        Outcome::Refused(refusal) => assert!(
            refusal.contains("an earlier start found it damaged"),
            "{refusal}"
        ),
        Outcome::CaughtUp(_) => panic!("a data dir found damaged was used at the next start"),
    }

    // The way out.
    let caught_up = rejoin(&mut s, &mut f).await;
    s.finish(
        0,
        &format!(
            "{n_refused} of {} flipped bytes refused at start with exit 78; {n_ran} started, \
             caught up and agreed ({n_refused_later} of them refused at the start after); the \
             refused data dir refused again; removed, wiped, added back and joined: caught up \
             in {} ms",
            n_refused + n_ran,
            caught_up.as_millis()
        ),
        "",
    )
    .await;
    // Founding members' logs start after index 1: it can only have caught up by snapshot.
    stop(&mut s, &mut f).await;
    let (store, verified) = Store::open_verified(&data_dir).unwrap();
    assert!(verified.first_index > 2, "{verified:?}");
    assert!(store.persisted_applied().unwrap() > 1);
}
