//! PyO3 binding: converts types and errors, nothing else. Every wait releases the GIL.

use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use pyo3::exceptions::{PyOSError, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList};

use crate::interchange::{self, Command, CurveConfig, Event, Handle, NewTask, Selector};
use crate::manager;
use crate::planner;
use crate::protocol::{self, PROTOCOL_VERSION};
use crate::worker_inbox;

/// A running interchange thread owned by one executor. Frozen, so calls from
/// several Python threads (result thread, strategy, user) never conflict on a borrow.
#[pyclass(module = "htex_rs._core", frozen)]
struct Interchange {
    handle: Mutex<Option<Arc<Handle>>>,
}

/// The running thread behind a binding object, or an error once it was stopped.
fn live<T>(slot: &Mutex<Option<Arc<T>>>, what: &str) -> PyResult<Arc<T>> {
    slot.lock()
        .unwrap()
        .clone()
        .ok_or_else(|| PyRuntimeError::new_err(format!("the {what} has been stopped")))
}

fn handle(slf: &Interchange) -> PyResult<Arc<Handle>> {
    live(&slf.handle, "interchange")
}

fn ask<T: Send>(
    py: Python<'_>,
    h: &Handle,
    make: impl FnOnce(mpsc::Sender<T>) -> Command,
) -> PyResult<T> {
    let (tx, rx) = mpsc::channel();
    h.command(make(tx));
    py.detach(move || rx.recv_timeout(Duration::from_secs(30)))
        .map_err(|e| {
            PyRuntimeError::new_err(match e {
                mpsc::RecvTimeoutError::Disconnected => "the interchange has stopped",
                mpsc::RecvTimeoutError::Timeout => "the interchange did not answer within 30 s",
            })
        })
}

#[pymethods]
impl Interchange {
    #[new]
    #[pyo3(signature = (bind_address, worker_port, port_range, heartbeat_threshold, poll_period_ms,
                        selector, server_secret=None, allowed_clients=Vec::new(), log_path=None,
                        debug=false, python_version=String::new(), check_python=false,
                        max_message_bytes=None, node_events=false))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        bind_address: String,
        worker_port: Option<u16>,
        port_range: (u16, u16),
        heartbeat_threshold: f64,
        poll_period_ms: u64,
        selector: &str,
        server_secret: Option<Vec<u8>>,
        allowed_clients: Vec<Vec<u8>>,
        log_path: Option<String>,
        debug: bool,
        python_version: String,
        check_python: bool,
        max_message_bytes: Option<i64>,
        node_events: bool,
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
        let curve = match server_secret {
            Some(secret) => Some(CurveConfig {
                server_secret: secret,
                allowed_clients: allowed_clients
                    .iter()
                    .map(|k| interchange::zap::decode_key(k))
                    .collect::<Result<_, _>>()
                    .map_err(PyValueError::new_err)?,
            }),
            None => None,
        };
        let config = interchange::Config {
            bind_address,
            worker_port,
            port_range,
            heartbeat_threshold: Duration::from_secs_f64(heartbeat_threshold.max(0.001)),
            poll_period: Duration::from_millis(poll_period_ms),
            selector,
            curve,
            log_path: log_path.map(Into::into),
            debug,
            python_version,
            check_python,
            max_message_bytes,
            node_events,
        };
        let h = py
            .detach(|| Handle::start(config))
            .map_err(PyRuntimeError::new_err)?;
        Ok(Interchange {
            handle: Mutex::new(Some(Arc::new(h))),
        })
    }

    #[getter]
    fn port(&self) -> PyResult<u16> {
        Ok(handle(self)?.port)
    }

    /// Queue one task: id, priority (inf = none), flags, opaque payload.
    fn submit(&self, task_id: u64, priority: f64, flags: u8, payload: &[u8]) -> PyResult<()> {
        handle(self)?.submit([NewTask {
            task_id,
            priority,
            flags,
            payload: payload.to_vec(),
        }]);
        Ok(())
    }

    /// Wait up to `timeout_ms` for events. Returns (results, lost, fatal, nodes):
    /// results = [(task_id, status, bytes)], lost = [(uid, hostname, [task_id])], fatal = [str],
    /// nodes = [dict] (manager state for Parsl's monitoring, only with `node_events`).
    #[allow(clippy::type_complexity)]
    fn wait_events<'py>(
        &self,
        py: Python<'py>,
        timeout_ms: u64,
        max_events: usize,
    ) -> PyResult<(
        Bound<'py, PyList>,
        Bound<'py, PyList>,
        Bound<'py, PyList>,
        Bound<'py, PyList>,
    )> {
        let h = handle(self)?;
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
                } => {
                    results.append((task_id, status, PyBytes::new(py, &payload)))?;
                }
                Event::ManagerLost {
                    uid,
                    hostname,
                    tasks,
                } => lost.append((uid, hostname, tasks))?,
                Event::Fatal(msg) => fatal.append(msg)?,
                Event::Node(n) => {
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
                    nodes.append(d)?;
                }
            }
        }
        Ok((results, lost, fatal, nodes))
    }

    fn alive(&self) -> bool {
        self.handle
            .lock()
            .unwrap()
            .as_ref()
            .is_some_and(|h| h.alive())
    }

    fn managers<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let infos = ask(py, &*handle(self)?, Command::Managers)?;
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
            out.append(d)?;
        }
        Ok(out)
    }

    fn connected_blocks(&self, py: Python<'_>) -> PyResult<Vec<String>> {
        ask(py, &*handle(self)?, Command::ConnectedBlocks)
    }

    /// {uid: packages-as-JSON-text}
    fn packages(&self, py: Python<'_>) -> PyResult<Vec<(String, String)>> {
        ask(py, &*handle(self)?, Command::Packages)
    }

    fn hold(&self, py: Python<'_>, uid: String) -> PyResult<bool> {
        ask(py, &*handle(self)?, |tx| Command::Hold(uid, tx))
    }

    /// (dropped messages, tasks received, results forwarded)
    fn stats(&self) -> PyResult<(u64, u64, u64)> {
        use std::sync::atomic::Ordering::Relaxed;
        let h = handle(self)?;
        let s = h.stats();
        Ok((
            s.dropped.load(Relaxed),
            s.tasks_received.load(Relaxed),
            s.results_forwarded.load(Relaxed),
        ))
    }

    fn stop(&self, py: Python<'_>) {
        let h = self.handle.lock().unwrap().take();
        if let Some(h) = h {
            py.detach(move || h.stop());
        }
    }
}

/// The data path of one worker pool (see `manager`): a thread that never holds the GIL.
#[pyclass(module = "htex_rs._core", frozen)]
struct PoolCore {
    handle: Mutex<Option<Arc<manager::Handle>>>,
}

fn pool_handle(slf: &PoolCore) -> PyResult<Arc<manager::Handle>> {
    live(&slf.handle, "pool core")
}

#[pymethods]
impl PoolCore {
    #[new]
    #[pyo3(signature = (interchange_url, identity, worker_url, registration, heartbeat_period,
                        heartbeat_threshold, hostname, curve_keys=None,
                        max_message_bytes=1 << 30, cpu_slots=Vec::new(), memory_mb=0,
                        accelerators=Vec::new(), log_path=None, debug=false))]
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
        log_path: Option<String>,
        debug: bool,
    ) -> PyResult<Self> {
        let config = manager::Config {
            interchange_url,
            identity,
            worker_url,
            // Room for the batch's header, meta and framing on top of the payload limit.
            max_message_bytes: max_message_bytes.saturating_add(1 << 20),
            registration,
            heartbeat_period: Duration::from_secs_f64(heartbeat_period.max(0.001)),
            heartbeat_threshold: Duration::from_secs_f64(heartbeat_threshold.max(0.001)),
            hostname,
            curve: curve_keys.map(|(public, secret, server_public)| manager::ClientKeys {
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
            log_path: log_path.map(Into::into),
            debug,
        };
        let h = py
            .detach(|| manager::Handle::start(config))
            .map_err(PyRuntimeError::new_err)?;
        Ok(PoolCore {
            handle: Mutex::new(Some(Arc::new(h))),
        })
    }

    /// Report that worker process `pid` ended (`exit_code` negative: killed by that
    /// signal). Returns at once; the core fails the task it was running as WorkerLost.
    /// After the core has stopped there is nothing left to fail: the interchange fails
    /// this pool's tasks as ManagerLost.
    fn worker_died(&self, pid: u32, exit_code: i32) {
        if let Ok(h) = pool_handle(self) {
            h.command(manager::Command::WorkerDied { pid, exit_code });
        }
    }

    /// What the core has done so far: tasks received, started, results, lost, deaths,
    /// requeued, the tasks queued and held by workers now, and the registered workers.
    fn counts<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let c = pool_handle(self)?.counts();
        let d = PyDict::new(py);
        d.set_item("received", c.received)?;
        d.set_item("started", c.started)?;
        d.set_item("results", c.results)?;
        d.set_item("lost", c.lost)?;
        d.set_item("deaths", c.deaths)?;
        d.set_item("queued", c.queued)?;
        d.set_item("requeued", c.requeued)?;
        d.set_item("held", c.held)?;
        d.set_item("workers", c.workers)?;
        Ok(d)
    }

    /// Wait up to `timeout_ms`; returns None while running, else (reason, detail).
    fn wait_stopped(&self, py: Python<'_>, timeout_ms: u64) -> PyResult<Option<(String, String)>> {
        let h = pool_handle(self)?;
        let s = py.detach(move || h.wait_stopped(Duration::from_millis(timeout_ms)));
        Ok(s.map(|s| match s {
            manager::Stopped::Shutdown => ("shutdown".to_string(), String::new()),
            manager::Stopped::Refused(why) => ("refused".to_string(), why),
            manager::Stopped::Silent => ("silent".to_string(), String::new()),
            manager::Stopped::Disconnected => ("disconnected".to_string(), String::new()),
            manager::Stopped::Requested => ("requested".to_string(), String::new()),
            manager::Stopped::Crashed => ("crashed".to_string(), String::new()),
        }))
    }

    fn stop(&self, py: Python<'_>) {
        let h = self.handle.lock().unwrap().take();
        if let Some(h) = h {
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

#[pymethods]
impl WorkerInbox {
    /// Connect to the pool at `url` and register as worker `rank`.
    #[new]
    #[pyo3(signature = (url, rank, max_message_bytes=1 << 30))]
    fn new(py: Python<'_>, url: &str, rank: &str, max_message_bytes: usize) -> PyResult<Self> {
        let max = max_message_bytes.saturating_add(1 << 20); // framing and meta on top
        let inbox = py
            .detach(|| {
                worker_inbox::connect(url)
                    .and_then(|s| worker_inbox::Inbox::start(s, rank.as_bytes(), max))
            })
            .map_err(|e| PyOSError::new_err(format!("cannot connect to the pool at {url}: {e}")))?;
        Ok(WorkerInbox { inbox })
    }

    /// The next task, `(task_id, flags, payload)`, waiting for one; None once the stream
    /// has ended (nothing more may be started then).
    fn next<'py>(&self, py: Python<'py>) -> Option<(u64, u8, Bound<'py, PyBytes>)> {
        let t = py.detach(|| self.inbox.next())?;
        Some((t.id, t.flags, PyBytes::new(py, &t.payload)))
    }

    /// Send one task's result (or exception) at once.
    fn send_result(
        &self,
        py: Python<'_>,
        task_id: u64,
        status: u8,
        payload: &[u8],
    ) -> PyResult<()> {
        py.detach(|| self.inbox.send_result(task_id, status, payload))
            .map_err(|e| PyOSError::new_err(format!("cannot send a result to the pool: {e}")))
    }
}

fn plan_error(e: planner::PlanError) -> PyErr {
    PyValueError::new_err(e.to_string())
}

/// Validate a `cpu_affinity` string at configuration time; `workers` when known.
#[pyfunction]
#[pyo3(signature = (value, workers=None))]
fn validate_cpu_affinity(value: &str, workers: Option<usize>) -> PyResult<()> {
    planner::Strategy::validate(value, workers)
        .map(|_| ())
        .map_err(plan_error)
}

#[pyfunction]
fn parse_cpu_list(text: &str) -> PyResult<Vec<u32>> {
    planner::cpulist::parse(text).map_err(|e| PyValueError::new_err(e.to_string()))
}

#[pyfunction]
fn format_cpu_list(cpus: Vec<u32>) -> String {
    planner::cpulist::format(&cpus)
}

/// The CPUs this process may run on (sched_getaffinity).
#[pyfunction]
fn allowed_cpus() -> PyResult<Vec<u32>> {
    planner::topology::allowed_cpus().map_err(|e| PyRuntimeError::new_err(e.to_string()))
}

/// The node's topology (from sysfs under `sysfs_root`, or `synthetic`) and the CPUs
/// allowed (`allowed`; default: all of a synthetic topology, else this process's mask).
fn topology(
    sysfs_root: &str,
    synthetic: Option<(u32, u32, u32, u32)>,
    allowed: Option<Vec<u32>>,
) -> PyResult<(planner::Topology, Vec<u32>)> {
    let topo = match synthetic {
        Some((p, c, t, n)) => planner::Topology::synthetic(p, c, t, n),
        None => planner::Topology::read(std::path::Path::new(sysfs_root))
            .map_err(|e| PyRuntimeError::new_err(e.to_string()))?,
    };
    let allowed = match allowed {
        Some(a) => a,
        None if synthetic.is_some() => topo.cpus.keys().copied().collect(),
        None => {
            planner::topology::allowed_cpus().map_err(|e| PyRuntimeError::new_err(e.to_string()))?
        }
    };
    Ok((topo, allowed))
}

/// A pool's CPU slots for tasks that ask for cores, as `(cpu, numa_node)` in the order
/// grants take them (see `resources::cpu_slots`): one per CPU in `allowed` (default:
/// this process's mask), or `declared` of them.
#[pyfunction]
#[pyo3(signature = (declared=None, allowed=None, sysfs_root="/".to_string(), synthetic=None))]
#[allow(clippy::needless_pass_by_value)]
fn cpu_slots(
    declared: Option<usize>,
    allowed: Option<Vec<u32>>,
    sysfs_root: String,
    synthetic: Option<(u32, u32, u32, u32)>,
) -> PyResult<Vec<(u32, u32)>> {
    let (topo, allowed) = topology(&sysfs_root, synthetic, allowed)?;
    Ok(crate::resources::cpu_slots(&topo, &allowed, declared)
        .into_iter()
        .map(|s| (s.cpu, s.numa))
        .collect())
}

/// Plan a pool. Topology comes from `synthetic=(packages, cores, threads, numa_per_package)`
/// or else from sysfs under `sysfs_root`; `allowed` defaults to this process's mask.
#[pyfunction]
#[pyo3(signature = (strategy, workers, accelerators=Vec::new(), allowed=None, sysfs_root="/".to_string(),
                    num_gpus=None, synthetic=None))]
#[allow(clippy::needless_pass_by_value)]
fn plan_pool<'py>(
    py: Python<'py>,
    strategy: &str,
    workers: usize,
    accelerators: Vec<String>,
    allowed: Option<Vec<u32>>,
    sysfs_root: String,
    num_gpus: Option<usize>,
    synthetic: Option<(u32, u32, u32, u32)>,
) -> PyResult<Bound<'py, PyList>> {
    let strategy = planner::Strategy::parse(strategy).map_err(plan_error)?;
    let (topo, allowed) = topology(&sysfs_root, synthetic, allowed)?;
    let plan = planner::plan(&strategy, &allowed, &topo, workers, &accelerators, num_gpus)
        .map_err(plan_error)?;
    let out = PyList::empty(py);
    for w in plan {
        let d = PyDict::new(py);
        d.set_item("rank", w.rank)?;
        d.set_item("cpus", w.cpus)?;
        d.set_item("cores", w.cores)?;
        d.set_item("numa_nodes", w.numa_nodes)?;
        d.set_item("accelerator", w.accelerator)?;
        let env = PyDict::new(py);
        for (k, v) in w.env {
            env.set_item(k, v)?;
        }
        d.set_item("env", env)?;
        out.append(d)?;
    }
    Ok(out)
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Interchange>()?;
    m.add_class::<PoolCore>()?;
    m.add_class::<WorkerInbox>()?;
    m.add_function(wrap_pyfunction!(validate_cpu_affinity, m)?)?;
    m.add_function(wrap_pyfunction!(parse_cpu_list, m)?)?;
    m.add_function(wrap_pyfunction!(format_cpu_list, m)?)?;
    m.add_function(wrap_pyfunction!(allowed_cpus, m)?)?;
    m.add_function(wrap_pyfunction!(plan_pool, m)?)?;
    m.add_function(wrap_pyfunction!(cpu_slots, m)?)?;
    m.add("PROTOCOL_VERSION", PROTOCOL_VERSION)?;
    m.add("STATUS_RESULT", protocol::STATUS_RESULT)?;
    m.add("STATUS_EXCEPTION", protocol::STATUS_EXCEPTION)?;
    m.add("STATUS_MONITORING", protocol::STATUS_MONITORING)?;
    m.add("STATUS_WORKER_LOST", protocol::STATUS_WORKER_LOST)?;
    m.add("STATUS_UNPLACEABLE", protocol::STATUS_UNPLACEABLE)?;
    m.add("FLAG_RESOURCES", crate::resources::FLAG_RESOURCES)?;
    m.add("VERSION", interchange::HTEX_RS_VERSION)?;
    m.add("HAS_CURVE", zmq::has("curve") == Some(true))?;
    Ok(())
}
