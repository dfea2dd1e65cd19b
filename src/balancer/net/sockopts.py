"""Socket options set on connected transports, the same way in every mode."""

from __future__ import annotations

import asyncio
import socket
import struct

_LINGER_RESET = struct.pack("ii", 1, 0)


def set_nodelay(transport: asyncio.BaseTransport) -> None:
    """TCP_NODELAY (uvloop sets it on every TCP transport; plain asyncio needs it set)."""
    if type(transport).__module__.startswith("uvloop"):
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:  # pragma: no cover - closed under us
            pass


def reset(transport: asyncio.Transport) -> None:
    """Abort `transport` so that the peer sees a reset, not an orderly close."""
    try:
        sock = transport.get_extra_info("socket")
    except AttributeError:  # asyncio's TLS transport, closed: its protocol is gone
        sock = None
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
        except OSError:
            pass
    transport.abort()


def half_close(transport: asyncio.Transport) -> None:
    """Pass an EOF on: `write_eof`, or a close (after what is queued) where the transport
    has no half-close (TLS)."""
    if transport.can_write_eof():
        transport.write_eof()
    else:
        transport.close()
