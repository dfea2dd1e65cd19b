"""The settings of a service's edges: TLS on its listener and towards its backends, SNI
routes (read by `config.tls`)."""

from __future__ import annotations

from dataclasses import dataclass

TLS_VERSIONS = ("1.2", "1.3")
VERIFY_CLIENT = ("none", "optional", "required")
"""Client certificates: not asked for, checked when given, or required."""
PROXY_VERSIONS = ("v1", "v2")
"""The PROXY protocol header sent to backends (`send_proxy`)."""


@dataclass(frozen=True)
class CertConfig:
    """A certificate chain and its key, for the server names it serves."""

    cert: str
    key: str
    server_names: tuple[str, ...] = ()
    """Exact names or `*.example.com`; the first certificate serves any name none lists."""


@dataclass(frozen=True)
class TlsConfig:
    """Termination: the service's listener speaks TLS, its certificate chosen by SNI."""

    certs: tuple[CertConfig, ...]
    min_version: str = "1.2"
    ciphers: str = ""
    """An OpenSSL cipher list for TLS 1.2 (1.3's suites are OpenSSL's); "": its default."""
    alpn: tuple[str, ...] = ()
    """Protocols offered by ALPN, in order of preference; empty: no ALPN."""
    client_ca: str = ""
    """CA certificates client certificates are verified against."""
    verify_client: str = "none"
    handshake_timeout: float = 10.0
    """The ClientHello and the handshake must be done within this, from the accept."""
    subject_header: str = "X-Client-Cert-Subject"
    """Http mode: the header carrying a verified client certificate's subject (a client's
    own is always removed); empty: none."""


@dataclass(frozen=True)
class BackendTlsConfig:
    """Origination: connections to the service's backends speak TLS."""

    ca: str = ""
    """CA certificates backends are verified against; "": the system's."""
    server_name: str = ""
    """The name sent by SNI and verified; "": the backend's host."""
    verify: bool = True
    client_cert: str = ""
    client_key: str = ""
    min_version: str = "1.2"
    alpn: tuple[str, ...] = ()


@dataclass(frozen=True)
class SniRouteConfig:
    """Tcp mode: connections whose ClientHello names one of `server_names` go to `service`."""

    service: str
    server_names: tuple[str, ...]
