"""Helpers for the admin endpoint's tests: a balancer started with its own admin settings,
and plain HTTP calls that return the status, the headers and the JSON body."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from email.message import Message
from pathlib import Path
from typing import Any

from tests.support import BalancerProc, free_ports, start_balancer

READ_ROUTES = ("/status", "/metrics", "/api/services", "/api/history")
"""Every route that shows the balancer's state (guarded by read_access)."""


closed_ports = free_ports
"""Distinct loopback ports nothing listens on."""


def with_admin(cfg: Path, **settings: object) -> Path:
    """Append an `[admin]` table (listening on a free loopback port unless given) to `cfg`."""
    settings.setdefault("listen", "127.0.0.1:0")
    lines = ["[admin]", *(f"{key} = {json.dumps(value)}" for key, value in settings.items())]
    cfg.write_text(cfg.read_text() + "\n".join(lines) + "\n")
    return cfg


def start_with_admin(cfg: Path, *extra: str, env: dict[str, str] | None = None) -> BalancerProc:
    """`balancer serve CFG` with the file's own `[admin]` table (no --admin flag) and `env`."""
    return start_balancer(cfg, *extra, admin=None, env=env)


@contextmanager
def running_with_admin(
    cfg: Path, *extra: str, env: dict[str, str] | None = None
) -> Iterator[BalancerProc]:
    bal = start_with_admin(cfg, *extra, env=env)
    try:
        yield bal
    finally:
        bal.stop()


def request(
    port: int | None,
    method: str,
    path: str,
    body: object = None,
    *,
    raw: bytes | None = None,
    headers: dict[str, str] | None = None,
    content_type: str | None = "application/json",
) -> tuple[int, Message, Any]:
    """One request to the admin endpoint on `port`: (status, headers, JSON body or text)."""
    assert port is not None
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    all_headers = {"Content-Type": content_type} if content_type is not None else {}
    all_headers.update(headers or {})
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=data, method=method, headers=all_headers
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            status, got, payload = resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as exc:
        status, got, payload = exc.code, exc.headers, exc.read()
    if got.get_content_type() == "application/json":
        return status, got, json.loads(payload)
    return status, got, payload.decode("utf-8", "replace")


def call(
    bal: BalancerProc,
    method: str,
    path: str,
    body: object = None,
    *,
    raw: bytes | None = None,
    headers: dict[str, str] | None = None,
    content_type: str | None = "application/json",
) -> tuple[int, Any]:
    """(status, JSON body) of one request to `bal`'s admin endpoint."""
    status, _, doc = request(
        bal.admin_port,
        method,
        path,
        body,
        raw=raw,
        headers=headers,
        content_type=content_type,
    )
    return status, doc


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}
