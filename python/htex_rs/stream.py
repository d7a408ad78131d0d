"""Multipart messages over a Unix stream socket: the worker's end of its link to the
pool core (rust/stream.rs is the other end). A message is ``u32 n``, ``n`` frame
lengths (``u32`` each, little-endian), then the frames back to back."""
from __future__ import annotations

import socket
import struct
from typing import BinaryIO, Optional, Sequence

_U32 = struct.Struct("<I")


def connect(url: str) -> socket.socket:
    """``@name`` is a Linux abstract socket, anything else a path."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect("\0" + url[1:] if url.startswith("@") else url)
    return sock


def send(sock: socket.socket, frames: Sequence[bytes]) -> None:
    n = len(frames)
    parts: list = [struct.pack(f"<I{n}I", n, *map(len, frames)), *frames]
    total = sum(map(len, parts))
    sent = sock.sendmsg(parts)
    if sent < total:  # a blocking stream can still return short (e.g. on a signal)
        rest = b"".join(bytes(p) for p in parts)[sent:]
        sock.sendall(rest)


def recv(reader: BinaryIO) -> Optional[list[bytes]]:
    """The next message from a buffered reader of the socket; None at end of stream."""
    head = reader.read(4)
    if len(head) < 4:
        return None
    (n,) = _U32.unpack(head)
    lens = struct.unpack(f"<{n}I", reader.read(4 * n))
    frames = [reader.read(length) for length in lens]
    if frames and len(frames[-1]) < lens[-1]:
        return None
    return frames
