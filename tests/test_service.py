"""The sample service: protocol objects fed bytes, then the real process on loopback."""

from __future__ import annotations

import asyncio
import itertools
import signal
import socket
import subprocess
import sys
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from balancer.tools.procs import ChildProcess
from balancer.tools.service import LineServiceProtocol, RawServiceProtocol, reply_for
from tests.support import PYTHON, ROOT, LineClient, start_service
from tests.support import reply_for as expected

INSTANCE_RE = r"instance listening on (\S+):(\d+)"


class FakeTransport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        assert not self.closed, "write after close"
        self.writes.append(data)

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed


def connect(proto: asyncio.Protocol) -> FakeTransport:
    transport = FakeTransport()
    proto.connection_made(transport)  # type: ignore[arg-type]
    return transport


def reply_lines(data: bytes) -> list[str]:
    text = data.decode()
    assert text.endswith("\n")
    return text[:-1].split("\n")


# -- protocol tier ---------------------------------------------------------------------------


def test_answers_numbers_health_check_and_anything_else() -> None:
    proto = LineServiceProtocol()
    transport = connect(proto)
    proto.data_received(b"42\n!HEALTH_CHECK\nhello\n-3\n\n007\n")
    assert reply_lines(b"".join(transport.writes)) == [
        expected(42),
        "!HEALTH_CHECK",
        "Invalid message",
        "Invalid message",
        "Invalid message",
        expected("007"),
    ]


def test_reply_uses_the_typographic_apostrophe() -> None:
    assert reply_for(b"5") == "It\u2019s instance number 5".encode()


def test_crlf_is_tolerated() -> None:
    proto = LineServiceProtocol()
    transport = connect(proto)
    proto.data_received(b"1\r\n!HEALTH_CHECK\r\n")
    assert b"".join(transport.writes) == (expected(1) + "\n!HEALTH_CHECK\n").encode()


def test_pipelined_lines_get_one_write_in_order() -> None:
    proto = LineServiceProtocol()
    transport = connect(proto)
    proto.data_received(b"".join(b"%d\n" % i for i in range(500)))
    assert len(transport.writes) == 1
    assert reply_lines(transport.writes[0]) == [expected(i) for i in range(500)]


def test_partial_line_waits_for_its_end() -> None:
    proto = LineServiceProtocol()
    transport = connect(proto)
    proto.data_received(b"12")
    assert transport.writes == []
    proto.data_received(b"3\n4")
    assert b"".join(transport.writes) == (expected(123) + "\n").encode()


@settings(max_examples=200, deadline=None)
@given(
    lines=st.lists(
        st.one_of(
            st.integers(min_value=0, max_value=10**12).map(str),
            st.just("!HEALTH_CHECK"),
            st.text(alphabet="abc!- 9\r", max_size=8),
        ),
        max_size=20,
    ),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=10),
)
def test_any_split_of_the_input_gives_the_same_replies(lines: list[str], cuts: list[int]) -> None:
    data = "".join(line + "\n" for line in lines).encode()
    whole = LineServiceProtocol()
    whole_transport = connect(whole)
    whole.data_received(data)
    split = LineServiceProtocol()
    split_transport = connect(split)
    points = sorted({min(c, len(data)) for c in cuts} | {0, len(data)})
    for a, b in itertools.pairwise(points):
        split.data_received(data[a:b])
    assert b"".join(split_transport.writes) == b"".join(whole_transport.writes)
    assert len(b"".join(whole_transport.writes).split(b"\n")) == len(lines) + 1


@settings(max_examples=300, deadline=None)
@given(
    lines=st.lists(st.text(alphabet="12\r", max_size=14), max_size=8),
    cuts=st.lists(st.integers(min_value=0, max_value=120), max_size=8),
)
def test_any_split_gives_the_same_replies_with_a_line_limit(
    lines: list[str], cuts: list[int]
) -> None:
    data = "".join(line + "\n" for line in lines).encode()
    whole = LineServiceProtocol(max_line=10)
    whole_transport = connect(whole)
    whole.data_received(data)
    split = LineServiceProtocol(max_line=10)
    split_transport = connect(split)
    points = sorted({min(c, len(data)) for c in cuts} | {0, len(data)})
    for a, b in itertools.pairwise(points):
        split.data_received(data[a:b])
    assert b"".join(split_transport.writes) == b"".join(whole_transport.writes)
    assert split_transport.closed == whole_transport.closed
    limited = [line.removesuffix("\r") for line in lines]
    if any(len(line) > 10 for line in limited):
        assert whole_transport.closed
        assert b"".join(whole_transport.writes).endswith(b"Error: line too long\n")


def test_line_over_the_limit_gets_an_error_and_the_connection_closes() -> None:
    proto = LineServiceProtocol(max_line=10)
    transport = connect(proto)
    proto.data_received(b"1\n" + b"9" * 11 + b"\n2\n")
    assert b"".join(transport.writes) == (expected(1) + "\nError: line too long\n").encode()
    assert transport.closed


def test_unterminated_line_over_the_limit_gets_an_error() -> None:
    proto = LineServiceProtocol(max_line=10)
    transport = connect(proto)
    proto.data_received(b"9" * 6)
    proto.data_received(b"9" * 6)
    assert transport.writes == [b"Error: line too long\n"]
    assert transport.closed


def test_line_at_the_limit_with_crlf_is_accepted() -> None:
    proto = LineServiceProtocol(max_line=10)
    transport = connect(proto)
    proto.data_received(b"9" * 10 + b"\r")
    proto.data_received(b"\n")
    assert transport.writes == [(expected("9" * 10) + "\n").encode()]
    assert not transport.closed


def test_raw_framing_answers_each_read_without_newline() -> None:
    proto = RawServiceProtocol()
    transport = connect(proto)
    proto.data_received(b"17")
    proto.data_received(b"!HEALTH_CHECK\n")
    proto.data_received(b"x")
    assert transport.writes == [
        expected(17).encode(),
        b"!HEALTH_CHECK",
        b"Invalid message",
    ]


# -- real-socket tier ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def service() -> Any:
    proc = start_service()
    yield proc
    proc.stop()


def test_real_service_answers_over_tcp(service: Any) -> None:
    client = LineClient(service.port)
    assert client.request("7") == expected(7)
    assert client.request("!HEALTH_CHECK") == "!HEALTH_CHECK"
    assert client.request("seven") == "Invalid message"


def test_real_service_answers_pipelined_requests_in_order(service: Any) -> None:
    client = LineClient(service.port)
    client.send(*[str(i) for i in range(2000)])
    assert [client.read_line() for _ in range(2000)] == [expected(i) for i in range(2000)]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_service_exits_cleanly_on_signal(sig: int) -> None:
    proc = start_service()
    assert LineClient(proc.port).request("1") == expected(1)
    assert proc.stop(sig) == 0


def test_delayed_replies_stay_in_order() -> None:
    proc = start_service("--delay", "0.02")
    try:
        client = LineClient(proc.port)
        sent: list[int] = []
        for batch in range(5):
            numbers = list(range(batch * 10, batch * 10 + 10))
            client.send(*map(str, numbers))
            sent += numbers
        assert [client.read_line() for _ in sent] == [expected(n) for n in sent]
    finally:
        proc.stop()


def test_raw_service_replies_without_newline() -> None:
    proc = start_service("--raw")
    try:
        with socket.create_connection(("127.0.0.1", proc.port), timeout=10) as sock:
            sock.sendall(b"5")
            want = expected(5).encode()
            got = b""
            while len(got) < len(want):
                chunk = sock.recv(4096)
                assert chunk, "connection closed early"
                got += chunk
            assert got == want
    finally:
        proc.stop()


def test_max_line_option_closes_after_error_reply() -> None:
    proc = start_service("--max-line", "16")
    try:
        client = LineClient(proc.port)
        client.send("1", "9" * 40)
        assert client.read_line() == expected(1)
        assert client.read_line() == "Error: line too long"
        assert client.read_until_closed() == b""
    finally:
        proc.stop()


def test_busy_port_is_reported_with_exit_code_1(service: Any) -> None:
    result = subprocess.run(
        [PYTHON, "-m", "balancer.tools.service", "-p", str(service.port)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{service.port}" in result.stderr


@pytest.mark.parametrize("argv", [[], ["-p", "0"]])
def test_tutorial_root_script_starts_the_service(argv: list[str]) -> None:
    proc = ChildProcess([sys.executable, str(ROOT / "service.py"), *argv], cwd=ROOT)
    try:
        m = proc.wait_for(INSTANCE_RE)
        assert LineClient(int(m.group(2))).request("3") == expected(3)
    finally:
        assert proc.stop() == 0
