"""Per-task resources (issue #9): ``parsl_resource_specification`` with cores, memory (MB)
and gpus, packed onto pools with room. Real executor, pools, worker processes and sockets;
each task reports the CPU mask and environment it really ran with. GPUs are named, not
present (HTEX_RS_ACCELERATORS), so the check is CUDA_VISIBLE_DEVICES per task."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import wait

import pytest
from parsl.executors.errors import InvalidResourceSpecification
from parsl.providers import LocalProvider

from htex_rs import HighThroughputExecutor
from htex_rs.errors import ResourceRequestTooLarge
from support import worker_pythonpath

pytestmark = pytest.mark.timeout(180)


def seen(seconds: float) -> dict:
    """Sleep; report when, on which CPUs and with which environment the task ran."""
    import os
    import time
    start = time.time()
    time.sleep(seconds)
    keys = ("OMP_NUM_THREADS", "GOMP_CPU_AFFINITY", "CUDA_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES",
            "ZE_AFFINITY_MASK", "PARSL_CORES", "PARSL_MEMORY", "PARSL_GPUS")
    return {"start": start, "end": time.time(), "cpus": sorted(os.sched_getaffinity(0)),
            "env": {k: os.environ.get(k) for k in keys}}


@pytest.fixture
def make_executor(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", worker_pythonpath(__file__))  # the workers unpickle `seen` from here
    started = []

    def _make(workers: int, slots: int | None = None, accelerators: str | None = None,
              **kw) -> HighThroughputExecutor:
        # The pool is a child of this process (LocalProvider): it reads these at start-up.
        if slots is not None:
            monkeypatch.setenv("HTEX_RS_CPU_SLOTS", str(slots))
        if accelerators is not None:
            monkeypatch.setenv("HTEX_RS_ACCELERATORS", accelerators)
        ex = HighThroughputExecutor(label=f"res{len(started)}", address="127.0.0.1", encrypted=False,
                                    max_workers_per_node=workers, cores_per_worker=0.01,
                                    heartbeat_period=1, heartbeat_threshold=10,
                                    provider=LocalProvider(init_blocks=1, min_blocks=0, max_blocks=1), **kw)
        ex.run_dir = str(tmp_path)
        ex.__enter__()
        started.append(ex)
        return ex

    yield _make
    for ex in started:
        ex.shutdown()


def overlapping(a: dict, b: dict) -> bool:
    return a["start"] < b["end"] and b["start"] < a["end"]


def test_tasks_run_pinned_to_their_own_cpus_with_matching_environment(make_executor):
    """2 real CPUs as 2 slots, 2 workers: 1-core tasks run side by side on different CPUs,
    a 2-core task gets both and runs alone; the mask is the one the task really has."""
    real = sorted(os.sched_getaffinity(0))
    if len(real) < 2:
        pytest.skip("needs 2 CPUs")
    ex = make_executor(workers=2, slots=2)
    specs = [{"cores": 1}, {"cores": 1}, {"cores": 2, "memory": 100}, {"cores": 1}, {"cores": 1, "priority": 3}]
    futs = [(spec, ex.submit(seen, spec, 0.4)) for spec in specs]
    plain = ex.submit(seen, {}, 0)
    runs = [(spec, f.result(timeout=60)) for spec, f in futs]
    for spec, r in runs:
        assert len(r["cpus"]) == spec["cores"], (spec, r)
        assert set(r["cpus"]) <= set(real)
        assert r["env"]["OMP_NUM_THREADS"] == str(spec["cores"])
        assert r["env"]["GOMP_CPU_AFFINITY"] == ",".join(map(str, r["cpus"]))
        assert r["env"]["PARSL_CORES"] == str(spec["cores"])
        assert r["env"]["PARSL_MEMORY"] == str(spec.get("memory", 0))
        assert r["env"]["PARSL_GPUS"] == "0"
        assert r["env"]["CUDA_VISIBLE_DEVICES"] == ""
    for i, (_, a) in enumerate(runs):
        for _, b in runs[i + 1:]:
            if overlapping(a, b):
                assert not set(a["cpus"]) & set(b["cpus"]), f"two running tasks share a CPU: {a} {b}"
    # A task without resource keys runs as before, with the worker's own (unpinned) mask,
    # restored after the pinned tasks that worker ran.
    assert plain.result(timeout=30)["cpus"] == real
    assert ex.submit(seen, {}, 0).result(timeout=30)["cpus"] == real


def test_concurrent_tasks_never_share_a_gpu(make_executor):
    ex = make_executor(workers=4, slots=8, accelerators="g0,g1,g2")
    specs = [{"gpus": 1}, {"gpus": 2}, {"gpus": 1, "cores": 2}, {"cores": 1}] * 4
    futs = [(spec, ex.submit(seen, spec, 0.3)) for spec in specs]
    runs = [(spec, f.result(timeout=90)) for spec, f in futs]
    for spec, r in runs:
        devices = [d for d in r["env"]["CUDA_VISIBLE_DEVICES"].split(",") if d]
        assert len(devices) == spec.get("gpus", 0), (spec, r)
        assert set(devices) <= {"g0", "g1", "g2"}
        assert r["env"]["ROCR_VISIBLE_DEVICES"] == r["env"]["ZE_AFFINITY_MASK"] == r["env"]["CUDA_VISIBLE_DEVICES"]
        r["devices"] = set(devices)
    concurrent = 0
    for i, (_, a) in enumerate(runs):
        for _, b in runs[i + 1:]:
            if overlapping(a, b):
                concurrent += 1
                assert not a["devices"] & b["devices"], f"two running tasks share a GPU: {a} {b}"
    assert concurrent, "the pool ran nothing side by side: the check proved nothing"


def test_a_task_bigger_than_every_pool_fails_at_once_and_bad_requests_fail_at_submit(make_executor):
    ex = make_executor(workers=2, slots=8)
    assert ex.submit(seen, {"cores": 8}, 0).result(timeout=60)["env"]["PARSL_CORES"] == "8"
    t0 = time.monotonic()
    with pytest.raises(ResourceRequestTooLarge) as e:
        ex.submit(seen, {"cores": 64, "memory": 10}, 0).result(timeout=30)
    assert time.monotonic() - t0 < 10
    assert "64 cores" in str(e.value) and "largest: 8 cores" in str(e.value), e.value
    with pytest.raises(ResourceRequestTooLarge, match="1 GPUs"):
        ex.submit(seen, {"gpus": 1}, 0).result(timeout=30)
    bad = [({"cores": -1}, "cores=-1"), ({"cores": 1.5}, "whole number of cores"),
           ({"cores": 0}, "at least 1"), ({"memory": "8GB"}, "megabytes"), ({"gpus": True}, "gpus=True"),
           ({"disk": 10}, "disk")]
    outstanding = len(ex.tasks)
    for spec, words in bad:
        with pytest.raises(InvalidResourceSpecification, match=words):
            ex.submit(seen, spec, 0)
    assert len(ex.tasks) == outstanding, "a rejected task was queued"
    assert ex.submit(seen, {"cores": 2.0}, 0).result(timeout=30)["env"]["PARSL_CORES"] == "2"


def test_a_large_task_is_not_starved_by_a_stream_of_small_ones(make_executor):
    """2 slots, a steady stream of 1-core tasks keeping both busy: the 2-core task still
    runs (backfill stops after a bounded wait), while the stream goes on."""
    ex = make_executor(workers=2, slots=2)
    small = [ex.submit(seen, {"cores": 1}, 0.1) for _ in range(4)]
    big = ex.submit(seen, {"cores": 2}, 0.1)
    deadline = time.monotonic() + 60
    while not big.done() and time.monotonic() < deadline:
        small = [f for f in small if not f.done()]
        while len(small) < 4:
            small.append(ex.submit(seen, {"cores": 1}, 0.1))
        time.sleep(0.02)
    assert big.done(), "the 2-core task waited a minute behind 1-core tasks"
    after = [ex.submit(seen, {"cores": 1}, 0.1) for _ in range(2)]
    wait(small + after, timeout=60)
    b = big.result()
    assert len(b["cpus"]) == min(2, len(os.sched_getaffinity(0)))
    assert all(f.result()["start"] >= b["end"] - 0.05 or f.result()["end"] <= b["start"] + 0.05
               for f in small + after if len(os.sched_getaffinity(0)) >= 2), "a 1-core task ran beside the 2-core one"


def test_plan_shows_the_resources_the_pool_advertises():
    env = dict(os.environ, HTEX_RS_CPU_SLOTS="8", HTEX_RS_ACCELERATORS="a,b")
    out = subprocess.run([sys.executable, "-m", "htex_rs.cli", "plan", "--workers", "2", "--mem-per-worker", "1.5",
                          "--json"], env=env, capture_output=True, text=True, check=True).stdout
    res = json.loads(out)["resources"]
    assert res["totals"] == {"cores": 8, "memory": 3072, "gpus": 2}
    assert len(res["cpu_slots"]) == 8 and res["accelerators"] == ["a", "b"]
    text = subprocess.run([sys.executable, "-m", "htex_rs.cli", "plan", "--workers", "2"], env=env,
                          capture_output=True, text=True, check=True).stdout
    assert "8 CPU slots" in text and "2 GPUs (a,b)" in text, text
    bad = subprocess.run([sys.executable, "-m", "htex_rs.cli", "plan"], capture_output=True, text=True,
                         env=dict(os.environ, HTEX_RS_CPU_SLOTS="lots"))
    assert bad.returncode == 2 and "HTEX_RS_CPU_SLOTS='lots'" in bad.stderr
