"""The tutorial's formats: `config.txt` (`host port` per line) and JSON `{"servers": [...]}`.

Both give one message-mode, round-robin service whose framing is detected.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

from balancer.config.addresses import host_problem, parse_address, parse_host, parse_port
from balancer.config.bounds import is_integer, show_value
from balancer.config.checks import ParsedService, Problems, check_services
from balancer.config.model import (
    DEFAULT_LISTEN,
    DEFAULT_SERVICE_NAME,
    AdminConfig,
    BackendConfig,
    Config,
    ServiceConfig,
    listen_on,
)
from balancer.config.schema import SERVER_KEYS
from balancer.config.services import check_duplicates
from balancer.config.table import Table


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


def _tutorial_service(
    backends: list[tuple[BackendConfig, str]],
    problems: Problems,
    listen: str,
    where: str,
    admin_listen: AdminConfig | None,
) -> Config:
    check_duplicates(backends, problems)
    config = config_from_backends(
        [backend for backend, _ in backends], listen=listen, source=problems.source
    )
    if admin_listen is not None:
        config = replace(config, admin=listen_on(config.admin, admin_listen))
    parsed = ParsedService(
        config.services[0],
        path="",
        listen_where="listen",
        listen_ok=True,
        backends_where=where,
        backends=backends,
        backends_ok=problems.clean(where),
    )
    check_services([parsed], config.admin, problems)
    return config


def _host_message(value: object) -> str:
    problem = host_problem(value, bare_ipv6=True) if isinstance(value, str) else None
    detail = f"; {problem}" if problem and "IPv4" in problem else ""
    return (
        f"expected a host of letters, digits, '.', '-' and '_' (or an IPv6 address){detail}, "
        f"got {show_value(value)}"
    )


def parse_text(
    text: str, problems: Problems, listen: str, admin_listen: AdminConfig | None = None
) -> Config:
    """The tutorial's `config.txt`: `host port` (or `host:port`) per line, `#` comments."""
    source = problems.source
    backends: list[tuple[BackendConfig, str]] = []
    lines = 0
    for number, raw in enumerate(text.split("\n"), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        lines += 1
        where = f"line {number}"
        fields = line.split()
        if len(fields) == 1:
            parsed = problems.catch(
                functools.partial(parse_address, fields[0], where=where, source=source)
            )
            if parsed is not None:
                backends.append((BackendConfig(*parsed), where))
        elif len(fields) == 2:
            host = parse_host(fields[0], bare_ipv6=True)
            port = parse_port(fields[1])
            if host is None:
                problems.add(where, _host_message(fields[0]))
            elif port is None:
                problems.add(where, f"expected a port 1..65535, got {fields[1]!r}")
            else:
                backends.append((BackendConfig(host, port), where))
        else:
            problems.add(where, f'expected "host port" or "host:port", got {line!r}')
    if not lines:
        problems.add("", 'no backends: expected at least one "host port" line')
    return _tutorial_service(backends, problems, listen, "", admin_listen)


def _server(item: object, where: str, problems: Problems) -> BackendConfig | None:
    if isinstance(item, str):
        source = problems.source
        parsed = problems.catch(lambda: parse_address(item, where=where, source=source))
        return None if parsed is None else BackendConfig(*parsed)
    what = 'an object {"host": ..., "port": ...}'
    t = Table.read(item, where, problems, SERVER_KEYS, what=what)
    if t is None:
        return None
    for key in ("host", "port"):
        if not t.has(key):
            t.fail(key, f"missing: expected the server's {key}")
    raw_host = t.data.get("host")
    host = parse_host(raw_host, bare_ipv6=True) if isinstance(raw_host, str) else None
    if host is None and t.has("host"):
        t.fail("host", _host_message(raw_host))
    port = t.data.get("port")
    if not (is_integer(port) and 1 <= port <= 65535) and t.has("port"):
        t.fail("port", f"expected an integer port 1..65535, got {show_value(port)}")
    weight = t.bounded_int("weight", 1)
    if host is None or not isinstance(port, int) or not t.clean("port", "weight"):
        return None
    return BackendConfig(host, port, weight)


def parse_servers(
    data: dict[str, Any],
    problems: Problems,
    listen: str,
    admin_listen: AdminConfig | None = None,
) -> Config:
    """The tutorial's JSON form: `{"servers": [{"host": ..., "port": ...}, ...]}`."""
    Table.read(data, "", problems, ("servers",), what="an object")
    servers = data["servers"]
    backends: list[tuple[BackendConfig, str]] = []
    if not isinstance(servers, list):
        problems.add(
            "servers", f'expected a list of {{"host", "port"}} objects, got {show_value(servers)}'
        )
    elif not servers:
        problems.add("servers", "expected at least one server, got []")
    else:
        for i, item in enumerate(servers):
            where = f"servers[{i}]"
            backend = _server(item, where, problems)
            if backend is not None:
                backends.append((backend, where))
    return _tutorial_service(backends, problems, listen, "servers", admin_listen)
