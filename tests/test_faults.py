"""Fault injection: every request that can be answered is answered, nothing hangs.

Real balancer, real sample services and misbehaving doubles (`tests/faulty_backends.py`)
on loopback. Faults are injected while the load client keeps a steady open-loop load
of a few thousand requests per second over 16 connections; the client counts every
request as ok or as exactly one kind of error, and a wrong reply is an error.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from balancer.core.framing import LineFramer
from balancer.tools.procs import INSTANCE_RE
from balancer.tools.procs import ChildProcess as Proc
from balancer.tools.service import reply_for as service_reply
from tests.faulty_backends import SlowlorisSwarm
from tests.support import (
    PYTHON,
    ROOT,
    BalancerProc,
    LineClient,
    backend_requests,
    backend_rows,
    load_summary,
    reply_for,
    start_balancer,
    start_load,
    wait_for_load,
    wait_until,
)

pytestmark = pytest.mark.e2e

LOAD = ("--client_count", "16", "--rate", "3000", "--pipeline", "8")


class Backend(Proc):
    port: int


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    """Processes stopped at teardown, last started first (the balancer before its backends)."""
    started: list[Proc] = []
    yield started
    for p in reversed(started):
        p.stop(signal.SIGKILL if isinstance(p, Backend) else signal.SIGTERM)


def start_backends(procs: list[Proc], *argvs: list[str]) -> list[Backend]:
    """Start backend processes at once, then wait for each one's readiness line."""
    started = [Backend([PYTHON, *argv], cwd=ROOT) for argv in argvs]
    procs.extend(started)
    for b in started:
        b.port = int(b.wait_for(INSTANCE_RE).group(2))
    return started


def sample(port: int = 0, *extra: str) -> list[str]:
    return ["-m", "balancer.tools.service", "-p", str(port), *extra]


def faulty(mode: str, *extra: str) -> list[str]:
    return ["-m", "tests.faulty_backends", mode, *extra]


def write_config(
    path: Path,
    ports: list[int],
    *,
    health: dict[str, Any] | None = None,
    outlier: dict[str, Any] | None = None,
    top: dict[str, Any] | None = None,
    **service: Any,
) -> Path:
    """A one-service config `numbers` on 127.0.0.1:0, with fast health checks by default."""
    lines = [f"{k} = {json.dumps(v)}" for k, v in (top or {}).items()]
    lines += ["[services.numbers]", 'listen = "127.0.0.1:0"']
    lines += [f"{k} = {json.dumps(v)}" for k, v in service.items()]
    lines.append("backends = [" + ", ".join(f'"127.0.0.1:{p}"' for p in ports) + "]")
    checks = {"interval": 0.2, "timeout": 0.5, "rise": 1, "fall": 1}
    checks.update(health or {})
    lines.append("[services.numbers.health]")
    lines += [f"{k} = {json.dumps(v)}" for k, v in checks.items()]
    if outlier:
        lines.append("[services.numbers.outlier]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in outlier.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def balancer(procs: list[Proc], config: Path) -> BalancerProc:
    bal = start_balancer(config, cwd=ROOT)
    procs.append(bal)
    return bal


def backends(bal: BalancerProc) -> dict[int, dict[str, Any]]:
    """The service's backends in /status, by port."""
    return {int(a.rsplit(":", 1)[1]): b for a, b in backend_rows(bal.status()).items()}


def served(bal: BalancerProc) -> int:
    return sum(backend_requests(bal.status()).values())


def load_client(procs: list[Proc], bal: BalancerProc, *args: str) -> Proc:
    client = start_load(bal.port, *args, cwd=ROOT)
    procs.append(client)
    return client


def under_load(bal: BalancerProc, client: Proc, requests: int = 1500) -> None:
    wait_for_load(bal, client, served=requests, timeout=20)


def load_result(client: Proc) -> dict[str, Any]:
    """The client's summary, whatever its exit status: the test judges the counts."""
    return load_summary(client, timeout=60, exit_code=None)


def assert_no_failures(doc: dict[str, Any]) -> None:
    assert doc["requests"] > 0
    assert doc["errors"] == dict.fromkeys(doc["errors"], 0), doc["errors"]
    assert doc["ok"] == doc["requests"], doc


# -- backend faults under load -----------------------------------------------------------


def test_kill_9_of_one_of_four_backends_fails_no_request(tmp_path: Path, procs: list[Proc]) -> None:
    pool = start_backends(procs, *(sample() for _ in range(4)))
    bal = balancer(procs, write_config(tmp_path / "b.toml", [b.port for b in pool]))
    client = load_client(procs, bal, *LOAD, "--duration", "4")
    under_load(bal, client)
    victim = pool[2]
    victim.stop(signal.SIGKILL)
    doc = load_result(client)
    assert_no_failures(doc)
    assert backends(bal)[victim.port]["state"] == "down"


def test_a_stopped_backend_times_out_its_requests_then_is_readmitted(
    tmp_path: Path, procs: list[Proc]
) -> None:
    pool = start_backends(procs, *(sample() for _ in range(4)))
    cfg = write_config(
        tmp_path / "b.toml",
        [b.port for b in pool],
        response_timeout=0.5,
        health={"timeout": 1.5},
        outlier={"base_ejection_time": 1.0},
    )
    bal = balancer(procs, cfg)
    client = load_client(procs, bal, *LOAD, "--duration", "5")
    under_load(bal, client)
    victim = pool[1]
    victim.signal(signal.SIGSTOP)  # a black hole: connections accepted, nothing answered
    try:
        wait_until(
            lambda: backends(bal)[victim.port]["state"] == "down", what="the stopped one down"
        )
    finally:
        victim.signal(signal.SIGCONT)
    doc = load_result(client)
    assert_no_failures(doc)
    assert f"127.0.0.1:{victim.port} of service numbers is DOWN: no reply within 0.5s" in (
        bal.output()
    )
    wait_until(lambda: backends(bal)[victim.port]["state"] == "up", what="readmission")
    before = backends(bal)[victim.port]["requests"]
    c = LineClient(bal.port)
    for i in range(40):
        assert c.request(str(i)) == reply_for(i)
    assert backends(bal)[victim.port]["requests"] > before


def test_a_backend_resetting_connections_and_requests_fails_no_request(
    tmp_path: Path, procs: list[Proc]
) -> None:
    pool = start_backends(procs, *(sample() for _ in range(3)), faulty("reset", "--every", "10"))
    bad = pool[3]
    cfg = write_config(
        tmp_path / "b.toml",
        [b.port for b in pool],
        backend_connections=2,
        outlier={"base_ejection_time": 0.5, "max_ejection_time": 1.0},
    )
    bal = balancer(procs, cfg)
    client = load_client(procs, bal, *LOAD, "--duration", "4")
    doc = load_result(client)
    assert_no_failures(doc)
    row = backends(bal)[bad.port]
    assert row["failures"] > 0, row  # the resets did hit live requests
    assert row["requests"] > 0, row


def test_a_backend_answering_partial_lines_is_ejected_and_no_client_sees_it(
    tmp_path: Path, procs: list[Proc]
) -> None:
    pool = start_backends(procs, *(sample() for _ in range(3)), faulty("garbage"))
    bad = pool[3]
    bal = balancer(procs, write_config(tmp_path / "b.toml", [b.port for b in pool]))
    client = load_client(procs, bal, *LOAD, "--duration", "4")
    doc = load_result(client)
    assert_no_failures(doc)  # a garbage reply would count as wrong_reply
    # cut off after answering on the same connection: a broken reply, not a kept-alive close
    down = f"backend 127.0.0.1:{bad.port} of service numbers is DOWN: "
    ejections = [line for line in bal.lines if down in line]
    assert ejections, bal.output()
    assert all("connection closed in the middle of a reply (ejected for" in e for e in ejections)
    assert f"backend 127.0.0.1:{bad.port} closed a kept-alive connection" not in bal.output()


def test_all_backends_down_for_a_while_gives_server_not_available_and_no_hang(
    tmp_path: Path, procs: list[Proc]
) -> None:
    pool = start_backends(procs, *(sample() for _ in range(4)))
    ports = [b.port for b in pool]
    cfg = write_config(tmp_path / "b.toml", ports, outlier={"base_ejection_time": 0.5})
    bal = balancer(procs, cfg)
    client = load_client(procs, bal, *LOAD, "--duration", "6", "--timeout", "5")
    under_load(bal, client, 1000)
    for b in pool:
        b.stop(signal.SIGKILL)
    wait_until(lambda: all(b["state"] == "down" for b in backends(bal).values()), what="all down")
    time.sleep(2.0)  # the length of the outage, not a wait for anything
    during = served(bal)
    start_backends(procs, *(sample(p) for p in ports))
    wait_until(lambda: all(b["state"] == "up" for b in backends(bal).values()), what="all up")
    doc = load_result(client)
    errors = doc["errors"]
    assert errors["server_not_available"] > 0, doc
    assert {k: v for k, v in errors.items() if k != "server_not_available"} == dict.fromkeys(
        (k for k in errors if k != "server_not_available"), 0
    ), errors
    assert doc["ok"] + errors["server_not_available"] == doc["requests"]
    assert served(bal) > during  # normal replies after the outage
    c = LineClient(bal.port)
    assert [c.request(str(i)) for i in range(8)] == [reply_for(i) for i in range(8)]


# -- reload and stop under load --------------------------------------------------------------


def test_reload_adding_and_removing_a_backend_under_load(tmp_path: Path, procs: list[Proc]) -> None:
    a, b, old, new = start_backends(procs, *(sample() for _ in range(4)))
    cfg = write_config(tmp_path / "b.toml", [a.port, b.port, old.port])
    bal = balancer(procs, cfg)
    client = load_client(procs, bal, *LOAD, "--duration", "5")
    under_load(bal, client)
    write_config(tmp_path / "b.toml", [a.port, b.port, new.port])
    bal.signal(signal.SIGHUP)
    bal.wait_for("reload done")
    wait_until(lambda: backends(bal).get(new.port, {}).get("requests", 0) > 0, what="new serves")
    bal.wait_for(f"backend 127.0.0.1:{old.port} removed from service numbers")
    assert old.port not in backends(bal)

    def connections_to_old() -> int:
        conns = psutil.Process(old.pid).net_connections(kind="tcp")
        return sum(1 for c in conns if c.status == psutil.CONN_ESTABLISHED)

    wait_until(lambda: connections_to_old() == 0, what="the removed backend to be let go")
    assert client.popen.poll() is None  # still under load while the removed one idles
    doc = load_result(client)
    assert_no_failures(doc)
    assert connections_to_old() == 0
    assert backends(bal)[new.port]["requests"] > 0


def test_invalid_config_on_reload_is_rejected_and_the_running_one_serves(
    tmp_path: Path, procs: list[Proc]
) -> None:
    (svc,) = start_backends(procs, sample())
    cfg = write_config(tmp_path / "b.toml", [svc.port])
    bal = balancer(procs, cfg)
    cfg.write_text(
        cfg.read_text().replace("[services.numbers]\n", "[services.numbers]\nretries = -1\n")
    )
    bal.signal(signal.SIGHUP)
    line = bal.wait_for(r"reload rejected.*").group(0)
    assert "retries" in line
    c = LineClient(bal.port)
    assert [c.request(str(i)) for i in range(5)] == [reply_for(i) for i in range(5)]
    assert list(backends(bal)) == [svc.port]


class BurstConnection:
    """A client connection sending bursts of requests, each only after the last was answered."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.sent = 0
        self.ok = 0
        self.wrong = 0
        self.unanswered = 0
        self.leftover = b""

    async def run(self, port: int, burst: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        number = self.index * 1_000_000
        try:
            while True:
                numbers = list(range(number, number + burst))
                number += burst
                writer.write(b"".join(b"%d\n" % n for n in numbers))
                self.sent += burst
                for i, n in enumerate(numbers):
                    try:
                        line = await reader.readuntil(b"\n")
                    except asyncio.IncompleteReadError as exc:
                        self.leftover = exc.partial
                        self.unanswered = burst - i
                        return
                    if line[:-1] == service_reply(b"%d" % n):
                        self.ok += 1
                    else:
                        self.wrong += 1
        except ConnectionError:
            self.unanswered = self.sent - self.ok - self.wrong
        finally:
            writer.close()


def test_sigterm_under_load_answers_every_accepted_request(
    tmp_path: Path, procs: list[Proc]
) -> None:
    pool = start_backends(procs, *(sample(0, "--delay", "0.02") for _ in range(4)))
    cfg = write_config(tmp_path / "b.toml", [b.port for b in pool], top={"drain_timeout": 15})
    bal = balancer(procs, cfg)
    conns = [BurstConnection(i) for i in range(16)]

    async def drive() -> int:
        tasks = [asyncio.create_task(c.run(bal.port, 8)) for c in conns]
        while sum(c.ok for c in conns) < 2000:
            assert not any(t.done() for t in tasks), [t.exception() for t in tasks if t.done()]
            await asyncio.sleep(0.01)
        at_signal = sum(c.ok for c in conns)
        bal.signal(signal.SIGTERM)
        async with asyncio.timeout(25):
            await asyncio.gather(*tasks)
        return at_signal

    at_signal = asyncio.run(drive())
    assert bal.wait(timeout=20) == 0
    ok = sum(c.ok for c in conns)
    assert ok > at_signal  # requests in flight at the signal were answered
    for c in conns:
        assert c.wrong == 0
        assert c.leftover == b""  # no truncated reply
        # a burst is answered whole, or was never read: closed between two bursts
        assert c.unanswered in (0, 8), vars(c)
    # every request the balancer passed to a backend reached its client
    summary = re.findall(r"summary: service numbers backend \S+: \w+, (\d+) requests", bal.output())
    assert len(summary) == 4
    assert sum(int(n) for n in summary) == ok
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", bal.port), timeout=2).close()


# -- client faults -------------------------------------------------------------------------------


SLOWLORIS = 500
CLIENT_TIMEOUT = 5.0


def test_slowloris_clients_do_not_hold_up_a_normal_one_and_are_closed(
    tmp_path: Path, procs: list[Proc]
) -> None:
    """While 500 connections trickle an endless line, a normal client is served; the trickle
    does not count as activity, so each is closed once `client_timeout` has passed since its
    last request (never sooner), and the balancer goes on serving."""
    (svc,) = start_backends(procs, sample())
    cfg = write_config(tmp_path / "b.toml", [svc.port], client_timeout=CLIENT_TIMEOUT)
    bal = balancer(procs, cfg)
    swarm = SlowlorisSwarm(bal.port, SLOWLORIS, period=0.3)
    try:
        assert swarm.first_replies == SLOWLORIS
        c = LineClient(bal.port)
        open_during = []
        for i in range(200):
            assert c.request(str(i)) == reply_for(i)
            open_during.append(swarm.open_count)
        # served while they were open: the clock that closes them started with their requests
        assert open_during[0] == SLOWLORIS, open_during
        wait_until(
            lambda: swarm.open_count == 0,
            timeout=CLIENT_TIMEOUT + 30,
            what="slowloris connections closed",
        )
        # each was last active after sent_from, so none may close sooner than this (load
        # only makes it later: a lower bound, not a race)
        closed_after = min(swarm.closed_at.values()) - swarm.sent_from
        assert closed_after >= CLIENT_TIMEOUT, closed_after
    finally:
        swarm.close()
    c = LineClient(bal.port)
    assert c.request("5") == reply_for(5)


def test_junk_from_clients_gets_error_replies_and_memory_stays_bounded(
    tmp_path: Path, procs: list[Proc]
) -> None:
    (svc,) = start_backends(procs, sample())
    bal = balancer(procs, write_config(tmp_path / "b.toml", [svc.port]))
    rng = random.Random(20240501)
    pieces = [b"\x00", b"\xe2\x82", b"7", b"\n", b"\r\n", b"\xff"]
    # random bytes, invalid UTF-8, NUL bytes: every line gets the service's reply, except
    # a line with a CR inside it, which never reaches a backend (some parsers split there)
    junk = b"".join(
        [
            bytes(rng.getrandbits(8) for _ in range(20_000)),
            b"\xff\xfe\xfd\n\xc3\x28\n\x00\x00\x00\n\x00\n12\x003\n\r\n\n",
            b"".join(rng.choice(pieces) for _ in range(5000)),
            b"42\n",
        ]
    )
    expected = [
        b"Error: line break inside a message" if b"\r" in line else service_reply(line)
        for line in LineFramer(1 << 20).feed(junk)
    ]
    c = LineClient(bal.port)
    for i in range(0, len(junk), 1000):
        c.send_bytes(junk[i : i + 1000])
    got = [c.read_line().encode() for _ in expected]
    assert got == expected
    assert c.request("43") == reply_for(43)
    # 10 MB lines on several connections at once: each gets the error reply, then is closed
    big = b"8" * (10 * 1024 * 1024) + b"\n"
    hogs = [LineClient(bal.port) for _ in range(4)]
    for h in hogs:
        try:
            h.send_bytes(big)
        except OSError:
            pass
    for h in hogs:
        assert h.read_until_closed() == b"Error: line too long\n"
    assert c.request("44") == reply_for(44)
    rss = psutil.Process(bal.pid).memory_info().rss
    assert rss < 150 * 1024 * 1024, f"balancer RSS {rss / 1e6:.0f} MB after 10 MB lines"
    assert bal.popen.poll() is None


def test_max_connections_refuses_with_an_error_line(tmp_path: Path, procs: list[Proc]) -> None:
    (svc,) = start_backends(procs, sample())
    bal = balancer(procs, write_config(tmp_path / "b.toml", [svc.port], max_connections=2))
    first, second = LineClient(bal.port), LineClient(bal.port)
    assert first.request("1") == reply_for(1)
    assert second.request("2") == reply_for(2)
    third = LineClient(bal.port)
    assert third.read_until_closed() == b"Error: too many connections\n"
    second.close()
    wait_until(lambda: _served_on_new_connection(bal.port), what="a slot to free up")
    assert first.request("3") == reply_for(3)


def _served_on_new_connection(port: int) -> bool:
    c = LineClient(port)
    try:
        return c.request("9") == reply_for(9)
    except ConnectionError:
        return False
    finally:
        c.close()


def test_backend_request_limit_answers_busy_and_queue_timeout_instead_of_hanging(
    tmp_path: Path, procs: list[Proc]
) -> None:
    (slow,) = start_backends(procs, sample(0, "--delay", "1.5"))
    cfg = write_config(
        tmp_path / "b.toml",
        [slow.port],
        max_backend_requests=1,
        queue_size=2,
        queue_timeout=0.2,
        health={"enabled": False},
    )
    bal = balancer(procs, cfg)
    c = LineClient(bal.port)
    c.send("1", "2", "3", "4", "5")
    assert [c.read_line() for _ in range(5)] == [
        reply_for(1),
        "Error: queue timeout",
        "Error: queue timeout",
        "Error: server busy",
        "Error: server busy",
    ]
    assert c.request("6") == reply_for(6)
