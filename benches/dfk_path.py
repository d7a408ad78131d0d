"""The DataFlowKernel path, side by side: N no-op ``@python_app`` through the DFK with
Parsl's ThreadPoolExecutor (no executor hop: the DFK's own ceiling), Parsl's HTEX and
htex_rs, with parsl.log on (the Config default, as parsl-perf runs it) and off; and htex_rs
again with ``HTEX_RS_SCHED_BATCH=0`` (its threads and pools under the normal policy).

    python benches/dfk_path.py --rounds 5 --tasks 8000 --json docs/benchmarks_dfk.json

Every measurement runs in a fresh interpreter (a DFK leaves state behind that slows the
next one in the same process), rounds interleave the executors, and each round's
htex_rs/ceiling ratio is taken within the round, so drift in this machine's speed cancels;
medians are reported. A progress line on stderr says what is running. With ``--plot`` the
table is drawn to docs/benchmarks_dfk.png.

With ``--pin`` the submitting side (this process, with Parsl's interchange process) gets
CPU 0 and the worker pools CPU 1, as when pools run on other nodes and only the DFK and
the interchange share the submit host.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

KINDS = ("threads", "parsl", "htex_rs", "htex_rs_normal")
NAMES = {"threads": "DFK ceiling", "parsl": "Parsl HTEX", "htex_rs": "htex_rs",
         "htex_rs_normal": "htex_rs, HTEX_RS_SCHED_BATCH=0"}
LOGS = (("on", True), ("off", False))


def noop(x: int = 0) -> int:
    return x


def pin_submit_side() -> None:
    """This process and Parsl's interchange on CPU 0, every worker pool (and worker) on CPU 1."""
    import psutil

    me = psutil.Process()
    me.cpu_affinity([0])
    for p in me.children(recursive=True):
        try:
            interchange = any(part.endswith("interchange.py") for part in p.cmdline())
            p.cpu_affinity([0] if interchange else [1])
        except psutil.NoSuchProcess:
            pass


def one(kind: str, log: bool, tasks: int, workers: int, pin: bool = False) -> float:
    """One measurement in this process: tasks/s through the DFK."""
    import parsl
    from parsl.config import Config
    from parsl.executors import HighThroughputExecutor as ParslHTEX
    from parsl.executors.threads import ThreadPoolExecutor
    from parsl.providers import LocalProvider

    from htex_rs import HighThroughputExecutor as RustHTEX

    with tempfile.TemporaryDirectory() as d:
        ex: Any
        if kind == "threads":
            ex = ThreadPoolExecutor(label="bench_threads", max_threads=workers)
        else:
            cls = ParslHTEX if kind == "parsl" else RustHTEX
            ex = cls(label=f"bench_{kind}", address="127.0.0.1", max_workers_per_node=workers,
                     provider=LocalProvider(init_blocks=1, min_blocks=1, max_blocks=1))
        dfk = parsl.load(Config(executors=[ex], run_dir=d, strategy="none", initialize_logging=log))
        try:
            app = parsl.python_app(noop, executors=[ex.label])
            app(0).result(timeout=120)  # the pool has registered
            if pin:
                pin_submit_side()
            [f.result() for f in [app(i) for i in range(min(1000, tasks))]]  # warm
            t = time.perf_counter()
            futs = [app(i) for i in range(tasks)]
            for f in futs:
                f.result()
            return tasks / (time.perf_counter() - t)
        finally:
            dfk.cleanup()
            parsl.clear()


def measure(kind: str, log: bool, args: argparse.Namespace) -> float:
    # htex_rs_normal: the same build with its threads and pools under the normal policy;
    # every other kind runs with the variable unset, whatever the caller's environment.
    env = {k: v for k, v in os.environ.items() if k != "HTEX_RS_SCHED_BATCH"}
    if kind == "htex_rs_normal":
        env["HTEX_RS_SCHED_BATCH"] = "0"
    cmd = [sys.executable, os.path.abspath(__file__), "--one", kind.removesuffix("_normal"),
           "--log", "on" if log else "off", "--tasks", str(args.tasks), "--workers", str(args.workers)]
    cmd += ["--pin"] if args.pin else []
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False, env=env,
                         cwd=os.path.dirname(os.path.abspath(__file__)))
    if out.returncode != 0:
        raise RuntimeError(f"{kind} (log {log}) failed:\n{out.stderr[-3000:]}")
    return float(out.stdout.strip().splitlines()[-1])


def table(med: dict[str, dict[str, float]], ratio: dict[str, float]) -> str:
    rows = ["| parsl.log | DFK ceiling | Parsl HTEX | htex_rs | htex_rs / ceiling | htex_rs / Parsl "
            "| htex_rs, SCHED_BATCH off | its / ceiling |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, _ in LOGS:
        m = med[name]
        rows.append(f"| {name} | {m['threads']:,.0f}/s | {m['parsl']:,.0f}/s | {m['htex_rs']:,.0f}/s | "
                    f"{ratio[name]:.2f} | {ratio[name + '_parsl']:.1f}x | {m['htex_rs_normal']:,.0f}/s | "
                    f"{ratio[name + '_normal']:.2f} |")
    return "\n".join(rows)


def plot(med: dict[str, dict[str, float]], ratio: dict[str, float], dst: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for i, kind in enumerate(KINDS):
        xs = [j + (i - 1.5) * 0.21 for j in range(len(LOGS))]
        ax.bar(xs, [med[name][kind] for name, _ in LOGS], 0.21, label=NAMES[kind])
    ax.set_xticks(range(len(LOGS)), [f"parsl.log {name}\nhtex_rs = {ratio[name]:.2f} of ceiling"
                                     for name, _ in LOGS])
    ax.set_ylabel("no-op apps / s through the DFK (median)")
    ax.set_title("DataFlowKernel path, 2 workers, same run")
    ax.legend()
    fig.tight_layout()
    fig.savefig(dst, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--tasks", type=int, default=8000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None, help="write the chart here (e.g. docs/benchmarks_dfk.png)")
    p.add_argument("--pin", action="store_true", help="submit side on CPU 0, worker pools on CPU 1")
    p.add_argument("--one", choices=KINDS[:3], help=argparse.SUPPRESS)
    p.add_argument("--log", choices=("on", "off"), default="off", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        print(one(args.one, args.log == "on", args.tasks, args.workers, args.pin))
        return
    if args.plot:
        try:  # say so now, not after the measurements
            import matplotlib  # noqa: F401
        except ImportError:
            p.error("--plot needs matplotlib: pip install 'htex_rs[bench]' (or matplotlib)")
    raw: dict[str, dict[str, list[float]]] = {name: {k: [] for k in KINDS} for name, _ in LOGS}
    ratios: dict[str, list[float]] = {}
    steps, done, t0 = args.rounds * len(LOGS) * len(KINDS), 0, time.perf_counter()
    for r in range(args.rounds):
        for name, log in LOGS:
            got = {}
            # Rotated each round, so no executor always runs after the same one.
            for kind in KINDS[r % len(KINDS):] + KINDS[:r % len(KINDS)]:
                sys.stderr.write(f"\r[{done}/{steps}, {time.perf_counter() - t0:4.0f} s] round {r + 1}/"
                                 f"{args.rounds}: {NAMES[kind]}, parsl.log {name} ...          ")
                sys.stderr.flush()
                got[kind] = measure(kind, log, args)
                raw[name][kind].append(got[kind])
                done += 1
            ratios.setdefault(name, []).append(got["htex_rs"] / got["threads"])
            ratios.setdefault(name + "_parsl", []).append(got["htex_rs"] / got["parsl"])
            ratios.setdefault(name + "_normal", []).append(got["htex_rs_normal"] / got["threads"])
    sys.stderr.write(f"\r[{done}/{steps}, {time.perf_counter() - t0:4.0f} s] done{' ' * 50}\n")
    med = {name: {k: statistics.median(v) for k, v in cell.items()} for name, cell in raw.items()}
    ratio = {k: statistics.median(v) for k, v in ratios.items()}
    print(f"{args.tasks} no-op apps, {args.workers} workers, {args.rounds} rounds (medians; ratios "
          "paired within a round)" + ("; submit side on CPU 0, pools on CPU 1" if args.pin else ""))
    print(table(med, ratio))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "raw": raw, "median": med, "paired_ratios": ratios,
                       "ratio": ratio}, f, indent=2)
    if args.plot:
        plot(med, ratio, args.plot)


if __name__ == "__main__":
    main()
