"""Staging providers for Parsl ``File`` objects, each a Parsl ``Staging`` usable in
``storage_access=[...]``. ``default_staging`` is the set Parsl uses by default, built
from ours (Zip staging is Parsl's own)."""
from __future__ import annotations

from typing import Any

from parsl.data_provider.zip import ZipFileStaging

from htex_rs.staging.errors import StagingError
from htex_rs.staging.ftp import FTPInTaskStaging, FTPSeparateTaskStaging
from htex_rs.staging.http import HTTPInTaskStaging, HTTPSeparateTaskStaging
from htex_rs.staging.noop import NoOpFileStaging

#: Parsl's default set (file, FTP and HTTP(S) as separate tasks, zip), from our providers.
default_staging = [NoOpFileStaging(), FTPSeparateTaskStaging(), HTTPSeparateTaskStaging(), ZipFileStaging()]


def __getattr__(name: str) -> Any:
    # Optional providers with their own dependencies load on first use.
    if name == "GlobusStaging":
        from htex_rs.staging.globus import GlobusStaging
        return GlobusStaging
    if name == "RSyncStaging":
        from htex_rs.staging.rsync import RSyncStaging
        return RSyncStaging
    raise AttributeError(name)


__all__ = ["GlobusStaging", "RSyncStaging", "FTPInTaskStaging", "FTPSeparateTaskStaging", "HTTPInTaskStaging",
           "HTTPSeparateTaskStaging", "NoOpFileStaging", "StagingError", "default_staging"]
