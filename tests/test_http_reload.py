"""Http mode through reloads of a real `balancer serve`: header rules and routes change on
SIGHUP for the next requests, on the same listener; a reload that fails changes nothing."""

from __future__ import annotations

import json
import signal
import urllib.request
from pathlib import Path

import pytest

from tests.http_e2e_support import CHILD_ENV, echoes
from tests.support import BalancerProc, start_balancer, wait_until

pytestmark = [pytest.mark.e2e]


def write(path: Path, body: str) -> Path:
    path.write_text(body)
    return path


def config(a: str, b: str, env: str, routed: bool, route_to: str = "api") -> str:
    text = (
        f'[services.web]\nlisten = "127.0.0.1:0"\nmode = "http"\nbackends = ["{a}"]\n'
        + (f'routes = [{{ service = "{route_to}", path_prefix = "/api" }}]\n' if routed else "")
        + f'[services.web.http]\nset_headers = {{ "X-Env" = "{env}" }}\n'
        + "[services.web.health]\ninterval = 0.2\n"
    )
    if routed:
        text += (
            f'[services.api]\nlisten = "127.0.0.1:0"\nmode = "http"\nbackends = ["{b}"]\n'
            '[services.api.http]\nstrip_prefix = "/api"\n'
        )
    return text


def seen(bal: BalancerProc, path: str) -> dict[str, object]:
    with urllib.request.urlopen(f"http://127.0.0.1:{bal.ports['web']}{path}", timeout=10) as r:
        doc: dict[str, object] = json.loads(r.read())
        return doc


def env_of(doc: dict[str, object]) -> str:
    headers = {str(k).lower(): str(v) for k, v in doc["headers"]}  # type: ignore[attr-defined]
    return headers.get("x-env", "")


def reload(bal: BalancerProc) -> str:
    """SIGHUP; the log line of its outcome."""
    before = len([line for line in bal.lines if "reload" in line])
    bal.signal(signal.SIGHUP)
    wait_until(
        lambda: any(
            "reload done" in line or "reload rejected" in line
            for line in [line for line in bal.lines if "reload" in line][before:]
        ),
        timeout=20,
        what="the reload's outcome",
    )
    return [line for line in bal.lines if "reload done" in line or "reload rejected" in line][-1]


def test_a_reload_changes_header_rules_and_routes_and_a_bad_one_changes_nothing(
    tmp_path: Path,
) -> None:
    with echoes("a", "b") as (a, b):
        path = write(tmp_path / "web.toml", config(a.address, b.address, "one", routed=False))
        bal = start_balancer(path, env=CHILD_ENV)
        try:
            first = seen(bal, "/api/x")
            assert (first["backend"], env_of(first)) == ("a", "one")
            write(path, config(a.address, b.address, "two", routed=True))
            assert "reload done" in reload(bal)
            routed = seen(bal, "/api/x")
            plain = seen(bal, "/x")
            assert (routed["backend"], routed["path"], env_of(routed)) == ("b", "/x", "")
            assert (plain["backend"], env_of(plain)) == ("a", "two")
            write(path, config(a.address, b.address, "three", routed=True, route_to="nowhere"))
            assert "reload rejected" in reload(bal)
            kept = seen(bal, "/api/y")
            assert (kept["backend"], kept["path"]) == ("b", "/y")
            assert env_of(seen(bal, "/")) == "two"
            assert bal.popen.poll() is None
        finally:
            bal.stop()
