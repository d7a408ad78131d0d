"""A test's end of a worker stream (rust/stream.rs's format: ``u32`` frame count, ``u32``
lengths, then the frames), in plain Python: the tests play a pool or a worker with it.
The product's own reader is Rust's (``stream::Decoder``, tested in rust/stream.rs)."""
from __future__ import annotations

import socket
import struct
from typing import Optional


class Reader:
    """Whole messages from a stream socket, read as they arrive."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def _message(self) -> Optional[list[bytes]]:
        if len(self.buf) < 4:
            return None
        (n,) = struct.unpack_from("<I", self.buf)
        head = 4 + 4 * n
        if len(self.buf) < head:
            return None
        lens = struct.unpack_from(f"<{n}I", self.buf, 4)
        if len(self.buf) < head + sum(lens):
            return None
        frames, at = [], head
        for length in lens:
            frames.append(self.buf[at:at + length])
            at += length
        self.buf = self.buf[at:]
        return frames

    def recv(self) -> Optional[list[bytes]]:
        """The next message; None at the end of the stream (a message cut short included)."""
        while True:
            message = self._message()
            if message is not None:
                return message
            data = self.sock.recv(1 << 16)
            if not data:
                return None
            self.buf += data
