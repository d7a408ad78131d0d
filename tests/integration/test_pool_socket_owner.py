"""Workers check their pool: a pool socket served by another user is refused by
``stream.connect`` (SO_PEERCRED), so a worker started against one exits with the reason
instead of taking that user's tasks. The other direction, the pool admitting only its
own user's workers, is tests/integration/test_worker_stream_pool.py."""
from __future__ import annotations

import contextlib
import multiprocessing
import os
import socket
import subprocess
import sys
from multiprocessing.connection import Connection
from typing import Iterator

import pytest

from htex_rs import stream, wire
from htex_rs.errors import PoolSocketNotOurs
from htex_rs.worker import MonitoringChannel
from support.stream_peer import Reader

pytestmark = [pytest.mark.timeout(120)]
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to serve a socket as another user")

NOBODY = 65534


def address(url: str) -> str:
    return "\0" + url[1:] if url.startswith("@") else url


def serve_as(uid: int, url: str, reports: Connection) -> None:
    """In a forked child: drop to ``uid``, listen on ``url``, and report ("ready"), then
    for each connection every chunk's length as it arrives, and "eof" when it closes."""
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(address(url))
    listener.listen()
    reports.send("ready")
    while True:
        conn, _ = listener.accept()
        while data := conn.recv(1 << 16):
            reports.send(len(data))
        reports.send("eof")
        conn.close()


@contextlib.contextmanager
def served_by(uid: int, url: str) -> Iterator[Connection]:
    """A Unix socket at ``url`` served by a process of ``uid``; yields the pipe end on
    which it reports what it was sent (see ``serve_as``)."""
    ctx = multiprocessing.get_context("fork")  # the child needs no file of root's virtualenv
    ours, theirs = ctx.Pipe(duplex=False)
    child = ctx.Process(target=serve_as, args=(uid, url, theirs), daemon=True)
    child.start()
    try:
        assert ours.poll(10) and ours.recv() == "ready", "the other user's listener did not start"
        yield ours
    finally:
        child.kill()
        child.join()


def drain(reports: Connection) -> list[object]:
    got = []
    while reports.poll(0.5):
        got.append(reports.recv())
    return got


@needs_root
def test_a_pool_socket_served_by_another_user_is_refused() -> None:
    url = f"@htex-rs-test-foreign-{os.getpid()}"
    with served_by(NOBODY, url) as reports:
        with pytest.raises(PoolSocketNotOurs) as refused:
            stream.connect(url)
        message = str(refused.value)
        assert f"the pool socket {url} is served by uid {NOBODY}, this worker runs as uid 0" in message
        assert "refusing to take tasks from it" in message
        assert (refused.value.uid, refused.value.own_uid) == (NOBODY, 0)
        assert isinstance(refused.value, ConnectionRefusedError), "callers that handle OSError handle it"
        # The worker's other stream, Parsl's monitoring queue, goes through the same check.
        with pytest.raises(PoolSocketNotOurs, match=f"served by uid {NOBODY}"):
            MonitoringChannel(url).put(b"monitoring message")
        assert drain(reports) == ["eof", "eof"], "connected, checked, closed: nothing was sent"


@pytest.mark.parametrize("kind", ["abstract", "path"])
def test_a_pool_socket_served_by_our_own_user_is_accepted(kind: str, tmp_path) -> None:
    url = f"@htex-rs-test-own-{os.getpid()}" if kind == "abstract" else str(tmp_path / "pool.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(address(url))
    listener.listen()
    try:
        sock = stream.connect(url)
        served, _ = listener.accept()
        with sock, served:
            stream.send(sock, [wire.header(wire.REGISTER), b"0"])
            assert Reader(served).recv() == [wire.header(wire.REGISTER), b"0"]
    finally:
        listener.close()


@needs_root
@pytest.mark.fault
def test_a_worker_started_against_another_users_socket_exits_with_the_reason(tmp_path) -> None:
    """A real worker process: it logs the refusal, says it on stderr (the pool's, so the
    block's), and exits at once, without registering or hanging; its pool would restart
    it with growing delays and then give up (tests/integration/test_faults.py)."""
    url = f"@htex-rs-test-foreign-worker-{os.getpid()}"
    with served_by(NOBODY, url) as reports:
        worker = subprocess.run(
            [sys.executable, "-m", "htex_rs.worker", "--url", url, "--rank", "0",
             "--logdir", str(tmp_path), "--pool-pid", str(os.getpid())],
            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
        expected = f"the pool socket {url} is served by uid {NOBODY}, this worker runs as uid 0"
        assert worker.returncode == 1, worker.stderr
        assert expected in worker.stderr
        assert "Traceback" not in worker.stderr, "a refusal is a message, not a crash"
        log = (tmp_path / "worker_0.log").read_text()
        assert "CRITICAL" in log and expected in log
        assert "Worker 0 ready" not in log
        assert drain(reports) == ["eof"], "the worker must not register with (send anything to) the socket"
