"""Addresses worker pools may use to reach this host: from local interfaces only, or the
one the user named (an IP literal, or a host name resolved once, at construction).

Parsl's get_all_addresses() also queries ipify.org and routes towards 8.8.8.8; on a
cluster without internet access that adds time-outs, so htex_rs reads interfaces only.
"""
from __future__ import annotations

import ipaddress
import socket

import psutil

from htex_rs.errors import HtexRsConfigurationError


def local_addresses() -> set[str]:
    out: set[str] = set()
    for addrs in psutil.net_if_addrs().values():
        for a in addrs:
            if a.family not in (socket.AF_INET, socket.AF_INET6):
                continue
            ip = a.address.split("%", 1)[0]
            try:
                parsed = ipaddress.ip_address(ip)
            except ValueError:
                continue
            if parsed.is_link_local:
                continue
            out.add(ip)
    return out or {"127.0.0.1"}


def is_loopback(address: str) -> bool:
    """Whether a bind address (an IP literal, or ``*`` for every interface) is reachable
    from this host only."""
    if address == "*":
        return False
    ip = ipaddress.ip_address(address)
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
    return (mapped or ip).is_loopback


def tcp_url(address: str, port: int) -> str:
    return f"tcp://[{address}]:{port}" if ":" in address else f"tcp://{address}:{port}"


def resolve_address(name: str, value: str) -> str:
    """``value`` as an IP literal: unchanged if it is one, else the first address the
    resolver gives for the host name (the system's preferred order). Done once, so every
    pool is given the same numeric address and none depends on its own node's resolver."""
    try:
        ipaddress.ip_address(value)
        return value
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(value, None, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        reason = getattr(e, "strerror", None) or str(e)
        raise HtexRsConfigurationError(
            f"{name}={value!r} does not resolve on this host ({reason}); give a host name "
            f"it can resolve, or the numeric address workers should use (e.g. '10.0.0.5' or '::1')"
        ) from None
    return str(infos[0][4][0])
