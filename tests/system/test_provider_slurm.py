"""htex_rs under a real batch system: a Slurm cluster of two nodes (munged, slurmctld
and a slurmd on this machine, a second slurmd in its own network namespace, all started
by the fixture), Parsl's SlurmProvider submitting blocks with sbatch and SrunLauncher
starting the worker pools, as users run it on a cluster."""
from __future__ import annotations

import contextlib
import os
import subprocess

import pytest

from htex_rs import HighThroughputExecutor
from support import netns_hosts, slurm_cluster

pytestmark = [
    pytest.mark.timeout(240),
    pytest.mark.skipif(os.geteuid() != 0, reason="slurmd runs as root here"),
    pytest.mark.skipif(bool(slurm_cluster.missing()),
                       reason=f"Slurm not installed (scripts/setup.sh installs it): {slurm_cluster.missing()}"),
]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """The cluster; one node only where no network namespace can be made."""
    with contextlib.ExitStack() as stack:
        second = None
        if netns_hosts.available():
            try:
                second = stack.enter_context(netns_hosts.namespace())
            except subprocess.CalledProcessError:
                pass
        cluster = slurm_cluster.SlurmCluster(tmp_path_factory.mktemp("slurm"), second=second)
        stack.callback(cluster.stop)  # before the namespace goes
        cluster.start()
        yield cluster


@pytest.fixture
def slurm_env(slurm, monkeypatch):
    """sbatch/squeue/scancel called by the provider find the cluster through SLURM_CONF."""
    monkeypatch.setenv("SLURM_CONF", str(slurm.conf))
    return slurm


def where_am_i(seconds: float = 0):
    import os
    import time
    time.sleep(seconds)
    return os.environ.get("SLURM_JOB_ID"), os.environ["PARSL_WORKER_BLOCK_ID"], os.environ.get("SLURMD_NODENAME")


def slurm_executor(cluster, label: str, workers: int, **provider: object) -> HighThroughputExecutor:
    """htex_rs on the cluster's debug partition, pools started by srun, non-exclusive
    jobs (so several blocks fit on the small nodes); ``provider`` sets the block shape."""
    from parsl.launchers import SrunLauncher
    from parsl.providers import SlurmProvider
    provider.setdefault("walltime", "00:05:00")
    return HighThroughputExecutor(
        label=label, address=cluster.address, max_workers_per_node=workers, heartbeat_period=2,
        provider=SlurmProvider(partition="debug", exclusive=False, launcher=SrunLauncher(), **provider))


def test_slurm_provider_with_srun_launcher_runs_tasks_in_the_batch_job(slurm_env, load_dfk, try_assert):
    import parsl
    from parsl.config import Config
    ex = slurm_executor(slurm_env, "slurm", 2, nodes_per_block=1, init_blocks=1, min_blocks=1, max_blocks=1)
    load_dfk(Config(executors=[ex], strategy="none"))
    results = [f.result(timeout=120) for f in [parsl.python_app(where_am_i)() for _ in range(20)]]
    job_ids = {r[0] for r in results}
    assert len(job_ids) == 1 and None not in job_ids, f"tasks did not run inside one Slurm job: {job_ids}"
    assert {r[1] for r in results} == {"0"}
    assert job_ids == set(slurm_env.jobs()), "the block's job is not the one Slurm is running"
    assert ex.connected_blocks() == ["0"]
    assert [s.state.name for s in ex.status().values()] == ["RUNNING"]  # from squeue via the provider
    parsl.dfk().cleanup()
    try_assert(lambda: slurm_env.jobs() == [], "the block's Slurm job outlived the DFK", timeout_ms=30_000)


def limited(seconds: float, walltime: float | None = None):
    import os
    import time
    time.sleep(seconds)
    return os.environ.get("SLURM_JOB_ID")


def test_a_block_knows_its_end_from_slurm_and_takes_only_tasks_it_can_finish(slurm_env, load_dfk, try_assert):
    """A one-minute job: the pool reads its end from Slurm; a task whose walltime the
    block cannot cover waits (never sent, never failed) while short ones run in the job;
    before the job's end the pool leaves, and the waiting task is still only waiting."""
    import glob

    import parsl
    from parsl.config import Config
    ex = slurm_executor(slurm_env, "slurm_end", 1, nodes_per_block=1, init_blocks=1, min_blocks=0, max_blocks=1,
                        walltime="00:01:00")
    load_dfk(Config(executors=[ex], strategy="none"))
    try_assert(lambda: len(ex.connected_managers()) == 1, "the block's pool should register", timeout_ms=90_000)
    left = ex.connected_managers()[0]["time_left"]
    assert left is not None and 10 < left <= 60, left
    logs = "".join(open(p).read() for p in glob.glob(f"{ex.logdir}/**/manager.log", recursive=True))
    assert "(slurm)" in logs, "the pool should take its end from Slurm"
    app = parsl.python_app(limited)
    too_long = app(0, walltime=3600)
    short = [f.result(timeout=60) for f in [app(0.2, walltime=5) for _ in range(5)]]
    assert set(short) == set(slurm_env.jobs()), short
    assert not too_long.done()
    try_assert(lambda: not ex.connected_managers(), "the pool should leave before its job ends",
               timeout_ms=90_000)
    assert not too_long.done(), "a task no block could finish waits; it does not fail"


def test_auto_scaling_submits_blocks_with_sbatch_and_cancels_idle_ones(slurm_env, load_dfk, try_assert):
    """htex_auto_scale: with no block at start, queued tasks make the strategy submit two
    jobs (one worker each); once idle past max_idletime the strategy holds their
    managers and scancels them while the DFK is still running."""
    import parsl
    from parsl.config import Config
    ex = slurm_executor(slurm_env, "slurm_scale", 1, nodes_per_block=1, init_blocks=0, min_blocks=0, max_blocks=2,
                        parallelism=1)
    load_dfk(Config(executors=[ex], strategy="htex_auto_scale", strategy_period=0.5, max_idletime=2))
    assert slurm_env.jobs() == []
    futs = [parsl.python_app(where_am_i)(1.5) for _ in range(6)]
    results = [f.result(timeout=150) for f in futs]
    assert None not in {r[0] for r in results}
    assert len(ex.blocks_to_job_id) == 2, f"expected two blocks submitted, got {ex.blocks_to_job_id}"
    assert set(ex.connected_blocks()) == {"0", "1"}
    try_assert(lambda: slurm_env.jobs() == [], "idle blocks were not cancelled", timeout_ms=60_000)
    assert not any(m["active"] for m in ex.connected_managers()), "a cancelled block's manager is still active"
    # The executor scales out again for new work.
    assert parsl.python_app(where_am_i)().result(timeout=120)[0] is not None


def test_a_two_node_block_runs_one_pool_per_node(slurm_env, load_dfk, try_assert):
    """nodes_per_block=2 with SrunLauncher: srun starts a pool on each node (one of them
    in its own network namespace, reaching the interchange over the veth link); both
    register under the same block and both run tasks."""
    if slurm_env.second is None:
        pytest.skip("no network namespace for a second node here")
    import parsl
    from parsl.config import Config
    ex = slurm_executor(slurm_env, "slurm_two", 1, nodes_per_block=2, init_blocks=1, min_blocks=1, max_blocks=1)
    load_dfk(Config(executors=[ex], strategy="none"))
    try_assert(lambda: len(ex.connected_managers()) == 2, "both nodes' pools should register",
               timeout_ms=90_000)
    assert {m["block_id"] for m in ex.connected_managers()} == {"0"}
    results = [f.result(timeout=120) for f in [parsl.python_app(where_am_i)(0.3) for _ in range(12)]]
    assert {r[2] for r in results} == set(slurm_env.nodes), f"tasks did not run on both nodes: {results}"
    assert len({r[0] for r in results}) == 1, "one block, one Slurm job"


def mpi_task(hold_s: float = 0, parsl_resource_specification: dict = {}):  # noqa: B006 (Parsl's convention)
    """Launch one rank per node with $PARSL_MPI_PREFIX; report the nodes it ran on."""
    import os
    import subprocess
    import time
    start = time.time()
    out = subprocess.run(os.environ["PARSL_MPI_PREFIX"] + " printenv SLURMD_NODENAME", shell=True,
                         capture_output=True, text=True, check=True).stdout
    time.sleep(hold_s)
    return sorted(out.split()), os.environ["PARSL_MPI_NODELIST"], start, time.time()


def test_mpi_executor_gives_each_task_its_own_nodes(slurm_env, load_dfk):
    """htex_rs.MPIExecutor on a two-node block: a two-node task's ranks run on both
    nodes; two one-node tasks running at once get different nodes; a task asking for
    more nodes than the block has fails at once with the fix in its message."""
    if slurm_env.second is None:
        pytest.skip("no network namespace for a second node here")
    import parsl
    from parsl.config import Config
    from parsl.launchers import SimpleLauncher
    from parsl.providers import SlurmProvider

    from htex_rs import MPIExecutor
    from htex_rs.mpi import TooManyNodes
    ex = MPIExecutor(label="slurm_mpi", address=slurm_env.address, max_workers_per_block=2, mpi_launcher="srun",
                     heartbeat_period=2,
                     provider=SlurmProvider(partition="debug", nodes_per_block=2, init_blocks=1, min_blocks=1,
                                            max_blocks=1, walltime="00:05:00", exclusive=False,
                                            launcher=SimpleLauncher()))
    load_dfk(Config(executors=[ex], strategy="none"))
    app = parsl.python_app(mpi_task)
    ranks, nodelist, _, _ = app(parsl_resource_specification={"num_nodes": 2, "ranks_per_node": 1}).result(
        timeout=120)
    assert ranks == sorted(slurm_env.nodes) and sorted(nodelist.split(",")) == sorted(slurm_env.nodes)
    one = {"num_nodes": 1, "ranks_per_node": 1}
    a, b = [f.result(timeout=120) for f in [app(2.0, parsl_resource_specification=one) for _ in range(2)]]
    assert a[2] < b[3] and b[2] < a[3], "the two one-node tasks should run at the same time"
    assert {a[1], b[1]} == set(slurm_env.nodes), f"overlapping tasks shared a node: {a[1]}, {b[1]}"
    with pytest.raises(TooManyNodes, match="nodes_per_block"):
        app(parsl_resource_specification={"num_nodes": 3, "ranks_per_node": 1}).result(timeout=60)
