"""A real Slurm cluster for the provider tests: a private munged (its own key and
socket), slurmctld and one slurmd on this machine, and optionally a second node whose
slurmd runs in a network namespace (its own "host" on a veth pair), all under one
temporary directory with ports picked at start-up. Clients find it through
``SLURM_CONF``; ``address`` is where the nodes reach this machine. Debian's slurmd,
slurmctld, slurm-client and munge packages (installed by scripts/setup.sh)."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Optional

from support.netns_hosts import Namespace

NEEDED = ("munged", "slurmctld", "slurmd", "sbatch", "sinfo", "scontrol")


def _search_path() -> str:
    """PATH plus the sbin directories the daemons live in (not on a user's PATH)."""
    return os.environ.get("PATH", "") + ":/usr/sbin:/sbin"


def missing() -> list[str]:
    """The programs this cluster needs that are not installed."""
    return [p for p in NEEDED if shutil.which(p, path=_search_path()) is None]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sbin(name: str) -> str:
    return shutil.which(name, path=_search_path()) or name


class SlurmCluster:
    def __init__(self, root: Path, cpus: int = 2, second: Optional[Namespace] = None) -> None:
        self.root = root
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.host = socket.gethostname().split(".")[0]
        self.cpus = cpus
        self.second = second
        # With a second node the controller and this node are reached on the veth address.
        self.address = second.host_ip if second else "127.0.0.1"
        self.nodes = [self.host] + (["node2"] if second else [])
        self.procs: list[subprocess.Popen] = []
        self.stepds_before: set[int] = set()

    def start(self, timeout: float = 60) -> None:
        r = self.root
        self.stepds_before = _stepds()
        for d in ("state", "munge", *(f"spool-{n}" for n in self.nodes)):
            (r / d).mkdir(mode=0o700, exist_ok=True)
        key = r / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        sock = r / "munge" / "munge.socket"
        self._spawn([_sbin("munged"), "--foreground", "--force", "--key-file", str(key),
                     "--socket", str(sock), "--pid-file", str(r / "munge" / "munged.pid"),
                     "--log-file", str(r / "munge" / "munged.log"),
                     "--seed-file", str(r / "munge" / "munged.seed")])
        self.conf.write_text(f"""\
ClusterName=htexrs
SlurmctldHost={self.host}({self.address})
SlurmUser=root
SlurmdUser=root
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
AuthInfo=socket={sock}
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool-%n
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd-%n.pid
SlurmctldLogFile={r}/slurmctld.log
SlurmdLogFile={r}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
NodeName={self.host} NodeAddr={self.address} CPUs={self.cpus} State=UNKNOWN
{f"NodeName=node2 NodeAddr={self.second.ns_ip} CPUs={self.cpus} State=UNKNOWN" if self.second else ""}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
""")
        self._wait(lambda: sock.exists(), timeout, "munged did not start")
        self._spawn([_sbin("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        self._spawn([_sbin("slurmd"), "-D", "-f", str(self.conf), "-N", self.host])
        if self.second:
            # nsenter, not `ip netns exec`: that also remounts /sys, hiding the cgroup
            # filesystem slurmd needs.
            self._spawn(["nsenter", f"--net=/var/run/netns/{self.second.ns}", _sbin("slurmd"), "-D",
                         "-f", str(self.conf), "-N", "node2"])
        self._wait(self._node_idle, timeout, "the Slurm nodes did not become idle")

    def _spawn(self, argv: list[str]) -> None:
        log = open(self.root / f"{os.path.basename(argv[0])}-{len(self.procs)}.out", "wb")
        self.procs.append(subprocess.Popen(argv, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                           start_new_session=True))

    def _node_idle(self) -> bool:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], env=self.env, capture_output=True, text=True)
        states = dict(line.split() for line in out.stdout.splitlines() if line.strip())
        return out.returncode == 0 and all(states.get(n) == "idle" for n in self.nodes)

    def _wait(self, ok, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ok():
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"{what}: {p.args[0]} exited {p.returncode}; logs in {self.root}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} within {timeout}s; logs in {self.root}")
            time.sleep(0.2)

    def jobs(self) -> list[str]:
        """Ids of the jobs Slurm still has queued, running or completing."""
        out = subprocess.run(["squeue", "-h", "-o", "%i"], env=self.env, capture_output=True, text=True,
                             check=True)
        return out.stdout.split()

    def stop(self) -> None:
        """Cancel every job, let their step daemons finish, then stop the daemons; a
        step daemon still left (it outlives slurmd by design) is killed."""
        subprocess.run(["scancel", "--user", "root"], env=self.env, capture_output=True)
        deadline = time.monotonic() + 30
        while (self.jobs() or _stepds() - self.stepds_before) and time.monotonic() < deadline:
            time.sleep(0.2)
        for p in reversed(self.procs):
            p.terminate()
        for p in reversed(self.procs):
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for pid in _stepds() - self.stepds_before:
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass


def _stepds() -> set[int]:
    """Pids of running slurmstepd processes."""
    found = set()
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if (d / "comm").read_text().strip() == "slurmstepd" and \
                        "Z" not in (d / "stat").read_text().rsplit(")", 1)[1].split()[0]:
                    found.add(int(d.name))
            except OSError:
                pass
    return found
