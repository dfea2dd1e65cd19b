"""Typed configuration for the balancer.

One `Config` holds everything a running balancer needs. It is built once, by
`load_config` (`config.load`) from a file (TOML, the tutorial's `config.txt`,
or its JSON form) or by the command line, and validated there: every error
names the file, the line and key, the bad value and what was expected, and
one `ConfigError` lists every error the file has. The algorithms and their
options are in `config.policies`, the checks across services (listeners,
loops) in `config.checks`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace

from balancer.config.addresses import format_address, parse_address
from balancer.config.bounds import Bound as Bound
from balancer.config.bounds import as_number, is_integer, show_value
from balancer.config.discovery import DiscoveryConfig
from balancer.config.edge import (
    PROXY_VERSIONS as PROXY_VERSIONS,
)
from balancer.config.edge import (
    TLS_VERSIONS as TLS_VERSIONS,
)
from balancer.config.edge import (
    VERIFY_CLIENT as VERIFY_CLIENT,
)
from balancer.config.edge import (
    BackendTlsConfig as BackendTlsConfig,
)
from balancer.config.edge import (
    CertConfig as CertConfig,
)
from balancer.config.edge import (
    SniRouteConfig as SniRouteConfig,
)
from balancer.config.edge import (
    TlsConfig as TlsConfig,
)
from balancer.config.errors import ConfigError
from balancer.wire import HEALTH_CHECK

DEFAULT_ADMIN_HOST = "127.0.0.1"
DEFAULT_ADMIN_PORT = 9100
DEFAULT_MAX_LINE = 64 * 1024
DEFAULT_SERVICE_NAME = "default"
DEFAULT_LISTEN = "localhost:8080"
SERVICE_NAME_RE = re.compile(r"[A-Za-z0-9_.-]+")

MODES = ("message", "tcp", "http")
TCP_ENGINES = ("auto", "io_uring", "uvloop")
"""What relays a tcp-mode connection once its backend is connected (`proxy.tcp.engine`)."""
FRAMINGS = ("line", "raw", "auto")
"""Backend framing: `auto` lets the first health check find out which one a backend speaks."""
CLIENT_FRAMINGS = ("line", "raw", "auto")
"""Client framing: `auto` detects the tutorial's unterminated messages (raw) per connection."""
HASH_KEYS = ("source", "message", "path")
"""Besides these, in http mode: `header:NAME` and `cookie:NAME`."""
HASH_KEY_RE = re.compile(r"(header|cookie):[!#$%&'*+.^_`|~0-9A-Za-z-]+")
HEALTH_TYPES = ("connect", "line", "http")
"""Health checks: a plain connect, a probe line and its reply, or an HTTP request."""
HTTP_STATUS = Bound(100, 599)
"""The statuses `health.expect_status` may name."""
READ_ACCESS = ("auto", "open", "token")
MAX_WEIGHT = 1000
"""Largest backend weight, in config and through the runtime API."""


_MIB = 1024 * 1024
BOUNDS: dict[str, Bound] = {
    # top level
    "drain_timeout": Bound(0, 3600, unit="seconds"),
    "drain_close_window": Bound(0, 600, unit="seconds"),
    "workers": Bound(1, 64),
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
    # the PROXY header, the ClientHello (sni_routes), [tls]
    "proxy_timeout": Bound(0.05, 300, unit="seconds"),
    "client_hello_timeout": Bound(0.05, 300, unit="seconds"),
    "tls.handshake_timeout": Bound(0.05, 300, unit="seconds"),
    # [http]
    "http.max_header_bytes": Bound(1024, 1 * _MIB, unit="bytes"),
    "http.max_headers": Bound(1, 1000),
    "http.header_timeout": Bound(0.1, 3600, unit="seconds"),
    "http.request_body_timeout": Bound(0.1, 86400, off=True, unit="seconds"),
    "http.response_header_timeout": Bound(0.05, 86400, unit="seconds"),
    "http.keepalive_timeout": Bound(0.1, 86400, off=True, unit="seconds"),
    "http.upstream_idle_timeout": Bound(0.1, 3600, unit="seconds"),
    "http.max_idle": Bound(0, 100_000),
    "http.max_requests_per_connection": Bound(1, 10_000_000, off=True),
    "http.max_body_bytes": Bound(1, 1 << 50, off=True, unit="bytes"),
    "http.replay_buffer": Bound(0, 64 * _MIB, unit="bytes"),
    "http.tunnel_timeout": Bound(0.1, 7 * 86400, off=True, unit="seconds"),
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
    # [discovery]
    "discovery.interval": Bound(0.5, 3600, unit="seconds"),
    "discovery.timeout": Bound(0.1, 60, unit="seconds"),
}
"""Every number a user can set, with its bounds (the runtime API checks the same)."""
INTEGER_KEYS = frozenset(
    {
        "workers",
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
        "http.max_header_bytes",
        "http.max_headers",
        "http.max_idle",
        "http.max_requests_per_connection",
        "http.max_body_bytes",
        "http.replay_buffer",
        "health.rise",
        "health.fall",
        "outlier.consecutive_failures",
    }
)
"""The keys of `BOUNDS` that take whole numbers only."""


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
    type: str = ""
    """"connect", "line" or "http"; "" (the default) is "line" when `send` is set, else
    "connect". "connect" and "http" have no `send` or `expect` (they are made None)."""
    send: str | None = HEALTH_CHECK
    """Probe sent after connecting; None means a plain TCP connect check."""
    expect: str | None = HEALTH_CHECK
    """Expected reply (exact line); None accepts any reply."""
    method: str = "GET"
    """Http checks: the request's method."""
    path: str = "/"
    """Http checks: the request target."""
    host: str = ""
    """Http checks: the Host header; "" is the backend's host:port."""
    expect_status: tuple[tuple[int, int], ...] = ((200, 399),)
    """Http checks: the statuses that pass, as inclusive ranges."""
    expect_body: str = ""
    """Http checks: a string the first 64 KiB of the body must hold; "": any body."""
    disable_on_404: bool = False
    """Http checks: a 404 from an up backend drains it (no new work) until a check passes."""
    enabled: bool = True

    def __post_init__(self) -> None:
        kind = self.type or ("line" if self.send is not None else "connect")
        object.__setattr__(self, "type", kind)
        if kind != "line":
            object.__setattr__(self, "send", None)
            object.__setattr__(self, "expect", None)

    def passes(self, status: int) -> bool:
        """Is `status` one of `expect_status`?"""
        return any(low <= status <= high for low, high in self.expect_status)


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
class HttpConfig:
    """Http mode: limits, timeouts, upstream keep-alive, retries and header rules."""

    max_header_bytes: int = 16 * 1024
    """A request head larger than this gets 431."""
    max_headers: int = 100
    header_timeout: float = 10.0
    """The whole request head must arrive within this (from its first byte), else 408."""
    request_body_timeout: float = 60.0
    """A request body with no byte for this long ends the exchange (408, or a cut)."""
    response_header_timeout: float = 30.0
    """A backend that sends no response head within this after the request: 504."""
    keepalive_timeout: float = 30.0
    """A client connection idle between requests this long is closed."""
    upstream_idle_timeout: float = 4.0
    """An idle upstream connection is closed after this (shorter than servers' own)."""
    max_idle: int = 32
    """Idle upstream connections kept per backend."""
    max_requests_per_connection: int = 0
    """Requests on one upstream connection before it is closed; 0 = no limit."""
    max_body_bytes: int = 0
    """A request body larger than this gets 413; 0 = no limit."""
    replay_buffer: int = 64 * 1024
    """A request body up to this size is kept so the request may be retried."""
    retry_on_status: tuple[int, ...] = ()
    """Response statuses (of 502, 503, 504) retried on another backend."""
    retry_non_idempotent: bool = False
    """POST and PATCH are retried after their body was sent too."""
    trusted_proxies: tuple[str, ...] = ()
    """Clients whose X-Forwarded-* and Forwarded headers are kept (CIDRs)."""
    forwarded: bool = False
    """Add an RFC 7239 Forwarded header besides the X-Forwarded-* ones."""
    via: str = ""
    """A pseudonym: a Via header entry added both ways; empty: none."""
    request_id: bool = True
    """Pass on or make an X-Request-Id."""
    set_headers: tuple[tuple[str, str], ...] = ()
    remove_headers: tuple[str, ...] = ()
    strip_prefix: str = ""
    host_rewrite: str = ""
    tunnel_timeout: float = 3600.0
    """An upgraded connection (WebSocket) quiet both ways this long is closed."""
    sticky_cookie: str = ""
    """A cookie pinning a client to the backend that answered it (while it is up); empty: off."""


@dataclass(frozen=True)
class RouteConfig:
    """Http mode: requests matching every condition given go to another http service."""

    service: str
    """The http service (its backends, algorithm, health, retries, header rules) to use."""
    hosts: tuple[str, ...] = ()
    """Host names, exact or `*.example.com` (any subdomain); empty: any host."""
    path_prefix: str = ""
    """A path prefix (`/api` matches /api, /api/x and /api?q, not /apix); empty: any."""
    methods: tuple[str, ...] = ()
    headers: tuple[tuple[str, str], ...] = ()
    """Headers the request must carry with exactly these values."""


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
    engine: str = "auto"
    """Tcp mode: "io_uring", "uvloop" (the loop's transports) or "auto" (io_uring if it works)."""
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
    http: HttpConfig = field(default_factory=HttpConfig)
    routes: tuple[RouteConfig, ...] = ()
    """Http mode: requests are matched against these in order; unmatched ones use `backends`."""
    health: HealthConfig = field(default_factory=HealthConfig)
    accept_proxy: bool = False
    """Every client connection starts with a PROXY protocol header (v1 or v2)."""
    accept_proxy_from: tuple[str, ...] = ()
    """With accept_proxy: the addresses (CIDRs) that may connect; empty: any."""
    proxy_timeout: float = 5.0
    """With accept_proxy: the PROXY header must arrive within this."""
    send_proxy: str = ""
    """"v1" or "v2": a PROXY header with the client's address starts each backend connection."""
    client_hello_timeout: float = 5.0
    """With sni_routes: the ClientHello must arrive within this."""
    tls: TlsConfig | None = None
    backend_tls: BackendTlsConfig | None = None
    sni_routes: tuple[SniRouteConfig, ...] = ()
    """Tcp mode: connections are routed by the server name of their ClientHello (TLS is
    relayed, not terminated); the others go to `backends`."""
    discover: str = ""
    """`[discovery]`: "a:NAME:PORT", "srv:NAME", "etcd" or "etcd:NAME"; the backends are its
    answer (`backends` may be empty). "": none."""

    @property
    def listen(self) -> str:
        return format_address(self.listen_host, self.listen_port)

    @property
    def front(self) -> bool:
        """Whether connections are read before the mode gets them (PROXY header, TLS)."""
        return self.accept_proxy or self.tls is not None or bool(self.sni_routes)


@dataclass(frozen=True)
class AdminConfig:
    host: str = DEFAULT_ADMIN_HOST
    port: int = DEFAULT_ADMIN_PORT
    token: str | None = None
    """Bearer token every write needs (also $BALANCER_ADMIN_TOKEN)."""
    read_token: str | None = None
    """Bearer token reads accept besides `token` (for scrapers that must not write)."""
    read_access: str = "auto"
    """"open": reads need no token; "token": they need `read_token` or `token`;
    "auto": open on a loopback listener, token elsewhere."""
    allowed_hosts: tuple[str, ...] = ()
    """Host header values accepted besides the listener's own address and loopback names."""
    enabled: bool = True

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
    workers: int = 1
    """Worker processes serving the same listeners (`--workers` overrides it); a change
    takes effect on restart."""
    access_log: bool = False
    discovery: DiscoveryConfig | None = None
    """How the services' `discover` names are resolved; None: no `[discovery]` table."""
    source: str = "<built-in>"
    """Path of the file this config was read from (used by reload)."""

    def service(self, name: str) -> ServiceConfig:
        for svc in self.services:
            if svc.name == name:
                return svc
        raise KeyError(name)


def parse_admin(text: str, *, where: str, source: str) -> AdminConfig:
    """The admin listener from `HOST:PORT`, a bare port, or `off`."""
    if isinstance(text, str) and text.strip().lower() == "off":
        return AdminConfig(enabled=False)
    host, port = parse_address(
        text, where=where, source=source, default_host=DEFAULT_ADMIN_HOST, allow_port_zero=True
    )
    return AdminConfig(host=host, port=port)


def listen_on(admin: AdminConfig, listen: AdminConfig) -> AdminConfig:
    """`admin` with the listen address and `enabled` of `listen` (the command line's)."""
    return replace(admin, host=listen.host, port=listen.port, enabled=listen.enabled)
