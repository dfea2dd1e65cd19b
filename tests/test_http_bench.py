"""The HTTP benchmark's pieces: wrk's output, the CPU counters, the summary and its report;
then a one-second run against nginx direct and HAProxy (real peers)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from balancer.config.load import load_config
from tests.peers import free_port
from tests.test_bench_report import load_bench_module

http_bench = load_bench_module("http_bench")
http_peers = load_bench_module("http_peers")

WRK_OUT = """\
Running 5s test @ http://127.0.0.1:40111/small
  1 threads and 50 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   951.35us  210.56us   5.21ms   83.12%
    Req/Sec    52.63k     1.95k   55.60k    74.00%
  Latency Distribution
     50%  912.00us
     75%    1.02ms
     90%    1.16ms
     99%    1.68ms
  261874 requests in 5.00s, 37.96MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 4
Requests/sec:  52374.80
Transfer/sec:      7.59MB
"""


def test_wrk_output_gives_requests_latency_and_errors() -> None:
    res = http_bench.parse_wrk(WRK_OUT)
    assert res["requests"] == 261874
    assert res["seconds"] == 5.0
    assert res["rps"] == pytest.approx(261874 / 5.0)
    assert res["p50_ms"] == pytest.approx(0.912)
    assert res["p99_ms"] == pytest.approx(1.68)
    assert (res["errors"], res["non_2xx"]) == (3, 4)
    http_bench.check_run(res)  # 7 of 261874 is under the 1 % a run may lose


def test_wrk_output_in_seconds_and_without_error_lines() -> None:
    out = WRK_OUT.replace("1.68ms", "1.20s").replace("5.00s,", "1.00m,")
    out = "\n".join(
        line for line in out.splitlines() if "errors" not in line and "Non-2xx" not in line
    )
    res = http_bench.parse_wrk(out)
    assert res["p99_ms"] == pytest.approx(1200.0)
    assert res["seconds"] == pytest.approx(60.0)
    assert (res["errors"], res["non_2xx"]) == (0, 0)


def test_a_run_without_latency_or_with_many_errors_fails() -> None:
    with pytest.raises(http_bench.RunFailed, match="not understood"):
        http_bench.parse_wrk("unable to connect to 127.0.0.1:1 Connection refused\n")
    res = http_bench.parse_wrk(WRK_OUT.replace("responses: 4", "responses: 9000"))
    with pytest.raises(http_bench.RunFailed, match="9003 of 261874 requests failed"):
        http_bench.check_run(res)
    with pytest.raises(http_bench.RunFailed, match="no request"):
        http_bench.check_run({**res, "requests": 0.0})


def test_cpu_counters_read_proc() -> None:
    tck = os.sysconf("SC_CLK_TCK")
    # user nice system idle iowait irq softirq steal guest guest_nice
    stat = "cpu  100 5 50 9000 40 3 7 2 0 0\ncpu0 1 2 3 4 5 6 7 8 0 0\n"
    assert http_bench.machine_busy_seconds(stat) == (100 + 5 + 50 + 3 + 7 + 2) / tck
    assert http_bench.machine_busy_seconds() > 0
    times = os.times()
    own = http_bench.process_cpu_seconds(os.getpid())
    assert abs(own - (times.user + times.system)) < 0.1
    assert http_bench.rss_bytes(os.getpid()) > 1_000_000
    assert http_bench.process_tree(os.getpid())[0] == os.getpid()


def _run(rps: float, cpu: float, machine: float, rss: float = 20.0) -> dict[str, float]:
    return {
        "requests": 10_000.0,
        "rps": rps,
        "p50_ms": 0.5,
        "p99_ms": rps / 100_000,
        "errors": 0.0,
        "non_2xx": 1.0,
        "target_cpu_s_per_100k": cpu,
        "wrk_cpu_s_per_100k": 0.7,
        "machine_cpu_s_per_100k": machine,
        "rss_mb": rss,
    }


def _report(ours_status: str = "ok") -> dict[str, Any]:
    targets = {
        name: http_bench.Target(name) for name in ("direct", "haproxy", "nginx-proxy", "ours")
    }
    if ours_status != "ok":
        targets["ours"].status, targets["ours"].reason = ours_status, "exited with code 1"
    runs = {
        "small": {
            "direct": [_run(150_000.0, 0.6, 1.2)],
            "haproxy": [_run(50_000.0, 1.5, 3.0, 16.0), _run(60_000.0, 1.4, 2.8, 16.0)],
            "nginx-proxy": [_run(40_000.0, 1.8, 3.6, 14.0)],
            "ours": [_run(30_000.0, 3.0, 4.5, 40.0), _run(27_500.0, 2.8, 4.0, 40.0)],
        },
        "100 KB": {name: [_run(15_000.0, 4.0, 9.0)] for name in targets},
    }
    settings = {"duration_s": 5, "rounds": 2, "rounds_done": 2, "connections": 50}
    report: dict[str, Any] = http_bench.summarise(runs, targets, settings)
    return report


def test_summary_takes_medians_then_ratios_to_both_references() -> None:
    report = _report()
    small = report["workloads"]["small"]
    assert small["haproxy"]["rps"] == 55_000.0  # median of the two rounds
    assert (small["ours"]["rounds"], small["ours"]["errors"]) == (2, 2)
    r = small["ratios"]["ours/haproxy"]
    assert r["rps"] == round(28_750 / 55_000, 3)
    assert r["cpu_per_request"] == round(2.9 / 1.45, 3)
    assert r["machine_cpu_per_request"] == round(4.25 / 2.9, 3)
    assert r["rss"] == 2.5
    assert small["ratios"]["ours/nginx-proxy"]["rps"] == round(28_750 / 40_000, 3)
    table = http_bench.markdown(report)
    assert "| small | haproxy | 55000 | 0.500 | 0.550 | 1.450 | 0.700 | 2.900 | 16.0 | 2 |" in table
    assert "| small | ours/haproxy | 0.52 | 0.52 | 2.00 | 1.47 | 2.50 |" in table
    assert "| 100 KB | ours/nginx-proxy | 1.00 | 1.00 | 1.00 | 1.00 | 1.00 |" in table


def test_a_target_that_did_not_come_up_has_no_figures_and_no_ratios(tmp_path: Path) -> None:
    report = _report(ours_status="absent")
    small = report["workloads"]["small"]
    assert "ours" not in small
    assert small["ratios"]["ours/haproxy"] is None
    assert small["ratios"]["nginx-proxy/haproxy"]["rps"] == round(40_000 / 55_000, 3)
    table = http_bench.markdown(report)
    assert "ours absent (exited with code 1)" in table
    assert "| small | ours | - | - | - | - | - | - | - | - |" in table
    assert "| small | ours/haproxy | - | - | - | - | - |" in table

    (tmp_path / "http.json").write_text(json.dumps(report))
    report_module = load_bench_module("report")
    data = report_module.build(tmp_path)
    tables = {t["title"]: t["rows"] for t in data["comparisons"]}
    rows = tables["HTTP mode, small: throughput ratio to HAProxy"]
    assert [r["name"] for r in rows] == [
        "balancer (absent: exited with code 1)",
        "haproxy",
        "nginx-proxy",
        "direct",
    ]
    assert [r.get("ratio") for r in rows] == [None, 1.0, round(40_000 / 55_000, 3), 2.727]
    out = tmp_path / "report.html"
    assert report_module.main(["--results", str(tmp_path), "--out", str(out)]) == 0
    assert "balancer (absent: exited with code 1)" in out.read_text()


def test_report_shows_ours_against_both_references(tmp_path: Path) -> None:
    (tmp_path / "http.json").write_text(json.dumps(_report()))
    report_module = load_bench_module("report")
    data = report_module.build(tmp_path)
    rows = {
        r["name"]: r["ratio"]
        for t in data["comparisons"]
        if t["title"] == "HTTP mode, small: throughput ratio to HAProxy"
        for r in t["rows"]
    }
    assert rows["balancer"] == round(28_750 / 55_000, 3)
    summary = data["summary"]
    assert summary["http small: proxy CPU s / 100k req, ours / HAProxy / nginx"] == (
        "2.9 / 1.45 / 1.8"
    )
    assert summary["http small: ours/nginx-proxy req/s, CPU per req"] == "0.719 / 1.611"


def test_generated_configs(tmp_path: Path) -> None:
    backends = ["127.0.0.1:1001", "127.0.0.1:1002"]
    proxy = http_peers.proxy_config(tmp_path, 2000, backends)
    for line in (
        "worker_processes 1;",
        "daemon off;",
        "server 127.0.0.1:1001;",
        "server 127.0.0.1:1002;",
        "keepalive 32;",
        "proxy_http_version 1.1;",
        'proxy_set_header Connection "";',
        "listen 127.0.0.1:2000;",
    ):
        assert line in proxy
    backend = http_peers.backend_config(tmp_path, 2001)
    assert 'return 200 "ok\\n";' in backend
    assert "keepalive_requests 1000000;" in backend
    haproxy = http_peers.haproxy_config(2002, backends)
    for line in ("nbthread 1", "mode http", "http-reuse safe", "balance roundrobin"):
        assert f"    {line}\n" in haproxy
    assert "server s1 127.0.0.1:1002" in haproxy
    path = tmp_path / "http.toml"
    path.write_text(http_peers.ours_config(backends))
    (service,) = load_config(path).services
    assert service.mode == "http"
    assert [b.address for b in service.backends] == backends


@pytest.mark.peers
@pytest.mark.e2e
def test_quick_run_against_nginx_direct_and_haproxy(tmp_path: Path) -> None:
    code = http_bench.main(["--quick", "--targets", "direct,haproxy", "--out", str(tmp_path)])
    assert code == 0
    report = json.loads((tmp_path / "http.json").read_text())
    assert set(report["targets"]) == {"direct", "haproxy"}
    for workload in ("small", "100 KB"):
        entry = report["workloads"][workload]
        for name in ("direct", "haproxy"):
            assert entry[name]["rps"] > 100
            assert entry[name]["errors"] == 0
            assert entry[name]["target_cpu_s_per_100k"] > 0
            assert entry[name]["machine_cpu_s_per_100k"] >= entry[name]["target_cpu_s_per_100k"]
            assert entry[name]["wrk_cpu_s_per_100k"] > 0
        assert entry["ratios"]["ours/haproxy"] is None
    assert "| small | haproxy |" in (tmp_path / "http.md").read_text()

    nothing = http_bench.Target("ours", port=free_port(), pid=os.getpid())
    assert http_bench._run_one(nothing, "small", 1) is None
    assert nothing.status == "failed"
