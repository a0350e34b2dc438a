"""The package's import graph has no circle and no upward import.

Every `import` / `from ... import` of a `bonsai_quant` module counts, at module level or inside a function
(a lazy import still ties the two modules together). `from .pkg import name` counts as an import of the
module `pkg.name` where that module exists, else of `pkg` (its `__init__`).

Rule 1, no circle: the graph of modules is acyclic.
Rule 2, no upward import: inside every package, collapse each sub-package to one node (with everything under
it); the graph of that package's direct modules and sub-packages must be acyclic too. So a sub-package
(`distill/`, `runtime/`, `packing/`, ...) may use the modules beside it, but none of those may reach back into
the sub-package, directly or through others: `recipe.py` may not import `distill.settings` when
`distill/` imports `recipe.py`. A module may always import from its parents' packages (`from ..errors import`)
as long as that does not close a circle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import bonsai_quant

ROOT = Path(bonsai_quant.__file__).parent
PACKAGE = "bonsai_quant"


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = (PACKAGE, *path.relative_to(ROOT).with_suffix("").parts)
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    is_package = path.name == "__init__.py"
    here = name if is_package else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".")
                base = base[: len(base) - (node.level - 1)]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            targets = [f"{stem}.{a.name}" if f"{stem}.{a.name}" in modules else stem for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `import a.b.c` of a name inside a module
                target = target.rpartition(".")[0]
            if target.startswith(PACKAGE) and target != name:
                out.add(target)
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of the graph as a path [a, b, ..., a], or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def _collapsed(graph: dict[str, set[str]], package: str) -> dict[str, set[str]]:
    """Edges among `package`'s direct children, each sub-package standing for everything under it."""
    prefix = package + "."

    def child(name: str) -> str | None:
        if name == package:
            return package + ".__init__"
        if not name.startswith(prefix):
            return None
        return prefix + name[len(prefix):].split(".")[0]

    out: dict[str, set[str]] = {}
    for src, targets in graph.items():
        a = child(src)
        if a is None:
            continue
        out.setdefault(a, set())
        for dst in targets:
            b = child(dst)
            if b is not None and b != a:
                out[a].add(b)
    return out


def test_no_import_circle():
    cycle = _cycle(_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_no_upward_import():
    graph = _graph()
    packages = sorted(n for n, p in _modules().items() if p.name == "__init__.py")
    assert PACKAGE in packages and f"{PACKAGE}.packing" in packages
    for package in packages:
        cycle = _cycle(_collapsed(graph, package))
        assert cycle is None, f"inside {package}, a circle between sub-packages and modules: " + " -> ".join(cycle)


def test_the_checker_sees_circles_and_upward_imports():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    # recipe -> distill.settings while distill.trainer -> recipe: no module circle, but an upward import.
    graph = {"p.recipe": {"p.distill.settings"}, "p.distill.settings": set(), "p.distill.trainer": {"p.recipe"},
             "p.distill": set()}
    assert _cycle(graph) is None
    assert _cycle(_collapsed(graph, "p")) == ["p.distill", "p.recipe", "p.distill"]
    # Lazy imports inside functions count, and `from . import name` resolves to the module `name` when it is one.
    modules = _modules()
    backend = ROOT / "runtime" / "cuda" / "backend.py"  # imports gemlite_backend inside apply_backend
    assert f"{PACKAGE}.runtime.gemlite_backend" in _imports(f"{PACKAGE}.runtime.cuda.backend", backend, modules)
