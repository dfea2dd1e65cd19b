"""Every key the loader knows, by table, and what each one means.

The keys of a table are the fields of its dataclass in the model, in field
order: a host and port pair is the one `"host:port"` key (`listen`,
`address`), and the keys that hold tables or lists of them (`admin`,
`services`, `backends`, `health`, `outlier`) come last, by name. The
meanings are the configuration reference's (`config.doc`); a test keeps
them naming the same keys.
"""

from __future__ import annotations

import types
import typing
from dataclasses import fields, is_dataclass

from balancer.config.discovery import DiscoveryConfig
from balancer.config.model import (
    AdminConfig,
    BackendConfig,
    BackendTlsConfig,
    CertConfig,
    Config,
    HealthConfig,
    HttpConfig,
    OutlierConfig,
    RouteConfig,
    ServiceConfig,
    SniRouteConfig,
    TlsConfig,
)


def _holds_tables(hint: object) -> bool:
    """A field of a config dataclass (or None), or of a tuple of them."""
    if typing.get_origin(hint) in (tuple, types.UnionType):
        return any(is_dataclass(arg) for arg in typing.get_args(hint))
    return is_dataclass(hint)


def table_keys(
    cls: type, *, skip: tuple[str, ...] = (), address: tuple[str, str, str] | None = None
) -> tuple[str, ...]:
    """The keys of `cls`'s table; `address` is (key, host field, port field)."""
    hints = typing.get_type_hints(cls)
    settings: list[str] = []
    tables: list[str] = []
    for f in fields(cls):
        name = f.name
        if name in skip or (address is not None and name == address[2]):
            continue
        if address is not None and name == address[1]:
            name = address[0]
        (tables if _holds_tables(hints[f.name]) else settings).append(name)
    return (*settings, *sorted(tables))


TOP_KEYS = table_keys(Config, skip=("source",))
ADMIN_KEYS = table_keys(AdminConfig, address=("listen", "host", "port"))
SERVICE_KEYS = table_keys(
    ServiceConfig, skip=("name",), address=("listen", "listen_host", "listen_port")
)
OUTLIER_KEYS = table_keys(OutlierConfig)
HEALTH_KEYS = table_keys(HealthConfig)
HTTP_KEYS = table_keys(HttpConfig)
ROUTE_KEYS = table_keys(RouteConfig)
BACKEND_KEYS = table_keys(BackendConfig, address=("address", "host", "port"))
SERVER_KEYS = table_keys(BackendConfig)
TLS_KEYS = ("cert", "key", *table_keys(TlsConfig))
"""`cert` and `key` name the one certificate of a service that has no `certs` list."""
CERT_KEYS = table_keys(CertConfig)
BACKEND_TLS_KEYS = table_keys(BackendTlsConfig)
SNI_ROUTE_KEYS = table_keys(SniRouteConfig)
DISCOVERY_KEYS = table_keys(DiscoveryConfig)

TABLE_KEYS: dict[str, tuple[str, ...]] = {
    "": TOP_KEYS,
    "admin": ADMIN_KEYS,
    "discovery": DISCOVERY_KEYS,
    "services.NAME": SERVICE_KEYS,
    "services.NAME.health": HEALTH_KEYS,
    "services.NAME.outlier": OUTLIER_KEYS,
    "services.NAME.http": HTTP_KEYS,
    "services.NAME.routes[]": ROUTE_KEYS,
    "services.NAME.tls": TLS_KEYS,
    "services.NAME.tls.certs[]": CERT_KEYS,
    "services.NAME.backend_tls": BACKEND_TLS_KEYS,
    "services.NAME.sni_routes[]": SNI_ROUTE_KEYS,
    "services.NAME.backends[]": BACKEND_KEYS,
    "servers[]": SERVER_KEYS,
}
"""Every key the loader knows, by table (`NAME` any service, `[]` any list item)."""

MEANINGS: dict[str, dict[str, str]] = {
    "": {
        "drain_timeout": "seconds a stop waits for in-flight requests",
        "drain_close_window": "idle client connections are closed spread over this many seconds",
        "workers": "worker processes serving the same listeners (`--workers N` overrides it; "
        "a change takes effect on restart)",
        "access_log": "one line per request on stdout (also `--access-log`)",
        "admin": "the admin endpoint: status, metrics, runtime changes",
        "discovery": "how the services' `discover` names are resolved (`[discovery]`)",
        "services": "the services, one `[services.NAME]` table each",
    },
    "admin": {
        "listen": 'where the admin endpoint listens, or "off" (also `--admin`)',
        "token": "writes need `Authorization: Bearer <token>` (also $BALANCER_ADMIN_TOKEN)",
        "read_token": "reads accept this token besides `token` (for scrapers that must not write)",
        "read_access": '"open": reads need no token; "token": they need one; '
        '"auto": open on a loopback listener, token elsewhere',
        "allowed_hosts": "Host header values accepted besides the listener's own and loopback",
        "enabled": "false turns the admin endpoint off",
    },
    "discovery": {
        "kind": '"dns": the `discover` names are looked up in the DNS; "etcd": the backends '
        "are keys in etcd, watched",
        "interval": "seconds between two resolutions of every `discover` name (dns); between "
        "two checks that etcd still answers while nothing changes (etcd)",
        "timeout": "a resolution or etcd call not answered within this has failed (the last "
        "set is kept)",
        "nameservers": 'the DNS servers asked, `"IP"` or `"IP:PORT"`; empty: the system\'s',
        "endpoints": 'kind = "etcd": the etcd cluster\'s members, `"http://host:port"`',
        "prefix": 'kind = "etcd": a service\'s keys are under `{prefix}/{service}/` '
        "(the configuration guide has the key layout)",
    },
    "services.NAME": {
        "listen": "where the service listens (without it: the command line's address)",
        "mode": '"message": one request per line, balanced per request; "tcp": bytes relayed, '
        'balanced per connection; "http": HTTP/1.1, balanced per request',
        "algorithm": "how a backend is picked (see `policy_options` below)",
        "backend_framing": 'towards backends: "line", "raw" (the tutorial\'s original service) '
        'or "auto" (found by the first health check)',
        "client_framing": 'message mode, from clients: "line", "raw" (each read is one '
        'message) or "auto" (the default when backend_framing = "raw")',
        "max_line": "longest request line",
        "retries": "re-sends of a request (or a tcp connect) to another backend",
        "connect_timeout": "a backend connection not made by then has failed",
        "response_timeout": "message mode: a backend holding a request longer has failed",
        "backend_connections": "message mode: persistent, pipelined connections per backend",
        "hash_key": 'consistent_hash: "source" (client address), "message" (the request line; '
        'message mode), or in http mode "path", "header:NAME" or "cookie:NAME"',
        "hash_balance_factor": "consistent_hash: no backend holds more than this times its "
        "share of the load (bounded load)",
        "slow_start": "a backend coming back up ramps from 1 % to its full weight over this "
        "time (weight-aware algorithms)",
        "policy_options": "the algorithm's own options",
        "client_timeout": "message mode: a client connection idle this long is closed",
        "idle_timeout": "tcp mode: a connection with no bytes either way this long is closed",
        "max_connections": "client connections at once; beyond it new ones are refused",
        "max_backend_connections": "tcp mode: relayed connections per backend at once",
        "connect_buffer": "tcp mode: client bytes held while the backend connection is made",
        "engine": 'tcp mode: what relays the bytes once the backend is connected: "io_uring" '
        '(one ring for the process), "uvloop" (the event loop\'s transports) or "auto" '
        "(io_uring where the kernel allows it, else uvloop; see the TCP section of "
        "docs/behaviour.md)",
        "max_backend_requests": "message mode: requests in flight per backend; beyond it "
        "requests queue",
        "queue_size": "message mode: requests waiting for a backend; beyond it an error reply",
        "queue_timeout": "message mode: a request queued longer gets an error reply",
        "retry_budget_percent": "retries over the last 10 s may be at most this share of the "
        "requests ...",
        "retry_budget_min": "... or this many per second, whichever is larger",
        "max_buffered": "message mode: bytes of unfinished request lines held for all clients",
        "backends": "the backends the service balances over, in order (see below)",
        "health": "active health checks (`[services.NAME.health]`)",
        "outlier": "passive health: failures on live traffic eject a backend for a while",
        "http": "http mode's limits, timeouts, keep-alive, retries and header rules",
        "routes": "http mode: requests matching a route go to the http service it names "
        "(first match wins); the others to `backends` (404 when it is empty)",
        "accept_proxy": "every client connection starts with a PROXY protocol header (v1 or "
        "v2, from HAProxy, a cloud load balancer...); its client address is the one used",
        "accept_proxy_from": "with accept_proxy: the addresses (CIDRs) that may connect; "
        "empty: any",
        "proxy_timeout": "with accept_proxy: the PROXY header must arrive within this",
        "send_proxy": '"v1" or "v2": each backend connection starts with a PROXY header '
        "carrying the client's address (tcp and http mode)",
        "client_hello_timeout": "with sni_routes: the ClientHello must arrive within this",
        "tls": "TLS termination: certificates (chosen by SNI), versions, ALPN, client certificates",
        "backend_tls": "TLS towards the backends (and their health checks)",
        "sni_routes": "tcp mode: connections whose TLS ClientHello names one of `server_names` "
        "go to the tcp service named, TLS untouched (first match wins); the others to "
        "`backends` (closed when it is empty)",
        "discover": '`"a:NAME:PORT"` (A and AAAA records, weight 1) or `"srv:_svc._tcp.NAME"` '
        "(SRV records, their weights): the backends are the answer, re-resolved every "
        '`[discovery] interval`; a failed or empty answer keeps the last set. `"etcd"` '
        '(or `"etcd:NAME"`): the backends, weights and states are the keys under '
        "`{prefix}/{service}/` (or NAME's) in etcd, watched; etcd unreachable keeps the last set",
    },
    "services.NAME.tls": {
        "cert": "the PEM certificate chain (the service's one certificate)",
        "key": "its PEM private key",
        "min_version": 'the oldest TLS version accepted: "1.2" or "1.3"',
        "ciphers": "an OpenSSL cipher list for TLS 1.2 (empty: OpenSSL's default)",
        "alpn": "protocols offered by ALPN, in order of preference",
        "client_ca": "PEM CA certificates client certificates are verified against",
        "verify_client": '"none", "optional" (verified when given) or "required"',
        "handshake_timeout": "the ClientHello and the handshake must be done within this",
        "subject_header": "http mode: the header that carries a verified client "
        "certificate's subject (a client's own is removed); empty: none",
        "certs": "several certificates, chosen by the SNI name (instead of cert and key)",
    },
    "services.NAME.tls.certs[]": {
        "cert": "the PEM certificate chain",
        "key": "its PEM private key",
        "server_names": 'the names it serves, exact or "*.example.com"; the first '
        "certificate serves any name no other lists",
    },
    "services.NAME.backend_tls": {
        "ca": "PEM CA certificates backends are verified against (empty: the system's)",
        "server_name": "the name sent by SNI and verified (empty: the backend's host)",
        "verify": "false accepts any backend certificate",
        "client_cert": "a PEM client certificate chain presented to backends",
        "client_key": "its PEM private key",
        "min_version": 'the oldest TLS version used: "1.2" or "1.3"',
        "alpn": "protocols offered by ALPN",
    },
    "services.NAME.sni_routes[]": {
        "service": "the tcp service whose backends get the connection",
        "server_names": 'server names, exact or "*.example.com"',
    },
    "services.NAME.http": {
        "max_header_bytes": "a request head larger than this gets 431",
        "max_headers": "a request with more header fields gets 431",
        "header_timeout": "the whole request head must arrive within this, from its first "
        "byte (slow clients get 408)",
        "request_body_timeout": "a request body with no byte for this long ends the exchange",
        "response_header_timeout": "a backend that sends no response head within this after "
        "the request: 504 (idempotent requests are retried); a response body with no byte "
        "for this long is cut",
        "keepalive_timeout": "a client connection idle between requests this long is closed",
        "upstream_idle_timeout": "an idle upstream connection is closed after this",
        "max_idle": "idle upstream connections kept per backend for reuse",
        "max_requests_per_connection": "requests on one upstream connection before it is closed",
        "max_body_bytes": "a request body larger than this gets 413",
        "replay_buffer": "a request body up to this size is kept so the request may be retried",
        "retry_on_status": "response statuses (502, 503, 504) retried on another backend",
        "retry_non_idempotent": "POST and PATCH are retried even after their body was sent",
        "trusted_proxies": "clients (CIDRs) whose X-Forwarded-* and Forwarded headers are kept",
        "forwarded": "add an RFC 7239 Forwarded header besides X-Forwarded-*",
        "via": "a pseudonym: a Via entry added to requests and responses",
        "request_id": "pass on or make an X-Request-Id",
        "set_headers": "headers set on every request to the backends",
        "remove_headers": "headers removed from every request",
        "strip_prefix": "a path prefix taken off the request target",
        "host_rewrite": "the Host header sent to the backends",
        "tunnel_timeout": "an upgraded connection (WebSocket) quiet both ways this long is closed",
        "sticky_cookie": "a cookie that pins a client to the backend that answered it, while "
        "that backend is up",
    },
    "services.NAME.routes[]": {
        "service": "the http service (backends, algorithm, health, retries, header rules) "
        "that serves what matches",
        "hosts": 'host names, exact or "*.example.com" (any subdomain); empty: any',
        "path_prefix": '"/api" matches /api, /api/x and /api?q (not /apix); empty: any',
        "methods": "request methods; empty: any",
        "headers": "headers the request must carry, with exactly these values",
    },
    "services.NAME.health": {
        "interval": "seconds between checks",
        "timeout": "a check not answered by then has failed",
        "rise": "good checks in a row before a down backend rejoins",
        "fall": "failed checks in a row before an up backend is dropped",
        "jitter": "share of `interval` by which each wait is randomly shortened or lengthened",
        "type": '"connect": a plain TCP connect; "line": `send` a probe line and check the '
        'reply; "http": an HTTP/1.1 request, its status and body checked',
        "send": "probe line sent after connecting (none in tcp mode unless set); false: a "
        "plain TCP connect check",
        "expect": "the reply line the probe must get; false: any reply will do",
        "method": "http checks: the request's method",
        "path": "http checks: the request target",
        "host": "http checks: the Host header sent (empty: the backend's host:port)",
        "expect_status": "http checks: the statuses that pass",
        "expect_body": "http checks: a string the first 64 KiB of the body must contain",
        "disable_on_404": "http checks: a 404 from an up backend drains it (it keeps its "
        "connections, gets no new work) until a check passes again",
        "enabled": "false turns active checks off",
    },
    "services.NAME.outlier": {
        "consecutive_failures": "failed connections or requests in a row that eject a backend",
        "base_ejection_time": "ejection time for a first offence; it doubles with every repeat",
        "max_ejection_time": "the longest ejection",
        "max_ejection_percent": "never eject more than this share of the service's backends",
        "enabled": "false turns outlier detection off",
    },
    "services.NAME.backends[]": {
        "address": "the backend",
        "weight": "its share of the work against the others; 0 drains it",
    },
    "servers[]": {
        "host": "the backend's host",
        "port": "the backend's port",
        "weight": "its share of the work against the others; 0 drains it",
    },
}
"""What each key of `TABLE_KEYS` does, by table."""
