"""The future ``submit`` returns: Parsl's ``HTEXFuture`` with half the garbage-collected
objects. A stock ``concurrent.futures.Future`` makes 11 GC-tracked objects, most of them
in its ``threading.Condition``, which binds five of its lock's methods into every
instance. With tens of thousands of tasks in flight the cyclic collector walks them all
again and again: in a submit loop that is half the cost of ``submit`` (17 us of a future
against 9 us with 100,000 outstanding, measured). Here the condition looks those methods
up on its class (the same ``threading.Condition`` code runs), 6 tracked objects a task.

Both classes are CPython's, whose private attributes we rely on; an interpreter whose
``Future`` or ``Condition`` (or a Parsl whose ``HTEXFuture``) holds other attributes gets
the stock ``HTEXFuture`` (``LEAN`` says which is in use; a test checks it is the lean one).
"""
from __future__ import annotations

import collections
import threading
from concurrent.futures import Future
from concurrent.futures._base import PENDING
from typing import Any

from parsl.executors.high_throughput.executor import HTEXFuture

_FUTURE_ATTRS = {"_condition", "_state", "_result", "_exception", "_waiters", "_done_callbacks"}
_CONDITION_ATTRS = {"_lock", "acquire", "release", "_release_save", "_acquire_restore", "_is_owned", "_waiters"}


class _Condition(threading.Condition):
    """``threading.Condition()`` (an RLock) whose lock methods live on the class."""

    def __init__(self) -> None:  # not super().__init__: that binds five methods per instance
        self._lock = threading.RLock()
        self._waiters: collections.deque[Any] = collections.deque()

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        return self._lock.acquire(blocking, timeout)

    def release(self) -> None:
        self._lock.release()

    def _release_save(self) -> Any:
        return self._lock._release_save()  # type: ignore[attr-defined]

    def _acquire_restore(self, state: Any) -> None:
        self._lock._acquire_restore(state)  # type: ignore[attr-defined]

    def _is_owned(self) -> bool:
        return bool(self._lock._is_owned())  # type: ignore[attr-defined]


class TaskFuture(HTEXFuture):
    """An ``HTEXFuture`` (``parsl_executor_task_id`` set) over a :class:`_Condition`."""

    def __init__(self, task_id: int) -> None:  # Future.__init__'s attributes, one condition
        self._condition = _Condition()
        self._state = PENDING
        self._result = None
        self._exception = None
        self._waiters: list[Any] = []
        self._done_callbacks: list[Any] = []
        self.parsl_executor_task_id = task_id


def _matches_this_python() -> bool:
    return (set(vars(Future())) == _FUTURE_ATTRS and set(vars(threading.Condition())) == _CONDITION_ATTRS
            and set(vars(HTEXFuture(0))) == _FUTURE_ATTRS | {"parsl_executor_task_id"})


LEAN = _matches_this_python()
new_future: type[HTEXFuture] = TaskFuture if LEAN else HTEXFuture
