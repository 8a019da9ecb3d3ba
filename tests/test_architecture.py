"""The package's shape: layers point one way, no import cycles, small modules, no printing
in the library. Walks every module's imports (module level and inside functions) with ast."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "captioner"
ENTRY_POINTS = {"captioner.__main__", "captioner.cli"}     # may import the CLI
PRINTERS = {"captioner.cli", "captioner.commands", "captioner.train"}  # the CLI layer (train: Lightning's own)
MAX_LINES = 420


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(path: Path) -> set[str]:
    """The captioner modules `path` imports anywhere in its code."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(name for name in names if name in MODULES)
    return found - {_module_name(path)}


GRAPH = {name: _imports(path) for name, path in MODULES.items()}


def test_the_walk_sees_the_package():
    assert {"captioner.api", "captioner.cli", "captioner.model.decoder", "captioner.model.search"} <= set(MODULES)
    assert "captioner.model.decoder" in GRAPH["captioner.model.inference"]


def test_no_import_cycles():
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(GRAPH[node]):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [name])
    assert not cycles, f"import cycles: {cycles[:3]}"


def test_only_entry_points_import_the_cli():
    offenders = sorted(name for name, deps in GRAPH.items() if "captioner.cli" in deps and name not in ENTRY_POINTS)
    assert not offenders, f"library modules import the CLI: {offenders}"


def test_the_library_does_not_print():
    offenders = []
    for name, path in MODULES.items():
        if name in PRINTERS:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                offenders.append(f"{name}:{node.lineno}")
    assert not offenders, f"print() in library modules: {offenders}"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_modules_stay_small(name):
    lines = len(MODULES[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{name} has {lines} lines (one job per module, about 400 lines at most)"


def test_inference_never_imports_lightning():
    """The API and what `captioner caption` uses load no Lightning: nothing they reach imports it."""
    reach, todo = set(), ["captioner.api", "captioner.discovery", "captioner.formats", "captioner.attention_maps"]
    while todo:
        name = todo.pop()
        if name in reach:
            continue
        reach.add(name)
        todo.extend(GRAPH[name])
    for name in sorted(reach):
        tree = ast.parse(MODULES[name].read_text())
        top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        mods = [a.name for n in top if isinstance(n, ast.Import) for a in n.names]
        mods += [n.module for n in top if isinstance(n, ast.ImportFrom) and n.module]
        assert not any(m.startswith(("pytorch_lightning", "lightning")) for m in mods), name
