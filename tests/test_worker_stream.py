"""The pool-worker link: framed messages over a Unix stream (python/htex_rs/stream.py
against rust/stream.rs through a real pool), and who may connect to a pool's socket."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import textwrap
import threading

import psutil
import pytest
from parsl.providers import LocalProvider
from stream_peer import Reader

from htex_rs import HighThroughputExecutor, _core, stream, wire

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


def pow2(x):
    return x * x


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a process as another user")
def test_a_pool_socket_admits_only_its_own_user(tmp_path, monkeypatch):
    """The worker socket is abstract (no file permissions): another user's process that
    connects is dropped at once, and the pool keeps serving its own workers."""
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in (tests_dir, os.environ.get("PYTHONPATH")) if p))
    ex = HighThroughputExecutor(label="stream_uid", address="127.0.0.1", max_workers_per_node=1,
                                encrypted=False, provider=LocalProvider(init_blocks=1, max_blocks=1))
    ex.run_dir = str(tmp_path)
    with ex:
        assert ex.submit(pow2, {}, 3).result(timeout=60) == 9
        cmdlines = [p.info["cmdline"] for p in psutil.process_iter(["cmdline"])
                    if p.info["cmdline"] and "htex_rs.worker" in p.info["cmdline"]]
        urls = {a for cmd in cmdlines for i, a in enumerate(cmd) if cmd[i - 1] == "--url"}
        assert urls, "no worker found"
        url = urls.pop()
        # Self-contained (stdlib only, the system interpreter): user 65534 cannot read
        # root's virtualenv. Sends a framed REGISTER, then waits for anything.
        probe = textwrap.dedent(f"""
            import socket, struct
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect("\\0" + {url[1:]!r})
            frames = [{wire.header(wire.REGISTER)!r}, b"intruder"]
            try:
                s.sendall(struct.pack("<3I", 2, *map(len, frames)) + b"".join(frames))
                print("EOF" if s.recv(1) == b"" else "GOT DATA")
            except (BrokenPipeError, ConnectionResetError):
                print("EOF")  # dropped before (or while) we wrote
        """)
        python = shutil.which("python3", path="/usr/bin:/bin")
        if python is None:
            pytest.skip("no system python3 for the other user")
        stranger = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=30,
                                  user=65534, cwd="/tmp", env={"PATH": "/usr/bin:/bin"})
        assert stranger.stdout.strip() == "EOF", stranger.stderr
        same_user = subprocess.Popen([python, "-c", probe], stdout=subprocess.PIPE, text=True)
        try:
            with pytest.raises(subprocess.TimeoutExpired):  # admitted: waits for tasks
                same_user.wait(timeout=2)
        finally:
            same_user.kill()
            same_user.wait()
        assert [f.result(timeout=60) for f in [ex.submit(pow2, {}, i) for i in range(5)]] == [0, 1, 4, 9, 16]


def test_a_worker_death_noticed_after_the_core_ended_is_answered_at_once():
    """The race behind a pool that outlived its interchange by 30 s: the core stops (here:
    its interchange went silent), its workers exit on the closed streams, and the pool's
    supervisor then reports their deaths to the ended core. The answer (nothing held)
    must come at once, not after the 30 s command timeout."""
    import json
    import time

    import zmq

    from htex_rs import _core
    ctx = zmq.Context()
    ix = ctx.socket(zmq.ROUTER)  # a fake interchange that takes the registration, then says nothing
    ix.setsockopt(zmq.LINGER, 0)
    port = ix.bind_to_random_port("tcp://127.0.0.1")
    reg = json.dumps({"protocol_version": _core.PROTOCOL_VERSION, "uid": "late", "block_id": "0",
                      "worker_count": 1, "max_capacity": 1}).encode()
    core = _core.Pool(f"tcp://127.0.0.1:{port}", b"late", f"@htex-rs-test-late-{os.getpid()}", reg,
                      0.2, 1.0, "localhost", None, 1 << 20)
    try:
        assert ix.poll(5000), "the core did not register"
        stopped = core.wait_stopped(10_000)
        assert stopped is not None and stopped.exit_code == 1 and "Missing contact" in stopped.message, stopped
        t = time.monotonic()
        assert core.worker_died(12345, -9) is None
        assert time.monotonic() - t < 2, "the ended core's answer waited for the command timeout"
    finally:
        core.stop()
        ctx.destroy(linger=0)
