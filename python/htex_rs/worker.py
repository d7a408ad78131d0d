"""A long-lived worker process: receives tasks from its pool over a Unix stream socket,
runs them in order, and sends each result back the moment its task returns. The pool
core gives it the task to run and, while its tasks are quick, a few to run next; it may
ask for those back (RECLAIM) when another worker is idle. The stream is read by
``_core.WorkerInbox``, whose Rust thread answers that at once with the tasks not yet
started, even while a long task holds the interpreter.

Dies with its pool: PR_SET_PDEATHSIG, and the stream's end (the pool's socket closes
when its process goes).
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import importlib
import logging
import os
import signal
import socket
import sys
import threading
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional

from htex_rs import logs, stream, wire
from htex_rs._core import WorkerInbox

if TYPE_CHECKING:
    from htex_rs.mpi import NodePool

logger = logging.getLogger("htex_rs.worker")

def die_with_parent(parent: int) -> None:
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass
    if os.getppid() != parent:  # the pool died before prctl took effect
        os._exit(1)


class MonitoringChannel:
    """Parsl's ``monitoring_info.result_queue`` inside an htex_rs worker: HTEXRadioSender
    puts pickled ``{'type': 'monitoring', 'payload': ...}`` here, and it travels to the
    executor as a result with STATUS_MONITORING. Each process opens its own stream to
    the pool (Parsl's resource monitor is a forked child of the worker)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.pid = -1
        self.sock: Optional[socket.socket] = None
        self.lock = threading.Lock()

    def put(self, data: bytes) -> None:
        with self.lock:
            if self.sock is None or self.pid != os.getpid():
                self.sock = stream.connect(self.url)
                self.pid = os.getpid()
            stream.send(self.sock, [wire.header(wire.RESULTS),
                                    wire.encode_meta([(0, wire.STATUS_MONITORING)]), data])


@contextlib.contextmanager
def granted(grant: Optional[dict[str, Any]]) -> Iterator[None]:
    """Run with a pool's grant (rust/resources.rs ``Grant::head``): pinned to its CPUs,
    with its environment (OpenMP affinity, accelerator variables, PARSL_CORES/MEMORY/GPUS);
    the worker's own mask and environment come back afterwards."""
    if not grant or "cpus" not in grant:
        yield
        return
    mask = os.sched_getaffinity(0)
    env: dict[str, str] = grant.get("env", {})
    saved = {k: os.environ.get(k) for k in env}
    if grant["cpus"]:
        os.sched_setaffinity(0, grant["cpus"])
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        os.sched_setaffinity(0, mask)


def run_task(context: dict[str, Any], buffer: bytes, unpack: Callable[..., Any],
             nodes: Optional[NodePool] = None, grant: Optional[dict[str, Any]] = None) -> Any:
    spec = context.get("resource_spec") or {}
    for key, value in spec.items():
        os.environ["PARSL_" + str(key).upper()] = str(value)
    with granted(grant):  # after the spec's: the grant's PARSL_CORES (4, not 4.0) wins
        if nodes is not None and spec.get("num_nodes"):  # MPI mode: the task's own nodes
            held = nodes.acquire(int(spec["num_nodes"]))
            try:
                nodes.set_task_env(dict(spec), held.nodes)
                return _call(context, buffer, unpack)
            finally:
                held.release()
        return _call(context, buffer, unpack)


def _call(context: dict[str, Any], buffer: bytes, unpack: Callable[..., Any]) -> Any:
    executor = context.get("task_executor")
    if executor:
        module, _, name = executor["f"].rpartition(".")
        fn = getattr(importlib.import_module(module), name)
        return fn(buffer, *executor.get("a", ()), **executor.get("k", {}))
    f, args, kwargs = unpack(buffer)
    return f(*args, **kwargs)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="htex_rs.worker")
    p.add_argument("--url", required=True)
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--logdir", required=True)
    p.add_argument("--logconf", default=None, help="a pickled Parsl LogConfig (see htex_rs.logs)")
    p.add_argument("--debug", action="store_true")
    p.add_argument("--pool-pid", type=int, default=None,
                   help="the pool's pid; passed in because the pool may already be gone when we start")
    args = p.parse_args(argv)
    # Not os.getppid(): if the pool died while this interpreter was starting, that is
    # already init's pid and the worker would never notice it is orphaned.
    parent = args.pool_pid or os.getppid()
    die_with_parent(parent)
    logs.setup(args.logdir, f"worker_{args.rank}", args.debug, args.logconf)
    cpus = os.environ.get("HTEX_RS_CPUS")
    if cpus:
        os.sched_setaffinity(0, [int(c) for c in cpus.split(",")])
        logger.info("Set worker CPU affinity to %s", cpus)

    import parsl.executors.high_throughput.monitoring_info as monitoring_info
    monitoring_info.result_queue = MonitoringChannel(args.url)  # type: ignore[assignment]
    limit = int(os.environ.get("HTEX_RS_MAX_MESSAGE_BYTES", 1 << 30))

    nodes: Optional[NodePool] = None
    if os.environ.get("HTEX_RS_MPI_NODES"):  # htex_rs.mpi.NODES_ENV, set by an MPI-mode pool
        from htex_rs import mpi  # only then: it imports Parsl's MPI modules
        nodes = mpi.NodePool.from_env()
        if nodes is not None:
            logger.info("MPI mode: nodes %s, launcher %s, locks in %s", nodes.nodes, nodes.launcher,
                        nodes.lock_dir)
    execute = task_runner(limit, nodes)
    try:
        # Refused if another user serves the socket (rust/worker_inbox.rs connect).
        inbox = WorkerInbox(args.url, str(args.rank), limit)
    except OSError as e:
        # Exit, loudly: the pool restarts a worker that dies at start-up with growing
        # delays, then gives up (worker_pool.py), so its tasks fail instead of hanging.
        logger.critical("Worker %d cannot start: %s", args.rank, e)
        print(f"htex_rs.worker {args.rank}: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    logger.info("Worker %d ready (pid %d)", args.rank, os.getpid())
    try:
        while True:
            task = inbox.next()
            if task is None:
                logger.warning("Pool closed the stream (pool process gone); exiting")
                return
            status, payload = execute(task.task_id, task.flags, task.payload)
            # At once, not with the next task's: the result frees this worker's slot.
            inbox.send_result(task.task_id, status, payload)
    except OSError:
        logger.warning("The stream to the pool broke; exiting", exc_info=True)


def task_runner(limit: int, nodes: Optional[NodePool]) -> Callable[[int, int, bytes], tuple[int, list[bytes]]]:
    """``execute(task_id, flags, frame) -> (status, serialized result or exception)``, the
    serialized bytes in parts that are sent back to back, never joined.
    Parsl's serializer is imported here, once, after the worker's CPU affinity is set."""
    from parsl.app.errors import RemoteExceptionWrapper

    from htex_rs.errors import TaskTooLarge
    from htex_rs.serialization import serialize_parts, unpack_apply_message

    def execute(task_id: int, flags: int, frame: bytes) -> tuple[int, list[bytes]]:
        try:
            grant = None
            if flags & wire.FLAG_RESOURCES:
                grant, frame = wire.split_head(frame)
            context, buffer = wire.decode_task(flags, frame)
            result = serialize_parts(run_task(context, buffer, unpack_apply_message, nodes, grant),
                                     buffer_threshold=1_000_000)
            size = sum(map(len, result))
            if size > limit:  # the interchange would drop the connection instead
                raise TaskTooLarge(f"the result of task {task_id}", size, limit)
            return wire.STATUS_RESULT, result
        except Exception:
            logger.debug("Task %s raised", task_id, exc_info=True)
            try:
                return wire.STATUS_EXCEPTION, serialize_parts(RemoteExceptionWrapper(*sys.exc_info()))
            except Exception as e:
                try:
                    raise RuntimeError(f"the task's exception could not be serialized: {e!r}") from None
                except RuntimeError:
                    return wire.STATUS_EXCEPTION, serialize_parts(RemoteExceptionWrapper(*sys.exc_info()))
    return execute


if __name__ == "__main__":
    main()
