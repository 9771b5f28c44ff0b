"""The package's architecture as its imports draw it: no cycles, and the runtime stands on its own.

Every import counts, including those inside functions (deferred to keep start-up cheap) and under
``TYPE_CHECKING``: a deferred import still ties the two modules together.
"""

from __future__ import annotations

import ast
from pathlib import Path

import qwen_agent

PACKAGE_DIR = Path(qwen_agent.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE_DIR.rglob("*.py"))}


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that ``name`` imports: ``from p import m`` counts as ``p.m`` when that is a
    module, else as ``p``."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            source = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:
                found.add(f"{source}.{alias.name}" if f"{source}.{alias.name}" in known else source)
    return (found & known) - {name}


def import_graph() -> dict[str, set[str]]:
    modules = package_modules()
    return {name: imported_modules(name, path, set(modules)) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
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


def test_the_graph_sees_deferred_and_relative_imports():
    graph = import_graph()
    assert "qwen_agent.runtime.engine" in graph["qwen_agent.llm"]  # imported inside llm_from_spec
    assert "qwen_agent.runtime.kernels" in graph["qwen_agent.runtime.model"]  # "from . import kernels"
    assert "qwen_agent.tools.builtin" in graph["qwen_agent.tools.registry"]
    assert "qwen_agent.errors" in graph["qwen_agent.bench.metrics"]  # "from ..errors import"


def test_find_cycle_reports_a_loop():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_package_has_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_runtime_imports_nothing_of_the_package_but_errors():
    outside = {
        f"{name} imports {target}"
        for name, targets in import_graph().items()
        if name.startswith("qwen_agent.runtime")
        for target in targets
        if not target.startswith("qwen_agent.runtime") and target != "qwen_agent.errors"
    }
    assert not outside, sorted(outside)


def test_only_the_top_level_imports_serve_and_cli():
    upward = {
        f"{name} imports {target}"
        for name, targets in import_graph().items()
        for target in targets
        if target.startswith(("qwen_agent.serve", "qwen_agent.cli"))
        and not name.startswith(("qwen_agent.serve", "qwen_agent.cli", "qwen_agent.demo"))
    }
    assert not upward, sorted(upward)
