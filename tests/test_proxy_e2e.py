"""The PROXY protocol end to end: HAProxy in front of `balancer serve` (send-proxy-v2 to an
`accept_proxy` service) and behind it (`send_proxy` towards an `accept-proxy` bind), hand-made
v1 and v2 headers from raw sockets, and the connections refused for want of a good one.

The clients connect from 127.0.0.2 and 127.0.0.3 (loopback addresses other than the one
every listener is on), or name a documentation address (203.0.113.0/24, 2001:db8::/32) in
a header of their own, so that the address a backend is told is told apart from the
socket's peer, which is always 127.0.0.1 here."""

from __future__ import annotations

import json
import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.http_e2e_support import EchoProc, curl, echoes
from tests.peers import HOST, Peer
from tests.support import BalancerProc, free_ports, wait_until
from tests.tls_e2e_support import (
    FAST_HEALTH,
    HAPROXY_HEAD,
    V2_SIGNATURE,
    front_errors,
    haproxy_with,
    http_body,
    https_get,
    metric_value,
    proxy_v1,
    proxy_v2,
    proxy_v2_local,
    raw_http,
    read_all,
    serve,
    services_toml,
    tls_client,
    tls_status,
    tlv,
)
from tests.tls_support import Pki, default_pki

pytestmark = [pytest.mark.peers, pytest.mark.e2e]

CLIENT = "127.0.0.2"
OTHER_CLIENT = "127.0.0.3"


def request(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: proxied.example\r\nConnection: close\r\n\r\n".encode()


def json_documents(text: str) -> list[dict[str, Any]]:
    """The JSON objects written one after the other in `text` (curl's bodies of several URLs)."""
    decoder = json.JSONDecoder()
    docs, at = [], 0
    while at < len(text):
        doc, at = decoder.raw_decode(text, at)
        docs.append(doc)
    return docs


def seen_headers(reply: bytes) -> dict[str, list[str]]:
    """The request headers the echo backend saw, from a whole connection's reply."""
    status, body = http_body(reply)
    assert status == 200, reply[:300]
    out: dict[str, list[str]] = {}
    for key, value in json.loads(body)["headers"]:
        out.setdefault(str(key).lower(), []).append(str(value))
    return out


# -- a balancer that requires the PROXY header ------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return default_pki(tmp_path_factory)


@dataclass
class Accepting:
    bal: BalancerProc
    echo: EchoProc

    @property
    def port(self) -> int:
        return self.bal.ports["web"]

    def errors(self) -> dict[str, int]:
        return front_errors(self.bal, "web")

    def counted(self, reason: str, count: int) -> None:
        wait_until(lambda: self.errors().get(reason, 0) == count,
                   what=f"{reason} counted {count}: {self.errors()}")  # fmt: skip


@pytest.fixture(scope="module")
def accepting(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[Accepting]:
    """web: http, accept_proxy (any peer), proxy_timeout 0.5, the access log on;
    guarded: the same, but PROXY headers only from 10.0.0.0/8;
    secure: the same as web, terminating TLS after the header;
    hashed: the same as web over two backends, consistent_hash on the source;
    counted: a tcp service with accept_proxy in front of the same echo backend."""
    tmp = tmp_path_factory.mktemp("accepting")
    with echoes("e", "f") as (echo, other):
        common = {"mode": "http", "backends": [echo.address], "health": FAST_HEALTH,
                  "accept_proxy": True, "proxy_timeout": 0.5}  # fmt: skip
        cfg = services_toml(
            tmp / "accept.toml",
            {
                "web": common,
                "guarded": {**common, "accept_proxy_from": ["10.0.0.0/8"]},
                "secure": {
                    **common,
                    "tls": {"cert": str(pki.server.cert_path), "key": str(pki.server.key_path)},
                },
                "hashed": {
                    **common,
                    "backends": [echo.address, other.address],
                    "algorithm": "consistent_hash",
                    "hash_key": "source",
                },
                "counted": {**common, "mode": "tcp"},
            },
        )
        bal = serve(cfg, "--access-log")
        try:
            yield Accepting(bal, echo)
        finally:
            assert bal.stop() == 0, bal.tail()


def test_haproxy_send_proxy_v2_in_front_gives_the_real_client(
    accepting: Accepting, pki: Pki
) -> None:
    plain_port, tls_port = free_ports(2)

    def config(port: int) -> str:
        # `port` only tells that haproxy listens (its listeners are all bound by then): the
        # connection that finds it out goes no further
        return (
            HAPROXY_HEAD
            + f"""\
frontend ready
    mode tcp
    bind {HOST}:{port}
    tcp-request connection reject
frontend front
    mode tcp
    bind {HOST}:{plain_port}
    default_backend balancer
backend balancer
    mode tcp
    server s1 {HOST}:{accepting.port} send-proxy-v2
frontend passthrough
    mode tcp
    bind {HOST}:{tls_port}
    default_backend secure
backend secure
    mode tcp
    server s1 {HOST}:{accepting.bal.ports["secure"]} send-proxy-v2
"""
        )

    proxied = tls_status(accepting.bal, "web")["proxied"]
    with haproxy_with(config):
        for source in (CLIENT, OTHER_CLIENT):
            done = curl("--interface", source, f"http://{HOST}:{plain_port}/via-haproxy")
            assert done.returncode == 0, done.stderr
            seen = json.loads(done.stdout)
            headers = {str(k).lower(): str(v) for k, v in seen["headers"]}
            assert seen["path"] == "/via-haproxy"
            # the client curl's address, not haproxy's (127.0.0.1, the socket's peer)
            assert headers["x-forwarded-for"] == source, headers
        # TLS passed through haproxy, terminated by the balancer after the header
        resolve = f"a.example:{tls_port}:{HOST}"
        done = curl("--interface", CLIENT, "--cacert", str(pki.ca.cert_path), "--resolve",
                    resolve, f"https://a.example:{tls_port}/tls")  # fmt: skip
        assert done.returncode == 0, done.stderr
        headers = {str(k).lower(): str(v) for k, v in json.loads(done.stdout)["headers"]}
        assert (headers["x-forwarded-for"], headers["x-forwarded-proto"]) == (CLIENT, "https")
    assert tls_status(accepting.bal, "web")["proxied"] == proxied + 2
    assert not accepting.errors(), accepting.errors()
    secure = tls_status(accepting.bal, "secure")
    assert (secure["proxied"], secure["handshakes"], secure["errors"]) == (1, 1, {}), secure


def test_a_header_then_tls_from_a_raw_socket(accepting: Accepting, pki: Pki) -> None:
    port = accepting.bal.ports["secure"]
    ctx = tls_client(pki.ca.cert_path)
    for header, client in (
        (proxy_v1(("203.0.113.21", 40021), (HOST, port)), "203.0.113.21"),
        (proxy_v2(("203.0.113.22", 40022), (HOST, port)), "203.0.113.22"),
        (proxy_v2_local(), CLIENT),
    ):
        with socket.create_connection((HOST, port), timeout=10,
                                      source_address=(CLIENT, 0)) as raw:  # fmt: skip
            raw.sendall(header)
            with ctx.wrap_socket(raw, server_hostname="a.example") as tls:
                tls.sendall(request("/after-header"))
                headers = seen_headers(read_all(tls))
        assert headers["x-forwarded-for"] == [client]
        assert headers["x-forwarded-proto"] == ["https"]
    # TLS without the header first is refused
    with socket.create_connection((HOST, port), timeout=10) as raw:
        with pytest.raises((ssl.SSLError, ConnectionError)):
            ctx.wrap_socket(raw, server_hostname="a.example").close()
    wait_until(lambda: front_errors(accepting.bal, "secure").get("proxy_header_malformed") == 1,
               what="the hello without a header counted")  # fmt: skip


def test_hand_made_headers_name_the_client(accepting: Accepting) -> None:
    port = accepting.port
    dest = (HOST, port)
    v1 = raw_http(port, proxy_v1(("203.0.113.7", 40001), dest), request("/v1"))
    assert seen_headers(v1)["x-forwarded-for"] == ["203.0.113.7"]
    v2 = raw_http(port, proxy_v2(("203.0.113.8", 40002), dest), request("/v2"))
    assert seen_headers(v2)["x-forwarded-for"] == ["203.0.113.8"]
    v2_six = raw_http(port, proxy_v2(("2001:db8::7", 40003), ("2001:db8::1", 80)),
                      request("/v2-six"))  # fmt: skip
    assert seen_headers(v2_six)["x-forwarded-for"] == ["2001:db8::7"]
    v1_six = raw_http(port, proxy_v1(("2001:db8::8", 40004), ("2001:db8::1", 80)),
                      request("/v1-six"))  # fmt: skip
    assert seen_headers(v1_six)["x-forwarded-for"] == ["2001:db8::8"]
    with_tlvs = raw_http(
        port,
        proxy_v2(("203.0.113.11", 40005), dest, tlv(0x02, b"a.example") + tlv(0x04, b"\0" * 5)),
        request("/tlvs"),
    )
    assert seen_headers(with_tlvs)["x-forwarded-for"] == ["203.0.113.11"]
    # a client's own X-Forwarded-For does not count: the PROXY source does
    forged = raw_http(
        port,
        proxy_v1(("203.0.113.12", 40006), dest),
        b"GET /forged HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 198.51.100.1\r\n"
        b"Connection: close\r\n\r\n",
    )
    assert seen_headers(forged)["x-forwarded-for"] == ["203.0.113.12"]

    # LOCAL (a proxy's health check): the socket's own peer is the client
    local = raw_http(port, proxy_v2_local(), request("/local"), source=CLIENT)
    assert seen_headers(local)["x-forwarded-for"] == [CLIENT]
    unknown = raw_http(port, b"PROXY UNKNOWN\r\n", request("/unknown"), source=CLIENT)
    assert seen_headers(unknown)["x-forwarded-for"] == [CLIENT]

    # the access log names the PROXY source as the client
    def logged() -> bool:
        return any(" web 203.0.113.7:40001 -> " in line and "/v1" in line
                   for line in accepting.bal.lines)  # fmt: skip

    wait_until(logged, what="the access log line")
    assert not accepting.errors(), accepting.errors()
    assert tls_status(accepting.bal, "web")["proxied"] >= 8


def test_connections_without_a_good_header_are_closed_and_counted(
    accepting: Accepting,
) -> None:
    port = accepting.port
    before = accepting.errors()

    def was(reason: str) -> int:
        return before.get(reason, 0)

    plain = raw_http(port, b"", request("/no-header"))
    assert plain == b"", plain  # closed, nothing sent to the backend or answered
    accepting.counted("proxy_header_malformed", was("proxy_header_malformed") + 1)

    broken_v2 = raw_http(port, V2_SIGNATURE + b"\x31\x11\x00\x0c" + b"\0" * 12, request("/"))
    assert broken_v2 == b""  # version 3
    accepting.counted("proxy_header_malformed", was("proxy_header_malformed") + 2)

    bad_v1 = raw_http(port, b"PROXY TCP4 203.0.113.300 127.0.0.1 1 2\r\n", request("/"))
    assert bad_v1 == b""
    accepting.counted("proxy_header_malformed", was("proxy_header_malformed") + 3)

    huge = raw_http(port, V2_SIGNATURE + b"\x21\x11\x0f\xa0" + b"\0" * 12, b"")
    assert huge == b""  # 4000 bytes announced
    accepting.counted("proxy_header_too_large", was("proxy_header_too_large") + 1)

    with socket.create_connection((HOST, port), timeout=10) as silent:
        assert read_all(silent) == b""  # closed after proxy_timeout (0.5 s)
    accepting.counted("proxy_header_timeout", was("proxy_header_timeout") + 1)

    with socket.create_connection((HOST, port), timeout=10) as cut:
        cut.sendall(b"PROXY TCP4 203.0.113.7")
        cut.shutdown(socket.SHUT_WR)
        assert read_all(cut) == b""
    accepting.counted("closed_early", was("closed_early") + 1)

    # a peer outside accept_proxy_from is refused, even with a good header
    guarded = accepting.bal.ports["guarded"]
    refused = raw_http(guarded, proxy_v1(("203.0.113.7", 40001), (HOST, guarded)), request("/"))
    assert refused == b""
    wait_until(lambda: front_errors(accepting.bal, "guarded") == {"proxy_untrusted": 1},
               what="proxy_untrusted counted")  # fmt: skip

    # and the service goes on serving
    after = raw_http(port, proxy_v1(("203.0.113.99", 1), (HOST, port)), request("/after"))
    assert seen_headers(after)["x-forwarded-for"] == ["203.0.113.99"]
    metrics = accepting.bal.metrics()
    got = metric_value(metrics, "balancer_front_closed_total", service="web",
                       reason="proxy_header_malformed")  # fmt: skip
    assert got == was("proxy_header_malformed") + 3
    proxied = metric_value(metrics, "balancer_proxy_headers_total", service="web")
    assert proxied == tls_status(accepting.bal, "web")["proxied"]


def test_hash_on_source_uses_the_proxy_source(accepting: Accepting) -> None:
    port = accepting.bal.ports["hashed"]

    def backend_for(source: str, path: str) -> str:
        reply = raw_http(port, proxy_v1((source, 40000), (HOST, port)), request(path))
        status, body = http_body(reply)
        assert status == 200, reply[:300]
        return str(json.loads(body)["backend"])

    sources = [f"203.0.113.{i}" for i in range(1, 41)]
    first = {source: backend_for(source, "/1") for source in sources}
    again = {source: backend_for(source, "/2") for source in sources}
    assert again == first  # each client address keeps its backend
    # all connections come from 127.0.0.1: one backend only, if the socket's peer counted
    assert set(first.values()) == {"e", "f"}, first


def test_tcp_mode_accepts_the_header_and_relays_the_rest(accepting: Accepting) -> None:
    port = accepting.bal.ports["counted"]
    reply = raw_http(port, proxy_v2(("203.0.113.30", 40030), (HOST, port)), request("/tcp"))
    # the header was taken off: the backend got the request as the client sent it
    headers = seen_headers(reply)
    assert headers["host"] == ["proxied.example"]
    assert "x-forwarded-for" not in headers  # tcp mode adds nothing
    assert raw_http(port, b"", request("/none")) == b""
    wait_until(lambda: front_errors(accepting.bal, "counted") == {"proxy_header_malformed": 1},
               what="the tcp connection without a header counted")  # fmt: skip
    assert tls_status(accepting.bal, "counted")["proxied"] == 1


# -- HAProxy behind the balancer: send_proxy ----------------------------------------------------


def _haproxy_behind(echo: EchoProc) -> Any:
    def config(port: int) -> str:
        return (
            HAPROXY_HEAD
            + f"""\
frontend pp
    mode http
    bind {HOST}:{port} accept-proxy
    http-request set-header X-Client-IP %[src]
    http-request set-header X-Client-Port %[src_port]
    http-request set-header X-PP-Authority %[fc_pp_authority]
    default_backend echo
backend echo
    mode http
    server e {echo.address}
"""
        )

    return haproxy_with(config)


@dataclass
class Sending:
    bal: BalancerProc
    haproxy: Peer


@pytest.fixture(scope="module")
def sending(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[Sending]:
    """Services that send the PROXY header to HAProxy (an accept-proxy bind, http mode, the
    client address it was told set as X-Client-IP / X-Client-Port towards an echo backend):

    relay_v2, relay_v1   tcp, accept_proxy themselves, send_proxy v2 / v1
    direct_v2            tcp, send_proxy v2 of the socket's peer
    tls_v2               tcp terminating TLS, send_proxy v2 (with the SNI as a TLV)
    http_v2              http, send_proxy v2
    """
    tmp = tmp_path_factory.mktemp("sending")
    with echoes("behind") as (echo,), _haproxy_behind(echo) as haproxy:
        to_haproxy = {"backends": [haproxy.address], "health": FAST_HEALTH}
        tls = {"cert": str(pki.server.cert_path), "key": str(pki.server.key_path)}
        cfg = services_toml(
            tmp / "send.toml",
            {
                "relay_v2": {"mode": "tcp", "accept_proxy": True, "send_proxy": "v2",
                             **to_haproxy},
                "relay_v1": {"mode": "tcp", "accept_proxy": True, "send_proxy": "v1",
                             **to_haproxy},
                "direct_v2": {"mode": "tcp", "send_proxy": "v2", **to_haproxy},
                "tls_v2": {"mode": "tcp", "tls": tls, "send_proxy": "v2", **to_haproxy},
                "http_v2": {"mode": "http", "send_proxy": "v2", **to_haproxy},
            },
        )  # fmt: skip
        bal = serve(cfg)
        try:
            yield Sending(bal, haproxy)
        finally:
            assert bal.stop() == 0, bal.tail()


def told(reply: bytes) -> tuple[str, str]:
    """The client address and port HAProxy was told, as the echo backend saw them."""
    headers = seen_headers(reply)
    return headers["x-client-ip"][0], headers["x-client-port"][0]


def test_send_proxy_carries_the_address_a_header_gave_us(sending: Sending) -> None:
    ports = sending.bal.ports
    for service in ("relay_v2", "relay_v1"):
        port = ports[service]
        # the client's own header, in either version, is passed on in the service's
        got = raw_http(port, proxy_v1(("203.0.113.9", 40009), (HOST, port)), request("/a"))
        assert told(got) == ("203.0.113.9", "40009"), service
        got = raw_http(port, proxy_v2(("203.0.113.10", 40010), (HOST, port)), request("/b"))
        assert told(got) == ("203.0.113.10", "40010"), service
        six = raw_http(port, proxy_v1(("2001:db8::9", 40011), ("2001:db8::1", 443)),
                       request("/c"))  # fmt: skip
        assert told(six) == ("2001:db8::9", "40011"), service
        # LOCAL: the socket's peer is the client passed on
        local = raw_http(port, proxy_v2_local(), request("/d"), source=OTHER_CLIENT)
        assert told(local)[0] == OTHER_CLIENT, service
        assert tls_status(sending.bal, service)["proxied"] == 4


def test_send_proxy_carries_the_socket_peer(sending: Sending, pki: Pki) -> None:
    ports = sending.bal.ports
    for source in (CLIENT, OTHER_CLIENT):
        with socket.create_connection((HOST, ports["direct_v2"]), timeout=10,
                                      source_address=(source, 0)) as sock:  # fmt: skip
            sock.sendall(request("/direct"))
            port = sock.getsockname()[1]
            assert told(read_all(sock)) == (source, str(port))

    ctx = tls_client(pki.ca.cert_path)
    answer = https_get(ports["tls_v2"], "a.example", ctx, "/tls", source=CLIENT)
    assert answer.status == 200
    headers = {str(k).lower(): str(v) for k, v in answer.json()["headers"]}
    assert headers["x-client-ip"] == CLIENT
    assert headers["x-pp-authority"] == "a.example"  # the SNI, as the v2 AUTHORITY TLV


def test_http_mode_send_proxy_keeps_each_clients_address(sending: Sending) -> None:
    port = sending.bal.ports["http_v2"]
    # several requests on one client connection, then another client: each backend
    # connection's header names the client it carries
    done = curl("--interface", CLIENT, f"http://{HOST}:{port}/one", f"http://{HOST}:{port}/two")
    assert done.returncode == 0, done.stderr
    bodies = json_documents(done.stdout)
    assert [seen["path"] for seen in bodies] == ["/one", "/two"]
    for seen in bodies:
        headers = {str(k).lower(): str(v) for k, v in seen["headers"]}
        assert headers["x-client-ip"] == CLIENT, headers
    other = curl("--interface", OTHER_CLIENT, f"http://{HOST}:{port}/three")
    assert other.returncode == 0, other.stderr
    headers = {str(k).lower(): str(v) for k, v in json.loads(other.stdout)["headers"]}
    assert headers["x-client-ip"] == OTHER_CLIENT, headers
    again = curl("--interface", CLIENT, f"http://{HOST}:{port}/four")
    headers = {str(k).lower(): str(v) for k, v in json.loads(again.stdout)["headers"]}
    assert headers["x-client-ip"] == CLIENT, headers
