"""A Parsl LogConfig (``Config(initialize_logging=...)``) reaches htex_rs's worker pool and
workers, as with Parsl's process_worker_pool (adapted from Parsl's test_log_config)."""
from __future__ import annotations

import json
import pathlib

import parsl
import pytest
from parsl.config import Config
from parsl.logconfigs.json import JSONLogging
from parsl.providers import LocalProvider

from htex_rs import HighThroughputExecutor

pytestmark = pytest.mark.timeout(120)


def double(x):
    return 2 * x


@pytest.mark.parametrize("log_config", [None, JSONLogging()], ids=["default", "json"])
def test_pool_and_workers_log_as_configured(load_dfk, tmp_path, log_config):
    cfg = Config(executors=[HighThroughputExecutor(label="logcfg", address="127.0.0.1", max_workers_per_node=1,
                                                   provider=LocalProvider(init_blocks=1, max_blocks=1))],
                 run_dir=str(tmp_path / "runinfo"), strategy="none")
    if log_config is not None:
        cfg.initialize_logging = log_config
    load_dfk(cfg)
    assert parsl.python_app(double)(21).result(timeout=60) == 42
    pool_dirs = list(pathlib.Path(cfg.run_dir).glob("*/logcfg/block-0/*"))
    assert len(pool_dirs) == 1, pool_dirs
    names = sorted(p.name for p in pool_dirs[0].iterdir())
    if log_config is None:
        assert names == ["manager.log", "worker_0.log"]
    else:
        assert names == ["manager.jsonlog", "worker_0.jsonlog"]
        for name in names:
            first = (pool_dirs[0] / name).read_text().splitlines()[0]
            assert isinstance(json.loads(first), dict), f"{name} is not JSON lines"


def die():
    import os
    os._exit(3)


def test_rust_records_reach_interchange_log_and_the_pools_manager_log(load_dfk, tmp_path):
    """The interchange thread writes interchange.log in Parsl's format; the pool's
    records go through the pool's Python logging into manager.log (or a LogConfig)."""
    import re
    import time

    from parsl.executors.high_throughput.errors import WorkerLost
    cfg = Config(executors=[HighThroughputExecutor(label="rustlog", address="127.0.0.1", max_workers_per_node=1,
                                                   provider=LocalProvider(init_blocks=1, max_blocks=1))],
                 run_dir=str(tmp_path / "runinfo"), strategy="none")
    load_dfk(cfg)
    with pytest.raises(WorkerLost):
        parsl.python_app(die)().result(timeout=60)
    assert parsl.python_app(double)(4).result(timeout=60) == 8
    run = next(pathlib.Path(cfg.run_dir).glob("*/rustlog"))
    interchange = (run / "interchange.log").read_text()
    # e.g. "2026-12-03 14:01:02.345 htex_rs.interchange:612 MainProcess(123) htex-rs-interchange
    # interchange [INFO] Registered manager ..."
    parsl_line = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} htex_rs\.interchange:\d+ MainProcess\(\d+\) "
                            r"htex-rs-interchange \w+ \[INFO\] Registered manager ", re.M)
    assert parsl_line.search(interchange), interchange
    manager_log = next(run.glob("block-0/*/manager.log"))
    deadline = time.monotonic() + 10
    while "htex_rs.pool" not in manager_log.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    text = manager_log.read_text()
    assert re.search(r"htex_rs\.pool[\w.]*:\d+ .* \[INFO\] worker pid \d+ ended \(exit code 3\)", text), text
