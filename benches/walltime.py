"""Time limits under staggered block ends: htex_rs beside Parsl's HTEX, same run.

    python benches/walltime.py --out docs/benchmarks_walltime.json

Two phases per executor, through the DataFlowKernel (``@python_app`` with Parsl's
``walltime=`` argument, ``retries=3``), on this machine's LocalProvider blocks:

* ``blocks``: ``--tasks`` tasks of 0.2-2 s (seeded) each declaring a walltime of 1.5x its
  length plus 0.5 s, on 4 blocks of 2 workers whose jobs end 8, 14 and 20 s after they
  start (the fourth runs on): each block's launch command runs under ``timeout -s TERM``,
  as a batch system ends a job, and tells htex_rs its end (``HTEX_RS_BLOCK_END``). It
  reports the tries killed by a block's end (ManagerLost, BlockEnded), the retries spent,
  the tasks that failed for good, and the makespan.
* ``stuck``: one block of one worker; a task in ``time.sleep(600)`` with ``walltime=2``,
  then a quick task behind it: how long past its limit the stuck task held the worker
  (the quick task's end minus the limit), capped at ``--stuck-cap`` seconds.

Heartbeats are 1 s / 5 s for both executors, so Parsl notices a dead block within 5 s.
``--out`` writes the record (commit, date, machine, versions, arguments, figures).
"""
from __future__ import annotations

import argparse
import collections
import json
import random
import sys
import tempfile
import time
from typing import Any

import parsl
from parsl import python_app
from parsl.config import Config
from parsl.executors import HighThroughputExecutor as ParslHTEX
from parsl.executors.high_throughput.executor import DEFAULT_LAUNCH_CMD as PARSL_LAUNCH_CMD
from parsl.providers import LocalProvider

from htex_rs import HighThroughputExecutor as RustHTEX
from htex_rs.executor import DEFAULT_LAUNCH_CMD as RUST_LAUNCH_CMD

#: When each block's job ends, seconds after it starts; the last runs on.
BLOCK_ENDS = (8, 14, 20, 3600)


@python_app
def work(seconds: float, walltime: float | None = None) -> float:
    import time
    time.sleep(seconds)
    return seconds


@python_app
def quick() -> int:
    return 0


def executor(kind: str, run_dir: str, blocks: int, workers: int, ends: bool) -> Any:
    cls, launch = (RustHTEX, RUST_LAUNCH_CMD) if kind == "htex_rs" else (ParslHTEX, PARSL_LAUNCH_CMD)
    prefix = ""
    if ends:
        # Block b's job ends BLOCK_ENDS[b] s after it starts: `timeout` ends it as a batch
        # system would, and the end goes to the pool as the batch system would tell it.
        end = f"$(echo {' '.join(map(str, BLOCK_ENDS))} | cut -d' ' -f$(( {{{{block_id}}}} + 1 )))"
        prefix = f"END={end}; HTEX_RS_BLOCK_END=$(( $(date +%s) + END )) timeout -s TERM $END "
    ex = cls(label=f"wt_{kind}", address="127.0.0.1", max_workers_per_node=workers, cores_per_worker=0.01,
             heartbeat_period=1, heartbeat_threshold=5, launch_cmd=prefix + launch,
             provider=LocalProvider(init_blocks=blocks, min_blocks=0, max_blocks=blocks))
    ex.run_dir = run_dir
    return ex


def load(kind: str, blocks: int, workers: int, ends: bool, retries: int) -> Any:
    run_dir = tempfile.mkdtemp(prefix=f"wt-{kind}-")
    ex = executor(kind, run_dir, blocks, workers, ends)
    parsl.load(Config(executors=[ex], run_dir=run_dir, strategy="none", retries=retries))
    deadline = time.monotonic() + 60
    while len(ex.connected_managers()) < blocks and time.monotonic() < deadline:
        time.sleep(0.1)
    return ex


def unload() -> None:
    parsl.dfk().cleanup()
    parsl.clear()


def count_tries(ex: Any) -> collections.Counter[str]:
    """Count each try's outcome as the executor reports it (the DFK keeps only the last
    try's history): the exception's class name, or "result"."""
    counts: collections.Counter[str] = collections.Counter()
    orig = ex.submit

    def submit(*a: Any, **k: Any) -> Any:
        fut = orig(*a, **k)

        def done(f: Any) -> None:
            e = f.exception()
            counts["result" if e is None else type(e).__name__] += 1
        fut.add_done_callback(done)
        return fut
    ex.submit = submit
    return counts


def blocks_phase(kind: str, args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    lengths = [round(rng.uniform(0.2, 2.0), 2) for _ in range(args.tasks)]
    ex = load(kind, len(BLOCK_ENDS), 2, True, retries=3)
    tries = count_tries(ex)
    t0 = time.monotonic()
    futs = [work(s, walltime=1.5 * s + 0.5) for s in lengths]
    failed = 0
    for f in futs:
        try:
            f.result(timeout=600)
        except Exception:
            failed += 1
    makespan = time.monotonic() - t0
    records = [f.task_record for f in futs]
    unload()
    return {
        # BlockEnded is a ManagerLost: a try that ran when its block ended.
        "tries_killed_by_block_end": tries["ManagerLost"] + tries["BlockEnded"],
        "tries": dict(tries),
        "retries_spent": sum(r["fail_count"] for r in records) - failed,
        "tasks_failed": failed,
        "makespan_s": round(makespan, 2),
        "work_s": round(sum(lengths), 2),
    }


def stuck_phase(kind: str, args: argparse.Namespace) -> dict[str, Any]:
    ex = load(kind, 1, 1, False, retries=0)
    quick().result(timeout=60)  # the worker is up
    limit = 2.0
    t0 = time.monotonic()
    stuck = work(600, walltime=limit)
    behind = quick()
    try:
        behind.result(timeout=limit + args.stuck_cap)
        held = time.monotonic() - t0 - limit
        capped = False
    except Exception:
        held, capped = args.stuck_cap, True
    outcome = type(stuck.exception(timeout=1) if stuck.done() else None).__name__
    # Parsl's worker sleeps on: end its block rather than wait for the sleep.
    ex.provider.cancel([j for j in ex.provider.resources])
    unload()
    return {"held_past_limit_s": round(held, 2), "capped": capped, "stuck_task_outcome": outcome}


def environment() -> dict[str, Any]:
    """attack.py's record (commit, date, host, versions), named for this bench."""
    import attack
    return {"bench": "walltime", **attack.environment()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", type=int, default=100)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--stuck-cap", type=float, default=20.0)
    p.add_argument("--kinds", nargs="+", default=["htex_rs", "parsl"])
    p.add_argument("--out", help="write the record (JSON) here")
    args = p.parse_args()
    results: dict[str, Any] = {}
    for kind in args.kinds:
        print(f"[{kind}] blocks ending at {BLOCK_ENDS[:-1]} s, {args.tasks} tasks ...", file=sys.stderr, flush=True)
        results[kind] = {"blocks": blocks_phase(kind, args)}
        print(f"[{kind}] a stuck task ...", file=sys.stderr, flush=True)
        results[kind]["stuck"] = stuck_phase(kind, args)
    print(f"{'':34}" + "".join(f"{k:>14}" for k in args.kinds))
    rows = [("tries killed by a block's end", "blocks", "tries_killed_by_block_end"),
            ("retries spent", "blocks", "retries_spent"), ("tasks failed for good", "blocks", "tasks_failed"),
            ("makespan (s)", "blocks", "makespan_s"),
            ("stuck task: worker held past limit (s)", "stuck", "held_past_limit_s")]
    for label, phase, key in rows:
        cells = []
        for k in args.kinds:
            r = results[k][phase]
            cap = ">" if phase == "stuck" and r["capped"] else ""
            cells.append(f"{cap}{r[key]}")
        print(f"{label:34}" + "".join(f"{c:>14}" for c in cells))
    if args.out:
        record = {**environment(), "args": vars(args), "block_ends_s": BLOCK_ENDS, "results": results}
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1)
            f.write("\n")


if __name__ == "__main__":
    main()
