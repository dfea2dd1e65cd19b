"""Per-request access log with buffered writes.

Lines are collected in memory and written in one go when the buffer is big
or at most `flush_interval` seconds later, so logging every request costs a
string format and a list append, not a system call.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    from balancer.proxy.message import ClientSession, Request


class AccessLog:
    default_format = "text"
    """"text" or "json" (one object per line); set by `balancer.logs.setup_logging`."""

    def __init__(
        self,
        service: str,
        stream: IO[bytes] | None = None,
        *,
        flush_interval: float = 0.5,
        max_buffer: int = 1 << 16,
        fmt: str | None = None,
    ) -> None:
        self.service = service
        self.json = (fmt or self.default_format) == "json"
        self.stream: IO[bytes] = stream if stream is not None else sys.stdout.buffer
        self.flush_interval = flush_interval
        self.max_buffer = max_buffer
        self._lines: list[str] = []
        self._size = 0
        self._timer: asyncio.TimerHandle | None = None
        self._stamp_second = -1
        self._stamp = ""

    def _timestamp(self) -> str:
        now = time.time()
        sec = int(now)
        if sec != self._stamp_second:
            self._stamp_second = sec
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
        return f"{self._stamp}.{int((now - sec) * 1000):03d}Z"

    def record(self, session: ClientSession, req: Request, now: float) -> None:
        backend = req.backend.address if req.backend is not None else "-"
        duration_ms = (now - req.started) * 1000.0 if req.started else 0.0
        reply = req.reply or b""
        outcome = "ok" if req.backend is not None else reply.decode("utf-8", "replace")
        message = req.payload[:64].decode("utf-8", "backslashreplace")
        if self.json:
            line = json.dumps(
                {
                    "ts": self._timestamp(),
                    "service": self.service,
                    "client": str(session.peer),
                    "backend": backend,
                    "message": message,
                    "duration_ms": round(duration_ms, 3),
                    "outcome": outcome,
                },
                ensure_ascii=False,
            )
            line += "\n"
        else:
            line = (
                f"{self._timestamp()} {self.service} {session.peer} -> {backend} "
                f"{message!r} {duration_ms:.3f}ms {outcome}\n"
            )
        self._lines.append(line)
        self._size += len(line)
        if self._size >= self.max_buffer:
            self.flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.flush_interval, self.flush)

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._lines:
            return
        data = "".join(self._lines).encode("utf-8", "replace")
        self._lines.clear()
        self._size = 0
        try:
            self.stream.write(data)
            self.stream.flush()
        except (OSError, ValueError):
            pass
