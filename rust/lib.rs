//! htex_rs: the Rust core of a Parsl-compatible HighThroughputExecutor.
//!
//! `protocol` is the wire format, `interchange` the task router, `pool` a worker
//! pool's data path, `worker_inbox` a worker process's end of
//! its stream to the pool, `planner` the CPU-affinity and accelerator planner. None of them
//! knows Python; the thin PyO3 layer in `python` exists only under the `python` feature.

pub mod interchange;
pub mod logging;
pub mod planner;
pub mod pool;
pub mod protocol;
pub mod resources;
pub mod sched;
pub mod socket_thread;
pub mod stream;
pub mod transport;
pub mod worker_inbox;
pub mod zmtp;

#[cfg(feature = "python")]
mod python;
