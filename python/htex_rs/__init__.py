"""htex_rs: a Rust-accelerated, Parsl-compatible HighThroughputExecutor.

Swap it in with one import line::

    from htex_rs import HighThroughputExecutor
"""
from htex_rs._core import PROTOCOL_VERSION, VERSION
from htex_rs.executor import HighThroughputExecutor
from htex_rs.mpi_executor import MPIExecutor

__version__ = VERSION
__all__ = ["HighThroughputExecutor", "MPIExecutor", "PROTOCOL_VERSION", "__version__"]
