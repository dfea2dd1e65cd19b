"""The command line: config errors before anything listens, admin fallback, entry points."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from balancer.config.errors import ConfigError
from balancer.config.model import Config
from balancer.tools.procs import ChildProcess as Proc
from tests.support import (
    PYTHON,
    ROOT,
    LineClient,
    free_port,
    reply_for,
    start_balancer,
    start_service,
    write_toml,
)


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PYTHON, "-m", "balancer", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        check=False,
    )


def test_check_config_accepts_a_good_file(tmp_path: Path) -> None:
    cfg = write_toml(tmp_path / "good.toml", [8090, 8091])
    result = run("check-config", str(cfg))
    assert result.returncode == 0, result.stderr
    assert "service numbers" in result.stdout
    assert "OK" in result.stdout


def test_check_config_names_file_key_and_expectation(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(
        '[services.numbers]\nlisten = "127.0.0.1:0"\nbackends = ["127.0.0.1:1"]\n'
        "[services.numbers.health]\nrise = -1\n"
    )
    result = run("check-config", str(cfg))
    assert result.returncode == 2
    expected = "bad.toml: line 5: services.numbers.health.rise: expected an integer from 1 to 1000"
    assert f"{expected}, got -1" in result.stderr


def test_check_config_lists_every_error_each_on_its_own_error_line(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(
        '[services.numbers]\nlisten = "127.0.0.1:0"\nbackends = ["127.0.0.1:1"]\nretrys = 2\n'
        "[services.numbers.health]\nrise = -1\ninterval = 1e-6\n"
    )
    result = run("check-config", str(cfg))
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert lines[0].endswith("bad.toml: 3 errors"), lines
    assert all(line.startswith("error: ") for line in lines), lines
    assert [line.split(": ")[2] for line in lines[1:]] == ["line 4", "line 6", "line 7"]


def command_line_config(*argv: str) -> Config:
    from balancer.cli import build_config, build_parser

    return build_config(build_parser().parse_args(["serve", *argv]))


def test_command_line_numbers_have_the_config_s_bounds(tmp_path: Path) -> None:
    cfg = write_toml(tmp_path / "b.toml", [8090])
    for option, value, bound in [
        ("--refresh-rate", "1e-6", "from 0.05 to 86400 seconds"),
        ("--rise", "0", "from 1 to 1000"),
        ("--fall", "100000", "from 1 to 1000"),
        ("--drain-timeout", "-1", "from 0 to 3600 seconds"),
    ]:
        with pytest.raises(ConfigError, match=f"command line: {option}: expected .*{bound}"):
            command_line_config(str(cfg), option, value)
    result = run("serve", str(cfg), "--refresh-rate", "1e-6", "--admin", "off")
    assert result.returncode == 2
    assert "--refresh-rate: expected a number from 0.05 to 86400 seconds" in result.stderr


def test_admin_on_the_command_line_replaces_only_the_listen_address(tmp_path: Path) -> None:
    cfg = tmp_path / "b.toml"
    cfg.write_text(
        '[admin]\ntoken = "w"\nread_token = "r"\nread_access = "token"\n'
        'allowed_hosts = ["admin.example"]\n'
        '[services.numbers]\nlisten = "127.0.0.1:0"\nbackends = ["127.0.0.1:1"]\n'
    )
    admin = command_line_config(str(cfg), "--admin", "127.0.0.1:9555").admin
    assert (admin.host, admin.port, admin.enabled) == ("127.0.0.1", 9555, True)
    assert (admin.token, admin.read_token, admin.read_access) == ("w", "r", "token")
    assert admin.allowed_hosts == ("admin.example",)
    assert not command_line_config(str(cfg), "--admin", "off").admin.enabled


def test_the_checks_across_the_file_judge_the_command_line_s_admin_listener(
    tmp_path: Path,
) -> None:
    """A backend on the file's default admin address is fine when --admin moves the admin
    endpoint elsewhere (or turns it off), and a loop when --admin puts it on that backend."""
    cfg = tmp_path / "b.toml"
    cfg.write_text('[services.numbers]\nlisten = "127.0.0.1:0"\nbackends = ["127.0.0.1:9100"]\n')
    with pytest.raises(ConfigError, match="which is the listener of the admin endpoint"):
        command_line_config(str(cfg))
    assert command_line_config(str(cfg), "--admin", "off").services[0].backends
    assert command_line_config(str(cfg), "--admin", "127.0.0.1:9101").services[0].backends
    cfg.write_text('[services.numbers]\nlisten = "127.0.0.1:0"\nbackends = ["127.0.0.1:9200"]\n')
    with pytest.raises(ConfigError, match="which is the listener of the admin endpoint"):
        command_line_config(str(cfg), "--admin", "127.0.0.1:9200")


def test_serve_with_a_bad_config_exits_2_before_listening(tmp_path: Path) -> None:
    port = free_port()
    txt = tmp_path / "config.txt"
    txt.write_text("localhost 8090\nlocalhost eighty\n")
    result = run("serve", str(txt), "-p", str(port), "--admin", "off")
    assert result.returncode == 2
    assert "config.txt: line 2" in result.stderr
    assert "listening" not in result.stderr
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0


def test_serve_without_any_config_says_what_it_looked_for(tmp_path: Path) -> None:
    result = run("serve", "--admin", "off", cwd=tmp_path)
    assert result.returncode == 2
    assert "config.txt" in result.stderr


def test_admin_port_taken_logs_a_warning_and_keeps_balancing(tmp_path: Path) -> None:
    svc = start_service()
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    taken = blocker.getsockname()[1]
    cfg = write_toml(tmp_path / "b.toml", [svc.port])
    bal = start_balancer(cfg, admin=f"127.0.0.1:{taken}")
    try:
        assert "admin endpoint not started" in bal.output()
        c = LineClient(bal.port)
        assert c.request("5") == reply_for(5)
    finally:
        bal.stop()
        svc.stop()
        blocker.close()


@pytest.mark.parametrize("mode", ["message", "tcp"])
def test_service_port_taken_is_a_clear_error_not_a_traceback(tmp_path: Path, mode: str) -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        taken = blocker.getsockname()[1]
        cfg = tmp_path / "busy.toml"
        cfg.write_text(
            f'[services.busy]\nlisten = "127.0.0.1:{taken}"\nmode = "{mode}"\n'
            'backends = ["127.0.0.1:1"]\n[services.busy.health]\nenabled = false\n'
        )
        result = run("serve", str(cfg), "--admin", "off")
    assert result.returncode == 1
    assert f"service busy: cannot listen on 127.0.0.1:{taken}: Address already in use" in (
        result.stderr
    )
    assert "Traceback" not in result.stderr


def test_python_dash_m_balancer_and_the_console_script_agree() -> None:
    a = subprocess.run(
        [PYTHON, "-m", "balancer", "--help"], capture_output=True, text=True, check=True
    )
    script = Path(PYTHON).parent / "balancer"
    b = subprocess.run([str(script), "--help"], capture_output=True, text=True, check=True)
    for command in ("serve", "service", "client", "check-config"):
        assert command in a.stdout
    assert a.stdout == b.stdout


def test_root_server_py_rejects_a_bad_refresh_rate(tmp_path: Path) -> None:
    (tmp_path / "config.txt").write_text("localhost 8090\n")
    result = subprocess.run(
        [PYTHON, str(ROOT / "server.py"), "-p", "0", "-refreshRate", "0", "-admin", "off"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == 2
    assert "-refreshRate" in result.stderr


@pytest.mark.parametrize("fmt", ["json", "txt"])
def test_root_server_py_reads_the_tutorial_config_forms(tmp_path: Path, fmt: str) -> None:
    svc = start_service()
    if fmt == "json":
        (tmp_path / "config.json").write_text(
            json.dumps({"servers": [{"host": "127.0.0.1", "port": svc.port}]})
        )
    else:
        (tmp_path / "config.txt").write_text(f"# the services\n\n127.0.0.1 {svc.port}\n")
    port = free_port()
    bal = Proc(
        [PYTHON, str(ROOT / "server.py"), "-p", str(port), "-refreshRate", "1", "-admin", "off"],
        cwd=tmp_path,
    )
    try:
        bal.wait_for("balancer ready")
        c = LineClient(port)
        assert c.request("9") == reply_for(9)
    finally:
        bal.stop()
        svc.stop()


STALL_IMPORTS = '''
import signal
import sys


class Stall:
    """Stops the import of balancer.config.model until a signal comes: "loading modules"."""

    def find_spec(self, name, path=None, target=None):
        if name == "balancer.config.model":
            sys.meta_path.remove(self)
            sys.stderr.write("loading balancer.config.model\\n")
            sys.stderr.flush()
            signal.pause()
        return None


sys.meta_path.insert(0, Stall())
'''


@pytest.mark.parametrize("entry", ["python -m balancer", "server.py"])
def test_sigint_while_the_modules_load_exits_without_a_traceback(
    tmp_path: Path, entry: str
) -> None:
    (tmp_path / "sitecustomize.py").write_text(STALL_IMPORTS)
    (tmp_path / "config.txt").write_text("127.0.0.1 9\n")
    args = (
        [PYTHON, "-m", "balancer", "serve", "config.txt", "--admin", "off"]
        if entry != "server.py"
        else [PYTHON, str(ROOT / "server.py"), "-p", "0", "-admin", "off"]
    )
    path = os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))
    proc = Proc(args, cwd=tmp_path, env={"PYTHONPATH": path})
    try:
        proc.wait_for("loading balancer.config.model")
        proc.signal(signal.SIGINT)
        code = proc.wait(timeout=20)
    finally:
        proc.stop(signal.SIGKILL)
    assert code in (130, -signal.SIGINT), proc.output()
    assert "Traceback" not in proc.output(), proc.output()
