"""The import map of docs/architecture.md holds: every import between hf_ptq's parts is an arrow of its table, every
part is in the table, and no two modules import each other through any chain (module level, TYPE_CHECKING and
function-level imports included)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "hf_ptq"
MAP = ROOT / "docs" / "architecture.md"


def module_name(path: Path, package: Path) -> str:
    parts = list(path.relative_to(package.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules(package: Path = PACKAGE) -> dict[str, Path]:
    return {module_name(p, package): p for p in package.rglob("*.py")}


def imported_modules(name: str, path: Path, modules: set[str]) -> set[str]:
    """The hf_ptq modules `name` imports anywhere in its file (a `from x import y` of a submodule y counts as y)."""
    found: set[str] = set()
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target not in modules and "." in target:
                target = target.rsplit(".", 1)[0]
            if target in modules and target != name:
                found.add(target)
    return found


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    modules = package_modules(package)
    return {name: imported_modules(name, path, set(modules)) for name, path in modules.items()}


def part_of(module: str) -> str:
    """`hf_ptq.formats.gguf_file` -> `formats`; the package root is `hf_ptq`."""
    pieces = module.split(".")
    return pieces[1] if len(pieces) > 1 else pieces[0]


def allowed_imports() -> dict[str, set[str] | None]:
    """part -> the parts it may import (None: every part), from the table of docs/architecture.md."""
    table: dict[str, set[str] | None] = {}
    for line in MAP.read_text().splitlines():
        if not line.startswith("| `"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        part = cells[0].strip("`")
        table[part] = None if cells[2] == "every part" else set(re.findall(r"`(\w+)`", cells[2]))
    return table


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def forbidden_arrows(graph: dict[str, set[str]], table: dict[str, set[str] | None]) -> list[str]:
    arrows = []
    for module, targets in sorted(graph.items()):
        part = part_of(module)
        allowed = table.get(part, set())
        for target in sorted(targets):
            other = part_of(target)
            if other != part and allowed is not None and other not in allowed:
                arrows.append(f"{module} -> {target} ({part} may not import {other})")
    return arrows


def test_every_part_is_in_the_map() -> None:
    parts = {part_of(m) for m in package_modules()}
    table = allowed_imports()
    assert parts <= set(table), f"parts missing from docs/architecture.md: {sorted(parts - set(table))}"
    assert set(table) <= parts, f"docs/architecture.md lists parts that do not exist: {sorted(set(table) - parts)}"


def test_imports_follow_the_map() -> None:
    assert forbidden_arrows(import_graph(), allowed_imports()) == []


def test_no_import_cycle() -> None:
    assert cycles(import_graph()) == []


@pytest.fixture
def toy_package(tmp_path: Path) -> Path:
    """A package with a cycle through a TYPE_CHECKING import and a function-level import into a forbidden part."""
    pkg = tmp_path / "hf_ptq"
    (pkg / "core").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "core" / "__init__.py").write_text("")
    (pkg / "core" / "a.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import b\n")
    (pkg / "core" / "b.py").write_text("from .a import thing\n")
    (pkg / "nn.py").write_text("def f():\n    from .core import a\n")
    (pkg / "core" / "c.py").write_text("def g():\n    from ..nn import f\n")
    return pkg


def test_the_checks_see_type_checking_and_function_level_imports(toy_package: Path) -> None:
    graph = import_graph(toy_package)
    assert graph["hf_ptq.core.a"] == {"hf_ptq.core.b"} and graph["hf_ptq.core.b"] == {"hf_ptq.core.a"}
    assert cycles(graph) == [["hf_ptq.core.a", "hf_ptq.core.b"]]
    arrows = forbidden_arrows(graph, {"core": set(), "nn": {"core"}, "hf_ptq": None})
    assert arrows == ["hf_ptq.core.c -> hf_ptq.nn (core may not import nn)"]
