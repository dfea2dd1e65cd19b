"""Random requests against a real balancer's admin endpoint: every answer is below 500,
errors are short JSON, every answer forbids framing, and the log shows no traceback."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from tests.admin_support import READ_ROUTES, closed_ports, start_with_admin, with_admin
from tests.support import BalancerProc, write_toml

pytestmark = pytest.mark.e2e

TOKEN = "s3cret"
READ_TOKEN = "r3ad"
MAX_ERROR_BYTES = 1024


@dataclass(frozen=True)
class Req:
    method: str
    path: str
    headers: tuple[tuple[str, str], ...]
    body: bytes | None

    def __repr__(self) -> str:
        body = None if self.body is None else self.body[:80]
        return f"Req({self.method} {self.path[:100]!r} {dict(self.headers)} body={body!r})"


@pytest.fixture(scope="module")
def balancer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[BalancerProc, str]]:
    """Two backends on closed ports (down), a token for writes and another for reads."""
    tmp: Path = tmp_path_factory.mktemp("fuzz")
    ports = closed_ports(2)
    cfg = write_toml(tmp / "b.toml", ports)
    with_admin(cfg, token=TOKEN, read_token=READ_TOKEN, read_access="token")
    bal = start_with_admin(cfg)
    yield bal, f"127.0.0.1:{ports[0]}"
    bal.stop()


VISIBLE = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40).map(str.strip)
METHODS = st.sampled_from(["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
SEGMENT = st.one_of(
    st.sampled_from(["numbers", "nope", "127.0.0.1:1", "..", "%", "a" * 300]),
    st.text(max_size=30),
).map(lambda s: quote(s, safe=":[]"))


def routes(backend: str) -> st.SearchStrategy[tuple[str, str]]:
    """(method, path): mostly a real route with one of its methods, else anything.

    `backend` is never deleted (that would turn every later change of it into a 404)."""
    one = f"/api/services/numbers/backends/{backend}"
    real = st.sampled_from(
        [
            *(("GET", route) for route in READ_ROUTES),
            ("GET", "/"),
            ("GET", "/api/openapi.json"),
            ("GET", "/static/dashboard.js"),
            ("PUT", one),
            ("PUT", one),
            ("DELETE", "/api/services/numbers/backends/127.0.0.1:1"),
            ("POST", "/api/services/numbers/backends"),
            ("POST", "/api/reload"),
        ]
    )
    path = st.one_of(
        st.sampled_from(["/static/../pyproject.toml", "/api/services/numbers/backends"]),
        st.builds("/api/services/{}/backends/{}".format, SEGMENT, SEGMENT),
        st.builds("/api/services/{}/backends".format, SEGMENT),
        st.builds("/{}".format, SEGMENT),
        st.builds("/api/history?since={}".format, SEGMENT),
    )
    anything = st.tuples(METHODS, path) | st.tuples(
        METHODS.filter(lambda m: m != "DELETE"), st.just(one)
    )
    return st.one_of(real, real, anything)


CONTENT_TYPES = st.sampled_from(
    [
        "application/json",
        "application/json; charset=utf-8",
        "application/json; charset=bogus",
        "text/plain",
        "multipart/form-data; boundary=x",
    ]
)
ENCODINGS = st.sampled_from(["gzip", "br", "deflate", "identity", "bogus"])


def hostile_headers(admin_port: int) -> st.SearchStrategy[dict[str, str]]:
    """Any Host, Origin and Authorization (mostly wrong), any body headers."""
    own = f"127.0.0.1:{admin_port}"
    return st.fixed_dictionaries(
        {},
        optional={
            "Host": st.sampled_from([own, f"rebind.evil.example:{admin_port}", "", "a b"])
            | VISIBLE,
            "Origin": st.sampled_from([f"http://{own}", "null", "http://[::1", "http://evil"])
            | VISIBLE,
            "Authorization": st.sampled_from([f"Bearer {TOKEN}", f"Bearer {READ_TOKEN}", "Bearer"])
            | VISIBLE,
            "Content-Type": CONTENT_TYPES | VISIBLE,
            "Content-Encoding": ENCODINGS | VISIBLE,
        },
    )


def trusted_headers(admin_port: int) -> st.SearchStrategy[dict[str, str]]:
    """This endpoint's own Host and Origin (or none), the write token, mostly a JSON body:
    what varies is the body and the route."""
    own = f"127.0.0.1:{admin_port}"
    return st.fixed_dictionaries(
        {
            "Authorization": st.just(f"Bearer {TOKEN}"),
            "Content-Type": st.one_of(st.just("application/json"), CONTENT_TYPES | VISIBLE),
        },
        optional={
            "Host": st.just(own),
            "Origin": st.just(f"http://{own}"),
            "Content-Encoding": ENCODINGS | VISIBLE,
        },
    )


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)
BODIES = st.one_of(
    st.none(),
    st.binary(max_size=200),
    JSON.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries(
        {},
        optional={
            "state": st.sampled_from(["up", "drain", "maint", "sleeping"]) | JSON,
            "weight": st.integers() | st.sampled_from([10**400, -1, 1001]) | JSON,
            "address": st.sampled_from(["127.0.0.1:1", "[::1]:2", "nohost", "x" * 300]) | JSON,
        },
    ).map(lambda v: json.dumps(v).encode()),
    st.integers(1, 40_000).map(lambda n: b"[" * n),
    st.integers(0, 8_000).map(lambda n: json.dumps({f"k{i}": 1 for i in range(n)}).encode()),
)


def send(port: int, req: Req) -> tuple[int, http.client.HTTPMessage, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        names = {name for name, _ in req.headers}
        conn.putrequest(req.method, req.path, skip_host="Host" in names, skip_accept_encoding=True)
        for name, value in req.headers:
            conn.putheader(name, value)
        if req.body is not None:
            conn.putheader("Content-Length", str(len(req.body)))
        conn.endheaders(req.body)
        resp = conn.getresponse()
        return resp.status, resp.headers, resp.read()
    finally:
        conn.close()


def reported(backend: str) -> list[Req]:
    """What users reported answered 500, an empty reply or a 700 KB error."""
    put = ("PUT", f"/api/services/numbers/backends/{backend}")
    auth = ("Authorization", f"Bearer {TOKEN}")
    drain = b'{"state": "drain"}'
    return [
        Req(*put, (auth, ("Content-Type", "application/json; charset=bogus")), drain),
        Req(
            *put, (auth, ("Content-Type", "application/json"), ("Content-Encoding", "bogus")), drain
        ),
        Req(
            *put, (auth, ("Content-Type", "application/json"), ("Content-Encoding", "gzip")), drain
        ),
        Req(*put, (auth, ("Content-Type", "application/json")), b"[" * 30_000),
        Req(*put, (auth, ("Content-Type", "application/json")), b"[" * 100_000),
        Req(
            *put,
            (auth, ("Content-Type", "application/json")),
            json.dumps({f"k{i}": 1 for i in range(60_000)}).encode(),
        ),
        Req(*put, (auth, ("Content-Type", "application/json")), b'{"weight": ' + b"9" * 400 + b"}"),
        Req(*put, (("Authorization", "Bearer \xff"), ("Content-Type", "application/json")), drain),
        Req(*put, (auth, ("Origin", "http://[::1")), drain),
    ]


def check(bal: BalancerProc, req: Req) -> None:
    assert bal.admin_port is not None
    status, got, payload = send(bal.admin_port, req)
    assert status < 500, (req, status, payload[:300])
    assert got["X-Frame-Options"] == "DENY", req
    assert got["X-Content-Type-Options"] == "nosniff", req
    if req.method == "HEAD":
        return
    path = req.path.split("?")[0]
    if status >= 400 or path.startswith("/api"):
        assert got.get_content_type() == "application/json", (req, status, payload[:300])
        doc = json.loads(payload)
        if status >= 400:
            assert isinstance(doc.get("error"), str), (req, doc)
            assert len(payload) <= MAX_ERROR_BYTES, (req, status, len(payload))


def test_what_users_reported_gets_a_short_4xx(balancer: tuple[BalancerProc, str]) -> None:
    bal, backend = balancer
    for req in reported(backend):
        check(bal, req)
    assert_unharmed(bal)


@pytest.mark.parametrize("who", ["hostile", "trusted"])
def test_any_request_gets_an_answer_below_500(balancer: tuple[BalancerProc, str], who: str) -> None:
    bal, backend = balancer
    assert bal.admin_port is not None
    make_headers = hostile_headers if who == "hostile" else trusted_headers

    @settings(max_examples=200, deadline=None, database=None)
    @given(route=routes(backend), header_values=make_headers(bal.admin_port), body=BODIES)
    @example(route=("GET", "/status"), header_values={}, body=None)
    def fuzz(route: tuple[str, str], header_values: dict[str, str], body: bytes | None) -> None:
        check(bal, Req(*route, tuple(header_values.items()), body))

    fuzz()
    assert_unharmed(bal)


def assert_unharmed(bal: BalancerProc) -> None:
    """Still running, no traceback in the log, and reads answer."""
    assert bal.popen.poll() is None, bal.output()
    tracebacks = [line for line in bal.lines if "Traceback" in line]
    assert not tracebacks, bal.output()
    assert bal.admin_port is not None
    status, _, _ = send(
        bal.admin_port, Req("GET", "/status", (("Authorization", f"Bearer {TOKEN}"),), None)
    )
    assert status == 200
