"""The arrows between modules point one way (docs/ARCHITECTURE.md): no import cycles, sub-packages
never import the package root, and no module imports a layer above its own.

Read from the source with ``ast`` (every import, also those inside functions; not those under
``if TYPE_CHECKING:``, which only annotations use), so nothing is run.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "lightning_parallelctx"
PKG = "lightning_parallelctx"

#: docs/ARCHITECTURE.md's layers; a module may import its own layer or below. First match wins.
LAYERS = [
    (1, ("layout", "initializers", "launchers", "mode", "markers", "errors", "topology", "registry", "rng_map")),
    (2, ("process_groups", "rendezvous", "faults", "watchdog")),
    (3, ("context", "current", "tables", "guard")),
    (4, ("distributed",)),
    (5, ("nn", "grad_sync", "random", "pipeline", "dtensor", "testing")),
    (6, ("lightning", "plan", "__main__")),
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in ROOT.rglob("*.py")}


def _is_type_checking(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node except those under ``if TYPE_CHECKING:`` (annotations only: never run, no arrow)."""
    out, todo = [], [tree]
    while todo:
        node = todo.pop()
        out.append(node)
        todo.extend(c for c in ast.iter_child_nodes(node) if not _is_type_checking(c))
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's own modules that ``name`` imports (a ``from X import y`` counts as X.y when
    X.y is a module, else as X)."""
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rpartition(".")[0]
    found: set[str] = set()
    for node in _runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == PKG)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if base.split(".")[0] != PKG:
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in known else base)
    found.discard(name)
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    return {name: _imports(name, path, known) for name, path in mods.items()}


def _layer(name: str) -> int:
    first = name.split(".")[1] if "." in name else ""
    for layer, names in LAYERS:
        if first in names:
            return layer
    raise AssertionError(f"{name} is in no layer of docs/ARCHITECTURE.md; add it to LAYERS and the doc")


def test_every_module_has_a_layer() -> None:
    for name in _graph():
        if name != PKG:
            _layer(name)


def test_no_module_imports_the_package_root() -> None:
    offenders = sorted(n for n, deps in _graph().items() if PKG in deps and n != PKG)
    assert not offenders, f"these import the package root (re-exports only point down): {offenders}"


def test_imports_point_down_the_layers() -> None:
    upward = [f"{n} (layer {_layer(n)}) -> {d} (layer {_layer(d)})"
              for n, deps in _graph().items() if n != PKG
              for d in deps if d != PKG and _layer(d) > _layer(n)]
    assert not upward, "imports that point up a layer:\n" + "\n".join(sorted(upward))


def test_no_import_cycles() -> None:
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if dep == PKG:
                continue
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep):] + [dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)
