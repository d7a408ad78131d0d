"""Soak: a long run of mixed tasks with random worker kills. Samples throughput, the
submit process's RSS and open fds, and the pool's RSS over time; checks that every
submitted task ended (result or exception) and writes JSON plus a plot.

    python benches/soak.py --seconds 600 --json docs/soak.json --plot docs/soak.png
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import tempfile
import time

import psutil
from parsl.executors.high_throughput.errors import WorkerLost
from parsl.providers import LocalProvider

from htex_rs import HighThroughputExecutor


def noop(x=0):
    return x


def nap(s):
    import time
    time.sleep(s)
    return s


def fail(msg):
    raise ValueError(msg)


def echo(blob):
    return len(blob)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=600)
    p.add_argument("--in-flight", type=int, default=200)
    p.add_argument("--kill-every", type=float, default=5.0)
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None)
    a = p.parse_args()
    me = psutil.Process()
    rng = random.Random(1)
    with tempfile.TemporaryDirectory() as d:
        ex = HighThroughputExecutor(label="soak", address="127.0.0.1", max_workers_per_node=2, prefetch_capacity=8,
                                    heartbeat_period=2, heartbeat_threshold=10,
                                    provider=LocalProvider(init_blocks=1, max_blocks=1))
        ex.run_dir = d
        counts = {"submitted": 0, "ok": 0, "raised": 0, "worker_lost": 0, "other": 0, "kills": 0}
        samples = []
        with ex:
            ex.submit(noop, {}, 0).result(timeout=120)
            # LocalProvider detaches the pool from this process; find it by its log dir.
            pool = next(c for c in psutil.process_iter(["cmdline"])
                        if c.info["cmdline"] and "htex-rs-worker-pool" in " ".join(c.info["cmdline"])
                        and d in " ".join(c.info["cmdline"]))
            pending = set()
            t0 = last_sample = last_kill = time.monotonic()
            done_at_sample = 0

            def settle(fut) -> None:
                try:
                    fut.result()
                    counts["ok"] += 1
                except ValueError:
                    counts["raised"] += 1
                except WorkerLost:
                    counts["worker_lost"] += 1
                except Exception:
                    counts["other"] += 1

            while time.monotonic() - t0 < a.seconds:
                while len(pending) < a.in_flight:
                    r = rng.random()
                    if r < 0.6:
                        f = ex.submit(noop, {}, 1)
                    elif r < 0.8:
                        f = ex.submit(nap, {}, 0.005)
                    elif r < 0.9:
                        f = ex.submit(fail, {}, "expected")
                    else:
                        f = ex.submit(echo, {}, os.urandom(rng.choice([1000, 100_000])))
                    pending.add(f)
                    counts["submitted"] += 1
                for f in [f for f in pending if f.done()]:
                    settle(f)
                    pending.discard(f)
                now = time.monotonic()
                if now - last_kill >= a.kill_every:
                    workers = [c for c in pool.children() if "htex_rs.worker" in " ".join(c.cmdline())]
                    if workers:
                        os.kill(rng.choice(workers).pid, signal.SIGKILL)
                        counts["kills"] += 1
                    last_kill = now
                if now - last_sample >= 5:
                    done = counts["ok"] + counts["raised"] + counts["worker_lost"] + counts["other"]
                    samples.append({"t": round(now - t0, 1),
                                    "throughput": (done - done_at_sample) / (now - last_sample),
                                    "rss_mib": me.memory_info().rss / 2**20, "fds": me.num_fds(),
                                    "pool_rss_mib": pool.memory_info().rss / 2**20, "pool_fds": pool.num_fds()})
                    done_at_sample, last_sample = done, now
                    s = samples[-1]
                    print(f"t={s['t']:6.0f}s {s['throughput']:7.0f} tasks/s rss={s['rss_mib']:.0f}MiB "
                          f"fds={s['fds']} pool_rss={s['pool_rss_mib']:.0f}MiB pool_fds={s['pool_fds']}", flush=True)
                time.sleep(0.001)
            for f in pending:
                f.exception(timeout=120)
                settle(f)
    ended = counts["ok"] + counts["raised"] + counts["worker_lost"] + counts["other"]
    counts["lost"] = counts["submitted"] - ended
    print(json.dumps(counts))
    if a.json:
        json.dump({"counts": counts, "samples": samples}, open(a.json, "w"), indent=1)
    if a.plot and samples:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(1, 3, figsize=(13, 3.5))
        t = [s["t"] for s in samples]
        ax[0].plot(t, [s["throughput"] for s in samples])
        ax[0].set_title("tasks/s (5 s windows)")
        ax[1].plot(t, [s["rss_mib"] for s in samples], label="submit process")
        ax[1].plot(t, [s["pool_rss_mib"] for s in samples], label="pool")
        ax[1].set_title("RSS MiB")
        ax[1].legend()
        ax[2].plot(t, [s["fds"] for s in samples], label="submit process")
        ax[2].plot(t, [s["pool_fds"] for s in samples], label="pool")
        ax[2].set_title("open fds")
        ax[2].legend()
        for x in ax:
            x.set_xlabel("s")
        fig.suptitle(f"soak: {counts['submitted']} tasks, {counts['kills']} worker kills, {counts['lost']} lost")
        fig.tight_layout()
        fig.savefig(a.plot, dpi=100)


if __name__ == "__main__":
    main()
