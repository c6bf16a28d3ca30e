"""The package's layout rules, read from the source: imports point down (no cycle, counting the package
``__init__`` files an import runs), and no library module imports the CLI."""

from __future__ import annotations

import ast
from pathlib import Path

import lightning_fedpeft

ROOT = Path(lightning_fedpeft.__file__).parent
PACKAGE = "lightning_fedpeft"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    """Each module -> the package modules it imports at module level (function-local imports are lazy
    on purpose and left out), plus every subpackage ``__init__`` such an import runs."""
    modules = {module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets: set[str] = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(PACKAGE):
                found = [node.module]
                found += [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules]
            elif isinstance(node, ast.Import):
                found = [a.name for a in node.names if a.name.startswith(PACKAGE)]
            else:
                continue
            for target in found:
                parts = target.split(".")
                # importing a.b.c runs a.b's __init__ too; the root package's is the public facade, left out
                targets |= {".".join(parts[:i]) for i in range(2, len(parts) + 1)}
        # a module's own packages are imported before it, so importing them again is no loop
        ancestors = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 2)}
        graph[name] = {t for t in targets if t in modules and t not in ancestors}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_finder_sees_a_loop():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_runs_back_up():
    graph = import_graph()
    assert "lightning_fedpeft.callbacks" in graph["lightning_fedpeft.cli"]  # the graph is read at all
    assert find_cycle(graph) is None, f"import loop: {' -> '.join(find_cycle(graph))}"


def test_no_library_module_imports_the_cli():
    for name, targets in import_graph().items():
        if name not in ("lightning_fedpeft.cli", "lightning_fedpeft.__main__"):
            assert "lightning_fedpeft.cli" not in targets, name
