"""The key-path -> line locators for TOML and JSON, checked against tomllib and json."""

from __future__ import annotations

import datetime as dt
import json
import re
import string
import tomllib
from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from balancer.config.keylines import join_key, json_lines, line_of, parent_of, toml_lines

# ---------------------------------------------------------------- examples

EXAMPLE = """\
# comment with [brackets] and "quotes" = 1
drain_timeout = 10
a.b."c.d" = 1   # dotted, one part quoted with a dot in it
[admin]
listen = "x # not a comment [x]"
[services.numbers]
backends = [
  "localhost:8090",  # a comment in an array
  { address = "h:1", weight = 2 },
  [1, 2,
   3],
]
text = \"\"\"multi
line = "no" [no]
\"\"\"
literal = '''lit
[not.a.table]
'''
when = 1979-05-27 07:32:00Z
[services.numbers.health]
rise = 2
[[services.numbers.xs]]
v = 1
[services.numbers.xs.sub]
w = 2
[[services.numbers.xs]]
v = 3
[services.numbers.xs.sub]
w = 4
[services."my svc".health]
"rise" = 1
"""


def test_toml_example_every_key_on_its_line() -> None:
    tomllib.loads(EXAMPLE)
    assert toml_lines(EXAMPLE) == {
        "drain_timeout": 2,
        "a": 3,
        "a.b": 3,
        'a.b."c.d"': 3,
        "admin": 4,
        "admin.listen": 5,
        "services": 6,
        "services.numbers": 6,
        "services.numbers.backends": 7,
        "services.numbers.backends[0]": 8,
        "services.numbers.backends[1]": 9,
        "services.numbers.backends[1].address": 9,
        "services.numbers.backends[1].weight": 9,
        "services.numbers.backends[2]": 10,
        "services.numbers.backends[2][0]": 10,
        "services.numbers.backends[2][1]": 10,
        "services.numbers.backends[2][2]": 11,
        "services.numbers.text": 13,
        "services.numbers.literal": 16,
        "services.numbers.when": 19,
        "services.numbers.health": 20,
        "services.numbers.health.rise": 21,
        "services.numbers.xs": 22,
        "services.numbers.xs[0]": 22,
        "services.numbers.xs[0].v": 23,
        "services.numbers.xs[0].sub": 24,
        "services.numbers.xs[0].sub.w": 25,
        "services.numbers.xs[1]": 26,
        "services.numbers.xs[1].v": 27,
        "services.numbers.xs[1].sub": 28,
        "services.numbers.xs[1].sub.w": 29,
        'services."my svc"': 30,
        'services."my svc".health': 30,
        'services."my svc".health.rise': 31,
    }


def test_a_key_not_written_points_at_its_table() -> None:
    lines = toml_lines(EXAMPLE)
    assert line_of(lines, "services.numbers.health.fall") == 20
    assert line_of(lines, "services.numbers.backends[1].address") == 9
    assert line_of(lines, "services.numbers.backends[7]") == 7
    assert line_of(lines, "services.other.listen") == 6
    assert line_of(lines, 'services."my svc".listen') == 30
    assert line_of(lines, "nowhere") is None
    assert line_of(lines, "") is None


def test_parent_of_respects_quoting() -> None:
    assert parent_of('services."a.b[1]".backends[2]') == 'services."a.b[1]".backends'
    assert parent_of('services."a.b[1]".backends') == 'services."a.b[1]"'
    assert parent_of('services."a.b[1]"') == "services"
    assert parent_of("services") == ""
    assert parent_of("line 3, column 5") == ""


def test_join_key_quotes_what_is_not_bare() -> None:
    assert join_key("", "services") == "services"
    assert join_key("services", "my svc") == 'services."my svc"'
    assert join_key("services", "été") == 'services."été"'


def test_a_truncated_document_gives_what_was_found() -> None:
    assert toml_lines('a = 1\nb = "unterminated\n') == {"a": 1, "b": 2}


def test_json_example() -> None:
    text = (
        '{"servers": [\n {"host": "a",\n "port": 1},\n "x:1"],\n'
        ' "b": {"c": [1,\n{"d": null, "e\\"f": "}]"}]}}'
    )
    json.loads(text)
    assert json_lines(text) == {
        "servers": 1,
        "servers[0]": 2,
        "servers[0].host": 2,
        "servers[0].port": 3,
        "servers[1]": 4,
        "b": 5,
        "b.c": 5,
        "b.c[0]": 5,
        "b.c[1]": 6,
        "b.c[1].d": 6,
        'b.c[1]."e\\"f"': 6,
    }


# ---------------------------------------------------------------- TOML property


@dataclass(frozen=True)
class Leaf:
    """A value as written in TOML, and the value tomllib reads from it."""

    text: str
    value: object


_UTC = dt.UTC
_SPECIAL = [
    Leaf('"""a""b"""', 'a""b'),
    Leaf('"""a\\"""b"""', 'a"""b'),
    Leaf('"""ab"""""', 'ab""'),
    Leaf("'''x''y'''", "x''y"),
    Leaf("'''z'''''", "z''"),
    Leaf('"""\\\nline continued"""', "line continued"),
    Leaf("1979-05-27 07:32:00Z", dt.datetime(1979, 5, 27, 7, 32, tzinfo=_UTC)),
    Leaf("1979-05-27", dt.date(1979, 5, 27)),
    Leaf("07:32:00", dt.time(7, 32)),
    Leaf("0x_ff".replace("_", ""), 255),
    Leaf("1_000", 1000),
    Leaf("inf", float("inf")),
]
_TEXT = st.text(
    alphabet=st.characters(
        blacklist_categories=("Cc", "Cs"), blacklist_characters="\\\"'\x7f", max_codepoint=0x2FF
    )
    | st.sampled_from("#[]{}=,. \t\"'\\"),
    max_size=12,
)


def _basic(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"').replace("\t", "\\t") + '"'


@st.composite
def _string_leaf(draw: st.DrawFn) -> Leaf:
    s = draw(_TEXT)
    style = draw(st.sampled_from(["basic", "literal", "multi", "multi_literal"]))
    if style == "literal" and "'" not in s:
        return Leaf(f"'{s}'", s)
    if style in ("multi", "multi_literal"):
        s = s + "\n" + draw(_TEXT)
        opener = "\n" if s.startswith("\n") else ""  # a newline right after the opener is dropped
        if style == "multi_literal" and "'" not in s:
            return Leaf(f"'''{opener}{s}'''", s)
        body = s.replace("\\", "\\\\").replace('"', '\\"')
        return Leaf(f'"""{opener}{body}"""', s)
    return Leaf(_basic(s), s)


LEAVES = st.one_of(
    st.integers(-(2**63), 2**63 - 1).map(lambda i: Leaf(str(i), i)),
    st.floats(allow_nan=False, allow_infinity=False).map(lambda f: Leaf(repr(f), f)),
    st.booleans().map(lambda b: Leaf(str(b).lower(), b)),
    _string_leaf(),
    st.sampled_from(_SPECIAL),
)
KEYS = st.one_of(
    st.text(alphabet=string.ascii_letters + string.digits + "_-", min_size=1, max_size=6),
    st.text(alphabet=string.ascii_letters + string.digits + " .[]#=-_{}é", min_size=1, max_size=6),
)
VALUES = st.recursive(
    LEAVES,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(KEYS, children, max_size=4)
    ),
    max_leaves=20,
)
DOCUMENTS = st.dictionaries(KEYS, VALUES, max_size=6)


def plain(value: object) -> object:
    """The value tomllib should read back."""
    if isinstance(value, Leaf):
        return value.value
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    raise TypeError(value)  # pragma: no cover


@dataclass
class Writer:
    """Writes a document the way a person might, noting the line of every key path."""

    draw: st.DrawFn
    parts: list[str] = field(default_factory=list)
    line: int = 1
    lines: dict[str, int] = field(default_factory=dict)

    def write(self, text: str) -> None:
        self.parts.append(text)
        self.line += text.count("\n")

    def note(self, path: str) -> None:
        """`path` appears on the current line (a table: its first mention counts)."""
        self.lines.setdefault(path, self.line)

    def key(self, key: str) -> str:
        bare = re.fullmatch(r"[A-Za-z0-9_-]+", key) is not None
        style = self.draw(st.sampled_from(["bare", "basic", "literal"]))
        if bare and style == "bare":
            return key
        if style == "literal":
            return f"'{key}'"
        return json.dumps(key, ensure_ascii=False)

    def comment(self) -> None:
        if self.draw(st.booleans()):
            self.write(self.draw(st.sampled_from([" # x = [1]", "  # ''' \"\"\" {", " #"])))

    # values
    def value(self, value: object, path: str, inline: bool) -> None:
        if isinstance(value, Leaf):
            self.write(value.text)
        elif isinstance(value, list):
            many = not inline and self.draw(st.booleans())
            self.write("[")
            for i, item in enumerate(value):
                if many:
                    self.write("\n  ")
                self.note(f"{path}[{i}]")
                self.value(item, f"{path}[{i}]", inline)
                self.write(", " if i < len(value) - 1 or many else "")
                if many:
                    self.comment()
            self.write("\n]" if many else "]")
        else:
            assert isinstance(value, dict)
            self.write("{ ")
            for i, (k, v) in enumerate(value.items()):
                self.pair([k], v, path, inline=True)
                if i < len(value) - 1:
                    self.write(", ")
            self.write(" }")

    def pair(self, keys: list[str], value: object, base: str, inline: bool) -> None:
        """`a.b.c = value`: each key part noted on this line."""
        path = base
        for k in keys:
            path = join_key(path, k)
            self.note(path)
        self.write(".".join(self.key(k) for k in keys) + " = ")
        self.value(value, path, inline)

    def dotted(self, keys: list[str], value: dict[str, object], base: str) -> None:
        for k, v in value.items():
            if isinstance(v, dict) and v and self.draw(st.booleans()):
                self.dotted([*keys, k], v, base)
            else:
                self.pair([*keys, k], v, base, inline=False)
                self.comment()
                self.write("\n")

    # tables
    def header(self, keys: list[str], paths: list[str], array: bool) -> None:
        """`[a.b]` or `[[a.b]]`; `paths` are the key paths of its prefixes, noted here."""
        text = ".".join(self.key(k) for k in keys)
        self.write(f"\n[[{text}]]" if array else f"\n[{text}]")
        for path in paths:
            self.note(path)
        self.comment()
        self.write("\n")

    def section(
        self, table: dict[str, object], keys: list[str], paths: list[str], headers_only: bool
    ) -> None:
        """The body of a table: its pairs, then its sub-tables under their own headers."""
        path = paths[-1] if paths else ""
        later: list[tuple[str, object]] = []
        for k, v in table.items():
            is_tables = isinstance(v, list) and v and all(isinstance(i, dict) for i in v)
            header = headers_only or self.draw(st.booleans())
            if (isinstance(v, dict) or is_tables) and header:
                later.append((k, v))
            elif isinstance(v, dict) and v and self.draw(st.booleans()):
                self.dotted([k], v, path)
            else:
                self.pair([k], v, path, inline=False)
                self.comment()
                self.write("\n")
        for k, v in later:
            sub_keys, sub = [*keys, k], join_key(path, k)
            if isinstance(v, dict):
                self.table(v, sub_keys, [*paths, sub])
                continue
            assert isinstance(v, list)
            for i, item in enumerate(v):
                assert isinstance(item, dict)
                self.header(sub_keys, [*paths, sub, f"{sub}[{i}]"], array=True)
                self.section(item, sub_keys, [*paths, f"{sub}[{i}]"], headers_only=False)

    def table(self, table: dict[str, object], keys: list[str], paths: list[str]) -> None:
        """A table under a header of its own, or (when it holds only tables) under theirs."""
        only_tables = table and all(
            isinstance(v, dict)
            or (isinstance(v, list) and v and all(isinstance(i, dict) for i in v))
            for v in table.values()
        )
        if only_tables and self.draw(st.booleans()):
            self.section(table, keys, paths, headers_only=True)
        else:
            self.header(keys, paths, array=False)
            self.section(table, keys, paths, headers_only=False)


@st.composite
def toml_documents(draw: st.DrawFn) -> tuple[str, dict[str, object], Writer]:
    doc = draw(DOCUMENTS)
    writer = Writer(draw)
    if draw(st.booleans()):
        writer.write("# a document\n")
    writer.section(doc, [], [], headers_only=False)
    return "".join(writer.parts), doc, writer


def all_paths(value: object, path: str = "") -> list[tuple[str, str | None]]:
    """Every key path of `value`, each with its last key (None for a list item)."""
    out: list[tuple[str, str | None]] = []
    if isinstance(value, dict):
        for k, v in value.items():
            sub = join_key(path, k)
            out.append((sub, k))
            out.extend(all_paths(v, sub))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            sub = f"{path}[{i}]"
            out.append((sub, None))
            out.extend(all_paths(v, sub))
    return out


@settings(max_examples=150, deadline=None)
@given(case=toml_documents())
def test_toml_locator_finds_every_key_on_the_line_that_holds_it(
    case: tuple[str, dict[str, object], Writer],
) -> None:
    text, doc, writer = case
    parsed = tomllib.loads(text)
    assert parsed == plain(doc), text
    lines = toml_lines(text)
    source = text.split("\n")
    paths = all_paths(parsed)
    assert set(lines) == {path for path, _ in paths}, text
    for path, key in paths:
        if key is not None:
            assert key in source[lines[path] - 1], (path, text)
    assert lines == writer.lines, text


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=60, deadline=None)
@given(
    doc=st.dictionaries(st.text(max_size=5), JSON_VALUES, max_size=5),
    indent=st.sampled_from([None, 1, 2]),
)
def test_json_locator_finds_every_member_and_item(
    doc: dict[str, object], indent: int | None
) -> None:
    text = json.dumps(doc, indent=indent)
    lines = json_lines(text)
    source = text.split("\n")
    paths = all_paths(json.loads(text))
    assert set(lines) == {path for path, _ in paths}
    for path, key in paths:
        if key is not None:
            assert json.dumps(key) in source[lines[path] - 1], (path, text)
        elif indent is None:
            assert lines[path] == 1


EDGES = '''s = """a""""" 
t = 1
u = \'\'\'x\'\'\'\'\'
v = 2
w = """
q""x""" \t
x = [ # c
  1 , [ 2 ] ,
  { a = 1 , b = [ 3 ] } ,
]
y . z = 3
[ tbl . "q k" ]
k = 1 # the last line ends without a newline'''


def test_toml_edges_quotes_closing_a_string_spaces_and_no_final_newline() -> None:
    tomllib.loads(EDGES)
    assert toml_lines(EDGES) == {
        "s": 1,
        "t": 2,
        "u": 3,
        "v": 4,
        "w": 5,
        "x": 7,
        "x[0]": 8,
        "x[1]": 8,
        "x[1][0]": 8,
        "x[2]": 9,
        "x[2].a": 9,
        "x[2].b": 9,
        "x[2].b[0]": 9,
        "y": 11,
        "y.z": 11,
        "tbl": 12,
        'tbl."q k"': 12,
        'tbl."q k".k': 13,
    }


def test_json_edges_spaces_empty_containers_and_escaped_quotes() -> None:
    text = (
        '{ "a" : [ 1 , { "b" : 2 } , [ 3 ] ] ,\n "c" :\n {\n "d" : [ ] , "e": {} },\n'
        ' "f" : "x\\"y" , "g" : 1 }'
    )
    json.loads(text)
    assert json_lines(text) == {
        "a": 1,
        "a[0]": 1,
        "a[1]": 1,
        "a[1].b": 1,
        "a[2]": 1,
        "a[2][0]": 1,
        "c": 2,
        "c.d": 4,
        "c.e": 4,
        "f": 5,
        "g": 5,
    }
