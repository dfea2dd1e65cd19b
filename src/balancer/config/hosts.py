"""Which addresses a `host:port` stands for, and which of them are this host's.

What the checks of a file (a backend that is the balancer itself, two services on
one address) and the run-time loop registry (`balancer.net.loopguard`) compare.
Names are resolved with `getaddrinfo`; whether an address is this host's is
asked of the kernel by binding a socket to it.
"""

from __future__ import annotations

import ipaddress
import socket
import sys
from collections.abc import Iterable
from typing import Any

WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::", "*"})
_UNSPECIFIED_TO_LOOPBACK = {"0.0.0.0": "127.0.0.1", "::": "::1"}
"""Connecting to the unspecified address reaches this host's loopback address."""

Address = tuple[str, int]


def address_of(address: Any) -> Address | None:
    """`(host, port)` of a socket address, IPv4-mapped IPv6 written as IPv4 (the host
    string interned: thousands of connections share a handful of addresses)."""
    if isinstance(address, tuple) and len(address) >= 2:
        host = sys.intern(str(address[0]))
        if host.startswith("::ffff:"):
            host = host[7:]
        return host, int(address[1])
    return None


def resolve(host: str, port: int) -> set[Address]:
    """The numeric addresses `host:port` stands for; empty when it does not resolve."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return set()
    out: set[Address] = set()
    for info in infos:
        key = address_of(info[4])
        if key is not None:
            out.add(key)
    return out


def is_local_ip(ip: str) -> bool:
    """Is `ip` an address of this host (loopback, or one a socket can bind)?"""
    try:
        parsed = ipaddress.ip_address(ip)
    except ValueError:
        return False
    if parsed.is_loopback or parsed.is_unspecified:
        return True
    family = socket.AF_INET6 if parsed.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.bind((ip, 0))
    except OSError:
        return False
    return True


def points_at(
    backend: Iterable[Address], listen_host: str, listen_port: int, *, resolved: bool = False
) -> bool:
    """Would connecting to any of `backend` (resolved addresses) reach this listener?

    `listen_port` 0 (not bound yet) never matches; pass the bound port once known.
    A backend on the unspecified address (0.0.0.0, ::) reaches the loopback one.
    """
    if listen_port == 0:
        return False
    wildcard = listen_host in WILDCARD_HOSTS
    own = (
        set()
        if wildcard
        else {_UNSPECIFIED_TO_LOOPBACK.get(ip, ip) for ip, _ in resolve(listen_host, listen_port)}
    )
    for ip, port in backend:
        if port != listen_port:
            continue
        ip = _UNSPECIFIED_TO_LOOPBACK.get(ip, ip)
        if wildcard:
            if is_local_ip(ip):
                return True
        elif ip in own:
            return True
    return False
