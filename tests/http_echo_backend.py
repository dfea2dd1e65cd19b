"""An HTTP echo backend as its own process, for the http-mode end-to-end tests.

    python tests/http_echo_backend.py NAME PORT [RECORD_FILE]

Listens on 127.0.0.1:PORT (0: any free port) and prints
`echo NAME listening on 127.0.0.1:PORT` once it accepts. Every request's body is
read as it streams in and hashed; the answer is JSON with the backend's name,
method, path, headers, body sha256 and length. Besides:

- `/bytes/N` streams N bytes of `pattern(N)` (Content-Length N);
- `/status/CODE` answers that status;
- `?pause=SECONDS` waits that long before reading the request body;
- `/ws` is a WebSocket echo (`NAME:text`);
- `/die` appends what it received to RECORD_FILE as a JSON line, then exits at once
  (`os._exit(1)`) without answering: a backend that acted on a request and crashed;
- `/hang` records the same way, then never answers (for the test to kill the process);
- `/rec/...` records the same way, then answers as any other path (a soak counts how often
  each request reached a backend).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sys
from collections.abc import Iterator
from typing import Any

from aiohttp import web

HOST = "127.0.0.1"
PIECE = 256 * 1024


def pattern(size: int) -> bytes:
    """The bytes /bytes/SIZE sends: a repeating 251-byte cycle, so that offsets matter."""
    cycle = bytes(range(251))
    return (cycle * (size // len(cycle) + 1))[:size]


def pieces(size: int) -> Iterator[bytes]:
    """`pattern(size)` in pieces of at most PIECE bytes, as /bytes/SIZE sends it."""
    block = pattern(PIECE + 251)  # any piece of the stream is a slice of this
    sent = 0
    while sent < size:
        n = min(PIECE, size - sent)
        start = sent % 251
        yield block[start : start + n]
        sent += n


def note(record: str, seen: dict[str, Any]) -> None:
    """`seen` appended to the file `record` as a JSON line, on disk before we go on."""
    with open(record, "a", encoding="utf-8") as out:
        out.write(json.dumps(seen) + "\n")


def app(name: str, record: str | None) -> web.Application:

    async def handle(request: web.Request) -> web.StreamResponse:
        pause = float(request.query.get("pause", "0"))
        if pause:  # a slow reader: the request body waits in the proxy meanwhile (or not)
            await asyncio.sleep(pause)
        sha = hashlib.sha256()
        length = 0
        async for data in request.content.iter_any():
            sha.update(data)
            length += len(data)
        seen: dict[str, Any] = {
            "backend": name,
            "method": request.method,
            "path": request.path_qs,
            "headers": [[k, v] for k, v in request.headers.items()],
            "sha": sha.hexdigest(),
            "length": length,
        }
        path = request.path
        if path.startswith("/rec/") and record is not None:
            note(record, seen)
        if path in ("/die", "/hang"):
            if record is not None:
                note(record, seen)
            if path == "/die":
                os._exit(1)
            await asyncio.Event().wait()
        if path.startswith("/status/"):
            return web.json_response(seen, status=int(path.rsplit("/", 1)[1]))
        if path.startswith("/bytes/"):
            return await stream(request, int(path.rsplit("/", 1)[1]))
        if path == "/ws":
            ws = web.WebSocketResponse()
            await ws.prepare(request)
            async for msg in ws:
                await ws.send_str(f"{name}:{msg.data}")
            return ws
        return web.json_response(seen)

    async def stream(request: web.Request, size: int) -> web.StreamResponse:
        response = web.StreamResponse()
        response.content_length = size
        await response.prepare(request)
        for piece in pieces(size):
            await response.write(piece)
        return response

    application = web.Application(client_max_size=1 << 40)
    application.router.add_route("*", "/{tail:.*}", handle)
    return application


async def main(name: str, port: int, record: str | None) -> None:
    runner = web.AppRunner(app(name, record), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, HOST, port)
    await site.start()
    bound = int(runner.addresses[0][1])
    print(f"echo {name} listening on {HOST}:{bound}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else None))
