"""Connection loops: a backend that is this balancer itself.

How it works, in two parts:
- Before traffic (config check, start-up, reload, runtime API): `points_at`
  resolves a backend's address and compares it with the listen addresses of
  this process, so `localhost:8080`, `127.0.0.1:8080` or this host's own IP
  behind a `0.0.0.0:8080` listener are all recognised as the listener itself.
  An IP is "this host" when it is loopback or a UDP socket can bind it.
- At run time (loops no address comparison can see: NAT, port forwards, names
  that change): every connection the balancer opens registers its local
  address with `register` while it is open, with the backend it was opened
  for. A listener that accepts a connection asks `owner(peer)`: a peer that
  is one of our own outgoing sockets means the balancer is connected to
  itself, and that backend is a loop.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from typing import Any

WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::", "*"})
_UNSPECIFIED_TO_LOOPBACK = {"0.0.0.0": "127.0.0.1", "::": "::1"}
"""Connecting to the unspecified address reaches this host's loopback address."""

Address = tuple[str, int]


def _key(address: Any) -> Address | None:
    if isinstance(address, tuple) and len(address) >= 2:
        host = str(address[0])
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
        key = _key(info[4])
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


# -- run time -------------------------------------------------------------------------------

_OWN: dict[Address, object] = {}
"""Local address of each open outgoing connection -> the backend it was opened for."""


def register(sockname: Any, backend: object) -> Address | None:
    """An outgoing connection to `backend` is open at local address `sockname`."""
    key = _key(sockname)
    if key is not None:
        _OWN[key] = backend
    return key


def unregister(key: Address | None) -> None:
    if key is not None:
        _OWN.pop(key, None)


def owner(peername: Any) -> object | None:
    """The backend whose outgoing connection `peername` is, or None: not a loop."""
    if not _OWN:
        return None
    key = _key(peername)
    return _OWN.get(key) if key is not None else None


def open_count() -> int:
    return len(_OWN)
