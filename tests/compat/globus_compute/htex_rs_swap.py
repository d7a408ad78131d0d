"""pytest plugin (``-p htex_rs_swap``): every GlobusComputeEngine that builds its own
executor builds htex_rs's HighThroughputExecutor instead of Parsl's.

Loaded into the engine's own test suite (tests/compat/test_globus_compute_engine.py runs it);
at the end it fails the run if no engine built htex_rs's executor, so a swap that
silently stopped working cannot pass as green.
"""
from __future__ import annotations

import pytest
from globus_compute_endpoint.engines import GlobusComputeEngine

import htex_rs

_built: list[str] = []


class _Counted(htex_rs.HighThroughputExecutor):
    """htex_rs's executor, counting constructions (the class the engine builds)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _built.append(self.label)


GlobusComputeEngine._ExecutorClass = _Counted


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    print(f"\nhtex_rs_swap: {len(_built)} GlobusComputeEngine executors were htex_rs's")
    if not _built and session.testscollected:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
