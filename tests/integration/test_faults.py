"""Faults with real processes: the submit process killed outright, and a storm of
pool registrations. Nothing may be lost or left running."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import psutil
import pytest
import zmq

from htex_rs import HighThroughputExecutor, _core, wire
from support import module_dirs
from support.fault_ledger import alive_after

pytestmark = [pytest.mark.timeout(180), pytest.mark.fault]


def test_killing_the_submit_process_leaves_no_pool_or_worker(tmp_path):
    threshold = 3
    script = textwrap.dedent(f"""
        import json, os, sys, time
        from parsl.providers import LocalProvider
        from htex_rs import HighThroughputExecutor
        def pids():
            import os, time
            time.sleep(0.5)  # both workers busy at once, so both report
            return os.getpid(), os.getppid()
        ex = HighThroughputExecutor(label="victim", address="127.0.0.1", max_workers_per_node=2,
                                    heartbeat_period=1, heartbeat_threshold={threshold},
                                    provider=LocalProvider(init_blocks=1, max_blocks=1))
        ex.run_dir = {str(tmp_path)!r}
        ex.__enter__()
        found = set()
        while len(found) < 3:
            for w, p in [f.result(timeout=60) for f in [ex.submit(pids, {{}}) for _ in range(2)]]:
                found |= {{w, p}}
        print(json.dumps(sorted(found)), flush=True)
        time.sleep(600)
    """)
    victim = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(module_dirs(__file__))})
    try:
        pids = json.loads(victim.stdout.readline())
        assert len(pids) == 3  # the pool and its two workers
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        left = alive_after(pids, threshold + 5)
        assert not left, f"processes left running after the submit process died: {left}"
    finally:
        victim.kill()


def test_registration_storm_of_300_pools_all_served(tmp_path):
    n_pools = 300
    ex = HighThroughputExecutor(label="storm", address="127.0.0.1", encrypted=False,
                                heartbeat_period=1, heartbeat_threshold=30)
    ex.run_dir = str(tmp_path)
    ex.start()
    ctx = zmq.Context()
    stop = threading.Event()
    socks = []
    t = threading.Thread()
    try:
        for i in range(n_pools):
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.IDENTITY, f"fake-{i}".encode())
            s.connect(f"tcp://127.0.0.1:{ex.worker_port}")
            reg = {"protocol_version": _core.PROTOCOL_VERSION, "uid": f"fake-{i}", "block_id": str(i % 7),
                   "max_capacity": 1, "worker_count": 1, "python_version": "{}.{}.0".format(*sys.version_info[:2])}
            s.send_multipart([wire.header(wire.REGISTER), json.dumps(reg).encode()])
            socks.append(s)

        served: dict[int, int] = {}

        def echo() -> None:  # every fake pool returns each task's payload as its result
            from parsl.serialize import serialize
            poller = zmq.Poller()
            for s in socks:
                poller.register(s, zmq.POLLIN)
            while not stop.is_set():
                for s, _ in poller.poll(100):
                    frames = s.recv_multipart()
                    if wire.kind_of(frames[0]) != wire.TASKS:
                        continue
                    meta = wire.decode_meta(frames[1])
                    for tid, _ in meta:
                        served[tid] = socks.index(s)
                    s.send_multipart([wire.header(wire.RESULTS),
                                      wire.encode_meta([(t, wire.STATUS_RESULT) for t, _ in meta]),
                                      *[serialize(t) for t, _ in meta]])

        t = threading.Thread(target=echo, daemon=True)
        t.start()
        deadline = time.monotonic() + 30
        while len(ex.connected_managers()) < n_pools and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(ex.connected_managers()) == n_pools
        futs = [ex.submit_payload({}, b"payload") for _ in range(3000)]
        assert [f.result(timeout=60) for f in futs] == [f.parsl_executor_task_id for f in futs]
        assert len(set(served.values())) > n_pools // 2, "tasks were not spread over the pools"
        assert ex.interchange_stats()["dropped_messages"] == 0
    finally:
        stop.set()
        ex.shutdown()
        if t.is_alive():
            t.join(5)  # out of its poll before the sockets it polls are closed
        ctx.destroy(linger=0)


def sleep_then_pid(seconds):
    import os
    import time
    time.sleep(seconds)
    return os.getppid()


def kill_self():
    import os
    import signal
    os.kill(os.getpid(), signal.SIGKILL)  # what the kernel's OOM killer does


def test_sigkilled_worker_is_worker_lost_and_replaced(load_dfk):
    import parsl
    from parsl.config import Config
    from parsl.executors.high_throughput.errors import WorkerLost
    from parsl.providers import LocalProvider
    load_dfk(Config(executors=[HighThroughputExecutor(
        label="oom", address="127.0.0.1", encrypted=False, max_workers_per_node=1,
        provider=LocalProvider(init_blocks=1, max_blocks=1))], strategy="none"))
    with pytest.raises(WorkerLost):
        parsl.python_app(kill_self)().result(timeout=60)
    assert parsl.python_app(sleep_then_pid)(0).result(timeout=60) > 0


def test_pool_killed_mid_run_with_retries_the_workflow_completes(load_dfk, try_assert):
    """Two pools; one is SIGKILLed while running tasks. Its tasks fail with ManagerLost
    after heartbeat_threshold and Config(retries=2) reruns them on the other pool."""
    import parsl
    from parsl.config import Config
    from parsl.providers import LocalProvider
    dfk = load_dfk(Config(executors=[HighThroughputExecutor(
        label="two", address="127.0.0.1", encrypted=False, max_workers_per_node=2,
        heartbeat_period=1, heartbeat_threshold=3,
        provider=LocalProvider(init_blocks=2, min_blocks=2, max_blocks=2))], strategy="none", retries=2))
    ex = dfk.executors["two"]
    deadline = time.monotonic() + 60
    while len(ex.connected_managers()) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len(ex.connected_managers()) == 2
    app = parsl.python_app(sleep_then_pid)
    futs = [app(1.5) for _ in range(12)]
    try_assert(lambda: all(m["tasks"] > 0 for m in ex.connected_managers()),
               "both pools should be running tasks before one is killed", timeout_ms=30_000)
    pool_pids = {int(p.pid) for p in psutil.process_iter(["cmdline"])
                 if p.info["cmdline"] and any("htex-rs-worker-pool" in c for c in p.info["cmdline"])
                 and "--block_id=0" in " ".join(p.info["cmdline"])}
    assert pool_pids, "block 0's pool not found"
    for pid in pool_pids:
        os.kill(pid, signal.SIGKILL)
    results = [f.result(timeout=120) for f in futs]
    assert all(r > 0 for r in results)
    assert set(results).isdisjoint(pool_pids), "a result came from the killed pool"
    assert sum(1 for f in futs if f.task_record["try_id"] > 0) >= 1, "no task needed a retry"
    orphans = [p.pid for p in psutil.process_iter(["cmdline"]) if p.info["cmdline"]
               and any(f"--pool-pid {pid}" in " ".join(p.info["cmdline"]) for pid in pool_pids)]
    assert not alive_after(orphans, 10), "workers of the killed pool are still running"


def test_worker_that_dies_at_start_up_is_backed_off_then_the_pool_gives_up(tmp_path, monkeypatch):
    """A broken worker environment (here: a sitecustomize that kills worker processes) must
    not cycle forever: restarts back off, the pool exits, the task ends as ManagerLost."""
    from parsl.executors.high_throughput.errors import ManagerLost
    from parsl.providers import LocalProvider
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import os, sys\nif '--rank' in sys.argv:\n    os._exit(3)\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(site), *module_dirs(__file__)]))
    ex = HighThroughputExecutor(label="broken", address="127.0.0.1", encrypted=False, max_workers_per_node=1,
                                heartbeat_period=1, heartbeat_threshold=3,
                                provider=LocalProvider(init_blocks=1, max_blocks=1))
    ex.run_dir = str(tmp_path / "run")
    start = time.monotonic()
    with ex:
        fut = ex.submit(len, {}, "abc")
        with pytest.raises(ManagerLost):
            fut.result(timeout=90)
        assert time.monotonic() - start > 5, "no back-off between restarts"
        logs = list((tmp_path / "run").rglob("manager.log"))
        assert logs and "times in a row" in logs[0].read_text()
    left = [p for p in psutil.process_iter(["cmdline"])
            if p.info["cmdline"] and str(tmp_path) in " ".join(p.info["cmdline"])]
    assert not alive_after([p.pid for p in left], 10)


def test_worker_started_after_its_pool_died_exits(tmp_path):
    """The race behind orphaned workers: the pool is gone before the worker checks its
    parent. Started with the (dead) pool's pid, the worker must exit at once."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    worker = subprocess.Popen([sys.executable, "-m", "htex_rs.worker", "--url", "@htex-rs-nobody",
                               "--rank", "0", "--logdir", str(tmp_path), "--pool-pid", str(dead.pid)])
    try:
        assert worker.wait(timeout=30) == 1
    finally:
        worker.kill()



@pytest.fixture
def memory_cgroup():
    """A fresh memory cgroup (v2 or v1) under ours, removed after: (dir, limit file,
    oom-kill counter: a function returning the count, or None where it cannot be read).
    Skips where none can be made. Request it before load_dfk, so
    the DFK (and its pool) is gone before the cgroup is removed."""
    if os.geteuid() != 0:
        pytest.skip("needs root to make a memory cgroup")
    made = None
    for line in open("/proc/self/cgroup").read().splitlines():
        hid, controllers, path = line.split(":", 2)
        if hid == "0" and os.path.exists("/sys/fs/cgroup/cgroup.controllers"):
            base, limit, events = "/sys/fs/cgroup" + path, "memory.max", "memory.events"
        elif "memory" in controllers.split(","):
            base, limit, events = "/sys/fs/cgroup/memory" + path, "memory.limit_in_bytes", "memory.oom_control"
        else:
            continue
        d = os.path.join(base, f"htex-rs-oom-{os.getpid()}")
        try:
            os.mkdir(d)
        except OSError:
            continue
        if os.path.exists(os.path.join(d, limit)):
            made = d, os.path.join(d, limit), os.path.join(d, events)
            break
        os.rmdir(d)
    if made is None:
        pytest.skip("no writable memory cgroup here")
    d, limit, events = made

    def oom_kills() -> int | None:
        try:
            with open(events) as f:
                lines = f.read().splitlines()
        except OSError:
            return None
        for ln in lines:
            if ln.startswith("oom_kill "):
                return int(ln.split()[1])
        return None  # this kernel does not count them (before Linux 4.13)
    try:
        yield d, limit, oom_kills
    finally:
        deadline = time.monotonic() + 30
        while True:
            try:
                os.rmdir(d)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)  # its processes are still exiting


def worker_pid():
    import os
    return os.getpid()


def hog(mib_per_step):
    """Touch memory until something stops us (the OOM killer, or MemoryError)."""
    held = []
    while True:
        held.append(b"\x01" * (mib_per_step << 20))


def test_worker_killed_by_the_oom_killer_is_worker_lost_and_replaced(memory_cgroup, load_dfk):
    """The pool runs in a memory cgroup (joined by the provider's worker_init, as a user
    would on a cluster); a task exhausts it and the kernel's OOM killer kills its worker.
    The task ends as WorkerLost, the worker is replaced, the next task runs."""
    import parsl
    from parsl.config import Config
    from parsl.executors.high_throughput.errors import WorkerLost
    from parsl.providers import LocalProvider
    d, limit, oom_kills = memory_cgroup
    if oom_kills() is None:
        pytest.skip(f"this kernel does not count OOM kills in {d}; the worker's death could not be "
                    "told apart from any other")
    assert oom_kills() == 0, "a fresh cgroup has seen OOM kills"
    with open(limit, "w") as f:
        f.write(str(600 << 20))
    load_dfk(Config(executors=[HighThroughputExecutor(
        label="oomkill", address="127.0.0.1", encrypted=False, max_workers_per_node=1,
        provider=LocalProvider(init_blocks=1, max_blocks=1,
                               worker_init=f"echo $$ > {d}/cgroup.procs"))], strategy="none"))
    pid = parsl.python_app(worker_pid)().result(timeout=60)
    assert str(pid) in open(os.path.join(d, "cgroup.procs")).read().split(), "the worker is not in the cgroup"
    with pytest.raises(WorkerLost):
        parsl.python_app(hog)(32).result(timeout=120)
    kills = oom_kills()
    assert kills is not None and kills > 0, f"the worker died, but not by the OOM killer (oom_kill {kills})"
    assert parsl.python_app(worker_pid)().result(timeout=60) != pid, "the worker was not replaced"
