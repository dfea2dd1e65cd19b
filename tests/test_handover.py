"""Restarts that drop nothing: a new process takes the listening sockets over (SCM_RIGHTS).

The messages and the assignment of sockets are tested as plain functions; a session of
the running side in-process with a fake server (bounded reads: size, time, a closed
connection); the hand-over itself with real `balancer serve` processes on loopback.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import stat
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from balancer.app import take_over
from balancer.config.load import load_config
from balancer.net.handover import (
    FDS_PER_MESSAGE,
    MAX_MESSAGE,
    Handed,
    HandoverError,
    NothingToTakeOver,
    assign,
    check_path,
    decode,
    encode,
    expect,
    listener_messages,
    parse_listeners,
)
from balancer.runtime.handover import HandoverListener, Takeover
from tests.support import (
    PYTHON,
    BalancerProc,
    Balancers,
    LineClient,
    Services,
    ready_balancer,
    reply_for,
    wait_until,
)

# -- messages -----------------------------------------------------------------------------------


def test_messages_round_trip_and_bad_ones_are_refused() -> None:
    doc = decode(encode("takeover", pid=42))
    assert doc == {"op": "takeover", "pid": 42}
    assert expect(doc, "takeover") is doc
    for bad, why in [
        (b"", "the connection closed"),
        (b"x" * (MAX_MESSAGE + 1), "over"),
        (b"\xff\xfe", "not JSON"),
        (b"[1, 2]", "known op"),
        (b'{"op": "launch"}', "known op"),
    ]:
        with pytest.raises(HandoverError, match=why):
            decode(bad)
    with pytest.raises(HandoverError, match="refused: this balancer is stopping"):
        expect(decode(encode("refused", reason="this balancer is stopping")), "listeners")
    with pytest.raises(HandoverError, match="expected ready, got draining"):
        expect(decode(encode("draining", pid=1)), "ready")
    with pytest.raises(HandoverError, match="over"):
        encode("refused", reason="x" * MAX_MESSAGE)


def test_listener_messages_carry_at_most_a_batch_of_sockets_each() -> None:
    handed = [Handed(f"service s{i}", ("127.0.0.1", 0), ("127.0.0.1", 1000 + i)) for i in range(70)]
    messages = listener_messages(7, handed)
    assert [count for _, count in messages] == [FDS_PER_MESSAGE, FDS_PER_MESSAGE, 6]
    parsed = [parse_listeners(decode(data)) for data, _ in messages]
    assert [last for _, last in parsed] == [False, False, True]
    assert [h for chunk, _ in parsed for h in chunk] == handed
    ((only, count),) = listener_messages(7, [])
    assert count == 0
    assert parse_listeners(decode(only)) == ([], True)


@pytest.mark.parametrize(
    "listeners",
    [
        "nope",
        [{"what": "service a", "listen": ["127.0.0.1", 70000], "bound": ["127.0.0.1", 1]}],
        [{"what": "service a", "listen": ["127.0.0.1"], "bound": ["127.0.0.1", 1]}],
        [{"what": 3, "listen": ["127.0.0.1", 1], "bound": ["127.0.0.1", 1]}],
        [{"what": "service a", "listen": ["127.0.0.1", True], "bound": ["127.0.0.1", 1]}],
    ],
)
def test_a_malformed_listeners_message_is_refused(listeners: object) -> None:
    with pytest.raises(HandoverError):
        parse_listeners({"op": "listeners", "pid": 1, "listeners": listeners})


def test_sockets_go_to_the_listener_naming_their_configured_then_bound_address() -> None:
    handed = [
        Handed("service a", ("127.0.0.1", 0), ("127.0.0.1", 4001)),
        Handed("admin", ("127.0.0.1", 0), ("127.0.0.1", 4002)),
        Handed("service b", ("127.0.0.1", 0), ("127.0.0.1", 4003)),
        Handed("service c", ("127.0.0.1", 9000), ("127.0.0.1", 9000)),
        Handed("service d", ("127.0.0.1", 9001), ("127.0.0.1", 9001)),
    ]
    services = [
        ("z", ("127.0.0.1", 0)),  # a new service on port 0: binds its own
        ("b", ("127.0.0.1", 4003)),  # its port now written out: its bound socket
        ("a", ("127.0.0.1", 0)),  # port 0 in both: its own socket, whatever the order
        ("e", ("127.0.0.1", 9000)),  # renamed: the socket at its address
    ]
    given = assign(handed, services, admin=("127.0.0.1", 0))
    assert given.services == {"a": 0, "b": 2, "e": 3}
    assert given.admin == 1, "the admin socket goes to the admin endpoint, not a port-0 service"
    assert given.unused == [4]
    # the admin endpoint turned off: its socket serves a service only if one names its port
    off = assign(handed[:2], [("x", ("127.0.0.1", 4002)), ("y", ("127.0.0.1", 0))], admin=None)
    assert off.services == {"x": 1}
    assert off.unused == [0]


# -- the socket path ------------------------------------------------------------------------


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path (a Unix socket path holds about 100 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="bh", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_the_path_check_replaces_a_stale_socket_and_refuses_anything_else(
    short_dir: Path,
) -> None:
    stale = short_dir / "stale.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        s.bind(str(stale))
    check_path(str(stale))
    assert not stale.exists()
    plain = short_dir / "file"
    plain.write_text("data")
    with pytest.raises(HandoverError, match="not a socket"):
        check_path(str(plain))
    assert plain.read_text() == "data"
    live = short_dir / "live.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        s.bind(str(live))
        s.listen(1)
        with pytest.raises(HandoverError, match="answers on"):
            check_path(str(live))
        check_path(str(live), replacing=str(live))  # the one taken over: renamed over later
    with pytest.raises(HandoverError, match="at most"):
        check_path(str(short_dir / ("x" * 120)))


def test_takeover_if_running_starts_afresh_when_nothing_answers(short_dir: Path) -> None:
    config = load_config_text(short_dir, 'listen = "127.0.0.1:0"\n')
    assert take_over(config, str(short_dir / "none.sock"), if_running=True) is None
    with pytest.raises(NothingToTakeOver):
        take_over(config, str(short_dir / "none.sock"))


def load_config_text(where: Path, listen: str) -> Any:
    path = where / "c.toml"
    path.write_text(f'[services.numbers]\n{listen}backends = ["127.0.0.1:1"]\n')
    return load_config(path)


# -- a session of the running side, in-process ---------------------------------------------


class FakeSource:
    """The server side of a hand-over: one real listening socket, and what was decided."""

    def __init__(self) -> None:
        self.stopping = False
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.handed: list[int] = []

    def handover_listeners(self) -> list[tuple[Handed, socket.socket]]:
        dup = socket.socket(fileno=os.dup(self.listener.fileno()))
        return [(Handed("service numbers", ("127.0.0.1", 0), ("127.0.0.1", self.port)), dup)]

    def handed_over(self, pid: int) -> None:
        self.handed.append(pid)


def client(path: Path) -> socket.socket:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    conn.settimeout(5)
    conn.connect(str(path))
    return conn


async def test_a_session_hands_over_the_same_kernel_socket_and_waits_for_ready(
    short_dir: Path,
) -> None:
    source = FakeSource()
    path = short_dir / "h.sock"
    listener = HandoverListener(str(path), source, asyncio.Lock())
    listener.open()
    try:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        takeover, received = await asyncio.to_thread(Takeover.receive, str(path))
        ((handed, sock),) = received
        assert handed.bound == ("127.0.0.1", source.port)
        # the same kernel socket: a connection made to the original is accepted on the copy
        with socket.create_connection(("127.0.0.1", source.port), timeout=5):
            sock.setblocking(True)
            sock.settimeout(5)
            conn, _ = sock.accept()
            conn.close()
        sock.close()
        assert source.handed == []
        with pytest.raises(HandoverError, match="refused: another takeover is under way"):
            await asyncio.to_thread(Takeover.receive, str(path))
        await takeover.ready()
        wait_until(lambda: source.handed == [os.getpid()], timeout=5, what="handed_over")
        assert not path.exists(), "the path is removed once handed over (it was ours)"
    finally:
        listener.close()
        source.listener.close()


@pytest.mark.parametrize(
    ("send", "logged"),
    [
        (b"not json", "refused a connection: a message that is not JSON"),
        (b"{" + b" " * MAX_MESSAGE + b"}", "refused a connection: a message over"),
        (None, "refused a connection: no takeover request within 0.2s"),
        (encode("ready", pid=1), "refused a connection: expected takeover, got ready"),
    ],
)
async def test_a_bad_or_silent_request_changes_nothing(
    short_dir: Path, caplog: pytest.LogCaptureFixture, send: bytes | None, logged: str
) -> None:
    source = FakeSource()
    path = short_dir / "h.sock"
    listener = HandoverListener(str(path), source, asyncio.Lock(), request_timeout=0.2)
    listener.open()
    try:
        conn = client(path)
        if send is not None:
            conn.send(send)
        await wait_for_log(caplog, logged)
        assert source.handed == []
        conn.close()
        # and the next takeover goes through
        takeover, received = await asyncio.to_thread(Takeover.receive, str(path))
        for _, sock in received:
            sock.close()
        await takeover.ready()
        wait_until(lambda: source.handed != [], timeout=5, what="handed_over")
    finally:
        listener.close()
        source.listener.close()


async def test_a_new_process_that_goes_before_ready_leaves_the_old_serving(
    short_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    source = FakeSource()
    path = short_dir / "h.sock"
    listener = HandoverListener(str(path), source, asyncio.Lock(), ready_timeout=0.5)
    listener.open()
    try:
        takeover, received = await asyncio.to_thread(Takeover.receive, str(path))
        for _, sock in received:
            sock.close()
        takeover.close()  # a crash before ready
        await wait_for_log(caplog, "failed (the connection closed before ready)")
        takeover, received = await asyncio.to_thread(Takeover.receive, str(path))
        for _, sock in received:
            sock.close()  # and one that never says ready: bounded by ready_timeout
        await wait_for_log(caplog, "failed (no ready within 0.5s before ready)")
        takeover.close()
        assert source.handed == []
        assert path.exists()
    finally:
        listener.close()
        source.listener.close()


async def wait_for_log(caplog: pytest.LogCaptureFixture, text: str) -> None:
    for _ in range(200):
        if text in caplog.text:
            return
        await asyncio.sleep(0.025)
    raise AssertionError(f"no log line with {text!r} in:\n{caplog.text}")


# -- real processes ----------------------------------------------------------------------------


def two_services(path: Path, backends: list[int], *, health: bool = True, extra: str = "") -> Path:
    """`numbers` (message mode) and `relay` (tcp mode), both on 127.0.0.1:0."""
    addresses = json.dumps([f"127.0.0.1:{p}" for p in backends])
    check = "interval = 0.2\ntimeout = 1\nrise = 1\nfall = 3\n" if health else "enabled = false\n"
    path.write_text(
        "drain_timeout = 5\n"
        f'[services.numbers]\nlisten = "127.0.0.1:0"\nbackends = {addresses}\n'
        f"[services.numbers.health]\n{check}"
        f'[services.relay]\nlisten = "127.0.0.1:0"\nmode = "tcp"\nbackends = {addresses}\n'
        f"[services.relay.health]\n{check}" + extra
    )
    return path


def serve(config: Path, *extra: str, env: dict[str, str] | None = None) -> BalancerProc:
    args = [PYTHON, "-m", "balancer", "serve", str(config), "--admin", "127.0.0.1:0", *extra]
    return ready_balancer(args, env=env)


def ask_new(port: int, n: int) -> str:
    c = LineClient(port, timeout=20)
    try:
        return c.request(str(n))
    finally:
        c.close()


class Load(threading.Thread):
    """Sequential requests, each on a new connection to `numbers`, on a kept-alive one
    to `numbers`, or on a new one to `relay` (tcp mode), until stopped (bounded).

    A kept-alive connection that the draining process closes while idle is opened
    again and its request sent again, as a client of any keep-alive protocol does when
    the server closed the connection before a byte of the reply: counted in `reconnects`.
    Anything else that goes wrong is an error.
    """

    def __init__(self, numbers: int, relay: int, limit: int = 30000) -> None:
        super().__init__(daemon=True)
        self.numbers, self.relay, self.limit = numbers, relay, limit
        self.done = 0
        self.reconnects = 0
        self.errors: list[str] = []
        self.halt = threading.Event()

    def _kept(self, kept: LineClient | None, n: int) -> tuple[LineClient, str]:
        if kept is None:
            kept = LineClient(self.numbers, timeout=20)
        try:
            return kept, kept.request(str(n))
        except (ConnectionError, OSError):
            if kept.buf:
                raise
            kept.close()
            self.reconnects += 1
            kept = LineClient(self.numbers, timeout=20)
            return kept, kept.request(str(n))

    def run(self) -> None:
        kept: LineClient | None = None
        deadline = time.monotonic() + 90
        while not self.halt.is_set() and self.done < self.limit and time.monotonic() < deadline:
            n = self.done
            try:
                if n % 3 == 0:
                    reply = ask_new(self.numbers, n)
                elif n % 3 == 1:
                    kept, reply = self._kept(kept, n)
                else:
                    reply = ask_new(self.relay, n)
                if reply != reply_for(n):
                    self.errors.append(f"request {n}: {reply!r}")
            except Exception as exc:
                self.errors.append(f"request {n} ({n % 3}): {exc!r}")
            self.done += 1
        if kept is not None:
            kept.close()

    def wait_for(self, count: int) -> None:
        wait_until(lambda: self.done >= count or not self.is_alive(), timeout=60, what="load")
        assert self.done >= count, f"the load stopped at {self.done}: {self.errors[:5]}"


def test_a_takeover_under_load_drops_nothing(
    tmp_path: Path, short_dir: Path, services: Services, balancers: Balancers
) -> None:
    backends = [services.start().port, services.start().port]
    config = two_services(tmp_path / "b.toml", backends)
    path = str(short_dir / "h.sock")
    old = serve(config, "--handover-socket", path)
    balancers.append(old)
    load = Load(old.ports["numbers"], old.ports["relay"])
    load.start()
    try:
        load.wait_for(300)
        before = load.done
        new = serve(config, "--takeover", path, "--handover-socket", path)
        balancers.append(new)
        assert old.wait(timeout=30) == 0, old.output()
        during = load.done
        load.wait_for(during + 600)
    finally:
        load.halt.set()
        load.join(timeout=30)
    assert load.errors == [], load.errors[:10]
    assert during > before, "requests ran through the switch"
    assert load.reconnects <= 1
    assert new.ports == old.ports, "the port-0 services serve on the sockets handed over"
    assert new.admin_port == old.admin_port
    old.wait_for(rf"handover: the balancer pid {new.pid} serves on every listener now")
    new.wait_for(rf"takeover done: this process serves; the balancer pid {old.pid} stops")
    # the admin endpoint answers from the new process (the old one has exited), which
    # served both services on the sockets it was handed
    status = new.status()["services"]
    for name in ("numbers", "relay"):
        assert sum(int(b["requests"]) for b in status[name]["backends"]) > 0, name
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600, "the path moved to the new process"
    # restarts chain: a third process takes over from the second
    third = serve(config, "--takeover", path, "--handover-socket", path)
    balancers.append(third)
    assert new.wait(timeout=30) == 0, new.output()
    assert ask_new(third.ports["numbers"], 5) == reply_for(5)
    assert ask_new(third.ports["relay"], 6) == reply_for(6)
    assert third.stop() == 0
    assert not os.path.exists(path), "removed at exit"


def test_a_failed_takeover_leaves_the_old_process_serving(
    tmp_path: Path, short_dir: Path, services: Services, balancers: Balancers
) -> None:
    backends = [services.start().port]
    config = two_services(tmp_path / "b.toml", backends)
    path = str(short_dir / "h.sock")
    old = serve(config, "--handover-socket", path)
    balancers.append(old)
    run = [PYTHON, "-m", "balancer", "serve", "--admin", "127.0.0.1:0", "--takeover", path]
    # an invalid file: refused before anything is taken
    bad = tmp_path / "bad.toml"
    bad.write_text("[services.numbers]\nlisten = 5\n")
    failed = BalancerProc([*run, str(bad)])
    assert failed.wait(timeout=30) == 2, failed.output()
    # a file that is valid but cannot start: its new service's address is in use, found
    # once the listeners were received
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen(1)
        taken = blocker.getsockname()[1]
        extra = f'[services.extra]\nlisten = "127.0.0.1:{taken}"\nbackends = ["127.0.0.1:1"]\n'
        failing = BalancerProc(
            [*run, str(two_services(tmp_path / "f.toml", backends, extra=extra))]
        )
        assert failing.wait(timeout=30) == 1, failing.output()
    assert "received 3 listening socket(s)" in failing.output()
    old.wait_for(rf"takeover by pid {failing.pid} failed \(the connection closed before ready\)")
    assert old.popen.poll() is None
    assert ask_new(old.ports["numbers"], 1) == reply_for(1)
    assert ask_new(old.ports["relay"], 2) == reply_for(2)
    assert old.status()["services"]["numbers"]["backends"]
    # and its handover socket still hands over
    new = serve(config, "--takeover", path)
    balancers.append(new)
    assert old.wait(timeout=30) == 0
    assert ask_new(new.ports["numbers"], 3) == reply_for(3)


def test_a_takeover_is_refused_when_nothing_or_a_live_balancer_is_there(
    tmp_path: Path, short_dir: Path, services: Services, balancers: Balancers
) -> None:
    config = two_services(tmp_path / "b.toml", [services.start().port], health=False)
    path = str(short_dir / "h.sock")
    nothing = BalancerProc([PYTHON, "-m", "balancer", "serve", str(config), "--takeover", path])
    assert nothing.wait(timeout=30) == 1
    assert "no balancer answers on" in nothing.output()
    old = serve(config, "--handover-socket", path)
    balancers.append(old)
    other = BalancerProc(
        [
            PYTHON,
            "-m",
            "balancer",
            "serve",
            str(config),
            "--admin",
            "off",
            "--handover-socket",
            path,
        ]
    )
    assert other.wait(timeout=30) == 1
    assert f"a balancer answers on {path} already" in other.output()
    assert ask_new(old.ports["numbers"], 4) == reply_for(4)
    # --takeover-if-running takes over when one answers
    new = serve(config, "--takeover-if-running", path)
    balancers.append(new)
    assert old.wait(timeout=30) == 0
    assert new.ports == old.ports


def test_connections_waiting_in_the_backlog_at_the_switch_are_answered(
    tmp_path: Path, short_dir: Path, services: Services, balancers: Balancers
) -> None:
    """The new process is stopped (SIGSTOP) right after it took over: connections made
    then wait in the backlog of the kernel socket, nobody accepting, while the old process
    closes its copies and exits; once the new one runs again, every one is answered.
    (Closing the old copies with shutdown(), or serving on sockets other than the ones
    handed over, refuses or resets them.)"""
    config = two_services(tmp_path / "b.toml", [services.start().port], health=False)
    path = str(short_dir / "h.sock")
    old = serve(config, "--handover-socket", path)
    balancers.append(old)
    new = serve(config, "--takeover", path)
    balancers.append(new)
    new.wait_for("takeover done")
    new.signal(signal.SIGSTOP)
    try:
        waiting = []
        for i in range(60):
            c = LineClient(old.ports["numbers" if i % 2 else "relay"], timeout=30)
            c.send(str(i))
            waiting.append(c)
        assert old.wait(timeout=30) == 0, old.output()
        late = []
        for i in range(60, 80):
            c = LineClient(old.ports["numbers" if i % 2 else "relay"], timeout=30)
            c.send(str(i))
            late.append(c)
    finally:
        new.signal(signal.SIGCONT)
    for i, c in enumerate([*waiting, *late]):
        assert c.read_line() == reply_for(i), i
