"""Parsl monitoring through htex_rs (adapted from Parsl's test_monitoring/test_basic.py):
with the default HTEXRadio, the workers' task and resource messages travel back over
htex_rs's own result path; the filesystem and UDP radios work as with Parsl's HTEX.
The interchange reports pools to the `node` table when they register, when they go and,
coalesced, when their task set changes (Parsl's reports on every dispatch and result),
listing every task at least once, as Globus Compute endpoints need."""
from __future__ import annotations

import queue
import threading
import time

import parsl
import pytest
from parsl.config import Config
from parsl.monitoring import MonitoringHub
from parsl.monitoring.message_type import MessageType
from parsl.monitoring.radios.filesystem import FilesystemRadio
from parsl.monitoring.radios.htex import HTEXRadio
from parsl.monitoring.radios.udp import UDPRadio
from parsl.providers import LocalProvider

from htex_rs import HighThroughputExecutor
from support import worker_pythonpath

pytestmark = pytest.mark.timeout(180)
sqlalchemy = pytest.importorskip("sqlalchemy")


def this_app():
    import time
    time.sleep(1.5)  # long enough for the resource monitor (interval 1 s) to report
    return 5


def config(radio) -> Config:
    ex = HighThroughputExecutor(label="htex_rs_monitoring", address="127.0.0.1", max_workers_per_node=1,
                                provider=LocalProvider(init_blocks=1, min_blocks=0, max_blocks=1))
    assert isinstance(ex.remote_monitoring_radio, HTEXRadio), "HTEXRadio is the default, as in Parsl"
    if radio is not None:
        ex.remote_monitoring_radio = radio
    return Config(executors=[ex], strategy="none",
                  monitoring=MonitoringHub(monitoring_debug=False, resource_monitoring_interval=1))


@pytest.mark.parametrize("radio", [None, "filesystem", "udp"])
def test_monitoring_database_rows(tmp_path, monkeypatch, radio):
    from sqlalchemy import text
    monkeypatch.setenv("PYTHONPATH", worker_pythonpath(__file__))
    monkeypatch.chdir(tmp_path)
    db_url = f"sqlite:///{tmp_path}/monitoring.db"
    c = config({None: None, "filesystem": FilesystemRadio(),
                "udp": UDPRadio(address="127.0.0.1", atexit_timeout=0)}[radio])
    c.run_dir = str(tmp_path / "runinfo")
    c.monitoring.logging_endpoint = db_url
    with parsl.load(c):
        assert parsl.python_app(this_app)().result(timeout=120) == 5

    engine = sqlalchemy.create_engine(db_url)
    with engine.begin() as connection:
        def count(sql: str) -> int:
            return connection.execute(text(sql)).first()[0]
        assert count("SELECT COUNT(*) FROM workflow") == 1
        assert count("SELECT COUNT(*) FROM task") == 1
        assert count("SELECT COUNT(*) FROM try") == 1
        # task_try_time_running comes from the worker side (the monitor wrapper's radio).
        assert count("SELECT COUNT(*) FROM status, try WHERE status.task_id = try.task_id "
                     "AND status.task_status_name='exec_done' AND task_try_time_running is NULL") == 0
        assert count("SELECT COUNT(*) FROM workflow WHERE time_began IS NOT NULL AND time_completed IS NOT NULL") == 1
        assert count("SELECT COUNT(*) FROM block") >= 2, "block statuses from a BlockProviderExecutor"
        # The node table: the pool active on registration and while its task set changes
        # (the task sent, the task done), inactive once it has gone.
        rows = connection.execute(text("SELECT active, worker_count, cpu_count, hostname FROM node "
                                       "ORDER BY timestamp")).all()
        active = [bool(r[0]) for r in rows]
        assert len(active) >= 3 and all(active[:-1]) and not active[-1], rows
        assert all(r[1] == 1 and r[2] >= 1 and r[3] for r in rows), rows
        assert count("SELECT COUNT(*) FROM resource") >= 1, "the worker's resource monitor reported nothing"


def noop(i):
    return i


def test_every_task_is_listed_with_its_block_and_reports_are_coalesced(tmp_path, monkeypatch):
    """The executor alone with a monitoring queue, as a Globus Compute endpoint runs it
    (its monitored mode places each task from the NODE_INFO records listing it).
    A task sent after a quiet spell is reported before its result; then 600 short tasks on
    two workers with prefetch, most sent and done between two reports: every one is
    listed with its block all the same, in far fewer records than tasks."""
    monkeypatch.setenv("PYTHONPATH", worker_pythonpath(__file__))
    ex = HighThroughputExecutor(label="nodes", address="127.0.0.1", max_workers_per_node=2,
                                prefetch_capacity=8, heartbeat_period=1,
                                provider=LocalProvider(init_blocks=1, min_blocks=0, max_blocks=1))
    ex.run_dir = str(tmp_path)
    ex.monitoring_messages = queue.Queue()
    placed: dict[int, str] = {}
    records = [0]

    def drain() -> None:
        while True:
            try:
                kind, record = ex.monitoring_messages.get_nowait()
            except queue.Empty:
                return
            if kind != MessageType.NODE_INFO:  # BLOCK_INFO from the scaling code
                continue
            records[0] += 1
            for t in record["tasks"]:
                placed[t] = record["block_id"]

    with ex:
        first = ex.submit(noop, {}, -1)
        seen_first: list[bool] = []
        called = threading.Event()

        def on_done(f) -> None:  # runs on the result thread, as the engine's callback does
            drain()
            seen_first.append(f.parsl_executor_task_id in placed)
            called.set()
        first.add_done_callback(on_done)
        assert first.result(timeout=120) == -1 and called.wait(10)
        assert seen_first == [True], "a task after a quiet spell: placed before its result"
        time.sleep(0.3)  # a quiet spell
        drain()
        before = records[0]
        futures = [ex.submit(noop, {}, i) for i in range(600)]
        assert [f.result(timeout=120) for f in futures] == list(range(600))
        ids = {f.parsl_executor_task_id for f in futures}
        deadline = time.monotonic() + 10  # the last coalesced report follows the results
        while not ids <= set(placed) and time.monotonic() < deadline:
            time.sleep(0.05)
            drain()
    assert ids <= set(placed), f"never listed: {sorted(ids - set(placed))[:10]}"
    assert set(placed.values()) == {"0"}
    assert records[0] - before < 300, f"{records[0] - before} records for 600 tasks: not coalesced"
