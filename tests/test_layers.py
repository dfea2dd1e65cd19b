"""The shape of the code: imports run one way, no cycles, no file too long.

Layers, from the top: the command line, the tools beside the balancer, the
composition root (`balancer.app`), the admin side, the runtime, the proxy
modes, logging, then the sans-IO core and the network helpers (which do not
import each other), the config model, and at the bottom the error hierarchy
and the wire constants. A module imports its own layer or lower ones only.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"
PACKAGE = SRC / "balancer"
MAX_LINES = 450

LAYERS: list[tuple[str, ...]] = [
    ("balancer.__main__", "balancer.entry", "balancer.cli"),
    ("balancer.tools",),
    ("balancer.app",),
    ("balancer.admin",),
    ("balancer.runtime",),
    ("balancer.proxy",),
    ("balancer.observe",),
    ("balancer.core", "balancer.net"),
    ("balancer.config",),
    ("balancer.errors", "balancer.wire", "balancer"),
]
"""Top to bottom; names are modules or packages (a package covers its modules)."""

APART = {("balancer.core", "balancer.net"), ("balancer.net", "balancer.core")}
"""Same layer, but neither may import the other: the core does no I/O."""


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def group_of(module: str) -> tuple[int, str]:
    """(layer index, the layer name that covers `module`), the longest name winning."""
    best: tuple[int, str] | None = None
    for index, names in enumerate(LAYERS):
        for name in names:
            if module == name or module.startswith(name + "."):
                if best is None or len(name) > len(best[1]):
                    best = (index, name)
    assert best is not None, f"{module} is in no layer"
    return best


def imports_of(module: str) -> set[str]:
    """Every balancer module `module` imports, at any depth of its code (TYPE_CHECKING too)."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            names = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for name in names:
            while name and name not in MODULES:
                name = name.rpartition(".")[0]
            if name and name != module and name.startswith("balancer"):
                found.add(name)
    return found


GRAPH = {module: imports_of(module) for module in MODULES}


def test_every_module_is_in_a_layer() -> None:
    for module in MODULES:
        group_of(module)


def test_imports_run_down_the_layers_only() -> None:
    upward = []
    for module, imported in GRAPH.items():
        index, name = group_of(module)
        for other in sorted(imported):
            other_index, other_name = group_of(other)
            if other == "balancer":
                continue
            if other_index < index or (name, other_name) in APART:
                upward.append(f"{module} imports {other}")
    assert not upward, "\n".join(upward)


def test_no_import_cycle() -> None:
    """Tarjan's strongly connected components over the import graph: each of size one."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(GRAPH[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in sorted(GRAPH):
        if module not in index:
            visit(module)
    assert not cycles, cycles


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: p.name)
def test_no_source_file_is_over_450_lines(path: Path) -> None:
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(SRC)} has {lines} lines"


def test_prometheus_client_is_imported_by_the_admin_side_only() -> None:
    users = []
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            if any(n.split(".")[0] == "prometheus_client" for n in names):
                users.append(module)
    assert users, "the admin side exports metrics with prometheus_client"
    assert all(m.startswith("balancer.admin.") for m in users), users


def _loaded_after_import(*modules: str) -> set[str]:
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in modules)
        + "print('\\n'.join(sorted(sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    return set(out.split())


LAYER_ALONE = LAYERS[1:]


@pytest.mark.parametrize("names", LAYER_ALONE, ids=lambda names: names[0])
def test_each_layer_imports_alone_without_a_layer_above(names: tuple[str, ...]) -> None:
    """Importing every module of a layer, in a fresh interpreter, loads nothing above it."""
    index = LAYERS.index(names)
    modules = [
        m
        for m in MODULES
        if group_of(m)[0] == index and m != "balancer" and not m.endswith("__main__")
    ]
    loaded = _loaded_after_import(*modules)
    above = sorted(m for m in loaded if m in MODULES and m != "balancer" and group_of(m)[0] < index)
    assert not above, above


def test_the_core_and_the_config_model_need_no_third_party_package() -> None:
    core = [m for m in MODULES if group_of(m)[1] in ("balancer.core", "balancer.config")]
    loaded = _loaded_after_import(*core)
    third_party = {"aiohttp", "prometheus_client", "uvloop", "rich", "hdrh", "psutil"}
    assert not {m.split(".")[0] for m in loaded} & third_party


def test_serving_never_imports_the_tools() -> None:
    loaded = _loaded_after_import("balancer.app", "balancer.cli")
    assert not [m for m in loaded if m.startswith("balancer.tools")]


def test_the_mode_registry_serves_every_mode_the_config_accepts() -> None:
    from balancer.config.model import MODES
    from balancer.proxy.registry import PROXY_MODES

    assert set(PROXY_MODES) == set(MODES)


def test_the_core_does_no_io() -> None:
    """balancer.core decides; it imports neither the event loop nor sockets."""
    io_modules = {"asyncio", "socket", "selectors", "ssl", "subprocess", "uvloop"}
    found = []
    for module, path in MODULES.items():
        if group_of(module)[1] != "balancer.core":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            found += [f"{module} imports {n}" for n in names if n.split(".")[0] in io_modules]
    assert not found, found
