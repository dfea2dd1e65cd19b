"""No silent skips: under ./scripts/test a skip fails, and a missing peer names its package."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests import peers
from tests.support import ROOT

SKIPPING = """\
import pytest

def test_skips_when_called():
    pytest.skip("redis-server is not installed")

@pytest.mark.skipif(True, reason="needs /usr/bin/chromium")
def test_skipped_by_a_mark():
    pass

def test_passes():
    pass
"""

SKIPPING_MODULE = """\
import pytest

pytest.importorskip("no_such_module_for_balancer_tests")

def test_never_collected():
    pass
"""


def run_pytest(tmp_path: Path, strict: str | None) -> subprocess.CompletedProcess[str]:
    """pytest over two skipping modules, with this suite's conftest hooks."""
    (tmp_path / "conftest.py").write_text(
        "from tests.conftest import pytest_make_collect_report, pytest_runtest_makereport\n"
    )
    (tmp_path / "test_skipping.py").write_text(SKIPPING)
    (tmp_path / "test_skipping_module.py").write_text(SKIPPING_MODULE)
    (tmp_path / "pytest.ini").write_text(
        "[pytest]\nasyncio_default_fixture_loop_scope = function\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "BALANCER_STRICT"}
    env["PYTHONPATH"] = str(ROOT)
    if strict is not None:
        env["BALANCER_STRICT"] = strict
    return subprocess.run(
        [
            *(sys.executable, "-m", "pytest", "-q", "-ra", "-p", "no:cacheprovider"),
            *("--continue-on-collection-errors", str(tmp_path)),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def summary(result: subprocess.CompletedProcess[str]) -> str:
    return result.stdout.strip().splitlines()[-1]


def test_under_the_test_script_every_kind_of_skip_fails_with_its_reason(tmp_path: Path) -> None:
    result = run_pytest(tmp_path, "1")
    assert result.returncode == 1, result.stdout
    assert re.search(r"\b1 failed, 1 passed, 2 errors\b", summary(result)), result.stdout
    assert "skipped" not in summary(result)
    out = result.stdout
    assert "allows no skip: redis-server is not installed" in out
    assert "allows no skip: needs /usr/bin/chromium" in out
    assert "allows no skip: could not import 'no_such_module_for_balancer_tests'" in out


def test_outside_the_test_script_a_skip_is_a_skip(tmp_path: Path) -> None:
    result = run_pytest(tmp_path, "0")
    assert result.returncode == 0, result.stdout
    assert re.search(r"\b1 passed, 3 skipped\b", summary(result)), result.stdout


def test_the_test_script_runs_pytest_strict() -> None:
    script = (ROOT / "scripts" / "test").read_text()
    assert re.search(r"^export BALANCER_STRICT=1$", script, re.M)
    assert script.index("export BALANCER_STRICT=1") < script.index('exec "$VENV/bin/pytest"')


def test_a_missing_peer_fails_naming_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda binary: None)
    with pytest.raises(pytest.fail.Exception, match=r"apt-get install redis-tools\b"):
        peers.need("redis-benchmark", dirs=())
    with pytest.raises(pytest.fail.Exception, match=r"apt-get install nginx-light\b"):
        peers.need("nginx", dirs=())


def test_a_present_peer_is_found_outside_the_path(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "haproxy").write_text("")
    monkeypatch.setattr(shutil, "which", lambda binary: None)
    assert peers.need("haproxy", dirs=(str(tmp_path),)) == str(tmp_path / "haproxy")


def test_the_package_names_are_the_ones_the_test_script_installs() -> None:
    env_sh = (ROOT / "scripts" / "env.sh").read_text()

    def array(name: str) -> list[str]:
        match = re.search(rf"^{name}=\(([^)]*)\)", env_sh, re.M)
        assert match, name
        return match.group(1).split()

    installed = dict(zip(array("PEER_BINARIES"), array("PEER_PACKAGES"), strict=True))
    assert {b: p for b, p in peers.PACKAGES.items() if b in installed} == installed
    assert set(peers.PACKAGES.values()) <= set(installed.values())
