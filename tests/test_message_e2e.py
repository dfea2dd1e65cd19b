"""Message mode end to end: real balancer, real sample services, real sockets on loopback."""

from __future__ import annotations

import re
import signal
import socket
import socketserver
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import (
    PYTHON,
    ROOT,
    LineClient,
    Proc,
    Services,
    backend_requests,
    backend_rows,
    free_port,
    load_summary,
    reply_for,
    start_balancer,
    start_load,
    wait_for_load,
    wait_until,
    write_toml,
)

pytestmark = pytest.mark.e2e


def up_count(status: dict[str, Any]) -> int:
    return sum(1 for b in backend_rows(status).values() if b["state"] == "up")


def test_round_robin_spreads_evenly_and_status_counts(tmp_path: Path, services: Services) -> None:
    services.start_many(4)
    cfg = write_toml(tmp_path / "b.toml", services.ports)
    bal = start_balancer(cfg)
    try:
        c = LineClient(bal.port)
        for i in range(400):
            assert c.request(str(i)) == reply_for(i)
        c.close()
        counts = backend_requests(bal.status())
        assert sorted(counts.values()) == [100, 100, 100, 100]
        metrics = bal.metrics()
        assert 'balancer_backend_up{backend="127.0.0.1:' in metrics
        assert "balancer_request_duration_seconds_bucket" in metrics
        assert 'balancer_client_connections{service="numbers"}' in metrics
        total = sum(
            float(line.rsplit(" ", 1)[1])
            for line in metrics.splitlines()
            if line.startswith("balancer_requests_total{")
        )
        assert total == 400
    finally:
        assert bal.stop() == 0
    assert "summary: service numbers backend" in bal.output()


def test_pipelined_replies_come_back_in_order_from_slow_and_fast_backends(
    tmp_path: Path, services: Services
) -> None:
    services.start("--delay", "0.05")
    services.start()
    cfg = write_toml(tmp_path / "b.toml", services.ports)
    bal = start_balancer(cfg)
    try:
        c = LineClient(bal.port)
        n = 300
        c.send_bytes(b"".join(f"{i}\n".encode() for i in range(n)))
        replies = [c.read_line() for _ in range(n)]
        assert replies == [reply_for(i) for i in range(n)]
        # both backends served: replies from the fast one had to wait for the slow one
        counts = backend_requests(bal.status())
        assert all(v >= n // 2 - 1 for v in counts.values()), counts
    finally:
        bal.stop()


def test_invalid_and_health_messages_are_relayed(tmp_path: Path, services: Services) -> None:
    services.start()
    cfg = write_toml(tmp_path / "b.toml", services.ports)
    bal = start_balancer(cfg)
    try:
        c = LineClient(bal.port)
        c.send_bytes(b"hello\r\n!HEALTH_CHECK\n42\r\n")
        assert [c.read_line() for _ in range(3)] == [
            "Invalid message",
            "!HEALTH_CHECK",
            reply_for(42),
        ]
    finally:
        bal.stop()


def test_kill_9_of_a_backend_under_load_costs_no_request(
    tmp_path: Path, services: Services
) -> None:
    services.start_many(4)
    cfg = write_toml(
        tmp_path / "b.toml",
        services.ports,
        health={"interval": 0.5, "timeout": 1, "rise": 2, "fall": 2},
    )
    bal = start_balancer(cfg)
    try:
        client = start_load(
            bal.port, "--client_count", "8", "--requests_per_client", "4000", "--pipeline", "4"
        )
        victim = services[1]
        wait_for_load(bal, client, served=3001, timeout=60)
        victim.stop(signal.SIGKILL)
        doc = load_summary(client, timeout=120)
        assert doc["requests"] == 32000
        assert doc["ok"] == 32000
        assert backend_rows(bal.status())[f"127.0.0.1:{victim.port}"]["state"] == "down"
    finally:
        bal.stop()


def test_backend_down_at_startup_joins_when_it_comes_up(tmp_path: Path, services: Services) -> None:
    first = services.start()
    late_port = free_port()
    cfg = write_toml(tmp_path / "b.toml", [first.port, late_port])
    bal = start_balancer(cfg)
    try:
        assert up_count(bal.status()) == 1
        c = LineClient(bal.port)
        for i in range(10):
            assert c.request(str(i)) == reply_for(i)
        services.start(port=late_port)
        wait_until(lambda: up_count(bal.status()) == 2, what="late backend to be up")
        for i in range(10):
            assert c.request(str(i)) == reply_for(i)
        assert backend_requests(bal.status())[f"127.0.0.1:{late_port}"] == 5
        assert "is UP" in bal.output()
    finally:
        bal.stop()


def test_all_backends_down_answers_server_not_available_and_recovers(
    tmp_path: Path, services: Services
) -> None:
    port = free_port()
    cfg = write_toml(tmp_path / "b.toml", [port])
    bal = start_balancer(cfg)
    try:
        c = LineClient(bal.port)
        assert c.request("1") == "Server not available"
        assert c.request("2") == "Server not available"
        services.start(port=port)
        wait_until(lambda: up_count(bal.status()) == 1, what="backend up")
        assert c.request("3") == reply_for(3)
    finally:
        bal.stop()


def test_oversized_line_gets_an_error_and_others_are_unaffected(
    tmp_path: Path, services: Services
) -> None:
    services.start()
    cfg = write_toml(tmp_path / "b.toml", services.ports, max_line=1024)
    bal = start_balancer(cfg)
    try:
        good = LineClient(bal.port)
        bad = LineClient(bal.port)
        assert good.request("1") == reply_for(1)
        bad.send("7")
        try:
            bad.send_bytes(b"9" * 5000 + b"\n")
        except OSError:
            pass
        data = bad.read_until_closed()
        assert data == (reply_for(7) + "\nError: line too long\n").encode()
        assert good.request("2") == reply_for(2)
        # also without any newline at all
        worse = LineClient(bal.port)
        try:
            worse.send_bytes(b"x" * 5000)
        except OSError:
            pass
        assert worse.read_until_closed() == b"Error: line too long\n"
        assert good.request("3") == reply_for(3)
    finally:
        bal.stop()


def test_sigterm_drains_in_flight_requests_and_exits_zero(
    tmp_path: Path, services: Services
) -> None:
    services.start("--delay", "0.3")
    cfg = write_toml(tmp_path / "b.toml", services.ports)
    bal = start_balancer(cfg)
    c = LineClient(bal.port)
    c.send("1", "2", "3")
    wait_until(
        lambda: bal.status()["services"]["numbers"]["backends"][0]["in_flight"] == 3,
        what="requests in flight",
    )
    bal.signal(signal.SIGTERM)
    assert [c.read_line() for _ in range(3)] == [reply_for(1), reply_for(2), reply_for(3)]
    assert c.read_until_closed() == b""
    assert bal.wait(timeout=20) == 0
    assert "summary: service numbers backend" in bal.output()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", bal.port), timeout=2).close()


# -- raw framing, with doubles that behave like the tutorial's original programs --


class _OriginalService(socketserver.BaseRequestHandler):
    """One recv(1024) is one message; the reply is sent unterminated."""

    close_after_reply = False

    def handle(self) -> None:
        sock: socket.socket = self.request
        while True:
            data = sock.recv(1024)
            if not data:
                return
            msg = data.decode()
            if msg == "!HEALTH_CHECK":
                reply = msg
            elif msg.isdigit():
                reply = reply_for(msg)
            else:
                reply = "Invalid message"
            sock.sendall(reply.encode())
            if self.close_after_reply:
                return


class _OriginalClosingService(_OriginalService):
    close_after_reply = True


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


@pytest.fixture(params=[_OriginalService, _OriginalClosingService], ids=["keepalive", "closing"])
def original_service(request: pytest.FixtureRequest) -> Iterator[int]:
    server = _Server(("127.0.0.1", 0), request.param)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_original_programs_work_through_the_balancer_with_raw_framing(
    tmp_path: Path, original_service: int
) -> None:
    cfg = write_toml(tmp_path / "b.toml", [original_service], backend_framing="raw")
    bal = start_balancer(cfg)
    try:
        assert up_count(bal.status()) == 1
        # the original client: unterminated message, one recv per reply, one connection
        with socket.create_connection(("127.0.0.1", bal.port), timeout=10) as s:
            for i in range(20):
                s.sendall(str(i).encode())
                assert s.recv(1024).decode() == reply_for(i)
        # a line client on the same raw backend
        c = LineClient(bal.port)
        c.send("5", "6", "x")
        assert [c.read_line() for _ in range(3)] == [reply_for(5), reply_for(6), "Invalid message"]
    finally:
        bal.stop()


def test_tutorial_test_section_verbatim(tmp_path: Path) -> None:
    """The tutorial's Test section, with its ports, its files and its commands."""
    for port in (8080, 8090, 8091, 8092, 8093):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                pytest.fail(f"port {port} is taken; the tutorial's test needs it free")
    (tmp_path / "config.txt").write_text(
        "localhost 8090\nlocalhost 8091\nlocalhost 8092\nlocalhost 8093\n"
    )
    procs = []
    try:
        for port in (8090, 8091, 8092, 8093):
            p = Proc([PYTHON, str(ROOT / "service.py"), "-p", str(port)], cwd=tmp_path)
            p.wait_for(f"listening on .*:{port}")
            procs.append(p)
        out = tmp_path / "load_balancer_output.txt"
        bal = Proc([PYTHON, str(ROOT / "server.py"), "-p", "8080"], cwd=tmp_path, stdout_to=out)
        procs.append(bal)
        bal.wait_for("balancer ready")
        client = Proc(
            [
                PYTHON,
                str(ROOT / "client.py"),
                "--requests_per_client",
                "1000",
                "--client_count",
                "1",
                "--balancerPort",
                "8080",
                "--balancerIp",
                "localhost",
            ],
            cwd=tmp_path,
        )
        assert client.wait(timeout=120) == 0, client.output()
        text = client.output()
        assert re.search(r"\bok\b\W+1,?000\b", text), text
        assert re.search(r"errors\W+0\b", text), text
        bal.stop()
        logged = out.read_text().splitlines()
        assert len(logged) == 1000
        assert all(" ok" in line for line in logged)
        per_backend = {line.split(" -> ")[1].split(" ")[0] for line in logged}
        assert per_backend == {f"localhost:{p}" for p in (8090, 8091, 8092, 8093)}
    finally:
        for p in procs:
            p.stop()
