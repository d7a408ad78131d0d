//! The CPU-affinity and accelerator planner and the pool's CPU slots, for Python.
//! Bad input (a `cpu_affinity` string, a CPU list) is a ValueError that names the fix;
//! a node whose topology cannot be read is an OSError.

use pyo3::exceptions::{PyOSError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use crate::planner;

#[allow(clippy::needless_pass_by_value)] // map_err hands the error over by value
fn plan_error(e: planner::PlanError) -> PyErr {
    PyValueError::new_err(e.to_string())
}

#[allow(clippy::needless_pass_by_value)]
fn topology_error(e: planner::topology::TopologyError) -> PyErr {
    PyOSError::new_err(e.to_string())
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
#[allow(clippy::needless_pass_by_value)] // PyO3 hands over an owned list
fn format_cpu_list(cpus: Vec<u32>) -> String {
    planner::cpulist::format(&cpus)
}

/// The CPUs this process may run on (sched_getaffinity).
#[pyfunction]
fn allowed_cpus() -> PyResult<Vec<u32>> {
    planner::topology::allowed_cpus().map_err(topology_error)
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
        None => {
            planner::Topology::read(std::path::Path::new(sysfs_root)).map_err(topology_error)?
        }
    };
    let allowed = match allowed {
        Some(a) => a,
        None if synthetic.is_some() => topo.cpus.keys().copied().collect(),
        None => planner::topology::allowed_cpus().map_err(topology_error)?,
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

/// Plan a pool: one dict per worker (`WorkerPlan` in `_core.pyi`). Topology comes from
/// `synthetic=(packages, cores, threads, numa_per_package)` or else from sysfs under
/// `sysfs_root`; `allowed` defaults to this process's mask.
#[pyfunction]
#[pyo3(signature = (strategy, workers, accelerators=Vec::new(), allowed=None, sysfs_root="/".to_string(),
                    num_gpus=None, synthetic=None))]
#[allow(clippy::needless_pass_by_value, clippy::too_many_arguments)]
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

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(validate_cpu_affinity, m)?)?;
    m.add_function(wrap_pyfunction!(parse_cpu_list, m)?)?;
    m.add_function(wrap_pyfunction!(format_cpu_list, m)?)?;
    m.add_function(wrap_pyfunction!(allowed_cpus, m)?)?;
    m.add_function(wrap_pyfunction!(plan_pool, m)?)?;
    m.add_function(wrap_pyfunction!(cpu_slots, m)?)?;
    Ok(())
}
