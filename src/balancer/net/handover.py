"""The wire of a hand-over: its messages, its socket path, sockets passed by SCM_RIGHTS.

Every message is one datagram of a Unix seqpacket socket: a JSON object with an `op`
(`takeover`, `listeners`, `refused`, `ready`, `draining`; see
`balancer.runtime.handover` for the conversation), of at most MAX_MESSAGE bytes and
read within a timeout. A `listeners` message carries up to FDS_PER_MESSAGE listening
sockets, described in its JSON in the same order (`Handed`: what each is, the
(host, port) its config names and the one it is bound to); `assign` decides which
listener of the new config takes which. Nothing here imports the runtime.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import json
import logging
import os
import socket
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from balancer.errors import BalancerError

log = logging.getLogger("balancer")

Address = tuple[str, int]

PROTOCOL = 1
MAX_MESSAGE = 64 * 1024
FDS_PER_MESSAGE = 32
RECEIVE_TIMEOUT = 10.0
"""The new process waits this long for each answer of the running one."""
SEND_TIMEOUT = 5.0
MAX_PATH = 100
"""Bytes of a socket path, with room for the temporary suffix (sun_path holds 108)."""
OPS = ("takeover", "listeners", "refused", "ready", "draining")


class HandoverError(BalancerError):
    """A hand-over that cannot go on: a bad message, a closed connection, a timeout."""


class NothingToTakeOver(HandoverError):
    """No balancer answers on the handover socket (no such file, or a stale one)."""


# -- messages (pure) -------------------------------------------------------------------


@dataclass(frozen=True)
class Handed:
    """One listening socket handed over: what it is, its configured and bound address."""

    what: str
    listen: Address
    bound: Address

    @property
    def kind(self) -> str:
        return _kind(self.what)


def encode(op: str, **fields: Any) -> bytes:
    data = json.dumps({"op": op, **fields}, separators=(",", ":")).encode()
    if len(data) > MAX_MESSAGE:
        raise HandoverError(f"a {op} message of {len(data)} bytes is over {MAX_MESSAGE}")
    return data


def decode(data: bytes) -> dict[str, Any]:
    """One message: a JSON object with a known `op`; HandoverError otherwise."""
    if not data:
        raise HandoverError("the connection closed")
    if len(data) > MAX_MESSAGE:
        raise HandoverError(f"a message over {MAX_MESSAGE} bytes")
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, ValueError):
        raise HandoverError("a message that is not JSON") from None
    if not isinstance(doc, dict) or doc.get("op") not in OPS:
        raise HandoverError("a message without a known op")
    return doc


def expect(doc: dict[str, Any], op: str) -> dict[str, Any]:
    """`doc` if it is an `op` message; HandoverError (the refusal's reason) otherwise."""
    if doc["op"] == op:
        return doc
    if doc["op"] == "refused":
        raise HandoverError(f"refused: {str(doc.get('reason', ''))[:200]}")
    raise HandoverError(f"expected {op}, got {doc['op']}")


def pid_of(doc: dict[str, Any]) -> int:
    pid = doc.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        raise HandoverError("a message without a valid pid")
    return pid


def _address(value: object) -> Address:
    if (
        isinstance(value, list)
        and len(value) == 2
        and isinstance(value[0], str)
        and len(value[0]) <= 255
        and isinstance(value[1], int)
        and not isinstance(value[1], bool)
        and 0 <= value[1] <= 65535
    ):
        return value[0], value[1]
    raise HandoverError(f"not a (host, port): {str(value)[:80]}")


def listener_messages(pid: int, handed: Sequence[Handed]) -> list[tuple[bytes, int]]:
    """The `listeners` messages for `handed`, in order: (data, how many sockets ride on it)."""
    chunks = [handed[i : i + FDS_PER_MESSAGE] for i in range(0, len(handed), FDS_PER_MESSAGE)]
    out = []
    for index, chunk in enumerate(chunks or [[]]):
        items = [{"what": h.what, "listen": list(h.listen), "bound": list(h.bound)} for h in chunk]
        last = index == max(len(chunks) - 1, 0)
        out.append((encode("listeners", pid=pid, listeners=items, last=last), len(chunk)))
    return out


def parse_listeners(doc: dict[str, Any]) -> tuple[list[Handed], bool]:
    """The sockets a `listeners` message describes, and whether it is the last one."""
    items = doc.get("listeners")
    if not isinstance(items, list) or len(items) > FDS_PER_MESSAGE:
        raise HandoverError("a listeners message without a list of at most 32 listeners")
    out = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("what"), str):
            raise HandoverError("a listener without what it is")
        out.append(
            Handed(item["what"][:200], _address(item.get("listen")), _address(item.get("bound")))
        )
    return out, doc.get("last") is True


@dataclass
class Assignment:
    """Which received socket serves what (indexes into the received list)."""

    services: dict[str, int] = field(default_factory=dict)
    """A service's name -> the socket it serves on."""
    admin: int | None = None
    unused: list[int] = field(default_factory=list)


def assign(
    handed: Sequence[Handed], services: Sequence[tuple[str, Address]], admin: Address | None
) -> Assignment:
    """Give each received socket to a listener of the new config (`services`: name and
    listen address): the same service at the same configured address first (port 0
    too), then the listener of the same kind, then of any kind, whose address is a
    socket's configured one, then its bound one (a port written out). Port 0 matches
    only its own service: which port another one gets is anyone's guess."""
    targets: list[tuple[str, Address]] = [(f"service {n}", a) for n, a in services]
    if admin is not None:
        targets.append(("admin", admin))
    taken: dict[int, int] = {}  # target index -> socket index
    for step in range(4):
        for i, h in enumerate(handed):
            if i in taken.values():
                continue
            for t, (what, address) in enumerate(targets):
                if t not in taken and _fits(step, h, what, address):
                    taken[t] = i
                    break
    out = Assignment()
    for t, i in taken.items():
        what = targets[t][0]
        if what == "admin":
            out.admin = i
        else:
            out.services[what.removeprefix("service ")] = i
    out.unused = [i for i in range(len(handed)) if i not in taken.values()]
    return out


def _fits(step: int, handed: Handed, what: str, address: Address) -> bool:
    """Whether, at `assign`'s step `step`, the socket `handed` goes to listener `what`."""
    if step == 0:
        return handed.what == what and handed.listen == address
    if address[1] == 0:
        return False
    if step == 1:
        return _kind(what) == handed.kind and handed.listen == address
    if step == 2:
        return _kind(what) == handed.kind and handed.bound == address
    return address in (handed.listen, handed.bound)


def _kind(what: str) -> str:
    return "admin" if what == "admin" else "service"


# -- the path -----------------------------------------------------------------------------


def identity(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def check_path(path: str, replacing: str | None = None) -> None:
    """Make `path` free for a handover socket: a stale socket file there is removed;
    HandoverError if a balancer answers there (unless it is `replacing`, the process
    taken over, whose path is renamed over later) or something else is there."""
    if len(os.fsencode(path)) > MAX_PATH:
        raise HandoverError(f"{path}: a Unix socket path of at most {MAX_PATH} bytes, please")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise HandoverError(f"{path} exists and is not a socket: refusing to replace it")
    if replacing is not None and identity(replacing) == (st.st_dev, st.st_ino):
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        log.info("handover socket %s was stale (nothing answers): replaced", path)
        return
    except OSError as exc:
        raise HandoverError(
            f"{path}: something else listens there ({exc.strerror or exc})"
        ) from None
    finally:
        probe.close()
    raise HandoverError(
        f"a balancer answers on {path} already: take over from it with --takeover {path}, "
        "or stop it first"
    )


def bind_control(path: str) -> tuple[socket.socket, tuple[int, int] | None]:
    """A listening seqpacket socket at `path`, mode 0600, bound under a temporary name
    and renamed over `path`; with the identity of the file, to remove it at exit."""
    temporary = f"{path}.{os.getpid()}.new"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(temporary)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        mask = os.umask(0o177)
        try:
            sock.bind(temporary)
        finally:
            os.umask(mask)
        os.chmod(temporary, 0o600)
        sock.listen(8)
        sock.setblocking(False)
        os.rename(temporary, path)
    except BaseException:
        sock.close()
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    return sock, identity(path)


# -- messages on a socket ---------------------------------------------------------------------


async def recv_message(conn: socket.socket, timeout: float, what: str) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout):
            data = await loop.sock_recv(conn, MAX_MESSAGE + 1)
    except TimeoutError:
        raise HandoverError(f"no {what} within {timeout:g}s") from None
    return decode(data)


async def send_message(conn: socket.socket, data: bytes, fds: Sequence[int] = ()) -> None:
    loop = asyncio.get_running_loop()
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    deadline = loop.time() + SEND_TIMEOUT
    while True:
        try:
            conn.sendmsg([data], ancillary)
            return
        except (BlockingIOError, InterruptedError):
            if loop.time() > deadline:
                raise HandoverError(f"the peer took nothing in for {SEND_TIMEOUT:g}s") from None
            await asyncio.sleep(0.01)


def _sockets(fds: Sequence[int]) -> list[socket.socket]:
    out: list[socket.socket] = []
    for fd in fds:
        try:
            out.append(socket.socket(fileno=fd))
        except OSError:
            os.close(fd)
    return out


def recv_listeners(conn: socket.socket) -> tuple[dict[str, Any], list[socket.socket]]:
    """One message and the sockets riding on it, on a blocking `conn` with a timeout set.
    HandoverError (every socket received closed) on a timeout, a closed connection, a
    message or ancillary data cut short, or a bad message."""
    try:
        data, ancillary, flags, _ = conn.recvmsg(
            MAX_MESSAGE + 1,
            socket.CMSG_SPACE(FDS_PER_MESSAGE * array.array("i").itemsize),
            socket.MSG_CMSG_CLOEXEC,
        )
    except TimeoutError:
        raise HandoverError(f"no answer within {conn.gettimeout():g}s") from None
    fds: list[int] = []
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            ints = array.array("i")
            ints.frombytes(payload[: len(payload) - len(payload) % ints.itemsize])
            fds.extend(ints)
    socks = _sockets(fds)
    try:
        if flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC):
            raise HandoverError("a message or its sockets cut short")
        doc = decode(data)
        for sock in socks:
            if sock.type != socket.SOCK_STREAM or not sock.getsockopt(
                socket.SOL_SOCKET, socket.SO_ACCEPTCONN
            ):
                raise HandoverError("a socket handed over that is not a listening TCP socket")
            sock.setblocking(False)
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return doc, socks
