"""TLS end to end: `balancer serve` terminating, originating and routing TLS between real
clients (openssl s_client, curl, redis-cli, Python's ssl) and real backends (echo
processes, nginx over HTTPS, redis, the sample service)."""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.admin_support import call
from tests.http_e2e_support import EchoProc, curl, echoes
from tests.http_echo_backend import pattern
from tests.peers import HOST, Resp, free_port, need, redis_server
from tests.support import BalancerProc, backend_rows, reply_for, start_service, wait_until
from tests.tls_e2e_support import (
    FAST_HEALTH,
    Answer,
    echo_headers,
    front_errors,
    https_get,
    keepalive_get,
    metric_value,
    nginx_tls,
    read_all,
    s_client,
    serve,
    services_toml,
    serving,
    tls_client,
    tls_status,
)
from tests.tls_support import Pair, Pki, default_pki, make_ca, make_cert, openssl

pytestmark = [pytest.mark.peers, pytest.mark.e2e]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return default_pki(tmp_path_factory)


def tls_of(pair: Pair, **more: object) -> dict[str, object]:
    return {"cert": str(pair.cert_path), "key": str(pair.key_path), **more}


def subject_line(output: str) -> str:
    """The subject of the certificate `openssl s_client` was shown."""
    return next(line for line in output.splitlines() if line.startswith("subject="))


# -- termination: certificates by SNI, ALPN, client certificates, versions, timeouts ----------


@dataclass
class Front:
    bal: BalancerProc
    echo: EchoProc


@pytest.fixture(scope="module")
def front(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Front]:
    """Terminating http services in front of one echo backend:

    web      three certificates: rsa (the default), server (a.example, *.b.example),
             other (c.example); ALPN http/1.1
    mtls     client certificates required (signed by the test CA)
    optional client certificates optional
    strict   TLS 1.3 only, handshake_timeout 0.5
    """
    tmp = tmp_path_factory.mktemp("front")
    with echoes("e") as (echo,):
        ca = str(pki.ca.cert_path)
        common = {"mode": "http", "backends": [echo.address], "health": FAST_HEALTH}
        cfg = services_toml(
            tmp / "front.toml",
            {
                "web": {
                    **common,
                    "tls": {
                        "certs": [
                            tls_of(pki.rsa),
                            tls_of(pki.server, server_names=["a.example", "*.b.example"]),
                            tls_of(pki.other, server_names=["c.example"]),
                        ],
                        "alpn": ["http/1.1"],
                    },
                },
                "mtls": {
                    **common,
                    "tls": tls_of(pki.server, client_ca=ca, verify_client="required"),
                },
                "optional": {
                    **common,
                    "tls": tls_of(pki.server, client_ca=ca, verify_client="optional"),
                },
                "strict": {
                    **common,
                    "tls": tls_of(pki.server, min_version="1.3", handshake_timeout=0.5),
                },
            },
        )
        bal = serve(cfg)
        try:
            yield Front(bal, echo)
        finally:
            assert bal.stop() == 0, bal.tail()


def test_certificate_is_chosen_by_server_name_and_alpn_negotiated(front: Front, pki: Pki) -> None:
    port = front.bal.ports["web"]
    ca = str(pki.ca.cert_path)
    cases = [
        ("a.example", "CN = a.example"),  # exact
        ("c.example", "CN = c.example"),  # exact, second certificate
        ("x.b.example", "CN = a.example"),  # *.b.example
        ("y.x.b.example", "CN = rsa.example"),  # a wildcard covers one label only
        ("unknown.example", "CN = rsa.example"),  # the default (first)
        ("C.Example", "CN = c.example"),  # names are case-insensitive
        ("X.B.EXAMPLE.", "CN = a.example"),  # and may end in a dot
    ]
    for name, subject in cases:
        done = s_client(port, "-servername", name, "-CAfile", ca, "-alpn", "http/1.1",
                        "-verify_return_error")  # fmt: skip
        assert done.returncode == 0, (name, done.stdout, done.stderr)
        assert subject_line(done.stdout) == f"subject={subject}", name
        assert "ALPN protocol: http/1.1" in done.stdout, done.stdout
        assert "Verify return code: 0 (ok)" in done.stdout
    no_sni = s_client(port, "-noservername", "-CAfile", ca)
    assert subject_line(no_sni.stdout) == "subject=CN = rsa.example", no_sni.stdout
    h2_only = s_client(port, "-servername", "a.example", "-CAfile", ca, "-alpn", "h2")
    assert "No ALPN negotiated" in h2_only.stdout, h2_only.stdout
    wait_until(lambda: tls_status(front.bal, "web")["handshakes"] >= len(cases) + 2,
               what="the handshakes counted")  # fmt: skip


def test_curl_over_https_reaches_the_backend_as_https(
    front: Front, pki: Pki, tmp_path: Path
) -> None:
    port = front.bal.ports["web"]
    resolve = ["--resolve", f"a.example:{port}:127.0.0.1", "--cacert", str(pki.ca.cert_path)]
    done = curl(
        *resolve,
        "-H", "X-Forwarded-Proto: http",  # the client's own claim is not believed
        "-w", "\n%{http_code} %{http_version}", f"https://a.example:{port}/tls?x=1",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    body, _, tail = done.stdout.rpartition("\n")
    assert tail == "200 1.1", done.stdout
    seen = json.loads(body)
    assert (seen["backend"], seen["path"]) == ("e", "/tls?x=1")
    headers: dict[str, list[str]] = {}
    for key, value in seen["headers"]:
        headers.setdefault(str(key).lower(), []).append(str(value))
    assert headers["x-forwarded-proto"] == ["https"]
    assert headers["x-forwarded-for"] == ["127.0.0.1"]
    assert headers["host"] == [f"a.example:{port}"]
    # bodies both ways, larger than TLS records and socket buffers, arrive intact
    upload = tmp_path / "upload.bin"
    upload.write_bytes(os.urandom(1 << 20))
    posted = curl(*resolve, "--data-binary", f"@{upload}", f"https://a.example:{port}/up")
    assert posted.returncode == 0, posted.stderr
    seen = json.loads(posted.stdout)
    assert (seen["method"], seen["length"]) == ("POST", 1 << 20)
    assert seen["sha"] == hashlib.sha256(upload.read_bytes()).hexdigest()
    size = 3 * (1 << 20) + 7
    download = tmp_path / "download.bin"
    got = curl(*resolve, "-o", str(download), f"https://a.example:{port}/bytes/{size}")
    assert got.returncode == 0, got.stderr
    assert download.read_bytes() == pattern(size)
    # the same certificate check fails for a name the certificate does not carry
    wrong = curl("--resolve", f"d.example:{port}:127.0.0.1", "--cacert", str(pki.ca.cert_path),
                 f"https://d.example:{port}/")  # fmt: skip
    assert wrong.returncode == 60, wrong.stderr  # the default (rsa.example) does not match


def test_client_certificate_required(front: Front, pki: Pki, tmp_path: Path) -> None:
    bal = front.bal
    port = bal.ports["mtls"]
    resolve = ["--resolve", f"a.example:{port}:127.0.0.1", "--cacert", str(pki.ca.cert_path)]
    url = f"https://a.example:{port}/who"
    before = front_errors(bal, "mtls").get("client_cert_rejected", 0)

    refused = curl(*resolve, url)
    assert refused.returncode != 0, refused.stdout
    assert '"backend"' not in refused.stdout
    wait_until(lambda: front_errors(bal, "mtls").get("client_cert_rejected", 0) == before + 1,
               what="client_cert_rejected counted")  # fmt: skip

    # a client certificate of another CA is refused as well
    stranger_ca = make_ca(tmp_path, "Stranger CA")
    stranger = make_cert(stranger_ca, tmp_path, [], client=True, cn="client-1", ip_sans=())
    foreign = curl(*resolve, "--cert", str(stranger.cert_path), "--key", str(stranger.key_path),
                   url)  # fmt: skip
    assert foreign.returncode != 0, foreign.stdout
    wait_until(lambda: front_errors(bal, "mtls").get("client_cert_rejected", 0) == before + 2,
               what="the foreign certificate counted")  # fmt: skip

    ctx = tls_client(pki.ca.cert_path, pki.client)
    plain = https_get(port, "a.example", ctx, "/who")
    assert plain.status == 200
    assert echo_headers(plain)["x-client-cert-subject"] == ["CN=client-1"]
    forged = https_get(port, "a.example", ctx, "/who",
                       headers={"X-Client-Cert-Subject": "CN=admin"})  # fmt: skip
    assert forged.status == 200
    assert echo_headers(forged)["x-client-cert-subject"] == ["CN=client-1"]
    pair = ["--cert", str(pki.client.cert_path), "--key", str(pki.client.key_path)]
    with_curl = curl(*resolve, *pair, "-H", "x-client-cert-subject: CN=root", url)
    assert with_curl.returncode == 0, with_curl.stderr
    assert '["X-Client-Cert-Subject", "CN=client-1"]' in with_curl.stdout, with_curl.stdout
    assert "CN=root" not in with_curl.stdout


def test_client_certificate_optional_strips_a_forged_subject(front: Front, pki: Pki) -> None:
    port = front.bal.ports["optional"]
    anonymous = https_get(port, "a.example", tls_client(pki.ca.cert_path), "/",
                          headers={"X-Client-Cert-Subject": "CN=admin"})  # fmt: skip
    assert anonymous.status == 200
    assert "x-client-cert-subject" not in echo_headers(anonymous)
    known = https_get(port, "a.example", tls_client(pki.ca.cert_path, pki.client), "/",
                      headers={"X-Client-Cert-Subject": "CN=admin"})  # fmt: skip
    assert echo_headers(known)["x-client-cert-subject"] == ["CN=client-1"]


def _hello_then_silence(port: int) -> bytes:
    """A TLS 1.3 ClientHello, then nothing: what the server sent until it closed."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname="a.example")
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    with socket.create_connection((HOST, port), timeout=10) as sock:
        sock.sendall(outgoing.read())
        return read_all(sock)


def test_refused_clients_are_counted_while_another_is_served(front: Front, pki: Pki) -> None:
    bal = front.bal
    port = bal.ports["strict"]
    ctx = tls_client(pki.ca.cert_path)
    with (
        socket.create_connection((HOST, port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="a.example") as keeper,
    ):
        assert keeper.version() == "TLSv1.3"
        served = 0

        def still_served() -> None:
            nonlocal served
            served += 1
            status, body = keepalive_get(keeper, f"/keep/{served}")
            assert status == 200
            assert f'"/keep/{served}"'.encode() in body

        def counted(reason: str, count: int) -> None:
            wait_until(lambda: front_errors(bal, "strict").get(reason, 0) == count,
                       what=f"{reason} counted {count}")  # fmt: skip

        still_served()
        old = s_client(port, "-tls1_2", "-servername", "a.example",
                       "-CAfile", str(pki.ca.cert_path))  # fmt: skip
        assert old.returncode != 0, old.stdout
        assert "Cipher is (NONE)" in old.stdout or "alert" in old.stderr, old.stdout
        counted("tls_version", 1)
        assert "handshake_failed" not in front_errors(bal, "strict")
        still_served()

        with socket.create_connection((HOST, port), timeout=10) as plain:
            plain.sendall(b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n")
            reply = read_all(plain)  # closed, with at most a 400 that says to use https
            assert reply == b"" or reply.startswith(b"HTTP/1.1 400 "), reply
            assert b"https://" in reply or not reply
            assert b'"backend"' not in reply
        counted("not_tls", 1)
        still_served()

        with socket.create_connection((HOST, port), timeout=10) as silent:
            assert read_all(silent) == b""  # closed after the hello timeout (0.5 s)
        counted("client_hello_timeout", 1)
        still_served()

        with socket.create_connection((HOST, port), timeout=10) as odd:
            odd.sendall(b"\x16\x03\x01\x00\x04\x02\x00\x00\x00")  # a ServerHello, say
            assert read_all(odd) == b""
        counted("handshake_failed", 1)  # read by OpenSSL, which refuses it
        still_served()

        answered = _hello_then_silence(port)
        assert answered[:1] == b"\x16"  # the server's hello came, then the close
        counted("handshake_timeout", 1)
        still_served()

        errors = front_errors(bal, "strict")
        assert errors == {"tls_version": 1, "not_tls": 1, "client_hello_timeout": 1,
                          "handshake_failed": 1, "handshake_timeout": 1}, errors  # fmt: skip
        metrics = bal.metrics()
        for reason in errors:
            got = metric_value(metrics, "balancer_front_closed_total", service="strict",
                               reason=reason)  # fmt: skip
            assert got == 1.0, (reason, got)


# -- origination: TLS towards the backends ------------------------------------------------------


def answer_cn_and_body(answer: Answer) -> tuple[str, str]:
    """The certificate the client was shown, and the first two words nginx answered."""
    assert answer.status == 200, answer
    return answer.common_name, " ".join(answer.body.decode().split(" ")[:2])


RESUME_TRIES = 300
"""New backend connections made at most until one resumes a session."""


def until_reused(request: Callable[[int], tuple[int, str]]) -> list[str]:
    """The bodies of requests made one after the other, each on a new backend connection, up
    to the first nginx answers as resumed (`reused=r`); the test fails if none does."""
    bodies = []
    deadline = time.monotonic() + 20
    for i in range(RESUME_TRIES):
        status, body = request(i)
        assert status == 200, body
        bodies.append(body)
        if body.rstrip().endswith("reused=r"):
            return bodies
        if time.monotonic() > deadline:
            break
    raise AssertionError(f"no session resumed in {len(bodies)} new connections: {bodies[-3:]}")


def test_backend_tls_verifies_sends_sni_and_resumes(pki: Pki, tmp_path: Path) -> None:
    wrong_ca = make_ca(tmp_path, "Wrong CA")
    with nginx_tls(pki.server, "ng") as ng:
        ca = str(pki.ca.cert_path)
        cfg = services_toml(
            tmp_path / "origin.toml",
            {
                "secure": {  # every request on a new backend connection
                    "mode": "http", "backends": [ng.address], "health": FAST_HEALTH,
                    "backend_tls": {"ca": ca}, "http": {"max_idle": 0},
                },
                "named": {
                    "mode": "http", "backends": [ng.address], "health": FAST_HEALTH,
                    "backend_tls": {"ca": ca, "server_name": "a.example"},
                },
                "wrong": {
                    "mode": "http", "backends": [ng.address], "health": FAST_HEALTH,
                    "backend_tls": {"ca": str(wrong_ca.cert_path)},
                },
                "relay": {
                    "mode": "tcp", "backends": [ng.address], "health": FAST_HEALTH,
                    "backend_tls": {"ca": ca, "server_name": "a.example"},
                },
                "reencrypt": {  # TLS terminated here, and TLS again to the backend
                    "mode": "tcp", "backends": [ng.address], "health": FAST_HEALTH,
                    "tls": tls_of(pki.other), "backend_tls": {"ca": ca, "server_name": "a.example"},
                },
            },
        )  # fmt: skip
        bal = serve(cfg)
        try:

            def get(service: str, path: str = "/") -> tuple[int, str]:
                url = f"http://{HOST}:{bal.ports[service]}{path}"
                try:
                    with urllib.request.urlopen(url, timeout=10) as resp:
                        return resp.status, resp.read().decode()
                except urllib.error.HTTPError as exc:
                    return exc.code, exc.read().decode()

            # an IP address is checked against the certificate's IP names and sends no SNI
            status, body = get("secure")
            assert (status, body.split(" ")[:2]) == (200, ["ng", "sni="]), body
            status, body = get("named")
            assert (status, body.split(" ")[:2]) == (200, ["ng", "sni=a.example"]), body

            # the health checks speak TLS too: the backend is down for the certificate
            wait_until(lambda: "TLS" in str(backend_rows(bal.status(), "wrong")[ng.address]
                                            ["reason"]), what="the wrong CA reported")  # fmt: skip
            row = backend_rows(bal.status(), "wrong")[ng.address]
            assert row["state"] == "down", row
            assert "unable to get local issuer certificate" in row["reason"], row
            status, body = get("wrong")
            assert status == 503, (status, body)

            # new connections resume an earlier one's session (kept once its ticket came)
            secure_bodies = until_reused(lambda i: get("secure", f"/r{i}"))
            secure = tls_status(bal, "secure")
            assert secure["backend_handshakes"] >= len(secure_bodies), secure
            assert secure["backend_resumed"] >= 1, secure

            again = https_get(bal.ports["reencrypt"], "c.example", tls_client(pki.ca.cert_path),
                              "/again")  # fmt: skip
            assert answer_cn_and_body(again) == ("c.example", "ng sni=a.example")
            assert tls_status(bal, "reencrypt")["handshakes"] == 1
            assert tls_status(bal, "reencrypt")["backend_handshakes"] == 1

            relay_port = bal.ports["relay"]

            def relayed(i: int) -> tuple[int, str]:
                with socket.create_connection((HOST, relay_port), timeout=10) as sock:
                    sock.sendall(f"GET /t{i} HTTP/1.0\r\nHost: a.example\r\n\r\n".encode())
                    reply = read_all(sock)
                assert reply.startswith(b"HTTP/1.1 200"), reply[:200]
                return 200, reply.partition(b"\r\n\r\n")[2].decode()

            relay_bodies = until_reused(relayed)
            assert all("ng sni=a.example" in body for body in relay_bodies), relay_bodies
            relay = tls_status(bal, "relay")
            assert relay["backend_handshakes"] == len(relay_bodies), relay
            assert 1 <= relay["backend_resumed"] < len(relay_bodies), relay  # the first is full
            metrics = bal.metrics()
            resumed = metric_value(metrics, "balancer_backend_tls_handshakes_total",
                                   service="relay", kind="resumed")  # fmt: skip
            full = metric_value(metrics, "balancer_backend_tls_handshakes_total",
                                service="relay", kind="full")  # fmt: skip
            assert resumed == relay["backend_resumed"]
            assert full == len(relay_bodies) - relay["backend_resumed"]
        finally:
            assert bal.stop() == 0, bal.tail()


def test_backend_ca_rotation_is_picked_up_by_a_certificate_reload(tmp_path: Path) -> None:
    old_ca, new_ca = make_ca(tmp_path, "Old CA"), make_ca(tmp_path, "New CA")
    old_pair = make_cert(old_ca, tmp_path, ["a.example"])
    new_pair = make_cert(new_ca, tmp_path, ["a.example"])
    trusted = tmp_path / "trusted-ca.crt"
    shutil.copyfile(old_ca.cert_path, trusted)
    port = free_port()
    address = f"{HOST}:{port}"
    cfg = services_toml(tmp_path / "rotate.toml", {"web": {
        "mode": "http", "backends": [address], "health": FAST_HEALTH,
        "backend_tls": {"ca": str(trusted), "server_name": "a.example"},
        "http": {"max_idle": 0},  # every request on a new backend connection
    }})  # fmt: skip

    def get(bal: BalancerProc) -> tuple[int, str]:
        url = f"http://{HOST}:{bal.port}/"
        try:
            with urllib.request.urlopen(url, timeout=10) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    with serving(cfg) as bal:  # the backend is not there yet
        with nginx_tls(old_pair, "old", resumption=False, port=port):
            wait_until(lambda: backend_rows(bal.status(), "web")[address]["state"] == "up",
                       what="the old backend up")  # fmt: skip
            before = get(bal)
            assert before[0] == 200, before
        # the backend goes, to come back with a certificate of another CA
        wait_until(lambda: backend_rows(bal.status(), "web")[address]["state"] == "down",
                   what="the old backend down")  # fmt: skip
        shutil.copyfile(new_ca.cert_path, trusted)
        status, doc = call(bal, "POST", "/api/certificates/reload")
        assert status == 200, doc
        with nginx_tls(new_pair, "new", resumption=False, port=port):
            wait_until(lambda: backend_rows(bal.status(), "web")[address]["state"] == "up",
                       what="the new backend up (its health checks trust the new CA)")  # fmt: skip
            replies = [get(bal) for _ in range(3)]
            assert [status for status, _ in replies] == [200, 200, 200], replies


# -- redis through a terminating tcp service ---------------------------------------------------


def test_redis_through_a_tls_terminating_tcp_service(pki: Pki, tmp_path: Path) -> None:
    cli = need("redis-cli")
    with redis_server() as redis:
        cfg = services_toml(tmp_path / "redis.toml", {"redis": {
            "mode": "tcp", "backends": [redis.address], "health": FAST_HEALTH,
            "tls": tls_of(pki.server),
        }})  # fmt: skip
        bal = serve(cfg)
        try:
            port = bal.ports["redis"]
            base = [cli, "--tls", "--cacert", str(pki.ca.cert_path), "--sni", "a.example",
                    "-h", HOST, "-p", str(port)]  # fmt: skip

            def redis_cli(*args: str) -> str:
                done = subprocess.run([*base, *args], capture_output=True, text=True,
                                      timeout=15, check=False)  # fmt: skip
                assert done.returncode == 0, done.stderr
                return done.stdout.strip()

            assert redis_cli("SET", "k", "v") == "OK"
            assert redis_cli("GET", "k") == "v"
            # without TLS the port answers nothing
            plain = subprocess.run([cli, "-h", HOST, "-p", str(port), "PING"],
                                   capture_output=True, text=True, timeout=15,
                                   check=False)  # fmt: skip
            assert "PONG" not in plain.stdout
            wait_until(lambda: front_errors(bal, "redis").get("not_tls", 0) == 1,
                       what="the plain client counted")  # fmt: skip

            ctx = tls_client(pki.ca.cert_path)
            sizes = [1, 2, 100, 16 * 1024 - 1, 16 * 1024, 16 * 1024 + 1, 100_000, 1 << 20]

            async def values() -> None:
                reader, writer = await asyncio.open_connection(
                    HOST, port, ssl=ctx, server_hostname="a.example", limit=4 << 20
                )
                client = Resp(reader, writer)
                try:
                    for size in sizes:
                        value = os.urandom(size)
                        key = b"v%d" % size
                        assert await client.command(b"SET", key, value) == "OK"
                        assert await client.command(b"GET", key) == value, size
                    assert await client.command(b"STRLEN", b"v%d" % (1 << 20)) == 1 << 20
                finally:
                    await client.close()

            asyncio.run(values())
            # the direct view agrees: what went through TLS is what redis holds
            direct = subprocess.run([cli, "-h", HOST, "-p", str(redis.port), "STRLEN",
                                     "v100000"], capture_output=True, text=True, timeout=15,
                                    check=False)  # fmt: skip
            assert direct.stdout.strip() == "100000", direct
            assert tls_status(bal, "redis")["handshakes"] >= 3
        finally:
            assert bal.stop() == 0, bal.tail()


# -- SNI routing: TLS relayed untouched --------------------------------------------------------


def test_sni_routes_relay_tls_end_to_end(pki: Pki, tmp_path: Path) -> None:
    beta_cert = make_cert(pki.ca, tmp_path, ["x.b.example", "y.b.example"], cn="beta-backend")
    with nginx_tls(pki.server, "alpha") as alpha, nginx_tls(beta_cert, "beta") as beta:
        cfg = services_toml(
            tmp_path / "sni.toml",
            {
                "router": {
                    "mode": "tcp", "backends": [], "client_hello_timeout": 2,
                    "sni_routes": [
                        {"server_names": ["a.example"], "service": "alpha"},
                        {"server_names": ["*.b.example"], "service": "beta"},
                    ],
                },
                "alpha": {"mode": "tcp", "backends": [alpha.address], "health": FAST_HEALTH},
                "beta": {"mode": "tcp", "backends": [beta.address], "health": FAST_HEALTH},
            },
        )  # fmt: skip
        bal = serve(cfg)
        try:
            port = bal.ports["router"]
            ca = str(pki.ca.cert_path)

            def through(name: str) -> subprocess.CompletedProcess[str]:
                get = f"GET / HTTP/1.0\r\nHost: {name}\r\n\r\n".encode()
                return s_client(port, "-servername", name, "-verify_hostname", name,
                                "-verify_return_error", "-CAfile", ca, "-ign_eof",
                                send=get)  # fmt: skip

            to_alpha = through("a.example")
            assert to_alpha.returncode == 0, to_alpha.stderr
            assert subject_line(to_alpha.stdout) == "subject=CN = a.example"
            assert "alpha sni=a.example" in to_alpha.stdout, to_alpha.stdout
            to_beta = through("x.b.example")
            assert to_beta.returncode == 0, to_beta.stderr
            # the certificate the client checked is beta's backend's own
            assert subject_line(to_beta.stdout) == "subject=CN = beta-backend"
            assert "beta sni=x.b.example" in to_beta.stdout, to_beta.stdout
            # Python's client, verifying the name, over the router
            answer = https_get(port, "y.b.example", tls_client(pki.ca.cert_path))
            assert answer.common_name == "beta-backend"
            assert answer.body == b"beta sni=y.b.example reused=.\n"

            for name in ("unknown.example", "b.example"):  # *.b.example is not b.example
                lost = through(name)
                assert lost.returncode != 0, lost.stdout
                assert "sni=" not in lost.stdout
            no_name = s_client(port, "-noservername", "-CAfile", ca)
            assert no_name.returncode != 0
            with socket.create_connection((HOST, port), timeout=10) as plain:
                plain.sendall(b"GET / HTTP/1.0\r\n\r\n")
                assert b"HTTP/" not in read_all(plain)
            wait_until(lambda: front_errors(bal, "router") == {"sni_no_route": 3, "not_tls": 1},
                       what="the refused connections counted")  # fmt: skip
            status = tls_status(bal, "router")
            assert status["routed"] == {"alpha": 1, "beta": 2}, status
            assert status["terminating"] is False
            assert status["handshakes"] == 0  # nothing was terminated here
            metrics = bal.metrics()
            for service, count in (("alpha", 1), ("beta", 2)):
                got = [line for line in metrics.splitlines()
                       if line.startswith("balancer_sni_routed_total{")
                       and f'"{service}"' in line]  # fmt: skip
                assert got, metrics
                assert float(got[0].rsplit(" ", 1)[1]) == count, got
        finally:
            assert bal.stop() == 0, bal.tail()


# -- certificates reloaded under load ----------------------------------------------------------


@dataclass
class HttpsLoad:
    """Sequential HTTPS requests, each on a new connection (a full handshake that shows the
    certificate served then), in a thread: at most `limit` of them, for at most `seconds`."""

    port: int
    ctx: ssl.SSLContext
    limit: int = 2000
    seconds: float = 60.0
    done: int = 0
    names: list[str] = field(default_factory=list)
    """The common names of the certificates seen, each time it changed."""
    failures: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        deadline = time.monotonic() + self.seconds
        while not self.stop.is_set() and self.done < self.limit and time.monotonic() < deadline:
            try:
                answer = https_get(self.port, "a.example", self.ctx, f"/n{self.done}")
                if answer.status != 200:
                    self.failures.append(f"status {answer.status}")
                elif not self.names or self.names[-1] != answer.common_name:
                    self.names.append(answer.common_name)
            except (OSError, ssl.SSLError, http.client.HTTPException) as exc:
                self.failures.append(repr(exc))
            self.done += 1

    @property
    def running(self) -> bool:
        return self.thread.is_alive()

    def serves(self, name: str) -> bool:
        assert self.running, f"the load ended early after {self.done} requests"
        return bool(self.names) and self.names[-1] == name

    def more(self, count: int) -> None:
        """Wait for `count` more requests to be done."""
        target = self.done + count
        wait_until(lambda: self.done >= target or not self.running, what=f"{count} requests")
        assert self.done >= target, f"the load ended early after {self.done} requests"


def _install(pair: Pair, cert: Path, key: Path) -> None:
    """`pair` moved in as `cert` and `key`, each file replaced whole."""
    for source, target in ((pair.cert_path, cert), (pair.key_path, key)):
        staged = target.with_name(target.name + ".new")
        shutil.copyfile(source, staged)
        os.chmod(staged, 0o600)
        os.replace(staged, target)


def _serial(pair: Pair) -> str:
    return openssl("x509", "-noout", "-serial", "-in", pair.cert_path).strip().split("=")[1]


def test_certificates_reload_under_load_without_a_failed_request(pki: Pki, tmp_path: Path) -> None:
    live = tmp_path / "live"
    live.mkdir()
    cert, key = live / "web.crt", live / "web.key"
    _install(pki.server, cert, key)
    first = make_cert(pki.ca, tmp_path, ["a.example"], cn="reloaded-1", days=90)
    second = make_cert(pki.ca, tmp_path, ["a.example"], cn="reloaded-2", days=60)
    with echoes("e") as (echo,):
        cfg = services_toml(tmp_path / "web.toml", {"web": {
            "mode": "http", "backends": [echo.address], "health": FAST_HEALTH,
            "tls": {"cert": str(cert), "key": str(key)},
        }})  # fmt: skip
        bal = serve(cfg)
        load = HttpsLoad(bal.ports["web"], tls_client(pki.ca.cert_path))
        early: ssl.SSLSocket | None = None
        try:
            early_raw = socket.create_connection((HOST, bal.ports["web"]), timeout=10)
            early = tls_client(pki.ca.cert_path).wrap_socket(early_raw, server_hostname="a.example")
            assert keepalive_get(early, "/before")[0] == 200
            load.thread.start()
            wait_until(lambda: load.serves("a.example"), what="the load under way")
            load.more(50)
            loaded_at = tls_status(bal, "web")["loaded_at"]

            _install(first, cert, key)
            status, doc = call(bal, "POST", "/api/certificates/reload")
            assert status == 200, doc
            wait_until(lambda: load.serves("reloaded-1"), what="the first new certificate served")
            served = tls_status(bal, "web")
            assert [c["subject"] for c in served["certificates"]] == ["CN=reloaded-1"]
            assert 89 < served["certificates"][0]["days_left"] <= 90
            assert served["loaded_at"] > loaded_at
            load.more(50)

            # a bad file: refused, nothing changed, the certificate served stays
            cert.write_text("-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n")
            status, doc = call(bal, "POST", "/api/certificates/reload")
            assert status == 400, doc
            assert str(cert) in str(doc), doc
            load.more(50)
            assert load.serves("reloaded-1")
            kept = tls_status(bal, "web")
            assert [c["subject"] for c in kept["certificates"]] == ["CN=reloaded-1"]
            assert kept["loaded_at"] == served["loaded_at"]

            _install(second, cert, key)
            bal.signal(signal.SIGHUP)
            wait_until(lambda: load.serves("reloaded-2"), what="the SIGHUP's certificate served")
            load.more(50)
            # a connection made before the reloads goes on, with the certificate it was made with
            assert keepalive_get(early, "/after")[0] == 200
            assert dict(early.getpeercert() or {})["serialNumber"] == _serial(pki.server)
        finally:
            if early is not None:
                early.close()
            load.stop.set()
            if load.thread.ident is not None:
                load.thread.join(30)
            code = bal.stop()
        assert code == 0, bal.tail()
    assert load.failures == [], load.failures[:5]
    assert load.names == ["a.example", "reloaded-1", "reloaded-2"]
    assert load.done >= 250


def test_certificate_status_and_metrics_follow_a_reload(pki: Pki, tmp_path: Path) -> None:
    live = tmp_path / "live"
    live.mkdir()
    cert, key = live / "web.crt", live / "web.key"
    _install(pki.server, cert, key)
    fresh = make_cert(pki.ca, tmp_path, ["a.example"], cn="renewed", days=200)
    with echoes("e") as (echo,):
        cfg = services_toml(tmp_path / "web.toml", {"web": {
            "mode": "http", "backends": [echo.address], "tls": {"cert": str(cert), "key": str(key)},
        }})  # fmt: skip
        bal = serve(cfg)
        try:
            ctx = tls_client(pki.ca.cert_path)
            assert https_get(bal.ports["web"], "a.example", ctx).serial == _serial(pki.server)
            before = metric_value(bal.metrics(), "balancer_tls_certificate_expiry_days",
                                  service="web", subject="CN=a.example")  # fmt: skip
            assert before is not None
            assert 29 < before <= 30, before
            _install(fresh, cert, key)
            status, doc = call(bal, "POST", "/api/certificates/reload")
            assert status == 200, doc
            assert https_get(bal.ports["web"], "a.example", ctx).serial == _serial(fresh)
            metrics = bal.metrics()
            after = metric_value(metrics, "balancer_tls_certificate_expiry_days",
                                 service="web", subject="CN=renewed")  # fmt: skip
            assert after is not None
            assert 199 < after <= 200, after
            assert metric_value(metrics, "balancer_tls_certificate_expiry_days",
                                service="web", subject="CN=a.example") is None  # fmt: skip
            [shown] = tls_status(bal, "web")["certificates"]
            assert (shown["path"], shown["subject"]) == (str(cert), "CN=renewed")
            assert shown["server_names"] == ["a.example"]
        finally:
            assert bal.stop() == 0, bal.tail()


# -- message mode over TLS ---------------------------------------------------------------------


def test_message_mode_line_protocol_over_tls(pki: Pki, tmp_path: Path) -> None:
    sample = start_service()
    try:
        cfg = services_toml(tmp_path / "numbers.toml", {"numbers": {
            "mode": "message", "backends": [f"{HOST}:{sample.port}"], "tls": tls_of(pki.server),
        }})  # fmt: skip
        bal = serve(cfg)
        try:
            port = bal.ports["numbers"]
            ctx = tls_client(pki.ca.cert_path)
            with (
                socket.create_connection((HOST, port), timeout=10) as raw,
                ctx.wrap_socket(raw, server_hostname="a.example") as tls,
                tls.makefile("rb") as reader,
            ):
                tls.sendall(b"7\n")
                assert reader.readline().decode().rstrip("\n") == reply_for(7)
                tls.sendall(b"".join(b"%d\n" % i for i in range(20)))  # pipelined
                replies = [reader.readline().decode().rstrip("\n") for _ in range(20)]
                assert replies == [reply_for(i) for i in range(20)]
                tls.sendall(b"hello\n")
                assert reader.readline() == b"Invalid message\n"
            # a plain client on the same port gets no reply
            with socket.create_connection((HOST, port), timeout=10) as plain:
                plain.sendall(b"7\n")
                assert reply_for(7).encode() not in read_all(plain)
            wait_until(lambda: front_errors(bal, "numbers").get("not_tls") == 1,
                       what="the plain client counted")  # fmt: skip
            assert tls_status(bal, "numbers")["handshakes"] == 1
        finally:
            assert bal.stop() == 0, bal.tail()
    finally:
        sample.stop()
