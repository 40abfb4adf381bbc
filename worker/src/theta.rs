//! The θ monitor: this node's health score, sampled continuously.
//!
//! θ = 0.3·H_CPU + 0.3·H_MEM + 0.4·H_TERM, each term in [0, 1]: H_CPU = 1 − CPU utilisation;
//! H_MEM = available / total memory, inside the cgroup memory limit when there is one;
//! H_TERM = (T_crit − T) / (T_crit − T_idle) clamped to [0, 1] for the hottest sensor, 1.0 on a
//! machine without sensors. The worker sends the latest θ in every heartbeat and the coordinator
//! throttles the node's slots from it (the Möbius model's modes, `venom_core::mobius`).
//!
//! The formula is a set of pure functions; [`ThetaSampler`] reads the machine once per call (the
//! CLI's `monitor` command), and [`ThetaMonitor`] runs a sampler on its own thread, keeping a
//! bounded history, so the agent's async loop never blocks on `/proc` or sysfs.

use std::collections::VecDeque;
use std::sync::{mpsc, Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sysinfo::{Components, CpuRefreshKind, MemoryRefreshKind, RefreshKind, System};

use crate::limits::HISTORY_CAPACITY;
use crate::scan::CgroupLimits;

/// Weight of H_CPU in θ.
pub const WEIGHT_CPU: f64 = 0.3;
/// Weight of H_MEM in θ.
pub const WEIGHT_MEM: f64 = 0.3;
/// Weight of H_TERM in θ.
pub const WEIGHT_TERM: f64 = 0.4;
/// The temperature at which H_TERM is 1.0.
pub const T_IDLE_CELSIUS: f64 = 40.0;
/// T_crit for a sensor that reports no critical temperature.
pub const DEFAULT_T_CRIT_CELSIUS: f64 = 95.0;

/// One θ reading and the terms it came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ThetaSnapshot {
    /// When it was taken, Unix milliseconds.
    pub at_ms: u64,
    pub theta: f64,
    pub h_cpu: f64,
    pub h_mem: f64,
    pub h_term: f64,
    /// Whole-machine CPU utilisation, 0–100.
    pub cpu_usage_percent: f64,
    /// Available memory, inside the cgroup limit when there is one.
    pub memory_available_bytes: u64,
    /// Total memory, capped by the cgroup limit when there is one.
    pub memory_total_bytes: u64,
    /// The hottest sensor's temperature; `None` when the machine has no sensor.
    pub hottest_celsius: Option<f64>,
}

/// θ from its three terms, each clamped to [0, 1] first.
pub fn theta_from(h_cpu: f64, h_mem: f64, h_term: f64) -> f64 {
    WEIGHT_CPU * unit(h_cpu) + WEIGHT_MEM * unit(h_mem) + WEIGHT_TERM * unit(h_term)
}

/// H_TERM for a temperature: `clamp((T_crit − T) / (T_crit − T_idle), 0, 1)`, 1.0 without a
/// sensor. A `t_crit` at or below T_idle (a sensor reporting nonsense) is replaced by the default.
pub fn h_term(t_celsius: Option<f64>, t_crit: f64) -> f64 {
    let Some(t_celsius) = t_celsius.filter(|t| t.is_finite()) else {
        return 1.0;
    };
    let t_crit = if t_crit.is_finite() && t_crit > T_IDLE_CELSIUS {
        t_crit
    } else {
        DEFAULT_T_CRIT_CELSIUS
    };
    unit((t_crit - t_celsius) / (t_crit - T_IDLE_CELSIUS))
}

/// H_CPU for a utilisation in percent.
pub fn h_cpu(cpu_usage_percent: f64) -> f64 {
    unit(1.0 - cpu_usage_percent / 100.0)
}

/// H_MEM = available / total; 1.0 when the total is unknown (no evidence of pressure).
pub fn h_mem(available_bytes: u64, total_bytes: u64) -> f64 {
    if total_bytes == 0 {
        return 1.0;
    }
    // Precision loss above 2^53 bytes is irrelevant for a ratio.
    #[allow(clippy::cast_precision_loss)]
    let ratio = available_bytes as f64 / total_bytes as f64;
    unit(ratio)
}

/// Clamps to [0, 1]; NaN counts as 0 (unhealthy rather than silently perfect).
fn unit(value: f64) -> f64 {
    if value.is_nan() {
        0.0
    } else {
        value.clamp(0.0, 1.0)
    }
}

/// Reads θ from the machine, one snapshot per call.
pub struct ThetaSampler {
    /// CPU and memory readings; CPU utilisation is measured between two refreshes.
    system: System,
    /// Temperature sensors, listed once and refreshed per sample.
    components: Components,
    /// The memory limit that bounds this process, detected once.
    cgroup: CgroupLimits,
    /// When the CPU counters were last read; utilisation needs a minimum interval.
    last_cpu_refresh: Instant,
}

impl Default for ThetaSampler {
    fn default() -> Self {
        Self::new()
    }
}

impl ThetaSampler {
    /// Lists the sensors and takes the first CPU reading.
    pub fn new() -> Self {
        let system = System::new_with_specifics(
            RefreshKind::nothing()
                .with_cpu(CpuRefreshKind::nothing().with_cpu_usage())
                .with_memory(MemoryRefreshKind::nothing().with_ram()),
        );
        Self {
            system,
            components: Components::new_with_refreshed_list(),
            cgroup: CgroupLimits::detect(),
            last_cpu_refresh: Instant::now(),
        }
    }

    /// Takes one snapshot. Sleeps first when the previous CPU reading is younger than sysinfo's
    /// minimum interval (only the first call after [`ThetaSampler::new`] in practice).
    pub fn sample(&mut self) -> ThetaSnapshot {
        let since_last = self.last_cpu_refresh.elapsed();
        if let Some(wait) = sysinfo::MINIMUM_CPU_UPDATE_INTERVAL.checked_sub(since_last) {
            std::thread::sleep(wait);
        }
        self.system.refresh_cpu_usage();
        self.last_cpu_refresh = Instant::now();
        self.system
            .refresh_memory_specifics(MemoryRefreshKind::nothing().with_ram());
        for component in self.components.list_mut() {
            component.refresh();
        }

        let cpu_usage_percent = f64::from(self.system.global_cpu_usage()).clamp(0.0, 100.0);
        let mut memory_total_bytes = self.system.total_memory();
        let mut memory_available_bytes = self.system.available_memory();
        if let Some(limit) = self.cgroup.memory_limit_bytes {
            memory_total_bytes = memory_total_bytes.min(limit);
            memory_available_bytes = memory_available_bytes.min(memory_total_bytes);
            if let Some(inside_limit) = self.cgroup.memory_available_bytes() {
                memory_available_bytes = memory_available_bytes.min(inside_limit);
            }
        }

        let hottest = self
            .components
            .iter()
            .filter_map(|component| {
                let celsius = f64::from(component.temperature()?);
                celsius
                    .is_finite()
                    .then(|| (celsius, component.critical().map(f64::from)))
            })
            .max_by(|a, b| a.0.total_cmp(&b.0));
        let hottest_celsius = hottest.map(|(celsius, _)| celsius);
        let t_crit = hottest
            .and_then(|(_, critical)| critical)
            .unwrap_or(DEFAULT_T_CRIT_CELSIUS);

        let h_cpu = h_cpu(cpu_usage_percent);
        let h_mem = h_mem(memory_available_bytes, memory_total_bytes);
        let h_term = h_term(hottest_celsius, t_crit);
        ThetaSnapshot {
            at_ms: crate::unix_now_ms(),
            theta: theta_from(h_cpu, h_mem, h_term),
            h_cpu,
            h_mem,
            h_term,
            cpu_usage_percent,
            memory_available_bytes,
            memory_total_bytes,
            hottest_celsius,
        }
    }
}

/// Appends a snapshot, dropping the oldest beyond [`HISTORY_CAPACITY`].
fn push_bounded(history: &mut VecDeque<ThetaSnapshot>, snapshot: ThetaSnapshot) {
    while history.len() >= HISTORY_CAPACITY {
        history.pop_front();
    }
    history.push_back(snapshot);
}

/// Samples θ on a background thread; stops (and joins the thread) when dropped.
pub struct ThetaMonitor {
    /// The last [`HISTORY_CAPACITY`] snapshots, oldest first.
    history: Arc<Mutex<VecDeque<ThetaSnapshot>>>,
    /// Dropping it wakes and ends the sampling thread.
    stop: Option<mpsc::Sender<()>>,
    /// The sampling thread; `None` if the OS refused to start it.
    thread: Option<JoinHandle<()>>,
}

impl ThetaMonitor {
    /// Starts sampling every `interval` (the first sample is taken at once).
    pub fn start(interval: Duration) -> ThetaMonitor {
        let history = Arc::new(Mutex::new(VecDeque::with_capacity(HISTORY_CAPACITY)));
        let (stop, stopped) = mpsc::channel::<()>();
        let shared = Arc::clone(&history);
        let spawned = std::thread::Builder::new()
            .name("venom-theta".to_owned())
            .spawn(move || {
                let mut sampler = ThetaSampler::new();
                loop {
                    let snapshot = sampler.sample();
                    push_bounded(
                        &mut shared.lock().unwrap_or_else(PoisonError::into_inner),
                        snapshot,
                    );
                    match stopped.recv_timeout(interval) {
                        Err(mpsc::RecvTimeoutError::Timeout) => continue,
                        Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => break,
                    }
                }
            });
        let thread = match spawned {
            Ok(thread) => Some(thread),
            Err(error) => {
                tracing::warn!(%error, "cannot start the θ sampling thread; θ stays unknown");
                None
            }
        };
        ThetaMonitor {
            history,
            stop: Some(stop),
            thread,
        }
    }

    /// The most recent snapshot, if one has been taken yet.
    pub fn latest(&self) -> Option<ThetaSnapshot> {
        self.history
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .back()
            .cloned()
    }

    /// Every kept snapshot, oldest first (at most [`HISTORY_CAPACITY`]).
    pub fn history(&self) -> Vec<ThetaSnapshot> {
        self.history
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .cloned()
            .collect()
    }
}

impl Drop for ThetaMonitor {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::warn!("the θ sampling thread panicked");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(at_ms: u64) -> ThetaSnapshot {
        ThetaSnapshot {
            at_ms,
            theta: 1.0,
            h_cpu: 1.0,
            h_mem: 1.0,
            h_term: 1.0,
            cpu_usage_percent: 0.0,
            memory_available_bytes: 1,
            memory_total_bytes: 1,
            hottest_celsius: None,
        }
    }

    #[test]
    fn theta_weights_the_three_terms() {
        assert!((theta_from(0.5, 0.5, 1.0) - 0.7).abs() < 1e-12);
        assert!((theta_from(1.0, 1.0, 1.0) - 1.0).abs() < 1e-12);
        assert!((theta_from(0.0, 0.0, 0.0)).abs() < 1e-12);
        assert!((theta_from(1.0, 0.0, 0.0) - 0.3).abs() < 1e-12);
        assert!((theta_from(0.0, 0.0, 1.0) - 0.4).abs() < 1e-12);
        // Out-of-range terms are clamped before weighting.
        assert!((theta_from(2.0, -1.0, 1.0) - 0.7).abs() < 1e-12);
    }

    #[test]
    fn h_term_is_linear_between_idle_and_critical() {
        assert_eq!(h_term(None, 95.0), 1.0);
        assert_eq!(h_term(Some(30.0), 95.0), 1.0);
        assert_eq!(h_term(Some(40.0), 95.0), 1.0);
        assert!((h_term(Some(67.5), 95.0) - 0.5).abs() < 1e-12);
        assert_eq!(h_term(Some(95.0), 95.0), 0.0);
        assert_eq!(h_term(Some(120.0), 95.0), 0.0);
        assert!((h_term(Some(70.0), 100.0) - 0.5).abs() < 1e-12);
        // A critical temperature below idle falls back to the default of 95 °C.
        assert!((h_term(Some(67.5), 20.0) - 0.5).abs() < 1e-12);
    }

    #[test]
    fn h_cpu_and_h_mem_are_fractions() {
        assert!((h_cpu(25.0) - 0.75).abs() < 1e-12);
        assert_eq!(h_cpu(150.0), 0.0);
        assert!((h_mem(1 << 30, 4 << 30) - 0.25).abs() < 1e-12);
        assert_eq!(h_mem(5, 0), 1.0);
        assert_eq!(h_mem(8, 4), 1.0);
    }

    #[test]
    fn history_keeps_only_the_last_hundred() {
        let mut history = VecDeque::new();
        for at_ms in 0..250 {
            push_bounded(&mut history, snapshot(at_ms));
        }
        assert_eq!(history.len(), HISTORY_CAPACITY);
        assert_eq!(history.front().map(|s| s.at_ms), Some(150));
        assert_eq!(history.back().map(|s| s.at_ms), Some(249));
    }

    #[test]
    fn sampler_reads_values_in_range() {
        let mut sampler = ThetaSampler::new();
        let first = sampler.sample();
        for value in [first.theta, first.h_cpu, first.h_mem, first.h_term] {
            assert!((0.0..=1.0).contains(&value), "{first:?}");
        }
        assert!(first.memory_total_bytes > 0);
        assert!(first.memory_available_bytes <= first.memory_total_bytes);
        let expected = theta_from(first.h_cpu, first.h_mem, first.h_term);
        assert!((first.theta - expected).abs() < 1e-12);
        assert!(first.at_ms > 1_600_000_000_000);
        let second = sampler.sample();
        assert!(second.at_ms >= first.at_ms);
    }

    #[test]
    fn monitor_samples_in_the_background_and_stops_on_drop() {
        let monitor = ThetaMonitor::start(Duration::from_millis(10));
        let deadline = Instant::now() + Duration::from_secs(10);
        while monitor.history().len() < 2 {
            assert!(Instant::now() < deadline, "no θ samples within 10 s");
            std::thread::sleep(Duration::from_millis(20));
        }
        let latest = monitor.latest().expect("a sample exists");
        assert!((0.0..=1.0).contains(&latest.theta));
        let history = monitor.history();
        assert!(history
            .windows(2)
            .all(|pair| pair[0].at_ms <= pair[1].at_ms));
        let started = Instant::now();
        drop(monitor);
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "drop must stop the thread promptly"
        );
    }
}
