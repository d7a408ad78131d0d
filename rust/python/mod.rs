//! PyO3 binding: converts types and errors, nothing else. Every wait releases the GIL.
//! `python/htex_rs/_core.pyi` describes this module to type checkers; keep them together.
//!
//! Errors reach Python as the exception classes below (defined here, once), never as a
//! bare `RuntimeError` whose text callers would have to read.

mod interchange;
mod planner;
mod pool;
mod protocol;

use std::sync::{Arc, Mutex};

use pyo3::create_exception;
use pyo3::exceptions::{PyRuntimeError, PyTimeoutError};
use pyo3::prelude::*;

create_exception!(
    htex_rs._core,
    InterchangeStopped,
    PyRuntimeError,
    "The interchange thread has ended (it was stopped, or failed: see interchange.log)."
);
create_exception!(
    htex_rs._core,
    CommandTimeout,
    PyTimeoutError,
    "The interchange thread did not answer a query in time (COMMAND_TIMEOUT_S)."
);
create_exception!(
    htex_rs._core,
    PoolStopped,
    PyRuntimeError,
    "The pool's thread has been stopped."
);

/// The native thread behind a binding object (interchange, pool): shared with
/// callers while it runs, gone once stopped. Calls from several Python threads share it.
struct Running<T>(Mutex<Option<Arc<T>>>);

impl<T> Running<T> {
    fn new(thread: T) -> Self {
        Running(Mutex::new(Some(Arc::new(thread))))
    }

    /// The running thread; `None` once stopped.
    fn get(&self) -> Option<Arc<T>> {
        self.0.lock().unwrap().clone()
    }

    /// Take it out to stop it (the first caller gets it).
    fn take(&self) -> Option<Arc<T>> {
        self.0.lock().unwrap().take()
    }
}

/// Put the calling thread under `SCHED_BATCH` (see `crate::sched`): a worker pool calls
/// this first, so its threads and worker processes inherit it. Returns whether it took.
#[pyfunction]
fn batch_scheduling() -> bool {
    crate::sched::batch_this_thread()
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("InterchangeStopped", py.get_type::<InterchangeStopped>())?;
    m.add("CommandTimeout", py.get_type::<CommandTimeout>())?;
    m.add("PoolStopped", py.get_type::<PoolStopped>())?;
    m.add(
        "COMMAND_TIMEOUT_S",
        crate::interchange::COMMAND_TIMEOUT.as_secs_f64(),
    )?;
    m.add("VERSION", crate::interchange::HTEX_RS_VERSION)?;
    m.add("HAS_CURVE", zmq::has("curve") == Some(true))?;
    m.add_function(wrap_pyfunction!(batch_scheduling, m)?)?;
    interchange::register(m)?;
    pool::register(m)?;
    planner::register(m)?;
    protocol::register(m)?;
    Ok(())
}
