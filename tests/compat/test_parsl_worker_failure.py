"""Adapted from parsl/tests/test_htex/test_worker_failure.py (test_htex_worker_failures).

A task that kills its worker (SystemExit) fails with WorkerLost, repeatedly.
"""
import pytest
from parsl.app.app import python_app
from parsl.executors.high_throughput.errors import WorkerLost

pytestmark = pytest.mark.fault  # counted by tests/support/fault_ledger.py


@pytest.fixture(autouse=True)
def dfk(load_dfk, fresh_config):
    # parsl's local_config(): htex_local fresh_config with these overrides
    config = fresh_config()
    config.executors[0].poll_period = 1
    config.executors[0].max_workers_per_node = 1
    config.executors[0].heartbeat_period = 1
    yield load_dfk(config)


@python_app
def kill_worker():
    raise SystemExit(2)


@pytest.mark.timeout(120)
def test_htex_worker_failures():
    for _ in range(3):
        with pytest.raises(WorkerLost):
            f = kill_worker()
            f.result()
