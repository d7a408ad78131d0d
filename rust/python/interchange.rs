//! `Interchange`: an executor's interchange thread, and the typed records it reports.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::resources::Resources;
use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList};

use super::{CommandTimeout, InterchangeStopped, Running};
use crate::interchange::{self, AskError, Command, Event, Handle, NewTask, Selector};
use crate::zmtp::router::HandshakeLimits;

/// A running interchange thread owned by one executor. Frozen, so calls from
/// several Python threads (result thread, strategy, user) never conflict on a borrow.
#[pyclass(module = "htex_rs._core", frozen)]
struct Interchange {
    handle: Running<Handle>,
}

/// One task's result: its status (`STATUS_*`) and the worker's bytes.
#[pyclass(module = "htex_rs._core", frozen, get_all)]
struct TaskResult {
    task_id: u64,
    status: u8,
    payload: Py<PyBytes>,
}

/// A pool that went away (silent past the heartbeat threshold, or unreachable) and the
/// tasks it held, which fail with ManagerLost.
#[pyclass(module = "htex_rs._core", frozen, get_all)]
struct ManagerLost {
    uid: String,
    hostname: String,
    tasks: Vec<u64>,
    /// Why the pool left, when it said (its block ended); `None`: silent or unreachable.
    reason: Option<String>,
}

/// What one wait for events brought: results, lost pools, fatal errors (a pool the
/// executor cannot work with), and manager records for monitoring's `node` table.
#[pyclass(module = "htex_rs._core", frozen, get_all)]
struct Events {
    results: Py<PyList>,
    lost: Py<PyList>,
    fatal: Py<PyList>,
    nodes: Py<PyList>,
}

#[pymethods]
impl Events {
    fn __bool__(&self, py: Python<'_>) -> bool {
        [&self.results, &self.lost, &self.fatal, &self.nodes]
            .iter()
            .any(|l| !l.bind(py).is_empty())
    }
}

/// The interchange's counters since it started.
#[pyclass(module = "htex_rs._core", frozen, get_all)]
struct InterchangeStats {
    /// Malformed, unexpected or refused messages dropped.
    dropped: u64,
    tasks_received: u64,
    results_forwarded: u64,
}

fn ask_error(e: &AskError) -> PyErr {
    match e {
        AskError::Stopped => InterchangeStopped::new_err(e.to_string()),
        AskError::Timeout(_) => CommandTimeout::new_err(e.to_string()),
    }
}

impl Interchange {
    /// The running thread, or InterchangeStopped once it was stopped.
    fn handle(&self) -> PyResult<Arc<Handle>> {
        self.handle
            .get()
            .ok_or_else(|| InterchangeStopped::new_err("the interchange has been stopped"))
    }

    fn ask<T: Send>(
        &self,
        py: Python<'_>,
        make: impl FnOnce(std::sync::mpsc::Sender<T>) -> Command + Send,
    ) -> PyResult<T> {
        let h = self.handle()?;
        py.detach(move || h.ask(make)).map_err(|e| ask_error(&e))
    }
}

fn node_dict(py: Python<'_>, n: interchange::NodeInfo) -> PyResult<Bound<'_, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("uid", n.uid)?;
    d.set_item("hostname", n.hostname)?;
    d.set_item("block_id", n.block_id)?;
    d.set_item("cpu_count", n.cpu_count)?;
    d.set_item("total_memory", n.total_memory)?;
    d.set_item("worker_count", n.worker_count)?;
    d.set_item("max_capacity", n.max_capacity)?;
    d.set_item("python_v", &n.python_version)?;
    d.set_item("python_version", n.python_version)?;
    d.set_item("parsl_version", n.parsl_version)?;
    d.set_item("active", n.active)?;
    d.set_item("draining", n.draining)?;
    d.set_item("tasks", n.tasks)?;
    d.set_item("start_time", n.start_time)?;
    d.set_item("last_heartbeat", n.last_heartbeat)?;
    d.set_item("idle_since", n.idle_since)?;
    Ok(d)
}

/// A Python `bytes` object as [`Bytes`], without a copy: its buffer is immutable and
/// lives as long as the reference held here (released, when the last share goes, the
/// next time any thread holds the GIL).
fn shared_bytes(b: Bound<'_, PyBytes>) -> Bytes {
    struct Owner {
        _object: Py<PyBytes>,
        ptr: *const u8,
        len: usize,
    }
    // SAFETY: the pointer is into an immutable `bytes` object kept alive by `_object`;
    // reading it needs no GIL.
    unsafe impl Send for Owner {}
    impl AsRef<[u8]> for Owner {
        fn as_ref(&self) -> &[u8] {
            // SAFETY: see above; ptr and len were read from the object itself.
            unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
        }
    }
    let view = b.as_bytes();
    let (ptr, len) = (view.as_ptr(), view.len());
    Bytes::from_owner(Owner {
        _object: b.unbind(),
        ptr,
        len,
    })
}

#[pymethods]
impl Interchange {
    #[new]
    #[pyo3(signature = (bind_address, worker_port, port_range, heartbeat_threshold, poll_period_ms,
                        selector, cert_dir=None, log_path=None,
                        debug=false, python_version=String::new(), check_python=false,
                        max_message_bytes=None, node_events=false,
                        max_pending_handshakes=None, max_pending_handshakes_per_source=None))]
    #[allow(clippy::too_many_arguments, clippy::needless_pass_by_value)]
    fn new(
        py: Python<'_>,
        bind_address: String,
        worker_port: Option<u16>,
        port_range: (u16, u16),
        heartbeat_threshold: f64,
        poll_period_ms: u64,
        selector: &str,
        cert_dir: Option<std::path::PathBuf>,
        log_path: Option<String>,
        debug: bool,
        python_version: String,
        check_python: bool,
        max_message_bytes: Option<usize>,
        node_events: bool,
        max_pending_handshakes: Option<usize>,
        max_pending_handshakes_per_source: Option<usize>,
    ) -> PyResult<Self> {
        let selector = match selector {
            "random" => Selector::Random,
            "block" => Selector::BlockId,
            other => {
                return Err(PyValueError::new_err(format!(
                    "unknown selector {other:?}; use 'random' or 'block'"
                )))
            }
        };
        // The server's secret key is read here, never held by Python.
        let curve = cert_dir
            .map(|dir| crate::zmtp::certs::load_server(&dir))
            .transpose()
            .map_err(PyValueError::new_err)?;
        let defaults = HandshakeLimits::default();
        let handshakes = HandshakeLimits {
            max_pending: max_pending_handshakes.unwrap_or(defaults.max_pending),
            max_pending_per_source: max_pending_handshakes_per_source
                .unwrap_or(defaults.max_pending_per_source),
            ..defaults
        };
        let config = interchange::Config {
            bind_address,
            worker_port,
            port_range,
            heartbeat_threshold: Duration::from_secs_f64(heartbeat_threshold.max(0.001)),
            poll_period: Duration::from_millis(poll_period_ms),
            selector,
            curve,
            handshakes,
            log_path: log_path.map(Into::into),
            debug,
            python_version,
            check_python,
            max_message_bytes,
            node_events,
        };
        let h = py
            .detach(|| Handle::start(config))
            .map_err(PyOSError::new_err)?;
        Ok(Interchange {
            handle: Running::new(h),
        })
    }

    #[getter]
    fn port(&self) -> PyResult<u16> {
        Ok(self.handle()?.port)
    }

    /// Queue one task: id, priority (inf = none), flags, opaque payload, what it asks
    /// for as `(cores, memory MB, gpus)` and its time limit in seconds (validated by the
    /// executor; `None`: nothing). The payload's own buffer goes to the pool: the
    /// interchange holds a reference, not a copy (a task with a request or a limit costs
    /// one, to put them at its head).
    #[pyo3(signature = (task_id, priority, flags, payload, request=None, walltime=None))]
    fn submit(
        &self,
        task_id: u64,
        priority: f64,
        flags: u8,
        payload: Bound<'_, PyBytes>,
        request: Option<(u32, u64, u32)>,
        walltime: Option<f64>,
    ) -> PyResult<()> {
        let walltime = match walltime {
            Some(w) if w.is_finite() && w > 0.0 => Some(Duration::from_secs_f64(w)),
            Some(w) => {
                return Err(PyValueError::new_err(format!(
                    "walltime must be a positive number of seconds, not {w}"
                )))
            }
            None => None,
        };
        let request = request.map(|(cores, memory, gpus)| Resources {
            cores,
            memory,
            gpus,
        });
        let task = match (request, walltime) {
            (None, None) => NewTask::plain(
                task_id,
                priority,
                flags,
                // A small payload is copied: cheaper than holding the object, which
                // only a thread with the GIL may release.
                if payload.as_bytes().len() < crate::stream::BIG_FRAME {
                    Bytes::copy_from_slice(payload.as_bytes())
                } else {
                    shared_bytes(payload)
                },
            ),
            _ => NewTask::with_head(
                task_id,
                priority,
                flags,
                payload.as_bytes(),
                request,
                walltime,
            ),
        };
        self.handle()?.submit([task]);
        Ok(())
    }

    /// Wait up to `timeout_ms` for events; at most `max_events` of them.
    fn wait_events(&self, py: Python<'_>, timeout_ms: u64, max_events: usize) -> PyResult<Events> {
        let h = self.handle()?;
        let events =
            py.detach(move || h.wait_events(Duration::from_millis(timeout_ms), max_events));
        let results = PyList::empty(py);
        let lost = PyList::empty(py);
        let fatal = PyList::empty(py);
        let nodes = PyList::empty(py);
        for e in events {
            match e {
                Event::Result {
                    task_id,
                    status,
                    payload,
                } => results.append(TaskResult {
                    task_id,
                    status,
                    payload: PyBytes::new(py, &payload).unbind(),
                })?,
                Event::ManagerLost {
                    uid,
                    hostname,
                    tasks,
                    reason,
                } => lost.append(ManagerLost {
                    uid,
                    hostname,
                    tasks,
                    reason,
                })?,
                Event::Fatal(msg) => fatal.append(msg)?,
                Event::Node(n) => nodes.append(node_dict(py, n)?)?,
            }
        }
        Ok(Events {
            results: results.unbind(),
            lost: lost.unbind(),
            fatal: fatal.unbind(),
            nodes: nodes.unbind(),
        })
    }

    fn alive(&self) -> bool {
        self.handle.get().is_some_and(|h| h.alive())
    }

    /// One dict per registered pool, with Parsl's `connected_managers()` keys and
    /// `time_left` (seconds left in its block; `None`: unknown).
    fn managers<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let infos = self.ask(py, Command::Managers)?;
        let out = PyList::empty(py);
        for m in infos {
            let d = PyDict::new(py);
            d.set_item("manager", m.manager)?;
            d.set_item("block_id", m.block_id)?;
            d.set_item("worker_count", m.worker_count)?;
            d.set_item("tasks", m.tasks)?;
            d.set_item("idle_duration", m.idle_duration)?;
            d.set_item("active", m.active)?;
            d.set_item("parsl_version", m.parsl_version)?;
            d.set_item("python_version", m.python_version)?;
            d.set_item("draining", m.draining)?;
            d.set_item("hostname", m.hostname)?;
            d.set_item("time_left", m.time_left)?;
            out.append(d)?;
        }
        Ok(out)
    }

    fn connected_blocks(&self, py: Python<'_>) -> PyResult<Vec<String>> {
        self.ask(py, Command::ConnectedBlocks)
    }

    /// `(uid, packages as JSON text)` per pool.
    fn packages(&self, py: Python<'_>) -> PyResult<Vec<(String, String)>> {
        self.ask(py, Command::Packages)
    }

    /// Give the pool `uid` no more tasks; False if no such pool is registered.
    fn hold(&self, py: Python<'_>, uid: String) -> PyResult<bool> {
        self.ask(py, |tx| Command::Hold(uid, tx))
    }

    fn stats(&self) -> PyResult<InterchangeStats> {
        use std::sync::atomic::Ordering::Relaxed;
        let h = self.handle()?;
        let s = h.stats();
        Ok(InterchangeStats {
            dropped: s.dropped.load(Relaxed),
            tasks_received: s.tasks_received.load(Relaxed),
            results_forwarded: s.results_forwarded.load(Relaxed),
        })
    }

    fn stop(&self, py: Python<'_>) {
        if let Some(h) = self.handle.take() {
            py.detach(move || h.stop());
        }
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Interchange>()?;
    m.add_class::<TaskResult>()?;
    m.add_class::<ManagerLost>()?;
    m.add_class::<Events>()?;
    m.add_class::<InterchangeStats>()?;
    Ok(())
}
