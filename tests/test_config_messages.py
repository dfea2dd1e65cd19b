"""What a user reads when a file is wrong: the whole message, file, line and key included,
for the inputs whose errors are written by hand (nesting, huge numbers, admin hosts, the
JSON servers list, policy options) and what the command line's --admin keeps."""

from __future__ import annotations

from pathlib import Path

import pytest

from balancer.config import checks as config_checks
from balancer.config.addresses import host_problem, parse_address, parse_host
from balancer.config.bounds import as_number, show_value
from balancer.config.errors import ConfigError
from balancer.config.load import load, load_config
from balancer.config.model import BOUNDS, AdminConfig, BackendConfig, check_bound, parse_admin
from balancer.config.tutorial import config_from_backends
from tests.support import config_error, write_config

SERVICE = "[services.a]\nlisten = '127.0.0.1:1'\nbackends = ['127.0.0.1:2']\n"


def error_of(tmp_path: Path, name: str, text: str) -> str:
    """The whole error of a file `name` holding `text`, with the file named as `name`."""
    path = write_config(tmp_path, name, text)
    return str(config_error(path, "127.0.0.1:8080")).replace(str(path), name)


@pytest.mark.parametrize(
    ("name", "text", "error"),
    [
        (
            "a.toml",
            "x = " + "[" * 1000 + "]" * 1000 + "\n",
            "a.toml: invalid TOML: arrays or tables nested too deeply",
        ),
        (
            "a.json",
            "[" * 100_000 + "]" * 100_000,
            "a.json: invalid JSON: arrays or objects nested too deeply",
        ),
        (
            "a.toml",
            SERVICE + "[services.a.health]\ninterval = " + "9" * 5000 + "\n",
            "a.toml: line 5: invalid TOML: expected a number of at most 4300 digits, "
            "got a longer one",
        ),
        (
            "a.json",
            '{\n"servers": [\n{"host": "127.0.0.1", "port": ' + "9" * 5000 + "}]}",
            "a.json: line 3: invalid JSON: expected a number of at most 4300 digits, "
            "got a longer one",
        ),
        ("a.toml", SERVICE + "x = \n", "a.toml: line 4, column 5: invalid TOML: Invalid value"),
    ],
)
def test_unreadable_files_say_why_and_where(
    tmp_path: Path, name: str, text: str, error: str
) -> None:
    assert error_of(tmp_path, name, text) == error


@pytest.mark.parametrize("hosts", ["['a b', 'ok.example']", "'ok.example'", "[1]"])
def test_allowed_hosts_must_be_a_list_of_host_names(tmp_path: Path, hosts: str) -> None:
    shown = hosts.replace("'", "'")
    assert error_of(tmp_path, "a.toml", f"[admin]\nallowed_hosts = {hosts}\n" + SERVICE) == (
        "a.toml: line 2: admin.allowed_hosts: expected a list of host names "
        f'(as "admin.example" or "admin.example:9100"), got {shown}'
    )


def test_allowed_hosts_names_with_ports_load(tmp_path: Path) -> None:
    path = tmp_path / "a.toml"
    path.write_text("[admin]\nallowed_hosts = ['ok.example:81', 'lb.example']\n" + SERVICE)
    assert load(str(path), "127.0.0.1:8080").admin.allowed_hosts == (
        "ok.example:81",
        "lb.example",
    )


def test_the_json_servers_list_names_every_bad_entry(tmp_path: Path) -> None:
    text = (
        '{"servers": [{"host": "127.0.0.1", "port": 65536}, {"host": "127.0.0.1", "port": 65535},'
        ' {"host": "::1", "port": 80}, {"host": "256.1.1.1", "port": 80}, "127.0.0.1:99999",'
        ' {"host": "127.0.0.1", "port": 5, "wat": 1}, {"host": "127.0.0.1", "port": 0}]}'
    )
    assert error_of(tmp_path, "a.json", text) == "\n".join(
        [
            "a.json: 5 errors",
            "a.json: line 1: servers[0].port: expected an integer port 1..65535, got 65536",
            "a.json: line 1: servers[3].host: expected a host of letters, digits, '.', '-' "
            "and '_' (or an IPv6 address); 256.1.1.1 is not a valid IPv4 address, "
            "got '256.1.1.1'",
            'a.json: line 1: servers[4]: expected "host:port" with a port 1..65535, '
            "got '127.0.0.1:99999'",
            "a.json: line 1: servers[5].wat: unknown key 'wat'; expected one of: host, port, "
            "weight",
            "a.json: line 1: servers[6].port: expected an integer port 1..65535, got 0",
        ]
    )


def test_the_json_servers_list_takes_ipv6_and_the_highest_port(tmp_path: Path) -> None:
    path = tmp_path / "a.json"
    path.write_text(
        '{"servers": [{"host": "127.0.0.1", "port": 65535}, {"host": "::1", "port": 80,'
        ' "weight": 3}, "127.0.0.1:7"]}'
    )
    (service,) = load(str(path), "127.0.0.1:8080").services
    assert [(b.host, b.port, b.weight) for b in service.backends] == [
        ("127.0.0.1", 65535, 1),
        ("::1", 80, 3),
        ("127.0.0.1", 7, 1),
    ]


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ('{"servers": []}', "a.json: line 1: servers: expected at least one server, got []"),
        ("[1]", 'a.json: expected a JSON object with "services" or "servers", got [1]'),
        (
            '{"servers": [], "x": 1}',
            "a.json: 2 errors\n"
            "a.json: line 1: x: unknown key 'x'; expected one of: servers\n"
            "a.json: line 1: servers: expected at least one server, got []",
        ),
    ],
)
def test_a_json_servers_file_that_is_not_a_list_of_servers(
    tmp_path: Path, text: str, error: str
) -> None:
    assert error_of(tmp_path, "a.json", text) == error


@pytest.mark.parametrize(
    ("options", "error"),
    [
        (
            "algorithm = 'peak_ewma'\n[services.a.policy_options]\ndecy = 2\nprobe_every = 'x'\n",
            "a.toml: 2 errors\n"
            "a.toml: line 6: services.a.policy_options.decy: unknown key 'decy' for algorithm "
            "'peak_ewma' (did you mean 'decay'?)\n"
            "a.toml: line 7: services.a.policy_options.probe_every: unknown key 'probe_every' "
            "for algorithm 'peak_ewma' (did you mean 'probe'?)",
        ),
        (
            "algorithm = 'round_robin'\n[services.a.policy_options]\nzzz = 1\n",
            "a.toml: line 6: services.a.policy_options.zzz: unknown key 'zzz' for algorithm "
            "'round_robin'; it takes: none",
        ),
        (
            "algorithm = 'consistent_hash'\n[services.a.policy_options]\nsize = 7\n",
            "a.toml: line 6: services.a.policy_options.size: unknown key 'size' for algorithm "
            "'consistent_hash'; it takes: table_size",
        ),
        (
            "algorithm = 'round_robin'\npolicy_options = 5\n",
            "a.toml: line 5: services.a.policy_options: expected a table, got 5",
        ),
    ],
)
def test_policy_options_are_checked_against_the_algorithm(
    tmp_path: Path, options: str, error: str
) -> None:
    assert error_of(tmp_path, "a.toml", SERVICE + options) == error


def test_policy_options_keep_integers_as_integers(tmp_path: Path) -> None:
    path = tmp_path / "a.toml"
    path.write_text(
        SERVICE + "algorithm = 'peak_ewma'\n[services.a.policy_options]\ndecay = 2\n"
        "failure_penalty = 1.5\n"
    )
    (service,) = load(str(path), "127.0.0.1:8080").services
    assert service.policy_options == {"decay": 2, "failure_penalty": 1.5}
    assert type(service.policy_options["decay"]) is int


def test_the_command_lines_admin_address_replaces_only_where_it_listens(tmp_path: Path) -> None:
    path = tmp_path / "a.toml"
    path.write_text(
        "[admin]\nlisten = '127.0.0.1:9100'\ntoken = 'w'\nread_token = 'r'\n"
        "allowed_hosts = ['lb.example']\n" + SERVICE
    )
    given = AdminConfig(host="127.0.0.2", port=9999, enabled=False)
    admin = load(str(path), "127.0.0.1:8080", admin_listen=given).admin
    assert admin == AdminConfig(
        host="127.0.0.2",
        port=9999,
        enabled=False,
        token="w",
        read_token="r",
        allowed_hosts=("lb.example",),
    )
    txt = tmp_path / "config.txt"
    txt.write_text("127.0.0.1:5001\n")
    assert load(str(txt), "127.0.0.1:8080", admin_listen=given).admin == given


@pytest.mark.parametrize(
    ("ip", "family"),
    [("127.0.0.1", 4), ("::1", 6), ("fe80::1%lo", 6), ("a b", 0)],
)
def test_the_family_of_a_resolved_address(ip: str, family: int) -> None:
    assert config_checks._family(ip) == family


def test_a_wildcard_listener_overlaps_only_addresses_of_its_family(tmp_path: Path) -> None:
    def services(a: str, b: str) -> str:
        return (
            f"[services.a]\nlisten = '{a}'\nbackends = ['127.0.0.1:2']\n"
            f"[services.b]\nlisten = '{b}'\nbackends = ['127.0.0.1:3']\n"
        )

    assert error_of(tmp_path, "a.toml", services("0.0.0.0:7001", "127.0.0.1:7001")) == (
        "a.toml: line 5: services.b.listen: expected an address no other service listens on, "
        "got '127.0.0.1:7001' (already used by service 'a', listening on '0.0.0.0:7001')"
    )
    path = tmp_path / "ok.toml"
    path.write_text(services("[::]:7001", "127.0.0.1:7001"))
    assert len(load(str(path), "127.0.0.1:8080").services) == 2


def test_command_line_numbers_are_bounded_and_integers_where_the_key_takes_integers() -> None:
    assert check_bound("retries", 2, source="command line", where="--retries") == 2
    with pytest.raises(ConfigError) as fraction:
        check_bound("retries", 1.5, source="command line", where="--retries")
    assert str(fraction.value) == (
        f"command line: --retries: expected {BOUNDS['retries'].expected(True)}, got 1.5"
    )
    with pytest.raises(ConfigError):
        check_bound("retries", -1, source="command line", where="--retries")
    assert check_bound("connect_timeout", 0.5, source="command line", where="-t") == 0.5


def test_the_admin_address_of_the_command_line() -> None:
    assert parse_admin("127.0.0.2:9200", where="--admin", source="command line") == AdminConfig(
        host="127.0.0.2", port=9200
    )
    assert parse_admin("off", where="--admin", source="command line").enabled is False


def test_asking_a_config_for_a_service_it_lacks_names_it(tmp_path: Path) -> None:
    path = tmp_path / "a.toml"
    path.write_text(SERVICE)
    config = load(str(path), "127.0.0.1:8080")
    assert config.service("a").name == "a"
    with pytest.raises(KeyError) as missing:
        config.service("b")
    assert missing.value.args == ("b",)


@pytest.mark.parametrize(
    ("value", "number"),
    [(3, 3.0), (2.5, 2.5), (True, None), ("1", None), (float("inf"), None), (float("nan"), None)],
)
def test_what_counts_as_a_number(value: object, number: float | None) -> None:
    got = as_number(value)
    assert got == number or (got is None and number is None)


def test_values_in_messages_are_short_whatever_their_size() -> None:
    assert show_value(10**30 - 1) == repr(10**30 - 1)
    assert show_value(10**30) == "an integer of 31 digits"
    assert show_value(-(10**45) + 1) == "an integer of 45 digits"
    assert show_value(2**100) == "an integer of 31 digits"
    assert show_value(10**5000) == "an integer of 5001 digits"
    assert show_value("x" * 78) == repr("x" * 78)  # 80 characters with the quotes
    assert show_value("x" * 79) == repr("x" * 79)[:77] + "..."
    nested: list[object] = []
    for _ in range(100_000):
        nested = [nested]
    assert show_value(nested) == "a value too large to show"


@pytest.mark.parametrize(
    ("text", "bare_ipv6", "problem"),
    [
        ("[::1]", False, None),
        ("[10.0.0.1]", False, "the part in brackets must be an IPv6 address"),
        ("[::1", False, "an IPv6 address needs brackets, as in [::1]:8080"),
        ("::1]", False, "an IPv6 address needs brackets, as in [::1]:8080"),
        ("::1", False, "an IPv6 address needs brackets, as in [::1]:8080"),
        ("::1", True, None),
        ("a:b", True, "an IPv6 address needs brackets, as in [::1]:8080"),
        ("a b", False, "the host may hold letters, digits, '.', '-' and '_'"),
        ("256.1.1.1", False, "256.1.1.1 is not a valid IPv4 address"),
        ("backend-1.example", False, None),
    ],
)
def test_why_a_host_is_not_one(text: str, bare_ipv6: bool, problem: str | None) -> None:
    assert host_problem(text, bare_ipv6=bare_ipv6) == problem


def test_hosts_lose_their_brackets_and_bare_ipv6_is_taken_only_when_asked() -> None:
    assert parse_host("[fe80::1]") == "fe80::1"
    assert parse_host("fe80::1") is None
    assert parse_host("fe80::1", bare_ipv6=True) == "fe80::1"
    assert parse_host("example.org") == "example.org"


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("[::1]:8080", ("::1", 8080)),
        ("localhost:0", ("localhost", 0)),
        (":9000", ("localhost", 9000)),
        ("9000", ("localhost", 9000)),
        (" 127.0.0.1:1 ", ("127.0.0.1", 1)),
    ],
)
def test_listen_addresses(text: str, parsed: tuple[str, int]) -> None:
    got = parse_address(
        text, where="listen", source="t", default_host="localhost", allow_port_zero=True
    )
    assert got == parsed


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("[::1]8080", "t: listen: expected \"host:port\" with a port 1..65535, got '[::1]8080'"),
        (
            "]:80",
            't: listen: expected "host:port" with a port 1..65535; the host may hold '
            "letters, digits, '.', '-' and '_', got ']:80'",
        ),
        (
            "::1:80",
            't: listen: expected "host:port" with a port 1..65535; an IPv6 address '
            "needs brackets, as in [::1]:8080, got '::1:80'",
        ),
        (
            "a:b:c",
            't: listen: expected "host:port" with a port 1..65535; an IPv6 address '
            "needs brackets, as in [::1]:8080, got 'a:b:c'",
        ),
        ("9000", "t: listen: expected \"host:port\" with a port 1..65535, got '9000'"),
        (":9000", "t: listen: expected \"host:port\" with a port 1..65535, got ':9000'"),
        ("[]]:80", "t: listen: expected \"host:port\" with a port 1..65535, got '[]]:80'"),
    ],
)
def test_addresses_without_a_default_host(text: str, error: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_address(text, where="listen", source="t")
    assert str(caught.value) == error


def test_the_built_in_service_listens_where_it_is_told_and_names_its_source() -> None:
    config = config_from_backends([BackendConfig("127.0.0.1", 5001)], listen="9090")
    (service,) = config.services
    assert (service.listen_host, service.listen_port) == ("localhost", 9090)
    assert config.source == "<built-in>"
    with pytest.raises(ConfigError) as caught:
        config_from_backends([], listen="a b:1")
    assert str(caught.value).startswith("<built-in>: listen: expected")


def test_a_config_errors_args_are_where_it_is_and_what_it_says() -> None:
    error = ConfigError("f.toml", "services.a", "bad", line=3)
    assert error.args == ("f.toml", "services.a", "bad")


def test_load_config_passes_the_command_lines_admin_address(tmp_path: Path) -> None:
    path = tmp_path / "a.toml"
    path.write_text(SERVICE)
    given = AdminConfig(host="127.0.0.2", port=9999)
    assert load_config(path, admin_listen=given).admin == given


@pytest.mark.parametrize(
    ("extra", "error"),
    [
        (
            "[services.a.outlier]\nbase_ejection_time = 10\nmax_ejection_time = 5\n",
            "line 6: services.a.outlier.max_ejection_time: expected a number >= "
            "base_ejection_time (10), got 5",
        ),
        (
            "outlier = 5\n",
            "line 4: services.a.outlier: expected a table of outlier detection settings, got 5",
        ),
        (
            "[services.a.health]\nsend = false\nexpect = 'x'\n",
            "line 6: services.a.health.expect: expected no reply check when send = false "
            "(there is no probe to reply to), got 'x'",
        ),
        (
            "[services.a.health]\nsend = ''\n",
            "line 5: services.a.health.send: expected a non-empty one-line string, or false "
            "to disable, got ''",
        ),
        (
            "mode = 'tcp'\nhash_key = 'message'\nalgorithm = 'consistent_hash'\n",
            "line 5: services.a.hash_key: expected 'source' in tcp mode ('message' needs "
            "mode = \"message\"), got 'message'",
        ),
        (
            "slow_start = 5\nalgorithm = 'round_robin'\n",
            "line 4: services.a.slow_start: expected 0 with algorithm 'round_robin', which "
            "ignores weights; slow start needs weighted_round_robin, least_connections, "
            "random, power_of_two or peak_ewma, got 5",
        ),
        (
            "mode = 'tcp'\nclient_framing = 'line'\n",
            "line 5: services.a.client_framing: expected no client_framing in tcp mode (it "
            "relays bytes as they come), got 'line'",
        ),
        (
            "max_line = 100000\nmax_buffered = 65536\n",
            "line 5: services.a.max_buffered: expected at least max_line (100000 bytes), got 65536",
        ),
    ],
)
def test_settings_that_contradict_each_other_are_named(
    tmp_path: Path, extra: str, error: str
) -> None:
    assert error_of(tmp_path, "a.toml", SERVICE + extra) == f"a.toml: {error}"


def test_backend_entries_are_addresses_or_tables(tmp_path: Path) -> None:
    text = (
        "[services.a]\nlisten = '127.0.0.1:1'\nbackends = [{address = '127.0.0.1:2', "
        "weight = 2000}, {address = '127.0.0.1:3', weight = 0}, 5]\n"
    )
    assert error_of(tmp_path, "a.toml", text) == "\n".join(
        [
            "a.toml: 2 errors",
            "a.toml: line 3: services.a.backends[0].weight: expected an integer from 0 to "
            "1000, got 2000",
            'a.toml: line 3: services.a.backends[2]: expected "host:port" or a table '
            '{ address = "host:port", weight = N }, got 5',
        ]
    )
    path = tmp_path / "ok.toml"
    path.write_text(
        "[services.a]\nlisten = '127.0.0.1:1'\nbackends = [{address = '127.0.0.1:2', "
        "weight = 7}, '127.0.0.1:3']\n"
    )
    (service,) = load(str(path), "127.0.0.1:8080").services
    assert [(b.port, b.weight) for b in service.backends] == [(2, 7), (3, 1)]


def test_the_tutorials_text_format_skips_comments_and_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "config.txt"
    path.write_text("# c\n\n127.0.0.1 5001 # first\n  \n127.0.0.1:5002\nlocalhost 5003\n")
    (service,) = load(str(path), "127.0.0.1:8080").services
    assert [(b.host, b.port) for b in service.backends] == [
        ("127.0.0.1", 5001),
        ("127.0.0.1", 5002),
        ("localhost", 5003),
    ]
    assert error_of(tmp_path, "b.txt", "# c\n\n127.0.0.1 5001\n  \nbad line\n") == (
        "b.txt: line 5: expected a port 1..65535, got 'line'"
    )
    assert error_of(tmp_path, "c.txt", "# only comments\n\n") == (
        'c.txt: no backends: expected at least one "host port" line'
    )


def test_the_default_listen_address_comes_from_the_command_line(tmp_path: Path) -> None:
    path = tmp_path / "config.txt"
    path.write_text("127.0.0.1:5001\n")
    (service,) = load(str(path), ":7000").services
    assert (service.listen_host, service.listen_port) == ("localhost", 7000)
    with pytest.raises(ConfigError) as caught:
        load(str(path), "nope nope")
    assert str(caught.value) == (
        '<command line>: listen: expected "host:port" with a port 0..65535 (or just a port), '
        "got 'nope nope'"
    )


def test_a_json_services_file_keeps_its_admin_token_under_the_command_lines_address(
    tmp_path: Path,
) -> None:
    path = tmp_path / "a.json"
    path.write_text(
        '{"services": {"a": {"listen": "127.0.0.1:1", "backends": ["127.0.0.1:2"]}},'
        ' "admin": {"token": "w"}}'
    )
    given = AdminConfig(host="127.0.0.3", port=1)
    assert load(str(path), "127.0.0.1:8080", admin_listen=given).admin == AdminConfig(
        host="127.0.0.3", port=1, token="w"
    )


def test_an_unknown_key_without_a_close_match_lists_the_tables_keys_in_order(
    tmp_path: Path,
) -> None:
    """The keys come from the model's fields: settings in field order, tables last."""
    top = error_of(tmp_path, "a.toml", "zzzzzzzz = 1\n" + SERVICE)
    assert top == (
        "a.toml: line 1: zzzzzzzz: unknown key 'zzzzzzzz'; expected one of: drain_timeout, "
        "drain_close_window, workers, access_log, admin, discovery, services"
    )
    admin = error_of(tmp_path, "a.toml", "[admin]\nzzzzzzzz = 1\n" + SERVICE)
    assert admin == (
        "a.toml: line 2: admin.zzzzzzzz: unknown key 'zzzzzzzz'; expected one of: listen, "
        "token, read_token, read_access, allowed_hosts, enabled"
    )
    service = error_of(tmp_path, "a.toml", SERVICE + "zzzzzzzz = 1\n")
    assert service == (
        "a.toml: line 4: services.a.zzzzzzzz: unknown key 'zzzzzzzz'; expected one of: listen, "
        "mode, algorithm, backend_framing, client_framing, max_line, retries, connect_timeout, "
        "response_timeout, backend_connections, hash_key, hash_balance_factor, slow_start, "
        "policy_options, client_timeout, idle_timeout, max_connections, "
        "max_backend_connections, connect_buffer, engine, max_backend_requests, queue_size, "
        "queue_timeout, retry_budget_percent, retry_budget_min, max_buffered, accept_proxy, "
        "accept_proxy_from, proxy_timeout, send_proxy, client_hello_timeout, discover, "
        "backend_tls, backends, health, http, outlier, routes, sni_routes, tls"
    )
    backend = error_of(tmp_path, "a.toml", SERVICE.replace("['127.0.0.1:2']", "[{ zzzzzzzz = 1 }]"))
    assert "backends[0].zzzzzzzz: unknown key 'zzzzzzzz'; expected one of: address, weight" in (
        backend
    )
