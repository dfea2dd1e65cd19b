"""Processes for the http-mode end-to-end tests: echo backends (tests/http_echo_backend.py),
nginx serving files and fixed statuses, `balancer serve` in http mode, curl and wrk runs,
and an RSS sampler for the balancer's process."""

from __future__ import annotations

import json
import re
import subprocess
import tempfile
import threading
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import psutil

from balancer.tools.procs import ChildProcess
from tests.peers import HOST, Peer, free_port, need, nginx_conf, running
from tests.support import PYTHON, ROOT, BalancerProc, start_balancer

ECHO_SCRIPT = ROOT / "tests" / "http_echo_backend.py"
CHILD_ENV = {"PYTHONPATH": str(ROOT / "src")}
"""The balancer child imports this checkout's sources, whatever the venv's editable install
points at."""
ECHO_RE = re.compile(r"echo (\S+) listening on \S+:(\d+)")
CURL_TIMEOUT = 15.0


class EchoProc(ChildProcess):
    """An echo backend process and the port it bound."""

    port: int
    label: str

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"


def start_echo(label: str, record: Path | None = None) -> EchoProc:
    args = [PYTHON, str(ECHO_SCRIPT), label, "0"]
    if record is not None:
        args.append(str(record))
    proc = EchoProc(args, name=f"echo {label}", env=CHILD_ENV)
    try:
        proc.port = int(proc.wait_for(ECHO_RE).group(2))
    except BaseException:
        proc.stop()
        raise
    proc.label = label
    return proc


@contextmanager
def echoes(*labels: str, record: Path | None = None) -> Iterator[list[EchoProc]]:
    """Echo backends named `labels`, each its own process; stopped (or reaped) on exit."""
    procs: list[EchoProc] = []
    try:
        procs.extend(start_echo(label, record) for label in labels)
        yield procs
    finally:
        for proc in procs:
            proc.stop()


def http_toml(
    path: Path, backends: list[str], http: Mapping[str, Any] | None = None, **service: Any
) -> Path:
    """A one-service http-mode config `web` on 127.0.0.1:0 (TCP connect health checks)."""
    lines = ["[services.web]", 'listen = "127.0.0.1:0"', 'mode = "http"']
    lines += [f"{key} = {json.dumps(value)}" for key, value in service.items()]
    lines.append("backends = [" + ", ".join(json.dumps(b) for b in backends) + "]")
    lines += ["[services.web.health]", "interval = 0.2", "timeout = 1", "rise = 1", "fall = 1"]
    if http:
        lines.append("[services.web.http]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in http.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def start_http(
    path: Path, backends: list[str], *extra: str, http: Mapping[str, Any] | None = None
) -> BalancerProc:
    """`balancer serve` on a fresh http-mode config, once ready (admin on a free port)."""
    cfg = http_toml(path, backends, http)
    return start_balancer(cfg, *extra, env=CHILD_ENV)


def nginx_config(tmp: Path, port: int) -> str:
    return nginx_conf(
        tmp,
        f"""\
    server {{
        listen {HOST}:{port};
        location = /missing {{ return 404; }}
        location = /busy {{ return 503; }}
        location / {{ root {tmp}/www; }}
    }}""",
        connections=1024,
    )


@contextmanager
def nginx_backends(count: int, files: Mapping[str, bytes]) -> Iterator[list[Peer]]:
    """`count` nginx servers, each serving `files` from its root, /missing as `return 404`
    and /busy as `return 503`."""
    binary = need("nginx")
    with ExitStack() as stack:
        peers = []
        for _ in range(count):
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="balancer-ng-")))
            root.chmod(0o755)  # workers may run as another user when started as root
            (root / "www").mkdir(mode=0o755)
            for name, data in files.items():
                (root / "www" / name).write_bytes(data)
            port = free_port()
            (root / "nginx.conf").write_text(nginx_config(root, port))
            args = [binary, "-c", f"{root}/nginx.conf", "-p", str(root), "-e", f"{root}/error.log"]
            peers.append(stack.enter_context(running("nginx", args, port)))
        yield peers


def curl(*args: str) -> subprocess.CompletedProcess[str]:
    """curl with `args` (silent, errors shown, failing on no answer), its output as text."""
    return subprocess.run(
        [need("curl"), "-sS", "--max-time", "10", *args],
        capture_output=True,
        text=True,
        timeout=CURL_TIMEOUT,
        check=False,
    )


def curl_json(url: str, *args: str) -> dict[str, Any]:
    done = curl(*args, url)
    assert done.returncode == 0, done.stderr
    doc: dict[str, Any] = json.loads(done.stdout)
    return doc


def wrk_counts(output: str) -> dict[str, int]:
    """Requests, non-2xx/3xx responses and socket errors in wrk's report (wrk leaves out
    the last two lines when they would say 0)."""
    done = re.search(r"(\d+) requests in", output)
    assert done is not None, output
    counts = {"requests": int(done.group(1)), "non2xx": 0, "socket_errors": 0}
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    if bad:
        counts["non2xx"] = int(bad.group(1))
    errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    if errors:
        counts["socket_errors"] = sum(int(n) for n in errors.groups())
    return counts


class RssSampler:
    """The largest RSS of a process, sampled by a thread every few milliseconds."""

    def __init__(self, pid: int, every: float = 0.01) -> None:
        self.process = psutil.Process(pid)
        self.start = self.peak = int(self.process.memory_info().rss)
        self.samples = 0
        self._every = every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self._every):
            rss = int(self.process.memory_info().rss)
            self.peak = max(self.peak, rss)
            self.samples += 1

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    @property
    def growth_mb(self) -> float:
        return (self.peak - self.start) / 1e6
