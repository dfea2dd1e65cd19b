"""The `[services.NAME.http]` table: http mode's limits, timeouts, retries and header rules."""

from __future__ import annotations

import re

from balancer.config.addresses import parse_networks
from balancer.config.bounds import show_value
from balancer.config.checks import Problems
from balancer.config.model import HttpConfig, RouteConfig
from balancer.config.schema import HTTP_KEYS, ROUTE_KEYS
from balancer.config.table import Table

_TOKEN_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_FIELD_VALUE_RE = re.compile(r"[\t\x20-\x7e]*")
RETRYABLE_STATUS = (502, 503, 504)


def _names(t: Table, key: str) -> tuple[str, ...]:
    value = t.data.get(key, [])
    if not isinstance(value, list) or not all(
        isinstance(v, str) and _TOKEN_RE.fullmatch(v) for v in value
    ):
        t.fail(key, f"expected a list of header names, got {show_value(value)}")
        return ()
    return tuple(value)


def _text(t: Table, key: str) -> str:
    """A string setting that may be empty (its default)."""
    value = t.data.get(key, "")
    if isinstance(value, str):
        return value
    t.fail(key, f"expected a string, got {show_value(value)}")
    return ""


def read_http(data: object, path: str, problems: Problems, mode: str) -> HttpConfig:
    d = HttpConfig()
    t = Table.read(data, path, problems, HTTP_KEYS, what="a table of http mode settings")
    if t is None:
        return d
    if t.data and mode != "http":
        problems.add(path, f'expected no http settings in {mode} mode (they need mode = "http")')
    statuses: tuple[int, ...] = ()
    if t.has("retry_on_status"):
        value = t.data["retry_on_status"]
        if isinstance(value, list) and all(
            isinstance(v, int) and not isinstance(v, bool) and v in RETRYABLE_STATUS for v in value
        ):
            statuses = tuple(sorted(set(value)))
        else:
            among = list(RETRYABLE_STATUS)
            t.fail(
                "retry_on_status",
                f"expected a list of statuses among {among}, got {show_value(value)}",
            )
    trusted: tuple[str, ...] = ()
    if t.has("trusted_proxies"):
        value = t.data["trusted_proxies"]
        try:
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ValueError
            parse_networks(value)
            trusted = tuple(value)
        except ValueError:
            t.fail(
                "trusted_proxies",
                f'expected a list of addresses or CIDRs like "10.0.0.0/8", got {show_value(value)}',
            )
    set_headers: list[tuple[str, str]] = []
    if t.has("set_headers"):
        value = t.data["set_headers"]
        if isinstance(value, dict) and all(
            isinstance(k, str) and _TOKEN_RE.fullmatch(k)
            and isinstance(v, str) and _FIELD_VALUE_RE.fullmatch(v)
            for k, v in value.items()
        ):  # fmt: skip
            set_headers = [(k, v) for k, v in value.items()]
        else:
            t.fail(
                "set_headers",
                'expected a table of header names to one-line values, e.g. { "X-Env" = "prod" }, '
                f"got {show_value(value)}",
            )
    strip_prefix = _text(t, "strip_prefix")
    if strip_prefix and (
        not strip_prefix.startswith("/")
        or not _FIELD_VALUE_RE.fullmatch(strip_prefix)
        or " " in strip_prefix
        or strip_prefix.endswith("/")
    ):
        t.fail("strip_prefix", f'expected a path like "/api" (no trailing /), got {strip_prefix!r}')
        strip_prefix = ""
    host_rewrite = _text(t, "host_rewrite")
    if host_rewrite and not re.fullmatch(r"[A-Za-z0-9.:\[\]-]+", host_rewrite):
        t.fail("host_rewrite", f"expected a host name or host:port, got {host_rewrite!r}")
        host_rewrite = ""
    sticky = _text(t, "sticky_cookie")
    if sticky and not _TOKEN_RE.fullmatch(sticky):
        t.fail("sticky_cookie", f"expected a cookie name of token characters, got {sticky!r}")
        sticky = ""
    via = _text(t, "via")
    if via and not _TOKEN_RE.fullmatch(via):
        t.fail("via", f"expected a pseudonym of token characters, got {via!r}")
        via = ""
    return HttpConfig(
        max_header_bytes=t.bounded_int(
            "max_header_bytes", d.max_header_bytes, "http.max_header_bytes"
        ),
        max_headers=t.bounded_int("max_headers", d.max_headers, "http.max_headers"),
        header_timeout=t.bounded("header_timeout", d.header_timeout, "http.header_timeout"),
        request_body_timeout=t.bounded(
            "request_body_timeout", d.request_body_timeout, "http.request_body_timeout"
        ),
        response_header_timeout=t.bounded(
            "response_header_timeout", d.response_header_timeout, "http.response_header_timeout"
        ),
        keepalive_timeout=t.bounded(
            "keepalive_timeout", d.keepalive_timeout, "http.keepalive_timeout"
        ),
        upstream_idle_timeout=t.bounded(
            "upstream_idle_timeout", d.upstream_idle_timeout, "http.upstream_idle_timeout"
        ),
        max_idle=t.bounded_int("max_idle", d.max_idle, "http.max_idle"),
        max_requests_per_connection=t.bounded_int(
            "max_requests_per_connection",
            d.max_requests_per_connection,
            "http.max_requests_per_connection",
        ),
        max_body_bytes=t.bounded_int("max_body_bytes", d.max_body_bytes, "http.max_body_bytes"),
        replay_buffer=t.bounded_int("replay_buffer", d.replay_buffer, "http.replay_buffer"),
        retry_on_status=statuses,
        retry_non_idempotent=t.boolean("retry_non_idempotent", d.retry_non_idempotent),
        trusted_proxies=trusted,
        forwarded=t.boolean("forwarded", d.forwarded),
        via=via,
        request_id=t.boolean("request_id", d.request_id),
        set_headers=tuple(set_headers),
        remove_headers=_names(t, "remove_headers"),
        strip_prefix=strip_prefix,
        host_rewrite=host_rewrite,
        tunnel_timeout=t.bounded("tunnel_timeout", d.tunnel_timeout, "http.tunnel_timeout"),
        sticky_cookie=sticky,
    )


_HOST_RE = re.compile(r"(\*\.)?[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)*\.?")


def _strings(t: Table, key: str, pattern: re.Pattern[str], expected: str) -> tuple[str, ...]:
    value = t.data.get(key, [])
    if isinstance(value, list) and all(isinstance(v, str) and pattern.fullmatch(v) for v in value):
        return tuple(value)
    t.fail(key, f"expected a list of {expected}, got {show_value(value)}")
    return ()


def read_routes(data: object, path: str, problems: Problems, mode: str) -> tuple[RouteConfig, ...]:
    """`routes = [{ service = "api", hosts = [...], path_prefix = "/api", ... }, ...]`."""
    if not isinstance(data, list):
        problems.add(path, f"expected a list of route tables, got {show_value(data)}")
        return ()
    if data and mode != "http":
        problems.add(path, f'expected no routes in {mode} mode (they need mode = "http")')
        return ()
    routes: list[RouteConfig] = []
    for i, item in enumerate(data):
        where = f"{path}[{i}]"
        t = Table.read(item, where, problems, ROUTE_KEYS, what="a route table")
        if t is None:
            continue
        service = t.string("service")
        if service is None and not t.has("service"):
            t.fail("service", "missing: expected the name of the http service that serves it")
        hosts = _strings(t, "hosts", _HOST_RE, 'host names like "a.example" or "*.example"')
        prefix = _text(t, "path_prefix")
        if prefix and (not prefix.startswith("/") or prefix.endswith("/") or " " in prefix):
            t.fail("path_prefix", f'expected a path like "/api" (no trailing /), got {prefix!r}')
        methods = _strings(t, "methods", _TOKEN_RE, 'methods like "GET"')
        headers: tuple[tuple[str, str], ...] = ()
        value = t.data.get("headers", {})
        if isinstance(value, dict) and all(
            isinstance(k, str) and _TOKEN_RE.fullmatch(k)
            and isinstance(v, str) and _FIELD_VALUE_RE.fullmatch(v)
            for k, v in value.items()
        ):  # fmt: skip
            headers = tuple(value.items())
        else:
            t.fail(
                "headers", f'expected a table like {{ "X-Canary" = "1" }}, got {show_value(value)}'
            )
        if service is not None and t.clean(*ROUTE_KEYS):
            routes.append(
                RouteConfig(
                    service=service,
                    hosts=tuple(h.lower().rstrip(".") for h in hosts),
                    path_prefix=prefix,
                    methods=tuple(m.upper() for m in methods),
                    headers=headers,
                )
            )
    return tuple(routes)
