"""The layering rule of docs/architecture.md: no import cycle, and no module imports one of a higher layer.

Imports are read from the source (every ``import`` statement, including those inside functions, which run
later but still tie the modules together). A new module must be given a layer here and in the doc.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "dinado"

# layer of each module (a package's modules take the package's layer); a module may import only lower layers,
# except inside its own package
LAYERS = {
    # 0: the method's math and plain helpers, no dinado imports
    "numerics": 0,
    "parameterizations": 0,
    "modules": 0,
    "config": 0,
    "bases": 0,
    "_utils": 0,
    "_version": 0,
    # 1: adapters to transformers/PEFT models, and the data containers
    "hf": 1,
    "data": 1,
    # 2: the guide (base + value module) and the oracles
    "guide": 2,
    "oracles": 2,
    # 3: what runs a guide: cached features, the logits processor
    "features": 3,
    "decoding": 3,
    # 4: the objectives, sampling from p, exact enumeration
    "objectives": 4,
    "sampling": 4,
    "exact": 4,
    # 5: training loops and text generation
    "training": 5,
    "text": 5,
    "pretrain": 5,
    # 6: evaluation, baselines, the classifier trainer
    "evaluation": 6,
    "baselines": 6,
    "classifier": 6,
    # 7: tasks (CommonGen, formality, the toy language): read by applications, never by the core
    "tasks": 7,
    # 8: the demos (they build on tasks)
    "demo": 8,
    "exact_demo": 8,
    # 9: the CLI (which runs the demos) and the package's public namespace
    "cli": 9,
    "": 9,  # dinado/__init__.py
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_module(name: str) -> bool:
    path = SRC.joinpath(*name.split(".")) if name else SRC
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imports(path: Path) -> set[str]:
    """The dinado modules ``path`` imports, as names relative to the package (``""`` is dinado itself)."""
    name = module_name(path)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    package = [p for p in package if p]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                target = base + (node.module.split(".") if node.module else [])
            elif node.module and (node.module == "dinado" or node.module.startswith("dinado.")):
                target = [p for p in node.module.removeprefix("dinado").split(".") if p]
            else:
                continue
            for alias in node.names:  # `from . import exact` imports a module; `from .x import y` a name
                sub = ".".join([*target, alias.name])
                found.add(sub if is_module(sub) else ".".join(target))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "dinado" or alias.name.startswith("dinado."):
                    found.add(alias.name.removeprefix("dinado").lstrip("."))
    found.discard(name)
    return found


def layer(name: str) -> int:
    parts = name.split(".") if name else [""]
    for end in range(len(parts), 0, -1):
        key = ".".join(parts[:end])
        if key in LAYERS:
            return LAYERS[key]
    raise AssertionError(
        f"dinado.{name} has no layer: add it to LAYERS in tests/test_architecture.py and to docs/architecture.md"
    )


def top_package(name: str) -> str:
    return name.split(".")[0]


GRAPH = {module_name(p): imports(p) for p in sorted(SRC.rglob("*.py"))}


def test_every_module_has_a_layer():
    for name in GRAPH:
        layer(name)


@pytest.mark.parametrize("name", sorted(GRAPH))
def test_no_module_imports_a_higher_layer(name):
    for dep in sorted(GRAPH[name]):
        same_package = top_package(dep) == top_package(name)  # a package's modules (and its __init__)
        if same_package:
            continue
        assert layer(dep) < layer(name), (
            f"dinado.{name} (layer {layer(name)}) imports dinado.{dep} (layer {layer(dep)}): a module may import "
            "only lower layers (docs/architecture.md)"
        )


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return path[path.index(dep) :] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle():
    cycle = find_cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(f"dinado.{m}" if m else "dinado" for m in cycle)


def test_the_checks_catch_a_cycle_and_an_upward_import():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert layer("guide") < layer("training")  # training -> guide is allowed, guide -> training is not
    assert "guide" in GRAPH["training"] and "hf" in GRAPH["guide"]  # the import reader sees real imports


def test_the_core_never_imports_a_task():
    for name, deps in GRAPH.items():
        if layer(name) < LAYERS["tasks"]:
            assert not any(top_package(d) == "tasks" for d in deps), f"dinado.{name} imports a task: {deps}"
