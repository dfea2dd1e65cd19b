"""Every promise of the README's behaviour sections has a row in docs/promises.md naming its tests.

A promise is a bullet, a table row or a paragraph of a behaviour section (code blocks and table
headers are not), identified by its key: the bold lead of a bullet (`**Health**: ...` ->
`Health`), or else the first KEY_WORDS words of the text (of a table row: of its first cell),
without Markdown marks. docs/promises.md holds one table row per promise: section, key, and
the tests that prove it (`tests/test_x.py::test_name`, parameters left out) or
`untested: <why>`.

The checks: no promise without a row, no row without its promise (stale), no row naming a test
that does not exist (test names are read from the test files with `ast`), none without tests or
a reason. Rewording a promise's first words changes its key: edit that row's key to match.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROMISES = ROOT / "docs" / "promises.md"
KEY_WORDS = 5

BEHAVIOUR_SECTIONS: dict[str, tuple[str, ...]] = {
    "README.md": (
        "The tutorial's commands",
        "Configuration",
        "Wire protocol (message mode)",
        "How it behaves",
        "Balancing algorithms",
        "TCP (L4) mode",
        "Limits, timeouts and failure handling",
        "Operating it",
    ),
}
"""The documents and the `## ` sections of each whose bullets, table rows and paragraphs are
promises. A page under docs/ that describes behaviour is added here with its sections."""


@dataclass(frozen=True)
class Promise:
    document: str
    section: str
    key: str
    text: str


def plain(text: str) -> str:
    """Text without Markdown marks (code spans, emphasis, links, escapes), in one line."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    text = text.replace("\\|", "|").replace("`", "").replace("**", "").replace("*", "")
    return " ".join(text.split())


def normal(key: str) -> str:
    """The form two keys are compared in: plain, case-folded, no trailing punctuation."""
    return plain(key).casefold().rstrip(".,:;")


def key_of(kind: str, text: str) -> str:
    if kind == "row":
        text = split_row(text)[0]
    lead = re.match(r"\*\*(.+?)\*\*", text)
    if kind == "bullet" and lead:
        return plain(lead.group(1)).rstrip(".,:;")
    words = plain(text).split()[:KEY_WORDS]
    return " ".join(words).rstrip(".,:;")


def split_row(line: str) -> list[str]:
    cells = re.split(r"(?<!\\)\|", line.strip().strip("|"))
    return [c.strip() for c in cells]


def blocks(body: list[str]) -> list[tuple[str, str]]:
    """The bullets, table rows and paragraphs of a section body, as (kind, text)."""
    out: list[tuple[str, str]] = []
    current: list[str] = []
    kind = ""
    in_code = False
    table_header = False

    def close() -> None:
        nonlocal current
        if current:
            out.append((kind, " ".join(s.strip() for s in current)))
        current = []

    for line in body:
        if line.startswith("```"):
            close()
            in_code = not in_code
            continue
        if in_code:
            continue
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            close()
            table_header = False
            continue
        if stripped.startswith("|"):
            close()
            if re.fullmatch(r"\|[\s:|-]+\|", stripped):
                continue  # the separator under a header
            if not table_header and (not out or out[-1][0] != "row"):
                table_header = True  # the first row of a table is its header
                continue
            out.append(("row", stripped))
            continue
        if re.match(r"[-*] ", stripped) and not line.startswith(" "):
            close()
            kind = "bullet"
            current = [stripped[2:]]
            continue
        if current:
            current.append(stripped)
        else:
            kind = "paragraph"
            current = [stripped]
    close()
    return out


def promises(document: str, text: str, sections: tuple[str, ...]) -> list[Promise]:
    found: list[Promise] = []
    parts = re.split(r"^## (.+)$", text, flags=re.M)
    bodies = dict(zip(parts[1::2], parts[2::2], strict=True))
    for section in sections:
        assert section in bodies, f"{document} has no section {section!r}: update the list"
        for kind, block in blocks(bodies[section].splitlines()):
            found.append(Promise(document, section, key_of(kind, block), block))
    return found


def all_promises() -> list[Promise]:
    found: list[Promise] = []
    for document, sections in BEHAVIOUR_SECTIONS.items():
        found += promises(document, (ROOT / document).read_text(), sections)
    return found


@dataclass(frozen=True)
class Row:
    line: int
    section: str
    key: str
    tests: tuple[str, ...]
    untested: str


def rows(text: str) -> list[Row]:
    """The rows of the promise table: | section | promise | tests |."""
    found: list[Row] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.startswith("|") or re.fullmatch(r"\|[\s:|-]+\|", line.strip()):
            continue
        cells = split_row(line)
        if len(cells) != 3 or cells[0] == "section":
            continue
        proof = plain(cells[2])
        untested = ""
        tests: tuple[str, ...] = ()
        if proof.startswith("untested:"):
            untested = proof.removeprefix("untested:").strip()
        else:
            tests = tuple(t for t in re.split(r"[\s,]+", proof) if t)
        found.append(Row(number, plain(cells[0]), plain(cells[1]), tests, untested))
    return found


def collect_test_names(root: Path) -> set[str]:
    """`tests/test_x.py::test_name` (and `::Class::test_name`) of every test in the suite."""
    names: set[str] = set()
    for path in sorted((root / "tests").glob("test_*.py")):
        rel = path.relative_to(root).as_posix()
        tree = ast.parse(path.read_text())
        for node in tree.body:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                if node.name.startswith("test"):
                    names.add(f"{rel}::{node.name}")
            elif isinstance(node, ast.ClassDef) and node.name.startswith("Test"):
                for item in node.body:
                    if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef):
                        if item.name.startswith("test"):
                            names.add(f"{rel}::{node.name}::{item.name}")
    return names


def missing_rows(found: list[Promise], table: list[Row]) -> list[Promise]:
    have = {(r.section, normal(r.key)) for r in table}
    return [p for p in found if (p.section, normal(p.key)) not in have]


def stale_rows(found: list[Promise], table: list[Row]) -> list[Row]:
    known = {(p.section, normal(p.key)) for p in found}
    return [r for r in table if (r.section, normal(r.key)) not in known]


def bad_proofs(table: list[Row], names: set[str]) -> list[str]:
    """Rows naming a test that does not exist, or neither tests nor a reason, or both."""
    problems = []
    for r in table:
        if not r.tests and not r.untested:
            problems.append(f"line {r.line} ({r.key}): names no test and no reason")
        elif r.tests and r.untested:
            problems.append(f"line {r.line} ({r.key}): tests or untested, not both")
        unknown = [t for t in r.tests if t.split("[")[0] not in names]
        if unknown:
            problems.append(f"line {r.line} ({r.key}): no such test: {', '.join(unknown)}")
    return problems


# -- the parser ----------------------------------------------------------------------------------

SAMPLE = """\
# title

## Behaviour

Intro paragraph that
spans two lines.

- **Bold lead**: text of
  a bullet.
- A bullet with no lead, `code` in it.

```toml
- not a bullet = 1
```

| key | meaning |
| --- | --- |
| `a_key` | what it does \\| with a pipe |
| second | row |

## Elsewhere

- not a promise
"""


def test_the_parser_finds_bullets_rows_and_paragraphs_and_keys_them() -> None:
    found = promises("SAMPLE", SAMPLE, ("Behaviour",))
    assert [p.key for p in found] == [
        "Intro paragraph that spans two",
        "Bold lead",
        "A bullet with no lead",
        "a_key",
        "second",
    ]
    assert found[1].text == "**Bold lead**: text of a bullet."


def test_the_table_parser_reads_tests_and_reasons() -> None:
    table = (
        "| section | promise | tests |\n| --- | --- | --- |\n"
        "| S | `a_key` | `tests/test_a.py::test_one`, `tests/test_b.py::test_two[x]` |\n"
        "| S | Bold lead | untested: needs a second machine |\n"
    )
    first, second = rows(table)
    assert (first.section, first.key) == ("S", "a_key")
    assert first.tests == ("tests/test_a.py::test_one", "tests/test_b.py::test_two[x]")
    assert (second.key, second.tests, second.untested) == (
        "Bold lead",
        (),
        "needs a second machine",
    )


def test_the_checks_catch_a_new_promise_a_stale_row_and_a_missing_test() -> None:
    found = promises("SAMPLE", SAMPLE, ("Behaviour",))
    table = rows(
        "| Behaviour | intro paragraph that spans two | `tests/test_a.py::test_one` |\n"
        "| Behaviour | **Bold lead** | `tests/test_a.py::test_gone` |\n"
        "| Behaviour | A bullet with no lead | untested: why |\n"
        "| Behaviour | `a_key` | `tests/test_a.py::test_one[p]` |\n"
        "| Behaviour | A removed promise | untested: why |\n"
        "| Behaviour | no proof | |\n"
    )
    assert [p.key for p in missing_rows(found, table)] == ["second"]
    assert [r.key for r in stale_rows(found, table)] == ["A removed promise", "no proof"]
    assert bad_proofs(table, {"tests/test_a.py::test_one"}) == [
        "line 2 (Bold lead): no such test: tests/test_a.py::test_gone",
        "line 6 (no proof): names no test and no reason",
    ]


def test_test_names_are_read_from_the_test_files(tmp_path: Path) -> None:
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_x.py").write_text(
        "def test_a(): pass\nasync def test_b(): pass\ndef helper(): pass\n"
        "class TestC:\n    def test_d(self): pass\n"
    )
    assert collect_test_names(tmp_path) == {
        "tests/test_x.py::test_a",
        "tests/test_x.py::test_b",
        "tests/test_x.py::TestC::test_d",
    }


# -- the promises --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def table() -> list[Row]:
    return rows(PROMISES.read_text())


def test_every_promise_has_a_row(table: list[Row]) -> None:
    missing = missing_rows(all_promises(), table)
    assert not missing, "promises without a row in docs/promises.md:\n" + "\n".join(
        f"| {p.section} | {p.key} | ... |    <- {p.text[:90]}" for p in missing
    )


def test_every_row_is_a_promise_of_today(table: list[Row]) -> None:
    stale = stale_rows(all_promises(), table)
    assert not stale, "rows of docs/promises.md whose promise is gone (reworded?):\n" + "\n".join(
        f"line {r.line}: | {r.section} | {r.key} |" for r in stale
    )


def test_promise_keys_are_unique() -> None:
    keys = [(p.section, normal(p.key)) for p in all_promises()]
    assert len(keys) == len(set(keys)), [k for k in keys if keys.count(k) > 1]


def test_rows_are_unique(table: list[Row]) -> None:
    keys = [(r.section, normal(r.key)) for r in table]
    assert len(keys) == len(set(keys)), [k for k in keys if keys.count(k) > 1]


def test_every_row_names_existing_tests_or_says_why_not(table: list[Row]) -> None:
    problems = bad_proofs(table, collect_test_names(ROOT))
    assert not problems, "docs/promises.md:\n" + "\n".join(problems)
