"""One HTML report of every benchmark result in bench/results/, with the comparison tables.

    python bench/report.py [--results bench/results] [--out bench/results/report.html]

Reads whichever of message.json, tcp.json, http.json, tcp_soak.json, policy_e2e.json,
policies.json, soak.json and idle.json exist (each written by its own harness) and writes a
self-contained page: ours beside the reference measured in the same run
(direct connection, HAProxy, nginx), with the ratios.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from balancer.tools.report import ComparisonTable, write_html_report

HERE = Path(__file__).resolve().parent


def _load(results: Path, name: str) -> dict[str, Any] | None:
    path = results / f"{name}.json"
    if not path.exists():
        return None
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        print(f"skipping {path}: {exc}", file=sys.stderr)
        return None
    return data


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or not b:
        return None
    return round(a / b, 3)


def message_tables(data: dict[str, Any]) -> list[ComparisonTable]:
    """The main rows (16 connections, 4 backends), one table per pipeline depth; the rows
    that vary the work are in message.md."""
    by_key = {
        (s["target"], s["pipeline"]): s for s in data.get("scenarios", []) if s.get("main", True)
    }
    tables: list[ComparisonTable] = []
    for pipeline in sorted({p for _, p in by_key}):
        direct = by_key.get(("direct", pipeline))
        targets = [
            (name, by_key.get((name, pipeline)))
            for name in ("direct", "haproxy", "balancer", "balancer-pure")
        ]
        rows = []
        for name, s in targets:
            if s is None:
                continue
            rows.append(
                {
                    "name": name,
                    "rps": s.get("throughput_rps"),
                    "p50": s.get("p50_ms"),
                    "p99": s.get("p99_ms"),
                    "ratio": _ratio(s.get("throughput_rps"), (direct or {}).get("throughput_rps")),
                }
            )
        title = "lockstep" if pipeline == 1 else f"{pipeline} in flight per connection"
        tables.append({"title": f"Message mode, {title}: throughput ratio to direct", "rows": rows})
    return tables


def tcp_tables(data: dict[str, Any]) -> list[ComparisonTable]:
    tables: list[ComparisonTable] = []
    for workload, entry in (data.get("workloads") or {}).items():
        haproxy = entry.get("haproxy") or {}
        rows = []
        for name in ("ours", "haproxy", "direct"):
            s = entry.get(name)
            if not s:
                continue
            rows.append(
                {
                    "name": "balancer" if name == "ours" else name,
                    "rps": s.get("rps"),
                    "p50": s.get("p50_ms"),
                    "p99": s.get("p99_ms"),
                    "ratio": _ratio(s.get("rps"), haproxy.get("rps")),
                }
            )
        tables.append({"title": f"TCP mode, {workload}: throughput ratio to HAProxy", "rows": rows})
    return tables


HTTP_TARGETS = ("ours", "haproxy", "nginx-proxy", "direct")


def http_tables(data: dict[str, Any]) -> list[ComparisonTable]:
    """One table per workload (small, 100 KB): every target beside HAProxy; the balancer's row
    says why it has no figures when it did not come up or failed."""
    statuses = data.get("targets") or {}
    tables: list[ComparisonTable] = []
    for workload, entry in (data.get("workloads") or {}).items():
        haproxy = entry.get("haproxy") or {}
        rows: list[dict[str, Any]] = []
        for name in HTTP_TARGETS:
            status = statuses.get(name)
            if status is None:
                continue
            label = "balancer" if name == "ours" else name
            s = entry.get(name)
            if not s:
                why = status.get("reason") or "no figures"
                rows.append({"name": f"{label} ({status.get('status')}: {why})"})
                continue
            rows.append(
                {
                    "name": label,
                    "rps": s.get("rps"),
                    "p50": s.get("p50_ms"),
                    "p99": s.get("p99_ms"),
                    "ratio": _ratio(s.get("rps"), haproxy.get("rps")),
                }
            )
        tables.append(
            {"title": f"HTTP mode, {workload}: throughput ratio to HAProxy", "rows": rows}
        )
    return tables


def http_summary(data: dict[str, Any]) -> dict[str, object]:
    """Per workload: CPU per request of each proxy, and ours against the two references."""
    out: dict[str, object] = {}
    for workload, entry in (data.get("workloads") or {}).items():
        cpu = " / ".join(
            f"{(entry.get(n) or {}).get('target_cpu_s_per_100k', '-')}"
            for n in ("ours", "haproxy", "nginx-proxy")
        )
        out[f"http {workload}: proxy CPU s / 100k req, ours / HAProxy / nginx"] = cpu
        for label, r in (entry.get("ratios") or {}).items():
            if label.startswith("ours/"):
                out[f"http {workload}: {label} req/s, CPU per req"] = (
                    f"{r['rps']} / {r['cpu_per_request']}" if r else "-"
                )
    return out


def policy_tables(data: dict[str, Any]) -> list[ComparisonTable]:
    policies = data.get("policies") or {}
    base = (policies.get("round_robin") or {}).get("throughput_rps")
    rows = [
        {
            "name": f"{name} (slow backend share {100 * p.get('slow_share', 0):.1f} %)",
            "rps": p.get("throughput_rps"),
            "p50": p.get("p50_ms"),
            "p99": p.get("p99_ms"),
            "ratio": _ratio(p.get("throughput_rps"), base),
        }
        for name, p in policies.items()
    ]
    return [{"title": "Algorithms with one slow backend of 4: ratio to round_robin", "rows": rows}]


def summary(results: Path) -> dict[str, object]:
    out: dict[str, object] = {}
    soak = _load(results, "soak")
    if soak:
        out["soak: requests / failures"] = f"{soak.get('requests', 0):,} / {soak.get('failures')}"
        rss = soak.get("rss_mb") or {}
        out["soak: RSS start -> end (MB)"] = f"{rss.get('start')} -> {rss.get('end')}"
    tcp_soak = _load(results, "tcp_soak")
    if tcp_soak:
        out["tcp soak: pairs verified / values altered / connections cut by kills"] = (
            f"{tcp_soak.get('pairs_verified', 0):,} / {tcp_soak.get('values_altered')} / "
            f"{tcp_soak.get('connections_cut')}"
        )
        rss = tcp_soak.get("rss_mb") or {}
        out["tcp soak: RSS start -> end (MB)"] = f"{rss.get('start')} -> {rss.get('end')}"
    idle = _load(results, "idle")
    if idle:
        rss = idle.get("rss_mb") or {}
        out["idle connections: RSS (MB)"] = f"{idle.get('connections'):,} open: {rss.get('idle')}"
    tcp = _load(results, "tcp")
    if tcp and tcp.get("idle_rss_bytes_per_connection"):
        idle_tcp = tcp["idle_rss_bytes_per_connection"]
        out["tcp idle RSS per connection (B), ours / HAProxy"] = (
            f"{idle_tcp.get('ours', 0):.0f} / {idle_tcp.get('haproxy', 0):.0f}"
        )
    http = _load(results, "http")
    if http:
        out.update(http_summary(http))
    policies = _load(results, "policies")
    if policies:
        for name, picks in (policies.get("picks") or {}).items():
            out[f"pick cost {name} (ns, 4 / 64 backends)"] = (
                f"{picks.get('4', 0):.0f} / {picks.get('64', 0):.0f}"
            )
    return out


def build(results: Path) -> dict[str, Any]:
    comparisons: list[ComparisonTable] = []
    message = _load(results, "message")
    if message:
        comparisons += message_tables(message)
    tcp = _load(results, "tcp")
    if tcp:
        comparisons += tcp_tables(tcp)
    http = _load(results, "http")
    if http:
        comparisons += http_tables(http)
    policy = _load(results, "policy_e2e")
    if policy:
        comparisons += policy_tables(policy)
    return {
        "title": "balancer benchmarks",
        "summary": summary(results),
        "comparisons": comparisons,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=HERE / "results")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    out = args.out or args.results / "report.html"
    write_html_report(out, build(args.results))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
