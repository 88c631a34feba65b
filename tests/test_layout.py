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


def _module_names(package: pathlib.Path) -> dict[str, pathlib.Path]:
    """Dotted name -> file of every module under `package` (a package by its __init__.py's name)."""
    names = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(package.parent).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def import_graph(package: pathlib.Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports, from every import statement wherever it stands (a function's
    body, `if TYPE_CHECKING:`): relative imports resolved, `from pkg import name` naming the submodule where one
    exists (the package's __init__ otherwise: a package counts only where a module names it, not for the
    ancestors that importing a submodule runs)."""
    modules = _module_names(package)
    graph = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    here = name.split(".") if is_package else name.split(".")[:-1]
                    here = here[: len(here) - node.level + 1]
                    base = ".".join([*here, base] if base else here)
                for alias in node.names:
                    targets.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The graph's strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index, low, on_stack, stack, cycles = {}, {}, set(), [], []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, edges = work[-1]
            child = next(edges, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    cycles.append(sorted(component))
    return cycles


def test_no_import_cycle_between_modules_even_a_dodged_one():
    graph = import_graph(PACKAGE)
    assert "jaxepochs.host.saved_run" in graph["jaxepochs.host.warm_start"]  # the graph sees the package's imports
    cycles = import_cycles(graph)
    assert not cycles, "import cycles (an import inside a function counts): " + "; ".join(
        " <-> ".join(c) for c in cycles
    )


def test_the_cycle_check_sees_a_cycle_dodged_inside_a_function(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("from pkg.a import f\n")
    (package / "sub" / "__init__.py").write_text("")
    (package / "a.py").write_text("from pkg.sub import b\n\ndef f():\n    return b.g()\n")
    (package / "sub" / "b.py").write_text("def g():\n    from .. import c  # dodged\n\n    return c.h()\n")
    (package / "c.py").write_text("import typing\n\nif typing.TYPE_CHECKING:\n    from pkg import a\n")
    (package / "d.py").write_text("from .sub.b import g\nfrom . import a\n")  # imports into the cycle: not in it
    (package / "e.py").write_text("from pkg import f\n")  # a name of the package: its __init__
    graph = import_graph(package)
    assert graph["pkg.e"] == {"pkg"} and graph["pkg"] == {"pkg.a"}
    assert graph["pkg.sub.b"] == {"pkg.c"} and graph["pkg.d"] == {"pkg.sub.b", "pkg.a"}
    assert graph["pkg.a"] == {"pkg.sub.b"}  # pkg.sub's __init__, run by importing pkg.sub.b, is not named
    assert import_cycles(graph) == [["pkg.a", "pkg.c", "pkg.sub.b"]]
    (package / "c.py").write_text("")
    assert import_cycles(import_graph(package)) == []
    assert import_cycles({"x": {"y"}, "y": {"x"}, "z": {"z", "x"}}) == [["x", "y"]]
