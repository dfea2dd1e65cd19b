"""What the proxy forwards of a message's headers and what it adds: hop-by-hop fields,
X-Forwarded-*, Forwarded, Via, X-Request-Id, the service's header rules."""

from __future__ import annotations

import ipaddress

import pytest

from balancer.core.http.headers import (
    HeaderRules,
    is_trusted,
    request_headers,
    response_headers,
    rewrite_target,
    trailer_fields,
)
from balancer.core.http.wire import Head, Headers, RequestReader, ResponseReader
from tests.http_wire_support import request

CLIENT = "203.0.113.7"


def parsed(headers: Headers, version: bytes = b"1.1") -> Head:
    """The head the request reader makes of these headers."""
    events = RequestReader().feed(request(b"GET", b"/p", headers, version=version))
    head = events[0]
    assert isinstance(head, Head)
    return head


def sent(
    headers: Headers,
    rules: HeaderRules | None = None,
    *,
    trusted: bool = False,
    client_ip: str = CLIENT,
    request_id: bytes | None = b"given-id",
) -> Headers:
    out, _ = request_headers(
        parsed(headers),
        rules or HeaderRules(),
        client_ip=client_ip,
        proto=b"https",
        port=8443,
        trusted=trusted,
        request_id=request_id,
    )
    return out


def values(headers: Headers, name: bytes) -> list[bytes]:
    return [v for n, v in headers if n.lower() == name.lower()]


def names(headers: Headers) -> set[bytes]:
    return {n.lower() for n, _ in headers}


HOST = (b"Host", b"shop.test")


def test_hop_by_hop_headers_end_at_the_proxy() -> None:
    out = sent(
        [
            HOST,
            (b"Connection", b"keep-alive, X-Secret"),
            (b"Keep-Alive", b"timeout=5"),
            (b"Proxy-Connection", b"keep-alive"),
            (b"TE", b"trailers"),
            (b"Trailer", b"X-Sum"),
            (b"X-Secret", b"only for the proxy"),
            (b"Accept", b"*/*"),
        ]
    )
    assert (
        names(out)
        & {
            b"connection",
            b"keep-alive",
            b"proxy-connection",
            b"te",
            b"trailer",
            b"x-secret",
            b"upgrade",
        }
        == set()
    )
    assert values(out, b"Accept") == [b"*/*"]
    assert values(out, b"Host") == [b"shop.test"]


def test_framing_headers_are_not_forwarded_as_received() -> None:
    head = parsed([HOST, (b"Content-Length", b"0")])
    out, _ = request_headers(
        head,
        HeaderRules(),
        client_ip=CLIENT,
        proto=b"http",
        port=80,
        trusted=False,
        request_id=None,
    )
    assert b"content-length" not in names(out)


def test_connection_cannot_remove_the_forwarding_headers_the_proxy_adds() -> None:
    listed = b"X-Forwarded-For, X-Forwarded-Proto, X-Forwarded-Host, X-Forwarded-Port, Forwarded"
    out = sent([HOST, (b"Connection", listed)], HeaderRules(forwarded=True), trusted=True)
    assert values(out, b"X-Forwarded-For") == [CLIENT.encode()]
    assert values(out, b"X-Forwarded-Proto") == [b"https"]
    assert values(out, b"X-Forwarded-Host") == [b"shop.test"]
    assert values(out, b"X-Forwarded-Port") == [b"8443"]
    assert values(out, b"Forwarded") == [b'for=203.0.113.7;proto=https;host="shop.test"']


def test_connection_cannot_remove_the_host() -> None:
    out = sent([HOST, (b"Connection", b"close, Host")])
    assert values(out, b"Host") == [b"shop.test"]


CLAIMS: Headers = [
    (b"X-Forwarded-For", b"198.51.100.1"),
    (b"X-Forwarded-For", b"10.0.0.2"),
    (b"X-Forwarded-Proto", b"http"),
    (b"X-Forwarded-Host", b"front.test"),
    (b"X-Forwarded-Port", b"80"),
    (b"Forwarded", b"for=198.51.100.1"),
]


def test_forwarding_headers_from_a_trusted_proxy_are_kept_and_appended_to() -> None:
    out = sent([HOST, *CLAIMS], HeaderRules(forwarded=True), trusted=True)
    assert values(out, b"X-Forwarded-For") == [b"198.51.100.1, 10.0.0.2, " + CLIENT.encode()]
    assert values(out, b"X-Forwarded-Proto") == [b"http"]
    assert values(out, b"X-Forwarded-Host") == [b"front.test"]
    assert values(out, b"X-Forwarded-Port") == [b"80"]
    assert values(out, b"Forwarded") == [
        b'for=198.51.100.1, for=203.0.113.7;proto=https;host="shop.test"'
    ]


def test_forwarding_headers_from_anyone_else_are_replaced() -> None:
    out = sent([HOST, *CLAIMS], HeaderRules(forwarded=True), trusted=False)
    assert values(out, b"X-Forwarded-For") == [CLIENT.encode()]
    assert values(out, b"X-Forwarded-Proto") == [b"https"]
    assert values(out, b"X-Forwarded-Host") == [b"shop.test"]
    assert values(out, b"X-Forwarded-Port") == [b"8443"]
    assert values(out, b"Forwarded") == [b'for=203.0.113.7;proto=https;host="shop.test"']


def test_no_forwarded_header_unless_asked() -> None:
    assert b"forwarded" not in names(sent([HOST, *CLAIMS], trusted=True))


@pytest.mark.parametrize(
    ("ip", "node"),
    [
        ("2001:db8::1", b'for="[2001:db8::1]"'),
        ("::ffff:192.0.2.1", b'for="[::ffff:192.0.2.1]"'),
        ("192.0.2.1", b"for=192.0.2.1"),
    ],
)
def test_forwarded_quotes_an_ipv6_node(ip: str, node: bytes) -> None:
    (value,) = values(sent([HOST], HeaderRules(forwarded=True), client_ip=ip), b"Forwarded")
    assert value.split(b";")[0] == node
    assert values(sent([HOST], client_ip=ip), b"X-Forwarded-For") == [ip.encode()]


def test_forwarded_host_drops_quotes_of_the_host() -> None:
    out = sent([(b"Host", b'a"b.test')], HeaderRules(forwarded=True))
    assert values(out, b"Forwarded") == [b'for=203.0.113.7;proto=https;host="ab.test"']


@pytest.mark.parametrize(
    "client_id",
    [b"abc-123", b"0f8fad5b-d9cb-469f-a165-70867728950e", b"trace.span:1_2", b"x" * 200],
)
def test_a_sane_request_id_is_kept(client_id: bytes) -> None:
    head = parsed([HOST, (b"X-Request-Id", client_id)])
    out, rid = request_headers(
        head,
        HeaderRules(),
        client_ip=CLIENT,
        proto=b"http",
        port=80,
        trusted=False,
        request_id=None,
    )
    assert rid == client_id
    assert values(out, b"X-Request-Id") == [client_id]


@pytest.mark.parametrize(
    "client_id",
    [b"", b"x" * 201, b"has space", b"<script>", b"a,b", b"caf\xc3\xa9"],
    ids=["empty", "too long", "space", "markup", "comma", "not ascii"],
)
def test_an_insane_request_id_is_replaced(client_id: bytes) -> None:
    out = sent([HOST, (b"X-Request-Id", client_id)], request_id=b"ours-1")
    assert values(out, b"X-Request-Id") == [b"ours-1"]


def test_a_missing_request_id_is_made() -> None:
    out = sent([HOST], request_id=None)
    (made,) = values(out, b"X-Request-Id")
    assert len(made) == 16
    assert made != values(sent([HOST], request_id=None), b"X-Request-Id")[0]
    assert values(sent([HOST], request_id=b"given-id"), b"X-Request-Id") == [b"given-id"]


def test_no_request_id_is_added_when_turned_off() -> None:
    assert b"x-request-id" not in names(sent([HOST], HeaderRules(request_id=False)))


def test_set_headers_replace_whatever_has_that_name() -> None:
    rules = HeaderRules(
        set_headers=((b"x-env", b"prod"), (b"X-Forwarded-Proto", b"https-only"), (b"HOST", b"b"))
    )
    out = sent([HOST, (b"X-Env", b"dev"), (b"X-Env", b"test")], rules)
    assert values(out, b"X-Env") == [b"prod"]
    assert values(out, b"X-Forwarded-Proto") == [b"https-only"]
    assert values(out, b"Host") == [b"b"]


def test_remove_headers_go_whatever_their_case() -> None:
    rules = HeaderRules(remove_headers=frozenset({b"cookie", b"x-debug"}))
    out = sent([HOST, (b"Cookie", b"s=1"), (b"X-DEBUG", b"1"), (b"Accept", b"*/*")], rules)
    assert names(out) & {b"cookie", b"x-debug"} == set()
    assert values(out, b"Accept") == [b"*/*"]


def test_host_rewrite_changes_the_host_but_not_x_forwarded_host() -> None:
    out = sent([HOST], HeaderRules(host_rewrite=b"backend.internal:8080"))
    assert values(out, b"Host") == [b"backend.internal:8080"]
    assert values(out, b"X-Forwarded-Host") == [b"shop.test"]


def test_via_names_the_version_received() -> None:
    rules = HeaderRules(via=b"edge")
    assert values(sent([HOST], rules), b"Via") == [b"1.1 edge"]
    head = parsed([], version=b"1.0")
    out, _ = request_headers(
        head, rules, client_ip=CLIENT, proto=b"http", port=80, trusted=False, request_id=None
    )
    assert values(out, b"Via") == [b"1.0 edge"]
    assert b"via" not in names(sent([HOST]))


def test_an_upgrade_is_forwarded_with_its_connection_option() -> None:
    out = sent([HOST, (b"Connection", b"Upgrade"), (b"Upgrade", b"websocket")])
    assert values(out, b"Connection") == [b"upgrade"]
    assert values(out, b"Upgrade") == [b"websocket"]


def response(headers: Headers, status: int = 200) -> Head:
    reader = ResponseReader()
    reader.expect(b"GET")
    lines = [b"HTTP/1.1 %d X" % status, *[n + b": " + v for n, v in headers]]
    head = reader.feed(b"\r\n".join(lines) + b"\r\n\r\n")[0]
    assert isinstance(head, Head)
    return head


def test_response_headers_drop_hop_by_hop_and_add_via() -> None:
    head = response(
        [
            (b"Connection", b"X-Internal"),
            (b"X-Internal", b"1"),
            (b"Keep-Alive", b"timeout=5"),
            (b"Transfer-Encoding", b"chunked"),
            (b"Set-Cookie", b"a=1"),
            (b"Set-Cookie", b"b=2"),
        ]
    )
    out = response_headers(head, HeaderRules(via=b"edge"))
    assert out == [(b"Set-Cookie", b"a=1"), (b"Set-Cookie", b"b=2"), (b"Via", b"1.1 edge")]


def test_a_101_response_keeps_its_upgrade() -> None:
    head = response([(b"Connection", b"upgrade"), (b"Upgrade", b"websocket")], 101)
    assert response_headers(head, HeaderRules()) == [
        (b"Connection", b"upgrade"),
        (b"Upgrade", b"websocket"),
    ]


def test_trailer_fields_drop_what_a_trailer_may_not_carry() -> None:
    trailers: Headers = [
        (b"X-Checksum", b"abc"),
        (b"Content-Length", b"5"),
        (b"transfer-encoding", b"chunked"),
        (b"Host", b"evil.test"),
        (b"Authorization", b"Basic eA=="),
        (b"SET-COOKIE", b"s=1"),
        (b"Cache-Control", b"no-store"),
        (b"Connection", b"close"),
        (b"Trailer", b"X"),
        (b"Server-Timing", b"db;dur=5"),
    ]
    assert trailer_fields(trailers) == [(b"X-Checksum", b"abc"), (b"Server-Timing", b"db;dur=5")]


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        (b"/api", b"/"),
        (b"/api/", b"/"),
        (b"/api/x", b"/x"),
        (b"/api/x/y?z=1", b"/x/y?z=1"),
        (b"/api?q=1", b"/?q=1"),
        (b"/api#frag", b"/#frag"),
        (b"/apix", b"/apix"),
        (b"/other/api", b"/other/api"),
        (b"/", b"/"),
    ],
)
def test_rewrite_target_strips_the_prefix_of_the_path(target: bytes, expected: bytes) -> None:
    assert rewrite_target(target, b"/api") == expected


def test_rewrite_target_without_a_prefix_changes_nothing() -> None:
    assert rewrite_target(b"/api/x", b"") == b"/api/x"


NETS = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("2001:db8::/32"))


@pytest.mark.parametrize(
    ("address", "trusted"),
    [
        ("10.1.2.3", True),
        ("::ffff:10.1.2.3", True),
        ("::ffff:11.1.2.3", False),
        ("11.1.2.3", False),
        ("2001:db8::5", True),
        ("2001:db9::5", False),
        ("not an address", False),
        ("", False),
        (None, False),
    ],
)
def test_is_trusted(address: str | None, trusted: bool) -> None:
    assert is_trusted(address, NETS) is trusted


def test_nobody_is_trusted_without_trusted_proxies() -> None:
    assert not is_trusted("10.1.2.3", ())


def test_with_request_ids_off_the_clients_own_is_passed_on_untouched() -> None:
    out = sent([HOST, (b"X-Request-Id", b"client's id")], HeaderRules(request_id=False))
    assert values(out, b"X-Request-Id") == [b"client's id"]
