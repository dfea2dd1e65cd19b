"""Readiness for a service manager: systemd's `sd_notify` protocol, in a few lines.

When `NOTIFY_SOCKET` names a socket (a path, or `@name` in the abstract namespace),
each state change is one datagram of `KEY=value` lines on it: `READY=1` once every
listener serves, `RELOADING=1` (with `MONOTONIC_USEC`) while a reload runs,
`STOPPING=1` when a stop starts, `STATUS=...` beside them. Without the variable every
call does nothing. A notify socket that is gone or refuses never fails the balancer:
the first failure is logged, the rest are dropped quietly.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

log = logging.getLogger("balancer")

MAX_STATUS = 400
"""A STATUS text longer than this is cut (systemd shows one line of it)."""


def notify_address(value: str) -> str | bytes | None:
    """The socket address `NOTIFY_SOCKET` names: a path, or `@name` -> b"\\0name"; None
    for an empty value or one of another kind (`vsock:`, which this does not speak)."""
    if not value:
        return None
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None


def notify_message(**fields: str | int) -> bytes:
    """One notification: `KEY=value` lines (`status` -> `STATUS`, newlines flattened)."""
    lines = []
    for key, value in fields.items():
        text = " ".join(str(value).split())
        if key == "status":
            text = text[:MAX_STATUS]
        lines.append(f"{key.upper()}={text}")
    return ("\n".join(lines) + "\n").encode()


class Notifier:
    """Sends notifications to a service manager; does nothing without an address."""

    def __init__(self, address: str | bytes | None) -> None:
        self.address = address
        self.sent = 0
        self._warned = False

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        env = os.environ if environ is None else environ
        return cls(notify_address(env.get("NOTIFY_SOCKET", "")))

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, **fields: str | int) -> bool:
        """Send one notification; whether it went (never raises)."""
        if self.address is None:
            return False
        data = notify_message(**fields)
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.setblocking(False)
                sock.sendto(data, self.address)
        except OSError as exc:
            if not self._warned:
                self._warned = True
                log.warning("notify socket %r: %s; notifications dropped", self.address, exc)
            return False
        self.sent += 1
        return True

    def ready(self, status: str) -> bool:
        return self.send(ready=1, status=status)

    def reloading(self) -> bool:
        return self.send(
            reloading=1, monotonic_usec=time.monotonic_ns() // 1000, status="reloading"
        )

    def stopping(self, status: str = "stopping") -> bool:
        return self.send(stopping=1, status=status)

    def __repr__(self) -> str:
        return f"<Notifier {self.address!r}: {self.sent} sent>"
