"""htex_rs's own threads and its pools run under Linux's SCHED_BATCH (rust/sched.rs: their
wake-ups no longer preempt the thread holding the user's GIL), the user's threads keep
their policy, and HTEX_RS_SCHED_BATCH=0 turns it off. Each case runs in a child process
with its own environment, with a real pool and workers."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = [pytest.mark.timeout(120),
              pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a Linux scheduling policy"),
              pytest.mark.skipif(sys.platform.startswith("linux") and os.sched_getscheduler(0) != os.SCHED_OTHER,
                                 reason="the tests run under another policy (chrt): nothing to compare with")]

CHILD = textwrap.dedent("""
    import json, os, sys, threading
    from parsl.providers import LocalProvider
    from htex_rs import HighThroughputExecutor

    def policies():
        # Policy per thread name: Python's names where it has them (3.11 does not give
        # them to the kernel), else the kernel's; "native" for the unnamed native threads.
        import os, threading
        named = {t.native_id: t.name for t in threading.enumerate()}
        with open("/proc/self/comm") as f:
            unnamed = f.read().strip()  # such a thread carries the process's name
        out = {}
        for tid in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{tid}/comm") as f:
                comm = f.read().strip()
            name = named.get(int(tid), "native" if comm == unnamed else comm)
            out.setdefault(name, []).append(os.sched_getscheduler(int(tid)))
        return out

    start_policy = os.sched_getscheduler(0)
    ex = HighThroughputExecutor(label="sched", address="127.0.0.1", encrypted=False, max_workers_per_node=1,
                                provider=LocalProvider(init_blocks=1, min_blocks=0, max_blocks=1))
    ex.run_dir = sys.argv[1]
    with ex:
        worker = ex.submit(policies, {}).result(timeout=60)
        submit = policies()
    print(json.dumps({"worker": worker, "submit": submit, "start": start_policy}))
""")


def run(tmp_path, env):
    out = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path)], capture_output=True, text=True,
                         timeout=100, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_our_threads_and_the_pool_run_under_sched_batch_and_the_users_threads_do_not(tmp_path):
    got = run(tmp_path, {k: v for k, v in os.environ.items() if k != "HTEX_RS_SCHED_BATCH"})
    assert got["submit"]["htex-rs-interch"] == [os.SCHED_BATCH], got
    assert got["submit"]["MainThread"] == [got["start"]], "the thread that started it gets its policy back"
    assert got["submit"]["HTEX-Result-Queue-Thread"] == [got["start"]], "it runs the user's callbacks"
    # The worker port is served from the interchange thread itself (rust/zmtp): no libzmq
    # I/O threads in the user's process, whatever their policy.
    assert "native" not in got["submit"], got
    assert all(p == [os.SCHED_BATCH] * len(p) for p in got["worker"].values()), got


def test_htex_rs_sched_batch_0_keeps_the_normal_policy(tmp_path):
    got = run(tmp_path, {**os.environ, "HTEX_RS_SCHED_BATCH": "0"})
    everything = [p for d in (got["submit"], got["worker"]) for ps in d.values() for p in ps]
    assert set(everything) == {os.SCHED_OTHER}, got
