"""The package's shape: dependencies flow one way (command line -> workflows -> run ->
data -> core), no import cycles (counting imports inside functions too), and no function
or class too long to read at once."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "gpt2jax"
# docs/architecture.md's table, as numbers: a module may import only its layer or below
LAYERS = {
    "__main__": 5, "cli": 5, "demo": 5,
    "train": 4, "evaluate": 4, "generate": 4, "analysis": 4, "bench": 4, "compile": 4,
    "run": 3, "sources": 3,
    "data": 2, "tasks": 2, "batches": 2,
}
CORE = 1  # every other module


def _imports() -> dict[str, set[str]]:
    """{module: the gpt2jax modules it imports anywhere in its file}."""
    graph = {}
    for f in sorted(PACKAGE.glob("*.py")):
        deps = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                if node.module:
                    deps.add(node.module.split(".")[0])
                else:
                    deps.update(a.name for a in node.names)
        graph[f.stem] = deps - {f.stem}
    return graph


def test_every_module_has_a_layer_in_the_architecture_doc():
    doc = (PACKAGE.parent / "docs" / "architecture.md").read_text()
    missing = [m for m in _imports()
               if m not in ("__init__", "__main__") and f"`{m}.py`" not in doc]
    assert not missing


def test_dependencies_flow_down():
    up = [(m, d) for m, deps in _imports().items() for d in deps
          if LAYERS.get(d, CORE) > LAYERS.get(m, CORE) and m != "__init__"]
    assert not up, f"imports of a higher layer: {up}"


def test_no_import_cycles():
    graph = _imports()
    graph.pop("__init__")  # the lazy public API names everything
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph.get(m, ())):
            assert state.get(d) != 1, f"import cycle: {' -> '.join(path + [m, d])}"
            if d not in state:
                visit(d, path + [m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])


def test_functions_and_classes_stay_short():
    long = []
    for f in sorted(PACKAGE.glob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            n = getattr(node, "end_lineno", 0) - getattr(node, "lineno", 0) + 1
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and n > 80:
                long.append(f"{f.name}:{node.name} ({n} lines)")
            if isinstance(node, ast.ClassDef) and n > 150:
                long.append(f"{f.name}:class {node.name} ({n} lines)")
    assert not long
