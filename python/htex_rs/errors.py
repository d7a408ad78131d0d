"""Exceptions htex_rs raises, beside the Parsl ones it reuses (ManagerLost, WorkerLost)."""
from __future__ import annotations

from parsl.errors import ConfigurationError
from parsl.executors.high_throughput.errors import ManagerLost

# Raised by the native module (defined once, in rust/python/mod.rs): the interchange
# thread has ended; a query to it got no answer in time; a pool was stopped.
from htex_rs._core import CommandTimeout, InterchangeStopped, PoolStopped

# Raised where a worker connects to its pool (defined there: workers import stream.py
# before Parsl, and this module imports Parsl).
from htex_rs.stream import PoolSocketNotOurs

__all__ = ["BlockEnded", "CommandTimeout", "HtexRsConfigurationError", "InterchangeDied", "InterchangeStopped",
           "PoolStopped", "PoolSocketNotOurs", "ProtocolVersionMismatch", "ResourceRequestTooLarge",
           "TaskTooLarge"]


class BlockEnded(ManagerLost):
    """Parsl's ManagerLost for a task that was running when its block ended (its walltime,
    or the batch system's SIGTERM); ``reason`` says which. Tasks the block had not started
    were handed back and run elsewhere: only a running task ends this way."""

    def __init__(self, manager_id: bytes, hostname: str, reason: str) -> None:
        super().__init__(manager_id, hostname)
        self.reason = reason

    def __reduce__(self) -> tuple[type, tuple[bytes, str, str]]:
        return (type(self), (self.manager_id, self.hostname, self.reason))

    def __str__(self) -> str:
        return f"{super().__str__()}: {self.reason}"


class ProtocolVersionMismatch(Exception):
    """A worker pool speaks another htex_rs protocol or Python version."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class InterchangeDied(Exception):
    """The interchange thread stopped while tasks were outstanding."""


class HtexRsConfigurationError(ConfigurationError):
    """A constructor argument that htex_rs cannot run with; the message says the fix."""


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


class TaskTooLarge(ValueError):
    """A task (or a task's result) is larger than ``max_message_bytes``."""

    def __init__(self, what: str, size: int, limit: int) -> None:
        super().__init__(
            f"{what} is {_size(size)}, more than max_message_bytes={_size(limit)}; pass large data "
            "as files (parsl File objects) or raise HighThroughputExecutor.max_message_bytes")
        self.what, self.size, self.limit = what, size, limit

    def __reduce__(self) -> tuple[type[TaskTooLarge], tuple[str, int, int]]:
        return (type(self), (self.what, self.size, self.limit))


class ResourceRequestTooLarge(ValueError):
    """A task asks for more cores, memory or GPUs than any connected pool has; the
    message (the interchange's) names the request and the largest pool."""

    def __init__(self, task_id: int, why: str) -> None:
        super().__init__(f"task {task_id} cannot run: {why}")
        self.task_id, self.why = task_id, why

    def __reduce__(self) -> tuple[type[ResourceRequestTooLarge], tuple[int, str]]:
        return (type(self), (self.task_id, self.why))
