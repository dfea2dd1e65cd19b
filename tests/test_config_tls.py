"""The TLS and PROXY protocol keys of a service: what loads, and every message a mistake gets.

Each message is compared whole (file, line, key path, what was expected, what was given),
with the test's directory written as DIR. The files named by `tls` and `backend_tls` are
dummy text files: the loader only checks that they exist and are readable.
"""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path

import pytest

from balancer.config.load import load_config
from balancer.config.model import (
    BackendConfig,
    BackendTlsConfig,
    CertConfig,
    SniRouteConfig,
    TlsConfig,
)
from tests.config_files import DUMMY
from tests.support import config_error, write_config

FILES = ("cert.pem", "key.pem", "ca.pem")


def service(name: str, port: int, *body: str) -> str:
    """`[services.NAME]` listening on 127.0.0.1:PORT, then `body` (one line each)."""
    return "\n".join([f"[services.{name}]", f'listen = "127.0.0.1:{port}"', *body]) + "\n"


def write(tmp_path: Path, text: str, name: str = "c.toml", files: tuple[str, ...] = FILES) -> Path:
    """The config `text` as `tmp_path/name`, with the dummy `files` beside it."""
    for file in files:
        path = tmp_path / file
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(DUMMY, encoding="utf-8")
    return write_config(tmp_path, name, text)


def messages(tmp_path: Path, text: str, name: str = "c.toml") -> list[str]:
    """Every error loading `text` gives, one line each, the directory written as DIR."""
    err = config_error(write(tmp_path, text, name))
    lines = [e.describe() for e in err.errors]
    assert str(err) == (lines[0] if len(lines) == 1 else "\n".join([
        f"{tmp_path / name}: {len(lines)} errors", *lines]))  # fmt: skip
    return [line.replace(str(tmp_path), "DIR") for line in lines]


TCP = service("t", 7001, 'mode = "tcp"', 'backends = ["127.0.0.1:9001"]')
"""A tcp service without tls: what an SNI route may name (lines 1-4)."""
TLS = '[services.s.tls]\ncert = "cert.pem"\nkey = "key.pem"\n'
"""A valid tls table for service s (three lines)."""


# ---------------------------------------------------------------- what loads


def test_tls_paths_are_resolved_against_the_config_files_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = service("s", 7001, 'mode = "http"', 'backends = ["127.0.0.1:9001"]') + (
        '[services.s.tls]\ncert = "certs/s.pem"\nkey = "certs/s.key"\n'
        'client_ca = "../shared/ca.pem"\nverify_client = "required"\n'
    )
    etc = tmp_path / "etc"
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "ca.pem").write_text(DUMMY)
    write(etc, text, files=("certs/s.pem", "certs/s.key"))
    monkeypatch.chdir(tmp_path)  # where the process runs is not where the names are read from
    tls = load_config("etc/c.toml").service("s").tls
    assert tls == TlsConfig(
        certs=(CertConfig(str(etc / "certs" / "s.pem"), str(etc / "certs" / "s.key")),),
        client_ca=str(tmp_path / "shared" / "ca.pem"),
        verify_client="required",
    )


def test_an_absolute_path_is_kept_and_a_table_of_only_its_files_takes_the_defaults(
    tmp_path: Path,
) -> None:
    key = tmp_path / "elsewhere" / "s.key"
    key.parent.mkdir()
    key.write_text(DUMMY)
    text = service("s", 7001, 'backends = ["127.0.0.1:9001"]')
    text += f'[services.s.tls]\ncert = "cert.pem"\nkey = {json.dumps(str(key))}\n'
    path = write(tmp_path / "conf", text, files=("cert.pem",))
    assert load_config(path).service("s").tls == TlsConfig(
        certs=(CertConfig(str(tmp_path / "conf" / "cert.pem"), str(key)),)
    )


def test_several_certificates_load_in_order_with_their_names_normalised(tmp_path: Path) -> None:
    text = service("s", 7001, 'mode = "http"', 'backends = ["127.0.0.1:9001"]') + (
        "[services.s.tls]\n"
        'min_version = "1.3"\nciphers = "ECDHE+AESGCM"\nalpn = ["h2", "http/1.1"]\n'
        'client_ca = "ca.pem"\nverify_client = "optional"\nhandshake_timeout = 2.5\n'
        'subject_header = "X-Subject"\n'
        '[[services.s.tls.certs]]\ncert = "cert.pem"\nkey = "key.pem"\n'
        '[[services.s.tls.certs]]\ncert = "b.pem"\nkey = "b.key"\n'
        'server_names = ["B.Example.", "*.b.example"]\n'
    )
    path = write(tmp_path, text, files=(*FILES, "b.pem", "b.key"))
    assert load_config(path).service("s").tls == TlsConfig(
        certs=(
            CertConfig(str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")),
            CertConfig(
                str(tmp_path / "b.pem"), str(tmp_path / "b.key"), ("b.example", "*.b.example")
            ),
        ),
        min_version="1.3",
        ciphers="ECDHE+AESGCM",
        alpn=("h2", "http/1.1"),
        client_ca=str(tmp_path / "ca.pem"),
        verify_client="optional",
        handshake_timeout=2.5,
        subject_header="X-Subject",
    )


def test_backend_tls_loads_and_an_empty_table_takes_the_defaults(tmp_path: Path) -> None:
    text = service("s", 7001, 'mode = "http"', 'backends = ["127.0.0.1:9001"]') + (
        "[services.s.backend_tls]\n"
        'ca = "ca.pem"\nserver_name = "API.Internal."\nverify = false\n'
        'client_cert = "cert.pem"\nclient_key = "key.pem"\nmin_version = "1.3"\nalpn = ["h2"]\n'
    )
    text += service("d", 7002, 'backends = ["127.0.0.1:9002"]', "backend_tls = {}")
    text += service("n", 7003, 'backends = ["127.0.0.1:9003"]')
    config = load_config(write(tmp_path, text))
    assert config.service("s").backend_tls == BackendTlsConfig(
        ca=str(tmp_path / "ca.pem"),
        server_name="api.internal",
        verify=False,
        client_cert=str(tmp_path / "cert.pem"),
        client_key=str(tmp_path / "key.pem"),
        min_version="1.3",
        alpn=("h2",),
    )
    assert config.service("d").backend_tls == BackendTlsConfig()
    assert config.service("n").backend_tls is None
    assert config.service("n").tls is None


def test_sni_routes_load_and_backends_may_be_empty_or_absent_beside_them(tmp_path: Path) -> None:
    routes = (
        'sni_routes = [{ service = "t", server_names = ["A.Example.", "*.a.example"] }, '
        '{ server_names = ["b.example"], service = "u" }]'
    )
    text = TCP + service("u", 7002, 'mode = "tcp"', 'backends = ["127.0.0.1:9002"]')
    text += service(
        "e", 7003, 'mode = "tcp"', "backends = []", "client_hello_timeout = 1.5", routes
    )
    text += service("f", 7004, 'mode = "tcp"', routes)
    config = load_config(write(tmp_path, text))
    expected = (
        SniRouteConfig("t", ("a.example", "*.a.example")),
        SniRouteConfig("u", ("b.example",)),
    )
    edge = config.service("e")
    assert (edge.sni_routes, edge.backends, edge.client_hello_timeout) == (expected, (), 1.5)
    assert (config.service("f").sni_routes, config.service("f").backends) == (expected, ())
    assert config.service("t").sni_routes == ()
    assert edge.front
    assert not config.service("t").front


def test_proxy_protocol_keys_load(tmp_path: Path) -> None:
    text = service(
        "t",
        7001,
        'mode = "tcp"',
        'backends = ["127.0.0.1:9001"]',
        "accept_proxy = true",
        'accept_proxy_from = ["10.0.0.0/8", "192.0.2.7", "2001:db8::/32"]',
        "proxy_timeout = 0.5",
        'send_proxy = "v2"',
    )
    text += service(
        "h", 7002, 'mode = "http"', 'backends = ["127.0.0.1:9002"]', 'send_proxy = "v1"'
    )
    text += service("m", 7003, 'backends = ["127.0.0.1:9003"]', "accept_proxy = true")
    config = load_config(write(tmp_path, text))
    t = config.service("t")
    assert (t.accept_proxy, t.accept_proxy_from, t.proxy_timeout, t.send_proxy) == (
        True,
        ("10.0.0.0/8", "192.0.2.7", "2001:db8::/32"),
        0.5,
        "v2",
    )
    assert config.service("h").send_proxy == "v1"
    m = config.service("m")
    assert (m.accept_proxy, m.accept_proxy_from, m.send_proxy, m.front) == (True, (), "", True)
    assert m.backends == (BackendConfig("127.0.0.1", 9003),)


# ---------------------------------------------------------------- each mistake, its message

S = service("s", 7001, 'backends = ["127.0.0.1:9001"]')
"""Service s, message mode (lines 1-3); its tables start on line 4."""
H = service("s", 7001, 'mode = "http"', 'backends = ["127.0.0.1:9001"]')
"""Service s, http mode (lines 1-4); its tables start on line 5."""
FILE_PROBLEMS = [
    pytest.param(
        S + '[services.s.tls]\ncert = "nope.pem"\nkey = "key.pem"\n',
        [
            "DIR/c.toml: line 5: services.s.tls.cert: expected the path of a PEM certificate "
            "chain, got 'nope.pem': no such file (DIR/nope.pem)"
        ],
        id="missing-cert-file",
    ),
    pytest.param(
        S + '[services.s.tls]\ncert = "cert.pem"\nkey = "keys/../nope.key"\n',
        [
            "DIR/c.toml: line 6: services.s.tls.key: expected the path of a PEM private key, "
            "got 'keys/../nope.key': no such file (DIR/nope.key)"
        ],
        id="missing-key-file-path-normalised",
    ),
    pytest.param(
        S + '[services.s.tls]\ncert = "."\nkey = "key.pem"\n',
        [
            "DIR/c.toml: line 5: services.s.tls.cert: expected the path of a PEM certificate "
            "chain, got '.': a directory (DIR)"
        ],
        id="directory",
    ),
    pytest.param(
        S + '[services.s.tls]\ncert = ""\nkey = 5\n',
        [
            "DIR/c.toml: line 5: services.s.tls.cert: expected the path of a PEM certificate "
            "chain, got ''",
            "DIR/c.toml: line 6: services.s.tls.key: expected the path of a PEM private key, got 5",
        ],
        id="not-a-path",
    ),
    pytest.param(
        S + '[services.s.tls]\nmin_version = "1.3"\n',
        [
            "DIR/c.toml: line 4: services.s.tls.cert: missing: expected the path of a PEM "
            "certificate chain (or a certs list)",
            "DIR/c.toml: line 4: services.s.tls.key: missing: expected the path of a PEM private "
            "key (or a certs list)",
        ],
        id="no-certificate",
    ),
    pytest.param(
        S + TLS + 'verify_client = "required"\n',
        [
            "DIR/c.toml: line 4: services.s.tls.client_ca: missing: expected the path of PEM CA "
            "certificates for client certificates (verify_client = 'required' verifies them "
            "against it)"
        ],
        id="required-without-client-ca",
    ),
    pytest.param(
        S + TLS + 'verify_client = "optional"\n',
        [
            "DIR/c.toml: line 4: services.s.tls.client_ca: missing: expected the path of PEM CA "
            "certificates for client certificates (verify_client = 'optional' verifies them "
            "against it)"
        ],
        id="optional-without-client-ca",
    ),
    pytest.param(
        S + TLS + 'client_ca = "nope.pem"\n',
        [
            "DIR/c.toml: line 7: services.s.tls.client_ca: expected the path of PEM CA "
            "certificates for client certificates, got 'nope.pem': no such file (DIR/nope.pem)"
        ],
        id="missing-client-ca-file",
    ),
    pytest.param(
        S + '[services.s.backend_tls]\nclient_cert = "cert.pem"\n',
        [
            "DIR/c.toml: line 4: services.s.backend_tls.client_key: missing: expected the path "
            "of a PEM private key for client_cert (client_cert is set)"
        ],
        id="client-cert-without-key",
    ),
    pytest.param(
        S + '[services.s.backend_tls]\nclient_key = "key.pem"\nca = "nope.pem"\n',
        [
            "DIR/c.toml: line 4: services.s.backend_tls.client_cert: missing: expected the path "
            "of a PEM client certificate chain (client_key is set)",
            "DIR/c.toml: line 6: services.s.backend_tls.ca: expected the path of PEM CA "
            "certificates, got 'nope.pem': no such file (DIR/nope.pem)",
        ],
        id="client-key-without-cert-and-missing-ca",
    ),
]


@pytest.mark.parametrize(("text", "expected"), FILE_PROBLEMS)
def test_the_files_tls_names_must_be_there(tmp_path: Path, text: str, expected: list[str]) -> None:
    assert messages(tmp_path, text) == expected


def test_a_file_this_user_cannot_read_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tests may run as root, whom no mode stops: os.access is made to say no for the key."""
    key = str(tmp_path / "key.pem")
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: path != key and access(path, mode))
    assert messages(tmp_path, S + TLS) == [
        "DIR/c.toml: line 6: services.s.tls.key: expected the path of a PEM private key, got "
        "'key.pem': not readable by this user"
    ]


CERTS = '[[services.s.tls.certs]]\ncert = "cert.pem"\nkey = "key.pem"\n'


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            S + CERTS + CERTS + CERTS + "server_names = []\n",
            [
                "DIR/c.toml: line 7: services.s.tls.certs[1].server_names: missing: expected the "
                "server names this certificate serves (only the first, the default, may go "
                "without)",
                "DIR/c.toml: line 13: services.s.tls.certs[2].server_names: expected the server "
                "names this certificate serves (only the first, the default, may go without), "
                "got []",
            ],
            id="names-missing-after-the-first",
        ),
        pytest.param(
            S + "[services.s.tls]\ncerts = [\n"
            '  { cert = "nope.pem", key = "key.pem" },\n'
            '  { cert = "cert.pem", key = "key.pem" },\n'
            '  { cert = "cert.pem", key = "key.pem", server_names = ["Not_A_Name"] },\n'
            "]\n",
            [
                "DIR/c.toml: line 6: services.s.tls.certs[0].cert: expected the path of a PEM "
                "certificate chain, got 'nope.pem': no such file (DIR/nope.pem)",
                "DIR/c.toml: line 7: services.s.tls.certs[1].server_names: missing: expected the "
                "server names this certificate serves (only the first, the default, may go "
                "without)",
                "DIR/c.toml: line 8: services.s.tls.certs[2].server_names: expected a list of "
                'server names like "a.example" or "*.example", got [\'Not_A_Name\']',
            ],
            id="each-certificate-named-by-its-own-index",
        ),
        pytest.param(
            S + "[services.s.tls]\ncerts = []\n",
            [
                "DIR/c.toml: line 5: services.s.tls.certs: expected a list of tables with cert, "
                "key and server_names, got []"
            ],
            id="no-certs",
        ),
        pytest.param(
            S + TLS + "certs = [3]\n",
            [
                "DIR/c.toml: line 7: services.s.tls.certs: expected either cert and key, or "
                "certs, not both",
                "DIR/c.toml: line 7: services.s.tls.certs[0]: expected a table with cert, key, "
                "server_names, got 3",
            ],
            id="cert-and-certs",
        ),
    ],
)
def test_several_certificates(tmp_path: Path, text: str, expected: list[str]) -> None:
    assert messages(tmp_path, text) == expected


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (
            'min_version = "TLSv1.2"',
            "min_version: expected one of '1.2', '1.3', got 'TLSv1.2' (did you mean '1.2'?)",
        ),
        (
            'verify_client = "sometimes"',
            "verify_client: expected one of 'none', 'optional', 'required', got 'sometimes'",
        ),
        (
            'alpn = ["h2", ""]',
            "alpn: expected a list of protocol names like [\"h2\", \"http/1.1\"], got ['h2', '']",
        ),
        (
            'alpn = "h2"',
            'alpn: expected a list of protocol names like ["h2", "http/1.1"], got \'h2\'',
        ),
        ("ciphers = 5", "ciphers: expected a string, got 5"),
        ('subject_header = "X Subject"', "subject_header: expected a header name, got 'X Subject'"),
        ('certfile = "cert.pem"', "certfile: unknown key 'certfile' (did you mean 'cert'?)"),
        (
            "zzzzzzzz = 1",
            "zzzzzzzz: unknown key 'zzzzzzzz'; expected one of: cert, key, min_version, ciphers, "
            "alpn, client_ca, verify_client, handshake_timeout, subject_header, certs",
        ),
    ],
)
def test_each_tls_setting_is_checked(tmp_path: Path, line: str, expected: str) -> None:
    assert messages(tmp_path, S + TLS + line + "\n") == [
        f"DIR/c.toml: line 7: services.s.tls.{expected}"
    ]


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (
            'server_name = "*.api.example"',
            "server_name: expected a host name (no wildcard), got '*.api.example'",
        ),
        (
            'server_name = "bad_name"',
            "server_name: expected a host name (no wildcard), got 'bad_name'",
        ),
        ("server_name = 1", "server_name: expected a string, got 1"),
        ('verify = "yes"', "verify: expected true or false, got 'yes'"),
        ("min_version = 1.2", "min_version: expected one of '1.2', '1.3', got 1.2"),
        ("alpn = [1]", 'alpn: expected a list of protocol names like ["h2", "http/1.1"], got [1]'),
        (
            "zzzzzzzz = 1",
            "zzzzzzzz: unknown key 'zzzzzzzz'; expected one of: ca, server_name, verify, "
            "client_cert, client_key, min_version, alpn",
        ),
    ],
)
def test_each_backend_tls_setting_is_checked(tmp_path: Path, line: str, expected: str) -> None:
    assert messages(tmp_path, S + f"[services.s.backend_tls]\n{line}\n") == [
        f"DIR/c.toml: line 5: services.s.backend_tls.{expected}"
    ]


@pytest.mark.parametrize(
    ("table", "what"),
    [("tls", "a table of TLS settings"), ("backend_tls", "a table of backend TLS settings")],
)
def test_tls_tables_must_be_tables(tmp_path: Path, table: str, what: str) -> None:
    assert messages(tmp_path, S + f'{table} = "on"\n') == [
        f"DIR/c.toml: line 4: services.s.{table}: expected {what}, got 'on'"
    ]


def edge(*body: str) -> str:
    """Service e (tcp, lines 1-4) and then `body`, after TCP (lines 5-8)."""
    return service("e", 7000, 'mode = "tcp"', 'backends = ["127.0.0.1:9000"]', *body) + TCP


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            service(
                "e",
                7000,
                'mode = "http"',
                'backends = ["127.0.0.1:9000"]',
                'sni_routes = [{ service = "t", server_names = ["a.example"] }]',
            )
            + TCP,
            [
                "DIR/c.toml: line 5: services.e.sni_routes: expected no sni_routes in http mode "
                '(they need mode = "tcp": TLS relayed untouched)'
            ],
            id="http-mode",
        ),
        pytest.param(
            service(
                "e",
                7000,
                'backends = ["127.0.0.1:9000"]',
                'sni_routes = [{ service = "t", server_names = ["a.example"] }]',
            )
            + TCP,
            [
                "DIR/c.toml: line 4: services.e.sni_routes: expected no sni_routes in message mode "
                '(they need mode = "tcp": TLS relayed untouched)'
            ],
            id="message-mode-by-default",
        ),
        pytest.param(
            edge(
                'sni_routes = [{ service = "t", server_names = ["a.example"] }]',
                '[services.e.tls]\ncert = "cert.pem"\nkey = "key.pem"',
            ),
            [
                "DIR/c.toml: line 5: services.e.sni_routes: expected either tls (terminated here, "
                "the certificate chosen by SNI) or sni_routes (TLS relayed untouched), not both"
            ],
            id="with-tls",
        ),
        pytest.param(
            edge('sni_routes = [{ service = "nosuch", server_names = ["a.example"] }]')
            + service(
                "x",
                7002,
                'mode = "tcp"',
                'backends = ["127.0.0.1:9002"]',
                'tls = { cert = "cert.pem", key = "key.pem" }',
            )
            + service("u", 7003, 'mode = "tcp"', 'backends = ["127.0.0.1:9003"]')
            + service("h", 7004, 'mode = "http"', 'backends = ["127.0.0.1:9004"]'),
            [
                "DIR/c.toml: line 5: services.e.sni_routes[0].service: expected the name of "
                "another tcp service without tls of this file (one of ['t', 'u']), got 'nosuch'"
            ],
            id="missing-service-lists-the-ones-that-may-be-named",
        ),
        pytest.param(
            service(
                "e",
                7000,
                'mode = "tcp"',
                'backends = ["127.0.0.1:9000"]',
                'sni_routes = [{ service = "t", server_names = ["a.example"] }]',
            ),
            [
                "DIR/c.toml: line 5: services.e.sni_routes[0].service: expected the name of "
                "another tcp service without tls of this file (there is none), got 't'"
            ],
            id="missing-service-none-to-name",
        ),
        pytest.param(
            edge('sni_routes = [{ service = "e", server_names = ["a.example"] }]'),
            [
                "DIR/c.toml: line 5: services.e.sni_routes[0].service: expected another service "
                "than this one (its own backends serve what no route takes)"
            ],
            id="itself",
        ),
        pytest.param(
            edge(
                "[[services.e.sni_routes]]",
                'service = "m"',
                'server_names = ["m.example"]',
                "[[services.e.sni_routes]]",
                'service = "h"',
                'server_names = ["h.example"]',
                "[[services.e.sni_routes]]",
                'service = "x"',
                'server_names = ["x.example"]',
            )
            + service("m", 7002, 'backends = ["127.0.0.1:9002"]')
            + service("h", 7003, 'mode = "http"', 'backends = ["127.0.0.1:9003"]')
            + service(
                "x",
                7004,
                'mode = "tcp"',
                'backends = ["127.0.0.1:9004"]',
                'tls = { cert = "cert.pem", key = "key.pem", alpn = "bad" }',
            ),
            [
                "DIR/c.toml: line 6: services.e.sni_routes[0].service: expected a tcp service (the "
                "connection is relayed, its TLS untouched), got 'm' in message mode",
                "DIR/c.toml: line 9: services.e.sni_routes[1].service: expected a tcp service (the "
                "connection is relayed, its TLS untouched), got 'h' in http mode",
                "DIR/c.toml: line 12: services.e.sni_routes[2].service: expected a tcp service "
                "without tls (the connection's TLS is relayed untouched), got 'x', which "
                "terminates TLS",
                "DIR/c.toml: line 29: services.x.tls.alpn: expected a list of protocol names like "
                '["h2", "http/1.1"], got \'bad\'',
            ],
            id="not-a-tcp-service-without-tls",
        ),
        pytest.param(
            edge('sni_routes = [{ service = "b", server_names = ["a.example"] }]')
            + service("b", 7002, 'mode = "udp"', 'backends = ["127.0.0.1:9002"]'),
            [
                "DIR/c.toml: line 12: services.b.mode: expected one of 'http', 'message', 'tcp', "
                "got 'udp'"
            ],
            id="a-target-whose-mode-is-wrong-gets-that-error-alone",
        ),
        pytest.param(
            edge(
                "sni_routes = [",
                '  { server_names = ["a.example"] },',
                '  { service = "t" },',
                '  { service = "t", server_names = [] },',
                '  { service = "t", server_names = ["Not_A_Name", "b.example"] },',
                '  { service = "", server_names = ["c.example"], port = 1 },',
                "  3,",
                "]",
            ),
            [
                "DIR/c.toml: line 6: services.e.sni_routes[0].service: missing: expected the name "
                "of the tcp service that serves it",
                "DIR/c.toml: line 7: services.e.sni_routes[1].server_names: missing: expected a "
                'list of names like "a.example"',
                "DIR/c.toml: line 8: services.e.sni_routes[2].server_names: expected at least one "
                'name like "a.example", got []',
                "DIR/c.toml: line 9: services.e.sni_routes[3].server_names: expected a list of "
                "server names like \"a.example\" or \"*.example\", got ['Not_A_Name', 'b.example']",
                "DIR/c.toml: line 10: services.e.sni_routes[4].port: unknown key 'port'; expected "
                "one of: service, server_names",
                "DIR/c.toml: line 10: services.e.sni_routes[4].service: expected a non-empty "
                "string, got ''",
                "DIR/c.toml: line 11: services.e.sni_routes[5]: expected a table with server_names "
                "and service, got 3",
            ],
            id="each-route-item",
        ),
        pytest.param(
            edge("sni_routes = 3"),
            ["DIR/c.toml: line 5: services.e.sni_routes: expected a list of route tables, got 3"],
            id="not-a-list",
        ),
    ],
)
def test_sni_routes(tmp_path: Path, text: str, expected: list[str]) -> None:
    assert messages(tmp_path, text) == expected


def test_backends_may_be_empty_only_beside_routes(tmp_path: Path) -> None:
    text = service("e", 7000, 'mode = "tcp"', "backends = []") + TCP
    assert messages(tmp_path, text) == [
        "DIR/c.toml: line 4: services.e.backends: expected at least one backend, got []"
    ]
    text = service("e", 7000, 'mode = "tcp"') + TCP
    assert messages(tmp_path, text) == [
        'DIR/c.toml: line 1: services.e.backends: missing: expected a list of "host:port"'
    ]


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        pytest.param(
            ['send_proxy = "v1"'],
            [
                "line 3: services.s.send_proxy: expected no send_proxy in message mode: its "
                "backend connections carry many clients' requests, a PROXY header names one client"
            ],
            id="send-proxy-in-message-mode-by-default",
        ),
        pytest.param(
            ['mode = "message"', 'send_proxy = "v2"'],
            [
                "line 4: services.s.send_proxy: expected no send_proxy in message mode: its "
                "backend connections carry many clients' requests, a PROXY header names one client"
            ],
            id="send-proxy-in-message-mode",
        ),
        pytest.param(
            ['mode = "tcp"', 'send_proxy = "v3"'],
            ["line 4: services.s.send_proxy: expected one of 'v1', 'v2', got 'v3'"],
            id="send-proxy-v3",
        ),
        pytest.param(
            ['mode = "tcp"', "send_proxy = 2"],
            ["line 4: services.s.send_proxy: expected one of 'v1', 'v2', got 2"],
            id="send-proxy-a-number",
        ),
        pytest.param(
            [
                'mode = "udp"',
                'send_proxy = "v1"',
                'sni_routes = [{ service = "s", server_names = ["a.example"] }]',
            ],
            [
                "line 3: services.s.mode: expected one of 'http', 'message', 'tcp', got 'udp'",
                "line 5: services.s.sni_routes[0].service: expected another service than this "
                "one (its own backends serve what no route takes)",
            ],
            id="a-bad-mode-not-again-as-its-consequences",
        ),
        pytest.param(
            ['accept_proxy_from = ["10.0.0.0/8"]'],
            [
                "line 3: services.s.accept_proxy_from: expected no accept_proxy_from without "
                "accept_proxy = true"
            ],
            id="accept-proxy-from-alone",
        ),
        pytest.param(
            ["accept_proxy = false", 'accept_proxy_from = ["10.0.0.0/8"]'],
            [
                "line 4: services.s.accept_proxy_from: expected no accept_proxy_from without "
                "accept_proxy = true"
            ],
            id="accept-proxy-from-with-accept-proxy-false",
        ),
        pytest.param(
            ['accept_proxy = "yes"', 'accept_proxy_from = ["10.0.0.0/8"]'],
            ["line 3: services.s.accept_proxy: expected true or false, got 'yes'"],
            id="a-bad-accept-proxy-alone",
        ),
        pytest.param(
            ["accept_proxy = true", 'accept_proxy_from = ["10.0.0.0/8", "10.0.0.0/33"]'],
            [
                "line 4: services.s.accept_proxy_from: expected a list of addresses or CIDRs like "
                "\"10.0.0.0/8\", got ['10.0.0.0/8', '10.0.0.0/33']"
            ],
            id="a-bad-cidr",
        ),
        pytest.param(
            ["accept_proxy = true", 'accept_proxy_from = ["lb.example"]'],
            [
                "line 4: services.s.accept_proxy_from: expected a list of addresses or CIDRs like "
                "\"10.0.0.0/8\", got ['lb.example']"
            ],
            id="a-host-name",
        ),
        pytest.param(
            ["accept_proxy = true", 'accept_proxy_from = "10.0.0.0/8"'],
            [
                "line 4: services.s.accept_proxy_from: expected a list of addresses or CIDRs like "
                "\"10.0.0.0/8\", got '10.0.0.0/8'"
            ],
            id="not-a-list",
        ),
    ],
)
def test_proxy_protocol_keys(tmp_path: Path, body: list[str], expected: list[str]) -> None:
    text = service("s", 7001, *body, 'backends = ["127.0.0.1:9001"]')
    assert messages(tmp_path, text) == [f"DIR/c.toml: {e}" for e in expected]


# ---------------------------------------------------------------- every mistake at once

MANY = """\
[services.w]
listen = "127.0.0.1:7001"
mode = "http"
backends = ["127.0.0.1:9001"]
sni_routes = [{ service = "t", server_names = ["a.example"] }]
[services.w.tls]
cert = "nope.pem"
key = "key.pem"
verify_client = "required"
[services.m]
listen = "127.0.0.1:7002"
send_proxy = "v1"
backends = ["127.0.0.1:9002"]
[services.t]
listen = "127.0.0.1:7003"
mode = "tcp"
backends = []
send_proxy = "v3"
accept_proxy_from = ["10.0.0.0/8"]
sni_routes = [{ service = "m", server_names = ["m.example"] }]
[services.t.backend_tls]
client_cert = "cert.pem"
"""
MANY_ERRORS = [
    (5, "services.w.sni_routes", 'expected no sni_routes in http mode (they need mode = "tcp"'),
    (6, "services.w.tls.client_ca", "missing: expected the path of PEM CA certificates"),
    (7, "services.w.tls.cert", "got 'nope.pem': no such file (DIR/nope.pem)"),
    (12, "services.m.send_proxy", "expected no send_proxy in message mode"),
    (18, "services.t.send_proxy", "expected one of 'v1', 'v2', got 'v3'"),
    (19, "services.t.accept_proxy_from", "expected no accept_proxy_from without accept_proxy"),
    (20, "services.t.sni_routes[0].service", "got 'm' in message mode"),
    (21, "services.t.backend_tls.client_key", "missing: expected the path of a PEM private key"),
]


def test_every_mistake_is_reported_at_once_in_line_order(tmp_path: Path) -> None:
    path = write(tmp_path, MANY)
    err = config_error(path)
    assert [(e.line, e.where) for e in err.errors] == [(n, w) for n, w, _ in MANY_ERRORS]
    lines = str(err).replace(str(tmp_path), "DIR").splitlines()
    assert lines[0] == f"DIR/c.toml: {len(MANY_ERRORS)} errors"
    for text, (line, where, fragment) in zip(lines[1:], MANY_ERRORS, strict=True):
        assert text.startswith(f"DIR/c.toml: line {line}: {where}: "), text
        assert fragment in text, text
    assert (err.source, err.line, err.where) == (str(path), 5, "services.w.sni_routes")


def test_a_json_file_gets_the_same_errors_each_on_its_own_line(tmp_path: Path) -> None:
    toml_errors = config_error(write(tmp_path, MANY)).errors
    text = json.dumps(tomllib.loads(MANY), indent=2)
    json_errors = config_error(write(tmp_path, text, name="c.json")).errors
    assert [(e.where, e.message) for e in json_errors] == [
        (e.where, e.message) for e in toml_errors
    ]
    rows = text.splitlines()
    for e in json_errors:  # the line of the key, or of its table when the key is missing
        assert e.source == str(tmp_path / "c.json")
        assert e.line is not None
        key = e.where.rsplit(".", 1)[1].split("[")[0]
        table = e.where.rsplit(".", 2)[1].split("[")[0]
        assert f'"{key}"' in rows[e.line - 1] or f'"{table}"' in rows[e.line - 1], e.describe()
