"""The TLS benchmark's pieces: redis-benchmark's output, run sizes, the generated configs,
the summary and its report; then a --quick run of every target (real peers)."""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

import pytest

from balancer.config.load import load_config
from tests.test_bench_report import load_bench_module

tls_bench = load_bench_module("tls_bench")

CSV = """\
"test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms","p99_latency_ms","max_latency_ms"
"SET","40000.00","1.100","0.200","1.000","1.900","2.500","9.000"
"GET","60000.00","0.900","0.200","0.800","1.500","2.000","8.000"
"""


def test_csv_gives_the_rate_over_both_tests_and_their_latencies() -> None:
    res = tls_bench.parse_csv(CSV, 120_000, 2)
    assert res["requests"] == 240_000
    # 3 s of SET and 2 s of GET: 240k requests in 5 s
    assert res["rps"] == pytest.approx(48_000)
    assert res["p50_ms"] == pytest.approx(0.9)
    assert res["p99_ms"] == pytest.approx(2.5)
    ping = '"PING_MBULK","1500.00","20.0","2.0","19.0","30.0","40.0","50.0"\n'
    assert tls_bench.parse_csv(ping, 3000, 1)["rps"] == pytest.approx(1500)


def test_output_without_every_test_fails() -> None:
    with pytest.raises(tls_bench.RunFailed, match="not understood"):
        tls_bench.parse_csv(CSV.splitlines()[1] + "\n", 1000, 2)
    with pytest.raises(tls_bench.RunFailed, match="not understood"):
        tls_bench.parse_csv("Error: Connection reset by peer\n", 1000, 1)
    with pytest.raises(tls_bench.RunFailed, match="not understood"):
        tls_bench.parse_csv(CSV.replace("60000.00", "0.00"), 1000, 2)


def test_runs_are_sized_to_the_seconds_asked_within_bounds() -> None:
    p1 = tls_bench.WORKLOADS["kept-alive P1"]
    handshake = tls_bench.WORKLOADS["new handshake"]
    assert tls_bench._next_requests(40_000.0, 2.0, p1) == 40_000  # per test: SET, GET
    assert tls_bench._next_requests(10.0, 2.0, p1) == p1.warm
    assert tls_bench._next_requests(1e9, 60.0, p1) == p1.most
    assert tls_bench._next_requests(1500.0, 2.0, handshake) == 3000
    cmd = tls_bench.bench_command(6380, Path("/ca.pem"), handshake, 3000)
    assert cmd[cmd.index("-k") + 1] == "0"
    assert cmd[cmd.index("-t") + 1] == "ping_mbulk"
    assert "--tls" in cmd
    assert cmd[cmd.index("--cacert") + 1] == "/ca.pem"
    cmd = tls_bench.bench_command(6380, Path("/ca.pem"), tls_bench.WORKLOADS["kept-alive P16"], 9)
    assert (cmd[cmd.index("-P") + 1], cmd[cmd.index("-k") + 1]) == ("16", "1")


def test_generated_configs_terminate_tls_with_the_run_certificates(tmp_path: Path) -> None:
    certs = tls_bench.make_certs(tmp_path, ["ec", "rsa"])
    for kind in ("ec", "rsa"):
        pem = certs.combined[kind]
        assert stat.S_IMODE(pem.stat().st_mode) == 0o600
        text = pem.read_text()
        assert "BEGIN CERTIFICATE" in text
        assert "PRIVATE KEY" in text
    backends = ["127.0.0.1:1001", "127.0.0.1:1002"]
    haproxy = tls_bench.haproxy_config({"ec": 2000, "rsa": 2001}, backends, certs)
    assert f"    bind 127.0.0.1:2000 ssl crt {certs.combined['ec']}\n" in haproxy
    assert f"    bind 127.0.0.1:2001 ssl crt {certs.combined['rsa']}\n" in haproxy
    for line in ("nbthread 1", "mode tcp", "balance roundrobin", "server s1 127.0.0.1:1002"):
        assert f"    {line}\n" in haproxy
    path = tmp_path / "tls.toml"
    path.write_text(tls_bench.ours_config({"ec": "tls_ec", "rsa": "tls_rsa"}, backends, certs))
    services = {s.name: s for s in load_config(path).services}
    assert set(services) == {"tls_ec", "tls_rsa"}
    for kind in ("ec", "rsa"):
        service = services[f"tls_{kind}"]
        assert service.mode == "tcp"
        assert [b.address for b in service.backends] == backends
        assert service.tls is not None
        (cert,) = service.tls.certs
        assert cert.cert == str(certs.leaf[kind].cert_path)
        assert cert.key == str(certs.leaf[kind].key_path)


def _run(rps: float, cpu: float, loadgen: float = 10.0) -> dict[str, float]:
    return {
        "requests": 50_000.0,
        "rps": rps,
        "p50_ms": 1.0,
        "p99_ms": 4.0,
        "target_cpu_us": cpu,
        "target_cores": rps * cpu / 1e6,
        "loadgen_cpu_us": loadgen,
        "loadgen_cores": rps * loadgen / 1e6,
        "machine_cpu_us": 3 * cpu,
        "machine_cores": 1.9,
    }


def _report(haproxy_status: str = "ok") -> dict[str, Any]:
    targets = {name: tls_bench.Target(name) for name in ("ours", "haproxy", "direct")}
    if haproxy_status != "ok":
        targets["haproxy"].status = haproxy_status
        targets["haproxy"].reason = "exited with 1 before listening"
    runs = {
        "ec": {
            "kept-alive P1": {
                "ours": [_run(36_000.0, 18.0), _run(40_000.0, 16.0)],
                "haproxy": [_run(40_000.0, 16.0)],
                "direct": [_run(50_000.0, 10.0)],
            },
            "new handshake": {
                "ours": [_run(1_000.0, 500.0, 480.0)],
                "haproxy": [_run(1_600.0, 400.0, 480.0)],
                "direct": [_run(1_200.0, 450.0, 600.0)],
            },
        }
    }
    negotiated = {
        "ec": {
            name: {"protocol": "TLSv1.3", "cipher": "TLS_AES_256_GCM_SHA384"} for name in targets
        }
    }
    settings = {"seconds": 2.0, "rounds": 2, "rounds_done": 2, "clients": 50}
    report: dict[str, Any] = tls_bench.summarise(runs, targets, negotiated, settings)
    return report


def test_summary_takes_medians_then_ratios() -> None:
    report = _report()
    p1 = report["results"]["ec"]["kept-alive P1"]
    assert p1["ours"]["rps"] == 38_000.0
    assert p1["ours"]["target_cpu_us"] == 17.0
    assert (p1["ours"]["rounds"], p1["ours"]["requests"]) == (2, 100_000)
    assert p1["ratios"]["ours/haproxy"]["rps"] == 0.95
    assert p1["ratios"]["ours/haproxy"]["cpu_per_request"] == round(17 / 16, 3)
    assert p1["ratios"]["haproxy/direct"]["rps"] == 0.8
    handshake = report["results"]["ec"]["new handshake"]
    assert handshake["ratios"]["ours/haproxy"]["rps"] == 0.625
    table = tls_bench.markdown(report)
    assert "| ECDSA P-256 | ours | TLSv1.3 | TLS_AES_256_GCM_SHA384 | - | - |" in table
    assert (
        "| ECDSA P-256 | kept-alive P1 | ours | 38000 | 1.000 | 4.000 | 17.0 | 0.64 | 10.0 | "
        "0.38 | 51.0 | 1.90 |"
    ) in table
    assert "| ECDSA P-256 | new handshake | ours/haproxy | 0.62 | 1.25 | 1.25 | 1.00 |" in table
    assert "HAProxy on kept-alive throughput: ECDSA P-256 kept-alive P1 0.95." in table


def test_a_reference_that_did_not_come_up_has_no_figures_and_no_ratios() -> None:
    report = _report(haproxy_status="absent")
    p1 = report["results"]["ec"]["kept-alive P1"]
    assert "haproxy" not in p1
    assert p1["ratios"]["ours/haproxy"] is None
    table = tls_bench.markdown(report)
    assert "haproxy absent (exited with 1 before listening)" in table
    assert "| ECDSA P-256 | kept-alive P1 | haproxy | - | - | - |" in table
    assert "| ECDSA P-256 | kept-alive P1 | ours/haproxy | - | - | - | - |" in table
    assert "Goal" not in table


@pytest.mark.peers
@pytest.mark.e2e
def test_quick_run_of_ours_haproxy_and_direct(tmp_path: Path) -> None:
    assert tls_bench.main(["--quick", "--keys", "ec", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "tls.json").read_text())
    assert report["targets"] == {
        name: {"status": "ok", "reason": ""} for name in ("ours", "haproxy", "direct")
    }
    for name, negotiated in report["negotiated"]["ec"].items():
        assert negotiated["protocol"].startswith("TLSv1."), name
        assert negotiated["signature"] == "ECDSA", name
    for workload, entry in report["results"]["ec"].items():
        for name in ("ours", "haproxy", "direct"):
            assert entry[name]["rps"] > 50, (workload, name)
            assert entry[name]["loadgen_cpu_us"] > 0, (workload, name)
        assert entry["ratios"]["ours/haproxy"]["rps"] > 0
    assert "| ECDSA P-256 | new handshake | ours |" in (tmp_path / "tls.md").read_text()
