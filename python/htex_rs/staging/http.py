"""HTTP(S) stage-in, as a separate task or inside the task: streamed in constant memory,
connect/read timeouts, retries with backoff on connection errors and 5xx, HTTP errors
raised (a 404 page is never saved as the file), Content-Length checked, and the final
path written atomically."""
from __future__ import annotations

import functools
import logging
import time
from typing import Any, Callable, Optional, Union

import parsl
import requests
from parsl.data_provider.staging import Staging
from parsl.utils import RepresentationMixin

from htex_rs.staging.atomic import atomic_destination, local_path_for
from htex_rs.staging.errors import StagingError

logger = logging.getLogger(__name__)

_RETRYABLE = (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError)


def fetch_http(url: str, dest: str, *, connect_timeout: float = 10.0, read_timeout: float = 60.0,
               retries: int = 3, backoff: float = 0.5, verify: Union[bool, str] = True,
               chunk_size: int = 1 << 18) -> int:
    """Download ``url`` to ``dest`` (whole or not at all); return the byte count.

    ``chunk_size`` stays at 256 KiB: with 1 MiB chunks glibc's growing mmap threshold moved
    the chunks onto the heap and a 400 MiB download raised peak RSS by ~100 MiB under load."""
    last: Optional[str] = None
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff * 2 ** (attempt - 1))
            logger.info("Retrying %s (attempt %d of %d) after: %s", url, attempt + 1, retries + 1, last)
        try:
            with requests.get(url, stream=True, timeout=(connect_timeout, read_timeout), verify=verify) as resp:
                if resp.status_code >= 500:
                    last = f"HTTP {resp.status_code} {resp.reason}"
                    continue
                if resp.status_code >= 400:
                    raise StagingError(url, f"HTTP {resp.status_code} {resp.reason}; nothing was written to {dest}")
                expected = resp.headers.get("Content-Length")
                received = 0
                with atomic_destination(dest) as f:
                    for chunk in resp.iter_content(chunk_size=chunk_size):
                        f.write(chunk)
                        received += len(chunk)
                    if expected is not None and "Content-Encoding" not in resp.headers \
                            and received != int(expected):
                        raise StagingError(url, f"received {received} of {expected} bytes; "
                                                f"nothing was written to {dest}")
                return received
        except _RETRYABLE as e:
            last = f"{type(e).__name__}: {e}"
    raise StagingError(url, f"failed after {retries + 1} attempts: {last}; nothing was written to {dest}")


class _Options(RepresentationMixin):
    def __init__(self, connect_timeout: float = 10.0, read_timeout: float = 60.0, retries: int = 3,
                 backoff: float = 0.5, verify: Union[bool, str] = True) -> None:
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.retries = retries
        self.backoff = backoff
        self.verify = verify

    def options(self) -> dict[str, Any]:
        return {"connect_timeout": self.connect_timeout, "read_timeout": self.read_timeout,
                "retries": self.retries, "backoff": self.backoff, "verify": self.verify}

    def can_stage_in(self, file) -> bool:
        return file.scheme in ("http", "https")


def _stage_in_task(working_dir: Optional[str], options: dict[str, Any], parent_fut=None,
                   outputs=(), _parsl_staging_inhibit: bool = True) -> None:
    file = outputs[0]
    fetch_http(file.url, file.local_path, **options)


class HTTPSeparateTaskStaging(_Options, Staging):
    """HTTP(S) stage-in as its own task on the same executor (needs a file system
    shared between that task and the app, as Parsl's provider does).

    :param connect_timeout: seconds to wait for the server to accept the connection
    :param read_timeout: seconds to wait for each chunk of the response
    :param retries: extra attempts after a connection error, a cut transfer or a 5xx
    :param backoff: first retry delay in seconds, doubled for each later retry
    :param verify: TLS verification: True, False, or a CA bundle path
    """

    def stage_in(self, dm, executor: str, file, parent_fut):
        working_dir = dm.dfk.executors[executor].working_dir
        local_path_for(file, working_dir)
        app = parsl.python_app(executors=[executor], data_flow_kernel=dm.dfk)(_stage_in_task)
        fut = app(working_dir, self.options(), outputs=[file], _parsl_staging_inhibit=True, parent_fut=parent_fut)
        return fut._outputs[0]


class _InTask:
    """The app wrapped by a download that runs first, on the worker. A class rather than
    a closure so it pickles by reference to this importable module."""

    def __init__(self, func: Callable, url: str, local_path: str, options: dict[str, Any]) -> None:
        functools.update_wrapper(self, func)
        self.func, self.url, self.local_path, self.options = func, url, local_path, options

    def __call__(self, *args, **kwargs):
        fetch_http(self.url, self.local_path, **self.options)
        return self.func(*args, **kwargs)


class HTTPInTaskStaging(_Options, Staging):
    """HTTP(S) stage-in inside the app's own task: no shared file system needed.
    Same options as :class:`HTTPSeparateTaskStaging`."""

    def stage_in(self, dm, executor: str, file, parent_fut):
        local_path_for(file, dm.dfk.executors[executor].working_dir)
        return None

    def replace_task(self, dm, executor: str, file, func: Callable) -> Callable:
        return _InTask(func, file.url, file.local_path, self.options())
