"""The worker pool owns its tasks (issue #6): one queue in the pool's Rust core, a worker
holds only the task it runs, each result leaves when its task ends, and a dead worker
takes only its running task with it. Real executor, pools, worker processes and sockets;
each scenario failed on the pool that split its capacity into per-worker shares."""
from __future__ import annotations

import os
import random
import signal
import time
from concurrent.futures import wait

import pytest
from parsl.executors.high_throughput.errors import WorkerLost
from parsl.providers import LocalProvider

from htex_rs import HighThroughputExecutor
from support import worker_pythonpath

pytestmark = pytest.mark.timeout(180)


def nap(seconds: float) -> float:
    """Sleep; return when the task started (time.time(), comparable across processes)."""
    import time
    started = time.time()
    time.sleep(seconds)
    return started


def kill_own_worker() -> None:
    import os
    import signal
    os.kill(os.getpid(), signal.SIGKILL)


def pid_then_sleep(path: str, seconds: float) -> None:
    import os
    import time
    with open(path + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.replace(path + ".tmp", path)
    time.sleep(seconds)


@pytest.fixture
def make_executor(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", worker_pythonpath(__file__))
    started = []

    def _make(workers: int, prefetch: int, init_blocks: int = 1, **kw) -> HighThroughputExecutor:
        ex = HighThroughputExecutor(label=f"owns{len(started)}", address="127.0.0.1", encrypted=False,
                                    max_workers_per_node=workers, prefetch_capacity=prefetch,
                                    heartbeat_period=1, heartbeat_threshold=10,
                                    provider=LocalProvider(init_blocks=init_blocks, min_blocks=0,
                                                           max_blocks=1), **kw)
        ex.run_dir = str(tmp_path)
        ex.__enter__()  # start, and the init_blocks
        started.append(ex)
        return ex

    yield _make
    for ex in started:
        ex.__exit__(None, None, None)


def warm(ex: HighThroughputExecutor, workers: int) -> None:
    """Every worker has started (and imported Parsl) before the scenario begins."""
    for f in [ex.submit(nap, {}, 0.3) for _ in range(workers)]:
        f.result(timeout=60)


def start_pool_when_queued(ex: HighThroughputExecutor, n: int) -> None:
    """Start the block once the interchange holds tasks 1..n (needs worker_debug)."""
    log = os.path.join(ex.logdir, "interchange.log")
    deadline = time.monotonic() + 30
    while not (os.path.exists(log) and f"Put task {n} onto pending_task_queue" in open(log).read()):
        assert time.monotonic() < deadline, "the tasks never reached the interchange"
        time.sleep(0.05)
    ex.scale_out_facade(1)


def test_short_tasks_run_on_the_free_worker_while_another_runs_a_long_one(make_executor):
    """prefetch 16, 2 workers: a 4 s task, then 30 tasks of 20 ms. Each short task goes to
    the free worker; none waits behind the long one (they used to: 8 of them)."""
    ex = make_executor(workers=2, prefetch=16)
    warm(ex, 2)
    long = ex.submit(nap, {}, 4.0)
    shorts = [ex.submit(nap, {}, 0.02) for _ in range(30)]
    done, pending = wait(shorts, timeout=60)
    assert not pending
    assert not long.done(), "a short task waited for the long one to end"
    for f in shorts:
        f.result()
    long.result(timeout=60)


def test_a_finished_result_is_not_held_behind_the_task_queued_after_it(make_executor):
    """One worker, prefetch 4: a 1 ms task queued with a 3 s task. Its result arrives
    while the 3 s task runs (it used to wait for the end of the batch)."""
    ex = make_executor(workers=1, prefetch=4, init_blocks=0, worker_debug=True)
    # time.sleep, not nap: a fresh worker's first task would import this module, and
    # that alone took longer than the old 5 ms flush interval.
    fast = ex.submit(time.sleep, {}, 0)
    slow = ex.submit(time.sleep, {}, 3.0)
    start_pool_when_queued(ex, 2)  # so the pool receives both at once
    fast.result(timeout=60)
    assert not slow.done(), "the fast task's result waited for the slow task"
    slow.result(timeout=60)


@pytest.mark.fault
def test_a_task_that_kills_its_worker_fails_alone(make_executor):
    """One worker, prefetch 8: a task that kills its own worker, 6 quick tasks queued
    behind it. The killer is WorkerLost; the 6 run on the restarted worker (they used
    to be failed with it, 0 of 6 completing)."""
    ex = make_executor(workers=1, prefetch=8)
    warm(ex, 1)
    killer = ex.submit(kill_own_worker, {})
    quick = [ex.submit(nap, {}, 0.001) for _ in range(6)]
    with pytest.raises(WorkerLost):
        killer.result(timeout=60)
    assert all(isinstance(f.result(timeout=60), float) for f in quick)


@pytest.mark.fault
def test_a_worker_sigkilled_from_outside_loses_only_its_running_task(make_executor, tmp_path):
    """2 workers, prefetch 8, the pool's queue full: SIGKILL the worker running a long
    task. That task is WorkerLost; every queued task completes."""
    ex = make_executor(workers=2, prefetch=8)
    warm(ex, 2)
    marker = str(tmp_path / "victim.pid")
    victim = ex.submit(pid_then_sleep, {}, marker, 60)
    queued = [ex.submit(nap, {}, 0.05) for _ in range(20)]
    deadline = time.monotonic() + 60
    while not os.path.exists(marker):
        assert time.monotonic() < deadline, "the long task never started"
        time.sleep(0.01)
    with open(marker) as f:
        os.kill(int(f.read()), signal.SIGKILL)
    with pytest.raises(WorkerLost):
        victim.result(timeout=60)
    assert all(isinstance(f.result(timeout=60), float) for f in queued)


@pytest.mark.fault
def test_repeated_worker_deaths_with_a_full_queue_lose_nothing_else(make_executor):
    """One worker, prefetch 16: every third task kills its worker, so restarted workers
    keep registering under the same rank while earlier deaths are handled. Exactly the
    killers fail; every other task completes."""
    ex = make_executor(workers=1, prefetch=16)
    warm(ex, 1)
    futures = [(i % 3 == 0, ex.submit(kill_own_worker, {}) if i % 3 == 0 else ex.submit(nap, {}, 0.001))
               for i in range(12)]
    for killer, f in futures:
        if killer:
            with pytest.raises(WorkerLost):
                f.result(timeout=120)
        else:
            assert isinstance(f.result(timeout=120), float)


def test_mixed_lengths_run_in_priority_order_on_the_free_worker(make_executor):
    """2 workers, prefetch 16, every task queued before the pool starts: a long task with
    the best priority, then short ones of random priorities. The long one holds one worker;
    the short ones run on the other in priority order (FIFO within a priority) and all end
    before the long one."""
    ex = make_executor(workers=2, prefetch=16, init_blocks=0, worker_debug=True)
    long = ex.submit(nap, {"priority": 0}, 3.0)
    priorities = [random.randint(1, 5) for _ in range(12)] + [9, 1]
    shorts = [(p, i, ex.submit(nap, {"priority": p}, 0.02)) for i, p in enumerate(priorities)]
    start_pool_when_queued(ex, len(priorities) + 1)
    started = sorted((f.result(timeout=60), p, i) for p, i, f in shorts)
    assert not long.done(), "a short task waited behind the long one"
    order = [(p, i) for _, p, i in started]
    assert order == sorted(order), f"short tasks did not start in priority order: {order}"
    long.result(timeout=60)


def hold_the_gil(seconds: float) -> None:
    """A C call that keeps the GIL throughout (ctypes.PyDLL does not release it)."""
    import ctypes
    ctypes.PyDLL("libc.so.6").usleep(int(seconds * 1e6))


def noop() -> None:
    return None


def test_a_look_ahead_behind_a_task_holding_the_gil_still_runs_on_the_free_worker(make_executor):
    """The worker answers RECLAIM from a thread that needs no GIL: quick tasks given to a
    worker as look-ahead just before it entered a GIL-holding call go back to the idle
    worker at once, instead of waiting for the call to end."""
    ex = make_executor(workers=2, prefetch=8)
    warm(ex, 2)
    for f in [ex.submit(noop, {}) for _ in range(20)]:  # both workers' last tasks quick
        f.result(timeout=60)
    done_at: dict[str, float] = {}

    def mark(name: str):
        return lambda _f: done_at.setdefault(name, time.monotonic())

    hog = ex.submit(hold_the_gil, {}, 4.0)
    hog.add_done_callback(mark("hog"))
    quick = [ex.submit(noop, {}) for _ in range(9)]
    for i, f in enumerate(quick):
        f.add_done_callback(mark(f"quick{i}"))
    wait([hog, *quick], timeout=60)
    for f in [hog, *quick]:
        f.result(timeout=1)
    last_quick = max(t for name, t in done_at.items() if name != "hog")
    assert last_quick < done_at["hog"], "a quick task waited for the GIL-holding task to end"
