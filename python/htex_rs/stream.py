"""Multipart messages over a Unix stream socket: the worker's end of its link to the
pool. The codec is Rust's (rust/stream.rs, through ``_core``): a message is
``u32 n``, ``n`` frame lengths (``u32`` each, little-endian), then the frames."""
from __future__ import annotations

import os
import socket
import struct
from typing import Sequence

from htex_rs._core import encode_stream

_UCRED = struct.Struct("=iII")  # struct ucred: pid_t pid, uid_t uid, gid_t gid


class PoolSocketNotOurs(ConnectionRefusedError):
    """The process serving a pool socket runs as another user. An abstract socket name
    has no file permissions: whoever binds it first holds it, so a worker that took tasks
    from it would run another user's pickles, and send its results to them."""

    def __init__(self, url: str, uid: int, own_uid: int) -> None:
        super().__init__(
            f"the pool socket {url} is served by uid {uid}, this worker runs as uid {own_uid}: "
            "another user holds the pool's socket name; refusing to take tasks from it")
        self.url, self.uid, self.own_uid = url, uid, own_uid

    def __reduce__(self) -> tuple[type[PoolSocketNotOurs], tuple[str, int, int]]:
        return (type(self), (self.url, self.uid, self.own_uid))


def connect(url: str) -> socket.socket:
    """Connect to the pool socket ``url`` (``@name`` is a Linux abstract socket, anything
    else a path); :class:`PoolSocketNotOurs` if its listener is not of our own user (the
    pool checks its workers the same way, rust/stream.rs ``peer_cred``)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect("\0" + url[1:] if url.startswith("@") else url)
        _, uid, _ = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    except BaseException:
        sock.close()
        raise
    if uid != os.geteuid():  # SO_PEERCRED gives the listener's effective uid
        sock.close()
        raise PoolSocketNotOurs(url, uid, os.geteuid())
    return sock


def send(sock: socket.socket, frames: Sequence[bytes]) -> None:
    sock.sendall(encode_stream(list(frames)))
