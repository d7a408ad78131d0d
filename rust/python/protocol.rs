//! The wire protocol's constants and codecs for Python (`htex_rs.wire`, `htex_rs.stream`
//! and the tests), so the Python side never restates a layout the Rust side owns.

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::protocol::{self as wire, Kind, Registration};
use crate::{resources, stream};

/// `b"HX" + version + kind`.
#[pyfunction]
fn header(py: Python<'_>, kind: u8) -> PyResult<Bound<'_, PyBytes>> {
    let k = Kind::from_u8(kind)
        .ok_or_else(|| PyValueError::new_err(format!("unknown message kind {kind}")))?;
    Ok(PyBytes::new(py, &wire::header(k)))
}

/// The message kind of a header frame; -1 if it is not an htex_rs header of this version.
#[pyfunction]
fn kind_of(frame: &[u8]) -> i32 {
    wire::decode_header(frame).map_or(-1, |k| i32::from(k as u8))
}

#[pyfunction]
#[allow(clippy::needless_pass_by_value)] // PyO3 hands over an owned list
fn encode_meta(py: Python<'_>, entries: Vec<(u64, u8)>) -> Bound<'_, PyBytes> {
    PyBytes::new(py, &wire::encode_meta(&entries))
}

/// The `(task_id, flag)` entries of a meta frame of `count` entries.
#[pyfunction]
fn decode_meta(meta: &[u8], count: usize) -> PyResult<Vec<(u64, u8)>> {
    wire::decode_meta(meta, count).map_err(|e| PyValueError::new_err(e.to_string()))
}

/// A pool's registration document from the fields it measured (JSON); see
/// `Registration::from_fields`.
#[pyfunction]
fn registration<'py>(py: Python<'py>, fields: &[u8]) -> PyResult<Bound<'py, PyBytes>> {
    Registration::from_fields(fields)
        .map(|doc| PyBytes::new(py, &doc))
        .map_err(PyValueError::new_err)
}

/// A pool's CURVE keys from `cert_dir`, read where the interchange's are
/// (`zmtp::certs`): `(public, secret, server public)`, 32 bytes each.
#[pyfunction]
fn client_keys<'py>(
    py: Python<'py>,
    cert_dir: &str,
) -> PyResult<(
    Bound<'py, PyBytes>,
    Bound<'py, PyBytes>,
    Bound<'py, PyBytes>,
)> {
    let (public, secret, server) = crate::zmtp::certs::load_client(std::path::Path::new(cert_dir))
        .map_err(PyValueError::new_err)?;
    Ok((
        PyBytes::new(py, &public),
        PyBytes::new(py, &secret[..]),
        PyBytes::new(py, &server),
    ))
}

/// A `FLAG_RESOURCES` payload's head (JSON bytes) and the rest: `(head, payload)`.
#[pyfunction]
fn split_head<'py>(
    py: Python<'py>,
    payload: &[u8],
) -> PyResult<(Bound<'py, PyBytes>, Bound<'py, PyBytes>)> {
    let (head, rest) = resources::split(payload).ok_or_else(|| {
        PyValueError::new_err("a resource head that is cut short or longer than its payload")
    })?;
    Ok((PyBytes::new(py, head), PyBytes::new(py, rest)))
}

/// One message of the worker stream (`rust/stream.rs`).
#[pyfunction]
#[allow(clippy::needless_pass_by_value)] // PyO3 hands over an owned list
fn encode_stream(py: Python<'_>, frames: Vec<Vec<u8>>) -> PyResult<Bound<'_, PyBytes>> {
    stream::encode(&frames)
        .map(|b| PyBytes::new(py, &b))
        .map_err(|e| PyValueError::new_err(e.to_string()))
}

/// Every message kind as `KIND_<NAME>`, so Python names them as Rust does.
const KINDS: [(&str, Kind); 12] = [
    ("KIND_PROBE", Kind::Probe),
    ("KIND_REGISTER", Kind::Register),
    ("KIND_HEARTBEAT", Kind::Heartbeat),
    ("KIND_RESULTS", Kind::Results),
    ("KIND_RETURNED", Kind::Returned),
    ("KIND_PROBE_ACK", Kind::ProbeAck),
    ("KIND_TASKS", Kind::Tasks),
    ("KIND_HEARTBEAT_REPLY", Kind::HeartbeatReply),
    ("KIND_SHUTDOWN", Kind::Shutdown),
    ("KIND_REFUSED", Kind::Refused),
    ("KIND_REGISTERED", Kind::Registered),
    ("KIND_RECLAIM", Kind::Reclaim),
];

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("PROTOCOL_VERSION", wire::PROTOCOL_VERSION)?;
    m.add("MAGIC", PyBytes::new(m.py(), &wire::MAGIC))?;
    m.add("META_ENTRY", wire::META_ENTRY)?;
    m.add("FRAMING_HEADROOM", wire::FRAMING_HEADROOM)?;
    m.add("MAX_FRAMES", stream::MAX_FRAMES)?;
    for (name, kind) in KINDS {
        m.add(name, kind as u8)?;
    }
    m.add("STATUS_RESULT", wire::STATUS_RESULT)?;
    m.add("STATUS_EXCEPTION", wire::STATUS_EXCEPTION)?;
    m.add("STATUS_MONITORING", wire::STATUS_MONITORING)?;
    m.add("STATUS_WORKER_LOST", wire::STATUS_WORKER_LOST)?;
    m.add("STATUS_UNPLACEABLE", wire::STATUS_UNPLACEABLE)?;
    m.add("STATUS_TIMEOUT", wire::STATUS_TIMEOUT)?;
    m.add("FLAG_CONTEXT", wire::FLAG_CONTEXT)?;
    m.add("FLAG_RESOURCES", resources::FLAG_RESOURCES)?;
    m.add_function(wrap_pyfunction!(header, m)?)?;
    m.add_function(wrap_pyfunction!(registration, m)?)?;
    m.add_function(wrap_pyfunction!(client_keys, m)?)?;
    m.add_function(wrap_pyfunction!(kind_of, m)?)?;
    m.add_function(wrap_pyfunction!(encode_meta, m)?)?;
    m.add_function(wrap_pyfunction!(decode_meta, m)?)?;
    m.add_function(wrap_pyfunction!(split_head, m)?)?;
    m.add_function(wrap_pyfunction!(encode_stream, m)?)?;
    Ok(())
}
