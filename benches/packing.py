"""Packing of per-task resource requests (issue #9), htex_rs beside HyperQueue in one run.

One pool declaring 8 CPU slots (HTEX_RS_CPU_SLOTS=8; this machine may have fewer CPUs:
the tasks sleep), 20 tasks of 4 cores x 1 s and 80 of 1 core x 0.25 s, the large ones
submitted first (``--order`` interleaved or small-first for the others). Makespan: first
submit to last task end. The ideal is the work's core-seconds over the slots: (20*4*1 + 80*1*0.25) / 8 = 12.5 s.

HyperQueue (PyPI ``hyperqueue``, 0.27) runs the same tasks as ``sleep`` programs with
CPU requests on a local server and one worker of 8 CPUs; each program writes its own
start and end times, so its makespan is measured the same way (not by the client's
one-second polling).

Parsl's HTEX cannot run these requests in one executor (``cores`` is an invalid
resource key there); the usual workaround is one executor per task size, the node split
between them. That split is measured too: 4 cores as one 4-core worker for the large
tasks beside 4 one-core workers for the small ones.

    python benches/packing.py --rounds 3 --out docs/benchmarks_packing.json
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import tempfile
import time
from concurrent.futures import wait

LARGE, SMALL = (20, 4, 1.0), (80, 1, 0.25)  # count, cores, seconds
SLOTS = 8
IDEAL = (LARGE[0] * LARGE[1] * LARGE[2] + SMALL[0] * SMALL[1] * SMALL[2]) / SLOTS


def nap(seconds: float) -> tuple[float, float]:
    import time
    start = time.time()
    time.sleep(seconds)
    return start, time.time()


ORDER = "large-first"


def workload() -> list[tuple[int, float]]:
    large, small = [(LARGE[1], LARGE[2])] * LARGE[0], [(SMALL[1], SMALL[2])] * SMALL[0]
    if ORDER == "interleaved":  # one large, then four small, ...
        per = SMALL[0] // LARGE[0]
        return [t for i in range(LARGE[0]) for t in [large[i]] + small[i * per:(i + 1) * per]]
    return large + small if ORDER == "large-first" else small + large


def run_htex_rs(run_dir: str) -> float:
    from parsl.providers import LocalProvider

    from htex_rs import HighThroughputExecutor
    os.environ["HTEX_RS_CPU_SLOTS"] = str(SLOTS)
    ex = HighThroughputExecutor(label="packing", address="127.0.0.1", encrypted=False,
                                max_workers_per_node=SLOTS, cores_per_worker=0.01,
                                provider=LocalProvider(init_blocks=1, min_blocks=0, max_blocks=1))
    ex.run_dir = run_dir
    with ex:
        ex.submit(nap, {"cores": 1}, 0).result(timeout=60)  # the pool is up
        t0 = time.time()
        futs = [ex.submit(nap, {"cores": c}, s) for c, s in workload()]
        wait(futs, timeout=300)
        return max(f.result()[1] for f in futs) - t0


def run_parsl_split(run_dir: str) -> float:
    """Parsl's HTEX, one executor per task size: 1 worker for 4-core tasks, 4 for 1-core."""
    from parsl.executors import HighThroughputExecutor
    from parsl.providers import LocalProvider
    exs = []
    for label, workers in (("large", 1), ("small", 4)):
        ex = HighThroughputExecutor(label=label, address="127.0.0.1", max_workers_per_node=workers,
                                    cores_per_worker=0.01,
                                    provider=LocalProvider(init_blocks=1, min_blocks=0, max_blocks=1))
        ex.run_dir = run_dir
        ex.provider.script_dir = os.path.join(run_dir, "scripts")
        os.makedirs(ex.provider.script_dir, exist_ok=True)
        ex.start()
        ex.scale_out_facade(1)  # outside a DataFlowKernel nothing else starts the block
        exs.append(ex)
    try:
        for ex in exs:
            ex.submit(nap, {}, 0).result(timeout=120)
        t0 = time.time()
        futs = [exs[0 if c == LARGE[1] else 1].submit(nap, {}, s) for c, s in workload()]
        wait(futs, timeout=300)
        return max(f.result()[1] for f in futs) - t0
    finally:
        for ex in exs:
            ex.shutdown()


def run_hyperqueue(work_dir: str) -> float:
    from hyperqueue import Job, LocalCluster
    from hyperqueue.cluster import WorkerConfig
    from hyperqueue.ffi.protocol import ResourceRequest
    marks = os.path.join(work_dir, "marks")
    os.makedirs(marks, exist_ok=True)
    with LocalCluster(server_dir=os.path.join(work_dir, "server")) as cluster:
        cluster.start_worker(WorkerConfig(cores=SLOTS))
        client = cluster.client()
        warm = Job()
        warm.program(["true"], stdout=None, stderr=None)
        client.wait_for_jobs([client.submit(warm)])
        job = Job()
        for cores, seconds in workload():
            script = (f's=$(date +%s.%N); sleep {seconds}; '
                      f'echo $s $(date +%s.%N) > {marks}/$HQ_JOB_ID-$HQ_TASK_ID')
            job.program(["sh", "-c", script], resources=ResourceRequest(cpus=cores), stdout=None, stderr=None)
        t0 = time.time()
        client.wait_for_jobs([client.submit(job)])
    ends = [float(open(p).read().split()[1]) for p in glob.glob(os.path.join(marks, "*"))]
    assert len(ends) == len(workload()), f"HyperQueue ran {len(ends)} of {len(workload())} tasks"
    return max(ends) - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=None)
    p.add_argument("--order", default="large-first", choices=["large-first", "interleaved", "small-first"],
                   help="submission order of the two task sizes")
    p.add_argument("--skip", nargs="*", default=[], choices=["htex_rs", "hyperqueue", "parsl_split"])
    args = p.parse_args()
    global ORDER
    ORDER = args.order
    runners = {"htex_rs": run_htex_rs, "hyperqueue": run_hyperqueue, "parsl_split": run_parsl_split}
    runs: dict[str, list[float]] = {k: [] for k in runners if k not in args.skip}
    for r in range(args.rounds):
        for name in runs:  # alternated, so drift hits all alike
            with tempfile.TemporaryDirectory() as d:
                m = runners[name](d)
            runs[name].append(m)
            print(f"round {r + 1}: {name:11s} makespan {m:6.2f} s  ({m / IDEAL:.3f} x ideal {IDEAL} s)", flush=True)
    summary = {name: {"makespans_s": v, "median_s": statistics.median(v),
                      "ratio_to_ideal": statistics.median(v) / IDEAL} for name, v in runs.items()}
    for name, s in summary.items():
        print(f"{name:11s} median makespan {s['median_s']:.2f} s = {s['ratio_to_ideal']:.3f} x ideal")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"order": ORDER, "ideal_s": IDEAL, "slots": SLOTS, "large": LARGE, "small": SMALL,
                       "cpus_on_machine": len(os.sched_getaffinity(0)), "results": summary}, f, indent=2)


if __name__ == "__main__":
    main()
