"""Constructor-time checks: bad configuration fails where the user wrote it, with the fix."""
from __future__ import annotations

import math
import numbers
from typing import Any, Optional, Tuple

from parsl.executors.errors import InvalidResourceSpecification

from htex_rs.errors import HtexRsConfigurationError

#: Per-task resources (Parsl's WorkQueue/TaskVine names and units): counts of cores and
#: GPUs, memory in MB. A task that names any of them is packed onto a pool with room.
RESOURCE_KEYS = ("cores", "memory", "gpus")
#: ``walltime``: seconds the task may run; the pool ends it past that (see ``walltime_of``).
ACCEPTED_RESOURCE_KEYS = frozenset({"priority", "walltime", *RESOURCE_KEYS})
_MINIMUM = {"cores": 1, "memory": 0, "gpus": 0}
_UNIT = {"cores": "a whole number of cores, at least 1", "memory": "whole megabytes (MB), 0 or more",
         "gpus": "a whole number of GPUs, 0 or more"}


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


def parse_resource_spec(spec: Optional[dict[str, Any]]) -> Tuple[float, Optional[dict[str, int]]]:
    """Validate a task's resource specification: (priority, inf if none; the cores/memory/
    gpus request, None if it names none of them)."""
    if not spec:
        return math.inf, None
    invalid = set(spec) - ACCEPTED_RESOURCE_KEYS
    if invalid:
        raise InvalidResourceSpecification(
            invalid,
            "Task resource specification only accepts these types of resources: "
            f"{', '.join(sorted(ACCEPTED_RESOURCE_KEYS))} (got {', '.join(sorted(map(str, invalid)))}; "
            "cores and gpus are counts, memory is in MB)",
        )
    priority = math.inf
    if "priority" in spec:
        prio = spec["priority"]
        if isinstance(prio, bool) or not isinstance(prio, numbers.Real) or math.isnan(prio):
            raise InvalidResourceSpecification(
                {"priority"},
                f"priority must be a number (lower runs first), got {prio!r} of type {type(prio).__name__}",
            )
        priority = float(prio)
    request = {key: _count(key, spec[key]) for key in RESOURCE_KEYS if key in spec}
    if request:
        request.setdefault("cores", 1)  # a task runs on at least one core
    return priority, request or None


def walltime_of(spec: Optional[dict[str, Any]], kwargs: dict[str, Any]) -> Optional[float]:
    """A task's time limit in seconds: Parsl's ``walltime=`` app argument (python and bash
    apps pass it to the executor in ``kwargs``), else ``parsl_resource_specification``'s
    ``walltime``; None for no limit."""
    if kwargs.get("walltime") is not None:
        where, value = "walltime=", kwargs["walltime"]
    elif spec and spec.get("walltime") is not None:
        where, value = "parsl_resource_specification's walltime", spec["walltime"]
    else:
        return None
    # bool first: True is 1 to Python, not a duration to a user.
    seconds = math.nan if isinstance(value, bool) else float(value) if isinstance(value, numbers.Real) else math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise InvalidResourceSpecification(
            {"walltime"}, f"{where} {value!r} is not valid: write a number of seconds greater than 0, "
                          "e.g. walltime=60")
    return seconds


def _count(key: str, value: Any) -> int:
    """A whole, non-negative count (cores at least 1); 4.0 is 4, 4.5 and "4" fail."""
    # bool first: True is 1 to Python, not a count to a user.
    whole = not isinstance(value, bool) and (isinstance(value, numbers.Integral) or (
        isinstance(value, numbers.Real) and math.isfinite(value) and float(value).is_integer()))
    if not whole or int(value) < _MINIMUM[key] or int(value) >= 2**32 and key != "memory":
        raise InvalidResourceSpecification(
            {key}, f"{key}={value!r} is not valid: write {_UNIT[key]}, e.g. "
                   f"parsl_resource_specification={{'{key}': {max(1, _MINIMUM[key])}}}")
    return int(value)
