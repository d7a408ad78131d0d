"""``file:`` staging over rsync+ssh, inside the task: a drop-in for Parsl's ``RSyncStaging``.

Same contract as Parsl's provider: the worker pulls ``hostname:<absolute path>`` to
``working_dir/filename`` (or ``filename``) before the app runs, and pushes it back after.
Like Parsl's, authentication is rsync's own business by default: no ``-e`` is passed, so
``RSYNC_RSH`` and the worker's ssh configuration (``~/.ssh/config``, an agent) decide how
the remote host is reached. Unlike Parsl's, rsync is run from an argv list with no shell,
paths are protected from the remote shell (``-s``), neither rsync nor ssh can prompt (stdin
is /dev/null and there is no controlling terminal), ``File.path`` is left as the user gave
it, and a failure raises :class:`StagingError` carrying rsync's exit code and stderr.
"""
from __future__ import annotations

import functools
import os
import re
import shlex
import subprocess
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from parsl.data_provider.files import File
from parsl.data_provider.staging import Staging
from parsl.utils import RepresentationMixin

from htex_rs.staging.atomic import local_path_for, working_dir_of
from htex_rs.staging.errors import StagingError

if TYPE_CHECKING:
    from concurrent.futures import Future

    from parsl.data_provider.data_manager import DataManager

#: ssh's ConnectTimeout when ``ssh_options`` are given and ``connect_timeout`` is not.
DEFAULT_CONNECT_TIMEOUT = 10


def rsync_base_argv(ssh_options: Sequence[str] = (), connect_timeout: int | None = None,
                    io_timeout: int = 300) -> list[str]:
    """rsync's argv up to (not including) the source and destination.

    With no ``ssh_options`` there is no ``-e``: rsync runs ``$RSYNC_RSH`` or plain ``ssh``,
    configured as the site configured it. With ``ssh_options`` rsync runs
    ``ssh -o BatchMode=yes <ssh_options> -o ConnectTimeout=<connect_timeout>``."""
    # -s (--protect-args, called --secluded-args since rsync 3.3; -s works everywhere) sends
    # the file names over the rsync protocol instead of the remote shell's command line,
    # so spaces and shell metacharacters in remote paths are taken literally.
    # No --inplace and no --partial: rsync then writes to a temporary file next to the
    # destination and renames it, so the destination is whole or untouched.
    argv = ["rsync", "-s", f"--timeout={io_timeout}"]
    if not ssh_options:
        if connect_timeout is not None:
            raise ValueError("connect_timeout sets ssh's ConnectTimeout in the ssh command built from "
                             "ssh_options; without ssh_options rsync runs $RSYNC_RSH or ssh as configured: "
                             "set ConnectTimeout there (~/.ssh/config), or pass "
                             "ssh_options=['-o', 'ConnectTimeout=N'] instead")
        return argv
    timeout = DEFAULT_CONNECT_TIMEOUT if connect_timeout is None else connect_timeout
    # BatchMode first: for ``-o`` options ssh keeps the first value it sees, so callers
    # cannot turn prompting back on. ConnectTimeout goes last so callers can override it.
    ssh = ["ssh", "-o", "BatchMode=yes", *ssh_options, "-o", f"ConnectTimeout={timeout}"]
    # rsync splits the -e string itself (not with a shell) and honours POSIX quoting,
    # so shlex.quote keeps options such as an identity file path with spaces intact.
    return [*argv, "-e", " ".join(shlex.quote(arg) for arg in ssh)]


def run_rsync(url: str, argv: list[str]) -> None:
    """Run rsync; raise :class:`StagingError` naming ``url``, the exit code and stderr."""
    try:
        # Nothing (ssh asking for a password, a passphrase or about a host key) may wait for
        # a typist who is not there: stdin is /dev/null, and a new session has no controlling
        # terminal, so ssh cannot open /dev/tty either and fails at once instead. This holds
        # whatever RSYNC_RSH or ~/.ssh/config say, without overriding them.
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, start_new_session=True,
                              text=True, errors="replace", check=False)
    except OSError as e:  # rsync itself missing or not executable on this node
        raise StagingError(url, f"could not run {argv[0]!r}: {e}; install rsync on the worker nodes") from e
    if proc.returncode != 0:
        stderr = proc.stderr.strip() or "(no stderr)"
        raise StagingError(url, f"rsync exited with code {proc.returncode}: {stderr}")


def _literal_remote_source(path: str) -> str:
    """Escape ``path`` for the remote rsync's wildcard expansion."""
    # With -s the remote rsync globs the names it is asked to send (the remote shell would
    # have, without -s), so "a[1].txt" would fetch "a1.txt". Backslash-escaping makes them
    # literal. rsync unescapes only names that contain a wildcard, so only those are escaped.
    # (A name with both a backslash and a wildcard is then refused by rsync's own
    # requested-name check: a loud StagingError, never a wrong file.)
    return re.sub(r"([*?\[\\])", r"\\\1", path) if re.search(r"[*?\[]", path) else path


class _InTask:
    """The app wrapped by a transfer on the worker. A class rather than a closure so it
    pickles by reference to this importable module (as the other in-task providers do)."""

    def __init__(self, func: Callable[..., Any], url: str, base_argv: list[str], remote: str,
                 local_path: str) -> None:
        functools.update_wrapper(self, func)
        self.func, self.url, self.base_argv = func, url, base_argv
        self.remote, self.local_path = remote, local_path

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self._before()
        result = self.func(*args, **kwargs)  # a failing app stages nothing out, as in Parsl
        self._after()
        return result

    def _before(self) -> None:
        pass

    def _after(self) -> None:
        pass

    def _local(self) -> str:
        # Made absolute here, on the worker, against the worker's own cwd: a relative
        # name containing ':' would otherwise be read by rsync as a remote host.
        return os.path.abspath(self.local_path)


class _StageIn(_InTask):
    def _before(self) -> None:
        dest = self._local()
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        run_rsync(self.url, [*self.base_argv, "--", self.remote, dest])
        # Without -r rsync "skips" a remote directory and still exits 0; the app must
        # not start believing its input is there.
        if not os.path.isfile(dest):
            raise StagingError(self.url, f"rsync succeeded but {dest} is not a file "
                                         f"(is {self.remote} a directory?)")


class _StageOut(_InTask):
    def _after(self) -> None:
        run_rsync(self.url, [*self.base_argv, "--", self._local(), self.remote])


class RSyncStaging(Staging, RepresentationMixin):
    """Stage ``file`` URLs in and out with rsync over ssh, run on the worker.

    Workers must be able to reach ``hostname`` by ssh without typing anything (a key without
    a passphrase, or an agent, in the worker's environment); both sides need rsync.

    By default authentication is delegated to rsync, as with Parsl's provider: no ``-e`` is
    passed, so ``RSYNC_RSH`` (e.g. set in the provider's ``worker_init``) and the worker's
    ``~/.ssh/config`` apply. Given ``ssh_options``, rsync instead runs
    ``ssh -o BatchMode=yes <ssh_options> -o ConnectTimeout=<connect_timeout>`` (which
    takes precedence over ``RSYNC_RSH``; ``~/.ssh/config`` still applies unless the
    options say ``-F``).

    :param hostname: ssh destination holding the files, ``host`` or ``user@host``
    :param ssh_options: ssh arguments, e.g. ``["-p", "2222", "-i", "/path/key"]``; empty
        (the default) leaves the remote shell to ``RSYNC_RSH`` and the ssh configuration
    :param connect_timeout: seconds ssh waits for the TCP connection (default 10); only
        with ``ssh_options`` (otherwise set ConnectTimeout in the ssh configuration)
    :param io_timeout: seconds rsync waits with no data moving before giving up
    """

    def __init__(self, hostname: str, ssh_options: Sequence[str] = (),
                 connect_timeout: int | None = None, io_timeout: int = 300) -> None:
        # A leading '-' would make ssh read the host as an option; whitespace cannot be a host.
        if not hostname or hostname.startswith("-") or any(c.isspace() for c in hostname):
            raise ValueError(f"invalid rsync hostname {hostname!r}: give host or user@host")
        if isinstance(ssh_options, str):  # a string would be split into one option per character
            raise TypeError(f"ssh_options must be a list of arguments, e.g. {shlex.split(ssh_options)!r}")
        self.hostname = hostname
        self.ssh_options = list(ssh_options)
        self.connect_timeout = connect_timeout
        self.io_timeout = io_timeout
        self._base_argv()  # a connect_timeout without ssh_options fails here, not on a worker

    def can_stage_in(self, file: File) -> bool:
        return file.scheme == "file"

    def can_stage_out(self, file: File) -> bool:
        return file.scheme == "file"

    def stage_in(self, dm: DataManager, executor: str, file: File, parent_fut: Future[Any] | None) -> None:
        local_path_for(file, working_dir_of(dm, executor))
        return None

    def stage_out(self, dm: DataManager, executor: str, file: File, app_fu: Future[Any]) -> None:
        local_path_for(file, working_dir_of(dm, executor))
        return None

    def replace_task(self, dm: DataManager, executor: str, file: File, func: Callable[..., Any]) -> Callable[..., Any]:
        return _StageIn(func, file.url, self._base_argv(), self._remote(file, source=True),
                        local_path_for(file, working_dir_of(dm, executor)))

    def replace_task_stage_out(self, dm: DataManager, executor: str, file: File,
                               func: Callable[..., Any]) -> Callable[..., Any]:
        return _StageOut(func, file.url, self._base_argv(), self._remote(file),
                         local_path_for(file, working_dir_of(dm, executor)))

    def _base_argv(self) -> list[str]:
        return rsync_base_argv(self.ssh_options, self.connect_timeout, self.io_timeout)

    def _remote(self, file: File, source: bool = False) -> str:
        # Absolute against the submit side's cwd, as Parsl does, but computed here rather
        # than written back into file.path, so the user's File keeps the path it was given.
        path = os.path.abspath(file.path)
        return f"{self.hostname}:{_literal_remote_source(path) if source else path}"
