"""The package's shape: light imports for workers, no import cycles, modules of a readable size."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "glinthawk_dask"

#: import cycles allowed for now (pairs of dotted module names): none
KNOWN_CYCLES: set[frozenset[str]] = set()
MAX_LINES = 500


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _module_level_imports(body: list[ast.stmt]) -> list[ast.Import | ast.ImportFrom]:
    """The imports a module runs when it is imported: its top-level statements, those in
    module-level ``if``/``try``/``with`` blocks and class bodies, not in functions and not
    under ``if TYPE_CHECKING:``."""
    found: list[ast.Import | ast.ImportFrom] = []
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif isinstance(node, ast.If):
            if "TYPE_CHECKING" not in ast.unparse(node.test):
                found += _module_level_imports(node.body)
            found += _module_level_imports(node.orelse)
        elif isinstance(node, ast.Try):
            for block in (node.body, node.orelse, node.finalbody, *(h.body for h in node.handlers)):
                found += _module_level_imports(block)
        elif isinstance(node, (ast.With, ast.ClassDef)):
            found += _module_level_imports(node.body)
    return found


def _targets(module: str, node: ast.Import | ast.ImportFrom) -> set[str]:
    """The package's modules an import statement of ``module`` imports."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
        return {n for n in names if n in MODULES}
    if node.level:
        is_package = MODULES[module].name == "__init__.py"
        base = module.split(".")
        base = base[: len(base) - node.level + (1 if is_package else 0)]
        prefix = ".".join(base + ([node.module] if node.module else []))
    else:
        prefix = node.module or ""
    submodules = {f"{prefix}.{alias.name}" for alias in node.names if f"{prefix}.{alias.name}" in MODULES}
    if prefix in MODULES and len(submodules) < len(node.names):  # names defined by the module itself
        submodules.add(prefix)
    return submodules


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports at module level."""
    graph = {}
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        graph[name] = set().union(*(_targets(name, n) for n in _module_level_imports(tree.body))) - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_import_graph_is_read_right():
    graph = import_graph()
    assert "glinthawk_dask.engine.request" in graph["glinthawk_dask.engine.engine"]  # from .request import ...
    assert "glinthawk_dask.config" in graph["glinthawk_dask.engine.engine"]  # from .. import config
    assert "glinthawk_dask.api" in graph["glinthawk_dask.pipeline.run"]
    assert graph["glinthawk_dask"] == set()  # the root imports lazily; TYPE_CHECKING imports do not count
    assert "glinthawk_dask.runtime.dense_service" not in graph["glinthawk_dask.runtime.driver"]  # TYPE_CHECKING
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    graph = import_graph()
    for pair in KNOWN_CYCLES:
        a, b = sorted(pair)
        graph[a].discard(b)
        graph[b].discard(a)
    assert cycles(graph) == []


def test_no_module_is_too_long():
    lengths = {name: len(path.read_text().splitlines()) for name, path in MODULES.items()}
    assert {n: k for n, k in lengths.items() if k > MAX_LINES} == {}


@pytest.mark.parametrize("module", ["glinthawk_dask.model", "glinthawk_dask.engine", "glinthawk_dask.engine.engine"])
def test_model_and_engine_imports_stay_light(module):
    """Workers import the model code: it must not load the cluster, the output format or fsspec."""
    code = (f"import sys, json; import {module}; "
            "print(json.dumps([m for m in ('distributed', 'zarr', 'fsspec') if m in sys.modules]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == []


def test_the_package_root_is_lazy_and_complete():
    code = ("import sys, json, glinthawk_dask as g; before = 'glinthawk_dask.api' in sys.modules; "
            "names = {n: getattr(g, n).__module__ if n != '__version__' else '' for n in g.__all__}; "
            "print(json.dumps([before, sorted(set(g.__all__) - set(dir(g))), names]))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    api_loaded_at_import, missing_from_dir, names = json.loads(done.stdout)
    assert not api_loaded_at_import and missing_from_dir == []
    assert names["LLM"] == "glinthawk_dask.api" and names["submit"] == "glinthawk_dask.jobs"
    from glinthawk_dask import LLM, submit  # noqa: F401
    with pytest.raises(AttributeError, match="no_such_name"):
        import glinthawk_dask

        glinthawk_dask.no_such_name
