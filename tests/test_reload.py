"""Reload and stop end to end: a real balancer process, sample services, signals, the admin API.

What a user sees: a reload that cannot be applied (a busy port, a bad file, a backend that
is the balancer itself) is refused whole and every listener keeps serving; the state after
any sequence of reloads is the last valid file's, under load, with no request failed; a
stop answers what it can within `drain_timeout`, says what it cut, and a second signal
stops at once; a stop during a long start-up ends it cleanly.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from balancer.tools.procs import ChildProcess as Proc
from tests.support import (
    PYTHON,
    BalancerProc,
    Balancers,
    LineClient,
    Services,
    backend_rows,
    free_port,
    free_ports,
    reply_for,
    wait_until,
)

pytestmark = pytest.mark.e2e

STOPPING = "Error: balancer stopping"
NO_CHECKS: dict[str, Any] = {"enabled": False}
FAST_CHECKS: dict[str, Any] = {"interval": 0.2, "timeout": 1, "rise": 1, "fall": 1}

# -- helpers ------------------------------------------------------------------------------------


def service(
    port: int,
    backends: list[int] | list[tuple[int, int]],
    *,
    health: dict[str, Any] | None = None,
    **keys: Any,
) -> dict[str, Any]:
    """One [services.NAME] table: listen on 127.0.0.1:PORT, backends by port (or port, weight)."""
    listed = [(b, 1) if isinstance(b, int) else b for b in backends]
    return {"listen": port, "backends": listed, "health": health or FAST_CHECKS, **keys}


def write_config(path: Path, services: dict[str, dict[str, Any]], **top: Any) -> Path:
    lines = [f"{k} = {json.dumps(v)}" for k, v in top.items()]
    for name, spec in services.items():
        lines += [f"[services.{name}]", f'listen = "127.0.0.1:{spec["listen"]}"']
        lines += [
            f"{k} = {json.dumps(v)}"
            for k, v in spec.items()
            if k not in ("listen", "backends", "health")
        ]
        entries = ", ".join(
            f'{{ address = "127.0.0.1:{port}", weight = {weight} }}'
            for port, weight in spec["backends"]
        )
        lines.append(f"backends = [{entries}]")
        lines.append(f"[services.{name}.health]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in spec["health"].items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def call(bal: BalancerProc, method: str, path: str, body: object = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(
        f"http://127.0.0.1:{bal.admin_port}{path}",
        data=data,
        method=method,
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def count(bal: Proc, pattern: str) -> int:
    regex = re.compile(pattern)
    return sum(1 for line in list(bal.lines) if regex.search(line))


def reload_by_signal(bal: BalancerProc) -> tuple[bool, str]:
    """SIGHUP; (accepted, the line that says so) once the balancer logged the outcome."""
    done, rejected = count(bal, "reload done"), count(bal, "reload rejected")
    bal.signal(signal.SIGHUP)
    wait_until(
        lambda: count(bal, "reload done") > done or count(bal, "reload rejected") > rejected,
        timeout=20,
        what="the reload's outcome in the log",
    )
    if count(bal, "reload rejected") > rejected:
        return False, [line for line in bal.lines if "reload rejected" in line][-1]
    return True, "reload done"


def reload_by_api(bal: BalancerProc) -> tuple[bool, str]:
    status, doc = call(bal, "POST", "/api/reload")
    assert status in (200, 400, 409), (status, doc)
    return status == 200, str(doc.get("error", "")) if status != 200 else "reload done"


RELOADS = {"sighup": reload_by_signal, "api": reload_by_api}


@contextmanager
def busy_port(port: int) -> Iterator[int]:
    """`port`, listened on by another program meanwhile."""
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", port))
        blocker.listen()
        yield port


def serves(port: int, n: int = 42) -> bool:
    c = LineClient(port, timeout=10)
    try:
        return c.request(str(n)) == reply_for(n)
    finally:
        c.close()


def refuses(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


def no_traceback(proc: Proc) -> None:
    out = proc.output()
    assert "Traceback" not in out, out
    assert "never retrieved" not in out, out


# -- a reload that cannot be applied changes nothing ----------------------------------------------


@pytest.mark.parametrize("via", list(RELOADS))
def test_a_reload_to_a_busy_port_is_refused_and_the_old_port_keeps_serving(
    tmp_path: Path, services: Services, balancers: Balancers, via: str
) -> None:
    (backend,) = services.start_many(1)
    port, moved, busy = free_ports(3)
    good = {"numbers": service(port, [backend.port])}
    cfg = write_config(tmp_path / "b.toml", good)
    bal = balancers.start(cfg)
    assert serves(port)
    with busy_port(busy) as taken:
        write_config(cfg, {"numbers": service(taken, [backend.port])})
        accepted, message = RELOADS[via](bal)
        assert not accepted
        assert f"127.0.0.1:{taken}" in message
        assert "in use" in message
        assert serves(port)
        assert bal.status()["services"]["numbers"]["listen"] == f"127.0.0.1:{port}"
    # the same file again: nothing to change, still serving
    write_config(cfg, good)
    assert RELOADS[via](bal)[0]
    assert serves(port)
    # and a move to a free port works, the old port let go
    write_config(cfg, {"numbers": service(moved, [backend.port])})
    assert RELOADS[via](bal)[0]
    assert serves(moved)
    wait_until(lambda: refuses(port), timeout=10, what="the old listener to close")
    no_traceback(bal)


def test_a_new_service_on_a_busy_port_is_refused_with_the_whole_file(
    tmp_path: Path, services: Services, balancers: Balancers
) -> None:
    (backend,) = services.start_many(1)
    port, before, after, busy = free_ports(4)
    numbers = service(port, [backend.port])
    cfg = write_config(tmp_path / "b.toml", {"numbers": numbers})
    bal = balancers.start(cfg)
    with busy_port(busy) as taken:
        write_config(
            cfg,
            {
                "numbers": numbers,
                "before": service(before, [backend.port]),
                "busy": service(taken, [backend.port]),
                "after": service(after, [backend.port]),
            },
        )
        status, doc = call(bal, "POST", "/api/reload")
        assert status == 409, doc
        assert f"service busy: cannot listen on 127.0.0.1:{taken}" in doc["error"]
        assert list(bal.status()["services"]) == ["numbers"]
        assert refuses(before)
        assert refuses(after)
        assert serves(port)
    write_config(
        cfg,
        {
            "numbers": numbers,
            "before": service(before, [backend.port]),
            "after": service(after, [backend.port]),
        },
    )
    status, doc = call(bal, "POST", "/api/reload")
    assert status == 200, doc
    assert list(doc["services"]) == ["numbers", "before", "after"]
    assert serves(before)
    assert serves(after)
    no_traceback(bal)


# -- the last file wins ----------------------------------------------------------------------------


def test_a_backend_dropped_then_listed_again_while_it_drains_stays(
    tmp_path: Path, services: Services, balancers: Balancers
) -> None:
    slow, fast = services.start("--delay", "1"), services.start()
    port = free_port()
    both = {"numbers": service(port, [slow.port, fast.port], health=NO_CHECKS)}
    cfg = write_config(tmp_path / "b.toml", both)
    bal = balancers.start(cfg)
    address = f"127.0.0.1:{slow.port}"
    c = LineClient(port)
    c.send("1", "2")  # round robin: one of them is held by the slow backend
    wait_until(
        lambda: backend_rows(bal.status())[address]["in_flight"] == 1,
        what="a request held by the slow backend",
    )
    write_config(cfg, {"numbers": service(port, [fast.port], health=NO_CHECKS)})
    assert call(bal, "POST", "/api/reload")[0] == 200
    assert backend_rows(bal.status())[address]["admin_state"] == "drain"
    write_config(cfg, both)
    assert call(bal, "POST", "/api/reload")[0] == 200
    assert [c.read_line(), c.read_line()] == [reply_for(1), reply_for(2)]
    # the drained request is done: the removal it waited for would happen now
    rows = backend_rows(bal.status())
    assert list(rows) == [address, f"127.0.0.1:{fast.port}"]
    assert rows[address]["admin_state"] == "ready"
    served = int(rows[address]["requests"])

    def slow_serves_again() -> bool:
        assert c.request("3") == reply_for(3)
        return int(backend_rows(bal.status())[address]["requests"]) > served

    wait_until(slow_serves_again, timeout=10, what="the re-listed backend to serve")
    assert count(bal, f"backend {address} removed") == 0


def test_a_reload_removes_backends_added_through_the_api_and_says_so(
    tmp_path: Path, services: Services, balancers: Balancers
) -> None:
    a, b = services.start_many(2)
    port = free_port()
    cfg = write_config(tmp_path / "b.toml", {"numbers": service(port, [a.port])})
    bal = balancers.start(cfg)
    added = f"127.0.0.1:{b.port}"
    status, doc = call(bal, "POST", "/api/services/numbers/backends", {"address": added})
    assert status == 201, doc
    assert call(bal, "POST", "/api/reload")[0] == 200
    bal.wait_for(
        f"backend {re.escape(added)} of service numbers added through the API is not in "
        "the file: removed"
    )
    assert list(backend_rows(bal.status())) == [f"127.0.0.1:{a.port}"]


def test_a_backend_that_is_the_balancer_itself_is_refused(
    tmp_path: Path, services: Services, balancers: Balancers
) -> None:
    (backend,) = services.start_many(1)
    port = free_port()
    cfg = write_config(tmp_path / "b.toml", {"numbers": service(port, [backend.port])})
    bal = balancers.start(cfg)
    for own in (port, bal.admin_port):
        status, doc = call(
            bal, "POST", "/api/services/numbers/backends", {"address": f"127.0.0.1:{own}"}
        )
        assert status == 400, doc
        assert "this balancer itself" in doc["error"]
    assert list(backend_rows(bal.status())) == [f"127.0.0.1:{backend.port}"]
    write_config(cfg, {"numbers": service(port, [backend.port, port])})
    status, doc = call(bal, "POST", "/api/reload")
    assert status == 400, doc
    assert f"127.0.0.1:{port}" in doc["error"]
    assert serves(port)


def test_a_wildcard_listener_with_itself_as_backend_does_not_start(tmp_path: Path) -> None:
    port = free_port()
    cfg = tmp_path / "loop.toml"
    cfg.write_text(
        f'[services.loop]\nlisten = "0.0.0.0:{port}"\nbackends = ["127.0.0.1:{port}"]\n'
        "[services.loop.health]\nenabled = false\n"
    )
    bal = Proc([PYTHON, "-m", "balancer", "serve", str(cfg), "--admin", "off"])
    assert bal.wait(timeout=30) == 2
    assert f"127.0.0.1:{port}" in bal.output()
    assert "balancer ready" not in bal.output()
    no_traceback(bal)


# -- any sequence of reloads -----------------------------------------------------------------------


class LockstepLoad:
    """Client connections sending one request at a time, each reply checked, until stopped."""

    def __init__(self, port: int, connections: int) -> None:
        self.port = port
        self.ok = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(connections)
        ]
        for t in self._threads:
            t.start()

    def _run(self, index: int) -> None:
        n = index * 1_000_000
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=10) as sock:
                reader = sock.makefile("rb")
                while not self._stop.is_set():
                    n += 1
                    sock.sendall(b"%d\n" % n)
                    line = reader.readline().decode().rstrip("\n")
                    with self._lock:
                        if line == reply_for(n):
                            self.ok += 1
                        else:
                            self.errors.append(f"{n}: {line!r}")
        except OSError as exc:
            with self._lock:
                self.errors.append(f"connection {index}: {exc!r}")

    def wait_for(self, more: int) -> None:
        target = self.ok + more
        wait_until(lambda: self.ok >= target or bool(self.errors), what=f"{more} more replies")

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=20)


ALGORITHMS = ("round_robin", "weighted_round_robin", "least_connections", "random", "power_of_two")


def random_file(
    rng: random.Random, backends: list[int], numbers_port: int, extra_ports: list[int]
) -> dict[str, dict[str, Any]]:
    """A valid file: `numbers` on its port with a random share of the backends, weights and
    algorithm; maybe a second service, by one of two names, in either mode, on one of two ports."""

    def some() -> list[tuple[int, int]]:
        chosen = rng.sample(backends, rng.randint(1, len(backends)))
        return [(p, rng.randint(1, 5)) for p in chosen]

    files = {"numbers": service(numbers_port, some(), algorithm=rng.choice(ALGORITHMS))}
    if rng.random() < 0.7:
        name = rng.choice(["extra", "other"])
        mode = rng.choice(["message", "tcp"])
        files[name] = service(rng.choice(extra_ports), some(), mode=mode)
        if rng.random() < 0.3:  # the second service first
            files = {name: files[name], "numbers": files["numbers"]}
    return files


def matches(status: dict[str, Any], file: dict[str, dict[str, Any]]) -> bool:
    services = status["services"]
    if list(services) != list(file):
        return False
    for name, spec in file.items():
        got = services[name]
        wanted = [(f"127.0.0.1:{p}", w) for p, w in spec["backends"]]
        if got["listen"] != f"127.0.0.1:{spec['listen']}":
            return False
        if got["mode"] != spec.get("mode", "message"):
            return False
        if got["algorithm"] != spec.get("algorithm", "round_robin"):
            return False
        if [(b["address"], b["weight"]) for b in got["backends"]] != wanted:
            return False
    return True


def test_any_sequence_of_reloads_under_load_ends_in_the_last_valid_file(
    tmp_path: Path, services: Services, balancers: Balancers
) -> None:
    seed = int(os.environ.get("RELOAD_SEED", "1729"))
    rng = random.Random(seed)
    backends = [s.port for s in services.start_many(3)]
    numbers_port, busy, *extra_ports = free_ports(4)
    last = {"numbers": service(numbers_port, [(p, 1) for p in backends])}
    cfg = write_config(tmp_path / "b.toml", last)
    bal = balancers.start(cfg)
    load = LockstepLoad(numbers_port, connections=4)
    history: list[str] = []
    try:
        with busy_port(busy) as taken:
            for step in range(15):
                load.wait_for(rng.randint(1, 200))  # a random gap, counted in replies
                kind = rng.choice(["valid", "valid", "valid", "busy", "invalid"])
                via = rng.choice(list(RELOADS))
                candidate = random_file(rng, backends, numbers_port, extra_ports)
                if kind == "busy":
                    candidate["busy"] = service(taken, [(backends[0], 1)])
                if kind == "invalid":
                    cfg.write_text('[services.numbers]\nlisten = "127.0.0.1:\n')
                else:
                    write_config(cfg, candidate)
                accepted, message = RELOADS[via](bal)
                history.append(f"{step} {kind} via {via}: {accepted} {message[:120]}")
                context = f"seed {seed}:\n" + "\n".join(history)
                assert accepted == (kind == "valid"), context
                if accepted:
                    last = candidate
                want = last
                wait_until(
                    lambda: matches(bal.status(), want),  # noqa: B023 (used at once)
                    timeout=10,
                    what=f"/status to show the last valid file ({context})",
                )
                for spec in last.values():
                    assert serves(spec["listen"]), context
        load.wait_for(100)
    finally:
        load.stop()
    assert load.errors == [], f"seed {seed}: {load.errors[:5]}\n" + "\n".join(history)
    assert load.ok > 0
    no_traceback(bal)


# -- stop -----------------------------------------------------------------------------------------


def held_request(bal: BalancerProc, port: int, backend: int) -> LineClient:
    """A client with one request the (never answering) backend holds."""
    c = LineClient(port, timeout=30)
    c.send("1")
    wait_until(
        lambda: backend_rows(bal.status())[f"127.0.0.1:{backend}"]["in_flight"] == 1,
        what="the request in flight",
    )
    return c


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_cuts_what_drain_timeout_leaves_with_an_error_line(
    tmp_path: Path, services: Services, balancers: Balancers, sig: signal.Signals
) -> None:
    silent = services.start("--delay", "60")
    port = free_port()
    cfg = write_config(
        tmp_path / "b.toml",
        {"numbers": service(port, [silent.port], health=NO_CHECKS)},
        drain_timeout=1,
    )
    bal = balancers.start(cfg)
    c = held_request(bal, port, silent.port)
    bal.signal(sig)
    assert c.read_line() == STOPPING
    assert c.read_until_closed() == b""
    assert bal.wait(timeout=20) == 0  # long before the backend's 60 s
    out = bal.output()
    assert "drain_timeout (1s) reached; cut 1 client connection(s) with 1 request(s)" in out
    assert "connection closed by backend" not in out
    assert "is DOWN" not in out
    assert "balancer stopped" in out
    no_traceback(bal)


def test_sigint_drains_in_flight_requests_like_sigterm(
    tmp_path: Path, services: Services, balancers: Balancers
) -> None:
    slow = services.start("--delay", "0.5")
    port = free_port()
    cfg = write_config(tmp_path / "b.toml", {"numbers": service(port, [slow.port])})
    bal = balancers.start(cfg)
    c = LineClient(port)
    c.send("1", "2")
    wait_until(
        lambda: backend_rows(bal.status())[f"127.0.0.1:{slow.port}"]["in_flight"] == 2,
        what="requests in flight",
    )
    bal.signal(signal.SIGINT)
    assert [c.read_line(), c.read_line()] == [reply_for(1), reply_for(2)]
    assert c.read_until_closed() == b""
    assert bal.wait(timeout=20) == 0
    assert "cut" not in bal.output()
    assert refuses(port)


def test_a_second_signal_stops_at_once(
    tmp_path: Path, services: Services, balancers: Balancers
) -> None:
    silent = services.start("--delay", "60")
    port = free_port()
    cfg = write_config(
        tmp_path / "b.toml",
        {"numbers": service(port, [silent.port], health=NO_CHECKS)},
        drain_timeout=60,
    )
    bal = balancers.start(cfg)
    c = held_request(bal, port, silent.port)
    bal.signal(signal.SIGTERM)
    wait_until(lambda: refuses(port), what="the first signal to close the listener")
    bal.signal(signal.SIGINT)
    assert c.read_line() == STOPPING
    assert bal.wait(timeout=20) == 0  # long before drain_timeout
    out = bal.output()
    assert "a second stop signal; cut 1 client connection(s) with 1 request(s)" in out
    assert "is DOWN" not in out
    no_traceback(bal)


def test_sigint_during_a_long_start_up_with_many_backends_exits_cleanly(tmp_path: Path) -> None:
    with socket.socket() as silent:  # accepts connections (backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        closed = [f'"127.1.{i // 250}.{i % 250 + 1}:9"' for i in range(2000)]
        cfg = tmp_path / "many.toml"
        cfg.write_text(
            '[services.many]\nlisten = "127.0.0.1:0"\n'
            f'backends = ["127.0.0.1:{silent.getsockname()[1]}", {", ".join(closed)}]\n'
            "[services.many.health]\ntimeout = 60\ninterval = 5\n"
        )
        bal = Proc([PYTHON, "-m", "balancer", "serve", str(cfg), "--admin", "off"])
        try:
            bal.wait_for("balancer starting")
            bal.signal(signal.SIGINT)
            assert bal.wait(timeout=20) == 0  # long before the 60 s health check timeout
        finally:
            bal.stop(signal.SIGKILL)
    out = bal.output()
    assert "stop requested during start-up" in out
    assert "balancer ready" not in out
    assert "balancer stopped" in out
    no_traceback(bal)
