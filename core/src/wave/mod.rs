//! Wave files: parsing and validation, the one authority on what a valid wave is.
//!
//! A wave is a DAG of shell-command tasks written as TOML (JSON is accepted too). The coordinator
//! parses a submitted file with [`parse_wave`], the state machine re-checks the built
//! [`WaveSpec`] with [`WaveSpec::validate`] when it applies it, and `venomctl validate` runs the
//! same code locally, so a wave is judged the same way everywhere.
//!
//! Parsing goes in three steps so that every error can name the task and the field it is about
//! ([`WaveError`]): the text is first read into a generic tree (syntax errors carry line and
//! column), then the tree is walked key by key against the closed list of known fields (an
//! unknown key or a value of the wrong type is reported with its own field name, which a derived
//! `deny_unknown_fields` struct cannot do), and finally the built spec is checked as a whole:
//! ids, dependencies, cycles (the message prints the cycle's path) and the configured
//! [`WaveLimits`]. Everything here is bounded: the input size is checked before any parsing, and
//! every count and size has a limit. No I/O, no clock.
//!
//! The module follows those seams: [`spec`] is the model (what a valid wave is made of),
//! [`parse`] reads text into it, [`check`] holds the field checks and [`WaveSpec::validate`],
//! [`units`] reads durations and sizes, and [`dag`] walks the dependency graph.

mod check;
mod dag;
mod parse;
mod spec;
mod units;

pub use parse::parse_wave;
pub use spec::*;
pub use units::{parse_duration_ms, parse_memory_bytes};

#[cfg(test)]
mod tests;
