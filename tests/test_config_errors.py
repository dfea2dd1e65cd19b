"""Config errors: every one reported with its line, and the checks across a whole file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from balancer.config.addresses import parse_address
from balancer.config.errors import ConfigError
from balancer.config.load import load_config
from balancer.config.model import check_bound
from tests.support import config_error, write_config


def located(err: ConfigError) -> list[tuple[int | None, str]]:
    return [(e.line, e.where) for e in err.errors]


def service(name: str, port: int, *body: str) -> str:
    lines = [f"[services.{name}]", f'listen = "127.0.0.1:{port}"', *body]
    if not any(line.startswith("backends") for line in body):
        lines.append('backends = ["127.0.0.1:1"]')
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- every error, with its line

MANY = """\
drain_timeout = -1
[services.a]
listen = "127.0.0.1:7001"
backends = ["127.0.0.1:1", { address = "h:1", weight = 5000 }]
retrys = 3
[services.a.health]
interval = 1e-6
rise = 0

[services.b]
listen = "127.0.0.1:7002"
backends = [
  "127.0.0.1:2",
  "127.0.0.1:70000",
]
mode = "udp"
"""


def test_every_error_is_reported_each_with_its_line(tmp_path: Path) -> None:
    path = write_config(tmp_path, "bad.toml", MANY)
    err = config_error(path)
    assert located(err) == [
        (1, "drain_timeout"),
        (4, "services.a.backends[1].weight"),
        (5, "services.a.retrys"),
        (7, "services.a.health.interval"),
        (8, "services.a.health.rise"),
        (14, "services.b.backends[1]"),
        (16, "services.b.mode"),
    ]
    lines = str(err).splitlines()
    assert lines[0] == f"{path}: 7 errors"
    assert (
        lines[1]
        == f"{path}: line 1: drain_timeout: expected a number from 0 to 3600 seconds, got -1"
    )
    assert lines[4] == (
        f"{path}: line 7: services.a.health.interval: "
        "expected a number from 0.05 to 86400 seconds, got 1e-06"
    )
    assert lines[6] == (
        f"{path}: line 14: services.b.backends[1]: "
        "expected \"host:port\" with a port 1..65535, got '127.0.0.1:70000'"
    )
    # the error as a whole reads as its first one
    assert (err.source, err.where, err.line) == (str(path), "drain_timeout", 1)
    assert err.message == "expected a number from 0 to 3600 seconds, got -1"


def test_check_config_prints_every_error_and_exits_2(tmp_path: Path) -> None:
    path = write_config(tmp_path, "bad.toml", MANY)
    result = subprocess.run(
        [sys.executable, "-m", "balancer", "check-config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert f"{path}: 7 errors" in result.stderr
    assert f"{path}: line 8: services.a.health.rise: expected an integer from 1 to 1000" in (
        result.stderr
    )
    expected = f"{path}: line 16: services.b.mode: expected one of 'http', 'message', 'tcp'"
    assert expected in result.stderr
    assert "OK" not in result.stdout


def test_a_key_that_is_not_written_points_at_its_table(tmp_path: Path) -> None:
    text = '[services.a]\nlisten = "127.0.0.1:7001"\n\n[services.a.health]\nrise = 1\n'
    err = config_error(write_config(tmp_path, "c.toml", text))
    assert located(err) == [(1, "services.a.backends")]
    assert str(err).endswith(
        ': line 1: services.a.backends: missing: expected a list of "host:port"'
    )


def test_errors_in_dotted_keys_inline_tables_and_arrays_of_tables(tmp_path: Path) -> None:
    text = """\
[services.a]
listen = "127.0.0.1:7001"
health.rise = 0
outlier = { consecutive_failures = 0, base_ejection_time = 1 }

[[services.a.backends]]
address = "127.0.0.1:1"

[[services.a.backends]]
address = "127.0.0.1:2"
weight = -1
"""
    err = config_error(write_config(tmp_path, "c.toml", text))
    assert located(err) == [
        (3, "services.a.health.rise"),
        (4, "services.a.outlier.consecutive_failures"),
        (11, "services.a.backends[1].weight"),
    ]


def test_an_error_in_one_service_does_not_hide_the_next(tmp_path: Path) -> None:
    text = service("a", 7001, "retries = 99") + service("b", 7002, "max_line = 0")
    err = config_error(write_config(tmp_path, "c.toml", text))
    assert [e.where for e in err.errors] == ["services.a.retries", "services.b.max_line"]


def test_a_table_that_is_not_a_table_stops_only_the_checks_under_it(tmp_path: Path) -> None:
    text = service("a", 7001, "health = 3", "retries = -1") + (
        "[services.b]\nlisten = 7\nbackends = 5\n[services.b.outlier]\nmax_ejection_percent = 101\n"
    )
    err = config_error(write_config(tmp_path, "c.toml", text))
    assert located(err) == [
        (3, "services.a.health"),
        (4, "services.a.retries"),
        (7, "services.b.listen"),
        (8, "services.b.backends"),
        (10, "services.b.outlier.max_ejection_percent"),
    ]


def test_a_mistake_is_not_reported_again_as_its_consequences(tmp_path: Path) -> None:
    text = (
        service("a", 7001, 'mode = "udp"', 'hash_key = "message"', 'client_framing = "raw"')
        + service("b", 7002, 'algorithm = "nope"', "slow_start = 5")
        + '[services.c]\nlisten = "127.0.0.1:99999"\nbackends = ["127.0.0.1:1"]\n'
        + service("d", 7003, 'backends = [{ address = "h:1", weight = -5 }]')
        + '[services.e]\nbackends = ["127.0.0.1:1"]\n'
        + '[services.f]\nbackends = ["127.0.0.1:1"]\n'
    )
    err = config_error(write_config(tmp_path, "c.toml", text))
    # the bad mode does not make hash_key or client_framing wrong, the bad algorithm does
    # not make slow_start wrong, the bad listen of c conflicts with nothing, d's bad weight
    # does not make "all weights 0"; e and f do share the default listen
    assert [e.where for e in err.errors] == [
        "services.a.mode",
        "services.b.algorithm",
        "services.c.listen",
        "services.d.backends[0].weight",
        "services.f.listen",
    ]


def test_text_format_reports_every_bad_line(tmp_path: Path) -> None:
    text = "localhost 8090\nlocalhost eighty\n# fine\n256.1.1.1 80\nlocalhost:8090\na b c\n"
    err = config_error(write_config(tmp_path, "config.txt", text))
    assert located(err) == [(2, "line 2"), (4, "line 4"), (5, "line 5"), (6, "line 6")]
    lines = str(err).splitlines()
    assert lines[1] == f"{tmp_path / 'config.txt'}: line 2: expected a port 1..65535, got 'eighty'"
    assert "256.1.1.1 is not a valid IPv4 address" in lines[2]
    assert "got 'localhost:8090' again (first at line 1)" in lines[3]


def test_json_errors_have_lines(tmp_path: Path) -> None:
    doc = {
        "services": {
            "a": {"listen": "127.0.0.1:7001", "backends": ["127.0.0.1:1"], "retries": -1},
            "b": {"listen": "127.0.0.1:7002", "backends": [{"address": "h:1", "weight": 1.5}]},
        }
    }
    path = write_config(tmp_path, "c.json", json.dumps(doc, indent=2))
    err = config_error(path)
    text = path.read_text().splitlines()
    assert [e.where for e in err.errors] == ["services.a.retries", "services.b.backends[0].weight"]
    for e in err.errors:
        assert e.line is not None
        assert e.where.rsplit(".", 1)[-1] in text[e.line - 1]


def test_json_servers_form_reports_every_bad_server(tmp_path: Path) -> None:
    doc = {"servers": [{"host": "a", "port": 0}, {"host": "256.0.0.1", "port": 80}, "a:1"]}
    path = write_config(tmp_path, "config.json", json.dumps(doc, indent=1))
    err = config_error(path)
    assert [e.where for e in err.errors] == ["servers[0].port", "servers[1].host"]
    assert "256.0.0.1 is not a valid IPv4 address" in err.errors[1].message


# ---------------------------------------------------------------- numbers from anywhere


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("9" * 400, "an integer of 400 digits"),
        ("1e308", "1e+308"),
        ("1e999", "inf"),
        ("NaN", "nan"),
        ("-Infinity", "-inf"),
        ("true", "True"),
        ("2.0", "2.0"),
    ],
)
def test_any_json_number_at_a_weight_is_an_error_naming_the_key(
    tmp_path: Path, raw: str, shown: str
) -> None:
    text = '{"servers": [{"host": "localhost", "port": 8090, "weight": ' + raw + "}]}"
    err = config_error(write_config(tmp_path, "config.json", text))
    assert located(err) == [(1, "servers[0].weight")]
    assert err.message == f"expected an integer from 0 to 1000, got {shown}"


@pytest.mark.parametrize("key", ["connect_timeout", "hash_balance_factor", "max_line"])
def test_a_huge_json_number_anywhere_is_an_error_naming_the_key(tmp_path: Path, key: str) -> None:
    doc = '{"services": {"a": {"backends": ["h:1"], "' + key + '": ' + "7" * 400 + "}}}"
    err = config_error(write_config(tmp_path, "c.json", doc))
    assert [e.where for e in err.errors] == [f"services.a.{key}"]
    assert "got an integer of 400 digits" in err.message


@pytest.mark.parametrize("name", ["c.json", "c.toml"])
def test_a_number_too_long_to_read_is_a_config_error_with_its_line(
    tmp_path: Path, name: str
) -> None:
    digits = "9" * 5000
    if name.endswith(".json"):
        text = '{"services": {"a": {\n"backends": ["h:1"],\n"retries": ' + digits + "}}}"
    else:
        text = '[services.a]\nbackends = ["h:1"]\nretries = ' + digits + "\n"
    err = config_error(write_config(tmp_path, name, text))
    assert err.where == "line 3"
    assert "expected a number of at most 4300 digits" in err.message


def test_nesting_too_deep_is_a_config_error(tmp_path: Path) -> None:
    err = config_error(write_config(tmp_path, "c.json", "[" * 100_000 + "]" * 100_000))
    assert "nested too deeply" in err.message


def test_a_huge_policy_option_is_an_error_naming_the_option(tmp_path: Path) -> None:
    doc = {
        "services": {
            "a": {
                "algorithm": "consistent_hash",
                "backends": ["h:1"],
                "policy_options": {"table_size": 1_000_000_007},
            },
            "b": {
                "listen": "127.0.0.1:7002",
                "algorithm": "peak_ewma",
                "backends": ["h:1"],
                "policy_options": {"decay": 10**400, "probe": 1e-300, "failure_penalty": True},
            },
        }
    }
    err = config_error(write_config(tmp_path, "c.json", json.dumps(doc)))
    assert [(e.where, e.message) for e in err.errors] == [
        (
            "services.a.policy_options.table_size",
            "expected a prime number from 2 to 524287, got 1000000007",
        ),
        (
            "services.b.policy_options.decay",
            "expected a number from 0.01 to 3600 seconds, got an integer of 401 digits",
        ),
        (
            "services.b.policy_options.probe",
            "expected 0 (off) or a number from 0.001 to 0.5, got 1e-300",
        ),
        (
            "services.b.policy_options.failure_penalty",
            "expected a number from 0 to 3600 seconds, got True",
        ),
    ]


# ---------------------------------------------------------------- IPv4 addresses

BAD_IPV4 = ["256.1.1.1", "1.2.3", "1.2.3.4.5", "8080", "01.2.3.4", "1..2.3"]


@pytest.mark.parametrize("host", BAD_IPV4)
def test_a_numeric_host_must_be_a_valid_ipv4_address(host: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_address(f"{host}:80", where="address", source="request")
    assert f"{host} is not a valid IPv4 address" in info.value.message


@pytest.mark.parametrize("host", ["10.0.0.1", "host1.example", "1.2.3.4a", "0.0.0.0"])
def test_names_and_valid_ipv4_addresses_are_hosts(host: str) -> None:
    assert parse_address(f"{host}:80", where="address", source="request") == (host, 80)


def test_an_invalid_ipv4_address_is_refused_in_every_format(tmp_path: Path) -> None:
    toml = (
        '[admin]\nlisten = "300.0.0.1:9100"\n[services.a]\nlisten = "1.2.3:7001"\n'
        'backends = ["256.1.1.1:80", { address = "10.0.0.256:80" }]\n'
    )
    err = config_error(write_config(tmp_path, "c.toml", toml))
    assert located(err) == [
        (2, "admin.listen"),
        (4, "services.a.listen"),
        (5, "services.a.backends[0]"),
        (5, "services.a.backends[1].address"),
    ]
    assert all("is not a valid IPv4 address" in e.message for e in err.errors)
    for text in ("256.1.1.1 80\n", "256.1.1.1:80\n"):
        err = config_error(write_config(tmp_path, "config.txt", text))
        assert "256.1.1.1 is not a valid IPv4 address" in err.message
    doc = {"servers": [{"host": "256.1.1.1", "port": 80}]}
    err = config_error(write_config(tmp_path, "config.json", json.dumps(doc)))
    assert "256.1.1.1 is not a valid IPv4 address" in err.message


# ---------------------------------------------------------------- listeners


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("localhost:7100", "127.0.0.1:7100"),
        ("127.0.0.1:7100", "localhost:7100"),
        ("0.0.0.0:7100", "localhost:7100"),
        ("127.0.0.5:7100", "0.0.0.0:7100"),
        ("[::]:7100", "[::1]:7100"),
        ("LOCALHOST:7100", "localhost:7100"),
    ],
)
def test_listeners_that_overlap_once_resolved(tmp_path: Path, first: str, second: str) -> None:
    text = (
        f'[services.a]\nlisten = "{first}"\nbackends = ["h:1"]\n'
        f'[services.b]\nlisten = "{second}"\nbackends = ["h:1"]\n'
    )
    err = config_error(write_config(tmp_path, "c.toml", text))
    assert located(err) == [(5, "services.b.listen")]
    assert err.message == (
        f"expected an address no other service listens on, got {second!r} "
        f"(already used by service 'a', listening on {first!r})"
    )


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("0.0.0.0:7100", "[::]:7100"),  # IPv6 listeners are bound v6-only
        ("127.0.0.1:7100", "127.0.0.2:7100"),
        ("127.0.0.1:7100", "127.0.0.1:7101"),
        ("127.0.0.1:0", "127.0.0.1:0"),
        ("0.0.0.0:7100", "[::1]:7100"),
    ],
)
def test_listeners_that_do_not_overlap(tmp_path: Path, first: str, second: str) -> None:
    text = (
        f'[services.a]\nlisten = "{first}"\nbackends = ["h:1"]\n'
        f'[services.b]\nlisten = "{second}"\nbackends = ["h:1"]\n'
    )
    assert len(load_config(write_config(tmp_path, "c.toml", text)).services) == 2


def test_the_admin_listener_overlapping_a_service(tmp_path: Path) -> None:
    text = '[admin]\nlisten = "localhost:7100"\n' + service("a", 7100)
    err = config_error(write_config(tmp_path, "c.toml", text))
    assert located(err) == [(2, "admin.listen")]
    assert "already used by service 'a'" in err.message


# ---------------------------------------------------------------- loops


@pytest.mark.parametrize(
    ("listen", "backend", "other", "owner"),
    [
        ("127.0.0.1:7100", "localhost:7100", 7200, "service 'a' ('127.0.0.1:7100')"),
        ("localhost:7100", "127.0.0.1:7100", 7200, "service 'a' ('localhost:7100')"),
        ("0.0.0.0:7100", "127.0.0.1:7100", 7200, "service 'a' ('0.0.0.0:7100')"),
        ("127.0.0.1:7100", "0.0.0.0:7100", 7200, "service 'a' ('127.0.0.1:7100')"),
        ("[::1]:7100", "[::]:7100", 7200, "service 'a' ('[::1]:7100')"),
        ("127.0.0.1:7101", "localhost:7100", 7100, "service 'b' ('127.0.0.1:7100')"),
        ("127.0.0.1:7101", "127.0.0.1:9100", 7100, "the admin endpoint ('127.0.0.1:9100')"),
    ],
)
def test_a_backend_that_is_the_balancer_itself(
    tmp_path: Path, listen: str, backend: str, other: int, owner: str
) -> None:
    text = f'[services.a]\nlisten = "{listen}"\nbackends = ["127.0.0.1:1", "{backend}"]\n'
    err = config_error(write_config(tmp_path, "c.toml", text + service("b", other)))
    assert located(err) == [(3, "services.a.backends[1]")]
    assert err.message == (
        f"expected a backend other than this balancer, got {backend!r}, which is the "
        f"listener of {owner}: its requests would come back to the balancer"
    )


def test_no_loop_without_a_listener_there(tmp_path: Path) -> None:
    backends = ["127.0.0.1:9100", "127.0.0.2:7100", "no-such-host.invalid:7100", "127.0.0.1:7101"]
    text = '[admin]\nlisten = "off"\n' + service("a", 7100, "backends = " + json.dumps(backends))
    text += '[services.b]\nlisten = "127.0.0.1:0"\nbackends = ["127.0.0.1:7101"]\n'
    config = load_config(write_config(tmp_path, "c.toml", text))
    assert [b.address for b in config.service("a").backends] == backends


def test_the_tutorial_formats_refuse_a_loop_too(tmp_path: Path) -> None:
    txt = write_config(tmp_path, "config.txt", "localhost 8090\nlocalhost 8080\n")
    err = config_error(txt)
    assert located(err) == [(2, "line 2")]
    assert "got 'localhost:8080', which is the listener of service 'default'" in err.message
    with pytest.raises(ConfigError):
        load_config(
            write_config(tmp_path, "other.txt", "localhost 9000\n"), default_listen="localhost:9000"
        )
    assert load_config(txt, default_listen="localhost:9000").services[0].listen == "localhost:9000"
    doc = {"servers": [{"host": "127.0.0.1", "port": 8080}]}
    err = config_error(write_config(tmp_path, "config.json", json.dumps(doc)))
    assert err.where == "servers[0]"


# ---------------------------------------------------------------- could never serve, auto


def test_a_service_whose_backends_all_weigh_0_could_never_serve(tmp_path: Path) -> None:
    body = 'backends = [{ address = "h:1", weight = 0 }, { address = "h:2", weight = 0 }]'
    err = config_error(write_config(tmp_path, "c.toml", service("a", 7001, body)))
    assert located(err) == [(3, "services.a.backends")]
    assert err.message == (
        "expected at least one backend with a weight above 0, got weight 0 for all 2 backends: "
        "the service could never serve"
    )
    one = 'backends = [{ address = "h:1", weight = 0 }, { address = "h:2", weight = 1 }]'
    assert load_config(write_config(tmp_path, "ok.toml", service("a", 7001, one)))
    doc = {"servers": [{"host": "a", "port": 1, "weight": 0}]}
    err = config_error(write_config(tmp_path, "config.json", json.dumps(doc)))
    assert (err.where, "the only backend" in err.message) == ("servers", True)


@pytest.mark.parametrize(
    ("body", "health", "reason"),
    [
        ([], "enabled = false", "health.enabled = false"),
        ([], "send = false", "health.send = false"),
        (['mode = "tcp"'], "", "tcp mode checks with a plain connect unless health.send is set"),
    ],
)
def test_auto_framing_needs_a_probe_to_detect_with(
    tmp_path: Path, body: list[str], health: str, reason: str
) -> None:
    text = service("a", 7001, 'backend_framing = "auto"', *body)
    if health:
        text += f"[services.a.health]\n{health}\n"
    err = config_error(write_config(tmp_path, "c.toml", text))
    assert located(err) == [(3, "services.a.backend_framing")]
    assert err.message == (
        "expected 'line' or 'raw' without a health probe, got 'auto': auto needs a check to "
        f"detect the framing with, and {reason}"
    )


def test_auto_framing_with_a_probe_loads(tmp_path: Path) -> None:
    text = service("a", 7001, 'backend_framing = "auto"') + "[services.a.health]\nexpect = false\n"
    svc = load_config(write_config(tmp_path, "c.toml", text)).service("a")
    assert (svc.backend_framing, svc.health.send) == ("auto", "!HEALTH_CHECK")


def test_max_buffered_must_hold_a_line_of_max_line(tmp_path: Path) -> None:
    text = service("a", 7001, "max_line = 1048576", "max_buffered = 65536")
    err = config_error(write_config(tmp_path, "c.toml", text))
    assert located(err) == [(4, "services.a.max_buffered")]
    assert err.message == "expected at least max_line (1048576 bytes), got 65536"


# ---------------------------------------------------------------- client framing


@pytest.mark.parametrize(
    ("body", "framing"),
    [
        ([], "line"),
        (['backend_framing = "raw"'], "auto"),
        (['backend_framing = "raw"', 'client_framing = "line"'], "line"),
        (['backend_framing = "auto"'], "line"),
        (['client_framing = "raw"'], "raw"),
        (['mode = "tcp"', 'backend_framing = "raw"'], "line"),
    ],
)
def test_client_framing_default_follows_backend_framing_in_message_mode(
    tmp_path: Path, body: list[str], framing: str
) -> None:
    svc = load_config(write_config(tmp_path, "c.toml", service("a", 7001, *body))).service("a")
    assert svc.client_framing == framing


def test_client_framing_is_for_message_mode_only(tmp_path: Path) -> None:
    text = service("a", 7001, 'mode = "tcp"', 'client_framing = "auto"')
    err = config_error(write_config(tmp_path, "c.toml", text))
    assert located(err) == [(4, "services.a.client_framing")]
    assert "expected no client_framing in tcp mode" in err.message


# ---------------------------------------------------------------- command-line values


def test_check_bound_holds_a_command_line_value_to_the_config_bounds() -> None:
    assert check_bound("health.interval", 60, source="command line", where="-refreshRate") == 60
    with pytest.raises(ConfigError) as info:
        check_bound("health.interval", 1e-6, source="command line", where="-refreshRate")
    assert str(info.value) == (
        "command line: -refreshRate: expected a number from 0.05 to 86400 seconds, got 1e-06"
    )
    with pytest.raises(ConfigError, match=r"expected an integer from 1 to 1000, got 2\.0"):
        check_bound("health.rise", 2.0, source="command line", where="--rise")


def test_discover_needs_a_discovery_table_and_a_target_it_knows(tmp_path: Path) -> None:
    text = (
        '[services.s]\nlisten = "127.0.0.1:0"\ndiscover = "a:web.test:8080"\nbackends = []\n'
        '[services.t]\nlisten = "127.0.0.1:0"\ndiscover = "mx:web.test"\nbackends = []\n'
    )
    messages = [str(e) for e in config_error(write_config(tmp_path, "c.toml", text)).errors]
    assert any("services.s.discover: expected a [discovery] table" in m for m in messages)
    assert any(
        'services.t.discover: expected "a:NAME:PORT", "srv:_service._tcp.NAME", "etcd"' in m
        for m in messages
    )
    bad = '[discovery]\nnameservers = ["dns.example"]\n' + text.replace("mx:", "srv:")
    errors = config_error(write_config(tmp_path, "d.toml", bad)).errors
    assert [e.where for e in errors] == ["discovery.nameservers"]


def test_etcd_discovery_settings_are_checked_all_at_once(tmp_path: Path) -> None:
    text = (
        '[discovery]\nkind = "etcd"\nprefix = "balancer/"\nnameservers = ["127.0.0.1"]\n'
        '[services.s]\nlisten = "127.0.0.1:0"\ndiscover = "etcd"\nbackends = []\n'
        '[services.t]\nlisten = "127.0.0.1:0"\ndiscover = "srv:_x._tcp.test"\nbackends = []\n'
        '[services.u]\nlisten = "127.0.0.1:0"\ndiscover = "etcd:no/slash"\nbackends = []\n'
    )
    errors = config_error(write_config(tmp_path, "c.toml", text)).errors
    by_key = {e.where: str(e) for e in errors}
    assert set(by_key) == {
        "discovery.endpoints",
        "discovery.prefix",
        "discovery.nameservers",
        "services.t.discover",
        "services.u.discover",
    }
    assert 'kind = "etcd" needs a list of "http://host:port"' in by_key["discovery.endpoints"]
    assert "got 'balancer/'" in by_key["discovery.prefix"]
    assert 'only with kind = "dns"' in by_key["discovery.nameservers"]
    assert 'needs [discovery] kind = "dns", and kind is "etcd"' in by_key["services.t.discover"]
    assert '"etcd" or "etcd:NAME"' in by_key["services.u.discover"]


@pytest.mark.parametrize(
    "endpoints",
    ['["127.0.0.1:2379"]', '["http://127.0.0.1:0"]', "[]", '"http://127.0.0.1:2379"', "[1]"],
)
def test_etcd_endpoints_are_urls_with_ports(tmp_path: Path, endpoints: str) -> None:
    text = (
        f'[discovery]\nkind = "etcd"\nendpoints = {endpoints}\n'
        '[services.s]\nlisten = "127.0.0.1:0"\ndiscover = "etcd"\nbackends = []\n'
    )
    errors = config_error(write_config(tmp_path, "c.toml", text)).errors
    assert [e.where for e in errors] == ["discovery.endpoints"]
    assert 'expected a list of 1 to 16 "http://host:port"' in str(errors[0])


def test_dns_discovery_refuses_etcd_settings(tmp_path: Path) -> None:
    text = (
        '[discovery]\nendpoints = ["http://127.0.0.1:2379"]\n'
        '[services.s]\nlisten = "127.0.0.1:0"\ndiscover = "etcd"\nbackends = []\n'
    )
    errors = config_error(write_config(tmp_path, "c.toml", text)).errors
    assert {e.where for e in errors} == {"discovery.endpoints", "services.s.discover"}
