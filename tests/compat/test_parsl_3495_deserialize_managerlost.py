"""Adapted from parsl/tests/test_serialization/test_3495_deserialize_managerlost.py
(test_manager_lost_system_failure).

A manager that stops responding (SIGSTOP) makes its task fail with ManagerLost,
which must survive deserialization on the submit side. One change: the cleanup signals
the manager's process group, not the worker's (see get_manager_pgid).
"""
import os
import signal

import parsl
import pytest
from parsl import Config
from parsl.executors.high_throughput.errors import ManagerLost

from htex_rs import HighThroughputExecutor

pytestmark = pytest.mark.fault  # counted by tests/support/fault_ledger.py


@parsl.python_app
def get_manager_pgid():
    # The manager's own group: htex_rs workers run in their own session (so that the pool
    # can end a task past its walltime with everything it started), where Parsl's share
    # the manager's and the original asks for the worker's.
    import os
    return os.getpgid(os.getppid())


@parsl.python_app
def lose_manager():
    import os
    import signal
    import time

    manager_pid = os.getppid()
    os.kill(manager_pid, signal.SIGSTOP)

    time.sleep(5)  # approximate "forever"; if not enough, something's awry


@pytest.mark.timeout(120)
def test_manager_lost_system_failure(load_dfk, tmp_path):
    hte = HighThroughputExecutor(
        label="htex_local",
        address="127.0.0.1",
        max_workers_per_node=2,
        cores_per_worker=1,
        worker_logdir_root=str(tmp_path),  # the original uses the tmpd_cwd fixture
        heartbeat_period=1,
        heartbeat_threshold=3,
    )
    c = Config(executors=[hte], strategy='simple', strategy_period=0.1, run_dir=str(tmp_path))

    with load_dfk(c):
        manager_pgid = get_manager_pgid().result()
        try:
            with pytest.raises(ManagerLost):
                lose_manager().result()
        finally:
            # Allow process to clean itself up
            os.killpg(manager_pgid, signal.SIGCONT)
            os.killpg(manager_pgid, signal.SIGTERM)
