"""Which implementation of the hot path runs: compiled extension modules, or the pure Python
sources they are compiled from.

How it works: the modules in `COMPILED` are compiled by Cython from their own `.py` sources
when the package is installed (`setup.py`); Python's import system prefers the compiled
module (`.so`) that sits beside a `.py`. With `BALANCER_NO_EXTENSIONS=1` in the environment
(as aiohttp's `AIOHTTP_NO_EXTENSIONS`), `balancer/__init__.py` installs `PureFinder` first on
`sys.meta_path`, which loads those modules from their `.py` files instead. One source, two
builds: they behave identically by construction, and the tests run against both.

A compiled module older than its source (the `.py` edited after the build) is stale: the
finder loads the source instead and `implementation()` says so, so an edit is never
silently ignored; `pip install -e .` (or `python setup.py build_ext --inplace`) rebuilds.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

ENV_VAR = "BALANCER_NO_EXTENSIONS"

COMPILED = (
    "balancer.core.framing",
    "balancer.core.pool",
    "balancer.core.stats",
    "balancer.core.policies.base",
    "balancer.core.policies.round_robin",
    "balancer.core.policies.weighted_round_robin",
    "balancer.core.policies.least_connections",
    "balancer.core.policies.power_of_two",
    "balancer.core.policies.weighted_random",
    "balancer.core.policies.peak_ewma",
    "balancer.core.policies.consistent_hash",
    "balancer.proxy.message.request",
    "balancer.proxy.message.connection",
    "balancer.proxy.message.channel",
    "balancer.proxy.message.dispatch",
    "balancer.proxy.message.session",
    "balancer.core.http.wire",
    "balancer.core.http.writer",
    "balancer.core.http.headers",
    "balancer.core.http.routing",
    "balancer.core.http.affinity",
    "balancer.core.http.replay",
    "balancer.proxy.http.upstream",
    "balancer.proxy.http.response",
    "balancer.proxy.http.exchange",
    "balancer.proxy.http.client",
)
"""The modules of the per-request paths, compiled when the extension is built: message
mode's (framing, the backends and their policies' `pick`, the latency histogram, dispatch,
the reply queue and its in-order flush, the backend connections' reply matching) and http
mode's (the llhttp wrapper and writers, header rules, routing, the exchange, its response
relay, the client and upstream connections)."""

PACKAGE_DIR = Path(__file__).resolve().parent


def disabled() -> bool:
    """The environment asks for the pure Python implementation."""
    return os.environ.get(ENV_VAR, "") not in ("", "0")


def source_of(name: str) -> Path:
    """The `.py` file of balancer module `name`."""
    parts = name.split(".")[1:]
    return PACKAGE_DIR.joinpath(*parts).with_suffix(".py")


STALE_AFTER = 1.0
"""Seconds by which a source may be newer than its compiled module (an install writes both)."""


def compiled_file(name: str) -> Path | None:
    """The extension module built for balancer module `name`, if there is one."""
    source = source_of(name)
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = source.with_name(source.stem + suffix)
        if candidate.exists():
            return candidate
    return None


def stale(name: str) -> bool:
    """The compiled module of `name` is older than its source."""
    built = compiled_file(name)
    if built is None:
        return False
    try:
        return source_of(name).stat().st_mtime > built.stat().st_mtime + STALE_AFTER
    except OSError:
        return False


class PureFinder:
    """Finds the modules in COMPILED as their `.py` sources: all of them (`everything`, for
    BALANCER_NO_EXTENSIONS) or only those whose compiled module is stale."""

    def __init__(self, everything: bool, names: Sequence[str] = COMPILED) -> None:
        self.everything = everything
        self.names = frozenset(names)

    def find_spec(
        self, name: str, path: Sequence[str] | None = None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if name not in self.names or not (self.everything or stale(name)):
            return None
        source = source_of(name)
        loader = importlib.machinery.SourceFileLoader(name, str(source))
        return importlib.util.spec_from_file_location(name, source, loader=loader)


def install_finder() -> None:
    """Put the finder first on sys.meta_path (once)."""
    if not any(isinstance(f, PureFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, PureFinder(everything=disabled()))


def compiled_modules() -> list[str]:
    """The modules of COMPILED that load (or loaded) from an extension module."""
    found = []
    for name in COMPILED:
        module = sys.modules.get(name)
        origin = getattr(module, "__file__", None) if module is not None else None
        if origin is None:
            spec = importlib.util.find_spec(name)
            origin = spec.origin if spec is not None else None
        if origin is not None and not origin.endswith(".py"):
            found.append(name)
    return found


def implementation() -> str:
    """What runs the hot path, for `--version` and the start-up log."""
    compiled = compiled_modules()
    if len(compiled) == len(COMPILED):
        return "compiled (Cython extension modules)"
    if disabled():
        return f"pure Python ({ENV_VAR} is set)"
    outdated = [name for name in COMPILED if stale(name)]
    if outdated:
        return (
            f"pure Python for {len(outdated)} of {len(COMPILED)} modules: their compiled "
            "build is older than the source (rebuild: pip install -e .)"
        )
    if not compiled:
        return "pure Python (the extension modules are not built)"
    return f"partly compiled ({len(compiled)} of {len(COMPILED)} modules)"
