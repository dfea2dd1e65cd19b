"""The full format (TOML, or the object form of JSON): the top level and `[admin]`.

`build` walks the nested mapping; the services are read by `services`, the
checks across them run in `checks`.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any

from balancer.config.addresses import parse_address
from balancer.config.bounds import show_value
from balancer.config.checks import ParsedService, Problems, check_services
from balancer.config.discovery import (
    DISCOVERY_KINDS,
    KIND_OF_TARGET,
    MAX_ENDPOINTS,
    DiscoveryConfig,
    parse_discover,
    parse_nameserver,
    valid_endpoint,
    valid_prefix,
)
from balancer.config.keylines import join_key
from balancer.config.model import READ_ACCESS, AdminConfig, Config, listen_on, parse_admin
from balancer.config.schema import ADMIN_KEYS, DISCOVERY_KEYS, TOP_KEYS
from balancer.config.services import read_service
from balancer.config.table import Table

_ALLOWED_HOST_RE = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+)(:[0-9]{1,5})?")


def _admin(data: object, problems: Problems) -> AdminConfig | None:
    """The admin settings; None when they were not valid (nothing is checked against them)."""
    t = Table.read(data, "admin", problems, ADMIN_KEYS, what="a table of admin settings")
    if t is None:
        return None
    admin: AdminConfig | None = AdminConfig()
    if t.has("listen"):
        value = t.data["listen"]
        if isinstance(value, str):
            at = t.where("listen")
            admin = problems.catch(lambda: parse_admin(value, where=at, source=problems.source))
        else:
            t.fail("listen", f'expected "host:port" or "off", got {show_value(value)}')
            admin = None
    listen = admin or AdminConfig()
    enabled = t.boolean("enabled", listen.enabled) and listen.enabled
    allowed: list[str] = []
    if t.has("allowed_hosts"):
        hosts = t.data["allowed_hosts"]
        if isinstance(hosts, list) and all(
            isinstance(h, str) and _ALLOWED_HOST_RE.fullmatch(h) for h in hosts
        ):
            allowed = [h.lower() for h in hosts]
        else:
            t.fail(
                "allowed_hosts",
                'expected a list of host names (as "admin.example" or "admin.example:9100"), '
                f"got {show_value(hosts)}",
            )
    result = replace(
        listen,
        enabled=enabled,
        token=t.string("token"),
        read_token=t.string("read_token"),
        read_access=t.choice("read_access", listen.read_access, READ_ACCESS),
        allowed_hosts=tuple(allowed),
    )
    return result if admin is not None and problems.clean("admin") else None


def _discovery(data: object, problems: Problems) -> DiscoveryConfig | None:
    """The `[discovery]` table; None when it is not a table."""
    t = Table.read(data, "discovery", problems, DISCOVERY_KEYS, what="a table of settings")
    if t is None:
        return None
    defaults = DiscoveryConfig()
    servers: list[str] = []
    if t.has("nameservers"):
        value = t.data["nameservers"]
        if isinstance(value, list) and all(
            isinstance(v, str) and parse_nameserver(v) is not None for v in value
        ):
            servers = list(value)
        else:
            t.fail(
                "nameservers",
                'expected a list of "IP" or "IP:PORT" (as "127.0.0.1:5353"), '
                f"got {show_value(value)}",
            )
    kind = t.choice("kind", defaults.kind, DISCOVERY_KINDS)
    endpoints: list[str] = []
    if t.has("endpoints"):
        value = t.data["endpoints"]
        if (
            isinstance(value, list)
            and 1 <= len(value) <= MAX_ENDPOINTS
            and all(isinstance(v, str) and valid_endpoint(v) for v in value)
        ):
            endpoints = list(value)
        else:
            t.fail(
                "endpoints",
                f'expected a list of 1 to {MAX_ENDPOINTS} "http://host:port" (the etcd '
                f"cluster's members), got {show_value(value)}",
            )
    elif kind == "etcd":
        t.fail("endpoints", 'missing: kind = "etcd" needs a list of "http://host:port"')
    prefix = defaults.prefix
    if t.has("prefix"):
        value = t.data["prefix"]
        if isinstance(value, str) and valid_prefix(value):
            prefix = value
        else:
            t.fail(
                "prefix",
                'expected a key directory as "/balancer" or "/prod/lb" (segments of letters, '
                f"digits, _ . -; no trailing /), got {show_value(value)}",
            )
    for key, wanted in (("nameservers", "dns"), ("endpoints", "etcd"), ("prefix", "etcd")):
        if t.has(key) and kind != wanted and problems.clean(f"discovery.{key}"):
            t.fail(key, f'only with kind = "{wanted}" (kind is "{kind}")')
    return DiscoveryConfig(
        kind=kind,
        interval=t.bounded("interval", defaults.interval, "discovery.interval"),
        timeout=t.bounded("timeout", defaults.timeout, "discovery.timeout"),
        nameservers=tuple(servers),
        endpoints=tuple(endpoints),
        prefix=prefix,
    )


def build(
    data: dict[str, Any],
    problems: Problems,
    default_listen: str,
    admin_listen: AdminConfig | None = None,
) -> Config:
    """A Config from the TOML-shaped mapping (TOML, or the object form of JSON)."""
    source = problems.source
    listen = parse_address(
        default_listen,
        where="listen",
        source="<command line>",
        default_host="localhost",
        allow_port_zero=True,
    )
    top = Table.read(data, "", problems, TOP_KEYS, what="a table")
    assert top is not None  # `data` is a dict
    drain_timeout = top.bounded("drain_timeout", 10.0)
    drain_close_window = top.bounded("drain_close_window", 1.0)
    workers = top.bounded_int("workers", 1)
    access_log = top.boolean("access_log", False)
    admin = _admin(data["admin"], problems) if "admin" in data else AdminConfig()
    if admin is not None and admin_listen is not None:
        admin = listen_on(admin, admin_listen)

    services: list[ParsedService] = []
    services_data = data.get("services")
    if services_data is None:
        problems.add("services", "missing: expected at least one [services.NAME] table")
    elif not isinstance(services_data, dict):
        problems.add("services", f"expected a table of services, got {show_value(services_data)}")
    elif not services_data:
        problems.add("services", "expected at least one [services.NAME] table, got none")
    else:
        for name, svc_data in services_data.items():
            parsed = read_service(name, svc_data, problems, listen)
            if parsed is not None:
                services.append(parsed)
    discovery = _discovery(data["discovery"], problems) if "discovery" in data else None
    for svc in services:
        if svc.config.discover and discovery is None:
            problems.add(
                join_key(svc.path, "discover"),
                "expected a [discovery] table (how names are resolved) with discover, got none",
            )
        target = parse_discover(svc.config.discover) if svc.config.discover else None
        if target is not None and discovery is not None:
            needs = KIND_OF_TARGET[target.kind]
            if needs != discovery.kind:
                problems.add(
                    join_key(svc.path, "discover"),
                    f'{svc.config.discover!r} needs [discovery] kind = "{needs}", '
                    f'and kind is "{discovery.kind}"',
                )
    check_services(services, admin, problems)
    return Config(
        services=tuple(svc.config for svc in services),
        admin=admin or AdminConfig(),
        drain_timeout=drain_timeout,
        drain_close_window=drain_close_window,
        workers=workers,
        access_log=access_log,
        discovery=discovery,
        source=source,
    )
