"""htex-rs-worker-pool: the per-node manager.

Registers with the interchange and starts N long-lived worker processes. The Rust pool
core owns the pool's tasks: it queues them, gives idle workers tasks first (a quick
worker may hold a few to run next) over a Unix stream each, forwards each result as its task
ends, heartbeats, and fails the running task of a worker whose death this supervisor
reports (pid, exit code) as WorkerLost. The supervisor starts, pins and restarts the
processes. It exits when the interchange says so (drain, shutdown) or goes silent
past ``--hb_threshold``.
Takes the same options as Parsl's process_worker_pool.py.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import select
import signal
import socket
import subprocess
import sys
import time
import uuid
from typing import Callable, Optional, TypeVar

_SCRIPT_LOAD_TIME = time.time()

import psutil  # noqa: E402
import zmq  # noqa: E402

from htex_rs import _core, block_end, fd_limits, logs, planner, pool_resources, wire  # noqa: E402
from htex_rs.addresses import tcp_url  # noqa: E402

logger = logging.getLogger("htex_rs.worker_pool")
_V = TypeVar("_V")


#: A worker dying sooner than this after its start counts as a start-up failure.
QUICK_DEATH_S = 5.0
#: Start-up failures in a row (per worker rank) after which the pool exits.
MAX_QUICK_DEATHS = 5


def emit_core_log(core: _core.Pool) -> None:
    """The Rust core's log records, through this process's logging (manager.log, or the
    user's LogConfig): the core queues them instead of taking the GIL to log."""
    for r in core.drain_log():
        logging.getLogger(r.name).log(r.levelno, "%s", r.message)


def none_or(conv: Callable[[str], _V]) -> Callable[[Optional[str]], Optional[_V]]:
    """An argparse type that reads Parsl's "None" (and an empty value) as None."""
    return lambda s: None if s is None or s in ("None", "none", "") else conv(s)


def arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="htex-rs-worker-pool", description=__doc__.splitlines()[0])
    p.add_argument("-d", "--debug", action="store_true")
    p.add_argument("-a", "--addresses", required=True, help="comma-separated interchange addresses")
    p.add_argument("--cert_dir", required=True, help="CURVE certificate directory, or None")
    p.add_argument("-l", "--logdir", default="process_worker_pool_logs")
    p.add_argument("-L", "--logconf", type=none_or(str), default=None)  # Parsl passes "None" when unset
    p.add_argument("-u", "--uid", default=uuid.uuid4().hex[-12:])
    p.add_argument("-b", "--block_id", default=None)
    p.add_argument("-c", "--cores_per_worker", type=float, default=1.0)
    p.add_argument("-m", "--mem_per_worker", type=none_or(float), default=None)
    p.add_argument("-P", "--port", type=int, required=True)
    p.add_argument("--max_workers_per_node", type=int, default=math.inf)
    p.add_argument("-p", "--prefetch_capacity", type=int, default=0)
    p.add_argument("--hb_period", type=float, default=30)
    p.add_argument("--hb_threshold", type=float, default=120)
    p.add_argument("--drain_period", type=none_or(float), default=None)
    p.add_argument("--block-walltime", type=none_or(float), default=None,
                   help="the provider's walltime in seconds (see htex_rs.block_end)")
    p.add_argument("--address_probe_timeout", type=float, default=30)
    p.add_argument("--poll", type=int, default=10, help="accepted for compatibility; unused")
    p.add_argument("--cpu-affinity", type=str.lower, required=True)
    p.add_argument("--available-accelerators", nargs="*", default=[])
    p.add_argument("--enable_mpi_mode", action="store_true")
    p.add_argument("--mpi-launcher", choices=["srun", "aprun", "mpiexec"], default="mpiexec")
    p.add_argument("--max-message-bytes", type=int, default=1 << 30,
                   help="largest result a worker sends; larger ones fail their task (default 1 GiB)")
    return p


def usable_cores() -> int:
    """Cores this pool may use: $PARSL_CORES, else the affinity mask (taskset, cgroups)."""
    if "PARSL_CORES" in os.environ:
        return int(os.environ["PARSL_CORES"])
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def worker_count(args: argparse.Namespace) -> int:
    mem_gb = float(os.environ.get("PARSL_MEMORY_GB",
                                  round(psutil.virtual_memory().available / 2**30, 1)))
    count = args.max_workers_per_node
    if args.mem_per_worker and args.mem_per_worker > 0:
        count = min(count, math.floor(mem_gb / args.mem_per_worker))
    count = min(count, math.floor(usable_cores() / args.cores_per_worker))
    if args.available_accelerators:
        count = min(count, len(args.available_accelerators))
    return max(1, int(count))


def check_private(cert_dir: str) -> None:
    mode = os.stat(cert_dir).st_mode & 0o777
    if mode != 0o700:
        raise OSError(f"The certificates directory must be private: {cert_dir} has mode {oct(mode)}; "
                      f"run `chmod 700 {cert_dir}`")


def curve_client(sock: zmq.Socket[bytes], cert_dir: Optional[str]) -> None:
    if cert_dir is None:
        return
    check_private(cert_dir)
    pub, sec, server_pub = _core.client_keys(cert_dir)
    sock.curve_publickey = pub
    sock.curve_secretkey = sec
    sock.curve_serverkey = server_pub


class Worker:
    """One worker process (the tasks it runs are the core's business)."""

    def __init__(self, rank: int, proc: subprocess.Popen[bytes], pidfd: int) -> None:
        self.started = time.monotonic()
        self.rank = rank
        self.proc = proc
        self.pidfd = pidfd


class Pool:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.uid = args.uid
        self.block_id = args.block_id
        self.cert_dir = None if args.cert_dir in (None, "None") else args.cert_dir
        self.count = worker_count(args)
        # What the interchange may send us (Parsl's rule); the core queues the prefetched
        # ones in one queue, not in per-worker shares.
        self.capacity = self.count + args.prefetch_capacity
        self.drain_time = _SCRIPT_LOAD_TIME + args.drain_period if args.drain_period is not None else None
        self.block_end, self.block_end_source = block_end.block_end_and_source(args.block_walltime,
                                                                             _SCRIPT_LOAD_TIME)
        self.logdir = os.path.join(args.logdir, f"block-{self.block_id}", self.uid)
        self.ctx = zmq.Context()
        self.workers: dict[int, Worker] = {}
        # MPI mode: the batch job's nodes, shared by the workers (htex_rs.mpi).
        self.mpi_env: dict[str, str] = {}
        if args.enable_mpi_mode:
            from htex_rs import mpi
            self.mpi_env = mpi.pool_env(os.path.join(self.logdir, "mpi-nodes"), args.mpi_launcher)
        self.restart_at: dict[int, float] = {}  # rank -> when to start its next worker
        self.quick_deaths: dict[int, int] = {}
        self.stopping = False
        self.ending = False  # SIGTERM seen: the core is handing tasks back
        # Planned once for the pool; a bad plan fails the pool here, clearly, instead of
        # every worker crashing at start-up and being restarted forever.
        self.plan = planner.plan_pool(args.cpu_affinity, self.count, args.available_accelerators)
        # What tasks that ask for cores, memory or GPUs are granted from (htex_rs.pool_resources).
        self.resources = pool_resources.pool_resources(args.mem_per_worker, self.count,
                                                       args.available_accelerators)

    # ----------------------------------------------------------------- connect
    def probe(self) -> str:
        """Try every address at once; return the URL of the first interchange that answers."""
        urls = [tcp_url(a.strip(), self.args.port) for a in self.args.addresses.split(",") if a.strip()]
        socks = {}
        poller = zmq.Poller()
        for url in urls:
            s = self.ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.IPV6, 1)
            curve_client(s, self.cert_dir)
            s.connect(url)
            s.send(wire.header(wire.PROBE))
            socks[s] = url
            poller.register(s, zmq.POLLIN)
        deadline = time.monotonic() + self.args.address_probe_timeout
        try:
            while time.monotonic() < deadline:
                for s, _ in poller.poll(max(1, int((deadline - time.monotonic()) * 1000))):
                    frames = s.recv_multipart()
                    kind = wire.kind_of(frames[0])
                    if kind == wire.PROBE_ACK:
                        return socks[s]
                    self.refused(frames)
        finally:
            for s in socks:
                s.close()
        raise ConnectionError(f"No viable ZMQ url from: {urls}")

    def refused(self, frames: list[bytes]) -> None:
        """An interchange that refuses us (other protocol or Python version): exit loudly."""
        if len(frames[0]) == 4 and frames[0][:2] == wire.MAGIC and frames[0][3] == wire.REFUSED:
            msg = frames[1].decode(errors="replace") if len(frames) > 1 else "refused"
            logger.critical("Interchange refused this pool: %s", msg)
            print(f"htex-rs-worker-pool: refused by the interchange: {msg}", file=sys.stderr, flush=True)
            raise SystemExit(3)

    def registration(self) -> bytes:
        import parsl
        try:
            from importlib.metadata import distributions
            packages = {d.metadata["Name"]: d.version for d in distributions() if d.metadata["Name"]}
        except Exception:
            packages = {}
        vm = psutil.virtual_memory()
        # The document's one definition is Rust's (rust/protocol Registration): it adds the
        # protocol and htex_rs versions and refuses a field it does not know.
        return _core.registration(json.dumps({
            "python_version": platform.python_version(),
            "parsl_version": parsl.__version__,
            "uid": self.uid,
            "block_id": self.block_id,
            "hostname": socket.gethostname(),
            "worker_count": self.count,
            "prefetch_capacity": self.args.prefetch_capacity,
            "max_capacity": self.capacity,
            "start_time": _SCRIPT_LOAD_TIME,
            "drain_time": self.drain_time,
            "block_end": self.block_end,
            "os": platform.system(),
            "dir": os.getcwd(),
            "cpu_count": psutil.cpu_count(logical=False) or 1,
            "total_memory": vm.total,
            "packages": packages,
            "resources": self.resources.totals(),
        }).encode())

    # ----------------------------------------------------------------- workers
    def start_worker(self, rank: int) -> Worker:
        env = dict(os.environ)
        env.update({
            "PARSL_WORKER_RANK": str(rank),
            "PARSL_WORKER_COUNT": str(self.count),
            "PARSL_WORKER_POOL_ID": self.uid,
            "PARSL_WORKER_BLOCK_ID": str(self.block_id),
            "HTEX_RS_MAX_MESSAGE_BYTES": str(self.args.max_message_bytes),
        })
        env.update(self.mpi_env)
        plan = self.plan[rank]
        cpus = plan["cpus"]
        env.update(plan["env"])
        if cpus is not None:
            env["HTEX_RS_CPUS"] = ",".join(map(str, cpus))
        cmd = [sys.executable, "-m", "htex_rs.worker",
               "--url", self.worker_url, "--rank", str(rank), "--pool-pid", str(os.getpid()),
               "--logdir", self.logdir]
        if self.args.logconf:
            cmd += ["--logconf", self.args.logconf]
        if self.args.debug:
            cmd.append("--debug")
        # Its own session: the core ends a worker whose task ran past its walltime by
        # signalling its process group, which takes a bash app's children with it.
        proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, start_new_session=True)
        w = Worker(rank, proc, os.pidfd_open(proc.pid))
        self.workers[rank] = w
        logger.info("Started worker %d as pid %d (cpus=%s)", rank, proc.pid, cpus)
        return w

    def worker_lost(self, w: Worker) -> None:
        """A worker process ended: tell the core (it fails the task the worker was
        running as WorkerLost; queued tasks stay queued) and start a new one."""
        code = w.proc.wait()
        self.poller.unregister(w.pidfd)
        os.close(w.pidfd)
        del self.workers[w.rank]
        self.core.worker_died(w.proc.pid, code)
        logger.error("Worker %d (pid %d) exited with code %s", w.rank, w.proc.pid, code)
        if self.stopping:
            return
        # A worker that dies soon after starting (a broken environment, an import error) is
        # restarted with growing delays, and the pool gives up after a run of such deaths,
        # so its tasks end as ManagerLost instead of cycling forever.
        # SIGTERM or SIGKILL came from outside (the core ending a task past its walltime,
        # the OOM killer, a user): not a sign of a broken environment.
        killed = code in (-signal.SIGTERM, -signal.SIGKILL)
        quick = time.monotonic() - w.started < QUICK_DEATH_S and not killed
        self.quick_deaths[w.rank] = self.quick_deaths.get(w.rank, 0) + 1 if quick else 0
        n = self.quick_deaths[w.rank]
        if n >= MAX_QUICK_DEATHS:
            logger.critical("Worker %d died within %s s of starting %d times in a row; see %s. Exiting.",
                            w.rank, QUICK_DEATH_S, n, os.path.join(self.logdir, f"worker_{w.rank}.log"))
            print(f"htex-rs-worker-pool: worker {w.rank} keeps dying at start-up; exiting", file=sys.stderr,
                  flush=True)
            self.stopping = True
            return
        self.restart_at[w.rank] = time.monotonic() + (min(30.0, 0.5 * 2 ** (n - 1)) if n else 0.0)

    def until_next_restart_ms(self) -> Optional[int]:
        """Milliseconds until the next worker restart is due; None when none is waiting."""
        if not self.restart_at:
            return None
        return max(0, math.ceil((min(self.restart_at.values()) - time.monotonic()) * 1000))

    def restart_due_workers(self) -> None:
        now = time.monotonic()
        for rank, when in list(self.restart_at.items()):
            if when <= now:
                del self.restart_at[rank]
                self.poller.register(self.start_worker(rank).pidfd, select.POLLIN)

    # ----------------------------------------------------------------- main loop
    def curve_keys(self) -> Optional[tuple[bytes, bytes, bytes]]:
        if self.cert_dir is None:
            return None
        check_private(self.cert_dir)
        return _core.client_keys(self.cert_dir)

    def run(self) -> int:
        """Probe, hand the data path to the Rust core, then supervise the workers."""
        os.makedirs(self.logdir, exist_ok=True)
        # Per worker: its stream, a pidfd, stdout/stderr pipes.
        fd_limits.raise_nofile(4 * self.count, f"this pool ({self.count} workers)")
        url = self.probe()
        logger.info("Interchange found at %s", url)
        # Linux abstract socket: no file to leave behind if the pool is SIGKILLed.
        self.worker_url = f"@htex-rs-{self.uid}-{os.getpid()}"
        self.core = _core.Pool(url, self.uid.encode(), self.worker_url, self.registration(),
                                   float(self.args.hb_period), float(self.args.hb_threshold),
                                   socket.gethostname(), self.curve_keys(), self.args.max_message_bytes,
                                   cpu_slots=self.resources.slots, memory_mb=self.resources.memory_mb,
                                   accelerators=self.resources.accelerators, debug=self.args.debug,
                                   block_end=self.block_end, drain_time=self.drain_time)
        logger.info("Registered pool %s: block %s (%s), %d workers, capacity %d, resources %s",
                    self.uid, self.block_id, block_end.describe(self.block_end, self.block_end_source, time.time()),
                    self.count, self.capacity, self.resources.totals())
        self.poller = select.poll()
        for rank in range(self.count):
            self.poller.register(self.start_worker(rank).pidfd, select.POLLIN)
        # The core raises this fd when it logs or stops: the loop sleeps until a worker
        # dies, the core has news, or a worker's restart is due; it never polls for them.
        self.poller.register(self.core.events_fd(), select.POLLIN)
        exit_code = 0
        while not self.stopping:
            dead = {fd for fd, _ in self.poller.poll(self.until_next_restart_ms())}
            gave_up = False
            for w in list(self.workers.values()):
                if w.pidfd in dead:
                    self.worker_lost(w)
                    gave_up = gave_up or self.stopping
            if gave_up:  # a worker kept dying at start-up
                exit_code = 5
                break
            emit_core_log(self.core)  # lowers the core's fd: look at its state after
            stopped = self.core.wait_stopped(0)
            if stopped is None:
                self.restart_due_workers()  # not once the core has ended: we exit below
                continue
            exit_code = stopped.exit_code
            (logger.critical if exit_code else logger.info)("%s", stopped.message)
            if stopped.refused:
                print(f"htex-rs-worker-pool: {stopped.message}", file=sys.stderr, flush=True)
            break
        self.stop()
        print("Process worker pool exiting normally", flush=True)
        return exit_code

    def on_sigterm(self) -> None:
        """The batch system ends the block (or Parsl scales it in): the core hands every
        unstarted task back to the interchange and stops, and the loop exits. Before the
        core runs, or at a second SIGTERM, exit at once."""
        core = getattr(self, "core", None)
        if core is None or self.ending:
            raise SystemExit(0)
        self.ending = True
        core.end("the batch system ended the block (SIGTERM)")

    def stop(self) -> None:
        """Stop the core and every worker (SIGTERM, 1 s grace, SIGKILL); idempotent."""
        self.stopping = True
        core = getattr(self, "core", None)
        if core is not None:
            try:
                logger.info("Pool counts: %s", core.counts())
            except _core.PoolStopped:
                pass
            core.stop()
            emit_core_log(core)
        procs = [w.proc for w in self.workers.values()]
        self.workers.clear()
        for p in procs:
            if p.poll() is None:
                p.terminate()
        deadline = time.monotonic() + 1.0
        for p in procs:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.ctx.destroy(linger=0)


def main(argv: Optional[list[str]] = None) -> int:
    args = arg_parser().parse_args(argv)
    # Before any thread or worker process starts: they inherit it (rust/sched.rs says why).
    batch = _core.batch_scheduling()
    try:
        pool = Pool(args)
    except ValueError as e:  # an affinity plan that cannot work on this node
        print(f"htex-rs-worker-pool: {e}", file=sys.stderr)
        return 2
    logs.setup(pool.logdir, "manager", args.debug, args.logconf)
    logger.info("htex-rs-worker-pool %s (protocol v%s) starting (SCHED_BATCH=%s): %s", _core.VERSION,
                _core.PROTOCOL_VERSION, batch, " ".join(sys.argv))
    signal.signal(signal.SIGTERM, lambda *_: pool.on_sigterm())
    try:
        return pool.run()
    except SystemExit as e:
        pool.stop()
        return int(e.code or 0)
    except Exception:
        logger.exception("Worker pool failed")
        pool.stop()
        return 1


if __name__ == "__main__":
    sys.exit(main())
