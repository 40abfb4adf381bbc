//! Commands that talk to the coordinator cluster: submitting and following waves,
//! inspecting tasks, logs, nodes and the raft cluster.
//!
//! Each is a thin sequence of RPCs through [`Client`] (which finds the leader) and a
//! rendering through [`crate::output`]; the JSON documents are the `…View` structs there.

use std::io::Write;
use std::path::Path;

use anyhow::Context as _;
use serde::Serialize;
use tracing::Instrument as _;
use venom_core::TaskState;
use venom_proto as pb;

use super::wavefile::{self, submit_limits, WaveFile};
use super::Context;
use crate::args::{ClusterAction, SubmitArgs, TaskRef};
use crate::client::{Client, Retry};
use crate::output::{
    as_word, checked_traceparent, placed, print_json, render_cluster, render_nodes, render_tasks,
    render_wave, render_waves, ClusterView, NodeView, TaskView, WaveView,
};
use crate::watch::{self, exit_code_for, Progress};

/// What `submit` prints without `--wait`/`--watch` under `--output json`.
#[derive(Debug, Serialize)]
pub struct SubmittedView {
    pub wave_id: u64,
    pub name: String,
    pub n_micro_tasks: u64,
    pub warnings: Vec<String>,
}

/// How `submit` and `dev` follow a submitted wave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Follow {
    /// Print the id and return.
    No,
    /// Block quietly until it finishes.
    Wait,
    /// Progress bars until it finishes.
    Watch,
}

/// A W3C `traceparent` from the environment (`TRACEPARENT`, as CI systems and `otel-cli`
/// set it), so a wave joins the caller's trace; empty when unset or not a valid one.
pub fn traceparent_from_env() -> String {
    std::env::var("TRACEPARENT")
        .ok()
        .and_then(|value| checked_traceparent(&value))
        .unwrap_or_default()
}

/// A fresh submission id: 16 random bytes as 32 hex characters, drawn once per submit
/// and resent on every retry of it (`SubmitWaveRequest.submission_id`).
pub fn new_submission_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// `venomctl submit FILE [--wait|--watch] [--submission-id ID]`.
pub async fn submit(ctx: &Context, args: &SubmitArgs) -> anyhow::Result<u8> {
    let follow = if args.watch {
        Follow::Watch
    } else if args.wait {
        Follow::Wait
    } else {
        Follow::No
    };
    let file = WaveFile::read(&args.file)?;
    let submission_id = args.submission_id.clone().unwrap_or_else(new_submission_id);
    let mut client = ctx.client()?;
    submit_file(ctx, &mut client, &file, &submission_id, follow).await
}

/// Validates `file` locally, submits it as `submission_id`, and follows it as asked;
/// returns the exit code.
///
/// The id makes the submit idempotent, so any failure that may have left it applied (the
/// member went away, leadership changed) is retried, on another member if need be, with
/// the same id: the cluster answers the wave the first attempt created, if it did.
pub async fn submit_file(
    ctx: &Context,
    client: &mut Client,
    file: &WaveFile,
    submission_id: &str,
    follow: Follow,
) -> anyhow::Result<u8> {
    let spec = file
        .parse(&submit_limits())
        .map_err(|err| anyhow::anyhow!("{}: {err}", file.path.display()))?;
    // The root of the wave's trace (or a child of the caller's `TRACEPARENT`).
    let span = tracing::info_span!(
        target: venom_telemetry::TARGET,
        "submit",
        otel.kind = "client",
        venom.wave.name = %spec.name,
        venom.wave.file = %file.path.display(),
        venom.wave.id = tracing::field::Empty,
        venom.micro_tasks = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
        otel.status_message = tracing::field::Empty,
    );
    let from_env = traceparent_from_env();
    venom_telemetry::set_parent(&span, &from_env);
    let request = pb::SubmitWaveRequest {
        spec: file.text.clone().into_bytes(),
        format: file.wire_format().to_owned(),
        traceparent: venom_telemetry::traceparent(&span).unwrap_or(from_env),
        submission_id: submission_id.to_owned(),
    };
    tracing::debug!(submission_id, "submitting");
    let response = client
        .call(Retry::Safe, |mut rpc| {
            let request = request.clone();
            async move { rpc.submit_wave(request).await }
        })
        .instrument(span.clone())
        .await
        .with_context(|| format!("submitting {}", file.path.display()));
    let response = match response {
        Ok(response) => {
            // As i64: OpenTelemetry attributes have no unsigned integers.
            span.record("venom.wave.id", response.wave_id as i64);
            span.record("venom.micro_tasks", response.n_micro_tasks as i64);
            response
        }
        Err(err) => {
            span.record("otel.status_code", "ERROR");
            span.record("otel.status_message", format!("{err:#}").as_str());
            return Err(err);
        }
    };
    drop(span);
    for warning in &response.warnings {
        eprintln!("warning: {warning}");
    }
    let wave_id = response.wave_id;
    if follow == Follow::No {
        if ctx.json() {
            print_json(&SubmittedView {
                wave_id,
                name: spec.name.clone(),
                n_micro_tasks: response.n_micro_tasks,
                warnings: response.warnings.clone(),
            })?;
        } else {
            // The id alone on stdout (`WAVE=$(venomctl submit f.toml)`); the words on stderr.
            println!("{wave_id}");
            eprintln!(
                "submitted wave {wave_id} \"{}\" ({} micro-tasks); follow it with `venomctl wait {wave_id}`",
                spec.name, response.n_micro_tasks
            );
        }
        return Ok(0);
    }
    if !ctx.json() {
        eprintln!(
            "submitted wave {wave_id} \"{}\" ({} micro-tasks)",
            spec.name, response.n_micro_tasks
        );
    }
    follow_wave(ctx, client, wave_id, follow == Follow::Watch).await
}

/// Follows a wave to its end (with progress bars if `watch`), prints the final summary
/// and returns the outcome's exit code.
pub async fn follow_wave(
    ctx: &Context,
    client: &mut Client,
    wave_id: u64,
    watch: bool,
) -> anyhow::Result<u8> {
    let view = if watch {
        let mut progress = Progress::new(wave_id);
        let result = watch::follow(client, wave_id, |event| progress.update(event)).await;
        progress.finish();
        result?
    } else {
        watch::follow(client, wave_id, |_| {}).await?
    };
    if ctx.json() {
        print_json(&view)?;
    } else {
        print!("{}", render_wave(&view));
    }
    Ok(exit_code_for(view.state))
}

/// `venomctl wait WAVE`.
pub async fn wait(ctx: &Context, wave_id: u64) -> anyhow::Result<u8> {
    let mut client = ctx.client()?;
    follow_wave(ctx, &mut client, wave_id, false).await
}

async fn get_wave(client: &mut Client, wave_id: u64) -> anyhow::Result<WaveView> {
    let summary = client
        .call(Retry::Safe, move |mut rpc| async move {
            rpc.get_wave(pb::GetWaveRequest { wave_id }).await
        })
        .await?;
    WaveView::try_from(&summary).with_context(|| format!("the summary of wave {wave_id}"))
}

/// `venomctl status WAVE`.
pub async fn status(ctx: &Context, wave_id: u64) -> anyhow::Result<u8> {
    let mut client = ctx.client()?;
    let view = get_wave(&mut client, wave_id).await?;
    if ctx.json() {
        print_json(&view)?;
    } else {
        print!("{}", render_wave(&view));
    }
    Ok(0)
}

/// `venomctl waves`.
pub async fn waves(ctx: &Context) -> anyhow::Result<u8> {
    let mut client = ctx.client()?;
    let response = client
        .call(Retry::Safe, |mut rpc| async move {
            rpc.list_waves(pb::ListWavesRequest {}).await
        })
        .await?;
    let mut waves = response
        .waves
        .iter()
        .map(|wave| {
            WaveView::try_from(wave)
                .with_context(|| format!("the summary of wave {}", wave.wave_id))
        })
        .collect::<anyhow::Result<Vec<WaveView>>>()?;
    waves.sort_by_key(|wave| wave.wave_id);
    if ctx.json() {
        print_json(&waves)?;
    } else {
        print!("{}", render_waves(&waves));
    }
    Ok(0)
}

/// `venomctl tasks WAVE`.
pub async fn tasks(ctx: &Context, wave_id: u64) -> anyhow::Result<u8> {
    let mut client = ctx.client()?;
    let response = client
        .call(Retry::Safe, move |mut rpc| async move {
            rpc.list_tasks(pb::ListTasksRequest { wave_id }).await
        })
        .await?;
    let mut tasks = response
        .tasks
        .iter()
        .map(|task| {
            TaskView::try_from(task)
                .with_context(|| format!("micro-task {} of wave {wave_id}", task.micro))
        })
        .collect::<anyhow::Result<Vec<TaskView>>>()?;
    tasks.sort_by_key(|task| task.micro);
    if ctx.json() {
        print_json(&tasks)?;
    } else {
        print!("{}", render_tasks(&tasks));
    }
    Ok(0)
}

/// `venomctl logs` under `--output json`.
#[derive(Debug, Serialize)]
struct LogsView {
    wave_id: u64,
    task: String,
    attempt: u32,
    #[serde(serialize_with = "as_word")]
    state: TaskState,
    node: String,
    stdout: String,
    stderr: String,
    stdout_truncated: bool,
    stderr_truncated: bool,
}

/// `venomctl logs WAVE TASK[INDEX]`: stdout then stderr of the latest attempt.
pub async fn logs(ctx: &Context, wave_id: u64, task: &TaskRef) -> anyhow::Result<u8> {
    let mut client = ctx.client()?;
    let request = pb::GetLogsRequest {
        wave_id,
        task_id: task.task_id.clone(),
        index: task.index,
    };
    let response = client
        .call(Retry::Safe, |mut rpc| {
            let request = request.clone();
            async move { rpc.get_logs(request).await }
        })
        .await?;
    let state = TaskState::try_from(response.state())
        .with_context(|| format!("the logs of {task} in wave {wave_id}"))?;
    if ctx.json() {
        print_json(&LogsView {
            wave_id,
            task: task.to_string(),
            attempt: response.attempt,
            state,
            node: response.node.clone(),
            stdout: String::from_utf8_lossy(&response.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&response.stderr).into_owned(),
            stdout_truncated: response.stdout_truncated,
            stderr_truncated: response.stderr_truncated,
        })?;
        return Ok(0);
    }
    let mut out = std::io::stdout().lock();
    write_logs(&mut out, task, state, &response)?;
    out.flush()?;
    Ok(0)
}

/// Writes one attempt's output (its micro-task now in `state`): a header line per stream,
/// truncation marked in it.
pub fn write_logs(
    out: &mut impl Write,
    task: &TaskRef,
    state: TaskState,
    logs: &pb::GetLogsResponse,
) -> std::io::Result<()> {
    let node = if logs.node.is_empty() {
        "-"
    } else {
        logs.node.as_str()
    };
    writeln!(
        out,
        "==> {task}: attempt {}, node {node}, {} <==",
        logs.attempt,
        state.as_str()
    )?;
    for (name, bytes, truncated) in [
        ("stdout", &logs.stdout, logs.stdout_truncated),
        ("stderr", &logs.stderr, logs.stderr_truncated),
    ] {
        let mark = if truncated {
            " (truncated: only the last part was kept)"
        } else {
            ""
        };
        let empty = if bytes.is_empty() { " (empty)" } else { "" };
        writeln!(out, "--- {name}{mark}{empty} ---")?;
        out.write_all(bytes)?;
        if !bytes.is_empty() && !bytes.ends_with(b"\n") {
            writeln!(out)?;
        }
    }
    Ok(())
}

/// `venomctl cancel WAVE`.
pub async fn cancel(ctx: &Context, wave_id: u64) -> anyhow::Result<u8> {
    let mut client = ctx.client()?;
    let response = client
        .call(Retry::Safe, move |mut rpc| async move {
            rpc.cancel_wave(pb::CancelWaveRequest { wave_id }).await
        })
        .await?;
    if ctx.json() {
        #[derive(Serialize)]
        struct Cancelled {
            wave_id: u64,
            n_cancelled: u64,
        }
        print_json(&Cancelled {
            wave_id,
            n_cancelled: response.n_cancelled,
        })?;
    } else {
        println!(
            "cancelled wave {wave_id}: {} micro-tasks cancelled",
            response.n_cancelled
        );
    }
    Ok(0)
}

/// `venomctl nodes`.
pub async fn nodes(ctx: &Context) -> anyhow::Result<u8> {
    let mut client = ctx.client()?;
    let nodes = node_views(&list_nodes(&mut client).await?)?;
    if ctx.json() {
        print_json(&nodes)?;
    } else {
        print!("{}", render_nodes(&nodes));
    }
    Ok(0)
}

/// `venomctl monitor --cluster DURATION`: every node's health from the coordinator, once a
/// second (θ as last reported by each worker's heartbeat).
pub async fn monitor_cluster(ctx: &Context, duration: std::time::Duration) -> anyhow::Result<u8> {
    #[derive(Serialize)]
    struct Sample<'a> {
        t_s: u64,
        nodes: &'a [NodeView],
    }
    let mut client = ctx.client()?;
    let started = std::time::Instant::now();
    let interval = std::time::Duration::from_secs(1);
    let mut tick = 1u32;
    if !ctx.json() {
        println!(
            "{:>6}  {:<16} {:<9} {:>6}  {:>6}  {:>6}  {:>6}  {:<10}  {:>7}  {:>7}  {:>6}",
            "T",
            "NODE",
            "STATE",
            "θ",
            "H_CPU",
            "H_MEM",
            "H_TERM",
            "MODE",
            "SLOTS",
            "RUNNING",
            "QUEUED"
        );
    }
    loop {
        let next = started + interval * tick;
        tokio::time::sleep(next.saturating_duration_since(std::time::Instant::now())).await;
        let nodes = node_views(&list_nodes(&mut client).await?)?;
        let t_s = started.elapsed().as_secs();
        if ctx.json() {
            // JSON lines: one compact document per sample, so it can be streamed.
            println!("{}", serde_json::to_string(&Sample { t_s, nodes: &nodes })?);
        } else {
            if nodes.is_empty() {
                println!("{t_s:>5}s  (no nodes registered)");
            }
            for n in &nodes {
                println!(
                    "{:>5}s  {:<16} {:<9} {:>6.3}  {:>6.3}  {:>6.3}  {:>6.3}  {:<10}  {:>7}  {:>7}  {:>6}",
                    t_s,
                    n.name,
                    n.state.as_str(),
                    n.theta,
                    n.h_cpu,
                    n.h_mem,
                    n.h_term,
                    n.mode.as_str(),
                    format!("{}/{}", n.throttled_slots, n.slots),
                    n.running,
                    n.queued
                );
            }
        }
        std::io::stdout().flush()?;
        if started.elapsed() + std::time::Duration::from_millis(10) >= duration {
            return Ok(0);
        }
        tick += 1;
    }
}

/// The coordinator's node list.
pub async fn list_nodes(client: &mut Client) -> anyhow::Result<Vec<pb::NodeInfo>> {
    Ok(client
        .call(Retry::Safe, |mut rpc| async move {
            rpc.list_nodes(pb::ListNodesRequest {}).await
        })
        .await?
        .nodes)
}

/// The coordinator's nodes as views, by name.
fn node_views(nodes: &[pb::NodeInfo]) -> anyhow::Result<Vec<NodeView>> {
    let mut views = nodes
        .iter()
        .map(|node| NodeView::try_from(node).with_context(|| format!("node {}", node.name)))
        .collect::<anyhow::Result<Vec<NodeView>>>()?;
    views.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(views)
}

/// `venomctl drain NODE [--undo]`.
pub async fn drain(ctx: &Context, name: &str, drain: bool) -> anyhow::Result<u8> {
    let mut client = ctx.client()?;
    let request = pb::DrainNodeRequest {
        name: name.to_owned(),
        drain,
    };
    client
        .call(Retry::Safe, |mut rpc| {
            let request = request.clone();
            async move { rpc.drain_node(request).await }
        })
        .await?;
    if ctx.json() {
        #[derive(Serialize)]
        struct Drained<'a> {
            node: &'a str,
            draining: bool,
        }
        print_json(&Drained {
            node: name,
            draining: drain,
        })?;
    } else if drain {
        println!("node {name} is draining: no new work, running work finishes");
    } else {
        println!("node {name} takes new work again");
    }
    Ok(0)
}

/// `venomctl cluster [add ID ADDRESS | remove ID]`.
pub async fn cluster(ctx: &Context, action: Option<ClusterAction>) -> anyhow::Result<u8> {
    let mut client = ctx.client()?;
    match action {
        None => {}
        Some(ClusterAction::Add { id, address }) => {
            client
                .call(Retry::RefusalsOnly, |mut rpc| {
                    let address = address.clone();
                    async move { rpc.add_member(pb::AddMemberRequest { id, address }).await }
                })
                .await?;
            if !ctx.json() {
                println!(
                    "coordinator {id} added at {address}; start it with --id {id} --join \
                     (and --peers naming the current members)\n"
                );
            }
        }
        Some(ClusterAction::Remove { id }) => {
            client
                .call(Retry::RefusalsOnly, |mut rpc| async move {
                    rpc.remove_member(pb::RemoveMemberRequest { id }).await
                })
                .await?;
            if !ctx.json() {
                println!("coordinator {id} removed; it can be stopped now\n");
            }
        }
    }
    let response = client
        .call(Retry::Safe, |mut rpc| async move {
            rpc.cluster_status(pb::ClusterStatusRequest { all_members: true })
                .await
        })
        .await?;
    let view = ClusterView::try_from(&response).context("the cluster status")?;
    if ctx.json() {
        print_json(&view)?;
    } else {
        print!("{}", render_cluster(&view));
    }
    Ok(0)
}

/// `venomctl graph FILE|WAVE`: a file's full DAG, or a submitted wave's tasks (no edges:
/// the coordinator serves progress, not dependencies).
pub async fn graph(ctx: &Context, target: &str) -> anyhow::Result<u8> {
    let path = Path::new(target);
    if path.exists() {
        return wavefile::graph_file(path);
    }
    let Ok(wave_id) = target.parse::<u64>() else {
        anyhow::bail!("{target}: no such wave file (and not a wave id)");
    };
    let mut client = ctx.client()?;
    let wave = get_wave(&mut client, wave_id).await?;
    print!("{}", wave_dot(&wave));
    Ok(0)
}

/// DOT for a submitted wave: one box per spec task, coloured by progress, no edges.
pub fn wave_dot(wave: &WaveView) -> String {
    let escape = |text: &str| text.replace('\\', "\\\\").replace('"', "\\\"");
    let mut dot = format!("digraph \"{}\" {{\n", escape(&wave.name));
    dot.push_str(&format!(
        "  // wave {} ({}): dependencies are not served by the coordinator; graph the wave file for edges.\n",
        wave.wave_id,
        wave.state.as_str()
    ));
    dot.push_str("  rankdir=LR;\n  node [shape=box, style=filled];\n");
    for group in &wave.groups {
        let c = &group.counts;
        let colour = if c.failed > 0 {
            "salmon"
        } else if placed(c) > 0 {
            "lightblue"
        } else if c.succeeded == u64::from(group.n_micro_tasks) {
            "palegreen"
        } else if c.skipped + c.cancelled > 0 {
            "lightgrey"
        } else {
            "white"
        };
        dot.push_str(&format!(
            "  \"{}\" [label=\"{}\\n{}/{} done\", fillcolor=\"{colour}\"];\n",
            escape(&group.task_id),
            escape(&group.task_id),
            c.terminal(),
            group.n_micro_tasks
        ));
    }
    dot.push_str("}\n");
    dot
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::output::GroupView;
    use venom_core::{Counts, WaveState};

    #[test]
    fn logs_mark_truncation_and_keep_order() {
        let logs = pb::GetLogsResponse {
            attempt: 2,
            stdout: b"line 1\nline 2".to_vec(),
            stderr: Vec::new(),
            stdout_truncated: true,
            stderr_truncated: false,
            state: pb::TaskState::Succeeded.into(),
            node: "dev".into(),
        };
        let mut out = Vec::new();
        let task = TaskRef {
            task_id: "shard".into(),
            index: Some(7),
        };
        write_logs(&mut out, &task, TaskState::Succeeded, &logs).expect("writes to memory");
        let text = String::from_utf8(out).expect("utf-8");
        assert_eq!(
            text,
            "==> shard[7]: attempt 2, node dev, succeeded <==\n\
             --- stdout (truncated: only the last part was kept) ---\n\
             line 1\nline 2\n\
             --- stderr (empty) ---\n"
        );
    }

    #[test]
    fn wave_dot_colours_groups() {
        let wave = WaveView::for_tests(
            9,
            "n\"q",
            WaveState::Running,
            vec![
                GroupView {
                    task_id: "a".into(),
                    n_micro_tasks: 1,
                    counts: Counts {
                        succeeded: 1,
                        ..Counts::default()
                    },
                },
                GroupView {
                    task_id: "b".into(),
                    n_micro_tasks: 2,
                    counts: Counts {
                        running: 1,
                        pending: 1,
                        ..Counts::default()
                    },
                },
            ],
        );
        let dot = wave_dot(&wave);
        assert!(dot.starts_with("digraph \"n\\\"q\" {"), "{dot}");
        assert!(
            dot.contains("\"a\" [label=\"a\\n1/1 done\", fillcolor=\"palegreen\"]"),
            "{dot}"
        );
        assert!(
            dot.contains("\"b\" [label=\"b\\n0/2 done\", fillcolor=\"lightblue\"]"),
            "{dot}"
        );
        assert!(!dot.contains("->"));
    }

    #[test]
    fn traceparents_are_checked() {
        let good = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(
            checked_traceparent(&format!(" {good}\n")).as_deref(),
            Some(good)
        );
        assert_eq!(checked_traceparent("00-abc-def-01"), None);
        assert_eq!(checked_traceparent(""), None);
    }
}
