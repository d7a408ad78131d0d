//! htex_rs: the Rust core of a Parsl-compatible HighThroughputExecutor.
//!
//! `protocol` is the wire format, `interchange` the task router, `pool` a worker
//! pool's data path, `worker_inbox` a worker process's end of
//! its stream to the pool, `planner` the CPU-affinity and accelerator planner. None of them
//! knows Python; the thin PyO3 layer in `python` exists only under the `python` feature.
//!
//! The modules are the crate's own; what is used from outside (the benches) is named in
//! [`api`], so that the compiler sees everything else and flags what nothing uses.

// Without the binding, what only the binding uses (the pool, the worker inbox) has no
// caller: dead code is judged in the `python` build (`cargo clippy --features python`).
#![cfg_attr(not(feature = "python"), allow(dead_code, unused_imports))]

mod epoll;
mod interchange;
mod logging;
mod planner;
mod pool;
mod protocol;
mod resources;
mod sched;
mod socket_thread;
mod stream;
mod transport;
mod worker_inbox;
mod zmtp;

#[cfg(feature = "python")]
mod python;

/// What the benches drive: the interchange through its handle, the planner, and the wire
/// formats a fake pool speaks.
pub mod api {
    pub mod interchange {
        pub use crate::interchange::{Command, Config, Event, Handle, NewTask};
    }
    pub mod planner {
        pub use crate::planner::{plan, Strategy, Topology};
    }
    pub mod protocol {
        pub use crate::protocol::{
            decode_meta, encode_meta, header, Kind, Registration, PROTOCOL_VERSION, STATUS_RESULT,
        };
    }
    pub mod zmtp {
        pub use crate::zmtp::{
            command, greeting, metadata, next_frame, put_frame, COMMAND, GREETING, MORE,
        };
    }
}
