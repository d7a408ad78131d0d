"""Adapted from parsl/tests/test_htex/test_manager_selector_by_block.py
(test_block_id_selection).

With BlockIdManagerSelector and two connected blocks, every task goes to the
manager of the highest block id ("1").

Change from the original: usage_tracking=LEVEL_1 is dropped, since usage
tracking sends UDP packets off loopback.
"""
import parsl
import pytest
from parsl.config import Config
from parsl.executors.high_throughput.manager_selector import BlockIdManagerSelector
from parsl.providers import LocalProvider

from htex_rs import HighThroughputExecutor

BLOCK_COUNT = 2


@parsl.python_app
def get_worker_pid():
    import os
    return os.environ.get('PARSL_WORKER_BLOCK_ID')


@pytest.mark.timeout(120)
def test_block_id_selection(try_assert, load_dfk, tmp_path):
    htex = HighThroughputExecutor(
        label="htex_local",
        address="127.0.0.1",
        max_workers_per_node=1,
        manager_selector=BlockIdManagerSelector(),
        provider=LocalProvider(
            init_blocks=BLOCK_COUNT,
            max_blocks=BLOCK_COUNT,
            min_blocks=BLOCK_COUNT,
        ),
    )

    config = Config(
        executors=[htex],
        run_dir=str(tmp_path),
    )

    with load_dfk(config):
        blockids = []
        try_assert(lambda: len(htex.connected_managers()) == BLOCK_COUNT, timeout_ms=20000)
        for i in range(10):
            future = get_worker_pid()
            blockids.append(future.result())

        assert all(blockid == "1" for blockid in blockids)
