"""Slow start: a backend that comes back up takes a growing share over `slow_start` seconds."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest

import balancer.core.pool
from balancer.config.model import BackendConfig, ServiceConfig
from balancer.core.pool import Backend, BackendPool
from tests.support import (
    BalancerProc,
    LineClient,
    Services,
    backend_requests,
    backend_rows,
    reply_for,
    start_balancer,
    wait_until,
)


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    """`time.monotonic` as balancer.core.pool sees it, set by the test."""
    fake = FakeClock(100.0)
    monkeypatch.setattr(balancer.core.pool, "time", SimpleNamespace(monotonic=fake))
    return fake


def service(slow_start: float, *weights: int) -> ServiceConfig:
    return ServiceConfig(
        name="numbers",
        listen_host="127.0.0.1",
        listen_port=0,
        backends=tuple(BackendConfig("127.0.0.1", 9000 + i, w) for i, w in enumerate(weights)),
        algorithm="weighted_round_robin",
        slow_start=slow_start,
    )


def test_effective_weight_ramps_linearly_after_coming_up(clock: FakeClock) -> None:
    pool = BackendPool(service(10.0, 4))
    backend = pool.backends[0]
    assert backend.effective_weight == 4.0  # up from the start: no ramp
    pool.mark_down(backend, "test")
    pool.mark_up(backend, "test")
    assert backend.up_since == 100.0
    assert backend.effective_weight == pytest.approx(0.04)  # floor: 1% of the weight
    for elapsed in (0.5, 1.0, 2.5, 5.0, 7.5, 9.9):
        clock.now = 100.0 + elapsed
        assert backend.effective_weight == pytest.approx(4.0 * elapsed / 10.0), elapsed
    for elapsed in (10.0, 10.5, 1000.0):
        clock.now = 100.0 + elapsed
        assert backend.effective_weight == 4.0
    assert backend.weight == 4  # the configured weight is never touched


def test_ramp_restarts_at_every_recovery(clock: FakeClock) -> None:
    pool = BackendPool(service(2.0, 1))
    backend = pool.backends[0]
    pool.mark_down(backend, "test")
    pool.mark_up(backend, "test")
    clock.now = 101.0
    assert backend.effective_weight == pytest.approx(0.5)
    pool.mark_down(backend, "test")
    assert backend.up_since is None
    clock.now = 150.0
    pool.mark_up(backend, "test")
    clock.now = 150.5
    assert backend.effective_weight == pytest.approx(0.25)


def test_no_slow_start_and_zero_weight_are_not_ramped(clock: FakeClock) -> None:
    off = Backend(BackendConfig("127.0.0.1", 9000, 3), slow_start=0.0)
    off.up_since = clock.now
    assert off.effective_weight == 3.0
    drained = Backend(BackendConfig("127.0.0.1", 9001, 0), slow_start=5.0)
    drained.up_since = clock.now
    clock.now += 1.0
    assert drained.effective_weight == 0.0


def test_weighted_round_robin_follows_the_ramp(clock: FakeClock) -> None:
    pool = BackendPool(service(4.0, 1, 1))
    steady, back = pool.backends
    pool.mark_down(back, "test")
    pool.mark_up(back, "test")
    clock.now = 101.0  # a quarter of the way: weights 1 and 0.25
    picks = [pool.pick() for _ in range(500)]
    assert picks.count(back) == pytest.approx(100, abs=1)
    assert picks.count(steady) == 500 - picks.count(back)
    clock.now = 104.0  # ramp over
    picks = [pool.pick() for _ in range(500)]
    assert picks.count(back) == pytest.approx(250, abs=1)


# -- end to end --------------------------------------------------------------------------------
#
# The ramp itself is tested above on a fake clock. End to end, a ramp far longer than the test
# (LONG_RAMP) keeps the recovered backend's weight under a tenth of the other's however slowly
# the machine runs, so its share right after recovery is small without racing the clock; a
# reload then shortens the ramp, and batches are sent until the share is full (bounded in count).

BATCH = 100
MAX_BATCHES = 300
LONG_RAMP = 600
SHORT_RAMP = 0.5


def write_config(path: Path, ports: list[int], algorithm: str, slow_start: float) -> Path:
    backends = ", ".join(f'"127.0.0.1:{p}"' for p in ports)
    health = {"interval": 0.1, "timeout": 1, "rise": 1, "fall": 1}
    path.write_text(
        "[services.numbers]\n"
        'listen = "127.0.0.1:0"\n'
        f"algorithm = {json.dumps(algorithm)}\n"
        f"slow_start = {slow_start}\n"
        f"backends = [{backends}]\n"
        "[services.numbers.health]\n"
        + "".join(f"{k} = {json.dumps(v)}\n" for k, v in health.items())
    )
    return path


def state_of(bal: BalancerProc, address: str) -> str:
    return str(backend_rows(bal.status())[address]["state"])


def requests_of(bal: BalancerProc, address: str) -> int:
    return backend_requests(bal.status())[address]


@pytest.mark.e2e
@pytest.mark.parametrize("algorithm", ["weighted_round_robin", "least_connections"])
def test_a_recovered_backend_gets_a_small_share_first_and_its_full_share_later(
    tmp_path: Path, services: Services, algorithm: str
) -> None:
    services.start_many(2)
    back = services[1]
    back_address = f"127.0.0.1:{back.port}"
    ports = services.ports
    cfg = write_config(tmp_path / "b.toml", ports, algorithm, LONG_RAMP)
    bal = start_balancer(cfg)
    try:
        c = LineClient(bal.port)

        def batch_share() -> float:
            """The recovering backend's share of BATCH lockstep requests."""
            before = requests_of(bal, back_address)
            for i in range(BATCH):
                assert c.request(str(i)) == reply_for(i)
            return (requests_of(bal, back_address) - before) / BATCH

        assert batch_share() == 0.5  # up from the start: full share at once
        back.stop(signal.SIGKILL)
        wait_until(lambda: state_of(bal, back_address) == "down", what="backend down")
        assert batch_share() == 0.0
        services.start(port=back.port)
        wait_until(lambda: state_of(bal, back_address) == "up", what="backend up again")
        # weight at most 1/10 of the other's for the first minute of a 10-minute ramp
        early = [batch_share() for _ in range(3)]
        assert all(share <= 0.2 for share in early), early
        write_config(cfg, ports, algorithm, SHORT_RAMP)
        bal.signal(signal.SIGHUP)
        bal.wait_for("reload done")
        shares = [batch_share()]
        while shares[-1] < 0.45 and len(shares) < MAX_BATCHES:
            shares.append(batch_share())
        assert shares[-1] >= 0.45, shares  # the ramp ended: the full share again
        c.close()
    finally:
        bal.stop()
