"""Who may use the admin endpoint, decided without I/O on the request path.

How it works: every request passes three checks, in this order, and the first
that fails answers it:

1. Host. A page of another site can reach a loopback admin endpoint through
   DNS rebinding (a name of the attacker's that resolves to 127.0.0.1), and
   its requests then carry the attacker's name in `Host`. Only the endpoint's
   own names pass: `localhost` and loopback addresses, the listen address
   (with a wildcard listener: any address of this host), this machine's host
   name, and `[admin] allowed_hosts` ("name" admits any port, "name:port" that
   port). A malformed Host is a 400, a foreign one a 421. A request without
   Host is not from a browser and passes.
2. Origin. A browser request whose `Origin` is not the endpoint's own (`null`
   included) is refused with 403: other sites' pages neither write nor read.
3. Token, per route. Writes need the write token (`[admin] token`, else
   $BALANCER_ADMIN_TOKEN) when there is one; without one only a loopback
   listener takes writes. Reads need a token when `read_access` is "token",
   or "auto" on a listener other hosts can reach, and accept the read token
   (`[admin] read_token`) or the write token. A missing or wrong token is a
   401; the read token on a write is a 403.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from balancer.config.errors import ConfigError
from balancer.config.hosts import WILDCARD_HOSTS, is_local_ip
from balancer.config.model import AdminConfig

TOKEN_ENV = "BALANCER_ADMIN_TOKEN"

OPEN = "open"
READ = "read"
WRITE = "write"
ACCESS = (OPEN, READ, WRITE)


@dataclass(frozen=True)
class Refusal:
    """Why a request is refused, with the HTTP status that says so."""

    status: int
    message: str


def admin_token(config: AdminConfig) -> str | None:
    """The token writes need: `[admin] token`, else $BALANCER_ADMIN_TOKEN, else None."""
    return config.token or os.environ.get(TOKEN_ENV) or None


def is_loopback(host: str) -> bool:
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def reads_need_token(config: AdminConfig) -> bool:
    if config.read_access == "auto":
        return not is_loopback(config.host)
    return config.read_access == "token"


def check_admin_security(config: AdminConfig) -> None:
    """Refuse admin settings that would leave the endpoint open or unusable."""
    if not config.enabled:
        return
    token = admin_token(config)
    if not is_loopback(config.host) and token is None:
        raise ConfigError(
            "admin",
            "listen",
            f"the admin endpoint {config.listen} is reachable from other hosts, so its runtime "
            f"API needs a token: set [admin] token in the config or the {TOKEN_ENV} environment "
            "variable (or listen on 127.0.0.1)",
        )
    if reads_need_token(config) and token is None and not config.read_token:
        raise ConfigError(
            "admin",
            "read_access",
            'read_access = "token" needs a token to accept: set [admin] read_token or token '
            f"(or the {TOKEN_ENV} environment variable)",
        )


def split_host(text: str) -> tuple[str, int | None] | None:
    """`name`, `name:port`, `[v6]` or `[v6]:port` -> (lowercase host, port); None if malformed."""
    s = text.strip().lower()
    if s.startswith("["):
        close = s.find("]")
        if close < 0:
            return None
        host, rest = s[1:close], s[close + 1 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return None
    else:
        host, sep, port_text = s.partition(":")
        rest = sep + port_text
        host = host.rstrip(".")
        if not host or not host.isascii() or not all(c.isalnum() or c in "-_." for c in host):
            return None
    if not rest:
        return host, None
    digits = rest[1:]
    if rest[0] != ":" or not digits.isdigit() or len(digits) > 5 or int(digits) > 65535:
        return None
    return host, int(digits)


def _bearer(authorization: str | None) -> str | None:
    scheme, _, given = (authorization or "").strip().partition(" ")
    given = given.strip()
    if scheme.lower() != "bearer" or not given:
        return None
    return given


def _same(given: str, token: str) -> bool:
    return hmac.compare_digest(
        given.encode("utf-8", "surrogatepass"), token.encode("utf-8", "surrogatepass")
    )


class AdminGuard:
    """The admin endpoint's access rules for one listener (see the module's docstring)."""

    def __init__(
        self,
        config: AdminConfig,
        *,
        hostname: str | None = None,
        is_local: Callable[[str], bool] = is_local_ip,
    ) -> None:
        self.write_token = admin_token(config)
        self.read_token = config.read_token or None
        self.loopback = is_loopback(config.host)
        self.reads_need_token = reads_need_token(config)
        listen = config.host.lower().strip("[]")
        self.wildcard = listen in WILDCARD_HOSTS
        self.own_names: set[str] = {"localhost"}
        if not self.wildcard:
            self.own_names.add(listen)
        name = (hostname if hostname is not None else socket.gethostname()).lower()
        if name:
            self.own_names.add(name.rstrip("."))
        self.allowed: list[tuple[str, int | None]] = []
        for entry in config.allowed_hosts:
            parsed = split_host(entry)
            if parsed is not None:
                self.allowed.append(parsed)
        self.is_local = is_local

    def listening_on(self, host: str) -> None:
        """The address the listener is bound to (known once it is started)."""
        host = host.lower().strip("[]")
        if host not in WILDCARD_HOSTS:
            self.own_names.add(host)

    # -- 1. Host ----------------------------------------------------------------------
    def host_is_ours(self, host: str, port: int | None) -> bool:
        if host in self.own_names:
            return True
        if any(host == h and (p is None or p == port) for h, p in self.allowed):
            return True
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return False
        if ip.is_loopback:
            return True
        return self.wildcard and self.is_local(str(ip))

    def check_host(self, host_header: str | None) -> Refusal | None:
        if host_header is None:
            return None
        parsed = split_host(host_header)
        if parsed is None:
            return Refusal(400, f"malformed Host header {_clip(host_header)}")
        if not self.host_is_ours(*parsed):
            return Refusal(
                421,
                f"this admin endpoint does not answer to the name {_clip(parsed[0])}; "
                "add it to [admin] allowed_hosts if it is one of this host's names",
            )
        return None

    # -- 2. Origin --------------------------------------------------------------------
    def check_origin(self, origin: str | None, host_header: str | None) -> Refusal | None:
        if origin is None:
            return None
        refused = Refusal(403, f"cross-site request refused (Origin {_clip(origin)})")
        if origin.strip().lower() == "null":
            return refused
        try:
            parts = urlsplit(origin.strip())
            netloc = parts.netloc.lower()
        except ValueError:
            return refused
        if parts.scheme.lower() not in ("http", "https") or not netloc:
            return refused
        if host_header is not None:
            return None if netloc == host_header.strip().lower() else refused
        parsed = split_host(netloc)
        return None if parsed is not None and self.host_is_ours(*parsed) else refused

    def check_request(self, host_header: str | None, origin: str | None) -> Refusal | None:
        """Checks 1 and 2, which every request passes whatever its route."""
        return self.check_host(host_header) or self.check_origin(origin, host_header)

    # -- 3. Token ---------------------------------------------------------------------
    def check_token(self, access: str, authorization: str | None) -> Refusal | None:
        if access == OPEN:
            return None
        given = _bearer(authorization)
        if access == READ:
            if not self.reads_need_token:
                return None
            if given is None:
                return Refusal(
                    401,
                    "reads need a token: send 'Authorization: Bearer <token>' with the read "
                    "token or the write token",
                )
            tokens = [t for t in (self.read_token, self.write_token) if t is not None]
            if any(_same(given, t) for t in tokens):
                return None
            return Refusal(401, "wrong token")
        if self.write_token is None:
            if self.loopback:
                return None
            return Refusal(401, "writes need a token; none is configured")
        if given is None:
            return Refusal(401, "writes need a token: send 'Authorization: Bearer <token>'")
        if _same(given, self.write_token):
            return None
        if self.read_token is not None and _same(given, self.read_token):
            return Refusal(403, "this token may only read; writes need the write token")
        return Refusal(401, "wrong token")

    def __repr__(self) -> str:
        reads = "token" if self.reads_need_token else "open"
        writes = "token" if self.write_token else ("loopback" if self.loopback else "closed")
        return (
            f"<AdminGuard names={sorted(self.own_names)} allowed={self.allowed} "
            f"wildcard={self.wildcard} reads={reads} writes={writes}>"
        )


def _clip(text: str, limit: int = 60) -> str:
    r = repr(text)
    return r if len(r) <= limit else r[: limit - 1] + "…"
