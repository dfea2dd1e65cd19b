"""bench/workers_bench.py runs end to end at a tiny size (redis, HAProxy needed)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(
    not all(shutil.which(b, path="/usr/sbin:/usr/bin") for b in ("haproxy", "redis-server")),
    reason="needs haproxy and redis-server",
)
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
