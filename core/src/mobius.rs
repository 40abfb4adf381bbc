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
    let memory_gib = if memory_gib.is_nan() {
        0.0
    } else {
        memory_gib.max(0.0)
    };
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

/// The model for one node. N is the node's logical CPUs, as the model defines it (the physical
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

#[cfg(feature = "clap")]
impl clap::ValueEnum for ThrottlePolicy {
    fn value_variants<'a>() -> &'a [Self] {
        &ThrottlePolicy::ALL
    }

    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        let help = match self {
            ThrottlePolicy::Off => "Always offer every slot",
            ThrottlePolicy::Conservative => "Throttle earlier: mode thresholds shifted up by 0.1",
            ThrottlePolicy::Adaptive => "The standard thresholds",
            ThrottlePolicy::Aggressive => "Never throttle below half the slots",
        };
        Some(clap::builder::PossibleValue::new(self.as_str()).help(help))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn close(actual: f64, expected: f64, relative: f64) -> bool {
        (actual - expected).abs() <= relative * expected.abs()
    }

    fn node(cores: u32, memory_gib: f64, gpus: u32, theta: f64) -> NodeModelInput {
        NodeModelInput {
            physical_cores: cores,
            logical_cores: cores,
            memory_gib,
            gpus,
            theta,
        }
    }

    /// The prototype's three reference rows. Each has as many logical as physical cores, so N
    /// (logical CPUs, as the model defines it) equals the physical count, and all three reproduce
    /// within 0.2 % (151.2, 2,900.0, 31,322.4): N needs no reinterpretation.
    #[test]
    fn the_three_reference_rows_reproduce_within_one_percent() {
        let rows = [
            (
                "Raspberry Pi 4",
                node(4, 4.0, 0, 0.61),
                50.0,
                0.65,
                151.0,
                Mode::Balance,
            ),
            (
                "laptop",
                node(8, 16.0, 0, 0.77),
                400.0,
                0.80,
                2_900.0,
                Mode::Wrap,
            ),
            (
                "cloud",
                node(32, 64.0, 0, 0.915),
                832.0,
                0.95,
                31_322.0,
                Mode::Optimize,
            ),
        ];
        for (what, input, lambda, p, s_total, mode) in rows {
            let figures = node_model(&input);
            assert!(
                close(figures.lambda, lambda, 0.01),
                "{what}: Λ {}",
                figures.lambda
            );
            assert!(close(figures.p, p, 0.01), "{what}: P {}", figures.p);
            assert!(
                close(figures.s_total, s_total, 0.01),
                "{what}: S {}",
                figures.s_total
            );
            assert!(
                close(figures.s_total, s_total, 0.002),
                "{what}: S {}",
                figures.s_total
            );
            assert_eq!(figures.n, input.logical_cores, "{what}");
            assert_eq!(figures.mode, mode, "{what}");
            assert_eq!(figures.theta, input.theta);
            let product = figures.theta_factor * figures.lambda * figures.s_a;
            assert!(close(figures.s_total, product, 1e-12), "{what}");
        }
        // The prototype's compression line for the Pi: 840 h → 5.6 h.
        let pi = node_model(&node(4, 4.0, 0, 0.61));
        assert!(close(compress_hours(840.0, pi.s_total), 5.6, 0.01));
    }

    #[test]
    fn n_is_the_logical_cpu_count() {
        let input = NodeModelInput {
            physical_cores: 4,
            logical_cores: 8,
            memory_gib: 4.0,
            gpus: 0,
            theta: 0.61,
        };
        let figures = node_model(&input);
        assert_eq!(figures.n, 8);
        assert!(close(figures.s_a, amdahl(0.65, 8), 1e-12));
        assert!(close(figures.lambda, 50.0, 1e-12), "Λ uses physical cores");
        let unknown_logical = node_model(&NodeModelInput {
            logical_cores: 0,
            ..input
        });
        assert_eq!(unknown_logical.n, 4, "falls back to physical cores");
    }

    #[test]
    fn theta_compression_at_every_breakpoint() {
        for (theta, expected) in [
            (0.0, 0.5),
            (0.29, 0.5),
            (0.3, 0.5),
            (0.4, 0.75),
            (0.5, 1.0),
            (0.6, 1.5),
            (0.61, 1.55),
            (0.7, 2.0),
            (0.77, 2.175),
            (0.8, 2.25),
            (0.8999999, 2.5),
            (0.9, 3.0),
            (0.915, 3.0),
            (1.0, 3.0),
        ] {
            let actual = theta_compression(theta);
            assert!(
                close(actual, expected, 1e-6),
                "Θ({theta}) = {actual}, not {expected}"
            );
        }
        assert_eq!(theta_compression(f64::NAN), 0.5);
    }

    #[test]
    fn modes_switch_at_the_thresholds() {
        for (theta, mode) in [
            (-1.0, Mode::Unwrap),
            (0.0, Mode::Unwrap),
            (0.2999, Mode::Unwrap),
            (0.3, Mode::Transition),
            (0.4999, Mode::Transition),
            (0.5, Mode::Balance),
            (0.6999, Mode::Balance),
            (0.7, Mode::Wrap),
            (0.8999, Mode::Wrap),
            (0.9, Mode::Optimize),
            (1.0, Mode::Optimize),
            (f64::NAN, Mode::Unwrap),
        ] {
            assert_eq!(Mode::from_theta(theta), mode, "θ = {theta}");
        }
        assert!(Mode::Unwrap < Mode::Optimize);
        let names: Vec<&str> = [
            Mode::Unwrap,
            Mode::Transition,
            Mode::Balance,
            Mode::Wrap,
            Mode::Optimize,
        ]
        .iter()
        .map(|m| m.as_str())
        .collect();
        assert_eq!(
            names,
            ["UNWRAP", "TRANSITION", "BALANCE", "WRAP", "OPTIMIZE"]
        );
        assert_eq!(
            serde_json::to_string(&Mode::Transition).expect("serializable"),
            "\"TRANSITION\""
        );
    }

    #[test]
    fn parallel_fraction_lambda_and_amdahl() {
        assert!(close(parallel_fraction(0), 0.5, 1e-12));
        assert!(close(parallel_fraction(4), 0.65, 1e-12));
        assert!(close(parallel_fraction(12), 0.95, 1e-12));
        assert!(close(parallel_fraction(100), 0.95, 1e-12));
        assert_eq!(lambda_wrap(1, 1.0, 0), 10.0, "clamped up to 10");
        assert_eq!(lambda_wrap(0, 0.0, 0), 10.0);
        assert_eq!(lambda_wrap(4, f64::NAN, 0), 10.0);
        assert!(
            close(lambda_wrap(4, 4.0, 1), 100.0, 1e-12),
            "GPUs multiply by 1 + gpus"
        );
        assert_eq!(lambda_wrap(64, 512.0, 8), 832.0, "clamped down to 832");
        assert!(close(amdahl(0.8, 8), 1.0 / (0.2 + 0.1), 1e-12));
        assert_eq!(amdahl(0.0, 64), 1.0);
        assert!(close(amdahl(1.0, 64), 64.0, 1e-12));
        assert_eq!(amdahl(0.9, 0), 1.0, "n = 0 counts as 1");
        assert_eq!(amdahl(f64::NAN, 4), 1.0);
    }

    #[test]
    fn the_cluster_aggregate_of_two_nodes_by_hand() {
        let pi = node(4, 4.0, 0, 0.61);
        let laptop = NodeModelInput {
            physical_cores: 8,
            logical_cores: 16,
            memory_gib: 16.0,
            gpus: 0,
            theta: 0.77,
        };
        let cluster = cluster_model(&[pi, laptop]).expect("two nodes");
        // θ_c = (4·0.61 + 8·0.77) / 12 = 8.6 / 12 = 0.71666…  → WRAP, Θ = 2.0 + 0.01666…/0.2·0.5
        let theta = (4.0 * 0.61 + 8.0 * 0.77) / 12.0;
        assert!(close(cluster.theta, theta, 1e-12));
        assert_eq!(cluster.mode, Mode::Wrap);
        let theta_factor = 2.0 + (theta - 0.7) / 0.2 * 0.5;
        assert!(close(cluster.theta_factor, theta_factor, 1e-12));
        // Λ_c = 50 + 400, N_c = 4 + 16, P from 12 cores = min(0.95, 0.95) = 0.95.
        assert!(close(cluster.lambda, 450.0, 1e-12));
        assert_eq!(cluster.n, 20);
        assert!(close(cluster.p, 0.95, 1e-12));
        let s_a = 1.0 / (0.05 + 0.95 / 20.0);
        assert!(close(cluster.s_a, s_a, 1e-12));
        assert!(close(cluster.s_total, theta_factor * 450.0 * s_a, 1e-12));
        assert!(
            close(cluster.s_total, 9_423.1, 0.0001),
            "{}",
            cluster.s_total
        );

        assert_eq!(cluster_model(&[]), None);
        let alone = cluster_model(&[pi]).expect("one node");
        assert_eq!(alone, node_model(&pi), "a cluster of one is that node");
        let coreless =
            cluster_model(&[node(0, 1.0, 0, 0.2), node(0, 1.0, 0, 0.6)]).expect("two nodes");
        assert!(
            close(coreless.theta, 0.4, 1e-12),
            "plain mean without cores"
        );
    }

    #[test]
    fn compress_hours_divides_by_s_total() {
        assert!(close(compress_hours(840.0, 2_900.0), 0.2897, 0.001));
        assert_eq!(compress_hours(10.0, 0.0), 10.0);
        assert_eq!(compress_hours(10.0, -3.0), 10.0);
        assert_eq!(compress_hours(10.0, f64::NAN), 10.0);
    }

    #[test]
    fn throttle_policies_parse_and_print() {
        for policy in ThrottlePolicy::ALL {
            assert_eq!(policy.as_str().parse::<ThrottlePolicy>(), Ok(policy));
            assert_eq!(policy.to_string(), policy.as_str());
        }
        assert_eq!(ThrottlePolicy::default(), ThrottlePolicy::Adaptive);
        let err = "eager".parse::<ThrottlePolicy>().expect_err("unknown");
        assert!(err.to_string().contains("\"eager\""), "{err}");
        assert_eq!(
            serde_json::to_string(&ThrottlePolicy::Conservative).expect("serializable"),
            "\"conservative\""
        );
    }

    #[test]
    fn throttle_factors_per_mode() {
        assert_eq!(throttle_factor(Mode::Optimize), 1.0);
        assert_eq!(throttle_factor(Mode::Wrap), 1.0);
        assert_eq!(throttle_factor(Mode::Balance), 0.75);
        assert_eq!(throttle_factor(Mode::Transition), 0.5);
        assert_eq!(throttle_factor(Mode::Unwrap), 0.25);
    }

    /// Usable slots out of 8 (and out of 3, to see the rounding up) for a node whose θ has been
    /// steady at each value, per policy.
    #[test]
    fn the_throttle_table_per_policy() {
        use ThrottlePolicy::{Adaptive, Aggressive, Conservative, Off};
        // θ (mode):     0.95 (OPTIMIZE), 0.75 (WRAP), 0.55 (BALANCE), 0.35 (TRANSITION),
        //                0.15 (UNWRAP), 0.05 (paused)
        let thetas = [0.95, 0.75, 0.55, 0.35, 0.15, 0.05];
        let table: [(ThrottlePolicy, [u32; 6], [u32; 6]); 4] = [
            (Off, [8, 8, 8, 8, 8, 8], [3, 3, 3, 3, 3, 3]),
            (Adaptive, [8, 8, 6, 4, 2, 0], [3, 3, 3, 2, 1, 0]),
            // Thresholds shifted up by 0.1, so each θ falls one mode lower, and 0.15 (as 0.05)
            // is already paused.
            (Conservative, [8, 6, 4, 2, 0, 0], [3, 3, 2, 1, 0, 0]),
            // Never below half, never paused.
            (Aggressive, [8, 8, 6, 4, 4, 4], [3, 3, 3, 2, 2, 2]),
        ];
        for (policy, of_8, of_3) in table {
            for (i, &theta) in thetas.iter().enumerate() {
                let mut throttle = Throttle::with_policy(theta, policy);
                for _ in 0..20 {
                    throttle.observe(theta, policy);
                }
                assert_eq!(
                    throttle.usable_slots(8, policy),
                    of_8[i],
                    "{policy} θ {theta} of 8"
                );
                assert_eq!(
                    throttle.usable_slots(3, policy),
                    of_3[i],
                    "{policy} θ {theta} of 3"
                );
                assert_eq!(
                    throttle.usable_slots(0, policy),
                    0,
                    "{policy} θ {theta} of 0"
                );
            }
        }
        // A throttle made with `new` for a conservative node comes down to the shifted mode
        // (0.7 − 0.1 = 0.6: BALANCE, clearly past WRAP's band).
        let mut throttle = Throttle::new(1.0);
        for _ in 0..30 {
            throttle.observe(0.7, Conservative);
        }
        assert_eq!(throttle.mode, Mode::Balance);
        assert_eq!(throttle.usable_slots(8, Conservative), 6);
    }

    #[test]
    fn one_slot_is_left_while_not_paused() {
        let throttle = Throttle::new(0.15);
        assert_eq!(throttle.mode, Mode::Unwrap);
        assert!(!throttle.paused);
        assert_eq!(throttle.usable_slots(1, ThrottlePolicy::Adaptive), 1);
        assert_eq!(throttle.usable_slots(2, ThrottlePolicy::Adaptive), 1);
        assert_eq!(throttle.usable_slots(5, ThrottlePolicy::Adaptive), 2);
    }

    #[test]
    fn a_steady_oscillation_around_a_threshold_never_changes_mode() {
        for start in [0.5, 0.47, 0.53] {
            let mut throttle = Throttle::new(start);
            let initial = throttle.mode;
            for step in 0..1_000 {
                let theta = if step % 2 == 0 { 0.47 } else { 0.53 };
                throttle.observe(theta, ThrottlePolicy::Adaptive);
                assert_eq!(throttle.mode, initial, "start {start}, sample {step}");
                assert!(!throttle.paused);
            }
        }
        // Without hysteresis the same samples would flap: the smoothed θ does cross 0.5.
        let mut ewma: f64 = 0.5;
        let mut crossings = 0;
        for step in 0..100 {
            let theta = if step % 2 == 0 { 0.47 } else { 0.53 };
            let before = Mode::from_theta(ewma);
            ewma = EWMA_ALPHA * theta + (1.0 - EWMA_ALPHA) * ewma;
            crossings += usize::from(Mode::from_theta(ewma) != before);
        }
        assert!(crossings > 10, "{crossings}");
    }

    #[test]
    fn a_step_from_0_8_to_0_2_reaches_unwrap_within_a_few_samples() {
        let mut throttle = Throttle::new(0.8);
        assert_eq!(throttle.mode, Mode::Wrap);
        let mut modes = Vec::new();
        for _ in 0..8 {
            throttle.observe(0.2, ThrottlePolicy::Adaptive);
            modes.push(throttle.mode);
        }
        assert_eq!(modes.last(), Some(&Mode::Unwrap), "{modes:?}");
        // The smoothed θ is 0.2 + 0.6 · 0.7^k: below UNWRAP's band (0.25) from the 7th sample.
        let first_unwrap = modes.iter().position(|&m| m == Mode::Unwrap);
        assert_eq!(first_unwrap, Some(6), "{modes:?}");
        assert!(
            modes.windows(2).all(|w| w[0] >= w[1]),
            "monotone: {modes:?}"
        );
        assert_eq!(throttle.usable_slots(8, ThrottlePolicy::Adaptive), 2);
        // And back up once the load is gone.
        for _ in 0..20 {
            throttle.observe(1.0, ThrottlePolicy::Adaptive);
        }
        assert_eq!(throttle.mode, Mode::Optimize);
        assert_eq!(throttle.usable_slots(8, ThrottlePolicy::Adaptive), 8);
    }

    #[test]
    fn a_node_pauses_below_0_1_and_resumes_past_the_band() {
        let mut throttle = Throttle::new(0.5);
        for _ in 0..30 {
            throttle.observe(0.05, ThrottlePolicy::Adaptive);
        }
        assert!(throttle.paused);
        assert_eq!(throttle.usable_slots(8, ThrottlePolicy::Adaptive), 0);
        assert_eq!(throttle.usable_slots(8, ThrottlePolicy::Off), 8);
        // Hovering just above 0.1 is not enough to resume …
        for _ in 0..30 {
            throttle.observe(0.13, ThrottlePolicy::Adaptive);
        }
        assert!(throttle.paused, "ewma {}", throttle.ewma);
        // … clearly above 0.15 is.
        for _ in 0..30 {
            throttle.observe(0.2, ThrottlePolicy::Adaptive);
        }
        assert!(!throttle.paused, "ewma {}", throttle.ewma);
        assert_eq!(throttle.usable_slots(8, ThrottlePolicy::Adaptive), 2);

        assert!(Throttle::new(0.05).paused);
        assert!(!Throttle::new(0.1).paused);
        let mut aggressive = Throttle::with_policy(0.0, ThrottlePolicy::Aggressive);
        assert!(!aggressive.paused);
        aggressive.observe(0.0, ThrottlePolicy::Aggressive);
        assert!(!aggressive.paused, "aggressive never pauses");
        assert_eq!(aggressive.usable_slots(8, ThrottlePolicy::Aggressive), 4);
    }

    #[test]
    fn nan_samples_are_ignored() {
        let mut throttle = Throttle::new(0.8);
        let before = throttle;
        throttle.observe(f64::NAN, ThrottlePolicy::Adaptive);
        assert_eq!(throttle, before);
        assert_eq!(Throttle::new(f64::NAN).mode, Mode::Unwrap);
    }
}
