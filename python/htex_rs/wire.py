"""Python side of the htex_rs wire protocol. Every constant and frame codec comes from
the Rust protocol module (rust/protocol/mod.rs, through ``_core``), so the two sides
cannot drift; what is here is the task payload's Python layer (context pickles, the
resource head's JSON, a lost worker's record).

Frames: a 4-byte header ``b"HX" + version + kind``, then for batches a packed meta
frame of (task id u64 LE, flag u8) entries followed by one opaque payload frame each.
"""
from __future__ import annotations

import json
import pickle
from typing import Any

from htex_rs import _core
from htex_rs._core import PROTOCOL_VERSION, encode_meta, kind_of

__all__ = ["PROTOCOL_VERSION", "decode_meta", "encode_meta", "header", "kind_of"]

MAGIC = _core.MAGIC
META_ENTRY = _core.META_ENTRY

PROBE, REGISTER, HEARTBEAT = _core.KIND_PROBE, _core.KIND_REGISTER, _core.KIND_HEARTBEAT
RESULTS, RETURNED = _core.KIND_RESULTS, _core.KIND_RETURNED
PROBE_ACK, TASKS, HEARTBEAT_REPLY = _core.KIND_PROBE_ACK, _core.KIND_TASKS, _core.KIND_HEARTBEAT_REPLY
SHUTDOWN, REFUSED, REGISTERED = _core.KIND_SHUTDOWN, _core.KIND_REFUSED, _core.KIND_REGISTERED
RECLAIM = _core.KIND_RECLAIM

STATUS_RESULT, STATUS_EXCEPTION = _core.STATUS_RESULT, _core.STATUS_EXCEPTION
#: A worker-side monitoring message (task id 0): pickle({'type': 'monitoring', 'payload': m}).
STATUS_MONITORING = _core.STATUS_MONITORING
#: The task's worker died running it; the payload is the pool's JSON
#: ``{"worker_id", "hostname", "pid", "exit_code"}`` (see :func:`worker_lost`).
STATUS_WORKER_LOST = _core.STATUS_WORKER_LOST
#: The task ran past its walltime and the pool ended its worker. The payload is JSON:
#: ``{"worker_id", "hostname", "pid", "walltime", "ran"}`` (see :func:`timed_out`).
STATUS_TIMEOUT = _core.STATUS_TIMEOUT
#: The interchange's answer to a task bigger than every connected pool (payload: why).
STATUS_UNPLACEABLE = _core.STATUS_UNPLACEABLE
#: The payload is pickle((context, buffer)) instead of the bare buffer.
FLAG_CONTEXT = _core.FLAG_CONTEXT
#: The payload starts with a JSON head behind a u32 LE length: the task's request
#: (cores, memory MB, gpus) from the executor, the pool's grant (plus cpus and
#: accelerators) for the worker. See rust/resources.rs.
FLAG_RESOURCES = _core.FLAG_RESOURCES


def header(kind: int, version: int = PROTOCOL_VERSION) -> bytes:
    """The header frame of a ``kind`` message; another ``version`` only for tests that
    play a pool of another protocol version."""
    if version == PROTOCOL_VERSION:
        return _core.header(kind)
    return MAGIC + bytes((version, kind))


def decode_meta(meta: bytes, count: int | None = None) -> list[tuple[int, int]]:
    """The (task id, flag or status) entries of a meta frame; ``count`` (default: as many
    as the frame holds) is how many payload frames follow it. ValueError if they differ."""
    return _core.decode_meta(meta, len(meta) // META_ENTRY if count is None else count)


def encode_task(context: dict[str, Any], buffer: bytes) -> tuple[int, bytes]:
    """Executor side: the flags and payload for one task."""
    if context:
        return FLAG_CONTEXT, pickle.dumps((context, buffer), protocol=pickle.HIGHEST_PROTOCOL)
    return 0, buffer


def split_head(payload: bytes) -> tuple[dict[str, Any], bytes]:
    """A FLAG_RESOURCES payload's head (a JSON object behind its length, put there by the
    interchange or the pool) and the rest; ValueError for a head cut short."""
    head, rest = _core.split_head(payload)
    doc = json.loads(head)
    if not isinstance(doc, dict):
        raise ValueError("a resource head that is not a JSON object")
    return doc, rest


def decode_task(flags: int, payload: bytes) -> tuple[dict[str, Any], bytes]:
    """Worker side: the inverse of :func:`encode_task`."""
    if flags & FLAG_CONTEXT:
        context, buffer = pickle.loads(payload)
        return context, buffer
    return {}, payload


def worker_lost(payload: bytes) -> tuple[Any, str, str]:
    """A STATUS_WORKER_LOST payload: (worker_id, hostname, what ended the process)."""
    d = json.loads(payload)
    worker_id = d.get("worker_id")
    try:
        worker_id = int(worker_id)  # Parsl's WorkerLost carries the integer rank
    except (TypeError, ValueError):
        pass
    code = d.get("exit_code")
    how = (f"killed by signal {-code}" if isinstance(code, int) and code < 0
           else f"exited with code {code}")
    return worker_id, str(d.get("hostname", "")), f"pid {d.get('pid')} {how}"


def timed_out(task_id: int, payload: bytes) -> str:
    """A STATUS_TIMEOUT payload, as the message of the AppTimeout the task fails with."""
    d = json.loads(payload)
    return (f"task {task_id} ran {float(d.get('ran', 0)):.1f} s, past its walltime of "
            f"{float(d.get('walltime', 0)):g} s: the pool on {d.get('hostname', '?')} ended its worker "
            f"{d.get('worker_id', '?')} (pid {d.get('pid')}) and the processes it started")

