"""The load client against the sample service, against misbehaving servers, and the demo."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import threading
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from balancer import native
from balancer.tools import demo
from balancer.tools.client import cli
from balancer.tools.client.tutorial import BackendHandle, Client
from balancer.tools.procs import ChildError
from tests.support import (
    PYTHON,
    ROOT,
    Balancers,
    Services,
    free_port,
    reply_for,
    start_service,
)

REPORT_KEYS = {
    "requests",
    "ok",
    "errors",
    "error_total",
    "elapsed_s",
    "throughput_rps",
    "latency_ms",
}
ERROR_KINDS = {"wrong_reply", "server_not_available", "timeout", "connection_error", "error_reply"}

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]

ENGINES = ["python"] if native.disabled() else ["python", "compiled"]
"""The load client's engines; the compiled one is off with BALANCER_NO_EXTENSIONS (a build
that failed is caught by tests/test_native.py)."""


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.fixture(scope="module")
def service() -> Iterator[Any]:
    proc = start_service()
    yield proc
    proc.stop()


@contextmanager
def fake_server(handler: Handler) -> Iterator[int]:
    """An asyncio server on 127.0.0.1, run in a thread; yields its port."""
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    port: list[int] = []
    stop: list[asyncio.Event] = []

    async def main() -> None:
        stop.append(asyncio.Event())
        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        port.append(server.sockets[0].getsockname()[1])
        ready.set()
        async with server:
            await stop[0].wait()
        # Connections the handler left open are closed with the loop.

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    assert ready.wait(10), "fake server did not start"
    try:
        yield port[0]
    finally:
        loop.call_soon_threadsafe(stop[0].set)
        thread.join(10)
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


def answer_with(reply: Callable[[bytes], bytes]) -> Handler:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                writer.write(reply(line.rstrip(b"\r\n")) + b"\n")
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    return handler


async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while await reader.read(65536):
            pass
    except ConnectionError:
        pass
    finally:
        writer.close()


async def close_after_first_read(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    await reader.read(65536)
    writer.close()


def run_client(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, Any]]:
    """Run the load client in-process with --json; return its exit code and report."""
    code = cli.main([*argv, "--json", "--quiet"])
    out = capsys.readouterr().out
    report: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return code, report


def check_accounting(report: dict[str, Any]) -> None:
    assert set(report["errors"]) == ERROR_KINDS
    assert report["error_total"] == sum(report["errors"].values())
    assert report["ok"] + report["error_total"] == report["requests"]


# -- against the sample service --------------------------------------------------------------


def test_json_report_counts_every_request_ok(
    service: Any, capsys: pytest.CaptureFixture[str], engine: str
) -> None:
    code, report = run_client(
        capsys,
        f"--engine={engine}",
        "--balancerIp=127.0.0.1",
        f"--balancerPort={service.port}",
        "--requests_per_client=300",
        "--client_count=3",
        "--admin=off",
    )
    assert code == 0
    assert REPORT_KEYS <= set(report)
    assert set(report["latency_ms"]) == {"p50", "p90", "p99", "p999", "max"}
    assert report["requests"] == 900
    assert report["ok"] == 900
    assert report["error_total"] == 0
    check_accounting(report)
    lat = report["latency_ms"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["p999"] <= lat["max"]
    assert "backends" not in report


@pytest.mark.parametrize(
    "extra",
    [
        ["--pipeline=16", "--requests_per_client=2000"],
        ["--duration=0.3", "--pipeline=4"],
        ["--rate=2000", "--requests_per_client=100"],
        ["--rate=1000", "--duration=0.3", "--pipeline=2"],
    ],
)
def test_load_modes_all_succeed(
    service: Any, capsys: pytest.CaptureFixture[str], extra: list[str]
) -> None:
    code, report = run_client(
        capsys,
        "--balancerIp=127.0.0.1",
        f"--balancerPort={service.port}",
        "--client_count=2",
        "--admin=off",
        *extra,
    )
    assert code == 0
    assert report["ok"] == report["requests"] > 0
    check_accounting(report)
    if "--requests_per_client=2000" in extra:
        assert report["requests"] == 4000
    if "--requests_per_client=100" in extra:
        assert report["requests"] == 200


def test_requests_padded_to_a_size_are_answered_and_checked(
    service: Any, capsys: pytest.CaptureFixture[str], engine: str
) -> None:
    code, report = run_client(
        capsys,
        f"--engine={engine}",
        "--balancerIp=127.0.0.1",
        f"--balancerPort={service.port}",
        "--client_count=3",
        "--requests_per_client=200",
        "--pipeline=8",
        "--size=1024",
        "--admin=off",
    )
    assert code == 0
    assert report["ok"] == report["requests"] == 600
    assert report["engine"] == engine
    assert report["client_cpu_s"] >= 0
    check_accounting(report)


def test_the_compiled_engine_refuses_what_it_cannot_run(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert cli.main(["--engine=compiled", "--rate=100", "--admin=off"]) == 2
    assert "--engine compiled runs closed-loop line loads" in capsys.readouterr().err
    assert cli.main(["--size=-1", "--admin=off"]) == 2


def test_summary_table_without_json(service: Any, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(
        ["--balancerIp=127.0.0.1", f"--balancerPort={service.port}", "--requests_per_client=20"]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "Load client summary" in out
    assert re.search(r"requests\s*│\s*20\b", out)
    assert "throughput" in out
    assert "p99.9" in out


def test_html_report_is_written(
    service: Any, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "run.html"
    code, report = run_client(
        capsys,
        "--balancerIp=127.0.0.1",
        f"--balancerPort={service.port}",
        "--requests_per_client=200",
        "--admin=off",
        f"--report={path}",
    )
    assert code == 0
    text = path.read_text(encoding="utf-8")
    assert "Load client report" in text
    assert "<svg" in text
    assert f"{report['ok']}" in text


def test_bad_arguments_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--client_count=0"]) == 2
    assert "--client_count" in capsys.readouterr().err


# -- raw framing: the tutorial's original programs -------------------------------------------


def test_raw_client_drives_the_raw_sample_service(
    services: Services, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = services.start("--raw")
    code, report = run_client(
        capsys,
        "--raw",
        "--balancerIp=127.0.0.1",
        f"--balancerPort={raw.port}",
        "--requests_per_client=150",
        "--client_count=2",
        "--admin=off",
    )
    assert code == 0
    assert report["ok"] == report["requests"] == 300
    check_accounting(report)


@pytest.mark.e2e
def test_raw_client_through_a_balancer_in_front_of_raw_services(
    services: Services, balancers: Balancers, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    backends = services.start_many(2, "--raw")
    cfg = tmp_path / "raw.toml"
    cfg.write_text(
        "[services.numbers]\n"
        'listen = "127.0.0.1:0"\n'
        'backend_framing = "raw"\n'
        "backends = [" + ", ".join(f'"127.0.0.1:{b.port}"' for b in backends) + "]\n"
    )
    bal = balancers.start(cfg)
    code, report = run_client(
        capsys,
        "--raw",
        "--balancerIp=127.0.0.1",
        f"--balancerPort={bal.port}",
        "--requests_per_client=100",
        "--client_count=2",
        f"--admin=127.0.0.1:{bal.admin_port}",
    )
    assert code == 0
    assert report["ok"] == report["requests"] == 200
    check_accounting(report)
    assert sorted(report["backends"].values()) == [100, 100], "round robin over both"


@pytest.mark.e2e
def test_spread_is_read_with_the_admin_token_where_reads_need_one(
    services: Services,
    balancers: Balancers,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    backends = services.start_many(2)
    cfg = tmp_path / "b.toml"
    cfg.write_text(
        '[admin]\ntoken = "s3cret"\nread_access = "token"\n'
        '[services.numbers]\nlisten = "127.0.0.1:0"\n'
        "backends = [" + ", ".join(f'"127.0.0.1:{b.port}"' for b in backends) + "]\n"
    )
    bal = balancers.start(cfg)
    args = (
        "--balancerIp=127.0.0.1",
        f"--balancerPort={bal.port}",
        "--requests_per_client=50",
        f"--admin=127.0.0.1:{bal.admin_port}",
    )
    monkeypatch.delenv("BALANCER_ADMIN_TOKEN", raising=False)
    code, report = run_client(capsys, *args)
    assert code == 0
    assert not report.get("backends"), "without the token the status is not readable"
    monkeypatch.setenv("BALANCER_ADMIN_TOKEN", "s3cret")
    code, report = run_client(capsys, *args)
    assert code == 0
    assert sorted(report["backends"].values()) == [25, 25]


def test_raw_client_refuses_a_pipeline(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--raw", "--pipeline=2"]) == 2
    err = capsys.readouterr().err
    assert "--raw" in err
    assert "--pipeline must be 1" in err


def test_raw_client_counts_wrong_replies(capsys: pytest.CaptureFixture[str]) -> None:
    """Each raw reply is checked against its message like a line reply is."""

    async def raw_off_by_one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(1024):
                writer.write(reply_for(int(data) + 1).encode())
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    with fake_server(raw_off_by_one) as port:
        code, report = run_client(
            capsys, "--raw", f"--balancerPort={port}", "--requests_per_client=20", "--admin=off"
        )
    assert code == 1
    assert report["errors"]["wrong_reply"] == 20
    check_accounting(report)


# -- against misbehaving servers -------------------------------------------------------------


def test_wrong_replies_are_counted(capsys: pytest.CaptureFixture[str], engine: str) -> None:
    with fake_server(answer_with(lambda line: reply_for(int(line) + 1).encode())) as port:
        code, report = run_client(
            capsys,
            f"--engine={engine}",
            f"--balancerPort={port}",
            "--requests_per_client=50",
            "--admin=off",
        )
    assert code == 1
    assert report["errors"]["wrong_reply"] == 50
    assert report["ok"] == 0
    check_accounting(report)


def test_server_not_available_and_error_replies_are_counted(
    capsys: pytest.CaptureFixture[str],
    engine: str,
) -> None:
    def reply(line: bytes) -> bytes:
        n = int(line)
        if n % 3 == 0:
            return b"Server not available"
        if n % 3 == 1:
            return b"Error: backend failed"
        return reply_for(n).encode()

    with fake_server(answer_with(reply)) as port:
        code, report = run_client(
            capsys,
            f"--engine={engine}",
            f"--balancerPort={port}",
            "--requests_per_client=30",
            "--pipeline=4",
            "--admin=off",
        )
    assert code == 1
    assert report["errors"]["server_not_available"] == 10
    assert report["errors"]["error_reply"] == 10
    assert report["ok"] == 10
    check_accounting(report)


@pytest.mark.parametrize(("pipeline", "expected"), [(1, 2), (4, 8)])
def test_unanswered_requests_time_out(
    capsys: pytest.CaptureFixture[str], engine: str, pipeline: int, expected: int
) -> None:
    with fake_server(silent) as port:
        code, report = run_client(
            capsys,
            f"--engine={engine}",
            f"--balancerPort={port}",
            "--client_count=2",
            f"--requests_per_client={pipeline}",
            f"--pipeline={pipeline}",
            "--timeout=0.3",
            "--admin=off",
        )
    assert code == 1
    assert report["errors"]["timeout"] == expected
    assert report["requests"] == expected
    check_accounting(report)


def test_connection_closed_with_requests_outstanding(
    capsys: pytest.CaptureFixture[str], engine: str
) -> None:
    with fake_server(close_after_first_read) as port:
        code, report = run_client(
            capsys,
            f"--engine={engine}",
            f"--balancerPort={port}",
            "--requests_per_client=20",
            "--pipeline=5",
            "--admin=off",
        )
    assert code == 1
    assert report["ok"] == 0
    assert report["requests"] == 20
    assert report["errors"]["connection_error"] == 20
    check_accounting(report)


def test_refused_connection_counts_every_request(
    capsys: pytest.CaptureFixture[str], engine: str
) -> None:
    code, report = run_client(
        capsys,
        f"--engine={engine}",
        f"--balancerPort={free_port()}",
        "--client_count=2",
        "--requests_per_client=25",
        "--admin=off",
    )
    assert code == 1
    assert report["requests"] == 50
    assert report["errors"]["connection_error"] == 50
    check_accounting(report)


def test_spread_over_backends_comes_from_the_admin_status(
    service: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    calls: list[int] = []

    async def admin(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.readuntil(b"\r\n\r\n")
        assert request.startswith(b"GET /status ")
        calls.append(1)
        extra = 0 if len(calls) == 1 else 1
        status = {
            "services": {
                "numbers": {
                    "listen": f"127.0.0.1:{service.port}",
                    "backends": [
                        {"address": "127.0.0.1:1001", "requests": 10 + 30 * extra},
                        {"address": "127.0.0.1:1002", "requests": 5 + 10 * extra},
                    ],
                }
            }
        }
        body = json.dumps(status).encode()
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
        )
        await writer.drain()
        writer.close()

    with fake_server(admin) as admin_port:
        code, report = run_client(
            capsys,
            "--balancerIp=127.0.0.1",
            f"--balancerPort={service.port}",
            "--requests_per_client=40",
            f"--admin=127.0.0.1:{admin_port}",
        )
    assert code == 0
    assert len(calls) == 2
    assert report["backends"] == {"127.0.0.1:1001": 30, "127.0.0.1:1002": 10}


def test_absent_admin_is_not_an_error(service: Any, capsys: pytest.CaptureFixture[str]) -> None:
    code, report = run_client(
        capsys,
        "--balancerIp=127.0.0.1",
        f"--balancerPort={service.port}",
        "--requests_per_client=10",
        f"--admin=127.0.0.1:{free_port()}",
    )
    assert code == 0
    assert report["ok"] == 10
    assert "backends" not in report


# -- the tutorial's synchronous API ----------------------------------------------------------


def test_sync_client_sends_and_receives(service: Any) -> None:
    with Client("127.0.0.1", service.port) as c:
        assert c.send("12") == reply_for(12)
        assert c.send("!HEALTH_CHECK") == "!HEALTH_CHECK"
        assert c.send("twelve") == "Invalid message"
    with pytest.raises(ConnectionError):
        c.send("1")


def test_sync_client_connect_failure_raises() -> None:
    with pytest.raises(ConnectionRefusedError):
        Client("127.0.0.1", free_port())


def test_sync_server_handle(service: Any) -> None:
    backend = BackendHandle("127.0.0.1", service.port)
    try:
        assert backend.check_connection()
        assert backend.send("8") == reply_for(8)
        assert backend.send("9") == reply_for(9)
    finally:
        backend.close()
    assert not BackendHandle("127.0.0.1", free_port()).check_connection()


def test_sync_server_check_fails_on_wrong_health_reply() -> None:
    with fake_server(answer_with(lambda line: b"nope")) as port:
        assert not BackendHandle("127.0.0.1", port).check_connection()


# -- command lines ---------------------------------------------------------------------------


def test_tutorial_root_client_script(service: Any) -> None:
    result = subprocess.run(
        [
            PYTHON,
            str(ROOT / "client.py"),
            "--requests_per_client",
            "100",
            "--client_count",
            "2",
            "--balancerPort",
            str(service.port),
            "--balancerIp",
            "localhost",
            "--admin",
            "off",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert "Load client summary" in result.stdout
    assert re.search(r"ok\s*│\s*200\b", result.stdout)


def test_demo_reports_a_startup_failure(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("[services.demo]\nbackends = 7\n")
    with pytest.raises(ChildError, match="balancer exited"):
        demo.start_balancer(config)


@pytest.mark.e2e
def test_demo_runs_the_tutorial_scenario() -> None:
    result = subprocess.run(
        [PYTHON, "-m", "balancer", "demo", "--requests", "100", "--clients", "2"],
        capture_output=True,
        text=True,
        timeout=90,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"ok\s*│\s*200\b", result.stdout)
    rows = re.findall(r"127\.0\.0\.1:\d+\s*│\s*(\d+)\s*│\s*([\d.]+) %", result.stdout)
    assert len(rows) == 4, result.stdout
    assert sum(int(n) for n, _ in rows) == 200
    assert all(int(n) > 0 for n, _ in rows)
