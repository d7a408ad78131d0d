"""Adapted from parsl/tests/test_htex/test_basic.py (test_app): one no-op app."""
import pytest
from parsl.app.app import python_app


@pytest.fixture(autouse=True)
def dfk(load_dfk, fresh_config):
    # parsl's local_setup(): htex_local fresh_config with these overrides
    config = fresh_config()
    config.executors[0].poll_period = 1
    config.executors[0].max_workers_per_node = 1
    yield load_dfk(config)


@python_app
def dummy():
    pass


@pytest.mark.timeout(120)
def test_app():
    x = dummy()
    assert x.result() is None
