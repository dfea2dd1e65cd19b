"""Readiness for systemd (`Type=notify`): the messages, and a real `balancer serve` telling
a fake NOTIFY_SOCKET when it is ready, reloading, stopping, or handed over."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from balancer.cli import build_parser
from balancer.net.notify import Notifier, notify_address, notify_message
from tests.support import PYTHON, ROOT, LineClient, Services, ready_balancer, reply_for, write_toml


def ask_new(port: int, n: int) -> str:
    client = LineClient(port)
    try:
        return client.request(str(n))
    finally:
        client.close()


def test_the_address_is_a_path_or_the_abstract_namespace() -> None:
    assert notify_address("/run/systemd/notify") == "/run/systemd/notify"
    assert notify_address("@balancer/notify") == b"\0balancer/notify"
    assert notify_address("") is None
    assert notify_address("vsock:2:1234") is None


def test_a_message_is_key_value_lines() -> None:
    assert notify_message(ready=1, status="serving\n2 services") == (
        b"READY=1\nSTATUS=serving 2 services\n"
    )
    assert len(notify_message(status="x" * 1000)) < 420


def test_no_socket_no_message_and_a_gone_socket_never_fails(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert Notifier.from_environ({}).send(ready=1) is False
    gone = Notifier.from_environ({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    assert gone.ready("serving") is False
    assert gone.stopping() is False
    assert caplog.text.count("notifications dropped") == 1


def test_the_abstract_namespace_is_reached() -> None:
    name = f"balancer-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager:
        manager.bind(b"\0" + name.encode())
        manager.settimeout(5)
        assert Notifier.from_environ({"NOTIFY_SOCKET": f"@{name}"}).ready("ok")
        assert manager.recv(4096) == b"READY=1\nSTATUS=ok\n"


@pytest.fixture
def manager() -> Iterator[tuple[socket.socket, str]]:
    """A fake service manager: a datagram socket, and the NOTIFY_SOCKET that names it."""
    where = Path(tempfile.mkdtemp(prefix="bn", dir="/tmp"))
    path = str(where / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(20)
    yield sock, path
    sock.close()
    shutil.rmtree(where, ignore_errors=True)


def fields(sock: socket.socket) -> dict[str, str]:
    lines = sock.recv(4096).decode().splitlines()
    return dict(line.split("=", 1) for line in lines)


def test_ready_reloading_and_stopping_are_told(
    tmp_path: Path, services: Services, manager: tuple[socket.socket, str]
) -> None:
    sock, path = manager
    config = write_toml(tmp_path / "b.toml", [services.start().port])
    bal = ready_balancer(
        [PYTHON, "-m", "balancer", "serve", str(config), "--admin", "off"],
        env={"NOTIFY_SOCKET": path},
    )
    try:
        ready = fields(sock)
        assert ready["READY"] == "1"
        assert ready["STATUS"] == f"serving 1 service(s); listening on 127.0.0.1:{bal.port}"
        assert ask_new(bal.port, 1) == reply_for(1)
        bal.signal(signal.SIGHUP)
        reloading = fields(sock)
        assert reloading["RELOADING"] == "1"
        assert int(reloading["MONOTONIC_USEC"]) > 0
        assert fields(sock)["READY"] == "1"
        bal.wait_for("reload done")
        bal.signal(signal.SIGTERM)
        assert fields(sock)["STOPPING"] == "1"
    finally:
        code = bal.stop()
    assert code == 0


def test_a_process_taken_over_says_it_stops_and_the_new_one_is_ready(
    tmp_path: Path, services: Services, manager: tuple[socket.socket, str]
) -> None:
    sock, path = manager
    config = write_toml(tmp_path / "b.toml", [services.start().port])
    handover = str(Path(path).parent / "h.sock")
    serve = [PYTHON, "-m", "balancer", "serve", str(config), "--admin", "off"]
    env = {"NOTIFY_SOCKET": path}
    old = ready_balancer([*serve, "--handover-socket", handover], env=env)
    try:
        assert fields(sock)["READY"] == "1"
        new = ready_balancer([*serve, "--takeover", handover], env=env)
        try:
            got = [fields(sock), fields(sock)]
            ready = next(g for g in got if "READY" in g)
            assert ready["STATUS"].startswith("serving 1 service(s)")
            stopping = next(g for g in got if "STOPPING" in g)
            assert stopping["STATUS"] == f"handed over to pid {new.pid}; draining"
            assert old.wait(timeout=30) == 0
        finally:
            new.stop()
    finally:
        old.stop()


def test_a_notify_socket_that_is_gone_does_not_fail_the_balancer(
    tmp_path: Path, services: Services
) -> None:
    config = write_toml(tmp_path / "b.toml", [services.start().port])
    bal = ready_balancer(
        [PYTHON, "-m", "balancer", "serve", str(config), "--admin", "off"],
        env={"NOTIFY_SOCKET": str(tmp_path / "gone.sock")},
    )
    try:
        assert ask_new(bal.port, 2) == reply_for(2)
        bal.signal(signal.SIGHUP)
        bal.wait_for("reload done")
    finally:
        code = bal.stop()
    assert code == 0
    assert bal.output().count("notifications dropped") == 1


def unit_lines(text: str) -> list[str]:
    """The logical lines of a unit file (continuations joined), comments left out."""
    return [
        line.strip()
        for line in text.replace("\\\n", " ").splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]


def test_the_systemd_unit_is_notify_reloads_by_sighup_and_hands_over() -> None:
    text = (ROOT / "contrib" / "balancer.service").read_text()
    settings = dict(line.split("=", 1) for line in unit_lines(text) if "=" in line)
    assert settings["Type"] == "notify"
    assert settings["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert settings["RuntimeDirectoryPreserve"] == "yes"
    start = shlex.split(settings["ExecStart"])
    args = build_parser().parse_args(start[1:])
    assert args.handover_socket == args.takeover_if_running == "/run/balancer/handover.sock"
    # the upgrade the comments spell out runs the same command line in a second unit
    upgrade = re.search(r"systemd-run (.*?)\n#   # 2", text, re.S)
    assert upgrade is not None
    words = shlex.split(upgrade.group(1).replace("\\\n#", " "))
    assert "--property=Type=notify" in words
    assert words[words.index("serve") - 1 :] == start
