"""Checks across a whole config file, and the list of problems a load collects.

How it works: the loaders record every problem in a `Problems` list instead
of raising, and hand each service they could read to `check_services` as a
`ParsedService` (its config, where its keys are, which of its parts were
valid). The checks here are those no single key can fail, the ones that
otherwise only show at run time:

- two listeners that overlap once resolved (`localhost:P` and `127.0.0.1:P`,
  `0.0.0.0:P` and any IPv4 address on P, `[::]:P` and any IPv6 address on P);
- a backend that is the balancer itself (`balancer.config.hosts.points_at` against every
  listener in the file, the admin listener included; a backend on 0.0.0.0
  or [::] reaches the loopback address); names are resolved, and only for a
  backend whose port some listener uses; a name that does not resolve is
  skipped (it fails at connect time, not as a loop);
- a service whose backends all have weight 0: it could never serve;
- `backend_framing = "auto"` without a probe to detect the framing with.

A check runs only on parts that were valid (`Problems.clean`): one mistake is
reported once, not again as each of its consequences.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from balancer.config import hosts
from balancer.config.addresses import format_address
from balancer.config.errors import ConfigError
from balancer.config.keylines import join_key, line_of
from balancer.config.model import AdminConfig, BackendConfig, ServiceConfig

T = TypeVar("T")

_LINE_WHERE_RE = re.compile(r"line (\d+)")


class Problems:
    """The errors found so far in one file, each at its key path (or line)."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.errors: list[ConfigError] = []

    def add(self, where: str, message: str) -> None:
        self.errors.append(ConfigError(self.source, where, message))

    def catch(self, call: Callable[[], T]) -> T | None:
        """`call()`, or None with its ConfigError recorded."""
        try:
            return call()
        except ConfigError as exc:
            self.errors.extend(exc.errors)
            return None

    def clean(self, *paths: str) -> bool:
        """No problem recorded at any of `paths`, nor under them."""
        for error in self.errors:
            where = error.where
            for path in paths:
                if where == path or where.startswith((path + ".", path + "[")):
                    return False
        return True

    def raise_if_any(self, lines: Callable[[], dict[str, int]] | None = None) -> None:
        """Raise one ConfigError listing every problem, in line order, if there is any.

        `lines` maps key paths to lines (see `keylines`); it is called only when
        there is an error to place.
        """
        if not self.errors:
            return
        where_lines = lines() if lines is not None else {}
        unique: dict[tuple[str, str], ConfigError] = {}
        for error in self.errors:
            unique.setdefault((error.where, error.message), error)
            if error.line is not None:
                continue
            m = _LINE_WHERE_RE.match(error.where)
            if m is not None:
                error.line = int(m.group(1))
            elif error.where:
                error.line = line_of(where_lines, error.where)
        ordered = sorted(unique.values(), key=lambda e: (e.line is None, e.line or 0))
        raise ConfigError.collected(ordered)


@dataclass
class ParsedService:
    """A service as read from the file, with where its parts are and which were valid."""

    config: ServiceConfig
    path: str
    """`services.NAME`; "" for the tutorial's formats (one service, no key paths)."""
    listen_where: str
    listen_ok: bool
    backends_where: str
    backends: list[tuple[BackendConfig, str]] = field(default_factory=list)
    """The backends that were valid, each with where it is written."""
    backends_ok: bool = True
    """The backend list was there and every item in it was valid."""


@dataclass
class _Listener:
    host: str
    port: int
    owner: str
    where: str
    _ips: set[str] | None = None

    @property
    def listen(self) -> str:
        return format_address(self.host, self.port)

    def ips(self) -> set[str]:
        """The addresses it binds (resolved once, only when a comparison needs them)."""
        if self._ips is None:
            self._ips = {ip for ip, _ in hosts.resolve(self.host, self.port)}
        return self._ips


def _family(ip: str) -> int:
    try:
        return ipaddress.ip_address(ip.split("%", 1)[0]).version
    except ValueError:
        return 0


def _overlap(a: _Listener, b: _Listener) -> bool:
    if a.port != b.port or a.port == 0:
        return False
    if a.host.lower() == b.host.lower():
        return True
    for one, other in ((a, b), (b, a)):
        if one.host in ("0.0.0.0", "::"):
            version = 4 if one.host == "0.0.0.0" else 6
            if other.host in ("0.0.0.0", "::"):
                return False  # the other family's wildcard (IPv6 sockets are bound v6-only)
            return any(_family(ip) == version for ip in other.ips())
    return bool(a.ips() & b.ips())


def _check_listeners(
    services: list[_Listener], admin: _Listener | None, problems: Problems
) -> None:
    taken: list[_Listener] = []
    for here in services:
        for there in taken:
            if _overlap(here, there):
                problems.add(
                    here.where,
                    f"expected an address no other service listens on, got {here.listen!r} "
                    f"(already used by {there.owner}, listening on {there.listen!r})",
                )
                break
        taken.append(here)
    if admin is not None:
        for there in taken:
            if _overlap(admin, there):
                problems.add(
                    admin.where,
                    f"expected an address no service listens on, got {admin.listen!r} "
                    f"(already used by {there.owner}, listening on {there.listen!r})",
                )
                break


def _check_loops(svc: ParsedService, listeners: list[_Listener], problems: Problems) -> None:
    ports = {lst.port for lst in listeners}
    for backend, where in svc.backends:
        if backend.port not in ports:
            continue
        resolved = hosts.resolve(backend.host, backend.port)
        for lst in listeners:
            if hosts.points_at(resolved, lst.host, lst.port):
                problems.add(
                    where,
                    f"expected a backend other than this balancer, got {backend.address!r}, "
                    f"which is the listener of {lst.owner} ({lst.listen!r}): "
                    "its requests would come back to the balancer",
                )
                break


def _check_weights(svc: ParsedService, problems: Problems) -> None:
    if not svc.backends_ok or not svc.backends or not problems.clean(svc.backends_where):
        return
    if all(backend.weight == 0 for backend, _ in svc.backends):
        n = len(svc.backends)
        problems.add(
            svc.backends_where,
            f"expected at least one backend with a weight above 0, got weight 0 for "
            f"{'the only backend' if n == 1 else f'all {n} backends'}: "
            "the service could never serve",
        )


def _check_routes(
    svc: ParsedService, by_name: dict[str, ServiceConfig], problems: Problems
) -> None:
    """A route names another http service of the file, one without routes of its own."""
    for i, route in enumerate(svc.config.routes):
        where = f"{svc.path}.routes[{i}].service"
        target = by_name.get(route.service)
        if target is None:
            known = [n for n, c in by_name.items() if c.mode == "http" and n != svc.config.name]
            problems.add(
                where,
                f"expected the name of an http service of this file (one of {known}), "
                f"got {route.service!r}",
            )
        elif target.name == svc.config.name:
            problems.add(where, "expected another service than this one (its own backends "
                         "serve what no route takes)")  # fmt: skip
        elif target.mode != "http":
            problems.add(where, f"expected an http service, got {route.service!r} in "
                         f"{target.mode} mode")  # fmt: skip
        elif target.routes:
            problems.add(where, f"expected a service without routes of its own, got "
                         f"{route.service!r}, which has {len(target.routes)}")  # fmt: skip


def _check_sni_routes(
    svc: ParsedService, parsed: dict[str, ParsedService], problems: Problems
) -> None:
    """An SNI route names another tcp service of the file that relays TLS untouched."""
    for i, route in enumerate(svc.config.sni_routes):
        where = f"{svc.path}.sni_routes[{i}].service"
        target = parsed.get(route.service)
        if target is None:
            known = [name for name, other in parsed.items() if other is not svc
                     and other.config.mode == "tcp" and other.config.tls is None]  # fmt: skip
            choices = f"one of {known}" if known else "there is none"
            problems.add(where, f"expected the name of another tcp service without tls of "
                         f"this file ({choices}), got {route.service!r}")  # fmt: skip
        elif target is svc:
            problems.add(where, "expected another service than this one (its own backends "
                         "serve what no route takes)")  # fmt: skip
        elif not problems.clean(join_key(target.path, "mode")):
            continue  # its mode is not known: its own mistake, reported there
        elif target.config.mode != "tcp":
            got = f"got {route.service!r} in {target.config.mode} mode"
            problems.add(where, f"expected a tcp service (the connection is relayed, its TLS "
                         f"untouched), {got}")  # fmt: skip
        elif target.config.tls is not None:
            got = f"got {route.service!r}, which terminates TLS"
            problems.add(where, f"expected a tcp service without tls (the connection's TLS is "
                         f"relayed untouched), {got}")  # fmt: skip


def _check_framing(svc: ParsedService, problems: Problems) -> None:
    cfg = svc.config
    key = join_key(svc.path, "backend_framing")
    health = join_key(svc.path, "health")
    if cfg.backend_framing != "auto" or not problems.clean(key, health):
        return
    if not cfg.health.enabled:
        reason = "health.enabled = false"
    elif cfg.health.type == "http":
        reason = 'health.type = "http"'
    elif cfg.health.send is None:
        reason = (
            "tcp mode checks with a plain connect unless health.send is set"
            if cfg.mode == "tcp"
            else "health.send = false"
        )
    else:
        return
    problems.add(
        key,
        f"expected 'line' or 'raw' without a health probe, got 'auto': auto needs a check "
        f"to detect the framing with, and {reason}",
    )


def check_services(
    services: Sequence[ParsedService], admin: AdminConfig | None, problems: Problems
) -> None:
    """The checks across services; `admin` is None when its settings were not valid."""
    listeners = [
        _Listener(
            svc.config.listen_host,
            svc.config.listen_port,
            f"service {svc.config.name!r}",
            svc.listen_where,
        )
        for svc in services
        if svc.listen_ok
    ]
    admin_listener = None
    if admin is not None and admin.enabled:
        admin_listener = _Listener(admin.host, admin.port, "the admin endpoint", "admin.listen")
    _check_listeners(listeners, admin_listener, problems)
    if admin_listener is not None:
        listeners.append(admin_listener)
    by_name = {svc.config.name: svc.config for svc in services}
    parsed = {svc.config.name: svc for svc in services}
    for svc in services:
        _check_loops(svc, listeners, problems)
        _check_weights(svc, problems)
        _check_framing(svc, problems)
        _check_routes(svc, by_name, problems)
        _check_sni_routes(svc, parsed, problems)
