"""Multipart messages over a Unix stream socket: the worker's end of its link to the
pool core. The codec is Rust's (rust/stream.rs, through ``_core``): a message is
``u32 n``, ``n`` frame lengths (``u32`` each, little-endian), then the frames."""
from __future__ import annotations

import socket
from typing import Optional, Sequence

from htex_rs import _core


def connect(url: str) -> socket.socket:
    """``@name`` is a Linux abstract socket, anything else a path."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect("\0" + url[1:] if url.startswith("@") else url)
    return sock


def send(sock: socket.socket, frames: Sequence[bytes]) -> None:
    sock.sendall(_core.encode_stream(list(frames)))


class Reader:
    """Whole messages from a stream socket, read as they arrive."""

    def __init__(self, sock: socket.socket, max_message_bytes: int = 1 << 30) -> None:
        self.sock = sock
        self.decoder = _core.StreamDecoder(max_message_bytes)

    def recv(self) -> Optional[list[bytes]]:
        """The next message; None at the end of the stream (a message cut short by the
        end included). ValueError for bytes that cannot be a message."""
        while True:
            message = self.decoder.next_message()
            if message is not None:
                return message
            data = self.sock.recv(1 << 16)
            if not data:
                return None
            self.decoder.feed(data)
