"""Certificates for tests, made by the openssl command line in a test's temporary directory.

    make_ca(dir)                          a CA (self-signed, EC P-256)
    make_cert(ca, dir, names, ...)        a leaf signed by the CA: DNS and IP subjectAltNames,
                                          serverAuth, or clientAuth with client=True
    make_self_signed(dir, names, ...)     a leaf that is its own issuer
    make_dated(ca, dir, names, ...)       a leaf valid between two given dates, past ones too
                                          (`openssl ca -startdate/-enddate`: openssl 3.0's x509
                                          and req cannot date a certificate in the past)
    make_expired(ca, dir, names, ...)     a leaf whose validity ended in 2020
    default_pki(tmp_path_factory)         one set of all of these for the session, made once

Every key is written with mode 0600 under the directory given, which is a pytest temporary
directory: no key is ever kept in the repository.
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest

OPENSSL = "/usr/bin/openssl"
KeyKind = Literal["ec", "rsa"]


@dataclass(frozen=True)
class Ca:
    cert_path: Path
    key_path: Path
    name: str


@dataclass(frozen=True)
class Pair:
    cert_path: Path
    key_path: Path


@dataclass(frozen=True)
class Pki:
    """The session's certificates (see `default_pki`)."""

    ca: Ca
    server: Pair
    """a.example, *.b.example, localhost (and 127.0.0.1), EC."""
    other: Pair
    """c.example, EC."""
    rsa: Pair
    """rsa.example, localhost (and 127.0.0.1), RSA 2048."""
    client: Pair
    """CN client-1, clientAuth."""
    expired: Pair
    """expired.example, not valid since 2020."""


def openssl(*args: str | Path, cwd: Path | None = None) -> str:
    """Run openssl; its standard output. A failure raises with openssl's own message."""
    done = subprocess.run(
        [OPENSSL, *map(str, args)], capture_output=True, text=True, check=False, cwd=cwd
    )
    if done.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(map(str, args))} failed: {done.stderr.strip()}")
    return done.stdout


def _file(stem: Path, suffix: str) -> Path:
    return stem.with_name(stem.name + suffix)


def _stem(dir: Path, hint: str) -> Path:
    """A path in `dir` named after `hint`, not yet used by a certificate."""
    base = re.sub(r"[^A-Za-z0-9.-]+", "_", hint).strip("_.") or "cert"
    path, number = dir / base, 1
    while _file(path, ".crt").exists() or _file(path, ".key").exists():
        number += 1
        path = dir / f"{base}-{number}"
    return path


def make_key(path: Path, kind: KeyKind = "ec") -> Path:
    """A private key in PEM at `path`, mode 0600."""
    if kind == "ec":
        options = ["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"]
    else:
        options = ["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    os.chmod(path, 0o600)
    openssl("genpkey", *options, "-out", path)
    os.chmod(path, 0o600)
    return path


def _subject(cn: str) -> str:
    return "/CN=" + cn.replace("\\", "\\\\").replace("/", "\\/")


def _extensions(
    names: list[str], ip_sans: tuple[str, ...] | list[str], client: bool, ca: bool = False
) -> str:
    lines = []
    if ca:
        lines += [
            "basicConstraints = critical, CA:TRUE",
            "keyUsage = critical, keyCertSign, cRLSign",
        ]
    else:
        lines += [
            "basicConstraints = critical, CA:FALSE",
            "keyUsage = critical, digitalSignature, keyEncipherment",
            f"extendedKeyUsage = {'clientAuth' if client else 'serverAuth'}",
        ]
    sans = [f"DNS:{n}" for n in names] + [f"IP:{ip}" for ip in ip_sans]
    if sans:
        lines.append("subjectAltName = " + ", ".join(sans))
    lines += ["subjectKeyIdentifier = hash", "authorityKeyIdentifier = keyid"]
    return "\n".join(lines) + "\n"


def make_ca(dir: Path, name: str = "Test CA") -> Ca:
    """A self-signed CA valid ten years, EC P-256."""
    stem = _stem(dir, name)
    key = make_key(_file(stem, ".key"))
    cert = _file(stem, ".crt")
    ext = _file(stem, ".ext")
    ext.write_text(_extensions([], (), False, ca=True).replace("keyid", "keyid:always"))
    csr = _file(stem, ".csr")
    openssl("req", "-new", "-key", key, "-subj", _subject(name), "-out", csr)
    openssl(
        "x509", "-req", "-in", csr, "-signkey", key, "-days", "3650", "-sha256",
        "-set_serial", str(secrets.randbits(63)), "-extfile", ext, "-out", cert,
    )  # fmt: skip
    return Ca(cert, key, name)


def _request(dir: Path, names: list[str], key: KeyKind, cn: str | None) -> tuple[Path, Path]:
    """A new key and a certificate request for it; the key and the request's paths."""
    common = cn if cn is not None else (names[0] if names else "test")
    stem = _stem(dir, common)
    key_path = make_key(_file(stem, ".key"), key)
    csr = _file(stem, ".csr")
    openssl("req", "-new", "-key", key_path, "-subj", _subject(common), "-out", csr)
    return key_path, csr


def make_cert(
    ca: Ca,
    dir: Path,
    names: list[str],
    *,
    key: KeyKind = "ec",
    days: int = 30,
    client: bool = False,
    cn: str | None = None,
    ip_sans: tuple[str, ...] | list[str] = ("127.0.0.1",),
) -> Pair:
    """A leaf signed by `ca` for `names` (subjectAltName DNS) and `ip_sans`; its CN is `cn`,
    else the first name. `client`: for client authentication instead of a server."""
    key_path, csr = _request(dir, names, key, cn)
    cert = key_path.with_suffix(".crt")
    ext = key_path.with_suffix(".ext")
    ext.write_text(_extensions(names, ip_sans, client))
    openssl(
        "x509", "-req", "-in", csr, "-CA", ca.cert_path, "-CAkey", ca.key_path,
        "-days", str(days), "-sha256", "-set_serial", str(secrets.randbits(63)),
        "-extfile", ext, "-out", cert,
    )  # fmt: skip
    return Pair(cert, key_path)


def make_self_signed(
    dir: Path,
    names: list[str],
    *,
    key: KeyKind = "ec",
    days: int = 30,
    cn: str | None = None,
    ip_sans: tuple[str, ...] | list[str] = ("127.0.0.1",),
) -> Pair:
    """A server certificate for `names` that is its own issuer."""
    key_path, csr = _request(dir, names, key, cn)
    cert = key_path.with_suffix(".crt")
    ext = key_path.with_suffix(".ext")
    ext.write_text(_extensions(names, ip_sans, False).replace("= keyid", "= keyid:always"))
    openssl(
        "x509", "-req", "-in", csr, "-signkey", key_path, "-days", str(days), "-sha256",
        "-set_serial", str(secrets.randbits(63)), "-extfile", ext, "-out", cert,
    )  # fmt: skip
    return Pair(cert, key_path)


_CA_CONFIG = """\
[ca]
default_ca = here
[here]
dir = {dir}
database = $dir/index.txt
new_certs_dir = $dir
serial = $dir/serial
default_md = sha256
policy = anything
unique_subject = no
email_in_dn = no
[anything]
commonName = supplied
"""


def make_dated(
    ca: Ca, dir: Path, names: list[str], *, not_before: str, not_after: str, key: KeyKind = "ec"
) -> Pair:
    """A leaf signed by `ca` valid from `not_before` to `not_after` (YYYYMMDDHHMMSSZ, UTC),
    which may be in the past: `openssl ca` dates a certificate as it is told."""
    key_path, csr = _request(dir, names, key, None)
    cert = key_path.with_suffix(".crt")
    ext = key_path.with_suffix(".ext")
    ext.write_text(_extensions(names, ("127.0.0.1",), False))
    work = key_path.with_suffix(".ca")
    work.mkdir()
    (work / "index.txt").write_text("")
    (work / "serial").write_text(f"{secrets.randbits(63):016X}\n")
    config = work / "ca.cnf"
    config.write_text(_CA_CONFIG.format(dir=work))
    openssl(
        "ca", "-batch", "-notext", "-config", config, "-cert", ca.cert_path,
        "-keyfile", ca.key_path, "-in", csr, "-out", cert, "-extfile", ext,
        "-startdate", not_before, "-enddate", not_after,
    )  # fmt: skip
    return Pair(cert, key_path)


def make_expired(ca: Ca, dir: Path, names: list[str], *, key: KeyKind = "ec") -> Pair:
    """A leaf signed by `ca` that was valid in January 2020 only."""
    return make_dated(
        ca, dir, names, not_before="20200101000000Z", not_after="20200201000000Z", key=key
    )


_PKIS: dict[int, tuple[pytest.TempPathFactory, Pki]] = {}


def default_pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """The session's CA and certificates, made on the first call and reused after."""
    held = _PKIS.get(id(tmp_path_factory))
    if held is not None and held[0] is tmp_path_factory:
        return held[1]
    dir = tmp_path_factory.mktemp("pki")
    ca = make_ca(dir)
    pki = Pki(
        ca=ca,
        server=make_cert(ca, dir, ["a.example", "*.b.example", "localhost"]),
        other=make_cert(ca, dir, ["c.example"]),
        rsa=make_cert(ca, dir, ["rsa.example", "localhost"], key="rsa"),
        client=make_cert(ca, dir, [], client=True, cn="client-1", ip_sans=()),
        expired=make_expired(ca, dir, ["expired.example"]),
    )
    _PKIS[id(tmp_path_factory)] = (tmp_path_factory, pki)
    return pki
