"""Line framing, sans-IO.

How it works: `LineFramer.feed(data)` appends bytes and returns every complete
line (terminator `\n` removed, and a `\r` before it). Only the newly fed bytes
are searched for a newline, so the cost is O(n) however the stream is split.
A line longer than `max_line` bytes (terminator excluded) raises `LineTooLong`
as soon as it is known to be too long, even before its newline arrives, so a
peer cannot make the buffer grow without bound; the error carries the
complete lines that preceded the long one, so they can still be answered.
At the end of the stream `finish()` hands over the unterminated rest as one
last line; `clear()` drops what is held (a connection being cut).
"""

from __future__ import annotations


class FramingError(Exception):
    """The peer broke the wire protocol."""


class LineTooLong(FramingError):
    """A line over the limit; `lines` holds the complete lines that came before it."""

    def __init__(self, limit: int, lines: list[bytes] | None = None) -> None:
        self.limit = limit
        self.lines = lines if lines is not None else []
        super().__init__(f"line longer than {limit} bytes")


class LineFramer:
    __slots__ = ("_buf", "held", "max_line")

    def __init__(self, max_line: int) -> None:
        self.max_line = max_line
        self._buf = bytearray()
        self.held = 0
        """Bytes of an incomplete line held after the last `feed` (a plain attribute: read
        once per chunk on the hot path)."""

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete line held."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[bytes]:
        """Add `data`; return the lines it completes, in order."""
        if (
            not self._buf
            and data[-1:] == b"\n"
            and len(data) <= self.max_line + 1
            and b"\r" not in data
        ):
            # the common case: whole lines, none too long, no CR to strip
            lines = data.split(b"\n")
            del lines[-1]
            return lines
        if self._buf:
            buf = self._buf
            buf += data
            if data.find(b"\n") < 0:
                if len(buf) > self.max_line + 1 or (
                    len(buf) > self.max_line and not buf.endswith(b"\r")
                ):
                    raise LineTooLong(self.max_line)
                self.held = len(buf)
                return []
            data = bytes(buf)
            self._buf = bytearray()
            self.held = 0
        lines = data.split(b"\n")
        rest = lines.pop()
        limit = self.max_line
        for i, line in enumerate(lines):
            if line.endswith(b"\r"):
                line = line[:-1]
                lines[i] = line
            if len(line) > limit:
                raise LineTooLong(limit, lines[:i])
        if rest:
            if len(rest) > limit + 1 or (len(rest) > limit and not rest.endswith(b"\r")):
                raise LineTooLong(limit, lines)
            self._buf = bytearray(rest)
            self.held = len(rest)
        return lines

    def finish(self) -> bytes | None:
        """The end of the stream: the unterminated rest as a last line (a trailing CR
        removed), or None when nothing is held. The framer is empty after."""
        if not self._buf:
            return None
        rest = bytes(self._buf)
        self._buf = bytearray()
        self.held = 0
        return rest[:-1] if rest.endswith(b"\r") else rest

    def clear(self) -> None:
        """Drop the incomplete line held (and its memory)."""
        self._buf = bytearray()
        self.held = 0

    def __repr__(self) -> str:
        return f"<LineFramer max_line={self.max_line} buffered={len(self._buf)}>"
