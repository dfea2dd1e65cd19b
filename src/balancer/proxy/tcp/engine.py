"""Tcp mode's relay engines: what moves the bytes once a connection's backend is connected.

How it works: picking the backend, connecting to it and everything before stays in
asyncio (`relay`). Then, with `engine = "uvloop"`, the loop's transports relay (each side's
`data_received` is the other's `write`). With `io_uring`, the backend socket is never
given to the loop (`held.HeldSocket` stands for its transport) and `ClientSide.attach`
hands the pair to `UringRelay`, one per process (one io_uring, `balancer.net._uring`, C):
the client's transport is paused and kept, the ring relays on a duplicate of its
descriptor and on the held backend socket, with one bounded buffer per direction (a slow
reader stalls the send, so the other side is not read), EOF passed on as
shutdown(SHUT_WR), and completions signalled on an eventfd the loop watches
(`add_reader`), so admin, health checks and the other modes share the loop. What one
loop turn queues goes to the kernel in one io_uring_enter.

The hand-back: when both directions have ended, or one side failed, or Python asked
(`Pair.close`: send what was received, then end; `Pair.abort`: at once) the ring closes its
duplicate and `settle` gives the pair back to its `ClientSide`, which does what the
uvloop relay does on the same event: close both transports, reset the client when the
backend failed (a failure for the policy) or the backend when the client did. Since the
transports keep their sockets all along, the byte counters (`TCP_INFO`, the same kernel
counts as the uvloop relay's), the idle sweep, the limits, the drain and `/status` read
the same things as with uvloop; the ring also counts the bytes it relayed per pair.

`auto` takes io_uring when a ring can be set up here (the kernel, or seccomp in a
container, may refuse `io_uring_setup`), else uvloop. An explicit `io_uring` that cannot
be set up stops the start with an error: a service configured for it is not silently
run on something else (`EngineUnavailable`).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
from typing import Any, Protocol

from balancer import native
from balancer.config.errors import ConfigError
from balancer.net.sockopts import reset
from balancer.proxy.tcp.held import HeldSocket

log = logging.getLogger("balancer")

ENGINES = ("io_uring", "uvloop")
AUTO_CHOICE = "io_uring"
"""What `auto` takes when io_uring works (see docs/tcp-engine.md for the figures)."""
RING_ENTRIES = 1024
BUFFER_SIZE = 64 * 1024
"""Bytes buffered per direction of a relayed pair: its memory bound in the ring."""
SETUP_FLAGS_VAR = "BALANCER_IO_URING_SETUP"
"""The io_uring_setup flags, comma separated, instead of the default `DEFAULT_SETUP`:
single_issuer, coop_taskrun, defer_taskrun (with single_issuer), sqpoll (a kernel thread
polling the ring: it takes a core), submit_each (no batching: one io_uring_enter per
operation), no_pool (a buffer per direction instead of the shared pool), or none. For
measuring; see docs/benchmarks.md."""
DEFAULT_SETUP = "single_issuer,coop_taskrun"
"""Only the loop's thread submits, and completions run when it next enters the kernel
rather than by interrupting it: measured the cheapest (docs/benchmarks.md)."""

_DONE, _CLOSED, _ABORTED, _CLIENT_FAILED, _BACKEND_FAILED = range(5)


class EngineUnavailable(ConfigError):
    """`engine = "io_uring"` where a ring cannot be set up."""


class Side(Protocol):
    @property
    def transport(self) -> asyncio.Transport: ...


class Relayed(Protocol):
    """What the engine needs of a relayed connection (`relay.ClientSide`)."""

    closed: bool
    client_eof: bool
    server_eof: bool
    pair: Pair | None

    @property
    def transport(self) -> asyncio.Transport: ...

    @property
    def upstream(self) -> Side | None: ...

    def close(self) -> None: ...

    def abort(self) -> None: ...

    def account(self) -> None: ...

    def backend_lost(self, exc: Exception | None) -> None: ...


def _backend(client: Relayed) -> asyncio.Transport:
    upstream = client.upstream
    assert upstream is not None, "a relayed pair has its backend side"
    return upstream.transport


def setup_flags() -> int:
    """The io_uring_setup flags: `BALANCER_IO_URING_SETUP`'s, else `DEFAULT_SETUP`'s."""
    from balancer.net import _uring

    names = {
        "single_issuer": _uring.SETUP_SINGLE_ISSUER,
        "defer_taskrun": _uring.SETUP_SINGLE_ISSUER | _uring.SETUP_DEFER_TASKRUN,
        "coop_taskrun": _uring.SETUP_COOP_TASKRUN,
        "sqpoll": _uring.SETUP_SQPOLL,
        "submit_each": _uring.SUBMIT_EACH,
        "no_pool": _uring.NO_POOL,
    }
    flags = 0
    for word in os.environ.get(SETUP_FLAGS_VAR, DEFAULT_SETUP).split(","):
        if word.strip():
            flags |= names.get(word.strip(), 0)
    return flags


def open_ring(entries: int = RING_ENTRIES) -> Any:
    """A new ring (`_uring.Ring`); OSError or ImportError where there can be none."""
    if native.disabled():
        raise ImportError(f"compiled extensions are off ({native.ENV_VAR} is set)")
    from balancer.net import _uring

    flags = setup_flags()
    try:
        return _uring.Ring(entries, flags, BUFFER_SIZE)
    except OSError as exc:
        if exc.errno != errno.EINVAL or not flags:
            raise
        return _uring.Ring(entries, 0, BUFFER_SIZE)  # a kernel older than the flags


def unavailable() -> str | None:
    """Why io_uring cannot relay here; None: it can."""
    try:
        ring = open_ring(8)
    except ImportError as exc:
        if native.disabled():
            return str(exc)
        return "the io_uring extension is not built (balancer.net._uring)"
    except OSError as exc:
        why = os.strerror(exc.errno) if exc.errno else str(exc)
        if exc.errno in (errno.EPERM, errno.ENOSYS):
            why += " (a seccomp filter or a kernel without io_uring)"
        return f"io_uring_setup failed: {why}"
    ring.close()
    return None


def choose(service: str, requested: str) -> tuple[str, str]:
    """The engine a tcp service runs and the start-up log's words for it; raises
    EngineUnavailable when io_uring is asked for by name and cannot be set up."""
    if requested == "uvloop":
        return "uvloop", "uvloop (configured)"
    why = unavailable()
    if requested == "io_uring":
        if why is not None:
            raise EngineUnavailable(
                "",
                f"services.{service}.engine",
                f'"io_uring", but {why}; engine = "auto" falls back to uvloop',
            )
        return "io_uring", "io_uring (configured)"
    if why is not None:
        return "uvloop", f"uvloop (auto: {why})"
    return AUTO_CHOICE, f"{AUTO_CHOICE} (auto)"


class Pair:
    """One connection relayed by the ring."""

    __slots__ = ("engine", "slot")

    def __init__(self, engine: UringRelay, slot: int) -> None:
        self.engine = engine
        self.slot = slot

    def close(self) -> None:
        """Send what was received, then end both directions (the hand-back follows)."""
        self.engine.ring.close_pair(self.slot)
        self.engine.flush_soon()

    def abort(self) -> None:
        """Stop at once. The cancellation is submitted on this loop turn, before the held
        backend socket closes (on the next): the ring names sockets by descriptor."""
        self.engine.ring.abort_pair(self.slot)
        self.engine.flush_soon()

    def counts(self) -> tuple[int, int]:
        """Bytes received from the client and from the backend so far."""
        client, backend = self.engine.ring.counts(self.slot)
        return int(client), int(backend)


class UringRelay:
    """The process's ring, watched by the loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.ring = open_ring()
        self.flushing = False
        self.relayed = 0
        """Pairs handed to the ring since it was opened."""
        loop.add_reader(self.ring.fileno(), self._completed)

    def __repr__(self) -> str:
        return f"<UringRelay {self.ring.active} pairs, {self.relayed} relayed>"

    def take(self, client: Relayed, held: bytes | bytearray | None) -> Pair | None:
        """Relay `client` and its backend from now on; None: leave them to the loop (or,
        when the backend socket was held for the ring and the ring cannot take it, the
        connection is aborted)."""
        front = client.transport
        back = _backend(client)
        if not isinstance(back, HeldSocket):
            return None  # TLS: the loop relays
        try:
            slot = self.ring.add(
                front.get_extra_info("socket").fileno(),
                back.get_extra_info("socket").fileno(),
                bytes(held or b""),
                client.client_eof,
                client,
            )
        except (OSError, OverflowError) as exc:
            log.warning("io_uring: a connection could not be relayed, closed: %s", exc)
            client.abort()
            return None
        front.pause_reading()
        back.pause_reading()
        self.relayed += 1
        self.flush_soon()
        return Pair(self, int(slot))

    def flush_soon(self) -> None:
        """Submit what this loop turn queued, in one system call, at its end."""
        if not self.flushing:
            self.flushing = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self.flushing = False
        if self.ring.queued:
            self._settle_all(self.ring.flush())

    def _completed(self) -> None:
        self._settle_all(self.ring.reap())

    def _settle_all(self, finished: list[tuple[Any, int, int, int, int]]) -> None:
        for client, reason, err, _, _ in finished:
            try:
                settle(client, reason, err)
            except Exception:  # pragma: no cover - one connection's bug must not stop the rest
                log.exception("io_uring: handing a connection back failed")

    def close(self) -> None:
        if not self.loop.is_closed():
            self.loop.remove_reader(self.ring.fileno())
        self.ring.close()


def settle(client: Relayed, reason: int, err: int) -> None:
    """The ring is done with `client`'s pair: end the connection as the loop's relay would."""
    client.pair = None
    back = _backend(client)
    if client.closed:  # closed or aborted from Python meanwhile
        back.close()
        client.transport.close()
    elif reason == _DONE:
        client.client_eof = client.server_eof = True
        client.close()
    elif reason == _BACKEND_FAILED:
        client.backend_lost(OSError(err, os.strerror(err)))
        back.abort()
    elif reason == _CLIENT_FAILED:
        client.closed = True
        client.account()
        reset(back)
        client.transport.abort()
    else:
        client.abort()


_SHARED: list[UringRelay] = []


def shared(loop: asyncio.AbstractEventLoop) -> UringRelay:
    """The process's ring, on `loop` (one made for an earlier loop, now gone, is closed)."""
    if _SHARED and _SHARED[0].loop is loop and not loop.is_closed():
        return _SHARED[0]
    while _SHARED:
        _SHARED.pop().close()
    relay = UringRelay(loop)
    _SHARED.append(relay)
    return relay
