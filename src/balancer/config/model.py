"""Typed configuration for the balancer.

One `Config` holds everything a running balancer needs. It is built once, by
`load_config` from a file (TOML, the tutorial's `config.txt`, or its JSON form)
or by the command line, and validated there: every error names the file, the
line and key, the bad value and what was expected, and one `ConfigError`
lists every error the file has. The loaders live in `config_loader`, the
checks across services (listeners, loops) in `config_checks`.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import NoReturn

from balancer.config.bounds import Bound as Bound
from balancer.config.bounds import as_number, is_integer, show_value
from balancer.errors import BalancerError

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
INTEGER_KEYS = frozenset(
    {
        "max_line",
        "retries",
        "backend_connections",
        "max_connections",
        "max_backend_connections",
        "connect_buffer",
        "max_backend_requests",
        "queue_size",
        "retry_budget_min",
        "max_buffered",
        "weight",
        "health.rise",
        "health.fall",
        "outlier.consecutive_failures",
    }
)
"""The keys of `BOUNDS` that take whole numbers only."""


class ConfigError(BalancerError):
    """A configuration problem, with where it is and what was expected.

    One error reads `source: line N: where: message` (the line when the format
    has lines and it is known). An error raised for a whole file carries every
    problem found in it: `errors` lists them (this one first), `str()` gives a
    count and then one line each, and `source`, `where`, `message` and `line` are
    those of the first.
    """

    def __init__(self, source: str, where: str, message: str, *, line: int | None = None) -> None:
        super().__init__(source, where, message)
        self.source = source
        self.where = where
        self.message = message
        self.line = line
        """Line of the file the error is on, when the format has lines and it is known."""
        self.more: tuple[ConfigError, ...] = ()

    @classmethod
    def collected(cls, errors: Sequence[ConfigError]) -> ConfigError:
        """One error standing for all of `errors` (at least one), the first one first."""
        first = errors[0]
        error = cls(first.source, first.where, first.message, line=first.line)
        error.more = tuple(errors[1:])
        return error

    @property
    def errors(self) -> tuple[ConfigError, ...]:
        return (self, *self.more)

    def describe(self) -> str:
        """This error alone, on one line."""
        parts = [self.source]
        if self.line is not None and not self.where.startswith("line "):
            parts.append(f"line {self.line}")
        if self.where:
            parts.append(self.where)
        parts.append(self.message)
        return ": ".join(parts)

    def __str__(self) -> str:
        if not self.more:
            return self.describe()
        lines = [f"{self.source}: {len(self.errors)} errors"]
        lines.extend(error.describe() for error in self.errors)
        return "\n".join(lines)


def check_bound(key: str, value: object, *, source: str, where: str) -> float:
    """`value` if it lies within `BOUNDS[key]`, else a ConfigError (for command-line values)."""
    bound = BOUNDS[key]
    integer = key in INTEGER_KEYS
    number = as_number(value)
    if number is None or not bound.admits(number) or (integer and not is_integer(value)):
        raise ConfigError(
            source, where, f"expected {bound.expected(integer)}, got {show_value(value)}"
        )
    return number


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
# Addresses


SERVICE_NAME_RE = re.compile(r"[A-Za-z0-9_.-]+")
_HOSTNAME_RE = re.compile(r"[A-Za-z0-9_.-]+")
_NUMERIC_HOST_RE = re.compile(r"[0-9.]+")
_PORT_RE = re.compile(r"[0-9]{1,5}")

HASH_KEYS = ("source", "message")
READ_ACCESS = ("auto", "open", "token")
DEFAULT_SERVICE_NAME = "default"
DEFAULT_LISTEN = "localhost:8080"


def format_address(host: str, port: int) -> str:
    """`host:port`, with an IPv6 host in brackets (`[::1]:8080`)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _is_ipv6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


def host_problem(text: str, *, bare_ipv6: bool = False) -> str | None:
    """Why `text` is not a host (brackets around IPv6 allowed), or None if it is one.

    A host of digits and dots only is an IPv4 address, and must be a valid one:
    the resolver would take `256.1.1.1` as a name, and `1.2.3` or `8080` as
    surprising addresses.
    """
    if text.startswith("[") and text.endswith("]"):
        return None if _is_ipv6(text[1:-1]) else "the part in brackets must be an IPv6 address"
    if ":" in text:
        if bare_ipv6 and _is_ipv6(text):
            return None
        return "an IPv6 address needs brackets, as in [::1]:8080"
    if not _HOSTNAME_RE.fullmatch(text):
        return "the host may hold letters, digits, '.', '-' and '_'"
    if _NUMERIC_HOST_RE.fullmatch(text):
        try:
            ipaddress.IPv4Address(text)
        except ValueError:
            return f"{text} is not a valid IPv4 address"
    return None


def parse_host(text: str, *, bare_ipv6: bool = False) -> str | None:
    """The host in `text` (brackets removed from IPv6), or None if it is not one."""
    if host_problem(text, bare_ipv6=bare_ipv6) is not None:
        return None
    return text[1:-1] if text.startswith("[") else text


def parse_port(text: str, *, allow_zero: bool = False) -> int | None:
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

    def fail(detail: str | None = None) -> NoReturn:
        more = f"; {detail}" if detail else ""
        raise ConfigError(source, where, f"{expected}{more}, got {show_value(text)}")

    if not isinstance(text, str):
        fail()
    s = text.strip()
    host_text: str | None = None
    if s.startswith("["):
        close = s.find("]")
        if close < 0 or s[close + 1 : close + 2] != ":":
            fail()
        host_text, port_text = s[: close + 1], s[close + 2 :]
    elif s.count(":") > 1:
        fail("an IPv6 address needs brackets, as in [::1]:8080")
    elif ":" in s:
        host_text, port_text = s.split(":")
        if not host_text and default_host is None:
            fail()
    elif default_host is not None and s.isdigit():
        port_text = s
    else:
        fail()
    if host_text:
        problem = host_problem(host_text)
        if problem is not None:
            fail(problem)
        host = host_text[1:-1] if host_text.startswith("[") else host_text
    else:
        assert default_host is not None
        host = default_host
    port = parse_port(port_text, allow_zero=allow_port_zero)
    if port is None:
        fail()
    return host, port


def parse_admin(text: str, *, where: str, source: str) -> AdminConfig:
    """The admin listener from `HOST:PORT`, a bare port, or `off`."""
    if isinstance(text, str) and text.strip().lower() == "off":
        return AdminConfig(enabled=False)
    host, port = parse_address(
        text, where=where, source=source, default_host=DEFAULT_ADMIN_HOST, allow_port_zero=True
    )
    return AdminConfig(host=host, port=port)


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


def load_config(
    path: str | os.PathLike[str],
    *,
    default_listen: str = DEFAULT_LISTEN,
    admin_listen: AdminConfig | None = None,
) -> Config:
    """Read and validate a config file; raise one ConfigError listing every problem.

    `.toml` is the full format, `.json` is either the same structure or the
    tutorial's `{"servers": [...]}`, anything else is the tutorial's text
    format. Single-service formats listen on `default_listen`; so does a
    TOML service without `listen`. `admin_listen` (the command line's
    `--admin`) replaces the file's admin listen address and `enabled` before
    the checks across the file, so they judge the listeners that will be.
    """
    from balancer.config.loader import load

    return load(os.fspath(path), default_listen, admin_listen)
