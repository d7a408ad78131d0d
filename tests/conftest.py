"""Shared pytest fixtures for the htex_rs test suite.

Parsl-derived fixtures (used by the vendored tests/compat/test_parsl_*.py, which are
adapted from Parsl's local-mode tests under parsl/tests/):

* ``try_assert``  - copied from parsl/tests/conftest.py: poll a predicate until
  it holds or a timeout expires, then fail with an AssertionError.
* ``load_dfk``    - replaces Parsl's ``--config local`` machinery
  (``load_dfk_local_module``): ``load_dfk(config)`` calls ``parsl.load`` with
  a per-test run_dir/working_dir under ``tmp_path``, and cleans the DFK up at
  teardown unless the test already did (e.g. ``with parsl.load(...)``).
* ``fresh_config`` - a factory equivalent to
  parsl/tests/configs/htex_local.py:fresh_config(), built on
  ``htex_rs.HighThroughputExecutor`` and bound to 127.0.0.1.

Everything here stays on loopback: executors are always given
``address="127.0.0.1"`` and usage tracking is left disabled.
"""
from __future__ import annotations

import importlib.util
import os
import random
import time
import typing as t

import parsl
import pytest
from parsl.config import Config
from parsl.dataflow.dflow import DataFlowKernelLoader
from parsl.utils import RepresentationMixin

from support import TESTS_DIR, fault_ledger, worker_pythonpath


def _load_suite_config():
    path = os.path.join(TESTS_DIR, "compat", "parsl_suite", "htex_rs_config.py")
    spec = importlib.util.spec_from_file_location("htex_rs_suite_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_suite_config = _load_suite_config()



def pytest_configure(config: pytest.Config) -> None:
    # Marker kept from Parsl's originals (documentation only; nothing filters on it).
    config.addinivalue_line("markers", "multiple_cores_required: needs at least two usable CPU cores")
    config.addinivalue_line("markers", "fault: a fault-injection case; its tasks and processes are "
                                       "accounted for by the fault ledger (tests/support/fault_ledger.py)")


@pytest.fixture(autouse=True)
def _fault_ledger(request):
    """For tests marked ``fault``: every task submitted must end and every pool or
    worker process started must be gone, checked after the test's own fixtures are torn
    down (autouse fixtures are set up first, so they are torn down last)."""
    if request.node.get_closest_marker("fault") is None:
        yield
        return
    case = fault_ledger.Case()
    case.start()
    yield
    pending, orphaned = case.finish(grace=10)
    assert not pending, f"{len(pending)} submitted tasks never ended: {pending[:5]}"
    assert not orphaned, f"pool/worker processes left running: {orphaned}"


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    if fault_ledger.LEDGER.cases:
        terminalreporter.write_sep("-", fault_ledger.LEDGER.summary())
    skipped = _skips_that_fail(terminalreporter)
    if skipped:
        terminalreporter.write_sep("!", f"HTEX_RS_REQUIRE_ALL=1: {len(skipped)} tests skipped, "
                                        "which fails the run (CI has root, namespaces, cgroups, Slurm)")
        for r in skipped:
            where = r.nodeid or str(r.fspath)
            reason = r.longrepr[2] if isinstance(r.longrepr, tuple) else str(r.longrepr)
            terminalreporter.write_line(f"  {where}: {reason}")


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """With ``HTEX_RS_REQUIRE_ALL=1`` (CI) a test that skipped for want of root, Slurm,
    namespaces or cgroups fails the run instead of passing unseen."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None and _skips_that_fail(reporter) and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def _skips_that_fail(reporter: t.Any) -> list[t.Any]:
    """The skipped tests' reports, when ``HTEX_RS_REQUIRE_ALL=1`` makes a skip a failure."""
    if os.environ.get("HTEX_RS_REQUIRE_ALL") != "1":
        return []
    return list(reporter.stats.get("skipped", []))


@pytest.fixture
def try_assert():
    """Copied from parsl/tests/conftest.py (``try_assert``)."""
    def _impl(
        test_func: t.Callable[[], bool],
        fail_msg: str = "",
        timeout_ms: float = 5000,
        attempts: int = 0,
        check_period_ms: int = 20,
        factor: float = 2,
    ):
        check_period_s = abs(check_period_ms) / 1000.0
        if attempts > 0:
            for _attempt_no in range(attempts):
                fraction = random.random()
                time.sleep(fraction * check_period_s)  # jitter
                check_period_s *= factor ** fraction
                if test_func():
                    return
            raise AssertionError(
                f"{fail_msg}\n  (Still failing after attempt limit [{attempts}], "
                f"testing every {check_period_ms}ms)".strip())
        elif timeout_ms > 0:
            timeout_s = abs(timeout_ms) / 1000.0
            end = time.monotonic() + timeout_s
            while time.monotonic() < end:
                fraction = random.random()
                wait_for = fraction * check_period_s  # jitter
                time.sleep(max(0.0, min(wait_for, end - time.monotonic())))
                check_period_s *= factor ** fraction
                if test_func():
                    return
            raise AssertionError(
                f"{fail_msg}\n  (Still failing after timeout [{timeout_ms}ms], with attempts "
                f"every {check_period_ms}ms)".strip())
        else:
            raise AssertionError("Bad assert call: no attempts or timeout period")

    yield _impl


@pytest.fixture
def load_dfk(request, tmp_path, monkeypatch):
    """``load_dfk(config) -> DataFlowKernel``, like Parsl's local-mode loader.

    Puts the default run_dir and every executor's working_dir under tmp_path,
    turns on Parsl's repr validation (as Parsl's conftest does) and guarantees
    the DFK is cleaned up after the test.

    Apps defined in a test module are pickled by reference (module name), as in
    Parsl's own suite, where the tests are importable as ``parsl.tests.*``. Our
    test modules are imported by pytest from their own folder (tests/compat, ...;
    rootdir-style), so that folder and tests/ (for ``support``) are put on
    PYTHONPATH for the worker pools the DFK launches.
    """
    assert DataFlowKernelLoader._dfk is None, "a DFK leaked from an earlier test"
    monkeypatch.setenv("PYTHONPATH", worker_pythonpath(request.node.path))
    old_validate = RepresentationMixin._validate_repr
    RepresentationMixin._validate_repr = True
    loaded: list = []

    def _load(config: Config):
        if config.run_dir == "runinfo":  # Parsl's default
            config.run_dir = str(tmp_path / "runinfo")
        dfk = parsl.load(config)
        loaded.append(dfk)
        for ex in dfk.executors.values():
            ex.working_dir = str(tmp_path)
        return dfk

    try:
        yield _load
    finally:
        RepresentationMixin._validate_repr = old_validate
        try:
            for dfk in loaded:
                if not dfk.cleanup_called:
                    dfk.cleanup()
        finally:
            if DataFlowKernelLoader._dfk is not None:  # never leak into the next test
                parsl.clear()


@pytest.fixture
def fresh_config(tmp_path):
    """Factory equivalent to parsl/tests/configs/htex_local.py:fresh_config().

    Same settings (label htex_local, worker_debug, cores_per_worker=1,
    encrypted, one LocalProvider block with SimpleLauncher, strategy 'none'),
    with htex_rs's executor, address 127.0.0.1 and run_dir under tmp_path.
    """
    def _fresh_config() -> Config:
        # One definition of the htex_local config, shared with the Parsl-suite run.
        config = _suite_config.fresh_config()
        config.run_dir = str(tmp_path / "runinfo")
        return config
    return _fresh_config
