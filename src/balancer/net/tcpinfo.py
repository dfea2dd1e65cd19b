"""What the kernel knows of a TCP socket (`TCP_INFO`, Linux): bytes received and
time since the last received data, read instead of counted per chunk."""

from __future__ import annotations

import asyncio
import socket
import sys
from typing import Protocol

_TCP_INFO_LEN = 136
"""`struct tcp_info` up to `tcpi_bytes_received` (Linux)."""
_FIN_RECEIVED = frozenset({6, 8, 9, 11})
"""TCP states after the peer's FIN: TIME_WAIT, CLOSE_WAIT, LAST_ACK, CLOSING."""
_TCP_CLOSE = 7
"""Also where a socket that sent its FIN first ends once the peer's FIN arrives."""


def tcp_info(transport: asyncio.BaseTransport) -> bytes | None:
    """The kernel's `TCP_INFO` of a transport's socket, None where there is none."""
    try:
        sock = transport.get_extra_info("socket")
    except AttributeError:  # asyncio's TLS transport, closed: its protocol is gone
        return None
    if sock is None:
        return None
    try:
        info: bytes = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_LEN)
    except (OSError, AttributeError):
        return None
    return info if len(info) >= _TCP_INFO_LEN else None


def bytes_received(transport: asyncio.BaseTransport, eof_seen: bool, eof_sent: bool) -> int:
    """Bytes the socket has received from its peer, the FIN not counted; -1 if unknown.

    The FIN takes a sequence number and `tcpi_bytes_received` counts it. It has
    arrived if the loop reported the EOF (`eof_seen`), or the state says so, or
    the socket is closed after sending its own FIN (`eof_sent`): the kernel then
    moves it to TIME_WAIT and leaves the socket itself in CLOSE.
    """
    info = tcp_info(transport)
    if info is None:
        return -1
    received = int.from_bytes(info[128:136], sys.byteorder)
    state = info[0]
    if received and (eof_seen or state in _FIN_RECEIVED or (eof_sent and state == _TCP_CLOSE)):
        received -= 1
    return received


def quiet_ms(transport: asyncio.BaseTransport) -> int:
    """Milliseconds since the socket last received data (0 if unknown)."""
    info = tcp_info(transport)
    if info is None:
        return 0
    return int.from_bytes(info[52:56], sys.byteorder)


class Counted(Protocol):
    """One side of a relayed connection whose received bytes are counted."""

    lost: bool
    counted: int

    @property
    def transport(self) -> asyncio.BaseTransport: ...


def newly_received(side: Counted, eof_seen: bool, eof_sent: bool) -> int:
    """Bytes `side`'s socket received since the last call (0 once the side is lost)."""
    if side.lost:
        return 0
    received = bytes_received(side.transport, eof_seen, eof_sent)
    if received <= side.counted:
        return 0
    new = received - side.counted
    side.counted = received
    return new
