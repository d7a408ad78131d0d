"""htex_rs's interchange beside Parsl's own interchange.py under the same simulated load.

Each executor starts with no blocks (its real interchange: Parsl's as its own process,
htex_rs's as a Rust thread); then N simulated managers connect to its worker port from
child processes and speak that interchange's real manager protocol: Parsl's pickled
dicts (one result message per task, as process_worker_pool.py sends them) or htex_rs's
frames (results that finished together share a message, as the pool sends them).
Every manager has the same capacity and answers each task at once with a prepared
result, so the figures are the interchange's and the submit path's, not the workers'.
Tasks go in two ways (``--feed``), each executor in turn:

* ``submit``: through each executor's own ``submit`` (serialization, future, hand-off),
  as a user's loop sends them;
* ``premade``: each task serialized once by the executor's own serializer and its future
  made and registered before the clock starts; the clock covers handing each task to
  the interchange (htex_rs ``Interchange.submit``; Parsl ``outgoing_q.put``, the last
  step of its ``submit_payload``), the interchange, the managers and each executor's own
  result thread setting the futures: the interchanges compared with the submit
  process's serialization out of the way.

    python benches/interchange_vs_parsl.py                    # 10 and 1,000 managers
    python benches/interchange_vs_parsl.py --managers 10 1000 10000 --tasks 20000

Prints tasks/s (all tasks submitted at once) and the median one-at-a-time latency for
each executor and manager count, the ratios, and writes ``--json``.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import pickle
import platform
import resource
import statistics
import sys
import tempfile
import time
from typing import Any, Callable

import zmq

HERE = os.path.dirname(os.path.abspath(__file__))
FEEDS = ("submit", "premade")


def noop() -> None:
    return None


# ------------------------------------------------------------------ simulated managers
def dealers(port: int, prefix: str, first: int, count: int) -> list[zmq.Socket[bytes]]:
    """``count`` DEALER sockets named ``{prefix}-{i}`` connected to the worker port."""
    ctx = zmq.Context()
    ctx.set(zmq.MAX_SOCKETS, count + 64)
    socks = []
    for i in range(first, first + count):
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.IDENTITY, f"{prefix}-{i}".encode())
        s.connect(f"tcp://127.0.0.1:{port}")
        socks.append(s)
    return socks


def serve(socks: list[zmq.Socket[bytes]], answer: Any, stop: Any) -> None:
    """Answer every message on ``socks`` until ``stop``: epoll over each socket's ZMQ_FD,
    so a wake-up costs O(ready sockets), not O(sockets) as zmq.Poller's does (at 1,000
    managers that would make the simulator, not the interchange, the bottleneck)."""
    import select
    ep = select.epoll()
    by_fd = {}
    for s in socks:
        fd = s.getsockopt(zmq.FD)
        by_fd[fd] = s
        ep.register(fd, select.EPOLLIN | select.EPOLLET)

    def drain(s: zmq.Socket[bytes]) -> None:
        # ZMQ_FD is edge-like: read until ZMQ_EVENTS has no POLLIN left.
        while s.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            while True:
                try:
                    frames = s.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                answer(s, frames)

    last_sweep = time.monotonic()
    while not stop.is_set():
        for fd, _ in ep.poll(0.1):
            drain(by_fd[fd])
        if time.monotonic() - last_sweep > 1:  # any edge missed
            for s in socks:
                drain(s)
            last_sweep = time.monotonic()


def parsl_managers(port: int, first: int, count: int, capacity: int, ready: Any, stop: Any) -> None:
    """``count`` managers speaking Parsl's protocol (interchange.py / process_worker_pool.py)."""
    import parsl
    from parsl.serialize import serialize
    result = serialize(None)
    v = sys.version_info
    socks = dealers(port, "parsl", first, count)
    for i, s in enumerate(socks, start=first):
        s.send(pickle.dumps({
            "type": "registration", "parsl_v": parsl.__version__, "python_v": f"{v.major}.{v.minor}.{v.micro}",
            "packages": {}, "worker_count": capacity, "uid": f"parsl-{i}", "block_id": str(i % 64),
            "start_time": time.time(), "drain_time": float("inf"), "prefetch_capacity": 0, "max_capacity": capacity,
            "os": platform.system(), "hostname": f"sim-{i}", "dir": "/", "cpu_count": capacity,
            "total_memory": 1 << 34}))
    def answer(s: zmq.Socket[bytes], frames: list[bytes]) -> None:
        tasks = pickle.loads(frames[-1])
        if isinstance(tasks, list):  # not a heartbeat or shutdown code
            for t in tasks:
                s.send(pickle.dumps({"type": "result", "task_id": t["task_id"], "result": result}))

    ready.release()
    serve(socks, answer, stop)


def htex_rs_managers(port: int, first: int, count: int, capacity: int, ready: Any, stop: Any) -> None:
    """``count`` managers speaking htex_rs's protocol (rust/protocol, as the pool does)."""
    from parsl.serialize import serialize

    from htex_rs import _core, wire
    result = serialize(None)
    v = sys.version_info
    socks = dealers(port, "rs", first, count)
    for i, s in enumerate(socks, start=first):
        reg = {"protocol_version": _core.PROTOCOL_VERSION, "uid": f"rs-{i}", "block_id": str(i % 64),
               "max_capacity": capacity, "worker_count": capacity, "hostname": f"sim-{i}",
               "python_version": f"{v.major}.{v.minor}.{v.micro}"}
        s.send_multipart([wire.header(wire.REGISTER), json.dumps(reg).encode()])
    results_head = wire.header(wire.RESULTS)

    def answer(s: zmq.Socket[bytes], frames: list[bytes]) -> None:
        if wire.kind_of(frames[0]) == wire.TASKS:
            meta = wire.decode_meta(frames[1], len(frames) - 2)
            s.send_multipart([results_head, wire.encode_meta([(t, wire.STATUS_RESULT) for t, _ in meta]),
                              *([result] * len(meta))])

    ready.release()
    serve(socks, answer, stop)


# ------------------------------------------------------------------ one run
def make_executor(kind: str, run_dir: str) -> Any:
    from parsl.providers import LocalProvider
    provider = LocalProvider(init_blocks=0, min_blocks=0, max_blocks=0)
    if kind == "parsl":
        from parsl.executors import HighThroughputExecutor as Executor
    else:
        from htex_rs import HighThroughputExecutor as Executor  # type: ignore[assignment]
    ex = Executor(label=f"bench_{kind}", address="127.0.0.1", encrypted=False, provider=provider,
                  heartbeat_threshold=600)
    ex.run_dir = run_dir
    ex._check_python_mismatch = True
    return ex


def premade_feed(kind: str, ex: Any) -> tuple[Callable[[int], None], Callable[[int], dict[int, Any]]]:
    """``feed="premade"``: each executor's interchange and result path with nothing of its
    submit left on the clock. The task is serialized once, by the executor's own
    serializer; ``premade(n)`` makes n futures and registers them as the executor's
    submit does (``ex.tasks``); ``send(task_id)`` is the one step of submit left: handing
    the task to the interchange (htex_rs: ``Interchange.submit``; Parsl: ``outgoing_q.put``,
    as its ``submit_payload`` does). Each executor's own result thread sets the futures."""
    from parsl.executors.high_throughput.executor import HTEXFuture

    if kind == "parsl":
        from parsl.serialize import pack_apply_message as parsl_pack
        buffer = parsl_pack(noop, (), {}, buffer_threshold=1 << 20)

        def send(tid: int) -> None:
            ex.outgoing_q.put({"task_id": tid, "context": {}, "buffer": buffer})
    else:
        from htex_rs import validation, wire
        from htex_rs.serialization import pack_apply_message
        flags, payload = wire.encode_task({}, pack_apply_message(noop, (), {}, buffer_threshold=1 << 20))
        priority, _ = validation.parse_resource_spec(None)
        ix = ex._ix

        def send(tid: int) -> None:
            ix.submit(tid, priority, flags, payload)

    def premade(n: int) -> dict[int, Any]:
        futs = {}
        for _ in range(n):
            ex._task_counter += 1
            futs[ex._task_counter] = ex.tasks[ex._task_counter] = HTEXFuture(ex._task_counter)
        return futs
    return send, premade


def run(kind: str, managers: int, capacity: int, tasks: int, procs: int, feed: str = "submit") -> dict[str, float]:
    run_dir = tempfile.mkdtemp(prefix=f"ixbench-{kind}-")
    ex = make_executor(kind, run_dir)
    ex.start()
    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    ready = ctx.Semaphore(0)
    target = parsl_managers if kind == "parsl" else htex_rs_managers
    per = [managers // procs + (1 if i < managers % procs else 0) for i in range(procs)]
    children = []
    first = 0
    t_reg = time.monotonic()
    for n in per:
        if n:
            p = ctx.Process(target=target, args=(ex.worker_port, first, n, capacity, ready, stop), daemon=True)
            p.start()
            children.append(p)
            first += n
    try:
        for _ in children:
            ready.acquire()
        deadline = time.monotonic() + 600
        while len(ex.connected_managers()) < managers:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{kind}: only {len(ex.connected_managers())} of {managers} managers registered")
            time.sleep(0.05)
        admit_s = time.monotonic() - t_reg
        ex.submit(noop, {}).result(timeout=120)  # warm: serializer caches, first dispatch
        if feed == "premade":
            send, premade = premade_feed(kind, ex)
            made = premade(tasks)  # serialized and with futures before the clock starts
            t0 = time.monotonic()
            for tid in made:
                send(tid)
            futs = list(made.values())
        else:
            t0 = time.monotonic()
            futs = [ex.submit(noop, {}) for _ in range(tasks)]
        for f in futs:
            f.result(timeout=600)
        throughput = tasks / (time.monotonic() - t0)
        lat = []
        for _ in range(200):
            if feed == "premade":
                (tid, f), = premade(1).items()
                t = time.perf_counter()
                send(tid)
            else:
                t = time.perf_counter()
                f = ex.submit(noop, {})
            f.result(timeout=60)
            lat.append((time.perf_counter() - t) * 1e6)
        return {"throughput": throughput, "latency_us": statistics.median(lat), "admit_s": admit_s}
    finally:
        stop.set()
        for p in children:
            p.join(10)
            if p.is_alive():
                p.kill()
        ex.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--managers", type=int, nargs="+", default=[10, 1000])
    ap.add_argument("--capacity", type=int, default=8, help="tasks in flight per manager")
    ap.add_argument("--tasks", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported")
    ap.add_argument("--procs", type=int, default=2, help="processes hosting the simulated managers")
    ap.add_argument("--feed", choices=FEEDS, nargs="+", default=list(FEEDS),
                    help="submit: through each executor's submit; premade: tasks serialized and futures "
                         "made before the clock (the interchanges and result paths alone)")
    ap.add_argument("--json", default=os.path.join(HERE, "..", "docs", "benchmarks_interchange_vs_parsl.json"))
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    raw: dict[str, dict[str, dict[int, list[dict[str, float]]]]] = {
        feed: {"htex_rs": {}, "parsl": {}} for feed in args.feed}
    total = args.rounds * len(args.managers) * 2 * len(args.feed)
    done = 0
    for r in range(args.rounds):
        for m in args.managers:
            for feed in args.feed:
                for kind in ("htex_rs", "parsl"):
                    done += 1
                    print(f"[{done}/{total}] round {r + 1}: {kind}, {m} managers, fed by {feed} ...",
                          file=sys.stderr, flush=True)
                    raw[feed][kind].setdefault(m, []).append(
                        run(kind, m, args.capacity, args.tasks, args.procs, feed))
    med = {feed: {k: {m: {f: statistics.median(x[f] for x in runs) for f in runs[0]} for m, runs in v.items()}
                  for k, v in by_kind.items()} for feed, by_kind in raw.items()}
    print(f"\n{args.tasks} no-op tasks, managers of capacity {args.capacity}, {args.rounds} interleaved rounds "
          f"(medians), simulated managers in {args.procs} processes")
    print(f"{'fed by':>8}  {'managers':>9}  {'htex_rs tasks/s':>15}  {'Parsl tasks/s':>13}  {'ratio':>6}  "
          f"{'htex_rs us':>10}  {'Parsl us':>9}  {'admit s (rs/Parsl)':>19}")
    for feed in args.feed:
        for m in args.managers:
            a, b = med[feed]["htex_rs"][m], med[feed]["parsl"][m]
            print(f"{feed:>8}  {m:>9}  {a['throughput']:>15.0f}  {b['throughput']:>13.0f}  "
                  f"{a['throughput'] / b['throughput']:>6.1f}  {a['latency_us']:>10.0f}  {b['latency_us']:>9.0f}  "
                  f"{a['admit_s']:>9.2f} / {b['admit_s']:<7.2f}")
    with open(args.json, "w") as f:
        json.dump({"args": vars(args), "medians": med, "runs": raw}, f, indent=1)
    print(f"wrote {os.path.relpath(args.json)}")


if __name__ == "__main__":
    main()
