"""Http mode routes: matching rules (no I/O), requests through a front service to the
services its routes name, and the config errors routes can have."""

from __future__ import annotations

from pathlib import Path

import pytest

from balancer.config.errors import ConfigError
from balancer.config.load import load_config
from balancer.config.model import RouteConfig
from balancer.core.http.routing import RouteTable, host_name, normalize_target, origin_form
from balancer.core.http.wire import Head, HttpError, RequestReader
from tests.http_support import RawClient, echo_backend, get, http_service

pytestmark = pytest.mark.usefixtures("http_clients")


def head_of(raw: bytes) -> Head:
    events = RequestReader().feed(raw)
    head = events[0]
    assert isinstance(head, Head)
    return head


TABLE = RouteTable(
    [
        RouteConfig("api", hosts=("api.test", "*.api.test"), path_prefix="/v1"),
        RouteConfig("admin", path_prefix="/admin", methods=("POST",)),
        RouteConfig("canary", headers=(("X-Canary", "1"),)),
        RouteConfig("www", hosts=("www.test",)),
    ]
)


@pytest.mark.parametrize(
    ("request_bytes", "service"),
    [
        (b"GET /v1/users HTTP/1.1\r\nHost: api.test\r\n\r\n", "api"),
        (b"GET /v1 HTTP/1.1\r\nHost: API.test:8080\r\n\r\n", "api"),
        (b"GET /v1?q=1 HTTP/1.1\r\nHost: eu.api.test\r\n\r\n", "api"),
        (b"GET /v1x HTTP/1.1\r\nHost: api.test\r\n\r\n", None),
        (b"GET /v2 HTTP/1.1\r\nHost: api.test\r\n\r\n", None),
        (b"GET /v1 HTTP/1.1\r\nHost: notapi.test\r\n\r\n", None),
        (b"POST /admin/x HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n", "admin"),
        (b"GET /admin/x HTTP/1.1\r\nHost: a\r\n\r\n", None),
        (b"GET / HTTP/1.1\r\nHost: a\r\nx-canary: 1\r\n\r\n", "canary"),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX-Canary: 2\r\n\r\n", None),
        (b"GET / HTTP/1.1\r\nHost: www.test\r\n\r\n", "www"),
        (b"GET /v1 HTTP/1.1\r\nHost: www.test\r\nX-Canary: 1\r\n\r\n", "canary"),
    ],
)
def test_the_first_route_whose_conditions_all_hold_wins(
    request_bytes: bytes, service: str | None
) -> None:
    assert TABLE.match(head_of(request_bytes)) == service


def test_host_names_lose_their_port_and_case() -> None:
    assert host_name(b"Example.COM:8080") == b"example.com"
    assert host_name(b"[::1]:80") == b"[::1]"
    assert host_name(None) == b""


async def test_requests_go_to_the_service_of_their_route_and_others_get_the_default() -> None:
    async with echo_backend("api") as api, echo_backend("www") as www:
        async with (
            http_service([api.address], service={"name": "api"}, strip_prefix="/v1") as (a, _),
            http_service(
                [www.address],
                service={"routes": (RouteConfig("api", hosts=("api.test",), path_prefix="/v1"),)},
            ) as (front, port),
        ):
            client = await RawClient.open(port)
            seen = []
            for host, path in [("api.test", "/v1/x"), ("api.test", "/v2"), ("other", "/v1/x")]:
                client.send(get(path, host=host))
                response = await client.response()
                assert response is not None
                seen.append((response.json()["backend"], response.json()["path"]))
    assert seen == [("api", "/x"), ("www", "/v2"), ("www", "/v1/x")]  # the route's rules apply
    assert a.requests == 1
    assert front.requests == 3


async def test_without_default_backends_an_unrouted_request_is_a_404() -> None:
    async with echo_backend("api") as api:
        async with (
            http_service([api.address], service={"name": "api"}),
            http_service([], service={"routes": (RouteConfig("api", path_prefix="/v1"),)}) as (
                front,
                port,
            ),
        ):
            client = await RawClient.open(port)
            client.send(get("/v1/a") + get("/nowhere"))
            routed = await client.response()
            missing = await client.response()
            assert routed is not None
            assert routed.status == 200
            assert missing is not None
            assert missing.status == 404
            assert front.generated == {404: 1}


def test_routes_are_checked_against_the_other_services(tmp_path: Path) -> None:
    path = tmp_path / "routes.toml"
    path.write_text(
        '[services.web]\nlisten = "127.0.0.1:0"\nmode = "http"\nbackends = []\n'
        "routes = [\n"
        '  { service = "api", hosts = ["api.test", "*.api.test"], methods = ["get"] },\n'
        '  { service = "nope" },\n'
        '  { service = "raw" },\n'
        '  { service = "web" },\n'
        '  { service = "api", path_prefix = "v1" },\n'
        '  { service = "api", hosts = ["bad host"] },\n'
        "]\n"
        '[services.api]\nlisten = "127.0.0.1:0"\nmode = "http"\nbackends = ["127.0.0.1:1"]\n'
        '[services.raw]\nlisten = "127.0.0.1:0"\nmode = "tcp"\nbackends = ["127.0.0.1:2"]\n'
        "routes = []\n"
    )
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    errors = {e.where: e.message for e in caught.value.errors}
    assert set(errors) == {
        "services.web.routes[1].service",
        "services.web.routes[2].service",
        "services.web.routes[3].service",
        "services.web.routes[4].path_prefix",
        "services.web.routes[5].hosts",
    }
    assert "got 'nope'" in errors["services.web.routes[1].service"]
    assert "tcp mode" in errors["services.web.routes[2].service"]
    assert "another service" in errors["services.web.routes[3].service"]


def test_a_valid_route_loads(tmp_path: Path) -> None:
    path = tmp_path / "ok.toml"
    path.write_text(
        '[services.web]\nlisten = "127.0.0.1:0"\nmode = "http"\nbackends = []\n'
        '[[services.web.routes]]\nservice = "api"\nhosts = ["API.test"]\nmethods = ["get"]\n'
        'headers = { "X-Canary" = "1" }\n'
        '[services.api]\nlisten = "127.0.0.1:0"\nmode = "http"\nbackends = ["127.0.0.1:1"]\n'
    )
    web = load_config(path).service("web")
    assert web.routes == (
        RouteConfig("api", hosts=("api.test",), methods=("GET",), headers=(("X-Canary", "1"),)),
    )
    assert web.backends == ()


@pytest.mark.parametrize(
    ("target", "normal"),
    [
        (b"/a/./b/../c", b"/a/c"),
        (b"/public/../admin", b"/admin"),
        (b"/%61dmin", b"/admin"),
        (b"/%2e%2e/admin", b"/admin"),
        (b"/../../etc/passwd", b"/etc/passwd"),
        (b"/x/..", b"/"),
        (b"/x/.", b"/x/"),
        (b"/a%2fb", b"/a%2Fb"),  # an encoded slash stays encoded (not a segment boundary)
        (b"/a/../b?next=/../c", b"/b?next=/../c"),  # the query is left alone
        (b"/%zz/%4", b"/%zz/%4"),
        (b"*", b"*"),
    ],
)
def test_paths_are_normalized_before_routes_see_them(target: bytes, normal: bytes) -> None:
    assert normalize_target(target) == normal


def test_an_absolute_target_is_made_origin_form_with_its_authority_as_host() -> None:
    head = head_of(b"GET http://Admin.test:8080/v1/x?q HTTP/1.1\r\nHost: other.test\r\n\r\n")
    origin_form(head)
    assert head.target == b"/v1/x?q"
    assert head.host == b"Admin.test:8080"
    assert head.headers == [(b"Host", b"Admin.test:8080")]
    for bad in (b"ftp://h/x", b"http://user@h/x", b"http:///x"):
        with pytest.raises(HttpError):
            origin_form(head_of(b"GET " + bad + b" HTTP/1.1\r\nHost: h\r\n\r\n"))


async def test_a_route_cannot_be_dodged_with_dots_escapes_or_an_absolute_target() -> None:
    """The admin route's service is where /admin goes, however the path is written."""
    async with echo_backend("admin") as admin, echo_backend("www") as www:
        async with (
            http_service([admin.address], service={"name": "admin"}),
            http_service(
                [www.address], service={"routes": (RouteConfig("admin", path_prefix="/admin"),)}
            ) as (_, port),
        ):
            client = await RawClient.open(port)
            for target in ("/admin/x", "/public/../admin/x", "/%61dmin/x", "/./admin/x"):
                client.send(get(target))
                response = await client.response()
                assert response is not None
                assert (response.json()["backend"], response.json()["path"]) == (
                    "admin",
                    "/admin/x",
                )
            client.send(b"GET http://h.test/admin/x HTTP/1.1\r\nHost: h.test\r\n\r\n")
            absolute = await client.response()
            assert absolute is not None
            assert absolute.json()["backend"] == "admin"


def test_the_readmes_http_example_loads(tmp_path: Path) -> None:
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    start = text.index("```toml\n", text.index("## HTTP mode")) + len("```toml\n")
    path = tmp_path / "readme.toml"
    path.write_text(text[start : text.index("```", start)])
    config = load_config(path)
    web, api = config.service("web"), config.service("api")
    assert (web.mode, api.mode) == ("http", "http")
    assert [r.service for r in web.routes] == ["api", "api"]
    assert api.http.strip_prefix == "/api"
    assert web.health.type == "http"
