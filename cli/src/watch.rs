//! Following a wave until it finishes, and showing its progress.
//!
//! [`follow`] consumes the coordinator's `WatchWave` stream. The stream may break when a
//! coordinator dies or loses leadership; `follow` then reconnects (through
//! [`Client`](crate::client::Client), so it finds the new leader) and resumes — every
//! event is a full snapshot, so nothing needs replaying. Snapshots whose enums this build
//! cannot read are not drawn; the final one must be readable. [`Progress`] turns events into
//! indicatif bars on a terminal (overall, one per spec task, one line per node) or into
//! occasional plain lines when stderr is a log file.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use venom_core::{Counts, WaveState};
use venom_proto as pb;

use crate::client::{Client, Retry};
use crate::output::{node_line, placed, NodeView, WaveView};

/// Consecutive broken streams tolerated before giving up (each waits longer).
const MAX_STREAM_FAILURES: u32 = 20;
/// Longest pause between reconnection attempts.
const MAX_RECONNECT_PAUSE_MS: u64 = 2_000;
/// Most per-task bars drawn at once; bigger waves show the busiest tasks.
const MAX_GROUP_BARS: usize = 10;
/// Plain-line progress prints at most this often.
const LINE_INTERVAL_MS: u64 = 1_000;

/// Follows wave `wave_id` until it reaches a final state, calling `on_event` with every
/// snapshot, and returns the final summary.
pub async fn follow(
    client: &mut Client,
    wave_id: u64,
    mut on_event: impl FnMut(&pb::WatchWaveEvent),
) -> anyhow::Result<WaveView> {
    let mut n_failures: u32 = 0;
    loop {
        let mut stream = client
            .call(Retry::Safe, move |mut rpc| async move {
                rpc.watch_wave(pb::WatchWaveRequest { wave_id }).await
            })
            .await?;
        let why = loop {
            match stream.message().await {
                Ok(Some(event)) => {
                    n_failures = 0;
                    on_event(&event);
                    if let Some(wave) = &event.wave {
                        if WaveState::try_from(wave.state()).is_ok_and(WaveState::is_terminal) {
                            return WaveView::try_from(wave)
                                .with_context(|| format!("the final summary of wave {wave_id}"));
                        }
                    }
                }
                Ok(None) => break "the stream ended before the wave finished".to_owned(),
                Err(status) if status.code() == tonic::Code::NotFound => {
                    bail!("{}", status.message())
                }
                Err(status) => break format!("{}: {}", status.code(), status.message()),
            };
        };
        n_failures += 1;
        if n_failures > MAX_STREAM_FAILURES {
            bail!("lost the progress stream of wave {wave_id}: {why}");
        }
        tracing::debug!(wave_id, %why, "progress stream broke; reconnecting");
        client.reset();
        let pause_ms = (100u64 << n_failures.min(5)).min(MAX_RECONNECT_PAUSE_MS);
        tokio::time::sleep(Duration::from_millis(pause_ms)).await;
    }
}

/// Exit code for a wave's final state: 0 when it succeeded, 1 otherwise.
pub fn exit_code_for(state: WaveState) -> u8 {
    if state == WaveState::Succeeded {
        0
    } else {
        1
    }
}

/// Live progress of one wave on stderr.
pub enum Progress {
    /// Progress bars on a terminal.
    Bars(Bars),
    /// Occasional lines when stderr is not a terminal.
    Lines(Lines),
}

impl Progress {
    /// Bars when stderr is a terminal, lines otherwise.
    pub fn new(wave_id: u64) -> Self {
        if std::io::stderr().is_terminal() {
            Progress::Bars(Bars::new(ProgressDrawTarget::stderr()))
        } else {
            Progress::Lines(Lines::new(wave_id))
        }
    }

    pub fn update(&mut self, event: &pb::WatchWaveEvent) {
        match self {
            Progress::Bars(bars) => bars.update(event),
            Progress::Lines(lines) => lines.update(event),
        }
    }

    /// Leaves the last state on screen.
    pub fn finish(self) {
        match self {
            Progress::Bars(bars) => bars.finish(),
            Progress::Lines(lines) => lines.finish(),
        }
    }
}

/// indicatif bars: overall, one per spec task (up to [`MAX_GROUP_BARS`]), one line per node.
pub struct Bars {
    multi: MultiProgress,
    overall: ProgressBar,
    /// One bar per displayed spec task, created with the first event.
    group_bars: Vec<ProgressBar>,
    /// "… and K more tasks" when the wave has more spec tasks than bars.
    more: Option<ProgressBar>,
    /// One line per node, by name.
    nodes: BTreeMap<String, ProgressBar>,
    started: bool,
}

fn bar_style() -> ProgressStyle {
    ProgressStyle::with_template("{prefix:>16.bold} [{bar:32.cyan/blue}] {pos:>6}/{len:<6} {msg}")
        .expect("the template is valid")
        .progress_chars("=> ")
}

fn text_style() -> ProgressStyle {
    ProgressStyle::with_template("{prefix:>16.bold} {msg}").expect("the template is valid")
}

/// Shortens a label to fit the 16-column prefix.
fn fit(label: &str) -> String {
    if label.chars().count() <= 16 {
        label.to_owned()
    } else {
        let head: String = label.chars().take(15).collect();
        format!("{head}…")
    }
}

fn counts_message(counts: &Counts) -> String {
    let mut parts = vec![format!("{} running", counts.running)];
    if counts.assigned > 0 {
        parts.push(format!("{} queued", counts.assigned));
    }
    if counts.failed > 0 {
        parts.push(format!("{} failed", counts.failed));
    }
    if counts.skipped > 0 {
        parts.push(format!("{} skipped", counts.skipped));
    }
    if counts.cancelled > 0 {
        parts.push(format!("{} cancelled", counts.cancelled));
    }
    parts.join(", ")
}

impl Bars {
    pub fn new(target: ProgressDrawTarget) -> Self {
        let multi = MultiProgress::with_draw_target(target);
        let overall = multi.add(ProgressBar::new(0));
        overall.set_style(
            ProgressStyle::with_template(
                "{prefix:>16.bold} [{bar:32.green/blue}] {pos:>6}/{len:<6} {msg} ({elapsed})",
            )
            .expect("the template is valid")
            .progress_chars("=> "),
        );
        overall.set_prefix("wave");
        overall.enable_steady_tick(Duration::from_millis(250));
        Self {
            multi,
            overall,
            group_bars: Vec::new(),
            more: None,
            nodes: BTreeMap::new(),
            started: false,
        }
    }

    pub fn update(&mut self, event: &pb::WatchWaveEvent) {
        if let Some(Ok(wave)) = event.wave.as_ref().map(WaveView::try_from) {
            if !self.started {
                self.started = true;
                self.overall
                    .set_prefix(fit(&format!("wave {}", wave.wave_id)));
                for _ in 0..wave.groups.len().min(MAX_GROUP_BARS) {
                    let bar = self.multi.add(ProgressBar::new(0));
                    bar.set_style(bar_style());
                    self.group_bars.push(bar);
                }
                if wave.groups.len() > MAX_GROUP_BARS {
                    let more = self.multi.add(ProgressBar::new(0));
                    more.set_style(text_style());
                    self.more = Some(more);
                }
            }
            self.overall.set_length(wave.n_micro_tasks);
            self.overall.set_position(wave.counts.terminal());
            self.overall.set_message(format!(
                "{} · {}",
                wave.state.as_str(),
                counts_message(&wave.counts)
            ));
            let shown = groups_to_show(&wave, self.group_bars.len());
            for (bar, &group_index) in self.group_bars.iter().zip(&shown) {
                let group = &wave.groups[group_index];
                bar.set_prefix(fit(&group.task_id));
                bar.set_length(u64::from(group.n_micro_tasks));
                bar.set_position(group.counts.terminal());
                bar.set_message(counts_message(&group.counts));
            }
            if let Some(more) = &self.more {
                let hidden: Vec<usize> = (0..wave.groups.len())
                    .filter(|i| !shown.contains(i))
                    .collect();
                let n_done = hidden
                    .iter()
                    .filter(|&&i| {
                        let g = &wave.groups[i];
                        g.counts.terminal() >= u64::from(g.n_micro_tasks)
                    })
                    .count();
                more.set_prefix("…");
                more.set_message(format!(
                    "{} more tasks ({} finished, {} waiting)",
                    hidden.len(),
                    n_done,
                    hidden.len() - n_done
                ));
            }
        }
        for node in event
            .nodes
            .iter()
            .filter_map(|n| NodeView::try_from(n).ok())
        {
            let bar = self.nodes.entry(node.name.clone()).or_insert_with(|| {
                let bar = self.multi.add(ProgressBar::new(0));
                bar.set_style(text_style());
                bar.set_prefix(fit(&format!("node {}", node.name)));
                bar
            });
            bar.set_message(node_line(&node));
        }
    }

    pub fn finish(self) {
        self.overall.abandon();
        for bar in self
            .group_bars
            .iter()
            .chain(self.more.iter())
            .chain(self.nodes.values())
        {
            bar.abandon();
        }
        // indicatif leaves the cursor at the end of the last bar; what follows (the
        // summary on stdout) must start on a line of its own.
        if !self.multi.is_hidden() {
            eprintln!();
        }
    }
}

/// Which spec tasks get the `n_bars` bars: all in file order when they fit, otherwise
/// the busiest (placed or ready) first, then those still waiting (both in file order),
/// then finished ones, latest first.
pub fn groups_to_show(wave: &WaveView, n_bars: usize) -> Vec<usize> {
    let mut indexes: Vec<usize> = (0..wave.groups.len()).collect();
    if indexes.len() > n_bars {
        indexes.sort_by_key(|&i| {
            let g = &wave.groups[i];
            if placed(&g.counts) + g.counts.ready > 0 {
                (0, i)
            } else if g.counts.terminal() < u64::from(g.n_micro_tasks) {
                (1, i)
            } else {
                // Finished: the most recently reached (latest in the file) first.
                (2, usize::MAX - i)
            }
        });
        indexes.truncate(n_bars);
        indexes.sort_unstable();
    }
    indexes
}

/// Plain progress lines for logs: printed when the counts change, at most once a second.
pub struct Lines {
    wave_id: u64,
    started_at: Instant,
    last_printed_at: Option<Instant>,
    last_line: String,
    pending_line: Option<String>,
}

impl Lines {
    pub fn new(wave_id: u64) -> Self {
        Self {
            wave_id,
            started_at: Instant::now(),
            last_printed_at: None,
            last_line: String::new(),
            pending_line: None,
        }
    }

    pub fn update(&mut self, event: &pb::WatchWaveEvent) {
        let Some(Ok(wave)) = event.wave.as_ref().map(WaveView::try_from) else {
            return;
        };
        let line = format!(
            "wave {}: {} · {}/{} done · {}",
            self.wave_id,
            wave.state.as_str(),
            wave.counts.terminal(),
            wave.n_micro_tasks,
            counts_message(&wave.counts)
        );
        if line == self.last_line {
            return;
        }
        let due = match self.last_printed_at {
            Some(at) => at.elapsed() >= Duration::from_millis(LINE_INTERVAL_MS),
            None => true,
        };
        if due || wave.state.is_terminal() {
            self.print(line);
        } else {
            self.pending_line = Some(line);
        }
    }

    fn print(&mut self, line: String) {
        eprintln!("[{:>7.1}s] {line}", self.started_at.elapsed().as_secs_f64());
        self.last_printed_at = Some(Instant::now());
        self.last_line = line;
        self.pending_line = None;
    }

    pub fn finish(mut self) {
        if let Some(line) = self.pending_line.take() {
            self.print(line);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::output::GroupView;

    fn group(task_id: &str, n: u32, done: u64, running: u64) -> GroupView {
        GroupView {
            task_id: task_id.into(),
            n_micro_tasks: n,
            counts: Counts {
                succeeded: done,
                running,
                pending: u64::from(n) - done - running,
                ..Counts::default()
            },
        }
    }

    #[test]
    fn busiest_groups_get_the_bars() {
        let wave = WaveView::for_tests(
            1,
            "chain",
            WaveState::Running,
            vec![
                group("t0", 1, 1, 0),
                group("t1", 1, 1, 0),
                group("t2", 1, 0, 1),
                group("t3", 1, 0, 0),
                group("t4", 1, 0, 0),
            ],
        );
        assert_eq!(groups_to_show(&wave, 10), vec![0, 1, 2, 3, 4]);
        assert_eq!(groups_to_show(&wave, 2), vec![2, 3]);
        assert_eq!(groups_to_show(&wave, 4), vec![1, 2, 3, 4]);
        assert_eq!(exit_code_for(WaveState::Succeeded), 0);
        assert_eq!(exit_code_for(WaveState::Failed), 1);
        assert_eq!(exit_code_for(WaveState::Cancelled), 1);
    }

    #[test]
    fn bars_accept_events_without_a_terminal() {
        let mut bars = Bars::new(ProgressDrawTarget::hidden());
        let summary = pb::WaveSummary {
            wave_id: 4,
            state: pb::WaveState::Running.into(),
            on_failure: pb::OnFailure::SkipDependents.into(),
            n_micro_tasks: 3,
            groups: vec![pb::TaskGroupProgress {
                task_id: "a-task-with-a-very-long-name".into(),
                n_micro_tasks: 3,
                counts: Some(pb::TaskCounts {
                    succeeded: 2,
                    running: 1,
                    ..Default::default()
                }),
            }],
            counts: Some(pb::TaskCounts {
                succeeded: 2,
                running: 1,
                ..Default::default()
            }),
            ..Default::default()
        };
        let event = pb::WatchWaveEvent {
            wave: Some(summary),
            nodes: vec![pb::NodeInfo {
                name: "dev".into(),
                state: pb::NodeState::Ready.into(),
                mode: pb::ThetaMode::Optimize.into(),
                policy: pb::ThrottlePolicy::Adaptive.into(),
                ..Default::default()
            }],
        };
        bars.update(&event);
        bars.update(&event);
        assert_eq!(bars.group_bars.len(), 1);
        assert_eq!(bars.group_bars[0].position(), 2);
        assert_eq!(bars.group_bars[0].prefix(), "a-task-with-a-v…");
        assert_eq!(bars.overall.length(), Some(3));
        assert_eq!(bars.nodes.len(), 1);
        bars.finish();
    }
}
