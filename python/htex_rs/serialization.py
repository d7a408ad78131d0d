"""Task and result bytes in Parsl's serialized form, written and read faster where that
changes nothing.

Parsl serializes data (a task's arguments, a result) with dill, whose pickler is pure
Python: for a no-op app that is the largest cost in the submitting process. For most data
the C pickler writes what dill would mean; dill only differs for objects plain pickle
cannot write (it raises) and for functions and classes defined in ``__main__`` (pickle
names them, dill sends them by value). So data is pickled with the C pickler under the
header of Parsl's ``PickleSerializer`` (``01``); when pickle raises, or its output names
``__main__`` (a string that merely contains it only costs the fallback), Parsl's own
``serialize`` writes it with dill, as Parsl would.

That happens only while Parsl's data serializers are its default (dill alone): a user who
registered their own keeps Parsl's path. Callables always go through Parsl (it caches
them). Both ends of these bytes are htex_rs (the executor and its workers: the protocol
version keeps other releases out), and :func:`deserialize` reads ``01`` and everything
Parsl's ``deserialize`` reads.
"""
from __future__ import annotations

import logging
import pickle
from typing import Any, Sequence

from parsl.serialize import facade
from parsl.serialize.concretes import DillSerializer, PickleSerializer

logger = logging.getLogger(__name__)

_PICKLE_HEAD = PickleSerializer.identifier + b"\n"
_MAIN = b"__main__"
# Values whose pickle names no global at all: plain data needs no look for ``__main__``
# (a search through every byte, as costly as a copy for a 100 MB argument).
_SCALARS = frozenset({bytes, bytearray, str, int, float, bool, complex, type(None)})


def _plain(obj: Any, depth: int = 0) -> bool:
    """``obj`` pickles without naming any function or class of ``__main__``: scalars and
    bytes, small containers of them (two levels), and numpy arrays of plain numbers."""
    t = type(obj)
    if t in _SCALARS:
        return True
    if depth < 2 and (t is tuple or t is list) and len(obj) <= 64:
        return all(_plain(o, depth + 1) for o in obj)
    if depth < 2 and t is dict and len(obj) <= 64:
        return all(type(k) in _SCALARS and _plain(v, depth + 1) for k, v in obj.items())
    if t.__name__ == "ndarray" and t.__module__ == "numpy":
        return not obj.dtype.hasobject
    return False


def _data_methods_are_parsls_default() -> bool:
    methods = facade.methods_for_data
    return len(methods) == 1 and type(methods.get(DillSerializer.identifier)) is DillSerializer


def serialize_parts(obj: Any, buffer_threshold: int = 1 << 20) -> list[bytes]:
    """:func:`serialize`'s bytes as parts to be sent back to back: the pickle is not copied
    behind its header (a copy of a 100 MB argument costs more than the pickling)."""
    if not callable(obj) and _data_methods_are_parsls_default():
        try:
            body = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception:  # noqa: BLE001 (what pickle cannot write, dill may: Parsl's path says)
            body = None
        # A small pickle is searched (quicker than looking at the object); a large one
        # only if the object is not plain data.
        if body is not None and (_MAIN not in body if len(body) <= 1 << 16 else
                                 _plain(obj) or _MAIN not in body):
            if len(body) > buffer_threshold:
                logger.warning("Serialized object exceeds buffer threshold of %s bytes, this could cause "
                               "overflows", buffer_threshold)
            return [_PICKLE_HEAD, body]
    return [facade.serialize(obj, buffer_threshold=buffer_threshold)]


def serialize(obj: Any, buffer_threshold: int = 1 << 20) -> bytes:
    """What ``parsl.serialize.serialize(obj)`` means, by the C pickler where it is the same."""
    return b"".join(serialize_parts(obj, buffer_threshold))


def deserialize(data: bytes | memoryview) -> Any:
    """Read :func:`serialize`'s bytes, or anything Parsl's ``deserialize`` reads."""
    view = memoryview(data)
    if view[:3] == _PICKLE_HEAD:
        return pickle.loads(view[3:])
    return facade.deserialize(bytes(view) if isinstance(data, memoryview) else data)


def pack_buffers(buffers: Sequence[bytes | Sequence[bytes]]) -> bytes:
    """Parsl's framing: per buffer its decimal length, a newline, then the bytes. A buffer
    may be given as its parts; everything is joined once."""
    parts: list[bytes] = []
    for b in buffers:
        if isinstance(b, bytes):
            parts += (b"%d\n" % len(b), b)
        else:
            parts.append(b"%d\n" % sum(map(len, b)))
            parts += b
    return b"".join(parts)


def unpack_buffers(packed: bytes) -> list[memoryview]:
    """The buffers of :func:`pack_buffers` (or Parsl's), as views: nothing is copied."""
    view = memoryview(packed)
    out: list[memoryview] = []
    at = 0
    while at < len(view):
        nl = packed.index(b"\n", at)
        end = nl + 1 + int(packed[at:nl])
        if end > len(view):
            raise ValueError(f"a packed buffer claims {end - nl - 1} bytes, {len(view) - nl - 1} remain")
        out.append(view[nl + 1:end])
        at = end
    return out


def pack_apply_message(func: Any, args: Any, kwargs: Any, buffer_threshold: int = 1 << 20) -> bytes:
    """``parsl.serialize.pack_apply_message``, with :func:`serialize` for the data."""
    return pack_buffers([facade.serialize(func, buffer_threshold=buffer_threshold),
                         serialize_parts(args, buffer_threshold), serialize_parts(kwargs, buffer_threshold)])


def unpack_apply_message(packed: bytes) -> list[Any]:
    """``[func, args, kwargs]`` from :func:`pack_apply_message` (or Parsl's)."""
    return [deserialize(b) for b in unpack_buffers(packed)]
