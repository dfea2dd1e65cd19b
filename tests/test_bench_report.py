"""The benchmark report puts ours beside the reference with the right ratios."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

from tests.support import ROOT


def load_bench_module(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
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
    report = load_bench_module("report")
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


def test_tcp_bench_summary_reports_proxy_and_machine_cpu_ratios() -> None:
    tcp_bench = load_bench_module("tcp_bench")

    def run(rps: float, cpu: float, machine: float) -> dict[str, float]:
        return {
            "requests": 1000.0,
            "rps": rps,
            "p50_ms": 0.5,
            "p99_ms": 1.0,
            "cpu_s_per_100k": cpu,
            "machine_cpu_s_per_100k": machine,
        }

    samples = {
        "redis P1 small": {
            "ours": [run(90.0, 1.2, 2.4), run(110.0, 1.0, 2.2), run(100.0, 1.1, 2.3)],
            "haproxy": [run(80.0, 1.0, 2.0)],
            "direct": [run(150.0, 0.0, 1.2)],
        }
    }
    report = tcp_bench.summarise(samples, {"ours": 2600.0, "haproxy": 3300.0}, rounds=3)
    ratio = report["workloads"]["redis P1 small"]["ratio_ours_haproxy"]
    assert "ratio_uring_haproxy" not in report["workloads"]["redis P1 small"]
    # medians over rounds first, then ours / HAProxy
    assert ratio["rps"] == 100.0 / 80.0
    assert ratio["cpu_per_request"] == 1.1 / 1.0
    assert ratio["machine_cpu_per_request"] == 2.3 / 2.0
    table = tcp_bench.markdown(report)
    assert "| redis P1 small | uvloop | 1.25 | 1.10 | 1.15 | 1.00 |" in table
    assert "| redis P1 small | direct | 150 | 0.500 | 1.000 | - | 1.200 | - |" in table
    assert "ours (uvloop) 2600 B (ratio 0.79); HAProxy 3300 B" in table
