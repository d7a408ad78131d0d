"""htex_rs: a Rust-accelerated, Parsl-compatible HighThroughputExecutor.

Swap it in with one import line::

    from htex_rs import HighThroughputExecutor
"""
from htex_rs import parsl_range

parsl_range.check()  # before anything imports Parsl's internals

from htex_rs._core import PROTOCOL_VERSION, VERSION  # noqa: E402
from htex_rs.executor import HighThroughputExecutor  # noqa: E402
from htex_rs.mpi_executor import MPIExecutor  # noqa: E402

__version__ = VERSION
__all__ = ["HighThroughputExecutor", "MPIExecutor", "PROTOCOL_VERSION", "__version__"]
