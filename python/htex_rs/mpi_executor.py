"""``htex_rs.MPIExecutor``: Parsl's ``MPIExecutor`` (HTEX in MPI mode) on htex_rs, with
Parsl's constructor. One pool per block on the block's first node (SimpleLauncher); each
task names the nodes it needs in its resource specification (``num_nodes``,
``ranks_per_node`` or ``num_ranks``, ``launcher_options``) and runs with that many nodes
of the block to itself, launching its ranks with ``$PARSL_MPI_PREFIX``."""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import typeguard
from parsl.data_provider.staging import Staging
from parsl.executors.high_throughput.mpi_prefix_composer import VALID_LAUNCHERS, validate_resource_spec
from parsl.executors.status_handling import BlockProviderExecutor
from parsl.jobs.states import JobStatus
from parsl.launchers import SimpleLauncher
from parsl.monitoring.radios.base import RadioConfig
from parsl.providers.base import ExecutionProvider

from htex_rs.errors import HtexRsConfigurationError
from htex_rs.executor import HighThroughputExecutor


class MPIExecutor(HighThroughputExecutor):
    """Drop-in for :class:`parsl.executors.MPIExecutor`; same parameters and defaults but
    one: ``encrypted`` is True, as for the HighThroughputExecutor (Parsl's MPIExecutor
    defaults to False). Its worker port listens on every interface unless ``address`` is
    set, and tasks and results cross it as pickles, so unencrypted anyone who can reach it
    could pose as a worker pool; pass ``encrypted=False`` to opt out.

    ``max_workers_per_block`` multi-node tasks run at once per block; the provider must
    use :class:`~parsl.launchers.SimpleLauncher` (the pool starts the ranks itself)."""

    enable_mpi_mode = True

    @typeguard.typechecked
    def __init__(self,
                 label: str = 'MPIExecutor',
                 provider: Optional[ExecutionProvider] = None,
                 launch_cmd: Optional[str] = None,
                 interchange_launch_cmd: Optional[str] = None,
                 address: Optional[str] = None,
                 loopback_address: str = "127.0.0.1",
                 worker_port: Optional[int] = None,
                 worker_port_range: Optional[Tuple[int, int]] = (54000, 55000),
                 interchange_port_range: Optional[Tuple[int, int]] = (55000, 56000),
                 storage_access: Optional[List[Staging]] = None,
                 working_dir: Optional[str] = None,
                 worker_debug: bool = False,
                 max_workers_per_block: int = 1,
                 prefetch_capacity: int = 0,
                 heartbeat_threshold: int = 120,
                 heartbeat_period: int = 30,
                 drain_period: Optional[int] = None,
                 poll_period: int = 10,
                 address_probe_timeout: Optional[int] = None,
                 worker_logdir_root: Optional[str] = None,
                 mpi_launcher: str = "mpiexec",
                 block_error_handler: Union[bool, Callable[[BlockProviderExecutor, Dict[str, JobStatus]], None]] = True,
                 encrypted: bool = True,
                 remote_monitoring_radio: Optional[RadioConfig] = None):
        if mpi_launcher not in VALID_LAUNCHERS:
            raise HtexRsConfigurationError(
                f"mpi_launcher={mpi_launcher!r} is not supported; use one of {', '.join(VALID_LAUNCHERS)}")
        super().__init__(
            cores_per_worker=1e-9,  # as Parsl: the worker count is max_workers_per_block
            max_workers_per_node=max_workers_per_block,
            label=label, provider=provider, launch_cmd=launch_cmd,
            interchange_launch_cmd=[interchange_launch_cmd] if interchange_launch_cmd else None,
            address=address, loopback_address=loopback_address, worker_port=worker_port,
            worker_port_range=worker_port_range, interchange_port_range=interchange_port_range,
            storage_access=storage_access, working_dir=working_dir, worker_debug=worker_debug,
            prefetch_capacity=prefetch_capacity, heartbeat_threshold=heartbeat_threshold,
            heartbeat_period=heartbeat_period, drain_period=drain_period, poll_period=poll_period,
            address_probe_timeout=address_probe_timeout, worker_logdir_root=worker_logdir_root,
            block_error_handler=block_error_handler, encrypted=encrypted,
            remote_monitoring_radio=remote_monitoring_radio)
        self.mpi_launcher = mpi_launcher
        self.max_workers_per_block = max_workers_per_block
        if not isinstance(getattr(self.provider, "launcher", None), SimpleLauncher):
            raise HtexRsConfigurationError(
                f"MPIExecutor needs the provider to use a SimpleLauncher (got "
                f"{type(getattr(self.provider, 'launcher', None)).__name__}): one pool per block, on its "
                f"first node, launches each task's ranks with $PARSL_MPI_PREFIX; set "
                f"launcher=SimpleLauncher() on the provider")

    def validate_resource_spec(self, resource_specification: dict[str, Any]) -> None:
        validate_resource_spec(resource_specification)

    def monitor_resources(self) -> bool:
        """As Parsl: a task's processes span nodes, so per-task resource monitoring is off."""
        return False
