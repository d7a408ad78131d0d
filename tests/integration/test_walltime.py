"""Time limits that hold: a task past its walltime (Parsl's ``walltime=`` app argument, or
``parsl_resource_specification={"walltime": s}``) is ended by its pool with everything it
started, fails with Parsl's AppTimeout, and the tasks queued behind it run on a restarted
worker. Real apps through the DFK, real pools and workers; each case in the fault ledger."""
from __future__ import annotations

import os
import time

import psutil
import pytest
from parsl import bash_app, python_app
from parsl.app.errors import AppTimeout
from parsl.config import Config
from parsl.providers import LocalProvider

from htex_rs import HighThroughputExecutor
from htex_rs.executor import DEFAULT_LAUNCH_CMD
from support.fault_ledger import alive_after

pytestmark = [pytest.mark.timeout(120), pytest.mark.fault]

#: How long past its limit a task may hold its worker (the pool's grace, SIGTERM to
#: SIGKILL, the death noticed) in these tests; the goal is under 2 s.
HELD_PAST_LIMIT = 2.0
LIMIT = 2


@python_app
def sleeps(seconds: float, walltime: float | None = None) -> int:
    import time
    time.sleep(seconds)
    return os.getpid()


@python_app
def holds_the_gil(seconds: int, walltime: float | None = None,
                  parsl_resource_specification: dict | None = None) -> int:
    # libc's sleep through PyDLL: a C call that keeps the GIL, so Parsl's own timeout
    # (an exception injected between bytecodes) can never fire.
    import ctypes
    ctypes.PyDLL(None).sleep(seconds)
    return os.getpid()


@python_app
def pid_of_worker(parsl_resource_specification: dict | None = None) -> int:
    return os.getpid()


@bash_app
def stubborn_child(pidfile: str, walltime: float | None = None) -> str:
    # The shell and its child ignore SIGTERM (an ignored signal stays ignored across exec);
    # the child outlives the shell unless its whole process group is killed.
    return f"trap '' TERM; sleep 600 & echo $! > {pidfile}; wait"


@python_app
def quick(x: int) -> int:
    return x * 2


def config(tmp_path, workers: int = 1) -> Config:
    ex = HighThroughputExecutor(label="walltime", address="127.0.0.1", encrypted=False,
                                max_workers_per_node=workers, cores_per_worker=0.01,
                                heartbeat_period=1, heartbeat_threshold=10,
                                provider=LocalProvider(init_blocks=1, min_blocks=0, max_blocks=1))
    return Config(executors=[ex], run_dir=str(tmp_path / "runinfo"), strategy="none")


def timed_out(fut, within: float) -> tuple[float, str]:
    """Wait for ``fut`` to fail with AppTimeout; seconds it took."""
    t0 = time.monotonic()
    with pytest.raises(AppTimeout) as e:
        fut.result(timeout=within)
    return time.monotonic() - t0, str(e.value)


def test_a_python_app_asleep_past_its_walltime_is_ended_and_the_queue_runs_on(load_dfk, tmp_path):
    load_dfk(config(tmp_path))
    worker = pid_of_worker().result(timeout=60)
    start = time.monotonic()
    stuck = sleeps(600, walltime=LIMIT)
    behind = [quick(i) for i in range(5)]
    # Parsl's own timeout (an exception injected between bytecodes) cannot stop a
    # time.sleep: the pool ends the worker.
    took, message = timed_out(stuck, 30)
    assert "ended its worker" in message, message
    assert [f.result(timeout=30) for f in behind] == [0, 2, 4, 6, 8]
    assert time.monotonic() - start < LIMIT + HELD_PAST_LIMIT + 5
    assert not alive_after([worker], 5), "the worker that ran the task was ended"
    assert pid_of_worker().result(timeout=30) != worker, "a new worker runs the queue"


def test_a_c_call_holding_the_gil_is_ended_by_the_pool(load_dfk, tmp_path):
    load_dfk(config(tmp_path))
    worker = pid_of_worker().result(timeout=60)
    t0 = time.monotonic()
    fut = holds_the_gil(600, walltime=LIMIT)
    behind = quick(21)
    took, message = timed_out(fut, 30)
    assert took < LIMIT + HELD_PAST_LIMIT + 1, f"held its worker {took - LIMIT:.1f} s past its limit"
    assert f"past its walltime of {LIMIT} s" in message and "ended its worker" in message, message
    assert behind.result(timeout=30) == 42
    assert not alive_after([worker], 5)
    assert time.monotonic() - t0 < 30


def test_a_bash_apps_child_that_ignores_sigterm_is_killed(load_dfk, tmp_path):
    load_dfk(config(tmp_path))
    pidfile = tmp_path / "child.pid"
    fut = stubborn_child(str(pidfile), walltime=LIMIT)
    with pytest.raises(AppTimeout):
        fut.result(timeout=30)
    child = int(pidfile.read_text())
    assert not alive_after([child], HELD_PAST_LIMIT + 3), "the bash app's child outlived its walltime"
    assert quick(1).result(timeout=30) == 2


def test_a_walltime_in_the_resource_specification_holds_too(load_dfk, tmp_path):
    load_dfk(config(tmp_path))
    pid_of_worker().result(timeout=60)  # the pool is up: time only the task
    took, message = timed_out(holds_the_gil(600, parsl_resource_specification={"walltime": 1}), 30)
    assert "past its walltime of 1 s" in message, message
    assert took < 1 + HELD_PAST_LIMIT + 1


def test_tasks_within_their_walltime_are_untouched(load_dfk, tmp_path):
    load_dfk(config(tmp_path, workers=2))
    pids = {f.result(timeout=60) for f in [sleeps(0.2, walltime=30) for _ in range(6)]}
    # The same two workers ran every task: none was ended.
    assert len(pids) == 2
    assert all(psutil.pid_exists(p) for p in pids)


def test_a_bad_walltime_fails_at_submit(load_dfk, tmp_path):
    from parsl.executors.errors import InvalidResourceSpecification
    load_dfk(config(tmp_path))
    for bad in (0, -1, float("nan"), "10"):
        with pytest.raises(InvalidResourceSpecification, match="number of seconds greater than 0"):
            pid_of_worker(parsl_resource_specification={"walltime": bad}).result(timeout=30)


@python_app
def block_of(seconds: float = 0.0, walltime: float | None = None) -> str:
    import time
    time.sleep(seconds)
    return os.environ["PARSL_WORKER_BLOCK_ID"]


def test_tasks_go_only_to_blocks_with_time_left_for_them(load_dfk, tmp_path):
    ex = two_blocks(tmp_path, 40, max_workers_per_node=2)
    load_dfk(Config(executors=[ex], run_dir=str(tmp_path / "runinfo"), strategy="none"))
    left = wait_for_blocks(ex, 2)
    assert 0 < left["0"] <= 40 and 3000 < left["1"] <= 3640, left
    # 600 s: only block 1 has the time. 2 s: either. No limit: either.
    long_ones = [block_of(0.5, walltime=600) for _ in range(6)]
    short_ones = [block_of(0.5, walltime=2) for _ in range(6)]
    assert {f.result(timeout=60) for f in long_ones} == {"1"}
    assert {f.result(timeout=60) for f in short_ones} <= {"0", "1"}


def two_blocks(tmp_path, first_ends_in: float, **kw) -> HighThroughputExecutor:
    """An executor of two blocks: block 0 ends `first_ends_in` s from its start, block 1
    in an hour (HTEX_RS_BLOCK_END, set per block by the launch command)."""
    end = f"$(( $(date +%s) + {int(first_ends_in)} + {{{{block_id}}}} * 3600 ))"
    return HighThroughputExecutor(
        label="ends", address="127.0.0.1", encrypted=False, cores_per_worker=0.01,
        heartbeat_period=1, heartbeat_threshold=10,
        launch_cmd=f"HTEX_RS_BLOCK_END={end} " + DEFAULT_LAUNCH_CMD,
        provider=LocalProvider(init_blocks=2, min_blocks=0, max_blocks=2), **kw)


def wait_for_blocks(ex: HighThroughputExecutor, n: int) -> dict[str, float]:
    deadline = time.monotonic() + 60
    while len(ex.connected_managers()) < n and time.monotonic() < deadline:
        time.sleep(0.1)
    return {m["block_id"]: m["time_left"] for m in ex.connected_managers()}


def test_a_block_that_ends_hands_its_queue_back_and_spends_no_retry(load_dfk, tmp_path):
    # Block 0 ends 12 s after it starts, holding queued tasks (prefetch); they are handed
    # back before its end and run on block 1. Every task completes, none is retried.
    ex = two_blocks(tmp_path, 12, max_workers_per_node=1, prefetch_capacity=6)
    load_dfk(Config(executors=[ex], run_dir=str(tmp_path / "runinfo"), strategy="none", retries=2))
    wait_for_blocks(ex, 2)
    futs = [block_of(1.0, walltime=2) for _ in range(16)]
    ran = [f.result(timeout=90) for f in futs]
    assert set(ran) == {"0", "1"}, ran
    assert [f.task_record["fail_count"] for f in futs] == [0] * len(futs)
    deadline = time.monotonic() + 20
    while len(ex.connected_managers()) > 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert [m["block_id"] for m in ex.connected_managers()] == ["1"], "block 0 left at its end"


def test_sigterm_hands_unstarted_tasks_back_and_fails_only_the_running_one(load_dfk, tmp_path):
    from htex_rs.errors import BlockEnded
    ex = two_blocks(tmp_path, 3600, max_workers_per_node=1, prefetch_capacity=4)
    load_dfk(Config(executors=[ex], run_dir=str(tmp_path / "runinfo"), strategy="none"))
    wait_for_blocks(ex, 2)
    futs = [block_of(3.0) for _ in range(8)]
    time.sleep(1.5)  # both blocks run one and hold a few
    cmdlines = ((p, " ".join(p.info["cmdline"] or ())) for p in psutil.process_iter(["cmdline"]))
    pool0 = [p for p, cmd in cmdlines  # this test's block 0 (its logdir is under tmp_path)
             if "htex-rs-worker-pool" in cmd and "--block_id=0" in cmd and str(tmp_path) in cmd]
    assert len(pool0) == 1
    pool0[0].terminate()
    outcomes = []
    for f in futs:
        try:
            outcomes.append(f.result(timeout=90))
        except BlockEnded as e:
            assert "SIGTERM" in str(e), str(e)
            outcomes.append("ended")
    assert outcomes.count("ended") == 1, outcomes
    assert outcomes.count("1") >= 6, outcomes
