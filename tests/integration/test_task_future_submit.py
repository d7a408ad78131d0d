"""What the executor's submit hands out: htex_rs.task_future's TaskFuture, numbered from 1.
(The future's own behaviour is tests/unit/test_task_future.py.)"""
from __future__ import annotations

import pytest
from parsl.providers import LocalProvider

from htex_rs import HighThroughputExecutor
from htex_rs.task_future import TaskFuture

pytestmark = pytest.mark.timeout(60)


def test_submit_returns_it(tmp_path):
    ex = HighThroughputExecutor(label="futures", address="127.0.0.1", max_workers_per_node=1,
                                provider=LocalProvider(init_blocks=1, max_blocks=1))
    ex.run_dir = str(tmp_path)
    with ex:
        futs = [ex.submit(pow, {}, 2, i) for i in range(20)]
        assert all(type(f) is TaskFuture for f in futs)
        assert [f.parsl_executor_task_id for f in futs] == list(range(1, 21))
        assert [f.result(timeout=30) for f in futs] == [2 ** i for i in range(20)]
