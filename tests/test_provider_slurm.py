"""htex_rs under a real batch system: a one-node Slurm cluster on loopback (munged,
slurmctld and slurmd started by the fixture), Parsl's SlurmProvider submitting blocks
with sbatch and SrunLauncher starting the worker pool, as users run it on a cluster."""
from __future__ import annotations

import os
import time

import pytest

import slurm_cluster
from htex_rs import HighThroughputExecutor

pytestmark = [
    pytest.mark.timeout(240),
    pytest.mark.skipif(os.geteuid() != 0, reason="slurmd runs as root here"),
    pytest.mark.skipif(bool(slurm_cluster.missing()),
                       reason=f"Slurm not installed (scripts/setup.sh installs it): {slurm_cluster.missing()}"),
]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    cluster = slurm_cluster.SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def slurm_env(slurm, monkeypatch):
    """sbatch/squeue/scancel called by the provider find the cluster through SLURM_CONF."""
    monkeypatch.setenv("SLURM_CONF", str(slurm.conf))
    return slurm


def where_am_i(seconds: float = 0):
    import os
    import time
    time.sleep(seconds)
    return os.environ.get("SLURM_JOB_ID"), os.environ["PARSL_WORKER_BLOCK_ID"], os.getpid()


def test_slurm_provider_with_srun_launcher_runs_tasks_in_the_batch_job(slurm_env, load_dfk, try_assert):
    import parsl
    from parsl.config import Config
    from parsl.launchers import SrunLauncher
    from parsl.providers import SlurmProvider
    ex = HighThroughputExecutor(
        label="slurm", address="127.0.0.1", max_workers_per_node=2, heartbeat_period=2,
        provider=SlurmProvider(partition="debug", nodes_per_block=1, init_blocks=1, min_blocks=1,
                               max_blocks=1, walltime="00:05:00", exclusive=False,
                               launcher=SrunLauncher()))
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


def test_auto_scaling_submits_blocks_with_sbatch_and_cancels_idle_ones(slurm_env, load_dfk, try_assert):
    """htex_auto_scale: with no block at start, queued tasks make the strategy submit two
    jobs (one worker each); once idle past max_idletime the strategy holds their
    managers and scancels them while the DFK is still running."""
    import parsl
    from parsl.config import Config
    from parsl.launchers import SrunLauncher
    from parsl.providers import SlurmProvider
    ex = HighThroughputExecutor(
        label="slurm_scale", address="127.0.0.1", max_workers_per_node=1, heartbeat_period=2,
        provider=SlurmProvider(partition="debug", nodes_per_block=1, init_blocks=0, min_blocks=0,
                               max_blocks=2, parallelism=1, walltime="00:05:00", exclusive=False,
                               launcher=SrunLauncher()))
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
