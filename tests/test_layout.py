"""The package's import graph (AST only): no cycles, and imports run one way between subpackages.

`python tests/test_layout.py` prints the graph's depth, its longest chain, cycles and the
largest file.
"""

import ast
import functools
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "jaxcompress"

# Subpackage -> the subpackages it must never import (DESIGN.md: experiments > train >
# compress > models, data > core).
FORBIDDEN = {
    "models": {"compress", "train", "data", "experiments"},
    "data": {"models", "compress", "train", "experiments"},
    "compress": {"train", "data", "experiments"},
    "train": {"experiments"},
}


def modules(package: Path = PACKAGE) -> dict[str, Path]:
    """Dotted module name -> file, packages named by their `__init__.py`."""
    found = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _nearest(name: str, known: dict[str, Path]) -> str:
    while name not in known:
        name = name.rsplit(".", 1)[0]
    return name


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the package-internal modules it imports anywhere in its file (top level,
    inside functions, under TYPE_CHECKING). `from pkg import name` counts as importing the
    submodule `pkg.name` where one exists, else `pkg` itself."""
    known = modules(package)
    root = package.name
    graph = {}
    for name, path in known.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                deps |= {
                    _nearest(a.name, known) for a in node.names if a.name.split(".")[0] == root
                }
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: resolved against this module's package
                    here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                    here = here[: len(here) - node.level + 1]
                    base = ".".join(here + ([base] if base else []))
                if base.split(".")[0] != root:
                    continue
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    deps.add(sub if sub in known else _nearest(base, known))
        graph[name] = deps - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while not component or component[-1] != v:
                component.append(stack.pop())
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def longest_chain(graph: dict[str, set[str]]) -> list[str]:
    """The longest chain of imports (a module, one it imports, one that imports, ...); the
    graph must be acyclic. Its length is the graph's depth in levels."""

    @functools.cache
    def chain(v: str) -> tuple[str, ...]:
        below = [chain(w) for w in sorted(graph[v])]
        return (v, *max(below, key=len, default=()))

    return list(max((chain(v) for v in sorted(graph)), key=len))


def subpackage(module: str, packages: set[str]) -> str | None:
    """'models' for jaxcompress.models and everything in it; None for top-level modules."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and ".".join(parts[:2]) in packages else None


def test_the_import_graph_has_no_cycles():
    assert cycles(import_graph()) == []


def test_imports_run_one_way_between_subpackages():
    packages = {name for name, path in modules().items() if path.name == "__init__.py"}
    assert {"jaxcompress.models", "jaxcompress.compress", "jaxcompress.train"} <= packages
    wrong = sorted(
        f"{module} imports {dep}"
        for module, deps in import_graph().items()
        for dep in deps
        if subpackage(dep, packages) in FORBIDDEN.get(subpackage(module, packages), ())
    )
    assert wrong == []


def test_the_scan_sees_every_kind_of_internal_import(tmp_path):
    package = tmp_path / "jaxcompress"
    (package / "models").mkdir(parents=True)
    (package / "compress").mkdir()
    for init in (package, package / "models", package / "compress"):
        (init / "__init__.py").write_text("")
    (package / "core.py").write_text("import os\n")
    (package / "models" / "bert.py").write_text(
        "from typing import TYPE_CHECKING\nfrom jaxcompress import core\n"
        "if TYPE_CHECKING:\n    from jaxcompress.compress.drop import x\n"
    )
    (package / "compress" / "drop.py").write_text(
        "def f():\n    from ..models import bert\n    import jaxcompress.core\n"
    )
    graph = import_graph(package)
    assert graph["jaxcompress.models.bert"] == {"jaxcompress.core", "jaxcompress.compress.drop"}
    assert graph["jaxcompress.compress.drop"] == {"jaxcompress.models.bert", "jaxcompress.core"}
    assert cycles(graph) == [["jaxcompress.compress.drop", "jaxcompress.models.bert"]]
    del graph["jaxcompress.compress.drop"]
    graph["jaxcompress.models.bert"] = {"jaxcompress.core"}
    assert longest_chain(graph) == ["jaxcompress.models.bert", "jaxcompress.core"]


if __name__ == "__main__":
    graph = import_graph()
    print(f"{len(graph)} modules, cycles: {cycles(graph)}")
    if not cycles(graph):
        chain = longest_chain(graph)
        print(f"depth {len(chain)}: " + " > ".join(chain))
    largest = max(modules().values(), key=lambda p: len(p.read_text().splitlines()))
    print(
        f"largest file: {largest.relative_to(PACKAGE.parent)}, "
        f"{len(largest.read_text().splitlines())} lines"
    )
