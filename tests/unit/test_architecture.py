"""The package's import graph: no circles, and imports only point down the layers.

Every ``import`` counts, the ones inside functions too: a lazy import still ties two modules together.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "llmrec_tasks"

# Lowest first: a module may import from its own layer and the layers before it, never after.
LAYERS = [
    "core",
    "storage",
    "data",
    "text",
    "retrieval",
    "ranking",
    "serving",
    "feedback",
    "online",
    "publish",
    "pipeline",
    "alerts",
    "airflow_glue",
    "cli",
]


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                base = node.module
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    targets.add(full if full in modules else base)
            elif isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
        graph[name] = {t for t in targets if t in modules and t != name and t != "llmrec_tasks"}
    return graph


def layer_of(module: str) -> int:
    top = module.split(".")[1] if "." in module else ""
    if top not in LAYERS:
        raise AssertionError(f"{module}: its package {top!r} has no place in LAYERS")
    return LAYERS.index(top)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_circle():
    assert find_cycle(import_graph()) is None, " -> ".join(find_cycle(import_graph()) or [])


def test_imports_point_down_the_layers():
    upward = [
        f"{src} imports {dst}"
        for src, dsts in import_graph().items()
        if src != "llmrec_tasks"
        for dst in dsts
        if layer_of(dst) > layer_of(src)
    ]
    assert not upward, "\n".join(sorted(upward))


def test_cycle_finder_finds_a_cycle():
    """The check can fail: a two-module circle is reported."""
    assert find_cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("module", ["llmrec_tasks.ranking.train", "llmrec_tasks.serving.recommender"])
def test_graph_sees_lazy_imports(module):
    assert import_graph()[module], f"{module} has imports the graph must see"
