"""The backend socket of a pair the io_uring engine relays: a transport the loop never
watches (`HeldSocket`).

Why: uvloop starts reading a socket handed to `create_connection` right after the
protocol's `connection_made`, whatever that did, so bytes could be read by the loop after
the ring began to relay them, out of order. A backend socket meant for the ring is never
given to the loop: `BackendSide` gets this object instead, which has what the relay, the
byte counters, the idle sweep and the resets use of a transport (the socket in
`get_extra_info`, close, abort) and nothing that moves bytes.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

_NO_EXTRA: dict[str, Any] = {}
"""What `asyncio.BaseTransport` keeps; here every answer comes from the socket."""


class HeldSocket(asyncio.Transport):
    """A connected socket held for the ring, dressed as a transport."""

    __slots__ = ("_closing", "_loop", "_protocol", "_sock")

    def __init__(
        self, loop: asyncio.AbstractEventLoop, sock: socket.socket, protocol: asyncio.Protocol
    ) -> None:
        self._extra: dict[str, Any] = _NO_EXTRA
        self._loop = loop
        self._sock: socket.socket | None = sock
        self._protocol = protocol
        self._closing = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        sock = self._sock
        if sock is None:
            return default
        try:
            if name == "socket":
                return sock
            if name == "peername":
                return sock.getpeername()
            if name == "sockname":
                return sock.getsockname()
        except OSError:
            pass
        return default

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol  # type: ignore[assignment]

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol

    def is_closing(self) -> bool:
        return self._closing

    def is_reading(self) -> bool:
        return False

    def pause_reading(self) -> None:
        """The ring reads this socket, never the loop."""

    def resume_reading(self) -> None:
        """The ring reads this socket, never the loop."""

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        """Nothing is buffered here."""

    def get_write_buffer_size(self) -> int:
        return 0

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def write(self, data: Any) -> None:
        raise RuntimeError("a socket held for the io_uring engine is written by the ring")

    def close(self) -> None:
        """Report the connection lost on the next loop turn, then close the socket (as a
        loop's transport does: the protocol still sees the socket open)."""
        if self._closing:
            return
        self._closing = True
        self._loop.call_soon(self._lost)

    def abort(self) -> None:
        self.close()

    def _lost(self) -> None:
        try:
            self._protocol.connection_lost(None)
        finally:
            sock, self._sock = self._sock, None
            if sock is not None:
                sock.close()
