"""The pool-worker link through a real pool: who may connect to a pool's socket, and a
worker death the pool's core hears of after it ended. (The framing itself is
tests/unit/test_worker_stream.py.)"""
from __future__ import annotations

import os
import shutil
import subprocess
import textwrap

import psutil
import pytest
from parsl.providers import LocalProvider

from htex_rs import HighThroughputExecutor, wire
from support import worker_pythonpath

pytestmark = [pytest.mark.timeout(120), pytest.mark.fault]


def pow2(x):
    return x * x


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a process as another user")
def test_a_pool_socket_admits_only_its_own_user(tmp_path, monkeypatch):
    """The worker socket is abstract (no file permissions): another user's process that
    connects is dropped at once, and the pool keeps serving its own workers."""
    monkeypatch.setenv("PYTHONPATH", worker_pythonpath(__file__))
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
