"""Write a staged file so the final path holds a whole file or nothing: data goes to a
temporary file in the destination directory, is fsynced, then renamed into place."""
from __future__ import annotations

import contextlib
import os
import tempfile
from typing import BinaryIO, Iterator


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


def local_path_for(file, working_dir: str | None) -> str:
    """Where a staged-in file lands on the worker: ``working_dir/filename`` or ``filename``
    relative to the worker's directory, as Parsl decides it."""
    file.local_path = os.path.join(working_dir, file.filename) if working_dir else file.filename
    return file.local_path
