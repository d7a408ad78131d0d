"""One burst of N (default 1,000,000) no-op tasks through htex_rs: all queued before
any worker pool exists, then one pool of 2 workers drains them. Reports submit rate,
completion time and peak memory per queued task (submit process RSS, which holds the
futures, the Python task buffers and the Rust interchange queue).

    python benches/burst.py --tasks 1000000 --prefetch 64
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time

import psutil
from parsl.providers import LocalProvider

from htex_rs import HighThroughputExecutor


def noop(x: int = 0) -> int:
    return x


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", type=int, default=1_000_000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--prefetch", type=int, default=64)
    p.add_argument("--json", default=None)
    a = p.parse_args()
    proc = psutil.Process()
    with tempfile.TemporaryDirectory() as d:
        ex = HighThroughputExecutor(label="burst", address="127.0.0.1", max_workers_per_node=a.workers,
                                    prefetch_capacity=a.prefetch,
                                    provider=LocalProvider(init_blocks=0, min_blocks=0, max_blocks=1))
        ex.run_dir = d
        with ex:
            base = proc.memory_info().rss
            t0 = time.perf_counter()
            futs = [ex.submit(noop, {}, i) for i in range(a.tasks)]
            t_submit = time.perf_counter() - t0
            time.sleep(1.0)  # let the interchange thread take every task into its queue
            queued_rss = proc.memory_info().rss
            t1 = time.perf_counter()
            ex.scale_out_facade(1)
            done = 0
            peak = queued_rss
            for i, f in enumerate(futs):
                f.result()
                done += 1
                if i % 100_000 == 0:
                    peak = max(peak, proc.memory_info().rss)
            t_run = time.perf_counter() - t1
            out = {
                "tasks": a.tasks, "workers": a.workers, "prefetch_capacity": a.prefetch,
                "submit_rate_per_s": a.tasks / t_submit,
                "drain_time_s": t_run, "drain_rate_per_s": a.tasks / t_run,
                "baseline_rss_mib": base / 2**20, "queued_rss_mib": queued_rss / 2**20,
                "peak_rss_mib": peak / 2**20,
                "bytes_per_queued_task": (queued_rss - base) / a.tasks,
                "completed": done,
            }
    for k, v in out.items():
        print(f"{k:24s} {v:,.1f}" if isinstance(v, float) else f"{k:24s} {v:,}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
