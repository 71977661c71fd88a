"""Layering: only the torch.distributed communicators touch ``torch.distributed``.

Algorithms are written against :class:`desloc.comm.Communicator` and must run unchanged on the
simulator, so no module under ``src/desloc`` may import ``torch.distributed`` except those in
``ALLOWED``; ``algorithms/`` and ``optim/`` may not even reach one of those through desloc's own
module-level imports. Imports are read with ``ast`` (a comment or string mentioning
``torch.distributed`` does not count; an import inside a function does).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PKG = SRC / "desloc"
# Modules allowed to import torch.distributed. A launcher under desloc/comm/ would be added here.
ALLOWED = {"desloc.comm.torch_dist", "desloc.comm.mesh", "desloc.comm.fsdp", "desloc.comm.dcp"}  # --shard: mesh, FSDP2, DCP
FORBIDDEN = "torch.distributed"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _resolve(module: str, node: ast.ImportFrom) -> str:
    """Absolute name of ``from <node.module> import ...`` written in ``module``."""
    if node.level == 0:
        return node.module or ""
    is_pkg = MODULES[module].name == "__init__.py"
    base = module.split(".")
    base = base if is_pkg else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str, top_level_only: bool = False) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``module``.

    ``from a import b`` yields both ``a`` and ``a.b`` (b may be a submodule). With
    ``top_level_only``, imports inside function bodies (run only when called) are skipped.
    Dynamic ``importlib.import_module("...")`` / ``__import__("...")`` with a literal count too.
    """
    tree = ast.parse(MODULES[module].read_text(), filename=str(MODULES[module]))
    found: list[tuple[int, str]] = []

    def visit(node: ast.AST) -> None:
        if top_level_only and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            return
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, node)
            found.append((node.lineno, base))
            found.extend((node.lineno, f"{base}.{alias.name}") for alias in node.names if alias.name != "*")
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                found.append((node.lineno, node.args[0].value))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _is_forbidden(name: str) -> bool:
    return name == FORBIDDEN or name.startswith(FORBIDDEN + ".")


def test_source_tree_found():
    assert "desloc.comm.torch_dist" in MODULES and "desloc.algorithms.desloc" in MODULES, sorted(MODULES)
    for allowed in ALLOWED:
        assert allowed in MODULES, f"ALLOWED names {allowed}, which no longer exists"
        assert allowed.startswith("desloc.comm."), "torch.distributed belongs under desloc/comm/"


def test_parser_sees_every_import_form(tmp_path, monkeypatch):
    """The checker catches each spelling, and ignores comments and strings."""
    src = tmp_path / "desloc" / "pkg"
    src.mkdir(parents=True)
    cases = {
        "a": "import torch.distributed as dist\n",
        "b": "from torch import distributed\n",
        "c": "from torch.distributed import all_reduce\n",
        "d": "def f():\n    import torch.distributed.rpc\n",
        "e": "import importlib\nimportlib.import_module('torch.distributed')\n",
        "clean": "# import torch.distributed\nimport torch\nx = 'torch.distributed'\n",
    }
    for name, text in cases.items():
        (src / f"{name}.py").write_text(text)
    monkeypatch.setattr(sys.modules[__name__], "MODULES", {f"desloc.pkg.{n}": src / f"{n}.py" for n in cases})
    flagged = {n for n in cases if any(_is_forbidden(m) for _, m in _imports(f"desloc.pkg.{n}"))}
    assert flagged == {"a", "b", "c", "d", "e"}


def test_only_the_torch_dist_communicator_imports_torch_distributed():
    offenders = [
        f"{MODULES[mod].relative_to(SRC.parent)}:{line}: imports {name}"
        for mod in MODULES
        if mod not in ALLOWED
        for line, name in _imports(mod)
        if _is_forbidden(name)
    ]
    assert not offenders, "torch.distributed outside desloc/comm/torch_dist.py:\n" + "\n".join(offenders)


def _closure(start: str) -> dict[str, str]:
    """desloc modules executed by importing ``start`` (module-level imports, parent packages
    included), each mapped to the module that pulled it in."""
    seen = {start: ""}
    stack = [start]
    while stack:
        mod = stack.pop()
        deps = [name for _, name in _imports(mod, top_level_only=True)]
        parts = mod.split(".")
        deps += [".".join(parts[:i]) for i in range(1, len(parts))]  # parent packages run first
        for dep in deps:
            if dep in MODULES and dep not in seen:
                seen[dep] = mod
                stack.append(dep)
    return seen


@pytest.mark.parametrize("layer", ["desloc.algorithms", "desloc.optim"])
def test_algorithms_and_optim_never_reach_torch_distributed(layer):
    for mod in [m for m in MODULES if m == layer or m.startswith(layer + ".")]:
        direct = [name for _, name in _imports(mod) if _is_forbidden(name)]
        assert not direct, f"{mod} imports {direct}"
        for reached, via in _closure(mod).items():
            assert reached not in ALLOWED, f"{mod} reaches {reached} (imported by {via}) at import time"


@pytest.mark.timeout(60)
def test_importing_desloc_does_not_load_the_torch_dist_communicator():
    """At run time too: ``import desloc`` (and its algorithm/optim/sim modules) leaves
    ``desloc.comm.torch_dist`` unimported; it loads only on demand."""
    code = (
        "import sys, desloc, desloc.algorithms, desloc.optim, desloc.sim, desloc.comm\n"
        "assert 'desloc.comm.torch_dist' not in sys.modules, 'imported eagerly'\n"
        "desloc.comm.TorchDistComm\n"
        "assert 'desloc.comm.torch_dist' in sys.modules\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=50)
    assert proc.returncode == 0, proc.stderr


def _module_edges(module: str) -> set[str]:
    """desloc modules that ``module`` imports anywhere (function bodies included): ``from pkg import
    name`` is an edge to ``pkg.name`` when that is a module, else to ``pkg`` (its __init__ runs)."""
    tree = ast.parse(MODULES[module].read_text(), filename=str(MODULES[module]))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, node)
            for alias in node.names:
                out.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
    return {m for m in out if m in MODULES and m != module}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_inside_desloc():
    """No module reaches itself through desloc's imports, deferred (function-level) ones included:
    a deferred import hides a cycle from Python but not from a reader (issue 19)."""
    cycles = _cycles({m: _module_edges(m) for m in MODULES})
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_the_cycle_check_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
