"""Reading a running balancer's admin endpoint: one JSON document per GET, with the bearer
token that reads may need (`--token`, else $BALANCER_ADMIN_TOKEN)."""

from __future__ import annotations

import http.client
import json
import os
import urllib.error
import urllib.request
from typing import Any

TOKEN_ENV = "BALANCER_ADMIN_TOKEN"

# The admin endpoint is reached directly, never through an HTTP proxy from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class AdminError(Exception):
    """No JSON document from the admin endpoint: `status` is the HTTP status of an error
    reply, or None when nothing usable came back (no connection, no JSON object)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def admin_url(admin: str) -> str:
    """The base URL of the admin endpoint `admin`: a URL, HOST:PORT, :PORT or PORT
    (those two on 127.0.0.1)."""
    admin = admin.strip()
    if admin.startswith(("http://", "https://")):
        return admin.rstrip("/")
    if admin.isdigit():
        return f"http://127.0.0.1:{admin}"
    host, colon, port = admin.rpartition(":")
    if not colon or admin.endswith("]"):
        return f"http://{admin}"
    host = host.strip("[]") or "127.0.0.1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def admin_token(explicit: str | None = None) -> str | None:
    """The bearer token to send: `explicit`, else $BALANCER_ADMIN_TOKEN; None for none."""
    return explicit or os.environ.get(TOKEN_ENV) or None


def get_json(url: str, *, token: str | None = None, timeout: float = 3.0) -> dict[str, Any]:
    """GET `url` (with `Authorization: Bearer TOKEN` when there is a token); the JSON object
    it answers with. Raises AdminError otherwise."""
    headers = {"Accept": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        with _OPENER.open(urllib.request.Request(url, headers=headers), timeout=timeout) as resp:
            doc = json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        raise AdminError(_error_of(exc), exc.code) from None
    except (OSError, ValueError, http.client.HTTPException) as exc:
        raise AdminError(str(getattr(exc, "reason", None) or exc)) from exc
    if not isinstance(doc, dict):
        raise AdminError("the reply is not a JSON object")
    return doc


def _error_of(exc: urllib.error.HTTPError) -> str:
    """An error reply as `STATUS MESSAGE`, the message from its `{"error": ...}` body."""
    try:
        message = json.loads(exc.read())["error"]
    except (OSError, ValueError, KeyError, TypeError):
        return str(exc)
    return f"{exc.code} {message}"
