"""CPU-affinity strategies and accelerator assignment with Parsl's exact semantics.

Used by the worker pool to pin each worker, and by the executor to reject a bad
``cpu_affinity`` at construction instead of on the compute node.
"""
from __future__ import annotations

import re
from typing import Optional, Sequence

from htex_rs.errors import HtexRsConfigurationError

STRATEGIES = ("none", "block", "block-reverse", "alternating")
_RANK = re.compile(r"^\d+(-\d+)?(,\d+(-\d+)?)*$")


def parse_cpu_list(text: str) -> list[int]:
    """Parse ``0-3,8,10-11`` into sorted CPU ids; raise ValueError naming the bad part."""
    cpus: set[int] = set()
    if not _RANK.match(text):
        raise ValueError(f"{text!r} is not a CPU list; write ids and inclusive ranges like '0-3,8,10-11'")
    for part in text.split(","):
        if "-" in part:
            lo, hi = (int(x) for x in part.split("-"))
            if lo > hi:
                raise ValueError(f"range {part!r} runs backwards; write it as '{hi}-{lo}'")
            cpus.update(range(lo, hi + 1))
        else:
            cpus.add(int(part))
    return sorted(cpus)


def parse_list_strategy(value: str) -> list[list[int]]:
    """``list:0-1:2,3`` -> [[0, 1], [2, 3]] (absolute CPU ids, one entry per worker)."""
    ranks = value.split(":")[1:]
    if not ranks or any(r == "" for r in ranks):
        raise ValueError(f"cpu_affinity {value!r}: write 'list:' followed by one CPU list per worker, "
                         "separated by ':' (e.g. 'list:0-3:4-7')")
    return [parse_cpu_list(r) for r in ranks]


def validate_strategy(value: str, max_workers: Optional[int], accelerators: Sequence[str]) -> None:
    """Reject an unknown or malformed ``cpu_affinity`` at construction."""
    v = value.lower()
    if v in STRATEGIES:
        return
    if not v.startswith("list"):
        raise HtexRsConfigurationError(
            f"cpu_affinity {value!r} is not supported; use one of {', '.join(STRATEGIES)} "
            "or 'list:<cpus of worker 0>:<cpus of worker 1>:...'")
    try:
        ranks = parse_list_strategy(v)
    except ValueError as e:
        raise HtexRsConfigurationError(str(e)) from None
    seen: dict[int, int] = {}
    for i, cpus in enumerate(ranks):
        for c in cpus:
            if c in seen:
                raise HtexRsConfigurationError(
                    f"cpu_affinity {value!r}: CPU {c} is given to worker {seen[c]} and worker {i}; "
                    "give each worker its own CPUs")
            seen[c] = i
    expected = max_workers if max_workers is not None else (len(accelerators) or None)
    if expected is not None and len(ranks) != expected:
        raise HtexRsConfigurationError(
            f"cpu_affinity {value!r} names {len(ranks)} worker ranks but this executor runs "
            f"{expected} workers per node; give one rank per worker (or set max_workers_per_node={len(ranks)})")


def worker_cpus(strategy: str, rank: int, pool_size: int, available: Sequence[int]) -> Optional[list[int]]:
    """The CPUs of worker ``rank`` of ``pool_size``, or None for strategy 'none'."""
    s = strategy.lower()
    if s == "none":
        return None
    if s.startswith("list"):
        ranks = parse_list_strategy(s)
        if len(ranks) != pool_size:
            raise ValueError(f"Affinity list {strategy} has wrong number of thread ranks "
                             f"({len(ranks)} for {pool_size} workers)")
        return ranks[rank]
    avail = sorted(available)
    cpw = len(avail) // pool_size
    if cpw == 0:
        raise ValueError(f"Affinity does not work if there are more workers ({pool_size}) than cores ({len(avail)})")
    if s == "block":
        return avail[cpw * rank: cpw * (rank + 1)]
    if s == "block-reverse":
        r = pool_size - 1 - rank
        return avail[cpw * r: cpw * (r + 1)]
    if s == "alternating":
        return avail[rank::pool_size]
    raise ValueError(f"Affinity strategy {strategy} is not supported")


def affinity_env(cpus: Sequence[int]) -> dict[str, str]:
    """OpenMP variables Parsl sets beside sched_setaffinity."""
    joined = ",".join(map(str, cpus))
    return {
        "OMP_NUM_THREADS": str(len(cpus)),
        "GOMP_CPU_AFFINITY": joined,
        "KMP_AFFINITY": f"explicit,proclist=[{joined}]",
    }


def accelerator_env(accelerator: str, pool_size: int, num_cuda: Optional[int]) -> dict[str, str]:
    """Device variables for one worker; ``num_cuda`` GPUs enable the oversubscription map."""
    cuda = accelerator
    if num_cuda:
        try:
            cuda = str(int(accelerator) // (pool_size // num_cuda))
        except (TypeError, ValueError, ZeroDivisionError):
            cuda = accelerator
    return {
        "CUDA_VISIBLE_DEVICES": cuda,
        "ROCR_VISIBLE_DEVICES": accelerator,
        "ZE_AFFINITY_MASK": accelerator,
        "ZE_ENABLE_PCI_ID_DEVICE_ORDER": "1",
    }
