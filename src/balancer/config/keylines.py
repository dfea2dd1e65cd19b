"""Where each key of a TOML or JSON document is written: dotted key path -> line.

How it works: `tomllib` and `json` give values without positions, so a
config error found while checking values ("services.numbers.health.rise")
would have no line. These locators scan the text again, once it has parsed,
and map every key path to the line it is written on, in the config loader's
spelling: keys joined by `.` (a key that is not bare is quoted as a JSON
string, `services."my service"`), list items as `[i]`
(`services.numbers.backends[2].weight`). The scan follows the grammar only
as far as positions need: keys (bare, quoted, dotted), table headers `[a.b]`
and array-of-tables headers `[[a]]` (counted, so each one is its own `[i]`,
and headers under it belong to its latest item), inline tables, arrays over
many lines, and every kind of string (skipped whole, so a `#`, `=` or `[`
inside one is not mistaken for syntax). A table only implied by a longer
header or dotted key (`a` in `[a.b]`) is placed at its first mention.

`line_of` answers for the nearest enclosing key when a path is not written
in the file (a missing key, or a default filled in): the error then points at
the table it belongs in. The text must be valid (it parsed); on anything
unexpected the scan stops and returns what it has found so far.
"""

from __future__ import annotations

import bisect
import json
import re
import tomllib

_BARE_KEY_RE = re.compile(r"[A-Za-z0-9_-]+")
_PATH_PART_RE = re.compile(r'\.?(?:"(?:[^"\\]|\\.)*"|[A-Za-z0-9_-]+)|\[\d+\]')
_JSON_STRING_RE = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_JSON_SCALAR_RE = re.compile(r"[^\s,\]}]+")
_TOML_BASIC_RE = re.compile(r'"(?:[^"\\\n]|\\.)*"')
_TOML_SCALAR_END = ",]}\n\r#"


def join_key(path: str, key: str) -> str:
    """`path.key`, with a key that is not bare quoted as a JSON string."""
    part = key if _BARE_KEY_RE.fullmatch(key) else json.dumps(key, ensure_ascii=False)
    return f"{path}.{part}" if path else part


def parent_of(path: str) -> str:
    """The path one level up (`a.b[2]` -> `a.b`, `a."x.y"` -> `a`); "" at the top."""
    pos = last = 0
    while pos < len(path):
        m = _PATH_PART_RE.match(path, pos)
        if m is None or m.end() == pos:
            return ""  # not a key path
        last, pos = pos, m.end()
    return path[:last]


def line_of(lines: dict[str, int], path: str) -> int | None:
    """The line of `path`, or of its nearest enclosing key that is written; None if none is."""
    while path:
        line = lines.get(path)
        if line is not None:
            return line
        path = parent_of(path)
    return None


class _Text:
    """Positions in a text: offset -> line number (1-based)."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.breaks = [m.start() for m in re.finditer("\n", text)]

    def line(self, pos: int) -> int:
        return bisect.bisect_left(self.breaks, pos) + 1


class _StopScan(Exception):
    """The text is not what the scanner expected: stop with what has been found."""


# -- TOML -----------------------------------------------------------------------------------


class _TomlScanner:
    def __init__(self, text: str) -> None:
        self.pos = 0
        self.src = _Text(text)
        self.text = text
        self.lines: dict[str, int] = {}
        self.explicit: set[str] = set()
        self.tables: dict[str, int] = {}
        """Array-of-tables path -> how many `[[...]]` items it has so far."""

    # recording
    def mention(self, path: str, pos: int) -> None:
        """`path` is implied here (a prefix of a longer key): keep its first mention."""
        self.lines.setdefault(path, self.src.line(pos))

    def define(self, path: str, pos: int) -> None:
        """`path` is written here: it wins over an earlier mere mention."""
        if path not in self.explicit:
            self.explicit.add(path)
            self.lines[path] = self.src.line(pos)

    # low level
    def peek(self, n: int = 1) -> str:
        return self.text[self.pos : self.pos + n]

    def skip_blank(self, newlines: bool) -> None:
        text = self.text
        while self.pos < len(text):
            c = text[self.pos]
            if c in " \t" or (newlines and c in "\r\n"):
                self.pos += 1
            elif c == "#" and newlines:
                end = text.find("\n", self.pos)
                self.pos = len(text) if end < 0 else end
            else:
                return

    def expect(self, char: str) -> None:
        if self.peek() != char:
            raise _StopScan
        self.pos += 1

    def skip_multiline(self, quote: str) -> None:
        """Past a `\"\"\"` or `'''` string; up to two more quotes belong to its content."""
        text = self.text
        i = self.pos + 3
        while i < len(text):
            c = text[i]
            if c == "\\" and quote == '"':
                i += 2
            elif text.startswith(quote * 3, i):
                j = i + 3
                while j < len(text) and text[j] == quote and j - i < 5:
                    j += 1
                self.pos = j
                return
            else:
                i += 1
        raise _StopScan

    def string(self) -> str:
        """A one-line string, decoded; the scanner is left after it."""
        start = self.pos
        if self.peek() == '"':
            m = _TOML_BASIC_RE.match(self.text, start)
            if m is None:
                raise _StopScan
            self.pos = m.end()
        else:
            end = self.text.find("'", start + 1)
            if end < 0:
                raise _StopScan
            self.pos = end + 1
        value = tomllib.loads("k = " + self.text[start : self.pos])["k"]
        if not isinstance(value, str):  # pragma: no cover - it parsed as a string
            raise _StopScan
        return value

    # grammar
    def keys(self) -> list[tuple[str, int]]:
        """A dotted key: each part with where it starts."""
        parts: list[tuple[str, int]] = []
        while True:
            self.skip_blank(newlines=False)
            start = self.pos
            if self.peek() in ('"', "'"):
                parts.append((self.string(), start))
            else:
                m = _BARE_KEY_RE.match(self.text, start)
                if m is None:
                    raise _StopScan
                self.pos = m.end()
                parts.append((m.group(), start))
            self.skip_blank(newlines=False)
            if self.peek() != ".":
                return parts
            self.pos += 1

    def key_path(self, base: str, parts: list[tuple[str, int]]) -> str:
        """Record a dotted key under `base`; its last part is written, the others implied."""
        path = base
        for i, (key, start) in enumerate(parts):
            path = join_key(path, key)
            if i == len(parts) - 1:
                self.define(path, start)
            else:
                self.mention(path, start)
        return path

    def header(self) -> str:
        """A `[table]` or `[[array item]]` header: the path of the table it opens."""
        start = self.pos
        item = self.peek(2) == "[["
        self.pos += 2 if item else 1
        parts = self.keys()
        self.expect("]")
        if item:
            self.expect("]")
        path = ""
        for i, (key, _) in enumerate(parts):
            path = join_key(path, key)
            last = i == len(parts) - 1
            if last and item:
                index = self.tables.get(path, 0)
                self.tables[path] = index + 1
                self.mention(path, start)
                path = f"{path}[{index}]"
                self.define(path, start)
            elif last:
                self.define(path, start)
            else:
                self.mention(path, start)
                count = self.tables.get(path)
                if count:
                    path = f"{path}[{count - 1}]"
        return path

    def value(self, path: str) -> None:
        c = self.peek()
        if c in ('"', "'"):
            if self.peek(3) == c * 3:
                self.skip_multiline(c)
            else:
                self.string()
        elif c == "[":
            self.array(path)
        elif c == "{":
            self.inline_table(path)
        else:
            text = self.text
            start = self.pos
            while self.pos < len(text) and text[self.pos] not in _TOML_SCALAR_END:
                self.pos += 1
            if self.pos == start:
                raise _StopScan

    def array(self, path: str) -> None:
        self.expect("[")
        index = 0
        while True:
            self.skip_blank(newlines=True)
            if self.peek() == "]":
                self.pos += 1
                return
            item = f"{path}[{index}]"
            self.define(item, self.pos)
            self.value(item)
            index += 1
            self.skip_blank(newlines=True)
            if self.peek() == ",":
                self.pos += 1
            elif self.peek() != "]":
                raise _StopScan

    def inline_table(self, path: str) -> None:
        self.expect("{")
        while True:
            self.skip_blank(newlines=True)
            if self.peek() == "}":
                self.pos += 1
                return
            key = self.key_path(path, self.keys())
            self.expect("=")
            self.skip_blank(newlines=False)
            self.value(key)
            self.skip_blank(newlines=True)
            if self.peek() == ",":
                self.pos += 1
            elif self.peek() != "}":
                raise _StopScan

    def document(self) -> None:
        table = ""
        text = self.text
        while True:
            self.skip_blank(newlines=True)
            if self.pos >= len(text):
                return
            if self.peek() == "[":
                table = self.header()
                continue
            key = self.key_path(table, self.keys())
            self.expect("=")
            self.skip_blank(newlines=False)
            self.value(key)


def toml_lines(text: str) -> dict[str, int]:
    """Key path -> line, for every key and list item of a valid TOML document."""
    scanner = _TomlScanner(text)
    try:
        scanner.document()
    except (_StopScan, tomllib.TOMLDecodeError, RecursionError, IndexError):
        pass
    return scanner.lines


# -- JSON -----------------------------------------------------------------------------------


class _Frame:
    __slots__ = ("index", "is_object", "key", "path", "want_key")

    def __init__(self, path: str, is_object: bool) -> None:
        self.path = path
        self.is_object = is_object
        self.want_key = is_object
        self.key = ""
        self.index = 0


def json_lines(text: str) -> dict[str, int]:
    """Key path -> line, for every member and array item of a valid JSON document."""
    src = _Text(text)
    lines: dict[str, int] = {}
    stack: list[_Frame] = []
    pos = 0
    n = len(text)
    try:
        while True:
            while pos < n and text[pos] in " \t\r\n":
                pos += 1
            if pos >= n:
                break
            c = text[pos]
            top = stack[-1] if stack else None
            if c in "]}":
                stack.pop()
                pos += 1
                continue
            if c == ",":
                if top is not None:
                    if top.is_object:
                        top.want_key = True
                    else:
                        top.index += 1
                pos += 1
                continue
            if c == ":":
                pos += 1
                continue
            if top is not None and top.is_object and top.want_key:
                m = _JSON_STRING_RE.match(text, pos)
                if m is None:
                    break
                top.key = join_key(top.path, json.loads(m.group()))
                top.want_key = False
                lines[top.key] = src.line(pos)
                pos = m.end()
                continue
            # a value
            if top is None:
                path = ""
            elif top.is_object:
                path = top.key
            else:
                path = f"{top.path}[{top.index}]"
                lines[path] = src.line(pos)
            if c in "[{":
                stack.append(_Frame(path, c == "{"))
                pos += 1
            else:
                m = (_JSON_STRING_RE if c == '"' else _JSON_SCALAR_RE).match(text, pos)
                if m is None:
                    break
                pos = m.end()
    except (ValueError, IndexError):
        pass
    return lines
