"""The worker port under a connection flood: htex_rs beside Parsl's HTEX, each encrypted.

    python benches/attack.py --rounds 3 --out docs/benchmarks_attack.json

Each executor (``encrypted=True``, 2 workers, one block on 127.0.0.1, driven through
``executor.submit`` as compare.py drives it, no DFK) runs a no-op round trip one task at a
time (submit, wait for its result, repeat) for ``--seconds`` in each of three phases:

* ``quiet``: nothing else on the worker port;
* ``hello``: an attacker process opens ``--rate`` new TCP connections a second to the
  worker port; each sends a ZMTP 3.1 CURVE greeting and a valid CURVE HELLO for that
  executor's server key, reads what comes back, and closes ~20 ms after it opened, so the
  server does the whole HELLO work (box open, short-term key pair, cookie, WELCOME) for
  every connection;
* ``refused``: at the same rate, libzmq CURVE clients (pyzmq DEALERs) with the right
  server key and a fresh key pair the server does not admit, each closed ~20 ms after it
  connected: a whole handshake each (HELLO, WELCOME, INITIATE with its vouch), ending in
  ERROR 400;
* ``half-open``: the attacker opens ``--half-open`` connections that send the greeting and
  nothing more (no HELLO), and holds them open for the phase.

The hello phase's clock starts 0.5 s into the flood; the half-open phase's once every held
connection has the server's greeting back, or 10 s after they were opened.

The HELLO is captured, not computed: a plain TCP listener in this process plays a CURVE
server to a pyzmq DEALER that has the executor's server public key and a fresh client key
pair, and the client's greeting and HELLO frame are replayed byte for byte on every
attacking connection. Before the phases, one replay against the real worker port must be
answered with a WELCOME (recorded as ``welcome_probe``).

Per phase it reports the tasks run, p50 and p99 of the round trip, p99 over the same
executor's quiet p99, tasks lost (submitted but never completed), the attacker's reached
rate and answers, and CPU as a share of the phase's wall time times the cores: the
attacker process (its own rusage), the interchange (htex_rs: the ``htex-rs-interchange``
thread of this process; Parsl: its interchange process) and this whole process (for
htex_rs it includes the interchange thread). Rounds alternate which executor goes first;
medians over rounds are printed, and ``--out`` writes the record (commit, date, machine,
versions, arguments, every round).

The attacker shares the machine's cores with everything it attacks; read its CPU share
beside the figures.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import errno
import json
import os
import platform
import queue
import resource
import selectors
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, deque
from typing import IO, Any, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
KINDS = ("htex_rs", "parsl")
PHASES = ("quiet", "hello", "refused", "half-open")
# The kernel keeps 15 bytes of a thread's name.
IX_THREAD = "htex-rs-interchange"[:15]

# ZMTP 3.1 greeting of a CURVE server (rfc.zeromq.org/spec/23): signature, version 3.1,
# mechanism padded to 20 bytes, as-server=1, filler.
SERVER_GREETING = b"\xff" + bytes(8) + b"\x7f" + b"\x03\x01" + b"CURVE".ljust(20, b"\0") + b"\x01" + bytes(31)
GREETING_LEN = 64
HELLO_FRAME_LEN = 202  # a short command frame: flags 0x04, size 200, "\x05HELLO" ...
assert len(SERVER_GREETING) == GREETING_LEN


def noop(x: int = 0) -> int:
    return x


# ------------------------------------------------------------------ the attacker process
class Conn:
    """One attacking connection: the bytes still to send and what the server answered."""

    __slots__ = ("sock", "opened", "out", "got", "connected", "greeted", "welcomed", "done")

    def __init__(self, sock: socket.socket, opened: float, out: bytes) -> None:
        self.sock = sock
        self.opened = opened
        self.out = out
        self.got = bytearray()
        self.connected = False
        self.greeted = False
        self.welcomed = False
        self.done = False


class Attacker:
    """The attacker's loop: ``hello`` opens ``rate`` connections a second and closes each
    ``close_after`` seconds after it opened; ``half-open`` opens ``count`` and holds them.
    Reads ``stop`` (or EOF) on stdin; prints a ``ready`` line and a final line of counters."""

    def __init__(self, mode: str, port: int, payload: bytes, rate: float, count: int, close_after: float) -> None:
        self.mode, self.addr, self.payload = mode, ("127.0.0.1", port), payload
        self.rate, self.count, self.close_after = rate, count, close_after
        self.sel = selectors.DefaultSelector()
        self.live: deque[Conn] = deque()  # in order of opening
        self.n: Counter[str] = Counter()
        self.failed: Counter[str] = Counter()
        self.stopping = False

    def open_one(self, now: float) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        err = s.connect_ex(self.addr)
        self.n["opened"] += 1
        if err not in (0, errno.EINPROGRESS):
            self.failed[errno.errorcode.get(err, str(err))] += 1
            s.close()
            return
        c = Conn(s, now, self.payload)
        self.live.append(c)
        self.sel.register(s, selectors.EVENT_WRITE, c)

    def finish(self, c: Conn) -> None:
        if not c.done:
            c.done = True
            self.sel.unregister(c.sock)
            c.sock.close()

    def on_event(self, c: Conn, ev: int) -> None:
        if ev & selectors.EVENT_WRITE:
            if not c.connected:
                err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    self.failed[errno.errorcode.get(err, str(err))] += 1
                    self.finish(c)
                    return
                c.connected = True
                self.n["connected"] += 1
            try:
                sent = c.sock.send(c.out)
            except OSError as e:
                self.failed[type(e).__name__] += 1
                self.finish(c)
                return
            c.out = c.out[sent:]
            if not c.out:
                self.n["sent"] += 1
                self.sel.modify(c.sock, selectors.EVENT_READ, c)
            return
        try:
            data = c.sock.recv(4096)
        except OSError:
            self.n["reset_by_server"] += 1
            self.finish(c)
            return
        if not data:
            self.n["closed_by_server"] += 1
            self.finish(c)
            return
        if len(c.got) < 128:
            c.got += data
        if not c.greeted and len(c.got) >= GREETING_LEN:
            c.greeted = True
            self.n["greeted"] += 1
        body = bytes(c.got[GREETING_LEN + 2:GREETING_LEN + 10])
        if not c.welcomed and body == b"\x07WELCOME":
            c.welcomed = True
            self.n["welcomed"] += 1
        elif body.startswith(b"\x05ERROR") and not c.welcomed:
            c.welcomed = True  # counted once, as an answer that is not a WELCOME
            self.n["error_answers"] += 1

    def report(self, t0: float) -> dict[str, Any]:
        ru = resource.getrusage(resource.RUSAGE_SELF)
        return {"t": time.monotonic() - t0, "cpu_s": ru.ru_utime + ru.ru_stime, "counts": dict(self.n),
                "failed": dict(self.failed), "held": sum(1 for c in self.live if not c.done and not c.out)}

    def run(self) -> None:
        stdin = sys.stdin.fileno()
        self.sel.register(stdin, selectors.EVENT_READ, None)
        t0 = time.monotonic()
        ready = False
        if self.mode == "half-open":
            for _ in range(self.count):
                self.open_one(t0)
            ramp_end = t0 + 10.0  # SYNs the listen backlog refused are retried for seconds
        else:
            ramp_end = t0 + 0.5  # the flood is on when the clock starts
        allowance, last = 0.0, t0
        while not self.stopping:
            now = time.monotonic()
            timeout = 0.05
            if self.mode == "hello":
                allowance = min(allowance + (now - last) * self.rate, max(1.0, self.rate * 0.02))
                last = now
                while allowance >= 1.0:
                    self.open_one(now)
                    allowance -= 1.0
                while self.live and (self.live[0].done or now - self.live[0].opened >= self.close_after):
                    self.finish(self.live.popleft())
                timeout = min(timeout, (1.0 - allowance) / self.rate)
                if self.live:
                    timeout = min(timeout, max(0.0, self.live[0].opened + self.close_after - now))
            if not ready:
                # Half-open: ready once every connection has the server's greeting (or is gone).
                pending = self.mode == "half-open" and any(not c.done and not c.greeted for c in self.live)
                if now >= ramp_end or (self.mode == "half-open" and not pending):
                    ready = True
                    print("ready " + json.dumps(self.report(t0)), flush=True)
            for key, ev in self.sel.select(timeout):
                if key.data is None:
                    os.read(stdin, 4096)  # "stop", or EOF: the bench is gone
                    self.stopping = True
                else:
                    self.on_event(key.data, ev)
        final = self.report(t0)
        for c in self.live:
            self.finish(c)
        print(json.dumps(final), flush=True)


def refused_clients(port: int, server_key: bytes, rate: float, close_after: float) -> None:
    """The ``refused`` attacker: ``rate`` libzmq CURVE DEALERs a second, each with a fresh
    key pair the server does not admit and the right server key, closed ``close_after``
    seconds after it connected: every one is a whole handshake (HELLO, INITIATE, vouch)
    ending in ERROR 400. Same protocol on stdin/stdout as :class:`Attacker`."""
    import zmq

    ctx = zmq.Context()
    sel = selectors.DefaultSelector()
    sel.register(sys.stdin.fileno(), selectors.EVENT_READ, None)
    live: deque[tuple[float, zmq.Socket[bytes]]] = deque()
    n: Counter[str] = Counter()
    t0 = last = time.monotonic()
    allowance, ready = 0.0, False

    def report() -> dict[str, Any]:
        ru = resource.getrusage(resource.RUSAGE_SELF)  # libzmq's I/O thread included
        return {"t": time.monotonic() - t0, "cpu_s": ru.ru_utime + ru.ru_stime, "counts": dict(n),
                "failed": {}, "held": len(live)}

    while True:
        now = time.monotonic()
        allowance = min(allowance + (now - last) * rate, max(1.0, rate * 0.02))
        last = now
        while allowance >= 1.0:
            sock = ctx.socket(zmq.DEALER)
            sock.linger = 0
            sock.curve_publickey, sock.curve_secretkey = zmq.curve_keypair()
            sock.curve_serverkey = server_key
            sock.connect(f"tcp://127.0.0.1:{port}")
            live.append((now, sock))
            n["opened"] += 1
            allowance -= 1.0
        while live and now - live[0][0] >= close_after:
            live.popleft()[1].close()
        if not ready and now >= t0 + 0.5:
            ready = True
            print("ready " + json.dumps(report()), flush=True)
        if sel.select(max(0.0, (1.0 - allowance) / rate)):
            os.read(sys.stdin.fileno(), 4096)  # "stop", or EOF
            break
    final = report()
    for _, sock in live:
        sock.close()
    ctx.term()
    print(json.dumps(final), flush=True)


def attacker_main(args: argparse.Namespace) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if args.attacker == "refused":
        refused_clients(args.port, bytes.fromhex(args.payload), args.rate, args.close_ms / 1e3)
        return
    a = Attacker(args.attacker, args.port, bytes.fromhex(args.payload), args.rate, args.half_open, args.close_ms / 1e3)
    try:
        a.run()
    except KeyboardInterrupt:  # the bench cleans up and reports; this process just ends
        pass


class AttackerProcess:
    """The attacker as a subprocess of this file: started, waited on until ``ready``,
    stopped, and killed whatever happened."""

    def __init__(self, mode: str, port: int, payload: bytes, args: argparse.Namespace) -> None:
        cmd = [sys.executable, os.path.abspath(__file__), "--attacker", mode, "--port", str(port),
               "--payload", payload.hex(), "--rate", str(args.rate), "--half-open", str(args.half_open),
               "--close-ms", str(args.close_ms)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.lines: queue.Queue[Optional[str]] = queue.Queue()
        threading.Thread(target=self._read, args=(self.proc.stdout,), daemon=True).start()

    def _read(self, out: IO[str]) -> None:
        for line in out:
            self.lines.put(line)
        self.lines.put(None)

    def _line(self, timeout: float) -> str:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise RuntimeError(f"the attacker said nothing for {timeout:.0f} s") from None
        if line is None:
            raise RuntimeError(f"the attacker exited (rc {self.proc.wait()}) before reporting")
        return line

    def ready(self) -> dict[str, Any]:
        line = self._line(60)
        if not line.startswith("ready "):
            raise RuntimeError(f"the attacker said {line!r}")
        return dict(json.loads(line[len("ready "):]))

    def stop(self) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write("stop\n")
        self.proc.stdin.flush()
        return dict(json.loads(self._line(60)))

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                f.close()


# ------------------------------------------------------------------ the HELLO
def recv_exactly(conn: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        if not chunk:
            raise RuntimeError(f"peer closed after {len(buf)} of {n} bytes")
        buf += chunk
    return buf


def capture_hello(server_public: bytes) -> bytes:
    """The greeting and HELLO frame a libzmq CURVE client sends to a server with this
    public key (z85), captured by playing the server's greeting on a plain socket."""
    import zmq

    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)
    ctx = zmq.Context()
    dealer = ctx.socket(zmq.DEALER)
    try:
        public, secret = zmq.curve_keypair()
        dealer.curve_serverkey = server_public
        dealer.curve_publickey = public
        dealer.curve_secretkey = secret
        dealer.linger = 0
        dealer.connect(f"tcp://127.0.0.1:{listener.getsockname()[1]}")
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(10)
            conn.sendall(SERVER_GREETING)  # libzmq sends its greeting in parts, waiting for ours
            greeting = recv_exactly(conn, GREETING_LEN)
            hello = recv_exactly(conn, HELLO_FRAME_LEN)
    finally:
        dealer.close(0)
        ctx.term()
        listener.close()
    if greeting[0] != 0xFF or greeting[10:12] != b"\x03\x01" or greeting[12:17] != b"CURVE":
        raise RuntimeError(f"not a ZMTP 3.1 CURVE greeting: {greeting.hex()}")
    if hello[:2] != b"\x04\xc8" or hello[2:8] != b"\x05HELLO":
        raise RuntimeError(f"not a CURVE HELLO frame: {hello[:16].hex()}")
    return greeting + hello


def probe_welcome(port: int, payload: bytes) -> str:
    """Replay the captured greeting and HELLO to the worker port once: what came back."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(payload)
        got = b""
        try:
            while len(got) < GREETING_LEN + 10:
                chunk = s.recv(4096)
                if not chunk:
                    return f"closed after {len(got)} bytes"
                got += chunk
        except TimeoutError:
            return f"timeout after {len(got)} bytes"
    body = got[GREETING_LEN + 2:GREETING_LEN + 10]
    if body == b"\x07WELCOME":
        return "WELCOME"
    return f"not a WELCOME: {got[GREETING_LEN:GREETING_LEN + 16]!r}"


def server_public_key(ex: Any) -> bytes:
    import zmq.auth

    public, _ = zmq.auth.load_certificate(os.path.join(ex.cert_dir, "server.key"))
    return bytes(public)


# ------------------------------------------------------------------ executors
def make(kind: str, run_dir: str, workers: int) -> Any:
    """As compare.py makes them: one block of ``workers`` on 127.0.0.1, here encrypted.
    Imported here: the attacker process never loads Parsl."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import compare

    return compare.make(kind, run_dir, workers, True, 0)


def start(ex: Any) -> None:
    ex.start()
    ex.scale_out_facade(1)
    ex.submit(noop, {}, 0).result(timeout=120)  # the pool has registered


def stop(ex: Any) -> None:
    """Shut down, then cancel the block through the provider. Not through ``scale_in_facade``
    as compare.py does: Parsl's asks its interchange which blocks are idle, and waits for
    ever when a Ctrl-C (which reaches the interchange's process too) has ended it."""
    try:
        ex.shutdown()
    finally:
        ex.provider.cancel(list(ex.blocks_to_job_id.values()))


class CpuProbe:
    """CPU seconds so far of the interchange and of this process. (Not the worker pools': the
    provider's launch does not leave them among this process's descendants.)"""

    def __init__(self, kind: str, ex: Any) -> None:
        import psutil

        self.me = psutil.Process()
        self.tick = os.sysconf("SC_CLK_TCK")
        self.ix_tid: Optional[int] = None
        self.ix_proc: Optional[psutil.Process] = None
        if kind == "htex_rs":
            for tid in os.listdir("/proc/self/task"):
                with open(f"/proc/self/task/{tid}/comm") as f:
                    if f.read().strip() == IX_THREAD:
                        self.ix_tid = int(tid)
            if self.ix_tid is None:
                raise RuntimeError(f"no thread named {IX_THREAD!r} in this process")
        else:
            proc = getattr(ex, "interchange_proc", None)
            pid = getattr(proc, "pid", None)
            if pid is None:  # an older Parsl: find it by its command line
                pid = next((p.pid for p in self.me.children(recursive=True)
                            if "interchange" in " ".join(p.cmdline())), None)
            if pid is None:
                raise RuntimeError("cannot find Parsl's interchange process")
            self.ix_proc = psutil.Process(pid)

    def interchange(self) -> float:
        if self.ix_proc is not None:
            t = self.ix_proc.cpu_times()
            return float(t.user + t.system)
        with open(f"/proc/self/task/{self.ix_tid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / self.tick  # utime, stime (fields 14, 15)

    def snapshot(self) -> dict[str, float]:
        t = self.me.cpu_times()
        return {"interchange": self.interchange(), "process": t.user + t.system}


# ------------------------------------------------------------------ measuring
def round_trips(ex: Any, seconds: float, task_timeout: float) -> tuple[list[float], list[Any], int]:
    """One task at a time for ``seconds``: (latencies in s, the futures, tasks that failed).
    A task that misses ``task_timeout`` is left running and counts the time waited."""
    lat: list[float] = []
    futs: list[Any] = []
    failed = 0
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        f = ex.submit(noop, {}, len(futs))
        futs.append(f)
        try:
            f.result(timeout=task_timeout)
        except concurrent.futures.TimeoutError:
            pass
        except Exception:
            failed += 1
        lat.append(time.perf_counter() - t)
    return lat, futs, failed


def completed(futs: list[Any], grace: float) -> int:
    """Tasks that returned a result, waiting up to ``grace`` seconds for the late ones."""
    concurrent.futures.wait(futs, timeout=grace)
    return sum(1 for f in futs if f.done() and not f.cancelled() and f.exception() is None)


def window(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """The attacker's figures between its ready line and its final line, and its totals."""
    return {"seconds": after["t"] - before["t"], "cpu_s": after["cpu_s"] - before["cpu_s"],
            "window": {k: v - before["counts"].get(k, 0) for k, v in after["counts"].items()},
            "total": after["counts"], "failed": after["failed"],
            "held_at_start": before["held"], "held_at_end": after["held"]}


def phase(name: str, ex: Any, probe: CpuProbe, payload: bytes, args: argparse.Namespace) -> dict[str, Any]:
    cores = os.cpu_count() or 1
    attacker: Optional[AttackerProcess] = None
    a0: dict[str, Any] = {}
    try:
        if name != "quiet":
            what = {"hello": payload, "refused": server_public_key(ex), "half-open": payload[:GREETING_LEN]}
            attacker = AttackerProcess(name, ex.worker_port, what[name], args)
            a0 = attacker.ready()
        c0, t0 = probe.snapshot(), time.monotonic()
        lat, futs, failed = round_trips(ex, args.seconds, args.task_timeout)
        wall = time.monotonic() - t0
        c1 = probe.snapshot()
        att = window(a0, attacker.stop()) if attacker is not None else None
    finally:
        if attacker is not None:
            attacker.kill()
    done = completed(futs, args.task_timeout)
    lat.sort()
    out: dict[str, Any] = {
        "tasks": len(futs), "completed": done, "lost": len(futs) - done, "failed": failed,
        "p50_ms": statistics.median(lat) * 1e3, "p99_ms": lat[int(0.99 * (len(lat) - 1))] * 1e3,
        "max_ms": lat[-1] * 1e3, "wall_s": wall,
        "cpu_s": {k: c1[k] - c0[k] for k in c0},
        "cpu_share": {k: (c1[k] - c0[k]) / (wall * cores) for k in c0},
    }
    if att is not None:
        out["attacker"] = att
        out["cpu_share"]["attacker"] = att["cpu_s"] / (att["seconds"] * cores)
        w, total = att["window"], att["total"]
        if name == "hello":
            out["conn_per_s"] = w.get("opened", 0) / att["seconds"]
            out["answered_share"] = w.get("welcomed", 0) / max(1, w.get("opened", 0))
        elif name == "refused":
            out["conn_per_s"] = w.get("opened", 0) / att["seconds"]
        else:
            out["answered_share"] = total.get("greeted", 0) / max(1, args.half_open)
    return out


def one_executor(kind: str, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="attack-") as d:
        ex = make(kind, d, args.workers)
        try:
            start(ex)
            probe = CpuProbe(kind, ex)
            payload = capture_hello(server_public_key(ex))
            rec: dict[str, Any] = {"kind": kind, "worker_port": ex.worker_port,
                                   "welcome_probe": probe_welcome(ex.worker_port, payload), "phases": {}}
            round_trips(ex, 1.0, args.task_timeout)  # warm
            for name in PHASES:
                print(f"  {kind}: {name} ...", file=sys.stderr, flush=True)
                res = phase(name, ex, probe, payload, args)
                rec["phases"][name] = res
                quiet = rec["phases"]["quiet"]["p99_ms"]
                res["p99_over_quiet"] = res["p99_ms"] / quiet if quiet else float("nan")
                time.sleep(args.settle)  # the attacker's connections closed and handled
            t = time.perf_counter()
            ex.submit(noop, {}, 0).result(timeout=args.task_timeout)
            rec["after_ms"] = (time.perf_counter() - t) * 1e3
            return rec
        finally:
            stop(ex)


# ------------------------------------------------------------------ the record
def git(*cmd: str) -> str:
    out = subprocess.run(["git", *cmd], capture_output=True, text=True, cwd=HERE, check=False)
    return out.stdout.strip()


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def environment() -> dict[str, Any]:
    import parsl
    import zmq

    try:
        from htex_rs import __version__ as htex_rs_version
    except ImportError:  # --kinds parsl without a build
        htex_rs_version = None
    return {
        "commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain")),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": {"cpu": cpu_model(), "cpus": os.cpu_count(), "nofile": resource.getrlimit(resource.RLIMIT_NOFILE),
                 "kernel": platform.release()},
        "versions": {"python": platform.python_version(), "parsl": parsl.__version__,
                     "htex_rs": htex_rs_version, "pyzmq": zmq.pyzmq_version(),
                     "libzmq (Parsl's)": zmq.zmq_version()},
    }


METRICS = ("tasks", "p50_ms", "p99_ms", "p99_over_quiet", "lost", "conn_per_s", "answered_share")
SHARES = ("attacker", "interchange", "process")


def medians(runs: list[dict[str, Any]], kinds: list[str]) -> dict[str, dict[str, dict[str, float]]]:
    med: dict[str, dict[str, dict[str, float]]] = {}
    for kind in kinds:
        mine = [r for r in runs if r["kind"] == kind]
        med[kind] = {}
        for name in PHASES:
            ph = [r["phases"][name] for r in mine]
            m = {k: statistics.median(p[k] for p in ph) for k in METRICS if k in ph[0]}
            m.update({f"{k}_cpu_share": statistics.median(p["cpu_share"][k] for p in ph)
                      for k in SHARES if k in ph[0]["cpu_share"]})
            if "attacker" in ph[0]:
                m["held_at_end"] = statistics.median(p["attacker"]["held_at_end"] for p in ph)
            med[kind][name] = m
    return med


def table(med: dict[str, dict[str, dict[str, float]]]) -> str:
    """Plain columns; "answered": of the hello connections, the share that got a WELCOME;
    of the half-open ones, the share that got the server's greeting."""
    head = (f"{'executor':<9}{'phase':<11}{'tasks':>7}{'p50 ms':>8}{'p99 ms':>8}{'p99/quiet':>10}{'lost':>6}"
            f"{'attack':>12}{'answered':>10}{'attacker':>10}{'interch.':>10}{'process':>9}")
    rows = [head]
    for kind, phases in med.items():
        for name, m in phases.items():
            if name in ("hello", "refused"):
                attack = f"{m['conn_per_s']:,.0f}/s"
            elif name == "half-open":
                attack = f"{m['held_at_end']:,.0f} held"
            else:
                attack = "-"
            answered = f"{m['answered_share'] * 100:.0f}%" if "answered_share" in m else "-"
            att = f"{m['attacker_cpu_share'] * 100:.0f}%" if "attacker_cpu_share" in m else "-"
            rows.append(f"{kind:<9}{name:<11}{m['tasks']:>7,.0f}{m['p50_ms']:>8.3f}{m['p99_ms']:>8.3f}"
                        f"{m['p99_over_quiet']:>10.2f}{m['lost']:>6.0f}{attack:>12}{answered:>10}{att:>10}"
                        f"{m['interchange_cpu_share'] * 100:>9.0f}%{m['process_cpu_share'] * 100:>8.0f}%")
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=1, help="rounds; each alternates which executor goes first")
    p.add_argument("--seconds", type=float, default=10.0, help="length of each phase's round-trip loop")
    p.add_argument("--rate", type=float, default=1000.0, help="hello and refused phases: new connections a second")
    p.add_argument("--half-open", type=int, default=5000, help="half-open phase: connections held")
    p.add_argument("--close-ms", type=float, default=20.0, help="hello and refused phases: each connection's life")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--task-timeout", type=float, default=10.0,
                   help="seconds a round trip may take before the loop moves on (the task is then late or lost)")
    p.add_argument("--settle", type=float, default=1.0, help="seconds between phases")
    p.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    p.add_argument("--out", default=None, help="write the JSON record here")
    p.add_argument("--attacker", choices=PHASES[1:], help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--payload", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.rate <= 0 or args.half_open < 0 or args.seconds <= 0:
        p.error("--rate and --seconds must be positive, --half-open not negative")
    if args.attacker:
        attacker_main(args)
        return

    env = environment()
    runs: list[dict[str, Any]] = []
    for r in range(args.rounds):
        order = args.kinds if r % 2 == 0 else args.kinds[::-1]
        for kind in order:
            print(f"round {r + 1}/{args.rounds}: {kind}", file=sys.stderr, flush=True)
            rec = one_executor(kind, args)
            rec["round"] = r
            runs.append(rec)
            print(f"  {kind}: replayed HELLO answered with {rec['welcome_probe']}; " + "; ".join(
                f"{n} p50 {ph['p50_ms']:.3f} p99 {ph['p99_ms']:.3f} ms, {ph['tasks']} tasks, {ph['lost']} lost"
                for n, ph in rec["phases"].items()), file=sys.stderr, flush=True)
    kinds = [k for k in KINDS if k in args.kinds]
    med = medians(runs, kinds)
    print(f"\n{args.workers} workers, encrypted, one-at-a-time no-op round trips, {args.seconds:g} s a phase, "
          f"hello at {args.rate:g}/s (each closed after {args.close_ms:g} ms), {args.half_open:,} half-open "
          f"(greeting sent, nothing more), {args.rounds} round(s), medians; CPU as % of wall time x "
          f"{os.cpu_count()} cores (process: this whole process, htex_rs's interchange thread included)")
    print(table(med))
    for rec in runs:
        if rec["welcome_probe"] != "WELCOME":
            print(f"note: {rec['kind']} round {rec['round'] + 1}: the replayed HELLO got {rec['welcome_probe']}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"bench": "attack", **env, "args": vars(args), "rounds": runs, "median": med}, f, indent=1)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
