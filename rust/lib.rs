//! htex_rs: the Rust core of a Parsl-compatible HighThroughputExecutor.
//!
//! `protocol` is the wire format, `interchange` the task router. Neither knows
//! Python; the thin PyO3 layer in `python` exists only under the `python` feature.

pub mod interchange;
pub mod protocol;

#[cfg(feature = "python")]
mod python;
