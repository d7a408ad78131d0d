"""What a pool advertises for per-task resources (htex_rs.pool_resources): the memory
limit read from cgroup trees (v2 and v1, written here as the kernel lays them out), the
declared CPU slots, and the accelerators."""
from __future__ import annotations

import os

import pytest

from htex_rs import pool_resources


def write(path, text: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def test_cgroup_v2_limit_is_the_tightest_on_the_path(tmp_path):
    proc, cg = tmp_path / "proc", tmp_path / "cg"
    write(proc / "self" / "cgroup", "0::/slurm/job_7/step_0\n")
    write(cg / "slurm" / "memory.max", "max\n")
    write(cg / "slurm" / "job_7" / "memory.max", str(8 * 2**30))
    write(cg / "slurm" / "job_7" / "step_0" / "memory.max", "max\n")
    assert pool_resources.cgroup_memory_limit(str(proc), str(cg)) == 8 * 2**30


def test_cgroup_v1_limit_and_its_no_limit_value(tmp_path):
    proc, cg = tmp_path / "proc", tmp_path / "cg"
    write(proc / "self" / "cgroup", "4:cpu,cpuacct:/job\n3:memory:/job\n")
    write(cg / "memory" / "job" / "memory.limit_in_bytes", str(2**30))
    write(cg / "memory" / "memory.limit_in_bytes", "9223372036854771712")  # v1's "no limit"
    assert pool_resources.cgroup_memory_limit(str(proc), str(cg)) == 2**30
    write(cg / "memory" / "job" / "memory.limit_in_bytes", "9223372036854771712")
    assert pool_resources.cgroup_memory_limit(str(proc), str(cg)) is None
    assert pool_resources.cgroup_memory_limit(str(tmp_path / "nowhere"), str(cg)) is None


def test_memory_is_mem_per_worker_times_workers_when_set():
    assert pool_resources.pool_memory_mb(1.5, 4) == 6144
    assert 0 < pool_resources.pool_memory_mb(None, 4) <= pool_resources.psutil.virtual_memory().total // 2**20


@pytest.mark.parametrize("value", ["0", "-2", "lots", "1.5"])
def test_declared_slots_must_be_a_whole_number(value):
    with pytest.raises(ValueError, match=f"HTEX_RS_CPU_SLOTS='{value}'"):
        pool_resources.declared_slots({"HTEX_RS_CPU_SLOTS": value})
    assert pool_resources.declared_slots({"HTEX_RS_CPU_SLOTS": "12"}) == 12
    assert pool_resources.declared_slots({}) is None


def test_accelerators_come_from_available_accelerators_first():
    env = {"HTEX_RS_ACCELERATORS": " 0, 1 ,,2"}
    assert pool_resources.accelerators([], env) == ["0", "1", "2"]
    assert pool_resources.accelerators(["a"], env) == ["a"]
    assert pool_resources.accelerators([], {}) == []


def test_slots_cover_the_affinity_mask_or_the_declared_count():
    mask = sorted(os.sched_getaffinity(0))
    res = pool_resources.pool_resources(None, 2, [])
    assert sorted(c for c, _ in res.slots) == mask
    assert res.totals()["cores"] == len(mask)
