"""Both implementations of the hot path in one process, for tests that compare them.

`pure_family()` imports the modules of `balancer.native.COMPILED` (and those built on them:
the message service and the tests' doubles) a second time from their `.py` sources, under
their own names, and puts the modules already loaded back: the process then holds the
compiled family, as imported normally, and a pure one, each module of which refers to the
other modules of its own family.
"""

from __future__ import annotations

import importlib
import sys
from functools import cache
from types import ModuleType

from balancer import native

DEPENDENTS = (
    "balancer.proxy.message",
    "balancer.proxy.message.service",
    "tests.message_doubles",
)
"""Modules built on the compiled ones, loaded again with the pure family."""


def compiled_build() -> bool:
    """Every module of the hot path runs compiled in this process."""
    return len(native.compiled_modules()) == len(native.COMPILED)


@cache
def pure_family() -> dict[str, ModuleType]:
    """Module name -> the module as loaded from its `.py` source (cached per process)."""
    names = (*native.COMPILED, *DEPENDENTS)
    for name in names:
        importlib.import_module(name)  # the normal family is loaded first, and kept
    saved = {name: sys.modules.pop(name) for name in names}
    finder = native.PureFinder(everything=True)
    sys.meta_path.insert(0, finder)
    try:
        for name in names:
            importlib.import_module(name)
        return {name: sys.modules[name] for name in names}
    finally:
        sys.meta_path.remove(finder)
        for name in names:
            sys.modules.pop(name, None)
        sys.modules.update(saved)
        for name, module in saved.items():
            parent, _, child = name.rpartition(".")
            if parent in sys.modules:
                setattr(sys.modules[parent], child, module)


def normal_family() -> dict[str, ModuleType]:
    """The same modules as `pure_family`, as this process imports them (compiled when built)."""
    return {name: importlib.import_module(name) for name in (*native.COMPILED, *DEPENDENTS)}
