"""FTP stage-in, as a separate task or inside the task: ``ftp://user:password@host:port/path``
(anonymous when no user is given), passive mode, timeouts, atomic final write, and
errors that name the URL (without its password) and the server's reply."""
from __future__ import annotations

import ftplib
import functools
import socket
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlparse

import parsl
from parsl.app.futures import DataFuture
from parsl.data_provider.files import File
from parsl.data_provider.staging import Staging
from parsl.dataflow.futures import AppFuture
from parsl.utils import RepresentationMixin

from htex_rs.staging.atomic import atomic_destination, local_path_for, working_dir_of
from htex_rs.staging.errors import StagingError

if TYPE_CHECKING:
    from concurrent.futures import Future

    from parsl.data_provider.data_manager import DataManager


def redact(url: str) -> str:
    u = urlparse(url)
    if u.password is None:
        return url
    return u._replace(netloc=f"{u.username}:***@{u.hostname}" + (f":{u.port}" if u.port else "")).geturl()


def fetch_ftp(url: str, dest: str, *, timeout: float = 60.0, passive: bool = True) -> int:
    """Download ``url`` to ``dest`` (whole or not at all); return the byte count."""
    u = urlparse(url)
    if not u.hostname or not u.path or u.path.endswith("/"):
        raise StagingError(redact(url), "an FTP URL needs a host and a file path, e.g. ftp://host:2121/dir/file")
    user = unquote(u.username) if u.username else "anonymous"
    password = unquote(u.password) if u.password is not None else ("anonymous@" if user == "anonymous" else "")
    received = 0
    try:
        with ftplib.FTP(timeout=timeout) as ftp:
            ftp.connect(u.hostname, u.port or 21)
            ftp.login(user, password)
            ftp.set_pasv(passive)
            with atomic_destination(dest) as f:
                def write(block: bytes) -> None:
                    nonlocal received
                    f.write(block)
                    received += len(block)
                ftp.retrbinary(f"RETR {unquote(u.path)}", write)
    except ftplib.all_errors as e:
        kind = "server replied" if isinstance(e, ftplib.Error) else type(e).__name__
        if isinstance(e, (socket.timeout, TimeoutError)):
            kind = f"no answer within {timeout} s"
        raise StagingError(redact(url), f"{kind}: {e}; nothing was written to {dest}") from None
    return received


class _Options(RepresentationMixin):
    def __init__(self, timeout: float = 60.0, passive: bool = True) -> None:
        self.timeout = timeout
        self.passive = passive

    def can_stage_in(self, file: File) -> bool:
        return file.scheme == "ftp"


def _stage_in_task(working_dir: str | None, timeout: float, passive: bool, parent_fut: Future[Any] | None = None,
                   outputs: Sequence[File] = (), _parsl_staging_inhibit: bool = True) -> None:
    file = outputs[0]
    fetch_ftp(file.url, file.filepath, timeout=timeout, passive=passive)


class FTPSeparateTaskStaging(_Options, Staging):
    """FTP stage-in as its own task on the same executor (shared file system).

    :param timeout: seconds for connecting and for each server reply
    :param passive: passive mode (the client opens the data connection)
    """

    def stage_in(self, dm: DataManager, executor: str, file: File, parent_fut: Future[Any] | None) -> DataFuture:
        working_dir = working_dir_of(dm, executor)
        local_path_for(file, working_dir)
        app = parsl.python_app(executors=[executor], data_flow_kernel=dm.dfk)(_stage_in_task)
        fut: AppFuture = app(working_dir, self.timeout, self.passive, outputs=[file], _parsl_staging_inhibit=True,
                             parent_fut=parent_fut)
        return fut._outputs[0]


class _InTask:
    """The app wrapped by an FTP download that runs first, on the worker."""

    def __init__(self, func: Callable[..., Any], url: str, local_path: str, timeout: float, passive: bool) -> None:
        functools.update_wrapper(self, func)
        self.func, self.url, self.local_path, self.timeout, self.passive = func, url, local_path, timeout, passive

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        fetch_ftp(self.url, self.local_path, timeout=self.timeout, passive=self.passive)
        return self.func(*args, **kwargs)


class FTPInTaskStaging(_Options, Staging):
    """FTP stage-in inside the app's own task (no shared file system needed)."""

    def stage_in(self, dm: DataManager, executor: str, file: File, parent_fut: Future[Any] | None) -> None:
        local_path_for(file, working_dir_of(dm, executor))
        return None

    def replace_task(self, dm: DataManager, executor: str, file: File, func: Callable[..., Any]) -> Callable[..., Any]:
        local_path = local_path_for(file, working_dir_of(dm, executor))
        return _InTask(func, file.url, local_path, self.timeout, self.passive)
