"""HTTP(S) stage-in, as a separate task or inside the task: streamed in constant memory,
connect/read timeouts, retries with backoff on connection errors, 5xx and cut transfers
(one ``urllib3`` ``Retry`` budget for all of them), HTTP errors raised (a 404 page is
never saved as the file), Content-Length checked, and the final path written atomically."""
from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import parsl
import requests
from parsl.app.futures import DataFuture
from parsl.data_provider.files import File
from parsl.data_provider.staging import Staging
from parsl.dataflow.futures import AppFuture
from parsl.utils import RepresentationMixin
from requests.adapters import HTTPAdapter
from urllib3.exceptions import MaxRetryError
from urllib3.util.retry import Retry

from htex_rs.staging.atomic import atomic_destination, local_path_for, working_dir_of
from htex_rs.staging.errors import StagingError

if TYPE_CHECKING:
    from concurrent.futures import Future

    from parsl.data_provider.data_manager import DataManager

logger = logging.getLogger(__name__)

Verify = bool | str  # requests' verify: on/off or a CA bundle path

#: Every 5xx is worth another try; a 4xx is the URL's fault and is raised at once.
_SERVER_ERRORS = frozenset(range(500, 600))

#: Failures while the body streams, after urllib3 handed over the response: its Retry never
#: sees them (requests raises ConnectionError for a read timeout there, ChunkedEncodingError
#: for a cut connection), so :func:`fetch_http` spends the same Retry budget on them itself.
_BODY_ERRORS = (requests.ConnectionError, requests.exceptions.ChunkedEncodingError)


class _Backoff(Retry):
    """``Retry`` with the documented schedule of ``backoff``: the first retry waits
    ``backoff`` seconds and each later one twice the one before (urllib3's own schedule
    retries the first time at once). A server's Retry-After still takes precedence."""

    def get_backoff_time(self) -> float:
        errors = 0
        for past in reversed(self.history):  # the current run of failures; redirects end it
            if past.redirect_location is not None:
                break
            errors += 1
        if errors == 0:
            return 0.0
        return float(min(self.backoff_max, self.backoff_factor * 2 ** (errors - 1)))


def retry_policy(retries: int, backoff: float) -> Retry:
    """The retry policy of one download: ``retries`` extra attempts in all, whatever failed."""
    # total alone counts: connect, read, status and other stay unset so they draw on it.
    # raise_on_status=False: after the last 5xx the response comes back, so the error can
    # name the status instead of urllib3's "too many 500 error responses".
    return _Backoff(total=retries, backoff_factor=backoff, status_forcelist=_SERVER_ERRORS,
                    allowed_methods=frozenset({"GET"}), raise_on_status=False)


class _ShortBody(Exception):
    """The connection closed cleanly before Content-Length bytes came (urllib3 1.x does
    not always raise for that); retried like a cut connection."""


def _attempts(n: int) -> str:
    return f"{n} attempt" + ("" if n == 1 else "s")


def _cause(e: Exception) -> str:
    """``e``'s type and the message at the bottom of what it wraps: requests wraps urllib3's
    MaxRetryError ("Max retries exceeded ... (Caused by ...)") or ProtocolError, whose
    str() is a tuple repr; the innermost message says what happened."""
    inner: BaseException = e
    for _ in range(5):  # wrappers are a few deep; never loop on a cycle
        if isinstance(inner, MaxRetryError) and inner.reason is not None:
            inner = inner.reason
        elif inner.args and isinstance(inner.args[0], BaseException):
            inner = inner.args[0]
        else:
            break
    message = inner.args[0] if len(inner.args) > 1 and isinstance(inner.args[0], str) else str(inner)
    return f"{type(e).__name__}: {message}"


def _save_body(dest: str, resp: requests.Response, chunk_size: int) -> int:
    """Stream ``resp`` into ``dest`` atomically; raise :class:`_ShortBody` or a
    ``_BODY_ERRORS`` exception when the body is cut."""
    expected = resp.headers.get("Content-Length")
    received = 0
    with atomic_destination(dest) as f:
        for chunk in resp.iter_content(chunk_size=chunk_size):
            f.write(chunk)
            received += len(chunk)
        # A compressed body is decoded on the way in, so its length cannot be compared.
        if expected is not None and "Content-Encoding" not in resp.headers and received != int(expected):
            raise _ShortBody(f"received {received} of {expected} bytes")
    return received


def fetch_http(url: str, dest: str, *, connect_timeout: float = 10.0, read_timeout: float = 60.0,
               retries: int = 3, backoff: float = 0.5, verify: Verify = True,
               chunk_size: int = 1 << 18) -> int:
    """Download ``url`` to ``dest`` (whole or not at all); return the byte count.

    ``chunk_size`` stays at 256 KiB: with 1 MiB chunks glibc's growing mmap threshold moved
    the chunks onto the heap and a 400 MiB download raised peak RSS by ~100 MiB under load."""
    nothing = f"nothing was written to {dest}"
    # urllib3 retries connection errors and 5xx answers inside session.get, before any
    # byte reaches dest; the adapter's max_retries is what is left of the budget.
    adapter = HTTPAdapter(max_retries=retry_policy(retries, backoff))
    with requests.Session() as session:
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        while True:
            retry: Retry = adapter.max_retries
            try:
                resp = session.get(url, stream=True, timeout=(connect_timeout, read_timeout), verify=verify)
            except requests.RequestException as e:
                # MaxRetryError inside: the budget is spent; otherwise not an error to retry (a bad URL).
                spent = retries + 1 if e.args and isinstance(e.args[0], MaxRetryError) else len(retry.history) + 1
                raise StagingError(url, f"failed after {_attempts(spent)}: {_cause(e)}; {nothing}") from e
            with resp:
                if isinstance(resp.raw.retries, Retry):  # counting the 5xx answers urllib3 retried
                    retry = resp.raw.retries
                if resp.status_code >= 500:  # still 5xx when the budget ran out
                    raise StagingError(url, f"failed after {_attempts(len(retry.history) + 1)}: "
                                            f"HTTP {resp.status_code} {resp.reason}; {nothing}")
                if resp.status_code >= 400:
                    raise StagingError(url, f"HTTP {resp.status_code} {resp.reason}; {nothing}")
                try:
                    return _save_body(dest, resp, chunk_size)
                except (*_BODY_ERRORS, _ShortBody) as e:
                    cut: Exception = e
            failure = _cause(cut)
            try:
                adapter.max_retries = retry.increment(method="GET", url=url, error=cut)
            except MaxRetryError:
                raise StagingError(url, f"failed after {_attempts(retries + 1)}: {failure}; {nothing}") from cut
            logger.info("Retrying %s (attempt %d of %d) after: %s", url, len(adapter.max_retries.history) + 1,
                        retries + 1, failure)
            adapter.max_retries.sleep()


class _Options(RepresentationMixin):
    def __init__(self, connect_timeout: float = 10.0, read_timeout: float = 60.0, retries: int = 3,
                 backoff: float = 0.5, verify: Verify = True) -> None:
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.retries = retries
        self.backoff = backoff
        self.verify = verify

    def options(self) -> dict[str, Any]:
        return {"connect_timeout": self.connect_timeout, "read_timeout": self.read_timeout,
                "retries": self.retries, "backoff": self.backoff, "verify": self.verify}

    def can_stage_in(self, file: File) -> bool:
        return file.scheme in ("http", "https")


def _stage_in_task(working_dir: str | None, options: dict[str, Any], parent_fut: Future[Any] | None = None,
                   outputs: Sequence[File] = (), _parsl_staging_inhibit: bool = True) -> None:
    file = outputs[0]
    fetch_http(file.url, file.filepath, **options)


class HTTPSeparateTaskStaging(_Options, Staging):
    """HTTP(S) stage-in as its own task on the same executor (needs a file system
    shared between that task and the app, as Parsl's provider does).

    :param connect_timeout: seconds to wait for the server to accept the connection
    :param read_timeout: seconds to wait for each chunk of the response
    :param retries: extra attempts, in all, after connection errors, cut transfers or 5xx
        answers (a server's Retry-After is honoured)
    :param backoff: first retry delay in seconds, doubled for each later retry (at most 120 s)
    :param verify: TLS verification: True, False, or a CA bundle path
    """

    def stage_in(self, dm: DataManager, executor: str, file: File, parent_fut: Future[Any] | None) -> DataFuture:
        working_dir = working_dir_of(dm, executor)
        local_path_for(file, working_dir)
        app = parsl.python_app(executors=[executor], data_flow_kernel=dm.dfk)(_stage_in_task)
        fut: AppFuture = app(working_dir, self.options(), outputs=[file], _parsl_staging_inhibit=True,
                             parent_fut=parent_fut)
        return fut._outputs[0]


class _InTask:
    """The app wrapped by a download that runs first, on the worker. A class rather than
    a closure so it pickles by reference to this importable module."""

    def __init__(self, func: Callable[..., Any], url: str, local_path: str, options: dict[str, Any]) -> None:
        functools.update_wrapper(self, func)
        self.func, self.url, self.local_path, self.options = func, url, local_path, options

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        fetch_http(self.url, self.local_path, **self.options)
        return self.func(*args, **kwargs)


class HTTPInTaskStaging(_Options, Staging):
    """HTTP(S) stage-in inside the app's own task: no shared file system needed.
    Same options as :class:`HTTPSeparateTaskStaging`."""

    def stage_in(self, dm: DataManager, executor: str, file: File, parent_fut: Future[Any] | None) -> None:
        local_path_for(file, working_dir_of(dm, executor))
        return None

    def replace_task(self, dm: DataManager, executor: str, file: File, func: Callable[..., Any]) -> Callable[..., Any]:
        return _InTask(func, file.url, local_path_for(file, working_dir_of(dm, executor)), self.options())
