"""The executor's public surface: Parsl's constructor, validation at construction,
standalone use, remote exceptions, dynamic task executors, worker loss and shutdown.
Every test runs real worker pools on loopback."""
from __future__ import annotations

import inspect
import os
import sys
import time
import traceback

import parsl
import psutil
import pytest
from parsl.executors import HighThroughputExecutor as ParslHTEX
from parsl.executors.errors import BadStateException, InvalidResourceSpecification
from parsl.executors.high_throughput.errors import WorkerLost
from parsl.providers import LocalProvider

from htex_rs import HighThroughputExecutor
from htex_rs.errors import HtexRsConfigurationError, InterchangeDied
from support import worker_pythonpath

pytestmark = pytest.mark.timeout(120)


def add(a, b=0):
    return a + b


def boom():
    def inner_frame():
        raise ValueError("boom from the worker")
    inner_frame()


def getenv(name):
    return os.environ.get(name)


def exit_worker():
    os._exit(7)


def pids():
    return os.getpid(), os.getppid()


# The Parsl release whose annotations htex_rs's constructor mirrors; an older release in the
# supported range may annotate a parameter differently (max_workers_per_node was
# Union[int, float, None] before 2026.7), so there only names, order and defaults must match.
MIRRORED_PARSL = (2026, 10, 26)


def test_constructor_matches_parsl_exactly():
    from htex_rs.parsl_range import release
    ours = inspect.signature(HighThroughputExecutor.__init__, eval_str=True).parameters
    theirs = inspect.signature(ParslHTEX.__init__).parameters
    assert list(ours) == list(theirs)
    assert len(theirs) - 1 == 28
    same_annotations = release(parsl.__version__) >= MIRRORED_PARSL
    for name, p in theirs.items():
        if name == "self":
            continue
        assert ours[name].default == p.default or (name == "manager_selector"), name
        if same_annotations:
            assert ours[name].annotation == p.annotation, name
    ex = HighThroughputExecutor(address="127.0.0.1")
    assert isinstance(ex, parsl.executors.HighThroughputExecutor)
    for name in theirs:
        if name != "self":
            assert hasattr(ex, name), name
    assert ex.max_workers_per_node == float("inf")
    assert ex.encrypted is True and ex.label == "HighThroughputExecutor"
    accelerators = HighThroughputExecutor(address="127.0.0.1", available_accelerators=3).available_accelerators
    assert accelerators == ["0", "1", "2"]
    from parsl.utils import RepresentationMixin
    old, RepresentationMixin._validate_repr = RepresentationMixin._validate_repr, True
    try:  # every argument is readable back as an attribute, as Parsl's repr requires
        assert "address='127.0.0.1'" in repr(ex)
    finally:
        RepresentationMixin._validate_repr = old


@pytest.mark.parametrize("kwargs, match", [
    ({"address": "127.0.0.1", "worker_port": 70000}, "out of range"),
    ({"address": "127.0.0.1", "worker_port_range": (5000, 4000)}, "port range"),
    ({"address": "127.0.0.1", "interchange_port_range": (0, 10)}, "port range"),
    ({"address": "127.0.0.1", "heartbeat_period": 0}, "heartbeat_period"),
    ({"address": "127.0.0.1", "launch_cmd": "process_worker_pool.py -a x"}, "htex-rs-worker-pool"),
    ({"address": "127.0.0.1", "cpu_affinity": "blocky"}, "not supported"),
    ({"address": "127.0.0.1", "cpu_affinity": "list:0-1:1-2", "max_workers_per_node": 2}, "CPU 1"),
    ({"address": "127.0.0.1", "cpu_affinity": "list:0-3:4-7", "max_workers_per_node": 4}, "2 worker ranks"),
    ({"address": "127.0.0.1", "cpu_affinity": "list:3-1", "max_workers_per_node": 1}, "backwards"),
])
def test_bad_configuration_fails_in_the_constructor(kwargs, match):
    with pytest.raises(HtexRsConfigurationError, match=match):
        HighThroughputExecutor(**kwargs)


def test_a_host_name_address_is_resolved_once_and_pools_get_the_number(tmp_path, monkeypatch):
    """Parsl (and Globus Compute endpoint configs) accept host names for `address`; the
    attribute keeps what the user wrote, pools are given the resolved address."""
    monkeypatch.setenv("PYTHONPATH", worker_pythonpath(__file__))
    ex = HighThroughputExecutor(label="byname", address="localhost", loopback_address="localhost",
                                max_workers_per_node=1, heartbeat_period=1, heartbeat_threshold=4,
                                provider=LocalProvider(init_blocks=1, max_blocks=1))
    assert ex.address == "localhost" and ex.all_addresses == {"127.0.0.1"}
    ex.run_dir = str(tmp_path)
    with ex:
        assert "-a 127.0.0.1 " in ex.launch_cmd
        assert ex.submit(add, {}, 2, 3).result(timeout=60) == 5


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for a private mount namespace (unshare -m)")
@pytest.mark.parametrize("kwargs", [{"address": "login1.cluster"},
                                    {"address": "127.0.0.1", "loopback_address": "login1.cluster"}])
def test_a_host_name_that_does_not_resolve_fails_in_the_constructor(kwargs):
    """Run against a resolver with no name server behind it (a private /etc/resolv.conf
    naming loopback, where nothing listens): the lookup really fails, and no query leaves
    the machine."""
    import subprocess
    import tempfile
    code = ("import sys; from htex_rs import HighThroughputExecutor as H\n"
            "from htex_rs.errors import HtexRsConfigurationError as E\n"
            f"try:\n H(**{kwargs!r})\nexcept E as e:\n print(e); sys.exit(0)\nsys.exit('no error')\n")
    with tempfile.NamedTemporaryFile("w", suffix=".conf") as conf:
        conf.write("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
        conf.flush()
        out = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                              'mount --bind "$0" /etc/resolv.conf && exec "$1" -c "$2"',
                              conf.name, sys.executable, code],
                             capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    name = next(iter(k for k, v in kwargs.items() if v == "login1.cluster"))
    assert f"{name}='login1.cluster' does not resolve" in out.stdout
    assert "numeric address" in out.stdout


@pytest.fixture
def executor(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", worker_pythonpath(__file__))
    ex = HighThroughputExecutor(label="api", address="127.0.0.1", max_workers_per_node=2,
                                heartbeat_period=1, heartbeat_threshold=4,
                                provider=LocalProvider(init_blocks=1, max_blocks=1))
    ex.run_dir = str(tmp_path)
    with ex:
        yield ex


def test_resource_spec_is_checked_at_submit(executor):
    with pytest.raises(InvalidResourceSpecification, match="priority"):
        executor.submit(add, {"num_nodes": 2}, 1)
    with pytest.raises(InvalidResourceSpecification, match="must be a number"):
        executor.submit(add, {"priority": "high"}, 1)
    assert executor.submit(getenv, {"priority": 5}, "PARSL_PRIORITY").result(timeout=60) == "5"


def test_results_remote_exceptions_and_worker_environment(executor):
    assert executor.submit(add, {}, 2, b=3).result(timeout=60) == 5
    with pytest.raises(ValueError, match="boom from the worker") as info:
        executor.submit(boom, {}).result(timeout=60)
    assert "inner_frame" in "".join(traceback.format_exception(info.value))
    ranks = {executor.submit(getenv, {}, "PARSL_WORKER_RANK").result(timeout=60) for _ in range(40)}
    assert ranks <= {"0", "1"}
    assert executor.submit(getenv, {}, "PARSL_WORKER_COUNT").result() == "2"
    assert executor.submit(getenv, {}, "PARSL_WORKER_BLOCK_ID").result() == "0"
    pool_id = executor.submit(getenv, {}, "PARSL_WORKER_POOL_ID").result()
    assert [m["manager"] for m in executor.connected_managers()] == [pool_id]
    assert executor.outstanding() == 0


def test_submit_payload_runs_an_importable_task_executor(executor):
    import zlib
    fut = executor.submit_payload({"task_executor": {"f": "zlib.crc32", "a": (), "k": {}}}, b"htex_rs")
    assert fut.result(timeout=60) == zlib.crc32(b"htex_rs")
    fut = executor.submit_payload({"task_executor": {"f": "no_such_module.fn", "a": (), "k": {}}}, b"")
    with pytest.raises(ModuleNotFoundError):
        fut.result(timeout=60)


@pytest.mark.fault
def test_worker_death_is_worker_lost_and_the_worker_is_restarted(executor):
    for _ in range(2):
        with pytest.raises(WorkerLost):
            executor.submit(exit_worker, {}).result(timeout=60)
    assert executor.submit(add, {}, 1, 1).result(timeout=60) == 2
    assert len(executor.connected_managers()) == 1


@pytest.mark.fault
def test_stopped_interchange_fails_outstanding_tasks(executor):
    fut = executor.submit(time.sleep, {}, 30)
    executor._ix.stop()
    # Parsl's contract: the future fails with BadStateException naming this executor and
    # carrying the reason, not with the 30 s sleep's result nor any other error.
    with pytest.raises(BadStateException) as info:
        fut.result(timeout=10)
    died = executor.executor_exception
    assert isinstance(died, InterchangeDied)
    assert info.value.executor is executor
    assert info.value.reason == str(died) and "interchange" in info.value.reason
    assert executor.bad_state_is_set and executor.outstanding() == 0
    with pytest.raises(InterchangeDied):  # and later submits are refused with the same error
        executor.submit(time.sleep, {}, 0)


@pytest.mark.fault
def test_shutdown_leaves_no_pool_or_worker_processes(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", worker_pythonpath(__file__))
    ex = HighThroughputExecutor(label="bye", address="127.0.0.1", max_workers_per_node=2,
                                provider=LocalProvider(init_blocks=1, max_blocks=1))
    ex.run_dir = str(tmp_path)
    with ex:
        worker_pid, pool_pid = ex.submit(pids, {}).result(timeout=60)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (psutil.pid_exists(pool_pid) or psutil.pid_exists(worker_pid)):
        time.sleep(0.1)
    for pid in (pool_pid, worker_pid):
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


@pytest.mark.fault
def test_a_cancelled_future_does_not_stop_result_delivery(executor, try_assert):
    before = executor.interchange_stats()["results_forwarded"]
    doomed = executor.submit(time.sleep, {}, 0.5)
    assert doomed.cancel()  # the result still arrives later, for a future that is done
    # Wait for that result to reach the result thread's queue, not for a fixed time.
    try_assert(lambda: executor.interchange_stats()["results_forwarded"] > before,
               "the cancelled task's result never came back", timeout_ms=60_000)
    assert executor.submit(add, {}, 20, 22).result(timeout=60) == 42
    assert not executor.bad_state_is_set


def test_start_warns_when_the_pool_command_is_not_on_path(tmp_path, monkeypatch, caplog):
    """Outside an activated environment the pools would fail with 'command not found'
    only once a block starts; start() says so at once, with the directory to add."""
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    ex = HighThroughputExecutor(label="nopath", address="127.0.0.1", encrypted=False,
                                provider=LocalProvider(init_blocks=0, min_blocks=0, max_blocks=0))
    ex.run_dir = str(tmp_path)
    with caplog.at_level("WARNING", logger="htex_rs.executor"):
        ex.start()
    try:
        msgs = [r.getMessage() for r in caplog.records if "htex-rs-worker-pool is not on PATH" in r.getMessage()]
        assert msgs and os.path.dirname(sys.executable) in msgs[0]
    finally:
        ex.shutdown()


OPEN_UNENCRYPTED = "listens for worker pools unencrypted"


@pytest.mark.parametrize(("address", "encrypted", "warns"), [
    (None, False, True),          # every interface ("*"), no CURVE
    ("0.0.0.0", False, True),     # every IPv4 interface, named
    ("127.0.0.1", False, False),  # this host only
    (None, True, False),          # every interface, CURVE
])
def test_start_warns_once_when_listening_unencrypted_beyond_loopback(tmp_path, caplog, address, encrypted, warns):
    """Unencrypted, the worker port authenticates nobody and carries pickles both ways;
    start() says so, with the port and the fix, once. No pool is started and nothing is
    sent: binding every interface is all these executors do."""
    ex = HighThroughputExecutor(label="open", address=address, encrypted=encrypted,
                                provider=LocalProvider(init_blocks=0, min_blocks=0, max_blocks=0))
    ex.run_dir = str(tmp_path)
    with caplog.at_level("WARNING", logger="htex_rs.executor"):
        ex.start()
    try:
        msgs = [r.getMessage() for r in caplog.records if OPEN_UNENCRYPTED in r.getMessage()]
        if not warns:
            assert msgs == []
            return
        assert len(msgs) == 1, msgs
        assert f"port {ex.worker_port}: anyone who can reach port {ex.worker_port} can register as a worker " \
               "pool, read pickled tasks and return results the submit host unpickles; set encrypted=True" in msgs[0]
        assert ("every interface" if address is None else address) in msgs[0]
    finally:
        ex.shutdown()
