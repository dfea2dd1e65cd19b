"""Which route a request takes (no I/O).

A route matches when every condition it sets holds: the Host (without its
port, case-insensitive) is one of its `hosts` (`*.example.com`: any name
under example.com, not example.com itself), the path starts with its
`path_prefix` at a segment boundary (`/api` takes /api, /api/x and /api?q,
not /apix), the method is one of its `methods`, and each of its `headers` has
exactly the value given. Routes are tried in order; the first that matches wins.
"""

from __future__ import annotations

from collections.abc import Sequence

from balancer.config.model import RouteConfig
from balancer.core.http.wire import Head


def host_name(host: bytes | None) -> bytes:
    """The lower-cased name of a Host header value, without its port."""
    if not host:
        return b""
    host = host.lower()
    if host.startswith(b"["):
        return host.split(b"]", 1)[0] + b"]"
    return host.rsplit(b":", 1)[0] if b":" in host else host


def under_prefix(target: bytes, prefix: bytes) -> bool:
    if not target.startswith(prefix):
        return False
    rest = target[len(prefix) : len(prefix) + 1]
    return rest in (b"", b"/", b"?", b"#")


class Route:
    __slots__ = ("exact", "headers", "methods", "prefix", "service", "suffixes")

    def __init__(self, config: RouteConfig) -> None:
        self.service = config.service
        hosts = [h.encode() for h in config.hosts]
        self.exact = frozenset(h for h in hosts if not h.startswith(b"*."))
        self.suffixes = tuple(h[1:] for h in hosts if h.startswith(b"*."))
        self.prefix = config.path_prefix.encode()
        self.methods = frozenset(m.encode() for m in config.methods)
        self.headers = tuple((k.lower().encode(), v.encode()) for k, v in config.headers)

    def matches(self, head: Head, host: bytes) -> bool:
        if (self.exact or self.suffixes) and host not in self.exact:
            if not self.suffixes or not host.endswith(self.suffixes):
                return False
        if self.prefix and not under_prefix(head.target, self.prefix):
            return False
        if self.methods and head.method not in self.methods:
            return False
        for name, value in self.headers:
            if not any(n.lower() == name and v == value for n, v in head.headers):
                return False
        return True


class RouteTable:
    def __init__(self, routes: Sequence[RouteConfig]) -> None:
        self.routes = tuple(Route(r) for r in routes)

    def __bool__(self) -> bool:
        return bool(self.routes)

    def match(self, head: Head) -> str | None:
        """The service of the first route `head` matches; None when none does."""
        host = host_name(head.host)
        for route in self.routes:
            if route.matches(head, host):
                return route.service
        return None
