"""Adapted from parsl/tests/test_htex/test_affinity.py (test_htex).

'block' CPU affinity gives the two workers different CPU sets, and
available_accelerators=2 pins worker 0 to CUDA device "0".
"""
import os

import pytest
from parsl import python_app
from parsl.config import Config
from parsl.providers import LocalProvider

from htex_rs import HighThroughputExecutor


@pytest.fixture
def dfk(load_dfk, tmp_path):
    yield load_dfk(Config(
        executors=[
            HighThroughputExecutor(
                label="htex_Local",
                address="127.0.0.1",
                worker_debug=True,
                max_workers_per_node=2,
                cpu_affinity='block',
                available_accelerators=2,
                encrypted=True,
                provider=LocalProvider(
                    init_blocks=1,
                    max_blocks=1,
                ),
            )
        ],
        strategy='none',
        run_dir=str(tmp_path),
    ))


@python_app
def get_worker_info():
    import os
    from time import sleep
    rank = int(os.environ['PARSL_WORKER_RANK'])
    aff = os.sched_getaffinity(0)
    device = os.environ.get('CUDA_VISIBLE_DEVICES')
    sleep(1.0)
    return rank, (aff, device)


@pytest.mark.timeout(120)
@pytest.mark.skipif('sched_getaffinity' not in dir(os), reason='System does not support sched_setaffinity')
@pytest.mark.skipif(os.cpu_count() == 1, reason='Must have a more than one CPU')
def test_htex(dfk):
    worker_info = [get_worker_info() for _ in range(4)]
    worker_affinity = dict([r.result() for r in worker_info])
    assert worker_affinity[0] != worker_affinity[1]
    assert worker_affinity[0][1] == "0"  # Make sure it is pinned to the correct CUDA device
