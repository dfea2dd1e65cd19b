"""HTTP health checks: the config keys, the check without I/O, and the probe and the
checker against aiohttp backends on 127.0.0.1."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web

from balancer.config.errors import ConfigError
from balancer.config.load import load_config
from balancer.config.model import AdminConfig, BackendConfig, Config, HealthConfig, ServiceConfig
from balancer.core.http.check import BODY_WINDOW, HttpCheck
from balancer.core.pool import BackendPool
from balancer.core.states import DOWN, DRAIN, READY, UP
from balancer.runtime.health import HealthChecker
from balancer.runtime.probe import probe
from balancer.runtime.server import Server
from tests.support import config_error, write_config

SERVICE = '[services.s]\nlisten = "127.0.0.1:8080"\nbackends = ["127.0.0.1:9000"]\n'


def health_of(tmp_path: Path, table: str, mode: str = "message") -> HealthConfig:
    text = SERVICE + f'mode = "{mode}"\n[services.s.health]\n{table}'
    return load_config(write_config(tmp_path, "c.toml", text)).service("s").health


def errors_of(tmp_path: Path, table: str, mode: str = "message") -> list[str]:
    text = SERVICE + f'mode = "{mode}"\n[services.s.health]\n{table}'
    err = config_error(write_config(tmp_path, "c.toml", text))
    return [e.describe() for e in err.errors]


# -- the config -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "table", "kind", "send"),
    [
        ("message", "", "line", "!HEALTH_CHECK"),
        ("message", "send = false\n", "connect", None),
        ("tcp", "", "connect", None),
        ("tcp", 'send = "PING"\n', "line", "PING"),
        ("http", "", "connect", None),
    ],
)
def test_without_type_a_health_table_means_what_it_always_did(
    tmp_path: Path, mode: str, table: str, kind: str, send: str | None
) -> None:
    health = health_of(tmp_path, table, mode)
    assert (health.type, health.send) == (kind, send)


def test_an_http_check_takes_its_settings_and_drops_the_probe_line(tmp_path: Path) -> None:
    table = (
        'type = "http"\nmethod = "OPTIONS"\npath = "/ready?deep=1"\nhost = "api.example"\n'
        'expect_status = ["200-204", 302]\nexpect_body = "UP"\ndisable_on_404 = true\n'
    )
    health = health_of(tmp_path, table)
    assert health == HealthConfig(
        type="http",
        method="OPTIONS",
        path="/ready?deep=1",
        host="api.example",
        expect_status=((200, 204), (302, 302)),
        expect_body="UP",
        disable_on_404=True,
    )
    assert (health.send, health.expect) == (None, None)
    assert health.passes(204)
    assert health.passes(302)
    assert not health.passes(301)


@pytest.mark.parametrize(
    ("value", "ranges"),
    [
        ('"200-399"', ((200, 399),)),
        ('"204"', ((204, 204),)),
        ("200", ((200, 200),)),
        ("[200, 204]", ((200, 200), (204, 204))),
        ('["300-304", 200, 200]', ((200, 200), (300, 304))),
        ('"100-599"', ((100, 599),)),
    ],
)
def test_expect_status_is_a_range_or_a_list(
    tmp_path: Path, value: str, ranges: tuple[tuple[int, int], ...]
) -> None:
    health = health_of(tmp_path, f'type = "http"\nexpect_status = {value}\n')
    assert health.expect_status == ranges


@pytest.mark.parametrize(
    ("table", "key", "fragment"),
    [
        ('type = "ping"\n', "type", "expected one of 'connect', 'http', 'line', got 'ping'"),
        ('type = "http"\nexpect_status = "99-200"\n', "expect_status", "from 100 to 599"),
        ('type = "http"\nexpect_status = "399-200"\n', "expect_status", "got '399-200'"),
        ('type = "http"\nexpect_status = 600\n', "expect_status", "got 600"),
        ('type = "http"\nexpect_status = []\n', "expect_status", "got []"),
        ('type = "http"\nexpect_status = true\n', "expect_status", "got True"),
        ('type = "http"\npath = "health"\n', "path", 'a path starting with "/"'),
        ('type = "http"\npath = "/a b"\n', "path", "got '/a b'"),
        ('type = "http"\nmethod = "G T"\n', "method", 'expected a method like "GET"'),
        ('type = "http"\nhost = "a b"\n', "host", "expected a host name or host:port"),
        ('type = "http"\nexpect_body = 3\n', "expect_body", "expected a string"),
        ('type = "http"\ndisable_on_404 = 1\n', "disable_on_404", "expected true or false"),
        (
            'type = "http"\nmethod = "HEAD"\nexpect_body = "ok"\n',
            "expect_body",
            "a response to HEAD has no body",
        ),
        ('type = "http"\nsend = "PING"\n', "send", 'no send in an http check (it is a setting of'),
        ('type = "connect"\nexpect = "x"\n', "expect", "expected no expect in a connect check"),
        ('path = "/"\n', "path", 'no path in a line check (it is a setting of type = "http")'),
        ('type = "line"\nexpect_status = 200\n', "expect_status", "in a line check"),
        ('type = "connect"\ndisable_on_404 = true\n', "disable_on_404", "in a connect check"),
    ],
)  # fmt: skip
def test_a_bad_health_setting_names_its_key(
    tmp_path: Path, table: str, key: str, fragment: str
) -> None:
    (error,) = errors_of(tmp_path, table)
    line = 6 + [row.split(" ")[0] for row in table.splitlines()].index(key)
    assert f"c.toml: line {line}: services.s.health.{key}: " in error
    assert fragment in error


def test_a_line_check_needs_a_probe_line(tmp_path: Path) -> None:
    (error,) = errors_of(tmp_path, 'type = "line"\n', mode="tcp")
    assert 'services.s.health.send: missing: expected a probe line to send with type = "line"' in (
        error
    )
    (error,) = errors_of(tmp_path, 'type = "line"\nsend = false\n')
    assert "services.s.health.send: expected a probe line" in error
    assert "got False" in error


def test_send_false_is_no_mistake_in_a_connect_check(tmp_path: Path) -> None:
    health = health_of(tmp_path, 'type = "connect"\nsend = false\nexpect = false\n')
    assert (health.type, health.send, health.expect) == ("connect", None, None)


def test_an_http_check_cannot_detect_framing(tmp_path: Path) -> None:
    text = SERVICE + 'backend_framing = "auto"\n[services.s.health]\ntype = "http"\n'
    with pytest.raises(ConfigError, match=r'auto needs a check.*health\.type = "http"'):
        load_config(write_config(tmp_path, "c.toml", text))


# -- the check, without I/O -------------------------------------------------------------


def test_the_request_names_method_path_host_and_closes() -> None:
    check = HttpCheck(HealthConfig(type="http", path="/h?x=1"), "::1", 8080)
    assert check.request == (
        b"GET /h?x=1 HTTP/1.1\r\nHost: [::1]:8080\r\nUser-Agent: balancer-health\r\n"
        b"Connection: close\r\n\r\n"
    )
    check = HttpCheck(HealthConfig(type="http", method="HEAD", host="a.example"), "h", 1)
    assert check.request.startswith(b"HEAD / HTTP/1.1\r\nHost: a.example\r\n")


def test_a_check_is_done_at_the_head_unless_the_body_is_to_be_looked_at() -> None:
    head = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n"
    check = HttpCheck(HealthConfig(type="http"), "h", 1)
    check.feed(head)
    assert check.done
    assert check.verdict().ok
    assert check.verdict().reason == "status 200"
    check = HttpCheck(HealthConfig(type="http", expect_body="ready"), "h", 1)
    check.feed(head + b"wait")
    assert not check.done
    check.feed(b"ing...")
    assert check.done
    assert not check.verdict().ok
    assert check.verdict().reason == "status 200, but the body does not contain 'ready'"
    check = HttpCheck(HealthConfig(type="http", expect_body="ready"), "h", 1)
    check.feed(head + b"all ready!")
    assert check.done
    assert check.verdict().ok


def test_the_body_is_looked_at_up_to_its_window_only() -> None:
    check = HttpCheck(HealthConfig(type="http", expect_body="late"), "h", 1)
    check.feed(b"HTTP/1.1 200 OK\r\n\r\n" + b"x" * BODY_WINDOW)
    assert check.done
    check.feed(b"late")
    assert not check.verdict().ok


@pytest.mark.parametrize(
    ("response", "reason"),
    [
        (b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\n\r\n", "status 503 (expected 200-399)"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", "invalid HTTP"),
        (b"SSH-2.0-OpenSSH\r\n", "invalid HTTP response"),
        (b"", "connection closed before a response"),
        (b"HTTP/1.1 200 OK\r\nContent-Le", "invalid HTTP response: upstream closed"),
    ],
)
def test_what_a_failed_response_says(response: bytes, reason: str) -> None:
    check = HttpCheck(HealthConfig(type="http"), "h", 1)
    check.feed(response)
    check.feed_eof()
    assert check.done
    assert not check.verdict().ok
    assert reason in check.verdict().reason


def test_a_404_drains_with_disable_on_404_even_if_expected() -> None:
    response = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"
    health = HealthConfig(type="http", expect_status=((200, 499),), disable_on_404=True)
    check = HttpCheck(health, "h", 1)
    check.feed(response)
    assert check.verdict().drain
    assert not check.verdict().ok
    check = HttpCheck(HealthConfig(type="http"), "h", 1)
    check.feed(response)
    assert not check.verdict().drain
    assert not check.verdict().ok


# -- real sockets -----------------------------------------------------------------------


@dataclass
class Backend:
    """An aiohttp backend on 127.0.0.1 whose answer a test sets; it records the requests."""

    port: int = 0
    status: int = 200
    body: str = "ok"
    requests: list[web.Request] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        self.requests.append(request)
        return web.Response(status=self.status, text=self.body)


@pytest.fixture
async def backend() -> AsyncIterator[Backend]:
    state = Backend()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", state.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()  # listening once this returns
    state.port = runner.addresses[0][1]
    yield state
    await runner.cleanup()


def pool_of(backend: Backend, **health: object) -> BackendPool:
    settings: dict[str, object] = {"interval": 0.02, "timeout": 1.0, "jitter": 0.0}
    settings.update(health)
    config = ServiceConfig(
        name="web",
        listen_host="127.0.0.1",
        listen_port=0,
        backends=(BackendConfig("127.0.0.1", backend.port),),
        mode="http",
        health=HealthConfig(type="http", **settings),  # type: ignore[arg-type]
    )
    return BackendPool(config)


async def until(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Wait until `predicate` holds, at most `timeout` seconds (a bounded loop)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


async def test_the_probe_sends_the_configured_path_and_host(backend: Backend) -> None:
    health = HealthConfig(type="http", method="POST", path="/ready?deep=1", host="api.example")
    result = await probe("127.0.0.1", backend.port, health)
    assert (result.ok, result.reason) == (True, "status 200")
    (request,) = backend.requests
    assert (request.method, request.path_qs) == ("POST", "/ready?deep=1")
    assert request.headers["Host"] == "api.example"
    assert request.headers["User-Agent"] == "balancer-health"
    assert request.headers["Connection"].lower() == "close"
    await probe("127.0.0.1", backend.port, HealthConfig(type="http", method="HEAD"))
    assert backend.requests[1].method == "HEAD"
    assert backend.requests[1].headers["Host"] == f"127.0.0.1:{backend.port}"


async def test_the_probe_checks_the_body(backend: Backend) -> None:
    backend.body = "status: degraded"
    result = await probe("127.0.0.1", backend.port, HealthConfig(type="http", expect_body="OK"))
    assert not result.ok
    assert result.reason == "status 200, but the body does not contain 'OK'"
    backend.body = "status: OK"
    result = await probe("127.0.0.1", backend.port, HealthConfig(type="http", expect_body="OK"))
    assert result.ok


async def test_the_probe_says_when_the_response_does_not_come_whole() -> None:
    finished: list[bool] = []

    async def head_only(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            await r.readuntil(b"\r\n\r\n")
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
            await w.drain()
            await r.read()  # until the probe closes
        finally:
            w.close()
            finished.append(True)

    server = await asyncio.start_server(head_only, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        health = HealthConfig(type="http", timeout=0.2, expect_body="done")
        result = await probe("127.0.0.1", port, health)
        assert (result.ok, result.reason) == (False, "no complete response within 0.2s")
        result = await probe("127.0.0.1", port, HealthConfig(type="http", timeout=0.2))
        assert result.ok, "without expect_body the head is enough"
        await until(lambda: len(finished) == 2, "both connections to end")
    finally:
        server.close()
        await server.wait_closed()


async def test_a_failing_backend_goes_down_after_fall_and_back_after_rise(
    backend: Backend,
) -> None:
    pool = pool_of(backend, rise=2, fall=3)
    (target,) = pool.backends
    checker = HealthChecker(pool)
    await checker.initial_round()
    assert target.state == UP
    changes: list[str] = []
    pool.on_transition.append(lambda b, new, reason: changes.append(new))
    checker.start()
    try:
        backend.status = 500
        seen = len(backend.requests)
        await until(lambda: target.state == DOWN, "the backend to go down")
        assert len(backend.requests) - seen >= 3, "down only after fall = 3 failed checks"
        assert "3 failed check(s): status 500 (expected 200-399)" in target.last_reason
        backend.status = 200
        seen = len(backend.requests)
        await until(lambda: target.state == UP, "the backend to come back")
        assert len(backend.requests) - seen >= 2, "up only after rise = 2 good checks"
        assert target.last_reason == "2 good check(s): status 200"
        assert changes == [DOWN, UP]
    finally:
        await checker.stop()


async def test_a_404_with_disable_on_404_drains_until_the_check_passes(backend: Backend) -> None:
    pool = pool_of(backend, rise=1, fall=1, disable_on_404=True)
    (target,) = pool.backends
    checker = HealthChecker(pool)
    backend.status = 404
    await checker.initial_round()
    assert (target.state, target.admin_state) == (UP, DRAIN), "alive, but no new work"
    assert pool.pick() is None
    assert target.last_reason == "drained: status 404 (disable_on_404)"
    checker.start()
    try:
        seen = len(backend.requests)
        await until(lambda: len(backend.requests) >= seen + 3, "more checks")
        assert (target.state, target.admin_state) == (UP, DRAIN)
        backend.status = 200
        await until(lambda: target.admin_state == READY, "the backend to take work again")
        assert target.state == UP
        assert pool.pick() is target
    finally:
        await checker.stop()


async def test_a_check_never_undoes_an_operators_drain(backend: Backend) -> None:
    pool = pool_of(backend, rise=1, fall=1, disable_on_404=True)
    (target,) = pool.backends
    checker = HealthChecker(pool)
    target.admin_state = DRAIN  # the operator's
    backend.status = 404
    await checker.initial_round()
    assert target not in checker.drains
    backend.status = 200
    await checker.initial_round()
    assert target.admin_state == DRAIN, "a drain the check did not make stays"
    target.admin_state = READY
    backend.status = 404
    await checker.initial_round()
    assert target.admin_state == DRAIN
    assert target in checker.drains
    assert checker.drains.release(target), "the API takes it over (its own drain now)"
    backend.status = 200
    await checker.initial_round()
    assert target.admin_state == DRAIN


async def test_without_disable_on_404_a_404_is_a_failed_check(backend: Backend) -> None:
    pool = pool_of(backend, rise=1, fall=1)
    (target,) = pool.backends
    backend.status = 404
    await HealthChecker(pool).initial_round()
    assert (target.state, target.admin_state) == (DOWN, READY)
    assert target.last_reason == "initial check failed: status 404 (expected 200-399)"


async def test_a_down_backend_answering_404_stays_down(backend: Backend) -> None:
    pool = pool_of(backend, rise=1, fall=1, disable_on_404=True)
    (target,) = pool.backends
    backend.status = 500
    checker = HealthChecker(pool)
    await checker.initial_round()
    assert target.state == DOWN
    backend.status = 404
    checker.start()
    try:
        seen = len(backend.requests)
        await until(lambda: len(backend.requests) >= seen + 3, "checks")
        assert (target.state, target.admin_state) == (DOWN, READY)
        assert target.last_reason == "check failed: status 404 (disable_on_404)"
    finally:
        await checker.stop()


async def test_the_api_takes_over_a_drain_the_check_made(backend: Backend) -> None:
    service = ServiceConfig(
        name="db",
        listen_host="127.0.0.1",
        listen_port=0,
        backends=(BackendConfig("127.0.0.1", backend.port),),
        mode="tcp",
        health=HealthConfig(
            type="http", interval=0.02, jitter=0.0, rise=1, fall=1, disable_on_404=True
        ),
    )
    backend.status = 404
    server = Server(Config(services=(service,), admin=AdminConfig(enabled=False)))
    await server.start()
    try:
        (target,) = server.services["db"].pool.backends
        assert (target.state, target.admin_state) == (UP, DRAIN)
        server.set_backend("db", target.address, state="drain")  # the operator's drain now
        backend.status = 200
        seen = len(backend.requests)
        await until(lambda: len(backend.requests) >= seen + 3, "checks that pass")
        assert target.admin_state == DRAIN
        server.set_backend("db", target.address, state="up")
        backend.status = 404
        await until(lambda: target.admin_state == DRAIN, "a 404 to drain it again")
    finally:
        await server.shutdown()


async def test_a_reload_without_disable_on_404_gives_the_drained_back(backend: Backend) -> None:
    pool = pool_of(backend, rise=1, fall=1, disable_on_404=True)
    (target,) = pool.backends
    checker = HealthChecker(pool)
    backend.status = 404
    await checker.initial_round()
    assert target.admin_state == DRAIN
    pool.service = dataclasses.replace(pool.service, health=HealthConfig(type="http"))
    checker.reconfigure()
    try:
        assert target.admin_state == READY
        assert target not in checker.drains
    finally:
        await checker.stop()
