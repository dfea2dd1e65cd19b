"""The benchmark report puts ours beside the reference with the right ratios."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

from tests.support import ROOT


def load_report_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_report", ROOT / "bench" / "report.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_report_compares_with_direct_and_haproxy(tmp_path: Path) -> None:
    (tmp_path / "message.json").write_text(
        json.dumps(
            {
                "scenarios": [
                    {"target": "direct", "pipeline": 1, "throughput_rps": 1000.0},
                    {"target": "balancer", "pipeline": 1, "throughput_rps": 450.0},
                ]
            }
        )
    )
    (tmp_path / "tcp.json").write_text(
        json.dumps(
            {
                "workloads": {
                    "redis P1 small": {
                        "ours": {"rps": 1100.0, "p50_ms": 0.5, "p99_ms": 2.0},
                        "haproxy": {"rps": 1000.0, "p50_ms": 0.4, "p99_ms": 1.0},
                    }
                }
            }
        )
    )
    report = load_report_module()
    data = report.build(tmp_path)
    tables = {t["title"]: t["rows"] for t in data["comparisons"]}
    lockstep = tables["Message mode, lockstep: throughput ratio to direct"]
    assert [(r["name"], r["ratio"]) for r in lockstep] == [("direct", 1.0), ("balancer", 0.45)]
    tcp = tables["TCP mode, redis P1 small: throughput ratio to HAProxy"]
    assert [(r["name"], r["ratio"]) for r in tcp] == [("balancer", 1.1), ("haproxy", 1.0)]
    out = tmp_path / "report.html"
    assert report.main(["--results", str(tmp_path), "--out", str(out)]) == 0
    html = out.read_text()
    assert "0.45" in html
    assert "1.1" in html
