"""/metrics shows shortages of the balancer's own resources (no sockets)."""

from __future__ import annotations

import errno

import pytest
from prometheus_client import generate_latest

from balancer.admin.metrics import make_registry
from balancer.config.model import Config
from balancer.net import resources
from balancer.runtime.server import Server


def scrape() -> str:
    """/metrics of a server with no services: only the process-wide figures."""
    return generate_latest(make_registry(Server(Config(services=())))).decode()


def test_metrics_count_local_resource_shortages(monkeypatch: pytest.MonkeyPatch) -> None:
    alarm = resources.ResourceAlarm()
    monkeypatch.setattr(resources, "ALARM", alarm)
    monkeypatch.setattr(resources, "FDS", None)
    for code in (errno.EMFILE, errno.EMFILE, errno.ENOBUFS, errno.EADDRNOTAVAIL):
        alarm.note(OSError(code, "short"), "testing")
    text = scrape()
    assert 'balancer_local_resource_errors_total{kind="file_descriptors"} 2.0' in text
    assert 'balancer_local_resource_errors_total{kind="memory"} 1.0' in text
    assert 'balancer_local_resource_errors_total{kind="local_ports"} 1.0' in text
    assert "balancer_fd_limit" not in text  # no budget set: no fd figures

    budget = resources.FdBudget(limit=100, reserve=40)
    monkeypatch.setattr(resources, "FDS", budget)
    for _ in range(61):
        budget.admit()
    text = scrape()
    assert "balancer_fd_limit 100.0" in text
    assert "balancer_fd_reserve 40.0" in text
    assert "balancer_fd_clients 60.0" in text
    assert "balancer_fd_refused_total 1.0" in text
