"""The fault suite's ledger: every test marked ``fault`` has each task it submits
(through the DFK or directly) and every pool or worker process it starts accounted for.
At the test's end each task must have ended (a result or an exception, never pending)
and no pool or worker process it started may still be running; the session prints the
totals, so "zero lost, zero orphaned" is counted by the suite, not asserted by hand in
each test."""
from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import psutil

from htex_rs import HighThroughputExecutor

OURS = ("htex-rs-worker-pool", "htex_rs.worker")


def our_processes() -> set[int]:
    """Pids of htex_rs pool and worker processes on this machine."""
    found = set()
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or ())
        if any(o in cmd for o in OURS):
            found.add(p.pid)
    return found


def alive_after(pids: Iterable[int], within: float) -> list[int]:
    """The pids still running (not zombies) after waiting up to ``within`` seconds."""
    pids = list(pids)
    deadline = time.monotonic() + within
    while True:
        alive = []
        for pid in pids:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
            except psutil.NoSuchProcess:
                pass
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)


@dataclass
class Ledger:
    cases: int = 0
    tasks: int = 0
    results: int = 0
    exceptions: collections.Counter = field(default_factory=collections.Counter)
    lost: int = 0
    processes: int = 0
    orphaned: int = 0

    def summary(self) -> str:
        exc = ", ".join(f"{n} {k}" for k, n in self.exceptions.most_common())
        return (f"fault suite: {self.cases} cases, {self.tasks} tasks submitted: {self.results} results, "
                f"{sum(self.exceptions.values())} exceptions ({exc or 'none'}), {self.lost} lost; "
                f"{self.processes} pool/worker processes started, {self.orphaned} left running")


LEDGER = Ledger()


class Case:
    """One fault test's accounts: open with ``start()``, close with ``finish()``."""

    def __init__(self) -> None:
        self.futures: list[Any] = []
        self.before: set[int] = set()
        self.seen: set[int] = set()
        # Every submission (submit, submit_payload, the DFK's) goes through _submit.
        self._orig: Callable[..., Any] = HighThroughputExecutor._submit
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample_until_stopped, daemon=True)

    def _sample_until_stopped(self) -> None:
        while not self._stop.wait(0.3):
            self.sample()

    def start(self) -> None:
        self.before = our_processes()
        self._sampler.start()
        orig, futures = self._orig, self.futures

        def _submit(ex: HighThroughputExecutor, *a: Any, **k: Any) -> Any:
            fut = orig(ex, *a, **k)
            futures.append(fut)
            return fut
        HighThroughputExecutor._submit = _submit  # type: ignore[method-assign]

    def sample(self) -> None:
        """Note the pool/worker processes running now (a thread does this while the
        test runs, every 0.3 s)."""
        self.seen |= our_processes() - self.before

    def finish(self, grace: float) -> tuple[list[Any], list[int]]:
        """Undo the hook; the futures still pending and the processes still running
        after ``grace`` seconds."""
        HighThroughputExecutor._submit = self._orig  # type: ignore[method-assign]
        self._stop.set()
        self._sampler.join()
        self.sample()
        deadline = time.monotonic() + grace
        while any(not f.done() for f in self.futures) and time.monotonic() < deadline:
            time.sleep(0.1)
        pending = [f for f in self.futures if not f.done()]
        orphaned = alive_after(self.seen, grace)
        LEDGER.cases += 1
        LEDGER.tasks += len(self.futures)
        for f in self.futures:
            if not f.done():
                continue
            if f.cancelled():
                LEDGER.exceptions["cancelled"] += 1
            elif f.exception() is not None:
                LEDGER.exceptions[type(f.exception()).__name__] += 1
            else:
                LEDGER.results += 1
        LEDGER.lost += len(pending)
        LEDGER.processes += len(self.seen)
        LEDGER.orphaned += len(orphaned)
        return pending, orphaned
