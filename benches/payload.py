"""Large-argument throughput: htex_rs beside Parsl's HTEX and ``concurrent.futures.ProcessPoolExecutor``.

    python benches/payload.py --rounds 3 --out docs/benchmarks_payload.json

Each executor has ``--workers`` workers (default 2) and is driven directly, no DFK: the two
HTEXes through ``executor.submit(fn, {}, arg)`` (made and started as compare.py makes them:
one LocalProvider block on 127.0.0.1, prefetch ``--prefetch``, unencrypted unless
``--encrypted``), the pool through ``pool.submit(fn, arg)``. The argument is a ``bytes``
object or a numpy ``uint8`` array (``--kinds``) of each of ``--sizes`` MB (MB = 10**6
bytes). The task returns ``len(x)``, so only the argument is large and the result
crossing back is a small int; with ``--echo`` it returns ``x`` itself, large both ways.

Per (executor, kind, size) a fresh process (this file, ``--one``) starts the executor,
runs ``--warmup`` tasks, then submits N tasks (``--total-mb`` / size, at least 4) keeping
at most ``2 * workers`` outstanding (memory stays bounded at 100 MB), waits for all and
reports MB/s = size * N / elapsed (the argument's bytes only, also with ``--echo``). Every
(kind, size) runs each executor in turn, the order rotated every round so drift hits all
alike; medians over ``--rounds`` are printed with htex_rs / ProcessPool and htex_rs /
Parsl, and ``--out`` writes the record (commit, date, machine, versions, arguments, every
measurement).

With ``--site DIR`` the htex_rs side also runs an older build installed in DIR (as
benches/ab.py's ``--old-site``: PYTHONPATH and an ``htex-rs-worker-pool`` wrapper first
on PATH, so its pools are the older code too), beside this build:

    python benches/payload.py --site /tmp/old/site --sizes 10 100
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator, NamedTuple, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
MB = 1_000_000
EXECUTORS = ("htex_rs", "parsl", "processpool")
KINDS = ("bytes", "numpy")
RESULT = "RESULT "  # the line a --one process reports on

Submit = Callable[[Any], "concurrent.futures.Future[Any]"]


# ------------------------------------------------------------------ the tasks
def length(x: Any) -> int:
    """The task by default: the argument's length, a small result."""
    return len(x)


def echo(x: Any) -> Any:
    """The task with ``--echo``: the argument itself, as large back as it went."""
    return x


# ------------------------------------------------------------------ one measurement (--one)
def make_payload(kind: str, size_mb: float) -> Any:
    """A ``bytes`` object or a numpy ``uint8`` array of ``size_mb`` MB, random bytes."""
    import numpy as np

    arr = np.random.default_rng(0).integers(0, 256, int(size_mb * MB), dtype=np.uint8)
    return arr.tobytes() if kind == "bytes" else arr


@contextmanager
def executor(name: str, fn: Callable[[Any], Any], args: argparse.Namespace) -> Iterator[Submit]:
    """A started executor of ``name``, as a function submitting ``fn(arg)``; stopped after."""
    if name == "processpool":
        with concurrent.futures.ProcessPoolExecutor(max_workers=args.workers) as pool:
            yield lambda arg: pool.submit(fn, arg)
        return
    import attack  # benches/: this file's directory is sys.path[0]
    import compare

    # compare.start's first task is compare.noop, which the workers unpickle by name: they
    # inherit this process's environment. Last on the path: a --site build stays first.
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), HERE) if p)
    with tempfile.TemporaryDirectory(prefix="payload-") as d:
        ex = compare.make(name, d, args.workers, args.encrypted, args.prefetch)
        try:
            compare.start(ex)
            yield lambda arg: ex.submit(fn, {}, arg)
        finally:
            attack.stop(ex)  # shutdown, then the provider cancels the block


def check(done: set[concurrent.futures.Future[Any]], size: int) -> None:
    """Each result is the argument's length, or (``--echo``) something of that length."""
    for f in done:
        r = f.result()
        got = r if isinstance(r, int) else len(r)
        if got != size:
            raise RuntimeError(f"a task returned {got}, not {size}")


def drive(submit: Submit, arg: Any, n: int, window: int) -> float:
    """Seconds to run ``n`` tasks on ``arg``, at most ``window`` outstanding at a time."""
    size = len(arg)
    t = time.perf_counter()
    pending: set[concurrent.futures.Future[Any]] = set()
    for _ in range(n):
        if len(pending) >= window:
            done, pending = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
            check(done, size)
        pending.add(submit(arg))
    check(concurrent.futures.wait(pending).done, size)
    return time.perf_counter() - t


def htex_rs_build() -> Optional[dict[str, str]]:
    """Which htex_rs this process imported (None if it imported none)."""
    mod = sys.modules.get("htex_rs")
    if mod is None:
        return None
    return {"version": str(getattr(mod, "__version__", "?")), "file": str(getattr(mod, "__file__", "?"))}


def one(args: argparse.Namespace) -> dict[str, Any]:
    """One (executor, kind, size) measurement in this process."""
    arg = make_payload(args.one_kind, args.one_size)
    t0 = time.perf_counter()
    with executor(args.one, echo if args.echo else length, args) as submit:
        started = time.perf_counter() - t0
        window = 2 * args.workers
        warm = drive(submit, arg, args.warmup, window) if args.warmup else 0.0
        seconds = drive(submit, arg, args.one_tasks, window)
    return {"mb_per_s": len(arg) * args.one_tasks / MB / seconds, "seconds": seconds, "warmup_s": warm,
            "startup_s": started, "total_s": time.perf_counter() - t0, "htex_rs": htex_rs_build()}


# ------------------------------------------------------------------ the side-by-side run
class Column(NamedTuple):
    label: str
    executor: str
    env: dict[str, str]


def columns(site: Optional[str], bindir: str) -> list[Column]:
    """The table's columns: htex_rs (and, with ``site``, the build there), Parsl, the pool."""
    here = dict(os.environ)
    if site is None:
        return [Column("htex_rs", "htex_rs", here), Column("parsl", "parsl", here),
                Column("processpool", "processpool", here)]
    import ab  # benches/ab.py: PYTHONPATH and the worker-pool wrapper

    return [Column("htex_rs (this build)", "htex_rs", here),
            Column("htex_rs (--site)", "htex_rs", ab.old_env(site, bindir)),
            Column("parsl", "parsl", here), Column("processpool", "processpool", here)]


def tasks_for(size_mb: float, total_mb: float) -> int:
    return max(4, round(total_mb / size_mb))


def measure(col: Column, kind: str, size_mb: float, n: int, args: argparse.Namespace) -> dict[str, Any]:
    """Run ``--one`` in a subprocess with the column's environment: its report, or an error."""
    cmd = [sys.executable, os.path.abspath(__file__), "--one", col.executor, "--one-kind", kind,
           "--one-size", repr(size_mb), "--one-tasks", str(n), "--workers", str(args.workers),
           "--warmup", str(args.warmup), "--prefetch", str(args.prefetch)]
    cmd += ["--echo"] * args.echo + ["--encrypted"] * args.encrypted
    t = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=col.env, capture_output=True, text=True, timeout=args.timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"no result in {args.timeout:g} s", "wall_s": time.perf_counter() - t}
    wall = time.perf_counter() - t
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT)]
    if proc.returncode != 0 or not lines:
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
        return {"error": f"rc {proc.returncode}: {tail}", "wall_s": wall}
    return {**json.loads(lines[-1][len(RESULT):]), "wall_s": wall}


def rotated(cols: list[Column], r: int) -> list[Column]:
    k = r % len(cols)
    return cols[k:] + cols[:k]


def run_all(cols: list[Column], args: argparse.Namespace) -> list[dict[str, Any]]:
    runs: list[dict[str, Any]] = []
    for r in range(args.rounds):
        for kind in args.kinds:
            for size in args.sizes:
                n = tasks_for(size, args.total_mb)
                for col in rotated(cols, r):
                    res = measure(col, kind, size, n, args)
                    runs.append({"round": r, "column": col.label, "executor": col.executor, "kind": kind,
                                 "size_mb": size, "tasks": n, **res})
                    print(f"round {r + 1}/{args.rounds} {kind} {size:g} MB x {n} {col.label}: " + (
                        f"{res['mb_per_s']:.1f} MB/s ({res['seconds']:.2f} s; {res['wall_s']:.1f} s with "
                        f"start-up {res['startup_s']:.1f} s and warm-up {res['warmup_s']:.2f} s)"
                        if "error" not in res else f"FAILED {res['error']}"), file=sys.stderr, flush=True)
    return runs


def size_key(size_mb: float) -> str:
    return f"{size_mb:g}"


def medians(runs: list[dict[str, Any]], labels: list[str]) -> dict[str, dict[str, dict[str, Optional[float]]]]:
    """MB/s medians of the rounds that succeeded: kind -> size -> column (None: none did)."""
    med: dict[str, dict[str, dict[str, Optional[float]]]] = {}
    for run in runs:
        med.setdefault(run["kind"], {}).setdefault(size_key(run["size_mb"]), {})
    for kind, sizes in med.items():
        for size, cells in sizes.items():
            for label in labels:
                ok = [r["mb_per_s"] for r in runs if r["kind"] == kind and size_key(r["size_mb"]) == size
                      and r["column"] == label and "error" not in r]
                cells[label] = statistics.median(ok) if ok else None
    return med


def ratio_names(labels: list[str]) -> list[tuple[str, str, str]]:
    """(name, numerator, denominator) of each ratio: every htex_rs column over the pool and Parsl."""
    short = {"htex_rs": "htex_rs", "htex_rs (this build)": "this", "htex_rs (--site)": "site"}
    out = [(f"{short[h]}/{d}", h, d) for h in labels if h in short for d in ("processpool", "parsl")]
    if "htex_rs (--site)" in labels:
        out.append(("this/site", "htex_rs (this build)", "htex_rs (--site)"))
    return out


def ratios(med: dict[str, dict[str, dict[str, Optional[float]]]],
           labels: list[str]) -> dict[str, dict[str, dict[str, Optional[float]]]]:
    out: dict[str, dict[str, dict[str, Optional[float]]]] = {}
    for kind, sizes in med.items():
        for size, cells in sizes.items():
            row = out.setdefault(kind, {}).setdefault(size, {})
            for name, num, den in ratio_names(labels):
                a, b = cells.get(num), cells.get(den)
                row[name] = a / b if a is not None and b else None
    return out


def cell(v: Optional[float], width: int, fmt: str) -> str:
    return f"{'-' if v is None else format(v, fmt):>{width}}"


def table(med: dict[str, dict[str, dict[str, Optional[float]]]], rat: dict[str, dict[str, dict[str, Optional[float]]]],
          labels: list[str], args: argparse.Namespace) -> str:
    names = [(n, max(10, len(n) + 2)) for n, _, _ in ratio_names(labels)]
    cols = [(lb, max(12, len(lb) + 2)) for lb in labels]
    rows = [f"{'kind':<7}{'MB':>6}{'tasks':>7}" + "".join(f"{lb:>{w}}" for lb, w in cols)
            + "".join(f"{n:>{w}}" for n, w in names)]
    for kind, sizes in med.items():
        for size, cells in sizes.items():
            n = tasks_for(float(size), args.total_mb)
            rows.append(f"{kind:<7}{size:>6}{n:>7}" + "".join(cell(cells[lb], w, ".1f") for lb, w in cols)
                        + "".join(cell(rat[kind][size][n], w, ".3f") for n, w in names))
    return "\n".join(rows)


def environment() -> dict[str, Any]:
    """attack.py's record (commit, date, host, versions), with numpy, memory and the pool's start method."""
    import attack
    import numpy as np

    env = attack.environment()
    env["versions"]["numpy"] = np.__version__
    env["host"]["memory_gb"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    env["processpool_start_method"] = multiprocessing.get_start_method()
    return env


def site_notes(runs: list[dict[str, Any]], site: Optional[str]) -> list[str]:
    """A line for every htex_rs measurement that imported another build than its column says."""
    notes = []
    for r in runs:
        build = r.get("htex_rs") if r["executor"] == "htex_rs" else None
        if build is None:
            continue
        from_site = site is not None and os.path.abspath(build["file"]).startswith(os.path.abspath(site) + os.sep)
        if from_site != (r["column"] == "htex_rs (--site)"):
            notes.append(f"note: {r['column']} round {r['round'] + 1} imported htex_rs from {build['file']}")
    return notes


def main_all(args: argparse.Namespace) -> None:
    env = environment()
    with tempfile.TemporaryDirectory(prefix="payload-bin-") as bindir:
        cols = columns(os.path.abspath(args.site) if args.site else None, bindir)
        runs = run_all(cols, args)
    labels = [c.label for c in cols]
    med = medians(runs, labels)
    rat = ratios(med, labels)
    task = "echo(x), as large back" if args.echo else "len(x), a small result"
    print(f"\nMB/s of argument ({task}), {args.workers} workers, at most {2 * args.workers} outstanding, "
          f"HTEX {'encrypted' if args.encrypted else 'unencrypted'}, prefetch {args.prefetch}, "
          f"{args.rounds} round(s), medians; {os.cpu_count()} cores")
    print(table(med, rat, labels, args))
    failed = [r for r in runs if "error" in r]
    for r in failed:
        print(f"failed: round {r['round'] + 1} {r['kind']} {r['size_mb']:g} MB {r['column']}: {r['error']}")
    for line in site_notes(runs, args.site):
        print(line)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"bench": "payload", **env, "args": vars(args), "columns": labels, "rounds": runs,
                       "median": med, "ratios": rat}, f, indent=1)
        print(f"wrote {args.out}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=float, nargs="+", default=[1.0, 10.0, 100.0], help="argument sizes, MB (10**6 B)")
    p.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--total-mb", type=float, default=200.0, help="MB of arguments a measurement sends (>= 4 tasks)")
    p.add_argument("--warmup", type=int, default=2, help="tasks before the clock starts")
    p.add_argument("--echo", action="store_true", help="the task returns its argument (large both ways)")
    p.add_argument("--encrypted", action="store_true", help="both HTEXes encrypted (CURVE)")
    p.add_argument("--prefetch", type=int, default=0, help="both HTEXes' prefetch_capacity")
    p.add_argument("--site", default=None, metavar="DIR",
                   help="also run htex_rs from an older build installed in DIR (as benches/ab.py --old-site)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds one measurement may take")
    p.add_argument("--out", default=None, help="write the JSON record here")
    p.add_argument("--one", choices=EXECUTORS, help=argparse.SUPPRESS)
    p.add_argument("--one-kind", choices=KINDS, help=argparse.SUPPRESS)
    p.add_argument("--one-size", type=float, help=argparse.SUPPRESS)
    p.add_argument("--one-tasks", type=int, help=argparse.SUPPRESS)
    return p


def main() -> None:
    p = parser()
    args = p.parse_args()
    if args.workers < 1 or args.rounds < 1 or args.warmup < 0 or args.total_mb <= 0 or min(args.sizes) <= 0:
        p.error("--workers and --rounds must be at least 1, --warmup not negative, --sizes and --total-mb positive")
    if args.site and not os.path.isdir(os.path.join(args.site, "htex_rs")):
        p.error(f"--site {args.site}: no htex_rs package there")
    if args.one:
        print(RESULT + json.dumps(one(args)), flush=True)
        return
    main_all(args)


if __name__ == "__main__":
    main()
