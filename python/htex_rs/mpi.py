"""MPI mode (Parsl's ``MPIExecutor`` / ``enable_mpi_mode``): the nodes of the pool's
batch job are shared by its workers, and a task asking for ``num_nodes`` runs with that
many nodes to itself, told which through Parsl's ``PARSL_MPI_PREFIX`` and friends.

Parsl's manager keeps a backlog of tasks waiting for nodes. htex_rs's workers take
tasks straight from the Rust pool, so the nodes are shared through lock files in
the pool's directory instead: a task holds an exclusive ``flock`` on each of its nodes'
files while it runs, the kernel drops them if its worker dies (no node leaks), and one
allocation lock makes taking several nodes all-or-nothing. A task asking for more nodes
than the batch job has fails at once (Parsl would wait forever)."""
from __future__ import annotations

import fcntl
import os
import time
from typing import Any, Optional

from parsl.executors.high_throughput.mpi_prefix_composer import compose_all
from parsl.executors.high_throughput.mpi_resource_management import (
    MPINodesUnavailable,
    get_nodes_in_batchjob,
    identify_scheduler,
)

NODES_ENV = "HTEX_RS_MPI_NODES"      # comma-separated nodes of the batch job
LOCKS_ENV = "HTEX_RS_MPI_LOCK_DIR"   # where the pool's node lock files are
LAUNCHER_ENV = "HTEX_RS_MPI_LAUNCHER"


def pool_env(lock_dir: str, launcher: str) -> dict[str, str]:
    """For the pool: find the batch job's nodes, make their lock files, and return the
    environment its workers need."""
    nodes = get_nodes_in_batchjob(identify_scheduler())
    os.makedirs(lock_dir, exist_ok=True)
    for n in nodes:
        open(os.path.join(lock_dir, n), "a").close()
    return {NODES_ENV: ",".join(nodes), LOCKS_ENV: lock_dir, LAUNCHER_ENV: launcher}


class TooManyNodes(MPINodesUnavailable):
    """A task asks for more nodes than its batch job has: it could never run."""

    def __init__(self, requested: int, nodes: list[str]) -> None:
        super().__init__(requested=requested, available=len(nodes))
        self.nodes = nodes

    def __str__(self) -> str:
        return (f"the task asks for num_nodes={self.requested} but its batch job has {self.available} "
                f"node(s) ({', '.join(self.nodes)}); ask for at most {self.available}, or give the "
                f"provider's blocks more nodes (nodes_per_block)")


class Allocation:
    """Nodes held by one task; ``release()`` (or the process ending) frees them."""

    def __init__(self, nodes: list[str], fds: list[int]) -> None:
        self.nodes = nodes
        self._fds = fds

    def release(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []


class NodePool:
    """A batch job's nodes as one worker sees them; ``launcher`` makes the prefixes."""

    def __init__(self, nodes: list[str], lock_dir: str, launcher: str = "mpiexec") -> None:
        self.nodes = nodes
        self.lock_dir = lock_dir
        self.launcher = launcher

    @classmethod
    def from_env(cls) -> Optional[NodePool]:
        """The pool's nodes in a worker of an MPI-mode pool, else None."""
        nodes = os.environ.get(NODES_ENV)
        if not nodes:
            return None
        return cls(nodes.split(","), os.environ[LOCKS_ENV], os.environ[LAUNCHER_ENV])

    def _try_take(self, n: int) -> Optional[Allocation]:
        with open(os.path.join(self.lock_dir, ".allocate"), "a") as guard:
            fcntl.flock(guard, fcntl.LOCK_EX)
            taken: list[str] = []
            fds: list[int] = []
            for node in self.nodes:
                fd = os.open(os.path.join(self.lock_dir, node), os.O_RDONLY)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    continue
                taken.append(node)
                fds.append(fd)
                if len(taken) == n:
                    return Allocation(taken, fds)
            for fd in fds:
                os.close(fd)
            return None

    def acquire(self, n: int, poll_s: float = 0.05) -> Allocation:
        """Wait until ``n`` nodes are free and take them."""
        if n > len(self.nodes):
            raise TooManyNodes(n, self.nodes)
        while True:
            got = self._try_take(n)
            if got is not None:
                return got
            time.sleep(poll_s)

    def set_task_env(self, spec: dict[str, Any], nodes: list[str]) -> None:
        """What Parsl's worker sets for an MPI task: PARSL_MPI_NODELIST and the launch
        prefixes (PARSL_MPI_PREFIX for this pool's launcher, PARSL_SRUN_PREFIX, ...)."""
        spec["MPI_NODELIST"] = ",".join(nodes)
        os.environ["PARSL_MPI_NODELIST"] = spec["MPI_NODELIST"]
        os.environ.update(compose_all(self.launcher, resource_spec=spec, node_hostnames=nodes))
