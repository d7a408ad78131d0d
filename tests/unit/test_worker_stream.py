"""The pool-worker link's framing: messages over a Unix socket pair (python/htex_rs/stream.py
against rust/stream.rs's codec through ``_core``), in this process. Who may connect to a real
pool's socket is tests/integration/test_worker_stream_pool.py."""
from __future__ import annotations

import socket
import threading

import pytest

from htex_rs import _core, stream, wire
from support.stream_peer import Reader

pytestmark = [pytest.mark.timeout(120), pytest.mark.fault]


def test_messages_round_trip_with_large_and_empty_frames():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    msgs = [[b"HX\x01\x42", b"", b"x" * (5 << 20)], [b"tail"], []]
    sender = threading.Thread(target=lambda: [stream.send(a, m) for m in msgs])
    sender.start()  # 5 MiB is more than the socket buffer: sends and reads interleave
    reader = Reader(b)
    got = [reader.recv() for _ in msgs]
    sender.join()
    assert got == msgs
    a.close()
    assert reader.recv() is None, "end of stream is None"


KINDS = {name: getattr(wire, name) for name in (
    "PROBE", "REGISTER", "HEARTBEAT", "RESULTS", "RETURNED", "PROBE_ACK", "TASKS",
    "HEARTBEAT_REPLY", "SHUTDOWN", "REFUSED", "REGISTERED", "RECLAIM")}


def test_every_message_kind_round_trips_through_the_rust_codec():
    """wire's names are Rust's (``_core.KIND_*``): each header decodes to its kind, each
    message with a meta frame crosses the stream intact, and the kinds are distinct."""
    assert len(set(KINDS.values())) == len(KINDS)
    for name, kind in KINDS.items():
        head = wire.header(kind)
        assert head == wire.MAGIC + bytes((wire.PROTOCOL_VERSION, kind)), name
        assert wire.kind_of(head) == kind, name
        meta = wire.encode_meta([(2**64 - 1, 0), (7, 255)])
        assert wire.decode_meta(meta, 2) == [(2**64 - 1, 0), (7, 255)]
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        stream.send(a, [head, meta, b"payload"])
        a.close()
        reader = Reader(b)
        assert reader.recv() == [head, meta, b"payload"], name
        assert reader.recv() is None


def test_bad_frames_and_streams_are_clear_errors_not_crashes():
    assert wire.kind_of(b"HX") == -1, "a short header is not a header"
    assert wire.kind_of(wire.header(wire.TASKS, version=wire.PROTOCOL_VERSION + 1)) == -1
    assert wire.kind_of(b"HX" + bytes((wire.PROTOCOL_VERSION, 0xFE))) == -1
    with pytest.raises(ValueError, match="unknown message kind"):
        wire.header(0xFE)
    with pytest.raises(ValueError, match="batch meta"):
        wire.decode_meta(b"\x01\x02", 1)
    with pytest.raises(ValueError, match="cut short"):
        wire.split_head(b"\x05\x00")
    # A stream that ends inside a message ends the reader cleanly.
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a.sendall(_core.encode_stream([b"whole"]) + b"\x01\x00\x00\x00\x10")
    a.close()
    reader = Reader(b)
    assert reader.recv() == [b"whole"]
    assert reader.recv() is None
