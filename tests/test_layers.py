"""Imports flow one way: cluster, policy, rewards, world at the bottom, actors above them, the learner on top.

Every module's imports (also those inside functions) are parsed with ``ast`` and mapped to top-level packages;
no package may import one in a higher layer, and the package graph has no cycle.
"""

from __future__ import annotations

import ast
from graphlib import TopologicalSorter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYER = {"cluster": 0, "policy": 0, "rewards": 0, "world": 0, "actors": 1, "learner": 2}


def package_imports() -> dict[tuple[str, str], str]:
    """{(importer package, imported package): one module where it happens} between the layered packages."""
    edges: dict[tuple[str, str], str] = {}
    for pkg in LAYER:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top in LAYER and top != pkg:
                        edges.setdefault((pkg, top), str(path.relative_to(ROOT)))
    return edges


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
