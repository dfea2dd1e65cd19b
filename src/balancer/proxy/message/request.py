"""A request on its way through message mode, and the tunables of the mode."""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from balancer.core.pool import Backend

MAX_PENDING_PER_CLIENT = 4096
"""A client with this many unanswered requests is paused until replies drain."""
BACKEND_MAX_REPLY = 16 * 1024 * 1024
PIPELINE_OPEN_THRESHOLD = 8
"""A backend gets another connection when each open one carries this many requests."""
PIPELINE_BATCH_LIMIT = 64
"""Requests of one loop turn that join the write already queued to a backend connection
(more go to the least loaded connection, or open another)."""
MAX_SHORTAGE_RETRIES = 2
"""Re-sends of one request after local shortages (they do not use up `retries`)."""

# a client connection's framing
NEW = 0
LINE = 1
RAW = 2
DETECTING = 3


class Client(Protocol):
    """What a request needs of the client connection it came from."""

    gone: bool
    framing: int
    peer_key: bytes

    def complete(self, req: Request, reply: bytes) -> None: ...


class Request:
    """One request line on its way through the balancer."""

    __slots__ = (
        "attempts",
        "backend",
        "payload",
        "queued_at",
        "reply",
        "sent",
        "session",
        "shortages",
        "started",
        "tried",
    )

    def __init__(self, session: Client, payload: bytes) -> None:
        self.session = session
        self.payload = payload
        self.reply: bytes | None = None
        self.backend: Backend | None = None
        self.tried: list[Backend] | None = None
        self.attempts = 0
        self.shortages = 0
        self.started = 0.0
        self.sent = 0.0
        self.queued_at = 0.0


class Session(Protocol):
    """What the dispatcher needs of a client connection."""

    gone: bool
    framing: int
    peer_key: bytes
    held: int
    last_active: float
    pending: deque[Request]

    def complete(self, req: Request, reply: bytes) -> None: ...

    def try_flush(self) -> None: ...

    def cut(self, reply: bytes) -> None: ...

    @property
    def idle(self) -> bool: ...

    def begin_drain(self) -> None: ...

    def cut_unanswered(self) -> int: ...

    def close(self) -> None: ...
