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

from balancer.tools.procs import ChildProcess as Proc
from tests.support import (
    PYTHON,
    ROOT,
    LineClient,
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


# -- one framed message is one request; replies reach only their own client --


def _read_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def _read_until_closed(sock: socket.socket) -> bytes:
    """Everything until the balancer closes; `<left open>` appended if it does not."""
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data
        except TimeoutError:
            return data + b" <left open>"
        if not chunk:
            return data
        data += chunk


def test_raw_newline_attack_gives_pipelining_clients_no_wrong_reply(
    tmp_path: Path, services: Services
) -> None:
    """Against 8 pipelining clients, 20 attacks (`x`, a pause that makes the connection raw,
    then `1\\n2\\n3`) used to give the victims 22 wrong replies and eject the backend. The
    attacker gets an error and is closed; no one else notices."""
    services.start_many(2)
    cfg = write_toml(tmp_path / "b.toml", services.ports, client_framing="auto")
    bal = start_balancer(cfg)
    attacks_done = threading.Event()
    wrong: list[str] = []
    rounds = [0] * 8

    def victim(k: int) -> None:
        with socket.create_connection(("127.0.0.1", bal.port), timeout=10) as sock:
            f = sock.makefile("rb")
            n = 0
            while not attacks_done.is_set() or rounds[k] < 3:
                batch = [k * 1_000_000 + n + i for i in range(20)]
                n += 20
                try:
                    sock.sendall(b"".join(b"%d\n" % i for i in batch))
                    for i in batch:
                        line = f.readline().decode().rstrip("\n")
                        if line != reply_for(i):
                            wrong.append(f"victim {k} sent {i}, got {line!r}")
                except OSError as exc:
                    wrong.append(f"victim {k}: {exc!r}")
                    return
                rounds[k] += 1
                if rounds[k] >= 2000:
                    break

    threads = [threading.Thread(target=victim, args=(k,)) for k in range(8)]
    attacker_got = []
    try:
        for t in threads:
            t.start()
        try:
            for _ in range(20):
                with socket.create_connection(("127.0.0.1", bal.port), timeout=10) as sock:
                    sock.sendall(b"x")
                    # the reply arrives once the quiet period made this connection raw
                    first = _read_exactly(sock, len(b"Invalid message"))
                    sock.sendall(b"1\n2\n3")
                    rest = _read_until_closed(sock)
                attacker_got.append(first + b" | " + rest)
                if rest != b"Error: newline on a raw connection":
                    break
        finally:
            attacks_done.set()
            for t in threads:
                t.join(timeout=60)
        assert wrong == []
        assert attacker_got == [b"Invalid message | Error: newline on a raw connection"] * 20
        assert all(r >= 3 for r in rounds), rounds
        rows = backend_rows(bal.status())
        assert [(b["state"], b["failures"]) for b in rows.values()] == [("up", 0), ("up", 0)]
    finally:
        bal.stop()
    assert "more replies than requests" not in bal.output()


def test_auto_framing_a_split_first_line_is_refused_not_glued(
    tmp_path: Path, services: Services
) -> None:
    """`12`, then later `34\\n5\\n`, used to come back glued. With `auto`, the pause made the
    connection raw; the newline that follows is refused with an error, never split."""
    services.start()
    cfg = write_toml(tmp_path / "b.toml", services.ports, client_framing="auto")
    bal = start_balancer(cfg)
    try:
        with socket.create_connection(("127.0.0.1", bal.port), timeout=10) as sock:
            sock.sendall(b"12")
            want = reply_for(12).encode()
            assert _read_exactly(sock, len(want)) == want
            sock.sendall(b"34\n5\n")
            assert _read_until_closed(sock) == b"Error: newline on a raw connection"
        c = LineClient(bal.port)
        c.send_bytes(b"12")  # line framing is found as soon as the newline comes
        c.send_bytes(b"34\n5\n")
        assert [c.read_line(), c.read_line()] == [reply_for(1234), reply_for(5)]
    finally:
        bal.stop()


def test_empty_lines_through_raw_backends_are_answered_and_eject_nothing(
    tmp_path: Path, original_service: int
) -> None:
    """`echo > /dev/tcp/HOST/PORT` (an empty line) used to go to raw backends as zero bytes:
    no reply, the client waited response_timeout, and each backend was ejected in turn."""
    cfg = write_toml(tmp_path / "b.toml", [original_service], backend_framing="raw")
    bal = start_balancer(cfg)
    try:
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", bal.port), timeout=10) as sock:
                sock.sendall(b"\n")
                sock.shutdown(socket.SHUT_WR)
                assert _read_until_closed(sock) == b"Invalid message\n"
        c = LineClient(bal.port)
        assert c.request("7") == reply_for(7)
        row = next(iter(backend_rows(bal.status()).values()))
        assert (row["state"], row["failures"]) == ("up", 0)
    finally:
        bal.stop()


def test_raw_messages_longer_than_the_original_service_reads_are_refused(
    tmp_path: Path, original_service: int
) -> None:
    cfg = write_toml(tmp_path / "b.toml", [original_service], backend_framing="raw")
    bal = start_balancer(cfg)
    try:
        c = LineClient(bal.port)
        assert c.request("7" * 1100) == "Error: message too long"
        assert c.request("7" * 1024) == reply_for("7" * 1024)
    finally:
        bal.stop()


def test_a_last_line_without_newline_before_eof_is_answered(
    tmp_path: Path, services: Services
) -> None:
    services.start()
    cfg = write_toml(tmp_path / "b.toml", services.ports)
    bal = start_balancer(cfg)
    try:
        with socket.create_connection(("127.0.0.1", bal.port), timeout=10) as sock:
            sock.sendall(b"1\n2")
            sock.shutdown(socket.SHUT_WR)
            assert _read_until_closed(sock) == f"{reply_for(1)}\n{reply_for(2)}\n".encode()
    finally:
        bal.stop()


def test_max_buffered_cuts_the_client_holding_the_most_and_serves_the_others(
    tmp_path: Path, services: Services
) -> None:
    """Partial lines had no overall cap (3,000 connections x 60 KB held 170 MB)."""
    services.start()
    cfg = write_toml(tmp_path / "b.toml", services.ports, max_line=60000, max_buffered=65536)
    bal = start_balancer(cfg)
    try:
        holders = [LineClient(bal.port) for _ in range(3)]
        whole = LineClient(bal.port)
        for c, size in zip(holders, (20000, 25000, 30000), strict=True):
            c.send_bytes(b"5" * size)
        assert holders[2].read_until_closed() == b"Error: line too long\n"
        assert whole.request("1") == reply_for(1)
        for c, size in zip(holders[:2], (20000, 25000), strict=True):
            c.send_bytes(b"\n")
            assert c.read_line() == reply_for("5" * size)
    finally:
        bal.stop()
