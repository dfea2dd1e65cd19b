"""Per-request access log with buffered writes.

Lines are collected in memory and written in one go when the buffer is big
or at most `flush_interval` seconds later, so logging every request costs one
bytes format and a list append, not a system call; the timestamp is made once
per batch of replies.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Sequence
from typing import IO, TYPE_CHECKING, Protocol

from balancer.observe.stamps import utc_second

if TYPE_CHECKING:
    from balancer.core.pool import Backend


class Logged(Protocol):
    """A request as the access log reads it."""

    backend: Backend | None
    started: float
    payload: bytes
    reply: bytes | None


class Peer(Protocol):
    """A client connection as the access log reads it."""

    peer: str


class AccessLog:
    default_format = "text"
    """"text" or "json" (one object per line); set by `balancer.observe.logs.setup_logging`."""

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
        self._lines: list[bytes] = []
        self._service_b = service.encode()
        self._size = 0
        self._timer: asyncio.TimerHandle | None = None
        self._stamp_second = -1
        self._stamp = ""
        self._prefix_ms = -1
        self._stamp_b = b""
        self._prefixes: dict[str, bytes] = {}

    def _timestamp(self) -> str:
        now = time.time()
        sec = int(now)
        if sec != self._stamp_second:
            self._stamp_second = sec
            self._stamp = utc_second(sec)
        return f"{self._stamp}.{int((now - sec) * 1000):03d}Z"

    def record_batch(self, session: Peer, reqs: Sequence[Logged], now: float) -> None:
        """Log the requests whose replies were just written to `session`, in order."""
        lines = self._lines
        size = 0
        if self.json:
            stamp = self._timestamp()
            for req in reqs:
                line = self._json_line(stamp, session, req, now)
                lines.append(line)
                size += len(line)
        else:
            # the line prefix (time to the millisecond, service, client) is made once
            # per client and millisecond
            wall_ms = int(time.time() * 1000)
            if wall_ms != self._prefix_ms:
                self._prefix_ms = wall_ms
                self._prefixes.clear()
                sec, milli = divmod(wall_ms, 1000)
                if sec != self._stamp_second:
                    self._stamp_second = sec
                    self._stamp = utc_second(sec)
                self._stamp_b = b"%s.%03dZ %s " % (self._stamp.encode(), milli, self._service_b)
            prefix = self._prefixes.get(session.peer)
            if prefix is None:
                prefix = self._prefixes[session.peer] = b"%s%s -> " % (
                    self._stamp_b,
                    session.peer.encode(),
                )
            for req in reqs:
                backend = req.backend
                ms = (now - req.started) * 1000.0 if req.started else 0.0
                payload = req.payload
                if backend is not None and payload.isalnum() and len(payload) <= 64:
                    line = b"%s%s '%s' %.3fms ok\n" % (prefix, backend.address_bytes, payload, ms)
                else:
                    text = payload[:64].decode("utf-8", "backslashreplace")
                    message = repr(text).encode("utf-8", "backslashreplace")
                    if backend is not None:
                        line = b"%s%s %s %.3fms ok\n" % (
                            prefix,
                            backend.address_bytes,
                            message,
                            ms,
                        )
                    else:
                        line = b"%s- %s %.3fms %s\n" % (prefix, message, ms, req.reply or b"")
                lines.append(line)
                size += len(line)
        self._size += size
        if self._size >= self.max_buffer:
            self.flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.flush_interval, self.flush)

    def record_http(self, peer: str, fields: dict[str, object]) -> None:
        """Log one http-mode request (or a request refused before it was read whole)."""
        stamp = self._timestamp()
        if self.json:
            doc = {"ts": stamp, "service": self.service, "client": str(peer), **fields}
            line = json.dumps(doc, ensure_ascii=False).encode("utf-8", "replace") + b"\n"
        else:
            get = fields.get
            if "method" in fields:
                request = f'"{get("method")} {get("host")}{get("path")}"'
                text = (
                    f"{stamp} {self.service} {peer} -> {get('backend')} {request} "
                    f"{get('status')} in={get('bytes_in')} out={get('bytes_out')} "
                    f"retries={get('retries')} queue={get('queue_ms')}ms "
                    f"connect={get('connect_ms')}ms "
                    f"header={get('header_ms')}ms total={get('total_ms')}ms "
                    f"term={get('term')} id={get('request_id') or '-'}"
                )
                if "tls_version" in fields:
                    text += (
                        f" tls={get('tls_version')} sni={get('sni') or '-'}"
                        f" subject={json.dumps(get('client_subject') or '-')}"
                    )
            else:
                text = (
                    f"{stamp} {self.service} {peer} -> - {get('status')} "
                    f"term={get('term')} {get('error')!r}"
                )
            line = text.encode("utf-8", "backslashreplace") + b"\n"
        self._lines.append(line)
        self._size += len(line)
        if self._size >= self.max_buffer:
            self.flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.flush_interval, self.flush)

    def _json_line(self, stamp: str, session: Peer, req: Logged, now: float) -> bytes:
        backend = req.backend.address if req.backend is not None else "-"
        duration_ms = (now - req.started) * 1000.0 if req.started else 0.0
        reply = req.reply or b""
        outcome = "ok" if req.backend is not None else reply.decode("utf-8", "replace")
        line = json.dumps(
            {
                "ts": stamp,
                "service": self.service,
                "client": str(session.peer),
                "backend": backend,
                "message": req.payload[:64].decode("utf-8", "backslashreplace"),
                "duration_ms": round(duration_ms, 3),
                "outcome": outcome,
            },
            ensure_ascii=False,
        )
        return line.encode("utf-8", "replace") + b"\n"

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._lines:
            return
        data = b"".join(self._lines)
        self._lines.clear()
        self._size = 0
        try:
            self.stream.write(data)
            self.stream.flush()
        except (OSError, ValueError):
            pass
