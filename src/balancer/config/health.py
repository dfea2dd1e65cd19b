"""The `[services.NAME.health]` table: the check's type and the settings of each type.

`type` is "connect", "line" or "http". Without it a table means what it always
did: "line" when there is a probe to send (message mode's default, or `send`
set), else "connect". A setting of another type than the check's (`path` on a
line check, `send` on an http one) is an error naming the key, not ignored.
"""

from __future__ import annotations

import re

from balancer.config.bounds import show_value
from balancer.config.checks import Problems
from balancer.config.model import HEALTH_TYPES, HTTP_STATUS, HealthConfig
from balancer.config.schema import HEALTH_KEYS
from balancer.config.table import Table

LINE_KEYS = ("send", "expect")
HTTP_ONLY_KEYS = ("method", "path", "host", "expect_status", "expect_body", "disable_on_404")
_TOKEN_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_PATH_RE = re.compile(r"/[\x21-\x7e]*")
_HOST_RE = re.compile(r"[A-Za-z0-9.:\[\]-]*")
_BODY_RE = re.compile(r".{0,1024}", re.DOTALL)
_STATUS_RE = re.compile(r"\s*(\d{3})\s*(?:-\s*(\d{3})\s*)?")
_STATUS_EXPECTED = (
    'expected a status range like "200-399", or a list of statuses and ranges like '
    f'[200, 204] or ["200-299", 304], each from {HTTP_STATUS.low:g} to {HTTP_STATUS.high:g}'
)


def _probe(table: Table, key: str, default: str | None) -> str | None:
    if not table.has(key):
        return default
    value = table.data[key]
    if value is False:
        return None
    if isinstance(value, str) and value and "\n" not in value and "\r" not in value:
        return value
    table.fail(
        key, f"expected a non-empty one-line string, or false to disable, got {show_value(value)}"
    )
    return default


def _status_range(item: object) -> tuple[int, int] | None:
    """One status (an integer or "404") or an inclusive range ("200-399"); None if invalid."""
    if isinstance(item, int) and not isinstance(item, bool):
        low = high = item
    elif isinstance(item, str) and (match := _STATUS_RE.fullmatch(item)):
        low = int(match[1])
        high = int(match[2] or match[1])
    else:
        return None
    if not (HTTP_STATUS.admits(low) and HTTP_STATUS.admits(high)) or low > high:
        return None
    return low, high


def _expect_status(t: Table, default: tuple[tuple[int, int], ...]) -> tuple[tuple[int, int], ...]:
    if not t.has("expect_status"):
        return default
    value = t.data["expect_status"]
    items = value if isinstance(value, list) else [value]
    ranges = [_status_range(item) for item in items]
    if not items or None in ranges:
        t.fail("expect_status", f"{_STATUS_EXPECTED}, got {show_value(value)}")
        return default
    return tuple(sorted({r for r in ranges if r is not None}))


def _one_line(t: Table, key: str, default: str, pattern: re.Pattern[str], what: str) -> str:
    if not t.has(key):
        return default
    value = t.data[key]
    if isinstance(value, str) and pattern.fullmatch(value):
        return value
    t.fail(key, f"expected {what}, got {show_value(value)}")
    return default


def _check_type(t: Table, kind: str, send: str | None, *, written: bool) -> None:
    """The settings of other types than `kind` are errors; a line check needs a probe.

    Without `type` written, `send` and `expect` say which type it is: only http
    settings can be out of place."""
    if kind == "line" and send is None and t.clean("send"):
        found = f", got {show_value(t.data['send'])}" if t.has("send") else ""
        what = "expected" if found else "missing: expected"
        t.fail("send", f'{what} a probe line to send with type = "line"{found}')
    others = {"connect": (*LINE_KEYS, *HTTP_ONLY_KEYS), "line": HTTP_ONLY_KEYS, "http": LINE_KEYS}
    for key in others[kind] if written else HTTP_ONLY_KEYS:
        value = t.data.get(key)
        if value is None or (key in LINE_KEYS and value is False):  # false: no probe, as here
            continue
        owner = "line" if key in LINE_KEYS else "http"
        article = "an" if kind == "http" else "a"
        t.fail(
            key,
            f'expected no {key} in {article} {kind} check (it is a setting of type = "{owner}"), '
            f"got {show_value(value)}",
        )


def read_health(data: object, path: str, problems: Problems, mode: str) -> HealthConfig:
    """The health check settings of a service in `mode` (its defaults if `data` is empty)."""
    defaults = HealthConfig()
    send_default = None if mode in ("tcp", "http") else defaults.send
    expect_default = None if send_default is None else defaults.expect
    t = Table.read(data, path, problems, HEALTH_KEYS, what="a table of health check settings")
    if t is None:
        return HealthConfig(send=send_default, expect=expect_default)
    kind = t.choice("type", "", HEALTH_TYPES)
    if kind in ("connect", "http"):
        send = expect = None
    else:
        send = _probe(t, "send", send_default)
        expect = _probe(t, "expect", None if send is None else expect_default)
        if send is None and expect is not None and t.clean("send") and kind != "line":
            t.fail(
                "expect",
                f"expected no reply check when send = false (there is no probe to reply to), "
                f"got {expect!r}",
            )
    if t.clean("type"):
        implied = "line" if send is not None else "connect"
        _check_type(t, kind or implied, send, written=bool(kind))
    method = _one_line(t, "method", defaults.method, _TOKEN_RE, 'a method like "GET" or "HEAD"')
    expect_body = _one_line(t, "expect_body", "", _BODY_RE, "a string of at most 1024 characters")
    if method == "HEAD" and expect_body and t.clean("method", "expect_body"):
        t.fail(
            "expect_body",
            f'expected no expect_body with method = "HEAD" (a response to HEAD has no body), '
            f"got {expect_body!r}",
        )
    return HealthConfig(
        interval=t.bounded("interval", defaults.interval, "health.interval"),
        timeout=t.bounded("timeout", defaults.timeout, "health.timeout"),
        rise=t.bounded_int("rise", defaults.rise, "health.rise"),
        fall=t.bounded_int("fall", defaults.fall, "health.fall"),
        jitter=t.bounded("jitter", defaults.jitter, "health.jitter"),
        type=kind,
        send=send,
        expect=expect,
        method=method,
        path=_one_line(t, "path", defaults.path, _PATH_RE, 'a path starting with "/", no spaces'),
        host=_one_line(t, "host", defaults.host, _HOST_RE, "a host name or host:port"),
        expect_status=_expect_status(t, defaults.expect_status),
        expect_body=expect_body,
        disable_on_404=t.boolean("disable_on_404", defaults.disable_on_404),
        enabled=t.boolean("enabled", defaults.enabled),
    )
