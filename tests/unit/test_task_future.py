"""The future submit returns (htex_rs.task_future): a concurrent.futures.Future in every
respect (waiting, timeouts, callbacks, cancel, wait/as_completed, a reentrant lock held
while waiting) with fewer garbage-collected objects. That submit hands it out is
tests/integration/test_task_future_submit.py."""
from __future__ import annotations

import concurrent.futures as cf
import gc
import threading
import time

import pytest
from parsl.executors.high_throughput.executor import HTEXFuture

from htex_rs import task_future
from htex_rs.task_future import TaskFuture

pytestmark = pytest.mark.timeout(60)


def test_this_python_gets_the_lean_future():
    assert task_future.LEAN, "Future/Condition internals changed: submit fell back to the stock HTEXFuture"
    assert task_future.new_future is TaskFuture
    f = TaskFuture(7)
    assert isinstance(f, HTEXFuture) and isinstance(f, cf.Future)
    assert f.parsl_executor_task_id == 7 and not f.done() and not f.running()


def tracked_per_future(cls: type) -> float:
    gc.collect()
    gc.disable()  # a collection mid-count would move the baseline
    try:
        before = len(gc.get_objects())
        keep = [cls(i) for i in range(2000)]
        per = (len(gc.get_objects()) - before - 1) / len(keep)
    finally:
        gc.enable()
    del keep
    return per


def test_fewer_tracked_objects_than_htexfuture():
    ours, stock = tracked_per_future(TaskFuture), tracked_per_future(HTEXFuture)
    assert ours <= 6.5 < 10 <= stock, (ours, stock)


def test_result_exception_and_timeouts():
    f = TaskFuture(1)
    with pytest.raises(cf.TimeoutError):
        f.result(timeout=0.01)
    threading.Timer(0.05, f.set_result, (42,)).start()
    assert f.result(timeout=5) == 42
    with pytest.raises(cf.InvalidStateError):
        f.set_result(1)
    g = TaskFuture(2)
    g.set_exception(ValueError("no"))
    with pytest.raises(ValueError, match="no"):
        g.result()
    assert isinstance(g.exception(), ValueError)


def test_callbacks_cancel_and_many_waiters():
    seen = []
    f = TaskFuture(1)
    f.add_done_callback(lambda fut: seen.append(("before", fut.result())))
    results = []
    waiters = [threading.Thread(target=lambda: results.append(f.result(timeout=5))) for _ in range(8)]
    for w in waiters:
        w.start()
    time.sleep(0.05)
    f.set_result("x")
    for w in waiters:
        w.join(5)
    f.add_done_callback(lambda fut: seen.append(("after", fut.result())))
    assert results == ["x"] * 8 and seen == [("before", "x"), ("after", "x")]
    c = TaskFuture(2)
    assert c.cancel() and c.cancelled()
    with pytest.raises(cf.CancelledError):
        c.result()


def test_wait_and_as_completed_mixed_with_stock_futures():
    ours = [TaskFuture(i) for i in range(5)]
    stock = [cf.Future() for _ in range(5)]
    every = ours + stock
    for i, f in enumerate(every):
        threading.Timer(0.01 * (i % 4), f.set_result, (i,)).start()
    done, _ = cf.wait(every, timeout=5, return_when=cf.FIRST_COMPLETED)
    assert done
    assert sorted(f.result() for f in cf.as_completed(every, timeout=5)) == list(range(10))
    done, pending = cf.wait(every, timeout=5)
    assert len(done) == 10 and not pending


def test_waiting_with_the_reentrant_lock_held_twice_releases_it():
    f = TaskFuture(1)
    cond = f._condition
    waiting, woke = threading.Event(), threading.Event()

    def waiter():
        with cond, cond:  # an RLock: waiting must release both holds
            waiting.set()  # still holding it: the notify below cannot come before wait()
            if cond.wait(5):  # False: timed out, never notified
                woke.set()

    t = threading.Thread(target=waiter)
    t.start()
    assert waiting.wait(5)
    with cond:  # acquired only once wait() released both holds; blocks forever if it kept one
        cond.notify_all()
    t.join(5)
    assert woke.is_set()
    with pytest.raises(RuntimeError, match="un-acquired"):
        cond.wait(0)
