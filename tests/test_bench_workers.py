"""bench/workers_bench.py runs end to end at a tiny size (redis and HAProxy, installed by the
test script; the load client's compiled engine, so not in the pure Python tier)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.peers
@pytest.mark.e2e
def test_the_workers_bench_reports_every_target_and_the_worker_shares() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "workers_bench.py"), "--quick", "--no-save"],
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    for target in ("| w1 |", "| w2 |", "| w2-reuseport |", "| ha-t1 |", "| ha-t2 |"):
        assert target in done.stdout
    assert "w2 / ha-t2" in done.stdout
    assert "%" in done.stdout  # the worker shares
