"""Child processes whose output lines are read by a thread, for the demo, benchmarks and tests.

A `ChildProcess` starts a command with stdin closed and stdout and stderr merged into one
pipe (or stdout into a file, stderr still read); one thread collects every line, and
`wait_for` blocks until a line matches (a readiness line such as `balancer ready`), the
child exits, or the time is up. `stop` sends a signal, waits, and kills if it must.
`ready_service_port` and `ready_balancer_ports` read what a sample service and
`balancer serve` print once they listen.
"""

from __future__ import annotations

import os
import re
import signal as signals
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

READY_TIMEOUT = 20.0
STOP_TIMEOUT = 15.0

INSTANCE_RE = re.compile(r"instance listening on (\S+):(\d+)")
SERVICE_RE = re.compile(r"service (\S+) listening on (\S+):(\d+)")
ADMIN_RE = re.compile(r"admin listening on http://(\S+):(\d+)")
READY_RE = re.compile(r"balancer ready")


class ChildError(Exception):
    """A child process failed to start or exited early."""


class ChildProcess:
    """A child process whose output lines are collected by a thread, for waiting on."""

    def __init__(
        self,
        args: Sequence[str],
        *,
        name: str | None = None,
        cwd: Path | str | None = None,
        env: dict[str, str] | None = None,
        stdout_to: Path | None = None,
        max_lines: int | None = None,
    ) -> None:
        self.args = list(args)
        self.name = name or " ".join(self.args[:4])
        full_env = dict(os.environ, PYTHONUNBUFFERED="1")
        if env:
            full_env.update(env)
        self._stdout_file = open(stdout_to, "wb") if stdout_to is not None else None
        self.popen = subprocess.Popen(
            self.args,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=self._stdout_file if self._stdout_file is not None else subprocess.PIPE,
            stderr=subprocess.PIPE if self._stdout_file is not None else subprocess.STDOUT,
            env=full_env,
        )
        self.lines: list[str] = []
        """The output so far (the last `max_lines` of it, when that is set)."""
        self._max_lines = max_lines
        self._total = 0
        self._eof = False
        self._cond = threading.Condition()
        stream = self.popen.stderr if self._stdout_file is not None else self.popen.stdout
        assert stream is not None
        self._reader = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._reader.start()

    def _pump(self, stream: IO[bytes]) -> None:
        for raw in iter(stream.readline, b""):
            with self._cond:
                self.lines.append(raw.decode("utf-8", "replace").rstrip("\r\n"))
                if self._max_lines is not None and len(self.lines) > self._max_lines:
                    del self.lines[0]
                self._total += 1
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    @property
    def pid(self) -> int:
        return self.popen.pid

    def wait_for(
        self, pattern: str | re.Pattern[str], timeout: float = READY_TIMEOUT
    ) -> re.Match[str]:
        """Wait until an output line matches (the lines read so far first); return the match."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        checked = 0
        with self._cond:
            while True:
                new = min(self._total - checked, len(self.lines))
                checked = self._total
                for line in self.lines[len(self.lines) - new :]:
                    match = regex.search(line)
                    if match:
                        return match
                remaining = deadline - time.monotonic()
                if self._eof:
                    try:
                        code = self.popen.wait(timeout=max(remaining, 0.0))
                    except subprocess.TimeoutExpired:
                        pass
                    else:
                        raise ChildError(f"{self.name} exited with code {code}:\n{self.tail()}")
                    remaining = 0.0
                if remaining <= 0:
                    raise ChildError(
                        f"{self.name} did not get ready within {timeout:g}s:\n{self.tail()}"
                    )
                self._cond.wait(min(remaining, 0.5))

    def tail(self, count: int = 20) -> str:
        """The last `count` output lines, indented, for an error message."""
        return "\n".join(f"  {line}" for line in self.lines[-count:])

    def output(self) -> str:
        return "\n".join(self.lines)

    def signal(self, sig: int) -> None:
        if self.popen.poll() is None:
            os.kill(self.popen.pid, sig)

    def stop(self, sig: int = signals.SIGTERM, timeout: float = STOP_TIMEOUT) -> int:
        """Send `sig` (then SIGKILL after `timeout`); the exit code, once the output is read."""
        if self.popen.poll() is None:
            try:
                os.kill(self.popen.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=5)
        self._close_streams()
        return self.popen.returncode

    def wait(self, timeout: float = 30.0) -> int:
        """Wait for the child to exit on its own; its exit code, once the output is read."""
        code = self.popen.wait(timeout=timeout)
        self._close_streams()
        return code

    def _close_streams(self) -> None:
        self._reader.join(timeout=5)
        for stream in (self.popen.stdout, self.popen.stderr):
            if stream is not None:
                stream.close()
        if self._stdout_file is not None:
            self._stdout_file.close()

    def __repr__(self) -> str:
        code = self.popen.poll()
        state = "running" if code is None else f"exited {code}"
        return f"<ChildProcess {self.name} pid {self.pid} {state}, {self._total} lines>"


def ready_service_port(child: ChildProcess, timeout: float = READY_TIMEOUT) -> int:
    """The port a sample service listens on, once it has said so."""
    return int(child.wait_for(INSTANCE_RE, timeout).group(2))


def ready_balancer_ports(
    child: ChildProcess, timeout: float = READY_TIMEOUT
) -> tuple[dict[str, int], int | None]:
    """Once `balancer serve` has said `balancer ready`: the port of each service, by name,
    and the admin endpoint's port (None when it has none)."""
    child.wait_for(READY_RE, timeout)
    lines = list(child.lines)
    ports = {m.group(1): int(m.group(3)) for m in map(SERVICE_RE.search, lines) if m}
    admin = [int(m.group(2)) for m in map(ADMIN_RE.search, lines) if m]
    return ports, admin[-1] if admin else None
