"""What a proxy forwards of a message's headers, and what it adds (no I/O).

- Hop-by-hop headers end here: Connection and every header it names,
  Keep-Alive, Proxy-Connection, TE, Trailer, Upgrade (kept on an upgrade) and
  the framing headers, which the proxy writes itself for the body it sends.
- The forwarding headers (`X-Forwarded-For`/`-Proto`/`-Host`/`-Port`, and
  RFC 7239 `Forwarded` when asked) are added after that filtering, so no
  `Connection` header can remove them. Those a client sent are kept (and
  `X-Forwarded-For` appended to) only when the client is a trusted proxy;
  from anyone else they are replaced.
- `X-Request-Id` is kept when the client sent a sane one, else made here.
"""

from __future__ import annotations

import ipaddress
import itertools
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from balancer.config.addresses import Network
from balancer.core.http.wire import Head, Headers

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"content-length",
    }
)
"""Never forwarded as received (content-length and transfer-encoding: re-framed by us)."""
FORWARDING = frozenset(
    {
        b"x-forwarded-for",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"x-forwarded-port",
        b"forwarded",
    }
)
TRAILER_DROP = HOP_BY_HOP | {b"host", b"authorization", b"set-cookie", b"cache-control"}
"""Fields a trailer may not carry (framing, routing, and what RFC 9110 6.5.1 warns of)."""
REQUEST_ID = b"x-request-id"
_ID_OK = frozenset(b"0123456789abcdefABCDEF-_.:ABCDEFGHIJKLMNOPQRSTUVWXYZghijklmnopqrstuvwxyz")


@dataclass(frozen=True)
class HeaderRules:
    """A service's header settings (`[services.NAME.http]`)."""

    trusted_proxies: tuple[Network, ...] = ()
    forwarded: bool = False
    """Also send RFC 7239 `Forwarded`."""
    via: bytes | None = None
    """The pseudonym of a `Via` entry added both ways (None: no Via)."""
    set_headers: tuple[tuple[bytes, bytes], ...] = ()
    remove_headers: frozenset[bytes] = field(default_factory=frozenset)
    """Lower-cased names removed from requests."""
    request_id: bool = True
    strip_prefix: bytes = b""
    host_rewrite: bytes | None = None


def is_trusted(address: str | None, networks: Sequence[Network]) -> bool:
    if not networks or not address:
        return False
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in net for net in networks)


_ID_PREFIX = secrets.token_hex(4).encode()
_ids = itertools.count(1)


def new_request_id() -> bytes:
    """A request id unique to this process's run (random prefix, then a counter)."""
    return b"%s%08x" % (_ID_PREFIX, next(_ids))


def _quote_node(ip: str, port: int | None = None) -> bytes:
    node = f'"[{ip}]"' if ":" in ip else ip
    if port is not None and ":" in ip:
        node = f'"[{ip}]:{port}"'
    return node.encode()


def _kept(head: Head) -> Iterable[tuple[bytes, bytes, bytes]]:
    """(lower-cased name, name, value) of the end-to-end headers of `head`; Connection
    cannot name Host away (the request would reach the backend without one)."""
    named = head.connection - {b"host"}
    for name, value in head.headers:
        lower = name.lower()
        if lower in HOP_BY_HOP or lower in named:
            continue
        yield lower, name, value


def request_headers(
    head: Head,
    rules: HeaderRules,
    *,
    client_ip: str,
    proto: bytes,
    port: int,
    trusted: bool,
    request_id: bytes | None,
) -> tuple[Headers, bytes | None]:
    """The headers to send upstream (without framing), and the request id used."""
    out: Headers = []
    prior_for: list[bytes] = []
    prior: dict[bytes, bytes] = {}
    remove = rules.remove_headers
    rid: bytes | None = None
    for lower, name, value in _kept(head):
        if lower in FORWARDING:
            if trusted:
                if lower == b"x-forwarded-for":
                    prior_for.append(value)
                else:
                    prior.setdefault(lower, value)
            continue
        if lower == REQUEST_ID and rules.request_id:
            if rid is None and 0 < len(value) <= 200 and _ID_OK.issuperset(value):
                rid = value
            continue
        if lower in remove:
            continue
        if lower == b"host" and rules.host_rewrite is not None:
            value = rules.host_rewrite
        out.append((name, value))
    if head.upgrade is not None:
        out.append((b"Connection", b"upgrade"))
        out.append((b"Upgrade", head.upgrade))
    host = head.host or b""
    ip = client_ip.encode()
    out.append((b"X-Forwarded-For", b", ".join([*prior_for, ip])))
    out.append((b"X-Forwarded-Proto", prior.get(b"x-forwarded-proto", proto)))
    out.append((b"X-Forwarded-Host", prior.get(b"x-forwarded-host", host)))
    out.append((b"X-Forwarded-Port", prior.get(b"x-forwarded-port", str(port).encode())))
    if rules.forwarded:
        mine = b"for=" + _quote_node(client_ip) + b";proto=" + proto
        if host:
            mine += b';host="' + host.replace(b'"', b"") + b'"'
        earlier = prior.get(b"forwarded")
        out.append((b"Forwarded", earlier + b", " + mine if earlier else mine))
    if rules.via is not None:
        out.append((b"Via", b"1." + head.version[-1:] + b" " + rules.via))
    if rules.request_id:
        rid = rid or request_id or new_request_id()
        out.append((b"X-Request-Id", rid))
    for name, value in rules.set_headers:
        lower = name.lower()
        out[:] = [(n, v) for n, v in out if n.lower() != lower]
        out.append((name, value))
    return out, rid


def response_headers(head: Head, rules: HeaderRules) -> Headers:
    """The end-to-end headers of a response (without framing) to send to the client."""
    out: Headers = [(name, value) for _, name, value in _kept(head)]
    if head.upgrade is not None:
        out.append((b"Connection", b"upgrade"))
        out.append((b"Upgrade", head.upgrade))
    if rules.via is not None:
        out.append((b"Via", b"1." + head.version[-1:] + b" " + rules.via))
    return out


def trailer_fields(trailers: Headers) -> Headers:
    return [(n, v) for n, v in trailers if n.lower() not in TRAILER_DROP]


def rewrite_target(target: bytes, prefix: bytes) -> bytes:
    """`target` with `prefix` taken off its path (`/api/x` -> `/x`); others unchanged."""
    if not prefix or not target.startswith(prefix):
        return target
    rest = target[len(prefix) :]
    if not rest or rest[:1] in (b"?", b"#"):
        return b"/" + rest
    if rest[:1] != b"/":
        return target  # /apix is not under /api
    return rest
