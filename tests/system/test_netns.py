"""Network faults between "hosts": a worker pool in its own network namespace (ip netns
+ veth, made here and removed after) loses its link mid-task. Cut for good: its task
fails with ManagerLost, work continues on the pool that is still reachable, and the
cut-off pool exits by itself. Cut and restored within heartbeat_threshold: nothing is
lost, the running task's result arrives and the pool keeps serving. Needs root and iproute2; skipped otherwise."""
from __future__ import annotations

import os
import shutil
import subprocess
import time

import psutil
import pytest
from parsl.executors.high_throughput.errors import ManagerLost

from htex_rs import HighThroughputExecutor
from support import module_dirs, netns_hosts

pytestmark = [pytest.mark.timeout(180), pytest.mark.fault,
              pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None,
                                 reason="needs root and iproute2 for network namespaces")]


def ip(*args: str) -> None:
    netns_hosts.ip(*args)


@pytest.fixture
def netns():
    """A namespace joined to this host by a veth pair (tests/support/netns_hosts.py)."""
    try:
        ctx = netns_hosts.namespace()
        n = ctx.__enter__()
    except subprocess.CalledProcessError as e:
        pytest.skip(f"cannot create a network namespace here: {e.stderr.decode().strip()}")
    try:
        yield {"ns": n.ns, "host_if": n.host_if, "host_ip": n.host_ip}
    finally:
        ctx.__exit__(None, None, None)


def where(seconds):
    import os
    import time
    time.sleep(seconds)
    return os.environ["PARSL_WORKER_BLOCK_ID"]


def pool_cmd(ex, block: str) -> list[str]:
    return ["htex-rs-worker-pool", "-a", ex.address, f"--port={ex.worker_port}", "--cert_dir", str(ex.cert_dir),
            "--max_workers_per_node=1", f"--block_id={block}", f"--logdir={ex.logdir}",
            f"--hb_period={ex.heartbeat_period}", f"--hb_threshold={ex.heartbeat_threshold}", "--cpu-affinity", "none"]


def test_cut_link_fails_the_cut_pools_task_and_work_moves_on(netns, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(module_dirs(__file__))}
    ex = HighThroughputExecutor(label="netns", address=netns["host_ip"], heartbeat_period=1, heartbeat_threshold=3)
    ex.run_dir = str(tmp_path)
    ex.start()
    pools = []
    try:
        pools.append(subprocess.Popen(pool_cmd(ex, "host"), env=env, stdout=subprocess.DEVNULL))
        pools.append(subprocess.Popen(["ip", "netns", "exec", netns["ns"], *pool_cmd(ex, "remote")], env=env,
                                      stdout=subprocess.DEVNULL))
        deadline = time.monotonic() + 60
        while len(ex.connected_managers()) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert sorted(m["block_id"] for m in ex.connected_managers()) == ["host", "remote"]
        futs = [ex.submit(where, {}, 8) for _ in range(2)]  # one on each pool (capacity 1 each)
        time.sleep(1)
        ip("link", "set", netns["host_if"], "down")
        outcomes = []
        for f in futs:
            try:
                outcomes.append(f.result(timeout=60))
            except ManagerLost as e:
                outcomes.append("lost")
                assert "Task failure due to loss of manager" in str(e)
        assert sorted(outcomes) == ["host", "lost"]
        assert [m["block_id"] for m in ex.connected_managers()] == ["host"]
        assert [f.result(timeout=60) for f in [ex.submit(where, {}, 0) for _ in range(3)]] == ["host"] * 3
        # The cut-off pool hears nothing from the interchange and exits on its own.
        pools[1].wait(timeout=ex.heartbeat_threshold + 10)
        ip("link", "set", netns["host_if"], "up")  # the link comes back; the pool does not
        time.sleep(2)
        assert [m["block_id"] for m in ex.connected_managers()] == ["host"]
    finally:
        ex.shutdown()
        for p in pools:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        left = [p for p in psutil.process_iter(["cmdline"])
                if p.info["cmdline"] and "--block_id=remote" in p.info["cmdline"]]
        assert not left, "the namespaced pool or its workers are still running"


def test_link_cut_and_restored_within_the_threshold_loses_nothing(netns, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(module_dirs(__file__))}
    ex = HighThroughputExecutor(label="netns_blip", address=netns["host_ip"], heartbeat_period=1,
                                heartbeat_threshold=12)
    ex.run_dir = str(tmp_path)
    ex.start()
    pool = None
    try:
        pool = subprocess.Popen(["ip", "netns", "exec", netns["ns"], *pool_cmd(ex, "remote")], env=env,
                                stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while not ex.connected_managers() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert [m["block_id"] for m in ex.connected_managers()] == ["remote"]
        running = ex.submit(where, {}, 2)
        queued = [ex.submit(where, {}, 0) for _ in range(5)]  # wait at the interchange meanwhile
        time.sleep(1)
        ip("link", "set", netns["host_if"], "down")
        time.sleep(4)  # heartbeats both ways are lost; still well inside the threshold
        assert not running.done(), "the task finished during the cut: the link was not cut"
        ip("link", "set", netns["host_if"], "up")
        assert running.result(timeout=60) == "remote"
        assert [f.result(timeout=60) for f in queued] == ["remote"] * 5
        assert [m["block_id"] for m in ex.connected_managers()] == ["remote"]
        assert pool.poll() is None, "the pool exited over a blip shorter than the threshold"
    finally:
        ex.shutdown()
        if pool is not None:
            try:
                pool.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pool.kill()
