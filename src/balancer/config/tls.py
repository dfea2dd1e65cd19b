"""The TLS and PROXY protocol settings of a service: `tls`, `backend_tls`, `sni_routes`.

File names are resolved against the directory of the config file. Here a file is only
checked to exist and be readable; what it holds (a certificate chain, a key that
matches it, CA certificates) is read when the service's TLS contexts are built, at a
start-up or reload's prepare step, where a bad file rejects the whole file.
"""

from __future__ import annotations

import os
import re

from balancer.config.bounds import show_value
from balancer.config.checks import Problems
from balancer.config.model import (
    TLS_VERSIONS,
    VERIFY_CLIENT,
    BackendTlsConfig,
    CertConfig,
    SniRouteConfig,
    TlsConfig,
)
from balancer.config.schema import BACKEND_TLS_KEYS, CERT_KEYS, SNI_ROUTE_KEYS, TLS_KEYS
from balancer.config.table import Table

SERVER_NAME_RE = re.compile(r"(\*\.)?[a-z0-9]([a-z0-9-]{0,62})(\.[a-z0-9]([a-z0-9-]{0,62}))*")
"""A host name as SNI carries it (lower case), or a wildcard `*.example.com`."""
_ALPN_RE = re.compile(r"[\x21-\x7e]{1,255}")
_HEADER_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def _base_dir(source: str) -> str:
    return os.path.dirname(os.path.abspath(source)) if os.path.isfile(source) else os.getcwd()


def _file(t: Table, key: str, base: str, *, required: bool, what: str, why: str = "") -> str:
    """The absolute path of a readable file named by `key` ("" when absent and optional);
    `why` says, when it is missing, why it is required."""
    if key not in t.data:
        if required:
            t.fail(key, f"missing: expected the path of {what}" + (f" ({why})" if why else ""))
        return ""
    value = t.data[key]
    if not isinstance(value, str) or not value:
        t.fail(key, f"expected the path of {what}, got {show_value(value)}")
        return ""
    path = os.path.normpath(os.path.join(base, os.path.expanduser(value)))
    if os.path.isdir(path):
        t.fail(key, f"expected the path of {what}, got {value!r}: a directory ({path})")
    elif not os.path.isfile(path):
        t.fail(key, f"expected the path of {what}, got {value!r}: no such file ({path})")
    elif not os.access(path, os.R_OK):
        t.fail(key, f"expected the path of {what}, got {value!r}: not readable by this user")
    return path


def _names(t: Table, key: str) -> tuple[str, ...]:
    value = t.data.get(key, [])
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        names = [v.lower().rstrip(".") for v in value]
        if all(SERVER_NAME_RE.fullmatch(n) for n in names):
            return tuple(names)
    t.fail(key, f'expected a list of server names like "a.example" or "*.example", got '
           f"{show_value(value)}")  # fmt: skip
    return ()


def _alpn(t: Table) -> tuple[str, ...]:
    value = t.data.get("alpn", [])
    if isinstance(value, list) and all(isinstance(v, str) and _ALPN_RE.fullmatch(v) for v in value):
        return tuple(value)
    t.fail("alpn", f'expected a list of protocol names like ["h2", "http/1.1"], got '
           f"{show_value(value)}")  # fmt: skip
    return ()


def _text(t: Table, key: str, default: str) -> str:
    value = t.data.get(key, default)
    if isinstance(value, str):
        return value
    t.fail(key, f"expected a string, got {show_value(value)}")
    return default


def _cert(
    item: object, where: str, problems: Problems, base: str, *, first: bool
) -> CertConfig | None:
    """One item of `certs`: all but the `first` (the default certificate) list their names."""
    t = Table.read(item, where, problems, CERT_KEYS, what="a table with cert, key, server_names")
    if t is None:
        return None
    cert = _file(t, "cert", base, required=True, what="a PEM certificate chain")
    key = _file(t, "key", base, required=True, what="a PEM private key")
    names = _names(t, "server_names")
    if not names and not first and t.clean("server_names"):
        expected = ("expected the server names this certificate serves (only the first, "
                    "the default, may go without)")  # fmt: skip
        if t.has("server_names"):
            t.fail("server_names", f"{expected}, got []")
        else:
            t.fail("server_names", f"missing: {expected}")
    return CertConfig(cert, key, names) if cert and key else None


def read_tls(data: object, path: str, problems: Problems) -> TlsConfig | None:
    """`tls = { cert = ..., key = ... }` or `tls = { certs = [{ cert, key, server_names }] }`."""
    t = Table.read(data, path, problems, TLS_KEYS, what="a table of TLS settings")
    if t is None:
        return None
    base = _base_dir(problems.source)
    certs: list[CertConfig] = []
    if t.has("certs"):
        if t.has("cert") or t.has("key"):
            t.fail("certs", "expected either cert and key, or certs, not both")
        value = t.data["certs"]
        if not isinstance(value, list) or not value:
            t.fail("certs", f"expected a list of tables with cert, key and server_names, got "
                   f"{show_value(value)}")  # fmt: skip
        else:
            for i, item in enumerate(value):
                cert = _cert(item, f"{t.where('certs')}[{i}]", problems, base, first=i == 0)
                if cert is not None:
                    certs.append(cert)
    else:
        alone = "or a certs list"
        chain = _file(t, "cert", base, required=True, what="a PEM certificate chain", why=alone)
        key = _file(t, "key", base, required=True, what="a PEM private key", why=alone)
        if chain and key:
            certs.append(CertConfig(chain, key))
    d = TlsConfig(certs=())
    verify = t.choice("verify_client", d.verify_client, VERIFY_CLIENT)
    client_ca = _file(t, "client_ca", base, required=verify != "none",
                      what="PEM CA certificates for client certificates",
                      why=f"verify_client = {verify!r} verifies them against it")  # fmt: skip
    subject_header = _text(t, "subject_header", d.subject_header)
    if subject_header and not _HEADER_RE.fullmatch(subject_header):
        t.fail("subject_header", f"expected a header name, got {subject_header!r}")
    settings = TlsConfig(  # every key read, so that each mistake is reported
        certs=tuple(certs),
        min_version=t.choice("min_version", d.min_version, TLS_VERSIONS),
        ciphers=_text(t, "ciphers", d.ciphers),
        alpn=_alpn(t),
        client_ca=client_ca,
        verify_client=verify,
        handshake_timeout=t.bounded(
            "handshake_timeout", d.handshake_timeout, "tls.handshake_timeout"
        ),
        subject_header=subject_header,
    )
    return settings if certs else None


def read_backend_tls(data: object, path: str, problems: Problems) -> BackendTlsConfig | None:
    """`backend_tls = { ca = ..., server_name = ..., verify = true, client_cert, client_key }`."""
    t = Table.read(data, path, problems, BACKEND_TLS_KEYS, what="a table of backend TLS settings")
    if t is None:
        return None
    base = _base_dir(problems.source)
    d = BackendTlsConfig()
    server_name = _text(t, "server_name", "").lower().rstrip(".")
    if server_name and (server_name.startswith("*") or not SERVER_NAME_RE.fullmatch(server_name)):
        t.fail("server_name", f"expected a host name (no wildcard), got {server_name!r}")
    client_cert = _file(t, "client_cert", base, required=t.has("client_key"),
                        what="a PEM client certificate chain",
                        why="client_key is set")  # fmt: skip
    client_key = _file(t, "client_key", base, required=t.has("client_cert"),
                       what="a PEM private key for client_cert",
                       why="client_cert is set")  # fmt: skip
    return BackendTlsConfig(
        ca=_file(t, "ca", base, required=False, what="PEM CA certificates"),
        server_name=server_name,
        verify=t.boolean("verify", d.verify),
        client_cert=client_cert,
        client_key=client_key,
        min_version=t.choice("min_version", d.min_version, TLS_VERSIONS),
        alpn=_alpn(t),
    )


def read_sni_routes(data: object, path: str, problems: Problems) -> tuple[SniRouteConfig, ...]:
    """`sni_routes = [{ server_names = ["a.example", "*.b.example"], service = "..." }]`."""
    if not isinstance(data, list):
        problems.add(path, f"expected a list of route tables, got {show_value(data)}")
        return ()
    routes: list[SniRouteConfig] = []
    for i, item in enumerate(data):
        t = Table.read(item, f"{path}[{i}]", problems, SNI_ROUTE_KEYS,
                       what="a table with server_names and service")  # fmt: skip
        if t is None:
            continue
        service = t.string("service")
        if service is None and not t.has("service"):
            t.fail("service", "missing: expected the name of the tcp service that serves it")
        if not t.has("server_names"):
            t.fail("server_names", 'missing: expected a list of names like "a.example"')
            continue
        names = _names(t, "server_names")
        if not names and t.clean("server_names"):
            t.fail("server_names", 'expected at least one name like "a.example", got []')
        if service is not None and names:
            routes.append(SniRouteConfig(service=service, server_names=names))
    return tuple(routes)
