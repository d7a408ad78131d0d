"""The Parsl releases htex_rs works with: the range in htex_rs's own package metadata
(``pyproject.toml``, the one place it is written), checked at import so that a Parsl
outside it fails at once, with the fix named, instead of somewhere inside a workflow."""
from __future__ import annotations

import importlib.metadata
import os
import re
from typing import Optional

OVERRIDE = "HTEX_RS_ANY_PARSL"


def release(version: str) -> tuple[int, ...]:
    """``2026.10.26`` -> ``(2026, 10, 26)``; Parsl's releases are dates."""
    return tuple(int(x) for x in re.findall(r"\d+", version)[:3])


def supported() -> Optional[tuple[str, str]]:
    """(lowest, first unsupported) from the installed htex_rs's requirements, or None
    when htex_rs runs from a source tree that was never installed."""
    try:
        requires = importlib.metadata.requires("htex_rs") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for req in requires:
        m = re.fullmatch(r"parsl\s*([<>=!~,.\d\s]+)", req.strip())
        if m:
            low = re.search(r">=\s*([\d.]+)", m.group(1))
            high = re.search(r"<\s*([\d.]+)", m.group(1))
            if low and high:
                return low.group(1), high.group(1)
    return None


def check() -> None:
    span = supported()
    if span is None or os.environ.get(OVERRIDE):
        return
    installed = importlib.metadata.version("parsl")
    low, high = span
    if not release(low) <= release(installed) < release(high):
        raise ImportError(
            f"htex_rs works with Parsl {low} up to (not including) {high}, but Parsl {installed} "
            f"is installed. Fix: pip install 'parsl>={low},<{high}' (or set {OVERRIDE}=1 to "
            "try this Parsl anyway)")
