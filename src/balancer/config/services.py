"""The `[services.NAME]` tables: settings, backends, `outlier`, `http`, `policy_options`
(`health` is `config.health`'s).

Checks that need several values (`hash_key` against `mode`, `slow_start`
against the algorithm) run only on values that were valid, so one mistake is
reported once.
"""

from __future__ import annotations

from typing import Any

from balancer.config.addresses import parse_address, parse_networks
from balancer.config.bounds import as_number, is_integer, show_value
from balancer.config.checks import ParsedService, Problems
from balancer.config.discovery import DISCOVER_EXPECTED, parse_discover
from balancer.config.health import read_health
from balancer.config.http import read_http, read_routes
from balancer.config.keylines import join_key
from balancer.config.model import (
    CLIENT_FRAMINGS,
    FRAMINGS,
    HASH_KEY_RE,
    HASH_KEYS,
    MODES,
    PROXY_VERSIONS,
    SERVICE_NAME_RE,
    TCP_ENGINES,
    BackendConfig,
    OutlierConfig,
    ServiceConfig,
)
from balancer.config.policies import ALGORITHMS, Algorithm, weighted_names
from balancer.config.schema import (
    BACKEND_KEYS,
    OUTLIER_KEYS,
    SERVICE_KEYS,
)
from balancer.config.table import Table, did_you_mean
from balancer.config.tls import read_backend_tls, read_sni_routes, read_tls


def _outlier(data: object, path: str, problems: Problems) -> OutlierConfig:
    d = OutlierConfig()
    what = "a table of outlier detection settings"
    t = Table.read(data, path, problems, OUTLIER_KEYS, what=what)
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


def _hash_key(t: Table, mode: str) -> str:
    value = t.data.get("hash_key", ServiceConfig.hash_key)
    if isinstance(value, str) and HASH_KEY_RE.fullmatch(value):
        if mode == "http" or not t.clean("mode"):
            return value
        t.fail("hash_key", f'expected "source" in {mode} mode ({value!r} needs mode = "http")')
        return ServiceConfig.hash_key
    if not (isinstance(value, str) and value in HASH_KEYS):
        listed = ", ".join(repr(k) for k in HASH_KEYS)
        message = f"expected one of {listed}, 'header:NAME', 'cookie:NAME', got {show_value(value)}"
        if isinstance(value, str):
            message += did_you_mean(value, HASH_KEYS)
        t.fail("hash_key", message)
        return ServiceConfig.hash_key
    hash_key = value
    if t.clean("mode") and (
        (hash_key == "message" and mode != "message") or (hash_key == "path" and mode != "http")
    ):
        needs = "message" if hash_key == "message" else "http"
        t.fail(
            "hash_key",
            f"expected 'source' in {mode} mode ({hash_key!r} needs mode = \"{needs}\"), "
            f"got {hash_key!r}",
        )
    return hash_key


def _backend(item: object, where: str, problems: Problems) -> BackendConfig | None:
    source = problems.source
    if isinstance(item, str):
        parsed = problems.catch(lambda: parse_address(item, where=where, source=source))
        return None if parsed is None else BackendConfig(*parsed)
    what = '"host:port" or a table { address = "host:port", weight = N }'
    t = Table.read(item, where, problems, BACKEND_KEYS, what=what)
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
    check_duplicates(backends, problems)
    return backends


def check_duplicates(backends: list[tuple[BackendConfig, str]], problems: Problems) -> None:
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
    t = Table.read(value, where, problems, value if isinstance(value, dict) else (), what="a table")
    if t is None:
        return {}
    options: dict[str, float] = {}
    for key, raw in t.data.items():
        number = as_number(raw)
        if policy is not None and key not in policy.options:
            known = tuple(sorted(policy.options))
            hint = did_you_mean(key, known) or f"; it takes: {', '.join(known) or 'none'}"
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


def _proxy_from(t: Table) -> tuple[str, ...]:
    value = t.data.get("accept_proxy_from", [])
    try:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError
        parse_networks(value)
    except ValueError:
        expected = 'expected a list of addresses or CIDRs like "10.0.0.0/8"'
        t.fail("accept_proxy_from", f"{expected}, got {show_value(value)}")
        return ()
    return tuple(value)


def _front(t: Table, mode: str) -> dict[str, Any]:
    """The settings of what reads a connection before its mode does: PROXY header, TLS."""
    d = ServiceConfig("", "", 0, ())
    accept_proxy = t.boolean("accept_proxy", d.accept_proxy)
    proxy_from = _proxy_from(t)
    if proxy_from and not accept_proxy and t.clean("accept_proxy"):
        t.fail("accept_proxy_from", "expected no accept_proxy_from without accept_proxy = true")
    send_proxy = t.choice("send_proxy", d.send_proxy, PROXY_VERSIONS)
    if send_proxy and mode == "message" and t.clean("mode"):
        t.fail("send_proxy", "expected no send_proxy in message mode: its backend connections "
               "carry many clients' requests, a PROXY header names one client")  # fmt: skip
    tls = read_tls(t.data["tls"], t.where("tls"), t.problems) if t.has("tls") else None
    backend_tls = None
    if t.has("backend_tls"):
        backend_tls = read_backend_tls(t.data["backend_tls"], t.where("backend_tls"), t.problems)
    sni_routes = read_sni_routes(t.data.get("sni_routes", []), t.where("sni_routes"), t.problems)
    if t.has("sni_routes") and t.clean("mode"):
        if mode != "tcp":
            t.fail("sni_routes", f"expected no sni_routes in {mode} mode (they need mode = "
                   '"tcp": TLS relayed untouched)')  # fmt: skip
        elif t.has("tls"):
            t.fail("sni_routes", "expected either tls (terminated here, the certificate chosen "
                   "by SNI) or sni_routes (TLS relayed untouched), not both")  # fmt: skip
    return {
        "accept_proxy": accept_proxy,
        "accept_proxy_from": proxy_from,
        "proxy_timeout": t.bounded("proxy_timeout", d.proxy_timeout),
        "send_proxy": send_proxy,
        "client_hello_timeout": t.bounded("client_hello_timeout", d.client_hello_timeout),
        "tls": tls,
        "backend_tls": backend_tls,
        "sni_routes": sni_routes,
    }


def _discover(t: Table) -> str:
    """The service's `discover` target, checked ("" without one)."""
    if not t.has("discover"):
        return ""
    value = t.data["discover"]
    if isinstance(value, str) and parse_discover(value) is not None:
        return value
    t.fail("discover", f"expected {DISCOVER_EXPECTED}, got {show_value(value)}")
    return ""


def read_service(
    name: str, data: object, problems: Problems, default_listen: tuple[str, int]
) -> ParsedService | None:
    path = join_key("services", name)
    if not SERVICE_NAME_RE.fullmatch(name):
        problems.add(
            path, f"expected a service name of letters, digits, '.', '-' and '_', got {name!r}"
        )
    t = Table.read(data, path, problems, SERVICE_KEYS, what="a table of service settings")
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
    hash_key = _hash_key(t, mode)
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

    routes = read_routes(t.data.get("routes", []), t.where("routes"), problems, mode)
    front = _front(t, mode)
    routed = routes or front["sni_routes"]
    discover = _discover(t)
    backends: list[tuple[BackendConfig, str]] = []
    if not t.has("backends"):
        if not routed and not t.has("discover"):
            t.fail("backends", 'missing: expected a list of "host:port"')
    elif (routed or t.has("discover")) and t.data["backends"] == []:
        pass  # a route takes the requests (or 404), or discovery fills the pool
    else:
        backends = _backends(t.data["backends"], t.where("backends"), problems)

    backend_framing = t.choice("backend_framing", defaults.backend_framing, FRAMINGS)
    # the tutorial's original programs speak raw: a service for them detects raw clients too
    raw_backends = backend_framing == "raw" and mode == "message"
    framing_default = "auto" if raw_backends else defaults.client_framing
    client_framing = t.choice("client_framing", framing_default, CLIENT_FRAMINGS)
    if t.has("client_framing") and mode != "message" and t.clean("mode"):
        why = "HTTP frames its own messages" if mode == "http" else "it relays bytes as they come"
        t.fail(
            "client_framing",
            f"expected no client_framing in {mode} mode ({why}), "
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
        engine=t.choice("engine", defaults.engine, TCP_ENGINES),
        max_backend_requests=t.bounded_int("max_backend_requests", defaults.max_backend_requests),
        queue_size=t.bounded_int("queue_size", defaults.queue_size),
        queue_timeout=t.bounded("queue_timeout", defaults.queue_timeout),
        retry_budget_percent=t.bounded("retry_budget_percent", defaults.retry_budget_percent),
        retry_budget_min=t.bounded_int("retry_budget_min", defaults.retry_budget_min),
        max_buffered=t.bounded_int("max_buffered", defaults.max_buffered),
        outlier=_outlier(t.data.get("outlier", {}), t.where("outlier"), problems),
        http=read_http(t.data.get("http", {}), t.where("http"), problems, mode),
        routes=routes,
        health=read_health(t.data.get("health", {}), t.where("health"), problems, mode),
        discover=discover,
        **front,
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
