from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from balancer.core.framing import LineFramer, LineTooLong


def feed_all(framer: LineFramer, chunks: list[bytes]) -> list[bytes]:
    """Lines produced, with b"<too long>" appended where the error was raised."""
    out: list[bytes] = []
    try:
        for chunk in chunks:
            out.extend(framer.feed(chunk))
    except LineTooLong as exc:
        out.extend(exc.lines)
        out.append(b"<too long>")
    return out


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    chunks = []
    prev = 0
    for p in [*points, len(data)]:
        chunks.append(data[prev:p])
        prev = p
    return chunks


def reference(data: bytes, limit: int) -> list[bytes]:
    """What a framer must produce for the stream: lines up to the first one too long."""
    parts = data.split(b"\n")
    rest = parts.pop()
    out: list[bytes] = []
    for p in parts:
        line = p[:-1] if p.endswith(b"\r") else p
        if len(line) > limit:
            return [*out, b"<too long>"]
        out.append(line)
    if len(rest) > limit + 1 or (len(rest) > limit and not rest.endswith(b"\r")):
        return [*out, b"<too long>"]
    return out


def test_lines_split_and_terminators() -> None:
    f = LineFramer(100)
    assert f.feed(b"1\n2\r\n3") == [b"1", b"2"]
    assert f.buffered == 1
    assert f.feed(b"4\n") == [b"34"]
    assert f.feed(b"\n") == [b""]


def test_too_long_raises_before_newline_arrives() -> None:
    f = LineFramer(8)
    f.feed(b"12345")
    with pytest.raises(LineTooLong):
        f.feed(b"6789")


def test_too_long_carries_the_lines_before_it() -> None:
    f = LineFramer(4)
    with pytest.raises(LineTooLong) as info:
        f.feed(b"1\n22\n333333\n4\n")
    assert info.value.lines == [b"1", b"22"]
    assert info.value.limit == 4
    assert str(info.value) == "line longer than 4 bytes"


def test_exact_limit_is_allowed_with_crlf() -> None:
    f = LineFramer(4)
    assert f.feed(b"abcd\r") == []
    assert f.feed(b"\n") == [b"abcd"]


@given(
    data=st.binary(max_size=300)
    | st.lists(
        st.sampled_from([b"1", b"22", b"\n", b"\r\n", b"\r", b"x" * 9, b"!HEALTH_CHECK"]),
        max_size=60,
    ).map(b"".join),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=20),
    limit=st.integers(min_value=1, max_value=20),
)
def test_any_split_gives_the_same_lines_or_the_same_error(
    data: bytes, cuts: list[int], limit: int
) -> None:
    expected = reference(data, limit)
    assert feed_all(LineFramer(limit), [data]) == expected
    assert feed_all(LineFramer(limit), split_at(data, cuts)) == expected


@given(st.lists(st.binary(max_size=5), max_size=200))
def test_one_byte_chunks_never_exceed_the_limit(chunks: list[bytes]) -> None:
    f = LineFramer(16)
    try:
        for c in chunks:
            f.feed(c)
            assert f.buffered <= 17
            assert f.held == f.buffered
    except LineTooLong:
        pass


def test_finish_hands_over_the_unterminated_rest_once() -> None:
    f = LineFramer(100)
    assert f.finish() is None
    assert f.feed(b"1\n23") == [b"1"]
    assert f.finish() == b"23"
    assert f.buffered == 0
    assert f.finish() is None
    f.feed(b"4\r")
    assert f.finish() == b"4"
    f.feed(b"\r")
    assert f.finish() == b""


def test_clear_drops_what_is_held() -> None:
    f = LineFramer(100)
    f.feed(b"partial")
    f.clear()
    assert f.buffered == 0
    assert f.feed(b"x\n") == [b"x"]


@given(
    data=st.lists(st.sampled_from([b"1", b"22", b"\n", b"\r\n", b"\r"]), max_size=40).map(b"".join),
    cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=10),
)
def test_lines_then_finish_are_the_stream_s_lines_with_the_last_one_unterminated(
    data: bytes, cuts: list[int]
) -> None:
    f = LineFramer(1000)
    lines: list[bytes] = []
    for chunk in split_at(data, cuts):
        lines.extend(f.feed(chunk))
        assert f.held == f.buffered
    rest = f.finish()
    assert f.held == 0
    if rest is not None:
        lines.append(rest)
    expected = [p[:-1] if p.endswith(b"\r") else p for p in data.split(b"\n")]
    if expected[-1] == b"" and not data.endswith(b"\r"):
        expected.pop()  # the stream ended with a newline: nothing left over
    assert lines == expected


def test_one_read_of_exactly_one_line_at_the_limit_and_one_byte_over() -> None:
    assert LineFramer(4).feed(b"abcd\n") == [b"abcd"]
    with pytest.raises(LineTooLong) as info:
        LineFramer(4).feed(b"abcde\n")
    assert (info.value.limit, info.value.lines) == (4, [])


def test_a_held_line_may_end_in_the_cr_of_a_crlf_at_the_limit() -> None:
    f = LineFramer(4)
    assert f.feed(b"ab") == []
    assert f.feed(b"cd\r") == []
    assert f.held == 5
    assert f.feed(b"\n") == [b"abcd"]
    assert f.held == 0


@pytest.mark.parametrize("second", [b"cd\r\r", b"cde", b"cdef\r"])
def test_a_held_line_over_the_limit_is_refused_before_its_newline(second: bytes) -> None:
    f = LineFramer(4)
    f.feed(b"ab")
    with pytest.raises(LineTooLong) as info:
        f.feed(second)
    assert info.value.limit == 4


@pytest.mark.parametrize("data", [b"abcd\r\r", b"1\nabcde"])
def test_an_unfinished_rest_over_the_limit_is_refused(data: bytes) -> None:
    with pytest.raises(LineTooLong) as info:
        LineFramer(4).feed(data)
    assert info.value.limit == 4
    assert info.value.lines == ([b"1"] if data.startswith(b"1\n") else [])


def test_clear_forgets_what_was_held() -> None:
    f = LineFramer(10)
    f.feed(b"abc")
    f.clear()
    assert (f.held, f.buffered) == (0, 0)
    assert f.feed(b"d\n") == [b"d"]
