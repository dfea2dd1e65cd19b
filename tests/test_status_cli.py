"""`balancer status` and `serve --log-format json`, against real processes."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from rich.console import Console

from balancer.tools.procs import ChildProcess
from balancer.tools.status import render
from tests.admin_support import running_with_admin, with_admin
from tests.http_support import serve_some, threaded_backend
from tests.support import (
    PYTHON,
    BalancerProc,
    Balancers,
    LineClient,
    ServiceProc,
    Services,
    backend_rows,
    free_port,
    reply_for,
    start_balancer,
    start_service,
    wait_until,
    write_toml,
)

pytestmark = pytest.mark.e2e


@pytest.fixture
def balancer(
    tmp_path: Path, services: Services, balancers: Balancers
) -> tuple[BalancerProc, list[ServiceProc]]:
    services.start_many(2)
    return balancers.start(write_toml(tmp_path / "b.toml", services.ports)), services


def status_cmd(*args: str, env: dict[str, str] | None = None) -> ChildProcess:
    proc = ChildProcess(
        [PYTHON, "-m", "balancer", "status", *args],
        env={"COLUMNS": "200", "BALANCER_ADMIN_TOKEN": "", **(env or {})},
    )
    proc.wait(timeout=30)
    return proc


def test_status_table_lists_every_backend(
    balancer: tuple[BalancerProc, list[ServiceProc]],
) -> None:
    bal, services = balancer
    c = LineClient(bal.port)
    for i in range(6):
        assert c.request(str(i)) == reply_for(i)
    c.close()
    proc = status_cmd("--admin", f"127.0.0.1:{bal.admin_port}")
    assert proc.popen.returncode == 0, proc.output()
    out = proc.output()
    for s in services:
        row = next(line for line in out.splitlines() if f"127.0.0.1:{s.port}" in line)
        assert "numbers" in row
        assert " up " in row
        assert " ready " in row
        assert " 3 " in row  # requests
    for header in ("backend", "state", "admin state", "weight", "in-flight", "last check"):
        assert header in out


def test_status_watch_json_follows_changes(
    balancer: tuple[BalancerProc, list[ServiceProc]],
) -> None:
    bal, services = balancer
    services[0].stop()
    dead = f"127.0.0.1:{services[0].port}"

    wait_until(
        lambda: backend_rows(bal.status())[dead]["state"] == "down", what="dead backend down"
    )
    proc = status_cmd("--admin", f"127.0.0.1:{bal.admin_port}", "--watch", "--count", "2", "--json")
    assert proc.popen.returncode == 0, proc.output()
    docs = [json.loads(line) for line in proc.lines if line.startswith("{")]
    assert len(docs) == 2
    for doc in docs:
        states = {a: b["state"] for a, b in backend_rows(doc).items()}
        assert states[dead] == "down"
        assert states[f"127.0.0.1:{services[1].port}"] == "up"


def test_status_says_why_a_backend_is_down(
    balancer: tuple[BalancerProc, list[ServiceProc]],
) -> None:
    bal, services = balancer
    services[0].stop()
    dead = f"127.0.0.1:{services[0].port}"
    wait_until(
        lambda: backend_rows(bal.status())[dead]["state"] == "down", what="dead backend down"
    )
    proc = status_cmd("--admin", f"127.0.0.1:{bal.admin_port}")
    assert proc.popen.returncode == 0, proc.output()
    rows = {
        next(word for word in line.split() if word.startswith("127.0.0.1:")): line
        for line in proc.lines
        if " numbers " in line and "127.0.0.1:" in line
    }
    assert "reason" in proc.output()
    assert "refused" in rows[dead], proc.output()
    assert "refused" not in rows[f"127.0.0.1:{services[1].port}"]


def test_status_reads_with_a_token_where_reads_need_one(tmp_path: Path, services: Services) -> None:
    up = f"127.0.0.1:{services.start().port}"
    cfg = with_admin(write_toml(tmp_path / "b.toml", services.ports), read_access="token")
    with running_with_admin(cfg, env={"BALANCER_ADMIN_TOKEN": "t0ken"}) as bal:
        admin = f"127.0.0.1:{bal.admin_port}"
        refused = status_cmd("--admin", admin)
        assert refused.popen.returncode == 1, refused.output()
        assert "needs a token" in refused.output()
        assert "--token" in refused.output()
        wrong = status_cmd("--admin", admin, "--token", "nope")
        assert wrong.popen.returncode == 1, wrong.output()
        assert "refused the token" in wrong.output()
        for proc in (
            status_cmd("--admin", admin, "--token", "t0ken"),
            status_cmd("--admin", admin, env={"BALANCER_ADMIN_TOKEN": "t0ken"}),
        ):
            assert proc.popen.returncode == 0, proc.output()
            assert up in proc.output()


def test_status_exits_1_when_admin_does_not_answer() -> None:
    port = free_port()
    proc = status_cmd("--admin", f"127.0.0.1:{port}")
    assert proc.popen.returncode == 1
    assert f"admin endpoint http://127.0.0.1:{port} does not answer" in proc.output()


def test_json_logs_and_access_log(tmp_path: Path) -> None:
    service = start_service()
    cfg = write_toml(tmp_path / "b.toml", [service.port])
    access = tmp_path / "access.log"
    bal = start_balancer(cfg, "--log-format", "json", "--access-log", stdout_to=access)
    try:
        c = LineClient(bal.port)
        assert c.request("7") == reply_for(7)
        c.close()
    finally:
        bal.stop()
        service.stop()
    records = [json.loads(line) for line in bal.lines if line.strip()]
    assert all({"ts", "level", "msg"} <= set(r) for r in records)
    ready = next(r for r in records if r["msg"] == "balancer ready")
    assert ready["level"] == "info"
    assert ready["ts"].endswith("Z")
    listening = next(r for r in records if r["msg"].startswith("service numbers listening"))
    assert listening["args"][0] == "numbers"
    lines = [json.loads(line) for line in access.read_text().splitlines()]
    assert len(lines) == 1
    entry = lines[0]
    assert entry["service"] == "numbers"
    assert entry["backend"] == f"127.0.0.1:{service.port}"
    assert entry["client"].startswith("127.0.0.1:")
    assert entry["outcome"] == "ok"
    assert entry["message"] == "7"
    assert entry["duration_ms"] >= 0


def test_status_prints_the_http_line_of_an_http_service(
    tmp_path: Path, balancers: Balancers
) -> None:
    with threaded_backend() as backend:
        cfg = write_toml(tmp_path / "b.toml", [backend], mode="http", health={"enabled": False})
        bal = balancers.start(cfg)
        serve_some(bal.port)
        counted = {"requests": 3, "client_errors": 1, "idle_upstream_connections": 1}
        wait_until(lambda: counted.items() <= bal.status()["services"]["numbers"]["http"].items())
        proc = status_cmd("--admin", f"127.0.0.1:{bal.admin_port}")
    assert proc.popen.returncode == 0, proc.output()
    line = next(line for line in proc.lines if line.startswith("http: "))
    assert "3 requests · responses 2xx 2, 4xx 2 · generated 400 1 · " in line, line
    assert "retries 0 to another backend, 0 keep-alive race" in line
    assert "upstream 1 new, 2 reused, 1 idle" in line
    assert "0 tunnels · 1 client errors · 0 bad responses" in line
    # message mode: no such line
    assert "http: " not in render_text({"services": {"x": {"mode": "message", "backends": []}}})


def render_text(doc: dict[str, object]) -> str:
    console = Console(width=200, record=True, file=io.StringIO())
    console.print(render(doc))
    return console.export_text()
