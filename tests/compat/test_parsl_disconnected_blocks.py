"""Adapted from parsl/tests/test_htex/test_disconnected_blocks.py,
test_disconnected_blocks_failing_provider.py and
test_multiple_disconnected_blocks.py.

Blocks whose worker pool never connects (or whose provider.submit fails) put
the executor in bad state: the task fails with BadStateException ("EXIT CODE:
0"), the blocks are MISSING, and no block is ever reported as connected.
"""
import parsl
import pytest
from parsl import Config
from parsl.executors.errors import BadStateException
from parsl.jobs.states import JobState, JobStatus
from parsl.providers import LocalProvider

from htex_rs import HighThroughputExecutor

pytestmark = pytest.mark.fault  # counted by tests/support/fault_ledger.py


def cleanup_in_test():
    """Parsl's local-mode harness cleans the DFK up after the test; it is done
    inside the test here so that a failing executor shutdown fails this test.
    Regression check: htex_rs's shutdown() used to re-fail the futures already
    failed by the block error handler (InvalidStateError; fixed in 7200b37)."""
    parsl.dfk().cleanup()


class FailingProvider(LocalProvider):
    def submit(*args, **kwargs):
        raise RuntimeError("Deliberate failure of provider.submit")


@parsl.python_app
def double(x):
    return x * 2


@pytest.mark.timeout(120)
def test_disconnected_blocks(load_dfk, tmp_path):
    """Test reporting of blocks that fail to connect from HTEX

    (parsl/tests/test_htex/test_disconnected_blocks.py::test_disconnected_blocks)
    """
    # Config to simulate failing blocks without connecting
    load_dfk(Config(
        executors=[
            HighThroughputExecutor(
                label="HTEX",
                address="127.0.0.1",
                heartbeat_period=1,
                heartbeat_threshold=2,
                poll_period=100,
                max_workers_per_node=1,
                provider=LocalProvider(
                    worker_init="conda deactivate; export PATH=''; which python; exit 0",
                    init_blocks=0,
                    max_blocks=2,
                    min_blocks=0,
                ),
            )
        ],
        max_idletime=0.5,
        strategy='htex_auto_scale',
        run_dir=str(tmp_path),
    ))
    dfk = parsl.dfk()
    executor = dfk.executors["HTEX"]

    connected_blocks = executor.connected_blocks()
    assert not connected_blocks, "Expected 0 blocks"

    future = double(5)
    with pytest.raises(BadStateException):
        future.result()

    assert isinstance(future.exception(), BadStateException)
    exception_body = str(future.exception())
    assert "EXIT CODE: 0" in exception_body

    status_dict = executor.status()
    assert len(status_dict) == 1, "Expected only 1 block"
    for status in status_dict.values():
        assert isinstance(status, JobStatus)
        assert status.state == JobState.MISSING

    connected_blocks = executor.connected_blocks()
    assert not connected_blocks, "Expected 0 blocks"

    cleanup_in_test()


@pytest.mark.timeout(120)
def test_disconnected_blocks_failing_provider(load_dfk, tmp_path):
    """Test reporting of blocks that fail to connect from HTEX

    (parsl/tests/test_htex/test_disconnected_blocks_failing_provider.py::test_disconnected_blocks)
    """
    load_dfk(Config(
        executors=[
            HighThroughputExecutor(
                label="HTEX",
                address="127.0.0.1",
                heartbeat_period=1,
                heartbeat_threshold=2,
                poll_period=100,
                max_workers_per_node=1,
                provider=FailingProvider(
                    init_blocks=0,
                    max_blocks=2,
                    min_blocks=0,
                ),
            )
        ],
        max_idletime=0.5,
        strategy='htex_auto_scale',
        strategy_period=0.1,
        # this strategy period needs to be a few times smaller than the
        # status_polling_interval of FailingProvider, which is 5s at
        # time of writing
        run_dir=str(tmp_path),
    ))
    dfk = parsl.dfk()
    executor = dfk.executors["HTEX"]

    connected_blocks = executor.connected_blocks()
    assert not connected_blocks, "Expected 0 blocks"

    future = double(5)
    with pytest.raises(BadStateException):
        future.result()

    assert isinstance(future.exception(), BadStateException)

    status_dict = executor.status()
    assert len(status_dict) == 1, "Expected exactly 1 block"
    for status in status_dict.values():
        assert isinstance(status, JobStatus)
        assert status.state == JobState.MISSING

    connected_blocks = executor.connected_blocks()
    assert connected_blocks == [], "Expected exactly 0 connected blocks"

    cleanup_in_test()


@pytest.mark.timeout(120)
def test_multiple_disconnected_blocks(load_dfk, tmp_path):
    """Test reporting of blocks that fail to connect from HTEX
    When init_blocks == N, error handling expects N failures before
    the run is cancelled

    (parsl/tests/test_htex/test_multiple_disconnected_blocks.py::test_multiple_disconnected_blocks;
    the original's run_dir="/tmp/test_htex" is replaced by tmp_path)
    """
    load_dfk(Config(
        executors=[
            HighThroughputExecutor(
                label="HTEX",
                address="127.0.0.1",
                heartbeat_period=1,
                heartbeat_threshold=2,
                poll_period=100,
                max_workers_per_node=1,
                provider=LocalProvider(
                    worker_init="exit 0",
                    init_blocks=2
                ),
            )
        ],
        run_dir=str(tmp_path),
        max_idletime=0.5,
        strategy='none',
    ))
    dfk = parsl.dfk()
    executor = dfk.executors["HTEX"]

    connected_blocks = executor.connected_blocks()
    assert not connected_blocks, "Expected 0 blocks"

    future = double(5)
    with pytest.raises(BadStateException):
        future.result()

    assert isinstance(future.exception(), BadStateException)
    exception_body = str(future.exception())
    assert "EXIT CODE: 0" in exception_body

    status_dict = executor.status()
    assert len(status_dict) == 2, "Expected 2 blocks"
    for status in status_dict.values():
        assert isinstance(status, JobStatus)
        assert status.state == JobState.MISSING

    connected_blocks = executor.connected_blocks()
    assert not connected_blocks, "Expected 0 blocks"

    cleanup_in_test()
