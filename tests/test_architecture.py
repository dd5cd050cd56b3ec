"""The package's shape: layers with one direction, no import cycles, short functions.

Imports are read with `ast` from every module of src/tunelab, those inside functions included (an
import inside a function still ties the two modules together).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "tunelab"

#: The layers, lowest first; a module may import its own layer and those below, never one above.
#: The README's Architecture section describes the same table.
LAYERS = [
    ["errors", "choices", "folders", "quick_exit", "distributed", "plots"],
    ["data", "models", "freezing", "compositions", "schedules", "checkpoints", "optimizers", "environment", "metrics", "compare_stats"],
    ["checks", "prepare", "inference"],
    ["callbacks", "loop", "range_test", "predictions", "serving"],
    ["tracking"],
    ["compare_rows", "compare_report", "compare_tables", "compare_figure", "compare", "run", "trained", "registry"],
    ["sweep"],
    ["cli", "lr_find", "preview", "evaluate", "predict"],
]
LONGEST_FUNCTION = 60
MOST_PARAMETERS = 10


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        name = ".".join(("tunelab", *parts))
        found[name.removesuffix(".__init__")] = path
    return found


def _imports(name: str, path: Path, modules: set[str]) -> set[str]:
    """The tunelab modules `name` imports, anywhere in its file."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            targets.add(base)
            targets |= {f"{base}.{a.name}" for a in node.names}
    return {t for t in targets if t in modules and t != name}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, set(modules)) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def _layer(module: str) -> int:
    if module == "tunelab":  # the package's __init__: its version, nothing else
        return 0
    top = module.split(".")[1]
    for number, names in enumerate(LAYERS):
        if top in names:
            return number
    raise AssertionError(f"{module} is in no layer of tests/test_architecture.py's LAYERS: add it where it belongs")


def test_no_module_is_in_an_import_cycle():
    cycles = _cycles(_graph())
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_no_module_imports_a_layer_above_its_own():
    upward = [f"{a} (layer {_layer(a)}) imports {b} (layer {_layer(b)})"
              for a, targets in _graph().items() for b in sorted(targets) if _layer(b) > _layer(a)]
    assert not upward, "\n".join(upward)


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def _functions():
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = node.args
                params = [*a.posonlyargs, *a.args, *a.kwonlyargs] + [p for p in (a.vararg, a.kwarg) if p]
                if params and params[0].arg in ("self", "cls"):
                    params = params[1:]
                yield f"{name}.{node.name}", node.end_lineno - node.lineno + 1, len(params)


@pytest.mark.parametrize("measure,limit", [(1, LONGEST_FUNCTION), (2, MOST_PARAMETERS)])
def test_functions_are_short_and_take_few_parameters(measure, limit):
    over = sorted((f[measure], f[0]) for f in _functions() if f[measure] > limit)
    assert not over, f"over {limit} {'lines' if measure == 1 else 'parameters'}: {over}"
