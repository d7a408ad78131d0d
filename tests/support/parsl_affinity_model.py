"""A plain-Python model of Parsl's cpu_affinity rules (process_worker_pool.py,
worker(), Parsl 2026.10.26), used as the oracle in differential tests of the Rust
planner. Kept deliberately literal: slices and steps exactly as Parsl writes them."""
from __future__ import annotations

from typing import Optional


def parsl_worker_cpus(strategy: str, rank: int, pool_size: int, available: list[int]) -> Optional[list[int]]:
    strategy = strategy.lower()
    if strategy == "none":
        return None
    avail = sorted(available)
    cpus_per_worker = len(avail) // pool_size
    assert cpus_per_worker > 0, "Affinity does not work if there are more workers than cores"
    if strategy == "block":
        return avail[cpus_per_worker * rank:cpus_per_worker * (rank + 1)]
    if strategy == "block-reverse":
        rev = pool_size - 1 - rank
        return avail[cpus_per_worker * rev:cpus_per_worker * (rev + 1)]
    if strategy == "alternating":
        return avail[rank::pool_size]
    if strategy[0:4] == "list":
        thread_ranks = strategy.split(":")[1:]
        if len(thread_ranks) != pool_size:
            raise ValueError(f"Affinity list {strategy} has wrong number of thread ranks")
        out: list[int] = []
        for part in thread_ranks[rank].split(","):
            if "-" in part:
                lo, hi = part.split("-")
                out.extend(range(int(lo), int(hi) + 1))
            else:
                out.append(int(part))
        return out
    raise ValueError(f"Affinity strategy {strategy} is not supported")
