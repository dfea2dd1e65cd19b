"""Is an accepted connection one of the balancer's own backend connections?

How it works: while a backend connection of the tcp relay is open, it is
entered twice: in `balancer.loopguard` by its local address (what every
listener of the process asks about a new peer), and here by its local and
remote address together. A peer that `loopguard.owner` knows is only a
suspect, because Linux hands the same local port to connections towards
different destinations: a client on this host may well share its address with
one of our backend connections (about one port in seven with a few hundred
connections each way). `check` decides:

- the peer's addresses are those of one of our own connections, swapped: the
  balancer connected straight to one of its listeners. A loop.
- no socket on this host has the peer's addresses (one exact sock_diag lookup
  in the kernel): the connection came through address translation (NAT, a port
  redirect) from one of our sockets, or from a client that has already reset.
  A loop only if our connection from that address was itself opened for a
  suspect: two links in a row is the mark of a chain, not of a chance.
- otherwise a suspect: served as usual, remembered as such by the caller.

So a straight loop is cut at its first link, a translated one at its second,
and a loop through a socket registered elsewhere (a health probe) at the
relay's own backend connection it leads to.

Before any of that, the listeners of the process are known here by their
bound address (`listening`), and `is_listener` tells the relay, before it
connects, that a backend address resolves to one of them: no connection is
made at all. On asyncio the accepting side of a connection to ourselves runs
after the connecting side, so without this the client that started the loop
would already be relaying into it when the accept finds it out.
"""

from __future__ import annotations

import socket
import struct
import sys
from typing import TYPE_CHECKING, Any, Protocol

from balancer import loopguard

if TYPE_CHECKING:
    from balancer.pool import Backend, BackendPool

Address = tuple[str, int]
Owner = tuple["BackendPool", "Backend"]
"""What `loopguard` holds for an outgoing connection: the pool and backend it is for."""


class Origin(Protocol):
    """What opened a backend connection: a client connection, suspected of a loop or not."""

    loop_suspect: bool


class Loop:
    """A confirmed loop: the backend it goes through and the connection that opened it."""

    __slots__ = ("origin", "owner")

    def __init__(self, owner: Owner, origin: Origin) -> None:
        self.owner = owner
        self.origin = origin


SUSPECT = "suspect"
"""`check`: the peer's address is one of ours, but the loop is not proven."""

_Entry = tuple[Owner, Origin]
_BY_PAIR: dict[tuple[Address, Address], _Entry] = {}
"""(local, remote) of each open backend connection -> its owner and origin."""
_BY_LOCAL: dict[Address, _Entry] = {}
"""local address of each open backend connection -> the same (the latest, if shared)."""


def address_of(address: Any) -> Address | None:
    """`(host, port)` of a socket address, IPv4-mapped IPv6 written as IPv4."""
    if isinstance(address, tuple) and len(address) >= 2:
        host = str(address[0])
        if host.startswith("::ffff:"):
            host = host[7:]
        return host, int(address[1])
    return None


class Registration:
    """One open backend connection, entered here and in `loopguard`."""

    __slots__ = ("_entry", "_guard_key", "_local", "_pair")

    def __init__(self, local: Any, remote: Any, owner: Owner, origin: Origin) -> None:
        self._guard_key = loopguard.register(local, owner)
        self._entry: _Entry = (owner, origin)
        here, there = address_of(local), address_of(remote)
        self._local = here
        self._pair = (here, there) if here is not None and there is not None else None
        if self._pair is not None:
            _BY_PAIR[self._pair] = self._entry
        if here is not None:
            _BY_LOCAL[here] = self._entry

    def release(self) -> None:
        """The connection is closing (idempotent)."""
        loopguard.unregister(self._guard_key)
        self._guard_key = None
        if self._pair is not None and _BY_PAIR.get(self._pair) is self._entry:
            del _BY_PAIR[self._pair]
        if self._local is not None and _BY_LOCAL.get(self._local) is self._entry:
            del _BY_LOCAL[self._local]
        self._pair = self._local = None


def check(peer: Any, local: Any) -> Loop | str | None:
    """A `Loop`, `SUSPECT` or None (no reason to think so) for a connection accepted
    from `peer` on local address `local`."""
    if loopguard.owner(peer) is None:
        return None
    remote, here = address_of(peer), address_of(local)
    if remote is None or here is None:
        return None
    found = _BY_PAIR.get((remote, here))
    if found is not None:
        return Loop(*found)
    if counterpart_exists(remote, here) is False:
        mine = _BY_LOCAL.get(remote)
        if mine is not None and mine[1].loop_suspect:
            return Loop(*mine)
    return SUSPECT


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
        return loopguard.is_local_ip(ip)
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
