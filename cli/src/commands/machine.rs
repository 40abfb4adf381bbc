//! The prototype's commands, now on real measurements of this machine: `scan`,
//! `compress`, `monitor` and `config`.
//!
//! The hardware profile and θ come from the worker's own scanner and θ sampler, and the
//! figures from the Möbius model the coordinator runs (`venom_core::mobius`), so what
//! `venomctl scan` shows is exactly what this machine would report and be credited with as
//! a worker. The model's S_Total is labelled as the model's figure: it is not a measured
//! speed-up.

use std::io::Write as _;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde::Serialize;
use venom_coordinator::config::defaults as coordinator_defaults;
use venom_core::mobius::{
    compress_hours, node_model, throttle_factor, Mode, ModelFigures, NodeModelInput,
    ThrottlePolicy, EWMA_ALPHA, HYSTERESIS, PAUSE_THETA,
};
use venom_core::wave::WaveLimits;
use venom_worker::scan::HardwareProfile;
use venom_worker::theta::{ThetaSampler, ThetaSnapshot};

use super::Context;
use crate::output::{as_word, fmt_bytes, fmt_factor, print_json, Table, LABEL_MODEL};

/// How long a one-off θ reading measures CPU utilisation over.
const THETA_WINDOW_MS: u64 = 500;
/// `monitor` samples this often.
const MONITOR_INTERVAL_MS: u64 = 1_000;
/// 2^30: GiB.
const GIB: f64 = (1u64 << 30) as f64;

/// The prototype's three reference devices: (name, cores, memory GiB, θ).
pub const REFERENCE_PROFILES: [(&str, u32, f64, f64); 3] = [
    ("Raspberry Pi 4", 4, 4.0, 0.61),
    ("laptop", 8, 16.0, 0.77),
    ("cloud server", 32, 64.0, 0.915),
];

/// Scans the hardware and takes one θ reading (blocking: sampling waits briefly).
fn measure_machine() -> (HardwareProfile, ThetaSnapshot) {
    let profile = venom_worker::scan::scan();
    // The sampler takes its first CPU reading when created; utilisation is measured
    // from then to the sample.
    let mut sampler = ThetaSampler::new();
    std::thread::sleep(Duration::from_millis(THETA_WINDOW_MS));
    let snapshot = sampler.sample();
    (profile, snapshot)
}

async fn measure_machine_async() -> anyhow::Result<(HardwareProfile, ThetaSnapshot)> {
    tokio::task::spawn_blocking(measure_machine)
        .await
        .context("the hardware scan failed")
}

/// The model's input for this machine.
pub fn model_input(profile: &HardwareProfile, theta: f64) -> NodeModelInput {
    NodeModelInput {
        physical_cores: profile.cpu_physical_cores.max(1),
        logical_cores: profile.cpu_logical_cores.max(1),
        memory_gib: profile.memory_total_bytes as f64 / GIB,
        gpus: u32::try_from(profile.gpus.len()).unwrap_or(u32::MAX),
        theta,
    }
}

/// The model's figures for the JSON documents.
#[derive(Debug, Clone, Serialize)]
pub struct FiguresView {
    pub theta: f64,
    #[serde(serialize_with = "as_word")]
    pub mode: Mode,
    pub theta_factor: f64,
    pub n: u32,
    pub lambda: f64,
    pub p: f64,
    pub s_a: f64,
    pub s_total: f64,
}

impl From<&ModelFigures> for FiguresView {
    fn from(f: &ModelFigures) -> Self {
        Self {
            theta: f.theta,
            mode: f.mode,
            theta_factor: f.theta_factor,
            n: f.n,
            lambda: f.lambda,
            p: f.p,
            s_a: f.s_a,
            s_total: f.s_total,
        }
    }
}

/// One θ reading (the worker's own snapshot) and the mode it falls in.
#[derive(Debug, Clone, Serialize)]
pub struct HealthView<'a> {
    #[serde(flatten)]
    pub reading: &'a ThetaSnapshot,
    #[serde(serialize_with = "as_word")]
    pub mode: Mode,
}

impl<'a> From<&'a ThetaSnapshot> for HealthView<'a> {
    fn from(reading: &'a ThetaSnapshot) -> Self {
        Self {
            reading,
            mode: Mode::from_theta(reading.theta),
        }
    }
}

#[derive(Serialize)]
struct ScanReport<'a> {
    profile: &'a HardwareProfile,
    health: HealthView<'a>,
    model: FiguresView,
}

/// `venomctl scan`.
pub async fn scan(ctx: &Context) -> anyhow::Result<u8> {
    let (profile, snapshot) = measure_machine_async().await?;
    let figures = node_model(&model_input(&profile, snapshot.theta));
    if ctx.json() {
        print_json(&ScanReport {
            profile: &profile,
            health: HealthView::from(&snapshot),
            model: FiguresView::from(&figures),
        })?;
        return Ok(0);
    }
    print!("{}", render_scan(&profile, &snapshot, &figures));
    Ok(0)
}

fn render_scan(
    profile: &HardwareProfile,
    snapshot: &ThetaSnapshot,
    figures: &ModelFigures,
) -> String {
    let p = profile;
    let mut fields: Vec<(&str, String)> = vec![
        ("host", p.hostname.clone()),
        (
            "os",
            format!(
                "{} (kernel {})",
                if p.os_version.contains(&p.os_name) {
                    p.os_version.clone()
                } else {
                    format!("{} {}", p.os_name, p.os_version)
                },
                p.kernel_version
            ),
        ),
        (
            "cpu",
            format!("{} {} ({})", p.cpu_vendor, p.cpu_brand, p.cpu_arch),
        ),
        (
            "cores",
            format!(
                "{} physical, {} logical{}, {} usable{}",
                p.cpu_physical_cores,
                p.cpu_logical_cores,
                if p.hyperthreading {
                    " (hyperthreading)"
                } else {
                    ""
                },
                p.effective_cpus,
                if p.cgroup_cpu_quota > 0.0 {
                    format!(" (cgroup quota {:.2} cores)", p.cgroup_cpu_quota)
                } else {
                    String::new()
                }
            ),
        ),
        ("frequency", format!("{} MHz", p.cpu_frequency_mhz)),
        (
            "memory",
            format!(
                "{} total, {} available, swap {} / {}",
                fmt_bytes(p.memory_total_bytes),
                fmt_bytes(p.memory_available_bytes),
                fmt_bytes(p.swap_free_bytes),
                fmt_bytes(p.swap_total_bytes)
            ),
        ),
    ];
    if p.cgroup_memory_limit_bytes > 0 {
        fields.push(("cgroup memory", fmt_bytes(p.cgroup_memory_limit_bytes)));
    }
    let gpus = if p.gpus.is_empty() {
        "none detected".to_owned()
    } else {
        p.gpus
            .iter()
            .map(|g| {
                format!(
                    "{} {} ({})",
                    g.backend,
                    g.name,
                    fmt_bytes(g.memory_total_bytes)
                )
            })
            .collect::<Vec<_>>()
            .join("; ")
    };
    fields.push(("gpus", gpus));
    let thermal = if p.has_thermal_sensor {
        p.thermal_sensors
            .iter()
            .map(|s| format!("{} {:.0}°C", s.label, s.celsius))
            .collect::<Vec<_>>()
            .join(", ")
    } else {
        "no sensor (H_TERM counts as 1.0)".to_owned()
    };
    fields.push(("thermal", thermal));
    let mut environment = vec![];
    if !p.virtualization.is_empty() {
        environment.push(format!("virtualization {}", p.virtualization));
    }
    if p.in_docker {
        environment.push("docker".to_owned());
    }
    if p.in_kubernetes {
        environment.push("kubernetes".to_owned());
    }
    if !environment.is_empty() {
        fields.push(("environment", environment.join(", ")));
    }
    fields.extend(health_fields(snapshot));
    fields.extend(model_fields(figures));
    let mut out = String::from("this machine\n");
    out.push_str(&aligned(&fields));
    out
}

fn health_fields(s: &ThetaSnapshot) -> Vec<(&'static str, String)> {
    vec![(
        "health",
        format!(
            "θ {:.3} = 0.3·H_CPU {:.3} + 0.3·H_MEM {:.3} + 0.4·H_TERM {:.3}",
            s.theta, s.h_cpu, s.h_mem, s.h_term
        ),
    )]
}

fn model_fields(f: &ModelFigures) -> Vec<(&'static str, String)> {
    vec![
        ("mode", format!("{} (Θ(θ) = {:.3})", f.mode, f.theta_factor)),
        ("N (logical CPUs)", f.n.to_string()),
        ("Λ (λ-wrapping)", format!("{:.1}", f.lambda)),
        ("P (parallel fraction)", format!("{:.4}", f.p)),
        ("S_A (Amdahl)", format!("{:.3}", f.s_a)),
        (LABEL_MODEL, fmt_factor(f.s_total)),
    ]
}

fn aligned(fields: &[(&str, String)]) -> String {
    let width = fields
        .iter()
        .map(|(k, _)| k.chars().count())
        .max()
        .unwrap_or(0);
    fields
        .iter()
        .map(|(k, v)| format!("  {k}{}  {v}\n", " ".repeat(width - k.chars().count())))
        .collect()
}

/// One row of `compress`.
#[derive(Debug, Clone, Serialize)]
pub struct CompressionRow {
    pub profile: String,
    pub physical_cores: u32,
    pub memory_gib: f64,
    pub figures: FiguresView,
    pub hours: f64,
    pub compressed_hours: f64,
    pub reduction_percent: f64,
}

/// The model's compression of `hours` for one profile.
pub fn compression_row(profile: &str, input: &NodeModelInput, hours: f64) -> CompressionRow {
    let figures = node_model(input);
    let compressed_hours = compress_hours(hours, figures.s_total);
    CompressionRow {
        profile: profile.to_owned(),
        physical_cores: input.physical_cores,
        memory_gib: input.memory_gib,
        figures: FiguresView::from(&figures),
        hours,
        compressed_hours,
        reduction_percent: if hours > 0.0 {
            100.0 * (1.0 - compressed_hours / hours)
        } else {
            0.0
        },
    }
}

/// The reference rows for `hours`.
pub fn reference_rows(hours: f64) -> Vec<CompressionRow> {
    REFERENCE_PROFILES
        .iter()
        .map(|&(name, cores, memory_gib, theta)| {
            let input = NodeModelInput {
                physical_cores: cores,
                logical_cores: cores,
                memory_gib,
                gpus: 0,
                theta,
            };
            compression_row(&format!("{name} (reference)"), &input, hours)
        })
        .collect()
}

/// Hours for people: `5.56 h`, `17.4 min`, `1.6 s`.
pub fn fmt_hours(hours: f64) -> String {
    if hours >= 1.0 {
        format!("{hours:.2} h")
    } else if hours * 60.0 >= 1.0 {
        format!("{:.1} min", hours * 60.0)
    } else {
        format!("{:.1} s", hours * 3_600.0)
    }
}

/// `venomctl compress HOURS`.
pub async fn compress(ctx: &Context, hours: f64) -> anyhow::Result<u8> {
    let (profile, snapshot) = measure_machine_async().await?;
    let mut rows = vec![compression_row(
        "this machine",
        &model_input(&profile, snapshot.theta),
        hours,
    )];
    rows.extend(reference_rows(hours));
    if ctx.json() {
        print_json(&rows)?;
    } else {
        print!("{}", render_compression(&rows));
    }
    Ok(0)
}

pub fn render_compression(rows: &[CompressionRow]) -> String {
    let mut table = Table::new(&[
        "PROFILE",
        ">N",
        ">Λ",
        ">P",
        ">θ",
        "MODE",
        ">S_TOTAL (model)",
        ">T",
        ">T / S_TOTAL",
        ">REDUCTION",
    ]);
    for row in rows {
        let f = &row.figures;
        table.row(vec![
            row.profile.clone(),
            f.n.to_string(),
            format!("{:.0}", f.lambda),
            format!("{:.2}", f.p),
            format!("{:.3}", f.theta),
            f.mode.as_str().to_owned(),
            fmt_factor(f.s_total),
            fmt_hours(row.hours),
            fmt_hours(row.compressed_hours),
            format!("{:.1} %", row.reduction_percent),
        ]);
    }
    let mut out = table.render();
    out.push_str(
        "S_TOTAL is the Möbius model's figure, not a measurement; `venomctl status WAVE` shows \
         what a wave really achieved beside it.\n",
    );
    out
}

/// `venomctl monitor [DURATION]`: one line (or JSON object) per second.
pub async fn monitor(ctx: &Context, duration: Duration) -> anyhow::Result<u8> {
    let json = ctx.json();
    tokio::task::spawn_blocking(move || monitor_blocking(json, duration))
        .await
        .context("the monitor thread failed")??;
    Ok(0)
}

fn monitor_blocking(json: bool, duration: Duration) -> anyhow::Result<()> {
    let mut sampler = ThetaSampler::new();
    let interval = Duration::from_millis(MONITOR_INTERVAL_MS);
    let started = Instant::now();
    let mut stdout = std::io::stdout().lock();
    if !json {
        writeln!(
            stdout,
            "{:>6}  {:>6}  {:>6}  {:>6}  {:>6}  {:<10}  {:>6}  {:>10}  {:>6}",
            "T", "θ", "H_CPU", "H_MEM", "H_TERM", "MODE", "CPU %", "MEM FREE", "TEMP"
        )?;
    }
    let mut tick = 1u32;
    loop {
        let next = started + interval * tick;
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
        let snapshot = sampler.sample();
        let view = HealthView::from(&snapshot);
        if json {
            // JSON lines: one compact document per sample, so it can be streamed.
            writeln!(stdout, "{}", serde_json::to_string(&view)?)?;
        } else {
            let s = view.reading;
            writeln!(
                stdout,
                "{:>5}s  {:>6.3}  {:>6.3}  {:>6.3}  {:>6.3}  {:<10}  {:>6.1}  {:>10}  {:>6}",
                started.elapsed().as_secs(),
                s.theta,
                s.h_cpu,
                s.h_mem,
                s.h_term,
                view.mode.as_str(),
                s.cpu_usage_percent,
                fmt_bytes(s.memory_available_bytes),
                s.hottest_celsius
                    .map_or("-".to_owned(), |c| format!("{c:.0}°C"))
            )?;
        }
        stdout.flush()?;
        if started.elapsed() + Duration::from_millis(10) >= duration {
            return Ok(());
        }
        tick += 1;
    }
}

#[derive(Serialize)]
struct ConfigView {
    coordinators: Vec<String>,
    output: &'static str,
    machine: MachineView,
    throttle: ThrottleView,
    wave_limits: LimitsView,
    coordinator_defaults: CoordinatorDefaultsView,
}

#[derive(Serialize)]
struct MachineView {
    default_slots: u32,
    physical_cores: u32,
    logical_cores: u32,
    memory_total_bytes: u64,
}

#[derive(Serialize)]
struct ThrottleView {
    default_policy: String,
    policies: Vec<String>,
    /// Share of slots usable per mode (adaptive).
    factors: Vec<(String, f64)>,
    pause_below_theta: f64,
    ewma_alpha: f64,
    hysteresis: f64,
}

#[derive(Serialize)]
struct LimitsView {
    max_spec_bytes: usize,
    max_micro_tasks: u64,
    max_array: u32,
    max_tasks: usize,
}

#[derive(Serialize)]
struct CoordinatorDefaultsView {
    worker_lease_ms: u64,
    max_micro_tasks: u64,
    max_spec_bytes: usize,
    max_message_bytes: usize,
    tick_ms: u64,
}

/// `venomctl config`.
pub async fn config(ctx: &Context) -> anyhow::Result<u8> {
    let profile = tokio::task::spawn_blocking(venom_worker::scan::scan)
        .await
        .context("the hardware scan failed")?;
    let limits = WaveLimits::default();
    let modes = [
        Mode::Optimize,
        Mode::Wrap,
        Mode::Balance,
        Mode::Transition,
        Mode::Unwrap,
    ];
    let view = ConfigView {
        coordinators: ctx.global.coordinator.clone(),
        output: ctx.global.output.as_str(),
        machine: MachineView {
            default_slots: profile.effective_cpus.max(1),
            physical_cores: profile.cpu_physical_cores,
            logical_cores: profile.cpu_logical_cores,
            memory_total_bytes: profile.memory_total_bytes,
        },
        throttle: ThrottleView {
            default_policy: ThrottlePolicy::default().as_str().to_owned(),
            policies: ThrottlePolicy::ALL
                .iter()
                .map(|p| p.as_str().to_owned())
                .collect(),
            factors: modes
                .iter()
                .map(|&mode| (mode.as_str().to_owned(), throttle_factor(mode)))
                .collect(),
            pause_below_theta: PAUSE_THETA,
            ewma_alpha: EWMA_ALPHA,
            hysteresis: HYSTERESIS,
        },
        wave_limits: LimitsView {
            max_spec_bytes: limits.max_spec_bytes,
            max_micro_tasks: limits.max_micro_tasks,
            max_array: limits.max_array,
            max_tasks: limits.max_tasks,
        },
        coordinator_defaults: CoordinatorDefaultsView {
            worker_lease_ms: coordinator_defaults::WORKER_LEASE_MS,
            max_micro_tasks: coordinator_defaults::MAX_MICRO_TASKS,
            max_spec_bytes: coordinator_defaults::MAX_SPEC_BYTES,
            max_message_bytes: coordinator_defaults::MAX_MESSAGE_BYTES,
            tick_ms: coordinator_defaults::TICK_MS,
        },
    };
    if ctx.json() {
        print_json(&view)?;
        return Ok(0);
    }
    let factors: Vec<String> = view
        .throttle
        .factors
        .iter()
        .map(|(mode, factor)| format!("{mode} {factor:.2}"))
        .collect();
    let fields: Vec<(&str, String)> = vec![
        ("coordinators", view.coordinators.join(", ")),
        ("output", view.output.to_owned()),
        (
            "this machine",
            format!(
                "{} default slots ({} physical / {} logical cores, {} memory)",
                view.machine.default_slots,
                view.machine.physical_cores,
                view.machine.logical_cores,
                fmt_bytes(view.machine.memory_total_bytes)
            ),
        ),
        (
            "throttle policy",
            format!(
                "{} by default (one of {})",
                view.throttle.default_policy,
                view.throttle.policies.join(", ")
            ),
        ),
        (
            "usable slots",
            format!("ceil(slots × f(mode)): {}", factors.join(", ")),
        ),
        (
            "pausing",
            format!(
                "no new work below θ {} (smoothed: EWMA α {}, hysteresis {})",
                view.throttle.pause_below_theta, view.throttle.ewma_alpha, view.throttle.hysteresis
            ),
        ),
        (
            "wave limits",
            format!(
                "{} per file, {} micro-tasks, array ≤ {}, {} tasks",
                fmt_bytes(view.wave_limits.max_spec_bytes as u64),
                view.wave_limits.max_micro_tasks,
                view.wave_limits.max_array,
                view.wave_limits.max_tasks
            ),
        ),
        (
            "coordinator defaults",
            format!(
                "worker lease {} ms, messages ≤ {}, raft tick {} ms",
                view.coordinator_defaults.worker_lease_ms,
                fmt_bytes(view.coordinator_defaults.max_message_bytes as u64),
                view.coordinator_defaults.tick_ms
            ),
        ),
    ];
    print!("{}", aligned(&fields));
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_rows_reproduce_the_prototype() {
        let rows = reference_rows(840.0);
        // The prototype's rows: Λ, P, S_Total (and 840 h → 5.6 h, 0.29 h, 0.03 h).
        let expect = [
            (50.0, 0.65, 151.0),
            (400.0, 0.80, 2_900.0),
            (832.0, 0.95, 31_322.0),
        ];
        assert_eq!(rows.len(), expect.len());
        for (row, (lambda, p, s_total)) in rows.iter().zip(expect) {
            assert!((row.figures.lambda - lambda).abs() < 1e-9, "{row:?}");
            assert!((row.figures.p - p).abs() < 1e-9, "{row:?}");
            assert!(
                (row.figures.s_total / s_total - 1.0).abs() < 0.01,
                "{row:?}"
            );
            assert!(
                (row.compressed_hours * s_total / 840.0 - 1.0).abs() < 0.01,
                "{row:?}"
            );
        }
        assert!((rows[0].compressed_hours - 5.6).abs() < 0.05);
        assert!((rows[1].compressed_hours - 0.29).abs() < 0.005);
        let text = render_compression(&rows);
        assert!(text.contains("Raspberry Pi 4 (reference)"), "{text}");
        assert!(
            text.contains("31,322×") || text.contains("31,321×"),
            "{text}"
        );
    }

    #[test]
    fn hours_format_for_people() {
        assert_eq!(fmt_hours(5.56), "5.56 h");
        assert_eq!(fmt_hours(0.29), "17.4 min");
        assert_eq!(fmt_hours(0.0004), "1.4 s");
    }
}
