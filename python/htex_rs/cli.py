"""``htex-rs``: command-line tools. ``htex-rs plan`` shows, before any job is submitted,
which CPUs, physical cores, NUMA nodes, accelerator and environment each worker gets,
and the resources (CPU slots, memory, GPUs) the pool offers tasks that ask for them."""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from typing import Callable, Optional

from htex_rs import _core, block_end, planner, pool_resources


def _workers(args: argparse.Namespace, allowed: list[int]) -> int:
    if args.workers:
        return int(args.workers)
    count = math.floor(len(allowed) / args.cores_per_worker)
    if args.max_workers_per_node:
        count = min(count, args.max_workers_per_node)
    if args.accelerators:
        count = min(count, len(args.accelerators))
    return max(1, int(count))


def _accelerators(values: list[str]) -> list[str]:
    if len(values) == 1 and values[0].isdigit():
        return [str(i) for i in range(int(values[0]))]  # an int N, as in the executor
    return values


def plan_command(args: argparse.Namespace) -> int:
    allowed = _core.parse_cpu_list(args.cpus) if args.cpus else _core.allowed_cpus()
    args.accelerators = _accelerators(args.accelerators or [])
    workers = _workers(args, allowed)
    try:
        plan = planner.plan_pool(args.cpu_affinity, workers, args.accelerators, allowed=allowed,
                                 sysfs_root=args.sysfs_root, num_gpus=args.num_gpus)
        res = pool_resources.pool_resources(args.mem_per_worker, workers, args.accelerators,
                                            allowed=allowed, sysfs_root=args.sysfs_root)
    except ValueError as e:
        print(f"htex-rs plan: {e}", file=sys.stderr)
        return 2
    resources = {"totals": res.totals(), "cpu_slots": res.slots, "accelerators": res.accelerators}
    try:
        end, source = block_end.block_end_and_source(block_end.parse_walltime(args.walltime), time.time())
    except ValueError as e:
        print(f"htex-rs plan: {e}", file=sys.stderr)
        return 2
    block = {"end": end, "source": source, "time_left": None if end is None else end - time.time()}
    if args.json:
        json.dump({"cpu_affinity": args.cpu_affinity, "allowed_cpus": allowed, "workers": plan,
                   "resources": resources, "block": block}, sys.stdout, indent=2)
        print()
        return 0
    print(f"cpu_affinity={args.cpu_affinity!r}  workers={workers}  "
          f"allowed CPUs={_core.format_cpu_list(allowed)}")
    slot_cpus = _core.format_cpu_list(sorted({c for c, _ in res.slots}))
    print(f"resources for tasks that ask (cores, memory, gpus): {len(res.slots)} CPU slots "
          f"(CPUs {slot_cpus}), {res.memory_mb} MB memory, {len(res.accelerators)} GPUs "
          f"({','.join(res.accelerators) or '-'})")
    print(f"block: {block_end.describe(end, source, time.time())}")
    rows = [("worker", "CPUs", "physical cores (pkg:core)", "NUMA", "accelerator", "environment")]
    for w in plan:
        cpus = "-" if w["cpus"] is None else _core.format_cpu_list(w["cpus"])
        cores = " ".join(f"{p}:{c}" for p, _d, c in w["cores"])
        numa = ",".join(map(str, w["numa_nodes"]))
        env = " ".join(f"{k}={v}" for k, v in w["env"].items()) or "-"
        rows.append((str(w["rank"]), cpus, cores, numa, w["accelerator"] or "-", env))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for r in rows:
        print("  ".join(c.ljust(widths[i]) for i, c in enumerate(r[:5])) + "  " + r[5])
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="htex-rs", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    pl = sub.add_parser("plan", help="show the worker -> CPU/core/NUMA/accelerator plan for this node")
    pl.add_argument("--cpu-affinity", default="none",
                    help="none, block, block-reverse, alternating, topology, or list:<cpus>:<cpus>:...")
    pl.add_argument("--workers", type=int, default=None, help="worker count (default: as the pool computes it)")
    pl.add_argument("--max-workers-per-node", type=int, default=None)
    pl.add_argument("--cores-per-worker", type=float, default=1.0)
    pl.add_argument("--mem-per-worker", type=float, default=None, help="GB per worker, as the executor's")
    pl.add_argument("--cpus", default=None, help="allowed CPUs, e.g. 0-15 (default: this process's mask)")
    pl.add_argument("--accelerators", nargs="*", default=[],
                    help="accelerator names, or one integer N for 0..N-1 (as available_accelerators)")
    pl.add_argument("--num-gpus", type=int, default=None,
                    help="physical GPU count for oversubscription (default: /proc/driver/nvidia/gpus)")
    pl.add_argument("--sysfs-root", default="/", help="read topology from ROOT/sys (fake trees, other nodes)")
    pl.add_argument("--walltime", default=None,
                    help="the provider's walltime (HH:MM:SS), for the block's end where the batch system says none")
    pl.add_argument("--json", action="store_true", help="machine-readable output")
    pl.set_defaults(func=plan_command)
    try:  # `htex-rs globus-auth`, when globus-sdk is installed (the `globus` extra)
        from htex_rs.staging.globus import add_cli
        add_cli(sub)
    except ImportError:
        pass
    args = p.parse_args(argv)
    command: Callable[[argparse.Namespace], int] = args.func
    return command(args)


if __name__ == "__main__":
    sys.exit(main())
