"""Adapted from parsl/tests/test_htex/test_maxworker_computation_executor.py
(test_max_workers_per_node, test_cores, test_mem, test_accelerators).

workers_per_node arithmetic from max_workers_per_node, cores, memory and
accelerators.
"""
import random

import pytest
from parsl.config import Config
from parsl.providers import LocalProvider

from htex_rs import HighThroughputExecutor


@pytest.mark.timeout(120)
def test_max_workers_per_node(load_dfk, tmp_path):

    w = random.randint(1, 8)
    h = HighThroughputExecutor(max_workers_per_node=w,
                               address="127.0.0.1",
                               provider=LocalProvider(max_blocks=0, init_blocks=0, min_blocks=0)
                               )
    c = Config(executors=[h], run_dir=str(tmp_path))

    with load_dfk(c):
        assert h.max_workers_per_node == w, "max_workers_per_node should be wired all the way through"
        assert h.workers_per_node == w, "max_workers_per_node is chosen in the absence of other restrictions"


@pytest.mark.timeout(120)
def test_cores(load_dfk, tmp_path):

    p = LocalProvider(max_blocks=0, init_blocks=0, min_blocks=0)
    p.cores_per_node = 8

    h = HighThroughputExecutor(max_workers_per_node=16,
                               address="127.0.0.1",
                               provider=p,
                               cores_per_worker=4
                               )
    c = Config(executors=[h], run_dir=str(tmp_path))

    with load_dfk(c):
        assert h.cores_per_worker == 4, "cores_per_worker should be wired all the way through"
        assert h.workers_per_node == 2, "8 cores per node, 4 cores per worker => 2 workers"


@pytest.mark.timeout(120)
def test_mem(load_dfk, tmp_path):

    p = LocalProvider(max_blocks=0, init_blocks=0, min_blocks=0)
    p.cores_per_node = 8
    p.mem_per_node = 16

    h = HighThroughputExecutor(max_workers_per_node=16,
                               address="127.0.0.1",
                               provider=p,
                               cores_per_worker=4,
                               mem_per_worker=16
                               )
    c = Config(executors=[h], run_dir=str(tmp_path))

    with load_dfk(c):
        assert h.mem_per_worker == 16, "mem_per_worker should be wired all the way through"
        assert h.workers_per_node == 1, "one worker gets all the memory"


@pytest.mark.timeout(120)
def test_accelerators(load_dfk, tmp_path):

    p = LocalProvider(max_blocks=0, init_blocks=0, min_blocks=0)
    p.cores_per_node = 16
    p.mem_per_node = 16

    h = HighThroughputExecutor(max_workers_per_node=16,
                               address="127.0.0.1",
                               provider=p,
                               cores_per_worker=4,
                               mem_per_worker=2,
                               available_accelerators=3
                               )
    c = Config(executors=[h], run_dir=str(tmp_path))

    with load_dfk(c):
        assert h.workers_per_node == 3, "number of accelerators is worker constraining limit here"
