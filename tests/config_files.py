"""The files a config's TLS keys name, written beside it as dummies.

The loader only checks that each file named by `tls`, `tls.certs[]` and `backend_tls`
exists and is readable (what it holds is read when the service's TLS contexts are
built), so a text file will do for loading: no certificate or key is written here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

DUMMY = "not a certificate: a config test only needs this file to exist\n"
TLS_FILES = ("cert", "key", "client_ca")
BACKEND_TLS_FILES = ("ca", "client_cert", "client_key")


def named_files(doc: dict[str, Any]) -> list[str]:
    """The file names the TLS keys of `doc` (a TOML-shaped mapping) hold, in order."""
    names: list[str] = []
    for svc in doc.get("services", {}).values():
        tls = svc.get("tls", {})
        names += [tls[key] for key in TLS_FILES if key in tls]
        for cert in tls.get("certs", []):
            names += [cert["cert"], cert["key"]]
        backend = svc.get("backend_tls", {})
        names += [backend[key] for key in BACKEND_TLS_FILES if key in backend]
    return names


def write_named_files(directory: Path, doc: dict[str, Any]) -> list[Path]:
    """Each file `doc` names, written as a dummy under `directory` (the config's)."""
    paths = [directory / name for name in named_files(doc)]
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(DUMMY, encoding="utf-8")
    return paths
