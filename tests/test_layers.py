"""Data flows one way through dirio's layers (DESIGN.md):
``errors, core -> io, losses, transforms, testing -> optim -> methods -> evaluation, viz -> config -> api
-> apps``.

Every module under ``src/dirio`` is parsed with :mod:`ast`; every import at any depth (inside
functions too) counts, except those under ``if TYPE_CHECKING:`` (annotations only, never run).
A module may import its own layer and lower ones, and the graph of module imports has no cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "dirio"
# The layer of each top-level package or module of dirio (lower never imports higher).
LAYERS = {
    "errors": 0, "core": 0,
    "io": 1, "losses": 1, "transforms": 1, "testing": 1,
    "optim": 2,
    "methods": 3,
    "evaluation": 4, "viz": 4,
    "config": 5,
    "api": 6,
    "apps": 7, "__main__": 7,
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SOURCE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    """``{dotted name: file}`` of every module of the package."""
    return {module_name(path): path for path in sorted((SOURCE / PACKAGE).rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(node: ast.AST, module: str, is_package: bool):
    """``(line, imported dotted name)`` of every import under ``node``, skipping ``if TYPE_CHECKING:`` bodies."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child.test):
            for other in child.orelse:
                yield from _imports(other, module, is_package)
            continue
        if isinstance(child, ast.Import):
            for alias in child.names:
                yield child.lineno, alias.name
        elif isinstance(child, ast.ImportFrom):
            if child.level:  # relative: resolve against this module's package
                base = module.split(".")
                base = base if is_package else base[:-1]
                base = base[: len(base) - (child.level - 1)]
                source = ".".join(base + ([child.module] if child.module else []))
            else:
                source = child.module or ""
            yield child.lineno, source
            for alias in child.names:  # ``from dirio.config import schema`` imports a module
                yield child.lineno, f"{source}.{alias.name}"
        yield from _imports(child, module, is_package)


def import_graph() -> dict[str, dict[str, int]]:
    """``{module: {imported dirio module: first line}}`` over every module of the package."""
    known = modules()
    graph: dict[str, dict[str, int]] = {}
    for name, path in known.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        edges: dict[str, int] = {}
        for line, target in _imports(tree, name, path.name == "__init__.py"):
            if target in known and target != name and target != PACKAGE:
                edges.setdefault(target, line)
        graph[name] = edges
    return graph


def layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 1 else None


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle ``[a, b, ..., a]`` per strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph.get(node, {}):
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return [_cycle_in(graph, set(component), component[0]) for component in components]


def _cycle_in(graph: dict[str, dict[str, int]], members: set[str], start: str) -> list[str]:
    """A shortest cycle through ``start`` inside one component (breadth-first)."""
    parents: dict[str, str] = {}
    queue = [start]
    while queue:
        node = queue.pop(0)
        for target in sorted(graph[node]):
            if target == start:
                path = [node]
                while path[-1] != start:
                    path.append(parents[path[-1]])
                return [start, *reversed(path[:-1]), start]
            if target in members and target not in parents:
                parents[target] = node
                queue.append(target)
    raise AssertionError(f"no cycle through {start}")


def describe_cycle(graph: dict[str, dict[str, int]], cycle: list[str]) -> str:
    steps = [f"{a} imports {b} (line {graph[a][b]})" for a, b in zip(cycle, cycle[1:])]
    return ", which ".join(steps[:1] + [step.split(" ", 1)[1] for step in steps[1:]])


def test_every_module_belongs_to_a_layer():
    unknown = [name for name in modules() if name != PACKAGE and layer(name) is None]
    assert not unknown, f"modules outside the layers of DESIGN.md: {unknown}"


def test_no_module_imports_a_higher_layer():
    graph = import_graph()
    paths = modules()
    violations = [
        f"{paths[name].relative_to(SOURCE.parent)}:{line}: {name} (layer {layer(name)}) imports {target} "
        f"(layer {layer(target)})"
        for name, edges in sorted(graph.items()) if layer(name) is not None
        for target, line in sorted(edges.items(), key=lambda item: item[1])
        if layer(target) is not None and layer(target) > layer(name)
    ]
    assert not violations, "imports against the data flow:\n" + "\n".join(violations)


def test_the_module_import_graph_has_no_cycle():
    graph = import_graph()
    found = cycles(graph)
    assert not found, "import cycles:\n" + "\n".join(describe_cycle(graph, cycle) for cycle in found)


def test_a_cycle_is_found_and_described():
    graph = {"a": {"b": 3}, "b": {"c": 5}, "c": {"a": 7}, "d": {"a": 1}}
    assert cycles(graph) == [["a", "b", "c", "a"]]
    assert describe_cycle(graph, ["a", "b", "c", "a"]) == (
        "a imports b (line 3), which imports c (line 5), which imports a (line 7)")


@pytest.mark.parametrize("source, expected", [
    ("import dirio.core.fields\n", ["dirio.core.fields"]),
    ("def f():\n    from dirio.api import register\n", ["dirio.api", "dirio.api.register"]),
    ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from dirio.transforms.base import Transform\n",
     ["typing", "typing.TYPE_CHECKING"]),
    ("from . import schema\n", ["dirio.config", "dirio.config.schema"]),
])
def test_imports_are_found_at_any_depth_and_type_checking_blocks_are_not_imports(source, expected):
    found = [target for _, target in _imports(ast.parse(source), "dirio.config.files", False)]
    assert found == expected
