"""Real servers on loopback for the staging tests: HTTP and HTTPS (self-signed
certificate made with openssl) with routes for each failure mode, and FTP (pyftpdlib)
with anonymous and user logins. Each runs in a thread of the test process."""
from __future__ import annotations

import os
import socket
import ssl
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    flaky_left: dict[str, int] = {}
    hits: dict[str, int] = {}  # requests seen, by path: what a retry test counts
    big_size = 0

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def _head(self, code: int, length: int) -> None:
        self.send_response(code)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(length))
        self.end_headers()

    def _cut(self) -> None:  # promises 1 MiB, sends 64 KiB, hangs up
        self._head(200, len(PAYLOAD))
        self.wfile.write(PAYLOAD[:65536])
        self.wfile.flush()
        self.connection.shutdown(socket.SHUT_RDWR)
        self.close_connection = True

    def _script(self, path: str, seen: int) -> None:
        """``/script/<step>,<step>,.../<name>``: request n gets step n (the last repeats):
        ``500``, ``503ra`` (503 with Retry-After: 1), ``cut`` or ``ok``."""
        steps = path.split("/")[2].split(",")
        step = steps[min(seen, len(steps) - 1)]
        if step == "ok":
            self._head(200, len(PAYLOAD))
            self.wfile.write(PAYLOAD)
        elif step == "cut":
            self._cut()
        elif step in ("500", "503ra"):
            body = b"try again"
            self.send_response(int(step[:3]))
            if step == "503ra":
                self.send_header("Retry-After", "1")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        else:
            raise ValueError(f"unknown step {step!r} in {path}")

    def do_GET(self) -> None:
        path = self.path.split("?")[0]
        seen = Handler.hits.get(path, 0)
        Handler.hits[path] = seen + 1
        if path.startswith("/script/"):
            self._script(path, seen)
        elif path in ("/data.bin", "/dir/data.bin"):
            self._head(200, len(PAYLOAD))
            self.wfile.write(PAYLOAD)
        elif path == "/missing.bin":
            body = b"<html>404 not here</html>"
            self._head(404, len(body))
            self.wfile.write(body)
        elif path.startswith("/flaky"):  # /flaky-N: N times 500, then the file
            left = Handler.flaky_left.setdefault(path, int(path.rsplit("-", 1)[1]))
            if left > 0:
                Handler.flaky_left[path] = left - 1
                body = b"try again"
                self._head(500, len(body))
                self.wfile.write(body)
            else:
                self._head(200, len(PAYLOAD))
                self.wfile.write(PAYLOAD)
        elif path == "/cut.bin":
            self._cut()
        elif path == "/slow.bin":  # headers, then nothing for 30 s
            self._head(200, len(PAYLOAD))
            self.wfile.flush()
            time.sleep(30)
        elif path == "/big.bin":
            self._head(200, Handler.big_size)
            chunk = bytes(1 << 20)
            left = Handler.big_size
            while left:
                n = min(left, len(chunk))
                self.wfile.write(chunk[:n])
                left -= n
        else:
            self._head(404, 0)


class Server:
    def __init__(self, tls_dir: str | None = None) -> None:
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.scheme = "http"
        self.cert = None
        if tls_dir is not None:
            self.cert = os.path.join(tls_dir, "cert.pem")
            key = os.path.join(tls_dir, "key.pem")
            subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                            "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                            "-keyout", key, "-out", self.cert], check=True, capture_output=True)
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(self.cert, key)
            self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
            self.scheme = "https"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"{self.scheme}://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class FTPServer:
    """pyftpdlib on a random loopback port: anonymous read of ``root/pub``, and user
    ``alice`` / password ``s3cr et`` with read access to ``root``."""

    USER, PASSWORD = "alice", "s3cr et"

    def __init__(self, root: str) -> None:
        from pyftpdlib.authorizers import DummyAuthorizer
        from pyftpdlib.handlers import FTPHandler
        from pyftpdlib.servers import ThreadedFTPServer

        os.makedirs(os.path.join(root, "pub"), exist_ok=True)
        auth = DummyAuthorizer()
        auth.add_user(self.USER, self.PASSWORD, root, perm="elr")
        auth.add_anonymous(os.path.join(root, "pub"))
        handler = type("Handler", (FTPHandler,), {"authorizer": auth, "passive_ports": None})
        handler.masquerade_address = None
        self.server = ThreadedFTPServer(("127.0.0.1", 0), handler)
        self.port = self.server.address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"timeout": 0.2}, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.close_all()
