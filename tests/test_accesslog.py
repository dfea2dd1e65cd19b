"""The access log: one line per request, written in batches (one write per half second or
64 KiB), in text or JSON."""

from __future__ import annotations

import asyncio
import io
import json
import time
from types import SimpleNamespace
from typing import Any

from balancer.observe.accesslog import AccessLog


class CountingStream(io.BytesIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, data: Any) -> int:
        self.writes += 1
        return super().write(data)


def request(payload: bytes, backend: str | None = "127.0.0.1:9000") -> Any:
    b = (
        None
        if backend is None
        else SimpleNamespace(address=backend, address_bytes=backend.encode())
    )
    return SimpleNamespace(payload=payload, backend=b, started=time.monotonic(), reply=b"x")


SESSION: Any = SimpleNamespace(peer="127.0.0.1:5555")


async def test_lines_wait_for_the_flush_interval_then_go_out_in_one_write() -> None:
    stream = CountingStream()
    log = AccessLog("numbers", stream, flush_interval=0.05, fmt="text")
    for i in range(100):
        log.record_batch(SESSION, [request(b"%d" % i)], time.monotonic())
    assert stream.writes == 0, "100 short lines are held, not written one by one"
    timer = log._timer
    assert timer is not None, "a flush is scheduled"
    assert timer.when() <= asyncio.get_running_loop().time() + 0.05
    timer._run()  # the flush interval has passed
    assert stream.writes == 1
    lines = stream.getvalue().decode().splitlines()
    assert len(lines) == 100
    assert lines[7].endswith("ok")
    assert " numbers 127.0.0.1:5555 -> 127.0.0.1:9000 '7' " in lines[7]


async def test_a_full_buffer_is_written_at_once() -> None:
    stream = CountingStream()
    log = AccessLog("numbers", stream, flush_interval=3600, max_buffer=4096, fmt="text")
    batch = [request(b"%d" % i) for i in range(200)]  # well over 4 KiB of lines
    log.record_batch(SESSION, batch, time.monotonic())
    assert stream.writes == 1, "past max_buffer the lines go out without waiting"
    assert len(stream.getvalue().splitlines()) == 200
    log.record_batch(SESSION, [request(b"1")], time.monotonic())
    assert stream.writes == 1, "and the next line waits again"
    log.flush()
    assert stream.writes == 2


async def test_json_lines_say_what_happened_to_each_request() -> None:
    stream = CountingStream()
    log = AccessLog("numbers", stream, flush_interval=3600, fmt="json")
    log.record_batch(SESSION, [request(b"12"), request(b"\xff\n", backend=None)], time.monotonic())
    log.flush()
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert (first["service"], first["client"], first["backend"]) == (
        "numbers",
        "127.0.0.1:5555",
        "127.0.0.1:9000",
    )
    assert (first["message"], first["outcome"]) == ("12", "ok")
    assert (second["backend"], second["outcome"]) == ("-", "x")
