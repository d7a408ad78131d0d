"""Constructor-time checks: bad configuration fails where the user wrote it, with the fix."""
from __future__ import annotations

import math
import numbers
from typing import Any, Optional, Tuple

from parsl.executors.errors import InvalidResourceSpecification

from htex_rs.errors import HtexRsConfigurationError

ACCEPTED_RESOURCE_KEYS = frozenset({"priority"})


def check_port(name: str, port: Optional[int]) -> None:
    if port is not None and not 1 <= port <= 65535:
        raise HtexRsConfigurationError(f"{name}={port} is out of range; use a TCP port between 1 and 65535")


def check_port_range(name: str, rng: Optional[Tuple[int, int]]) -> None:
    if rng is None:
        return
    lo, hi = rng
    if not (1 <= lo < hi <= 65536):
        raise HtexRsConfigurationError(
            f"{name}={rng!r} is not a valid port range; use (low, high) with 1 <= low < high <= 65536"
        )


def check_positive(name: str, value: float) -> None:
    if not value > 0:
        raise HtexRsConfigurationError(f"{name}={value!r} must be greater than 0")


def check_launch_cmd(launch_cmd: Optional[str]) -> None:
    if launch_cmd and "process_worker_pool.py" in launch_cmd:
        raise HtexRsConfigurationError(
            "launch_cmd starts Parsl's process_worker_pool.py, which cannot talk to the htex_rs "
            "interchange; use htex-rs-worker-pool (it takes the same options)"
        )


def check_resource_spec(spec: Optional[dict[str, Any]]) -> float:
    """Validate a task's resource specification; return its priority (inf if none)."""
    if not spec:
        return math.inf
    invalid = set(spec) - ACCEPTED_RESOURCE_KEYS
    if invalid:
        raise InvalidResourceSpecification(
            invalid,
            "Task resource specification only accepts these types of resources: priority "
            f"(got {', '.join(sorted(map(str, invalid)))})",
        )
    if "priority" in spec:
        prio = spec["priority"]
        if isinstance(prio, bool) or not isinstance(prio, numbers.Real) or math.isnan(prio):
            raise InvalidResourceSpecification(
                {"priority"},
                f"priority must be a number (lower runs first), got {prio!r} of type {type(prio).__name__}",
            )
        return float(prio)
    return math.inf
