"""When this pool's block ends: the batch job's end, so that tasks with a walltime go only
to pools with time left for them, and a pool about to end hands its unstarted tasks back.

In order: ``HTEX_RS_BLOCK_END`` (epoch seconds, an explicit override); Slurm's word for
the job's end (``SLURM_JOB_END_TIME``, else ``squeue``); the provider's ``walltime``
counted from this pool's start (the launch command passes it; the job started a little
earlier, by its ``worker_init``); else unknown."""
from __future__ import annotations

import datetime
import math
import os
import subprocess
from typing import Mapping, Optional


class BlockEndError(ValueError):
    """A block end or walltime that cannot be read; the message names the fix."""


def parse_walltime(text: Optional[str]) -> Optional[float]:
    """A provider's walltime (``"HH:MM:SS"``, ``"MM:SS"``, ``"SS"``, ``"D-HH:MM:SS"``, or
    seconds) in seconds; None for none."""
    if text is None or str(text).strip() in ("", "None", "none"):
        return None
    s = str(text).strip()
    try:
        days = 0
        if "-" in s:
            d, s = s.split("-", 1)
            days = int(d)
        parts = [float(p) for p in s.split(":")]
        if not 1 <= len(parts) <= 3 or any(p < 0 or not math.isfinite(p) for p in parts):
            raise ValueError(s)
        seconds = 0.0
        for p in parts:
            seconds = seconds * 60 + p
        seconds += days * 86400
    except ValueError:
        raise BlockEndError(f"walltime {text!r} is not a duration: write HH:MM:SS, e.g. 01:30:00") from None
    return seconds if seconds > 0 else None


def _slurm_end(env: Mapping[str, str]) -> Optional[float]:
    if env.get("SLURM_JOB_END_TIME", "").strip().isdigit():
        return float(env["SLURM_JOB_END_TIME"])
    job = env.get("SLURM_JOB_ID")
    if not job:
        return None
    try:
        out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%e"], capture_output=True, text=True,
                             timeout=10).stdout.strip()
        # squeue prints the end in the local time zone, without one: "2026-12-07T21:30:00".
        return datetime.datetime.strptime(out, "%Y-%m-%dT%H:%M:%S").timestamp()
    except (OSError, subprocess.SubprocessError, ValueError):
        return None  # no squeue here, or "N/A" for a job without a time limit


def block_end(walltime: Optional[float], started: float,
              env: Mapping[str, str] = os.environ) -> Optional[float]:
    """This block's end in epoch seconds, or None when nothing says."""
    return block_end_and_source(walltime, started, env)[0]


def block_end_and_source(walltime: Optional[float], started: float,
                         env: Mapping[str, str] = os.environ) -> tuple[Optional[float], str]:
    """This block's end and what said so: ``HTEX_RS_BLOCK_END``, ``slurm``, ``walltime``
    (the provider's, from the pool's start) or ``unknown``."""
    explicit = env.get("HTEX_RS_BLOCK_END", "").strip()
    if explicit:
        try:
            end = float(explicit)
        except ValueError:
            raise BlockEndError(f"HTEX_RS_BLOCK_END={explicit!r} is not a time: write the block's end in "
                                "seconds since the epoch, e.g. $(date -d '+1 hour' +%s)") from None
        if not math.isfinite(end):
            raise BlockEndError(f"HTEX_RS_BLOCK_END={explicit!r} is not a time")
        return end, "HTEX_RS_BLOCK_END"
    slurm = _slurm_end(env)
    if slurm is not None:
        return slurm, "slurm"
    return (started + walltime, "walltime") if walltime else (None, "unknown")


def describe(end: Optional[float], source: str, now: float) -> str:
    """``"ends in 3540 s (slurm)"``, or ``"end unknown"``."""
    return "end unknown" if end is None else f"ends in {end - now:.0f} s ({source})"
