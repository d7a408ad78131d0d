"""The worker port against hostile and foreign peers: CURVE client authentication,
junk frames, and pools of another protocol or Python version. Raw pyzmq peers, real sockets."""
from __future__ import annotations

import json
import os
import socket
import sys
import time

import pytest
import zmq
import zmq.auth
from parsl.executors.errors import BadStateException

from htex_rs import HighThroughputExecutor, _core, wire
from htex_rs.errors import HtexRsConfigurationError, ProtocolVersionMismatch

pytestmark = [pytest.mark.timeout(120), pytest.mark.fault]


def noop(x=0):
    return x


@pytest.fixture
def executor(tmp_path, request):
    """A started executor with no worker blocks; param = encrypted, or (encrypted,
    check_python) to set _check_python_mismatch (default True), which start() hands to
    the interchange: setting it after start() has no effect."""
    encrypted, check_python = request.param if isinstance(request.param, tuple) else (request.param, True)
    ex = HighThroughputExecutor(label="wire", address="127.0.0.1", encrypted=encrypted,
                                heartbeat_period=1, heartbeat_threshold=3)
    ex._check_python_mismatch = check_python
    ex.run_dir = str(tmp_path)
    ex.start()
    yield ex
    ex.shutdown()


def dealer(ctx: zmq.Context, port: int, identity: bytes, keys=None) -> zmq.Socket:
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.IDENTITY, identity)
    if keys is not None:
        pub, sec, server = keys
        s.curve_publickey, s.curve_secretkey, s.curve_serverkey = pub, sec, server
    s.connect(f"tcp://127.0.0.1:{port}")
    return s


def register(s: zmq.Socket, uid: str, python_version: str) -> tuple[int, list[bytes]]:
    """Register as a pool of this protocol version; (the answer's kind, its frames)."""
    reg = {"protocol_version": _core.PROTOCOL_VERSION, "uid": uid, "block_id": "0",
           "max_capacity": 1, "worker_count": 1, "python_version": python_version}
    s.send_multipart([wire.header(wire.REGISTER), json.dumps(reg).encode()])
    assert s.poll(5000), "the interchange did not answer a registration"
    frames = s.recv_multipart()
    return wire.kind_of(frames[0]), frames


THIS_PYTHON = "{}.{}.{}".format(*sys.version_info[:3])
OTHER_PYTHON = f"{sys.version_info[0]}.{sys.version_info[1] + 1}.0"


def probe_answered(s: zmq.Socket, timeout_ms: int = 1500) -> bool:
    s.send(wire.header(wire.PROBE))
    if not s.poll(timeout_ms):
        return False
    return wire.kind_of(s.recv_multipart()[0]) == wire.PROBE_ACK


@pytest.mark.parametrize("executor", [True], indirect=True)
def test_curve_admits_only_keys_from_the_certificate_directory(executor):
    certs = executor.cert_dir
    assert os.stat(certs).st_mode & 0o777 == 0o700
    server_pub, _ = zmq.auth.load_certificate(os.path.join(certs, "server.key"))
    good_pub, good_sec = zmq.auth.load_certificate(os.path.join(certs, "client.key_secret"))
    rogue_pub, rogue_sec = zmq.curve_keypair()
    ctx = zmq.Context()
    try:
        assert not probe_answered(dealer(ctx, executor.worker_port, b"rogue", (rogue_pub, rogue_sec, server_pub)))
        assert not probe_answered(dealer(ctx, executor.worker_port, b"plain"))
        # The interchange keeps serving the legitimate client after both.
        assert probe_answered(dealer(ctx, executor.worker_port, b"good", (good_pub, good_sec, server_pub)))
        assert executor.interchange_stats()["dropped_messages"] >= 1  # the refused CURVE key
    finally:
        ctx.destroy(linger=0)


@pytest.mark.parametrize("executor", [False], indirect=True)
def test_junk_is_dropped_counted_and_serving_continues(executor):
    ctx = zmq.Context()
    try:
        s = dealer(ctx, executor.worker_port, b"junk")
        junk = [[b"FuzzyByte\rSTREAM"], [b"{}"], [b'{"type":"heartbeat"}'],
                [wire.header(wire.HEARTBEAT)],                      # unregistered heartbeat
                [wire.header(wire.RESULTS), b"\x01\x02"],            # unregistered + truncated
                [wire.header(wire.REGISTER), b"not json"],
                [wire.MAGIC + bytes((wire.PROTOCOL_VERSION, 0xFE))],  # unknown kind
                [wire.header(wire.TASKS)]]                           # wrong direction
        for frames in junk:
            s.send_multipart(frames)
        deadline = time.monotonic() + 10
        while executor.interchange_stats()["dropped_messages"] < len(junk) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert executor.interchange_stats()["dropped_messages"] == len(junk)
        assert probe_answered(s)
        # A registered peer (same Python, so it must be accepted) with a truncated result
        # batch is dropped too, without harm.
        kind, _ = register(s, "junk", THIS_PYTHON)
        assert kind == wire.REGISTERED
        assert [m["manager"] for m in executor.connected_managers()] == ["junk"]
        s.send_multipart([wire.header(wire.RESULTS), b"\x01\x02"])  # meta for no payload, and truncated
        deadline = time.monotonic() + 10
        while executor.interchange_stats()["dropped_messages"] <= len(junk) and time.monotonic() < deadline:
            time.sleep(0.05)
        stats = executor.interchange_stats()
        assert stats["dropped_messages"] == len(junk) + 1 and stats["results_forwarded"] == 0
        assert probe_answered(s)
        assert not executor.bad_state_is_set
    finally:
        ctx.destroy(linger=0)


@pytest.mark.parametrize("executor", [(False, True)], indirect=True)
def test_pool_of_another_python_is_refused_when_the_check_is_on(executor):
    fut = executor.submit(noop, {}, 1)
    ctx = zmq.Context()
    try:
        kind, frames = register(dealer(ctx, executor.worker_port, b"py-other"), "py-other", OTHER_PYTHON)
        assert kind == wire.REFUSED
        msg = frames[1].decode()
        assert "Python version mismatch" in msg and OTHER_PYTHON in msg
        assert "{}.{}".format(*sys.version_info[:2]) in msg
        with pytest.raises(BadStateException, match="Python version mismatch"):
            fut.result(timeout=10)
        assert isinstance(executor.executor_exception, ProtocolVersionMismatch)
        assert executor.connected_managers() == []
    finally:
        ctx.destroy(linger=0)


@pytest.mark.parametrize("executor", [(False, False)], indirect=True)
def test_pool_of_another_python_registers_when_the_check_was_turned_off_before_start(executor):
    ctx = zmq.Context()
    try:
        kind, _ = register(dealer(ctx, executor.worker_port, b"py-other"), "py-other", OTHER_PYTHON)
        assert kind == wire.REGISTERED
        managers = executor.connected_managers()
        assert [(m["manager"], m["python_version"]) for m in managers] == [("py-other", OTHER_PYTHON)]
        assert not executor.bad_state_is_set
    finally:
        ctx.destroy(linger=0)


@pytest.mark.parametrize("executor", [False], indirect=True)
def test_pool_of_another_protocol_version_is_refused_and_tasks_fail(executor):
    fut = executor.submit(noop, {}, 1)
    ctx = zmq.Context()
    try:
        s = dealer(ctx, executor.worker_port, b"future-pool")
        future_version = _core.PROTOCOL_VERSION + 1
        doc = {"protocol_version": future_version, "htex_rs_version": "99.0.0", "uid": "future-pool",
               "max_capacity": 1}
        s.send_multipart([wire.header(wire.REGISTER, version=future_version), json.dumps(doc).encode()])
        assert s.poll(5000), "the interchange did not answer a pool of another version"
        frames = s.recv_multipart()
        assert frames[0][3] == wire.REFUSED
        msg = frames[1].decode()
        assert f"v{future_version}" in msg and f"v{_core.PROTOCOL_VERSION}" in msg and "99.0.0" in msg
        with pytest.raises(BadStateException, match=f"v{future_version}"):
            fut.result(timeout=10)
        assert executor.bad_state_is_set
        assert isinstance(executor.executor_exception, ProtocolVersionMismatch)
    finally:
        ctx.destroy(linger=0)


def curve_greeting() -> bytes:
    """A ZMTP 3.1 client greeting for the CURVE mechanism (and nothing after it: a
    connection that never finishes its handshake)."""
    return b"\xff" + b"\x00" * 8 + b"\x7f\x03\x01" + b"CURVE".ljust(20, b"\x00") + b"\x00" * 32


def closed_by_peer(s: socket.socket, timeout: float) -> bool:
    """Whether the other end closes `s` within `timeout` (its greeting is read and skipped)."""
    s.settimeout(timeout)
    try:
        while True:
            if not s.recv(4096):
                return True
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


def test_handshakes_past_the_per_source_cap_are_refused_and_pools_still_served(tmp_path):
    """max_pending_handshakes_per_source, set before start(): one address holding that many
    unfinished CURVE handshakes has its further connections closed at once, while a pool
    with the right keys still registers and is answered."""
    ex = HighThroughputExecutor(label="caps", address="127.0.0.1", encrypted=True)
    ex.max_pending_handshakes_per_source = 3
    ex.run_dir = str(tmp_path)
    ex.start()
    ctx = zmq.Context()
    held = []
    try:
        for _ in range(3):
            s = socket.create_connection(("127.0.0.1", ex.worker_port))
            s.sendall(curve_greeting())
            held.append(s)
        # Accepted in the order they connected (the listen queue is first in, first out).
        extra = [socket.create_connection(("127.0.0.1", ex.worker_port)) for _ in range(4)]
        assert all(closed_by_peer(s, 5) for s in extra), "a connection past the cap was kept"
        assert not any(closed_by_peer(s, 0.2) for s in held), "a connection within the cap was closed"
        for s in held:
            s.close()
        server_pub, _ = zmq.auth.load_certificate(os.path.join(ex.cert_dir, "server.key"))
        pub, sec = zmq.auth.load_certificate(os.path.join(ex.cert_dir, "client.key_secret"))
        assert probe_answered(dealer(ctx, ex.worker_port, b"good", (pub, sec, server_pub)), 5000)
    finally:
        for s in held:
            s.close()
        ctx.destroy(linger=0)
        ex.shutdown()


def test_handshake_caps_are_checked_at_start(tmp_path):
    ex = HighThroughputExecutor(label="caps", address="127.0.0.1", encrypted=True)
    ex.max_pending_handshakes = 0
    ex.run_dir = str(tmp_path)
    with pytest.raises(HtexRsConfigurationError, match="max_pending_handshakes=0 must be greater than 0"):
        ex.start()
