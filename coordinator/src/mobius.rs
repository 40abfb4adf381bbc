//! The Möbius model and per-node throttling, kept exactly as the prototype defined them.
//!
//! The model turns a node's hardware (physical and logical cores, memory, GPUs) and health θ
//! into the prototype's speed-up figure `S_Total = Θ(θ) · Λ · S_A`, per node and aggregated over
//! the cluster. It is the model's figure, not a promise: wherever it is shown, the measured
//! speed-up and the DAG's work–span bound ([`crate::wave::WaveSpec::work_and_span`]) are shown
//! beside it. The same θ also drives throttling: [`Throttle`] smooths a node's θ samples and
//! turns the resulting mode into a number of usable slots, with hysteresis so that a node under
//! its own steady load does not flap between modes. Pure arithmetic: no I/O, no clock; the
//! state machine feeds it the θ values the leader stamped into its commands.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The five operating modes, from the least to the most healthy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, PartialOrd, Ord, Hash)]
#[serde(rename_all = "UPPERCASE")]
pub enum Mode {
    /// θ < 0.3: the node is struggling.
    Unwrap,
    /// 0.3 ≤ θ < 0.5.
    Transition,
    /// 0.5 ≤ θ < 0.7.
    Balance,
    /// 0.7 ≤ θ < 0.9.
    Wrap,
    /// θ ≥ 0.9: the node is healthy.
    Optimize,
}

/// Lower θ bound of each mode above UNWRAP, in mode order.
const MODE_LOWER_BOUNDS: [(Mode, f64); 4] = [
    (Mode::Transition, 0.3),
    (Mode::Balance, 0.5),
    (Mode::Wrap, 0.7),
    (Mode::Optimize, 0.9),
];

impl Mode {
    /// The mode a θ falls in; NaN counts as the worst (UNWRAP).
    pub fn from_theta(theta: f64) -> Mode {
        MODE_LOWER_BOUNDS
            .iter()
            .rev()
            .find(|&&(_, lower)| theta >= lower)
            .map_or(Mode::Unwrap, |&(mode, _)| mode)
    }

    /// The θ range `[lower, upper)` of this mode (infinite at the ends).
    pub fn theta_range(self) -> (f64, f64) {
        match self {
            Mode::Unwrap => (f64::NEG_INFINITY, 0.3),
            Mode::Transition => (0.3, 0.5),
            Mode::Balance => (0.5, 0.7),
            Mode::Wrap => (0.7, 0.9),
            Mode::Optimize => (0.9, f64::INFINITY),
        }
    }

    /// The prototype's name: `UNWRAP`, `TRANSITION`, `BALANCE`, `WRAP`, `OPTIMIZE`.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Unwrap => "UNWRAP",
            Mode::Transition => "TRANSITION",
            Mode::Balance => "BALANCE",
            Mode::Wrap => "WRAP",
            Mode::Optimize => "OPTIMIZE",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Θ(θ), the compression factor of the five modes: 0.5 below 0.3; 0.5 → 1.0 linear over
/// [0.3, 0.5); 1.0 → 2.0 linear over [0.5, 0.7); 2.0 → 2.5 linear over [0.7, 0.9); 3.0 from 0.9
/// (the step from 2.5 to 3.0 at 0.9 is the prototype's). NaN gives 0.5.
pub fn theta_compression(theta: f64) -> f64 {
    // Linear from `from` at `lower` to `to` at `lower + 0.2`.
    let ramp = |lower: f64, from: f64, to: f64| from + (theta - lower) / 0.2 * (to - from);
    match Mode::from_theta(theta) {
        Mode::Unwrap => 0.5,
        Mode::Transition => ramp(0.3, 0.5, 1.0),
        Mode::Balance => ramp(0.5, 1.0, 2.0),
        Mode::Wrap => ramp(0.7, 2.0, 2.5),
        Mode::Optimize => 3.0,
    }
}

/// P, the parallel fraction: `min(0.95, 0.5 + 0.0375 · physical_cores)`.
pub fn parallel_fraction(physical_cores: u32) -> f64 {
    (0.5 + 0.0375 * f64::from(physical_cores)).min(0.95)
}

/// Λ, the prototype's λ-wrapping capacity:
/// `clamp(3.125 · physical_cores · memory_GiB · (1 + gpus), 10, 832)`. A negative or NaN memory
/// counts as 0.
pub fn lambda_wrap(physical_cores: u32, memory_gib: f64, gpus: u32) -> f64 {
    let memory_gib = if memory_gib.is_nan() { 0.0 } else { memory_gib.max(0.0) };
    (3.125 * f64::from(physical_cores) * memory_gib * (1.0 + f64::from(gpus))).clamp(10.0, 832.0)
}

/// Amdahl's law: `1 / ((1 − p) + p / n)`. `p` is clamped to [0, 1] (NaN counts as 0) and
/// `n = 0` counts as 1, so the result is always in [1, n].
pub fn amdahl(p: f64, n: u32) -> f64 {
    let p = if p.is_nan() { 0.0 } else { p.clamp(0.0, 1.0) };
    let n = f64::from(n.max(1));
    1.0 / ((1.0 - p) + p / n)
}

/// What the model needs to know about one node.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct NodeModelInput {
    /// Physical cores: drive P and Λ.
    pub physical_cores: u32,
    /// Logical CPUs: N, the parallelism in Amdahl's law.
    pub logical_cores: u32,
    /// Total memory in GiB: drives Λ.
    pub memory_gib: f64,
    /// GPUs: multiply Λ by `1 + gpus`.
    pub gpus: u32,
    /// Health θ in [0, 1].
    pub theta: f64,
}

/// Every figure of the model for one node or for the cluster.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ModelFigures {
    /// Health θ (for a cluster, the core-weighted mean).
    pub theta: f64,
    /// The mode θ falls in.
    pub mode: Mode,
    /// Θ(θ).
    pub theta_factor: f64,
    /// Λ (for a cluster, the sum over nodes).
    pub lambda: f64,
    /// P, the parallel fraction.
    pub p: f64,
    /// N, the parallelism (logical CPUs; for a cluster, the sum).
    pub n: u32,
    /// S_A = Amdahl(P, N).
    pub s_a: f64,
    /// S_Total = Θ(θ) · Λ · S_A.
    pub s_total: f64,
}

/// The model for one node. N is the node's logical CPUs as the design gives it (the physical
/// cores when no logical count is known); the three reference rows of the prototype have as many
/// logical as physical cores and all reproduce with it (see the tests).
pub fn node_model(input: &NodeModelInput) -> ModelFigures {
    let n = if input.logical_cores == 0 {
        input.physical_cores
    } else {
        input.logical_cores
    };
    figures(
        input.theta,
        lambda_wrap(input.physical_cores, input.memory_gib, input.gpus),
        parallel_fraction(input.physical_cores),
        n,
    )
}

/// The cluster aggregate over `nodes` (the ready ones): θ_c is the mean θ weighted by physical
/// cores (the plain mean if no node reports any), Λ_c = Σ Λ_i, N_c = Σ N_i, P from the total
/// physical cores, `S_Total_c = Θ(θ_c) · Λ_c · S_A(P, N_c)`. `None` for no nodes.
pub fn cluster_model(nodes: &[NodeModelInput]) -> Option<ModelFigures> {
    if nodes.is_empty() {
        return None;
    }
    let per_node: Vec<ModelFigures> = nodes.iter().map(node_model).collect();
    let total_cores: u64 = nodes.iter().map(|n| u64::from(n.physical_cores)).sum();
    let theta = if total_cores == 0 {
        nodes.iter().map(|n| n.theta).sum::<f64>() / nodes.len() as f64
    } else {
        nodes
            .iter()
            .map(|n| n.theta * f64::from(n.physical_cores))
            .sum::<f64>()
            / total_cores as f64
    };
    let lambda = per_node.iter().map(|f| f.lambda).sum();
    let n = per_node.iter().fold(0u32, |sum, f| sum.saturating_add(f.n));
    let p = parallel_fraction(u32::try_from(total_cores).unwrap_or(u32::MAX));
    Some(figures(theta, lambda, p, n))
}

fn figures(theta: f64, lambda: f64, p: f64, n: u32) -> ModelFigures {
    let theta_factor = theta_compression(theta);
    let s_a = amdahl(p, n);
    ModelFigures {
        theta,
        mode: Mode::from_theta(theta),
        theta_factor,
        lambda,
        p,
        n,
        s_a,
        s_total: theta_factor * lambda * s_a,
    }
}

/// The model's compression of `hours` of sequential work: `hours / s_total`. A non-positive or
/// NaN `s_total` compresses nothing (returns `hours`).
pub fn compress_hours(hours: f64, s_total: f64) -> f64 {
    if s_total > 0.0 {
        hours / s_total
    } else {
        hours
    }
}

/// How strongly a node's θ limits the work it is given (its `--throttle` flag).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ThrottlePolicy {
    /// θ is ignored: all slots are usable.
    Off,
    /// Mode thresholds shifted up by 0.1: the node backs off earlier.
    Conservative,
    /// The modes as they are.
    #[default]
    Adaptive,
    /// Never below half the slots and never paused.
    Aggressive,
}

impl ThrottlePolicy {
    /// All policies, in order of increasing eagerness.
    pub const ALL: [ThrottlePolicy; 4] = [
        ThrottlePolicy::Off,
        ThrottlePolicy::Conservative,
        ThrottlePolicy::Adaptive,
        ThrottlePolicy::Aggressive,
    ];

    /// The flag value: `off`, `conservative`, `adaptive` or `aggressive`.
    pub fn as_str(self) -> &'static str {
        match self {
            ThrottlePolicy::Off => "off",
            ThrottlePolicy::Conservative => "conservative",
            ThrottlePolicy::Adaptive => "adaptive",
            ThrottlePolicy::Aggressive => "aggressive",
        }
    }

    /// How much this policy shifts the mode thresholds up.
    fn threshold_shift(self) -> f64 {
        match self {
            ThrottlePolicy::Conservative => 0.1,
            _ => 0.0,
        }
    }
}

impl fmt::Display for ThrottlePolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A throttle policy name that is none of `off`, `conservative`, `adaptive`, `aggressive`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown throttle policy {0:?}: expected off, conservative, adaptive or aggressive")]
pub struct UnknownThrottlePolicy(pub String);

impl FromStr for ThrottlePolicy {
    type Err = UnknownThrottlePolicy;

    fn from_str(s: &str) -> Result<ThrottlePolicy, UnknownThrottlePolicy> {
        ThrottlePolicy::ALL
            .into_iter()
            .find(|policy| policy.as_str() == s)
            .ok_or_else(|| UnknownThrottlePolicy(s.to_owned()))
    }
}

/// The share of a node's slots usable in each mode: 1.0 in OPTIMIZE and WRAP, 0.75 in BALANCE,
/// 0.5 in TRANSITION, 0.25 in UNWRAP.
pub fn throttle_factor(mode: Mode) -> f64 {
    match mode {
        Mode::Optimize | Mode::Wrap => 1.0,
        Mode::Balance => 0.75,
        Mode::Transition => 0.5,
        Mode::Unwrap => 0.25,
    }
}

/// Weight of the newest θ sample in the moving average.
pub const EWMA_ALPHA: f64 = 0.3;
/// How far past a threshold the smoothed θ must go before the mode (or pause) changes.
pub const HYSTERESIS: f64 = 0.05;
/// Below this smoothed θ a node gets no new work (it is paused).
pub const PAUSE_THETA: f64 = 0.1;

/// One node's throttle state: the smoothed θ and the mode and pause decided from it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Throttle {
    /// Exponentially weighted moving average of θ (α = [`EWMA_ALPHA`]).
    pub ewma: f64,
    /// The current mode under the policy last observed with (thresholds shifted for
    /// `conservative`); changes only past the hysteresis band.
    pub mode: Mode,
    /// No new work: the (shifted) smoothed θ went below [`PAUSE_THETA`] and has not yet come
    /// back above it by the hysteresis band. Never set under `off` or `aggressive`.
    pub paused: bool,
}

impl Throttle {
    /// A throttle starting at `theta`, as under the `adaptive` policy.
    pub fn new(theta: f64) -> Throttle {
        Throttle::with_policy(theta, ThrottlePolicy::Adaptive)
    }

    /// A throttle starting at `theta` under `policy`. A NaN θ starts at 0 (the worst case).
    pub fn with_policy(theta: f64, policy: ThrottlePolicy) -> Throttle {
        let ewma = if theta.is_nan() { 0.0 } else { theta };
        let effective = ewma - policy.threshold_shift();
        Throttle {
            ewma,
            mode: Mode::from_theta(effective),
            paused: pauses(policy) && effective < PAUSE_THETA,
        }
    }

    /// Feeds one θ sample (EWMA α = 0.3) and moves the mode only when the smoothed θ (minus 0.1
    /// under `conservative`) leaves the current mode's range by more than [`HYSTERESIS`], so a
    /// node under its own steady load does not flap. Pausing starts below [`PAUSE_THETA`] and
    /// ends only above `PAUSE_THETA + HYSTERESIS`. A NaN sample is ignored.
    pub fn observe(&mut self, theta: f64, policy: ThrottlePolicy) {
        if theta.is_nan() {
            return;
        }
        self.ewma = EWMA_ALPHA * theta + (1.0 - EWMA_ALPHA) * self.ewma;
        let effective = self.ewma - policy.threshold_shift();
        let (lower, upper) = self.mode.theta_range();
        if effective < lower - HYSTERESIS || effective > upper + HYSTERESIS {
            self.mode = Mode::from_theta(effective);
        }
        self.paused = if !pauses(policy) {
            false
        } else if self.paused {
            effective <= PAUSE_THETA + HYSTERESIS
        } else {
            effective < PAUSE_THETA
        };
    }

    /// Slots a node offering `slots` may fill now: all of them under `off`; otherwise
    /// `ceil(slots × throttle_factor(mode))` and at least 1 (if `slots > 0`), with the factor
    /// never below 0.5 under `aggressive`; 0 while paused.
    pub fn usable_slots(&self, slots: u32, policy: ThrottlePolicy) -> u32 {
        if policy == ThrottlePolicy::Off || slots == 0 {
            return slots;
        }
        if self.paused && pauses(policy) {
            return 0;
        }
        let mut factor = throttle_factor(self.mode);
        if policy == ThrottlePolicy::Aggressive {
            factor = factor.max(0.5);
        }
        // The product is at most `slots`, so the cast back cannot truncate.
        let usable = (f64::from(slots) * factor).ceil() as u32;
        usable.clamp(1, slots)
    }
}

/// Whether `policy` ever pauses a node.
fn pauses(policy: ThrottlePolicy) -> bool {
    matches!(
        policy,
        ThrottlePolicy::Conservative | ThrottlePolicy::Adaptive
    )
}
