"""Reading config files: TOML, JSON (both forms) and the tutorial's config.txt.

How it works: the file is read and decoded once; its extension picks the
parser (`.toml`, `.json`, anything else is the tutorial's text format). TOML
and the object form of JSON give the same nested mapping, which `_build`
walks with `_Table` readers: each knows its dotted key path and its allowed
keys. Nothing stops at the first problem: an unknown key, a wrong type or an
out-of-range value is recorded (`config_checks.Problems`) at its exact key
path, the default takes its place and the walk goes on, so an error in one
service does not hide one in the next. A value that must be a table and is
not (`health = 3`) stops the checks under it: there is nothing to check.
Checks that need several values (`hash_key` against `mode`, the checks of
`config_checks` across services) run only on values that were valid. At the
end `keylines` finds the line of each key path and one ConfigError lists
every problem, in line order.
"""

from __future__ import annotations

import difflib
import functools
import json
import re
import tomllib
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

from balancer.config.bounds import as_number, is_integer, show_value
from balancer.config.checks import ParsedService, Problems, check_services
from balancer.config.keylines import join_key, json_lines, toml_lines
from balancer.config.model import (
    BOUNDS,
    CLIENT_FRAMINGS,
    FRAMINGS,
    HASH_KEYS,
    MODES,
    READ_ACCESS,
    SERVICE_NAME_RE,
    AdminConfig,
    BackendConfig,
    Config,
    ConfigError,
    HealthConfig,
    OutlierConfig,
    ServiceConfig,
    config_from_backends,
    host_problem,
    parse_address,
    parse_admin,
    parse_host,
    parse_port,
)
from balancer.config.policies import ALGORITHMS, Algorithm, weighted_names

_TOML_POSITION_RE = re.compile(
    r"^(?P<msg>.*?)\s*\(at (?P<where>line \d+, column \d+|end of document)\)$"
)
_LONG_INT_RE = re.compile(r"[0-9](?:_?[0-9]){4300,}")
_ALLOWED_HOST_RE = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+)(:[0-9]{1,5})?")

TOP_KEYS = ("drain_timeout", "drain_close_window", "access_log", "admin", "services")
ADMIN_KEYS = ("listen", "token", "read_token", "read_access", "allowed_hosts", "enabled")
SERVICE_KEYS = (
    "listen",
    "mode",
    "algorithm",
    "backend_framing",
    "client_framing",
    "max_line",
    "retries",
    "connect_timeout",
    "response_timeout",
    "backend_connections",
    "hash_key",
    "hash_balance_factor",
    "slow_start",
    "policy_options",
    "client_timeout",
    "idle_timeout",
    "max_connections",
    "max_backend_connections",
    "connect_buffer",
    "max_backend_requests",
    "queue_size",
    "queue_timeout",
    "retry_budget_percent",
    "retry_budget_min",
    "max_buffered",
    "backends",
    "health",
    "outlier",
)
OUTLIER_KEYS = (
    "consecutive_failures",
    "base_ejection_time",
    "max_ejection_time",
    "max_ejection_percent",
    "enabled",
)
HEALTH_KEYS = ("interval", "timeout", "rise", "fall", "jitter", "send", "expect", "enabled")
BACKEND_KEYS = ("address", "weight")
SERVER_KEYS = ("host", "port", "weight")

TABLE_KEYS: dict[str, tuple[str, ...]] = {
    "": TOP_KEYS,
    "admin": ADMIN_KEYS,
    "services.NAME": SERVICE_KEYS,
    "services.NAME.health": HEALTH_KEYS,
    "services.NAME.outlier": OUTLIER_KEYS,
    "services.NAME.backends[]": BACKEND_KEYS,
    "servers[]": SERVER_KEYS,
}
"""Every key the loader knows, by table (`NAME` any service, `[]` any list item)."""


class _Table:
    """Reads one table of the config, knowing its dotted path and allowed keys."""

    def __init__(self, data: dict[str, object], path: str, problems: Problems) -> None:
        self.data = data
        self.path = path
        self.problems = problems

    @classmethod
    def read(
        cls, data: object, path: str, problems: Problems, allowed: Iterable[str], *, what: str
    ) -> _Table | None:
        """A reader for `data`, or None (the problem recorded) when it is not a table."""
        if not isinstance(data, dict):
            problems.add(path, f"expected {what}, got {show_value(data)}")
            return None
        table = cls(data, path, problems)
        known = tuple(allowed)
        for key in data:
            if key not in known:
                problems.add(table.where(key), _unknown_key(key, known))
        return table

    def where(self, key: str) -> str:
        return join_key(self.path, key)

    def fail(self, key: str, message: str) -> None:
        self.problems.add(self.where(key), message)

    def has(self, key: str) -> bool:
        return key in self.data

    def clean(self, *keys: str) -> bool:
        return self.problems.clean(*(self.where(key) for key in keys))

    def bounded(self, key: str, default: float, bound: str | None = None) -> float:
        """A number within `BOUNDS[bound or key]`."""
        limits = BOUNDS[bound or key]
        if key not in self.data:
            return default
        value = self.data[key]
        number = as_number(value)
        if number is not None and limits.admits(number):
            return number
        self.fail(key, f"expected {limits.expected(False)}, got {show_value(value)}")
        return default

    def bounded_int(self, key: str, default: int, bound: str | None = None) -> int:
        """An integer within `BOUNDS[bound or key]`."""
        limits = BOUNDS[bound or key]
        if key not in self.data:
            return default
        value = self.data[key]
        if isinstance(value, int) and not isinstance(value, bool) and limits.admits(value):
            return value
        self.fail(key, f"expected {limits.expected(True)}, got {show_value(value)}")
        return default

    def boolean(self, key: str, default: bool) -> bool:
        if key not in self.data:
            return default
        value = self.data[key]
        if isinstance(value, bool):
            return value
        self.fail(key, f"expected true or false, got {show_value(value)}")
        return default

    def string(self, key: str) -> str | None:
        if key not in self.data:
            return None
        value = self.data[key]
        if isinstance(value, str) and value:
            return value
        self.fail(key, f"expected a non-empty string, got {show_value(value)}")
        return None

    def choice(self, key: str, default: str, choices: Iterable[str]) -> str:
        if key not in self.data:
            return default
        value = self.data[key]
        options = sorted(choices)
        if isinstance(value, str) and value in options:
            return value
        listed = ", ".join(repr(c) for c in options)
        message = f"expected one of {listed}, got {show_value(value)}"
        if isinstance(value, str):
            message += _did_you_mean(value, options)
        self.fail(key, message)
        return default


def _did_you_mean(word: str, options: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _unknown_key(key: str, allowed: tuple[str, ...]) -> str:
    hint = _did_you_mean(key, allowed)
    if hint:
        return f"unknown key {key!r}{hint}"
    return f"unknown key {key!r}; expected one of: {', '.join(allowed) or 'none'}"


# -- the TOML-shaped mapping -----------------------------------------------------------------


def _probe(table: _Table, key: str, default: str | None) -> str | None:
    if not table.has(key):
        return default
    value = table.data[key]
    if value is False:
        return None
    if isinstance(value, str) and value and "\n" not in value and "\r" not in value:
        return value
    table.fail(
        key, f"expected a non-empty one-line string, or false to disable, got {show_value(value)}"
    )
    return default


def _health(data: object, path: str, problems: Problems, mode: str) -> HealthConfig:
    defaults = HealthConfig()
    send_default = None if mode == "tcp" else defaults.send
    expect_default = None if send_default is None else defaults.expect
    t = _Table.read(data, path, problems, HEALTH_KEYS, what="a table of health check settings")
    if t is None:
        return HealthConfig(send=send_default, expect=expect_default)
    send = _probe(t, "send", send_default)
    expect = _probe(t, "expect", None if send is None else expect_default)
    if send is None and expect is not None and t.clean("send"):
        t.fail(
            "expect",
            f"expected no reply check when send = false (there is no probe to reply to), "
            f"got {expect!r}",
        )
    return HealthConfig(
        interval=t.bounded("interval", defaults.interval, "health.interval"),
        timeout=t.bounded("timeout", defaults.timeout, "health.timeout"),
        rise=t.bounded_int("rise", defaults.rise, "health.rise"),
        fall=t.bounded_int("fall", defaults.fall, "health.fall"),
        jitter=t.bounded("jitter", defaults.jitter, "health.jitter"),
        send=send,
        expect=expect,
        enabled=t.boolean("enabled", defaults.enabled),
    )


def _outlier(data: object, path: str, problems: Problems) -> OutlierConfig:
    d = OutlierConfig()
    what = "a table of outlier detection settings"
    t = _Table.read(data, path, problems, OUTLIER_KEYS, what=what)
    if t is None:
        return d
    base = t.bounded("base_ejection_time", d.base_ejection_time, "outlier.base_ejection_time")
    longest = t.bounded(
        "max_ejection_time", max(d.max_ejection_time, base), "outlier.max_ejection_time"
    )
    if longest < base and t.clean("base_ejection_time", "max_ejection_time"):
        t.fail(
            "max_ejection_time",
            f"expected a number >= base_ejection_time ({base:g}), got {longest:g}",
        )
    return OutlierConfig(
        consecutive_failures=t.bounded_int(
            "consecutive_failures", d.consecutive_failures, "outlier.consecutive_failures"
        ),
        base_ejection_time=base,
        max_ejection_time=max(longest, base),
        max_ejection_percent=t.bounded(
            "max_ejection_percent", d.max_ejection_percent, "outlier.max_ejection_percent"
        ),
        enabled=t.boolean("enabled", d.enabled),
    )


def _backend(item: object, where: str, problems: Problems) -> BackendConfig | None:
    source = problems.source
    if isinstance(item, str):
        parsed = problems.catch(lambda: parse_address(item, where=where, source=source))
        return None if parsed is None else BackendConfig(*parsed)
    what = '"host:port" or a table { address = "host:port", weight = N }'
    t = _Table.read(item, where, problems, BACKEND_KEYS, what=what)
    if t is None:
        return None
    weight = t.bounded_int("weight", 1)
    if not t.has("address"):
        t.fail("address", 'missing: expected "host:port"')
        return None
    address = t.data["address"]
    if not isinstance(address, str):
        t.fail("address", f'expected "host:port", got {show_value(address)}')
        return None
    at = t.where("address")
    parsed = problems.catch(lambda: parse_address(address, where=at, source=source))
    if parsed is None or not t.clean("weight"):
        return None
    return BackendConfig(*parsed, weight)


def _backends(value: object, where: str, problems: Problems) -> list[tuple[BackendConfig, str]]:
    if not isinstance(value, list):
        problems.add(where, f'expected a list of "host:port", got {show_value(value)}')
        return []
    if not value:
        problems.add(where, "expected at least one backend, got []")
        return []
    backends: list[tuple[BackendConfig, str]] = []
    for i, item in enumerate(value):
        at = f"{where}[{i}]"
        backend = _backend(item, at, problems)
        if backend is not None:
            backends.append((backend, at))
    _check_duplicates(backends, problems)
    return backends


def _check_duplicates(backends: list[tuple[BackendConfig, str]], problems: Problems) -> None:
    seen: dict[tuple[str, int], str] = {}
    for backend, where in backends:
        ident = (backend.host.lower(), backend.port)
        if ident in seen:
            problems.add(
                where,
                f"expected each backend once, got {backend.address!r} again "
                f"(first at {seen[ident]})",
            )
        else:
            seen[ident] = where


def _policy_options(
    value: object, where: str, problems: Problems, algorithm: str, policy: Algorithm | None
) -> dict[str, float]:
    t = _Table.read(
        value, where, problems, value if isinstance(value, dict) else (), what="a table"
    )
    if t is None:
        return {}
    options: dict[str, float] = {}
    for key, raw in t.data.items():
        number = as_number(raw)
        if policy is not None and key not in policy.options:
            known = tuple(sorted(policy.options))
            hint = _did_you_mean(key, known) or f"; it takes: {', '.join(known) or 'none'}"
            t.fail(key, f"unknown key {key!r} for algorithm {algorithm!r}{hint}")
            continue
        problem = policy.option_error(key, raw) if policy is not None else None
        if problem is None and number is None:
            problem = f"expected a number, got {show_value(raw)}"
        if problem is not None:
            t.fail(key, problem)
            continue
        assert number is not None
        options[key] = raw if is_integer(raw) else number
    return options


def _service(
    name: str, data: object, problems: Problems, default_listen: tuple[str, int]
) -> ParsedService | None:
    path = join_key("services", name)
    if not SERVICE_NAME_RE.fullmatch(name):
        problems.add(
            path, f"expected a service name of letters, digits, '.', '-' and '_', got {name!r}"
        )
    t = _Table.read(data, path, problems, SERVICE_KEYS, what="a table of service settings")
    if t is None:
        return None
    defaults = ServiceConfig(name, "", 0, ())
    source = problems.source

    listen_host, listen_port = default_listen
    listen_ok = True
    if t.has("listen"):
        value = t.data["listen"]
        at = t.where("listen")
        parsed = None
        if isinstance(value, str):
            parsed = problems.catch(
                lambda: parse_address(
                    value,
                    where=at,
                    source=source,
                    default_host=default_listen[0],
                    allow_port_zero=True,
                )
            )
        else:
            t.fail("listen", f'expected "host:port", got {show_value(value)}')
        if parsed is None:
            listen_ok = False
        else:
            listen_host, listen_port = parsed

    mode = t.choice("mode", defaults.mode, MODES)
    algorithm = t.choice("algorithm", defaults.algorithm, ALGORITHMS)
    policy = ALGORITHMS[algorithm] if t.clean("algorithm") else None
    hash_key = t.choice("hash_key", defaults.hash_key, HASH_KEYS)
    if hash_key == "message" and mode != "message" and t.clean("mode"):
        t.fail(
            "hash_key",
            f"expected 'source' in {mode} mode ('message' needs mode = \"message\"), "
            f"got {hash_key!r}",
        )
    slow_start = t.bounded("slow_start", defaults.slow_start)
    if slow_start > 0 and policy is not None and not policy.weighted:
        t.fail(
            "slow_start",
            f"expected 0 with algorithm {algorithm!r}, which ignores weights; slow start needs "
            f"{weighted_names()}, got {show_value(t.data['slow_start'])}",
        )
    policy_options: dict[str, float] = {}
    if t.has("policy_options"):
        policy_options = _policy_options(
            t.data["policy_options"], t.where("policy_options"), problems, algorithm, policy
        )

    backends: list[tuple[BackendConfig, str]] = []
    if not t.has("backends"):
        t.fail("backends", 'missing: expected a list of "host:port"')
    else:
        backends = _backends(t.data["backends"], t.where("backends"), problems)

    backend_framing = t.choice("backend_framing", defaults.backend_framing, FRAMINGS)
    # the tutorial's original programs speak raw: a service for them detects raw clients too
    raw_backends = backend_framing == "raw" and mode == "message"
    framing_default = "auto" if raw_backends else defaults.client_framing
    client_framing = t.choice("client_framing", framing_default, CLIENT_FRAMINGS)
    if t.has("client_framing") and mode != "message" and t.clean("mode"):
        t.fail(
            "client_framing",
            f"expected no client_framing in {mode} mode (it relays bytes as they come), "
            f"got {show_value(t.data['client_framing'])}",
        )

    config = ServiceConfig(
        name=name,
        listen_host=listen_host,
        listen_port=listen_port,
        backends=tuple(backend for backend, _ in backends),
        mode=mode,
        algorithm=algorithm,
        backend_framing=backend_framing,
        client_framing=client_framing,
        max_line=t.bounded_int("max_line", defaults.max_line),
        retries=t.bounded_int("retries", defaults.retries),
        connect_timeout=t.bounded("connect_timeout", defaults.connect_timeout),
        response_timeout=t.bounded("response_timeout", defaults.response_timeout),
        backend_connections=t.bounded_int("backend_connections", defaults.backend_connections),
        hash_key=hash_key,
        hash_balance_factor=t.bounded("hash_balance_factor", defaults.hash_balance_factor),
        slow_start=slow_start,
        policy_options=policy_options,
        client_timeout=t.bounded("client_timeout", defaults.client_timeout),
        idle_timeout=t.bounded("idle_timeout", defaults.idle_timeout),
        max_connections=t.bounded_int("max_connections", defaults.max_connections),
        max_backend_connections=t.bounded_int(
            "max_backend_connections", defaults.max_backend_connections
        ),
        connect_buffer=t.bounded_int("connect_buffer", defaults.connect_buffer),
        max_backend_requests=t.bounded_int("max_backend_requests", defaults.max_backend_requests),
        queue_size=t.bounded_int("queue_size", defaults.queue_size),
        queue_timeout=t.bounded("queue_timeout", defaults.queue_timeout),
        retry_budget_percent=t.bounded("retry_budget_percent", defaults.retry_budget_percent),
        retry_budget_min=t.bounded_int("retry_budget_min", defaults.retry_budget_min),
        max_buffered=t.bounded_int("max_buffered", defaults.max_buffered),
        outlier=_outlier(t.data.get("outlier", {}), t.where("outlier"), problems),
        health=_health(t.data.get("health", {}), t.where("health"), problems, mode),
    )
    if config.max_buffered < config.max_line and t.clean("max_line", "max_buffered"):
        # a line of max_line bytes must fit in what the service may hold (the default
        # max_buffered is above the largest max_line: only a set max_buffered gets here)
        t.fail(
            "max_buffered",
            f"expected at least max_line ({config.max_line} bytes), got {config.max_buffered}",
        )
    return ParsedService(
        config,
        path=path,
        listen_where=t.where("listen"),
        listen_ok=listen_ok,
        backends_where=t.where("backends"),
        backends=backends,
        backends_ok=t.has("backends") and t.clean("backends"),
    )


def _admin(data: object, problems: Problems) -> AdminConfig | None:
    """The admin settings; None when they were not valid (nothing is checked against them)."""
    t = _Table.read(data, "admin", problems, ADMIN_KEYS, what="a table of admin settings")
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


def _build(
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
    top = _Table.read(data, "", problems, TOP_KEYS, what="a table")
    assert top is not None  # `data` is a dict
    drain_timeout = top.bounded("drain_timeout", 10.0)
    drain_close_window = top.bounded("drain_close_window", 1.0)
    access_log = top.boolean("access_log", False)
    admin = _admin(data["admin"], problems) if "admin" in data else AdminConfig()
    if admin is not None and admin_listen is not None:
        admin = _listen_on(admin, admin_listen)

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
            parsed = _service(name, svc_data, problems, listen)
            if parsed is not None:
                services.append(parsed)
    check_services(services, admin, problems)
    return Config(
        services=tuple(svc.config for svc in services),
        admin=admin or AdminConfig(),
        drain_timeout=drain_timeout,
        drain_close_window=drain_close_window,
        access_log=access_log,
        source=source,
    )


# -- the tutorial's formats ------------------------------------------------------------------


def _listen_on(admin: AdminConfig, listen: AdminConfig) -> AdminConfig:
    """`admin` with the listen address and `enabled` of `listen` (the command line's)."""
    return replace(admin, host=listen.host, port=listen.port, enabled=listen.enabled)


def _tutorial_service(
    backends: list[tuple[BackendConfig, str]],
    problems: Problems,
    listen: str,
    where: str,
    admin_listen: AdminConfig | None,
) -> Config:
    _check_duplicates(backends, problems)
    config = config_from_backends(
        [backend for backend, _ in backends], listen=listen, source=problems.source
    )
    if admin_listen is not None:
        config = replace(config, admin=_listen_on(config.admin, admin_listen))
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


def _parse_text(
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
    t = _Table.read(item, where, problems, SERVER_KEYS, what=what)
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


def _parse_servers(
    data: dict[str, Any],
    problems: Problems,
    listen: str,
    admin_listen: AdminConfig | None = None,
) -> Config:
    """The tutorial's JSON form: `{"servers": [{"host": ..., "port": ...}, ...]}`."""
    _Table.read(data, "", problems, ("servers",), what="an object")
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


# -- files -----------------------------------------------------------------------------------


def _read(path: str) -> str:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(path, "", f"cannot read: {exc.strerror or exc}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError(
            path,
            f"line {line}",
            f"cannot read: expected UTF-8 text, got byte {data[exc.start]:#04x}",
        ) from None


def _long_int_error(text: str, source: str, kind: str) -> ConfigError:
    """The error for an integer too long for Python to read (over 4300 digits)."""
    m = _LONG_INT_RE.search(text)
    where = f"line {text.count(chr(10), 0, m.start()) + 1}" if m else ""
    return ConfigError(
        source, where, f"invalid {kind}: expected a number of at most 4300 digits, got a longer one"
    )


def _parse_toml(text: str, source: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        match = _TOML_POSITION_RE.match(str(exc))
        where, message = (match["where"], match["msg"]) if match else ("", str(exc))
        raise ConfigError(source, where, f"invalid TOML: {message}") from None
    except ValueError:
        raise _long_int_error(text, source, "TOML") from None
    except RecursionError:
        raise ConfigError(source, "", "invalid TOML: arrays or tables nested too deeply") from None


def _parse_json(text: str, source: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            source, f"line {exc.lineno}, column {exc.colno}", f"invalid JSON: {exc.msg}"
        ) from None
    except ValueError:
        raise _long_int_error(text, source, "JSON") from None
    except RecursionError:
        raise ConfigError(source, "", "invalid JSON: arrays or objects nested too deeply") from None


def load(source: str, default_listen: str, admin_listen: AdminConfig | None = None) -> Config:
    """`load_config`: read, parse and check `source`; one ConfigError lists every problem."""
    parse_address(
        default_listen,
        where="listen",
        source="<command line>",
        default_host="localhost",
        allow_port_zero=True,
    )
    text = _read(source)
    problems = Problems(source)
    suffix = Path(source).suffix.lower()
    if suffix == ".toml":
        config = _build(_parse_toml(text, source), problems, default_listen, admin_listen)
        problems.raise_if_any(lambda: toml_lines(text))
    elif suffix == ".json":
        doc = _parse_json(text, source)
        if not isinstance(doc, dict):
            raise ConfigError(
                source,
                "",
                f'expected a JSON object with "services" or "servers", got {show_value(doc)}',
            )
        if "servers" in doc and "services" not in doc:
            config = _parse_servers(doc, problems, default_listen, admin_listen)
        else:
            config = _build(doc, problems, default_listen, admin_listen)
        problems.raise_if_any(lambda: json_lines(text))
    else:
        config = _parse_text(text, problems, default_listen, admin_listen)
        problems.raise_if_any()
    return config
