"""Http mode end to end: `balancer serve` in its own process between real clients (curl,
wrk, aiohttp, raw sockets) and real backends (echo processes, nginx)."""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.http_e2e_support import (
    EchoProc,
    RssSampler,
    curl,
    curl_json,
    echoes,
    nginx_backends,
    start_http,
    wrk_counts,
)
from tests.http_echo_backend import pieces
from tests.peers import HOST, Peer, need
from tests.support import BalancerProc, backend_rows, wait_until

pytestmark = [pytest.mark.peers, pytest.mark.e2e]

STATIC = bytes(range(256)) * 1200  # 300 KiB of static file
SMALL = b"<html><body>hello from nginx</body></html>\n"
ACCESS_RE = re.compile(r" web (\S+) -> (\S+) \"(\S+) (\S+)\" (\d+) in=\d+ out=\d+ .* id=(\S+)$")


def headers_of(seen: dict[str, Any]) -> dict[str, str]:
    return {str(k).lower(): str(v) for k, v in seen["headers"]}


def url(bal: BalancerProc, path: str = "/") -> str:
    return f"http://{HOST}:{bal.port}{path}"


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[BalancerProc, list[EchoProc]]]:
    """Two echo backends behind one balancer with the access log on and header_timeout 1."""
    tmp = tmp_path_factory.mktemp("pair")
    with echoes("a", "b") as backends:
        bal = start_http(
            tmp / "web.toml",
            [b.address for b in backends],
            "--access-log",
            http={"header_timeout": 1},
        )
        try:
            yield bal, backends
        finally:
            assert bal.stop() == 0, bal.tail()


@pytest.fixture(scope="module")
def nginx_web(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[BalancerProc, list[Peer]]]:
    """Two nginx servers (static files, `return 404` and `return 503`) behind a balancer."""
    tmp = tmp_path_factory.mktemp("nginx")
    with nginx_backends(2, {"static.bin": STATIC, "index.html": SMALL}) as peers:
        bal = start_http(tmp / "web.toml", [p.address for p in peers])
        try:
            yield bal, peers
        finally:
            assert bal.stop() == 0, bal.tail()


# -- curl ------------------------------------------------------------------------------------


def test_curl_gets_and_posts_round_robin_over_http_1_1(
    pair: tuple[BalancerProc, list[EchoProc]], tmp_path: Path
) -> None:
    bal, _ = pair
    names = [curl_json(url(bal, f"/get?i={i}"))["backend"] for i in range(4)]
    assert names in (["a", "b", "a", "b"], ["b", "a", "b", "a"]), names
    body = os.urandom(200_000)  # curl sends Expect: 100-continue for a body this size
    (tmp_path / "body").write_bytes(body)
    posted = [
        curl_json(url(bal, "/post"), "--data-binary", f"@{tmp_path / 'body'}") for _ in range(2)
    ]
    assert {p["backend"] for p in posted} == {"a", "b"}
    for seen in posted:
        assert (seen["method"], seen["path"]) == ("POST", "/post")
        assert (seen["length"], seen["sha"]) == (len(body), hashlib.sha256(body).hexdigest())
    verbose = curl("-v", url(bal, "/verbose"))
    assert verbose.returncode == 0, verbose.stderr
    assert "> GET /verbose HTTP/1.1" in verbose.stderr
    assert re.search(r"^< HTTP/1\.1 200", verbose.stderr, re.M), verbose.stderr
    seen = json.loads(verbose.stdout)
    assert headers_of(seen)["x-forwarded-for"] == "127.0.0.1"
    assert headers_of(seen)["host"] == f"{HOST}:{bal.port}"


# -- nginx as the backends -------------------------------------------------------------------


def test_nginx_statuses_pass_through_and_head_has_no_body(
    nginx_web: tuple[BalancerProc, list[Peer]],
) -> None:
    bal, peers = nginx_web
    conn = http.client.HTTPConnection(HOST, bal.port, timeout=10)
    try:
        for path, status, body in [("/static.bin", 200, STATIC), ("/missing", 404, None),
                                   ("/busy", 503, None)] * 2:  # fmt: skip
            conn.request("GET", path)
            response = conn.getresponse()
            data = response.read()
            assert response.status == status, (path, data[:200])
            assert response.getheader("Server", "").startswith("nginx")
            if body is not None:
                assert data == body
    finally:
        conn.close()
    served = {a: b["requests"] for a, b in backend_rows(bal.status(), "web").items()}
    assert served == {p.address: 3 for p in peers}
    # HEAD then GET pipelined on one connection: the HEAD's answer carries the file's length
    # and no body, so the next bytes are the second response's status line.
    with socket.create_connection((HOST, bal.port), timeout=10) as sock:
        sock.sendall(
            b"HEAD /static.bin HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /missing HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        data = read_to_eof(sock)
    head, _, rest = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), data[:300]
    assert b"\r\nContent-Length: %d" % len(STATIC) in head, head
    assert rest.startswith(b"HTTP/1.1 404"), rest[:100]


def test_wrk_through_the_proxy_to_nginx_has_no_errors(
    nginx_web: tuple[BalancerProc, list[Peer]],
) -> None:
    bal, _ = nginx_web
    done = subprocess.run(
        [need("wrk"), "-t1", "-c20", "-d2s", url(bal, "/index.html")],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    counts = wrk_counts(done.stdout)
    assert counts["requests"] > 200, done.stdout
    assert counts["non2xx"] == 0, done.stdout
    assert counts["socket_errors"] == 0, done.stdout


def read_to_eof(sock: socket.socket) -> bytes:
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            return data
        data += chunk
    return data


# -- backends failing ------------------------------------------------------------------------


async def get_many(port: int, total: int, concurrency: int, kill_at: int, pid: int) -> list[Any]:
    """`total` GETs from `concurrency` workers; SIGKILL to `pid` once `kill_at` are done.
    Each result is a status, or the exception the request raised."""
    results: list[Any] = []
    todo = iter(range(total))
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def worker() -> None:
            for i in todo:
                try:
                    async with session.get(f"http://{HOST}:{port}/load?i={i}") as response:
                        await response.read()
                        results.append(response.status)
                except (aiohttp.ClientError, TimeoutError) as exc:
                    results.append(exc)
                if len(results) == kill_at:
                    os.kill(pid, signal.SIGKILL)

        async with asyncio.timeout(40):
            await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results


def test_kill_9_of_a_backend_under_load_fails_no_get(tmp_path: Path) -> None:
    with echoes("a", "b") as backends:
        bal = start_http(tmp_path / "web.toml", [b.address for b in backends])
        try:
            victim = backends[0]
            results = asyncio.run(get_many(bal.port, 2000, 20, 400, victim.pid))
            assert victim.popen.wait(5) == -signal.SIGKILL
            failed = [r for r in results if r != 200]
            assert len(results) == 2000
            assert failed == [], f"{len(failed)} failed, first: {failed[:5]}"
            status = bal.status()
            assert status["services"]["web"]["retries"] > 0, "no request met the dead backend"
            rows = backend_rows(status, "web")
            assert rows[backends[1].address]["requests"] > 1000
            assert rows[victim.address]["state"] != "up"
        finally:
            assert bal.stop() == 0, bal.tail()


@pytest.mark.parametrize(
    ("path", "warm"),
    [("/die", False), ("/die", True), ("/hang", True)],
    ids=["exits-fresh-connection", "exits-reused-connection", "killed-reused-connection"],
)
def test_a_post_the_backend_died_on_is_not_replayed(tmp_path: Path, path: str, warm: bool) -> None:
    """/die records the POST and exits unanswered; /hang records it and the test kills the
    backend. On a reused upstream connection the proxy tries once more on a fresh one (the
    keep-alive race), which the dead backend refuses: the POST goes no further."""
    record = tmp_path / "died.jsonl"

    def recorded() -> list[dict[str, Any]]:
        text = record.read_text() if record.exists() else ""
        return [json.loads(line) for line in text.splitlines()]

    with echoes("a", "b", record=record) as backends:
        bal = start_http(tmp_path / "web.toml", [b.address for b in backends])
        try:
            conn = http.client.HTTPConnection(HOST, bal.port, timeout=10)
            if warm:  # each backend then has a kept-alive upstream connection in the pool
                for _ in range(4):
                    conn.request("GET", "/warm")
                    assert conn.getresponse().read()
            conn.request("POST", path, body=b"order=1")
            if path == "/hang":
                wait_until(lambda: bool(recorded()), 10, "the backend to take the POST")
                victim = next(b for b in backends if b.label == recorded()[0]["backend"])
                os.kill(victim.pid, signal.SIGKILL)
            response = conn.getresponse()
            body = response.read()
            conn.close()
            wait_until(lambda: any(b.popen.poll() is not None for b in backends), 10, "a death")
            lines = recorded()
            assert [(s["method"], s["path"]) for s in lines] == [("POST", path)], lines
            dead = {b.label for b in backends if b.popen.poll() is not None}
            assert dead == {lines[0]["backend"]}, "the other backend saw the POST too"
            assert response.status == 502, body
            alive = curl_json(url(bal, "/after"))
            assert alive["backend"] not in dead
        finally:
            assert bal.stop() == 0, bal.tail()


# -- large bodies ----------------------------------------------------------------------------

SIZE = 100 * 1024 * 1024
RSS_BOUND_MB = 100
PAUSE = 0.5
"""Seconds the receiving side stops reading once the transfer began: a proxy without
backpressure would take in the whole body meanwhile."""


async def download(port: int, size: int) -> tuple[int, str]:
    sha = hashlib.sha256()
    length = 0
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        async with session.get(f"http://{HOST}:{port}/bytes/{size}") as response:
            assert response.status == 200
            assert response.content_length == size
            async for data in response.content.iter_chunked(1 << 20):
                if not length:  # a slow reader: the backend's bytes wait (or pile up) meanwhile
                    await asyncio.sleep(PAUSE)
                sha.update(data)
                length += len(data)
    return length, sha.hexdigest()


async def upload(port: int, size: int) -> tuple[dict[str, Any], str]:
    piece = os.urandom(1 << 20)
    sha = hashlib.sha256()

    async def body() -> AsyncIterator[bytes]:
        for i in range(size // len(piece)):
            data = bytes([i % 256]) + piece[1:]
            sha.update(data)
            yield data

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        async with session.post(
            f"http://{HOST}:{port}/upload?pause={PAUSE}", data=body()
        ) as response:
            assert response.status == 200
            seen: dict[str, Any] = await response.json()
    return seen, sha.hexdigest()


def test_100_mb_each_way_streams_in_bounded_memory(tmp_path: Path) -> None:
    expected = hashlib.sha256()
    for data in pieces(SIZE):
        expected.update(data)
    with echoes("a") as backends:
        bal = start_http(tmp_path / "web.toml", [backends[0].address])
        try:
            with RssSampler(bal.pid) as down:
                length, sha = asyncio.run(download(bal.port, SIZE))
            assert (length, sha) == (SIZE, expected.hexdigest())
            with RssSampler(bal.pid) as up:
                seen, sent_sha = asyncio.run(upload(bal.port, SIZE))
            assert (seen["length"], seen["sha"]) == (SIZE, sent_sha)
            assert headers_of(seen).get("transfer-encoding") == "chunked"
            assert down.samples > 5
            assert up.samples > 5
            assert down.growth_mb < RSS_BOUND_MB, f"download: RSS grew {down.growth_mb:.0f} MB"
            assert up.growth_mb < RSS_BOUND_MB, f"upload: RSS grew {up.growth_mb:.0f} MB"
            print(f"RSS growth: download {down.growth_mb:.1f} MB, upload {up.growth_mb:.1f} MB")
        finally:
            assert bal.stop() == 0, bal.tail()


# -- slow clients, WebSocket, the access log -------------------------------------------------


def test_slowloris_gets_408_within_header_timeout_while_others_are_served(
    pair: tuple[BalancerProc, list[EchoProc]],
) -> None:
    bal, _ = pair
    slow = []
    for _ in range(10):
        sock = socket.create_connection((HOST, bal.port), timeout=5)
        sock.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\nX-Pad: ")  # and never the rest
        slow.append((sock, time.monotonic()))
    try:
        served = [curl_json(url(bal, f"/meanwhile?i={i}"))["path"] for i in range(5)]
        assert served == [f"/meanwhile?i={i}" for i in range(5)]
        for sock, started in slow:
            data = read_to_eof(sock)
            took = time.monotonic() - started
            assert data.startswith(b"HTTP/1.1 408"), data[:200]
            assert 0.8 <= took <= 2.5, f"closed after {took:.2f}s, header_timeout is 1"
    finally:
        for sock, _ in slow:
            sock.close()
    assert curl_json(url(bal, "/after"))["path"] == "/after"


def test_websocket_echo_through_the_proxy(pair: tuple[BalancerProc, list[EchoProc]]) -> None:
    bal, _ = pair

    async def talk() -> list[str]:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            async with session.ws_connect(url(bal, "/ws")) as ws:
                replies = []
                for word in ("one", "two", "x" * 100_000):
                    await ws.send_str(word)
                    replies.append(await ws.receive_str())
                return replies

    replies = asyncio.run(talk())
    backend = replies[0].split(":", 1)[0]
    assert backend in ("a", "b")
    assert replies == [f"{backend}:one", f"{backend}:two", f"{backend}:" + "x" * 100_000]


def test_access_log_has_a_line_per_request_with_the_request_id_the_backend_saw(
    pair: tuple[BalancerProc, list[EchoProc]],
) -> None:
    bal, backends = pair
    address = {b.label: b.address for b in backends}
    seen = [curl_json(url(bal, f"/logged/{i}")) for i in range(3)]
    seen.append(curl_json(url(bal, "/logged/3"), "-H", "X-Request-Id: given-id-123"))
    assert headers_of(seen[3])["x-request-id"] == "given-id-123"

    def logged() -> list[re.Match[str]]:
        found = (ACCESS_RE.search(line) for line in list(bal.lines))
        return [m for m in found if m is not None and "/logged/" in m.group(4)]

    wait_until(lambda: len(logged()) >= len(seen), 10, "the access log lines")
    lines = logged()
    assert len(lines) == len(seen), "\n".join(m.string for m in lines)
    for i, (match, doc) in enumerate(zip(lines, seen, strict=True)):
        client, backend, method, path, status, rid = match.groups()
        assert client.startswith("127.0.0.1:")
        assert (method, path, status) == ("GET", f"{HOST}:{bal.port}/logged/{i}", "200")
        assert backend == address[doc["backend"]]
        assert rid == headers_of(doc)["x-request-id"]
