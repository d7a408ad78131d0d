"""Extra "hosts" for the tests: a network namespace joined to this machine by a veth
pair (host side 10.251.N.1, namespace side 10.251.N.2), made with iproute2 and removed
after. Used by the network-fault tests and the two-node Slurm cluster."""
from __future__ import annotations

import contextlib
import shutil
import subprocess
import uuid
from dataclasses import dataclass
from typing import Iterator


@dataclass
class Namespace:
    ns: str
    host_if: str
    host_ip: str
    ns_ip: str


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def available() -> bool:
    return shutil.which("ip") is not None


@contextlib.contextmanager
def namespace() -> Iterator[Namespace]:
    """Raises subprocess.CalledProcessError when namespaces cannot be made here."""
    tag = uuid.uuid4().hex[:6]
    ns, host_if, ns_if = f"htexrs-{tag}", f"hx{tag}a", f"hx{tag}b"
    n = int(tag[:2], 16)
    host_ip, ns_ip = f"10.251.{n}.1", f"10.251.{n}.2"
    ip("netns", "add", ns)
    try:
        ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if)
        ip("link", "set", ns_if, "netns", ns)
        ip("addr", "add", f"{host_ip}/30", "dev", host_if)
        ip("link", "set", host_if, "up")
        ip("netns", "exec", ns, "ip", "addr", "add", f"{ns_ip}/30", "dev", ns_if)
        ip("netns", "exec", ns, "ip", "link", "set", ns_if, "up")
        ip("netns", "exec", ns, "ip", "link", "set", "lo", "up")
        yield Namespace(ns, host_if, host_ip, ns_ip)
    finally:
        subprocess.run(["ip", "link", "del", host_if], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
