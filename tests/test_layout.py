"""The house rules, checked on the source: imports flow one way between the package's floors (settings -> model /
formats -> engine -> stages / methods -> output / evaluation / tools / runtime -> run / api / cli), no import circle, no
module over 300 lines, no function over 7 parameters, the settings import no torch, and no two test files share a name."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "besa"

# The floor of each part of the package: a module may import its own floor and the floors below it.
FLOORS = {
    "errors": 0, "fileio": 0, "registry": 0, "settings": 0,
    "model": 1, "formats": 1,
    "engine": 2,
    "stages": 3, "methods": 3,
    "output": 4, "evaluation": 4, "tools": 4, "runtime": 4,
    "run": 5, "api": 5, "cli": 5, "__init__": 5, "__main__": 5,
}  # fmt: skip
MAX_LINES = 300
MAX_PARAMETERS = 7


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _floor(module: str) -> int:
    part = module.split(".")[1] if module != "besa" else "__init__"
    return FLOORS[part]


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The besa modules ``path`` imports, at the top or inside functions (not under ``TYPE_CHECKING``)."""
    out: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                continue
            if isinstance(child, ast.ImportFrom) and child.module and child.module.startswith("besa"):
                for alias in child.names:  # ``from besa.engine import distributed`` names a module
                    sub = f"{child.module}.{alias.name}"
                    out.add(sub if sub in modules else child.module)
            elif isinstance(child, ast.Import):
                out.update(a.name for a in child.names if a.name.startswith("besa"))
            visit(child)

    visit(ast.parse(path.read_text()))
    return {m for m in out if m in modules}


def test_imports_flow_one_way():
    modules = _modules()
    upward = [
        f"{name} (floor {_floor(name)}) imports {dep} (floor {_floor(dep)})"
        for name, path in modules.items()
        for dep in sorted(_imports(path, modules))
        if _floor(dep) > _floor(name) and name not in ("besa", "besa.__main__")
    ]
    assert not upward, "\n".join(upward)


def test_no_import_circle():
    modules = _modules()
    graph = {name: _imports(path, modules) - {name} for name, path in modules.items()}
    # a package's ``__init__`` is imported before its submodules anyway: an edge into it is not a circle
    for name in graph:
        graph[name] = {d for d in graph[name] if not name.startswith(d + ".")}
    state: dict[str, int] = {}
    circles: list[str] = []

    def walk(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                circles.append(" -> ".join([*stack[stack.index(dep) :], dep]))
            elif dep not in state:
                walk(dep, [*stack, dep])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            walk(name, [name])
    assert not circles, "\n".join(circles)


def test_settings_import_no_torch():
    for path in sorted((SRC / "settings").rglob("*.py")):
        tree = ast.parse(path.read_text())
        names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert "torch" not in names, path


@pytest.mark.parametrize("name", sorted(_modules()))
def test_modules_are_small(name):
    lines = len(_modules()[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{name} has {lines} lines"


def test_functions_take_few_parameters():
    long = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = node.args
                params = [
                    p.arg for p in (*a.posonlyargs, *a.args, *a.kwonlyargs) if p.arg not in ("self", "cls")
                ]
                if len(params) > MAX_PARAMETERS:
                    long.append(f"{name}.{node.name}: {len(params)}")
    assert not long, "\n".join(long)


def test_test_files_have_unique_names():
    """pytest imports test files by their base name (rootdir mode, no __init__.py), so two test files of one name in
    different folders stop the whole collection on a fresh clone."""
    tests = Path(__file__).resolve().parent
    seen: dict[str, list[str]] = {}
    for path in sorted(tests.rglob("test_*.py")):
        seen.setdefault(path.name, []).append(str(path.relative_to(tests)))
    twins = {name: paths for name, paths in seen.items() if len(paths) > 1}
    assert not twins, twins
