"""Imports flow one way: cluster, policy, rewards, world at the bottom, actors above them, the learner on top.

Every module's imports (also those inside functions and ``TYPE_CHECKING`` blocks) are parsed with ``ast`` and
mapped to top-level packages; no package may import one in a higher layer, and the package graph has no cycle.
Inside each package, the graph of its modules has no cycle either.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from graphlib import TopologicalSorter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYER = {"cluster": 0, "policy": 0, "rewards": 0, "world": 0, "actors": 1, "learner": 2}


def imported_names(path: Path) -> Iterator[str]:
    """Dotted names a module imports: ``import a.b`` gives a.b, ``from a.b import c`` gives a.b.c (which is the
    module a.b.c or a name in a.b)."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield from (f"{node.module}.{a.name}" for a in node.names)


def package_imports() -> dict[tuple[str, str], str]:
    """{(importer package, imported package): one module where it happens} between the layered packages."""
    edges: dict[tuple[str, str], str] = {}
    for pkg in LAYER:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            for name in imported_names(path):
                top = name.split(".")[0]
                if top in LAYER and top != pkg:
                    edges.setdefault((pkg, top), str(path.relative_to(ROOT)))
    return edges


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_graph(pkg: str) -> dict[str, set[str]]:
    """{module of ``pkg``: the modules of ``pkg`` it imports}, each import resolved to the longest module name."""
    paths = sorted((ROOT / pkg).rglob("*.py"))
    modules = {module_name(p) for p in paths}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for path in paths:
        importer = module_name(path)
        for name in imported_names(path):
            parts = name.split(".")
            target = next((".".join(parts[:n]) for n in range(len(parts), 0, -1) if ".".join(parts[:n]) in modules),
                          None)
            if target is not None and target != importer:
                graph[importer].add(target)
    return graph


def test_no_package_imports_a_higher_layer():
    edges = package_imports()
    assert edges, "the import scan found nothing"
    upward = {f"{a} -> {b} ({where})" for (a, b), where in edges.items() if LAYER[b] > LAYER[a]}
    assert not upward


def test_the_package_graph_has_no_cycle():
    graph: dict[str, set[str]] = {pkg: set() for pkg in LAYER}
    for a, b in package_imports():
        graph[a].add(b)
    tuple(TopologicalSorter(graph).static_order())  # raises CycleError naming the cycle


@pytest.mark.parametrize("pkg", LAYER)
def test_no_import_cycle_inside_a_package(pkg):
    graph = module_graph(pkg)
    assert sum(map(len, graph.values())), f"the import scan found no imports inside {pkg}"
    tuple(TopologicalSorter(graph).static_order())  # raises CycleError naming the cycle
