"""Backends, clients and an in-process http-mode service for the http tests.

Every backend listens on 127.0.0.1 port 0 in the test's own event loop:
`echo_backend` is an aiohttp app that answers what it received (method,
path, headers, a hash of the body, and which connection it came on), and
`raw_backend` runs a coroutine per connection for the faults no real server
makes on purpose.
"""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import json
import socket
import struct
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from aiohttp import web

from balancer.config.model import BackendConfig, HealthConfig, HttpConfig, ServiceConfig
from balancer.core.http.wire import Body, End, Head, ResponseReader
from balancer.core.pool import BackendPool
from balancer.proxy.http.service import HttpService

HOST = "127.0.0.1"
STEP = 20.0
"""Upper bound of any one wait on the network: a broken proxy fails a test, never hangs it."""


@dataclass
class Echo:
    """An echo backend and what it saw."""

    port: int
    name: str
    requests: list[dict[str, Any]] = field(default_factory=list)
    peers: set[int] = field(default_factory=set)
    """Client ports of the connections requests came on (the proxy's upstream connections)."""

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"


def _echo_app(echo: Echo) -> web.Application:
    async def handle(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        peer = request.transport.get_extra_info("peername") if request.transport else None
        if peer:
            echo.peers.add(peer[1])
        seen = {
            "backend": echo.name,
            "method": request.method,
            "path": request.path_qs,
            "headers": [[k, v] for k, v in request.headers.items()],
            "sha": hashlib.sha256(body).hexdigest(),
            "length": len(body),
        }
        echo.requests.append(seen)
        if request.path.startswith("/status/"):
            return web.Response(status=int(request.path.rsplit("/", 1)[1]), text=echo.name)
        if request.path.startswith("/bytes/"):
            size = int(request.path.rsplit("/", 1)[1])
            response = web.StreamResponse()
            response.content_length = size
            await response.prepare(request)
            piece = b"x" * 65536
            left = size
            while left > 0:
                await response.write(piece[: min(left, len(piece))])
                left -= len(piece)
            return response
        if request.path == "/chunked":
            response = web.StreamResponse()
            response.enable_chunked_encoding()
            await response.prepare(request)
            for part in (b"one,", b"two,", b"three"):
                await response.write(part)
            await response.write_eof()
            return response
        if request.path == "/ws":
            ws = web.WebSocketResponse()
            await ws.prepare(request)
            async for msg in ws:
                await ws.send_str(f"{echo.name}:{msg.data}")
            return ws
        return web.json_response(seen)

    app = web.Application(client_max_size=1 << 30)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


@asynccontextmanager
async def echo_backend(name: str = "a", keepalive_timeout: float = 75.0) -> AsyncIterator[Echo]:
    """An echo backend; it closes a connection idle for `keepalive_timeout`, as servers do."""
    echo = Echo(0, name)
    runner = web.AppRunner(_echo_app(echo), access_log=None, keepalive_timeout=keepalive_timeout)
    await runner.setup()
    site = web.TCPSite(runner, HOST, 0)
    await site.start()
    echo.port = int(runner.addresses[0][1])
    try:
        yield echo
    finally:
        await runner.cleanup()


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@dataclass
class Raw:
    port: int
    connections: int = 0

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"


@asynccontextmanager
async def raw_backend(handler: Handler) -> AsyncIterator[Raw]:
    """A backend running `handler` for each connection."""
    raw = Raw(0)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raw.connections += 1
        try:
            await handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, HOST, 0)
    raw.port = server.sockets[0].getsockname()[1]
    try:
        yield raw
    finally:
        server.close()


async def read_request(reader: asyncio.StreamReader) -> bytes:
    """A request head (and its Content-Length body) from a raw backend's connection."""
    head = await reader.readuntil(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            head += await reader.readexactly(int(line.split(b":", 1)[1]))
    return head


def reset(writer: asyncio.StreamWriter) -> None:
    """Drop a raw backend's connection with an RST (SO_LINGER 0), as a crashing server does."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def make_service(
    backends: list[str], retries: int = 2, service: dict[str, Any] | None = None, **http: Any
) -> HttpService:
    service = dict(service or {})
    config = ServiceConfig(
        name=service.pop("name", "web"),
        listen_host=HOST,
        listen_port=0,
        backends=tuple(BackendConfig(b.split(":")[0], int(b.split(":")[1])) for b in backends),
        mode="http",
        retries=retries,
        health=HealthConfig(enabled=False),
        http=HttpConfig(**http),
        **service,
    )
    return HttpService(config, BackendPool(config))


@asynccontextmanager
async def http_service(
    backends: list[str], retries: int = 2, service: dict[str, Any] | None = None, **http: Any
) -> AsyncIterator[tuple[HttpService, int]]:
    svc = make_service(backends, retries, service, **http)
    _, port = await svc.start()
    try:
        yield svc, port
    finally:
        await svc.drain(2.0)


@dataclass
class Response:
    head: Head
    body: bytes
    trailers: list[tuple[bytes, bytes]]

    @property
    def status(self) -> int:
        return self.head.status

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.head.headers:
            if key.lower() == name.lower():
                return value
        return None

    def json(self) -> Any:
        return json.loads(self.body)


OPEN: list[asyncio.StreamWriter] = []
"""Client connections the tests opened: closed after each test (`close_clients`)."""


async def close_clients() -> None:
    while OPEN:
        writer = OPEN.pop()
        writer.close()
        try:
            await writer.wait_closed()
        except (ConnectionError, OSError):
            pass


class RawClient:
    """A client connection that writes raw bytes and reads responses with a strict parser."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        OPEN.append(writer)
        self.reader = reader
        self.writer = writer
        self.parser = ResponseReader()
        self.pending: list[Any] = []
        self.closed = False

    @classmethod
    async def open(cls, port: int) -> RawClient:
        reader, writer = await asyncio.open_connection(HOST, port)
        return cls(reader, writer)

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def response(self, method: bytes = b"GET") -> Response | None:
        """The next response, or None when the proxy closed the connection first."""
        self.parser.expect(method)
        head: Head | None = None
        body = bytearray()
        async with asyncio.timeout(STEP):
            while True:
                while self.pending:
                    event = self.pending.pop(0)
                    if type(event) is Head:
                        if event.status < 200 and event.status != 101:
                            continue
                        head = event
                    elif type(event) is Body:
                        body += event.data
                    elif type(event) is End and head is not None:
                        return Response(head, bytes(body), event.trailers)
                if self.closed:
                    return None
                data = await self.reader.read(65536)
                if not data:
                    self.closed = True
                    self.pending += self.parser.feed_eof()
                else:
                    self.pending += self.parser.feed(data)

    async def at_eof(self) -> bool:
        """The proxy closed the connection (within STEP), with nothing more sent."""
        async with asyncio.timeout(STEP):
            data = await self.reader.read(65536)
        return data == b""

    def close(self) -> None:
        self.writer.close()


async def until(predicate: Callable[[], bool], what: str = "") -> None:
    """Wait (at most STEP) until `predicate()` holds, looking every few milliseconds."""
    async with asyncio.timeout(STEP):
        for _ in range(int(STEP / 0.005)):
            if predicate():
                return
            await asyncio.sleep(0.005)
    raise AssertionError(f"not reached: {what or predicate}")


def get(path: str = "/", host: str = "example.test", extra: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode()


def post(path: str, body: bytes, host: str = "example.test") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        + body
    )


class _Plain(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        body = self.path.encode()
        self.send_response(404 if self.path == "/missing" else 200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextmanager
def threaded_backend() -> Iterator[int]:
    """A plain HTTP/1.1 backend in a thread, for tests that drive a `balancer serve`
    process: GET answers the path, 200 (404 for /missing). Yields its port."""
    server = ThreadingHTTPServer((HOST, 0), _Plain)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


BAD_REQUEST = b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"
"""Two lengths that disagree: a 400 of the balancer's own."""


def serve_some(port: int) -> None:
    """Through an http service on `port`: two 200s and a 404 on one kept-alive
    connection, then a malformed request the balancer answers 400."""
    conn = http.client.HTTPConnection(HOST, port, timeout=STEP)
    try:
        for path, status in (("/", 200), ("/a", 200), ("/missing", 404)):
            conn.request("GET", path)
            response = conn.getresponse()
            assert response.status == status
            assert response.read() == path.encode()
    finally:
        conn.close()
    with socket.create_connection((HOST, port), timeout=STEP) as sock:
        sock.sendall(BAD_REQUEST)
        assert sock.recv(65536).startswith(b"HTTP/1.1 400 ")
