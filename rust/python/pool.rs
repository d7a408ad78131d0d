//! `Pool` (a worker pool's data path) and `WorkerInbox` (a worker's end of its
//! stream), with the typed records they return.

use std::sync::Arc;
use std::time::Duration;

use pyo3::exceptions::PyOSError;
use pyo3::prelude::*;
use pyo3::pybacked::PyBackedBytes;
use pyo3::types::PyBytes;

use super::{PoolStopped, Running};
use crate::logging::Sink;
use crate::pool;
use crate::transport::Signal;
use crate::worker_inbox;

/// The data path of one worker pool (see `pool`): a thread that never holds the GIL.
#[pyclass(module = "htex_rs._core", frozen)]
struct Pool {
    handle: Running<pool::Handle>,
    /// The core's log records, waiting for the pool's Python side (`drain_log`).
    log: Arc<Sink>,
    /// Raised when the core logs or stops (`events_fd`).
    events: Arc<Signal>,
}

/// One of the core's log records, for Python's `logging` (`levelno` as Python's).
#[pyclass(module = "htex_rs._core", frozen, get_all)]
struct LogRecord {
    levelno: u8,
    name: String,
    message: String,
}

fn python_level(level: log::Level) -> u8 {
    match level {
        log::Level::Error => 40,
        log::Level::Warn => 30,
        log::Level::Info => 20,
        log::Level::Debug | log::Level::Trace => 10,
    }
}

/// What the core has done so far (see `pool::Counts`).
#[pyclass(module = "htex_rs._core", frozen, get_all)]
#[derive(Debug)]
struct PoolCounts {
    received: u64,
    started: u64,
    results: u64,
    lost: u64,
    timed_out: u64,
    given_back: u64,
    deaths: u64,
    requeued: u64,
    queued: u64,
    held: u64,
    workers: u64,
    dropped: u64,
}

#[pymethods]
impl PoolCounts {
    fn __repr__(&self) -> String {
        format!("{self:?}")
    }
}

/// Why the pool stopped (`pool::Stopped`): the process's exit status, the line it
/// logs, and whether the interchange refused it (said on stderr too).
#[pyclass(module = "htex_rs._core", frozen, get_all)]
struct StopReason {
    exit_code: i32,
    message: String,
    refused: bool,
}

impl Pool {
    fn handle(&self) -> PyResult<Arc<pool::Handle>> {
        self.handle
            .get()
            .ok_or_else(|| PoolStopped::new_err("the pool has been stopped"))
    }
}

#[pymethods]
impl Pool {
    #[new]
    #[pyo3(signature = (interchange_url, identity, worker_url, registration, heartbeat_period,
                        heartbeat_threshold, hostname, curve_keys=None,
                        max_message_bytes=1 << 30, cpu_slots=Vec::new(), memory_mb=0,
                        accelerators=Vec::new(), debug=false, block_end=None, drain_time=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        interchange_url: String,
        identity: Vec<u8>,
        worker_url: String,
        registration: Vec<u8>,
        heartbeat_period: f64,
        heartbeat_threshold: f64,
        hostname: String,
        curve_keys: Option<(Vec<u8>, Vec<u8>, Vec<u8>)>,
        max_message_bytes: usize,
        cpu_slots: Vec<(u32, u32)>,
        memory_mb: u64,
        accelerators: Vec<String>,
        debug: bool,
        block_end: Option<f64>,
        drain_time: Option<f64>,
    ) -> PyResult<Self> {
        let events = Arc::new(Signal::new().map_err(|e| PyOSError::new_err(e.to_string()))?);
        let log = Sink::queue(debug, Some(events.clone()));
        let config = pool::Config {
            interchange_url,
            identity,
            worker_url,
            max_message_bytes,
            registration,
            heartbeat_period: Duration::from_secs_f64(heartbeat_period.max(0.001)),
            heartbeat_threshold: Duration::from_secs_f64(heartbeat_threshold.max(0.001)),
            hostname,
            curve: curve_keys.map(|(public, secret, server_public)| pool::ClientKeys {
                public,
                secret,
                server_public,
            }),
            slots: cpu_slots
                .into_iter()
                .map(|(cpu, numa)| crate::resources::Slot { cpu, numa })
                .collect(),
            memory: memory_mb,
            accelerators,
            log: Some(log.clone()),
            events: events.clone(),
            block_end,
            drain_time,
        };
        let h = py
            .detach(|| pool::Handle::start(config))
            .map_err(PyOSError::new_err)?;
        Ok(Pool {
            handle: Running::new(h),
            log,
            events,
        })
    }

    /// Report that worker process `pid` ended (`exit_code` negative: killed by that
    /// signal). Returns at once; the core fails the task it was running as WorkerLost.
    /// After the core has stopped there is nothing left to fail: the interchange fails
    /// this pool's tasks as ManagerLost.
    fn worker_died(&self, pid: u32, exit_code: i32) {
        if let Ok(h) = self.handle() {
            h.command(pool::Command::WorkerDied { pid, exit_code });
        }
    }

    /// An fd that turns readable when the core logs or stops: poll it, then call
    /// `drain_log` (which lowers it) and `wait_stopped(0)`.
    fn events_fd(&self) -> i32 {
        self.events.fd()
    }

    /// The core's log records since the last call, oldest first, for the pool to emit
    /// through Python's `logging` (also after the core stopped). Lowers `events_fd`.
    fn drain_log(&self) -> Vec<LogRecord> {
        self.events.clear();
        let (records, lost) = self.log.take();
        let mut out: Vec<LogRecord> = records
            .into_iter()
            .map(|r| LogRecord {
                levelno: python_level(r.level),
                name: r.target,
                message: r.message,
            })
            .collect();
        if lost > 0 {
            out.push(LogRecord {
                levelno: 30,
                name: "htex_rs.pool".into(),
                message: format!(
                    "{lost} log records of the pool were dropped (nobody read them in time)"
                ),
            });
        }
        out
    }

    fn counts(&self) -> PyResult<PoolCounts> {
        let c = self.handle()?.counts();
        Ok(PoolCounts {
            received: c.received,
            started: c.started,
            results: c.results,
            lost: c.lost,
            timed_out: c.timed_out,
            given_back: c.given_back,
            deaths: c.deaths,
            requeued: c.requeued,
            queued: c.queued,
            held: c.held,
            workers: c.workers,
            dropped: c.dropped,
        })
    }

    /// Wait up to `timeout_ms`; None while the core runs.
    fn wait_stopped(&self, py: Python<'_>, timeout_ms: u64) -> PyResult<Option<StopReason>> {
        let h = self.handle()?;
        let s = py.detach(move || h.wait_stopped(Duration::from_millis(timeout_ms)));
        Ok(s.map(|s| StopReason {
            exit_code: s.exit_code(),
            message: s.message(),
            refused: matches!(s, pool::Stopped::Refused(_)),
        }))
    }

    /// The block ends now (the batch system's SIGTERM, `why`): the core hands every
    /// unstarted task back to the interchange, says why, and stops. Returns at once.
    fn end(&self, why: String) {
        if let Ok(h) = self.handle() {
            h.command(pool::Command::End(why));
        }
    }

    fn stop(&self, py: Python<'_>) {
        if let Some(h) = self.handle.take() {
            py.detach(move || h.stop());
        }
    }
}

/// A worker process's end of its stream to the pool (see `worker_inbox`): tasks are
/// read, and reclaims answered, by a thread that never needs the GIL.
#[pyclass(module = "htex_rs._core", frozen)]
struct WorkerInbox {
    inbox: worker_inbox::Inbox,
}

/// One task for a worker to run.
#[pyclass(module = "htex_rs._core", frozen, get_all)]
#[allow(clippy::struct_field_names)] // `task.task_id`, as everywhere else in Python
struct Task {
    task_id: u64,
    flags: u8,
    payload: Py<PyBytes>,
}

#[pymethods]
impl WorkerInbox {
    /// Connect to the pool at `url` and register as worker `rank`.
    #[new]
    #[pyo3(signature = (url, rank, max_message_bytes=1 << 30))]
    fn new(py: Python<'_>, url: &str, rank: &str, max_message_bytes: usize) -> PyResult<Self> {
        let inbox = py
            .detach(|| {
                worker_inbox::connect(url)
                    .and_then(|s| worker_inbox::Inbox::start(s, rank.as_bytes(), max_message_bytes))
            })
            .map_err(|e| PyOSError::new_err(format!("cannot connect to the pool at {url}: {e}")))?;
        Ok(WorkerInbox { inbox })
    }

    /// The next task, waiting for one; None once the stream has ended (nothing more
    /// may be started then).
    fn next(&self, py: Python<'_>) -> Option<Task> {
        let t = py.detach(|| self.inbox.next())?;
        Some(Task {
            task_id: t.id,
            flags: t.flags,
            payload: PyBytes::new(py, &t.payload).unbind(),
        })
    }

    /// Send one task's result (or exception) at once, its payload in parts (never joined).
    #[allow(clippy::needless_pass_by_value)] // PyO3 extracts the list as an owned Vec
    fn send_result(
        &self,
        py: Python<'_>,
        task_id: u64,
        status: u8,
        payload: Vec<PyBackedBytes>,
    ) -> PyResult<()> {
        let parts: Vec<&[u8]> = payload.iter().map(|p| &p[..]).collect();
        py.detach(|| self.inbox.send_result(task_id, status, &parts))
            .map_err(|e| PyOSError::new_err(format!("cannot send a result to the pool: {e}")))
    }
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Pool>()?;
    m.add_class::<PoolCounts>()?;
    m.add_class::<StopReason>()?;
    m.add_class::<LogRecord>()?;
    m.add_class::<WorkerInbox>()?;
    m.add_class::<Task>()?;
    Ok(())
}
