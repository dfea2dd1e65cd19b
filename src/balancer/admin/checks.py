"""Request checks and error answers of the admin endpoint.

Every request passes `guard_middleware` (Host and Origin, decided by
`balancer.admin.security`; an error of any route answered as short JSON, never a
traceback) and each route its `api_handler` (the token its access needs; for a write, a
body that is plain JSON in UTF-8). Handlers read a body with `json_object` (size,
encoding, JSON, known keys) and raise `ApiError` for what the client got wrong; the
balancer's own errors (`balancer.errors`) are answered through the one mapping here,
`http_status`. Every response carries headers that keep it out of frames and stop
content sniffing (`add_security_headers`).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import hdrs, web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from balancer.admin.security import ACCESS, READ, WRITE, AdminGuard
from balancer.config.model import BOUNDS
from balancer.errors import BalancerError, Conflict, InvalidInput, NotFound, Unavailable

log = logging.getLogger("balancer")

GUARD_KEY = web.AppKey("guard", AdminGuard)
MAX_BODY = 64 * 1024
"""Largest request body the admin endpoint reads, in bytes."""
MAX_ERROR = 500
"""Longest error message sent back, in characters."""
SHOWN_KEYS = 5
"""Unknown keys named in an error before "and N more"."""
SECURITY_HEADERS = {
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": (
        "default-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        self.status = status
        self.message = message
        super().__init__(message)


HTTP_STATUS: dict[type[BalancerError], int] = {
    NotFound: 404,
    Conflict: 409,
    InvalidInput: 400,
    Unavailable: 503,
}
"""The status each of the balancer's errors is answered with; any other one is a 500."""


def http_status(error: BalancerError) -> int:
    """The HTTP status that answers `error`: the one of its nearest class in HTTP_STATUS."""
    for cls in type(error).__mro__:
        status = HTTP_STATUS.get(cls)
        if status is not None:
            return status
    return 500


def show(value: object, limit: int = 40) -> str:
    """`repr(value)`, cut to `limit` characters: error messages stay short whatever the input."""
    try:
        text = repr(value)
    except ValueError:  # an int too long to print
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 1] + "…"


def error_response(
    status: int, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    if len(message) > MAX_ERROR:
        message = message[: MAX_ERROR - 1] + "…"
    extra = dict(headers or {})
    if status == 401:
        extra["WWW-Authenticate"] = "Bearer"
    return web.json_response({"error": message}, status=status, headers=extra or None)


def check_body_headers(request: web.Request) -> None:
    """A write's body, if it has one, must be plain JSON in UTF-8 (a form post never is)."""
    encoding = request.headers.get(hdrs.CONTENT_ENCODING, "").strip().lower()
    if encoding not in ("", "identity"):
        raise ApiError(
            415, f"unsupported Content-Encoding {show(encoding)}: send the body uncompressed"
        )
    if hdrs.CONTENT_TYPE not in request.headers and not request.body_exists:
        return
    if request.content_type != "application/json":
        raise ApiError(
            415,
            f"writes take a JSON body: expected Content-Type application/json, got "
            f"{show(request.headers.get(hdrs.CONTENT_TYPE, ''))}",
        )
    charset = request.charset
    if charset is not None and charset.strip().lower() not in ("utf-8", "utf8"):
        raise ApiError(415, f"unsupported charset {show(charset)}: JSON is UTF-8")


async def read_body(request: web.Request) -> bytes:
    try:
        length = request.content_length
    except ValueError:
        raise ApiError(400, "invalid Content-Length") from None
    if length is not None and length > MAX_BODY:
        raise ApiError(413, f"the body is larger than {MAX_BODY} bytes")
    try:
        return await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise ApiError(413, f"the body is larger than {MAX_BODY} bytes") from None
    except (RequestPayloadError, HttpProcessingError) as exc:
        raise ApiError(400, f"the body could not be read: {show(str(exc), 200)}") from None
    except ConnectionResetError:
        # the client left in the middle of its body: nobody to answer, nothing of ours failed
        raise ApiError(
            400, "the body could not be read: the client closed the connection"
        ) from None


async def json_object(request: web.Request, allowed: tuple[str, ...]) -> dict[str, Any]:
    raw = await read_body(request)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError(400, f"the body is not UTF-8: {exc.reason} at byte {exc.start}") from None
    try:
        body = json.loads(text)
    except RecursionError:
        raise ApiError(400, "the body is not valid JSON: nested too deeply") from None
    except ValueError as exc:
        raise ApiError(400, f"the body is not valid JSON: {show(str(exc), 200)}") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"expected a JSON object, got {type(body).__name__}")
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        shown = ", ".join(show(k) for k in unknown[:SHOWN_KEYS])
        more = f" and {len(unknown) - SHOWN_KEYS} more" if len(unknown) > SHOWN_KEYS else ""
        raise ApiError(400, f"unknown key(s) {shown}{more}: expected {', '.join(allowed)}")
    return body


def check_weight(value: object) -> int:
    bound = BOUNDS["weight"]
    if isinstance(value, bool) or not isinstance(value, int) or not bound.admits(value):
        raise ApiError(400, f"invalid weight {show(value)}: expected {bound.expected(True)}")
    return value


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def api_handler(handler: Handler, *, access: str = READ) -> Handler:
    """Check the route's access ("open", "read", "write"); ApiError and the balancer's own
    errors (`balancer.errors`) become a JSON error."""
    if access not in ACCESS:
        raise ValueError(f"access {access!r}: expected one of {', '.join(ACCESS)}")

    async def wrapped(request: web.Request) -> web.StreamResponse:
        refusal = request.app[GUARD_KEY].check_token(
            access, request.headers.get(hdrs.AUTHORIZATION)
        )
        if refusal is not None:
            return error_response(refusal.status, refusal.message)
        try:
            if access == WRITE:
                check_body_headers(request)
            return await handler(request)
        except ApiError as exc:
            return error_response(exc.status, exc.message)
        except BalancerError as exc:
            return error_response(http_status(exc), str(exc))

    return wrapped


@web.middleware
async def guard_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Host and Origin for every request; errors of any route as short JSON, never a 500
    with a traceback for what a client sent."""
    refusal = request.app[GUARD_KEY].check_request(
        request.headers.get(hdrs.HOST), request.headers.get(hdrs.ORIGIN)
    )
    if refusal is not None:
        return error_response(refusal.status, refusal.message)
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return error_response(
            exc.status, f"{exc.reason}: {request.method} {show(request.path, 200)}", allow
        )
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("admin: %s %s failed", request.method, show(request.path, 200))
        return error_response(500, "internal error; see the balancer's log")


async def add_security_headers(request: web.Request, response: web.StreamResponse) -> None:
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
