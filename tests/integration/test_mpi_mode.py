"""MPI mode without a batch system: the node lock files shared by a pool's workers
(htex_rs.mpi) between real processes, and MPIExecutor's checks at construction and
submit. The end-to-end run on two Slurm nodes is in tests/system/test_provider_slurm.py."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest
from parsl.executors.errors import InvalidResourceSpecification
from parsl.launchers import SimpleLauncher, SingleNodeLauncher
from parsl.providers import LocalProvider

from htex_rs import MPIExecutor
from htex_rs.errors import HtexRsConfigurationError
from htex_rs.mpi import NodePool, TooManyNodes


def holder(lock_dir, nodes: int) -> subprocess.Popen:
    """Another process (a worker) that takes ``nodes`` nodes and keeps them."""
    code = textwrap.dedent(f"""
        import sys, time
        from htex_rs.mpi import NodePool
        held = NodePool(["n1", "n2", "n3"], {str(lock_dir)!r}).acquire({nodes})
        print(",".join(held.nodes), flush=True)
        time.sleep(600)
    """)
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)


def make_pool(lock_dir) -> NodePool:
    for n in ("n1", "n2", "n3"):
        open(os.path.join(lock_dir, n), "a").close()
    return NodePool(["n1", "n2", "n3"], str(lock_dir))


def test_nodes_are_held_exclusively_and_freed_when_their_process_dies(tmp_path):
    pool = make_pool(tmp_path)
    other = holder(tmp_path, 2)
    try:
        taken = set(other.stdout.readline().strip().split(","))
        assert len(taken) == 2
        assert pool._try_take(2) is None, "only one node is free"
        mine = pool._try_take(1)
        assert mine is not None and set(mine.nodes).isdisjoint(taken)
        mine.release()
        other.send_signal(signal.SIGKILL)  # a worker killed mid-task: the kernel drops its locks
        other.wait()
        everything = pool.acquire(3)
        assert sorted(everything.nodes) == ["n1", "n2", "n3"]
        everything.release()
    finally:
        other.kill()


def test_asking_for_more_nodes_than_the_job_has_fails_at_once(tmp_path):
    with pytest.raises(TooManyNodes, match=r"num_nodes=4 but its batch job has 3 node\(s\).*nodes_per_block"):
        make_pool(tmp_path).acquire(4)


def test_mpi_executor_checks_its_configuration_and_resource_specs(tmp_path):
    with pytest.raises(HtexRsConfigurationError, match="SimpleLauncher"):
        MPIExecutor(address="127.0.0.1", provider=LocalProvider(launcher=SingleNodeLauncher()))
    with pytest.raises(HtexRsConfigurationError, match="srun, aprun, mpiexec"):
        MPIExecutor(address="127.0.0.1", mpi_launcher="mpirun", provider=LocalProvider(launcher=SimpleLauncher()))
    ex = MPIExecutor(address="127.0.0.1", provider=LocalProvider(launcher=SimpleLauncher()))
    assert (ex.enable_mpi_mode, ex.max_workers_per_node) == (True, 1)  # Parsl's defaults
    assert ex.encrypted is True, "unlike Parsl's MPIExecutor: its worker port listens on every interface"
    with pytest.raises(InvalidResourceSpecification):
        ex.validate_resource_spec({})
    with pytest.raises(InvalidResourceSpecification):
        ex.validate_resource_spec({"num_nodes": 2, "priority": 1})
    spec = {"num_nodes": 2, "ranks_per_node": 4}
    ex.validate_resource_spec(spec)
    assert spec["num_ranks"] == "8", "filled in as Parsl does"


def test_mpi_executor_takes_parsls_parameters_with_parsls_defaults_but_encrypted():
    import inspect

    from parsl.executors import MPIExecutor as ParslMPIExecutor
    ours = {n: p.default for n, p in inspect.signature(MPIExecutor.__init__).parameters.items()}
    theirs = {n: p.default for n, p in inspect.signature(ParslMPIExecutor.__init__).parameters.items()}
    assert list(ours) == list(theirs)
    assert ours.pop("encrypted") is True, "encrypted by default, as htex_rs's HighThroughputExecutor"
    theirs.pop("encrypted")
    assert ours == theirs


def test_mpi_executor_with_its_defaults_starts_encrypted_and_does_not_warn(tmp_path, caplog):
    """Parsl's MPIExecutor defaults to encrypted=False with its worker port on every
    interface; ours starts with CURVE keys and so without the unencrypted-port warning."""
    ex = MPIExecutor(provider=LocalProvider(launcher=SimpleLauncher(), init_blocks=0, min_blocks=0, max_blocks=0))
    ex.run_dir = str(tmp_path)
    with caplog.at_level("WARNING", logger="htex_rs.executor"):
        ex.start()
    try:
        assert ex.cert_dir and os.path.exists(os.path.join(ex.cert_dir, "server.key_secret"))
        assert not [r for r in caplog.records if "unencrypted" in r.getMessage()]
    finally:
        ex.shutdown()
