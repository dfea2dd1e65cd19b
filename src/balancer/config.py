"""Typed configuration for the balancer.

One `Config` holds everything a running balancer needs. It is built once, by
`load_config` from a file (TOML, the tutorial's `config.txt`, or its JSON form)
or by the command line, and validated there: every error names the file, the
line or key, the bad value and what was expected.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import os
import re
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NoReturn

from balancer.bounds import Bound as Bound
from balancer.bounds import as_number as _as_number
from balancer.bounds import is_integer

DEFAULT_ADMIN_HOST = "127.0.0.1"
DEFAULT_ADMIN_PORT = 9100
DEFAULT_MAX_LINE = 64 * 1024

MODES = ("message", "tcp")
FRAMINGS = ("line", "raw", "auto")
"""Backend framing: `auto` lets the first health check find out which one a backend speaks."""
CLIENT_FRAMINGS = ("line", "raw", "auto")
"""Client framing: `auto` detects the tutorial's unterminated messages (raw) per connection."""
MAX_WEIGHT = 1000
"""Largest backend weight, in config and through the runtime API."""


_MIB = 1024 * 1024
BOUNDS: dict[str, Bound] = {
    # top level
    "drain_timeout": Bound(0, 3600, unit="seconds"),
    "drain_close_window": Bound(0, 600, unit="seconds"),
    # per service
    "max_line": Bound(1, 16 * _MIB, unit="bytes"),
    "retries": Bound(0, 10),
    "connect_timeout": Bound(0.01, 300, unit="seconds"),
    "response_timeout": Bound(0.05, 86400, unit="seconds"),
    "backend_connections": Bound(1, 1024),
    "hash_balance_factor": Bound(1.01, 100, off=True),
    "slow_start": Bound(0.1, 3600, off=True, unit="seconds"),
    "client_timeout": Bound(0.1, 7 * 86400, off=True, unit="seconds"),
    "idle_timeout": Bound(0.1, 7 * 86400, off=True, unit="seconds"),
    "max_connections": Bound(1, 10_000_000, off=True),
    "max_backend_connections": Bound(1, 10_000_000, off=True),
    "connect_buffer": Bound(1024, 64 * _MIB, unit="bytes"),
    "max_backend_requests": Bound(1, 1_000_000, off=True),
    "queue_size": Bound(0, 1_000_000),
    "queue_timeout": Bound(0.01, 3600, unit="seconds"),
    "retry_budget_percent": Bound(0, 100),
    "retry_budget_min": Bound(0, 100_000),
    "max_buffered": Bound(64 * 1024, 64 * 1024 * _MIB, unit="bytes"),
    "weight": Bound(0, MAX_WEIGHT),
    # [health]
    "health.interval": Bound(0.05, 86400, unit="seconds"),
    "health.timeout": Bound(0.05, 3600, unit="seconds"),
    "health.rise": Bound(1, 1000),
    "health.fall": Bound(1, 1000),
    "health.jitter": Bound(0, 0.5),
    # [outlier]
    "outlier.consecutive_failures": Bound(1, 1000),
    "outlier.base_ejection_time": Bound(0.01, 86400, unit="seconds"),
    "outlier.max_ejection_time": Bound(0.01, 86400, unit="seconds"),
    "outlier.max_ejection_percent": Bound(0, 100),
}
"""Every number a user can set, with its bounds (the runtime API checks the same)."""


class ConfigError(Exception):
    """A configuration problem, with where it is and what was expected."""

    def __init__(self, source: str, where: str, message: str) -> None:
        self.source = source
        self.where = where
        self.message = message
        loc = f"{source}: {where}" if where else source
        super().__init__(f"{loc}: {message}")


@dataclass(frozen=True)
class HealthConfig:
    """Active health check settings (defaults like HAProxy's)."""

    interval: float = 2.0
    timeout: float = 1.0
    rise: int = 2
    fall: int = 3
    jitter: float = 0.1
    """Fraction of `interval` by which each wait is randomly shortened or lengthened."""
    send: str | None = "!HEALTH_CHECK"
    """Probe sent after connecting; None means a plain TCP connect check."""
    expect: str | None = "!HEALTH_CHECK"
    """Expected reply (exact line); None accepts any reply."""
    enabled: bool = True


@dataclass(frozen=True)
class OutlierConfig:
    """Passive health: failures seen on live traffic eject a backend for a while (as Envoy)."""

    consecutive_failures: int = 1
    """Failed connections or requests in a row that eject a backend."""
    base_ejection_time: float = 2.0
    """Ejection time for a first offence; it doubles with every repeat, up to the maximum."""
    max_ejection_time: float = 60.0
    max_ejection_percent: float = 50.0
    """Never eject more than this share of a service's backends through outlier detection."""
    enabled: bool = True


@dataclass(frozen=True)
class BackendConfig:
    host: str
    port: int
    weight: int = 1

    @property
    def address(self) -> str:
        return format_address(self.host, self.port)


@dataclass(frozen=True)
class ServiceConfig:
    name: str
    listen_host: str
    listen_port: int
    backends: tuple[BackendConfig, ...]
    mode: str = "message"
    algorithm: str = "round_robin"
    backend_framing: str = "line"
    """Towards backends: "line", "raw" (the tutorial's original service) or "auto"."""
    client_framing: str = "line"
    """From clients (message mode): "line", "raw" (each read is one message) or "auto"."""
    max_line: int = DEFAULT_MAX_LINE
    retries: int = 2
    """How many times a request (or a tcp connect) is re-sent to another backend."""
    connect_timeout: float = 2.0
    response_timeout: float = 30.0
    """Message mode: a backend holding a request longer is treated as failed."""
    backend_connections: int = 4
    """Message mode: persistent connections kept per backend (line framing pipelines on each)."""
    hash_key: str = "source"
    """consistent_hash: "source" (client address) or "message" (the request line)."""
    hash_balance_factor: float = 0.0
    slow_start: float = 0.0
    policy_options: dict[str, float] = field(default_factory=dict)
    client_timeout: float = 300.0
    """Message mode: a client connection idle this long (no request pending) is closed; 0 = off."""
    idle_timeout: float = 3600.0
    """Tcp mode: a relayed connection with no bytes either way this long is closed; 0 = off."""
    max_connections: int = 0
    """Client connections accepted at once; beyond it new ones are refused. 0 = unlimited."""
    max_backend_connections: int = 0
    """Tcp mode: relayed connections per backend at once; 0 = unlimited."""
    connect_buffer: int = 256 * 1024
    """Tcp mode: client bytes held while the backend connection is being made."""
    max_backend_requests: int = 0
    """Message mode: requests in flight per backend; beyond it requests queue. 0 = unlimited."""
    queue_size: int = 1024
    """Message mode: requests waiting for a backend below its limit; beyond it: an error reply."""
    queue_timeout: float = 5.0
    """Message mode: a queued request waiting longer gets an error reply."""
    retry_budget_percent: float = 20.0
    """Retries over the last 10 s may be at most this share of the requests in that time ..."""
    retry_budget_min: int = 10
    """... or this many per second, whichever is larger (a retry budget as Finagle's)."""
    max_buffered: int = 32 * 1024 * 1024
    """Message mode: bytes of unfinished request lines held for all clients of the service."""
    outlier: OutlierConfig = field(default_factory=lambda: OutlierConfig())
    health: HealthConfig = field(default_factory=HealthConfig)

    @property
    def listen(self) -> str:
        return format_address(self.listen_host, self.listen_port)


@dataclass(frozen=True)
class AdminConfig:
    host: str = DEFAULT_ADMIN_HOST
    port: int = DEFAULT_ADMIN_PORT
    enabled: bool = True
    token: str | None = None
    """Bearer token every write needs (also $BALANCER_ADMIN_TOKEN)."""
    read_token: str | None = None
    """Bearer token reads accept besides `token` (for scrapers that must not write)."""
    read_access: str = "auto"
    """"open": reads need no token; "token": they need `read_token` or `token`;
    "auto": open on a loopback listener, token elsewhere."""
    allowed_hosts: tuple[str, ...] = ()
    """Host header values accepted besides the listener's own address and loopback names."""

    @property
    def listen(self) -> str:
        return format_address(self.host, self.port)


@dataclass(frozen=True)
class Config:
    services: tuple[ServiceConfig, ...]
    admin: AdminConfig = field(default_factory=AdminConfig)
    drain_timeout: float = 10.0
    drain_close_window: float = 1.0
    """Idle client connections are closed spread over this many seconds on a stop."""
    access_log: bool = False
    source: str = "<built-in>"
    """Path of the file this config was read from (used by reload)."""

    def service(self, name: str) -> ServiceConfig:
        for svc in self.services:
            if svc.name == name:
                return svc
        raise KeyError(name)


# --------------------------------------------------------------------------
# Loading
#
# How it works: the file is read and decoded once; its extension picks the
# parser (`.toml`, `.json`, anything else is the tutorial's text format). TOML
# and the object form of JSON give the same nested mapping, which `_build`
# walks with `_Table` readers: each reader knows its dotted path and its
# allowed keys, so an unknown key, a wrong type or an out-of-range value is
# reported at the exact key with the value found and what was expected.
# Cross-checks (duplicate listeners, duplicate backends) come last.
# --------------------------------------------------------------------------

SERVICE_NAME_RE = re.compile(r"[A-Za-z0-9_.-]+")
_HOSTNAME_RE = re.compile(r"[A-Za-z0-9_.-]+")
_PORT_RE = re.compile(r"[0-9]{1,5}")
_BARE_KEY_RE = re.compile(r"[A-Za-z0-9_-]+")
_TOML_POSITION_RE = re.compile(
    r"^(?P<msg>.*?)\s*\(at (?P<where>line \d+, column \d+|end of document)\)$"
)
_ALLOWED_HOST_RE = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+)(:[0-9]{1,5})?")
_WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::"})

HASH_KEYS = ("source", "message")
DEFAULT_SERVICE_NAME = "default"
DEFAULT_LISTEN = "localhost:8080"

_TOP_KEYS = ("drain_timeout", "drain_close_window", "access_log", "admin", "services")
_ADMIN_KEYS = ("listen", "token", "read_token", "read_access", "allowed_hosts", "enabled")
READ_ACCESS = ("auto", "open", "token")
_SERVICE_KEYS = (
    "listen",
    "mode",
    "algorithm",
    "backend_framing",
    "client_framing",
    "max_line",
    "retries",
    "connect_timeout",
    "response_timeout",
    "backend_connections",
    "hash_key",
    "hash_balance_factor",
    "slow_start",
    "policy_options",
    "client_timeout",
    "idle_timeout",
    "max_connections",
    "max_backend_connections",
    "connect_buffer",
    "max_backend_requests",
    "queue_size",
    "queue_timeout",
    "retry_budget_percent",
    "retry_budget_min",
    "max_buffered",
    "backends",
    "health",
    "outlier",
)
_OUTLIER_KEYS = (
    "consecutive_failures",
    "base_ejection_time",
    "max_ejection_time",
    "max_ejection_percent",
    "enabled",
)
_HEALTH_KEYS = ("interval", "timeout", "rise", "fall", "jitter", "send", "expect", "enabled")
_BACKEND_KEYS = ("address", "weight")
_SERVER_KEYS = ("host", "port", "weight")


def format_address(host: str, port: int) -> str:
    """`host:port`, with an IPv6 host in brackets (`[::1]:8080`)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _key(path: str, key: str) -> str:
    part = key if _BARE_KEY_RE.fullmatch(key) else json.dumps(key, ensure_ascii=False)
    return f"{path}.{part}" if path else part


def _is_ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def _parse_host(text: str, *, bare_ipv6: bool = False) -> str | None:
    """The host in `text` (brackets removed from IPv6), or None if it is not one."""
    if text.startswith("[") and text.endswith("]"):
        inner = text[1:-1]
        return inner if _is_ipv6(inner) else None
    if ":" in text:
        return text if bare_ipv6 and _is_ipv6(text) else None
    return text if _HOSTNAME_RE.fullmatch(text) else None


def _parse_port(text: str, *, allow_zero: bool = False) -> int | None:
    if not _PORT_RE.fullmatch(text):
        return None
    port = int(text)
    return port if (0 if allow_zero else 1) <= port <= 65535 else None


def parse_address(
    text: str,
    *,
    where: str,
    source: str,
    default_host: str | None = None,
    allow_port_zero: bool = False,
) -> tuple[str, int]:
    """Split `host:port` (IPv6 as `[::1]:8080`) into its host and port.

    With `default_host`, a bare `PORT` or `:PORT` means that host. Port 0
    (let the system choose) is accepted only with `allow_port_zero`, for
    listening addresses.
    """
    low = 0 if allow_port_zero else 1
    expected = f'expected "host:port" with a port {low}..65535'
    if default_host is not None:
        expected += " (or just a port)"

    def fail(detail: str = "") -> NoReturn:
        raise ConfigError(source, where, f"{expected}{detail}, got {text!r}")

    if not isinstance(text, str):
        fail()
    s = text.strip()
    host: str | None
    if s.startswith("["):
        close = s.find("]")
        if close < 0 or s[close + 1 : close + 2] != ":":
            fail()
        host = _parse_host(s[: close + 1])
        if host is None:
            fail("; the part in brackets must be an IPv6 address")
        port_text = s[close + 2 :]
    elif s.count(":") > 1:
        fail("; an IPv6 address needs brackets, as in [::1]:8080")
    elif ":" in s:
        host_text, port_text = s.split(":")
        if not host_text:
            if default_host is None:
                fail()
            host = default_host
        else:
            host = _parse_host(host_text)
            if host is None:
                fail("; the host may hold letters, digits, '.', '-' and '_'")
    elif default_host is not None and s.isdigit():
        host, port_text = default_host, s
    else:
        fail()
    port = _parse_port(port_text, allow_zero=allow_port_zero)
    if port is None:
        fail()
    return host, port


class _Table:
    """Reads one table of the config, knowing its dotted path and allowed keys."""

    def __init__(
        self, data: object, path: str, source: str, allowed: tuple[str, ...], *, what: str
    ) -> None:
        if not isinstance(data, dict):
            raise ConfigError(source, path, f"expected {what}, got {_show(data)}")
        self.data: dict[str, object] = data
        self.path = path
        self.source = source
        for key in data:
            if key not in allowed:
                raise self.error(key, _unknown_key(key, allowed))

    def where(self, key: str) -> str:
        return _key(self.path, key)

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(self.source, self.where(key), message)

    def has(self, key: str) -> bool:
        return key in self.data

    def bounded(self, key: str, default: float, bound: str | None = None) -> float:
        """A number within `BOUNDS[bound or key]`."""
        limits = BOUNDS[bound or key]
        if key not in self.data:
            return default
        value = self.data[key]
        number = _as_number(value)
        if number is not None and limits.admits(number):
            return number
        raise self.error(key, f"expected {limits.expected(False)}, got {_show(value)}")

    def bounded_int(self, key: str, default: int, bound: str | None = None) -> int:
        """An integer within `BOUNDS[bound or key]`."""
        limits = BOUNDS[bound or key]
        if key not in self.data:
            return default
        value = self.data[key]
        if isinstance(value, int) and not isinstance(value, bool) and limits.admits(value):
            return value
        raise self.error(key, f"expected {limits.expected(True)}, got {_show(value)}")

    def boolean(self, key: str, default: bool) -> bool:
        if key not in self.data:
            return default
        value = self.data[key]
        if isinstance(value, bool):
            return value
        raise self.error(key, f"expected true or false, got {_show(value)}")

    def string(self, key: str) -> str | None:
        if key not in self.data:
            return None
        value = self.data[key]
        if isinstance(value, str) and value:
            return value
        raise self.error(key, f"expected a non-empty string, got {_show(value)}")

    def choice(self, key: str, default: str, choices: Iterable[str]) -> str:
        if key not in self.data:
            return default
        value = self.data[key]
        options = sorted(choices)
        if isinstance(value, str) and value in options:
            return value
        listed = ", ".join(repr(c) for c in options)
        message = f"expected one of {listed}, got {_show(value)}"
        if isinstance(value, str):
            message += _did_you_mean(value, options)
        raise self.error(key, message)


def _did_you_mean(word: str, options: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _unknown_key(key: str, allowed: tuple[str, ...]) -> str:
    hint = _did_you_mean(key, allowed)
    if hint:
        return f"unknown key {key!r}{hint}"
    return f"unknown key {key!r}; expected one of: {', '.join(allowed)}"


def _probe(table: _Table, key: str, default: str | None) -> str | None:
    if not table.has(key):
        return default
    value = table.data[key]
    if value is False:
        return None
    if isinstance(value, str) and value and "\n" not in value and "\r" not in value:
        return value
    raise table.error(
        key, f"expected a non-empty one-line string, or false to disable, got {_show(value)}"
    )


def _health(data: object, path: str, source: str, mode: str) -> HealthConfig:
    defaults = HealthConfig()
    t = _Table(data, path, source, _HEALTH_KEYS, what="a table of health check settings")
    tcp = mode == "tcp"
    send = _probe(t, "send", None if tcp else defaults.send)
    expect_default = None if tcp or send is None else defaults.expect
    expect = _probe(t, "expect", expect_default)
    if send is None and expect is not None:
        raise t.error(
            "expect",
            f"expected no reply check when send = false (there is no probe to reply to), "
            f"got {expect!r}",
        )
    return HealthConfig(
        interval=t.bounded("interval", defaults.interval, "health.interval"),
        timeout=t.bounded("timeout", defaults.timeout, "health.timeout"),
        rise=t.bounded_int("rise", defaults.rise, "health.rise"),
        fall=t.bounded_int("fall", defaults.fall, "health.fall"),
        jitter=t.bounded("jitter", defaults.jitter, "health.jitter"),
        send=send,
        expect=expect,
        enabled=t.boolean("enabled", defaults.enabled),
    )


def _backend(item: object, where: str, source: str) -> BackendConfig:
    if isinstance(item, str):
        host, port = parse_address(item, where=where, source=source)
        return BackendConfig(host, port)
    t = _Table(
        item,
        where,
        source,
        _BACKEND_KEYS,
        what='"host:port" or a table { address = "host:port", weight = N }',
    )
    if not t.has("address"):
        raise ConfigError(source, t.where("address"), 'missing: expected "host:port"')
    address = t.data["address"]
    if not isinstance(address, str):
        raise t.error("address", f'expected "host:port", got {_show(address)}')
    host, port = parse_address(address, where=t.where("address"), source=source)
    return BackendConfig(host, port, t.bounded_int("weight", 1))


def _backends(value: object, where: str, source: str) -> tuple[BackendConfig, ...]:
    if not isinstance(value, list):
        raise ConfigError(source, where, f'expected a list of "host:port", got {_show(value)}')
    if not value:
        raise ConfigError(source, where, "expected at least one backend, got []")
    backends = [_backend(item, f"{where}[{i}]", source) for i, item in enumerate(value)]
    _check_duplicates(backends, [f"{where}[{i}]" for i in range(len(backends))], source)
    return tuple(backends)


def _check_duplicates(backends: list[BackendConfig], wheres: list[str], source: str) -> None:
    seen: dict[tuple[str, int], str] = {}
    for backend, where in zip(backends, wheres, strict=True):
        ident = (backend.host.lower(), backend.port)
        if ident in seen:
            raise ConfigError(
                source,
                where,
                f"expected each backend once, got {backend.address!r} again "
                f"(first at {seen[ident]})",
            )
        seen[ident] = where


def _policy_options(value: object, where: str, source: str) -> dict[str, float]:
    t = _Table(
        value, where, source, tuple(value) if isinstance(value, dict) else (), what="a table"
    )
    options: dict[str, float] = {}
    for key, number in t.data.items():
        value = _as_number(number)
        if value is None:
            raise t.error(key, f"expected a number, got {_show(number)}")
        options[key] = number if is_integer(number) else value
    return options


def _outlier(data: object, path: str, source: str) -> OutlierConfig:
    t = _Table(data, path, source, _OUTLIER_KEYS, what="a table of outlier detection settings")
    d = OutlierConfig()
    base = t.bounded("base_ejection_time", d.base_ejection_time, "outlier.base_ejection_time")
    longest = t.bounded(
        "max_ejection_time", max(d.max_ejection_time, base), "outlier.max_ejection_time"
    )
    if longest < base:
        raise t.error(
            "max_ejection_time",
            f"expected a number >= base_ejection_time ({base:g}), got {longest:g}",
        )
    return OutlierConfig(
        consecutive_failures=t.bounded_int(
            "consecutive_failures", d.consecutive_failures, "outlier.consecutive_failures"
        ),
        base_ejection_time=base,
        max_ejection_time=longest,
        max_ejection_percent=t.bounded(
            "max_ejection_percent", d.max_ejection_percent, "outlier.max_ejection_percent"
        ),
        enabled=t.boolean("enabled", d.enabled),
    )


def _service(name: str, data: object, source: str, default_listen: str) -> ServiceConfig:
    from balancer.policies import POLICIES

    path = _key("services", name)
    if not SERVICE_NAME_RE.fullmatch(name):
        raise ConfigError(
            source,
            path,
            f"expected a service name of letters, digits, '.', '-' and '_', got {name!r}",
        )
    t = _Table(data, path, source, _SERVICE_KEYS, what="a table of service settings")
    defaults = ServiceConfig(name, "", 0, ())

    listen = default_listen
    if t.has("listen"):
        value = t.data["listen"]
        if not isinstance(value, str):
            raise t.error("listen", f'expected "host:port", got {_show(value)}')
        listen = value
    default_host = parse_address(
        default_listen, where="listen", source=source, allow_port_zero=True
    )[0]
    listen_host, listen_port = parse_address(
        listen,
        where=t.where("listen"),
        source=source,
        default_host=default_host,
        allow_port_zero=True,
    )

    mode = t.choice("mode", defaults.mode, MODES)
    algorithm = t.choice("algorithm", defaults.algorithm, POLICIES)
    hash_key = t.choice("hash_key", defaults.hash_key, HASH_KEYS)
    if hash_key == "message" and mode != "message":
        raise t.error(
            "hash_key",
            f"expected 'source' in {mode} mode ('message' needs mode = \"message\"), "
            f"got {hash_key!r}",
        )
    hash_balance_factor = defaults.hash_balance_factor
    if t.has("hash_balance_factor"):
        value = t.data["hash_balance_factor"]
        factor = _as_number(value)
        if factor is None or not BOUNDS["hash_balance_factor"].admits(factor):
            raise t.error(
                "hash_balance_factor",
                f"expected {BOUNDS['hash_balance_factor'].expected(False)} (e.g. 1.25), "
                f"got {_show(value)}",
            )
        hash_balance_factor = factor

    slow_start = t.bounded("slow_start", defaults.slow_start)
    if slow_start > 0 and algorithm in ("round_robin", "consistent_hash"):
        raise t.error(
            "slow_start",
            f"expected 0 with algorithm {algorithm!r}, which ignores weights; slow start needs "
            "weighted_round_robin, least_connections, random, power_of_two or peak_ewma, "
            f"got {_show(t.data['slow_start'])}",
        )
    policy_options: dict[str, float] = {}
    if t.has("policy_options"):
        policy_options = _policy_options(
            t.data["policy_options"], t.where("policy_options"), source
        )
    from balancer.policies import check_policy_options

    try:
        check_policy_options(algorithm, policy_options)
    except ValueError as exc:
        raise ConfigError(source, t.where("policy_options"), str(exc)) from None

    if not t.has("backends"):
        raise ConfigError(source, t.where("backends"), 'missing: expected a list of "host:port"')
    backends = _backends(t.data["backends"], t.where("backends"), source)

    backend_framing = t.choice("backend_framing", defaults.backend_framing, FRAMINGS)
    # the tutorial's original programs speak raw: a service for them detects raw clients too
    raw_backends = backend_framing == "raw" and mode == "message"
    framing_default = "auto" if raw_backends else defaults.client_framing
    client_framing = t.choice("client_framing", framing_default, CLIENT_FRAMINGS)
    if t.has("client_framing") and mode != "message":
        raise t.error(
            "client_framing",
            f"expected no client_framing in {mode} mode (it relays bytes as they come), "
            f"got {_show(t.data['client_framing'])}",
        )

    return ServiceConfig(
        name=name,
        listen_host=listen_host,
        listen_port=listen_port,
        backends=backends,
        mode=mode,
        algorithm=algorithm,
        backend_framing=backend_framing,
        client_framing=client_framing,
        max_line=t.bounded_int("max_line", defaults.max_line),
        retries=t.bounded_int("retries", defaults.retries),
        connect_timeout=t.bounded("connect_timeout", defaults.connect_timeout),
        response_timeout=t.bounded("response_timeout", defaults.response_timeout),
        backend_connections=t.bounded_int("backend_connections", defaults.backend_connections),
        hash_key=hash_key,
        hash_balance_factor=hash_balance_factor,
        slow_start=slow_start,
        policy_options=policy_options,
        client_timeout=t.bounded("client_timeout", defaults.client_timeout),
        idle_timeout=t.bounded("idle_timeout", defaults.idle_timeout),
        max_connections=t.bounded_int("max_connections", defaults.max_connections),
        max_backend_connections=t.bounded_int(
            "max_backend_connections", defaults.max_backend_connections
        ),
        connect_buffer=t.bounded_int("connect_buffer", defaults.connect_buffer),
        max_backend_requests=t.bounded_int("max_backend_requests", defaults.max_backend_requests),
        queue_size=t.bounded_int("queue_size", defaults.queue_size),
        queue_timeout=t.bounded("queue_timeout", defaults.queue_timeout),
        retry_budget_percent=t.bounded("retry_budget_percent", defaults.retry_budget_percent),
        retry_budget_min=t.bounded_int("retry_budget_min", defaults.retry_budget_min),
        max_buffered=t.bounded_int("max_buffered", defaults.max_buffered),
        outlier=_outlier(t.data.get("outlier", {}), t.where("outlier"), source),
        health=_health(t.data.get("health", {}), t.where("health"), source, mode),
    )


def parse_admin(text: str, *, where: str, source: str) -> AdminConfig:
    """The admin listener from `HOST:PORT`, a bare port, or `off`."""
    if isinstance(text, str) and text.strip().lower() == "off":
        return AdminConfig(enabled=False)
    host, port = parse_address(
        text, where=where, source=source, default_host=DEFAULT_ADMIN_HOST, allow_port_zero=True
    )
    return AdminConfig(host=host, port=port)


def _admin(data: object, source: str) -> AdminConfig:
    t = _Table(data, "admin", source, _ADMIN_KEYS, what="a table of admin settings")
    admin = AdminConfig()
    if t.has("listen"):
        value = t.data["listen"]
        if not isinstance(value, str):
            raise t.error("listen", f'expected "host:port" or "off", got {_show(value)}')
        admin = parse_admin(value, where=t.where("listen"), source=source)
    enabled = t.boolean("enabled", admin.enabled) and admin.enabled
    allowed: list[str] = []
    if t.has("allowed_hosts"):
        hosts = t.data["allowed_hosts"]
        if not isinstance(hosts, list) or not all(
            isinstance(h, str) and _ALLOWED_HOST_RE.fullmatch(h) for h in hosts
        ):
            raise t.error(
                "allowed_hosts",
                f'expected a list of host names (as "admin.example" or "admin.example:9100"), '
                f"got {_show(hosts)}",
            )
        allowed = [h.lower() for h in hosts]
    return replace(
        admin,
        enabled=enabled,
        token=t.string("token"),
        read_token=t.string("read_token"),
        read_access=t.choice("read_access", admin.read_access, READ_ACCESS),
        allowed_hosts=tuple(allowed),
    )


def _overlaps(a: tuple[str, int], b: tuple[str, int]) -> bool:
    if a[1] != b[1] or a[1] == 0:
        return False
    ha, hb = a[0].lower(), b[0].lower()
    return ha == hb or ha in _WILDCARD_HOSTS or hb in _WILDCARD_HOSTS


def _check_listeners(services: list[ServiceConfig], admin: AdminConfig, source: str) -> None:
    taken: list[tuple[tuple[str, int], str]] = []
    for svc in services:
        here = (svc.listen_host, svc.listen_port)
        for there, owner in taken:
            if _overlaps(here, there):
                raise ConfigError(
                    source,
                    _key(_key("services", svc.name), "listen"),
                    f"expected an address no other service listens on, got {svc.listen!r} "
                    f"(already used by {owner})",
                )
        taken.append((here, f"service {svc.name!r}"))
    if admin.enabled:
        here = (admin.host, admin.port)
        for there, owner in taken:
            if _overlaps(here, there):
                raise ConfigError(
                    source,
                    "admin.listen",
                    f"expected an address no service listens on, got {admin.listen!r} "
                    f"(already used by {owner})",
                )


def _build(data: dict[str, Any], source: str, default_listen: str) -> Config:
    """A Config from the TOML-shaped mapping (TOML, or the object form of JSON)."""
    top = _Table(data, "", source, _TOP_KEYS, what="a table")
    services_data = data.get("services")
    if services_data is None:
        raise ConfigError(
            source, "services", "missing: expected at least one [services.NAME] table"
        )
    if not isinstance(services_data, dict):
        raise ConfigError(
            source, "services", f"expected a table of services, got {_show(services_data)}"
        )
    if not services_data:
        raise ConfigError(
            source, "services", "expected at least one [services.NAME] table, got none"
        )
    services = [_service(name, svc, source, default_listen) for name, svc in services_data.items()]
    admin = _admin(data["admin"], source) if "admin" in data else AdminConfig()
    _check_listeners(services, admin, source)
    return Config(
        services=tuple(services),
        admin=admin,
        drain_timeout=top.bounded("drain_timeout", 10.0),
        drain_close_window=top.bounded("drain_close_window", 1.0),
        access_log=top.boolean("access_log", False),
        source=source,
    )


def config_from_backends(
    backends: Iterable[BackendConfig],
    *,
    listen: str = DEFAULT_LISTEN,
    name: str = DEFAULT_SERVICE_NAME,
    source: str = "<built-in>",
) -> Config:
    """One message-mode, round-robin service named `name` on `listen`.

    It is the service of the tutorial's formats, so client and backend framing are
    detected (`auto`): the tutorial's original programs send and answer unterminated
    messages.
    """
    host, port = parse_address(
        listen, where="listen", source=source, default_host="localhost", allow_port_zero=True
    )
    service = ServiceConfig(
        name=name,
        listen_host=host,
        listen_port=port,
        backends=tuple(backends),
        client_framing="auto",
        backend_framing="auto",
    )
    return Config(services=(service,), source=source)


def _parse_text(text: str, source: str, listen: str) -> Config:
    """The tutorial's `config.txt`: `host port` (or `host:port`) per line, `#` comments."""
    backends: list[BackendConfig] = []
    wheres: list[str] = []
    for number, raw in enumerate(text.split("\n"), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"line {number}"
        fields = line.split()
        if len(fields) == 1:
            host, port = parse_address(fields[0], where=where, source=source)
        elif len(fields) == 2:
            parsed_host = _parse_host(fields[0], bare_ipv6=True)
            if parsed_host is None:
                raise ConfigError(
                    source,
                    where,
                    f"expected a host of letters, digits, '.', '-' and '_' (or an IPv6 "
                    f"address), got {fields[0]!r}",
                )
            parsed_port = _parse_port(fields[1])
            if parsed_port is None:
                raise ConfigError(source, where, f"expected a port 1..65535, got {fields[1]!r}")
            host, port = parsed_host, parsed_port
        else:
            raise ConfigError(source, where, f'expected "host port" or "host:port", got {line!r}')
        backends.append(BackendConfig(host, port))
        wheres.append(where)
    if not backends:
        raise ConfigError(source, "", 'no backends: expected at least one "host port" line')
    _check_duplicates(backends, wheres, source)
    return config_from_backends(backends, listen=listen, source=source)


def _parse_servers(data: dict[str, Any], source: str, listen: str) -> Config:
    """The tutorial's JSON form: `{"servers": [{"host": ..., "port": ...}, ...]}`."""
    _Table(data, "", source, ("servers",), what="an object")
    servers = data["servers"]
    if not isinstance(servers, list):
        raise ConfigError(
            source,
            "servers",
            f'expected a list of {{"host", "port"}} objects, got {_show(servers)}',
        )
    if not servers:
        raise ConfigError(source, "servers", "expected at least one server, got []")
    backends: list[BackendConfig] = []
    wheres: list[str] = []
    for i, item in enumerate(servers):
        where = f"servers[{i}]"
        if isinstance(item, str):
            backends.append(BackendConfig(*parse_address(item, where=where, source=source)))
            wheres.append(where)
            continue
        t = _Table(item, where, source, _SERVER_KEYS, what='an object {"host": ..., "port": ...}')
        for key in ("host", "port"):
            if not t.has(key):
                raise ConfigError(source, t.where(key), f"missing: expected the server's {key}")
        raw_host = t.data["host"]
        host = _parse_host(raw_host, bare_ipv6=True) if isinstance(raw_host, str) else None
        if host is None:
            raise t.error(
                "host",
                f"expected a host of letters, digits, '.', '-' and '_' (or an IPv6 address), "
                f"got {_show(raw_host)}",
            )
        port = t.data["port"]
        if not (isinstance(port, int) and not isinstance(port, bool) and 1 <= port <= 65535):
            raise t.error("port", f"expected an integer port 1..65535, got {_show(port)}")
        backends.append(BackendConfig(host, port, t.bounded_int("weight", 1)))
        wheres.append(where)
    _check_duplicates(backends, wheres, source)
    return config_from_backends(backends, listen=listen, source=source)


def _read(path: str) -> str:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(path, "", f"cannot read: {exc.strerror or exc}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError(
            path,
            f"line {line}",
            f"cannot read: expected UTF-8 text, got byte {data[exc.start]:#04x}",
        ) from None


def load_config(path: str | os.PathLike[str], *, default_listen: str = DEFAULT_LISTEN) -> Config:
    """Read and validate a config file; raise ConfigError naming what is wrong and where.

    `.toml` is the full format, `.json` is either the same structure or the
    tutorial's `{"servers": [...]}`, anything else is the tutorial's text
    format. Single-service formats listen on `default_listen`; so does a
    TOML service without `listen`.
    """
    source = os.fspath(path)
    parse_address(
        default_listen,
        where="listen",
        source="<command line>",
        default_host="localhost",
        allow_port_zero=True,
    )
    text = _read(source)
    suffix = Path(source).suffix.lower()
    if suffix == ".toml":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            match = _TOML_POSITION_RE.match(str(exc))
            where, message = (match["where"], match["msg"]) if match else ("", str(exc))
            raise ConfigError(source, where, f"invalid TOML: {message}") from None
        return _build(data, source, default_listen)
    if suffix == ".json":
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(
                source, f"line {exc.lineno}, column {exc.colno}", f"invalid JSON: {exc.msg}"
            ) from None
        if isinstance(doc, dict) and "servers" in doc and "services" not in doc:
            return _parse_servers(doc, source, default_listen)
        if not isinstance(doc, dict):
            raise ConfigError(
                source,
                "",
                f'expected a JSON object with "services" or "servers", got {_show(doc)}',
            )
        return _build(doc, source, default_listen)
    return _parse_text(text, source, default_listen)
