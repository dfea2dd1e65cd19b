"""Build of the compiled extensions; the package's metadata is in pyproject.toml.

Three kinds: the message-mode hot path, compiled by Cython from the package's own `.py`
sources (the list is `balancer.native.COMPILED`; the `.py` files stay and are what runs with
`BALANCER_NO_EXTENSIONS=1`), and two written in C: the load client's engine and tcp mode's
io_uring relay engine (raw system calls: nothing needed beyond the kernel headers). All are
optional: a machine that cannot build them still gets a working, pure Python balancer
(tcp mode's `engine = "auto"` then relays with uvloop), and `balancer --version` says which
implementation runs.
"""

from __future__ import annotations

import sys
from pathlib import Path

from setuptools import Extension, setup

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT / "src"))
from balancer.native import COMPILED  # noqa: E402  (a module without imports of its own)

sys.path.pop(0)

C_FLAGS = ["-O2"]


def hot_path() -> list[Extension]:
    try:
        from Cython.Build import cythonize
    except ImportError:
        print("Cython is not installed: the hot path stays pure Python", file=sys.stderr)
        return []
    modules = [
        Extension(
            name,
            ["src/" + name.replace(".", "/") + ".py"],
            extra_compile_args=C_FLAGS,
            optional=True,
        )
        for name in COMPILED
    ]
    extensions: list[Extension] = cythonize(
        modules,
        compiler_directives={
            "language_level": 3,
            # annotations are for mypy: typing them in C would change what a call accepts
            "annotation_typing": False,
            "binding": True,
        },
        quiet=True,
        build_dir="build/cython",
    )
    return extensions


setup(
    ext_modules=[
        *hot_path(),
        Extension(
            "balancer.tools._loadgen",
            ["src/balancer/tools/_loadgen.c"],
            extra_compile_args=[*C_FLAGS, "-Wall", "-Wextra", "-Wno-unused-parameter"],
            optional=True,
        ),
        Extension(
            "balancer.net._uring",
            ["src/balancer/net/_uring.c"],
            depends=["src/balancer/net/_uring_ring.h"],
            extra_compile_args=[*C_FLAGS, "-Wall", "-Wextra", "-Wno-unused-parameter"],
            optional=True,
        ),
    ]
)
