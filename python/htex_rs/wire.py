"""Python side of the htex_rs wire protocol (see rust/protocol/mod.rs).

Frames: a 4-byte header ``b"HX" + version + kind``, then for batches a packed meta
frame of (task id u64 LE, flag u8) entries followed by one opaque payload frame each.
"""
from __future__ import annotations

import json
import pickle
import struct
from typing import Any

from htex_rs import _core
from htex_rs._core import PROTOCOL_VERSION

MAGIC = b"HX"
META = struct.Struct("<QB")

PROBE, REGISTER, HEARTBEAT, RESULTS, RETURNED = 1, 2, 3, 4, 5
PROBE_ACK, TASKS, HEARTBEAT_REPLY, SHUTDOWN, REFUSED, REGISTERED, RECLAIM = 65, 66, 67, 68, 69, 70, 71

# Result statuses come from the Rust protocol module, so the two sides cannot drift.
STATUS_RESULT, STATUS_EXCEPTION = _core.STATUS_RESULT, _core.STATUS_EXCEPTION
#: A worker-side monitoring message (task id 0): pickle({'type': 'monitoring', 'payload': m}).
STATUS_MONITORING = _core.STATUS_MONITORING
#: The task's worker died running it; the payload is the pool core's JSON
#: ``{"worker_id", "hostname", "pid", "exit_code"}`` (see :func:`worker_lost`).
STATUS_WORKER_LOST = _core.STATUS_WORKER_LOST
FLAG_CONTEXT = 1  # the payload is pickle((context, buffer)) instead of the bare buffer
#: The payload starts with a JSON head behind a u32 LE length: the task's request
#: (cores, memory MB, gpus) from the executor, the pool core's grant (plus cpus and
#: accelerators) for the worker. See rust/resources.rs.
FLAG_RESOURCES = _core.FLAG_RESOURCES
#: The interchange's answer to a task bigger than every connected pool (payload: why).
STATUS_UNPLACEABLE = _core.STATUS_UNPLACEABLE
_HEAD = struct.Struct("<I")


def header(kind: int, version: int = PROTOCOL_VERSION) -> bytes:
    return MAGIC + bytes((version, kind))


def kind_of(frame: bytes) -> int:
    """Return the message kind, or -1 for a frame that is not an htex_rs header."""
    if len(frame) != 4 or frame[:2] != MAGIC or frame[2] != PROTOCOL_VERSION:
        return -1
    return frame[3]


def encode_meta(entries: list[tuple[int, int]]) -> bytes:
    return b"".join(META.pack(tid, flag) for tid, flag in entries)


def decode_meta(meta: bytes) -> list[tuple[int, int]]:
    return list(META.iter_unpack(meta))


def encode_task(context: dict[str, Any], buffer: bytes) -> tuple[int, bytes]:
    """Executor side: the flags and payload for one task."""
    if context:
        return FLAG_CONTEXT, pickle.dumps((context, buffer), protocol=pickle.HIGHEST_PROTOCOL)
    return 0, buffer


def join_head(head: dict[str, Any], payload: bytes) -> bytes:
    """A FLAG_RESOURCES payload: ``head`` as JSON behind its length, then ``payload``."""
    doc = json.dumps(head, separators=(",", ":")).encode()
    return b"".join((_HEAD.pack(len(doc)), doc, payload))


def split_head(payload: bytes) -> tuple[dict[str, Any], bytes]:
    """The inverse of :func:`join_head`."""
    (n,) = _HEAD.unpack_from(payload)
    end = _HEAD.size + n
    if end > len(payload):
        raise ValueError("a resource head longer than its payload")
    return json.loads(payload[_HEAD.size:end]), payload[end:]


def decode_task(flags: int, payload: bytes) -> tuple[dict[str, Any], bytes]:
    """Worker side: the inverse of :func:`encode_task`."""
    if flags & FLAG_CONTEXT:
        return pickle.loads(payload)
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
