"""The planner end to end: tasks on real workers report their affinity and OpenMP
variables, which must match the plan; and the `htex-rs plan` command."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from parsl.providers import LocalProvider

from htex_rs import HighThroughputExecutor, _core
from htex_rs.planner import plan_pool
from support import worker_pythonpath

pytestmark = pytest.mark.timeout(180)
TWO_CPUS = len(os.sched_getaffinity(0)) >= 2


def report():
    import os
    import time
    time.sleep(0.05)  # keep this worker busy so the other one takes the next task
    return (os.environ["PARSL_WORKER_RANK"], sorted(os.sched_getaffinity(0)),
            {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "GOMP_CPU_AFFINITY", "KMP_AFFINITY")})


@pytest.mark.skipif(not TWO_CPUS, reason="needs 2 usable CPUs")
@pytest.mark.parametrize("strategy", ["block", "alternating", "block-reverse", "list:1:0", "topology"])
def test_workers_are_pinned_as_planned(strategy, tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", worker_pythonpath(__file__))
    allowed = sorted(os.sched_getaffinity(0))[:2]
    if strategy == "list:1:0":
        strategy = f"list:{allowed[1]}:{allowed[0]}"
    monkeypatch.setenv("PARSL_CORES", "2")
    ex = HighThroughputExecutor(label="pin", address="127.0.0.1", max_workers_per_node=2, cpu_affinity=strategy,
                                encrypted=False, provider=LocalProvider(init_blocks=1, max_blocks=1))
    ex.run_dir = str(tmp_path)
    expected = {str(w["rank"]): w for w in plan_pool(strategy, 2, [])}
    seen = {}
    with ex:
        deadline = time.monotonic() + 60
        while len(seen) < 2 and time.monotonic() < deadline:
            for rank, cpus, env in [f.result(timeout=60) for f in [ex.submit(report, {}) for _ in range(4)]]:
                seen[rank] = (cpus, env)
    assert set(seen) == {"0", "1"}
    for rank, (cpus, env) in seen.items():
        plan = expected[rank]
        assert cpus == plan["cpus"], f"worker {rank}: affinity {cpus}, plan {plan['cpus']}"
        assert env == {k: plan["env"][k] for k in env}
        assert env["OMP_NUM_THREADS"] == str(len(cpus))


def test_plan_command_json_and_table(tmp_path):
    out = subprocess.run([sys.executable, "-m", "htex_rs.cli", "plan", "--cpu-affinity", "block", "--workers", "2",
                          "--cpus", "0-7", "--accelerators", "2", "--json"],
                         capture_output=True, text=True, check=True).stdout
    doc = json.loads(out)
    assert doc["allowed_cpus"] == list(range(8))
    assert [w["cpus"] for w in doc["workers"]] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert [w["env"]["CUDA_VISIBLE_DEVICES"] for w in doc["workers"]] == ["0", "1"]
    table = subprocess.run([sys.executable, "-m", "htex_rs.cli", "plan", "--cpu-affinity", "alternating",
                            "--workers", "2", "--cpus", "0-3"], capture_output=True, text=True, check=True).stdout
    assert "0,2" in table and "1,3" in table and "OMP_NUM_THREADS=2" in table


def test_plan_command_reads_a_fake_sysfs_tree(tmp_path):
    # 2 packages x 2 cores x 2 threads, NUMA node per package; CPU n and n+4 are siblings.
    cpu = tmp_path / "sys/devices/system/cpu"
    cpu.mkdir(parents=True)
    (cpu / "online").write_text("0-7\n")
    for i in range(8):
        t = cpu / f"cpu{i}/topology"
        t.mkdir(parents=True)
        (t / "physical_package_id").write_text(f"{(i % 4) // 2}\n")
        (t / "core_id").write_text(f"{i % 2}\n")
    for n, lst in enumerate(["0-1,4-5", "2-3,6-7"]):
        d = tmp_path / f"sys/devices/system/node/node{n}"
        d.mkdir(parents=True)
        (d / "cpulist").write_text(lst + "\n")
    out = subprocess.run([sys.executable, "-m", "htex_rs.cli", "plan", "--cpu-affinity", "topology", "--workers", "2",
                          "--cpus", "0-7", "--sysfs-root", str(tmp_path), "--json"],
                         capture_output=True, text=True, check=True).stdout
    workers = json.loads(out)["workers"]
    assert [w["cpus"] for w in workers] == [[0, 1, 4, 5], [2, 3, 6, 7]]
    assert [w["numa_nodes"] for w in workers] == [[0], [1]]


def test_plan_command_explains_a_bad_strategy():
    r = subprocess.run([sys.executable, "-m", "htex_rs.cli", "plan", "--cpu-affinity", "list:0-3:2", "--workers", "2",
                        "--cpus", "0-3"], capture_output=True, text=True)
    assert r.returncode == 2
    assert "CPU 2 is given to worker 0 and worker 1" in r.stderr


def test_allowed_cpus_is_the_affinity_mask():
    assert _core.allowed_cpus() == sorted(os.sched_getaffinity(0))
