"""TLS contexts: the certificates a service's listener serves, and its backends' TLS.

How it works:

- `load_server_tls` builds a terminating service's contexts, one per certificate,
  each with the service's versions, ciphers, ALPN and client-certificate checks.
  A connection's context is picked by the server name of its ClientHello, in
  OpenSSL's SNI callback (`ServerTls.choose`): an exact name, then a wildcard one
  label up, then the first certificate. Every file is read here, at the
  prepare step of a start-up or a reload, and every problem is raised at once as
  a `ConfigError` naming the key and the file: a bad file changes nothing, and the
  contexts already serving keep serving. Certificates are swapped whole on a
  reload; established connections keep the context they were made with.
- `load_backend_tls` builds what origination needs: one client context per
  backend, built on first use, that offers the TLS session of the backend's last
  connection (`session_for`) so that a reconnect resumes instead of doing a full
  handshake.
"""

from __future__ import annotations

import functools
import logging
import os
import ssl
import stat
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from balancer.config.errors import ConfigError
from balancer.config.model import BackendTlsConfig, ServiceConfig, TlsConfig
from balancer.core.x509 import certificates, read_certificate

log = logging.getLogger("balancer")

_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
_VERIFY = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}


@dataclass(frozen=True)
class CertStatus:
    """A served certificate, as `/status` and `/metrics` show it."""

    path: str
    server_names: tuple[str, ...]
    subject: str
    not_after: float
    """Its expiry (Unix time)."""

    def days_left(self, now: float | None = None) -> float:
        return (self.not_after - (time.time() if now is None else now)) / 86400


@dataclass
class ServerTls:
    """A terminating service's contexts, by server name."""

    config: TlsConfig
    default: ssl.SSLContext
    exact: dict[str, ssl.SSLContext] = field(default_factory=dict)
    wildcard: dict[str, ssl.SSLContext] = field(default_factory=dict)
    """`example.com` for `*.example.com`."""
    certs: list[CertStatus] = field(default_factory=list)
    loaded_at: float = field(default_factory=time.time)

    def context_for(self, name: str | None) -> ssl.SSLContext:
        """The context of the certificate that serves `name` (lower case, no dot at the end)."""
        if name:
            found = self.exact.get(name)
            if found is not None:
                return found
            if "." in name:  # *.b.example serves a.b.example, not x.a.b.example
                found = self.wildcard.get(name.split(".", 1)[1])
                if found is not None:
                    return found
        return self.default

    def choose(self, sslobj: Any, name: str | None, ctx: ssl.SSLContext) -> None:
        """The SNI callback (OpenSSL's, during the ClientHello): the certificate for the
        client's server name, and the name kept for the logs and PROXY v2 TLVs."""
        name = name.lower().rstrip(".") if name else None
        sslobj.sni_name = name
        chosen = self.context_for(name)
        if chosen is not ctx:
            sslobj.context = chosen


def sni_of(sslobj: Any) -> str | None:
    """The server name a TLS connection terminated here asked for (None: none)."""
    name: str | None = getattr(sslobj, "sni_name", None)
    return name


def _server_context(cfg: TlsConfig, cert: str, key: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = _VERSIONS[cfg.min_version]
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    if cfg.ciphers:
        ctx.set_ciphers(cfg.ciphers)
    ctx.load_cert_chain(cert, key)
    if cfg.alpn:
        ctx.set_alpn_protocols(list(cfg.alpn))
    if cfg.verify_client != "none":
        ctx.load_verify_locations(cafile=cfg.client_ca)
        ctx.verify_mode = _VERIFY[cfg.verify_client]
    return ctx


def _why(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        return exc.reason or str(exc)
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return str(exc)


def cert_status(path: str, names: tuple[str, ...]) -> CertStatus:
    """What `/status` shows of the certificate chain in `path` (its first certificate)."""
    with open(path, encoding="ascii", errors="replace") as f:
        ders = certificates(f.read())
    if not ders:
        raise ValueError("no PEM CERTIFICATE block in it")
    info = read_certificate(ders[0])
    return CertStatus(path, names or info.dns_names, info.subject, info.not_after.timestamp())


def warn_open_key(service: str, key: str) -> None:
    """A private key readable by other users than its owner is worth a warning."""
    try:
        mode = os.stat(key).st_mode
    except OSError:
        return
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("service %s: private key %s is readable by other users (mode %o); "
                    "chmod 600 it", service, key, stat.S_IMODE(mode))  # fmt: skip


def load_server_tls(svc: ServiceConfig, source: str) -> ServerTls:
    """The contexts of a terminating service; ConfigError listing every file that fails."""
    cfg = svc.tls
    assert cfg is not None
    where = f"services.{svc.name}.tls"
    errors: list[ConfigError] = []
    built: list[tuple[ssl.SSLContext, tuple[str, ...], CertStatus]] = []
    for i, cert in enumerate(cfg.certs):
        at = f"{where}.certs[{i}]" if len(cfg.certs) > 1 or cert.server_names else where
        try:
            ctx = _server_context(cfg, cert.cert, cert.key)
        except (OSError, ValueError) as exc:
            what = "cannot use the ciphers, client_ca or"
            if isinstance(exc, ssl.SSLError) and "cipher" in str(exc).lower():
                what = "cannot use the ciphers for"
            errors.append(ConfigError(source, at, f"{what} certificate {cert.cert} with key "
                                      f"{cert.key}: {_why(exc)}"))  # fmt: skip
            continue
        try:
            status = cert_status(cert.cert, cert.server_names)
        except (OSError, ValueError) as exc:
            errors.append(ConfigError(source, at, f"cannot read certificate {cert.cert}: {exc}"))
            continue
        built.append((ctx, cert.server_names, status))
    if errors:
        raise ConfigError.collected(errors)
    for cert in cfg.certs:
        warn_open_key(svc.name, cert.key)
    tls = ServerTls(cfg, built[0][0], certs=[status for _, _, status in built])
    tls.default.sni_callback = tls.choose
    for ctx, names, _ in built:
        for name in names:
            if name.startswith("*."):
                tls.wildcard.setdefault(name[2:], ctx)
            else:
                tls.exact.setdefault(name, ctx)
    return tls


class ResumingContext(ssl.SSLContext):
    """A client context that offers the last session of its one backend when it connects."""

    session: ssl.SSLSession | None = None

    def wrap_bio(self, *args: Any, **kwargs: Any) -> ssl.SSLObject:
        if kwargs.get("session") is None and self.session is not None:
            kwargs["session"] = self.session
        return super().wrap_bio(*args, **kwargs)


@dataclass
class BackendTls:
    """A service's TLS towards its backends: a resuming client context per backend."""

    config: BackendTlsConfig
    service: str
    files: tuple[tuple[str, int, int, int], ...] = ()
    """(path, inode, size, mtime) of each file read: a reload keeps this object (and its
    sessions) only when the settings and every file are the same."""
    contexts: dict[str, ResumingContext] = field(default_factory=dict)
    resumed: int = 0
    """Handshakes that resumed a session instead of a full one."""
    handshakes: int = 0

    def context_for(self, address: str) -> ResumingContext:
        ctx = self.contexts.get(address)
        if ctx is None:
            ctx = self.contexts[address] = client_context(self.config)
        return ctx

    def server_name(self, host: str) -> str | None:
        return self.config.server_name or host or None

    def handshake_done(self, address: str, transport: Any) -> None:
        """Count a handshake with `address`, and keep its session for the next connection."""
        sslobj = transport.get_extra_info("ssl_object")
        if sslobj is None:
            return
        self.handshakes += 1
        if sslobj.session_reused:
            self.resumed += 1
        self.keep_session(address, sslobj)

    def keep_session(self, address: str, sslobj: Any) -> None:
        """Offer `sslobj`'s session to the next connection to `address`, once it can be
        resumed (TLS 1.3: with its ticket; TLS 1.2: with its id)."""
        try:
            session = sslobj.session
            resumable = session is not None and (
                session.has_ticket or (sslobj.version() == "TLSv1.2" and session.id)
            )
        except (AttributeError, ValueError, ssl.SSLError):  # the connection is gone
            return
        ctx = self.contexts.get(address)
        if resumable and ctx is not None:
            ctx.session = session


def client_context(cfg: BackendTlsConfig) -> ResumingContext:
    ctx = ResumingContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = _VERSIONS[cfg.min_version]
    if cfg.verify:
        if cfg.ca:
            ctx.load_verify_locations(cafile=cfg.ca)
        else:
            ctx.load_default_certs()
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if cfg.client_cert:
        ctx.load_cert_chain(cfg.client_cert, cfg.client_key)
    if cfg.alpn:
        ctx.set_alpn_protocols(list(cfg.alpn))
    return ctx


@functools.lru_cache(maxsize=64)
def probe_context(cfg: BackendTlsConfig) -> ssl.SSLContext:
    """The client context health checks of a service with `cfg` use (made once; the
    cache is emptied whenever backend TLS files are read again)."""
    return client_context(cfg)


def probe_tls(svc: ServiceConfig, host: str) -> tuple[ssl.SSLContext, str | None] | None:
    """What a health check of a backend at `host` speaks TLS with (None: plain)."""
    cfg = svc.backend_tls
    if cfg is None:
        return None
    return probe_context(cfg), cfg.server_name or host or None


def load_backend_tls(svc: ServiceConfig, source: str) -> BackendTls:
    """A service's backend TLS, its files checked now (ConfigError when one fails)."""
    cfg = svc.backend_tls
    assert cfg is not None
    try:
        client_context(cfg)
    except (OSError, ValueError) as exc:
        files = ", ".join(f for f in (cfg.ca, cfg.client_cert, cfg.client_key) if f)
        what = files or "the system CA certificates"
        where = f"services.{svc.name}.backend_tls"
        raise ConfigError(source, where, f"cannot use {what}: {_why(exc)}") from None
    if cfg.client_key:
        warn_open_key(svc.name, cfg.client_key)
    probe_context.cache_clear()
    return BackendTls(cfg, svc.name, file_stamps(cfg.ca, cfg.client_cert, cfg.client_key))


def file_stamps(*paths: str) -> tuple[tuple[str, int, int, int], ...]:
    """What tells a file's new content from its old: inode, size, modification time."""
    stamps = []
    for path in paths:
        if path:
            try:
                st = os.stat(path)
            except OSError:
                stamps.append((path, 0, 0, 0))
                continue
            stamps.append((path, st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(stamps)


def load_service_tls(
    services: Iterable[ServiceConfig], source: str
) -> dict[str, tuple[ServerTls | None, BackendTls | None]]:
    """The TLS of every service given, all built or none: a ConfigError lists every file
    that fails."""
    out: dict[str, tuple[ServerTls | None, BackendTls | None]] = {}
    errors: list[ConfigError] = []
    for svc in services:
        server = backend = None
        try:
            if svc.tls is not None:
                server = load_server_tls(svc, source)
        except ConfigError as exc:
            errors.extend(exc.errors)
        try:
            if svc.backend_tls is not None:
                backend = load_backend_tls(svc, source)
        except ConfigError as exc:
            errors.extend(exc.errors)
        out[svc.name] = (server, backend)
    if errors:
        raise ConfigError.collected(errors)
    return out
