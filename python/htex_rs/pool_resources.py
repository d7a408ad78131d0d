"""What a worker pool can grant tasks that ask for resources (``cores``, ``memory``,
``gpus`` in ``parsl_resource_specification``), as it advertises it at registration and
as ``htex-rs plan`` shows it.

- CPU slots: one per CPU of the pool's affinity mask (taskset, cgroup cpuset, the batch
  system's binding), NUMA node by node with a core's hyperthreads side by side, so a
  grant is whole cores on one node when it fits. ``HTEX_RS_CPU_SLOTS=N`` declares N
  slots instead (more than the CPUs to oversubscribe on purpose, fewer to keep some back).
- Memory (MB): ``mem_per_worker`` x workers when set, else the node's memory capped by
  the pool's cgroup limit (what a batch system enforces) and ``PARSL_MEMORY_GB``.
- Accelerators: ``available_accelerators``, else ``HTEX_RS_ACCELERATORS`` (a comma list:
  GPUs granted per task without Parsl's one-worker-per-accelerator cap on workers).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional, Sequence

import psutil

from htex_rs import _core

SLOTS_ENV = "HTEX_RS_CPU_SLOTS"
ACCELERATORS_ENV = "HTEX_RS_ACCELERATORS"
_MB = 2**20


@dataclass
class PoolResources:
    slots: list[tuple[int, int]]  # (cpu, numa node), in grant order
    memory_mb: int
    accelerators: list[str] = field(default_factory=list)

    def totals(self) -> dict[str, int]:
        """The registration's ``resources``: what the interchange matches tasks against."""
        return {"cores": len(self.slots), "memory": self.memory_mb, "gpus": len(self.accelerators)}


def declared_slots(env: Optional[dict[str, str]] = None) -> Optional[int]:
    value = (env if env is not None else os.environ).get(SLOTS_ENV)
    if not value:
        return None
    try:
        n = int(value)
    except ValueError:
        n = -1
    if n < 1:
        raise ValueError(f"{SLOTS_ENV}={value!r} is not valid: write a whole number of CPU slots, at least 1")
    return n


def cgroup_memory_limit(proc_root: str = "/proc", cgroup_root: str = "/sys/fs/cgroup") -> Optional[int]:
    """The tightest memory limit (bytes) on this process's cgroup and its parents, v2 or v1."""
    try:
        with open(os.path.join(proc_root, "self", "cgroup")) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    limits = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2 unified hierarchy
            base, name = cgroup_root, "memory.max"
        elif "memory" in controllers.split(","):
            base, name = os.path.join(cgroup_root, "memory"), "memory.limit_in_bytes"
        else:
            continue
        parts = [p for p in path.split("/") if p]
        for depth in range(len(parts), -1, -1):
            try:
                with open(os.path.join(base, *parts[:depth], name)) as f:
                    text = f.read().strip()
            except OSError:
                continue
            if text.isdigit() and int(text) < 2**60:  # v1 says "no limit" with a huge number
                limits.append(int(text))
    return min(limits) if limits else None


def pool_memory_mb(mem_per_worker: Optional[float], workers: int) -> int:
    if mem_per_worker and mem_per_worker > 0:
        return int(mem_per_worker * 1024 * workers)
    total = psutil.virtual_memory().total
    limit = cgroup_memory_limit()
    if limit:
        total = min(total, limit)
    gb = os.environ.get("PARSL_MEMORY_GB")
    if gb:
        total = min(total, int(float(gb) * 2**30))
    return total // _MB


def accelerators(available: Sequence[str], env: Optional[dict[str, str]] = None) -> list[str]:
    if available:
        return list(available)
    value = (env if env is not None else os.environ).get(ACCELERATORS_ENV, "")
    return [a.strip() for a in value.split(",") if a.strip()]


def pool_resources(mem_per_worker: Optional[float], workers: int, available_accelerators: Sequence[str],
                   allowed: Optional[Sequence[int]] = None, sysfs_root: str = "/") -> PoolResources:
    slots = _core.cpu_slots(declared_slots(), allowed=list(allowed) if allowed is not None else None,
                            sysfs_root=sysfs_root)
    return PoolResources(slots, pool_memory_mb(mem_per_worker, workers), accelerators(available_accelerators))
