"""The package's shape: no import cycles, and torch/transformers only under engine/ (and bench/, which
measures the engine). Read from the source with `ast`, so a lazy import inside a function counts too."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "daemon" / "llmqtt"
HEAVY = ("torch", "transformers", "safetensors")
HEAVY_ALLOWED = ("llmqtt.engine", "llmqtt.bench")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}


def imported(path: Path) -> list[tuple[str, int]]:
    """(module, line) of every import in the file, outside `if TYPE_CHECKING:` blocks (those never run).
    `from . import x` counts as importing the module `x`, not its package."""
    this = module_name(path)
    package = this.split(".") if path.name == "__init__.py" else this.split(".")[:-1]
    found: list[tuple[str, int]] = []

    class Visitor(ast.NodeVisitor):
        def visit_If(self, node: ast.If) -> None:
            test = node.test
            if getattr(test, "id", None) == "TYPE_CHECKING" or getattr(test, "attr", None) == "TYPE_CHECKING":
                for child in node.orelse:
                    self.visit(child)
                return
            self.generic_visit(node)

        def visit_Import(self, node: ast.Import) -> None:
            found.extend((alias.name, node.lineno) for alias in node.names)

        def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            submodules = [f"{target}.{alias.name}" for alias in node.names if f"{target}.{alias.name}" in MODULES]
            found.extend((name, node.lineno) for name in submodules or [target])

    Visitor().visit(ast.parse(path.read_text(encoding="utf-8")))
    return found


def import_graph() -> dict[str, set[str]]:
    return {name: {target for target, _ in imported(path) if target in MODULES and target != name}
            for name, path in MODULES.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
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
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_package_is_read_whole():
    assert {"llmqtt.service", "llmqtt.jobs", "llmqtt.build", "llmqtt.engine.engine", "llmqtt.mqtt.topics"} <= set(MODULES)
    assert "llmqtt.jobs" in import_graph()["llmqtt.service"]


def test_the_import_graph_has_no_cycle():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_one():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_only_the_engine_and_the_bench_import_torch_or_transformers():
    offenders = [f"{name}:{line} imports {target}" for name, path in sorted(MODULES.items())
                 if not name.startswith(HEAVY_ALLOWED)
                 for target, line in imported(path) if target.split(".")[0] in HEAVY]
    assert offenders == []


def test_the_value_types_import_nothing_of_llmqtt():
    assert import_graph()["llmqtt.jobs"] == set()
