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
from balancer.core.http.wire import Head, HttpError


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


_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_HEX = b"0123456789abcdefABCDEF"


def _decode_unreserved(path: bytes) -> bytes:
    """`%41` -> `A` for unreserved characters only (RFC 3986 6.2.2.2); the rest kept."""
    if b"%" not in path:
        return path
    out = bytearray()
    at = 0
    while at < len(path):
        char = path[at]
        if char == 0x25 and at + 2 < len(path) and path[at + 1] in _HEX and path[at + 2] in _HEX:
            value = int(path[at + 1 : at + 3], 16)
            if value in _UNRESERVED:
                out.append(value)
            else:
                out += path[at : at + 3].upper()
            at += 3
        else:
            out.append(char)
            at += 1
    return bytes(out)


def _remove_dot_segments(path: bytes) -> bytes:
    """RFC 3986 5.2.4 on an absolute path: `/a/./b/../c` -> `/a/c`; never above `/`."""
    if b"." not in path:
        return path
    out: list[bytes] = []
    segments = path.split(b"/")[1:]
    for i, segment in enumerate(segments):
        last = i == len(segments) - 1
        if segment == b".":
            if last:
                out.append(b"")
        elif segment == b"..":
            if out:
                out.pop()
            if last:
                out.append(b"")
        else:
            out.append(segment)
    return b"/" + b"/".join(out)


def normalize_target(target: bytes) -> bytes:
    """The path of `target` as routes see it and backends get it: unreserved characters
    percent-decoded, dot segments removed (the query is left as it is). `*` is kept."""
    if not target.startswith(b"/"):
        return target
    path, sep, query = target.partition(b"?")
    normal = _remove_dot_segments(_decode_unreserved(path))
    return normal + sep + query if normal != path else target


def origin_form(head: Head) -> None:
    """An absolute-form target (`http://host/path`) made origin-form (`/path`), its
    authority the Host (RFC 9112 3.2.2), so that routes and backends see one path."""
    scheme, _, rest = head.target.partition(b"://")
    cut = min((i for i in (rest.find(b"/"), rest.find(b"?")) if i >= 0), default=len(rest))
    authority, path = rest[:cut], rest[cut:]
    if scheme.lower() not in (b"http", b"https") or not authority or b"@" in authority:
        raise HttpError(400, "invalid absolute request target")
    head.target = path if path.startswith(b"/") else b"/" + path
    head.host = authority
    head.headers = [(n, authority if n.lower() == b"host" else v) for n, v in head.headers]
