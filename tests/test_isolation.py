"""Isolation: every client gets exactly the replies to its own requests, in order, or an error.

Several clients, each with its own random mix of framing, splits, pauses, empty lines,
oversized lines, raw messages with newlines inside and early closes, share a pool of
backends that tag each reply with the request it answers (`tests.message_doubles.tag`),
so a reply delivered to the wrong client, or a request that became two, is visible.
The line backends parse as strictly as many real ones do (a line ends at LF or CR, blank
lines are skipped), so a request that is not exactly one line shifts replies.

Protocol tier (hypothesis, fake transports, time driven by calling the quiet-period
callback), and once over real sockets (`test_isolation_over_real_sockets`).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from balancer.proxy.message import session
from balancer.proxy.message.service import MessageService
from tests.message_doubles import (
    FakeBackendsService,
    FakeTransport,
    LineTagger,
    RawTagger,
    TaggingBackends,
    answer_all,
    client,
    make_service,
    split_line_replies,
    split_raw_replies,
    tag,
    turn,
    untag,
)

MAX_LINE = 1500
"""Over the raw backends' 1024-byte limit, so both limits are reachable."""
INVALID = b"Invalid message"
NOT_AVAILABLE = b"Server not available"
LINE_TOO_LONG = b"Error: line too long"
LINE_BREAK = b"Error: line break inside a message"
NEWLINE_ON_RAW = b"Error: newline on a raw connection"
MESSAGE_TOO_LONG = b"Error: message too long"

KINDS = (
    ["line"] * 6
    + ["crlf", "partial", "partial", "empty", "cr_inside", "nl_inside", "nl_inside"]
    + ["long", "big"]
)


@dataclass
class ClientModel:
    """What the balancer must make of one client's bytes: its requests, and how it ends."""

    framing: str
    """The service's client_framing."""
    framings: frozenset[str]
    """The backends' framings: which replies a request may get."""
    resets: bool
    state: str = "new"
    """new | detecting | line | raw"""
    detected_raw: bool = False
    buf: bytes = b""
    expected: list[set[bytes]] = field(default_factory=list)
    cut: bytes | None = None
    eof: bool = False
    gone: bool = False
    tokens: int = 0

    @property
    def done(self) -> bool:
        return self.cut is not None or self.eof or self.gone

    def allowed(self, payload: bytes) -> set[bytes]:
        if not payload:
            return {INVALID}
        out = set()
        if "line" in self.framings:
            out.add(LINE_BREAK if b"\n" in payload or b"\r" in payload else tag(payload))
        if "raw" in self.framings:
            out.add(MESSAGE_TOO_LONG if len(payload) > 1024 else tag(payload))
        if self.resets:
            out.add(NOT_AVAILABLE)
        return out

    def request(self, payload: bytes) -> None:
        self.expected.append(self.allowed(payload))

    def feed(self, data: bytes) -> None:
        if self.state == "new":
            self.state = {"line": "line", "raw": "raw", "auto": "detecting"}[self.framing]
        if self.state == "line":
            self._line(data)
        elif self.state == "raw":
            self._raw(data)
        else:
            self.buf += data
            if b"\n" in data:
                self.state = "line"
                buf, self.buf = self.buf, b""
                self._line(buf)
            elif len(self.buf) > MAX_LINE:
                self.cut = LINE_TOO_LONG

    def _line(self, data: bytes) -> None:
        parts = (self.buf + data).split(b"\n")
        rest = parts.pop()
        for part in parts:
            line = part[:-1] if part.endswith(b"\r") else part
            if len(line) > MAX_LINE:
                self.cut = LINE_TOO_LONG
                return
            self.request(line)
        if len(rest) > MAX_LINE + 1 or (len(rest) > MAX_LINE and not rest.endswith(b"\r")):
            self.cut = LINE_TOO_LONG
            return
        self.buf = rest

    def _raw(self, data: bytes) -> None:
        if self.detected_raw and b"\n" in data:
            self.cut = NEWLINE_ON_RAW
        elif len(data) > MAX_LINE:
            self.cut = LINE_TOO_LONG
        else:
            self.request(data.rstrip(b"\r\n"))

    def quiet(self) -> bool:
        """The quiet period passed; True when that decided raw framing."""
        if self.state != "detecting":
            return False
        self.state = "raw"
        self.detected_raw = True
        buf, self.buf = self.buf, b""
        self._raw(buf)
        return True

    def end_of_input(self) -> None:
        if self.state == "detecting" and self.buf:
            self.quiet()
        elif self.state == "line" and self.buf:
            rest = self.buf[:-1] if self.buf.endswith(b"\r") else self.buf
            self.buf = b""
            self.request(rest)
        self.eof = True


def item_bytes(kind: str, token: Iterator[bytes]) -> bytes:
    if kind == "line":
        return next(token) + b"\n"
    if kind == "crlf":
        return next(token) + b"\r\n"
    if kind == "partial":
        return next(token)
    if kind == "empty":
        return b"\n"
    if kind == "cr_inside":
        return next(token) + b"\r" + next(token) + b"\n"
    if kind == "nl_inside":  # as one read from a raw client: the attack
        return next(token) + b"\n" + next(token)
    if kind == "long":
        return b"z" * (MAX_LINE + 10)
    assert kind == "big"
    return next(token) + b"y" * 1100 + b"\n"


def tokens(client_index: int) -> Iterator[bytes]:
    n = 0
    while True:
        n += 1
        yield b"c%dr%d" % (client_index, n)


def check_client(i: int, model: ClientModel, t: FakeTransport) -> None:
    """The client got exactly its own replies, in order (or the errors allowed)."""
    data = t.data()
    replies = split_raw_replies(data) if model.state == "raw" else split_line_replies(data)
    for n, reply in enumerate(replies):
        if n == len(model.expected) and model.cut is not None:
            assert reply == model.cut, f"client {i}: reply {n} {reply!r}, expected {model.cut!r}"
            continue
        assert n < len(model.expected), (
            f"client {i} got {len(replies)} replies for {len(model.expected)} requests: {replies!r}"
        )
        if reply not in model.expected[n]:
            payload = untag(reply)
            raise AssertionError(
                f"client {i}: reply {n} is {reply!r} (for {payload!r}); expected one of "
                f"{model.expected[n]!r}"
            )
    want = len(model.expected) + (1 if model.cut is not None else 0)
    if not model.gone:
        assert len(replies) == want, f"client {i}: {len(replies)} replies, expected {want}"
    if model.cut is not None or model.eof:
        assert t.closed, f"client {i} should have been closed"
    elif not model.gone:
        assert not t.closed, f"client {i} was closed"


@contextmanager
def quiet_period_by_hand() -> Iterator[None]:
    saved = session.RAW_QUIET_PERIOD
    session.RAW_QUIET_PERIOD = 3600.0
    try:
        yield
    finally:
        session.RAW_QUIET_PERIOD = saved


async def run_scenario(
    client_framing: str,
    framings: list[str],
    n_clients: int,
    ops: list[tuple[Any, ...]],
    note: Callable[[str], None] = lambda _: None,
) -> None:
    resets = any(op[0] == "reset" for op in ops)
    service: FakeBackendsService
    service, opened = make_service(
        len(framings),
        framings=framings,
        client_framing=client_framing,
        max_line=MAX_LINE,
        backend_connections=2,
    )
    raw_ports = {9000 + i for i, f in enumerate(framings) if f == "raw"}
    backends = TaggingBackends(opened, raw_ports=raw_ports)
    models = [ClientModel(client_framing, frozenset(framings), resets) for _ in range(n_clients)]
    sessions = [client(service, ("127.0.0.1", 1000 + i)) for i in range(n_clients)]
    token = [tokens(i) for i in range(n_clients)]
    for op in ops:
        kind, who, arg = op
        if kind in ("send", "hello", "pause", "eof", "close"):
            model = models[who]
            session, t = sessions[who]
            if model.done:
                continue
            if kind == "hello":  # as the tutorial's raw client: a message, then it waits
                data = next(token[who])
                model.feed(data)
                session.data_received(data)
                kind = "pause"
            if kind == "send":
                data = b"".join(item_bytes(k, token[who]) for k in arg)
                model.feed(data)
                session.data_received(data)
            elif kind == "pause":
                if model.quiet():
                    assert session._raw_timer is not None, "no quiet period was running"
                    session._cancel_raw_timer()
                    session._raw_detected()
            elif kind == "eof":
                model.end_of_input()
                session.eof_received()
            else:
                model.gone = True
                t.closed = True
                session.connection_lost(ConnectionResetError("client went away"))
        elif kind == "answer":
            backends.answer(9000 + who, arg)
        else:
            for _conn, bt in opened[9000 + who]:
                if not bt.closed:
                    bt.abort()
        await turn()
    await answer_all(backends)
    for i, (model, (_s, t)) in enumerate(zip(models, sessions, strict=True)):
        note(f"client ends: {model.cut.decode() if model.cut else 'eof' if model.eof else 'open'}")
        if model.detected_raw:
            note("a client found raw by a pause")
        check_client(i, model, t)
    assert [b.in_flight for b in service.pool] == [0] * len(framings)


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[list[str], int, list[tuple[Any, ...]]]:
    framings = draw(st.lists(st.sampled_from(["line", "raw"]), min_size=1, max_size=3))
    n_clients = draw(st.integers(min_value=2, max_value=5))
    resets = draw(st.booleans())
    who = st.integers(min_value=0, max_value=n_clients - 1)
    backend = st.integers(min_value=0, max_value=len(framings) - 1)
    send = st.tuples(st.just("send"), who, st.lists(st.sampled_from(KINDS), min_size=1, max_size=4))
    one = st.tuples(st.just("send"), who, st.sampled_from(KINDS).map(lambda k: [k]))
    choices = [
        send,
        send,
        one,
        one,
        st.tuples(st.just("hello"), who, st.just(None)),
        st.tuples(st.just("pause"), who, st.just(None)),
        st.tuples(st.just("answer"), backend, st.integers(min_value=1, max_value=3)),
        st.tuples(st.just("answer"), backend, st.integers(min_value=1, max_value=3)),
        st.tuples(st.just("eof"), who, st.just(None)),
        st.tuples(st.just("close"), who, st.just(None)),
    ]
    if resets:
        choices.append(st.tuples(st.just("reset"), backend, st.just(None)))
    ops = draw(st.lists(st.one_of(*choices), min_size=1, max_size=40))
    return framings, n_clients, ops


@pytest.mark.parametrize("client_framing", ["line", "raw", "auto"])
@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(scenario=scenarios())
def test_every_client_gets_exactly_its_own_replies(
    client_framing: str, scenario: tuple[list[str], int, list[tuple[Any, ...]]]
) -> None:
    framings, n_clients, ops = scenario
    with quiet_period_by_hand():
        asyncio.run(run_scenario(client_framing, framings, n_clients, ops, event))


def test_the_property_sees_the_raw_newline_attack() -> None:
    """The raw-newline attack (a client made raw by a pause sends lines) as the property runs it."""
    ops: list[tuple[Any, ...]] = [
        ("send", 0, ["line", "line"]),
        ("hello", 1, None),
        ("answer", 0, 3),
        ("send", 0, ["line", "line"]),
        ("send", 1, ["nl_inside"]),
        ("send", 0, ["line", "line"]),
        *[("answer", 0, 1)] * 6,
    ]
    with quiet_period_by_hand():
        asyncio.run(run_scenario("auto", ["line"], 2, ops))


def test_backends_reset_in_the_turn_their_writes_were_queued_cost_no_request() -> None:
    """Found by the property: a backend aborted in the same loop turn as a flush was due was
    written to after its close, and the flush of every other connection of that turn was
    lost with it (2 of 10 replies came)."""
    ops: list[tuple[Any, ...]] = [
        *[("send", 0, ["line"])] * 6,
        ("hello", 0, None),
        *[("send", 0, ["line"])] * 3,
        ("reset", 0, None),
        ("reset", 2, None),
    ]
    with quiet_period_by_hand():
        asyncio.run(run_scenario("raw", ["line", "line", "line"], 2, ops))


# -- over real sockets ---------------------------------------------------------------------


async def _line_victim(
    port: int, rng: random.Random, me: int, allowed: Callable[[bytes], set[bytes]]
) -> None:
    stream = b""
    expected: list[set[bytes]] = []
    for n in range(rng.randint(40, 120)):
        token = b"c%dr%d" % (me, n)
        kind = rng.choice(["line"] * 8 + ["empty", "crlf", "cr_inside"])
        if kind == "line":
            stream += token + b"\n"
            expected.append(allowed(token))
        elif kind == "empty":
            stream += b"\n"
            expected.append({INVALID})
        elif kind == "crlf":
            stream += token + b"\r\n"
            expected.append(allowed(token))
        else:
            stream += token + b"\rx\n"
            expected.append(allowed(token + b"\rx"))
    last = b"c%dlast" % me
    stream += last  # unterminated: answered at EOF
    expected.append(allowed(last))
    first = stream.index(b"\n") + 1  # the first read holds a newline: line framing at once
    cuts = sorted(rng.sample(range(first, len(stream)), 8))
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for a, b in zip([0, first, *cuts], [first, *cuts, len(stream)], strict=True):
            writer.write(stream[a:b])
            await writer.drain()
        writer.write_eof()
        replies = split_line_replies(await reader.read())
    finally:
        writer.close()
    assert len(replies) == len(expected), f"client {me}: {len(replies)} of {len(expected)}"
    for n, (reply, ok) in enumerate(zip(replies, expected, strict=True)):
        assert reply in ok, f"client {me}: reply {n} is {reply!r} (for {untag(reply)!r})"


async def _raw_attacker(port: int, rng: random.Random, me: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for n in range(rng.randint(2, 6)):  # lockstep, as the tutorial's client: one read each
            token = b"c%dr%d" % (me, n)
            writer.write(token)
            reply = await reader.readexactly(len(tag(token)))
            assert reply == tag(token), f"raw client {me}: {reply!r} for {token!r}"
        writer.write(b"c%dx\nc%dy\nc%dz" % (me, me, me))
        rest = await reader.read()
    finally:
        writer.close()
    assert rest == NEWLINE_ON_RAW, f"raw client {me} got {rest!r}"


async def _early_closer(port: int, me: int) -> None:
    _reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"".join(b"c%dr%d\n" % (me, n) for n in range(50)))
    await writer.drain()
    writer.transport.abort()


async def test_isolation_over_real_sockets() -> None:
    from balancer.config.model import BackendConfig, HealthConfig, ServiceConfig
    from balancer.core.pool import BackendPool
    from balancer.core.stats import LatencyHistogram

    loop = asyncio.get_running_loop()
    line_server = await loop.create_server(LineTagger, "127.0.0.1", 0)
    raw_server = await loop.create_server(RawTagger, "127.0.0.1", 0)
    ports = [s.sockets[0].getsockname()[1] for s in (line_server, raw_server)]
    cfg = ServiceConfig(
        name="iso",
        listen_host="127.0.0.1",
        listen_port=0,
        backends=tuple(BackendConfig("127.0.0.1", p) for p in ports),
        client_framing="auto",
        health=HealthConfig(enabled=False),
    )
    pool = BackendPool(cfg)
    pool.backends[0].framing = "line"
    pool.backends[1].framing = "raw"
    service = MessageService(cfg, pool, histogram=LatencyHistogram())
    _host, port = await service.start()
    model = ClientModel("auto", frozenset({"line", "raw"}), resets=False)
    try:
        async with asyncio.timeout(60):
            for seed in (1, 2):
                rng = random.Random(seed)
                await asyncio.gather(
                    *(_line_victim(port, rng, i, model.allowed) for i in range(4)),
                    *(_raw_attacker(port, rng, 10 + i) for i in range(2)),
                    _early_closer(port, 20),
                )
            while any(b.in_flight for b in pool) or service.sessions:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        assert [b.state for b in pool] == ["up", "up"]
        assert [b.failures for b in pool] == [0, 0]
        assert service.buffered == 0
    finally:
        service.stop_accepting()
        service.close_backends()
        for s in (line_server, raw_server):
            s.close()
