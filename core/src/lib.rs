//! Venom's shared vocabulary: the words the coordinator, the worker and venomctl all speak.
//!
//! Everything here is pure: no tokio, no tonic, no sled, no clock and no I/O, so the
//! replicated state machine can build on it and venomctl can parse wave files and compute the
//! model without a coordinator. The wire forms of these types (venom-proto) are converted in
//! one module per side: `venom_coordinator::convert`, `venom_worker::convert`.
//!
//! - [`wave`]: wave files, their model, parsing, validation and DAG algorithms.
//! - [`mobius`]: the Möbius speed-up model and the θ throttle with its policies.
//! - [`ids`]: waves, micro-tasks, attempts and nodes by name.
//! - [`states`]: the life of a micro-task, a wave and a node, and counts by state.
//! - [`attempt`]: how one attempt ended.
//! - [`url`]: coordinator addresses as users write them.

pub mod attempt;
pub mod ids;
pub mod mobius;
pub mod states;
pub mod url;
pub mod wave;

pub use attempt::{AttemptOutcome, OutcomeKind};
pub use ids::{AttemptRef, MicroKey, NodeName, WaveId};
pub use states::{Counts, NodeState, TaskState, WaveState};
