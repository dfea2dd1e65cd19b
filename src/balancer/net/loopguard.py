"""Connection loops: a backend that is this balancer itself.

How it works, in two parts:
- Before traffic (config check, start-up, reload, runtime API, a tcp connect):
  `points_at` resolves a backend's address and compares it with the listen
  addresses of this process, so `localhost:8080`, `127.0.0.1:8080` or this
  host's own IP behind a `0.0.0.0:8080` listener are all recognised as the
  listener itself (an IP is "this host" when it is loopback or a UDP socket
  can bind it); `is_listener` answers the same for a numeric address against
  the listeners bound now (`listening` / `not_listening`).
- At run time, for loops no address comparison sees (address translation, a
  port forward, names that change): every connection the balancer opens (to a
  backend, or for a health check) is entered here while it is open, as a
  `Registration` of its local and remote address with its owner `(pool,
  backend)`. A listener that accepts a connection asks `check(peer, local)`:
  - the peer's addresses are those of one of our own connections, swapped: the
    balancer connected straight to one of its listeners. A `Loop`.
  - the peer's address is the local address of one of our connections, but no
    socket on this host has the peer's addresses (one exact sock_diag lookup):
    the connection came through address translation from one of our sockets,
    or from a client that has already reset. A `Loop` only if our connection
    from that address was itself opened for a suspect connection (two links in
    a row is the mark of a chain, not of a chance).
  - otherwise `SUSPECT` (served as usual; the caller may remember it) or None.
  The local address alone never proves a loop: Linux hands the same local port
  to connections towards different destinations, so a client on this host may
  well share its address with one of our backend connections.
"""

from __future__ import annotations

import socket
import struct
import sys
from typing import Any, Protocol

from balancer.config.hosts import address_of, is_local_ip

Address = tuple[str, int]


class Pool(Protocol):
    """What an outgoing connection's pool can do when it turns out to be a loop."""

    def mark_loop(self, backend: Any, reason: str) -> None: ...


Owner = tuple[Pool, Any]
"""What an outgoing connection is for: the pool (a `balancer.core.pool.BackendPool`) and the
backend."""


# -- run time -------------------------------------------------------------------------------


class Origin(Protocol):
    """What opened an outgoing connection: a client connection, suspected of a loop or not."""

    loop_suspect: bool


class Loop:
    """A confirmed loop: the backend it goes through and the connection that opened it."""

    __slots__ = ("origin", "owner")

    def __init__(self, owner: Owner, origin: Origin | None) -> None:
        self.owner = owner
        self.origin = origin


SUSPECT = "suspect"
"""`check`: the peer's address is one of ours, but the loop is not proven."""

_BY_PAIR: dict[tuple[str, int, str, int], Registration] = {}
"""(local host, local port, remote host, remote port) of each open outgoing connection."""
_BY_LOCAL: dict[Address, Registration] = {}
"""local address of each open outgoing connection (the latest one, if shared)."""


class Registration:
    """One open outgoing connection (to a backend, or a health check), entered here."""

    __slots__ = ("_local", "_pair", "origin", "owner")

    def __init__(self, local: Any, remote: Any, owner: Owner, origin: Origin | None = None) -> None:
        self.owner = owner
        self.origin = origin
        here, there = address_of(local), address_of(remote)
        self._local = here
        self._pair = here + there if here is not None and there is not None else None
        if self._pair is not None:
            _BY_PAIR[self._pair] = self
        if here is not None:
            _BY_LOCAL[here] = self

    def release(self) -> None:
        """The connection is closing (idempotent)."""
        if self._pair is not None and _BY_PAIR.get(self._pair) is self:
            del _BY_PAIR[self._pair]
        if self._local is not None and _BY_LOCAL.get(self._local) is self:
            del _BY_LOCAL[self._local]
        self._pair = self._local = None


def check(peer: Any, local: Any) -> Loop | str | None:
    """A `Loop`, `SUSPECT` or None (no reason to think so) for a connection accepted
    from `peer` on local address `local`."""
    if not _BY_PAIR:
        return None
    remote, here = address_of(peer), address_of(local)
    if remote is None or here is None:
        return None
    found = _BY_PAIR.get(remote + here)
    if found is not None:
        return Loop(found.owner, found.origin)
    mine = _BY_LOCAL.get(remote)
    if mine is None:
        return None
    origin = mine.origin
    if origin is not None and origin.loop_suspect and counterpart_exists(remote, here) is False:
        return Loop(mine.owner, origin)
    return SUSPECT


def owner(peer: Any) -> Owner | None:
    """The owner of our open connection whose local address `peer` is (a suspect at most)."""
    key = address_of(peer)
    found = _BY_LOCAL.get(key) if key is not None else None
    return found.owner if found is not None else None


def open_count() -> int:
    return len(_BY_LOCAL)


# -- this process's listeners ---------------------------------------------------------------

_LISTENERS: dict[Address, int] = {}
"""Bound address of each listener of the process -> how many hold it."""
_WILDCARDS = frozenset({"0.0.0.0", "::"})


def listening(address: Any) -> None:
    """A listener of this process is bound to `address` (after the bind: no port 0)."""
    key = address_of(address)
    if key is not None:
        _LISTENERS[key] = _LISTENERS.get(key, 0) + 1


def not_listening(address: Any) -> None:
    key = address_of(address)
    if key is not None and key in _LISTENERS:
        _LISTENERS[key] -= 1
        if _LISTENERS[key] <= 0:
            del _LISTENERS[key]


def is_listener(address: Any) -> bool:
    """Would a connection to `address` (numeric) reach a listener of this process?"""
    key = address_of(address)
    if key is None or not _LISTENERS:
        return False
    if key in _LISTENERS:
        return True
    ip, port = key
    if any((wildcard, port) in _LISTENERS for wildcard in _WILDCARDS):
        return is_local_ip(ip)
    return False


# -- sock_diag: one exact lookup of a TCP socket by its addresses (Linux) ---------------------

_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST = 1
_NLMSG_ERROR = 2
_ENOENT = 2
_NO_COOKIE = 0xFFFFFFFF
_ALL_STATES = 0xFFFFFFFF


def counterpart_exists(local: Address, remote: Address) -> bool | None:
    """Does a TCP socket with exactly these local and remote addresses exist on this host?

    None when the kernel cannot be asked (not Linux, no sock_diag, no descriptor left).
    """
    if not sys.platform.startswith("linux"):
        return None
    family = socket.AF_INET6 if ":" in local[0] else socket.AF_INET
    try:
        src = socket.inet_pton(family, local[0]).ljust(16, b"\0")
        dst = socket.inet_pton(family, remote[0]).ljust(16, b"\0")
    except OSError:
        return None
    sockid = (
        struct.pack("!HH", local[1], remote[1])
        + src
        + dst
        + struct.pack("=III", 0, _NO_COOKIE, _NO_COOKIE)
    )
    request = struct.pack("=BBBBI", family, socket.IPPROTO_TCP, 0, 0, _ALL_STATES) + sockid
    header = struct.pack("=IHHII", 16 + len(request), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST, 1, 0)
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_SOCK_DIAG) as nl:
            nl.sendto(header + request, (0, 0))
            reply = nl.recv(8192, socket.MSG_DONTWAIT)
    except (OSError, AttributeError):
        return None
    if len(reply) < 20:
        return None
    kind = struct.unpack_from("=H", reply, 4)[0]
    if kind != _NLMSG_ERROR:
        return True
    code = -struct.unpack_from("=i", reply, 16)[0]
    return False if code == _ENOENT else None
