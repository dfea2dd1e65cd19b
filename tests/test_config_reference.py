"""The configuration reference (docs/configuration.md) is generated from the config model."""

from __future__ import annotations

from pathlib import Path

import pytest

from balancer.config import doc
from balancer.config.doc import REFERENCE, reference
from balancer.config.policies import ALGORITHMS
from balancer.config.schema import MEANINGS, TABLE_KEYS

ROOT = Path(__file__).resolve().parent.parent


def test_the_reference_is_the_generated_one() -> None:
    """Regenerate with `python -m balancer.config.doc reference --write docs/configuration.md`."""
    assert (ROOT / REFERENCE).read_text(encoding="utf-8") == reference()


def test_every_key_the_loader_knows_has_a_meaning_and_no_other_does() -> None:
    assert {table: set(keys) for table, keys in MEANINGS.items()} == {
        table: set(keys) for table, keys in TABLE_KEYS.items()
    }
    assert all(meaning.strip() for keys in MEANINGS.values() for meaning in keys.values())


def test_the_reference_has_a_row_for_every_key_algorithm_and_option() -> None:
    text = reference()
    sections = text.split("\n## ")[1:]
    tables = dict(zip(TABLE_KEYS, sections, strict=False))
    for table, keys in TABLE_KEYS.items():
        rows = [line for line in tables[table].splitlines() if line.startswith("| `")]
        assert [row.split("`")[1] for row in rows] == list(keys), table
    for name, algorithm in ALGORITHMS.items():
        assert f"| `{name}` | {'yes' if algorithm.weighted else 'no'} | {algorithm.doc} |" in text
        assert algorithm.doc
        for key, spec in algorithm.options.items():
            assert f"| `{name}` | `{key}` |" in text
            assert spec.doc


@pytest.mark.parametrize("document", ["bounds", "reference"])
def test_the_script_prints_and_writes_the_documents(
    document: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert doc.main([document]) == 0
    printed = capsys.readouterr().out
    expected = doc.bounds_table() + "\n" if document == "bounds" else reference()
    assert printed == expected
    target = tmp_path / "out.md"
    target.write_text(f"before\n{doc.BEGIN}\nold\n{doc.END}\nafter\n", encoding="utf-8")
    assert doc.main([document, "--write", str(target)]) == 0
    written = target.read_text(encoding="utf-8")
    if document == "bounds":
        assert written == f"before\n{doc.BEGIN}\n{doc.bounds_table()}\n{doc.END}\nafter\n"
    else:
        assert written == reference()
