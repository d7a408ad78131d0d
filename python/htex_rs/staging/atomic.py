"""Write a staged file so the final path holds a whole file or nothing: data goes to a
temporary file in the destination directory, is fsynced, then renamed into place."""
from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from typing import TYPE_CHECKING, BinaryIO

from parsl.data_provider.files import File

if TYPE_CHECKING:
    from parsl.data_provider.data_manager import DataManager


@contextlib.contextmanager
def atomic_destination(path: str) -> Iterator[BinaryIO]:
    """``with atomic_destination(p) as f: f.write(...)``; on any error the temporary file
    is removed and ``p`` is left as it was."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".part", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def local_path_for(file: File, working_dir: str | None) -> str:
    """Where a staged-in file lands on the worker: ``working_dir/filename`` or ``filename``
    relative to the worker's directory, as Parsl decides it. Also sets ``file.local_path``."""
    local_path = os.path.join(working_dir, file.filename) if working_dir else file.filename
    file.local_path = local_path
    return local_path


def working_dir_of(dm: DataManager, executor: str) -> str | None:
    """The ``working_dir`` of the executor labelled ``executor``, or None."""
    # ParslExecutor does not declare working_dir (HTEX and the thread pool have it), so it
    # is read the way Parsl's own providers read it, but without failing when it is absent.
    working_dir = getattr(dm.dfk.executors[executor], "working_dir", None)
    return str(working_dir) if working_dir else None
