"""max_message_bytes: oversized tasks are refused at submit, oversized results fail their
task on the worker, and an oversized frame on the worker port only costs its sender."""
from __future__ import annotations

import os

import pytest
import zmq
from parsl.providers import LocalProvider

from htex_rs import HighThroughputExecutor, _core, wire
from htex_rs.errors import TaskTooLarge
from support import worker_pythonpath

pytestmark = [pytest.mark.timeout(120), pytest.mark.fault]
LIMIT = 200_000


def blob(n):
    return b"x" * n


@pytest.fixture
def executor(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", worker_pythonpath(__file__))
    ex = HighThroughputExecutor(label="limits", address="127.0.0.1", max_workers_per_node=1, encrypted=False,
                                provider=LocalProvider(init_blocks=1, max_blocks=1))
    ex.max_message_bytes = LIMIT
    ex.run_dir = str(tmp_path)
    with ex:
        yield ex


def test_oversized_task_is_refused_at_submit(executor):
    with pytest.raises(TaskTooLarge, match="max_message_bytes=0.2 MiB") as info:
        executor.submit(len, {}, b"y" * (LIMIT + 1))
    assert "pass large data as files" in str(info.value)
    assert executor.outstanding() == 0
    assert executor.submit(len, {}, b"y" * 1000).result(timeout=60) == 1000


def test_oversized_result_fails_its_task_and_the_pool_carries_on(executor):
    with pytest.raises(TaskTooLarge, match="the result of task"):
        executor.submit(blob, {}, LIMIT * 2).result(timeout=60)
    assert executor.submit(blob, {}, 10).result(timeout=60) == b"x" * 10
    assert len(executor.connected_managers()) == 1


def test_oversized_frame_on_the_worker_port_is_cut_off(executor):
    ctx = zmq.Context()
    try:
        from zmq.utils.monitor import recv_monitor_message
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.RECONNECT_IVL, 60_000)  # keep the cut visible
        mon = s.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED)
        s.connect(f"tcp://127.0.0.1:{executor.worker_port}")
        assert recv_monitor_message(mon)["event"] == zmq.EVENT_CONNECTED
        # Past the payload limit plus the framing every limit allows on top of it.
        s.send_multipart([wire.header(wire.PROBE), os.urandom(LIMIT + _core.FRAMING_HEADROOM + 1)])
        assert mon.poll(5000), "the oversized sender was not disconnected"
        assert recv_monitor_message(mon)["event"] == zmq.EVENT_DISCONNECTED
        assert not s.poll(200), "the oversized probe was answered"
        assert executor.submit(blob, {}, 10).result(timeout=60) == b"x" * 10  # still serving
    finally:
        ctx.destroy(linger=0)
