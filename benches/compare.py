"""Side-by-side benchmark: htex_rs vs Parsl's HighThroughputExecutor, same machine,
same run, same worker count. Prints the figures and their ratios, writes JSON.

    python benches/compare.py --rounds 3 --tasks 20000 --json docs/benchmarks.json

Measures, per executor, interleaved over rounds (medians reported):
  * no-op throughput via ``executor.submit`` (submit N, wait for all);
  * one-at-a-time round-trip latency (median, p99);
  * throughput through the DataFlowKernel (parsl-perf style ``@python_app``);
  * the same throughput with encryption off, for the encrypted/unencrypted ratio.

With ``--mixed`` it measures scheduling instead, on tasks of mixed lengths:

    python benches/compare.py --mixed --rounds 3 --json docs/benchmarks_mixed.json

  * makespan of a shuffled mix (10% 100 ms, 90% 1 ms sleeps) at prefetch 0, 16 and 64;
  * prefetch 16, 2 workers: one 4 s task, then 30 of 20 ms: when the last short one ends;
  * 1 worker, prefetch 4: a 1 ms task queued with a 3 s task: when the 1 ms result arrives;
  * 1 worker, prefetch 8: a task that kills its worker, 6 quick tasks behind it: how many
    of the 6 complete.

With ``--monitoring`` it measures what monitoring costs the executor, as a Globus Compute
endpoint in monitored mode runs it (``executor.monitoring_messages`` a spawn-context
multiprocessing queue, drained by a thread):

    python benches/compare.py --monitoring --rounds 3 --json docs/benchmarks_monitoring.json

  * no-op throughput with monitoring off and on, prefetch 0 and 64, and the on/off ratio;
  * NODE_INFO messages per 1,000 tasks with monitoring on.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any, Callable

import parsl
from parsl.config import Config
from parsl.executors import HighThroughputExecutor as ParslHTEX
from parsl.executors.threads import ThreadPoolExecutor
from parsl.providers import LocalProvider

from htex_rs import HighThroughputExecutor as RustHTEX

KINDS: dict[str, Callable[..., Any]] = {"parsl": ParslHTEX, "htex_rs": RustHTEX}


def noop(x: int = 0) -> int:
    return x


def nap(seconds: float) -> None:
    import time
    time.sleep(seconds)


def kill_own_worker() -> None:
    import os
    import signal
    os.kill(os.getpid(), signal.SIGKILL)


def make(kind: str, run_dir: str, workers: int, encrypted: bool, prefetch: int) -> Any:
    ex = KINDS[kind](label=f"bench_{kind}", address="127.0.0.1", max_workers_per_node=workers,
                     encrypted=encrypted, prefetch_capacity=prefetch,
                     provider=LocalProvider(init_blocks=1, min_blocks=1, max_blocks=1))
    ex.run_dir = run_dir
    ex.provider.script_dir = os.path.join(run_dir, "scripts")
    os.makedirs(ex.provider.script_dir, exist_ok=True)
    return ex


def start(ex: Any) -> None:
    ex.start()
    ex.scale_out_facade(1)
    ex.submit(noop, {}, 0).result(timeout=120)  # wait for the pool to register


def stop(ex: Any) -> None:
    ex.scale_in_facade(1)
    ex.shutdown()


def throughput(ex: Any, n: int) -> float:
    t = time.perf_counter()
    futs = [ex.submit(noop, {}, i) for i in range(n)]
    for f in futs:
        f.result()
    return n / (time.perf_counter() - t)


def latency(ex: Any, n: int) -> tuple[float, float]:
    lat = []
    for i in range(n):
        t = time.perf_counter()
        ex.submit(noop, {}, i).result()
        lat.append(time.perf_counter() - t)
    lat.sort()
    return statistics.median(lat) * 1e3, lat[int(0.99 * (len(lat) - 1))] * 1e3


def direct_round(kind: str, args: argparse.Namespace, encrypted: bool) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as d:
        ex = make(kind, d, args.workers, encrypted, args.prefetch)
        start(ex)
        try:
            throughput(ex, min(2000, args.tasks))  # warm-up
            out = {"throughput": throughput(ex, args.tasks)}
            if encrypted:
                out["lat_median_ms"], out["lat_p99_ms"] = latency(ex, args.latency_tasks)
            return out
        finally:
            stop(ex)


def dfk_round(kind: str, args: argparse.Namespace, log: bool) -> float:
    """parsl-perf style: N @python_app no-ops through the DataFlowKernel. With ``log``
    the Config default (DEBUG parsl.log, as parsl-perf runs it); without, executor-bound."""
    with tempfile.TemporaryDirectory() as d:
        if kind == "threads":  # the DFK's own ceiling: no executor hop at all
            ex: Any = ThreadPoolExecutor(label="bench_threads", max_threads=args.workers)
        else:
            ex = make(kind, d, args.workers, True, args.prefetch)
        dfk = parsl.load(Config(executors=[ex], run_dir=d, strategy="none", initialize_logging=log))
        try:
            app = parsl.python_app(noop, executors=[ex.label])
            app(0).result()
            [f.result() for f in [app(i) for i in range(min(1000, args.dfk_tasks))]]
            t = time.perf_counter()
            futs = [app(i) for i in range(args.dfk_tasks)]
            for f in futs:
                f.result()
            return args.dfk_tasks / (time.perf_counter() - t)
        finally:
            dfk.cleanup()
            parsl.clear()


def with_executor(kind: str, workers: int, prefetch: int, body: Callable[[Any], Any]) -> Any:
    with tempfile.TemporaryDirectory() as d:
        ex = make(kind, d, workers, False, prefetch)
        start(ex)
        try:
            for f in [ex.submit(nap, {}, 0.2) for _ in range(workers)]:
                f.result(timeout=120)  # every worker up
            return body(ex)
        finally:
            stop(ex)


def makespan(ex: Any, lengths: list[float]) -> float:
    t = time.perf_counter()
    for f in [ex.submit(nap, {}, s) for s in lengths]:
        f.result(timeout=600)
    return time.perf_counter() - t


def short_beside_long(ex: Any) -> float:
    """Seconds from submitting a 4 s task and 30 of 20 ms until the last short one ends."""
    t = time.perf_counter()
    long = ex.submit(nap, {}, 4.0)
    shorts = [ex.submit(nap, {}, 0.02) for _ in range(30)]
    for f in shorts:
        f.result(timeout=120)
    done = time.perf_counter() - t
    long.result(timeout=120)
    return done


def quick_result_beside_slow(ex: Any) -> float:
    """Seconds until a 1 ms task's result arrives when a 3 s task is queued with it."""
    t = time.perf_counter()
    fast = ex.submit(nap, {}, 0.001)
    slow = ex.submit(nap, {}, 3.0)
    fast.result(timeout=120)
    done = time.perf_counter() - t
    slow.result(timeout=120)
    return done


def survivors_of_a_killer(ex: Any) -> float:
    """Of 6 quick tasks queued behind a task that kills its worker, how many complete."""
    killer = ex.submit(kill_own_worker, {})
    quick = [ex.submit(nap, {}, 0.001) for _ in range(6)]
    ok = 0
    for f in [killer, *quick]:
        try:
            f.result(timeout=120)
            ok += f is not killer
        except Exception:
            pass
    return float(ok)


def monitored_throughput(kind: str, args: argparse.Namespace, prefetch: int, monitored: bool) -> tuple[float, float]:
    """(tasks/s, NODE_INFO messages per 1,000 tasks) for one executor."""
    import multiprocessing
    import threading

    from parsl.monitoring.message_type import MessageType
    with tempfile.TemporaryDirectory() as d:
        ex = make(kind, d, args.workers, True, prefetch)
        nodes = [0]
        q = multiprocessing.get_context("spawn").Queue() if monitored else None
        watcher = None
        if q is not None:
            ex.monitoring_messages = q

            def watch() -> None:  # as GlobusComputeEngine.monitor_watcher reads it
                while (msg := q.get()) is not None:
                    if msg[0] == MessageType.NODE_INFO:
                        nodes[0] += 1
            watcher = threading.Thread(target=watch, daemon=True)
            watcher.start()
        start(ex)
        try:
            throughput(ex, min(2000, args.tasks))  # warm-up
            before = nodes[0]
            rate = throughput(ex, args.tasks)
            time.sleep(0.5)  # reports of the last tasks
            return rate, (nodes[0] - before) * 1000 / args.tasks
        finally:
            stop(ex)
            if q is not None:
                q.put(None)
                assert watcher is not None
                watcher.join(timeout=30)


def monitoring_main(args: argparse.Namespace) -> None:
    raw: dict[str, dict[str, list[float]]] = {k: {} for k in KINDS}
    for r in range(args.rounds):
        for pf in (0, 64):
            for kind in KINDS:
                for monitored in (False, True):
                    rate, per_k = monitored_throughput(kind, args, pf, monitored)
                    key = f"pf{pf} {'on' if monitored else 'off'}"
                    raw[kind].setdefault(key, []).append(rate)
                    if monitored:
                        raw[kind].setdefault(f"pf{pf} NODE_INFO per 1000 tasks", []).append(per_k)
                    print(f"round {r + 1}/{args.rounds} {kind} {key}: {rate:.0f} tasks/s"
                          + (f", {per_k:.1f} NODE_INFO per 1000 tasks" if monitored else ""),
                          file=sys.stderr, flush=True)
    med = {k: {m: statistics.median(v) for m, v in d.items()} for k, d in raw.items()}
    print(f"\n{args.workers} workers, {args.tasks} no-op tasks, {args.rounds} rounds, medians")
    print(f"{'':<12}{'parsl off':>11}{'parsl on':>10}{'on/off':>8}{'nodes/1k':>10}"
          f"{'htex_rs off':>13}{'htex_rs on':>12}{'on/off':>8}{'nodes/1k':>10}")
    ratios = {}
    for pf in (0, 64):
        row = f"prefetch {pf:<3}"
        for kind in KINDS:
            off, on = med[kind][f"pf{pf} off"], med[kind][f"pf{pf} on"]
            ratios[f"{kind} pf{pf} on/off"] = on / off
            row += f"{off:>11.0f}{on:>10.0f}{on / off:>8.3f}{med[kind][f'pf{pf} NODE_INFO per 1000 tasks']:>10.1f}"
        print(row)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "raw": raw, "median": med, "ratios": ratios}, f, indent=2)


def mixed_main(args: argparse.Namespace) -> None:
    import random
    rng = random.Random(6)
    lengths = [0.1 if i % 10 == 0 else 0.001 for i in range(args.mixed_tasks)]
    rng.shuffle(lengths)
    cases: list[tuple[str, int, int, Callable[[Any], float]]] = [
        (f"mixed makespan s, prefetch {pf}", args.workers, pf, lambda ex: makespan(ex, lengths))
        for pf in (0, 16, 64)
    ] + [
        ("last short task beside a 4 s one, s (prefetch 16)", 2, 16, short_beside_long),
        ("1 ms result beside a 3 s task, s (1 worker, prefetch 4)", 1, 4, quick_result_beside_slow),
        ("tasks of 6 done behind a worker killer (1 worker, prefetch 8)", 1, 8, survivors_of_a_killer),
    ]
    raw: dict[str, dict[str, list[float]]] = {k: {} for k in KINDS}
    for r in range(args.rounds):
        for name, workers, pf, body in cases:
            for kind in KINDS:  # side by side, case by case
                v = with_executor(kind, workers, pf, body)
                raw[kind].setdefault(name, []).append(v)
                print(f"round {r + 1}/{args.rounds} {kind}: {name} = {v:.4g}", file=sys.stderr, flush=True)
    med = {k: {m: statistics.median(v) for m, v in d.items()} for k, d in raw.items()}
    print(f"\n{args.workers} workers unless stated, {args.mixed_tasks} mixed tasks "
          f"(10% 100 ms, 90% 1 ms), {args.rounds} rounds, medians")
    print(f"{'case':<64}{'parsl':>9}{'htex_rs':>9}{'ratio':>8}")
    ratios = {}
    for name, *_ in cases:
        a, b = med["parsl"][name], med["htex_rs"][name]
        ratios[name] = b / a if a else float("nan")
        print(f"{name:<64}{a:>9.4g}{b:>9.4g}{ratios[name]:>8.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "raw": raw, "median": med, "ratios": ratios}, f, indent=2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tasks", type=int, default=20000)
    p.add_argument("--dfk-tasks", type=int, default=5000)
    p.add_argument("--latency-tasks", type=int, default=1000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--prefetch", type=int, default=0)
    p.add_argument("--json", default=None)
    p.add_argument("--no-dfk", action="store_true", help="only the executor.submit figures (for benches/ab.py)")
    p.add_argument("--mixed", action="store_true", help="the mixed-length scheduling cases instead")
    p.add_argument("--mixed-tasks", type=int, default=600)
    p.add_argument("--monitoring", action="store_true", help="throughput with monitoring on and off instead")
    args = p.parse_args()
    if args.mixed:
        mixed_main(args)
        return
    if args.monitoring:
        monitoring_main(args)
        return

    raw: dict[str, dict[str, list[float]]] = {k: {} for k in KINDS}
    raw["threads"] = {}
    for r in range(args.rounds):
        for kind in KINDS:  # interleaved so drift hits both alike
            for enc in (True, False):
                res = direct_round(kind, args, enc)
                suffix = "" if enc else "_unencrypted"
                for key, v in res.items():
                    raw[kind].setdefault(key + suffix, []).append(v)
            if not args.no_dfk:
                raw[kind].setdefault("dfk_throughput", []).append(dfk_round(kind, args, True))
                raw[kind].setdefault("dfk_throughput_nolog", []).append(dfk_round(kind, args, False))
            print(f"round {r + 1}/{args.rounds} {kind}: " + ", ".join(
                f"{k}={v[-1]:.4g}" for k, v in raw[kind].items()), file=sys.stderr, flush=True)

        if not args.no_dfk:
            raw["threads"].setdefault("dfk_throughput", []).append(dfk_round("threads", args, True))
            raw["threads"].setdefault("dfk_throughput_nolog", []).append(dfk_round("threads", args, False))
    if args.no_dfk:
        if args.json:
            med = {k: {m: statistics.median(v) for m, v in d.items()} for k, d in raw.items() if d}
            with open(args.json, "w") as f:
                json.dump({"args": vars(args), "raw": raw, "median": med}, f, indent=2)
        return

    med = {k: {m: statistics.median(v) for m, v in d.items()} for k, d in raw.items()}
    p_, r_ = med["parsl"], med["htex_rs"]
    ratios = {
        "throughput (x Parsl)": r_["throughput"] / p_["throughput"],
        "latency median (fraction of Parsl)": r_["lat_median_ms"] / p_["lat_median_ms"],
        "latency p99 (fraction of Parsl)": r_["lat_p99_ms"] / p_["lat_p99_ms"],
        "DFK throughput, parsl.log on (x Parsl)": r_["dfk_throughput"] / p_["dfk_throughput"],
        "DFK throughput, logging off (x Parsl)": r_["dfk_throughput_nolog"] / p_["dfk_throughput_nolog"],
        "htex_rs encrypted / unencrypted": r_["throughput"] / r_["throughput_unencrypted"],
        "parsl encrypted / unencrypted": p_["throughput"] / p_["throughput_unencrypted"],
    }
    print(f"\n{args.workers} workers, prefetch_capacity={args.prefetch}, {args.rounds} rounds, medians")
    print(f"{'metric':<34}{'parsl':>12}{'htex_rs':>12}")
    for m in ("throughput", "throughput_unencrypted", "dfk_throughput", "dfk_throughput_nolog",
              "lat_median_ms", "lat_p99_ms"):
        print(f"{m:<34}{p_[m]:>12.4g}{r_[m]:>12.4g}")
    t_ = med["threads"]
    print(f"DFK ceiling with ThreadPoolExecutor: {t_['dfk_throughput']:.4g}/s (parsl.log on), "
          f"{t_['dfk_throughput_nolog']:.4g}/s (off)")
    print()
    for k, v in ratios.items():
        print(f"{k:<40}{v:>8.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "raw": raw, "median": med, "ratios": ratios}, f, indent=2)


if __name__ == "__main__":
    main()
