"""The two implementations of the hot path: which one runs, and that they behave alike.

The compiled build (Cython, from the same `.py` sources) and the pure Python one are run
side by side in one process (`tests.implementations`) on the same random input: the line
framer chunk by chunk, and whole message-mode services (clients, fake backends that tag
each reply, resets, early ends), comparing every byte each side wrote.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from balancer import native
from tests.conftest import strict
from tests.implementations import compiled_build, normal_family, pure_family
from tests.support import Services, start_balancer, write_config

CLIENT = (sys.executable, "-m", "balancer", "client", "--json", "--quiet", "--admin", "off")


def run_load(port: int, *args: str) -> dict[str, Any]:
    out = subprocess.run(
        [*CLIENT, "--balancerIp", "127.0.0.1", "--balancerPort", str(port), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    report: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return report


def run_version(env: dict[str, str]) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "balancer", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **env},
        check=True,
    )
    return out.stdout


def test_the_test_run_has_the_implementation_it_asked_for() -> None:
    """Under ./scripts/test the compiled build must be there, unless the run asks for pure
    Python: a failed build cannot pass for a pure run."""
    if native.disabled():
        assert not native.compiled_modules()
        assert native.implementation().startswith("pure Python")
    elif strict():
        assert compiled_build(), native.implementation()
        assert native.implementation().startswith("compiled")


def test_version_names_the_implementation_and_the_switch_turns_it_off() -> None:
    assert (
        "hot path (message and http mode) pure Python (BALANCER_NO_EXTENSIONS is set)"
        in run_version({"BALANCER_NO_EXTENSIONS": "1"})
    )
    normal = run_version({"BALANCER_NO_EXTENSIONS": ""})
    assert normal.startswith("balancer ")
    if compiled_build():
        assert "hot path (message and http mode) compiled" in normal


@pytest.mark.e2e
def test_both_builds_serve_the_same_replies_and_log_which_one_runs(
    tmp_path: Path, services: Services
) -> None:
    """A real balancer process of each build in front of the same sample services: the
    start-up log names the build, and a pipelined load gets every reply right."""
    services.start_many(2)
    backends = ", ".join(f'"127.0.0.1:{p}"' for p in services.ports)
    config = write_config(
        tmp_path, "b.toml", f'[services.numbers]\nlisten = "127.0.0.1:0"\nbackends = [{backends}]\n'
    )
    builds = {"pure Python": {"BALANCER_NO_EXTENSIONS": "1"}}
    if compiled_build():
        builds["compiled"] = {"BALANCER_NO_EXTENSIONS": ""}
    for name, env in builds.items():
        bal = start_balancer(config, admin=False, env=env)
        try:
            assert f"hot path (message and http mode) {name}" in bal.output()
            report = run_load(bal.port, "--client_count", "4", "--pipeline", "8")
        finally:
            bal.stop()
        assert report["ok"] == report["requests"] == 4000, name


def test_pure_family_is_loaded_from_sources_and_the_normal_one_is_kept() -> None:
    pure = pure_family()
    normal = normal_family()
    for name in native.COMPILED:
        assert str(pure[name].__file__).endswith(".py")
        assert pure[name] is not normal[name]
        assert sys.modules[name] is normal[name]
    # each family refers to its own modules
    assert pure["balancer.proxy.message.service"].Dispatcher is (
        pure["balancer.proxy.message.dispatch"].Dispatcher
    )


def test_a_compiled_module_older_than_its_source_is_not_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = tmp_path / "balancer"
    (package / "core").mkdir(parents=True)
    source = package / "core" / "framing.py"
    source.write_text("X = 1\n")
    import importlib.machinery

    built = source.with_name("framing" + importlib.machinery.EXTENSION_SUFFIXES[0])
    built.write_bytes(b"")
    monkeypatch.setattr(native, "PACKAGE_DIR", package)
    os.utime(built, (1_000_000, 1_000_000))
    os.utime(source, (1_000_000 + native.STALE_AFTER / 2, 1_000_000 + native.STALE_AFTER / 2))
    assert not native.stale("balancer.core.framing")  # written together by an install
    assert native.PureFinder(everything=False).find_spec("balancer.core.framing") is None
    os.utime(source, (1_000_100, 1_000_100))  # edited after the build
    assert native.stale("balancer.core.framing")
    spec = native.PureFinder(everything=False).find_spec("balancer.core.framing")
    assert spec is not None
    assert spec.origin == str(source)
    assert native.PureFinder(everything=True).find_spec("balancer.core.pool") is not None
    assert native.PureFinder(everything=True).find_spec("balancer.app") is None


# -- the framer ---------------------------------------------------------------------------

chunks = st.lists(
    st.binary(min_size=1, max_size=40).map(lambda b: b.replace(b"\x00", b"\n")),
    min_size=1,
    max_size=12,
)


def frame_all(module: ModuleType, max_line: int, data: list[bytes]) -> list[Any]:
    framer = module.LineFramer(max_line)
    out: list[Any] = []
    for chunk in data:
        try:
            out.append(("lines", framer.feed(chunk), framer.held, framer.buffered))
        except module.LineTooLong as exc:
            out.append(("too long", exc.lines, exc.limit))
            return out
    out.append(("finish", framer.finish(), framer.held))
    return out


@settings(max_examples=300, deadline=None)
@given(max_line=st.integers(1, 24), data=chunks)
def test_compiled_and_pure_framers_agree(max_line: int, data: list[bytes]) -> None:
    name = "balancer.core.framing"
    assert frame_all(normal_family()[name], max_line, data) == frame_all(
        pure_family()[name], max_line, data
    )


# -- whole services -----------------------------------------------------------------------

payloads = st.sampled_from([b"1", b"22", b"x" * 30, b"", b"a\rb", b"\r", b"7\r"])
actions = st.one_of(
    st.tuples(
        st.just("send"),
        st.integers(0, 2),
        st.lists(payloads, min_size=1, max_size=5),
        st.booleans(),
    ),
    st.tuples(st.just("answer"), st.integers(0, 2), st.integers(1, 4)),
    st.tuples(st.just("turn")),
    st.tuples(st.just("reset"), st.integers(0, 2)),
    st.tuples(st.just("eof"), st.integers(0, 2)),
)


async def transcript(family: dict[str, ModuleType], script: list[tuple[Any, ...]]) -> Any:
    """Run `script` on a service of `family`; everything a user could see of it."""
    doubles = family["tests.message_doubles"]
    service, opened = doubles.make_service(
        3, backend_connections=2, max_line=24, client_framing="line"
    )
    backends = doubles.TaggingBackends(opened)
    sessions = [doubles.client(service, ("127.0.0.1", 100 + i)) for i in range(3)]
    for action in script:
        kind = action[0]
        if kind == "send":
            _, i, lines, terminated = action
            data = b"\n".join(lines) + (b"\n" if terminated else b"")
            if not sessions[i][1].closed:
                sessions[i][0].data_received(data)
        elif kind == "answer":
            backends.answer(9000 + action[1], action[2])
        elif kind == "turn":
            await doubles.turn()
        elif kind == "reset":
            for conn, t in opened[9000 + action[1]]:
                if not t.closed:  # the backend resets the connection
                    t.closed = True
                    conn.connection_lost(ConnectionResetError("reset by peer"))
                    break
        elif kind == "eof" and not sessions[action[1]][1].closed:
            sessions[action[1]][0].eof_received()
    await doubles.answer_all(backends)
    await doubles.settle()
    counters = {
        key: getattr(service, key)
        for key in ("retries", "not_available", "invalid", "too_long", "retries_over_budget")
    }
    served = [(b.port, b.requests, b.in_flight, b.failures) for b in service.pool.backends]
    return [(t.written, t.closed) for _s, t in sessions], counters, served


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(script=st.lists(actions, max_size=25))
def test_compiled_and_pure_services_answer_alike(script: list[tuple[Any, ...]]) -> None:
    normal = asyncio.run(transcript(normal_family(), script))
    pure = asyncio.run(transcript(pure_family(), script))
    assert normal == pure
