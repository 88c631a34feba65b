"""The package's layers: each imports only the layers below it, the core is pure, and functions stay short."""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "jaxepochs"
LAYERS = ["core", "models", "data", "host", "sweep", "studies", "cli"]  # each may import those before it
IMPURE = {"ml_collections", "orbax", "json", "pathlib", "os", "sys", "tensorflow_datasets", "matplotlib"}


def _modules():
    return sorted(p for p in PACKAGE.rglob("*.py") if p.name != "__init__.py" or p.parent != PACKAGE)


def _layer(path: pathlib.Path) -> str:
    relative = path.relative_to(PACKAGE)
    return relative.parts[0] if len(relative.parts) > 1 else relative.stem


def _imports(path: pathlib.Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_a_module_imports_only_the_layers_below_its_own(path):
    layer = _layer(path)
    allowed = set(LAYERS[: LAYERS.index(layer) + 1])
    used = {name.split(".")[1] for name in _imports(path) if name.startswith("jaxepochs.")}
    used = {name for name in used if name in LAYERS}
    assert used <= allowed, f"{path.name} ({layer}) imports {sorted(used - allowed)}"
    if layer == "core":
        roots = {name.split(".")[0] for name in _imports(path)}
        assert not roots & IMPURE, f"core/{path.name} imports {sorted(roots & IMPURE)}: the core does no I/O"


def test_no_function_is_longer_than_100_lines():
    long = []
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno - node.lineno >= 100:
                long.append(f"{path.relative_to(PACKAGE)}:{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long
