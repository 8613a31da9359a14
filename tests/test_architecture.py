"""The package's shape: no import cycles, the library never imports the application layer,
every module imports on its own, and no library function grows past the size the design
allows."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import sys
from pathlib import Path

import pytest

import etda

ROOT = Path(etda.__file__).parent

# The application layer: built-in settings, their model zoo and experiments, the CLI and the
# benchmark/report tools. The library (everything else) must never import these.
APPLICATION = (
    "etda._launch",
    "etda.bench",
    "etda.cli",
    "etda.data",
    "etda.demo",
    "etda.evaluate",
    "etda.experiment",
    "etda.explain",
    "etda.models",
    "etda.plan",
    "etda.report",
    "etda.settings",
    "etda.usercode",
    "etda.zoo",
)
MAX_FUNCTION_LINES = 80  # the redesign's limit for library functions


def _modules() -> list[str]:
    names = ["etda"]
    for info in pkgutil.walk_packages([str(ROOT)], prefix="etda."):
        names.append(info.name)
    return sorted(names)


def _path(module: str) -> Path:
    rel = Path(*module.split(".")[1:])
    pkg = ROOT / rel / "__init__.py"
    return pkg if pkg.exists() else (ROOT / rel).with_suffix(".py")


def _is_package(module: str) -> bool:
    return _path(module).name == "__init__.py"


def _imports(module: str, top_level_only: bool) -> set[str]:
    """The etda modules ``module`` imports (at module level only, or anywhere)."""
    tree = ast.parse(_path(module).read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    known = set(_modules())
    out: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("etda")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative imports resolve against the package
                base = module if _is_package(module) else module.rsplit(".", 1)[0]
                for _ in range(node.level - 1):
                    base = base.rsplit(".", 1)[0]
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            if not target.startswith("etda"):
                continue
            for a in node.names:  # `from etda.x import y` imports etda.x.y when y is a module
                sub = f"{target}.{a.name}"
                out.add(sub if sub in known else target)
    return {m for m in out if m in known and m != module}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]
    sys.setrecursionlimit(max(10_000, sys.getrecursionlimit()))

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def _without_package_inits(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """A package's ``__init__`` re-exports its submodules; an edge *to* a package is an
    import of whatever the importer named, which the edges to submodules already record.
    Keep edges out of packages (the re-exports) but drop edges into them when the importer
    lives inside that package (``etda.methods.trak`` -> ``etda.methods`` is the parent
    being initialised, not a cycle of logic)."""
    return {
        m: {d for d in deps if not (_is_package(d) and m.startswith(d + "."))}
        for m, deps in graph.items()
    }


def test_no_import_cycles() -> None:
    graph = _without_package_inits({m: _imports(m, top_level_only=True) for m in _modules()})
    assert _cycles(graph) == []


def test_library_never_imports_the_application() -> None:
    bad = {}
    for m in _modules():
        if m == "etda" or m.startswith(APPLICATION):
            continue
        wrong = sorted(d for d in _imports(m, top_level_only=False) if d.startswith(APPLICATION))
        if wrong:
            bad[m] = wrong
    assert bad == {}, f"library modules importing the application layer: {bad}"


@pytest.mark.parametrize("module", [m for m in _modules() if not m.endswith("__main__")])
def test_every_module_imports_on_its_own(module: str) -> None:
    importlib.import_module(module)


def test_library_functions_are_small() -> None:
    long = []
    for m in _modules():
        if m.startswith(APPLICATION):
            continue
        for node in ast.walk(ast.parse(_path(m).read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{m}.{node.name}: {n} lines")
    assert long == []


def test_cycle_finder_finds_a_cycle() -> None:
    # the checker itself can fail: a two-module loop is reported
    assert _cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
