"""The admin endpoint's request checks, in process over a real socket on 127.0.0.1:
body headers, body size, JSON, weights, tokens, Host and Origin, error shape, security
headers. The routes here are small stand-ins; the real routes are driven end to end in
test_admin_api.py, and these tests see the same checks at the cost of milliseconds."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import ClientResponse, ClientSession, web

from balancer.admin import checks
from balancer.admin.app import RUNNER_OPTIONS, guarded_app
from balancer.admin.checks import (
    MAX_BODY,
    MAX_ERROR,
    SECURITY_HEADERS,
    SHOWN_KEYS,
    ApiError,
    api_handler,
    check_weight,
    json_object,
)
from balancer.admin.security import OPEN, READ, WRITE, AdminGuard
from balancer.config.errors import ConfigError
from balancer.config.model import MAX_WEIGHT, AdminConfig
from balancer.errors import BackendError, BalancerError, Conflict, InvalidInput, NotFound
from balancer.runtime.services import ListenError

TOKEN = "s3cret-write"
READ_TOKEN = "s3cret-read"
JSON = {"Content-Type": "application/json"}
TEXT = {"Content-Type": "text/plain"}


async def _echo(request: web.Request) -> web.StreamResponse:
    body = await json_object(request, ("weight", "state"))
    if "weight" in body:
        body["weight"] = check_weight(body["weight"])
    return web.json_response({"got": body})


async def _no_body(request: web.Request) -> web.StreamResponse:
    return web.json_response({"ok": True})


async def _boom(request: web.Request) -> web.StreamResponse:
    raise RuntimeError("a bug, not the client's fault")


async def _refuse(request: web.Request) -> web.StreamResponse:
    raise ApiError(409, "in conflict")


def make_app(config: AdminConfig) -> web.Application:
    app = guarded_app(AdminGuard(config, hostname=""))
    app.router.add_put("/echo", api_handler(_echo, access=WRITE))
    app.router.add_post("/nobody", api_handler(_no_body, access=WRITE))
    app.router.add_get("/read", api_handler(_no_body, access=READ))
    app.router.add_get("/open", api_handler(_no_body, access=OPEN))
    app.router.add_get("/boom", api_handler(_boom, access=OPEN))
    app.router.add_get("/refuse", api_handler(_refuse, access=OPEN))
    return app


class Admin:
    def __init__(self, session: ClientSession, base: str) -> None:
        self.session = session
        self.base = base

    async def call(
        self, method: str, path: str, *, data: bytes | None = None, **headers: str
    ) -> tuple[int, Any, ClientResponse]:
        # only the headers given are sent (curl sends no Content-Type without a body)
        skip = [] if "Content-Type" in headers else ["Content-Type"]
        async with self.session.request(
            method, self.base + path, data=data, headers=headers, skip_auto_headers=skip
        ) as resp:
            raw = await resp.read()
            body = json.loads(raw) if raw else None
            return resp.status, body, resp

    async def put_json(self, body: object, **headers: str) -> tuple[int, Any]:
        headers.setdefault("Content-Type", "application/json")
        status, doc, _ = await self.call("PUT", "/echo", data=json.dumps(body).encode(), **headers)
        return status, doc


async def serve(config: AdminConfig) -> AsyncIterator[Admin]:
    runner = web.AppRunner(make_app(config), **RUNNER_OPTIONS)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        async with ClientSession(auto_decompress=False) as session:
            yield Admin(session, f"http://127.0.0.1:{port}")
    finally:
        await runner.cleanup()


@pytest_asyncio.fixture
async def api() -> AsyncIterator[Admin]:
    async for a in serve(AdminConfig(host="127.0.0.1", port=0)):
        yield a


@pytest_asyncio.fixture
async def guarded(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Admin]:
    monkeypatch.delenv("BALANCER_ADMIN_TOKEN", raising=False)
    config = AdminConfig(
        host="127.0.0.1", port=0, token=TOKEN, read_token=READ_TOKEN, read_access="token"
    )
    async for a in serve(config):
        yield a


# -- the body ------------------------------------------------------------------------------


async def test_a_json_object_with_known_keys_reaches_the_route(api: Admin) -> None:
    assert await api.put_json({"weight": 7, "state": "drain"}) == (
        200,
        {"got": {"weight": 7, "state": "drain"}},
    )


@pytest.mark.parametrize("encoding", ["gzip", "deflate", " GZIP ", "br"])
async def test_a_compressed_body_is_refused(api: Admin, encoding: str) -> None:
    status, body = await api.put_json({"weight": 1}, **{"Content-Encoding": encoding})
    assert status == 415
    assert "Content-Encoding" in body["error"]
    assert encoding.strip().lower() in body["error"]


@pytest.mark.parametrize("encoding", ["identity", " Identity "])
async def test_identity_encoding_is_a_plain_body(api: Admin, encoding: str) -> None:
    status, _ = await api.put_json({"weight": 1}, **{"Content-Encoding": encoding})
    assert status == 200


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data"]
)
async def test_a_write_that_is_not_json_is_refused(api: Admin, content_type: str) -> None:
    status, body = await api.put_json({"weight": 1}, **{"Content-Type": content_type})
    assert status == 415
    assert "application/json" in body["error"]
    assert content_type in body["error"]


async def test_a_json_body_without_content_type_is_refused(api: Admin) -> None:
    status, body, _ = await api.call("PUT", "/echo", data=b'{"weight": 1}')
    assert status == 415
    assert "expected Content-Type application/json" in body["error"]


async def test_a_write_without_a_body_needs_no_content_type(api: Admin) -> None:
    status, body, _ = await api.call("POST", "/nobody")
    assert (status, body) == (200, {"ok": True})


@pytest.mark.parametrize("charset", ["utf-8", "UTF-8", "utf8", " utf-8"])
async def test_utf8_is_the_charset_of_json(api: Admin, charset: str) -> None:
    status, _ = await api.put_json(
        {"weight": 1}, **{"Content-Type": f"application/json; charset={charset}"}
    )
    assert status == 200


@pytest.mark.parametrize("charset", ["latin-1", "utf-16", "bogus"])
async def test_another_charset_is_refused(api: Admin, charset: str) -> None:
    status, body = await api.put_json(
        {"weight": 1}, **{"Content-Type": f"application/json; charset={charset}"}
    )
    assert status == 415
    assert "charset" in body["error"]
    assert charset in body["error"]


async def test_a_body_over_the_limit_is_refused_by_its_length(api: Admin) -> None:
    data = b'{"weight": 1' + b" " * MAX_BODY + b"}"
    status, body, _ = await api.call(
        "PUT", "/echo", data=data, **{"Content-Type": "application/json"}
    )
    assert status == 413
    assert str(MAX_BODY) in body["error"]


async def test_a_body_at_the_limit_is_read(api: Admin) -> None:
    head = b'{"weight": 1'
    data = head + b" " * (MAX_BODY - len(head) - 1) + b"}"
    assert len(data) == MAX_BODY
    status, body, _ = await api.call(
        "PUT", "/echo", data=data, **{"Content-Type": "application/json"}
    )
    assert (status, body) == (200, {"got": {"weight": 1}})


@pytest.mark.parametrize(
    ("data", "says"),
    [
        (b'{"weight": "\xff"}', "not UTF-8"),
        (b'{"weight": ', "not valid JSON"),
        (b"[" * 30_000 + b"]" * 30_000, "nested too deeply"),
        (b"[1, 2]", "expected a JSON object, got list"),
        (b'"weight"', "expected a JSON object, got str"),
        (b"null", "expected a JSON object, got NoneType"),
    ],
)
async def test_a_body_that_is_not_a_json_object_is_a_short_400(
    api: Admin, data: bytes, says: str
) -> None:
    status, body, _ = await api.call(
        "PUT", "/echo", data=data, **{"Content-Type": "application/json"}
    )
    assert status == 400
    assert says in body["error"]
    assert len(body["error"]) <= MAX_ERROR


async def test_unknown_keys_are_named_a_few_at_a_time(api: Admin) -> None:
    status, body = await api.put_json({f"k{i:05d}": i for i in range(3_000)} | {"weight": 1})
    assert status == 400
    error = body["error"]
    assert error.startswith("unknown key(s) 'k00000', 'k00001'")
    assert f"'k{SHOWN_KEYS - 1:05d}'" in error
    assert f"'k{SHOWN_KEYS:05d}'" not in error
    assert f"and {3_000 - SHOWN_KEYS} more" in error
    assert error.endswith("expected weight, state")
    assert len(error) <= MAX_ERROR


async def test_as_many_unknown_keys_as_are_shown_have_no_more(api: Admin) -> None:
    status, body = await api.put_json({f"k{i}": i for i in range(SHOWN_KEYS)})
    assert status == 400
    assert "more" not in body["error"]


# -- weights -------------------------------------------------------------------------------


@pytest.mark.parametrize("weight", [0, 1, MAX_WEIGHT])
async def test_weights_within_bounds_pass(api: Admin, weight: int) -> None:
    assert await api.put_json({"weight": weight}) == (200, {"got": {"weight": weight}})


@pytest.mark.parametrize("weight", [-1, MAX_WEIGHT + 1, True, False, 1.5, "5", None, 10**400])
async def test_weights_out_of_bounds_or_not_integers_are_refused(api: Admin, weight: Any) -> None:
    status, body = await api.put_json({"weight": weight})
    assert status == 400
    assert body["error"].startswith("invalid weight")
    assert f"{MAX_WEIGHT}" in body["error"]
    assert len(body["error"]) < 200


# -- access ----------------------------------------------------------------------------------


async def test_writes_take_the_write_token_only(guarded: Admin) -> None:
    cases = {
        None: 401,
        "Bearer wrong": 401,
        f"Basic {TOKEN}": 401,
        f"Bearer {READ_TOKEN}": 403,
        f"Bearer {TOKEN}": 200,
    }
    seen = {}
    for auth in cases.keys():
        headers = {"Authorization": auth} if auth else {}
        status, body = await guarded.put_json({"weight": 1}, **headers)
        seen[auth] = status
        if status == 401:
            assert body["error"]
    assert seen == cases


async def test_a_401_says_how_to_authenticate(guarded: Admin) -> None:
    status, _body, resp = await guarded.call("POST", "/nobody")
    assert status == 401
    assert resp.headers["WWW-Authenticate"] == "Bearer"


async def test_reads_take_either_token_and_open_routes_none(guarded: Admin) -> None:
    statuses = []
    for auth in (None, "Bearer wrong", f"Bearer {READ_TOKEN}", f"Bearer {TOKEN}"):
        headers = {"Authorization": auth} if auth else {}
        statuses.append((await guarded.call("GET", "/read", data=None, **headers))[0])
    assert statuses == [401, 401, 200, 200]
    assert (await guarded.call("GET", "/open"))[0] == 200


async def test_the_token_is_checked_before_the_body(guarded: Admin) -> None:
    status, _, _ = await guarded.call(
        "PUT", "/echo", data=b"junk", **{"Content-Type": "text/plain"}
    )
    assert status == 401


def test_a_route_with_an_unknown_access_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="expected one of open, read, write"):
        api_handler(_no_body, access="public")


# -- every answer ----------------------------------------------------------------------------


async def test_a_foreign_host_name_is_refused_before_any_route(api: Admin) -> None:
    status, body, _ = await api.call("GET", "/open", Host="rebind.evil.example")
    assert status == 421
    assert "rebind.evil.example" in body["error"]
    status, _, _ = await api.call("GET", "/open", Host="localhost")
    assert status == 200


async def test_a_cross_site_origin_is_refused(api: Admin) -> None:
    status, body, _ = await api.call("GET", "/open", Origin="http://evil.example")
    assert status == 403
    assert "Origin" in body["error"]


async def test_a_route_error_is_its_status_and_a_json_message(api: Admin) -> None:
    status, body, _ = await api.call("GET", "/refuse")
    assert (status, body) == (409, {"error": "in conflict"})


async def test_unknown_routes_and_methods_are_json_errors_that_keep_allow(api: Admin) -> None:
    status, body, _ = await api.call("GET", "/nowhere")
    assert status == 404
    assert body["error"] == "Not Found: GET '/nowhere'"
    status, body, resp = await api.call("DELETE", "/echo")
    assert status == 405
    assert "PUT" in resp.headers["Allow"]
    assert body["error"].startswith("Method Not Allowed: DELETE '/echo'")


async def test_a_bug_is_a_500_without_the_traceback_and_is_logged(
    api: Admin, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="balancer"):
        status, body, _ = await api.call("GET", "/boom")
    assert (status, body) == (500, {"error": "internal error; see the balancer's log"})
    logged = [r for r in caplog.records if r.exc_info]
    assert logged
    assert "admin: GET '/boom' failed" in logged[0].getMessage()


@pytest.mark.parametrize("path", ["/open", "/nowhere", "/refuse", "/echo"])
async def test_every_answer_forbids_framing_and_sniffing(api: Admin, path: str) -> None:
    _status, _body, resp = await api.call("GET", path, Host="localhost")
    for name, value in SECURITY_HEADERS.items():
        assert resp.headers[name] == value
    _status, _body, resp = await api.call("GET", path, Host="rebind.evil.example")
    assert resp.headers["X-Frame-Options"] == "DENY"


def test_long_error_messages_are_cut() -> None:
    resp = checks.error_response(400, "x" * 10_000)
    assert resp.body is not None
    assert len(json.loads(bytes(resp.body))["error"]) == MAX_ERROR  # type: ignore[arg-type]


# -- bodies that arrive in pieces, or not at all -------------------------------------------


async def _chunks(n: int) -> AsyncIterator[bytes]:
    for _ in range(n):
        yield b" " * 1024


async def test_a_chunked_body_over_the_limit_is_refused_as_it_comes(api: Admin) -> None:
    async with api.session.put(api.base + "/echo", data=_chunks(70), headers=JSON) as resp:
        assert resp.status == 413
        assert await resp.json() == {"error": f"the body is larger than {MAX_BODY} bytes"}


async def test_a_client_that_leaves_in_the_middle_of_its_body_costs_no_traceback(
    api: Admin, caplog: pytest.LogCaptureFixture
) -> None:
    port = int(api.base.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"PUT /echo HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n5\r\nab"
    )
    await writer.drain()
    with caplog.at_level(logging.DEBUG, logger="balancer"):
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), 10) == b""
        writer.close()
        # the next request is served, and the one that was cut logged nothing of ours
        assert (await api.call("GET", "/open"))[0] == 200
    assert [r for r in caplog.records if r.name == "balancer"] == []


async def test_the_errors_of_a_body_say_exactly_what_was_wrong(api: Admin) -> None:
    status, body, _ = await api.call("PUT", "/echo", data=b'{"weight": 1}')
    assert (status, body["error"]) == (
        415,
        "writes take a JSON body: expected Content-Type application/json, got ''",
    )
    status, body, _ = await api.call("PUT", "/echo", data=b'{"weight": ', **JSON)
    assert body == {
        "error": "the body is not valid JSON: 'Expecting value: line 1 column 12 (char 11)'"
    }
    status, body, _ = await api.call("PUT", "/echo", data=b"[" * 30_000, **JSON)
    assert body == {"error": "the body is not valid JSON: nested too deeply"}
    assert await api.put_json({"weight": -1}) == (
        400,
        {"error": "invalid weight -1: expected an integer from 0 to 1000"},
    )
    assert await api.put_json({f"k{i}": i for i in range(SHOWN_KEYS)}) == (
        400,
        {"error": "unknown key(s) 'k0', 'k1', 'k2', 'k3', 'k4': expected weight, state"},
    )


async def test_a_request_the_http_parser_refuses_is_a_400_and_one_line_in_the_log(
    api: Admin, caplog: pytest.LogCaptureFixture
) -> None:
    port = int(api.base.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    with caplog.at_level(logging.INFO):
        writer.write(
            b"PUT /echo HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\nzz\r\n"
        )
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
    assert answer.startswith(b"HTTP/1.0 400 Bad Request")
    records = [r for r in caplog.records if r.name.startswith("balancer")]
    assert [(r.levelno, r.exc_info) for r in records] == [(logging.INFO, None)]
    message = records[0].getMessage()
    assert message.startswith("admin: refused a malformed request from 127.0.0.1: ")
    assert "chunk size" in message


def test_each_of_the_balancers_errors_is_answered_with_one_status() -> None:
    assert checks.http_status(NotFound("no such backend")) == 404
    assert checks.http_status(Conflict("the balancer is stopping")) == 409
    assert checks.http_status(InvalidInput("invalid weight")) == 400
    assert checks.http_status(BalancerError("reload failed")) == 500
    assert checks.http_status(ConfigError("a.toml", "weight", "expected an integer")) == 500
    for cls in (ConfigError, ListenError, NotFound, Conflict, InvalidInput, BackendError):
        assert issubclass(cls, BalancerError), cls
