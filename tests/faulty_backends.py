"""Misbehaving peers for fault-injection tests: broken backends and slowloris clients.

Backends run as their own process (`python -m tests.faulty_backends MODE -p PORT`)
and print `instance listening on HOST:PORT` once they listen, like the sample
service. They answer `!HEALTH_CHECK` correctly so the balancer admits them,
and misbehave on real traffic:

- `reset`: every `--every`-th accepted connection is reset at once, and every
  other connection is reset (RST, no FIN) in place of answering its
  `--every`-th request, so requests that were already in flight on it are lost.
- `garbage`: each connection answers a few requests (1 to 3, cycling over
  connections), then sends bytes that are no complete line (random bytes or the
  first half of a correct reply, alternately) and closes. A complete wrong line
  cannot be told from a right one by a line balancer, so none is sent.

`SlowlorisSwarm` holds many client connections that each send one complete
request and then trickle the bytes of a line that never ends.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import socket
import struct
import sys
import threading
import time
from typing import cast

from balancer.tools.service import HEALTH_CHECK, reply_for

_LINGER_RESET = struct.pack("ii", 1, 0)


def reset(transport: asyncio.Transport) -> None:
    """Close with RST instead of FIN (SO_LINGER 0)."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    transport.abort()


class FaultyBackend(asyncio.Protocol):
    """One connection of a misbehaving line backend."""

    connections = 0

    def __init__(self, mode: str, every: int) -> None:
        self.mode = mode
        self.every = every
        self.buffer = b""
        self.requests = 0
        self.transport: asyncio.Transport | None = None
        FaultyBackend.connections += 1
        self.number = FaultyBackend.connections
        # garbage mode: good replies before the bad one, cycling over connections
        self.good_before_bad = 1 + self.number % 3

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        if self.mode == "reset" and self.number % self.every == 0:
            reset(self.transport)
            self.transport = None

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def data_received(self, data: bytes) -> None:
        transport = self.transport
        if transport is None:
            return
        lines = (self.buffer + data).split(b"\n")
        self.buffer = lines.pop()
        out: list[bytes] = []
        for raw in lines:
            line = raw.removesuffix(b"\r")
            if line == HEALTH_CHECK:
                out.append(HEALTH_CHECK + b"\n")
                continue
            self.requests += 1
            if self.mode == "reset" and self.requests % self.every == 0:
                if out:
                    transport.write(b"".join(out))
                reset(transport)
                self.transport = None
                return
            if self.mode == "garbage" and self.requests > self.good_before_bad:
                good = reply_for(line)
                if self.number % 2:
                    junk = bytes(random.choice(b"\x00\xff\xfe{}<>abc\r") for _ in range(17))
                else:
                    junk = good[: len(good) // 2]
                out.append(junk)
                transport.write(b"".join(out))
                transport.close()
                self.transport = None
                return
            out.append(reply_for(line) + b"\n")
        if out:
            transport.write(b"".join(out))


async def serve(mode: str, host: str, port: int, every: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: FaultyBackend(mode, every), host, port)
    bound = server.sockets[0].getsockname()
    print(f"instance listening on {bound[0]}:{bound[1]}", flush=True)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="A misbehaving line backend.")
    parser.add_argument("mode", choices=("reset", "garbage"))
    parser.add_argument("-p", "--port", type=int, default=0)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--every", type=int, default=10)
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.mode, args.host, args.port, args.every))
    return 0


class SlowlorisSwarm:
    """Connections that send one request, then a byte of an endless line every `period`.

    `sent_from` is the time just before the first request was sent (every connection's last
    activity, as the balancer sees it, is later), and `closed_at` when each connection was
    seen closed by the balancer.
    """

    def __init__(self, port: int, count: int, period: float = 0.3) -> None:
        self.period = period
        self.socks: list[socket.socket] = []
        self.closed: set[int] = set()
        self.closed_at: dict[int, float] = {}
        self.first_replies = 0
        for _ in range(count):
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            self.socks.append(s)
        self.sent_from = time.monotonic()
        for s in self.socks:
            s.sendall(b"1\n")  # a complete request first, so the line framing is fixed
        for s in self.socks:
            data = b""
            while b"\n" not in data:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
            if data.startswith(reply_for(b"1")):
                self.first_replies += 1
            s.setblocking(False)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._trickle, daemon=True)
        self._thread.start()

    def _trickle(self) -> None:
        while not self._stop.wait(self.period):
            for i, s in enumerate(self.socks):
                if i in self.closed:
                    continue
                try:
                    try:
                        if s.recv(4096) == b"":
                            raise ConnectionError("closed by peer")
                    except BlockingIOError:
                        pass
                    s.send(b"7")
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    with self._lock:
                        self.closed.add(i)
                        self.closed_at[i] = time.monotonic()

    @property
    def open_count(self) -> int:
        with self._lock:
            return len(self.socks) - len(self.closed)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for s in self.socks:
            s.close()


if __name__ == "__main__":
    sys.exit(main())
