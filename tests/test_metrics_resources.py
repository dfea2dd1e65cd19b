"""/metrics shows shortages of the balancer's own resources (no sockets), and the metric
library stays on the admin side."""

from __future__ import annotations

import ast
import errno
import sys
from pathlib import Path

import pytest
from prometheus_client import generate_latest

import balancer
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


SRC = Path(balancer.__file__).resolve().parent


def imported(path: Path) -> set[str]:
    """The top-level names of the modules `path` imports (relative imports aside)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


def test_prometheus_client_is_imported_by_the_admin_side_only() -> None:
    importers = sorted(
        str(p.relative_to(SRC)) for p in SRC.rglob("*.py") if "prometheus_client" in imported(p)
    )
    assert importers, "the admin's collectors use it"
    assert all(name.startswith("admin/") for name in importers), importers


@pytest.mark.parametrize("module", ["core/stats.py", "errors.py"])
def test_the_bottom_modules_import_the_standard_library_only(module: str) -> None:
    names = imported(SRC / module)
    assert names <= set(sys.stdlib_module_names) | {"__future__"}, names
