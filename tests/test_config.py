"""Config loading: every format, every validation error, and the text format as a property."""

from __future__ import annotations

import dataclasses
import json
import string
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from balancer.config.addresses import parse_address
from balancer.config.discovery import DiscoveryConfig
from balancer.config.errors import ConfigError
from balancer.config.load import load_config
from balancer.config.model import (
    BOUNDS,
    INTEGER_KEYS,
    AdminConfig,
    BackendConfig,
    BackendTlsConfig,
    CertConfig,
    Config,
    HealthConfig,
    HttpConfig,
    OutlierConfig,
    RouteConfig,
    ServiceConfig,
    SniRouteConfig,
    TlsConfig,
    parse_admin,
)
from balancer.config.policies import ALGORITHMS
from balancer.config.schema import TABLE_KEYS
from balancer.config.tutorial import config_from_backends
from tests.config_files import write_named_files
from tests.support import config_error, write_config

FULL_TOML = """\
drain_timeout = 10          # optional, seconds
drain_close_window = 2
workers = 2
access_log = true
[admin]
listen = "127.0.0.1:9100"
token = "s3cret"
read_token = "r3ad"
read_access = "token"
allowed_hosts = ["admin.example", "Admin.Example:9100"]
enabled = true
[discovery]
kind = "dns"
interval = 10
timeout = 1.5
nameservers = ["127.0.0.1:5353", "::1"]
[services.numbers]
listen = "127.0.0.1:8080"
mode = "message"
algorithm = "round_robin"
backend_framing = "line"
client_framing = "auto"
max_line = 65536
retries = 2
connect_timeout = 2.0
response_timeout = 30.0
backend_connections = 4
hash_key = "source"
hash_balance_factor = 0
slow_start = 0
client_timeout = 120
max_connections = 5000
max_backend_requests = 64
queue_size = 256
queue_timeout = 2.5
retry_budget_percent = 10
retry_budget_min = 5
max_buffered = 1048576
backends = ["localhost:8090", "localhost:8091", { address = "localhost:8092", weight = 2 }]
[services.numbers.health]
interval = 2
timeout = 1
rise = 2
fall = 3
jitter = 0.1
type = "line"
send = "!HEALTH_CHECK"
expect = "!HEALTH_CHECK"
enabled = true
[services.numbers.outlier]
consecutive_failures = 3
base_ejection_time = 1
max_ejection_time = 30
max_ejection_percent = 34
enabled = true

[services.raw]
listen = "127.0.0.1:8081"
mode = "tcp"
backend_framing = "raw"
max_line = 1024
retries = 0
connect_timeout = 0.5
response_timeout = 5
backend_connections = 1
hash_balance_factor = 1.25
algorithm = "least_connections"
slow_start = 30
idle_timeout = 600
max_connections = 100
max_backend_connections = 10
connect_buffer = 65536
engine = "uvloop"
accept_proxy = true
accept_proxy_from = ["10.0.0.0/8", "::1"]
proxy_timeout = 2.5
send_proxy = "v1"
client_hello_timeout = 3
backends = ["[::1]:9000", { address = "127.0.0.1:9001", weight = 0 }]
[[services.raw.sni_routes]]
service = "mail"
server_names = ["mail.example", "*.Mail.Example."]
[services.raw.health]
interval = 0.5
jitter = 0

[services.mail]
listen = "127.0.0.1:8086"
mode = "tcp"
backends = ["127.0.0.1:9006"]

[services.hash]
listen = "127.0.0.1:8082"
algorithm = "consistent_hash"
hash_key = "message"
backends = ["127.0.0.1:9002"]
policy_options = { table_size = 1009 }

[services.ewma]
listen = "127.0.0.1:8083"
algorithm = "peak_ewma"
backends = ["127.0.0.1:9003"]
[services.ewma.policy_options]
decay = 5
default_latency = 0.002
failure_penalty = 1
probe = 0.05

[services.web]
listen = "127.0.0.1:8084"
mode = "http"
send_proxy = "v2"
backends = ["127.0.0.1:9004"]
[services.web.tls]
min_version = "1.3"
ciphers = "ECDHE+AESGCM"
alpn = ["h2", "http/1.1"]
client_ca = "certs/clients.pem"
verify_client = "optional"
handshake_timeout = 4
subject_header = "X-Subject"
[[services.web.tls.certs]]
cert = "certs/web.pem"
key = "certs/web.key"
[[services.web.tls.certs]]
cert = "certs/api.pem"
key = "certs/api.key"
server_names = ["api.example", "*.api.example"]
[[services.web.routes]]
service = "api"
hosts = ["api.example", "*.api.example"]
path_prefix = "/v1"
methods = ["GET"]
headers = { "X-Canary" = "1" }
[services.web.http]
max_header_bytes = 8192
max_headers = 50
header_timeout = 5
request_body_timeout = 30
response_header_timeout = 10
keepalive_timeout = 15
upstream_idle_timeout = 2
max_idle = 8
max_requests_per_connection = 1000
max_body_bytes = 1048576
replay_buffer = 4096
retry_on_status = [503, 502]
retry_non_idempotent = true
trusted_proxies = ["10.0.0.0/8", "::1"]
forwarded = true
via = "lb1"
request_id = false
set_headers = { "X-Env" = "prod" }
remove_headers = ["X-Debug"]
strip_prefix = "/api"
host_rewrite = "internal.example"
tunnel_timeout = 600
sticky_cookie = "lb"
[services.web.health]
type = "http"
method = "HEAD"
path = "/healthz?full=1"
host = "web.internal:8080"
expect_status = [200, "300-304"]
disable_on_404 = true

[services.api]
listen = "127.0.0.1:8085"
mode = "http"
backends = ["127.0.0.1:9005"]
[services.api.health]
type = "http"
expect_status = "200-299"
expect_body = "ok"
[services.api.tls]
cert = "api.pem"
key = "api.key"
[services.api.backend_tls]
ca = "certs/internal-ca.pem"
server_name = "API.Internal."
verify = false
client_cert = "certs/lb.pem"
client_key = "certs/lb.key"
min_version = "1.3"
alpn = ["http/1.1"]

[services.found]
listen = "127.0.0.1:8089"
discover = "srv:_api._tcp.internal"
backends = []
"""

FULL_SERVERS_JSON = {
    "servers": [{"host": "localhost", "port": 8090, "weight": 2}, "localhost:8091"]
}

TUTORIAL_TXT = "localhost 8090\nlocalhost 8091\nlocalhost 8092\nlocalhost 8093\n"

TUTORIAL_BACKENDS = tuple(BackendConfig("localhost", p) for p in (8090, 8091, 8092, 8093))

MINIMAL = '[services.numbers]\nlisten = "127.0.0.1:8080"\nbackends = ["localhost:8090"]\n'


def assert_error(err: ConfigError, path: Path, where: str, *fragments: str) -> None:
    """The (first) message names the file, the location, and each expected fragment."""
    text = err.describe()
    assert str(err).startswith(text if not err.more else f"{path}: {len(err.errors)} errors\n")
    line = f"line {err.line}: " if err.line is not None and not where.startswith("line ") else ""
    prefix = f"{path}: {line}{where}: " if where else f"{path}: "
    assert text.startswith(prefix), text
    assert err.source == str(path)
    assert err.where == where
    for fragment in fragments:
        assert fragment in text, f"{fragment!r} not in {text!r}"


# ---------------------------------------------------------------- valid files


def test_full_toml_loads_every_key(tmp_path: Path) -> None:
    write_named_files(tmp_path, tomllib.loads(FULL_TOML))
    path = write_config(tmp_path, "config.toml", FULL_TOML)
    certs = tmp_path / "certs"
    expected = Config(
        services=(
            ServiceConfig(
                name="numbers",
                listen_host="127.0.0.1",
                listen_port=8080,
                backends=(
                    BackendConfig("localhost", 8090),
                    BackendConfig("localhost", 8091),
                    BackendConfig("localhost", 8092, weight=2),
                ),
                client_framing="auto",
                client_timeout=120.0,
                max_connections=5000,
                max_backend_requests=64,
                queue_size=256,
                queue_timeout=2.5,
                retry_budget_percent=10.0,
                retry_budget_min=5,
                max_buffered=1048576,
                outlier=OutlierConfig(
                    consecutive_failures=3,
                    base_ejection_time=1.0,
                    max_ejection_time=30.0,
                    max_ejection_percent=34.0,
                ),
            ),
            ServiceConfig(
                name="raw",
                listen_host="127.0.0.1",
                listen_port=8081,
                backends=(BackendConfig("::1", 9000), BackendConfig("127.0.0.1", 9001, 0)),
                mode="tcp",
                backend_framing="raw",
                max_line=1024,
                retries=0,
                connect_timeout=0.5,
                response_timeout=5.0,
                backend_connections=1,
                hash_balance_factor=1.25,
                algorithm="least_connections",
                slow_start=30.0,
                idle_timeout=600.0,
                max_connections=100,
                max_backend_connections=10,
                connect_buffer=65536,
                engine="uvloop",
                health=HealthConfig(interval=0.5, jitter=0.0, send=None, expect=None),
                accept_proxy=True,
                accept_proxy_from=("10.0.0.0/8", "::1"),
                proxy_timeout=2.5,
                send_proxy="v1",
                client_hello_timeout=3.0,
                sni_routes=(SniRouteConfig("mail", ("mail.example", "*.mail.example")),),
            ),
            ServiceConfig(
                name="mail",
                listen_host="127.0.0.1",
                listen_port=8086,
                backends=(BackendConfig("127.0.0.1", 9006),),
                mode="tcp",
                health=HealthConfig(send=None, expect=None),
            ),
            ServiceConfig(
                name="hash",
                listen_host="127.0.0.1",
                listen_port=8082,
                backends=(BackendConfig("127.0.0.1", 9002),),
                algorithm="consistent_hash",
                hash_key="message",
                policy_options={"table_size": 1009.0},
            ),
            ServiceConfig(
                name="ewma",
                listen_host="127.0.0.1",
                listen_port=8083,
                backends=(BackendConfig("127.0.0.1", 9003),),
                algorithm="peak_ewma",
                policy_options={
                    "decay": 5.0,
                    "default_latency": 0.002,
                    "failure_penalty": 1.0,
                    "probe": 0.05,
                },
            ),
            ServiceConfig(
                name="web",
                listen_host="127.0.0.1",
                listen_port=8084,
                backends=(BackendConfig("127.0.0.1", 9004),),
                mode="http",
                http=HttpConfig(
                    max_header_bytes=8192,
                    max_headers=50,
                    header_timeout=5.0,
                    request_body_timeout=30.0,
                    response_header_timeout=10.0,
                    keepalive_timeout=15.0,
                    upstream_idle_timeout=2.0,
                    max_idle=8,
                    max_requests_per_connection=1000,
                    max_body_bytes=1048576,
                    replay_buffer=4096,
                    retry_on_status=(502, 503),
                    retry_non_idempotent=True,
                    trusted_proxies=("10.0.0.0/8", "::1"),
                    forwarded=True,
                    via="lb1",
                    request_id=False,
                    set_headers=(("X-Env", "prod"),),
                    remove_headers=("X-Debug",),
                    strip_prefix="/api",
                    host_rewrite="internal.example",
                    tunnel_timeout=600.0,
                    sticky_cookie="lb",
                ),
                health=HealthConfig(
                    type="http",
                    method="HEAD",
                    path="/healthz?full=1",
                    host="web.internal:8080",
                    expect_status=((200, 200), (300, 304)),
                    disable_on_404=True,
                ),
                routes=(
                    RouteConfig(
                        "api",
                        hosts=("api.example", "*.api.example"),
                        path_prefix="/v1",
                        methods=("GET",),
                        headers=(("X-Canary", "1"),),
                    ),
                ),
                send_proxy="v2",
                tls=TlsConfig(
                    certs=(
                        CertConfig(str(certs / "web.pem"), str(certs / "web.key")),
                        CertConfig(
                            str(certs / "api.pem"),
                            str(certs / "api.key"),
                            ("api.example", "*.api.example"),
                        ),
                    ),
                    min_version="1.3",
                    ciphers="ECDHE+AESGCM",
                    alpn=("h2", "http/1.1"),
                    client_ca=str(certs / "clients.pem"),
                    verify_client="optional",
                    handshake_timeout=4.0,
                    subject_header="X-Subject",
                ),
            ),
            ServiceConfig(
                name="api",
                listen_host="127.0.0.1",
                listen_port=8085,
                backends=(BackendConfig("127.0.0.1", 9005),),
                mode="http",
                health=HealthConfig(type="http", expect_status=((200, 299),), expect_body="ok"),
                tls=TlsConfig(
                    certs=(CertConfig(str(tmp_path / "api.pem"), str(tmp_path / "api.key")),)
                ),
                backend_tls=BackendTlsConfig(
                    ca=str(certs / "internal-ca.pem"),
                    server_name="api.internal",
                    verify=False,
                    client_cert=str(certs / "lb.pem"),
                    client_key=str(certs / "lb.key"),
                    min_version="1.3",
                    alpn=("http/1.1",),
                ),
            ),
            ServiceConfig(
                name="found",
                listen_host="127.0.0.1",
                listen_port=8089,
                backends=(),
                discover="srv:_api._tcp.internal",
            ),
        ),
        admin=AdminConfig(
            host="127.0.0.1",
            port=9100,
            token="s3cret",
            read_token="r3ad",
            read_access="token",
            allowed_hosts=("admin.example", "admin.example:9100"),
        ),
        drain_timeout=10.0,
        drain_close_window=2.0,
        workers=2,
        access_log=True,
        discovery=DiscoveryConfig(
            interval=10.0, timeout=1.5, nameservers=("127.0.0.1:5353", "::1")
        ),
        source=str(path),
    )
    assert load_config(path) == expected


def _keys_by_table(doc: dict[str, Any]) -> dict[str, set[str]]:
    """The keys `doc` (a TOML-shaped mapping) sets, by table in `TABLE_KEYS` terms."""
    found: dict[str, set[str]] = {name: set() for name in TABLE_KEYS}
    found[""] = set(doc)
    found["admin"] = set(doc.get("admin", {}))
    found["discovery"] = set(doc.get("discovery", {}))
    for svc in doc.get("services", {}).values():
        found["services.NAME"] |= set(svc)
        found["services.NAME.health"] |= set(svc.get("health", {}))
        found["services.NAME.outlier"] |= set(svc.get("outlier", {}))
        found["services.NAME.http"] |= set(svc.get("http", {}))
        for route in svc.get("routes", []):
            found["services.NAME.routes[]"] |= set(route)
        found["services.NAME.tls"] |= set(svc.get("tls", {}))
        for cert in svc.get("tls", {}).get("certs", []):
            found["services.NAME.tls.certs[]"] |= set(cert)
        found["services.NAME.backend_tls"] |= set(svc.get("backend_tls", {}))
        for route in svc.get("sni_routes", []):
            found["services.NAME.sni_routes[]"] |= set(route)
        for backend in svc.get("backends", []):
            if isinstance(backend, dict):
                found["services.NAME.backends[]"] |= set(backend)
    for server in doc.get("servers", []):
        if isinstance(server, dict):
            found["servers[]"] |= set(server)
    return found


FULL_ETCD_TOML = """
[discovery]
kind = "etcd"
endpoints = ["http://127.0.0.1:2379", "http://[::1]:2379"]
prefix = "/prod/lb"
interval = 2
timeout = 0.5
[services.web]
listen = "127.0.0.1:0"
discover = "etcd:web-backends"
backends = []
"""
"""The `[discovery]` keys FULL_TOML (kind dns) cannot have."""


def test_the_etcd_example_is_what_it_says(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, "etcd.toml", FULL_ETCD_TOML))
    assert config.discovery == DiscoveryConfig(
        kind="etcd",
        interval=2.0,
        timeout=0.5,
        endpoints=("http://127.0.0.1:2379", "http://[::1]:2379"),
        prefix="/prod/lb",
    )
    assert config.services[0].discover == "etcd:web-backends"
    assert config.services[0].backends == ()


def test_the_full_examples_hold_every_key_the_loader_knows() -> None:
    """A key added to the loader must be added to FULL_TOML (or FULL_SERVERS_JSON, or
    FULL_ETCD_TOML) too."""
    doc = tomllib.loads(FULL_TOML)
    found = _keys_by_table(doc)
    found["servers[]"] = _keys_by_table(FULL_SERVERS_JSON)["servers[]"]
    found["discovery"] |= _keys_by_table(tomllib.loads(FULL_ETCD_TOML))["discovery"]
    assert found == {name: set(keys) for name, keys in TABLE_KEYS.items()}
    options: dict[str, set[str]] = {}
    for svc in doc["services"].values():
        options.setdefault(svc.get("algorithm", "round_robin"), set()).update(
            svc.get("policy_options", {})
        )
    for name, policy in ALGORITHMS.items():
        if policy.options:
            assert options.get(name) == set(policy.options), name


def test_every_number_of_the_config_model_is_bounded() -> None:
    """Each int or float field of the model has its BOUNDS entry, integers in INTEGER_KEYS."""
    numeric: dict[str, str] = {}
    models = (
        ("", Config),
        ("", ServiceConfig),
        ("", BackendConfig),
        ("health.", HealthConfig),
        ("outlier.", OutlierConfig),
        ("http.", HttpConfig),
        ("tls.", TlsConfig),
        ("tls.certs[].", CertConfig),
        ("backend_tls.", BackendTlsConfig),
        ("sni_routes[].", SniRouteConfig),
        ("discovery.", DiscoveryConfig),
    )
    for prefix, cls in models:
        for f in dataclasses.fields(cls):
            if f.type in ("int", "float") and f.name not in ("listen_port", "port"):
                numeric[prefix + f.name] = str(f.type)
    assert set(numeric) == set(BOUNDS)
    assert {name for name, kind in numeric.items() if kind == "int"} == INTEGER_KEYS


def test_toml_defaults_come_from_the_dataclasses(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, "config.toml", MINIMAL))
    assert config == Config(
        services=(
            ServiceConfig("numbers", "127.0.0.1", 8080, (BackendConfig("localhost", 8090),)),
        ),
        source=str(tmp_path / "config.toml"),
    )
    assert config.services[0].health == HealthConfig()
    assert config.admin == AdminConfig()


def test_ipv6_addresses_print_with_brackets(tmp_path: Path) -> None:
    text = '[services.v6]\nlisten = "[::1]:0"\nbackends = ["[::1]:8090"]\n'
    svc = load_config(write_config(tmp_path, "config.toml", text)).service("v6")
    assert svc.listen == "[::1]:0"
    assert svc.backends[0].address == "[::1]:8090"


def test_tcp_health_table_without_probe_is_a_connect_check(tmp_path: Path) -> None:
    text = (
        '[services.db]\nlisten = "127.0.0.1:6380"\nmode = "tcp"\nbackends = ["127.0.0.1:6379"]\n'
        "[services.db.health]\nrise = 1\n"
    )
    health = load_config(write_config(tmp_path, "config.toml", text)).service("db").health
    assert (health.send, health.expect, health.rise) == (None, None, 1)


def test_tcp_service_may_still_set_a_probe(tmp_path: Path) -> None:
    text = (
        '[services.db]\nlisten = "127.0.0.1:6380"\nmode = "tcp"\nbackends = ["127.0.0.1:6379"]\n'
        '[services.db.health]\nsend = "PING"\nexpect = "+PONG"\n'
    )
    health = load_config(write_config(tmp_path, "config.toml", text)).service("db").health
    assert (health.send, health.expect) == ("PING", "+PONG")


def test_send_false_disables_the_probe_and_reply_check(tmp_path: Path) -> None:
    text = MINIMAL + "[services.numbers.health]\nsend = false\n"
    health = load_config(write_config(tmp_path, "config.toml", text)).service("numbers").health
    assert (health.send, health.expect) == (None, None)


def test_expect_false_accepts_any_reply(tmp_path: Path) -> None:
    text = MINIMAL + "[services.numbers.health]\nexpect = false\n"
    health = load_config(write_config(tmp_path, "config.toml", text)).service("numbers").health
    assert (health.send, health.expect) == ("!HEALTH_CHECK", None)


def test_service_without_listen_uses_default_listen(tmp_path: Path) -> None:
    text = '[services.numbers]\nbackends = ["localhost:8090"]\n'
    config = load_config(
        write_config(tmp_path, "config.toml", text), default_listen="127.0.0.1:7000"
    )
    assert config.service("numbers").listen == "127.0.0.1:7000"


def test_listen_port_only_takes_the_default_host(tmp_path: Path) -> None:
    text = '[services.numbers]\nlisten = "9000"\nbackends = ["localhost:8090"]\n'
    config = load_config(
        write_config(tmp_path, "config.toml", text), default_listen="127.0.0.1:7000"
    )
    assert config.service("numbers").listen == "127.0.0.1:9000"


@pytest.mark.parametrize(
    ("admin", "expected"),
    [
        ('listen = "off"', AdminConfig(enabled=False)),
        ('listen = "127.0.0.1:0"', AdminConfig(port=0)),
        ('listen = "9200"', AdminConfig(port=9200)),
        ("enabled = false", AdminConfig(enabled=False)),
        ('token = "t"', AdminConfig(token="t")),
    ],
)
def test_admin_table(tmp_path: Path, admin: str, expected: AdminConfig) -> None:
    path = write_config(tmp_path, "config.toml", f"[admin]\n{admin}\n" + MINIMAL)
    assert load_config(path).admin == expected


def test_tutorial_config_txt(tmp_path: Path) -> None:
    path = write_config(tmp_path, "config.txt", TUTORIAL_TXT)
    tutorial = ServiceConfig(
        "default",
        "localhost",
        8080,
        TUTORIAL_BACKENDS,
        client_framing="auto",
        backend_framing="auto",
    )
    assert load_config(path) == Config(services=(tutorial,), source=str(path))


def test_text_format_comments_colons_crlf_and_ipv6(tmp_path: Path) -> None:
    text = (
        "# backends\r\n\r\nlocalhost 8090   # first\r\n\tlocalhost:8091\r\n"
        "::1 8092\r\n[::1]:8093\r\n   # indented comment\r\n"
    )
    config = load_config(
        write_config(tmp_path, "backends.conf", text), default_listen="127.0.0.1:0"
    )
    svc = config.service("default")
    assert svc.listen == "127.0.0.1:0"
    assert [b.address for b in svc.backends] == [
        "localhost:8090",
        "localhost:8091",
        "[::1]:8092",
        "[::1]:8093",
    ]


def test_json_servers_form_equals_the_text_form(tmp_path: Path) -> None:
    servers = [{"host": "localhost", "port": p} for p in (8090, 8091, 8092, 8093)]
    path = write_config(tmp_path, "config.json", json.dumps({"servers": servers}))
    expected = load_config(write_config(tmp_path, "config.txt", TUTORIAL_TXT))
    assert load_config(path) == Config(services=expected.services, source=str(path))


def test_json_servers_form_with_weight(tmp_path: Path) -> None:
    doc = {"servers": [{"host": "localhost", "port": 8090, "weight": 3}, "localhost:8091"]}
    svc = load_config(write_config(tmp_path, "config.json", json.dumps(doc))).service("default")
    assert svc.backends == (BackendConfig("localhost", 8090, 3), BackendConfig("localhost", 8091))


def test_json_services_form_equals_toml(tmp_path: Path) -> None:
    doc = tomllib.loads(FULL_TOML)
    write_named_files(tmp_path, doc)
    from_json = load_config(write_config(tmp_path, "config.json", json.dumps(doc, indent=2)))
    from_toml = load_config(write_config(tmp_path, "config.toml", FULL_TOML))
    assert from_json == Config(**{**vars(from_toml), "source": from_json.source})


def test_json_servers_form_with_every_key(tmp_path: Path) -> None:
    path = write_config(tmp_path, "config.json", json.dumps(FULL_SERVERS_JSON))
    (svc,) = load_config(path).services
    assert svc.backends == (BackendConfig("localhost", 8090, 2), BackendConfig("localhost", 8091))


def test_utf8_bom_is_tolerated(tmp_path: Path) -> None:
    path = tmp_path / "config.txt"
    path.write_bytes(b"\xef\xbb\xbf" + TUTORIAL_TXT.encode())
    assert load_config(path).services[0].backends == TUTORIAL_BACKENDS


def test_extension_is_case_insensitive(tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, "CONFIG.TOML", MINIMAL))
    assert config.service("numbers").listen == "127.0.0.1:8080"


def test_config_from_backends() -> None:
    config = config_from_backends(TUTORIAL_BACKENDS, listen="127.0.0.1:8080")
    assert config.services == (
        ServiceConfig(
            "default",
            "127.0.0.1",
            8080,
            TUTORIAL_BACKENDS,
            client_framing="auto",
            backend_framing="auto",
        ),
    )


# ---------------------------------------------------------------- addresses


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("localhost:8080", ("localhost", 8080)),
        ("127.0.0.1:1", ("127.0.0.1", 1)),
        ("[::1]:65535", ("::1", 65535)),
        ("[fe80::1%eth0]:80", ("fe80::1%eth0", 80)),
        ("  my-host.example_1:80 ", ("my-host.example_1", 80)),
    ],
)
def test_parse_address_valid(text: str, expected: tuple[str, int]) -> None:
    assert parse_address(text, where="x", source="s") == expected


@pytest.mark.parametrize(
    ("text", "hint"),
    [
        ("localhost", 'expected "host:port" with a port 1..65535'),
        ("localhost:", "port 1..65535"),
        ("localhost:0", "port 1..65535"),
        ("localhost:65536", "port 1..65535"),
        ("localhost:-1", "port 1..65535"),
        ("localhost:80a", "port 1..65535"),
        (":8080", 'expected "host:port"'),
        ("::1:8080", "needs brackets, as in [::1]:8080"),
        ("[::1]8080", 'expected "host:port"'),
        ("[nothost]:80", "must be an IPv6 address"),
        ("bad host:80", "the host may hold"),
        ("", 'expected "host:port"'),
    ],
)
def test_parse_address_invalid(text: str, hint: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_address(text, where="services.a.backends[0]", source="c.toml")
    message = str(info.value)
    assert message.startswith("c.toml: services.a.backends[0]: ")
    assert hint in message
    assert f"got {text!r}" in message


def test_parse_address_default_host_and_port_zero() -> None:
    assert parse_address(":0", where="x", source="s", default_host="h", allow_port_zero=True) == (
        "h",
        0,
    )
    assert parse_address("80", where="x", source="s", default_host="h") == ("h", 80)
    with pytest.raises(ConfigError, match=r"port 1\.\.65535 \(or just a port\), got '0'"):
        parse_address("0", where="x", source="s", default_host="h")
    with pytest.raises(ConfigError, match="got 'abc'"):
        parse_address("abc", where="x", source="s", default_host="h")


def test_parse_admin() -> None:
    assert parse_admin("off", where="--admin", source="<command line>") == AdminConfig(
        enabled=False
    )
    assert parse_admin("127.0.0.1:9999", where="--admin", source="<command line>").port == 9999
    with pytest.raises(ConfigError, match=r"^<command line>: --admin: expected .* got 'nope'$"):
        parse_admin("nope", where="--admin", source="<command line>")


# ---------------------------------------------------------------- TOML errors

SVC = '[services.numbers]\nlisten = "127.0.0.1:8080"\n'
BACKENDS = 'backends = ["localhost:8090"]\n'


@pytest.mark.parametrize(
    ("text", "where", "fragments"),
    [
        # unknown keys, with a suggestion when one is close
        (
            SVC + BACKENDS + "retrys = 3\n",
            "services.numbers.retrys",
            ["unknown key 'retrys'", "did you mean 'retries'?"],
        ),
        (
            "drain_timout = 3\n" + SVC + BACKENDS,
            "drain_timout",
            ["unknown key 'drain_timout'", "did you mean 'drain_timeout'?"],
        ),
        (
            SVC + BACKENDS + "[services.numbers.helth]\nrise = 1\n",
            "services.numbers.helth",
            ["did you mean 'health'?"],
        ),
        (
            SVC + BACKENDS + "[services.numbers.health]\nrize = 1\n",
            "services.numbers.health.rize",
            ["did you mean 'rise'?"],
        ),
        (
            SVC + BACKENDS + "[services.numbers.health]\nzzz = 1\n",
            "services.numbers.health.zzz",
            ["unknown key 'zzz'", "expected one of: interval, timeout, rise"],
        ),
        (
            "[admin]\nlisen = 'off'\n" + SVC + BACKENDS,
            "admin.lisen",
            ["did you mean 'listen'?"],
        ),
        (
            SVC + 'backends = [{ adress = "localhost:8090" }]\n',
            "services.numbers.backends[0].adress",
            ["did you mean 'address'?"],
        ),
        # health values
        (
            SVC + BACKENDS + "[services.numbers.health]\nrise = -1\n",
            "services.numbers.health.rise",
            ["expected an integer from 1 to 1000, got -1"],
        ),
        (
            SVC + BACKENDS + "[services.numbers.health]\nfall = 1.5\n",
            "services.numbers.health.fall",
            ["expected an integer from 1 to 1000, got 1.5"],
        ),
        (
            SVC + BACKENDS + "[services.numbers.health]\nfall = true\n",
            "services.numbers.health.fall",
            ["expected an integer from 1 to 1000, got True"],
        ),
        (
            SVC + BACKENDS + '[services.numbers.health]\ninterval = "2"\n',
            "services.numbers.health.interval",
            ["expected a number from 0.05 to 86400 seconds, got '2'"],
        ),
        (
            SVC + BACKENDS + "[services.numbers.health]\ntimeout = 0\n",
            "services.numbers.health.timeout",
            ["expected a number from 0.05 to 3600 seconds, got 0"],
        ),
        (
            SVC + BACKENDS + "[services.numbers.health]\ninterval = inf\n",
            "services.numbers.health.interval",
            ["expected a number from 0.05 to 86400 seconds, got inf"],
        ),
        (
            SVC + BACKENDS + "[services.numbers.health]\njitter = 0.7\n",
            "services.numbers.health.jitter",
            ["expected a number from 0 to 0.5, got 0.7"],
        ),
        (
            SVC + BACKENDS + "[services.numbers.health]\nsend = true\n",
            "services.numbers.health.send",
            ["expected a non-empty one-line string, or false to disable, got True"],
        ),
        (
            SVC + BACKENDS + '[services.numbers.health]\nsend = ""\n',
            "services.numbers.health.send",
            ["expected a non-empty one-line string", "got ''"],
        ),
        (
            SVC + BACKENDS + '[services.numbers.health]\nexpect = "a\\nb"\n',
            "services.numbers.health.expect",
            ["one-line string", "got 'a\\nb'"],
        ),
        (
            SVC + BACKENDS + '[services.numbers.health]\nsend = false\nexpect = "pong"\n',
            "services.numbers.health.expect",
            ["when send = false", "got 'pong'"],
        ),
        (
            SVC + BACKENDS + '[services.numbers.health]\nenabled = "yes"\n',
            "services.numbers.health.enabled",
            ["expected true or false, got 'yes'"],
        ),
        (
            SVC + BACKENDS + "health = 3\n",
            "services.numbers.health",
            ["expected a table of health check settings, got 3"],
        ),
        # service values
        (
            SVC + BACKENDS + 'mode = "udp"\n',
            "services.numbers.mode",
            ["expected one of 'http', 'message', 'tcp', got 'udp'"],
        ),
        (
            SVC + BACKENDS + 'algorithm = "round-robin"\n',
            "services.numbers.algorithm",
            [
                "expected one of",
                "'round_robin'",
                "got 'round-robin'",
                "did you mean 'round_robin'?",
            ],
        ),
        (
            SVC + BACKENDS + "algorithm = 1\n",
            "services.numbers.algorithm",
            ["expected one of", "got 1"],
        ),
        (
            SVC + BACKENDS + 'backend_framing = "lines"\n',
            "services.numbers.backend_framing",
            ["expected one of 'auto', 'line', 'raw', got 'lines'", "did you mean 'line'?"],
        ),
        (
            SVC + BACKENDS + 'hash_key = "client"\n',
            "services.numbers.hash_key",
            ["expected one of 'source', 'message', 'path', 'header:NAME', 'cookie:NAME', got"],
        ),
        (
            SVC + BACKENDS + 'mode = "tcp"\nhash_key = "message"\n',
            "services.numbers.hash_key",
            ["expected 'source' in tcp mode", "got 'message'"],
        ),
        (
            SVC + BACKENDS + "hash_balance_factor = 1.0\n",
            "services.numbers.hash_balance_factor",
            ["expected 0 (off) or a number from 1.01 to 100", "got 1.0"],
        ),
        (
            SVC + BACKENDS + "hash_balance_factor = -2\n",
            "services.numbers.hash_balance_factor",
            ["expected 0 (off) or a number from 1.01 to 100", "got -2"],
        ),
        (
            SVC + BACKENDS + "max_line = 0\n",
            "services.numbers.max_line",
            ["expected an integer from 1 to 16777216 bytes, got 0"],
        ),
        (
            SVC + BACKENDS + "retries = -1\n",
            "services.numbers.retries",
            ["expected an integer from 0 to 10, got -1"],
        ),
        (
            SVC + BACKENDS + "connect_timeout = 0\n",
            "services.numbers.connect_timeout",
            ["expected a number from 0.01 to 300 seconds, got 0"],
        ),
        (
            SVC + BACKENDS + "response_timeout = nan\n",
            "services.numbers.response_timeout",
            ["expected a number from 0.05 to 86400 seconds, got nan"],
        ),
        (
            SVC + BACKENDS + "backend_connections = 0\n",
            "services.numbers.backend_connections",
            ["expected an integer from 1 to 1024, got 0"],
        ),
        (
            SVC + BACKENDS + "slow_start = -1\n",
            "services.numbers.slow_start",
            ["expected 0 (off) or a number from 0.1 to 3600 seconds, got -1"],
        ),
        (
            SVC + BACKENDS + 'policy_options = { spread = "x" }\n',
            "services.numbers.policy_options.spread",
            ["unknown key 'spread' for algorithm 'round_robin'; it takes: none"],
        ),
        (
            SVC + BACKENDS + 'algorithm = "peak_ewma"\npolicy_options = { decay = "x" }\n',
            "services.numbers.policy_options.decay",
            ["expected a number from 0.01 to 3600 seconds, got 'x'"],
        ),
        (
            SVC + BACKENDS + 'algorithm = "peak_ewmaa"\npolicy_options = { decay = "x" }\n',
            "services.numbers.algorithm",
            ["did you mean 'peak_ewma'?"],
        ),
        (
            "[services.numbers]\nlisten = 8080\n" + BACKENDS,
            "services.numbers.listen",
            ['expected "host:port", got 8080'],
        ),
        (
            '[services.numbers]\nlisten = "127.0.0.1:70000"\n' + BACKENDS,
            "services.numbers.listen",
            ["port 0..65535", "got '127.0.0.1:70000'"],
        ),
        # top level and admin
        (
            "drain_timeout = -1\n" + SVC + BACKENDS,
            "drain_timeout",
            ["expected a number from 0 to 3600 seconds, got -1"],
        ),
        (
            "access_log = 1\n" + SVC + BACKENDS,
            "access_log",
            ["expected true or false, got 1"],
        ),
        (
            "[admin]\nlisten = 9100\n" + SVC + BACKENDS,
            "admin.listen",
            ['expected "host:port" or "off", got 9100'],
        ),
        (
            '[admin]\nlisten = "nowhere"\n' + SVC + BACKENDS,
            "admin.listen",
            ['expected "host:port"', "got 'nowhere'"],
        ),
        (
            '[admin]\ntoken = ""\n' + SVC + BACKENDS,
            "admin.token",
            ["expected a non-empty string, got ''"],
        ),
        (
            'admin = "off"\n' + SVC + BACKENDS,
            "admin",
            ["expected a table of admin settings, got 'off'"],
        ),
        # backends
        (
            SVC
            + 'backends = ["localhost:8090", "localhost:8091",'
            + ' { address = "h:1", weight = true }]\n',
            "services.numbers.backends[2].weight",
            ["expected an integer from 0 to 1000, got True"],
        ),
        (
            SVC + 'backends = [{ address = "h:1", weight = -1 }]\n',
            "services.numbers.backends[0].weight",
            ["expected an integer from 0 to 1000, got -1"],
        ),
        (
            SVC + 'backends = ["localhost:8090", "localhost"]\n',
            "services.numbers.backends[1]",
            ['expected "host:port" with a port 1..65535', "got 'localhost'"],
        ),
        (
            SVC + 'backends = ["localhost:0"]\n',
            "services.numbers.backends[0]",
            ["port 1..65535", "got 'localhost:0'"],
        ),
        (
            SVC + 'backends = ["::1:8080"]\n',
            "services.numbers.backends[0]",
            ["needs brackets", "got '::1:8080'"],
        ),
        (
            SVC + 'backends = [{ address = "[::1]:99999" }]\n',
            "services.numbers.backends[0].address",
            ["port 1..65535", "got '[::1]:99999'"],
        ),
        (
            SVC + "backends = [{ address = 8090 }]\n",
            "services.numbers.backends[0].address",
            ['expected "host:port", got 8090'],
        ),
        (
            SVC + "backends = [{ weight = 2 }]\n",
            "services.numbers.backends[0].address",
            ['missing: expected "host:port"'],
        ),
        (
            SVC + "backends = [8090]\n",
            "services.numbers.backends[0]",
            ['expected "host:port" or a table', "got 8090"],
        ),
        (
            SVC + 'backends = "localhost:8090"\n',
            "services.numbers.backends",
            ["expected a list of \"host:port\", got 'localhost:8090'"],
        ),
        (
            SVC + "backends = []\n",
            "services.numbers.backends",
            ["expected at least one backend, got []"],
        ),
        (
            SVC,
            "services.numbers.backends",
            ['missing: expected a list of "host:port"'],
        ),
        (
            SVC + 'backends = ["localhost:8090", "127.0.0.1:8091", "LOCALHOST:8090"]\n',
            "services.numbers.backends[2]",
            [
                "expected each backend once",
                "got 'LOCALHOST:8090' again",
                "services.numbers.backends[0]",
            ],
        ),
        # services
        (
            '[services."bad name"]\nlisten = "127.0.0.1:8080"\n' + BACKENDS,
            'services."bad name"',
            ["expected a service name of letters, digits", "got 'bad name'"],
        ),
        (
            "[services]\nnumbers = 5\n",
            "services.numbers",
            ["expected a table of service settings, got 5"],
        ),
        ("[services]\n", "services", ["expected at least one [services.NAME] table"]),
        ('services = "x"\n', "services", ["expected a table of services, got 'x'"]),
        ("drain_timeout = 1\n", "services", ["missing: expected at least one [services.NAME]"]),
        ("", "services", ["missing: expected at least one [services.NAME]"]),
        # listeners in conflict
        (
            SVC + BACKENDS + '[services.other]\nlisten = "127.0.0.1:8080"\n' + BACKENDS,
            "services.other.listen",
            ["no other service listens on", "got '127.0.0.1:8080'", "service 'numbers'"],
        ),
        (
            SVC + BACKENDS + '[services.other]\nlisten = "0.0.0.0:8080"\n' + BACKENDS,
            "services.other.listen",
            ["got '0.0.0.0:8080'", "service 'numbers'"],
        ),
        (
            '[admin]\nlisten = "127.0.0.1:8080"\n' + SVC + BACKENDS,
            "admin.listen",
            ["no service listens on", "got '127.0.0.1:8080'", "service 'numbers'"],
        ),
    ],
)
def test_toml_errors(tmp_path: Path, text: str, where: str, fragments: list[str]) -> None:
    path = write_config(tmp_path, "config.toml", text)
    assert_error(config_error(path), path, where, *fragments)


def test_listen_port_zero_never_conflicts(tmp_path: Path) -> None:
    text = (
        '[services.a]\nlisten = "127.0.0.1:0"\n'
        + BACKENDS
        + '[services.b]\nlisten = "127.0.0.1:0"\n'
        + BACKENDS
    )
    config = load_config(write_config(tmp_path, "config.toml", text))
    assert [s.listen for s in config.services] == ["127.0.0.1:0", "127.0.0.1:0"]


def test_two_services_without_listen_conflict_on_default_listen(tmp_path: Path) -> None:
    text = "[services.a]\n" + BACKENDS + "[services.b]\n" + BACKENDS
    path = write_config(tmp_path, "config.toml", text)
    assert_error(config_error(path), path, "services.b.listen", "got 'localhost:8080'")


def test_same_backend_in_two_services_is_fine(tmp_path: Path) -> None:
    text = SVC + BACKENDS + '[services.b]\nlisten = "127.0.0.1:8081"\n' + BACKENDS
    config = load_config(write_config(tmp_path, "config.toml", text))
    assert config.service("b").backends == config.service("numbers").backends


def test_toml_syntax_error_names_line_and_column(tmp_path: Path) -> None:
    path = write_config(tmp_path, "config.toml", SVC + 'backends = ["localhost:8090"\nretries = \n')
    err = config_error(path)
    assert_error(err, path, err.where, "invalid TOML: ")
    assert err.where.startswith("line "), err.where
    assert ", column " in err.where


def test_toml_duplicate_key_is_a_syntax_error(tmp_path: Path) -> None:
    path = write_config(tmp_path, "config.toml", SVC + BACKENDS + 'listen = "127.0.0.1:1"\n')
    err = config_error(path)
    assert err.where.startswith("line 4, column "), err.where
    assert_error(err, path, err.where, "invalid TOML: Cannot overwrite a value")


# ---------------------------------------------------------------- text errors


@pytest.mark.parametrize(
    ("text", "where", "fragments"),
    [
        ("localhost 8090\nlocalhost 0\n", "line 2", ["expected a port 1..65535, got '0'"]),
        ("localhost 8090\n\nlocalhost eighty\n", "line 3", ["got 'eighty'"]),
        ("localhost 70000 # too big\n", "line 1", ["expected a port 1..65535, got '70000'"]),
        ("local/host 80\n", "line 1", ["expected a host", "got 'local/host'"]),
        ("localhost\n", "line 1", ['expected "host:port"', "got 'localhost'"]),
        ("localhost 8090 2\n", "line 1", ['expected "host port" or "host:port"']),
        ("# c\nlocalhost:99999\n", "line 2", ["port 1..65535", "got 'localhost:99999'"]),
        (
            "localhost 8090\nlocalhost 8091\nlocalhost:8090\n",
            "line 3",
            ["expected each backend once", "got 'localhost:8090' again (first at line 1)"],
        ),
        ("", "", ['no backends: expected at least one "host port" line']),
        ("# only\n\n   # comments\n", "", ["no backends"]),
    ],
)
def test_text_errors(tmp_path: Path, text: str, where: str, fragments: list[str]) -> None:
    path = write_config(tmp_path, "config.txt", text)
    assert_error(config_error(path), path, where, *fragments)


# ---------------------------------------------------------------- JSON errors


@pytest.mark.parametrize(
    ("doc", "where", "fragments"),
    [
        ({"servers": []}, "servers", ["expected at least one server, got []"]),
        ({"servers": {"host": "h"}}, "servers", ["expected a list", "got {'host': 'h'}"]),
        (
            {"servers": [{"host": "localhost"}]},
            "servers[0].port",
            ["missing: expected the server's port"],
        ),
        (
            {
                "servers": [
                    {"host": "localhost", "port": 8090},
                    {"host": "localhost", "port": "8091"},
                ]
            },
            "servers[1].port",
            ["expected an integer port 1..65535, got '8091'"],
        ),
        (
            {"servers": [{"host": "localhost", "port": True}]},
            "servers[0].port",
            ["expected an integer port 1..65535, got True"],
        ),
        (
            {"servers": [{"host": 127, "port": 80}]},
            "servers[0].host",
            ["expected a host", "got 127"],
        ),
        (
            {"servers": [{"hots": "localhost", "port": 80}]},
            "servers[0].hots",
            ["unknown key 'hots'", "did you mean 'host'?"],
        ),
        (
            {"servers": [{"host": "localhost", "port": 80, "weight": 1.5}]},
            "servers[0].weight",
            ["expected an integer from 0 to 1000, got 1.5"],
        ),
        (
            {"servers": [{"host": "a", "port": 80}, {"host": "a", "port": 80}]},
            "servers[1]",
            ["expected each backend once", "got 'a:80' again (first at servers[0])"],
        ),
        (
            {"servers": [None]},
            "servers[0]",
            ['expected an object {"host": ..., "port": ...}, got None'],
        ),
        (
            {"servers": [{"host": "a", "port": 80}], "refresh": 3},
            "refresh",
            ["unknown key 'refresh'", "expected one of: servers"],
        ),
        ([], "", ['expected a JSON object with "services" or "servers", got []']),
        ({}, "services", ["missing: expected at least one [services.NAME] table"]),
        (
            {"services": {"numbers": {"backends": ["localhost:8090"], "retries": None}}},
            "services.numbers.retries",
            ["expected an integer from 0 to 10, got None"],
        ),
        (
            {"services": {"numbers": {"backends": ["localhost:8090"], "health": None}}},
            "services.numbers.health",
            ["expected a table of health check settings, got None"],
        ),
        (
            {"services": {"numbers": {"backends": ["h:1"], "health": {"rise": 2.0}}}},
            "services.numbers.health.rise",
            ["expected an integer from 1 to 1000, got 2.0"],
        ),
    ],
)
def test_json_errors(tmp_path: Path, doc: object, where: str, fragments: list[str]) -> None:
    path = write_config(tmp_path, "config.json", json.dumps(doc))
    assert_error(config_error(path), path, where, *fragments)


def test_json_syntax_error_names_line_and_column(tmp_path: Path) -> None:
    path = write_config(
        tmp_path, "config.json", '{"servers": [\n  {"host": "a", "port": 80}\n  {"host"'
    )
    assert_error(
        config_error(path), path, "line 3, column 3", "invalid JSON: Expecting ',' delimiter"
    )


# ---------------------------------------------------------------- reading


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "config.txt"
    err = config_error(path)
    assert str(err) == f"{path}: cannot read: No such file or directory"


def test_missing_file_relative_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as info:
        load_config("config.txt")
    assert str(info.value) == "config.txt: cannot read: No such file or directory"


def test_directory_is_not_a_config(tmp_path: Path) -> None:
    err = config_error(tmp_path)
    assert str(err) == f"{tmp_path}: cannot read: Is a directory"


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "config.txt"
    path.write_bytes(b"localhost 8090\nlocalhost \xff8091\n")
    assert_error(config_error(path), path, "line 2", "expected UTF-8 text, got byte 0xff")


def test_bad_default_listen(tmp_path: Path) -> None:
    path = write_config(tmp_path, "config.txt", TUTORIAL_TXT)
    with pytest.raises(ConfigError) as info:
        load_config(path, default_listen="localhost:http")
    assert str(info.value).startswith('<command line>: listen: expected "host:port"')
    assert "got 'localhost:http'" in str(info.value)


# ---------------------------------------------------------------- property

HOSTS = st.one_of(
    st.just("localhost"),
    st.text(alphabet=string.ascii_lowercase + string.digits + "-.", min_size=1, max_size=12).map(
        lambda s: "h" + s
    ),
    st.tuples(*[st.integers(0, 255)] * 4).map(lambda t: ".".join(map(str, t))),
    st.sampled_from(["::1", "fe80::1", "2001:db8::42"]),
)
BLANKS = st.text(alphabet=" \t", max_size=3)
COMMENT = st.text(alphabet=string.ascii_letters + string.digits + " #:", max_size=10).map(
    lambda s: "#" + s
)


@st.composite
def backend_line(draw: st.DrawFn, host: str, port: int) -> str:
    ipv6 = ":" in host
    style = draw(st.sampled_from(["space", "colon"]))
    if style == "colon":
        body = f"[{host}]:{port}" if ipv6 else f"{host}:{port}"
    else:
        gap = draw(st.sampled_from([" ", "  ", "\t", " \t "]))
        body = f"{host}{gap}{port}"
    tail = draw(st.one_of(st.just(""), COMMENT.map(lambda c: " " + c)))
    return f"{draw(BLANKS)}{body}{draw(BLANKS)}{tail}"


@st.composite
def config_txt(draw: st.DrawFn) -> tuple[str, list[tuple[str, int]]]:
    pairs = draw(
        st.lists(
            # not the ports the balancer itself listens on (8080, admin 9100): a loop
            st.tuples(HOSTS, st.integers(1, 65535).filter(lambda p: p not in (8080, 9100))),
            min_size=1,
            max_size=8,
            unique_by=lambda hp: (hp[0].lower(), hp[1]),
        )
    )
    lines: list[str] = []
    for host, port in pairs:
        lines.extend(draw(st.lists(st.one_of(BLANKS, COMMENT.map(lambda c: " " + c)), max_size=2)))
        lines.append(draw(backend_line(host, port)))
    lines.extend(draw(st.lists(st.one_of(BLANKS, COMMENT), max_size=2)))
    newline = draw(st.sampled_from(["\n", "\r\n"]))
    return newline.join(lines) + draw(st.sampled_from(["", newline])), pairs


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(case=config_txt())
def test_any_valid_config_txt_loads_to_its_backends(
    tmp_path: Path, case: tuple[str, list[tuple[str, int]]]
) -> None:
    text, pairs = case
    path = tmp_path / "config.txt"
    path.write_text(text, encoding="utf-8", newline="")
    config = load_config(path)
    (svc,) = config.services
    assert (svc.name, svc.listen, svc.mode, svc.algorithm) == (
        "default",
        "localhost:8080",
        "message",
        "round_robin",
    )
    assert [(b.host, b.port, b.weight) for b in svc.backends] == [(h, p, 1) for h, p in pairs]


def test_policy_options_are_checked_against_the_algorithm(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text(
        '[services.a]\nlisten = "127.0.0.1:0"\nalgorithm = "consistent_hash"\n'
        'backends = ["127.0.0.1:1"]\n[services.a.policy_options]\ntable_size = 100\n'
    )
    err = config_error(path)
    assert str(err) == (
        f"{path}: line 6: services.a.policy_options.table_size: "
        "expected a prime number from 2 to 524287, got 100"
    )


def test_slow_start_needs_a_weight_aware_algorithm(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    path.write_text(
        '[services.a]\nlisten = "127.0.0.1:0"\nslow_start = 5\nbackends = ["127.0.0.1:1"]\n'
    )
    assert_error(
        config_error(path), path, "services.a.slow_start", "expected 0 with algorithm 'round_robin'"
    )
    assert config_error(path).line == 3
    path.write_text(
        '[services.a]\nlisten = "127.0.0.1:0"\nslow_start = 5\n'
        'algorithm = "least_connections"\nbackends = ["127.0.0.1:1"]\n'
    )
    assert load_config(path).services[0].slow_start == 5
