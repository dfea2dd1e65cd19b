"""How an accepted connection is told to be one of our own backend connections, or not."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from types import SimpleNamespace

import pytest

from balancer.config.hosts import address_of
from balancer.config.model import BackendConfig, HealthConfig, ServiceConfig
from balancer.core.pool import BackendPool
from balancer.net import loopguard

HOST = "127.0.0.1"


def owner() -> loopguard.Owner:
    config = ServiceConfig(
        name="svc",
        listen_host=HOST,
        listen_port=0,
        backends=(BackendConfig(HOST, 1),),
        mode="tcp",
        health=HealthConfig(enabled=False),
    )
    pool = BackendPool(config)
    return pool, pool.backends[0]


def origin(suspect: bool = False) -> loopguard.Origin:
    opener: loopguard.Origin = SimpleNamespace(loop_suspect=suspect)
    return opener


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """A real connection on loopback: (the connecting socket, the accepted one)."""
    with socket.socket() as listener:
        listener.bind((HOST, 0))
        listener.listen()
        client = socket.create_connection(listener.getsockname())
        accepted, _ = listener.accept()
        with client, accepted:
            yield client, accepted


def test_nothing_registered_is_no_suspect(pair: tuple[socket.socket, socket.socket]) -> None:
    _, accepted = pair
    assert loopguard.check(accepted.getpeername(), accepted.getsockname()) is None


def test_our_own_connection_seen_from_the_other_end_is_a_loop(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    client, accepted = pair
    who = owner()
    opener = origin()
    registration = loopguard.Registration(client.getsockname(), client.getpeername(), who, opener)
    try:
        found = loopguard.check(accepted.getpeername(), accepted.getsockname())
        assert isinstance(found, loopguard.Loop)
        assert found.owner == who
        assert found.origin is opener
    finally:
        registration.release()
    assert loopguard.check(accepted.getpeername(), accepted.getsockname()) is None
    assert loopguard.open_count() == 0


def test_another_socket_with_our_local_address_is_only_a_suspect(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """Our connection from the same local address goes elsewhere: the kernel has a socket
    with the peer's exact addresses, and it is not ours."""
    client, accepted = pair
    registration = loopguard.Registration(
        client.getsockname(), (HOST, 9), owner(), origin(suspect=True)
    )
    try:
        assert loopguard.check(accepted.getpeername(), accepted.getsockname()) == loopguard.SUSPECT
    finally:
        registration.release()


@pytest.mark.parametrize(("opener_suspect", "verdict"), [(False, "suspect"), (True, "loop")])
def test_translated_connection_is_a_loop_at_its_second_link(
    pair: tuple[socket.socket, socket.socket],
    monkeypatch: pytest.MonkeyPatch,
    opener_suspect: bool,
    verdict: str,
) -> None:
    """No socket has the peer's addresses (address translation, or a client already gone):
    a loop only when our connection from there was itself opened for a suspect."""
    client, accepted = pair
    monkeypatch.setattr(loopguard, "counterpart_exists", lambda local, remote: False)
    registration = loopguard.Registration(
        client.getsockname(), (HOST, 9), owner(), origin(suspect=opener_suspect)
    )
    try:
        found = loopguard.check(accepted.getpeername(), accepted.getsockname())
    finally:
        registration.release()
    assert ("loop" if isinstance(found, loopguard.Loop) else found) == verdict


def test_counterpart_exists_asks_the_kernel(pair: tuple[socket.socket, socket.socket]) -> None:
    client, _ = pair
    here = address_of(client.getsockname())
    there = address_of(client.getpeername())
    assert here is not None
    assert there is not None
    assert loopguard.counterpart_exists(here, there) is True
    assert loopguard.counterpart_exists(there, here) is True  # the accepted end
    assert loopguard.counterpart_exists(here, (HOST, 9)) is False


def test_release_keeps_a_newer_registration_of_the_same_address() -> None:
    first = loopguard.Registration((HOST, 40000), (HOST, 1), owner(), origin())
    second = loopguard.Registration((HOST, 40000), (HOST, 2), owner(), origin())
    first.release()
    first.release()
    assert loopguard.open_count() == 1
    second.release()
    assert loopguard.open_count() == 0


def test_listeners_of_the_process() -> None:
    loopguard.listening((HOST, 7001))
    loopguard.listening(("0.0.0.0", 7002))
    try:
        assert loopguard.is_listener((HOST, 7001))
        assert loopguard.is_listener(("::ffff:127.0.0.1", 7001, 0, 0))
        assert not loopguard.is_listener((HOST, 7003))
        assert loopguard.is_listener((HOST, 7002)), "a wildcard listener takes loopback"
        assert not loopguard.is_listener(("192.0.2.1", 7002)), "not an address of this host"
    finally:
        loopguard.not_listening((HOST, 7001))
        loopguard.not_listening(("0.0.0.0", 7002))
    assert not loopguard.is_listener((HOST, 7001))
