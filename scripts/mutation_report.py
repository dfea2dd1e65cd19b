"""Scores of a mutmut run over the pure core and the message dispatch.

`scripts/mutation` runs mutmut on the mutants that `--globs` prints (the scopes below) and
then this script without arguments, which reads mutmut's results under `mutants/` and prints
a Markdown report: one row per scope (killed / survived / timeout / no tests / total, %), then
the surviving mutants of each scope as `file:line` with the original and the mutated line.
`--json` prints the counts only, for comparing two runs.

A scope is a source file and the functions of it that count (all of them unless listed);
mutmut names a mutant `module.x_function__mutmut_N` or `module.xǁClassǁmethod__mutmut_N`.
A scope naming a function that no longer exists is reported, so the list follows the code.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import fnmatch
import json
import os
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Scope:
    name: str
    path: str
    functions: tuple[str, ...] = ()
    """Mangled names (`x_func`, `xǁClassǁmethod`, fnmatch patterns); empty: the whole file."""

    @property
    def module(self) -> str:
        return self.path.removeprefix("src/").removesuffix(".py").replace("/", ".")

    def globs(self) -> list[str]:
        if not self.functions:
            return [f"{self.module}.*"]
        return [f"{self.module}.{f}__mutmut_*" for f in self.functions]

    def covers(self, mutant: str) -> bool:
        return any(fnmatch.fnmatchcase(mutant, g) for g in self.globs())


def _methods(cls: str, *names: str) -> tuple[str, ...]:
    return tuple(f"xǁ{cls}ǁ{n}" for n in names)


PURE_CORE = "pure core"
DISPATCH = "dispatch and admin security"

SCOPES: dict[str, list[Scope]] = {
    PURE_CORE: [
        Scope("framing", "src/balancer/core/framing.py"),
        *(
            Scope(f"policies/{p}", f"src/balancer/core/policies/{p}.py")
            for p in (
                "base",
                "round_robin",
                "weighted_round_robin",
                "least_connections",
                "weighted_random",
                "power_of_two",
                "consistent_hash",
                "peak_ewma",
            )
        ),
        Scope("health (HealthState)", "src/balancer/core/health_state.py", ("xǁHealthStateǁ*",)),
        Scope("pool", "src/balancer/core/pool.py"),
        Scope("config: model", "src/balancer/config/model.py"),
        Scope("config: addresses", "src/balancer/config/addresses.py"),
        Scope("config: errors", "src/balancer/config/errors.py"),
        Scope("config: algorithms and their options", "src/balancer/config/policies.py"),
        Scope("config: reading TOML and JSON", "src/balancer/config/reader.py"),
        Scope("config: table reader", "src/balancer/config/table.py"),
        Scope("config: keys", "src/balancer/config/schema.py"),
        Scope("config: services", "src/balancer/config/services.py"),
        Scope("config: top level and admin", "src/balancer/config/document.py"),
        Scope("config: tutorial formats", "src/balancer/config/tutorial.py"),
        Scope("config: load", "src/balancer/config/load.py"),
        Scope("config: checks across the file", "src/balancer/config/checks.py"),
        Scope("config: bounds", "src/balancer/config/bounds.py"),
        Scope("config: line numbers", "src/balancer/config/keylines.py"),
    ],
    DISPATCH: [
        Scope("message: retry budget", "src/balancer/core/retry.py"),
        Scope(
            "message: dispatch",
            "src/balancer/proxy/message/dispatch.py",
            _methods(
                "Dispatcher",
                "settle",
                "answer_locally",
                "unanswered",
                "dispatch_batch",
                "_pick_below_limit",
                "_assign",
                "_enqueue",
                "drain_queue",
                "retry_allowed",
                "retry",
                "retry_short",
                "shed_buffers",
            ),
        ),
        Scope(
            "message: sweep",
            "src/balancer/proxy/message/service.py",
            _methods("MessageService", "_sweep"),
        ),
        Scope(
            "message: channel",
            "src/balancer/proxy/message/channel.py",
            _methods(
                "BackendChannel",
                "send",
                "_send_raw",
                "_raw_connection",
                "refuse",
                "connection_short",
                "connection_closed",
                "expire",
            ),
        ),
        Scope(
            "message: connection",
            "src/balancer/proxy/message/connection.py",
            _methods(
                "BackendConnection", "flush", "_refuse_unsafe", "data_received", "connection_lost"
            ),
        ),
        Scope(
            "message: session",
            "src/balancer/proxy/message/session.py",
            _methods(
                "ClientSession",
                "data_received",
                "_first_data",
                "_detect",
                "_raw_message",
                "_lines",
                "_hold",
                "_too_long",
                "eof_received",
                "complete",
                "try_flush",
            ),
        ),
        Scope("admin: guard", "src/balancer/admin/security.py"),
        Scope(
            "admin: request checks",
            "src/balancer/admin/checks.py",
            (
                "x_check_body_headers",
                "x_read_body",
                "x_json_object",
                "x_check_weight",
                "x_api_handler",
                "x_add_security_headers",
            ),
        ),
    ],
}

STATUS = {1: "killed", 3: "killed", 5: "no tests", 33: "no tests", 36: "timeout", 24: "timeout"}
STATUS |= {-24: "timeout", 152: "timeout", 255: "timeout", 34: "skipped", 37: "type check"}
COLUMNS = ("killed", "survived", "timeout", "no tests", "other")


def results(root: Path) -> dict[str, int | None]:
    """Exit code of every mutant mutmut generated (None: not run yet)."""
    codes: dict[str, int | None] = {}
    for meta in sorted((root / "mutants").rglob("*.py.meta")):
        codes.update(json.loads(meta.read_text())["exit_code_by_key"])
    return codes


def status(code: int | None) -> str:
    if code is None:
        return "not run"
    if code == 0:
        return "survived"
    return STATUS.get(code, "other")


def counts(scope: Scope, codes: dict[str, int | None]) -> Counter[str]:
    return Counter(status(c) for m, c in codes.items() if scope.covers(m))


def score(c: Counter[str]) -> float:
    """Killed share, as mutmut counts it: a timeout is a kill; a mutant no test ran survives."""
    tested = sum(c.values()) - c["not run"]
    return 100.0 * (c["killed"] + c["timeout"]) / tested if tested else 0.0


def table(codes: dict[str, int | None]) -> list[str]:
    out = ["| area | module | " + " | ".join(COLUMNS) + " | total | killed % |"]
    out.append("| --- | --- | " + " | ".join("---:" for _ in COLUMNS) + " | ---: | ---: |")
    for area, scopes in SCOPES.items():
        whole: Counter[str] = Counter()
        for scope in scopes:
            c = counts(scope, codes)
            whole += c
            out.append(_row(area, scope.name, c))
        out.append(_row(area, f"**{area} overall**", whole))
    return out


def _row(area: str, name: str, c: Counter[str]) -> str:
    total = sum(c.values()) - c["not run"]
    cells = " | ".join(str(c[k]) for k in COLUMNS)
    return f"| {area} | {name} | {cells} | {total} | {score(c):.1f} |"


def _def_lines(path: Path) -> dict[str, int]:
    """First line of every function and method of a file, by mutmut's mangled name."""
    lines: dict[str, int] = {}
    tree = ast.parse(path.read_text())
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            lines[f"x_{node.name}"] = min([node.lineno, *(d.lineno for d in node.decorator_list)])
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.FunctionDef | ast.AsyncFunctionDef):
                    first = min([item.lineno, *(d.lineno for d in item.decorator_list)])
                    lines[f"xǁ{node.name}ǁ{item.name}"] = first
    return lines


def where(mutant: str, path: str) -> tuple[int, str, str]:
    """The line a mutant changes in `path`, the original line and the mutated one."""
    import libcst as cst
    from mutmut.mutation.diff_apply import (  # only with mutmut installed
        read_functions_from_index,
        read_mutant_function,
        read_mutants_module,
        read_original_function,
    )

    functions = read_functions_from_index(mutant, path)
    if functions is None:
        module = read_mutants_module(path)
        functions = (read_original_function(module, mutant), read_mutant_function(module, mutant))
    orig, mutated = (cst.Module([f]).code.strip().split("\n") for f in functions)
    mangled = mutant.rpartition(".")[2].rpartition("__mutmut_")[0]
    first = _def_lines(ROOT / path).get(mangled, 0)
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(a=orig, b=mutated).get_opcodes():
        if tag != "equal":
            before = " / ".join(s.strip() for s in orig[i1:i2]) or "(nothing)"
            after = " / ".join(s.strip() for s in mutated[j1:j2]) or "(removed)"
            return first + i1, before, after
    return first, "", ""


def survivors(codes: dict[str, int | None]) -> list[str]:
    out: list[str] = []
    for scopes in SCOPES.values():
        for scope in scopes:
            left = [
                m
                for m, c in codes.items()
                if scope.covers(m) and status(c) in ("survived", "no tests")
            ]
            if not left:
                continue
            out += ["", f"### {scope.name} ({len(left)})", ""]
            rows = []
            for m in left:
                line, before, after = where(m, scope.path)
                tag = " (no test ran it)" if status(codes[m]) == "no tests" else ""
                name = m.rpartition(".")[2]
                text = f"- `{scope.path}:{line}` `{before}` → `{after}`{tag} ({name})"
                rows.append((line, text))
            out += [r for _, r in sorted(rows)]
    return out


def stale_scopes(codes: dict[str, int | None]) -> list[str]:
    """Scope entries that match no mutant: a renamed or removed function."""
    every = [g for scopes in SCOPES.values() for s in scopes for g in s.globs()]
    return [g for g in every if not any(fnmatch.fnmatchcase(m, g) for m in codes)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--globs", action="store_true", help="print the mutant names to run")
    parser.add_argument("--json", action="store_true", help="print the counts per scope")
    args = parser.parse_args()
    os.chdir(ROOT)  # mutmut reads pyproject.toml and mutants/ from the working directory
    if args.globs:
        print("\n".join(g for scopes in SCOPES.values() for s in scopes for g in s.globs()))
        return 0
    codes = results(ROOT)
    if not codes:
        print("no mutmut results under mutants/: run scripts/mutation first", file=sys.stderr)
        return 1
    if args.json:
        doc = {s.name: dict(counts(s, codes)) for scopes in SCOPES.values() for s in scopes}
        print(json.dumps(doc, indent=1, sort_keys=True))
        return 0
    lines = ["## Scores", "", *table(codes), "", "## Surviving mutants", *survivors(codes)]
    stale = stale_scopes(codes)
    if stale:
        lines += ["", "## Scope entries matching no mutant (renamed or removed?)", ""]
        lines += [f"- `{g}`" for g in stale]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
