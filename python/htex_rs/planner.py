"""Python face of the Rust CPU-affinity and accelerator planner (rust/planner/).

``validate_cpu_affinity`` runs in the executor's constructor; ``plan_pool`` runs once
in each worker pool and gives every worker its CPUs and environment.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

from htex_rs import _core
from htex_rs.errors import HtexRsConfigurationError


def validate_cpu_affinity(value: str, max_workers: Optional[int], accelerators: Sequence[str]) -> None:
    """Reject an unknown or malformed ``cpu_affinity`` where the user wrote it."""
    workers = max_workers if max_workers is not None else (len(accelerators) or None)
    if max_workers is not None and accelerators:
        workers = min(max_workers, len(accelerators))
    try:
        _core.validate_cpu_affinity(value, workers)
    except ValueError as e:
        raise HtexRsConfigurationError(str(e)) from None


def gpu_count_override() -> Optional[int]:
    """``HTEX_RS_NUM_GPUS`` overrides the GPU count read from /proc/driver/nvidia/gpus."""
    value = os.environ.get("HTEX_RS_NUM_GPUS")
    return int(value) if value else None


def plan_pool(strategy: str, workers: int, accelerators: Sequence[str],
              allowed: Optional[Sequence[int]] = None, sysfs_root: str = "/",
              num_gpus: Optional[int] = None) -> list[_core.WorkerPlan]:
    """One dict per worker rank: cpus, cores, numa_nodes, accelerator, env."""
    return _core.plan_pool(strategy, workers, list(accelerators),
                           allowed=list(allowed) if allowed is not None else None,
                           sysfs_root=sysfs_root,
                           num_gpus=num_gpus if num_gpus is not None else gpu_count_override())
