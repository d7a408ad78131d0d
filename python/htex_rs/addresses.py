"""Addresses worker pools may use to reach this host, from local interfaces only.

Parsl's get_all_addresses() also queries ipify.org and routes towards 8.8.8.8; on a
cluster without internet access that adds time-outs, so htex_rs reads interfaces only.
"""
from __future__ import annotations

import ipaddress
import socket

import psutil


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


def tcp_url(address: str, port: int) -> str:
    return f"tcp://[{address}]:{port}" if ":" in address else f"tcp://{address}:{port}"
