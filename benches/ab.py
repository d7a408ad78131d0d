"""A/B of two htex_rs builds, each side by side with Parsl's HTEX: is a change no worse
than the code before it? Runs ``compare.py --no-dfk --rounds 1`` alternately with this
checkout and with an older build, so machine drift hits both alike, and prints the
medians of each build's ratios to Parsl.

    git worktree add /tmp/old <rev> && (cd /tmp/old && maturin build --release -o /tmp/old/dist)
    mkdir -p /tmp/old/site && pip install --no-deps --target /tmp/old/site /tmp/old/dist/*.whl
    python benches/ab.py --old-site /tmp/old/site --rounds 3 --prefetch 0 64

Or B is this same build with other settings, ``--old-env HTEX_RS_SCHED_BATCH=0`` (each
``KEY=VALUE`` set for the B side only, its pools included, without ``--old-site``).

The older build's pools must be the older code too: a wrapper ``htex-rs-worker-pool`` that
runs ``python -m htex_rs.worker_pool`` is put first on PATH, with PYTHONPATH set to the
older package (its workers inherit both).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


def old_env(site: str, bindir: str) -> dict[str, str]:
    wrapper = os.path.join(bindir, "htex-rs-worker-pool")
    with open(wrapper, "w") as f:
        f.write(f"#!/bin/sh\nexec {sys.executable} -m htex_rs.worker_pool \"$@\"\n")
    os.chmod(wrapper, 0o755)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (site, env.get("PYTHONPATH")) if p)
    env["PATH"] = bindir + os.pathsep + env["PATH"]
    return env


def one_round(env: dict[str, str], prefetch: int, tasks: int, latency_tasks: int) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        subprocess.run([sys.executable, os.path.join(HERE, "compare.py"), "--no-dfk", "--rounds", "1",
                        "--prefetch", str(prefetch), "--tasks", str(tasks),
                        "--latency-tasks", str(latency_tasks), "--json", out.name],
                       env=env, check=True, stderr=subprocess.DEVNULL)
        return json.load(open(out.name))["median"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--old-site", help="a directory holding the older htex_rs package")
    p.add_argument("--old-env", nargs="+", default=[], metavar="KEY=VALUE",
                   help="environment for the B side only (without --old-site: this build, other settings)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--prefetch", type=int, nargs="+", default=[0, 64])
    p.add_argument("--tasks", type=int, default=10000)
    p.add_argument("--latency-tasks", type=int, default=500)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if not args.old_site and not args.old_env:
        p.error("give --old-site (an older build) or --old-env (this build, other settings)")
    if any("=" not in kv for kv in args.old_env):
        p.error("--old-env takes KEY=VALUE pairs, e.g. HTEX_RS_SCHED_BATCH=0")
    old = (old_env(os.path.abspath(args.old_site), tempfile.mkdtemp(prefix="htex-rs-ab-"))
           if args.old_site else dict(os.environ))
    old.update(kv.split("=", 1) for kv in args.old_env)
    # The A side runs with those variables unset, whatever the caller exported.
    new = {k: v for k, v in os.environ.items() if k not in {kv.split("=", 1)[0] for kv in args.old_env}}
    envs = {"new": new, "old": old}
    raw: dict = {}
    for r in range(args.rounds):
        for pf in args.prefetch:
            for build, env in envs.items():
                m = one_round(env, pf, args.tasks, args.latency_tasks)
                ratios = {"throughput x Parsl": m["htex_rs"]["throughput"] / m["parsl"]["throughput"],
                          "latency fraction of Parsl": m["htex_rs"]["lat_median_ms"] / m["parsl"]["lat_median_ms"],
                          "throughput": m["htex_rs"]["throughput"],
                          "throughput unencrypted": m["htex_rs"]["throughput_unencrypted"],
                          "lat_median_ms": m["htex_rs"]["lat_median_ms"],
                          "parsl throughput": m["parsl"]["throughput"],
                          "parsl lat_median_ms": m["parsl"]["lat_median_ms"]}
                for k, v in ratios.items():
                    raw.setdefault(str(pf), {}).setdefault(build, {}).setdefault(k, []).append(v)
                print(f"round {r + 1} prefetch {pf} {build}: " + ", ".join(f"{k}={v:.4g}" for k, v in ratios.items()),
                      file=sys.stderr, flush=True)
    med = {pf: {b: {k: statistics.median(v) for k, v in d.items()} for b, d in builds.items()}
           for pf, builds in raw.items()}
    for pf, builds in med.items():
        print(f"\nprefetch_capacity={pf}, {args.rounds} rounds, medians")
        keys = list(next(iter(builds.values())))
        print(f"{'':<28}" + "".join(f"{b:>12}" for b in builds))
        for k in keys:
            print(f"{k:<28}" + "".join(f"{builds[b][k]:>12.4g}" for b in builds))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "raw": raw, "median": med}, f, indent=2)


if __name__ == "__main__":
    main()
