"""HTML reports: a self-contained, well-formed file holding the numbers it was given."""

from __future__ import annotations

from html.parser import HTMLParser
from pathlib import Path

import pytest

from balancer.tools.report import ReportData, write_html_report
from tests.support import Balancers, Services, load_summary, start_load, write_toml

VOID = {"meta", "link", "br", "img", "input", "hr", "col", "area", "base", "wbr", "source"}


class WellFormed(HTMLParser):
    """Checks that every element closes in order, and collects text and external references."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.text: list[str] = []
        self.external: list[str] = []
        self.tags: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        for name, value in attrs:
            if name in ("src", "href") and value:
                self.external.append(value)
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)

    def handle_endtag(self, tag: str) -> None:
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
            return
        self.stack.pop()

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def parse(path: Path) -> WellFormed:
    text = path.read_text(encoding="utf-8")
    assert text.lstrip().lower().startswith("<!doctype html>")
    p = WellFormed()
    p.feed(text)
    p.close()
    assert p.errors == []
    assert p.stack == []
    return p


def test_report_holds_charts_and_numbers(tmp_path: Path) -> None:
    data: ReportData = {
        "title": "Run <1>",
        "summary": {"requests": 12345, "throughput (req/s)": 4321.5},
        "percentiles": [(0.0, 0.1), (50.0, 0.42), (90.0, 0.9), (99.0, 2.75), (100.0, 9.5)],
        "throughput": [(1.0, 4000.0), (2.0, 4400.0), (3.0, 4564.0)],
        "backends": {"127.0.0.1:8081": 6000, "127.0.0.1:8082": 6345},
        "comparisons": [
            {
                "title": "balancer vs haproxy",
                "rows": [
                    {"name": "balancer", "rps": 4321.5, "p50": 0.42, "p99": 2.75, "ratio": 1.0},
                    {"name": "haproxy", "rps": 9876.0, "p50": 0.2, "p99": 1.1, "ratio": 2.29},
                ],
            }
        ],
    }
    out = tmp_path / "report.html"
    write_html_report(out, data)
    p = parse(out)
    text = " ".join(p.text)
    assert "Run <1>" in text  # escaped in the file, shown as given
    for expected in (
        "12,345",
        "4,322",
        "2.75",
        "9.50",
        "4,564",
        "6,345",
        "51.4 %",
        "haproxy",
        "2.29",
    ):
        assert expected in text, expected
    assert "svg" in p.tags
    assert "polyline" in p.tags
    assert p.external == []
    assert not list(tmp_path.glob("*.tmp"))


def test_report_with_nothing_but_a_title_is_still_valid(tmp_path: Path) -> None:
    out = tmp_path / "empty.html"
    write_html_report(out, {"title": "Nothing ran"})
    assert "Nothing ran" in " ".join(parse(out).text)


@pytest.mark.e2e
def test_client_writes_a_report_of_its_run(
    tmp_path: Path, services: Services, balancers: Balancers
) -> None:
    services.start_many(2)
    bal = balancers.start(write_toml(tmp_path / "b.toml", services.ports))
    out = tmp_path / "run.html"
    client = start_load(
        bal.port,
        "--requests_per_client",
        "300",
        "--client_count",
        "2",
        "--report",
        str(out),
        admin_port=bal.admin_port,
    )
    summary = load_summary(client, timeout=120)
    p = parse(out)
    text = " ".join(p.text)
    assert "Latency by percentile" in text
    assert "Throughput over time" in text
    assert summary["requests"] == 600
    assert "600" in text
    for s in services:
        assert f"127.0.0.1:{s.port}" in text
    assert "300 (50.0 %)" in text  # round robin: half each
    assert "latency p99 (ms)" in text
    assert "99.9%" in text  # a row of the percentile table
    assert p.external == []
