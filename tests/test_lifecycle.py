"""Start-up, reload and stop of the server: the pure plans, listener handover, in process.

The plans (`balancer.core.lifecycle`) are checked without I/O; listener handover and the
server's start-up, reload and stop run in this process on real loopback sockets.
End-to-end paths (signals, the admin API, a load client) are in `tests/test_reload.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from typing import cast

import pytest
import uvloop

from balancer.admin.checks import http_status
from balancer.config.model import AdminConfig, BackendConfig, Config, HealthConfig, ServiceConfig
from balancer.core.lifecycle import DrainCut, plan_backends, plan_reload
from balancer.errors import Conflict, InvalidInput
from balancer.net import resources
from balancer.net.loops import ListenerBatch, create_listener, listening_socket
from balancer.runtime.server import Server
from tests.support import Numbers, ask, free_ports, reply_for

# -- the plans ----------------------------------------------------------------------------------


def svc(name: str, port: int, *backends: int, mode: str = "message", **kw: object) -> ServiceConfig:
    return ServiceConfig(
        name=name,
        listen_host="127.0.0.1",
        listen_port=port,
        backends=tuple(BackendConfig("127.0.0.1", p) for p in backends),
        mode=mode,
        **kw,  # type: ignore[arg-type]
    )


def config(*services: ServiceConfig, **kw: object) -> Config:
    return Config(services=services, admin=AdminConfig(enabled=False), **kw)  # type: ignore[arg-type]


def test_plan_reload_sorts_services_into_start_retire_replace_and_update() -> None:
    running = {
        "kept": svc("kept", 8000, 1),
        "moved": svc("moved", 8001, 1),
        "remoded": svc("remoded", 8002, 1),
        "gone": svc("gone", 8003, 1),
    }
    new = config(
        svc("fresh", 8010, 1),
        svc("remoded", 8002, 1, mode="tcp"),
        svc("kept", 8000, 2),
        svc("moved", 8011, 1),
    )
    plan = plan_reload(running, new)
    assert [s.name for s in plan.start] == ["fresh"]
    assert [s.name for s in plan.replace] == ["remoded", "moved"]
    assert [s.name for s in plan.update] == ["kept"]
    assert plan.retire == ("gone",)
    assert plan.order == ("fresh", "remoded", "kept", "moved")
    assert [s.name for s in plan.listeners] == ["fresh", "remoded", "moved"]
    # a mode change keeps the address: the new listener takes the old one's socket over
    assert plan.takeover == {"remoded": "remoded"}


def test_plan_reload_hands_a_released_address_to_the_service_that_takes_it() -> None:
    running = {"a": svc("a", 8000), "b": svc("b", 8001), "old": svc("old", 8002)}
    swapped = config(svc("a", 8001), svc("b", 8000), svc("renamed", 8002))
    plan = plan_reload(running, swapped)
    assert plan.takeover == {"a": "b", "b": "a", "renamed": "old"}
    assert plan.retire == ("old",)
    # port 0 is never the same address twice
    zero = plan_reload({"z": svc("z", 0)}, config(svc("z", 0, mode="tcp")))
    assert zero.takeover == {}


def test_plan_reload_of_the_same_file_changes_nothing() -> None:
    services = (svc("a", 8000, 1, 2), svc("b", 0, 3))
    plan = plan_reload({s.name: s for s in services}, config(*services))
    assert plan.empty
    assert [s.name for s in plan.update] == ["a", "b"]


def test_plan_backends_adds_removes_rescues_and_takes_the_files_weights() -> None:
    wanted = (
        BackendConfig("h", 1, weight=1),
        BackendConfig("h", 2, weight=3),
        BackendConfig("h", 4, weight=1),
        BackendConfig("h", 5, weight=1),
    )
    running = [("h:1", 1), ("h:2", 5), ("h:3", 1), ("h:4", 1), ("h:6", 1)]
    changes = plan_backends(running, leaving={"h:4", "h:6"}, wanted=wanted)
    assert changes.add == (BackendConfig("h", 5, weight=1),)
    assert changes.remove == ("h:3",)  # h:6 is leaving already
    assert changes.rescue == ("h:4",)  # leaving, but the file lists it again
    assert changes.weights == (("h:2", 5, 3),)  # set through the API; the file wins
    assert changes.configs == wanted
    assert plan_backends([("h:1", 1)], (), (BackendConfig("h", 1),)).empty


def test_drain_cuts_add_up_and_nothing_cut_is_false() -> None:
    assert not DrainCut()
    assert DrainCut(1, 2) + DrainCut(0, 3) == DrainCut(1, 5)


# -- listeners switched together ----------------------------------------------------------------

LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}


class Tag(asyncio.Protocol):
    """Answers every connection with its tag, then closes."""

    def __init__(self, tag: bytes) -> None:
        self.tag = tag

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        writer = cast(asyncio.Transport, transport)  # uvloop's is no asyncio.Transport subclass
        writer.write(self.tag)
        writer.close()


async def read_tag(address: tuple[str, int]) -> bytes:
    reader, writer = await asyncio.open_connection(*address)
    try:
        return await reader.read()
    finally:
        writer.close()


@pytest.mark.parametrize("loop_name", list(LOOPS))
def test_a_listener_taking_over_a_running_one_loses_no_connection(loop_name: str) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        old = await create_listener(loop, lambda: Tag(b"old"), "127.0.0.1", 0, 64)
        bound = old.sockets[0].getsockname()[:2]
        assert await read_tag(bound) == b"old"
        batch = ListenerBatch()
        sock = listening_socket(bound)
        assert sock is not None
        batch.hand_over(("127.0.0.1", 1), sock)
        with batch.binding():
            new = await create_listener(loop, lambda: Tag(b"new"), "127.0.0.1", 1, 64)
        assert new.sockets[0].getsockname()[:2] == bound
        assert await read_tag(bound) == b"old"  # bound, not accepting yet
        old.close()
        # a client connecting between the old listener's close and the switch waits
        waiting = asyncio.create_task(read_tag(bound))
        await asyncio.sleep(0)
        await batch.serve()
        assert await waiting == b"new"
        assert await read_tag(bound) == b"new"
        new.close()
        with pytest.raises(ConnectionRefusedError):
            await read_tag(bound)

    with asyncio.Runner(loop_factory=LOOPS[loop_name]) as runner:
        runner.run(main())


@pytest.mark.parametrize("loop_name", list(LOOPS))
def test_a_batch_closed_before_serving_leaves_its_ports_free(loop_name: str) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        batch = ListenerBatch()
        with batch.binding():
            await create_listener(loop, lambda: Tag(b"x"), "127.0.0.1", port, 64)
        batch.close()
        with socket.socket() as again:  # the port is free again at once
            again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            again.bind(("127.0.0.1", port))

    with asyncio.Runner(loop_factory=LOOPS[loop_name]) as runner:
        runner.run(main())


# -- the server in process -----------------------------------------------------------------------


@contextlib.asynccontextmanager
async def backend_ports(count: int) -> AsyncIterator[list[int]]:
    loop = asyncio.get_running_loop()
    servers = [await loop.create_server(Numbers, "127.0.0.1", 0) for _ in range(count)]
    try:
        yield [int(s.sockets[0].getsockname()[1]) for s in servers]
    finally:
        for s in servers:
            s.close()


@contextlib.contextmanager
def busy_port(port: int) -> Iterator[int]:
    """`port`, listened on by another program meanwhile."""
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", port))
        blocker.listen()
        yield port


async def refused(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except ConnectionRefusedError:
        return True
    writer.close()
    return False


NO_CHECKS = HealthConfig(enabled=False)


class Files:
    """What `reload()` reads: the test sets `current` (a Config, or an exception to raise)."""

    def __init__(self, first: Config) -> None:
        self.current: Config | Exception = first

    def read(self) -> Config:
        if isinstance(self.current, Exception):
            raise self.current
        return self.current


async def test_a_reload_to_a_busy_port_is_rejected_whole_and_changes_nothing() -> None:
    async with backend_ports(1) as (b,):
        port, extra, busy = free_ports(3)
        first = config(svc("numbers", port, b, health=NO_CHECKS))
        files = Files(first)
        server = Server(first, files.read)
        await server.start()
        try:
            assert await ask(port, "1") == reply_for(1)
            with busy_port(busy) as taken:
                files.current = config(
                    svc("fresh", extra, b, health=NO_CHECKS),
                    svc("numbers", taken, b, health=NO_CHECKS),
                )
                with pytest.raises(Conflict) as err:
                    await server.reload()
                assert http_status(err.value) == 409
                assert f"cannot listen on 127.0.0.1:{taken}" in str(err.value)
                assert "in use" in str(err.value)
                assert list(server.services) == ["numbers"]
                assert server.services["numbers"].bound == ("127.0.0.1", port)
                assert await ask(port, "2") == reply_for(2)
                assert await refused(extra)  # the new service bound first was let go
            files.current = first
            await server.reload()
            assert await ask(port, "3") == reply_for(3)
        finally:
            await server.shutdown()


async def test_stop_during_a_slow_start_up_ends_it_and_serves_nothing() -> None:
    # a backend that accepts and never answers: the first health check waits its timeout
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        silent.setblocking(False)
        (port,) = free_ports(1)
        slow = svc("numbers", port, silent.getsockname()[1], health=HealthConfig(timeout=60))
        server = Server(config(slow))
        fds = resources.FDS
        run = asyncio.create_task(server.run())
        async with asyncio.timeout(10):
            while True:  # until the first health check has connected: start-up is under way
                try:
                    check, _ = silent.accept()
                except BlockingIOError:
                    await asyncio.sleep(0.01)
                else:
                    break
            server.request_stop()
            assert await run == 0
        check.close()
        assert server.services == {}
        assert await refused(port)
        assert resources.FDS is fds  # the process-wide budget is given back


async def test_the_last_file_wins_over_a_removal_still_draining() -> None:
    async with backend_ports(2) as (a, b):
        (port,) = free_ports(1)
        both = config(svc("numbers", port, a, b, health=NO_CHECKS))
        files = Files(both)
        server = Server(both, files.read)
        await server.start()
        try:
            runtime = server.services["numbers"]
            held = runtime.pool.get(f"127.0.0.1:{a}")
            assert held is not None
            held.in_flight += 1  # a request it still holds: its removal has to wait
            files.current = config(svc("numbers", port, b, health=NO_CHECKS))
            await server.reload()
            assert f"127.0.0.1:{a}" in runtime.removals
            files.current = both
            await server.reload()
            assert not runtime.removals  # called off, not merely outlived
            held.in_flight -= 1
            assert [x.address for x in runtime.pool] == [f"127.0.0.1:{a}", f"127.0.0.1:{b}"]
            assert runtime.pool.get(f"127.0.0.1:{a}") is held
            assert held.admin_state == "ready"
            served = held.requests
            for i in range(4):
                assert await ask(port, str(i)) == reply_for(i)
            assert held.requests == served + 2  # back in the rotation
        finally:
            await server.shutdown()


async def test_a_reload_applies_files_one_after_the_other() -> None:
    async with backend_ports(3) as ports:
        (port,) = free_ports(1)
        files = [config(svc("numbers", port, *ports[:n], health=NO_CHECKS)) for n in (1, 2, 3)]
        reader = iter(files)
        server = Server(files[0], lambda: next(reader))
        await server.start()
        try:
            # three reloads at once: serialized, the last one read is the state
            await asyncio.gather(server.reload(), server.reload(), server.reload())
            addresses = [b.address for b in server.services["numbers"].pool]
            assert addresses == [f"127.0.0.1:{p}" for p in ports]
        finally:
            await server.shutdown()


async def test_a_backend_that_is_the_balancer_itself_is_refused() -> None:
    async with backend_ports(1) as (b,):
        first = config(svc("numbers", 0, b, health=NO_CHECKS))
        files = Files(first)
        server = Server(first, files.read)
        await server.start()
        try:
            host, port = server.services["numbers"].bound
            assert server.listen_addresses() == [(host, port)]
            with pytest.raises(InvalidInput) as err:
                server.add_backend("numbers", BackendConfig("127.0.0.1", port))
            assert http_status(err.value) == 400
            assert "this balancer itself" in str(err.value)
            with pytest.raises(InvalidInput) as err:
                await server.check_backend_address("localhost", port)
            assert http_status(err.value) == 400
            await server.check_backend_address("localhost", b)  # another port: fine
            files.current = config(svc("numbers", 0, b, port, health=NO_CHECKS))
            with pytest.raises(InvalidInput) as err:
                await server.reload()
            assert http_status(err.value) == 400
            assert f"127.0.0.1:{port}" in str(err.value)
            assert [x.address for x in server.services["numbers"].pool] == [f"127.0.0.1:{b}"]
        finally:
            await server.shutdown()


async def test_a_file_replacing_every_backend_leaves_no_gap() -> None:
    async with backend_ports(2) as (a, b):
        (port,) = free_ports(1)
        checks = HealthConfig(interval=60, timeout=2, rise=3, fall=3)
        first = config(svc("numbers", port, a, health=checks))
        files = Files(first)
        server = Server(first, files.read)
        await server.start()
        try:
            files.current = config(svc("numbers", port, b, health=checks))
            await server.reload()
            # checked once before the switch, as at start-up: serving at once
            (joined,) = server.services["numbers"].pool
            assert joined.address == f"127.0.0.1:{b}"
            assert joined.state == "up"
            assert await ask(port, "7") == reply_for(7)
        finally:
            await server.shutdown()


async def test_reload_adds_and_removes_whole_services() -> None:
    async with backend_ports(1) as (b,):
        port, extra = free_ports(2)
        first = config(svc("numbers", port, b, health=NO_CHECKS))
        with_extra = dataclasses.replace(
            first, services=(*first.services, svc("extra", extra, b, mode="tcp", health=NO_CHECKS))
        )
        files = Files(with_extra)
        server = Server(first, files.read)
        await server.start()
        try:
            await server.reload()
            assert list(server.services) == ["numbers", "extra"]
            assert await ask(extra, "4") == reply_for(4)
            files.current = first
            await server.reload()
            assert list(server.services) == ["numbers"]
            assert await refused(extra)
            assert await ask(port, "5") == reply_for(5)
        finally:
            await server.shutdown()


async def test_a_takeover_after_a_rejected_one_still_finds_the_running_listener() -> None:
    async with backend_ports(1) as (b,):
        port, extra, busy = free_ports(3)
        numbers = svc("numbers", port, b, health=NO_CHECKS)
        first = config(numbers, svc("extra", extra, b, health=NO_CHECKS))
        to_tcp = config(numbers, svc("extra", extra, b, mode="tcp", health=NO_CHECKS))
        files = Files(first)
        server = Server(first, files.read)
        await server.start()
        try:
            with busy_port(busy) as taken:
                files.current = dataclasses.replace(
                    to_tcp, services=(*to_tcp.services, svc("busy", taken, b, health=NO_CHECKS))
                )
                with pytest.raises(Conflict):
                    await server.reload()
            assert server.services["extra"].config.mode == "message"
            assert await ask(extra, "8") == reply_for(8)
            files.current = to_tcp
            await server.reload()
            assert server.services["extra"].config.mode == "tcp"
            assert await ask(extra, "9") == reply_for(9)
        finally:
            await server.shutdown()


async def test_a_reload_during_start_up_waits_for_the_start() -> None:
    async with backend_ports(1) as (b,):
        with socket.socket() as silent:  # its first check waits for the check timeout
            silent.bind(("127.0.0.1", 0))
            silent.listen()
            silent.setblocking(False)
            (port,) = free_ports(1)
            checks = HealthConfig(timeout=0.5, interval=60)
            first = config(svc("numbers", port, b, silent.getsockname()[1], health=checks))
            server = Server(first, Files(first).read)
            start = asyncio.create_task(server.start())
            try:
                async with asyncio.timeout(10):
                    while True:  # until the first health check connected: start-up under way
                        try:
                            check, _ = silent.accept()
                        except BlockingIOError:
                            await asyncio.sleep(0.01)
                        else:
                            break
                    reload = asyncio.create_task(server.reload())
                    await start
                    await reload
                check.close()
                assert server.services["numbers"].bound == ("127.0.0.1", port)
                assert await ask(port, "6") == reply_for(6)
            finally:
                await server.shutdown()


async def test_a_background_step_that_fails_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    async with backend_ports(1) as (b,):
        port, extra = free_ports(2)
        numbers = svc("numbers", port, b, health=NO_CHECKS)
        files = Files(config(numbers, svc("extra", extra, b, health=NO_CHECKS)))
        server = Server(files.read(), files.read)
        await server.start()
        try:
            retired = server.services["extra"]

            async def broken(timeout: float) -> None:
                raise RuntimeError("drain broke")

            retired.proxy.drain = broken  # type: ignore[method-assign]
            files.current = config(numbers)
            await server.reload()
            async with asyncio.timeout(5):
                while "retire extra failed: RuntimeError('drain broke')" not in caplog.text:  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
        finally:
            await server.shutdown()


async def test_a_stop_logs_the_tcp_connections_it_cut(caplog: pytest.LogCaptureFixture) -> None:
    loop = asyncio.get_running_loop()
    silent = await loop.create_server(asyncio.Protocol, "127.0.0.1", 0)  # never answers
    try:
        (port,) = free_ports(1)
        relay = svc("relay", port, silent.sockets[0].getsockname()[1], mode="tcp")
        server = Server(config(dataclasses.replace(relay, health=NO_CHECKS), drain_timeout=0.2))
        run = asyncio.create_task(server.run())
        async with asyncio.timeout(10):
            while True:  # until the relay listens
                try:
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                except ConnectionRefusedError:
                    await asyncio.sleep(0.01)
                else:
                    break
            writer.write(b"PING\r\n")
            while server.services["relay"].proxy.client_connections == 0:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
            server.request_stop()
            assert await run == 0
            with contextlib.suppress(ConnectionResetError):  # closed (or reset) by the stop
                assert await reader.read() == b""
        writer.close()
        assert "drain_timeout (0.2s) reached; cut 1 client connection(s)" in caplog.text
    finally:
        silent.close()


async def test_the_stop_summary_sums_up_a_service_with_many_backends(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """One line per backend for a few; one line for the service when there are many (a
    stop of 100,000 backends used to log 100,000 lines)."""
    from balancer.runtime.server import SUMMARY_BACKENDS

    (port, few_port) = free_ports(2)
    many = svc("many", port, *range(20000, 20001 + SUMMARY_BACKENDS), health=NO_CHECKS)
    few = svc("few", few_port, 20000, 20001, health=NO_CHECKS)
    server = Server(config(many, few))
    await server.start()
    try:
        caplog.clear()
        with caplog.at_level("INFO", logger="balancer"):
            server.log_summary()
        lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("summary:")]
        assert lines[0] == (
            f"summary: service many: {SUMMARY_BACKENDS + 1} backends "
            f"({SUMMARY_BACKENDS + 1} up), 0 requests, 0 failures, 0 connect failures"
        )
        assert lines[1:] == [
            f"summary: service few backend 127.0.0.1:{p}: up, 0 requests, 0 failures, "
            "0 connect failures"
            for p in (20000, 20001)
        ]
    finally:
        await server.shutdown()
