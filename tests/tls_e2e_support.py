"""Processes and clients for the TLS and PROXY protocol end-to-end tests.

services_toml(path, {name: {key: value}})   a config file of several services, values
                                            written as TOML (tables inline)
serve(path)                                 `balancer serve` on it, once ready
s_client(port, *args)                       `openssl s_client` against 127.0.0.1:port
tls_client(ca, pair)                        a Python client context trusting `ca`
https_get(port, name, ctx, ...)             one request on a new TLS connection: its status,
                                            body and the certificate the server presented
nginx_tls(pair, label)                      nginx serving HTTPS with `pair`, answering each
                                            request with its label, SNI and resumption
haproxy_with(config)                        HAProxy with a config made for its port
front_errors / tls_status                   a service's "tls" object in /status
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import struct
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.http_e2e_support import CHILD_ENV
from tests.peers import HOST, Peer, free_port, need, nginx_conf, running
from tests.support import BalancerProc, start_balancer
from tests.tls_support import OPENSSL, Pair

FAST_HEALTH = {"interval": 0.2, "timeout": 1, "rise": 1, "fall": 1}


# -- config files ---------------------------------------------------------------------------


def toml_value(value: Any) -> str:
    """`value` as a TOML value: strings, numbers, booleans, lists, tables (inline)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (str, Path)):
        return json.dumps(str(value))
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(f"no TOML for {value!r}")


def services_toml(path: Path, services: Mapping[str, Mapping[str, Any]]) -> Path:
    """A config file of the given services, each on 127.0.0.1:0 unless it says otherwise."""
    lines: list[str] = []
    for name, keys in services.items():
        lines.append(f"[services.{name}]")
        merged = {"listen": "127.0.0.1:0", **keys}
        lines += [f"{key} = {toml_value(value)}" for key, value in merged.items()]
        lines.append("")
    path.write_text("\n".join(lines))
    return path


def serve(path: Path, *extra: str) -> BalancerProc:
    """`balancer serve PATH` (admin on a free port), once it is ready."""
    return start_balancer(path, *extra, env=CHILD_ENV)


@contextmanager
def serving(path: Path, *extra: str) -> Iterator[BalancerProc]:
    """`serve(path)` for the block; stopped after it, and required to exit 0 when the
    block did not fail."""
    bal = serve(path, *extra)
    try:
        yield bal
    finally:
        code = bal.stop()
    assert code == 0, bal.tail()


def tls_status(bal: BalancerProc, service: str) -> dict[str, Any]:
    doc: dict[str, Any] = bal.status()["services"][service]["tls"]
    return doc


def front_errors(bal: BalancerProc, service: str) -> dict[str, int]:
    """The connections a service's front door closed, by reason."""
    return {str(k): int(v) for k, v in tls_status(bal, service)["errors"].items()}


def metric_value(text: str, name: str, **labels: str) -> float | None:
    """The value of the sample `name{labels}` in a /metrics text (labels in any order)."""
    for line in text.splitlines():
        if not line.startswith(name + "{") and line.split(" ")[0] != name:
            continue
        head, _, value = line.rpartition(" ")
        if all(f'{k}="{v}"' in head for k, v in labels.items()):
            return float(value)
    return None


# -- clients --------------------------------------------------------------------------------


def s_client(
    port: int, *args: str, send: bytes = b"", timeout: float = 15.0
) -> subprocess.CompletedProcess[str]:
    """`openssl s_client -connect 127.0.0.1:PORT ARGS`, `send` on its standard input (it
    ends the connection when that ends, unless `-ign_eof` is among `args`)."""
    return subprocess.run(
        [OPENSSL, "s_client", "-connect", f"{HOST}:{port}", *args],
        input=send.decode("latin-1"),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def tls_client(
    ca: Path, pair: Pair | None = None, *, alpn: list[str] | None = None
) -> ssl.SSLContext:
    """A client context that trusts `ca` (and checks the host name), with `pair` as its
    client certificate if given."""
    ctx = ssl.create_default_context(cafile=str(ca))
    if pair is not None:
        ctx.load_cert_chain(str(pair.cert_path), str(pair.key_path))
    if alpn:
        ctx.set_alpn_protocols(alpn)
    return ctx


@dataclass
class Answer:
    status: int
    body: bytes
    headers: dict[str, str]
    peer_cert: dict[str, Any]
    """The server's certificate as `SSLSocket.getpeercert()` gives it (verified)."""
    version: str | None

    def json(self) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(self.body)
        return doc

    @property
    def serial(self) -> str:
        return str(self.peer_cert["serialNumber"])

    @property
    def common_name(self) -> str:
        return next(
            str(v) for rdn in self.peer_cert["subject"] for k, v in rdn if k == "commonName"
        )


def https_get(
    port: int,
    name: str,
    ctx: ssl.SSLContext,
    path: str = "/",
    headers: Mapping[str, str] | None = None,
    timeout: float = 10.0,
    source: str | None = None,
) -> Answer:
    """One GET on a new TLS connection to 127.0.0.1:PORT with SNI (and Host) `name`, from
    the loopback address `source` if given."""
    bind = (source, 0) if source is not None else None
    with (
        socket.create_connection((HOST, port), timeout=timeout, source_address=bind) as raw,
        ctx.wrap_socket(raw, server_hostname=name) as tls,
    ):
        lines = [f"GET {path} HTTP/1.1", f"Host: {name}", "Connection: close"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        tls.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        resp = http.client.HTTPResponse(tls)
        resp.begin()
        body = resp.read()
        cert = tls.getpeercert()
        assert cert is not None
        return Answer(
            resp.status, body, {k.lower(): v for k, v in resp.getheaders()}, dict(cert),
            tls.version(),
        )  # fmt: skip


def keepalive_get(tls: ssl.SSLSocket, path: str, host: str = "a.example") -> tuple[int, bytes]:
    """One GET on an open connection, left open: the status and the body."""
    tls.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    resp = http.client.HTTPResponse(tls)
    resp.begin()
    return resp.status, resp.read()


def echo_headers(answer: Answer) -> dict[str, list[str]]:
    """The request headers an echo backend saw (tests/http_echo_backend.py), by lower name."""
    out: dict[str, list[str]] = {}
    for key, value in answer.json()["headers"]:
        out.setdefault(str(key).lower(), []).append(str(value))
    return out


# -- peers ----------------------------------------------------------------------------------


def nginx_tls_server(port: int, pair: Pair, label: str) -> str:
    """The HTTPS `server` block of `nginx_tls`."""
    answer = f'"{label} sni=$ssl_server_name reused=$ssl_session_reused\\n"'
    return f"""\
    server {{
        listen {HOST}:{port} ssl;
        ssl_certificate {pair.cert_path};
        ssl_certificate_key {pair.key_path};
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_session_cache shared:tls:1m;
        ssl_session_tickets on;
        default_type text/plain;
        location / {{
            return 200 {answer};
        }}
    }}"""


@contextmanager
def nginx_tls(
    pair: Pair, label: str, *, resumption: bool = True, port: int | None = None
) -> Iterator[Peer]:
    """nginx serving HTTPS on `port` (else a free loopback port) with `pair`; every request
    is answered `LABEL sni=<server name> reused=<r or .>`. Without `resumption` every
    handshake is a full one (no session cache, no tickets)."""
    binary = need("nginx")
    port = port if port is not None else free_port()
    with tempfile.TemporaryDirectory(prefix="balancer-nginx-tls-") as tmp:
        root = Path(tmp)
        root.chmod(0o755)
        cfg = root / "nginx.conf"
        text = nginx_conf(root, nginx_tls_server(port, pair, label), connections=1024)
        if not resumption:
            text = text.replace("ssl_session_cache shared:tls:1m;", "ssl_session_cache off;")
            text = text.replace("ssl_session_tickets on;", "ssl_session_tickets off;")
        cfg.write_text(text)
        args = [binary, "-c", str(cfg), "-p", str(root), "-e", str(root / "error.log")]
        with running("nginx", args, port) as peer:
            yield peer


@contextmanager
def haproxy_with(config: Callable[[int], str]) -> Iterator[Peer]:
    """HAProxy with `config(port)` as its configuration, once `port` accepts."""
    binary = need("haproxy")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="balancer-haproxy-") as tmp:
        cfg = Path(tmp) / "haproxy.cfg"
        cfg.write_text(config(port))
        with running("haproxy", [binary, "-db", "-f", str(cfg)], port) as peer:
            yield peer


HAPROXY_HEAD = """\
global
    nbthread 1
    maxconn 200
defaults
    timeout connect 2s
    timeout client 30s
    timeout server 30s
"""


def read_all(sock: socket.socket) -> bytes:
    """Everything `sock` receives until the peer closes (a reset ends it too)."""
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


def raw_http(
    port: int, preamble: bytes, request: bytes, timeout: float = 10.0, source: str | None = None
) -> bytes:
    """`preamble` (a PROXY header, say) then `request` on a new plain connection (from the
    loopback address `source` if given); all the bytes that came back until it was closed."""
    bind = (source, 0) if source is not None else None
    with socket.create_connection((HOST, port), timeout=timeout, source_address=bind) as sock:
        sock.sendall(preamble + request)
        return read_all(sock)


def http_body(reply: bytes) -> tuple[int, bytes]:
    """The status and the body of one HTTP/1.x response in `reply` (a whole connection's
    bytes, the response with Content-Length or ended by the close)."""
    head, sep, body = reply.partition(b"\r\n\r\n")
    assert sep, f"no response head in {reply[:200]!r}"
    status = int(head.split(b" ", 2)[1])
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == b"content-length":
            body = body[: int(value.strip())]
    return status, body


# -- PROXY protocol headers, made by hand (independent of balancer.core.proxyproto) ----------

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def proxy_v1(source: tuple[str, int], destination: tuple[str, int]) -> bytes:
    family = "TCP6" if ":" in source[0] else "TCP4"
    return (f"PROXY {family} {source[0]} {destination[0]} {source[1]} {destination[1]}\r\n"
            .encode())  # fmt: skip


def proxy_v2(source: tuple[str, int], destination: tuple[str, int], tlvs: bytes = b"") -> bytes:
    """A version 2 PROXY (command 0x21) header over TCP, IPv4 or IPv6, with `tlvs` after
    the addresses."""
    six = ":" in source[0]
    family = socket.AF_INET6 if six else socket.AF_INET
    block = (
        socket.inet_pton(family, source[0])
        + socket.inet_pton(family, destination[0])
        + struct.pack("!HH", source[1], destination[1])
    )
    body = block + tlvs
    return V2_SIGNATURE + bytes([0x21, 0x21 if six else 0x11]) + struct.pack("!H", len(body)) + body


def proxy_v2_local() -> bytes:
    """A version 2 LOCAL header (a proxy's own connection: no addresses)."""
    return V2_SIGNATURE + bytes([0x20, 0x00]) + struct.pack("!H", 0)


def tlv(kind: int, value: bytes) -> bytes:
    return bytes([kind]) + struct.pack("!H", len(value)) + value
