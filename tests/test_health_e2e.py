"""Health checks end to end: real balancer processes and backends on 127.0.0.1."""

from __future__ import annotations

import json
import re
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from balancer.tools.procs import ChildProcess as Proc
from tests.support import (
    PYTHON,
    ROOT,
    BalancerProc,
    backend_rows,
    start_balancer,
    wait_until,
    write_toml,
)

pytestmark = pytest.mark.e2e


class OriginalService:
    """The tutorial's original service.py: one recv(1024) is one message, the reply unterminated."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.messages: list[bytes] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            while True:
                try:
                    data = conn.recv(1024)
                    if not data:
                        return
                    self.messages.append(data)
                    msg = data.decode()
                    if msg == "!HEALTH_CHECK":
                        reply = msg
                    elif msg.isdigit():
                        reply = f"It\u2019s instance number {msg}"
                    else:
                        reply = "Invalid message"
                    conn.sendall(reply.encode())
                except OSError:
                    return

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def originals() -> Iterator[list[OriginalService]]:
    started = [OriginalService() for _ in range(2)]
    yield started
    for s in started:
        s.close()


def status(admin_port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/status", timeout=5) as resp:
        doc: dict[str, Any] = json.loads(resp.read())
        return doc


def test_the_tutorials_server_checks_the_tutorials_original_service(
    tmp_path: Path, originals: list[OriginalService]
) -> None:
    """server.py + config.txt in front of the original service.py: checks detect raw framing."""
    (tmp_path / "config.txt").write_text("".join(f"127.0.0.1 {s.port}\n" for s in originals))
    bal = Proc(
        [PYTHON, str(ROOT / "server.py"), "-p", "0", "-admin", "127.0.0.1:0"],
        cwd=tmp_path,
        stdout_to=tmp_path / "load_balancer_output.txt",
    )
    try:
        bal.wait_for("balancer ready")
        admin = int(bal.wait_for(r"admin listening on http://\S+:(\d+)").group(1))
        rows = backend_rows(status(admin), "default")
        assert {a: b["state"] for a, b in rows.items()} == {
            f"127.0.0.1:{s.port}": "up" for s in originals
        }, rows
        for s in originals:
            bal.wait_for(
                rf"backend 127\.0\.0\.1:{s.port} of service default speaks raw framing "
                r"\(unterminated replies\)"
            )
            # the check that found out was one message, answered once
            assert s.messages[0] == b"!HEALTH_CHECK"
        detected = [line for line in bal.lines if "speaks raw framing" in line]
        assert len(detected) == len(originals), "one line per backend"
    finally:
        bal.stop()


def post_backend(bal: BalancerProc, address: str) -> int:
    req = urllib.request.Request(
        f"http://127.0.0.1:{bal.admin_port}/api/services/numbers/backends",
        data=json.dumps({"address": address}).encode(),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            code: int = resp.status
            return code
    except urllib.error.HTTPError as exc:
        return exc.code


def test_backends_that_never_come_up_say_why_once(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    cfg = write_toml(
        tmp_path / "b.toml",
        [closed],
        health={"interval": 0.1, "timeout": 0.5, "rise": 1, "fall": 1},
    )
    bal = start_balancer(cfg)
    try:
        why = {
            "no-such-host.invalid:80": r"check failed: cannot resolve 'no-such-host\.invalid'",
            f"127.0.0.1:{closed}": r"(initial )?check failed: connection refused",
        }
        # not an address at all: refused at the door, with its reason
        assert post_backend(bal, "256.1.1.1:80") == 400
        assert post_backend(bal, "no-such-host.invalid:80") == 201

        def said_why() -> bool:
            rows = backend_rows(bal.status())
            return all(re.match(w, rows[a]["reason"]) for a, w in why.items())

        wait_until(said_why, what="every backend to say why it is down")
        # and they keep being checked, without a line per check
        checks = {a: b["last_check"] for a, b in backend_rows(bal.status()).items()}

        def checked_again() -> bool:
            rows = backend_rows(bal.status())
            return all(rows[a]["last_check"] > checks[a] + 0.5 for a in why)

        wait_until(checked_again, what="five more intervals of checks")
        for address in list(why)[:1]:
            said = [line for line in bal.lines if f"backend {address} " in line and "down" in line]
            assert len(said) == 1, said
        assert all(b["state"] == "down" for b in backend_rows(bal.status()).values())
    finally:
        bal.stop()
