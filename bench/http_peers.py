"""The processes of the HTTP benchmark, on 127.0.0.1 ports found by binding port 0.

nginx backends (one worker, keep-alive, a small response and a 100 KB static file), HAProxy
in mode http, nginx as a proxy (an upstream of both backends with keep-alive), and the
balancer (`balancer serve` with one service in mode "http"). Each starter is a context
manager that yields once the target answers and stops it on exit; `ours` raises
`ChildError` with the reason when the balancer does not come up or does not serve HTTP.
"""

from __future__ import annotations

import http.client
import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from tests.peers import HOST, Peer, free_port, need, running

from balancer.tools.procs import ChildError
from harness import RunningBalancer, start_balancer

ROOT = Path(__file__).resolve().parent.parent
SMALL_PATH = "/small"
SMALL_BODY = b"ok\n"
BIG_PATH = "/100k.bin"
BIG_SIZE = 100_000


def _common(tmp: Path) -> str:
    return f"""\
worker_processes 1;
daemon off;
error_log {tmp}/error.log warn;
pid {tmp}/nginx.pid;
events {{ worker_connections 4096; }}
"""


def _http_common(tmp: Path) -> str:
    return f"""\
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    keepalive_requests 1000000;
    keepalive_timeout 75s;
"""


def backend_config(tmp: Path, port: int) -> str:
    """One nginx worker serving `ok\\n` at /small and a 100 KB file at /100k.bin."""
    return f"""\
{_common(tmp)}http {{
{_http_common(tmp)}    sendfile on;
    server {{
        listen {HOST}:{port};
        location = {SMALL_PATH} {{ default_type text/plain; return 200 "ok\\n"; }}
        location / {{ root {tmp}/www; }}
    }}
}}
"""


def proxy_config(tmp: Path, port: int, backends: Sequence[str]) -> str:
    """One nginx worker proxying to an upstream of `backends` (round robin, keep-alive 32).

    The proxy buffers (16 x 16 KB) hold a 100 KB response, so nginx never spools to a file.
    """
    servers = "".join(f"        server {b};\n" for b in backends)
    return f"""\
{_common(tmp)}http {{
{_http_common(tmp)}    upstream backends {{
{servers}        keepalive 32;
        keepalive_requests 1000000;
    }}
    server {{
        listen {HOST}:{port};
        location / {{
            proxy_pass http://backends;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffer_size 16k;
            proxy_buffers 16 16k;
        }}
    }}
}}
"""


def haproxy_config(port: int, backends: Sequence[str]) -> str:
    """HAProxy in mode http, one thread, round robin, idle server connections reused."""
    servers = "".join(f"    server s{i} {addr}\n" for i, addr in enumerate(backends))
    return f"""\
global
    nbthread 1
    maxconn 8000
defaults
    mode http
    option http-keep-alive
    http-reuse safe
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    timeout http-keep-alive 30s
frontend front
    bind {HOST}:{port}
    default_backend back
backend back
    balance roundrobin
{servers}"""


def ours_config(backends: Sequence[str]) -> str:
    """One service in mode "http", round robin over `backends`, health checks off (as the
    references have none), every http setting at its default."""
    listed = ", ".join(f'"{b}"' for b in backends)
    return (
        "[services.bench]\n"
        f'listen = "{HOST}:0"\n'
        'mode = "http"\n'
        'algorithm = "round_robin"\n'
        f"backends = [{listed}]\n"
        "[services.bench.health]\n"
        "enabled = false\n"
    )


def _nginx_args(tmp: Path, cfg: Path) -> list[str]:
    tmp.chmod(0o755)  # workers run as another user when started as root
    return [need("nginx"), "-p", str(tmp), "-e", str(tmp / "error.log"), "-c", str(cfg)]


@contextmanager
def nginx_backend() -> Iterator[Peer]:
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="balancer-http-backend-") as name:
        tmp = Path(name)
        www = tmp / "www"
        www.mkdir(mode=0o755)
        (www / BIG_PATH.lstrip("/")).write_bytes(bytes(i % 251 for i in range(BIG_SIZE)))
        (www / BIG_PATH.lstrip("/")).chmod(0o644)
        cfg = tmp / "nginx.conf"
        cfg.write_text(backend_config(tmp, port))
        with running("nginx", _nginx_args(tmp, cfg), port) as peer:
            probe(port, SMALL_PATH, SMALL_BODY)
            yield peer


@contextmanager
def nginx_proxy(backends: Sequence[str]) -> Iterator[Peer]:
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="balancer-http-nginx-proxy-") as name:
        tmp = Path(name)
        cfg = tmp / "nginx.conf"
        cfg.write_text(proxy_config(tmp, port, backends))
        with running("nginx-proxy", _nginx_args(tmp, cfg), port) as peer:
            probe(port, SMALL_PATH, SMALL_BODY)
            yield peer


@contextmanager
def haproxy_http(backends: Sequence[str]) -> Iterator[Peer]:
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="balancer-http-haproxy-") as name:
        cfg = Path(name) / "haproxy.cfg"
        cfg.write_text(haproxy_config(port, backends))
        with running("haproxy", [need("haproxy"), "-db", "-f", str(cfg)], port) as peer:
            probe(port, SMALL_PATH, SMALL_BODY)
            yield peer


def probe(port: int, path: str, body: bytes, timeout: float = 3.0) -> None:
    """One GET of `path`; raise ChildError unless it is a 200 with `body`."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        got = response.read()
    except (OSError, http.client.HTTPException) as exc:
        raise ChildError(f"GET {path} on port {port} failed: {exc!r}") from exc
    finally:
        conn.close()
    if response.status != 200 or got != body:
        raise ChildError(f"GET {path} on port {port}: status {response.status}, body {got[:60]!r}")


def _this_checkout() -> dict[str, str]:
    """PYTHONPATH with this checkout's src first, so the balancer measured is this code
    (an editable install may point at another worktree)."""
    paths = [str(ROOT / "src"), *filter(None, os.environ.get("PYTHONPATH", "").split(":"))]
    return {"PYTHONPATH": ":".join(paths)}


@contextmanager
def ours(backends: Sequence[str]) -> Iterator[RunningBalancer]:
    """`balancer serve` in front of `backends`, once it has answered GET /small."""
    with tempfile.TemporaryDirectory(prefix="balancer-http-bench-") as name:
        cfg = Path(name) / "http.toml"
        cfg.write_text(ours_config(backends))
        balancer = start_balancer(cfg, env=_this_checkout())
        try:
            probe(balancer.port, SMALL_PATH, SMALL_BODY)
            yield balancer
        finally:
            balancer.stop()


def short_reason(exc: BaseException) -> str:
    """The first line of an error and its last non-empty line (a traceback's exception)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    return lines[0].rstrip(":") + (f": {lines[-1]}" if len(lines) > 1 else "")
